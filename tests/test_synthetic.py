"""The synthetic phantom: exact projection integrals and the in-plane angle convention."""

import jax.numpy as jnp
import numpy as np
import pytest

from jisac import synthetic
from jisac import transforms as T


def test_projection_of_one_blob_integrates_to_its_mass():
    blob = synthetic.Phantom(np.array([[3.0, -2.0, 5.0]]), np.array([2.5]), np.array([1.7]))
    img = np.asarray(synthetic.project(blob, np.eye(3)[None], 48))[0]
    assert img.sum() == pytest.approx(1.7 * (2 * np.pi) ** 1.5 * 2.5**3, rel=1e-4)
    y, x = np.mgrid[:48, :48] - 24
    assert (img * x).sum() / img.sum() == pytest.approx(3.0, abs=1e-3)
    assert (img * y).sum() / img.sum() == pytest.approx(-2.0, abs=1e-3)


def test_euler_psi_is_an_in_plane_rotation_in_jisac_convention(phantom):
    """Projecting with psi equals rotating the psi = 0 projection by psi (transforms convention)."""
    m0 = synthetic.euler_to_matrix(30.0, 60.0, 0.0)
    m1 = synthetic.euler_to_matrix(30.0, 60.0, 40.0)
    p0, p1 = np.asarray(synthetic.project(phantom, np.stack([m0, m1]), 76))
    rotated = np.asarray(T.apply_transform(jnp.asarray(p0), T.make_transform(40.0)))
    inner = np.hypot(*np.meshgrid(np.arange(76) - 38, np.arange(76) - 38)) < 30
    assert np.abs(rotated - p1)[inner].max() < 0.05 * np.ptp(p1)
    assert np.allclose(synthetic.euler_to_matrix(10, 20, 30) @ synthetic.euler_to_matrix(10, 20, 30).T, np.eye(3))


def test_phantom_is_deterministic_and_views_differ(projections50):
    a, b = synthetic.make_phantom(seed=3), synthetic.make_phantom(seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    flat = projections50.reshape(50, -1)
    flat = (flat - flat.mean(1, keepdims=True)) / np.linalg.norm(flat, axis=1, keepdims=True)
    c = flat @ flat.T
    np.fill_diagonal(c, 0)
    assert c.max() < 0.99


def test_noise_has_the_requested_snr():
    import jax

    img = jnp.asarray(np.random.default_rng(0).standard_normal((4, 64, 64)), jnp.float32) * 2.0
    noisy = synthetic.add_noise(img, 0.25, jax.random.key(0))
    noise = np.asarray(noisy - img)
    assert noise.var() == pytest.approx(4.0 / 0.25, rel=0.05)
