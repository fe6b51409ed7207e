"""Formats layer: cryoSPARC particle files (``.cs``), read through cryosparc-tools' ``Dataset`` (the io layer's
cryoSPARC reader).

cryoSPARC writes ``.cs`` files in two formats: a NumPy structured array saved with ``np.save`` (a refinement's file
has hundreds of fields and a NumPy header beyond ``np.load``'s 10 kB safety limit) and cryosparc-tools' newer
CSDAT format (not NumPy at all). ``cryosparc.dataset.Dataset.load`` reads both, and only the fields asked for.

Fields read (others are ignored): ``uid``, ``blob/path`` (the particle's .mrc/.mrcs, relative to the project
folder, a leading ``>`` meaning the same and stripped), ``blob/idx`` (0-based image index; an integer type is
required: a float index is refused rather than truncated), ``blob/psize_A`` (Å), ``ctf/df1_A``, ``ctf/df2_A``
(Å), ``ctf/df_angle_rad``, ``ctf/accel_kv``, ``ctf/cs_mm``, ``ctf/amp_contrast``, ``ctf/phase_shift_rad`` and
``ctf/exp_group_id``. They become RELION columns: ``rlnImageName`` (``idx+1@path``), ``rlnImagePixelSize``,
``rlnDefocusU/V`` (Å), ``rlnDefocusAngle`` (degrees), ``rlnVoltage`` (kV), ``rlnSphericalAberration`` (mm),
``rlnAmplitudeContrast``, ``rlnPhaseShift`` (degrees) and ``rlnOpticsGroup`` (``ctf/exp_group_id``, shifted by
+1 when the file uses group 0, since RELION's groups start at 1; 1 when the field is absent). The angle is converted
as pyem's csparc2star does (radians -> degrees, same axis).

The particle's cryoSPARC ``uid`` (uint64) is kept as the metadata column ``csUid``: a ``cs`` prefix (not ``rln``,
which RELION reserves, nor ``jisac``, which marks jisac's own results) says where the value comes from, and it is
what a result sent back to cryoSPARC must carry to be matched to the original particles.

A relative ``blob/path`` is looked up under ``project_dir`` (the config key ``data.project_dir``) when given, else
beside the .cs file, its parent and grandparent (a job's .cs file lives in ``<project>/J<n>/``), else the working
directory.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from jisac.io.errors import StackError, StackFileNotFoundError, require_file
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
_FIELDS = ("uid", "blob/path", "blob/idx", "ctf/exp_group_id", *_CONVERSIONS)


def _decode(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _load(path: Path):
    """The wanted fields of a .cs file as a cryosparc-tools ``Dataset`` (either format)."""
    from cryosparc.dataset import Dataset  # imported here: only .cs input needs cryosparc-tools

    try:
        return Dataset.load(path, fields=list(_FIELDS))
    except Exception as e:  # DatasetLoadError wraps the reason (bad magic, bad header, short file ...)
        cause = e.__cause__ or e
        raise StackError(f"{path}: not a readable cryoSPARC .cs file ({type(cause).__name__}: {cause}); give "
                         "the particles .cs of an Extract/Import/classification job") from None


def _optics_groups(values: np.ndarray, path: Path) -> np.ndarray:
    groups = np.asarray(values)
    if groups.dtype.kind not in "iu":
        raise StackError(f"{path}: ctf/exp_group_id has type {groups.dtype}, not an integer; the file is damaged")
    groups = groups.astype(np.int64)
    return groups + 1 if len(groups) and groups.min() == 0 else groups


def read_cs_table(path: str | os.PathLike, project_dir: str | os.PathLike | None = None) -> ParticleTable:
    """Reads a cryoSPARC ``.cs`` particle file into a :class:`ParticleTable` (see the module docstring)."""
    path = Path(path)
    require_file(path, "cryoSPARC .cs file")
    data = _load(path)
    names = set(data.fields())
    missing = [f for f in ("blob/path", "blob/idx") if f not in names]
    if missing:
        raise StackError(f"{path}: the .cs file has no {', '.join(missing)} field(s), so it does not locate particle "
                         "images; give the particles .cs of an Extract/Import/classification job")
    raw_idx = np.asarray(data["blob/idx"])
    if raw_idx.dtype.kind not in "iu":
        raise StackError(f"{path}: blob/idx is stored as {raw_idx.dtype}, not an integer type, so it cannot be "
                         "trusted as an image index; export the particles again from cryoSPARC")
    stacks = [_decode(p).lstrip(">") for p in data["blob/path"]]
    indices = raw_idx.astype(np.int64)

    groups = _optics_groups(data["ctf/exp_group_id"], path) if "ctf/exp_group_id" in names else 1
    metadata = pd.DataFrame({"rlnImageName": image_names(indices, stacks), "rlnOpticsGroup": groups})
    for field, (column, factor) in _CONVERSIONS.items():
        if field in names:
            metadata[column] = np.asarray(data[field], np.float64) * factor
    if "uid" in names:
        metadata["csUid"] = np.asarray(data["uid"])

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
                f"{', '.join(str(b) for b in bases)}); give data.project_dir=<folder>, the cryoSPARC project "
                "folder the blob paths are relative to")
        files[k] = found.resolve()
    rows = np.arange(1, len(indices) + 1)
    return ParticleTable(metadata, tuple(files), file_of.astype(np.int64), indices, rows, path)
