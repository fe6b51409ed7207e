"""cryoSPARC particle files (``.cs``): a NumPy structured array saved with ``np.save``.

Fields read (others are ignored): ``blob/path`` (bytes; the particle's .mrc/.mrcs, relative to the project folder,
a leading ``>`` meaning the same and stripped), ``blob/idx`` (0-based image index), ``blob/psize_A`` (Å),
``ctf/df1_A``, ``ctf/df2_A`` (Å), ``ctf/df_angle_rad``, ``ctf/accel_kv``, ``ctf/cs_mm``, ``ctf/amp_contrast``,
``ctf/phase_shift_rad`` and ``uid``. They become RELION columns: ``rlnImageName`` (``idx+1@path``),
``rlnImagePixelSize``, ``rlnDefocusU/V`` (Å), ``rlnDefocusAngle`` (degrees), ``rlnVoltage`` (kV),
``rlnSphericalAberration`` (mm), ``rlnAmplitudeContrast``, ``rlnPhaseShift`` (degrees), ``csUid``; one optics group.
The angle is converted as pyem's csparc2star does (radians -> degrees, same axis).

A relative ``blob/path`` is looked up under ``project_dir`` when given, else beside the .cs file, its parent and
grandparent (a job's .cs file lives in ``<project>/J<n>/``), else the working directory.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from jisac.io.errors import StackError, StackFileNotFoundError
from jisac.io.table import ParticleTable, image_names

# cryoSPARC field -> (RELION column, factor): RELION's units from cryoSPARC's.
_CONVERSIONS = {
    "blob/psize_A": ("rlnImagePixelSize", 1.0),
    "ctf/df1_A": ("rlnDefocusU", 1.0),
    "ctf/df2_A": ("rlnDefocusV", 1.0),
    "ctf/df_angle_rad": ("rlnDefocusAngle", 180.0 / np.pi),
    "ctf/accel_kv": ("rlnVoltage", 1.0),
    "ctf/cs_mm": ("rlnSphericalAberration", 1.0),
    "ctf/amp_contrast": ("rlnAmplitudeContrast", 1.0),
    "ctf/phase_shift_rad": ("rlnPhaseShift", 180.0 / np.pi),
}


def _decode(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def read_cs_table(path: str | os.PathLike, project_dir: str | os.PathLike | None = None) -> ParticleTable:
    """Reads a cryoSPARC ``.cs`` particle file into a :class:`ParticleTable` (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise StackFileNotFoundError(f"{path}: no such cryoSPARC .cs file")
    try:
        records = np.load(path, allow_pickle=False)
    except Exception as e:  # np.load raises several kinds for a file that is not an .npy array
        raise StackError(f"{path}: not a readable cryoSPARC .cs file ({type(e).__name__}: {e})") from None
    names = records.dtype.names or ()
    missing = [f for f in ("blob/path", "blob/idx") if f not in names]
    if missing:
        raise StackError(f"{path}: the .cs file has no {', '.join(missing)} field(s), so it does not locate particle "
                         "images; give the particles .cs of an Extract/Import/classification job")
    stacks = [_decode(p).lstrip(">") for p in records["blob/path"]]
    indices = np.asarray(records["blob/idx"], np.int64)

    metadata = pd.DataFrame({"rlnImageName": image_names(indices, stacks), "rlnOpticsGroup": 1})
    for field, (column, factor) in _CONVERSIONS.items():
        if field in names:
            metadata[column] = np.asarray(records[field], np.float64) * factor
    if "uid" in names:
        metadata["csUid"] = np.asarray(records["uid"])

    bases = [Path(project_dir)] if project_dir is not None else [path.parent, path.parent.parent,
                                                                  path.parent.parent.parent]
    bases.append(Path.cwd())
    unique, first, file_of = np.unique(np.asarray(stacks, dtype=object), return_index=True, return_inverse=True)
    files = [None] * len(unique)
    for k in np.argsort(first):  # in order of first use, so the message names the first bad row
        stack = unique[k]
        candidates = [Path(stack)] if Path(stack).is_absolute() else [b / stack for b in bases]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise StackFileNotFoundError(
                f"{path}: row {first[k] + 1}: blob/path '{stack}' not found (looked under "
                f"{', '.join(str(b) for b in bases)}); pass project_dir= the cryoSPARC project folder")
        files[k] = found.resolve()
    rows = np.arange(1, len(records) + 1)
    return ParticleTable(metadata, tuple(files), file_of.astype(np.int64), indices, rows, path)
