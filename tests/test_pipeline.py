"""ISAC end to end on a small synthetic stack with known views: classification quality, outputs, restart after
a kill, and determinism."""

import json

import jax
import numpy as np
import pytest

import jisac
from tests.helpers import same_outputs
from jisac.io import outputs
from jisac import checkpoint, criteria, filters, isac, pipeline, synthetic

BOX, RADIUS, N_VIEWS, N = 48, 18, 4, 240
# thld_err 0.55, stricter than the default 0.7 (which accounts 200 of 240 in generation 1 and ends the run there), so
# that the run has more than one generation and the kill test can use it as its uninterrupted reference (with 256
# samples on every ring: SPHIRE's ring lengths account 204 in generation 1 and end the run there)
PARAMS = isac.make_params(
    img_per_grp=30, minimum_grp_size=20, target_radius=RADIUS, target_nx=BOX, maxit=10, init_iter=2, stab_ali=3,
    thld_err=0.55, ring_lengths="constant",
)


@pytest.fixture(scope="module")
def stack():
    """Noisy copies of 4 distinct views, randomly rotated, mirrored and shifted; view directions known."""
    mask = filters.circular_mask(BOX, BOX, RADIUS)
    views, directions = synthetic.known_views(N_VIEWS, BOX, RADIUS)
    sim = synthetic.simulate(filters.normalize_in_mask(views, mask), N, jax.random.key(1), 0.15, max_shift=1.0)
    return np.asarray(filters.normalize_in_mask(sim.images, mask)), sim.view, directions


@pytest.fixture(scope="module")
def full_run(stack, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    summary = jisac.classify(stack[0], PARAMS, out, seed=3, data_id="test")
    return out, summary


def test_classes_are_pure_and_most_particles_accounted(stack, full_run):
    _, truth, directions = stack
    out, summary = full_run
    classes = np.loadtxt(out / "particle_classes.txt")[:, 0].astype(int)
    accounted = classes > 0
    assert accounted.mean() >= 0.5
    within = []
    for c in np.unique(classes[accounted]):
        members = classes == c
        mean_dir = directions[truth[members]].mean(0)
        mean_dir /= np.linalg.norm(mean_dir)
        cosines = np.clip(directions[truth[members]] @ mean_dir, -1, 1)
        within.extend(np.degrees(np.arccos(cosines)) <= 15.0)
    assert np.mean(within) >= 0.85
    assert summary["classes"] == len(np.unique(classes[accounted]))


def test_outputs_are_complete(full_run):
    out, summary = full_run
    import mrcfile

    averages = mrcfile.read(out / "class_averages.mrcs")
    assert averages.shape == (summary["classes"], BOX, BOX)
    assert (out / "class_averages.png").stat().st_size > 0
    processed = np.loadtxt(out / "processed_images.txt", dtype=int, ndmin=1)
    assert len(processed) == summary["accounted"]
    params = np.loadtxt(out / "all_parameters.txt")
    assert params.shape == (N, 4) and (params[processed, 3] >= 0).all()
    assert (out / "main001" / "generation001" / "finished").exists()
    saved = json.loads((out / "summary.json").read_text())
    assert saved["generations"][0]["generation"] == 1
    assert not list(out.rglob(".*.tmp"))  # nothing half-written is left


@pytest.mark.slow
def test_killed_run_restarts_to_the_same_result(stack, full_run, tmp_path, monkeypatch):
    out_full, summary = full_run  # the uninterrupted run, same parameters and seed
    assert len(summary["generations"]) >= 2, "the data must need more than one generation for this test"
    real = isac.run_generation
    calls = {"n": 0}

    def dies_in_generation_2(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(isac, "run_generation", dies_in_generation_2)
    with pytest.raises(KeyboardInterrupt):
        jisac.classify(stack[0], PARAMS, tmp_path, seed=3, data_id="test")
    assert (tmp_path / "checkpoint" / "state.npz").exists()
    assert not (tmp_path / "summary.json").exists()  # an interrupted run does not look finished
    monkeypatch.setattr(isac, "run_generation", real)
    jisac.classify(stack[0], PARAMS, tmp_path, seed=3, data_id="test")
    same_outputs(tmp_path, out_full)  # exactly the same


def test_a_different_run_is_refused_in_the_same_folder(stack, full_run):
    out, _ = full_run
    with pytest.raises(checkpoint.RunMismatchError, match="different run"):
        jisac.classify(stack[0], PARAMS._replace(thld_err=1.0), out, seed=3, data_id="test")


def test_impossible_parameters_fail_before_work(stack):
    with pytest.raises(ValueError, match="minimum_grp_size"):
        PARAMS._replace(minimum_grp_size=40).validate(N)
    with pytest.raises(ValueError, match="2 x isac.img_per_grp"):
        PARAMS._replace(img_per_grp=200, minimum_grp_size=60).validate(N)
    with pytest.raises(ValueError, match="stab_ali"):
        PARAMS._replace(stab_ali=1).validate(N)
    with pytest.raises(ValueError, match="thld_err"):
        PARAMS._replace(thld_err=0.0).validate(N)
    with pytest.raises(ValueError, match="does not fit"):
        isac.make_params(img_per_grp=30, minimum_grp_size=20, target_radius=RADIUS, target_nx=BOX, xr=8.0).validate(N)


def test_same_seed_same_result(stack, full_run, tmp_path):
    out_full, _ = full_run
    jisac.classify(stack[0], PARAMS, tmp_path, seed=3, data_id="test")
    for name in ("particle_classes.txt", "all_parameters.txt"):
        np.testing.assert_array_equal(np.loadtxt(tmp_path / name), np.loadtxt(out_full / name))


def test_stability_criterion_is_pluggable(stack, tmp_path):
    """A criterion is a value with one signature: one that calls every member stable accounts everything."""
    from jisac import stability

    def everyone_is_stable(runs, member, images=None, labels=None):
        base = stability.pixel_error_stability_classes(runs, member, 1e9, float(RADIUS), 5)
        return base._replace(stable=member)

    summary = jisac.classify(stack[0], PARAMS, tmp_path, seed=3, data_id="test",
                             criterion=criteria.Criterion("everyone", everyone_is_stable))
    assert summary["accounted_fraction"] == 1.0
    with pytest.raises(ValueError, match="not a known criterion"):
        criteria.make_criterion("nope", 0.7, 29.0)


def test_a_run_that_accepts_nothing_still_writes_its_outputs(tmp_path):
    summary = outputs.write_run(tmp_path, pipeline.finish(isac.IsacState.start(70), PARAMS, {}))
    assert summary["accounted"] == 0 and summary["classes"] == 0
    assert (np.loadtxt(tmp_path / "particle_classes.txt")[:, 0] == 0).all()
    assert (np.loadtxt(tmp_path / "all_parameters.txt")[:, 3] == -1).all()


def test_mra_step_takes_the_assigned_pairs_parameters_from_the_table(stack, monkeypatch):
    """A small stack's MRA keeps the (n, k) table and takes each particle's parameters for its assigned class
    from it; a large one searches the assigned pair again (``align_to_assigned``): the same classes, and the
    same parameters up to float rounding."""
    images = stack[0][:120]
    steps = isac.generation_steps(len(images), PARAMS)
    state = isac.start_generation(images, jax.random.key(2), steps)
    assert len(images) * steps.k_pad * 17 <= isac.MRA_TABLE_BYTES
    from_table = isac.mra_step(images, state, 0.2, steps)
    monkeypatch.setattr(isac, "MRA_TABLE_BYTES", 0)
    searched = isac.mra_step(images, state, 0.2, steps)
    np.testing.assert_array_equal(np.asarray(from_table.labels), np.asarray(searched.labels))
    a, b = from_table.params, searched.params
    np.testing.assert_array_equal(np.asarray(a.mirror), np.asarray(b.mirror))
    d = np.abs((np.asarray(a.angle) - np.asarray(b.angle) + 180) % 360 - 180)
    assert d.max() < 1e-2
    for f in ("shift_x", "shift_y"):
        np.testing.assert_allclose(np.asarray(getattr(a, f)), np.asarray(getattr(b, f)), atol=1e-3)


def test_average_similarity_is_rotation_and_mirror_invariant_and_orders_views_together():
    """The final order's similarity: a view rotated or mirrored scores as itself (within the bilinear
    resampling), other views lower; the chain puts each view's copies next to each other."""
    from jisac.transforms import apply_transform, make_transform

    views = np.asarray(synthetic.known_views(3, BOX, RADIUS)[0], np.float32)
    moves = [(0.0, False), (37.0, False), (0.0, True), (123.0, True)]
    copies = np.stack([np.asarray(apply_transform(v, make_transform(angle=a, mirror=m)))
                       for v in views for a, m in moves])  # 12 averages: view = index // 4
    shuffle = np.random.default_rng(0).permutation(len(copies))
    copies, view = copies[shuffle], (np.arange(len(copies)) // 4)[shuffle]
    sim = pipeline.average_similarity(copies, PARAMS.align)
    assert np.allclose(sim, sim.T) and np.allclose(np.diag(sim), 1.0, atol=1e-6)
    same = view[:, None] == view[None]
    assert sim[same].min() > 0.97, sim[same].min()
    assert sim[~same].max() < sim[same].min() - 0.05, (sim[~same].max(), sim[same].min())
    order = pipeline.order_averages(copies, PARAMS)
    assert sorted(order) == list(range(len(copies)))
    runs = np.count_nonzero(np.diff(view[order]) != 0) + 1
    assert runs == 3, view[order]  # each view's four copies in one stretch of the chain


def test_next_generation_starts_from_the_unaccepted_averages(stack, tmp_path):
    """``isac.next_references="unaccepted"``: a generation's unaccepted class averages, most stable members first,
    are the next generation's first references (random particles for the rest, the same draw as without them),
    and a checkpoint keeps them so that a restarted run starts its next generation the same way."""
    images = stack[0][:120]
    steps = isac.generation_steps(len(images), PARAMS)
    k, nx = steps.n_classes, images.shape[-1]
    plain = isac.start_generation(images, jax.random.key(5), steps)
    seeds = np.random.default_rng(0).normal(size=(k - 1, nx, nx)).astype(np.float32)
    seeded = isac.start_generation(images, jax.random.key(5), steps, seeds)
    np.testing.assert_array_equal(np.asarray(seeded.references)[: k - 1], seeds)
    np.testing.assert_array_equal(np.asarray(seeded.references)[k - 1:], np.asarray(plain.references)[k - 1:])
    np.testing.assert_array_equal(jax.random.key_data(seeded.key), jax.random.key_data(plain.key))

    def cls(value, n_stable):
        return isac.ClassResult(np.full((nx, nx), value, np.float32), np.arange(n_stable), None, None, 10)

    result = isac.GenerationResult((cls(0, 3), cls(1, 9), cls(2, 1), cls(3, 3)), (1,), 2, False, 1.0)
    order = isac.unaccepted_averages(result)[:, 0, 0]
    np.testing.assert_array_equal(order, [0, 3, 2])  # class 1 accepted; 3 stable, 3 (class order), 1
    p = PARAMS._replace(next_references="unaccepted")
    none_accepted = result._replace(accepted=())
    state = isac.accept_generation(isac.IsacState.start(40), none_accepted, np.arange(40), p)
    assert state.seeds.shape == (4, nx, nx)
    assert isac.accept_generation(isac.IsacState.start(40), none_accepted, np.arange(40), PARAMS).seeds is None
    path = tmp_path / "state.npz"
    for s in (state, state._replace(seeds=None)):
        checkpoint.save_state(path, s, "run")
        back = checkpoint.load_state(path, "run")
        assert (back.seeds is None) == (s.seeds is None)
        if s.seeds is not None:
            np.testing.assert_array_equal(back.seeds, s.seeds)
