"""Data layer: Synthetic data with known truth: a deterministic asymmetric 3D phantom, its projections, noise;
particles simulated from a 3D map (views, CTF, shifts, noise, junk).

The phantom is a sum of isotropic 3D Gaussians, so its projection along any direction is an exact sum of 2D
Gaussians: no 3D grid, no interpolation, any box size in milliseconds. Used by the tests, the benchmarks and
the demo stack.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import mrcfile
import numpy as np

from jisac import ctf, filters
from jisac import transforms as T
from jisac.diskarray import DiskArray

Array = jax.Array


class Phantom(NamedTuple):
    """Gaussian blobs: ``centres`` ``(n, 3)`` and ``sigmas`` ``(n,)`` in pixels, ``amplitudes`` ``(n,)``."""

    centres: np.ndarray
    sigmas: np.ndarray
    amplitudes: np.ndarray


def make_phantom(radius: float = 25.0, n_blobs: int = 40, seed: int = 0) -> Phantom:
    """A random, asymmetric blob object that fits in a sphere of ``radius`` pixels.

    Blobs of several sizes fill the sphere uniformly (like the domains of a protein complex); with random
    positions the object has no symmetry (almost surely), so every view is distinct.
    """
    rng = np.random.default_rng(seed)
    directions = rng.standard_normal((n_blobs, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    sigmas = rng.uniform(0.06, 0.14, n_blobs) * radius
    # Uniform in the ball, kept two sigmas inside the surface.
    dist = (radius - 2 * sigmas) * rng.uniform(0.0, 1.0, n_blobs) ** (1 / 3)
    amplitudes = rng.uniform(0.5, 1.5, n_blobs)
    return Phantom(directions * dist[:, None], sigmas, amplitudes)


def euler_to_matrix(rot, tilt, psi) -> np.ndarray:
    """ZYZ Euler angles in degrees (RELION/SPIDER convention) -> rotation matrices ``(..., 3, 3)`` float64.

    ``R = Rz(psi) Ry(tilt) Rz(rot)``; a projection sees the object's coordinates ``R x`` along z, so the viewing
    direction in the object frame is ``R[2]``.
    """
    a, b, g = (np.deg2rad(np.asarray(v, np.float64)) for v in (rot, tilt, psi))
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    m = np.empty(np.broadcast(a, b, g).shape + (3, 3))
    m[..., 0, 0] = cg * cb * ca - sg * sa
    m[..., 0, 1] = cg * cb * sa + sg * ca
    m[..., 0, 2] = -cg * sb
    m[..., 1, 0] = -sg * cb * ca - cg * sa
    m[..., 1, 1] = -sg * cb * sa + cg * ca
    m[..., 1, 2] = sg * sb
    m[..., 2, 0] = sb * ca
    m[..., 2, 1] = sb * sa
    m[..., 2, 2] = cb
    return m


def hemisphere_directions(k: int) -> tuple[np.ndarray, np.ndarray]:
    """``k`` well-spread viewing directions on the upper hemisphere (Fibonacci lattice) as ``(rot, tilt)`` degrees.

    The hemisphere avoids opposite directions, whose projections are mirror images of each other.
    """
    i = np.arange(k) + 0.5
    tilt = np.rad2deg(np.arccos(1.0 - i / k))
    rot = np.mod(i * 180.0 * (3.0 - np.sqrt(5.0)), 360.0)
    return rot, tilt


def _project_one(centres, sigmas, amplitudes, matrix, box: int):
    xy = centres @ matrix[:2].T  # (n, 2) projected blob centres (x, y)
    coords = jnp.arange(box, dtype=jnp.float32) - box // 2
    gx = jnp.exp(-jnp.square(coords[None, :] - xy[:, 0:1]) / (2 * jnp.square(sigmas[:, None])))  # (n, box)
    gy = jnp.exp(-jnp.square(coords[None, :] - xy[:, 1:2]) / (2 * jnp.square(sigmas[:, None])))
    # Line integral of a 3D Gaussian: amplitude * sqrt(2 pi) sigma.
    weight = amplitudes * jnp.sqrt(2 * jnp.pi) * sigmas
    return jnp.einsum("n,ny,nx->yx", weight, gy, gx)


def project(phantom: Phantom, matrices, box: int) -> Array:
    """Exact projections ``(k, box, box)`` float32 of the phantom for rotation matrices ``(k, 3, 3)``.

    Pixel ``(row y, column x)`` holds the integral along z at ``(x - box//2, y - box//2)`` in rotated coordinates.
    """
    c, s, a = (jnp.asarray(v, jnp.float32) for v in phantom)
    fn = jax.jit(jax.vmap(_project_one, in_axes=(None, None, None, 0, None)), static_argnums=4)
    return fn(c, s, a, jnp.asarray(matrices, jnp.float32), box)


def add_noise(images: Array, snr: float, key: Array, mask: np.ndarray | None = None) -> Array:
    """Adds white Gaussian noise at ``snr`` = signal variance / noise variance.

    The signal variance is measured per image inside ``mask`` (default: the whole image), so a mask around the
    particle makes the noise stronger than a whole-box definition would.
    """
    images = jnp.asarray(images, jnp.float32)
    m = jnp.ones(images.shape[-2:], jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
    count = m.sum()
    mean = jnp.sum(images * m, axis=(-2, -1), keepdims=True) / count
    var = jnp.sum(jnp.square(images - mean) * m, axis=(-2, -1), keepdims=True) / count
    noise = jax.random.normal(key, images.shape, jnp.float32)
    return images + noise * jnp.sqrt(var / snr)


class Simulated(NamedTuple):
    """Noisy particles with their truth: ``images`` ``(n, box, box)``, ``view`` ``(n,)`` the index of each
    particle's clean view, ``moves`` the ``Transform2D`` applied to that view (its inverse is the alignment that
    brings the particle back onto the view) and ``ctf`` the per-particle CTF applied, or None."""

    images: Array
    view: np.ndarray
    moves: T.Transform2D
    ctf: object = None


def simulate(views, n: int, key: Array, snr: float, max_shift: float = 1.0, ctf_params=None,
             noise_mask: np.ndarray | None = None, view: np.ndarray | None = None) -> Simulated:
    """The one recipe for synthetic particles with known truth (tests, benchmarks, experiments, the demo).

    Each particle is one of the clean ``views`` ``(k, box, box)`` (drawn at random, or ``view``), rotated in plane
    by a random angle, shifted by up to ``max_shift`` px in x and y, mirrored with probability 1/2 (the view from
    the opposite side), modulated by its CTF (``ctf_params``: a per-particle ``ctf.CTFParams``, optional), plus
    white noise at ``snr`` (signal variance / noise variance, inside ``noise_mask`` if given, ``add_noise``).
    Randomness: ``jax.random.split(key, 8)``, one sub-key per draw, so the same key gives the same particles.
    """
    keys = jax.random.split(key, 8)
    k = len(views)
    truth = np.asarray(jax.random.randint(keys[0], (n,), 0, k)) if view is None else np.asarray(view)
    moves = T.make_transform(
        jax.random.uniform(keys[1], (n,), maxval=360.0),
        jax.random.uniform(keys[2], (n,), minval=-max_shift, maxval=max_shift),
        jax.random.uniform(keys[3], (n,), minval=-max_shift, maxval=max_shift),
        jax.random.bernoulli(keys[4], 0.5, (n,)),
    )
    images = T.apply_transform(jnp.asarray(views, jnp.float32)[truth], moves)
    if ctf_params is not None:
        images = ctf.apply_ctf(images, ctf_params)
    images = add_noise(images, snr, keys[5], noise_mask)
    return Simulated(images, truth, moves, ctf_params)


def known_views(n_views: int, box: int, radius: float, seed: int = 1) -> tuple[Array, np.ndarray]:
    """``n_views`` well-spread projections (``hemisphere_directions``) of a phantom filling 85 % of ``radius``
    px: ``(views (n_views, box, box), viewing directions (n_views, 3))``."""
    phantom = make_phantom(radius=0.85 * radius, seed=seed)
    rot, tilt = hemisphere_directions(n_views)
    matrices = euler_to_matrix(rot, tilt, 0.0)
    return project(phantom, matrices, box), matrices[:, 2]


def known_view_particles(
    n: int, box: int, radius: float, n_views: int, snr: float, max_shift: float = 1.0, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Noisy particles with known views, for end-to-end tests: ``(particles (n, box, box) float32, view (n,))``
    (``known_views`` then ``simulate`` with ``jax.random.key(seed)``)."""
    views, _ = known_views(n_views, box, radius)
    sim = simulate(views, n, jax.random.key(seed), snr, max_shift)
    return np.asarray(sim.images), sim.view


# ------------------------------------------------------------------------------------------------ from a 3D map
#
# Particles simulated from a density map (e.g. a ribosome), for realistic benchmarks (experiments/lowsnr,
# experiments/beautify). Projection is by the central-slice theorem: one 3D FFT of the zero-padded map, then per
# view a 2D central slice sampled by trilinear interpolation and one inverse 2D FFT. Chosen over real-space ray
# sums because (1) a change of pixel size (map at 4.5 A/px, particles at 6 A/px) is only a scaling of the slice's
# frequency coordinates, band-limited exactly at the output's and the map's Nyquist (real-space sampling would
# alias or need a separate low-pass), (2) the cost per view is O(box^2) gathers after a one-off O(N^3 log N)
# FFT, so thousands of views vmap in seconds on a CPU. The price: trilinear interpolation of the spectrum damps
# and slightly distorts high frequencies; zero-padding the map (``pad``, 3x by default) keeps that error at the
# percent level (tests/test_synthetic.py compares a Gaussian blob's projection with its analytic integral).

JUNK_NONE, JUNK_ICE, JUNK_AGGREGATE = 0, 1, 2


def read_map(path) -> tuple[np.ndarray, float | None]:
    """A cubic 3D map from an MRC file: ``(volume (n, n, n) float32 indexed [z, y, x], voxel size in A or None
    when the header says 0)``.

    Read with ``DiskArray.from_mrc`` (the plain-read reader under ``io.mrc.MrcImageFile``, which by design refuses
    a single 3D volume as a particle stack)."""
    rows = DiskArray.from_mrc(path)
    vol = np.asarray(rows.read(np.arange(len(rows))), np.float32)
    if vol.ndim != 3 or len(set(vol.shape)) != 1:
        raise ValueError(f"{path}: expected a cubic 3D map, got shape {vol.shape}")
    with mrcfile.open(path, header_only=True, permissive=True) as mrc:
        size = float(mrc.voxel_size.x)
    return vol, (size if size > 0 else None)


class MapFT(NamedTuple):
    """Centred 3D Fourier transform of a zero-padded map: ``ft`` ``(pad, pad, pad)`` complex64 with zero
    frequency at index ``pad // 2`` (axes z, y, x), ``size`` the map's edge in voxels, ``pixel_size`` its voxel
    size in A."""

    ft: Array
    size: int
    pixel_size: float


def fourier_volume(vol: np.ndarray, pixel_size: float, pad: int | None = None) -> MapFT:
    """The map's centred 3D FT, zero-padded to ``pad``^3 voxels (default: three times the map, even), computed
    in float64 and stored complex64. The map's centre voxel ``n // 2`` stays the origin.

    Padding sets the accuracy of the trilinear slice: on the 70S ribosome map at 6 A/px, 2x padding is 5 % (RMS)
    from a 4x padded reference, 3x 1.6 %; a 1.5-voxel Gaussian blob is within 1.5 % of its analytic projection at
    3x (tests/test_synthetic.py), 3 % and 0.2 px off-centre at 2x."""
    n = vol.shape[0]
    pad = 3 * n + (3 * n) % 2 if pad is None else int(pad)
    if pad < n:
        raise ValueError(f"pad ({pad}) must be at least the map size ({n})")
    big = np.zeros((pad,) * 3, np.float64)
    lo = pad // 2 - n // 2
    big[lo:lo + n, lo:lo + n, lo:lo + n] = vol
    ft = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(big)))
    return MapFT(jnp.asarray(ft.astype(np.complex64)), n, float(pixel_size))


def _trilinear(vol, z, y, x):
    z0, y0, x0 = jnp.floor(z), jnp.floor(y), jnp.floor(x)
    fz, fy, fx = z - z0, y - y0, x - x0
    z0, y0, x0 = z0.astype(jnp.int32), y0.astype(jnp.int32), x0.astype(jnp.int32)
    out = 0.0
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                w = (fz if dz else 1 - fz) * (fy if dy else 1 - fy) * (fx if dx else 1 - fx)
                out = out + w * vol[z0 + dz, y0 + dy, x0 + dx]
    return out


def map_projector(mft: MapFT, box: int, pixel_size: float):
    """``project(matrices (b, 3, 3), shifts (b, 2)) -> (b, box, box)`` float32, jitted and vmapped over views.

    Each image is the projection along z of the map's coordinates rotated by ``R`` (RELION: the image sees ``R x``;
    ``euler_to_matrix`` gives ``R`` from RELION's rot, tilt, psi), sampled at ``pixel_size`` A/px, with the
    particle's centre moved by ``shifts`` (x, y) px from the box centre ``box // 2`` (RELION's origin is minus
    that shift). Values are line integrals in the map's units times its voxel size in voxels (not rescaled).
    Frequencies beyond the map's Nyquist are zeroed."""
    pad = mft.ft.shape[0]
    m = np.arange(box) - box // 2
    my, mx = np.meshgrid(m, m, indexing="ij")
    # 2D frequency m / (box * pixel_size) is 3D index offset m * pad * map_pixel / (box * pixel_size)
    scale = pad * mft.pixel_size / (box * pixel_size)
    keep = np.hypot(mx, my) * scale < pad // 2 - 1  # the map's own Nyquist (and room for the interpolation)
    kx, ky = (mx * scale * keep).astype(np.float32), (my * scale * keep).astype(np.float32)
    keep_j = jnp.asarray(keep)
    fy, fx = my / box, mx / box
    ft3 = mft.ft

    def one(r, shift):
        # the object frequency seen at image frequency k' is R^T k'
        ox = r[0, 0] * kx + r[1, 0] * ky
        oy = r[0, 1] * kx + r[1, 1] * ky
        oz = r[0, 2] * kx + r[1, 2] * ky
        c = pad // 2
        val = _trilinear(ft3, oz + c, oy + c, ox + c) * keep_j
        val = val * jnp.exp(-2j * jnp.pi * (fx * shift[0] + fy * shift[1]))
        img = jnp.fft.fftshift(jnp.fft.ifft2(jnp.fft.ifftshift(val))).real
        return img.astype(jnp.float32)

    return jax.jit(jax.vmap(one))


def in_batches(fn, *arrays, size: int = 256) -> np.ndarray:
    """``fn`` over consecutive row blocks of ``arrays`` (bounded memory), concatenated as NumPy."""
    count = len(arrays[0])
    return np.concatenate([np.asarray(fn(*(a[i:i + size] for a in arrays))) for i in range(0, count, size)])


def mirror_x(images) -> np.ndarray:
    """x -> -x about the centre column ``n // 2`` (even n: column i <-> n - i)."""
    images = np.asarray(images)
    n = images.shape[-1]
    return images[..., (n - np.arange(n)) % n]


def apply_ctf_padded(images, params: ctf.CTFParams, pad: int = 2) -> Array:
    """The CTF applied in a ``pad`` times larger zero-filled box, then cropped back (as in a real extraction: the
    signal the CTF delocalises beyond the box is lost, and no wrap-around brings it back in)."""
    images = jnp.asarray(images, jnp.float32)
    n = images.shape[-1]
    lo = (pad - 1) * n // 2
    hi = (pad - 1) * n - lo
    padded = jnp.pad(images, ((0, 0), (lo, hi), (lo, hi)))
    return ctf.apply_ctf(padded, params)[:, lo:lo + n, lo:lo + n]


def random_views(key: Array, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(rot, tilt, psi)`` ``(n,)`` degrees, float64: viewing directions uniform on the sphere (tilt = arccos of a
    uniform [-1, 1]) and uniform in-plane angles."""
    k1, k2, k3 = jax.random.split(key, 3)
    rot = np.asarray(jax.random.uniform(k1, (n,), maxval=360.0), np.float64)
    tilt = np.degrees(np.arccos(np.asarray(jax.random.uniform(k2, (n,), minval=-1.0, maxval=1.0), np.float64)))
    psi = np.asarray(jax.random.uniform(k3, (n,), maxval=360.0), np.float64)
    return rot, tilt, psi


class MapParticles(NamedTuple):
    """Particles simulated from a map, with the truth kept aside (``simulate_from_map``).

    images: ``(n, box, box)`` float32, the noisy CTF-modulated particles.
    rot, tilt, psi: ``(n,)`` float64 RELION Euler angles in degrees (NaN for junk).
    shift_x, shift_y: ``(n,)`` px, where the particle's centre lies relative to the box centre (RELION's
        rlnOriginX/Y = minus these, in px; NaN for junk).
    ctf: per-particle ``ctf.CTFParams`` (RELION conventions: DefocusU/V in A, underfocus positive, angle in deg).
    is_junk: ``(n,)`` bool; junk_kind: ``(n,)`` int8 (``JUNK_NONE``, ``JUNK_ICE``, ``JUNK_AGGREGATE``).
    noise_sigma: the white noise's standard deviation (the same for every image).
    pixel_size: A/px of the images.
    """

    images: Array
    rot: np.ndarray
    tilt: np.ndarray
    psi: np.ndarray
    shift_x: np.ndarray
    shift_y: np.ndarray
    ctf: ctf.CTFParams
    is_junk: np.ndarray
    junk_kind: np.ndarray
    noise_sigma: float
    pixel_size: float


def simulate_from_map(mft: MapFT, n: int, key: Array, snr: float, box: int = 64, pixel_size: float = 6.0,
                      radius: float = 23.0, max_shift: float = 2.0, defocus_range=(10000.0, 30000.0),
                      max_astigmatism: float = 500.0, ice_fraction: float = 0.0,
                      aggregate_fraction: float = 0.0, voltage_kv: float = 300.0, cs_mm: float = 2.7,
                      amplitude_contrast: float = 0.1, batch: int = 256) -> MapParticles:
    """Realistic particles from a map: random views on the sphere, CTF, shifts, white noise, optional junk.

    Each true particle is the projection (``map_projector``) at random RELION angles (``random_views``), its centre
    shifted uniformly within ``+-max_shift`` px in x and y, modulated by its CTF in a 2x padded box
    (``apply_ctf_padded``; defocus U uniform in ``defocus_range`` A, V = U minus up to ``max_astigmatism`` A, a
    random astigmatism angle; 300 kV, Cs 2.7 mm, 10 % amplitude contrast by default). One noise level for the
    whole stack: ``snr`` = the mean over true particles of the CTF-modulated signal's variance inside the disc of
    ``radius`` px, over the noise variance (per-image SNRs vary with the view, as in real data).

    Junk, at exact counts ``round(ice_fraction n)`` and ``round(aggregate_fraction n)``, placed at random rows:
    empty ice is the noise alone (no background: a pick on empty ice of a clean micrograph, at the particles'
    noise level); an aggregate is two to four projections at independent random views, their centres at random
    offsets up to ``radius`` px from the box centre, summed, CTF-modulated and noised like a particle.

    Randomness: ``jax.random.split(key, 8)``, one sub-key per draw, so the same key gives the same stack.
    """
    if not 0 <= ice_fraction + aggregate_fraction <= 1:
        raise ValueError(f"ice_fraction + aggregate_fraction must be in [0, 1] (got {ice_fraction}, "
                         f"{aggregate_fraction})")
    if snr <= 0:
        raise ValueError(f"snr must be > 0 (got {snr})")
    keys = jax.random.split(key, 8)
    n_ice, n_agg = int(round(ice_fraction * n)), int(round(aggregate_fraction * n))
    kind = np.zeros(n, np.int8)
    order = np.asarray(jax.random.permutation(keys[0], n))
    kind[order[:n_ice]] = JUNK_ICE
    kind[order[n_ice:n_ice + n_agg]] = JUNK_AGGREGATE
    good = kind == JUNK_NONE

    rot, tilt, psi = random_views(keys[1], n)
    shifts = np.asarray(jax.random.uniform(keys[2], (n, 2), minval=-max_shift, maxval=max_shift), np.float64)
    kd = jax.random.split(keys[3], 3)
    du = np.asarray(jax.random.uniform(kd[0], (n,), minval=defocus_range[0], maxval=defocus_range[1]), np.float64)
    dv = du - np.asarray(jax.random.uniform(kd[1], (n,), maxval=max_astigmatism), np.float64)
    dang = np.asarray(jax.random.uniform(kd[2], (n,), maxval=180.0), np.float64)
    params = ctf.make_ctf_params(du, dv, dang, voltage_kv, cs_mm, amplitude_contrast, 0.0, pixel_size)

    project = map_projector(mft, box, pixel_size)
    mats = euler_to_matrix(rot, tilt, psi).astype(np.float32)
    clean = np.zeros((n, box, box), np.float32)
    if good.any():
        clean[good] = in_batches(project, mats[good], shifts[good].astype(np.float32), size=batch)
    if n_agg:
        agg = np.flatnonzero(kind == JUNK_AGGREGATE)
        ka = jax.random.split(keys[4], 3)
        parts = np.asarray(jax.random.randint(ka[0], (n_agg,), 2, 5))  # two to four projections
        r2, t2, p2 = random_views(ka[1], 4 * n_agg)
        # offsets uniform in the disc of `radius` px
        ko = jax.random.split(ka[2], 2)
        rad = radius * np.sqrt(np.asarray(jax.random.uniform(ko[0], (4 * n_agg,)), np.float64))
        ang = 2 * np.pi * np.asarray(jax.random.uniform(ko[1], (4 * n_agg,)), np.float64)
        offs = np.stack([rad * np.cos(ang), rad * np.sin(ang)], -1).astype(np.float32)
        pieces = in_batches(project, euler_to_matrix(r2, t2, p2).astype(np.float32), offs, size=batch)
        pieces = pieces.reshape(n_agg, 4, box, box)
        used = np.arange(4)[None, :] < parts[:, None]
        clean[agg] = np.einsum("akyx,ak->ayx", pieces, used.astype(np.float32))
    modulated = in_batches(lambda im, *f: apply_ctf_padded(im, ctf.CTFParams(*f)), clean,
                           *[np.asarray(f) for f in params], size=batch)
    modulated[kind == JUNK_ICE] = 0.0
    disc = filters.circular_mask(box, box, radius).astype(np.float32)
    count = disc.sum()
    sig = modulated[good]
    mean = (sig * disc).sum((-2, -1), keepdims=True) / count
    signal_var = float(np.mean((((sig - mean) ** 2) * disc).sum((-2, -1)) / count)) if good.any() else 1.0
    sigma = float(np.sqrt(signal_var / snr))
    noise = np.asarray(jax.random.normal(keys[5], (n, box, box), jnp.float32))
    images = jnp.asarray(modulated + sigma * noise, jnp.float32)

    nan = np.where(good, 1.0, np.nan)
    return MapParticles(images, rot * nan, tilt * nan, psi * nan, shifts[:, 0] * nan, shifts[:, 1] * nan, params,
                        ~good, kind, sigma, float(pixel_size))

