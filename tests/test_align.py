"""Multi-reference alignment: round trips with known transforms, reference identification, agreement with the
float64 NumPy reference, chunking invariance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jisac import align, filters, synthetic
from jisac import transforms as T
from tests import reference_numpy as ref

# Shared options: each distinct AlignOptions compiles once per session. The fine sub-pixel grid goes without ring
# normalisation (see AlignOptions.normalize_particles), as ISAC's reference-free alignments do.
FINE = align.AlignOptions(
    grid=align.SearchGrid(2.0, 2.0, 0.25), particle_batch=4, reference_chunk=1, normalize_particles=False
)
DEFAULT = align.AlignOptions(particle_batch=8, reference_chunk=16)
MASK = filters.circular_mask(76, 76, 29)


def angle_error(a, b):
    d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)) % 360.0
    return np.minimum(d, 360.0 - d)


def make_particles(image, n, seed, max_shift=2.0, integer_shifts=False):
    """Copies of ``image`` moved by known random transforms Q (the alignment must return inverse(Q))."""
    rng = np.random.default_rng(seed)
    shifts = rng.uniform(-max_shift, max_shift, (n, 2))
    if integer_shifts:
        shifts = np.round(shifts)
    q = T.make_transform(rng.uniform(0, 360, n), shifts[:, 0], shifts[:, 1], rng.integers(0, 2, n).astype(bool))
    parts = T.apply_transform(jnp.broadcast_to(jnp.asarray(image), (n,) + image.shape), q)
    return parts, q


def errors(found: T.Transform2D, truth: T.Transform2D):
    ang = angle_error(found.angle, truth.angle)
    shift = np.hypot(
        np.asarray(found.shift_x) - np.asarray(truth.shift_x), np.asarray(found.shift_y) - np.asarray(truth.shift_y)
    )
    mirror_ok = np.asarray(found.mirror) == np.asarray(truth.mirror)
    return ang, shift, mirror_ok


def test_round_trip_noise_free(structured_image):
    parts, q = make_particles(structured_image, 24, seed=0)
    bank = align.prepare_references(jnp.asarray(structured_image)[None], FINE)
    res = align.align_to_references(parts, bank, FINE)
    ang, shift, mirror_ok = errors(res.params, T.inverse(q))
    assert mirror_ok.all()
    assert ang.max() < 0.5, ang
    assert shift.max() < 0.2, shift
    assert (np.asarray(res.reference) == 0).all()


def test_round_trip_at_snr_0p1(structured_image):
    parts, q = make_particles(structured_image, 100, seed=1)
    # SNR = signal variance / noise variance over the whole image (the usual definition for simulated data)
    noisy = synthetic.add_noise(parts, 0.1, jax.random.key(1))
    bank = align.prepare_references(jnp.asarray(structured_image)[None], FINE)
    res = align.align_to_references(noisy, bank, FINE)
    ang, shift, mirror_ok = errors(res.params, T.inverse(q))
    assert mirror_ok.mean() >= 0.98
    assert ang[mirror_ok].mean() < 2.0, ang.mean()
    assert shift[mirror_ok].mean() < 0.5, shift.mean()


def test_finds_the_right_reference_among_50_views(projections50):
    rng = np.random.default_rng(2)
    truth = rng.integers(0, 50, 150)
    moved, q = [], []
    for i, k in enumerate(truth):
        p, qi = make_particles(projections50[k], 1, seed=100 + i, max_shift=1.0, integer_shifts=True)
        moved.append(p[0])
        q.append(qi)
    parts = synthetic.add_noise(jnp.stack(moved), 0.1, jax.random.key(2))
    bank = align.prepare_references(jnp.asarray(projections50), DEFAULT)
    res = align.align_to_references(parts, bank, DEFAULT)
    assert (np.asarray(res.reference) == truth).mean() == 1.0
    q = jax.tree.map(lambda *a: jnp.concatenate(a), *q)
    ang, shift, mirror_ok = errors(res.params, T.inverse(q))
    assert mirror_ok.all() and np.median(ang) < 2.0
    found_centre = np.stack([np.asarray(c) for c in T.particle_centre(res.params)], -1)
    # T_q(0): q's shift, x-mirrored if q mirrors
    true_centre = np.stack([np.asarray(c) for c in T.particle_centre(T.inverse(q))], -1)
    centre_error = np.hypot(*(found_centre - true_centre).T)
    assert centre_error.mean() < 0.5, centre_error


def test_scores_and_parameters_match_float64_reference(projections50):
    refs = projections50[:3]
    rng = np.random.default_rng(3)
    parts = np.asarray(synthetic.add_noise(projections50[[0, 1, 2, 5]], 1.0, jax.random.key(3), mask=MASK))
    start = T.make_transform(rng.uniform(0, 360, 4), rng.uniform(-1, 1, 4), rng.uniform(-1, 1, 4), [0, 1, 0, 1])
    bank = align.prepare_references(jnp.asarray(refs), DEFAULT)
    table = align.alignment_table(parts, bank, DEFAULT, params=start)
    assert table.score.shape == (4, 3)
    cx, cy = (np.asarray(c, np.float64) for c in T.particle_centre(start))
    geom = DEFAULT.geometry
    for i in range(4):
        want = ref.search(
            parts[i].astype(np.float64), refs.astype(np.float64), DEFAULT.grid.offsets(), geom.radii,
            geom.n_angles, centre=(cx[i], cy[i]),
        )
        for k in range(3):
            w = want[k]
            assert float(table.score[i, k]) == pytest.approx(w["score"], rel=1e-4)
            a, sx, sy, m = ref.params_from_centre(w["centre_x"], w["centre_y"], w["angle"], w["mirror"])
            assert bool(table.params.mirror[i, k]) == m
            assert angle_error(table.params.angle[i, k], a) < 0.02
            assert float(table.params.shift_x[i, k]) == pytest.approx(sx, abs=2e-3)
            assert float(table.params.shift_y[i, k]) == pytest.approx(sy, abs=2e-3)


def test_chunked_equals_unchunked(projections50):
    parts = synthetic.add_noise(projections50[5:25], 0.3, jax.random.key(4), mask=MASK)
    refs = jnp.asarray(projections50[:20])
    whole = align.AlignOptions(particle_batch=20, reference_chunk=20)
    bank_whole = align.prepare_references(refs, whole)
    bank_chunked = align.prepare_references(refs, DEFAULT)  # chunks of 16 refs: 20 -> 2 chunks, 12 padded
    one = align.alignment_table(parts, bank_whole, whole, particle_chunk=20)
    many = align.alignment_table(parts, bank_chunked, DEFAULT, particle_chunk=8)  # 8, 8, 4 (padded)
    np.testing.assert_allclose(np.asarray(many.score), np.asarray(one.score), rtol=1e-5)
    for a, b in zip(many.params, one.params):
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), atol=1e-3)
    best = align.align_to_references(parts, bank_chunked, DEFAULT, particle_chunk=8)
    np.testing.assert_array_equal(np.asarray(best.reference), np.argmax(np.asarray(one.score), 1))
    np.testing.assert_allclose(np.asarray(best.score), np.asarray(one.score).max(1), rtol=1e-5)


def test_search_is_centred_on_current_parameters(structured_image):
    """A particle 4 px off-centre is found with a +-1 px grid when its current parameters say where it is."""
    q = T.make_transform(25.0, 4.0, -3.0, False)
    part = T.apply_transform(jnp.asarray(structured_image), q)[None]
    bank = align.prepare_references(jnp.asarray(structured_image)[None], DEFAULT)
    near = T.make_transform([0.0], [-3.0], [2.0], [False])  # centre estimate (3, -2): 1 px off in x and y
    res = align.align_to_references(part, bank, DEFAULT, params=near)
    ang, shift, mirror_ok = errors(res.params, T.inverse(q))
    assert mirror_ok.all() and ang.max() < 0.5 and shift.max() < 0.2
    far = align.align_to_references(part, bank, DEFAULT)  # from the box centre the grid cannot reach it
    assert float(far.score[0]) < float(res.score[0]) - 0.05


def test_coarse_angle_search_tries_only_multiples_of_dst(structured_image):
    coarse = DEFAULT._replace(coarse_step_deg=90.0)
    rng = np.random.default_rng(5)
    quarter = rng.integers(0, 4, 8) * 90.0
    q = T.make_transform(quarter + rng.uniform(-10, 10, 8), 0.0, 0.0, rng.integers(0, 2, 8).astype(bool))
    parts = T.apply_transform(jnp.broadcast_to(jnp.asarray(structured_image), (8, 76, 76)), q)
    bank = align.prepare_references(jnp.asarray(structured_image)[None], coarse)
    res = align.align_to_references(parts, bank, coarse)
    angles = np.asarray(res.params.angle)
    assert np.all(angle_error(angles, np.round(angles / 90.0) * 90.0) < 1e-3)  # only multiples of 90
    assert np.all(angle_error(angles, T.inverse(q).angle) <= 10.0 + 1e-3)  # the nearest one
    assert (np.asarray(res.params.mirror) == np.asarray(q.mirror)).all()


def test_mirror_search_can_be_switched_off(structured_image):
    no_mirror = DEFAULT._replace(mirror=False)
    parts, q = make_particles(structured_image, 8, seed=6, max_shift=0.0)
    bank = align.prepare_references(jnp.asarray(structured_image)[None], no_mirror)
    res = align.align_to_references(parts, bank, no_mirror)
    assert not np.asarray(res.params.mirror).any()
    straight = ~np.asarray(q.mirror)
    ang, _, _ = errors(res.params, T.inverse(q))
    assert ang[straight].max() < 0.5


def test_chunk_sizes_respect_the_memory_budget():
    opts = align.AlignOptions(particle_batch=64, reference_chunk=256)
    batch, chunk = align.chunk_sizes_for_budget(5000, opts, memory_budget_bytes=64 << 20)
    per_pair = opts.grid.n_shifts * 2 * opts.geometry.n_angles * 16
    assert batch * chunk * per_pair <= 64 << 20
    assert batch >= 1 and chunk >= 1


def test_search_grid_matches_sphire_layout():
    offs = align.SearchGrid(1.0, 1.0, 1.0).offsets()
    assert offs.shape == (9, 2)
    np.testing.assert_array_equal(offs[:3], [[-1, -1], [0, -1], [1, -1]])  # y outer, x inner
    assert align.SearchGrid(2.0, 1.0, 0.5).n_shifts == 9 * 5
    with pytest.raises(ValueError, match="ts"):
        align.SearchGrid(1.0, 1.0, 0.0).validate()


@pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 devices (CPU runs force 2; one GPU is 1)")
def test_sharded_over_devices_equals_single_device(projections50):
    mesh = jax.make_mesh((2,), ("data",))
    parts = synthetic.add_noise(projections50[3:22], 0.3, jax.random.key(7), mask=MASK)  # 19: uneven, padded
    bank = align.prepare_references(jnp.asarray(projections50[:20]), DEFAULT)
    one = align.alignment_table(parts, bank, DEFAULT, particle_chunk=16)
    two = align.alignment_table(parts, bank, DEFAULT, particle_chunk=16, mesh=mesh)
    np.testing.assert_array_equal(np.asarray(two.score), np.asarray(one.score))
    for a, b in zip(two.params, one.params):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    best = align.align_to_references(parts, bank, DEFAULT, particle_chunk=16, mesh=mesh)
    np.testing.assert_array_equal(np.asarray(best.reference), np.argmax(np.asarray(one.score), 1))


def test_scores_only_table_and_assigned_search_match_the_full_table(projections50):
    """ISAC's MRA keeps only the (n, k) scores and re-searches each particle against its assigned reference:
    the scores must be the table's, and the paired search must give the table's parameters for the pair."""
    rng = np.random.default_rng(8)
    n, k = 24, 20
    parts = synthetic.add_noise(projections50[10:10 + n], 0.3, jax.random.key(8), mask=MASK)
    refs = filters.subtract_masked_mean(jnp.asarray(projections50[:k]), MASK)  # as isac.run_generation's
    # Current parameters away from the box centre (integer centres, as ISAC's), some mirrored: the grid must be
    # centred on the same point in both searches.
    current = T.from_centre_and_angle(rng.integers(-1, 2, n).astype(np.float32),
                                      rng.integers(-1, 2, n).astype(np.float32),
                                      rng.uniform(0, 360, n).astype(np.float32), rng.integers(0, 2, n).astype(bool))
    bank = align.prepare_references(refs, DEFAULT)  # 20 refs in chunks of 16: padded, trimmed
    table = align.alignment_table(parts, bank, DEFAULT, params=current, particle_chunk=16)
    scores = align.alignment_scores(parts, bank, DEFAULT, params=current, particle_chunk=16)
    assert scores.shape == (n, k) and scores.flags.c_contiguous
    np.testing.assert_array_equal(scores, table.score)

    # Every (particle, reference) pair at once: particle i repeated k times, copy j assigned to reference j.
    labels = np.tile(np.arange(k), n)
    rep = lambda a: np.repeat(np.asarray(a), k, 0)  # noqa: E731
    spectra = align.prepare_assigned_references(refs, DEFAULT)
    found, score = align.align_to_assigned(rep(parts), spectra, labels, DEFAULT, params=jax.tree.map(rep, current),
                                           particle_chunk=64)
    want = jax.tree.map(lambda a: np.asarray(a).ravel(), table.params)
    np.testing.assert_allclose(np.asarray(score), table.score.ravel(), rtol=1e-5, atol=1e-6)
    same = (np.asarray(found.mirror) == want.mirror) & (np.abs(np.asarray(found.shift_x) - want.shift_x) < 1e-3) \
        & (np.abs(np.asarray(found.shift_y) - want.shift_y) < 1e-3)
    assert same.mean() >= 0.98, same.mean()
    assert angle_error(np.asarray(found.angle)[same], want.angle[same]).max() < 0.01
    # A random equal-size-like assignment picks the same entries (the way isac.run_generation uses it).
    assigned = rng.permutation(np.arange(n) % k)
    one, _ = align.align_to_assigned(parts, spectra, assigned, DEFAULT, params=current, particle_chunk=16)
    pick = np.arange(n) * k + assigned
    np.testing.assert_array_equal(np.asarray(one.mirror), np.asarray(found.mirror)[pick])
    np.testing.assert_allclose(np.asarray(one.angle), np.asarray(found.angle)[pick], atol=1e-3)
