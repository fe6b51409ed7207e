"""The matching phase (jisac.matching): unaccounted particles join accepted classes only when both halves of the
class agree and they match it as well as its own members do; noise and unseen views stay out."""

import jax
import numpy as np
import pytest

from jisac import align, isac, matching, synthetic
from jisac import transforms as T
from jisac.polar import RingGeometry
from tests.helpers import angle_difference

BOX, RADIUS = 76, 29
OPTIONS = align.AlignOptions(geometry=RingGeometry(1, RADIUS, 1))


def _rows(p: T.Transform2D) -> np.ndarray:
    return np.stack([np.asarray(f, np.float32) for f in p], -1)


@pytest.fixture(scope="module")
def scene():
    """4 accepted classes (views 0-3, 40 members each at their true alignment), candidates: 25 more particles of
    each of those views, 25 of a fifth view no class holds, 25 pure-noise images."""
    views, _ = synthetic.known_views(5, BOX, RADIUS / 0.85 * 0.8)
    n_mem, n_cand = 40, 25
    member_view = np.repeat(np.arange(4), n_mem)
    cand_view = np.repeat(np.arange(5), n_cand)
    mem = synthetic.simulate(views, len(member_view), jax.random.key(1), 0.3, view=member_view)
    cand = synthetic.simulate(views, len(cand_view), jax.random.key(2), 0.3, view=cand_view)
    noise = np.asarray(jax.random.normal(jax.random.key(3), (n_cand, BOX, BOX))) * float(np.asarray(cand.images).std())
    images = np.concatenate([np.asarray(mem.images), np.asarray(cand.images), noise]).astype(np.float32)
    n = len(images)
    params = np.zeros((n, 4), np.float32)
    params[: len(member_view)] = _rows(T.inverse(mem.moves))  # members at their true alignment onto their view
    members = tuple(np.nonzero(member_view == c)[0] for c in range(4))
    averages = np.asarray(views[:4], np.float32)
    candidates = np.arange(len(member_view), n)
    truth = np.concatenate([cand_view, np.full(n_cand, -1)])  # -1: noise
    found = matching.match_particles(images, candidates, members, params, averages, OPTIONS, 0.45, 0.2, 0.1)
    return found, candidates, truth, cand


def test_particles_of_accepted_views_join_their_class(scene):
    found, candidates, truth, _ = scene
    got = dict(zip(found.particles.tolist(), found.classes.tolist()))
    seen = [i for i, c in zip(candidates, truth) if 0 <= c < 4]
    joined = [i for i in seen if i in got]
    assert len(joined) >= 0.7 * len(seen)  # at SNR 0.3, 90 % of members reach the threshold (quantile 0.1)
    truth_of = dict(zip(candidates.tolist(), truth.tolist()))
    assert all(got[i] == truth_of[i] for i in joined)  # every one in the right class


def test_noise_and_unseen_views_stay_out(scene):
    found, candidates, truth, _ = scene
    truth_of = dict(zip(candidates.tolist(), truth.tolist()))
    outsiders = [truth_of[i] for i in found.particles.tolist() if truth_of[i] in (-1, 4)]
    assert sum(t == -1 for t in outsiders) == 0  # no pure-noise image
    assert sum(t == 4 for t in outsiders) <= 5  # a fifth view looks partly like some class: at most 1 in 5


def test_matched_particles_are_aligned_onto_their_class(scene):
    found, candidates, truth, cand = scene
    pos = {int(i): j for j, i in enumerate(candidates)}
    true = T.inverse(cand.moves)
    rows = [pos[int(i)] for i in found.particles]
    # the class average is the clean view at identity: the found alignment is the inverse of the simulated move,
    # up to the angular sampling (1.4 deg at 256 samples; sub-sample refined, noisy)
    assert np.median(angle_difference(found.params[:, 0], np.asarray(true.angle)[rows])) < 2.0
    assert np.all((found.params[:, 3] > 0.5) == np.asarray(true.mirror)[rows])


def test_matches_join_the_run_state_and_leave_the_pool():
    n = 10
    state = isac.IsacState.start(n)._replace(
        generation=1, pool=np.array([4, 5, 6, 7, 8, 9]), averages=(np.zeros((4, 4)), np.zeros((4, 4))),
        members=(np.array([0, 1]), np.array([2, 3])), candidates=(2, 2),
        class_of=np.array([0, 0, 1, 1, -1, -1, -1, -1, -1, -1]),
        history=({"generation": 1, "accounted": 4, "accounted_total": 4},))
    found = matching.Matches(np.array([5, 8]), np.array([1, 0]), np.ones((2, 4), np.float32),
                             np.zeros((2, 2), np.float32), np.zeros((2, 2), np.float32))
    p = isac.IsacParams(img_per_grp=2, minimum_grp_size=1, matching=True)
    after = isac.accept_matches(state, found, p, 2)
    assert after.class_of.tolist() == [0, 0, 1, 1, -1, 1, -1, -1, 0, -1]
    assert after.pool.tolist() == [4, 6, 7, 9]
    assert [m.tolist() for m in after.members] == [[0, 1, 8], [2, 3, 5]]
    assert np.isnan(after.errors[[5, 8]]).all()  # not tested for stability: no pixel error
    assert after.history[-1]["matched"] == 2 and after.history[-1]["accounted_total"] == 6
    assert state.class_of[5] == -1  # pure


def test_bad_quantile_is_refused():
    with pytest.raises(ValueError, match="isac.match_quantile"):
        isac.IsacParams(match_quantile=1.5).validate()
