"""Formats layer: MRC/MRCS image stacks (via ``mrcfile``, the CCP-EM reference implementation of the format).

Reading is lazy: :class:`MrcImageFile` reads the header with ``mrcfile`` and then only the bytes of the images asked
for, with plain file reads: pages of a memory map would stay resident in the process once read, so streaming a
stack larger than RAM through one would grow the process to the size of the stack.
A 2D MRC file is one image; a 3D one is a stack of ``nz`` images, with one exception. Which 3D files are stacks
follows RELION's naming rule (``.mrcs`` is a stack) and the MRC2014 header's space group (``ispg`` 0: image stack,
1: one volume): an ``.mrcs`` file is always read as a stack; an ``.mrc`` file with ``nz > 1`` is a stack unless its
header says ``ispg = 1`` (a single volume, e.g. a 3D map), which is refused rather than classified slice by slice.
cryoSPARC's particle stacks are ``.mrc`` files with ``ispg = 0``, so they read as stacks.

Refused with one line (:class:`StackError`): complex data (modes 3 and 4: Fourier transforms, not images), a file
shorter than its header promises (truncated copy: expected and actual bytes are named), a volume as above.
"""

from __future__ import annotations

import os
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd

from jisac.diskarray import DiskArray
from jisac.io.atomic import atomic_path
from jisac.io.errors import StackError, require_file
from jisac.io.table import ParticleTable, image_names


# MRC modes whose values are complex numbers (3: two int16, 4: two float32): Fourier-space data, not images.
_COMPLEX_MODES = {3: "complex int16", 4: "complex float32"}
# Bytes per value of each MRC2014 mode mrcfile reads (101: 4-bit, two values per byte, handled separately).
_MODE_BYTES = {0: 1, 1: 2, 2: 4, 3: 4, 4: 8, 6: 2, 12: 2}
_HEADER_BYTES = 1024
_DEFAULT_PIXEL_SIZE = 1.0  # Å/px written when a caller gives none (the value mrcfile-era callers relied on)


def write_stack(path: str | os.PathLike, images, pixel_size_angst: float | None = None, *,
                pixel_size: float | None = None) -> None:
    """Writes ``(n, ny, nx)`` images as a float32 MRC image stack (``.mrcs``, ``ispg = 0``), atomically.

    pixel_size: Å/px written as the header's voxel size (what RELION's ``relion_image_handler --stats`` and
    ``mrcfile``'s ``voxel_size`` report); ``pixel_size_angst`` is the older positional name of the same value.
    Neither given: 1.0 Å/px, as before."""
    if pixel_size is not None and pixel_size_angst is not None and float(pixel_size) != float(pixel_size_angst):
        raise ValueError(f"{path}: pixel_size={pixel_size} and pixel_size_angst={pixel_size_angst} disagree; "
                         "give one")
    size = pixel_size if pixel_size is not None else pixel_size_angst
    size = _DEFAULT_PIXEL_SIZE if size is None else float(size)
    if not np.isfinite(size) or size < 0:
        raise ValueError(f"{path}: pixel size {size} Å/px is not a finite value >= 0")
    data = np.ascontiguousarray(np.asarray(images, np.float32))
    if data.ndim != 3:
        raise ValueError(f"{path}: an image stack must be (n, ny, nx), got shape {data.shape}")
    with atomic_path(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(data)
            mrc.set_image_stack()
            mrc.voxel_size = size


def _check_header(path: Path) -> None:
    """Refuses, before any data is mapped, what the header alone shows to be wrong: complex modes, a file shorter
    than the header's dimensions promise, a 3D volume in an ``.mrc`` file (see the module docstring)."""
    try:
        with mrcfile.open(path, header_only=True, permissive=True) as mrc:
            header = mrc.header
            mode, ispg, nsymbt = int(header.mode), int(header.ispg), int(header.nsymbt)
            nx, ny, nz = int(header.nx), int(header.ny), int(header.nz)
    except (ValueError, OSError) as e:
        raise StackError(f"{path}: not a readable MRC file ({e}); check the file or re-export it") from None
    if mode in _COMPLEX_MODES:
        raise StackError(f"{path}: MRC mode {mode} ({_COMPLEX_MODES[mode]}) holds Fourier-space data, not real "
                         "images; give the real-space particle stack (mode 0, 1, 2, 6 or 12)")
    if mode in _MODE_BYTES and min(nx, ny, nz) > 0 and nsymbt >= 0:
        expected = _HEADER_BYTES + nsymbt + nx * ny * nz * _MODE_BYTES[mode]
        actual = path.stat().st_size
        if actual < expected:
            raise StackError(f"{path}: the file is shorter than its header promises: {actual} bytes, expected "
                             f"{expected} ({_HEADER_BYTES}-byte header + {nsymbt} extended + {nx} x {ny} x {nz} "
                             f"mode-{mode} values); the file is truncated: copy or export it again")
    if path.suffix.lower() == ".mrc" and nz > 1 and ispg == 1:
        raise StackError(f"{path}: the header says this is one 3D volume ({nx} x {ny} x {nz}, space group 1), not "
                         "a stack of 2D images; give the particle stack (name a stack .mrcs, or set its header's "
                         "space group to 0)")


class MrcImageFile:
    """One MRC/MRCS file of 2D images, read lazily (only the images asked for).

    shape:      ``(n, ny, nx)``.
    pixel_size: Å per pixel from the header voxel size, ``None`` when the header says 0.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        require_file(self.path, "MRC file")
        _check_header(self.path)
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
