"""Pre-alignment finds how far each particle sits from the box centre (up to one common offset)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jisac import filters, prealign, synthetic
from jisac import transforms as T


def test_search_stages_follow_sphire():
    assert prealign.search_stages(77, 29) == [(8, 2), (4, 1)]
    assert prealign.search_stages(64, 29) == [(2, 1)]
    with pytest.raises(ValueError, match="target_radius"):
        prealign.search_stages(50, 29)


def test_recovers_relative_centres(projections50):
    rng = np.random.default_rng(0)
    n = 48
    box, radius = 64, 22
    views = projections50[[3, 3, 3, 8]][rng.integers(0, 4, n)][:, 6:70, 6:70]  # one dominant view, 64 px
    offsets = rng.uniform(-3, 3, (n, 2))
    q = T.make_transform(rng.uniform(0, 360, n), offsets[:, 0], offsets[:, 1], rng.integers(0, 2, n).astype(bool))
    parts = synthetic.add_noise(T.apply_transform(jnp.asarray(views), q), 1.0, jax.random.key(0))
    parts = np.asarray(filters.normalize_in_mask(parts, filters.circular_mask(box, box, radius)))
    shifts = prealign.prealign(parts, radius, jax.random.key(1), prealign.PrealignOptions(maxit=6))
    # the particle centre in the raw image is T_q(0), q's shift x-mirrored when q mirrors: the correction must be
    # its negative, up to a common offset
    centres = np.stack([np.asarray(c) for c in T.particle_centre(T.inverse(q))], -1)
    residual = shifts + centres
    residual -= np.median(residual, 0)
    assert np.median(np.hypot(*residual.T)) < 1.0


def test_stages_end_when_the_centres_settle(projections50):
    """A stage stops once a pass moves at most 2 % of the centres (by more than 0.05 px); the centres then agree
    with those of the full schedule (``unsettled=-1``: every pass) for almost every particle."""
    rng = np.random.default_rng(1)
    n, box, radius = 48, 64, 22
    views = projections50[[3, 3, 3, 8]][rng.integers(0, 4, n)][:, 6:70, 6:70]
    offsets = rng.uniform(-3, 3, (n, 2))
    q = T.make_transform(rng.uniform(0, 360, n), offsets[:, 0], offsets[:, 1], rng.integers(0, 2, n).astype(bool))
    parts = synthetic.add_noise(T.apply_transform(jnp.asarray(views), q), 1.0, jax.random.key(0))
    parts = np.asarray(filters.normalize_in_mask(parts, filters.circular_mask(box, box, radius)))
    passes = {}

    def run(options):
        log = []
        shifts = prealign.prealign(parts, radius, jax.random.key(1), options, progress=log.append)
        passes[options.unsettled] = len(log)
        assert [st.done for st in log[:3]] == [1, 2, 3] and log[0].unit == "pass"
        return shifts

    early = run(prealign.PrealignOptions(maxit=10))
    again = run(prealign.PrealignOptions(maxit=10))
    full = run(prealign.PrealignOptions(maxit=10, unsettled=-1.0))
    np.testing.assert_array_equal(early, again)  # same seed, same result
    assert passes[-1.0] == 20 and passes[0.02] < 20  # two stages (8 px step 2, 4 px step 1)
    assert np.mean(np.hypot(*(early - full).T) <= 1.0) >= 0.9
