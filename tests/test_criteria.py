"""The pluggable stability criteria (``stability=<name>``) on hand-made parameter sets with known answers, and
each one end to end through the config group and the pipeline."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from omegaconf import OmegaConf

import jisac
from tests.helpers import compose_config
from jisac import config, criteria, filters, synthetic
from jisac import transforms as T


BOX, RADIUS, THRESHOLD = 32, 12, 0.7
N_RUNS = 5  # ISAC's stab_ali; with fewer runs a lenient threshold passes more chance agreements
CLASS_SIZE, N_SLOTS = 20, 22  # three classes of 20 members, padded to 22 slots
NAMES = sorted(criteria.CRITERIA)


def _views():
    """Three clearly different views (of 8 spread over the hemisphere, the 3 whose rotation-invariant
    correlations differ most: 0.94 with themselves, <= 0.78 with each other)."""
    phantom = synthetic.make_phantom(radius=0.85 * RADIUS, seed=1)
    rot, tilt = synthetic.hemisphere_directions(8)
    views = synthetic.project(phantom, synthetic.euler_to_matrix(rot, tilt, 0)[[0, 1, 6]], BOX)
    return np.asarray(filters.normalize_in_mask(views, filters.circular_mask(BOX, BOX, RADIUS)))


class Data:
    """Particles of 3 views (view ``i // 20`` for particle ``i``), each a randomly rotated, shifted and mirrored
    noisy copy; ``truth`` brings each particle back onto its view. Classes hold particles 0-19, 20-39, 40-59."""

    def __init__(self):
        self.views = _views()
        n = 3 * CLASS_SIZE
        rng = np.random.default_rng(0)
        self.q = T.make_transform(
            rng.uniform(0, 360, n), rng.uniform(-1, 1, n), rng.uniform(-1, 1, n), rng.integers(0, 2, n).astype(bool)
        )
        self.truth = T.inverse(self.q)
        self.view_of = np.repeat(np.arange(3), CLASS_SIZE)
        self.labels = np.full((3, N_SLOTS), -1, np.int64)
        self.labels[:, :CLASS_SIZE] = np.arange(n).reshape(3, CLASS_SIZE)
        self.member = self.labels >= 0
        self._stacks = {}

    def stack(self, snr, view_of=None):
        """Working stack at signal-to-noise ratio ``snr`` (0: no noise)."""
        view_of = self.view_of if view_of is None else view_of
        key = (snr, tuple(view_of))
        if key not in self._stacks:
            imgs = T.apply_transform(self.views[view_of], self.q)
            if snr:
                imgs = synthetic.add_noise(imgs, snr, jax.random.key(2))
            self._stacks[key] = np.asarray(filters.normalize_in_mask(imgs, filters.circular_mask(BOX, BOX, RADIUS)))
        return self._stacks[key]

    def runs(self, per_particle, pad_from=0):
        """``(n, L)`` fields -> ``(c, L, N_SLOTS)``; padding slots copy particle ``pad_from``'s parameters (so a
        criterion that ignored the mask would call them stable)."""
        index = np.where(self.member, self.labels, pad_from)
        return jax.tree.map(lambda a: jnp.asarray(a)[index].transpose(0, 2, 1), per_particle)

    def consistent(self, seed=0, shift_noise_px=0.0):
        """Every run is the truth seen from its own frame: compose(truth, G_j), one global G_j per run (run L-1:
        identity), plus optional independent Gaussian noise on the shifts."""
        rng = np.random.default_rng(seed)
        n = len(self.view_of)
        runs = []
        for j in range(N_RUNS):
            g = (
                T.make_transform(rng.uniform(0, 360), *rng.uniform(-1, 1, 2), j == 0)
                if j < N_RUNS - 1
                else T.identity()
            )
            p = T.compose(self.truth, g)
            runs.append(p._replace(shift_x=p.shift_x + rng.normal(0, shift_noise_px, n).astype(np.float32),
                                   shift_y=p.shift_y + rng.normal(0, shift_noise_px, n).astype(np.float32)))
        return self.runs(jax.tree.map(lambda *a: jnp.stack(a, 1), *runs))

    def random(self, seed=1):
        rng = np.random.default_rng(seed)
        shape = (len(self.view_of), N_RUNS)
        return self.runs(T.make_transform(rng.uniform(0, 360, shape), rng.uniform(-1, 1, shape),
                                          rng.uniform(-1, 1, shape), rng.integers(0, 2, shape).astype(bool)))


@pytest.fixture(scope="module")
def data():
    return Data()


def _apply(name, runs, data, images, **options):
    crit = criteria.make_criterion(name, THRESHOLD, float(RADIUS), **options)
    return crit.score(runs, jnp.asarray(data.member), images=images, labels=data.labels)


@pytest.mark.parametrize("name", NAMES)
def test_consistent_classes_are_all_stable_and_padding_never(name, data):
    res = _apply(name, data.consistent(), data, data.stack(1.0))
    np.testing.assert_array_equal(np.asarray(res.stable), data.member)
    # averaged parameters are run L-1's frame, i.e. the truth: transformed particles land on their view
    flat = jax.tree.map(lambda a: np.asarray(a)[data.member], res.params)
    err = np.abs((flat.angle - np.asarray(data.truth.angle) + 180) % 360 - 180)
    assert err.max() < 0.1
    assert float(jnp.max(jnp.where(data.member, res.error, 0))) < 0.05


@pytest.mark.parametrize("name", NAMES)
def test_random_angles_are_never_stable(name, data):
    res = _apply(name, data.random(), data, data.stack(1.0))
    assert not np.asarray(res.stable).any()


def _with_lost_runs(data, lost):
    """``data.consistent()`` with the runs ``lost[c, j]`` of class ``c`` replaced by random parameters (a run
    that did not converge)."""
    return jax.tree.map(lambda good, bad: jnp.where(jnp.asarray(lost)[:, :, None], bad, good),
                        data.consistent(), data.random())


def test_consensus_keeps_a_class_with_lost_runs_in_the_agreeing_runs_frame(data):
    """One lost run makes ISAC2's test reject the whole class; consensus keeps it when at least min_runs runs
    agree, with parameters in the frame of the last agreeing run. Class 0: every run agrees; class 1: the
    reference run (L-1) is lost; class 2: three of five runs lost."""
    lost = np.zeros((3, N_RUNS), bool)
    lost[1, N_RUNS - 1] = True
    lost[2, [0, 3, 4]] = True
    runs = _with_lost_runs(data, lost)
    pixel = np.asarray(_apply("pixel_error", runs, data, None).stable)
    assert pixel[0].sum() == CLASS_SIZE and (pixel[1:].sum(1) <= 3).all()  # a few chance agreements at most
    res = _apply("consensus", runs, data, None)
    stable = np.asarray(res.stable)
    assert stable[:2].sum(1).tolist() == [CLASS_SIZE, CLASS_SIZE]
    assert stable[2].sum() <= 3 and not stable[~data.member].any()  # two agreeing runs: chance agreements only
    # class 1's frame is run L-2's: its averaged parameters are run L-2's own (the runs agree exactly)
    m = data.member[1]
    params, run = [jax.tree.map(lambda a: np.asarray(a)[1][..., m], p) for p in (res.params, runs)]
    last_kept = jax.tree.map(lambda a: a[N_RUNS - 2], run)
    assert np.abs((params.angle - last_kept.angle + 180) % 360 - 180).max() < 0.1
    assert np.abs(params.shift_x - last_kept.shift_x).max() < 0.05
    np.testing.assert_array_equal(params.mirror, last_kept.mirror)
    assert np.where(stable[:2], np.asarray(res.error)[:2], 0).max() < 0.05
    corrections = np.asarray(res.corrections)
    assert np.isnan(corrections[1, :, N_RUNS - 1]).all() and np.isfinite(corrections[1, :, :-1]).all()
    assert np.isfinite(corrections[0]).all()
    strict = np.asarray(_apply("consensus", runs, data, None, min_runs=4).stable)
    assert strict.sum(1).tolist() == [CLASS_SIZE, CLASS_SIZE, 0]
    full = np.asarray(_apply("consensus", runs, data, None, min_runs=N_RUNS).stable)
    np.testing.assert_array_equal(full, pixel)  # min_runs = stab_ali is ISAC2's test


def test_consensus_per_member_keeps_members_whose_own_lost_run_differs(data):
    """Each member of class 0 lost a run of its own (member i: run i % 5, for 15 of its 20 members; the other 5
    agree everywhere); class 1 lost run 2 whole and 12 of its members one more run each: no subset of the runs
    agrees on more than about half the members, but each member agrees on at least three. Class 2 is random.
    ISAC2 keeps only the clean members of class 0, consensus at most those plus the members whose lost runs its
    chosen subset leaves out, ``per_member`` every member of classes 0 and 1, with the parameters the lost runs
    would have given, and nothing of class 2."""
    lost = np.zeros((3, N_RUNS, N_SLOTS), bool)
    i = np.arange(CLASS_SIZE)
    lost[0, i[5:] % N_RUNS, i[5:]] = True
    lost[1, 2] = True
    lost[1, np.array([0, 1, 3, 4])[i[8:] % 4], i[8:]] = True
    lost[2] = True
    good, bad = data.consistent(), data.random()
    runs = jax.tree.map(lambda g, b: jnp.where(jnp.asarray(lost), b, g), good, bad)
    pixel = np.asarray(_apply("pixel_error", runs, data, None).stable)
    assert pixel[0].sum() == 5 and pixel[0, :5].all() and pixel[1:].sum() <= 2
    whole = np.asarray(_apply("consensus", runs, data, None).stable)
    # the best subset leaves out two runs: the clean members + those whose lost run(s) it leaves out
    assert whole[0].sum() <= 5 + 2 * 3 + 1 and whole[1].sum() <= 8 + 2 * 3 + 1 and whole[2].sum() <= 2
    res = _apply("consensus", runs, data, None, per_member=True)
    stable = np.asarray(res.stable)
    np.testing.assert_array_equal(stable[:2], data.member[:2])
    assert stable[2].sum() <= 2  # chance agreements of three random runs at most
    for c in (0, 1):
        ref = np.nonzero(np.isfinite(np.asarray(res.corrections)[c, 0]))[0][-1]  # the frame: the last kept run
        m = data.member[c]
        params = jax.tree.map(np.asarray, res.params)
        params = jax.tree.map(lambda a, c=c, m=m: a[c][m], params)
        expected = jax.tree.map(lambda a, c=c, m=m, ref=ref: np.asarray(a)[c, ref][m], good)
        # the test's frame is fitted on members some of whose runs are lost, so it is off by ~1 degree (ISAC2's
        # fit, not per_member's); a wrong frame for the added members would be off by tens of degrees
        assert np.abs((params.angle - expected.angle + 180) % 360 - 180).max() < 2.0
        assert np.abs(params.shift_x - expected.shift_x).max() < 0.35
        assert np.abs(params.shift_y - expected.shift_y).max() < 0.35
        np.testing.assert_array_equal(params.mirror, expected.mirror)
        assert np.asarray(res.error)[c][m].max() < THRESHOLD
    # a member stable on all the class's runs keeps ISAC2's verdict and error (per_member only adds members)
    plain = _apply("consensus", runs, data, None)
    kept = np.asarray(plain.stable)
    np.testing.assert_array_equal(kept & ~stable, False)
    np.testing.assert_allclose(np.asarray(res.error)[kept], np.asarray(plain.error)[kept], rtol=1e-6, atol=1e-7)
    assert criteria.make_criterion("consensus", THRESHOLD, float(RADIUS), per_member=True).name == \
        "consensus[min_runs=3,per_member=True]"


def test_reproducibility_rejects_consistently_aligned_members_of_another_view(data):
    """Three members of each class are particles of the next view with consistent (but meaningless) parameters:
    the pixel error cannot tell, re-assignment to the run averages moves them out."""
    view_of = data.view_of.copy()
    intruders = np.concatenate([np.arange(c * CLASS_SIZE, c * CLASS_SIZE + 3) for c in range(3)])
    view_of[intruders] = (view_of[intruders] + 1) % 3
    images = data.stack(1.0, view_of)
    runs = data.consistent()
    is_intruder = np.isin(data.labels, intruders) & data.member

    pixel = np.asarray(_apply("pixel_error", runs, data, images).stable)
    assert pixel[data.member].all()
    count = criteria.membership_reproducibility(
        runs, data.member, images, data.labels, _options(), RADIUS
    )
    assert (count[data.member & ~is_intruder] == N_RUNS).all()
    assert (count[is_intruder] == 0).all()
    assert (count[~data.member] == 0).all()
    for within_class in (True, False):
        res = _apply("reproducibility", runs, data, images, within_class=within_class)
        np.testing.assert_array_equal(np.asarray(res.stable), data.member & ~is_intruder)


def _options():
    from jisac import align
    from jisac.polar import RingGeometry

    return align.AlignOptions(geometry=RingGeometry(1, RADIUS, 1))


def test_min_fraction_counts_runs(data, monkeypatch):
    """A member back in its class in L-1 of L runs is stable with min_fraction (L-1)/L, not above it."""
    runs = data.consistent()
    count = np.where(data.member, N_RUNS, 0)
    count[0, :5] = N_RUNS - 1
    monkeypatch.setattr(criteria, "membership_reproducibility", lambda *a, **k: count)
    for min_fraction, want in ((1.0, False), ((N_RUNS - 1) / N_RUNS + 0.01, False), ((N_RUNS - 1) / N_RUNS, True)):
        stable = np.asarray(_apply("reproducibility", runs, data, data.stack(1.0), min_fraction=min_fraction).stable)
        assert (stable[0, :5] == want).all() and stable[0, 5:CLASS_SIZE].all(), min_fraction
        assert not stable[~data.member].any()


def test_match_two_way_recovers_a_relabelling():
    rng = np.random.default_rng(3)
    reference = np.repeat(np.arange(4), 10)
    perm = np.array([2, 0, 3, 1])
    other = perm[reference]
    other[[0, 11]] = other[[20, 35]]  # two particles moved
    match, overlap = criteria.match_two_way(reference, other, 4)
    np.testing.assert_array_equal(match[perm], np.arange(4))
    assert overlap.sum() == 38
    shuffled = rng.permutation(40)
    match2, _ = criteria.match_two_way(reference[shuffled], other[shuffled], 4)
    np.testing.assert_array_equal(match2, match)


def test_resolution_threshold_follows_the_class_resolution(data):
    """Members with a 1 px spread of shifts: ISAC2's 0.7 px rejects most of them whatever the data; measured
    against the class's resolution, noisier (lower-resolution) classes tolerate more. The stable set always
    contains ISAC2's and its errors stay below max_error."""
    runs = data.consistent(seed=4, shift_noise_px=1.0)
    pixel = np.asarray(_apply("pixel_error", runs, data, data.stack(0)).stable)
    counts = {}
    for snr in (0, 1.0, 0.2):
        res = _apply("resolution", runs, data, data.stack(snr), max_error=2.0)
        stable = np.asarray(res.stable)
        assert (stable >= pixel).all() and not stable[~data.member].any()
        assert (np.asarray(res.error)[stable] < 2.0).all()
        counts[snr] = stable.sum()
    assert pixel.sum() <= counts[0] < counts[1.0] < counts[0.2]  # noise-free: ~ISAC2 (resolution ~0.4 cycles/px)
    # a vanishing fraction leaves ISAC2's threshold
    res = _apply("resolution", runs, data, data.stack(0.2), fraction=1e-4)
    np.testing.assert_array_equal(np.asarray(res.stable), pixel)


def test_fourier_ring_correlation_and_resolution():
    rng = np.random.default_rng(5)
    a = rng.standard_normal((2, 32, 32)).astype(np.float32)
    b = rng.standard_normal((2, 32, 32)).astype(np.float32)
    same = np.asarray(filters.fourier_ring_correlation(a, a))
    np.testing.assert_allclose(same[:, 1:], 1.0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(filters.fourier_ring_correlation(a, -a))[:, 1:], -1.0, atol=1e-5)
    independent = np.asarray(filters.fourier_ring_correlation(a, b))
    assert np.abs(independent[:, 4:]).mean() < 0.12  # ~ 1 / sqrt(coefficients per shell)
    assert (np.asarray(filters.frc_resolution(jnp.asarray(independent), 0.5, 32)) < 0.1).all()
    # curve 1 - s/8 crosses 0.5 at shell 4: 4/32 cycles/px; never crossing: Nyquist; crossing at once: 1/box
    curve = jnp.asarray(np.clip(1 - np.arange(17) / 8, 0, 1), jnp.float32)
    assert float(filters.frc_resolution(curve, 0.5, 32)) == pytest.approx(4 / 32)
    assert float(filters.frc_resolution(jnp.ones(17), 0.5, 32)) == 0.5
    assert float(filters.frc_resolution(jnp.zeros(17), 0.5, 32)) == pytest.approx(1 / 32)


def test_split_half_resolution_drops_with_noise(data):
    params = jax.tree.map(lambda a: a[:, -1], data.consistent())
    clean, _ = criteria.split_half_resolution(params, data.member, data.stack(1.0), data.labels, RADIUS)
    noisy, _ = criteria.split_half_resolution(params, data.member, data.stack(0.02), data.labels, RADIUS)
    assert (np.asarray(noisy) < np.asarray(clean)).all()
    assert (np.asarray(noisy) >= 1 / BOX).all() and (np.asarray(clean) <= 0.5).all()


def test_bad_options_fail_with_one_line_naming_them(data):
    cases = [
        (dict(name="nope"), "not a known criterion"),
        (dict(name="pixel_error", threshold=0.0), "isac.thld_err"),
        (dict(name="reproducibility", min_fraction=0.0), "stability.min_fraction"),
        (dict(name="reproducibility", min_fraction=1.5), "stability.min_fraction"),
        (dict(name="resolution", fraction=-1.0), "stability.fraction"),
        (dict(name="resolution", max_error=0.5), "stability.max_error"),
        (dict(name="resolution", frc_threshold=1.0), "stability.frc_threshold"),
        (dict(name="consensus", min_runs=1), "stability.min_runs"),
        (dict(name="consensus", min_runs=2.5), "stability.min_runs"),
    ]
    for kwargs, message in cases:
        name, threshold = kwargs.pop("name"), kwargs.pop("threshold", THRESHOLD)
        with pytest.raises(ValueError, match=message):
            criteria.make_criterion(name, threshold, float(RADIUS), **kwargs)
    for name in ("reproducibility", "resolution"):
        with pytest.raises(ValueError, match=f"stability={name} needs the working stack"):
            criteria.make_criterion(name, THRESHOLD, float(RADIUS)).score(data.consistent(), jnp.asarray(data.member))
    with pytest.raises(ValueError, match=r"stability.min_runs=6 must be between 2 and isac.stab_ali \(5\)"):
        criteria.make_criterion("consensus", THRESHOLD, float(RADIUS), min_runs=6).score(
            data.consistent(), jnp.asarray(data.member))


def _compose(overrides):
    return compose_config(overrides)


def test_config_group_selects_each_criterion_with_typed_options():
    cfg = _compose(["stability=reproducibility", "stability.min_fraction=0.5"])
    assert OmegaConf.to_yaml(cfg.stability).splitlines() == [
        "name: reproducibility", "max_iter: 50", "min_fraction: 0.5", "within_class: true"]
    typed = OmegaConf.to_object(cfg)
    assert config.run_params(typed).criterion.name == "reproducibility[min_fraction=0.5,within_class=True]"
    cfg = _compose(["stability=resolution", "stability.fraction=0.4"])
    assert set(cfg.stability) == {"name", "max_iter", "fraction", "max_error", "frc_threshold"}
    typed = OmegaConf.to_object(cfg)
    assert config.run_params(typed).criterion.name.startswith("resolution[fraction=0.4,")
    assert config.run_params(OmegaConf.to_object(_compose([]))).criterion.name == "pixel_error"
    assert config.run_params(OmegaConf.to_object(_compose(["preset=lowsnr"]))).criterion.name == "consensus[min_runs=3]"
    typed = OmegaConf.to_object(_compose(["stability=consensus", "stability.min_runs=4"]))
    assert config.run_params(typed).criterion.name == "consensus[min_runs=4]"
    typed = OmegaConf.to_object(_compose(["stability=consensus", "stability.per_member=true"]))
    assert config.run_params(typed).criterion.name == "consensus[min_runs=3,per_member=True]"
    with pytest.raises(ValueError, match=r"stability.min_runs=4 must be between 2 and isac.stab_ali \(3\)"):
        config.run_params(OmegaConf.to_object(_compose(["stability=consensus", "stability.min_runs=4",
                                                        "isac.stab_ali=3"])))
    with pytest.raises(Exception, match="min_fraction"):
        _compose(["stability.min_fraction=0.5"])  # another criterion's option is refused
    with pytest.raises(ValueError, match="stability.min_fraction"):
        config.run_params(OmegaConf.to_object(_compose(["stability=reproducibility", "stability.min_fraction=2"])))


# ------------------------------------------------------------------------------------ end to end

PIPE_BOX, PIPE_RADIUS, PIPE_N = 48, 18, 120
PIPE_NAMES = NAMES + ["consensus_per_member"]  # stability=consensus stability.per_member=true


@pytest.fixture(scope="module")
def small_stack():
    """120 noisy particles of 4 views (SNR 0.15), randomly rotated, shifted and mirrored (tests/test_pipeline.py's
    recipe, half the size)."""
    mask = filters.circular_mask(PIPE_BOX, PIPE_BOX, PIPE_RADIUS)
    views, _ = synthetic.known_views(4, PIPE_BOX, PIPE_RADIUS)
    sim = synthetic.simulate(filters.normalize_in_mask(views, mask), PIPE_N, jax.random.key(1), 0.15, max_shift=1.0)
    return np.asarray(filters.normalize_in_mask(sim.images, mask)), sim.view


@pytest.fixture(scope="module")
def pipeline_runs(small_stack, tmp_path_factory):
    """One generation of one SAC round per criterion, chosen with ``stability=<name>``: everything before the
    stability test is identical (same seed), so the stable sets can be compared directly. thld_err 0.5: at 0.7
    ISAC2's test keeps 103 of 120 here, as many as resolution, and the nesting would not show."""
    images, _ = small_stack
    out = {}
    for name in PIPE_NAMES:
        criterion = name.removesuffix("_per_member")
        cfg = _compose([f"stability={criterion}", f"isac.target_radius={PIPE_RADIUS}", f"isac.target_nx={PIPE_BOX}",
                        "isac.img_per_grp=30", "isac.minimum_grp_size=15", "isac.maxit=10", "isac.init_iter=1",
                        "isac.stab_ali=3", "isac.main_iter_limit=1", "isac.thld_err=0.5"]
                       + (["stability.min_runs=2"] if criterion == "consensus" else [])  # 3 of 3 would be ISAC2's
                       + (["stability.per_member=true"] if name.endswith("_per_member") else []))
        typed = OmegaConf.to_object(cfg)
        folder = tmp_path_factory.mktemp(name)
        rp = config.run_params(typed, PIPE_N)
        summary = jisac.classify(images, rp.isac, folder, seed=3, data_id="criteria", criterion=rp.criterion)
        classes = np.loadtxt(folder / "particle_classes.txt")
        out[name] = summary, classes[:, 0].astype(int), classes[:, 1]
    return out


@pytest.mark.parametrize("name", PIPE_NAMES)
def test_each_criterion_runs_end_to_end(name, pipeline_runs, small_stack):
    _, truth = small_stack
    summary, classes, errors = pipeline_runs[name]
    accounted = classes > 0
    assert summary["accounted_fraction"] >= 0.5
    assert summary["generations"][0]["sac_rounds"] == 1
    purity = [np.bincount(truth[classes == c]).max() / (classes == c).sum() for c in np.unique(classes[accounted])]
    assert np.mean(purity) > 0.9
    assert np.isfinite(errors[accounted]).all() and (errors[accounted] < 3.0).all()  # the pixel-error column
    # summary.json (and so report.html and a sweep) says which criterion made the classes
    expected = {"pixel_error": "pixel_error", "reproducibility": "reproducibility[min_fraction=1,within_class=True]",
                "resolution": "resolution[fraction=0.3,max_error=3,frc_threshold=0.5]",
                "consensus": "consensus[min_runs=2]", "consensus_per_member": "consensus[min_runs=2,per_member=True]"}
    assert summary["parameters"]["stability"] == expected[name]


def test_criteria_nest_on_the_same_round(pipeline_runs):
    """reproducibility (with the pixel-error test) keeps a subset of ISAC2's stable members, resolution a
    superset: with one generation of one round the accounted sets nest. consensus (2 of 3 runs here) keeps more
    members per class than ISAC2's test, but in a class whose chosen runs leave one out a few of ISAC2's stable
    members may not be stable on those runs (here 2 of 90 are swapped for others; 90 -> 109 accounted)."""
    accounted = {name: pipeline_runs[name][1] > 0 for name in PIPE_NAMES}
    assert (accounted["reproducibility"] <= accounted["pixel_error"]).all()
    assert (accounted["pixel_error"] <= accounted["resolution"]).all()
    assert accounted["resolution"].sum() > accounted["pixel_error"].sum()
    assert accounted["consensus"].sum() > 1.1 * accounted["pixel_error"].sum()
    assert (accounted["pixel_error"] & ~accounted["consensus"]).sum() <= 0.05 * accounted["pixel_error"].sum()
    # per_member only adds members to consensus's classes: those whose own 2 of the 3 runs agree (109 -> 116)
    assert (accounted["consensus"] <= accounted["consensus_per_member"]).all()
    assert accounted["consensus_per_member"].sum() > accounted["consensus"].sum()
