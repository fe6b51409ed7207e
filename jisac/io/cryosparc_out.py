"""Formats layer: cryoSPARC ``.cs`` files of a jisac result (the writing side of ``io.cryosparc``).

A ``.cs`` file is a NumPy structured array saved with ``np.save`` (cryosparc-tools' ``Dataset.save`` default format,
``NUMPY_FORMAT``); it is written here with NumPy alone, so writing needs no cryosparc-tools.

- ``particles.cs``: the accounted particles, as a 2D classification's particle output: ``uid`` (the input's
  cryoSPARC uid, kept by the reader as ``csUid``, else new ones), the ``blob`` slot naming the RELION-ready substack
  (``accounted_particles.mrcs``, mirrored members pre-flipped, ``io.relion``), the ``ctf`` slot when the input had
  one (``df_angle_rad`` negated for flipped members, as the image was mirrored), and ``alignments2D``: ``class``
  (0-based), ``pose`` (in-plane angle, radians) and ``shift`` (px), as pyem's csparc2star maps them to RELION
  (``pose`` = rlnAnglePsi in radians, ``shift`` = rlnOriginX/Y in px), ``psize_A``, ``split`` (the even/odd half),
  ``error`` (jisac's pixel error, working px), ``class_posterior`` = ``weight`` = ``class_ess`` = 1 (a hard
  assignment); ``jisac/flipped`` says which blobs were mirrored.
- ``templates.cs`` + ``templates.mrc``: the class averages as a template group at the particles' pixel size and box:
  ``blob/idx`` = the ``alignments2D/class`` value, ``blob/res_A`` = the split-half resolution.

Paths in ``blob/path`` are relative to the working directory (the folder jisac ran in), else absolute; a cryoSPARC
import resolves them against the project folder it is given.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from jisac.io.atomic import atomic_path
from jisac.io.mrc import write_stack
from jisac.io.star import portable_path

# RELION column -> (cryoSPARC ctf field, factor): the inverse of io.cryosparc's conversions.
_CTF = {
    "rlnDefocusU": ("ctf/df1_A", 1.0),
    "rlnDefocusV": ("ctf/df2_A", 1.0),
    "rlnDefocusAngle": ("ctf/df_angle_rad", np.pi / 180.0),
    "rlnVoltage": ("ctf/accel_kv", 1.0),
    "rlnSphericalAberration": ("ctf/cs_mm", 1.0),
    "rlnAmplitudeContrast": ("ctf/amp_contrast", 1.0),
    "rlnPhaseShift": ("ctf/phase_shift_rad", np.pi / 180.0),
}


def _save(path: Path, columns: dict) -> None:
    """``np.save`` of a structured array with one field per ``columns`` entry (name -> (n, ...) array)."""
    n = len(next(iter(columns.values())))
    dtype = [(name, a.dtype, a.shape[1:]) for name, a in columns.items()]
    records = np.zeros(n, dtype=dtype)
    for name, a in columns.items():
        records[name] = a
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, records, allow_pickle=False)


def _path_bytes(path: Path, n: int) -> np.ndarray:
    return np.full(n, portable_path(path).encode(), dtype=f"S{max(len(portable_path(path).encode()), 1)}")


def new_uids(n: int, seed: int = 0) -> np.ndarray:
    """``n`` distinct uint64 uids (cryoSPARC's are random 64-bit numbers), reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    uids = np.unique(rng.integers(1, 2**63 - 1, size=2 * n + 8, dtype=np.int64))[:n]
    return rng.permutation(uids).astype(np.uint64)


def write_particles(path: Path, metadata: pd.DataFrame, *, substack: Path, box: int, pixel_size: float,
                    class_number: np.ndarray, psi: np.ndarray, origin_px: np.ndarray, flipped: np.ndarray,
                    split: np.ndarray, error: np.ndarray) -> None:
    """``particles.cs`` for the ``m`` accounted particles (row ``i`` = image ``i`` of ``substack``).

    metadata: the particles' input rows (``m`` rows); class_number 1-based; psi in degrees and origin_px ``(m, 2)``
    in pixels relative to the substack image (RELION's rlnAnglePsi and rlnOriginX/Y); flipped: bool ``(m,)``;
    split: 0/1 half; error: pixel error (working px)."""
    m = len(metadata)
    uids = (metadata["csUid"].to_numpy(np.uint64) if "csUid" in metadata.columns else new_uids(m))
    columns = {
        "uid": uids,
        "blob/path": _path_bytes(substack, m),
        "blob/idx": np.arange(m, dtype=np.uint32),
        "blob/shape": np.tile(np.asarray([box, box], np.uint32), (m, 1)),
        "blob/psize_A": np.full(m, pixel_size, np.float32),
    }
    for column, (field, factor) in _CTF.items():
        if column in metadata.columns:
            values = metadata[column].to_numpy(np.float64) * factor
            if column == "rlnDefocusAngle":
                values = np.where(flipped, -values, values)  # the image was x-mirrored
            columns[field] = values.astype(np.float32)
    if "rlnOpticsGroup" in metadata.columns:
        columns["ctf/exp_group_id"] = metadata["rlnOpticsGroup"].to_numpy(np.uint32)
    columns.update({
        "alignments2D/split": np.asarray(split, np.uint32),
        "alignments2D/shift": np.asarray(origin_px, np.float32).reshape(m, 2),
        "alignments2D/pose": np.deg2rad(np.asarray(psi, np.float64)).astype(np.float32),
        "alignments2D/psize_A": np.full(m, pixel_size, np.float32),
        "alignments2D/error": np.asarray(error, np.float32),
        "alignments2D/class_posterior": np.ones(m, np.float32),
        "alignments2D/class": (np.asarray(class_number, np.int64) - 1).astype(np.uint32),
        "alignments2D/class_ess": np.ones(m, np.float32),
        "alignments2D/weight": np.ones(m, np.float32),
        "jisac/flipped": np.asarray(flipped, np.uint8),
    })
    _save(path, columns)


def write_templates(folder: Path, averages: np.ndarray, pixel_size: float, resolution: np.ndarray) -> None:
    """``templates.mrc`` (the ``(k, box, box)`` averages, ``pixel_size`` Å) and ``templates.cs`` (one row per class,
    ``blob/idx`` = 0-based class, ``blob/res_A`` = ``resolution`` Å)."""
    folder = Path(folder)
    k, box = len(averages), int(averages.shape[-1])
    stack = folder / "templates.mrc"
    write_stack(stack, averages, pixel_size=pixel_size)
    _save(folder / "templates.cs", {
        "uid": new_uids(k, seed=1),
        "blob/path": _path_bytes(stack, k),
        "blob/idx": np.arange(k, dtype=np.uint32),
        "blob/shape": np.tile(np.asarray([box, box], np.uint32), (k, 1)),
        "blob/psize_A": np.full(k, pixel_size, np.float32),
        "blob/res_A": np.asarray(resolution, np.float32),
    })
