"""Class averages: segment sums of aligned members against a float64 reference; chunking and exclusion."""

import jax.numpy as jnp
import numpy as np

from jisac import average
from jisac import transforms as T
from tests import reference_numpy as ref


def test_averages_match_reference_and_ignore_excluded(projections50):
    rng = np.random.default_rng(0)
    n, k = 30, 4
    imgs = projections50[:n]
    labels = rng.integers(-1, k, n)
    labels[:k] = np.arange(k)  # every class has a member
    a, sx, sy, m = rng.uniform(0, 360, n), rng.uniform(-2, 2, n), rng.uniform(-2, 2, n), rng.integers(0, 2, n)
    params = T.make_transform(a, sx, sy, m.astype(bool))
    got = average.class_sums(imgs, params, labels, k, chunk=8)  # 4 chunks, the last padded
    inner = np.hypot(*np.meshgrid(np.arange(76) - 38, np.arange(76) - 38)) < 30
    for c in range(k):
        members = np.nonzero(labels == c)[0]
        assert int(got.counts[c]) == len(members)
        want = sum(ref.apply_transform(imgs[i].astype(np.float64), a[i], sx[i], sy[i], m[i]) for i in members)
        np.testing.assert_allclose(np.asarray(got.sums[c])[inner], want[inner], atol=1e-3 * np.abs(want).max())
    avgs = np.asarray(got.averages())
    np.testing.assert_allclose(avgs[0], np.asarray(got.sums[0]) / int(got.counts[0]), rtol=1e-6)
    one_chunk = average.class_sums(imgs, params, labels, k, chunk=64)
    np.testing.assert_allclose(np.asarray(one_chunk.sums), np.asarray(got.sums), atol=1e-4)


def test_aligned_copies_average_back_to_the_original(structured_image):
    rng = np.random.default_rng(1)
    q = T.make_transform(
        rng.uniform(0, 360, 12), rng.uniform(-2, 2, 12), rng.uniform(-2, 2, 12), rng.integers(0, 2, 12).astype(bool)
    )
    copies = T.apply_transform(jnp.broadcast_to(jnp.asarray(structured_image), (12, 76, 76)), q)
    avg = np.asarray(average.class_averages(copies, T.inverse(q), np.zeros(12, int), 2, chunk=16))
    inner = np.hypot(*np.meshgrid(np.arange(76) - 38, np.arange(76) - 38)) < 28
    corr = np.corrcoef(avg[0][inner], structured_image[inner])[0, 1]
    assert corr > 0.99
    assert np.all(avg[1] == 0)  # an empty class is a zero image


def test_single_limb_bits_leave_no_room_for_overflow():
    """One-limb fixed-point sums: ``count`` terms of at most 2^bits each stay within int32 (2^30 plus headroom),
    with float32's 22 bits up to 256 terms."""
    counts = np.array([1, 2, 100, 256, 257, 512, 513, 1024, 100_000])
    bits = np.asarray(average.single_limb_bits(jnp.asarray(counts)))
    np.testing.assert_array_equal(bits, [22, 22, 22, 22, 21, 21, 20, 20, 13])
    assert np.all(counts.astype(np.int64) << bits.astype(np.int64) <= 1 << 30)
