"""Workflow layer: full-size, CTF-corrected class averages of a finished run (SPHIRE's "beautifier").

SPHIRE users run ``sp_compute_isac_avg.py`` after every ISAC2 run (``shared/field_formats.md`` §2a,
``shared/isac_algorithm.md`` §12.2): ISAC's own averages are working-frame thumbnails (shrunk to a 29 px radius,
phase-flipped only, low-passed). This module recomputes every accepted class at the ORIGINAL box and pixel size:

1. Parameters. The run's ``particles.star`` holds each particle's full alignment in input pixels (RELION
   convention, ``rlnAnglePsi``/``rlnOriginX/YAngst`` + ``jisacMirror``); ``transforms.from_relion`` turns it back
   into the ``Transform2D`` that ``transforms.to_input_frame(prealign, working_params, shrink)`` gave
   (``tests/test_beautify.py`` pins this through a written STAR file).
2. Placement. Each member is brought into the class frame by its parameters: the rotation (and mirror) by
   bilinear interpolation of a 2x Fourier-upsampled copy of the particle, the translation exactly, as a Fourier
   phase ramp. Why: plain bilinear interpolation is a low-pass (its transfer at Nyquist is sinc^2(1/2) ~ 0.41 and
   depends on the sub-pixel offset); on a 2x oversampled image it is ~0.81 at the original Nyquist, so the average
   keeps its high frequencies, while a full Fourier-space rotation (gridding) would cost far more for little gain.
3. CTF. ``ctf="wiener"``: ``sum_i CTF_i F_i / (sum_i CTF_i^2 + 1 / SSNR(k))`` where ``SSNR(k)`` is the
   per-particle spectral SNR estimated from the class's own split halves (even/odd members in index order):
   ``SSNR_avg = 2 FRC / (1 - FRC)`` per shell (floored at ``ssnr_floor``) is the SNR of the whole class average;
   dividing by the shell mean of ``sum CTF^2`` makes it per particle, which is what the Wiener term needs
   (``sum CTF^2 S / N = SSNR_avg``). ``ctf="flip"`` averages phase-flipped members (the working-frame recipe),
   ``"none"`` plain members. Astigmatism: ``CTF_i`` is the raw particle's CTF, rotated and mirrored together with
   its image into the class frame (analytically: the defocus angle becomes ``theta - angle``, or
   ``angle - theta`` when mirrored). SPHIRE's beautifier instead multiplies the aligned image by the CTF computed
   in the raw orientation (``ctf_img`` without rotation, field_formats.md §2a) - a quirk that smears the
   astigmatism; it is not reproduced here.
4. Resolution. Split-half FRC of the two half averages under a soft mask at the particle radius; the resolution
   is where it falls below ``frc_threshold`` (0.143), in Angstrom.
5. Local refinement (``local_refinement=True``): each member's angle and shift are searched locally around its
   parameters (a grid of in-plane rotations about the class centre and every integer shift in a window, with a
   parabolic sub-pixel peak) against the OTHER half's average, CTF-multiplied and low-passed at the class
   resolution, so the halves stay independent and their FRC honest. Repeated while the class's FRC (its sum over
   shells) improves. SPHIRE's stochastic hill climbing (``refinement_2d_local``) is not reproduced.
6. Sharpening (``sharpen``): ``"none"``, ``"guinier"`` (B from a line fit of ln(rotational amplitude) against k^2
   between ``guinier_start_angst`` and the class resolution, ``B = -4 slope``; amplitudes multiplied by
   ``exp(B k^2 / 4)``) or ``"bfactor"`` (a given B) or ``"model"`` (each shell scaled to SPHIRE's analytic power
   spectrum, ``penczek_model_power``). Then an optional tanh low-pass at the class resolution or a given frequency
   (cycles/px, SPHIRE's ``--fl``), fall-off 0.02 (SPHIRE's). A 1D spectrum from a file is not implemented.

Outputs (``<run>/beautify/`` by default, every file atomic): ``class_averages.mrcs`` (class k at index k-1, pixel
size in the header), ``class_averages.hdf`` (``members``, ``n_objects``, ``resolution_angst``), ``particles.star``
(refined parameters, RELION convention), ``resolutions.json``, ``FH_list.txt``, ``params_avg/params_avg_NNN.txt``
and ``init_isac_params.txt`` (SPHIRE's parameter files, input pixels, SPHIRE's convention).

Scale: members are read from the original stack in fixed-size chunks (never the whole stack), each chunk a
jitted call with static shapes (padding rows go to a dropped segment); classes are processed in batches.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import starfile

from jisac import ctf as ctf_mod
from jisac import filters, transforms
from jisac.io import StackError, hdf, mrc, open_stack, star
from jisac.io.atomic import atomic_path, write_json
from jisac.transforms import Transform2D

Array = jax.Array

_CTF_MODES = ("wiener", "flip", "none")
_SHARPEN_MODES = ("none", "guinier", "bfactor", "model")
_TANH_FALLOFF = 0.02  # SPHIRE's low-pass fall-off in the beautifier (field_formats.md §2a step 4)


class BeautifyParams(NamedTuple):
    """Settings of the beautifier (hashable).

    Attributes:
        radius_px: particle radius in INPUT pixels (required; SPHIRE's ``--radius``): masks and normalisation.
        ctf: ``"wiener"`` (CTF-weighted, split-half SSNR Wiener filter), ``"flip"`` (phase flip only) or ``"none"``.
        local_refinement: refine each member's angle and shift locally against its class (section 5 above).
        refine_angle_range_deg, refine_angle_step_deg: angles tried are ``-range..+range`` in ``step``, degrees.
        refine_shift_range_px: integer shift window ``-r..r`` input px (plus a parabolic sub-pixel peak).
        refine_iterations: at most this many refinement passes per class batch.
        sharpen: ``"none"``, ``"guinier"``, ``"bfactor"`` or ``"model"`` (SPHIRE's analytic power spectrum).
        b_factor: B in A^2 for ``"bfactor"`` (positive sharpens).
        guinier_start_angst: low-resolution end of the Guinier fit, A (SPHIRE's ``--B_start``, 45 A).
        lowpass: ``"none"``, ``"resolution"`` (tanh at each class's FRC resolution) or a float in cycles/px.
        chunk: members per jitted call. Local refinement holds ``chunk x angles`` Fourier transforms and
            correlation maps at once (~ ``chunk * angles * box^2 * 12`` bytes: 180 MB for 64 x 9 at 160 px): lower
            it for large boxes.
        class_batch: classes per batch (the unit of ``progress`` and of the Fourier accumulators in memory).
        frc_threshold: FRC level defining the resolution (0.143 for split halves).
        ssnr_floor: floor of the class-average SSNR per shell (keeps the Wiener term finite).
        mask_width_px: width of the soft mask's raised-cosine edge, px (SPHIRE's cosine mask: 5 px).
    """

    radius_px: float
    ctf: str = "wiener"
    local_refinement: bool = False
    refine_angle_range_deg: float = 2.0
    refine_angle_step_deg: float = 0.5
    refine_shift_range_px: int = 2
    refine_iterations: int = 3
    sharpen: str = "none"
    b_factor: float = 0.0
    guinier_start_angst: float = 45.0
    lowpass: str | float = "none"
    chunk: int = 64
    class_batch: int = 8
    frc_threshold: float = 0.143
    ssnr_floor: float = 1e-3
    mask_width_px: float = 5.0

    def validate(self, box: int) -> None:
        """Raises ``ValueError`` naming the first bad option (``beautify.<name>``) for a ``box`` px stack."""
        if not 1 <= self.radius_px <= box / 2:
            raise ValueError(f"beautify.radius_px ({self.radius_px}) must be in [1, box/2 = {box / 2}] input px")
        if self.ctf not in _CTF_MODES:
            raise ValueError(f"beautify.ctf '{self.ctf}' must be one of {', '.join(_CTF_MODES)}")
        if self.sharpen not in _SHARPEN_MODES:
            raise ValueError(f"beautify.sharpen '{self.sharpen}' must be one of {', '.join(_SHARPEN_MODES)}")
        if self.lowpass not in ("none", "resolution"):
            freq = self.lowpass_frequency()
            if freq is None or not 0 < freq <= 0.5:
                raise ValueError(f"beautify.lowpass ({self.lowpass}) must be none, resolution or a frequency in "
                                 "(0, 0.5] cycles/px")
        if self.chunk < 1 or self.class_batch < 1:
            raise ValueError("beautify.chunk and beautify.class_batch must be >= 1")
        if self.refine_angle_step_deg <= 0 or self.refine_shift_range_px < 0 or self.refine_iterations < 0:
            raise ValueError("beautify.refine_*: the angle step must be > 0, shift range and iterations >= 0")

    def lowpass_frequency(self) -> float | None:
        """``lowpass`` as a frequency (cycles/px; a number or a numeric string from the command line), else None."""
        try:
            return float(self.lowpass)
        except (TypeError, ValueError):
            return None

    def angle_offsets(self) -> tuple[float, ...]:
        """The refinement's rotation offsets (degrees), symmetric about 0."""
        k = int(np.floor(self.refine_angle_range_deg / self.refine_angle_step_deg + 1e-6))
        return tuple(float(v) for v in np.arange(-k, k + 1) * self.refine_angle_step_deg)


# ------------------------------------------------------------------------------------------- geometry


def class_frame_ctf_params(params: ctf_mod.CTFParams, p: Transform2D) -> ctf_mod.CTFParams:
    """The CTF of a particle after it is rotated and mirrored by ``p`` (shifts do not change |CTF|).

    The image content moves by ``M R(angle)``, so the defocus direction ``theta`` (from x towards y) moves to
    ``theta - angle``, and to ``angle - theta`` (mod 180, the CTF's period) when ``p`` mirrors x.
    """
    theta = jnp.asarray(params.defocus_angle_deg, jnp.float32) - jnp.asarray(p.angle, jnp.float32)
    theta = jnp.where(jnp.asarray(p.mirror, bool), -theta, theta)
    return params._replace(defocus_angle_deg=theta)


def _upsample2(images: Array) -> Array:
    """``(..., n, n)`` -> ``(..., 2n, 2n)`` by zero-padding the spectrum: pixel ``j`` of the result is position
    ``j / 2`` of the input (phase origin at index 0 in both, so integer positions coincide)."""
    n = images.shape[-1]
    ft = jnp.fft.rfft2(images)  # (..., n, n//2 + 1)
    pos = (n + 1) // 2  # rows of non-negative frequency (an even n's Nyquist row is kept as negative)
    out = jnp.zeros(images.shape[:-2] + (2 * n, n + 1), ft.dtype)
    out = out.at[..., :pos, : n // 2 + 1].set(ft[..., :pos, :])
    out = out.at[..., 2 * n - (n - pos):, : n // 2 + 1].set(ft[..., pos:, :])
    return jnp.fft.irfft2(out * 4.0, s=(2 * n, 2 * n))


def _shift_ramp(n: int, shift_x: Array, shift_y: Array) -> Array:
    """``(..., n, n//2 + 1)`` phase ramp that moves content by ``(+shift_x, +shift_y)`` px."""
    ky = jnp.asarray(np.fft.fftfreq(n)[:, None], jnp.float32)
    kx = jnp.asarray(np.fft.rfftfreq(n)[None, :], jnp.float32)
    sx = jnp.asarray(shift_x, jnp.float32)[..., None, None]
    sy = jnp.asarray(shift_y, jnp.float32)[..., None, None]
    return jnp.exp(-2j * jnp.pi * (kx * sx + ky * sy))


def _rotate_mirror_from_upsampled(up: Array, angle: Array, mirror: Array, n: int) -> Array:
    """``g(u) = in(R(angle)^T M u)`` on the ``(n, n)`` grid (u about ``n // 2``) sampled from the 2x upsampled
    ``up`` ``(2n, 2n)`` of ``in``; zero outside."""
    c = n // 2
    y, x = np.mgrid[:n, :n].astype(np.float32) - c
    mx = jnp.where(mirror, -x, x)
    a = jnp.deg2rad(angle)
    cs, sn = jnp.cos(a), jnp.sin(a)
    # R(a)^T (x, y) = (cos a x - sin a y, sin a x + cos a y)
    src_x = cs * mx - sn * y
    src_y = sn * mx + cs * y
    return transforms.bilinear_sample(up, 2.0 * (src_x + c), 2.0 * (src_y + c))


def _aligned_ft_from_upsampled(up: Array, p: Transform2D, n: int) -> Array:
    """rfft2 of the particle transformed by ``p`` (one particle): rotation/mirror by interpolation, then the
    translation ``M s`` as a phase ramp (``T(v) = M R v + M s``)."""
    g = _rotate_mirror_from_upsampled(up, p.angle, p.mirror, n)
    sx = jnp.where(p.mirror, -p.shift_x, p.shift_x)
    return jnp.fft.rfft2(g) * _shift_ramp(n, sx, p.shift_y)


@jax.jit
def aligned_ft(images: Array, p: Transform2D) -> Array:
    """Fourier transforms ``(b, n, n//2 + 1)`` of ``(b, n, n)`` images brought into the class frame by ``p``
    (fields ``(b,)``): the ``rfft2`` of ``apply_transform(images, p)`` without its interpolation blur."""
    n = images.shape[-1]
    up = _upsample2(jnp.asarray(images, jnp.float32))
    return jax.vmap(lambda u, q: _aligned_ft_from_upsampled(u, q, n))(up, p)


def normalise_background(images: Array, radius: float) -> Array:
    """``(image - mean) / std`` of the pixels outside ``radius`` (the noise), so every member enters the sums with
    unit noise variance; a box with too few outside pixels (< 10 %) uses the whole image."""
    n = images.shape[-1]
    outside = ~filters.circular_mask(n, n, radius)
    if outside.mean() < 0.1:
        outside = np.ones_like(outside)
    m = jnp.asarray(outside, jnp.float32)
    count = m.sum()
    mean = jnp.sum(images * m, axis=(-2, -1), keepdims=True) / count
    var = jnp.sum(jnp.square(images - mean) * m, axis=(-2, -1), keepdims=True) / count
    return (images - mean) * jax.lax.rsqrt(jnp.maximum(var, 1e-30))


def _weights(ctf_class: Array, mode: str) -> tuple[Array, Array]:
    """``(h, h2)``: what multiplies each member's FT and what its denominator accumulates."""
    if mode == "wiener":
        return ctf_class, ctf_class * ctf_class
    ones = jnp.ones_like(ctf_class)
    if mode == "flip":
        return ctf_mod.ctf_sign(ctf_class), ones
    return ones, ones


# --------------------------------------------------------------------------------------- chunk kernels


@functools.partial(jax.jit, static_argnames=("radius", "mode", "n_seg"))
def _chunk_sums(images, p: Transform2D, ctfp: ctf_mod.CTFParams, seg, *, radius: float, mode: str, n_seg: int):
    """Per-segment ``sum h X`` and ``sum h2`` of one chunk: ``((n_seg, n, m) complex64, (n_seg, n, m))``; rows with
    ``seg == n_seg`` (padding) are dropped."""
    n = images.shape[-1]
    x = aligned_ft(normalise_background(images, radius), p)
    h, h2 = _weights(ctf_mod.ctf_2d(class_frame_ctf_params(ctfp, p), n, n), mode)
    s = jax.ops.segment_sum(h * x, seg, num_segments=n_seg + 1)[:n_seg]
    w = jax.ops.segment_sum(h2, seg, num_segments=n_seg + 1)[:n_seg]
    return s, w


def _parabola_peak(fm, f0, fp):
    """Sub-pixel offset of the vertex of the parabola through ``(-1, fm), (0, f0), (1, fp)``, in [-0.5, 0.5]."""
    denom = fm - 2.0 * f0 + fp
    return jnp.clip(jnp.where(denom < 0, 0.5 * (fm - fp) / jnp.where(denom < 0, denom, -1.0), 0.0), -0.5, 0.5)


def _refine_one(up, p: Transform2D, ctfp, ref, *, n, mode, offsets, r):
    """Best local ``(angle offset, shift)`` of one particle against ``ref`` (rfft2, class frame).

    Returns the refined ``Transform2D`` (scalars), its aligned FT and CTF in the class frame, and the score."""
    deltas = jnp.asarray(offsets, jnp.float32)
    zeros = jnp.zeros_like(deltas)
    cand = transforms.compose(Transform2D(*(jnp.broadcast_to(f, deltas.shape) for f in p)),
                              Transform2D(deltas, zeros, zeros, jnp.zeros(deltas.shape, bool)))
    xs = jax.vmap(lambda q: _aligned_ft_from_upsampled(up, q, n))(cand)  # (J, n, m)
    ctf_j = ctf_mod.ctf_2d(class_frame_ctf_params(ctf_mod.CTFParams(*(jnp.broadcast_to(f, deltas.shape)
                                                                       for f in ctfp)), cand), n, n)
    h, _ = _weights(ctf_j, mode)
    # cc(d) = sum_k conj(h ref) X exp(-2 pi i k.d) = n^2 irfft2(conj(h ref) X)(-d)
    cc = jnp.fft.irfft2(jnp.conj(h * ref[None]) * xs, s=(n, n))  # (J, n, n)
    d = np.arange(-r - 1, r + 2)
    idx = np.mod(-d, n)
    win = cc[:, idx[:, None], idx[None, :]]  # (J, 2r+3, 2r+3): rows dy, cols dx; the border is for the parabola
    inner = win[:, 1:-1, 1:-1]
    flat = jnp.argmax(inner.reshape(-1))
    j, iy, ix = jnp.unravel_index(flat, inner.shape)
    wy, wx = iy + 1, ix + 1
    dy = (iy - r) + _parabola_peak(win[j, wy - 1, wx], win[j, wy, wx], win[j, wy + 1, wx])
    dx = (ix - r) + _parabola_peak(win[j, wy, wx - 1], win[j, wy, wx], win[j, wy, wx + 1])
    new = transforms.compose(Transform2D(*(f[j] for f in cand)),
                             Transform2D(jnp.float32(0), dx.astype(jnp.float32), dy.astype(jnp.float32),
                                         jnp.asarray(False)))
    x_new = xs[j] * _shift_ramp(n, dx, dy)
    return new, x_new, ctf_j[j], inner.reshape(-1)[flat]


@functools.partial(jax.jit, static_argnames=("radius", "mode", "n_seg", "offsets", "r"))
def _chunk_refine(images, p: Transform2D, ctfp, seg, refs, *, radius, mode, n_seg, offsets, r):
    """Refines a chunk's members against ``refs[seg ^ 1]`` (the other half of the same class) and accumulates
    their sums at the refined parameters. Returns ``(sums, weights, new params, scores)``."""
    n = images.shape[-1]
    up = _upsample2(normalise_background(images, radius))
    other = jnp.clip(jnp.bitwise_xor(seg, 1), 0, refs.shape[0] - 1)
    fn = functools.partial(_refine_one, n=n, mode=mode, offsets=offsets, r=r)
    new, x, c, score = jax.vmap(fn)(up, p, ctfp, refs[other])
    h, h2 = _weights(c, mode)
    s = jax.ops.segment_sum(h * x, seg, num_segments=n_seg + 1)[:n_seg]
    w = jax.ops.segment_sum(h2, seg, num_segments=n_seg + 1)[:n_seg]
    return s, w, new, score


def refine_local(images, params: Transform2D, ctf_params: ctf_mod.CTFParams, reference, bp: BeautifyParams):
    """Local refinement of ``(b, n, n)`` particles against one class-frame ``reference`` ``(n, n)`` image.

    Each particle's rotation (about the class centre, ``bp.angle_offsets()``) and shift (integer window of
    ``bp.refine_shift_range_px`` plus a parabolic sub-pixel peak) are searched around ``params`` (fields
    ``(b,)``), scoring ``sum_k conj(h_i A) X_i`` with ``h_i`` the member's class-frame CTF weight (``bp.ctf``).

    Returns:
        ``(refined Transform2D (b,), scores (b,))``.
    """
    images = jnp.asarray(images, jnp.float32)
    refs = jnp.fft.rfft2(jnp.asarray(reference, jnp.float32))[None]
    seg = jnp.ones(images.shape[0], jnp.int32)  # half 1 of class 0: its reference is refs[1 ^ 1] = refs[0]
    _, _, new, score = _chunk_refine(images, params, ctf_params, seg, refs, radius=float(bp.radius_px),
                                     mode=bp.ctf, n_seg=2, offsets=bp.angle_offsets(),
                                     r=int(bp.refine_shift_range_px))
    return new, score


# ------------------------------------------------------------------------------ averages, SSNR, resolution


def _shell_index(n: int) -> np.ndarray:
    """``(n, n//2 + 1)`` FRC shell of each rfft2 coefficient (as ``filters.fourier_ring_correlation``), corners
    beyond Nyquist clipped to the last shell."""
    return np.minimum(np.rint(filters.radial_frequency(n, n) * n).astype(np.int64), n // 2)


def shell_mean(values: np.ndarray) -> np.ndarray:
    """Mean of an ``(n, n//2 + 1)`` rfft2-grid array over each FRC shell: ``(n//2 + 1,)`` (corners beyond Nyquist
    left out)."""
    values = np.asarray(values, np.float64)
    n = values.shape[0]
    shell = np.rint(filters.radial_frequency(n, n) * n).astype(np.int64)
    inside = shell <= n // 2  # the corners beyond Nyquist belong to no shell (as in the FRC)
    counts = np.bincount(shell[inside], minlength=n // 2 + 1)
    sums = np.bincount(shell[inside], weights=values[inside], minlength=n // 2 + 1)
    return sums / np.maximum(counts, 1)


def frc_to_ssnr(frc, floor: float = 1e-3) -> np.ndarray:
    """SNR of the average of two halves from their FRC, per shell: ``2 FRC / (1 - FRC)``, at least ``floor``."""
    frc = np.clip(np.asarray(frc, np.float64), -1.0, 0.999999)
    return np.maximum(2.0 * frc / (1.0 - frc), floor)


def masked_frc(half_a, half_b, radius: float, width: float = 5.0) -> np.ndarray:
    """FRC ``(n//2 + 1,)`` of two ``(n, n)`` images under a soft circular mask of ``radius`` px."""
    n = np.shape(half_a)[-1]
    mask = filters.soft_circular_mask(n, n, radius, width)
    return np.asarray(filters.fourier_ring_correlation(jnp.asarray(half_a) * mask, jnp.asarray(half_b) * mask))


def split_half_ssnr(half_a, half_b, radius: float | None = None, floor: float = 1e-3, width: float = 5.0):
    """Spectral SNR of the average of two independent half averages ``(n, n)``: ``(ssnr (shells,), frc)``.

    With ``radius`` the halves are soft-masked first (the FRC then measures the particle, not the background)."""
    if radius is None:
        frc = np.asarray(filters.fourier_ring_correlation(jnp.asarray(half_a), jnp.asarray(half_b)))
    else:
        frc = masked_frc(half_a, half_b, radius, width)
    return frc_to_ssnr(frc, floor), frc


def resolution_angst(frc, threshold: float, box: int, pixel_size_angst: float) -> float:
    """Resolution in A where the FRC ``(box//2 + 1,)`` first falls below ``threshold`` (``filters.frc_resolution``:
    linear interpolation between shells; never beyond Nyquist)."""
    freq = float(filters.frc_resolution(jnp.asarray(frc, jnp.float32), threshold, box))
    return pixel_size_angst / freq


def wiener_average(sum_ctf_ft, sum_ctf2, ssnr_particle_shells, shape: tuple[int, int]) -> np.ndarray:
    """``irfft2(sum CTF_i F_i / (sum CTF_i^2 + 1 / SSNR(k)))`` with a per-particle SSNR per FRC shell.

    Args:
        sum_ctf_ft: ``(n, n//2 + 1)`` complex ``sum_i CTF_i F_i`` (class frame).
        sum_ctf2: ``(n, n//2 + 1)`` ``sum_i CTF_i^2``.
        ssnr_particle_shells: ``(n//2 + 1,)`` per-particle SSNR (> 0), or a scalar.
        shape: ``(n, n)``.
    """
    n = shape[-1]
    ssnr = np.asarray(ssnr_particle_shells, np.float32)
    grid = ssnr[_shell_index(n)] if ssnr.ndim else ssnr
    sums = ctf_mod.CTFWeightedSum(jnp.asarray(sum_ctf_ft), jnp.asarray(sum_ctf2, jnp.float32))
    return np.asarray(ctf_mod.wiener_filter(sums, grid, shape))


def class_resolution(half_a, half_b, radius: float, pixel_size_angst: float, threshold: float = 0.143,
                     width: float = 5.0) -> tuple[float, np.ndarray]:
    """Split-half resolution of a class: ``(resolution in A, FRC (n//2 + 1,))`` of the soft-masked halves."""
    frc = masked_frc(half_a, half_b, radius, width)
    return resolution_angst(frc, threshold, np.shape(half_a)[-1], pixel_size_angst), frc


class ClassResult(NamedTuple):
    """One class's averages: ``average`` (n, n) soft-masked, ``halves`` (2, n, n), ``frc`` and ``ssnr``
    (per-particle, per shell), ``resolution_angst``."""

    average: np.ndarray
    halves: np.ndarray
    frc: np.ndarray
    ssnr: np.ndarray
    resolution_angst: float


def class_from_sums(s: np.ndarray, w: np.ndarray, bp: BeautifyParams, pixel_size: float) -> ClassResult:
    """A class's average, halves, FRC and resolution from its half sums ``s`` ``(2, n, m)`` and ``w`` ``(2, n, m)``.

    Wiener mode estimates SSNR in two passes: first from the FRC of the CTF-weighted half sums (which need no
    regularisation), then from halves Wiener-filtered with that SSNR; the final average uses the second."""
    n = s.shape[-2]
    shape = (n, n)
    mask = filters.soft_circular_mask(n, n, bp.radius_px, bp.mask_width_px)
    w_total = shell_mean(w[0] + w[1])
    if bp.ctf == "wiener":
        halves = np.stack([np.fft.irfft2(s[h], s=shape) for h in range(2)])
        for _ in range(2):
            ssnr_avg, frc = split_half_ssnr(halves[0], halves[1], bp.radius_px, bp.ssnr_floor, bp.mask_width_px)
            ssnr = ssnr_avg / np.maximum(w_total, 1e-30)
            # each half holds half the members: its per-particle SSNR is the same, its sum CTF^2 about half
            halves = np.stack([wiener_average(s[h], w[h], ssnr, shape) for h in range(2)])
        average = wiener_average(s[0] + s[1], w[0] + w[1], ssnr, shape)
    else:
        halves = np.stack([np.fft.irfft2(s[h] / np.maximum(w[h], 1e-30), s=shape) for h in range(2)])
        average = np.fft.irfft2((s[0] + s[1]) / np.maximum(w[0] + w[1], 1e-30), s=shape)
        ssnr = frc_to_ssnr(masked_frc(halves[0], halves[1], bp.radius_px, bp.mask_width_px), bp.ssnr_floor)
        ssnr = ssnr / np.maximum(w_total, 1e-30)
    res, frc = class_resolution(halves[0], halves[1], bp.radius_px, pixel_size, bp.frc_threshold, bp.mask_width_px)
    return ClassResult((average * mask).astype(np.float32), (halves * mask).astype(np.float32), frc,
                       ssnr.astype(np.float32), res)


# ------------------------------------------------------------------------------------------- sharpening


def rotational_amplitude(image) -> np.ndarray:
    """Mean Fourier amplitude of an ``(n, n)`` image per FRC shell: ``(n//2 + 1,)``."""
    return shell_mean(np.abs(np.fft.rfft2(np.asarray(image, np.float64))))


def guinier_bfactor(image, pixel_size_angst: float, start_angst: float, end_freq: float = 0.5) -> float:
    """B (A^2) from a least-squares line through ``ln(rotational amplitude)`` against ``k^2`` (k in 1/A) between
    ``1 / start_angst`` and ``end_freq`` cycles/px: amplitude ~ ``exp(-B k^2 / 4)``, so ``B = -4 slope``."""
    n = np.shape(image)[-1]
    amp = rotational_amplitude(image)
    k = np.arange(n // 2 + 1) / (n * pixel_size_angst)
    use = (k >= 1.0 / start_angst) & (k <= end_freq / pixel_size_angst) & (amp > 0)
    if use.sum() < 3:
        return 0.0
    slope = np.polyfit(k[use] ** 2, np.log(amp[use]), 1)[0]
    return float(-4.0 * slope)


def penczek_model_power(k_inv_angst) -> np.ndarray:
    """SPHIRE's analytic rotational power spectrum of a protein (``adjust_pw_to_model``, "fitted to Yifan channel,
    Penczek 2010"; field_formats.md §2a step 3): ``exp(-4.5 + 15 / (k / 0.2 + 1)^2) + exp(-1 - ((k - 0.2) /
    0.0625)^2 / 2)`` with ``k`` taken here as the physical frequency in 1/A (SPHIRE's own scaling of ``k`` is
    unverified): a steep fall from low frequencies and the secondary-structure hump at 5 A."""
    k = np.asarray(k_inv_angst, np.float64)
    return np.exp(-4.5 + 15.0 / (k / 0.2 + 1.0) ** 2) + np.exp(-1.0 - 0.5 * ((k - 0.2) / 0.0625) ** 2)


def _model_gain(image, pixel_size_angst: float) -> np.ndarray:
    """Per-shell gain (rfft2 grid) that gives ``image`` the model's rotational power spectrum, total power kept."""
    n = image.shape[-1]
    power = shell_mean(np.abs(np.fft.rfft2(np.asarray(image, np.float64))) ** 2)
    model = penczek_model_power(np.arange(n // 2 + 1) / (n * pixel_size_angst))
    ratio = np.where(power > 0, model / np.where(power > 0, power, 1.0), 0.0)
    # the sum over shells >= 1 of the shell-mean power is kept; the mean (shell 0) stays as it is
    gain = np.sqrt(ratio * power[1:].sum() / model[1:].sum())
    gain[0] = 1.0
    return gain[_shell_index(n)]


def sharpen(image, pixel_size_angst: float, mode: str = "none", b_factor: float = 0.0,
            start_angst: float = 45.0, fit_end_freq: float = 0.5, lowpass_freq: float | None = None,
            falloff: float = _TANH_FALLOFF) -> tuple[np.ndarray, float]:
    """Sharpens and low-passes an ``(n, n)`` average: ``(image, B applied)``.

    mode: ``"none"``, ``"guinier"`` (B fitted between ``start_angst`` and ``fit_end_freq`` cycles/px),
    ``"bfactor"`` (``b_factor``): the amplitudes are multiplied by ``exp(B k^2 / 4)``; or ``"model"``: each shell
    is scaled so the rotational power spectrum follows ``penczek_model_power`` (total power kept). Then, when
    ``lowpass_freq`` (cycles/px) is given, by SPHIRE's tanh low-pass with ``falloff``."""
    if mode not in _SHARPEN_MODES:
        raise ValueError(f"beautify.sharpen '{mode}' must be one of {', '.join(_SHARPEN_MODES)}")
    image = np.asarray(image, np.float32)
    n = image.shape[-1]
    b = 0.0
    if mode == "guinier":
        b = guinier_bfactor(image, pixel_size_angst, start_angst, fit_end_freq)
    elif mode == "bfactor":
        b = float(b_factor)
    freq = filters.radial_frequency(n, n)
    gain = np.exp(b * (freq / pixel_size_angst) ** 2 / 4.0)
    if mode == "model":
        gain = _model_gain(image, pixel_size_angst)
    if lowpass_freq is not None:
        gain = gain * np.asarray(filters.tanh_lowpass_response(freq, float(lowpass_freq), falloff))
    out = np.fft.irfft2(np.fft.rfft2(image) * gain, s=image.shape)
    return out.astype(np.float32), b


# ------------------------------------------------------------------------------------ the run folder


def read_run_particles(run_dir: str | os.PathLike) -> pd.DataFrame:
    """``<run>/particles.star`` as one table (optics columns merged into each row), input order."""
    path = Path(run_dir) / "particles.star"
    if not path.is_file():
        raise StackError(f"{path}: no such file; give beautify.run_dir = a finished jisac run folder")
    try:
        blocks = starfile.read(path, always_dict=True)
    except Exception as e:  # starfile raises many kinds
        raise StackError(f"{path}: not a readable STAR file ({type(e).__name__}: {e})") from None
    particles = blocks.get("particles")
    if not isinstance(particles, pd.DataFrame):
        raise StackError(f"{path}: no data_particles table; is this a jisac run's particles.star?")
    particles = particles.reset_index(drop=True)
    optics = blocks.get("optics")
    if isinstance(optics, pd.DataFrame) and "rlnOpticsGroup" in optics.columns:
        if "rlnOpticsGroup" not in particles.columns:
            particles = particles.assign(rlnOpticsGroup=optics["rlnOpticsGroup"].iloc[0])
        by_group = optics.set_index("rlnOpticsGroup")
        for column in by_group.columns:
            if column not in particles.columns:
                particles[column] = particles["rlnOpticsGroup"].map(by_group[column]).to_numpy()
    need = ["rlnClassNumber", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"]
    missing = [c for c in need if c not in particles.columns]
    if missing:
        raise StackError(f"{path}: lacks column(s) {', '.join(missing)}; is this a jisac run's particles.star?")
    return particles


def parameters_from_table(table: pd.DataFrame, pixel_size_angst: float) -> Transform2D:
    """Each particle's full alignment (input pixels, jisac convention) from a run's particles.star table."""
    mirror = table["jisacMirror"].to_numpy() > 0 if "jisacMirror" in table.columns else np.zeros(len(table), bool)
    p = transforms.from_relion(table["rlnAnglePsi"].to_numpy(np.float32),
                               table["rlnOriginXAngst"].to_numpy(np.float32),
                               table["rlnOriginYAngst"].to_numpy(np.float32), mirror, pixel_size_angst)
    return Transform2D(*(np.asarray(f) for f in p))


def _placeholder_ctf(n: int, pixel_size: float) -> ctf_mod.CTFParams:
    """CTF parameters for ``ctf="none"`` (never used for weighting; keeps one kernel signature)."""
    return ctf_mod.CTFParams(*(np.full(n, v, np.float32) for v in (1e4, 1e4, 0.0, 300.0, 2.7, 0.1, 0.0,
                                                                     pixel_size)))


def _take(tree, idx):
    return type(tree)(*(np.asarray(f)[idx] for f in tree))


def _pad(a: np.ndarray, size: int, fill) -> np.ndarray:
    if len(a) == size:
        return a
    extra = np.full((size - len(a),) + a.shape[1:], fill, a.dtype)
    return np.concatenate([a, extra])


def _batch_pass(stack, members: list[np.ndarray], params: Transform2D, ctfp, bp: BeautifyParams,
                refs: np.ndarray | None = None):
    """One pass over the members of a class batch (chunks read from the stack, in index order).

    Returns ``(s (2B, n, m) complex128, w (2B, n, m), new params of every member or None)``; segment ``2b + h``
    is half ``h`` (member position parity) of class ``b``."""
    n = stack.box_size
    n_used = 2 * len(members)
    # one segment count for every batch and refinement pass (the kernels' static shape): no recompilation when the
    # last batch is smaller or refinement leaves some classes out
    n_seg = 2 * max(bp.class_batch, len(members))
    idx = np.concatenate(members)
    seg = np.concatenate([2 * b + (np.arange(len(m)) % 2) for b, m in enumerate(members)]).astype(np.int32)
    order = np.argsort(idx, kind="stable")
    idx, seg = idx[order], seg[order]
    s = np.zeros((n_seg, n, n // 2 + 1), np.complex128)
    w = np.zeros((n_seg, n, n // 2 + 1), np.float64)
    new_params = {f: np.zeros(len(idx), np.float32 if f != "mirror" else bool) for f in Transform2D._fields}
    chunk = bp.chunk
    refs_j = None if refs is None else jnp.asarray(_pad(np.asarray(refs, np.complex64), n_seg, 0.0))
    for start in range(0, len(idx), chunk):
        rows = idx[start:start + chunk]
        k = len(rows)
        images = _pad(stack.read(rows), chunk, 0.0)
        p = Transform2D(*(_pad(np.asarray(f)[rows], chunk, f.dtype.type(0)) for f in params))
        # padding rows reuse the first row's CTF (finite values), their segment is dropped
        c = ctf_mod.CTFParams(*(_pad(np.asarray(f)[rows], chunk, np.asarray(f)[rows[0]]) for f in ctfp))
        sg = _pad(seg[start:start + chunk], chunk, n_seg)
        if refs is None:
            cs, cw = _chunk_sums(images, p, c, sg, radius=float(bp.radius_px), mode=bp.ctf, n_seg=n_seg)
        else:
            cs, cw, q, _ = _chunk_refine(images, p, c, sg, refs_j, radius=float(bp.radius_px), mode=bp.ctf,
                                         n_seg=n_seg, offsets=bp.angle_offsets(), r=int(bp.refine_shift_range_px))
            for f, v in zip(Transform2D._fields, q):
                new_params[f][start:start + k] = np.asarray(v)[:k]
        s += np.asarray(cs)
        w += np.asarray(cw)
    s, w = s[:n_used], w[:n_used]
    if refs is None:
        return s, w, None
    back = np.empty_like(order)
    back[order] = np.arange(len(order))
    return s, w, Transform2D(*(new_params[f][back] for f in Transform2D._fields))  # concatenated member order


def _reference_ft(result: ClassResult, half: int, pixel_size: float) -> np.ndarray:
    """A half average, low-passed at the class resolution, as the refinement's reference (rfft2)."""
    n = result.halves.shape[-1]
    cutoff = min(0.5, pixel_size / result.resolution_angst)
    gain = np.asarray(filters.tanh_lowpass_response(filters.radial_frequency(n, n), cutoff, 0.05))
    return (np.fft.rfft2(result.halves[half]) * gain).astype(np.complex64)


def beautify_classes(stack, members: list[np.ndarray], params: Transform2D, ctfp, bp: BeautifyParams,
                     pixel_size: float, progress: Callable | None = None):
    """Full-size averages of every class (``members[k]``: sorted input indices of class k+1).

    Returns ``(results: list[ClassResult], refined params (n,) or the input params, info per class)``."""
    results: list[ClassResult] = []
    info: list[dict] = []
    refined = Transform2D(*(np.array(f, copy=True) for f in params))
    n_classes = len(members)
    for b0 in range(0, n_classes, bp.class_batch):
        batch = list(range(b0, min(b0 + bp.class_batch, n_classes)))
        mem = [np.asarray(members[k], np.int64) for k in batch]
        s, w, _ = _batch_pass(stack, mem, params, ctfp, bp)
        res = [class_from_sums(s[2 * b:2 * b + 2], w[2 * b:2 * b + 2], bp, pixel_size) for b in range(len(batch))]
        first = [r.resolution_angst for r in res]
        iters = [0] * len(batch)
        if bp.local_refinement and bp.refine_iterations > 0:
            current = Transform2D(*(np.array(f, copy=True) for f in params))
            active = [b for b in range(len(batch)) if len(mem[b]) >= 2]
            for _ in range(bp.refine_iterations):
                if not active:
                    break
                sub = [mem[b] for b in active]
                refs = np.stack([_reference_ft(res[b], h, pixel_size) for b in active for h in range(2)])
                s2, w2, q = _batch_pass(stack, sub, current, ctfp, bp, refs)
                still = []
                offset = 0
                for j, b in enumerate(active):
                    cand = class_from_sums(s2[2 * j:2 * j + 2], w2[2 * j:2 * j + 2], bp, pixel_size)
                    rows = sub[j]
                    qb = _take(q, slice(offset, offset + len(rows)))
                    offset += len(rows)
                    if cand.frc[1:].sum() > res[b].frc[1:].sum() + 1e-3:
                        res[b] = cand
                        iters[b] += 1
                        for f, v in zip(Transform2D._fields, qb):
                            getattr(current, f)[rows] = v
                        still.append(b)
                active = still
            for b in range(len(batch)):
                for f in Transform2D._fields:
                    getattr(refined, f)[mem[b]] = getattr(current, f)[mem[b]]
        results.extend(res)
        for b in range(len(batch)):
            info.append({"class": batch[b] + 1, "members": int(len(mem[b])),
                         "resolution_angst": float(res[b].resolution_angst),
                         "resolution_before_refinement_angst": float(first[b]), "refinement_passes": iters[b]})
        if progress is not None:
            progress(batch[-1] + 1, n_classes)
    return results, refined, info


def _finish(result: ClassResult, bp: BeautifyParams, pixel_size: float) -> tuple[np.ndarray, float]:
    """Sharpening and low-pass of one class average (options ``sharpen``, ``lowpass``)."""
    res_freq = min(0.5, pixel_size / result.resolution_angst)
    if bp.lowpass == "resolution":
        lp = res_freq
    elif bp.lowpass == "none":
        lp = None
    else:
        lp = bp.lowpass_frequency()
    return sharpen(result.average, pixel_size, bp.sharpen, bp.b_factor, bp.guinier_start_angst, res_freq, lp)


def _sphire_params_rows(p: Transform2D, rows: np.ndarray) -> np.ndarray:
    return np.stack([np.asarray(p.angle)[rows], np.asarray(p.shift_x)[rows], np.asarray(p.shift_y)[rows],
                     np.asarray(p.mirror)[rows].astype(int)], -1)


def _write_text(path: Path, rows: np.ndarray, fmt) -> None:
    with atomic_path(path) as tmp:
        np.savetxt(tmp, rows, fmt=fmt)


def beautify_run(run_dir, params: BeautifyParams, stack_path=None, out_dir=None, mesh=None,
                 progress: Callable | None = None) -> dict:
    """Beautifies a finished jisac run: full-size CTF-corrected averages, resolutions, refined parameters.

    Args:
        run_dir: the run folder (``particles.star``, ``summary.json``).
        params: ``BeautifyParams`` (``radius_px`` in input pixels is required).
        stack_path: the original stack; default ``summary.json``'s ``"input"``.
        out_dir: output folder; default ``<run_dir>/beautify``.
        mesh: accepted for the CLI's signature; the beautifier runs on the default device (unused).
        progress: called as ``progress(classes_done, n_classes)`` after each class batch.

    Returns:
        The summary (also in ``resolutions.json``): per class ``members``, ``resolution_angst``, ...
    """
    del mesh  # one device: the work per class is small next to ISAC itself
    run_dir = Path(run_dir)
    out = run_dir / "beautify" if out_dir is None else Path(out_dir)
    table = read_run_particles(run_dir)
    if stack_path is None:
        summary_path = run_dir / "summary.json"
        try:
            stack_path = json.loads(summary_path.read_text())["input"]
        except (OSError, ValueError, KeyError):
            raise StackError(f"{summary_path}: cannot read the run's input stack from it; pass "
                             "beautify.stack=<the original stack>") from None
    stack = open_stack(stack_path)
    if len(stack) != len(table):
        raise StackError(f"{stack_path}: {len(stack)} particles but {run_dir / 'particles.star'} lists "
                         f"{len(table)}; give the stack the run was made from")
    params.validate(stack.box_size)
    if "rlnImagePixelSize" in table.columns:
        pixel_size = float(table["rlnImagePixelSize"].iloc[0])
    else:
        pixel_size = stack.require_pixel_size()
    p = parameters_from_table(table, pixel_size)
    if params.ctf == "none":
        ctfp = _placeholder_ctf(len(table), pixel_size)
    else:
        try:
            ctfp = ctf_mod.CTFParams.from_relion_table(table, pixel_size)
        except ValueError as e:
            raise StackError(f"{run_dir / 'particles.star'}: {e}; or run with beautify.ctf=none") from None
        ctfp = ctf_mod.CTFParams(*(np.asarray(f) for f in ctfp))
    classes = table["rlnClassNumber"].to_numpy().astype(int)
    n_classes = int(classes.max()) if len(classes) else 0
    members = [np.flatnonzero(classes == k + 1) for k in range(n_classes)]
    results, refined, info = beautify_classes(stack, members, p, ctfp, params, pixel_size, progress)

    finished = [_finish(r, params, pixel_size) for r in results]
    averages = np.stack([f[0] for f in finished]) if finished else np.zeros((0, stack.box_size, stack.box_size))
    for d, f in zip(info, finished):
        d["b_factor"] = f[1]
    out.mkdir(parents=True, exist_ok=True)
    if len(averages):
        mrc.write_stack(out / "class_averages.mrcs", averages, pixel_size)
        hdf.write_class_averages(out / "class_averages.hdf", averages, members, pixel_size,
                                 [{"resolution_angst": d["resolution_angst"]} for d in info])
    accounted = classes > 0
    q = Transform2D(*(np.where(accounted, np.asarray(f), np.zeros_like(np.asarray(f))) for f in refined))
    psi, ox, oy, mirror = (np.asarray(v) for v in transforms.to_relion(q, pixel_size))
    star.write_particle_star(out / "particles.star", table, {
        "rlnAnglePsi": psi, "rlnOriginXAngst": ox, "rlnOriginYAngst": oy, "jisacMirror": mirror.astype(int)},
        pixel_size=pixel_size, box_size=stack.box_size)
    # SPHIRE's files: FH_list.txt [i, FH1, FH2] (cycles/px; FH2 = -1 without refinement), params_avg/, init params
    fh = [[k, pixel_size / d["resolution_before_refinement_angst"],
           pixel_size / d["resolution_angst"] if params.local_refinement else -1.0] for k, d in enumerate(info)]
    _write_text(out / "FH_list.txt", np.asarray(fh).reshape(-1, 3), ["%d", "%.6f", "%.6f"])
    for k, m in enumerate(members):
        _write_text(out / "params_avg" / f"params_avg_{k:03d}.txt", _sphire_params_rows(p, m),
                    ["%.4f", "%.4f", "%.4f", "%d"])
    ids = np.flatnonzero(accounted)
    init = np.column_stack([ids, _sphire_params_rows(p, ids), np.ones(len(ids))])
    _write_text(out / "init_isac_params.txt", init, ["%d", "%.4f", "%.4f", "%.4f", "%d", "%.1f"])
    summary = {"run_dir": str(run_dir), "input": str(stack_path), "pixel_size_angst": pixel_size,
               "box": stack.box_size, "params": params._asdict(), "classes": info}
    write_json(out / "resolutions.json", summary)
    return summary
