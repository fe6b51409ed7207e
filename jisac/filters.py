"""Algorithm layer: Fourier filters, shifts and masks on batches of square or rectangular images.

All functions take ``(..., ny, nx)`` float images and return float32 arrays of the same shape. Frequencies are
absolute, in cycles per pixel (0.5 = Nyquist), as in SPHIRE (``shared/isac_algorithm.md`` §6).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def radial_frequency(ny: int, nx: int) -> np.ndarray:
    """``(ny, nx // 2 + 1)`` radial frequency ``sqrt((kx / nx)^2 + (ky / ny)^2)`` of an ``rfft2`` grid."""
    ky = np.fft.fftfreq(ny)[:, None]
    kx = np.fft.rfftfreq(nx)[None, :]
    return np.sqrt(kx**2 + ky**2)


def tanh_lowpass_response(freq: np.ndarray | Array, cutoff: float, falloff: float):
    """SPHIRE's tangent low-pass ``H(f) = [tanh(c (f + w)) - tanh(c (f - w))] / 2``, ``c = pi / (2 falloff w)``.

    ``cutoff`` (w) and ``falloff`` in cycles/pixel (SPHIRE ``filt_tanl``; ISAC's ``FL``/``FH``/``FF``).
    """
    if cutoff <= 0 or falloff <= 0:
        raise ValueError(f"tanh low-pass needs cutoff > 0 and falloff > 0 (got {cutoff}, {falloff})")
    c = np.pi / (2.0 * falloff * cutoff)
    return 0.5 * (jnp.tanh(c * (freq + cutoff)) - jnp.tanh(c * (freq - cutoff)))


@jax.jit
def tanh_lowpass(images: Array, cutoff, falloff) -> Array:
    """Applies the tangent low-pass by FFT multiplication (no padding, as SPHIRE).

    ``cutoff`` may be a traced scalar (the EQ-K-means schedule changes it every iteration without recompiling).
    """
    ny, nx = images.shape[-2:]
    freq = jnp.asarray(radial_frequency(ny, nx), jnp.float32)
    c = jnp.pi / (2.0 * falloff * cutoff)
    h = 0.5 * (jnp.tanh(c * (freq + cutoff)) - jnp.tanh(c * (freq - cutoff)))
    return jnp.fft.irfft2(jnp.fft.rfft2(images) * h, s=(ny, nx)).astype(jnp.float32)


@jax.jit
def fourier_shift(images: Array, shift_x, shift_y) -> Array:
    """Shifts images by ``(shift_x, shift_y)`` pixels (content moves towards +x, +y) with a phase ramp.

    Periodic (what leaves one side re-enters on the other). ``shift_x``/``shift_y`` broadcast against the
    batch shape ``images.shape[:-2]``.
    """
    ny, nx = images.shape[-2:]
    ky = jnp.asarray(np.fft.fftfreq(ny)[:, None], jnp.float32)
    kx = jnp.asarray(np.fft.rfftfreq(nx)[None, :], jnp.float32)
    sx = jnp.asarray(shift_x, jnp.float32)[..., None, None]
    sy = jnp.asarray(shift_y, jnp.float32)[..., None, None]
    ramp = jnp.exp(-2j * jnp.pi * (kx * sx + ky * sy))
    if nx % 2 == 0:
        # The Nyquist column of an even-size rfft must stay real: use the real part of its ramp (cos), as any
        # real-to-real sub-pixel shift must.
        ramp = ramp.at[..., -1].set(jnp.cos(2 * jnp.pi * (kx[..., -1] * sx[..., 0] + ky[..., 0] * sy[..., 0])))
    return jnp.fft.irfft2(jnp.fft.rfft2(images) * ramp, s=(ny, nx)).astype(jnp.float32)


def circular_mask(ny: int, nx: int, radius: float) -> np.ndarray:
    """``(ny, nx)`` bool mask of pixels within ``radius`` of the centre ``(nx // 2, ny // 2)`` (inclusive)."""
    y, x = np.mgrid[:ny, :nx]
    return (x - nx // 2) ** 2 + (y - ny // 2) ** 2 <= radius**2


def soft_circular_mask(ny: int, nx: int, radius: float, width: float = 3.0) -> np.ndarray:
    """``(ny, nx)`` float32: 1 within ``radius`` of the centre ``(nx // 2, ny // 2)``, a raised-cosine edge of
    ``width`` px, 0 beyond (a mask without a hard edge keeps Fourier measures such as the FRC free of ringing)."""
    y, x = np.mgrid[:ny, :nx]
    r = np.hypot(x - nx // 2, y - ny // 2)
    edge = 0.5 * (1.0 + np.cos(np.pi * np.clip((r - radius) / width, 0.0, 1.0)))
    return np.where(r <= radius, 1.0, edge).astype(np.float32)


@jax.jit
def subtract_masked_mean(images: Array, mask: np.ndarray) -> Array:
    """Subtracts from each image the mean of its pixels inside ``mask`` (SPHIRE's ``normalize.mask``, no_sigma)."""
    m = jnp.asarray(mask, jnp.float32)
    mean = jnp.sum(images * m, axis=(-2, -1), keepdims=True) / m.sum()
    return images - mean


def normalize_in_mask(images: Array, mask: np.ndarray) -> Array:
    """Zero mean and unit standard deviation of the pixels inside ``mask``, applied to the whole image."""
    m = jnp.asarray(mask, jnp.float32)
    count = m.sum()
    mean = jnp.sum(images * m, axis=(-2, -1), keepdims=True) / count
    var = jnp.sum(jnp.square(images - mean) * m, axis=(-2, -1), keepdims=True) / count
    return (images - mean) * jax.lax.rsqrt(jnp.maximum(var, 1e-30))


@jax.jit
def fourier_ring_correlation(a: Array, b: Array) -> Array:
    """FRC of image pairs ``(..., ny, nx)`` in shells of width ``1 / nx`` cycles/px: ``(..., nx // 2 + 1)``,
    shell ``s`` at frequency ``s / nx`` (0.5 = Nyquist). Empty or zero shells give 0."""
    ny, nx = a.shape[-2:]
    n_shells = nx // 2 + 1
    shell = np.rint(radial_frequency(ny, nx) * nx).astype(np.int64)
    # rfft2 keeps one of each conjugate pair: interior columns stand for two coefficients
    weight = np.full(shell.shape, 2.0)
    weight[:, 0] = 1.0
    if nx % 2 == 0:
        weight[:, -1] = 1.0
    onehot = (shell.reshape(-1, 1) == np.arange(n_shells)[None]) * weight.reshape(-1, 1)
    onehot = jnp.asarray(onehot, jnp.float32)  # (pixels, shells); corners beyond Nyquist fall out
    fa = jnp.fft.rfft2(a).reshape(*a.shape[:-2], -1)
    fb = jnp.fft.rfft2(b).reshape(*b.shape[:-2], -1)
    hi = jax.lax.Precision.HIGHEST
    cross = jnp.matmul(jnp.real(fa * jnp.conj(fb)), onehot, precision=hi)
    pa = jnp.matmul(jnp.abs(fa) ** 2, onehot, precision=hi)
    pb = jnp.matmul(jnp.abs(fb) ** 2, onehot, precision=hi)
    denom = jnp.sqrt(pa * pb)
    return jnp.where(denom > 0, cross / jnp.where(denom > 0, denom, 1.0), 0.0)


@jax.jit
def frc_resolution(frc: Array, threshold: float, box: int) -> Array:
    """Frequency (cycles/px) where the FRC ``(..., shells)`` first falls below ``threshold`` (shell 0, the mean,
    is ignored; linear interpolation between shells). Never below ``1 / box``; 0.5 if it never falls."""
    n_shells = frc.shape[-1]
    shells = jnp.arange(n_shells)
    below = (frc < threshold) & (shells >= 1)
    first = jnp.where(below.any(-1), jnp.argmax(below, -1), n_shells - 1)
    hi = jnp.take_along_axis(frc, first[..., None], -1)[..., 0]
    lo = jnp.take_along_axis(frc, (first - 1)[..., None], -1)[..., 0]
    step = jnp.clip((lo - threshold) / jnp.maximum(lo - hi, 1e-12), 0.0, 1.0)
    crossing = jnp.where(below.any(-1), first - 1 + step, 0.5 * box)
    return jnp.clip(crossing / box, 1.0 / box, 0.5)
