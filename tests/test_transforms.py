"""The transform convention, pinned against 3x3 matrices, image resampling and RELION's forward model."""

import jax.numpy as jnp
import numpy as np
import pytest

from jisac import filters
from jisac import transforms as T
from tests import reference_numpy as ref


def random_params(n, seed, max_shift=3.0):
    rng = np.random.default_rng(seed)
    return (
        rng.uniform(-180, 360, n),
        rng.uniform(-max_shift, max_shift, n),
        rng.uniform(-max_shift, max_shift, n),
        rng.integers(0, 2, n).astype(bool),
    )


def smooth(image):
    """Low-passed image: two bilinear passes blur fine detail more than one (measured: the residual falls with
    the cutoff), which is not what these tests are about; a wrong sign or order moves whole features."""
    return np.asarray(filters.tanh_lowpass(jnp.asarray(image), 0.06, 0.05), np.float64)


def matrices(p: T.Transform2D):
    return np.asarray(T.to_matrix(p), np.float64)


def test_to_matrix_matches_definition():
    a, sx, sy, m = random_params(20, 0)
    got = matrices(T.make_transform(a, sx, sy, m))
    want = np.stack([ref.matrix(*args) for args in zip(a, sx, sy, m)])
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_compose_is_matrix_product():
    p1 = T.make_transform(*random_params(200, 1))
    p2 = T.make_transform(*random_params(200, 2))
    got = matrices(T.compose(p1, p2))
    want = matrices(p2) @ matrices(p1)  # apply p1, then p2
    np.testing.assert_allclose(got, want, atol=2e-5)
    # every mirror combination is present
    assert len({(bool(a), bool(b)) for a, b in zip(p1.mirror, p2.mirror)}) == 4


def test_inverse_is_matrix_inverse():
    p = T.make_transform(*random_params(200, 3))
    np.testing.assert_allclose(matrices(T.inverse(p)), np.linalg.inv(matrices(p)), atol=2e-5)
    ident = T.compose(p, T.inverse(p))
    np.testing.assert_allclose(matrices(ident), np.broadcast_to(np.eye(3), (200, 3, 3)), atol=2e-5)


def test_angles_are_wrapped():
    p = T.compose(T.make_transform(350.0), T.make_transform(20.0))
    assert float(p.angle) == pytest.approx(10.0, abs=1e-4)
    assert 0.0 <= float(T.wrap_angle(jnp.float32(-1e-9))) < 360.0


def test_apply_transform_matches_reference_sampling(structured_image):
    a, sx, sy, m = random_params(4, 4)
    got = np.asarray(T.apply_transform(jnp.broadcast_to(structured_image, (4, 76, 76)), T.make_transform(a, sx, sy, m)))
    inner = np.hypot(*np.meshgrid(np.arange(76) - 38, np.arange(76) - 38)) < 30
    for i in range(4):
        want = ref.apply_transform(structured_image.astype(np.float64), a[i], sx[i], sy[i], m[i])
        np.testing.assert_allclose(got[i][inner], want[inner], atol=1e-4 * np.abs(want).max())


def test_apply_moves_a_point_to_its_image():
    """A blob at v ends up at T(v): pins the direction of rotation, shift and mirror on real pixels."""
    n = 64
    y, x = np.mgrid[:n, :n] - n // 2
    v = np.array([9.0, -5.0])
    blob = np.exp(-((x - v[0]) ** 2 + (y - v[1]) ** 2) / (2 * 1.5**2)).astype(np.float32)
    for args in [(30.0, 2.0, -1.0, False), (-75.0, -3.0, 2.5, True), (200.0, 0.0, 0.0, True)]:
        out = np.asarray(T.apply_transform(jnp.asarray(blob), T.make_transform(*args)))
        centroid = np.array([(out * x).sum(), (out * y).sum()]) / out.sum()
        expected = ref.matrix(*args) @ np.array([v[0], v[1], 1.0])
        np.testing.assert_allclose(centroid, expected[:2], atol=0.05)


def test_apply_then_apply_equals_compose(structured_image):
    rng = np.random.default_rng(5)
    img = jnp.asarray(smooth(structured_image))
    inner = np.hypot(*np.meshgrid(np.arange(76) - 38, np.arange(76) - 38)) < 26
    for _ in range(4):
        p1 = T.make_transform(rng.uniform(0, 360), *rng.uniform(-2, 2, 2), rng.integers(0, 2))
        p2 = T.make_transform(rng.uniform(0, 360), *rng.uniform(-2, 2, 2), rng.integers(0, 2))
        twice = np.asarray(T.apply_transform(T.apply_transform(img, p1), p2))
        once = np.asarray(T.apply_transform(img, T.compose(p1, p2)))
        wrong_order = np.asarray(T.apply_transform(img, T.compose(p2, p1)))
        scale = np.ptp(np.asarray(img))
        assert np.abs(twice - once)[inner].max() < 0.01 * scale
        assert np.abs(twice - wrong_order)[inner].max() > 0.1 * scale  # the check can fail


@pytest.mark.parametrize("mirror", [False, True])
def test_particle_centre_is_where_the_particle_sits(mirror):
    p = T.make_transform(40.0, 3.0, -2.0, mirror)  # aligned image = raw rotated, shifted (and mirrored)
    cx, cy = T.particle_centre(p)
    # T(c) must be the box centre
    mapped = ref.matrix(40.0, 3.0, -2.0, mirror) @ np.array([float(cx), float(cy), 1.0])
    np.testing.assert_allclose(mapped[:2], 0.0, atol=1e-5)
    # the polar search's report of a rotation about c has its centre at c
    back = T.particle_centre(T.from_centre_and_angle(cx, cy, 75.0, mirror))
    np.testing.assert_allclose([float(back[0]), float(back[1])], [float(cx), float(cy)], atol=1e-5)


def test_from_centre_and_angle_is_compose():
    rng = np.random.default_rng(6)
    c = rng.uniform(-3, 3, (50, 2))
    a = rng.uniform(0, 360, 50)
    m = rng.integers(0, 2, 50).astype(bool)
    got = T.from_centre_and_angle(c[:, 0], c[:, 1], a, m)
    want = T.compose(T.make_transform(0.0, -c[:, 0], -c[:, 1], False), T.make_transform(a, 0.0, 0.0, m))
    np.testing.assert_allclose(matrices(got), matrices(want), atol=2e-5)


# ------------------------------------------------------------------------------------------------- RELION


def relion_forward(reference, psi, origin_x_px, origin_y_px):
    """RELION's model of a particle, written out independently: the reference rotated by ``A(psi)`` and shifted
    by ``-origin`` (``particle(u) = ref(A^T (u + o))``, A = Euler_angles2matrix(0, 0, psi) = [[c, s], [-s, c]],
    projector samples at ``A^-1 u``)."""
    n = reference.shape[0]
    y, x = np.mgrid[:n, :n].astype(np.float64) - n // 2
    c, s = np.cos(np.deg2rad(psi)), np.sin(np.deg2rad(psi))
    a_t = np.array([[c, -s], [s, c]])
    ux, uy = x + origin_x_px, y + origin_y_px
    src_x = a_t[0, 0] * ux + a_t[0, 1] * uy
    src_y = a_t[1, 0] * ux + a_t[1, 1] * uy
    return ref.bilinear(reference, src_x + n // 2, src_y + n // 2)


def test_relion_conversion_against_relion_forward_model(structured_image):
    img = smooth(structured_image)
    inner = np.hypot(*np.meshgrid(np.arange(76) - 38, np.arange(76) - 38)) < 26
    pixel = 1.7
    for psi, ox, oy in [(30.0, 2.0, -1.5), (-120.0, -3.0, 0.5), (175.0, 0.0, 2.0)]:
        particle = relion_forward(img, psi, ox, oy)
        p = T.from_relion(psi, ox * pixel, oy * pixel, False, pixel_size_angst=pixel)
        aligned = np.asarray(T.apply_transform(jnp.asarray(particle, jnp.float32), p))
        assert np.abs(aligned - img)[inner].max() < 0.01 * np.ptp(img)
        # the opposite psi sign must not fit (the check can fail)
        wrong = np.asarray(T.apply_transform(jnp.asarray(particle, jnp.float32), T.from_relion(-psi, ox, oy)))
        assert np.abs(wrong - img)[inner].max() > 0.1 * np.ptp(img)
        psi2, ox2, oy2, m2 = T.to_relion(p, pixel)
        assert float(psi2) == pytest.approx(psi, abs=1e-3)
        assert float(ox2) == pytest.approx(ox * pixel, abs=1e-4)
        assert float(oy2) == pytest.approx(oy * pixel, abs=1e-4)
        assert not bool(m2)


def test_relion_mirrored_particle_refers_to_mirrored_average(structured_image):
    img = smooth(structured_image)
    mirrored_avg = img[:, ::-1].copy()
    mirrored_avg = np.roll(mirrored_avg, 1, axis=1)  # x -> -x about column n//2 (even n)
    inner = np.hypot(*np.meshgrid(np.arange(76) - 38, np.arange(76) - 38)) < 26
    p = T.make_transform(70.0, 1.5, -2.0, True)
    particle = np.asarray(T.apply_transform(jnp.asarray(img, jnp.float32), T.inverse(p)), np.float64)
    psi, ox, oy, m = (np.asarray(v) for v in T.to_relion(p, 1.0))
    assert bool(m)
    predicted = relion_forward(mirrored_avg, float(psi), float(ox), float(oy))
    assert np.abs(predicted - particle)[inner].max() < 0.01 * np.ptp(img)


def test_relion_round_trip():
    a, sx, sy, m = random_params(100, 7)
    p = T.make_transform(a, sx, sy, m)
    back = T.from_relion(*T.to_relion(p, 1.3), pixel_size_angst=1.3)
    np.testing.assert_allclose(matrices(back), matrices(p), atol=2e-5)
