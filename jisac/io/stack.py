"""Formats layer: One particle-stack abstraction for every input format: :class:`ParticleStack` and :func:`open_stack`.

A stack is lazy: opening it reads metadata and file headers only; images are read on indexing, grouped by file
and, for MRC/MRCS files, copied from a memory map, so no call ever loads the whole stack. Open files are kept in a
small per-stack cache (least recently used closed first) so a STAR file naming thousands of stacks stays within
the process's file limit.
"""

from __future__ import annotations

import collections
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from jisac.io import checks, cryosparc, hdf, mrc, star
from jisac.io.errors import StackError, require_file
from jisac.io.table import ParticleTable

_HDF_SUFFIXES = (".hdf", ".h5", ".hdf5")
_MRC_SUFFIXES = (".mrc", ".mrcs")
# Relative tolerance for "the same pixel size" across optics groups (STAR files print 6 significant digits).
_PIXEL_SIZE_RTOL = 1e-4
# What each extension is called in messages ("... is a folder, not a STAR file").
_KINDS = {".star": "STAR file", ".mrc": "MRC file", ".mrcs": "MRC stack", ".hdf": "HDF stack", ".h5": "HDF stack",
          ".hdf5": "HDF stack", ".cs": "cryoSPARC .cs file"}


def _open_image_file(path: Path):
    suffix = path.suffix.lower()
    if suffix in _HDF_SUFFIXES:
        return hdf.HdfImageFile(path)
    if suffix in _MRC_SUFFIXES:
        return mrc.MrcImageFile(path)
    raise StackError(f"{path}: image format '{suffix}' is not supported; convert it to .mrcs "
                     f"(e.g. e2proc2d.py {path.name} {path.stem}.mrcs)")


class ParticleStack:
    """Particle images and their metadata, in input order.

    ``len(stack)`` particles; ``stack[i]`` is ``(ny, nx)`` float32, ``stack[a:b]``, ``stack[index_array]`` and
    ``stack[bool_mask]`` are ``(k, ny, nx)`` float32 NumPy arrays (NumPy's indexing rules).

    metadata:   DataFrame, one row per particle, RELION column names without the underscore (see
                :class:`jisac.io.table.ParticleTable`).
    box_size:   int, px (images are square).
    pixel_size: float Å/px, or ``None`` when unknown (see :meth:`require_pixel_size`).
    source:     the file the stack was opened from.
    """

    def __init__(self, table: ParticleTable, *, pixel_size: float | None = None, max_open_files: int = 64):
        self.source = table.source
        self._table = table
        self._max_open = max(1, int(max_open_files))
        self._open: collections.OrderedDict[int, object] = collections.OrderedDict()
        self._file_of = np.asarray(table.file_of, np.int64)
        self._index = np.asarray(table.index_in_file, np.int64)
        shapes, header_sizes = self._check_files()
        self.box_size = shapes[0][0]
        self.metadata = table.metadata.reset_index(drop=True)
        self.pixel_size = self._pixel_size(pixel_size, header_sizes)
        if self.pixel_size is not None and "rlnImagePixelSize" not in self.metadata.columns:
            self.metadata["rlnImagePixelSize"] = self.pixel_size

    # ------------------------------------------------------------------ construction checks

    def _check_files(self):
        """Opens each file's header once: index ranges, square and equal box sizes. Returns the per-file image
        shapes and header pixel sizes."""
        t = self._table
        shapes, sizes = [], []
        for k, path in enumerate(t.files):
            f = self._file(k)
            n, ny, nx = f.shape
            in_file = np.flatnonzero(self._file_of == k)
            beyond = in_file[(self._index[in_file] >= n) | (self._index[in_file] < 0)]
            if len(beyond):
                p = int(beyond[0])
                raise StackError(f"{t.source}: row {int(t.rows[p])} asks for image {int(self._index[p]) + 1} "
                                 f"(1-based) of {path}, which holds {n} images; fix the image name or the stack")
            if ny != nx:
                raise StackError(f"{path}: images are {nx} x {ny} px; ISAC needs square images (re-extract or "
                                 "pad/crop them to a square box)")
            if shapes and (ny, nx) != shapes[0]:
                raise StackError(f"{path}: images are {nx} px but {t.files[0]} has {shapes[0][1]} px; all particles "
                                 "must share one box size (re-extract or rescale to one box)")
            shapes.append((ny, nx))
            sizes.append(f.pixel_size)
        if not shapes:
            raise StackError(f"{t.source}: no particles")
        return shapes, sizes

    def _pixel_size(self, override, header_sizes) -> float | None:
        if override is not None:
            self.metadata["rlnImagePixelSize"] = float(override)
            return float(override)
        if "rlnImagePixelSize" in self.metadata.columns:
            values = pd.to_numeric(self.metadata["rlnImagePixelSize"], errors="coerce").to_numpy(float)
            valid = values[np.isfinite(values) & (values > 0)]
            if len(valid):
                lo, hi = valid.min(), valid.max()
                if hi - lo > _PIXEL_SIZE_RTOL * hi:
                    raise StackError(f"{self.source}: particles have different pixel sizes ({lo:g} to {hi:g} Å); "
                                     "ISAC needs one: select one optics group or rescale to one pixel size")
                return float(valid[0])
        header = next((s for s in header_sizes if s is not None), None)
        return None if header is None else float(header)

    # ------------------------------------------------------------------ reading

    def _file(self, k: int):
        """File k, from the cache or opened now (closing the least recently used past ``max_open_files``)."""
        f = self._open.pop(k, None)
        if f is None:
            f = _open_image_file(self._table.files[k])
            while len(self._open) >= self._max_open:
                self._open.popitem(last=False)[1].close()
        self._open[k] = f
        return f

    def __len__(self) -> int:
        return len(self._file_of)

    @property
    def table(self) -> ParticleTable:
        """Where each image lives (the resolved files; what the output writer names in RELION-ready STAR files)."""
        return self._table

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(n, ny, nx)``."""
        return (len(self), self.box_size, self.box_size)

    def _normalise(self, key) -> np.ndarray:
        n = len(self)
        if isinstance(key, slice):
            return np.arange(n)[key]
        indices = np.asarray(key)
        if indices.dtype == bool:
            if indices.shape != (n,):
                raise IndexError(f"boolean index of shape {indices.shape} for a stack of {n} particles")
            return np.flatnonzero(indices)
        if indices.dtype.kind not in "iu":
            raise IndexError(f"particle indices must be integers, got {indices.dtype}")
        indices = indices.astype(np.int64).reshape(-1)
        if len(indices) and (indices.min() < -n or indices.max() >= n):
            raise IndexError(f"particle index out of range for a stack of {n} particles")
        return np.where(indices < 0, indices + n, indices)

    def read(self, indices) -> np.ndarray:
        """Images of particles ``indices`` (``(k,)`` int, any order, repeats allowed) as ``(k, ny, nx)`` float32;
        reads only those images, file by file, each file's images in ascending order."""
        indices = self._normalise(indices)
        out = np.empty((len(indices), self.box_size, self.box_size), np.float32)
        files = self._file_of[indices]
        for k in np.unique(files):
            where = np.flatnonzero(files == k)
            wanted, inverse = np.unique(self._index[indices[where]], return_inverse=True)
            out[where] = self._file(int(k)).read(wanted)[inverse]
        return out

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            return self.read([key])[0]
        return self.read(key)

    def iter_batches(self, batch_size: int, indices=None, *, pad: bool = False
                     ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yields ``(indices (b,), images (b, ny, nx))`` for ``indices`` (default: all particles, in order), in
        batches of ``batch_size``. The last batch is shorter unless ``pad``: then it is filled to ``batch_size``
        with index -1 and zero images, so every batch has one shape (one JAX compilation)."""
        if batch_size < 1:
            raise StackError(f"batch_size must be >= 1, got {batch_size}")
        indices = np.arange(len(self)) if indices is None else self._normalise(indices)
        for start in range(0, len(indices), batch_size):
            batch = indices[start:start + batch_size]
            images = self.read(batch)
            if pad and len(batch) < batch_size:
                fill = batch_size - len(batch)
                batch = np.concatenate([batch, np.full(fill, -1, np.int64)])
                images = np.concatenate([images, np.zeros((fill, *images.shape[1:]), np.float32)])
            yield batch, images

    def require_pixel_size(self) -> float:
        """The pixel size in Å; raises a :class:`StackError` saying how to give it when unknown."""
        return checks.require_pixel_size(self)

    # ------------------------------------------------------------------ resources

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].close()

    def __enter__(self) -> "ParticleStack":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"ParticleStack({str(self.source)!r}, n={len(self)}, box={self.box_size}, "
                f"pixel_size={self.pixel_size}, files={len(self._table.files)})")


def open_stack(path: str | os.PathLike, *, pixel_size: float | None = None,
               project_dir: str | os.PathLike | None = None, max_open_files: int = 64) -> ParticleStack:
    """Opens a particle stack by extension: ``.star`` (RELION 3.0/3.1+), ``.mrc``/``.mrcs``, ``.hdf``/``.h5``
    (EMAN2/SPHIRE), ``.cs`` (cryoSPARC).

    pixel_size:  Å/px (> 0), overrides whatever the file says and fills ``rlnImagePixelSize`` (the config key
                 ``data.pixel_size``).
    project_dir: the cryoSPARC project folder against which a ``.cs`` file's relative ``blob/path`` values
                 resolve (the config key ``data.project_dir``); ignored for other formats.
    Raises :class:`StackError` (one line naming the file/row) for any bad input."""
    text = os.fspath(path)
    if text.startswith("bdb:"):
        raise StackError(f"{text}: EMAN2/SPHIRE BDB databases are not read; convert to an HDF stack first: "
                         f"e2proc2d.py {text} stack.hdf")
    path = Path(text)
    if pixel_size is not None:
        try:
            size = float(pixel_size)
        except (TypeError, ValueError):
            size = float("nan")
        if not np.isfinite(size) or size <= 0:
            raise StackError(f"{path}: pixel size {pixel_size!r} is not a number > 0; give "
                             "data.pixel_size=<A/px> with the images' pixel size in Angstrom")
        pixel_size = size
    suffix = path.suffix.lower()
    require_file(path, _KINDS.get(suffix, "file"))
    if suffix == ".star":
        table = star.read_star_table(path)
    elif suffix in _MRC_SUFFIXES:
        table = mrc.read_mrc_table(path)
    elif suffix in _HDF_SUFFIXES:
        table = hdf.read_hdf_table(path)
    elif suffix == ".cs":
        table = cryosparc.read_cs_table(path, project_dir)
    else:
        raise StackError(f"{path}: unknown extension '{path.suffix}'; give a .star, .mrcs/.mrc, .hdf/.h5 or .cs "
                         "file")
    return ParticleStack(table, pixel_size=pixel_size, max_open_files=max_open_files)
