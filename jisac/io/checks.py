"""Checks a run makes on its input before computing, each failing with one clear :class:`StackError` line."""

from __future__ import annotations

import numpy as np
import pandas as pd

from jisac.io.errors import StackError
from jisac.io.table import CTF_COLUMNS

_SHOWN = 5  # how many offending indices/rows a message lists


def require_pixel_size(stack) -> float:
    """The stack's pixel size in Å; raises when it is unknown or not positive (e.g. an MRC header with voxel
    size 0 and no STAR/.cs value)."""
    size = stack.pixel_size
    if size is None or not np.isfinite(size) or size <= 0:
        raise StackError(f"{stack.source}: pixel size unknown (no rlnImagePixelSize and a header voxel size of 0); "
                         "pass pixel_size=<Å/px> (on the command line: data.pixel_size=<Å/px>)")
    return float(size)


def require_ctf_columns(metadata: pd.DataFrame, source="the particle metadata") -> None:
    """Raises unless ``metadata`` has every RELION CTF column (``CTF_COLUMNS``; ``rlnPhaseShift`` is optional)
    with a value in every row; the message lists what is missing."""
    missing = [c for c in CTF_COLUMNS if c not in metadata.columns]
    if missing:
        raise StackError(f"{source}: CTF correction (isac.ctf=true) needs the RELION columns "
                         f"{', '.join('_' + c for c in missing)}, which are missing; give a STAR/.cs file with CTF "
                         "parameters or run with isac.ctf=false")
    values = metadata[list(CTF_COLUMNS)].apply(pd.to_numeric, errors="coerce")
    bad = values.isna().any(axis=1).to_numpy()
    if bad.any():
        rows = np.flatnonzero(bad)
        raise StackError(f"{source}: {len(rows)} particle row(s) have no numeric CTF values (rows "
                         f"{', '.join(str(r + 1) for r in rows[:_SHOWN])}{' ...' if len(rows) > _SHOWN else ''}); "
                         "fix or remove them, or run with isac.ctf=false")


def check_finite(images, indices, *, drop_nonfinite: bool = False, source="the stack") -> np.ndarray:
    """Which images hold only finite values.

    images:  ``(k, ny, nx)``; indices: ``(k,)`` the particles' indices in the stack (for the message).
    Returns a ``(k,)`` bool mask, True where the image is finite. Raises a :class:`StackError` naming how many and
    which (the first few) images contain NaN/Inf, unless ``drop_nonfinite`` (then the caller drops them)."""
    images = np.asarray(images)
    finite = np.isfinite(images.reshape(len(images), -1)).all(axis=1)
    if not drop_nonfinite and not finite.all():
        bad = np.asarray(indices)[~finite]
        raise StackError(f"{source}: {len(bad)} image(s) contain NaN or Inf (particle indices "
                         f"{', '.join(str(int(i)) for i in bad[:_SHOWN])}{' ...' if len(bad) > _SHOWN else ''}); "
                         "remove them from the input, or pass drop_nonfinite=True to skip them")
    return finite
