"""Algorithm layer: Polar geometry: the rings ISAC correlates on, resampling onto them, and their angular spectra.

The layout is GPU ISAC's regular one (``shared/isac_algorithm.md`` §5.1, §13): rings of radius
``first_ring, first_ring + ring_step, ..., last_ring`` (shrunken pixels), every ring sampled at ``n_angles`` (256)
equally spaced angles, each ring weighted by its radius (the polar area element).

Sample ``k`` of ring ``r`` around a centre ``c`` lies at ``c + r (cos t_k, sin t_k)`` with ``t_k = 2 pi k / n``,
x = column, y = row. With this choice rotating an image by ``a`` (``transforms`` convention) shifts its rings by
``+a``; ``align.py`` derives its parameters from that (the round-trip tests pin it).

Angular band limit: a ring of radius r sampled from a pixel image carries angular frequencies only up to about
``pi r`` (0.5 cycles/pixel along a circumference of ``2 pi r`` pixels). SPHIRE's per-ring lengths exploit this;
jisac keeps one ring length but, with ``bandlimit=True``, zeroes each ring's spectrum above
``ceil(pi r) + 1`` and never computes the empty part (``align.py``'s frequency blocks).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jisac.transforms import bilinear_sample

Array = jax.Array


RING_LENGTHS = ("constant", "sphire")


class RingGeometry(NamedTuple):
    """Static description of the polar rings (hashable: used as a static jit argument).

    Attributes:
        first_ring: radius of the innermost ring, pixels (SPHIRE ``--ir``, default 1).
        last_ring: radius of the outermost ring, pixels (SPHIRE ``ou`` = ``target_radius``, default 29).
        ring_step: radius step, pixels (SPHIRE ``--rs``, default 1).
        n_angles: samples per ring (GPU ISAC's 256).
        bandlimit: drop angular frequencies above ``ceil(pi r) + 1`` on ring ``r``.
        ring_lengths: ``"constant"``: every ring sampled at ``n_angles`` points (GPU ISAC); ``"sphire"``: SPHIRE's
            lengths (``Numrinit``: the power of two above ``round(2 pi r)``, 8 on ring 1 ... 256 from ring 21; at
            most ``n_angles``), 46 % fewer samples for ISAC's 29 rings. Either way the spectra come out in the
            ``n_angles`` layout (``polar_spectra``), so everything downstream is the same.
    """

    first_ring: int = 1
    last_ring: int = 29
    ring_step: int = 1
    n_angles: int = 256
    bandlimit: bool = True
    ring_lengths: str = "constant"

    @property
    def radii(self) -> np.ndarray:
        return np.arange(self.first_ring, self.last_ring + 1, self.ring_step, dtype=np.int64)

    @property
    def n_rings(self) -> int:
        return len(self.radii)

    @property
    def n_freqs(self) -> int:
        return self.n_angles // 2 + 1

    def max_freq(self) -> np.ndarray:
        """Highest angular frequency kept on each ring, shape ``(n_rings,)``."""
        full = np.full(self.n_rings, self.n_freqs - 1, np.int64)
        if not self.bandlimit:
            return full
        return np.minimum(full, np.ceil(np.pi * self.radii).astype(np.int64) + 1)

    def freq_mask(self) -> np.ndarray:
        """``(n_rings, n_freqs)`` bool: which (ring, angular frequency) coefficients are kept."""
        return np.arange(self.n_freqs)[None, :] <= self.max_freq()[:, None]

    def weights(self) -> np.ndarray:
        """Per-ring weights ``r / (n_angles * sum r)``, float64, shape ``(n_rings,)``.

        The weight is GPU ISAC's ``r`` (SPHIRE's ``ringwe`` up to a constant), normalised so that a score is the
        weighted mean over all ring samples of reference x particle: ring-normalised images score 1 against
        themselves.
        """
        r = self.radii.astype(np.float64)
        return r / (self.n_angles * r.sum())

    def offsets(self) -> np.ndarray:
        """``(n_rings, n_angles, 2)`` float64 sample positions ``(x, y)`` relative to the ring centre."""
        t = 2 * np.pi * np.arange(self.n_angles) / self.n_angles
        r = self.radii[:, None].astype(np.float64)
        return np.stack([r * np.cos(t), r * np.sin(t)], -1)

    def ring_sizes(self) -> np.ndarray:
        """Samples on each ring, ``(n_rings,)`` int (``ring_lengths``)."""
        if self.ring_lengths == "constant":
            return np.full(self.n_rings, self.n_angles, np.int64)
        sphire = 2 ** (np.floor(np.log2(np.round(2 * np.pi * self.radii))) + 1)
        return np.minimum(sphire, self.n_angles).astype(np.int64)

    def validate(self, box_size: int | None = None) -> None:
        """Raises ``ValueError`` naming the parameter when the geometry is impossible."""
        if self.ring_lengths not in RING_LENGTHS:
            raise ValueError(f"ring_lengths must be one of {RING_LENGTHS} (got {self.ring_lengths!r})")
        if self.first_ring < 1:
            raise ValueError(f"first_ring must be >= 1 (got {self.first_ring})")
        if self.ring_step < 1:
            raise ValueError(f"ring_step must be >= 1 (got {self.ring_step})")
        if self.last_ring < self.first_ring:
            raise ValueError(f"last_ring ({self.last_ring}) must be >= first_ring ({self.first_ring})")
        if self.n_angles < 8 or self.n_angles % 2:
            raise ValueError(f"n_angles must be an even number >= 8 (got {self.n_angles})")
        if box_size is not None and self.last_ring > box_size // 2 - 1:
            raise ValueError(
                f"last_ring ({self.last_ring}) does not fit in a {box_size} px box: it must be <= {box_size // 2 - 1}"
            )


def sample_rings(image: Array, centres: Array, geometry: RingGeometry) -> Array:
    """Bilinear polar resampling of one image around several centres.

    Args:
        image: ``(ny, nx)`` image.
        centres: ``(..., 2)`` ring centres ``(x, y)`` in pixels relative to the box centre ``(nx//2, ny//2)``;
            any float values (integer and sub-pixel shifts alike).
        geometry: the rings.

    Returns:
        ``(..., n_rings, n_angles)`` ring samples (zero where a ring leaves the image).
    """
    return _sample_at(image, centres, geometry.offsets())


def _sample_at(image: Array, centres: Array, offsets: np.ndarray) -> Array:
    """Bilinear samples of ``image`` at ``centres (..., 2) + offsets (R, A, 2)`` (box-centre relative):
    ``(..., R, A)``."""
    ny, nx = image.shape
    off = jnp.asarray(offsets, jnp.float32)
    cx = centres[..., 0, None, None] + nx // 2
    cy = centres[..., 1, None, None] + ny // 2
    return bilinear_sample(image, cx + off[..., 0], cy + off[..., 1])


def normalize_rings(rings: Array, geometry: RingGeometry) -> Array:
    """Ring normalisation (``isac_algorithm.md`` §5.3): zero weighted mean and unit weighted std.

    Weights are proportional to the radius (the polar area element). Shape ``(..., n_rings, n_angles)``.
    """
    w = jnp.asarray(geometry.weights(), jnp.float32)[:, None]
    mean = jnp.sum(rings * w, axis=(-2, -1), keepdims=True)
    var = jnp.sum(jnp.square(rings - mean) * w, axis=(-2, -1), keepdims=True)
    return (rings - mean) * jax.lax.rsqrt(jnp.maximum(var, 1e-30))


def ring_spectra(rings: Array, geometry: RingGeometry, normalize: bool = False) -> Array:
    """Angular spectra of rings: ``rfft`` along the angle, band-limited per ring.

    Args:
        rings: ``(..., n_rings, n_angles)`` float.
        geometry: the rings.
        normalize: apply ring normalisation (``normalize_rings``) first. It is done on the spectra (mean from
            the DC terms, variance by Parseval), which equals normalising the samples but lets XLA keep the
            resampling gather out of the reductions.

    Returns:
        ``(..., n_rings, n_freqs)`` complex64.
    """
    return _finish_spectra(jnp.fft.rfft(rings, axis=-1), geometry, normalize)


def _finish_spectra(spectra: Array, geometry: RingGeometry, normalize: bool) -> Array:
    """Ring normalisation and band limit of ``(..., n_rings, n_freqs)`` spectra in the ``n_angles`` layout."""
    if normalize:
        n = geometry.n_angles
        w = jnp.asarray(geometry.weights(), jnp.float32)
        mean = jnp.sum(w * spectra[..., 0].real, -1)
        # Parseval: sum_j x_j^2 = (|F_0|^2 + |F_{n/2}|^2 + 2 sum_{0<k<n/2} |F_k|^2) / n
        power = jnp.square(jnp.abs(spectra))
        ring_sq = (2 * power.sum(-1) - power[..., 0] - power[..., -1]) / n
        var = jnp.sum(w * ring_sq, -1) - jnp.square(mean)  # weights sum to 1/n per sample: sum_r w_r n = 1
        spectra = spectra.at[..., 0].add(-(mean * n)[..., None])
        spectra = spectra * jax.lax.rsqrt(jnp.maximum(var, 1e-30))[..., None, None]
    if geometry.bandlimit:
        spectra = jnp.where(jnp.asarray(geometry.freq_mask()), spectra, 0)
    return spectra


def polar_transform(images: Array, centres: Array, geometry: RingGeometry, normalize: bool = False) -> Array:
    """Rings of a batch of images, each around its own set of centres.

    Args:
        images: ``(n, ny, nx)``.
        centres: ``(n, s, 2)`` (x, y) centres relative to the box centre, pixels.
        geometry: the rings.
        normalize: apply ring normalisation to each (image, centre).

    Returns:
        ``(n, s, n_rings, n_angles)`` float32.
    """
    rings = jax.vmap(lambda img, c: sample_rings(img, c, geometry))(images, centres)
    return normalize_rings(rings, geometry) if normalize else rings


def polar_spectra(images: Array, centres: Array, geometry: RingGeometry, normalize: bool = False) -> Array:
    """Angular spectra of the rings of a batch of images, each around its own set of centres:
    ``ring_spectra(polar_transform(...))`` for ``ring_lengths="constant"``.

    With SPHIRE's ring lengths each group of rings of ``m < n_angles`` samples is transformed on its own and put
    in the ``n_angles`` layout: scaled by ``n_angles / m`` (so a band-limited ring gives the spectrum its
    ``n_angles`` samples would) and its Nyquist coefficient ``m / 2`` by ``1 / sqrt 2`` (that frequency appears
    once in an ``m``-sample spectrum but twice, as ``+-k``, in the longer one: products of two spectra and
    Parseval's sums then count it once, as SPHIRE's half weight on it does); the frequencies above ``m / 2`` are
    zero. Normalisation (from the spectra) and the band limit then apply as for constant rings.

    Args:
        images: ``(n, ny, nx)``; centres: ``(n, s, 2)`` (x, y) relative to the box centre, pixels.

    Returns:
        ``(n, s, n_rings, n_freqs)`` complex64.
    """
    if geometry.ring_lengths == "constant":
        return ring_spectra(polar_transform(images, centres, geometry), geometry, normalize)
    sizes = geometry.ring_sizes()
    radii = geometry.radii.astype(np.float64)
    parts = []
    for m in np.unique(sizes):  # sizes grow with the radius: the groups are consecutive rings, in order
        r = radii[sizes == m][:, None]
        t = 2 * np.pi * np.arange(m) / m
        offsets = np.stack([r * np.cos(t), r * np.sin(t)], -1)  # (R_m, m, 2)
        rings = jax.vmap(lambda img, c: _sample_at(img, c, offsets))(images, centres)  # (n, s, R_m, m)
        spec = jnp.fft.rfft(rings, axis=-1) * jnp.float32(geometry.n_angles / m)
        if m < geometry.n_angles:
            spec = spec.at[..., -1].multiply(jnp.float32(1 / np.sqrt(2)))
        parts.append(jnp.pad(spec, [(0, 0)] * (spec.ndim - 1) + [(0, geometry.n_freqs - spec.shape[-1])]))
    return _finish_spectra(jnp.concatenate(parts, -2), geometry, normalize)


def rotate_spectra(spectra: Array, angle: Array, mirror: Array) -> Array:
    """Ring spectra of an image about a centre ``c`` -> those of the image rotated by ``angle`` and mirrored
    (``mirror``) about ``c``, sampled about the box centre: the spectra of ``apply_transform(image,
    from_centre_and_angle(c, angle, mirror))``, exact for band-limited rings (one interpolation instead of two).

    A rotation by ``a`` turns ring sample ``t`` into ``t + a``: coefficient ``k`` times ``e^{i k a}``; the mirror
    after it takes ``t`` to ``pi + a - t``: ``(-1)^k e^{-i k a}`` times the conjugate (real rings).

    Args:
        spectra: ``(..., n_rings, F)`` complex, frequencies ``0 .. F - 1`` of the ``n_angles`` layout.
        angle: ``(...)`` degrees (``transforms`` convention); mirror: ``(...)`` bool.

    Returns:
        ``(..., n_rings, F)`` complex64.
    """
    angle, mirror = jnp.asarray(angle, jnp.float32), jnp.asarray(mirror)
    # The ramp is (..., F): one sin/cos per frequency, shared by the rings. Left to itself, XLA:CPU fuses its
    # fmod/sin/cos into the loop over every (ring, frequency) coefficient and computes them once per ring
    # (measured 4x slower for ISAC's 29 rings); a conditional is a fusion boundary, so it is computed once.
    ramp_of = functools.partial(_rotation_ramp, n_freqs=spectra.shape[-1])
    ramp = jax.lax.cond(jnp.all(jnp.isfinite(angle)), ramp_of, ramp_of, angle, mirror)
    # one product per coefficient: the conjugate (mirror) or not, times the matching ramp
    return jnp.where(mirror[..., None, None], jnp.conj(spectra), spectra) * ramp[..., None, :]


def _rotation_ramp(angle: Array, mirror: Array, n_freqs: int) -> Array:
    """``(..., n_freqs)`` the factors of ``rotate_spectra``: ``e^{i k a}``, or ``(-1)^k e^{-i k a}`` mirrored."""
    freqs = np.arange(n_freqs)
    k = jnp.asarray(freqs, jnp.float32)
    # the angle in turns, wrapped, so that k * angle keeps float32's precision (k up to n_angles / 2)
    turns = jnp.mod(angle / 360.0, 1.0)[..., None]
    phase = 2 * jnp.pi * jnp.mod(k * turns, 1.0)
    ramp = jax.lax.complex(jnp.cos(phase), jnp.sin(phase))
    sign = jnp.asarray((-1.0) ** freqs, jnp.float32)
    return jnp.where(mirror[..., None], jnp.conj(ramp) * sign, ramp)


_SYNTHESIS_UPSAMPLING = 4


@functools.lru_cache(maxsize=16)
def _synthesis_table(geometry: RingGeometry, ny: int, nx: int, n_ang: int) -> tuple[np.ndarray, np.ndarray]:
    """For every pixel of an ``(ny, nx)`` box, the 4 samples of the extended ring array (``spectra_to_image``,
    ``n_ang`` samples per ring) that bilinear interpolation in (radius, angle) reads, and their weights:
    ``(ny * nx, 4)`` int32, float32."""
    y, x = np.mgrid[:ny, :nx].astype(np.float64)
    x, y = x.ravel() - nx // 2, y.ravel() - ny // 2
    r = np.hypot(x, y)
    n_rings = geometry.n_rings
    # extended rings: 0 = the centre point, 1 .. n_rings = the rings, n_rings + 1 = zeros (outside the last ring)
    rho = np.where(r < geometry.first_ring, r / geometry.first_ring, 1 + (r - geometry.first_ring) / geometry.ring_step)
    rho = np.minimum(rho, n_rings + 1)
    i0 = np.minimum(np.floor(rho).astype(np.int64), n_rings)
    fr = rho - i0
    tau = np.mod(np.arctan2(y, x), 2 * np.pi) * n_ang / (2 * np.pi)
    j0 = np.floor(tau).astype(np.int64) % n_ang
    ft = tau - np.floor(tau)
    j1 = (j0 + 1) % n_ang
    idx = np.stack([i0 * n_ang + j0, i0 * n_ang + j1, (i0 + 1) * n_ang + j0, (i0 + 1) * n_ang + j1], -1)
    w = np.stack([(1 - fr) * (1 - ft), (1 - fr) * ft, fr * (1 - ft), fr * ft], -1)
    return idx.astype(np.int32), w.astype(np.float32)


def spectra_to_image(spectra: Array, geometry: RingGeometry, shape: tuple[int, int]) -> Array:
    """The image whose rings about the box centre have these spectra: each ring back to ``n_angles`` samples
    (``irfft``), then bilinear interpolation in (radius, angle) at every pixel. Inside the first ring the rings
    meet the centre at the first ring's mean; beyond the last ring they fall to zero over one ring step and stay
    zero (ISAC's rings end at the particle radius).

    Args:
        spectra: ``(..., n_rings, F)`` complex, frequencies ``0 .. F - 1`` of the ``n_angles`` layout (the rest
            zero). shape: ``(ny, nx)``.

    Returns:
        ``(..., ny, nx)`` float32.
    """
    ny, nx = shape
    n_ang = geometry.n_angles * _SYNTHESIS_UPSAMPLING
    # rings evaluated at 4x their angles (exact: band-limited), so that the angular interpolation hardly blurs
    rings = jnp.fft.irfft(spectra, n=n_ang, axis=-1) * _SYNTHESIS_UPSAMPLING  # (..., R, n_ang)
    centre = jnp.broadcast_to(jnp.mean(rings[..., :1, :], -1, keepdims=True), rings[..., :1, :].shape)
    ext = jnp.concatenate([centre, rings, jnp.zeros_like(rings[..., :1, :])], -2)
    idx, w = _synthesis_table(geometry, ny, nx, n_ang)
    flat = ext.reshape(*ext.shape[:-2], -1)
    values = jnp.take(flat, jnp.asarray(idx), axis=-1)  # (..., ny * nx, 4)
    return jnp.sum(values * jnp.asarray(w), -1).reshape(*ext.shape[:-2], ny, nx)
