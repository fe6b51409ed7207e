"""MRC/MRCS image stacks (via ``mrcfile``, the CCP-EM reference implementation of the format).

Reading is lazy: :class:`MrcImageFile` reads the header with ``mrcfile`` and then only the bytes of the images asked
for, with plain file reads: pages of a memory map would stay resident in the process once read, so streaming a
stack larger than RAM through one would grow the process to the size of the stack.
A 2D MRC file is one image; a 3D one (``.mrcs`` or ``.mrc``) is a stack of ``nz`` images, as RELION reads them.
"""

from __future__ import annotations

import os
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd

from jisac.diskarray import DiskArray
from jisac.io.atomic import atomic_path
from jisac.io.errors import StackError, StackFileNotFoundError
from jisac.io.table import ParticleTable, image_names


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


class MrcImageFile:
    """One MRC/MRCS file of 2D images, read lazily (only the images asked for).

    shape:      ``(n, ny, nx)``.
    pixel_size: Å per pixel from the header voxel size, ``None`` when the header says 0.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise StackFileNotFoundError(f"{self.path}: no such MRC file")
        try:
            # permissive: files from some programs have a non-standard map ID or mode; mrcfile then warns instead
            # of failing, and a header too broken to give data is caught just below.
            self._mrc = mrcfile.mmap(self.path, mode="r", permissive=True)
        except (ValueError, OSError) as e:
            raise StackError(f"{self.path}: not a readable MRC file ({e}); check the file or re-export it") from None
        data = self._mrc.data
        if data is None or data.ndim not in (2, 3):
            self._mrc.close()
            raise StackError(f"{self.path}: the MRC header does not describe 2D images or an image stack; "
                             "check the file or re-export it")
        size = float(self._mrc.voxel_size.x)
        self.pixel_size = size if size > 0 else None
        self._mrc.close()  # nothing of the memory map is used from here on
        self._rows = DiskArray.from_mrc(self.path)  # the images' bytes, read with plain reads
        self.shape = self._rows.shape

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, indices) -> np.ndarray:
        """The images at 0-based ``indices`` (``(k,)`` int, any order, repeats allowed) as ``(k, ny, nx)``
        float32; only those images' bytes are read, one read per run of consecutive indices."""
        try:
            return self._rows.read(indices)
        except IndexError:
            raise IndexError(f"{self.path}: image index out of range (the file holds {self.shape[0]} images)") from None
        except EOFError:
            raise StackError(f"{self.path}: the file is shorter than its header says; re-export it") from None

    def close(self) -> None:
        """Nothing stays open between reads (kept for the reader interface)."""


def read_mrc_table(path: str | os.PathLike) -> ParticleTable:
    """Describes every image of one MRC/MRCS stack: ``rlnImageName = N@<path as given>``, ``rlnOpticsGroup = 1``
    and ``rlnImagePixelSize`` (Å) when the header has a voxel size."""
    path = Path(path)
    f = MrcImageFile(path)
    try:
        n, pixel_size = len(f), f.pixel_size
    finally:
        f.close()
    index = np.arange(n)
    metadata = pd.DataFrame({"rlnImageName": image_names(index, [str(path)] * n), "rlnOpticsGroup": 1})
    if pixel_size is not None:
        metadata["rlnImagePixelSize"] = pixel_size
    return ParticleTable(metadata, (path.resolve(),), np.zeros(n, np.int64), index, index + 1, path)
