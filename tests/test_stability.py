"""The pixel-error stability test on hand-made parameter sets with known answers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jisac import stability
from jisac import transforms as T

RADIUS = 29.0
THRESHOLD = 0.7


def consistent_runs(n, n_runs, seed, noise_deg=0.0, noise_px=0.0, mirror_flip_runs=()):
    """Run L-1 holds the true parameters P_i; run j holds compose(P_i, inverse(G_j)) for a random global G_j,
    i.e. the same alignment seen from another frame (what independent reference-free alignments give)."""
    rng = np.random.default_rng(seed)
    truth = T.make_transform(
        rng.uniform(0, 360, n), rng.uniform(-2, 2, n), rng.uniform(-2, 2, n), rng.integers(0, 2, n).astype(bool)
    )
    runs = []
    for j in range(n_runs - 1):
        g = T.make_transform(rng.uniform(0, 360), *rng.uniform(-3, 3, 2), j in mirror_flip_runs)
        p = T.compose(truth, T.inverse(g))
        p = p._replace(
            angle=p.angle + rng.normal(0, noise_deg, n).astype(np.float32),
            shift_x=p.shift_x + rng.normal(0, noise_px, n).astype(np.float32),
            shift_y=p.shift_y + rng.normal(0, noise_px, n).astype(np.float32),
        )
        runs.append(p)
    runs.append(truth)
    return jax.tree.map(lambda *a: jnp.stack(a), *runs), truth


def error_numpy(runs, corr_deg, radius):
    """Float64 transcription of the pixel-error formula (isac_algorithm.md §9 step 3)."""
    a = np.deg2rad(np.asarray(runs.angle, np.float64))
    m = np.asarray(runs.mirror)
    x, y = np.asarray(runs.shift_x, np.float64), np.asarray(runs.shift_y, np.float64)
    g = np.deg2rad(corr_deg[0])[:, None]
    tx, ty = corr_deg[1][:, None], corr_deg[2][:, None]
    theta = np.where(m, a - g, a + g)
    big_x = np.where(m, -tx + x * np.cos(g) - y * np.sin(g), tx + x * np.cos(g) + y * np.sin(g))
    big_y = np.where(m, ty + x * np.sin(g) + y * np.cos(g), ty - x * np.sin(g) + y * np.cos(g))
    res = np.abs(np.exp(1j * theta).mean(0))
    return np.sqrt(np.maximum(radius**2 * (1 - res) + big_x.var(0) + big_y.var(0), 0))


def test_perfectly_consistent_class_is_all_stable():
    runs, truth = consistent_runs(40, 5, seed=0, mirror_flip_runs=(1,))
    res = stability.pixel_error_stability(runs, jnp.ones(40, bool), THRESHOLD, RADIUS)
    assert bool(res.stable.all())
    assert float(res.mirror_rate) == 1.0
    assert float(jnp.max(res.error)) < 0.05
    # averaged parameters are run L-1's (the truth)
    err = np.abs((np.asarray(res.params.angle) - np.asarray(truth.angle) + 180) % 360 - 180)
    assert err.max() < 0.05
    np.testing.assert_allclose(np.asarray(res.params.shift_x), np.asarray(truth.shift_x), atol=0.02)
    np.testing.assert_array_equal(np.asarray(res.params.mirror), np.asarray(truth.mirror))


def test_random_angles_are_not_stable():
    rng = np.random.default_rng(1)
    n, n_runs = 40, 5
    runs = T.make_transform(
        rng.uniform(0, 360, (n_runs, n)), rng.uniform(-1, 1, (n_runs, n)), rng.uniform(-1, 1, (n_runs, n)),
        np.zeros((n_runs, n), bool),
    )
    res = stability.pixel_error_stability(runs, jnp.ones(n, bool), THRESHOLD, RADIUS)
    assert not bool(res.stable.any())
    assert float(res.error_before_pruning) > 10.0


def test_noisy_class_splits_by_error_and_matches_formula():
    runs, _ = consistent_runs(60, 4, seed=2, noise_deg=0.3, noise_px=0.1)
    # make 10 members wildly inconsistent in one run
    angle = np.asarray(runs.angle).copy()
    angle[0, :10] += 60.0
    runs = runs._replace(angle=jnp.asarray(angle))
    res = stability.pixel_error_stability(runs, jnp.ones(60, bool), THRESHOLD, RADIUS)
    stable = np.asarray(res.stable)
    assert not stable[:10].any()
    assert stable[10:].mean() > 0.9
    # the reported errors are the formula evaluated at the reported corrections
    want = error_numpy(runs, np.asarray(res.corrections, np.float64), RADIUS)
    np.testing.assert_allclose(np.asarray(res.error), want, rtol=1e-3, atol=1e-3)


def test_a_subset_of_runs_by_mask_is_the_test_on_those_runs_alone():
    """``included`` (one compiled program for every subset, as stability=consensus uses it) gives the test on the
    chosen runs alone: the same stable set, errors (and the float64 formula on those runs) and averaged
    parameters; the runs left out, here wildly inconsistent, have no effect and NaN corrections."""
    runs, _ = consistent_runs(60, 5, seed=3, noise_deg=0.4, noise_px=0.15, mirror_flip_runs=(0,))
    rng = np.random.default_rng(4)
    lost = jax.tree.map(lambda a: np.asarray(a).copy(), runs)
    for j in (1, 3):  # two runs that did not converge
        lost.angle[j] = rng.uniform(0, 360, 60)
        lost.mirror[j] = rng.integers(0, 2, 60).astype(bool)
    lost = jax.tree.map(jnp.asarray, lost)
    kept = [0, 2, 4]
    alone = stability.pixel_error_stability(jax.tree.map(lambda a: a[np.array(kept)], lost), jnp.ones(60, bool),
                                            THRESHOLD, RADIUS)
    masked = stability.pixel_error_stability(lost, jnp.ones(60, bool), THRESHOLD, RADIUS,
                                             included=jnp.array([True, False, True, False, True]))
    assert np.asarray(alone.stable).mean() > 0.9
    np.testing.assert_array_equal(np.asarray(masked.stable), np.asarray(alone.stable))
    np.testing.assert_allclose(np.asarray(masked.error), np.asarray(alone.error), atol=1e-3)
    corrections = np.asarray(masked.corrections, np.float64)
    assert np.isnan(corrections[:, [1, 3]]).all()
    want = error_numpy(jax.tree.map(lambda a: a[np.array(kept)], lost), corrections[:, kept], RADIUS)
    np.testing.assert_allclose(np.asarray(masked.error), want, rtol=1e-3, atol=1e-3)
    d_angle = (np.asarray(masked.params.angle) - np.asarray(alone.params.angle) + 180) % 360 - 180
    assert np.abs(d_angle).max() < 0.01
    np.testing.assert_allclose(np.asarray(masked.params.shift_x), np.asarray(alone.params.shift_x), atol=1e-3)
    every = stability.pixel_error_stability(lost, jnp.ones(60, bool), THRESHOLD, RADIUS)
    assert not np.asarray(every.stable).any()  # ISAC2's test on all five runs: the lost runs sink the class


def test_mirror_inconsistent_members_are_excluded():
    runs, _ = consistent_runs(30, 5, seed=3)
    mirror = np.asarray(runs.mirror).copy()
    mirror[2, :4] = ~mirror[2, :4]  # 4 members flip mirror in one run only
    runs = runs._replace(mirror=jnp.asarray(mirror))
    res = stability.pixel_error_stability(runs, jnp.ones(30, bool), THRESHOLD, RADIUS)
    assert float(res.mirror_rate) == pytest.approx(26 / 30)
    assert not np.asarray(res.stable)[:4].any() and np.asarray(res.stable)[4:].all()
    assert np.isinf(np.asarray(res.error)[:4]).all()


def test_batched_classes_with_padding_equal_single_class_results():
    a, _ = consistent_runs(20, 5, seed=4, noise_deg=0.2, noise_px=0.05)
    b, _ = consistent_runs(20, 5, seed=5, noise_deg=2.0, noise_px=0.6)
    member_b = np.arange(20) < 14  # class b has 14 members, padded to 20
    runs = jax.tree.map(lambda x, y: jnp.stack([x, y]), a, b)
    member = jnp.asarray(np.stack([np.ones(20, bool), member_b]))
    both = stability.pixel_error_stability_classes(runs, member, THRESHOLD, RADIUS)
    single_b = stability.pixel_error_stability(
        jax.tree.map(lambda x: x[:, :14], b), jnp.ones(14, bool), THRESHOLD, RADIUS
    )
    np.testing.assert_array_equal(np.asarray(both.stable[1, :14]), np.asarray(single_b.stable))
    assert not np.asarray(both.stable[1, 14:]).any()
    assert np.asarray(both.stable[0]).all()
