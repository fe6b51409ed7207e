"""The synthetic phantom: exact projection integrals and the in-plane angle convention."""

import jax
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


# ------------------------------------------------------------------------------------- particles from a 3D map

def _blob_map(n: int, centre_xyz, sigma: float) -> np.ndarray:
    """A volume (z, y, x) holding one Gaussian blob at ``centre_xyz`` voxels from the centre ``n // 2``."""
    z, y, x = np.mgrid[:n, :n, :n] - n // 2
    cx, cy, cz = centre_xyz
    return np.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * sigma**2)).astype(np.float32)


def _gaussian_2d(box: int, cx: float, cy: float, sigma: float) -> np.ndarray:
    """The analytic line integral along z of the unit-amplitude blob: sqrt(2 pi) sigma exp(-r^2 / 2 sigma^2)."""
    y, x = np.mgrid[:box, :box] - box // 2
    return np.sqrt(2 * np.pi) * sigma * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2))


@pytest.fixture(scope="module")
def blob_projector():
    """A 32^3 map (1 A/px) with one blob at (x, y, z) = (6, 0, 0) voxels, sigma 1.5, projected into 32 px."""
    mft = synthetic.fourier_volume(_blob_map(32, (6.0, 0.0, 0.0), 1.5), 1.0)
    return synthetic.map_projector(mft, 32, 1.0)


@pytest.mark.parametrize("rot, tilt, psi, where", [
    (0, 0, 0, (6, 0)),            # identity: the blob stays at +x
    (90, 0, 0, (0, -6)),          # rot 90: R = Rz(90) maps x to -y (RELION's Rz(a) = [[c, s], [-s, c]])
    (0, 0, 90, (0, -6)),          # psi turns the image the same way
    (0, 90, 0, (0, 0)),           # tilt 90 about y: +x goes to +z, along the beam: the blob lands at the centre
    (0, 60, 0, (3, 0)),           # tilt 60: x -> cos(60) x
    (30, 50, 70, None),           # any angles: where euler_to_matrix puts (6, 0, 0)
])
def test_map_projection_of_a_blob_is_the_analytic_gaussian_at_the_relion_position(blob_projector, rot, tilt, psi,
                                                                                  where):
    """The Fourier-slice projection (2x padded map, trilinear) matches the exact line integral of the blob, at the
    position RELION's rotation puts it (the image sees R x; x = column, y = row), within 2 % of its peak."""
    m = synthetic.euler_to_matrix(rot, tilt, psi)
    if where is None:
        where = tuple(m @ np.array([6.0, 0.0, 0.0]))[:2]
    img = np.asarray(blob_projector(m[None].astype(np.float32), np.zeros((1, 2), np.float32)))[0]
    expected = _gaussian_2d(32, where[0], where[1], 1.5)
    assert np.abs(img - expected).max() < 0.02 * expected.max()
    y, x = np.mgrid[:32, :32] - 16
    near = np.where(np.hypot(x - where[0], y - where[1]) < 4.5, img, 0.0)  # the blob, not the ringing
    centre = ((near * x).sum() / near.sum(), (near * y).sum() / near.sum())
    truth = ((expected * (near != 0) * x).sum() / (expected * (near != 0)).sum(),
             (expected * (near != 0) * y).sum() / (expected * (near != 0)).sum())
    assert centre == pytest.approx(truth, abs=0.05)


def test_map_projection_shift_moves_the_particle_centre(blob_projector):
    """``shifts`` (x, y) px move the content: the blob at +6 x lands at (6 + 2.5, -1.5)."""
    img = np.asarray(blob_projector(np.eye(3, dtype=np.float32)[None], np.array([[2.5, -1.5]], np.float32)))[0]
    expected = _gaussian_2d(32, 8.5, -1.5, 1.5)
    assert np.abs(img - expected).max() < 0.02 * expected.max()


def test_map_projection_at_another_pixel_size_keeps_the_geometry():
    """Particles at 1.5 A/px from a 1 A/px map: the blob 6 A off-centre lands 4 px off, sigma 1 px (values scale
    as sampled: compared after normalising the peak)."""
    mft = synthetic.fourier_volume(_blob_map(32, (6.0, 0.0, 0.0), 1.5), 1.0)
    img = np.asarray(synthetic.map_projector(mft, 24, 1.5)(np.eye(3, dtype=np.float32)[None],
                                                           np.zeros((1, 2), np.float32)))[0]
    expected = _gaussian_2d(24, 4.0, 0.0, 1.0)
    assert np.abs(img / img.max() - expected / expected.max()).max() < 0.03


@pytest.fixture(scope="module")
def small_map():
    """Two blobs (asymmetric), 24^3, taken as 6 A/px, projected at 6 A/px into 24 px."""
    vol = _blob_map(24, (4.0, 0.0, 1.0), 1.5) + 0.7 * _blob_map(24, (-3.0, 3.0, -2.0), 2.0)
    return synthetic.fourier_volume(vol, 6.0)


def _sim(mft, key=0, snr=0.1, **kw):
    return synthetic.simulate_from_map(mft, 60, jax.random.key(key), snr, box=24, pixel_size=6.0, radius=9,
                                       max_shift=2.0, batch=64, **kw)


def test_simulate_from_map_meets_the_snr_definition(small_map):
    """SNR = mean over true particles of the CTF-modulated signal's variance inside the particle disc, over the
    noise variance: exact for the sigma used (the noise is recovered from two SNRs with the same key), and the
    noise drawn has that variance within 3 % (24 x 24 x 60 samples: sampling error ~0.5 %)."""
    a, b = _sim(small_map, snr=0.1), _sim(small_map, snr=0.4)
    noise = (np.asarray(a.images) - np.asarray(b.images)) / (a.noise_sigma - b.noise_sigma)
    signal = np.asarray(a.images) - a.noise_sigma * noise
    disc = np.hypot(*np.meshgrid(np.arange(24) - 12, np.arange(24) - 12)) <= 9
    pix = signal[:, disc]
    var = np.mean(pix.var(axis=1))
    assert var / a.noise_sigma**2 == pytest.approx(0.1, rel=1e-3)
    assert noise.var() == pytest.approx(1.0, rel=0.03)
    assert a.noise_sigma / b.noise_sigma == pytest.approx(2.0, rel=1e-5)


def test_simulate_from_map_junk_counts_labels_and_truth(small_map):
    sim = _sim(small_map, ice_fraction=0.2, aggregate_fraction=0.1)
    kind = sim.junk_kind
    assert (kind == synthetic.JUNK_ICE).sum() == 12 and (kind == synthetic.JUNK_AGGREGATE).sum() == 6
    assert np.array_equal(sim.is_junk, kind != synthetic.JUNK_NONE)
    for field in (sim.rot, sim.tilt, sim.psi, sim.shift_x, sim.shift_y):
        assert np.isnan(field[sim.is_junk]).all() and np.isfinite(field[~sim.is_junk]).all()
    assert np.abs(sim.shift_x[~sim.is_junk]).max() <= 2.0
    # empty ice is the noise alone: its pixel variance is the noise variance (24 x 24 x 12 samples)
    ice = np.asarray(sim.images)[kind == synthetic.JUNK_ICE]
    assert ice.var() == pytest.approx(sim.noise_sigma**2, rel=0.05)
    # RELION defocus convention: U >= V, both in Angstrom within the drawn range
    du, dv = np.asarray(sim.ctf.defocus_u_angst), np.asarray(sim.ctf.defocus_v_angst)
    assert (du >= dv).all() and du.min() >= 10000 and du.max() <= 30000 and (du - dv).max() <= 500


def test_simulate_from_map_same_key_same_stack(small_map):
    a, b, c = _sim(small_map, key=3), _sim(small_map, key=3), _sim(small_map, key=4)
    assert np.array_equal(np.asarray(a.images), np.asarray(b.images)) and np.array_equal(a.rot, b.rot)
    assert not np.array_equal(np.asarray(a.images), np.asarray(c.images))


def test_random_views_are_uniform_on_the_sphere():
    """cos(tilt) uniform in [-1, 1]: a quarter of the views within 60 deg of each pole (exact fraction 1/4)."""
    _, tilt, _ = synthetic.random_views(jax.random.key(0), 20000)
    near = np.mean(np.cos(np.deg2rad(tilt)) > 0.5)
    assert near == pytest.approx(0.25, abs=0.015)
