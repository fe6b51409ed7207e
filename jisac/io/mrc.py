"""MRC/MRCS image stacks (via ``mrcfile``, the CCP-EM reference implementation of the format)."""

from __future__ import annotations

import os

import mrcfile
import numpy as np

from jisac.io.atomic import atomic_path


def write_stack(path: str | os.PathLike, images, pixel_size_angst: float = 1.0) -> None:
    """Writes ``(n, ny, nx)`` images as a float32 MRC image stack (``.mrcs``), atomically."""
    data = np.ascontiguousarray(np.asarray(images, np.float32))
    if data.ndim != 3:
        raise ValueError(f"{path}: an image stack must be (n, ny, nx), got shape {data.shape}")
    with atomic_path(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(data)
            mrc.set_image_stack()
            mrc.voxel_size = pixel_size_angst


def read_stack(path: str | os.PathLike) -> np.ndarray:
    """Reads a whole MRC/MRCS stack as ``(n, ny, nx)`` float32 (a single image gives n = 1)."""
    with mrcfile.open(path, permissive=False) as mrc:
        data = np.asarray(mrc.data, np.float32)
    return data[None] if data.ndim == 2 else data
