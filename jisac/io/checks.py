"""Formats layer: Checks a run makes on its input before computing, each failing with one clear :class:`StackError`
line."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from jisac.io.errors import StackError
from jisac.io.table import CTF_COLUMNS

_SHOWN = 5  # how many offending indices/rows a message lists
_LOG = logging.getLogger("jisac")
# Plausibility limits for CTF parameters. Voltages: cryo-EM microscopes run at 60-1000 kV; above 5000 the value is
# almost surely in volts, not kV. Defocus: SPA data are taken at 0.3-5 µm underfocus; above 20 µm (200000 Å) the
# value is more likely in the wrong unit (nm read as Å ...) than real.
_MAX_VOLTAGE_KV = 5000.0
_SUSPICIOUS_DEFOCUS_ANGST = 200000.0


def require_pixel_size(stack) -> float:
    """The stack's pixel size in Å; raises when it is unknown or not positive (e.g. an MRC header with voxel
    size 0 and no STAR/.cs value)."""
    size = stack.pixel_size
    if size is None or not np.isfinite(size) or size <= 0:
        raise StackError(f"{stack.source}: pixel size unknown (no rlnImagePixelSize and a header voxel size of 0); "
                         "give it with data.pixel_size=<A/px> (Angstrom per pixel)")
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
                         f"{_rows(rows)}); fix or remove them, or run with isac.ctf=false")
    _check_ctf_values(values, source)


def _rows(rows) -> str:
    """'1, 2, 3 ...': the first few 0-based ``rows`` as 1-based row numbers."""
    return f"{', '.join(str(int(r) + 1) for r in rows[:_SHOWN])}{' ...' if len(rows) > _SHOWN else ''}"


def _check_ctf_values(values: pd.DataFrame, source) -> None:
    """Refuses CTF values no microscope gives (a CTF built from them would be wrong or NaN, silently); warns, one
    line each, about values that are possible but more often a unit or sign mistake."""
    def refuse(column, bad, what, fix):
        rows = np.flatnonzero(bad)
        if len(rows):
            value = values[column].iloc[rows[0]]
            raise StackError(f"{source}: _{column} is {what} in {len(rows)} particle row(s) (rows {_rows(rows)}; "
                             f"e.g. {value:g}); {fix}, or run with isac.ctf=false")

    voltage = values["rlnVoltage"].to_numpy(float)
    refuse("rlnVoltage", voltage <= 0, "not positive", "give the accelerating voltage in kV (e.g. 300)")
    refuse("rlnVoltage", voltage > _MAX_VOLTAGE_KV, f"above {_MAX_VOLTAGE_KV:g} kV",
           "give the voltage in kV, not volts (e.g. 300)")
    cs = values["rlnSphericalAberration"].to_numpy(float)
    refuse("rlnSphericalAberration", cs < 0, "negative", "give the spherical aberration in mm (e.g. 2.7)")
    amp = values["rlnAmplitudeContrast"].to_numpy(float)
    refuse("rlnAmplitudeContrast", np.abs(amp) > 1, "outside [-1, 1]",
           "give the amplitude contrast as a fraction (e.g. 0.1, not 10 %)")

    defocus = values[["rlnDefocusU", "rlnDefocusV"]].to_numpy(float)
    if (defocus < 0).all():
        _LOG.warning("%s: every particle has a negative defocus (overfocus); RELION's convention is positive "
                     "underfocus: check the sign of _rlnDefocusU/V", source)
    far = np.flatnonzero((np.abs(defocus) > _SUSPICIOUS_DEFOCUS_ANGST).any(axis=1))
    if len(far):
        _LOG.warning("%s: %d particle row(s) have a defocus above %g um (rows %s; e.g. %g A); check that "
                     "_rlnDefocusU/V are in Angstrom", source, len(far), _SUSPICIOUS_DEFOCUS_ANGST / 1e4,
                     _rows(far), np.abs(defocus[far[0]]).max())


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
