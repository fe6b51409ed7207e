"""Equal-size assignment of particles to classes (ISAC's "EQ-K-means" step, ``isac_algorithm.md`` §8.1 step 3).

SPHIRE's ``assign_groups``: sort every (particle, class) score in descending order and walk the list, giving a
particle to a class when the particle is still free and the class still open; a class closes when it holds
``n // k`` members, except the last open class, which takes ``n // k + n % k``. The result: every particle
assigned, ``k - 1`` classes of ``n // k`` members and one with the remainder added.

With one score deciding both sides' preferences this greedy result is the unique stable matching, so it does
not depend on how ties between different pairs are broken beyond their order in the sort (stable: the earlier
particle, then the earlier class wins a tie).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


@jax.jit
def assign_equal_size(scores: Array) -> Array:
    """Labels ``(n,)`` int32 in ``[0, k)`` from a ``(n, k)`` score table (higher is better); requires ``n >= k``.

    Exact result of the sequential greedy walk, computed in rounds of O(n k) vectorised work instead of one
    step per pair:

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
    classes = jnp.arange(k)

    def cond(state):
        labels, _, closed = state
        return jnp.any(labels < 0) & ~jnp.all(closed)

    def body(state):
        labels, counts, closed = state
        free = labels < 0
        masked = jnp.where(free[:, None] & ~closed[None, :], scores, -jnp.inf)
        best_c = jnp.argmax(masked, 1)
        best_s = jnp.take_along_axis(masked, best_c[:, None], 1)[:, 0]
        rivals = jnp.where(free[:, None] & (best_c[:, None] != classes[None, :]), scores, -jnp.inf)
        threshold = rivals.max(0)  # (k,)
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

        def single(_):  # the walk's next pair: the best free particle in any open class
            flat = jnp.argmax(masked)
            p, c = flat // k, flat % k
            c_counts = counts.at[c].add(1)
            return labels.at[p].set(c.astype(jnp.int32)), c_counts, closed.at[c].set(c_counts[c] >= cap)

        return jax.lax.cond(jnp.any(accept), bulk, single, None)

    init = (jnp.full((n,), -1, jnp.int32), jnp.zeros((k,), jnp.int32), jnp.zeros((k,), bool))
    labels = jax.lax.while_loop(cond, body, init)[0]

    # Step 2: the class whose closing pair was visited last takes the n % k particles left. Pairs are visited
    # by descending score, ties by ascending flat index p * k + c.
    member = labels[:, None] == classes[None, :]
    flat = jnp.arange(n)[:, None] * k + classes[None, :]
    closing_score = jnp.where(member, scores, jnp.inf).min(0)
    closing_flat = jnp.where(member & (scores == closing_score[None, :]), flat, -1).max(0)
    last = jnp.lexsort((-closing_flat, closing_score))[0]
    return jnp.where(labels < 0, last, labels).astype(jnp.int32)
