"""Data layer: Synthetic data with known truth: a deterministic asymmetric 3D phantom, its projections, noise.

The phantom is a sum of isotropic 3D Gaussians, so its projection along any direction is an exact sum of 2D
Gaussians: no 3D grid, no interpolation, any box size in milliseconds. Used by the tests, the benchmarks and
the demo stack.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jisac import ctf
from jisac import transforms as T

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
