"""Tangent low-pass, Fourier shift and masks against analytic values."""

import jax.numpy as jnp
import numpy as np
import pytest

from jisac import filters


def gaussian(n, cx, cy, sigma):
    y, x = np.mgrid[:n, :n] - n // 2
    return np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2)).astype(np.float32)


def test_tanh_response_values():
    f = np.array([0.0, 0.2, 0.45])
    h = np.asarray(filters.tanh_lowpass_response(f, 0.2, 0.2))
    assert h[0] == pytest.approx(np.tanh(np.pi / 2 / 0.2 / 0.2 * 0.2), rel=1e-6)  # ~1
    assert h[1] == pytest.approx(0.5 * np.tanh(np.pi / (2 * 0.2 * 0.2) * 0.4), rel=1e-6)  # ~0.5 at the cutoff
    assert h[2] < 0.01
    with pytest.raises(ValueError, match="cutoff"):
        filters.tanh_lowpass_response(f, 0.0, 0.1)


def test_tanh_lowpass_removes_high_and_keeps_low_frequencies():
    n = 64
    y, x = np.mgrid[:n, :n]
    f_low, f_high = 3 / n, 26 / n  # on the FFT grid: no leakage
    low = np.cos(2 * np.pi * f_low * x)
    high = np.cos(2 * np.pi * f_high * x)
    out = np.asarray(filters.tanh_lowpass(jnp.asarray(np.stack([low, high]), jnp.float32), 0.2, 0.05))
    h_low = float(filters.tanh_lowpass_response(np.array(f_low), 0.2, 0.05))
    np.testing.assert_allclose(out[0], h_low * low, atol=1e-4)
    assert np.abs(out[1]).max() < 1e-3


def test_fourier_shift_integer_is_roll_and_subpixel_moves_centroid():
    img = gaussian(48, 0, 0, 3.0)
    np.testing.assert_allclose(
        np.asarray(filters.fourier_shift(jnp.asarray(img), 3, -2)), np.roll(img, (-2, 3), (0, 1)), atol=1e-5
    )
    moved = np.asarray(filters.fourier_shift(jnp.asarray(img), 1.3, 0.6))
    np.testing.assert_allclose(moved, gaussian(48, 1.3, 0.6, 3.0), atol=1e-4)
    twice = filters.fourier_shift(filters.fourier_shift(jnp.asarray(img), 0.4, 0.2), 0.9, 0.4)
    np.testing.assert_allclose(np.asarray(twice), moved, atol=1e-4)


def test_fourier_shift_batches_with_per_image_shifts():
    img = jnp.asarray(np.stack([gaussian(32, 0, 0, 2.0)] * 3))
    out = np.asarray(filters.fourier_shift(img, jnp.array([0.0, 1.0, -0.5]), jnp.array([0.0, 0.5, 2.0])))
    for o, (sx, sy) in zip(out, [(0, 0), (1, 0.5), (-0.5, 2)]):
        np.testing.assert_allclose(o, gaussian(32, sx, sy, 2.0), atol=1e-4)


def test_masks_and_masked_normalisation():
    m = filters.circular_mask(76, 76, 29)
    assert m[38, 38] and m[38, 38 + 29] and not m[38, 38 + 30]
    assert abs(m.sum() - np.pi * 29**2) < 0.02 * np.pi * 29**2
    rng = np.random.default_rng(0)
    imgs = jnp.asarray(rng.standard_normal((2, 76, 76)) * 5 + 3, jnp.float32)
    out = np.asarray(filters.normalize_in_mask(imgs, m))
    np.testing.assert_allclose(out[:, m].mean(1), 0, atol=1e-5)
    np.testing.assert_allclose(out[:, m].std(1), 1, atol=1e-4)
    sub = np.asarray(filters.subtract_masked_mean(imgs, m))
    np.testing.assert_allclose(sub[:, m].mean(1), 0, atol=1e-4)
    np.testing.assert_allclose(sub[:, m].std(1), np.asarray(imgs)[:, m].std(1), rtol=1e-5)
    soft = filters.soft_circular_mask(76, 76, 29, width=3.0)
    assert soft.dtype == np.float32 and (soft[m] == 1).all()  # 1 inside, as the hard mask
    np.testing.assert_allclose(soft[38, 38 + 30 : 38 + 33], 0.5 * (1 + np.cos(np.pi * np.arange(1, 4) / 3)), atol=1e-6)
    assert (soft[38, 38 + 32 :] == 0).all() and soft[0, 0] == 0
