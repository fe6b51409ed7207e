"""Formats layer: EMAN2/SPHIRE HDF image stacks (via ``h5py``), the format of SPHIRE's ``class_averages.hdf``.

Layout (EMAN2's ``libEM/hdfio2.cpp``), read and written here:

- group ``/MDF/images`` with the int attribute ``imageid_max`` = n − 1;
- for image i = 0 … n−1, a group ``/MDF/images/<i>`` holding one float32 dataset ``image`` of shape ``(ny, nx)``;
- the image's header as attributes of that group, each named ``EMAN.<key>``: ints as int32, floats as float32
  (EMAN2 stores single values as 1-element arrays), bools as one byte ``'T'``/``'F'``, strings as null-terminated
  fixed-length strings, lists as int32/float32 arrays. EMAN2 writes no attributes on the root or ``/MDF``.

Written for class averages (isac_algorithm.md §10.2): ``EMAN.members`` (int32 array, 0-based particle indices in
the input stack), ``EMAN.n_objects`` (= len(members)), ``EMAN.apix_x/y/z`` (Å).

Compressed stacks (EMAN2's ``--compressbits``, the default of e2boxer and e2ctf; ``libEM/io/hdfio2.cpp``): the
dataset holds unsigned integer codes (uint8 for up to 8 bits, uint16 for up to 16; chunked, zlib-deflated) and the
image group carries ``EMAN.stored_renderbits`` b, ``EMAN.stored_rendermin`` and ``EMAN.stored_rendermax``. EMAN2
wrote ``code = round((x - min) / (max - min) (2^b - 1))``, clipping values outside [min, max] to the end codes, and
reads ``x = code / (2^b - 1) (max - min) + min``; so does :class:`HdfImageFile`. The error is at most half a step,
``(max - min) / (2^b - 1) / 2``, except for clipped pixels. Integer data without these attributes is read as its
values (as EMAN2 does); b > 0 without min/max is refused.

CTF: EMAN2 and SPHIRE store a CTF as an EMAN2Ctf string ``E<defocus> <dfdiff> <dfang> <bfactor> <ampcont>
<voltage> <cs> <apix> <dsbg> <nbg>,<bg...> <nsnr>,<snr...>`` (defocus and dfdiff in µm, underfocus positive; dfang
in degrees; ampcont in %; voltage kV; cs mm). The same fields are read differently by the two programs
(field_formats.md §3): EMAN2's own code puts the larger defocus along dfang, while SPHIRE's CTF (SPARX
``Util::ctf_img``, ``Util::tf``) uses ``Δz(θ) = defocus − dfdiff/2 · sin(2(θ + dfang))`` and its RELION converters
(``sp_sphire2relion.py``, inverse in ``sp_relion2sphire.py``) write

    rlnDefocusU = (defocus − dfdiff/2) × 10⁴ Å,   rlnDefocusV = (defocus + dfdiff/2) × 10⁴ Å,
    rlnDefocusAngle = 45° − dfang,

which is the same CTF in RELION's form (``(U+V)/2 + (U−V)/2 cos 2(θ − α)`` with α = 45° − dfang). jisac reads every
HDF stack in SPHIRE's convention: jisac reproduces SPHIRE's ISAC and beautifier, which read the header with SPARX's
formula whoever wrote it, and the string itself does not say which program wrote it. When the string carries the
fitted background/SNR curves that only EMAN2's e2ctf fills in (SPHIRE leaves them empty), one warning line says so:
such a stack was made by EMAN2, and its astigmatism axis may differ from what EMAN2 itself would use (convert the
stack with EMAN2's own RELION export if EMAN2's reading is wanted).

Amplitude contrast: SPHIRE's phase is ``asin(w)`` for w = ampcont/100 ≥ 0 (RELION's ``asin(rlnAmplitudeContrast)``,
so ``rlnAmplitudeContrast = w``, ``rlnPhaseShift = 0``). SPHIRE encodes a VPP phase above 90° as a negative ampcont
read as the phase ``π + asin(w)`` (``Util::tf``, ``ampcont2angle``); that is converted to ``rlnAmplitudeContrast =
0`` and ``rlnPhaseShift = 180° + asin(w)`` in degrees, the same total phase. ``rlnCtfBfactor`` is the B-factor.
The wavelength is the one thing not carried over: SPARX computes it as 12.398 / sqrt(V (1022 + V)) Å (V in kV),
RELION (and jisac) with slightly different constants, 2.5e-5 relative at 300 kV. EMAN1 strings (``O…``) and anything
unparsable leave the CTF columns absent. Pinned by tests/test_io_hdf.py against a float64 transcription of SPHIRE's
CTF.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Mapping, Sequence

import h5py
import numpy as np
import pandas as pd

from jisac.io.atomic import atomic_path
from jisac.io.errors import StackError, require_file
from jisac.io.table import ParticleTable, image_names

_IMAGES = "MDF/images"
_PREFIX = "EMAN."
# Header keys that are lists even with one element (EMAN2 itself cannot tell a 1-element list from a scalar).
_ARRAY_KEYS = frozenset({"members"})
_LOG = logging.getLogger("jisac")
_MAX_RENDER_BITS = 16  # EMAN2 refuses to write more (hdfio2.cpp)


# --------------------------------------------------------------------------------------------------- CTF strings


def _ctf_fields(text) -> list[str] | None:
    """The whitespace-separated fields of an EMAN2Ctf string (``E…``), or ``None`` when it is not one."""
    if not isinstance(text, str) or len(text) < 2 or text[0] != "E" or not (text[1].isdigit() or text[1] in "-."):
        return None
    fields = text[1:].split()
    return fields if len(fields) >= 7 else None


def has_eman2_fit_curves(text) -> bool:
    """Whether an EMAN2Ctf string carries a fitted background or SNR curve (a count > 0 in field 10 or 11), which
    EMAN2's e2ctf fills in and SPHIRE never does."""
    fields = _ctf_fields(text)
    if fields is None:
        return False
    for field in fields[9:11]:
        try:
            if int(float(field.split(",")[0])) > 0:
                return True
        except ValueError:
            return False
    return False


def parse_eman2_ctf(text: str) -> dict[str, float] | None:
    """RELION CTF columns from an EMAN2Ctf string (``E…``) read in SPHIRE's convention (see the module docstring),
    or ``None`` when the string is not one (EMAN1's ``O…`` strings included)."""
    fields = _ctf_fields(text)
    if fields is None:
        return None
    try:
        defocus, dfdiff, dfang, bfactor, ampcont, voltage, cs = (float(v) for v in fields[:7])
    except ValueError:
        return None
    w = ampcont / 100.0  # EMAN2/SPHIRE give percent
    if 0 <= w or w < -1:  # w < -1 is no phase at all: kept as is for the CTF checks to refuse
        amplitude, phase_shift = w, 0.0
    else:  # SPHIRE's VPP encoding: the total phase pi + asin(w), kept whole in the phase shift
        amplitude, phase_shift = 0.0, 180.0 + float(np.degrees(np.arcsin(w)))
    return {
        "rlnDefocusU": (defocus - dfdiff / 2) * 1e4,  # µm -> Å, as SPHIRE's sp_sphire2relion
        "rlnDefocusV": (defocus + dfdiff / 2) * 1e4,
        "rlnDefocusAngle": 45.0 - dfang,
        "rlnCtfBfactor": bfactor,
        "rlnAmplitudeContrast": amplitude,
        "rlnPhaseShift": phase_shift,
        "rlnVoltage": voltage,
        "rlnSphericalAberration": cs,
    }


# --------------------------------------------------------------------------------------------------- reading


def _from_attr(key: str, value):
    """An EMAN2 attribute value as a Python/NumPy value."""
    if isinstance(value, (bytes, np.bytes_)):
        return value.decode(errors="replace")
    if isinstance(value, str):
        return value
    array = np.asarray(value)
    if array.dtype.kind in "iu" and array.dtype.itemsize == 1 and array.size == 1:  # EMAN2's bool: 'T' or 'F'
        return bool(array.reshape(-1)[0] == ord("T"))
    if key in _ARRAY_KEYS:
        return array.reshape(-1)
    if array.dtype.names is None and array.size == 1:
        value = array.reshape(-1)[0]
        # float32's shortest decimal (EMAN2 stores 1.1 Å as float32; 1.100000023841858 helps no one)
        return float(str(value)) if value.dtype == np.float32 else value.item()
    return array


def _image_count(images: h5py.Group, path: Path) -> int:
    if "imageid_max" in images.attrs:
        return int(np.asarray(images.attrs["imageid_max"]).reshape(-1)[0]) + 1
    keys = [k for k in images.keys() if k.isdigit()]
    return len(keys)


def _open_h5(path: Path) -> h5py.File:
    require_file(path, "HDF stack")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise StackError(f"{path}: not a readable HDF5 file ({e})") from None
    if _IMAGES not in f:
        f.close()
        raise StackError(f"{path}: no /{_IMAGES} group, so not an EMAN2/SPHIRE image stack; convert it with "
                         f"e2proc2d.py {path.name} stack.mrcs")
    return f


def read_hdf_headers(path: str | os.PathLike) -> list[dict]:
    """Every image's EMAN2 header: a list of n dicts, keys without the ``EMAN.`` prefix (``members`` is always a
    1-D int array; ``ctf`` stays the raw string)."""
    path = Path(path)
    with _open_h5(path) as f:
        images = f[_IMAGES]
        headers = []
        for i in range(_image_count(images, path)):
            if str(i) not in images:
                raise StackError(f"{path}: image {i} (/{_IMAGES}/{i}) is missing; the file is damaged")
            attrs = images[str(i)].attrs
            headers.append({k[len(_PREFIX):]: _from_attr(k[len(_PREFIX):], attrs[k])
                            for k in attrs.keys() if k.startswith(_PREFIX)})
    return headers


class HdfImageFile:
    """One EMAN2/SPHIRE HDF stack of 2D images, opened read-only; images are read one dataset at a time.

    shape:      ``(n, ny, nx)`` (from image 0; a differently shaped image raises on reading).
    pixel_size: Å per pixel from image 0's ``EMAN.apix_x``, ``None`` when absent or 0.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file = _open_h5(self.path)
        self._images = self._file[_IMAGES]
        n = _image_count(self._images, self.path)
        if n == 0:
            self._file.close()
            raise StackError(f"{self.path}: the HDF stack holds no images")
        first = self._dataset(0)
        if first.ndim != 2:
            self._file.close()
            raise StackError(f"{self.path}: image 0 has shape {first.shape}; only 2D images can be classified")
        self.shape = (n, *(int(s) for s in first.shape))
        apix = self._images["0"].attrs.get(_PREFIX + "apix_x")
        apix = None if apix is None else float(np.asarray(apix).reshape(-1)[0])
        self.pixel_size = apix if apix is not None and apix > 0 else None

    def _dataset(self, i: int) -> h5py.Dataset:
        try:
            return self._images[f"{i}/image"]
        except KeyError:
            raise StackError(f"{self.path}: image {i} (/{_IMAGES}/{i}/image) is missing; the file is damaged") \
                from None

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, indices) -> np.ndarray:
        """The images at 0-based ``indices`` as ``(k, ny, nx)`` float32."""
        indices = np.asarray(indices, np.int64)
        out = np.empty((len(indices), *self.shape[1:]), np.float32)
        for k, i in enumerate(indices):
            data = self._dataset(int(i))
            if data.shape != self.shape[1:]:
                raise StackError(f"{self.path}: image {i} is {data.shape[::-1]} px but image 0 is "
                                 f"{self.shape[:0:-1]} px; all images of a stack must have one box size")
            out[k] = self._decode(int(i), data[()])
        return out

    def _decode(self, i: int, values: np.ndarray) -> np.ndarray:
        """Image i's stored values as float32: EMAN2's compressed integer codes rescaled to the original values
        (see the module docstring); float data unchanged."""
        if values.dtype.kind == "f":
            return values
        attrs = self._images[str(i)].attrs
        bits = attrs.get(_PREFIX + "stored_renderbits")
        bits = 0 if bits is None else int(np.asarray(bits).reshape(-1)[0])
        if bits <= 0:
            return values.astype(np.float32)
        lo, hi = attrs.get(_PREFIX + "stored_rendermin"), attrs.get(_PREFIX + "stored_rendermax")
        if lo is None or hi is None or bits > _MAX_RENDER_BITS:
            raise StackError(f"{self.path}: image {i} is EMAN2-compressed ({bits} bits) but its header lacks "
                             "stored_rendermin/stored_rendermax or has more than 16 bits, so its values cannot be "
                             f"restored; re-export it uncompressed (e2proc2d.py {self.path.name} out.hdf "
                             "--compressbits=-1)")
        lo, hi = (float(np.asarray(v).reshape(-1)[0]) for v in (lo, hi))
        codes = values.astype(np.float64)
        return (codes / float((1 << bits) - 1) * (hi - lo) + lo).astype(np.float32)

    def close(self) -> None:
        self._file.close()


def read_hdf_table(path: str | os.PathLike) -> ParticleTable:
    """Describes every image of an EMAN2/SPHIRE HDF stack: ``rlnImageName = N@<path>``, ``rlnOpticsGroup = 1``,
    ``rlnImagePixelSize`` from ``EMAN.apix_x``, RELION CTF columns from a parsable ``EMAN.ctf``, and every header
    attribute as a column ``EMAN.<key>`` (arrays, e.g. ``EMAN.members``, as one array per cell)."""
    path = Path(path)
    headers = read_hdf_headers(path)
    n = len(headers)
    metadata = pd.DataFrame({"rlnImageName": image_names(range(n), [str(path)] * n), "rlnOpticsGroup": 1})
    apix = [h.get("apix_x") for h in headers]
    if any(a is not None for a in apix):
        metadata["rlnImagePixelSize"] = [np.nan if a is None else float(a) for a in apix]
    ctf = [parse_eman2_ctf(h.get("ctf")) for h in headers]
    if all(c is not None for c in ctf) and n:
        for column in ctf[0]:
            metadata[column] = [c[column] for c in ctf]
        if (metadata["rlnPhaseShift"] == 0).all():  # no VPP: no column, as before VPP stacks were converted
            metadata = metadata.drop(columns="rlnPhaseShift")
        fitted = sum(has_eman2_fit_curves(h.get("ctf")) for h in headers)
        if fitted:
            _LOG.warning("%s: %d of %d CTF header(s) carry EMAN2 e2ctf's fitted curves, so EMAN2 made them; their "
                         "astigmatism is read in SPHIRE's convention (rlnDefocusAngle = 45 - dfang), as SPHIRE's "
                         "ISAC reads it", path, fitted, n)
    keys = list(dict.fromkeys(k for h in headers for k in h))
    for key in keys:
        values = [h.get(key) for h in headers]
        column = pd.Series(values, dtype=object) if any(isinstance(v, np.ndarray) for v in values) else values
        metadata[_PREFIX + key] = column
    index = np.arange(n)
    return ParticleTable(metadata, (path.resolve(),), np.zeros(n, np.int64), index, index + 1, path)


# --------------------------------------------------------------------------------------------------- writing


def _write_attr(attrs: h5py.AttributeManager, key: str, value) -> None:
    """One header value in EMAN2's attribute types (see the module docstring)."""
    name = _PREFIX + key
    if isinstance(value, (bool, np.bool_)):
        attrs.create(name, np.array([ord("T" if value else "F")], np.int8))
    elif isinstance(value, str):
        data = value.encode()
        attrs.create(name, np.array(data, dtype=f"S{len(data) + 1}"))  # +1: EMAN2 reads a null-terminated string
    elif isinstance(value, (int, np.integer)):
        attrs.create(name, np.array([value], np.int32))
    elif isinstance(value, (float, np.floating)):
        attrs.create(name, np.array([value], np.float32))
    else:
        array = np.asarray(value)
        if array.dtype.kind in "iub":
            attrs.create(name, array.astype(np.int32).reshape(-1))
        elif array.dtype.kind == "f":
            attrs.create(name, array.astype(np.float32).reshape(-1))
        else:
            raise StackError(f"header key '{key}': cannot store a value of type {type(value).__name__} in an EMAN2 "
                             "HDF header; give an int, float, bool, str or a numeric list")


def write_hdf_stack(path: str | os.PathLike, images, pixel_size_angst: float = 1.0,
                    headers: Sequence[Mapping] | None = None) -> None:
    """Writes ``(n, ny, nx)`` images as an EMAN2/SPHIRE HDF stack, atomically.

    headers: optional n dicts of extra header values per image (keys without ``EMAN.``); ``apix_x/y/z`` are set
    to ``pixel_size_angst`` (Å) unless a header gives them."""
    data = np.asarray(images, np.float32)
    if data.ndim != 3:
        raise StackError(f"{path}: an image stack must be (n, ny, nx), got shape {data.shape}")
    if headers is not None and len(headers) != len(data):
        raise StackError(f"{path}: {len(headers)} headers for {len(data)} images; give one header per image")
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            images_group = f.create_group(_IMAGES)
            images_group.attrs.create("imageid_max", np.array([len(data) - 1], np.int32))
            for i, image in enumerate(data):
                group = images_group.create_group(str(i))
                group.create_dataset("image", data=image)
                header = {"apix_x": float(pixel_size_angst), "apix_y": float(pixel_size_angst),
                          "apix_z": float(pixel_size_angst)}
                header.update(headers[i] if headers is not None else {})
                for key, value in header.items():
                    _write_attr(group.attrs, key, value)


def write_class_averages(path: str | os.PathLike, averages, members: Sequence[Sequence[int]],
                         pixel_size_angst: float = 1.0, headers: Sequence[Mapping] | None = None) -> None:
    """Writes ``(k, ny, nx)`` class averages as SPHIRE's ``class_averages.hdf``: image j carries ``EMAN.members``
    (its 0-based particle indices in the input stack) and ``EMAN.n_objects`` (their number), plus ``headers[j]``."""
    if len(members) != len(averages):
        raise StackError(f"{path}: {len(members)} member lists for {len(averages)} averages; give one per average")
    merged = []
    for j, m in enumerate(members):
        m = np.asarray(m, np.int64).reshape(-1)
        header = dict(headers[j]) if headers is not None else {}
        header.update(members=m, n_objects=int(len(m)))
        merged.append(header)
    write_hdf_stack(path, averages, pixel_size_angst, merged)
