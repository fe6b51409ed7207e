"""Algorithm layer: ISAC2's stability test of one class: do ``L`` independent alignments of its members agree?
(``shared/isac_algorithm.md`` §9, SPHIRE ``multi_align_stability``.)

Input: the ``L`` parameter sets of the ``n`` members of a class (``Transform2D`` with fields ``(L, n)``), each from
a reference-free alignment with a random start, so each run is in its own arbitrary frame. Run ``L - 1`` is the
reference frame; run ``j`` is brought into it by a global correction ``G_j = (g_j, tx_j, ty_j)`` composed after
each member's parameters (``transforms.compose(P_ij, G_j)``; the formulas need not know whether ``G_j`` also
mirrors). A member's pixel error is the spread of its ``L`` corrected parameters, in pixels::

    e_i^2 = r^2 (1 - |sum_j exp(i theta_ij)| / L) + Var_j(X_ij) + Var_j(Y_ij),      r = d / 2 (particle radius)

(the first term is r^2 times one minus the mean resultant length, ~ r^2 sigma_theta^2 / 2 for small spreads).

Steps: (1) mirror stability: the members whose mirror flags agree across runs up to one relabelling per run
(all 2^(L-1) relabellings tried); (2) initial corrections from circular/arithmetic means; (3) members with an
initial error above 3 thresholds are pruned; (4) the 3 (L-1) corrections are refined by L-BFGS (optax) to
minimise the mean squared error of the kept members; (5) members with error below ``threshold`` are stable and
get averaged parameters (mean direction, mean shift, run L-1's mirror).

Everything is a pure function of arrays with a member mask, so classes of different sizes are padded to one
shape and the test is ``vmap``-ed over classes.

The criteria that decide "stable" from these runs (ISAC2's, ISAC 2012's, resolution-scaled) are in
``jisac.criteria``.
"""

from __future__ import annotations

import functools
import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jisac.transforms import Transform2D, wrap_angle

Array = jax.Array


class StabilityResult(NamedTuple):
    """Outcome of the test for one class (fields ``(n,)`` unless noted).

    Attributes:
        stable: bool, the member is stable (error below the threshold).
        error: pixel error with the optimised corrections (inf for members outside the mirror-stable set).
        params: averaged parameters in run ``L - 1``'s frame (meaningful where ``stable``).
        mirror_rate: scalar, fraction of members in the mirror-stable set.
        error_before_pruning: scalar, RMS error over the mirror-stable set with the initial corrections
            (SPHIRE's "average pixel error prior to class pruning").
        corrections: ``(3, L)`` optimised ``(g [deg], tx, ty)`` per run (zeros for run ``L - 1``).
    """

    stable: Array
    error: Array
    params: Transform2D
    mirror_rate: Array
    error_before_pruning: Array
    corrections: Array


def corrected(runs: Transform2D, corr: Array):
    """theta (rad), X, Y of every (run, member) after the corrections ``corr`` = (g rad, tx, ty), each ``(L,)``."""
    g, tx, ty = corr[0][:, None], corr[1][:, None], corr[2][:, None]
    a = jnp.deg2rad(runs.angle)
    m = runs.mirror
    x, y = runs.shift_x, runs.shift_y
    c, s = jnp.cos(g), jnp.sin(g)
    theta = jnp.where(m, a - g, a + g)
    big_x = jnp.where(m, -tx + x * c - y * s, tx + x * c + y * s)
    big_y = jnp.where(m, ty + x * s + y * c, ty - x * s + y * c)
    return theta, big_x, big_y


def _run_mean(a: Array, included: Array | None) -> Array:
    """Mean over runs (axis 0) of ``a`` ``(L, n)``, over the ``included`` runs only when given."""
    if included is None:
        return jnp.mean(a, axis=0)
    w = included.astype(a.real.dtype)[:, None]
    return jnp.sum(w * a, axis=0) / jnp.sum(w)


def squared_pixel_error(runs: Transform2D, corr: Array, radius: float, included: Array | None = None) -> Array:
    """``(n,)`` squared pixel errors for corrections ``corr`` (``(3, L)``: g in radians, tx, ty), over the
    ``included`` runs (``(L,)`` bool) when given, else over all."""
    theta, big_x, big_y = corrected(runs, corr)
    if included is None:
        resultant = jnp.abs(jnp.mean(jnp.exp(1j * theta), axis=0))
        e2 = radius**2 * (1.0 - resultant) + jnp.var(big_x, axis=0) + jnp.var(big_y, axis=0)
        return jnp.maximum(e2, 0.0)
    resultant = jnp.abs(_run_mean(jnp.exp(1j * theta), included))
    var_x = _run_mean((big_x - _run_mean(big_x, included)) ** 2, included)
    var_y = _run_mean((big_y - _run_mean(big_y, included)) ** 2, included)
    return jnp.maximum(radius**2 * (1.0 - resultant) + var_x + var_y, 0.0)


def _relabellings(n_runs: int) -> np.ndarray:
    """``(2^(L-1), L)`` bool: every way to flip the mirror labels of runs 0..L-2 (run L-1 fixed)."""
    flips = np.array(list(itertools.product([False, True], repeat=n_runs - 1)), bool).reshape(-1, n_runs - 1)
    return np.concatenate([flips, np.zeros((len(flips), 1), bool)], 1)


def implied_rotation(runs: Transform2D, theta: Array) -> Array:
    """Each member's own correction angle ``g`` (radians) that ``corrected`` turns its angle into ``theta``
    (radians, broadcast against the fields): ``corrected``'s angle equation solved for ``g``."""
    a = jnp.deg2rad(runs.angle)
    return jnp.where(runs.mirror, a - theta, theta - a)


def implied_translation(runs: Transform2D, g: Array, big_x: Array, big_y: Array) -> tuple[Array, Array]:
    """Each member's own ``(tx, ty)`` that, with the rotation ``g`` (radians, broadcast against the fields),
    ``corrected`` turns its shift into ``(big_x, big_y)``: its shift equations solved for ``(tx, ty)``."""
    c, s = jnp.cos(g), jnp.sin(g)
    x, y, m = runs.shift_x, runs.shift_y, runs.mirror
    # m = 0: (X, Y) = t + R(g) s  ->  t = u - R(g) s;   m = 1: X = -tx + (R(-g) s)_x, Y = ty + (R(-g) s)_y
    tx = jnp.where(m, x * c - y * s - big_x, big_x - (x * c + y * s))
    ty = jnp.where(m, big_y - (x * s + y * c), big_y - (-x * s + y * c))
    return tx, ty


def _initial_corrections(runs: Transform2D, weight: Array) -> Array:
    """Corrections from means over the weighted members (SPHIRE ``align_diff_params``): ``(3, L)``."""
    diff = implied_rotation(runs, jnp.deg2rad(runs.angle)[-1])  # (L, n): g that maps run j's angle onto run L-1's
    g = jnp.angle(jnp.sum(weight * jnp.exp(1j * diff), axis=1))
    tx_i, ty_i = implied_translation(runs, g[:, None], runs.shift_x[-1], runs.shift_y[-1])
    total = jnp.maximum(weight.sum(), 1.0)
    tx = jnp.sum(weight * tx_i, axis=1) / total
    ty = jnp.sum(weight * ty_i, axis=1) / total
    corr = jnp.stack([g, tx, ty])
    return corr.at[:, -1].set(0.0)


def _initial_fit(runs: Transform2D, member: Array, radius: float, included: Array | None):
    """Steps 1-2 of the test: the mirror-stable members ``(n,)`` bool and their squared pixel errors ``(n,)`` with
    the initial corrections ``(3, L)`` (returned as ``(mirror_stable, corr0, e2_0)``)."""
    n_runs = runs.angle.shape[0]
    flips = jnp.asarray(_relabellings(n_runs))  # (F, L)
    relabelled = runs.mirror[None] ^ flips[:, :, None]  # (F, L, n)
    same = relabelled == relabelled[:, -1:]
    if included is not None:
        same = same | ~included[None, :, None]  # a left-out run agrees with anything
    agree = jnp.all(same, axis=1) & member[None]  # (F, n)
    mirror_stable = agree[jnp.argmax(agree.sum(1))]
    corr0 = _initial_corrections(runs, mirror_stable.astype(jnp.float32))
    return mirror_stable, corr0, squared_pixel_error(runs, corr0, radius, included)


def initial_agreement(runs: Transform2D, member: Array, threshold: float, radius: float,
                      included: Array | None = None) -> Array:
    """How many members agree to ``threshold`` pixels with the initial corrections alone (no L-BFGS): a cheap
    screen of run subsets, scalar int. Arguments as ``pixel_error_stability``."""
    mirror_stable, _, e2_0 = _initial_fit(runs, member, radius, included)
    return jnp.sum(mirror_stable & (e2_0 < threshold**2))


@functools.partial(jax.jit, static_argnames=("max_iter",))
def pixel_error_stability(
    runs: Transform2D, member: Array, threshold: float, radius: float, max_iter: int = 50,
    included: Array | None = None,
) -> StabilityResult:
    """The stability test of one class.

    Args:
        runs: parameters from ``L`` independent alignments, fields ``(L, n)`` (angles in degrees, pixels).
        member: ``(n,)`` bool, True for real members (False for padding).
        threshold: pixel-error threshold for "stable", pixels (ISAC ``thld_err``, default 0.7).
        radius: particle radius ``d / 2`` in pixels (ISAC: ``target_radius``, 29).
        max_iter: L-BFGS iterations.
        included: ``(L,)`` bool, the runs the test is made on (the others are ignored; run ``L - 1``, the
            reference frame, must be included); None: all (ISAC2). One compiled program serves every subset.

    Returns:
        ``StabilityResult`` (with ``included``: ``corrections`` NaN for the runs left out).
    """
    mirror_stable, corr0, e2_0 = _initial_fit(runs, member, radius, included)
    n_members = jnp.maximum(member.sum(), 1)
    mirror_rate = mirror_stable.sum() / n_members
    weight = mirror_stable.astype(jnp.float32)
    error_before = jnp.sqrt(jnp.sum(weight * e2_0) / jnp.maximum(weight.sum(), 1.0))
    kept = mirror_stable & (e2_0 <= (3.0 * threshold) ** 2)
    kept_w = kept.astype(jnp.float32)

    def loss(free):  # free: (3, L-1); run L-1 stays the reference frame
        corr = jnp.concatenate([free, jnp.zeros((3, 1), free.dtype)], 1)
        e2 = squared_pixel_error(runs, corr, radius, included)
        return jnp.sum(kept_w * e2) / jnp.maximum(kept_w.sum(), 1.0)

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    def step(carry, _):
        free, state = carry
        value, grad = value_and_grad(free, state=state)
        updates, state = opt.update(grad, state, free, value=value, grad=grad, value_fn=loss)
        return (optax.apply_updates(free, updates), state), None

    free0 = corr0[:, :-1]
    (free, _), _ = jax.lax.scan(step, (free0, opt.init(free0)), None, length=max_iter)
    free = jnp.where(jnp.isfinite(free), free, free0)
    corr = jnp.concatenate([free, jnp.zeros((3, 1), free.dtype)], 1)

    e2 = squared_pixel_error(runs, corr, radius, included)
    error = jnp.where(mirror_stable, jnp.sqrt(e2), jnp.inf)
    stable = kept & (error < threshold) & (kept.sum() > 1)
    theta, big_x, big_y = corrected(runs, corr)
    mean_dir = jnp.angle(_run_mean(jnp.exp(1j * theta), included))
    averaged = Transform2D(
        angle=wrap_angle(jnp.rad2deg(mean_dir)),
        shift_x=_run_mean(big_x, included),
        shift_y=_run_mean(big_y, included),
        mirror=runs.mirror[-1],
    )
    corrections = corr.at[0].set(jnp.rad2deg(corr[0]))
    if included is not None:
        corrections = jnp.where(included[None], corrections, jnp.nan)
    return StabilityResult(stable, error, averaged, mirror_rate, error_before, corrections)


def pixel_error_stability_classes(
    runs: Transform2D, member: Array, threshold: float, radius: float, max_iter: int = 50
) -> StabilityResult:
    """``pixel_error_stability`` for many classes at once: fields ``(c, L, n)``, ``member`` ``(c, n)``."""
    fn = jax.vmap(lambda r, m: pixel_error_stability(r, m, threshold, radius, max_iter))
    return fn(runs, member)
