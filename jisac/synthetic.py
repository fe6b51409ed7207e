"""Synthetic data with known truth: a deterministic asymmetric 3D phantom, its projections, noise.

The phantom is a sum of isotropic 3D Gaussians, so its projection along any direction is an exact sum of 2D
Gaussians: no 3D grid, no interpolation, any box size in milliseconds. Used by the tests, the benchmarks and
the demo stack.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

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


def known_view_particles(
    n: int, box: int, radius: float, n_views: int, snr: float, max_shift: float = 1.0, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Noisy particles with known views, for end-to-end tests: ``(particles (n, box, box) float32, view (n,))``.

    Each particle is one of ``n_views`` well-spread projections (``hemisphere_directions``) of a phantom filling
    85 % of ``radius`` px, rotated in plane, shifted by up to ``max_shift`` px and mirrored at random
    (``numpy`` generator ``seed``), plus white noise at ``snr`` (``jax.random.key(seed + 1)``).
    """
    phantom = make_phantom(radius=0.85 * radius, seed=1)
    rot, tilt = hemisphere_directions(n_views)
    views = project(phantom, euler_to_matrix(rot, tilt, 0), box)
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, n_views, n)
    q = T.make_transform(
        rng.uniform(0, 360, n), rng.uniform(-max_shift, max_shift, n), rng.uniform(-max_shift, max_shift, n),
        rng.integers(0, 2, n).astype(bool),
    )
    particles = add_noise(T.apply_transform(views[truth], q), snr, jax.random.key(seed + 1))
    return np.asarray(particles), truth
