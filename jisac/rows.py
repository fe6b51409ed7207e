"""Data layer: lazy row sources, what "images" may be wherever jisac reads particles.

A working stack can be a NumPy array in memory, a stack on disk read with plain reads
(``jisac.diskarray.DiskArray``), a lazy view of some of its rows (``Rows``) or a padded range of them
(``RowRange``). All of them are a ``RowSource``: a ``shape`` and NumPy-style indexing along the first axis that
reads only the rows asked for. Every loop over particles takes a ``RowSource`` and reads chunk by chunk, so a stack
larger than memory is never read whole.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class RowSource(Protocol):
    """``(n, ny, nx)`` images readable by rows: ``source[i]``, ``source[a:b]``, ``source[index_array]`` return
    float32 NumPy arrays of just those rows."""

    shape: tuple[int, ...]

    def __getitem__(self, key): ...


class RowRange:
    """Rows ``[start, stop)`` of ``images`` (any array-like: NumPy, ``DiskArray``, memory map, ``Rows``), zero-padded to
    ``size`` rows, read lazily: indexing reads only the rows asked for (as float32)."""

    def __init__(self, images, start: int, stop: int, size: int | None = None):
        self.images, self.start, self.stop = images, start, stop
        self.size = stop - start if size is None else size
        self.shape = (self.size,) + tuple(images.shape[1:])
        self.dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        lo, hi, step = key[0].indices(self.size) if isinstance(key[0], slice) else (key[0], key[0] + 1, 1)
        assert step == 1, "RowRange reads contiguous rows"
        real = min(hi, self.stop - self.start)
        data = np.asarray(self.images[self.start + lo : self.start + max(real, lo)], np.float32)
        if hi - lo > data.shape[0]:
            data = np.concatenate([data, np.zeros((hi - lo - data.shape[0],) + data.shape[1:], np.float32)])
        out = data[(slice(None),) + key[1:]]
        return out if isinstance(key[0], slice) else out[0]

    def __array__(self, dtype=None, copy=None):
        return self[:].astype(dtype or np.float32)


def in_memory(a) -> bool:
    """A NumPy array held in RAM (not a memory map or a file): fancy indexing it is cheap and copies only those
    rows."""
    return isinstance(a, np.ndarray) and not isinstance(a, np.memmap)


def take_rows(images, index):
    """The rows ``index`` of ``images``: a copy of them for an in-memory array, else a lazy ``Rows`` view (a
    stack on disk is never read whole)."""
    return images[np.asarray(index)] if in_memory(images) else Rows(images, index)


class Rows:
    """A lazy view of the rows ``index`` of ``images`` (e.g. a generation's working set of a working stack
    on disk): slicing it reads only the rows asked for."""

    def __init__(self, images, index):
        self.images, self.index = images, np.asarray(index, np.int64)
        self.shape = (len(self.index),) + tuple(images.shape[1:])
        self.dtype = getattr(images, "dtype", np.dtype(np.float32))

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        rows = self.index[key[0]]
        if np.ndim(rows) == 0:
            return np.asarray(self.images[int(rows)])[key[1:]]
        if in_memory(self.images):
            return self.images[rows][(slice(None),) + key[1:]]
        # a stack on disk or another lazy view: read in increasing order
        order = np.argsort(rows, kind="stable")
        out = np.empty((len(rows),) + tuple(self.shape[1:]), self.dtype)
        out[order] = np.asarray(self.images[rows[order]])
        return out[(slice(None),) + key[1:]]

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out if dtype is None else out.astype(dtype)


def pad_rows(a, size: int, value=0):
    """``a`` padded along axis 0 to ``size`` rows with ``value``."""
    a = np.asarray(a)
    if a.shape[0] == size:
        return a
    return np.concatenate([a, np.full((size - a.shape[0],) + a.shape[1:], value, a.dtype)])
