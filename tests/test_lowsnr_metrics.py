"""experiments/lowsnr/metrics.py on tiny hand-made cases (no map needed)."""

import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from jisac import synthetic
from jisac import transforms as T

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments" / "lowsnr"))
import metrics as M  # noqa: E402


def _euler_of(m: np.ndarray):
    """RELION (rot, tilt, psi) degrees of rotation matrices ``(n, 3, 3)`` (tilt in (0, 180))."""
    tilt = np.degrees(np.arccos(np.clip(m[:, 2, 2], -1, 1)))
    rot = np.degrees(np.arctan2(m[:, 2, 1], m[:, 2, 0]))
    psi = np.degrees(np.arctan2(m[:, 1, 2], -m[:, 0, 2]))
    return rot, tilt, psi


def test_euler_helper_inverts_euler_to_matrix():
    rot, tilt, psi = np.array([10.0, -120.0]), np.array([40.0, 130.0]), np.array([70.0, -20.0])
    back = _euler_of(synthetic.euler_to_matrix(rot, tilt, psi))
    assert np.allclose(back, (rot, tilt, psi))


def test_identical_views_have_zero_spread_and_opposite_views_count_as_the_same():
    d = M.view_directions(np.array([30.0, 30.0, 210.0]), np.array([50.0, 50.0, 130.0]))  # the third: -first
    assert np.allclose(d[2], -d[0])
    labels = np.array([1, 1, 1])
    assert M.class_spreads(d, labels)[1] == pytest.approx(0.0, abs=1e-5)
    assert M.purity(d, labels) == 1.0


def test_spread_of_a_known_class():
    """Views at 10 deg on either side of the pole: the axial mean is the pole, the spread 10 deg."""
    d = M.view_directions(np.array([0.0, 180.0, 90.0, 270.0]), np.full(4, 10.0))
    assert M.class_spreads(d, np.ones(4, int))[1] == pytest.approx(10.0, abs=1e-6)


def test_ideal_partition_recovers_tight_clusters():
    """Three clusters of 20 views (within 3 deg of three directions 60+ deg apart, some seen from the opposite
    side) split into three equal classes: each class is one cluster."""
    rng = np.random.default_rng(0)
    centres = [(0.0, 10.0), (0.0, 80.0), (120.0, 80.0)]
    rot = np.concatenate([c[0] + rng.uniform(-3, 3, 20) for c in centres])
    tilt = np.concatenate([c[1] + rng.uniform(-2, 2, 20) for c in centres])
    truth = np.repeat([1, 2, 3], 20)
    d = M.view_directions(rot, tilt)
    d[::3] *= -1  # opposite sides: the same 2D view
    labels = M.ideal_partition(d, 3)
    assert sorted(np.bincount(labels)[1:]) == [20, 20, 20]
    for c in (1, 2, 3):
        assert len(np.unique(truth[labels == c])) == 1
    assert M.mean_spread(d, labels) < 3.0
    mixed = np.tile([1, 2, 3], 20)
    assert M.mean_spread(d, mixed) > 10 * M.mean_spread(d, labels)


def test_purity_counts_junk_as_impure():
    d = M.view_directions(np.array([0.0, 0.0, np.nan, 90.0]), np.array([0.0, 5.0, np.nan, 90.0]))
    assert M.purity(d, np.array([1, 1, 1, 1])) == pytest.approx(0.5)  # the junk and the 90-deg view are out
    assert np.isnan(M.purity(d, np.zeros(4, int)))


@pytest.fixture(scope="module")
def projector():
    """An asymmetric two-blob map projected into 32 px."""
    z, y, x = np.mgrid[:24, :24, :24] - 12
    vol = (np.exp(-((x - 4) ** 2 + y**2 + (z - 1) ** 2) / 4.5)
           + 0.6 * np.exp(-((x + 3) ** 2 + (y - 4) ** 2 + (z + 2) ** 2) / 8.0)).astype(np.float32)
    return synthetic.map_projector(synthetic.fourier_volume(vol, 1.0), 32, 1.0)


def test_truth_transforms_map_the_class_reference_onto_each_member(projector):
    """``apply_transform(ref, Q)`` is the member's projection, for members seen from the class's side at any psi and
    from the opposite side (a mirror image), checked on actual projections."""
    frame = synthetic.euler_to_matrix(40.0, 60.0, 0.0)
    flip = np.diag([1.0, -1.0, -1.0])
    phis = np.array([0.0, 35.0, 200.0, 80.0, 290.0])
    mats = np.stack([synthetic.euler_to_matrix(0.0, 0.0, p) @ frame for p in phis])
    mats[3:] = flip @ mats[3:]  # the last two look from the opposite side
    rot, tilt, psi = _euler_of(mats)
    q = M.truth_transforms(rot, tilt, psi, frame)
    assert np.array_equal(np.asarray(q.mirror), [False, False, False, True, True])
    zero = np.zeros((len(phis), 2), np.float32)
    members = np.asarray(projector(synthetic.euler_to_matrix(rot, tilt, psi).astype(np.float32), zero))
    ref = np.asarray(projector(frame[None].astype(np.float32), zero[:1]))
    moved = np.asarray(T.apply_transform(jnp.asarray(np.repeat(ref, len(phis), 0)), q))
    for i in range(len(phis)):
        assert np.corrcoef(moved[i].ravel(), members[i].ravel())[0, 1] > 0.99


def test_inplane_error_is_zero_up_to_one_transform_per_class_and_sees_a_wrong_member():
    rng = np.random.default_rng(1)
    n = 12
    labels = np.repeat([1, 2], 6)
    frames = [synthetic.euler_to_matrix(10.0, 30.0, 0.0), synthetic.euler_to_matrix(100.0, 70.0, 0.0)]
    flip = np.diag([1.0, -1.0, -1.0])
    mats = []
    for i in range(n):
        m = synthetic.euler_to_matrix(0.0, 0.0, rng.uniform(0, 360)) @ frames[labels[i] - 1]
        mats.append(flip @ m if i % 3 == 0 else m)
    rot, tilt, psi = _euler_of(np.stack(mats))
    # the alignment a perfect classifier gives: Q^-1 then the class's own arbitrary frame G_c
    params = []
    for c, g in ((1, (33.0, True)), (2, (-70.0, False))):
        idx = labels == c
        q = M.truth_transforms(rot[idx], tilt[idx], psi[idx], M.class_frame(M.view_directions(rot[idx], tilt[idx])))
        gt = T.make_transform(np.full(idx.sum(), g[0]), 0.0, 0.0, np.full(idx.sum(), g[1]))
        params.append(T.compose(T.inverse(q), gt))
    angle = np.concatenate([np.asarray(p.angle) for p in params])
    mirror = np.concatenate([np.asarray(p.mirror) for p in params])
    res = M.inplane_errors(rot, tilt, psi, labels, angle, mirror)
    assert np.nanmax(res["error"]) < 1e-3 and res["mirror_ok"].all()
    wrong = angle.copy()
    wrong[4] += 10.0  # one member of class 1 turned by 10 deg
    res = M.inplane_errors(rot, tilt, psi, labels, wrong, mirror)
    assert res["error"][4] == pytest.approx(10.0 * 5 / 6, abs=0.02)  # the (circular) consensus moved by ~10/6
    assert np.all(res["error"][6:] < 1e-3)
    flipped = mirror.copy()
    flipped[7] = ~flipped[7]
    res = M.inplane_errors(rot, tilt, psi, labels, angle, flipped)
    assert not res["mirror_ok"][7] and res["mirror_ok"].sum() == n - 1


def test_highpass_correlation_prefers_sharp_to_blurred():
    """Self-correlation is 1; a blurred copy of the truth correlates less than a noisy sharp one, although the
    blurred one wins without the high-pass."""
    rng = np.random.default_rng(0)
    n = 64
    y, x = np.mgrid[:n, :n] - n // 2
    truth = np.zeros((n, n))
    for _ in range(12):
        cx, cy = rng.uniform(-15, 15, 2)
        truth += np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * 1.5**2))
    freq = np.hypot(*np.meshgrid(np.fft.fftfreq(n), np.fft.fftfreq(n)))
    blurred = np.real(np.fft.ifft2(np.fft.fft2(truth) * np.exp(-(freq / 0.04) ** 2)))
    sharp = truth + 2.5 * truth.std() * np.random.default_rng(1).standard_normal((n, n))  # noisy, not blurred
    mask = np.hypot(x, y) <= 24
    cutoff = 3.0 / 48
    assert M.highpass_corr(truth, truth, cutoff, mask) == pytest.approx(1.0, abs=1e-9)
    assert M.highpass_corr(blurred, truth, cutoff, mask) < M.highpass_corr(sharp, truth, cutoff, mask)
    assert M.highpass_corr(blurred, truth, 0.0, mask) > M.highpass_corr(sharp, truth, 0.0, mask)
    assert M.best_shift_corr(np.roll(truth, (2, -3), (0, 1)), truth, cutoff, np.ones((n, n))) == pytest.approx(1.0)


def test_best_match_finds_a_turned_mirrored_shifted_view_and_not_its_phase_randomised_copy(projector):
    """A view turned by 36 deg, mirrored and shifted by (2, -1) px is found in a library holding it (correlation
    ~1; 36 is on the 6-deg grid); its phase-randomised copy (same spectrum, no view) scores far lower."""
    rot, tilt = synthetic.hemisphere_directions(6)
    lib = np.asarray(projector(synthetic.euler_to_matrix(rot, tilt, 0.0).astype(np.float32),
                               np.zeros((6, 2), np.float32)))
    moved = np.asarray(T.apply_transform(jnp.asarray(lib[2:3]), T.make_transform(36.0, 2.0, -1.0, True)))
    mask = np.ones((32, 32), np.float32)
    score = M.best_match_corr(moved, lib, 3.0 / 24, mask)
    floor = M.best_match_corr(M.phase_randomised(moved), lib, 3.0 / 24, mask)
    assert score[0] > 0.97 and floor[0] < score[0] - 0.3
