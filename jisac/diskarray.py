"""Data layer: Image stacks on disk, read with plain file reads: :class:`DiskArray` and :func:`read_rows`.

Why not a memory map: every page of a memory map that has been read stays in the process's resident set until
it is unmapped. The kernel may drop clean pages under pressure, but the peak RSS counts them, and so do the
memory limits of job schedulers (SLURM's cgroups kill on it). A working stack larger than RAM read through
``np.memmap`` therefore looks, and is accounted, as if it had been loaded whole (docs/benchmarks.md, issue 5:
4 GB of a 3.3 GB input stack's pages stayed resident). Reading only the rows asked for into fresh buffers keeps
the resident memory at what the caller holds; the operating system's page cache still serves repeated reads.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def read_rows(path: str | os.PathLike, offset: int, shape: tuple[int, ...], dtype, indices) -> np.ndarray:
    """Rows ``indices`` of the C-ordered array of ``shape`` and ``dtype`` stored at byte ``offset`` of ``path``.

    Args:
        indices: ``(k,)`` 0-based row indices, any order, repeats allowed.

    Returns:
        ``(k, *shape[1:])`` float32; one read per run of consecutive indices (a repeat starts a new run), in
        file order.

    Raises:
        IndexError: an index outside ``[0, shape[0])``.
        EOFError: the file is shorter than ``offset`` and ``shape`` say.
    """
    idx = np.asarray(indices, np.int64).reshape(-1)
    dtype = np.dtype(dtype)
    out = np.empty((len(idx),) + tuple(shape[1:]), np.float32)
    if not len(idx):
        return out
    if idx.min() < 0 or idx.max() >= shape[0]:
        raise IndexError(f"{path}: row index out of range (the file holds {shape[0]} rows)")
    per_row = int(np.prod(shape[1:], dtype=np.int64))
    order = np.argsort(idx, kind="stable")
    ordered = idx[order]
    runs = np.split(np.arange(len(idx)), np.nonzero(np.diff(ordered) != 1)[0] + 1)
    with open(path, "rb") as f:
        for run in runs:
            f.seek(offset + int(ordered[run[0]]) * per_row * dtype.itemsize)
            block = np.fromfile(f, dtype=dtype, count=len(run) * per_row)
            if block.size != len(run) * per_row:
                raise EOFError(f"{path}: the file is shorter than its header says; re-export it")
            out[order[run]] = block.reshape((len(run),) + tuple(shape[1:]))
    return out


class DiskArray:
    """A read-only ``(n, ...)`` array stored in a file, read lazily with plain reads (see the module docstring).

    Indexing the first axis with an int, a slice or an integer array reads only those rows and returns a float32
    NumPy array (further axes of the key are applied to what was read). ``np.asarray`` reads it whole.

    Attributes:
        path, offset: the file and the byte offset of row 0.
        shape: the array's shape; ``dtype``: float32, what reads return (the file's own ``file_dtype`` is
            converted).
    """

    def __init__(self, path: str | os.PathLike, offset: int, shape: tuple[int, ...], file_dtype):
        self.path, self.offset = Path(path), int(offset)
        self.shape = tuple(int(s) for s in shape)
        self.file_dtype = np.dtype(file_dtype)
        self.dtype = np.dtype(np.float32)
        self.ndim = len(self.shape)

    @classmethod
    def from_mrc(cls, path: str | os.PathLike) -> "DiskArray":
        """The images of an MRC/MRCS stack (``(n, ny, nx)``; a single 2D image as ``(1, ny, nx)``)."""
        import mrcfile

        with mrcfile.mmap(path, mode="r", permissive=True) as mrc:
            data = mrc.data
            shape = data.shape if data.ndim == 3 else (1,) + data.shape
            return cls(path, 1024 + int(mrc.header.nsymbt), shape, data.dtype)

    @classmethod
    def from_npy(cls, path: str | os.PathLike) -> "DiskArray":
        """A C-ordered ``.npy`` file."""
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            fmt = np.lib.format
            shape, fortran, dtype = (fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0)(f)
            offset = f.tell()
        if fortran:
            raise ValueError(f"{path}: a Fortran-ordered .npy file cannot be read by rows")
        return cls(path, offset, shape, dtype)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes of the whole array as read (float32)."""
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        first, rest = key[0], key[1:]
        if isinstance(first, slice):
            rows = np.arange(*first.indices(self.shape[0]))
        elif np.ndim(first) == 0:
            i = int(first)
            if not -self.shape[0] <= i < self.shape[0]:
                raise IndexError(f"{self.path}: row {i} out of range (the file holds {self.shape[0]} rows)")
            return self.read([i % self.shape[0]])[0][rest]
        else:
            rows = np.asarray(first)
            if rows.dtype == bool:
                rows = np.nonzero(rows)[0]
            rows = np.where(rows < 0, rows + self.shape[0], rows)
        return self.read(rows)[(slice(None),) + rest]

    def read(self, rows) -> np.ndarray:
        """Rows ``rows`` (``(k,)`` 0-based indices, any order, repeats allowed) as float32 (``read_rows``)."""
        return read_rows(self.path, self.offset, self.shape, self.file_dtype, rows)

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out if dtype is None else out.astype(dtype)

    def __repr__(self) -> str:
        return f"DiskArray({str(self.path)!r}, shape={self.shape}, file_dtype={self.file_dtype})"
