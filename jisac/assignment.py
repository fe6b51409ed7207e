"""Algorithm layer: Equal-size assignment of particles to classes (ISAC's "EQ-K-means" step, ``isac_algorithm.md``
§8.1 step 3).

SPHIRE's ``assign_groups``: sort every (particle, class) score in descending order and walk the list, giving a
particle to a class when the particle is still free and the class still open; a class closes when it holds
``n // k`` members, except the last open class, which takes ``n // k + n % k``. The result: every particle
assigned, ``k - 1`` classes of ``n // k`` members and one with the remainder added.

With one score deciding both sides' preferences this greedy result is the unique stable matching, so it does
not depend on how ties between different pairs are broken beyond their order in the sort (stable: the earlier
particle, then the earlier class wins a tie).

Memory: the ``(n, k)`` table is the only array of that size (0.8 GB at 200,000 particles and 1,000 classes);
no ``(n, k)`` temporary is made. Each round reads the rows of the particles still free, gathered ``row_block``
at a time (the last block padded with ``-inf`` rows; gathering rather than slicing also means the table is
never padded, which would copy it), so the working memory is ``O(row_block * k)`` plus ``O(n + k)`` vectors.
Reading only the free rows also saves time, since most particles are taken in the first rounds: at 60,000 x
1,000 random scores the 33 rounds read about 6 tables' worth of rows, not 33.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array


def _best_open_classes(scores: Array, labels: Array, closed: Array, block: int) -> tuple[Array, Array, Array]:
    """One round's reads of the table, over the free particles' rows, ``block`` rows at a time.

    Args: ``scores (n, k)``; ``labels (n,)`` int32, ``-1`` for a free particle; ``closed (k,)`` bool.
    Returns ``best_c (n,)`` int32, each free particle's best open class (the first of equal scores);
    ``best_s (n,)`` its score; ``threshold (k,)``, the best score for each class among the free particles whose
    best open class is another. A particle not free gets class 0 and score ``-inf``, as an argmax over a row of
    ``-inf`` would give.
    """
    n, k = scores.shape
    free = labels < 0
    n_free = jnp.sum(free)
    n_pad = -(-n // block) * block
    rows = jnp.nonzero(free, size=n_pad, fill_value=n)[0]  # (n_pad,) the free rows in order, then n (padding)
    classes = jnp.arange(k)

    def one_block(i, acc):
        best_c, best_s, threshold = acc
        r = jax.lax.dynamic_slice_in_dim(rows, i * block, block)  # (block,)
        # padding rows (index n) read as -inf, so they add nothing to the maxima, and their results are dropped
        s = scores.at[r].get(mode="fill", fill_value=-jnp.inf)  # (block, k)
        masked = jnp.where(~closed[None, :], s, -jnp.inf)
        c = jnp.argmax(masked, 1).astype(jnp.int32)  # (block,)
        b = jnp.take_along_axis(masked, c[:, None], 1)[:, 0]
        rivals = jnp.where(c[:, None] != classes[None, :], s, -jnp.inf).max(0)  # (k,)
        return (best_c.at[r].set(c, mode="drop"), best_s.at[r].set(b, mode="drop"), jnp.maximum(threshold, rivals))

    init = (jnp.zeros((n,), jnp.int32), jnp.full((n,), -jnp.inf, scores.dtype), jnp.full((k,), -jnp.inf, scores.dtype))
    return jax.lax.fori_loop(0, -(-n_free // block), one_block, init)


@functools.partial(jax.jit, static_argnames=("row_block",))
def assign_equal_size(scores: Array, *, row_block: int = 8192) -> Array:
    """Labels ``(n,)`` int32 in ``[0, k)`` from a ``(n, k)`` score table (higher is better); requires ``n >= k``.

    ``row_block``: rows of the table read at a time; the result does not depend on it. Working memory is about
    three ``(row_block, k)`` float32 blocks (100 MB at the default and k = 1,000); smaller blocks are also a
    little faster on CPU (cache) but mean more loop steps, each with a fixed cost on a GPU.

    Exact result of the sequential greedy walk, computed in rounds of vectorised work over the free particles
    instead of one step per pair:

    1. Walk with every capacity ``n // k`` (the walk is the same up to the last closing; see below). In a round
       every free particle looks at its best open class ``c``; it is taken there now if its score beats every
       other free particle's score for ``c`` that could still compete for the slot (those whose best open
       class is elsewhere: threshold ``T_c``), in score order up to the class's free capacity. Each such pair
       is one the walk takes, whatever happens in other classes: nothing above it can fill ``c`` or take the
       particle. A round that takes nothing (exact ties) takes the single best pair instead.
    2. The real walk differs only in that its last open class does not close at ``n // k``: it goes on and takes
       the ``n % k`` particles left. That class is the one that closed last in step 1, i.e. whose closing pair
       (its lowest-scoring member) comes last in the sorted order.
    """
    n, k = scores.shape
    cap = n // k
    block = min(row_block, n)

    def cond(state):
        labels, _, closed = state
        return jnp.any(labels < 0) & ~jnp.all(closed)

    def body(state):
        labels, counts, closed = state
        free = labels < 0
        best_c, best_s, threshold = _best_open_classes(scores, labels, closed, block)
        cand = free & (best_s > threshold[best_c])
        # rank of each candidate inside its class, best first (non-candidates sorted after everything)
        sort_class = jnp.where(cand, best_c, k)
        order = jnp.lexsort((-best_s, sort_class))
        n_cand = jnp.bincount(sort_class, length=k + 1)
        start = jnp.cumsum(n_cand) - n_cand
        rank = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32)) - start[sort_class]
        accept = cand & (rank < (cap - counts)[best_c])

        def bulk(_):
            new_counts = counts + jnp.bincount(jnp.where(accept, best_c, k), length=k + 1)[:k]
            return jnp.where(accept, best_c, labels).astype(jnp.int32), new_counts, new_counts >= cap

        def single(_):
            # The walk's next pair: the best free particle in any open class. The first maximum of the table
            # in row-major order is the first row with the highest best_s, at that row's (first) best class.
            p = jnp.argmax(best_s)
            c = best_c[p]
            c_counts = counts.at[c].add(1)
            return labels.at[p].set(c), c_counts, closed.at[c].set(c_counts[c] >= cap)

        return jax.lax.cond(jnp.any(accept), bulk, single, None)

    init = (jnp.full((n,), -1, jnp.int32), jnp.zeros((k,), jnp.int32), jnp.zeros((k,), bool))
    labels = jax.lax.while_loop(cond, body, init)[0]

    # Step 2: the class whose closing pair was visited last takes the n % k particles left. Pairs are visited by
    # descending score, ties by ascending flat index p * k + c; within one class that is ascending p, and two
    # classes cannot tie on both score and p (a particle is in one class), so (score, p) per class is enough
    # and no flat index (int32 overflow beyond n * k = 2^31) is formed. Only the n assigned scores are read.
    assigned = labels >= 0
    segment = jnp.where(assigned, labels, k)  # unassigned particles go to a dropped segment k
    own = jnp.take_along_axis(scores, jnp.where(assigned, labels, 0)[:, None], 1)[:, 0]  # (n,)
    closing_score = jnp.full((k + 1,), jnp.inf, scores.dtype).at[segment].min(own)
    at_closing = own == closing_score[segment]
    closing_p = jnp.full((k + 1,), -1, jnp.int32).at[segment].max(
        jnp.where(at_closing, jnp.arange(n, dtype=jnp.int32), -1))
    # lowest closing score, then the latest particle; classes with no member (only with -inf scores) tie at
    # (inf, -1) and the first wins, as in a stable sort of the flat indices
    last = jnp.lexsort((-closing_p[:k], closing_score[:k]))[0]
    return jnp.where(assigned, labels, last).astype(jnp.int32)
