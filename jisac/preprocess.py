"""Algorithm layer: ISAC's per-image preparation of the working stack (``shared/isac_algorithm.md`` §3.2-3.4).

For each original image, in SPHIRE's order:

1. subtract the mean of the pixels *outside* the circle of ``radius`` px (the background);
2. ``ctf``: phase flip (``jisac.ctf.phase_flip``, 2x padding); else ``vpp``: multiply the Fourier transform by
   the dataset's whitening table (§3.3, ``vpp_whitening_table``). With both set, SPHIRE's working stack is only
   phase-flipped, and so is jisac's;
3. shift by the pre-alignment shift ``(tx, ty)`` (original pixels; content moves towards +x, +y);
4. resample by ``s = target_radius / radius`` to ``n' = int(nx s + 0.5)`` by Fourier cropping (s < 1) or zero
   padding (s > 1) -- SPHIRE uses sinc-Blackman decimation / gridding, which differs numerically (§3.4);
5. centre-crop to ``target_nx`` when ``n' > target_nx``;
6. normalise: subtract the mean of the pixels outside the mask, divide by the standard deviation of the pixels
   inside it; the mask is ``circle(target_radius)`` in the target box when ``n' >= target_nx``, else
   ``circle(n'/2 - 2)`` in the ``n'`` box (SPHIRE's code; its docstring says the reverse);
7. centre-pad with zeros to ``target_nx`` when ``n' < target_nx``.

``prepare_batch`` does this for a batch under one ``jit``; ``prepare_working_stack`` streams a whole stack
through it in fixed-size batches (one compilation) into memory or an MRCS file. Helical masks are not supported.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Callable, Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import mrcfile
import numpy as np

from jisac import filters, sharding
from jisac.ctf import CTFParams, phase_flip
from jisac.io.atomic import atomic_path

Array = jax.Array


class PreprocessParams(NamedTuple):
    """Static settings of the working-stack preparation (hashable: a ``jit`` static argument).

    Attributes:
        radius: particle radius in original pixels (ISAC ``--radius``).
        target_radius: particle radius after shrinking, px (``--target_radius``, SPHIRE default 29).
        target_nx: box of the working stack, px (``--target_nx``, SPHIRE default 76).
        ctf: phase-flip every image with its CTF (``--CTF``).
        vpp: whiten with the dataset's rotational amplitude spectrum (``--VPP``); ignored when ``ctf`` is set.
    """

    radius: int
    target_radius: int = 29
    target_nx: int = 76
    ctf: bool = False
    vpp: bool = False

    @property
    def shrink_ratio(self) -> float:
        """``s = target_radius / radius``."""
        return self.target_radius / self.radius

    def shrunk_size(self, box_size: int) -> int:
        """``n' = int(box_size s + 0.5)``, the box after resampling (SPHIRE's rounding)."""
        return int(box_size * self.shrink_ratio + 0.5)

    def validate(self, box_size: int) -> None:
        """Raises ``ValueError`` naming the first bad parameter for input images of ``box_size`` px."""
        if box_size < 1:
            raise ValueError(f"box_size must be >= 1 (got {box_size})")
        if self.radius < 1:
            raise ValueError(f"radius must be >= 1 px (got {self.radius})")
        if self.radius > box_size / 2:
            raise ValueError(f"radius ({self.radius} px) must be <= half the box ({box_size} px / 2)")
        if self.target_nx < 1:
            raise ValueError(f"target_nx must be >= 1 (got {self.target_nx})")
        if self.target_radius < 1:
            raise ValueError(f"target_radius must be >= 1 px (got {self.target_radius})")
        if self.target_radius + 1 > self.target_nx / 2:
            raise ValueError(
                f"target_radius + 1 ({self.target_radius + 1}) must be <= target_nx / 2 ({self.target_nx / 2})"
            )
        n_shrunk = self.shrunk_size(box_size)
        if n_shrunk < self.target_nx and n_shrunk // 2 - 2 < 1:
            raise ValueError(f"radius ({self.radius}) shrinks the {box_size} px box to {n_shrunk} px: too small")


# ------------------------------------------------------------------------------------------ the steps


def subtract_background_mean(images: Array, radius: float) -> Array:
    """Subtracts from each ``(..., ny, nx)`` image the mean of its pixels outside the circle of ``radius`` px."""
    ny, nx = images.shape[-2:]
    return filters.subtract_masked_mean(images, ~filters.circular_mask(ny, nx, radius))


def radial_index(ny: int, nx: int) -> np.ndarray:
    """``(ny, nx // 2 + 1)`` radius of each ``rfft2`` sample in Fourier pixels of an ``nx`` box (float64)."""
    return filters.radial_frequency(ny, nx) * nx


def _rotational_amplitude(images: Array) -> Array:
    """``(n, nx // 2 + 1)`` square root of each image's rotationally averaged power spectrum.

    Rings are the integer Fourier radii 0..nx//2 (nearest ring per sample) of the full plane; the corners beyond
    nx/2 are left out. On the ``rfft2`` half plane, columns with a Hermitian twin outside it count twice.
    """
    ny, nx = images.shape[-2:]
    n_rings = nx // 2 + 1
    ring = np.rint(radial_index(ny, nx)).astype(np.int32)
    twin = np.full(nx // 2 + 1, 2.0)
    twin[0] = 1.0
    if nx % 2 == 0:
        twin[-1] = 1.0  # the Nyquist column is its own twin
    one_hot = (ring[..., None] == np.arange(n_rings)) * twin[None, :, None]
    one_hot = jnp.asarray(one_hot, jnp.float32)  # (ny, nx // 2 + 1, rings) weights
    power = jnp.square(jnp.abs(jnp.fft.rfft2(jnp.asarray(images, jnp.float32))))
    ring_power = jnp.einsum("nyx,yxr->nr", power, one_hot) / one_hot.sum(axis=(0, 1))
    return jnp.sqrt(ring_power)


_rotational_amplitude_jit = jax.jit(_rotational_amplitude)


def vpp_whitening_table(batches: Iterable, batch_size: int | None = None) -> np.ndarray:
    """SPHIRE's VPP whitening table ``rpw[k] = N / sum_i sqrt(P_i(k))``, ``rpw[0] = 1`` (§3.3), float64.

    ``P_i`` is the rotationally averaged power spectrum of original image ``i`` (rings of integer Fourier radius
    ``k = 0..nx//2``). One streaming pass over ``batches``: ``(b, ny, nx)`` image arrays or ``(indices, images)``
    pairs (as ``prepare_working_stack`` takes). With ``batch_size``, batches are cut or padded to that size (one
    compilation); without it, every new batch size compiles again.
    """
    total, count = None, 0
    for batch in batches:
        images = batch[1] if isinstance(batch, tuple) else batch
        step = batch_size or max(len(images), 1)
        for start in range(0, len(images), step):
            chunk = np.asarray(images[start : start + step], np.float32)
            amplitude = _rotational_amplitude_jit(_pad_to(chunk, step) if batch_size else chunk)
            part = np.asarray(amplitude, np.float64)[: len(chunk)].sum(axis=0)
            total = part if total is None else total + part
            count += len(chunk)
    if total is None:
        raise ValueError("vpp_whitening_table: no images")
    table = count / np.maximum(total, 1e-30)
    table[0] = 1.0  # SPHIRE keeps the mean as it is
    return table


def apply_radial_table(images: Array, table: Array) -> Array:
    """Multiplies each image's Fourier transform by ``table`` interpolated linearly at the Fourier radius.

    ``table[k]`` is the gain at radius ``k`` Fourier pixels (of the ``nx`` box); beyond the last entry the last
    value holds (SPHIRE ``filt_table``).
    """
    ny, nx = images.shape[-2:]
    table = jnp.asarray(table, jnp.float32)
    radius = jnp.asarray(radial_index(ny, nx), jnp.float32)
    gain = jnp.interp(radius, jnp.arange(table.shape[0], dtype=jnp.float32), table)
    return jnp.fft.irfft2(jnp.fft.rfft2(images) * gain, s=(ny, nx)).astype(jnp.float32)


def fourier_resize(images: Array, n_out: int) -> Array:
    """Resamples ``(..., n, n)`` images to ``(..., n_out, n_out)`` by Fourier cropping or zero padding.

    The frequencies both boxes hold keep their Fourier coefficients (phases taken about the centre pixels
    ``n // 2`` and ``n_out // 2``, which coincide) times ``(n_out / n)^2``, so pixel values (a constant image,
    the mean) are preserved; the sampled content is the same band-limited image on a
    coarser (``n_out < n``) or finer grid. The input's Nyquist line (even ``n``, padding) is split equally
    between +-n/2 so the result stays real-symmetric; a cropped spectrum's new Nyquist line is symmetrised by
    taking the real part.
    """
    n = images.shape[-1]
    if images.shape[-2] != n:
        raise ValueError(f"fourier_resize needs square images, got {images.shape[-2:]}")
    if n_out == n:
        return jnp.asarray(images, jnp.float32)
    # The phase origin is put on the centre pixel (ifftshift in real space) so that pixel n // 2 lands exactly
    # on n_out // 2 for odd sizes too: the particle centre must not move by half a pixel.
    centred = jnp.fft.ifftshift(jnp.asarray(images, jnp.float32), axes=(-2, -1))
    ft = jnp.fft.fftshift(jnp.fft.fft2(centred), axes=(-2, -1))  # zero frequency at index n // 2
    if n_out < n:
        lo = n // 2 - n_out // 2
        ft = ft[..., lo : lo + n_out, lo : lo + n_out]
    else:
        if n % 2 == 0:
            # Index 0 holds -n/2 (Nyquist): move half of it to +n/2 (a new column/row at index n).
            ft = jnp.concatenate([ft, ft[..., :1, :]], axis=-2)
            ft = ft.at[..., 0, :].multiply(0.5).at[..., -1, :].multiply(0.5)
            ft = jnp.concatenate([ft, ft[..., :, :1]], axis=-1)
            ft = ft.at[..., :, 0].multiply(0.5).at[..., :, -1].multiply(0.5)
        m = ft.shape[-1]
        lo = n_out // 2 - n // 2
        widths = [(0, 0)] * (ft.ndim - 2) + [(lo, n_out - m - lo)] * 2
        ft = jnp.pad(ft, widths)
    out = jnp.fft.fftshift(jnp.fft.ifft2(jnp.fft.ifftshift(ft, axes=(-2, -1))).real, axes=(-2, -1))
    return (out * (n_out / n) ** 2).astype(jnp.float32)


def shift_and_shrink(images: Array, shift_x: Array | None, shift_y: Array | None, n_out: int) -> Array:
    """``fourier_resize(fourier_shift(images, shift_x, shift_y), n_out)`` for ``n_out < n`` in one real FFT
    pair: ``(..., n, n)`` -> ``(..., n_out, n_out)`` float32; shifts ``(...)`` in input pixels, or None.

    The shift's phase ramp is applied to the cropped spectrum only, and the crop reads the ``rfft2`` half plane
    (a real image's), so a stack pays one ``rfft2`` of ``n`` and one ``irfft2`` of ``n_out`` per image instead of
    two real and two complex transforms. The values are the two-step ones up to float rounding: the input's
    Nyquist lines, where ``fourier_shift`` and ``fourier_resize`` treat even sizes specially, are cropped away, and
    an even ``n_out``'s new Nyquist lines get what ``fourier_resize``'s real part gives them (the mean of the
    input's ``+-n_out/2`` lines; at the corner the real part of the ``(+n_out/2, +n_out/2)`` coefficient).
    """
    n = images.shape[-1]
    if not n_out < n:
        raise ValueError(f"shift_and_shrink shrinks: n_out ({n_out}) must be < n ({n})")
    h = n_out // 2
    ky = np.concatenate([np.arange(0, n_out - h), np.arange(-h, 0)])  # the kept rows, in the n_out box's order
    kx = np.arange(h + 1)  # the kept half-plane columns
    spectrum = jnp.fft.rfft2(jnp.fft.ifftshift(jnp.asarray(images, jnp.float32), axes=(-2, -1)))
    shifted = shift_x is not None or shift_y is not None

    def ramp(fy, fx):  # the phase ramp at frequencies (fy, fx) (cycles per n pixels), broadcast over the batch
        zero = jnp.zeros(images.shape[:-2], jnp.float32)
        sx = jnp.asarray(zero if shift_x is None else shift_x, jnp.float32)[..., None, None]
        sy = jnp.asarray(zero if shift_y is None else shift_y, jnp.float32)[..., None, None]
        return jnp.exp(-2j * jnp.pi * (jnp.asarray(fx / n, jnp.float32) * sx + jnp.asarray(fy / n, jnp.float32) * sy))

    kept = spectrum[..., ky % n, :][..., : h + 1]
    if shifted:
        kept = kept * ramp(ky[:, None], kx[None, :])
    if n_out % 2 == 0:
        plus = spectrum[..., h : h + 1, : h + 1]  # the +n_out/2 row (the kept one is -n_out/2)
        if shifted:
            plus = plus * ramp(np.array([[h]]), kx[None, :])
        nyquist = (kept[..., h : h + 1, :] + plus) / 2
        nyquist = nyquist.at[..., h].set(plus[..., h])
        kept = jnp.concatenate([kept[..., :h, :], nyquist, kept[..., h + 1 :, :]], axis=-2)
    out = jnp.fft.fftshift(jnp.fft.irfft2(kept, s=(n_out, n_out)), axes=(-2, -1))
    return (out * (n_out / n) ** 2).astype(jnp.float32)


def crop_or_pad_centre(images: Array, n_out: int) -> Array:
    """Centre-crops or zero-pads ``(..., n, n)`` images to ``n_out`` keeping pixel ``n // 2`` on ``n_out // 2``."""
    n = images.shape[-1]
    if n_out == n:
        return images
    if n_out < n:
        lo = n // 2 - n_out // 2
        return images[..., lo : lo + n_out, lo : lo + n_out]
    lo = n_out // 2 - n // 2
    widths = [(0, 0)] * (images.ndim - 2) + [(lo, n_out - n - lo)] * 2
    return jnp.pad(images, widths)


def normalize_outside_mean_inside_std(images: Array, mask: np.ndarray) -> Array:
    """``(image - mean outside mask) / std inside mask`` (SPHIRE's ISAC normalisation, §3.2 step 6)."""
    m = jnp.asarray(mask, jnp.float32)
    outside = 1.0 - m
    mean_out = jnp.sum(images * outside, axis=(-2, -1), keepdims=True) / outside.sum()
    mean_in = jnp.sum(images * m, axis=(-2, -1), keepdims=True) / m.sum()
    var_in = jnp.sum(jnp.square(images - mean_in) * m, axis=(-2, -1), keepdims=True) / m.sum()
    return (images - mean_out) * jax.lax.rsqrt(jnp.maximum(var_in, 1e-30))


def normalization_mask(params: PreprocessParams, box_size: int) -> tuple[np.ndarray, int]:
    """The step-6 mask and the box it lives in: ``circle(target_radius)`` in ``target_nx`` when the shrunk box
    ``n' >= target_nx``, else ``circle(n'/2 - 2)`` in ``n'``."""
    n_shrunk = params.shrunk_size(box_size)
    if n_shrunk >= params.target_nx:
        return filters.circular_mask(params.target_nx, params.target_nx, params.target_radius), params.target_nx
    return filters.circular_mask(n_shrunk, n_shrunk, n_shrunk / 2 - 2), n_shrunk


@functools.partial(jax.jit, static_argnames=("params",))
def prepare_batch(
    images: Array,
    params: PreprocessParams,
    ctf_params: CTFParams | None = None,
    shift_x: Array | None = None,
    shift_y: Array | None = None,
    whitening_table: Array | None = None,
) -> Array:
    """Steps 1-7 of the working-stack preparation for a batch.

    Args:
        images: ``(b, nx, nx)`` original images.
        params: the settings (validated by the caller for ``nx``).
        ctf_params: ``(b,)`` CTF parameters (original pixel size), required when ``params.ctf``.
        shift_x, shift_y: ``(b,)`` pre-alignment shifts in original pixels (default 0).
        whitening_table: ``(nx // 2 + 1,)`` VPP table, required when ``params.vpp`` and not ``params.ctf``.

    Returns:
        ``(b, target_nx, target_nx)`` float32 working-stack images.
    """
    images = jnp.asarray(images, jnp.float32)
    nx = images.shape[-1]
    out = subtract_background_mean(images, params.radius)
    if params.ctf:
        if ctf_params is None:
            raise ValueError("params.ctf is set: pass ctf_params")
        out = phase_flip(out, ctf_params, pad=2)
    elif params.vpp:
        if whitening_table is None:
            raise ValueError("params.vpp is set: pass whitening_table (vpp_whitening_table)")
        out = apply_radial_table(out, whitening_table)
    n_shrunk = params.shrunk_size(nx)
    if n_shrunk < nx:  # the usual case: steps 3 and 4 in one FFT pair
        out = shift_and_shrink(out, shift_x, shift_y, n_shrunk)
    else:
        if shift_x is not None or shift_y is not None:
            zero = jnp.zeros(images.shape[:-2], jnp.float32)
            out = filters.fourier_shift(out, zero if shift_x is None else shift_x,
                                        zero if shift_y is None else shift_y)
        out = fourier_resize(out, n_shrunk)
    mask, mask_box = normalization_mask(params, nx)
    if n_shrunk >= params.target_nx:
        out = normalize_outside_mean_inside_std(crop_or_pad_centre(out, params.target_nx), mask)
    else:
        out = crop_or_pad_centre(normalize_outside_mean_inside_std(out, mask), params.target_nx)
    return out.astype(jnp.float32)


def _prepare_rows(images, ctf_params, shift_x, shift_y, whitening_table, params):
    """``prepare_batch`` with the parameters last: a device's rows under ``sharding.over_particles`` (an explicit
    split: left to the compiler, the batched FFTs of a row-split batch ran 1.4x slower than on one device)."""
    return prepare_batch(images, params, ctf_params, shift_x, shift_y, whitening_table)


# ------------------------------------------------------------------------------------------ the driver


class WorkingStack(NamedTuple):
    """Result of ``prepare_working_stack``.

    Attributes:
        images: ``(n, target_nx, target_nx)`` float32 in memory, or None when written to ``path``.
        path: the MRCS file written, or None.
        shrink_ratio: ``s = target_radius / radius`` (original px -> working px).
        whitening_table: the VPP table used, or None.
    """

    images: np.ndarray | None
    path: Path | None
    shrink_ratio: float
    whitening_table: np.ndarray | None


def _fresh_iterator(batches):
    """An iterator over ``batches`` (a zero-argument callable is called for a fresh one)."""
    return iter(batches() if callable(batches) else batches)


def _pad_to(array: np.ndarray, size: int) -> np.ndarray:
    """Pads axis 0 to ``size`` by repeating the last entry (real data: no zero images to normalise)."""
    extra = size - array.shape[0]
    if extra == 0:
        return array
    return np.concatenate([array, np.repeat(array[-1:], extra, axis=0)], axis=0)


class _MrcsWriter:
    """Writes batches into a preallocated MRCS, reopening its memory map every ``reopen_bytes`` written.

    Written pages of a memory map count in the process's resident memory until it is unmapped, so the map is
    closed (flushed) and reopened now and then: memory stays bounded whatever the stack size.
    """

    def __init__(self, path: Path, shape: tuple[int, int, int], pixel_size_angst: float, reopen_bytes: int):
        with mrcfile.new_mmap(path, shape=shape, mrc_mode=2, overwrite=True) as mrc:
            mrc.set_image_stack()
            mrc.voxel_size = pixel_size_angst
        self.path = path
        self.reopen_bytes = reopen_bytes
        self.mrc = None
        self.since_open = 0
        self.stats = [np.inf, -np.inf, 0.0, 0.0, 0]  # min, max, sum, sum of squares, count

    def write(self, indices: np.ndarray, images: np.ndarray) -> None:
        if self.mrc is None:
            self.mrc = mrcfile.mmap(self.path, mode="r+")
        if indices.size and np.all(np.diff(indices) == 1):
            self.mrc.data[indices[0] : indices[-1] + 1] = images
        else:
            self.mrc.data[indices] = images
        s = self.stats
        s[0] = min(s[0], float(images.min()))
        s[1] = max(s[1], float(images.max()))
        s[2] += float(images.sum(dtype=np.float64))
        s[3] += float(np.square(images, dtype=np.float64).sum())
        s[4] += images.size
        self.since_open += images.nbytes
        if self.since_open >= self.reopen_bytes:
            self.close()

    def close(self) -> None:
        if self.mrc is not None:
            self.mrc.close()
            self.mrc = None
            self.since_open = 0

    def finish(self) -> None:
        """Writes the header statistics (from the running sums, without reading the data back)."""
        self.close()
        lo, hi, total, total_sq, count = self.stats
        with mrcfile.mmap(self.path, mode="r+") as mrc:
            mean = total / max(count, 1)
            mrc.header.dmin, mrc.header.dmax, mrc.header.dmean = lo, hi, mean
            mrc.header.rms = np.sqrt(max(total_sq / max(count, 1) - mean * mean, 0.0))


def prepare_working_stack(
    batches,
    n: int,
    params: PreprocessParams,
    ctf_params_for_indices: CTFParams | Callable[[np.ndarray], CTFParams] | None = None,
    shifts: np.ndarray | None = None,
    out_path: str | os.PathLike | None = None,
    batch_size: int = 256,
    whitening_table: np.ndarray | None = None,
    pixel_size_angst: float = 1.0,
    reopen_bytes: int = 128 << 20,
    devices: Sequence[jax.Device] | None = None,
) -> WorkingStack:
    """Prepares ISAC's working stack from a stream of original images (§3.2).

    Args:
        batches: ``(indices, images)`` pairs, ``indices`` ``(b,)`` ints in ``[0, n)``, ``images`` ``(b, nx, nx)``
            (NumPy, memmap slices or JAX arrays); any ``b``: batches are cut or padded to ``batch_size`` so
            there is one compilation. For ``params.vpp`` (without ``ctf``) the stack is read twice (table, then
            images), so pass a list or a zero-argument callable returning a fresh iterator.
        n: number of images in the stack (the output has ``n`` images; every index must come once).
        params: the settings; validated against the first batch's box.
        ctf_params_for_indices: required with ``params.ctf``: ``(n,)`` ``CTFParams`` (indexed by the batch
            indices) or a function ``indices -> CTFParams`` of shape ``(b,)``; pixel size of the original images.
        shifts: ``(n, 2)`` pre-alignment shifts ``(tx, ty)`` in original pixels, or None (no shift).
        out_path: when given, the stack is written to this MRCS (preallocated, filled batch by batch, renamed
            into place when complete) and not kept in memory.
        batch_size: images per jitted call.
        whitening_table: a precomputed VPP table (skips the first pass).
        pixel_size_angst: pixel size of the original images; the MRCS gets ``pixel_size_angst / s``.
        reopen_bytes: the output memory map is reopened after this many bytes (bounds resident memory).
        devices: devices of this process to split each batch over (rows; ``batch_size`` is rounded up to a
            multiple of their count). An image's result does not depend on them; on a CPU, where one device runs
            its FFTs on one core, the cores share the work (docs/benchmarks.md). Default: JAX's default device.

    Returns:
        A ``WorkingStack``.
    """
    if params.ctf and ctf_params_for_indices is None:
        raise ValueError("params.ctf is set: pass ctf_params_for_indices")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
    if shifts is not None:
        shifts = np.asarray(shifts, np.float32)
        if shifts.shape != (n, 2):
            raise ValueError(f"shifts must be (n, 2) = ({n}, 2), got {shifts.shape}")
    use_vpp = params.vpp and not params.ctf
    prepare = functools.partial(_prepare_rows, params=params)
    if devices is not None and len(devices) > 1:  # each device prepares its rows of the batch
        prepare = sharding.over_particles(_prepare_rows, sharding.data_mesh(devices), (True, True, True, True, False),
                                          True, params=params)
        batch_size = -(-batch_size // len(devices)) * len(devices)
    if use_vpp and whitening_table is None:
        if not callable(batches) and iter(batches) is batches:
            raise ValueError("params.vpp needs two passes over batches: pass a list or a callable, not an iterator")
        whitening_table = vpp_whitening_table(_fresh_iterator(batches), batch_size)

    state = {"out": None, "writer": None}
    seen = np.zeros(n, bool)

    def run(tmp: Path | None) -> None:
        for indices, images in _fresh_iterator(batches):
            indices = np.asarray(indices, np.int64).reshape(-1)
            if indices.size == 0:
                continue
            if state["out"] is None and state["writer"] is None:
                _start_output(images.shape[-2:], tmp)
            if indices.min() < 0 or indices.max() >= n:
                raise ValueError(f"batch indices out of range [0, {n})")
            for start in range(0, indices.size, batch_size):
                idx = indices[start : start + batch_size]
                out = _prepare_padded(np.asarray(images[start : start + idx.size], np.float32), idx)
                if state["writer"] is None:
                    state["out"][idx] = out
                else:
                    state["writer"].write(idx, out)
                seen[idx] = True
        if not seen.all():
            missing = np.flatnonzero(~seen)
            raise ValueError(f"{missing.size} of {n} images never came in a batch (first: {int(missing[0])})")
        if state["writer"] is not None:
            state["writer"].finish()

    def _start_output(image_shape, tmp) -> None:
        box = image_shape[-1]
        if image_shape[-2] != box:
            raise ValueError(f"images must be square, got {tuple(image_shape)}")
        params.validate(box)
        nt = params.target_nx
        if tmp is None:
            state["out"] = np.zeros((n, nt, nt), np.float32)
        else:
            state["writer"] = _MrcsWriter(tmp, (n, nt, nt), pixel_size_angst / params.shrink_ratio, reopen_bytes)

    def _prepare_padded(images: np.ndarray, idx: np.ndarray) -> np.ndarray:
        b = idx.size
        imgs = _pad_to(images, batch_size)
        idx_padded = _pad_to(idx, batch_size)
        ctf_b = None
        if params.ctf:
            if callable(ctf_params_for_indices):
                ctf_b = ctf_params_for_indices(idx_padded)
            else:
                ctf_b = ctf_params_for_indices.take(idx_padded)
            ctf_b = CTFParams(*(jnp.asarray(f, jnp.float32) for f in ctf_b))
        sx = sy = None
        if shifts is not None:
            sx, sy = shifts[idx_padded, 0], shifts[idx_padded, 1]
        out = prepare(imgs, ctf_b, sx, sy, whitening_table if use_vpp else None)
        return np.asarray(out)[:b]

    if out_path is None:
        run(None)
    else:
        with atomic_path(out_path) as tmp:
            try:
                run(tmp)
            finally:  # unmap before the file is renamed (success) or removed (failure)
                if state["writer"] is not None:
                    state["writer"].close()
    return WorkingStack(
        state["out"], None if out_path is None else Path(out_path), params.shrink_ratio,
        None if whitening_table is None else np.asarray(whitening_table),
    )
