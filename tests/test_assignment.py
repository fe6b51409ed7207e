"""Equal-size assignment against a plain-Python transcription of SPHIRE's greedy walk."""

import jax.numpy as jnp
import numpy as np
import pytest

from jisac.assignment import assign_equal_size


def greedy_reference(scores: np.ndarray) -> np.ndarray:
    n, k = scores.shape
    cap, rem = n // k, n % k
    order = np.argsort(-scores.ravel(), kind="stable")
    labels = np.full(n, -1)
    counts = np.zeros(k, int)
    closed = np.zeros(k, bool)
    for flat in order:
        p, c = divmod(int(flat), k)
        if labels[p] >= 0 or closed[c]:
            continue
        labels[p] = c
        counts[c] += 1
        capacity = cap + rem if (~closed).sum() == 1 else cap
        if counts[c] >= capacity:
            closed[c] = True
        if (labels >= 0).all():
            break
    return labels


CASES = [(60, 6, 0, False), (67, 6, 1, False), (200, 7, 2, False), (31, 30, 3, False), (50, 1, 4, False),
         (503, 10, 5, False), (97, 8, 6, True), (300, 12, 7, True)]


def clustered_scores(n: int, k: int, seed: int, ties: bool) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # clustered particles: strong, shared preferences make classes overflow, the hard case for the walk
    centres = rng.standard_normal((3, k))
    scores = (centres[rng.integers(0, 3, n)] + 0.5 * rng.standard_normal((n, k))).astype(np.float32)
    if ties:
        scores = np.round(scores, 1)  # many exactly equal scores
    return scores


@pytest.mark.parametrize("n,k,seed,ties", CASES)
def test_matches_greedy_reference_and_sizes(n, k, seed, ties):
    scores = clustered_scores(n, k, seed, ties)
    labels = np.asarray(assign_equal_size(jnp.asarray(scores)))
    np.testing.assert_array_equal(labels, greedy_reference(scores))
    sizes = np.sort(np.bincount(labels, minlength=k))
    assert (labels >= 0).all()
    assert (sizes[:-1] == n // k).all() and sizes[-1] == n // k + n % k


@pytest.mark.parametrize("n,k,seed,ties,row_block", [case + (block,) for case, block in zip(CASES, [7, 16] * 4)])
def test_row_blocks_do_not_change_the_result(n, k, seed, ties, row_block):
    """Blocks smaller than n, n not a multiple of them (the last block of free rows is partly padding)."""
    scores = clustered_scores(n, k, seed, ties)
    labels = np.asarray(assign_equal_size(jnp.asarray(scores), row_block=row_block))
    np.testing.assert_array_equal(labels, greedy_reference(scores))


def test_clear_preferences_are_respected():
    """Particles that each strongly prefer a different class, in equal numbers, all get their choice."""
    rng = np.random.default_rng(5)
    truth = np.repeat(np.arange(5), 8)
    rng.shuffle(truth)
    scores = rng.uniform(0, 0.1, (40, 5)).astype(np.float32)
    scores[np.arange(40), truth] += 1.0
    np.testing.assert_array_equal(np.asarray(assign_equal_size(jnp.asarray(scores))), truth)


def test_over_full_class_pushes_its_weakest_members_elsewhere():
    # 4 particles all prefer class 0 but only 2 fit: the 2 with the highest class-0 scores keep it.
    scores = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.95, 0.4]], np.float32)
    np.testing.assert_array_equal(np.asarray(assign_equal_size(jnp.asarray(scores))), [0, 1, 1, 0])


def test_random_tables_match_the_walk():
    """Many small random tables (clustered, some with ties): the round-based result is the walk's."""
    rng = np.random.default_rng(123)
    shapes = [(40, 5), (47, 6), (79, 11), (23, 2)]  # few shapes: one compilation each
    for trial in range(80):
        n, k = shapes[trial % len(shapes)]
        centres = rng.standard_normal((3, k))
        scores = (
            centres[rng.integers(0, 3, n)] + rng.uniform(0.1, 1.0) * rng.standard_normal((n, k))
        ).astype(np.float32)
        if trial % 3 == 0:
            scores = np.round(scores, 1)
        np.testing.assert_array_equal(np.asarray(assign_equal_size(jnp.asarray(scores))), greedy_reference(scores))
