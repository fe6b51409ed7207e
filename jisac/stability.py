"""ISAC2's stability test of one class: do ``L`` independent alignments of its members agree?
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

Criteria (``stability=<name>``; ``CRITERIA``, ``make_criterion``). All three see the same ``L`` within-group
alignments of every class; they differ in what "stable" means:

- ``pixel_error`` (default, ISAC2): the test above, ``e_i < thld_err``.
- ``reproducibility`` (ISAC 2012, ``isac_algorithm.md`` §11): class *membership* must be reproducible. The 2012
  program ran ``indep_run`` whole SAC runs from different initial references and kept the members found
  together in two-way-matched classes of every run. jisac has one run, so the ``L`` within-group alignments
  stand in for the independent runs: from each run ``j`` the classes are averaged with run ``j``'s parameters,
  the round's particles are re-assigned to those averages (multi-reference alignment + equal-size assignment,
  one EQ-K-means step), the new partition is matched one-to-one with the round's classes (maximum total overlap,
  SPHIRE's ``match_2_way`` for two partitions), and a member is stable if it lands back in its own (matched)
  class in at least ``min_fraction`` of the runs -- and, with ``within_class`` (default, as in 2012 where each
  run's classes had passed the pixel-error test), also passes the pixel-error test. Departures from 2012: the
  runs share the round's EQ-K-means partition and differ only by their within-group alignments (not by initial
  references and whole SAC histories), the matching is against the round's partition rather than between runs,
  it is exact (an assignment problem) rather than branch-and-bound with a size threshold (``thld_grp`` is played
  by ``minimum_grp_size``), and there are no separate candidate/validation phases. It catches members that align
  consistently but belong to another view, which the pixel error cannot see; it costs ``L`` extra
  multi-reference alignments per round.
- ``resolution`` (new): the pixel error measured in units of the class's own resolution. A fixed 0.7 px is
  demanding for a class whose average only holds information to 0.1 cycles/px (a 10 px resolution element) and
  is what makes ISAC2 account few particles at low SNR; a misalignment spread ``e`` only blurs what the class
  can resolve when ``e`` is a sizeable fraction of ``1 / f_c``. So the threshold of class ``c`` is
  ``clip(fraction / f_c, thld_err, max_error)`` with ``f_c`` the split-half FRC resolution of the class
  (``frc_threshold``, default 0.5): never stricter than ISAC2, never more lenient than ``max_error`` px. A
  Gaussian spread of ``e`` px damps the signal at ``f_c`` by ``exp(-(pi e f_c)^2)``: ``fraction`` 0.3 keeps
  40 % of it, and equals ISAC2's 0.7 px at 0.43 cycles/px.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jisac.filters import fourier_ring_correlation, frc_resolution
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


def _corrected(runs: Transform2D, corr: Array):
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


def squared_pixel_error(runs: Transform2D, corr: Array, radius: float) -> Array:
    """``(n,)`` squared pixel errors for corrections ``corr`` (``(3, L)``: g in radians, tx, ty)."""
    theta, big_x, big_y = _corrected(runs, corr)
    resultant = jnp.abs(jnp.mean(jnp.exp(1j * theta), axis=0))
    e2 = radius**2 * (1.0 - resultant) + jnp.var(big_x, axis=0) + jnp.var(big_y, axis=0)
    return jnp.maximum(e2, 0.0)


def _relabellings(n_runs: int) -> np.ndarray:
    """``(2^(L-1), L)`` bool: every way to flip the mirror labels of runs 0..L-2 (run L-1 fixed)."""
    flips = np.array(list(itertools.product([False, True], repeat=n_runs - 1)), bool).reshape(-1, n_runs - 1)
    return np.concatenate([flips, np.zeros((len(flips), 1), bool)], 1)


def _initial_corrections(runs: Transform2D, weight: Array) -> Array:
    """Corrections from means over the weighted members (SPHIRE ``align_diff_params``): ``(3, L)``."""
    a = jnp.deg2rad(runs.angle)
    m = runs.mirror
    ref_a = a[-1]
    diff = jnp.where(m, a - ref_a, ref_a - a)  # (L, n): g that maps run j's angle onto run L-1's
    g = jnp.angle(jnp.sum(weight * jnp.exp(1j * diff), axis=1))
    c, s = jnp.cos(g)[:, None], jnp.sin(g)[:, None]
    x, y = runs.shift_x, runs.shift_y
    ux, uy = x[-1], y[-1]
    # m = 0: (X, Y) = t + R(g) s  ->  t = u - R(g) s;   m = 1: X = -tx + (R(-g) s)_x, Y = ty + (R(-g) s)_y
    tx_i = jnp.where(m, x * c - y * s - ux, ux - (x * c + y * s))
    ty_i = jnp.where(m, uy - (x * s + y * c), uy - (-x * s + y * c))
    total = jnp.maximum(weight.sum(), 1.0)
    tx = jnp.sum(weight * tx_i, axis=1) / total
    ty = jnp.sum(weight * ty_i, axis=1) / total
    corr = jnp.stack([g, tx, ty])
    return corr.at[:, -1].set(0.0)


@functools.partial(jax.jit, static_argnames=("max_iter",))
def pixel_error_stability(
    runs: Transform2D, member: Array, threshold: float, radius: float, max_iter: int = 50
) -> StabilityResult:
    """The stability test of one class.

    Args:
        runs: parameters from ``L`` independent alignments, fields ``(L, n)`` (angles in degrees, pixels).
        member: ``(n,)`` bool, True for real members (False for padding).
        threshold: pixel-error threshold for "stable", pixels (ISAC ``thld_err``, default 0.7).
        radius: particle radius ``d / 2`` in pixels (ISAC: ``target_radius``, 29).
        max_iter: L-BFGS iterations.

    Returns:
        ``StabilityResult``.
    """
    n_runs = runs.angle.shape[0]
    flips = jnp.asarray(_relabellings(n_runs))  # (F, L)
    relabelled = runs.mirror[None] ^ flips[:, :, None]  # (F, L, n)
    agree = jnp.all(relabelled == relabelled[:, -1:], axis=1) & member[None]  # (F, n)
    best = jnp.argmax(agree.sum(1))
    mirror_stable = agree[best]
    n_members = jnp.maximum(member.sum(), 1)
    mirror_rate = mirror_stable.sum() / n_members

    weight = mirror_stable.astype(jnp.float32)
    corr0 = _initial_corrections(runs, weight)
    e2_0 = squared_pixel_error(runs, corr0, radius)
    error_before = jnp.sqrt(jnp.sum(weight * e2_0) / jnp.maximum(weight.sum(), 1.0))
    kept = mirror_stable & (e2_0 <= (3.0 * threshold) ** 2)
    kept_w = kept.astype(jnp.float32)

    def loss(free):  # free: (3, L-1); run L-1 stays the reference frame
        corr = jnp.concatenate([free, jnp.zeros((3, 1), free.dtype)], 1)
        e2 = squared_pixel_error(runs, corr, radius)
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

    e2 = squared_pixel_error(runs, corr, radius)
    error = jnp.where(mirror_stable, jnp.sqrt(e2), jnp.inf)
    stable = kept & (error < threshold) & (kept.sum() > 1)
    theta, big_x, big_y = _corrected(runs, corr)
    mean_dir = jnp.angle(jnp.mean(jnp.exp(1j * theta), axis=0))
    averaged = Transform2D(
        angle=wrap_angle(jnp.rad2deg(mean_dir)),
        shift_x=big_x.mean(0),
        shift_y=big_y.mean(0),
        mirror=runs.mirror[-1],
    )
    corrections = corr.at[0].set(jnp.rad2deg(corr[0]))
    return StabilityResult(stable, error, averaged, mirror_rate, error_before, corrections)


def pixel_error_stability_classes(
    runs: Transform2D, member: Array, threshold: float, radius: float, max_iter: int = 50
) -> StabilityResult:
    """``pixel_error_stability`` for many classes at once: fields ``(c, L, n)``, ``member`` ``(c, n)``."""
    fn = jax.vmap(lambda r, m: pixel_error_stability(r, m, threshold, radius, max_iter))
    return fn(runs, member)


# ------------------------------------------------------------------------------------ pluggable criteria
#
# A stability criterion is a value: a function ``criterion(runs, member, images=None, labels=None)`` taking the
# L parameter sets of every class (``Transform2D`` with fields ``(c, L, n)``, padded), the member mask ``(c, n)``
# and, for criteria that need them, the working stack and the members' indices into it (``(c, n)``, -1 padding);
# it returns a ``StabilityResult`` with fields ``(c, n)`` (``stable``, a per-member ``error`` score where lower
# is better, averaged ``params``). The ISAC loop calls whichever criterion it is given; ``make_criterion``
# builds one from the ``stability`` config group. ``criterion.name`` names the criterion and its options (it is
# part of a run's fingerprint, so a restart with other options is refused).
#
# Every criterion below reports ISAC2's pixel error as ``error`` and the pixel-error test's averaged parameters
# as ``params``, so a run's outputs (``jisacPixelError``, parameters) mean the same whichever criterion chose
# the stable members.


def _option_name(name: str, **options) -> str:
    return name + "[" + ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in options.items()) + "]"


def _need_images(name: str, images, labels) -> None:
    if images is None or labels is None:
        raise ValueError(f"stability={name} needs the working stack and the members' indices (images=, labels=)")


def pixel_error_criterion(threshold: float, radius: float, max_iter: int = 50):
    """ISAC2's criterion (the default): a member is stable if its pixel error is below ``threshold``."""

    def criterion(runs: Transform2D, member: Array, images=None, labels=None) -> StabilityResult:
        return pixel_error_stability_classes(runs, member, threshold, radius, max_iter)

    criterion.name = "pixel_error"
    return criterion


# ------------------------------------------------------------------ ISAC (2012): reproducible class membership


def match_two_way(reference: np.ndarray, other: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one matching of the classes of two partitions of the same particles, maximising the total size of
    the matched intersections (the two-partition case of SPHIRE's ``match_2_way``, solved exactly as an
    assignment problem).

    Args:
        reference, other: ``(m,)`` int labels in ``[0, n_classes)`` of the same ``m`` particles.
        n_classes: number of classes of both partitions.

    Returns:
        ``(match, overlap)``, both ``(n_classes,)`` and indexed by the classes of ``other``: the matched class of
        ``reference`` and the size of the matched intersection.
    """
    from scipy.optimize import linear_sum_assignment

    reference, other = np.asarray(reference, np.int64), np.asarray(other, np.int64)
    table = np.zeros((n_classes, n_classes), np.int64)
    np.add.at(table, (other, reference), 1)
    rows, cols = linear_sum_assignment(table, maximize=True)
    match = np.empty(n_classes, np.int64)
    match[rows] = cols
    return match, table[rows, cols]


def _members_flat(member, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The real members as flat arrays: class, slot and index into the stack, each ``(m,)``."""
    cls, slot = np.nonzero(np.asarray(member))
    index = np.asarray(labels)[cls, slot]
    if (index < 0).any():
        raise ValueError("labels: a member (member=True) has index -1")
    return cls, slot, index


def reassign_with_run_averages(
    runs: Transform2D, member, images, labels, options, mask_radius: float, lowpass: tuple[float, float] | None
) -> np.ndarray:
    """The round's members re-assigned to each run's class averages.

    For every run ``j``: each class is averaged with run ``j``'s parameters of its members (low-passed with
    ``lowpass = (cutoff, falloff)`` if given, ISAC's final filter), every member is aligned to all the averages
    (multi-reference alignment about its run-``j`` centre, ``align.alignment_scores``) and the members are split
    into classes of equal size (``eqkmeans.assign_equal_size``), as one EQ-K-means step of ISAC.

    Args:
        runs: fields ``(c, L, n)``; member: ``(c, n)`` bool; images: ``(N, ny, nx)``; labels: ``(c, n)`` indices
            into ``images`` (-1 padding); options: ``align.AlignOptions`` of the search; mask_radius: the
            particle radius in pixels (references are mean-subtracted inside it).

    Returns:
        ``(L, m)`` int new class of each of the ``m`` members, in the order of ``np.nonzero(member)``.
    """
    from jisac import align, average, filters
    from jisac.eqkmeans import assign_equal_size

    n_classes, n_runs = runs.angle.shape[:2]
    cls, slot, index = _members_flat(member, labels)
    imgs = np.asarray(images[index], np.float32)  # only the members' rows (images may be a stack on disk)
    mask = filters.circular_mask(imgs.shape[1], imgs.shape[2], mask_radius)
    out = []
    for j in range(n_runs):
        p_j = Transform2D(*(np.asarray(f)[:, j][cls, slot] for f in runs))
        averages = average.class_averages(imgs, p_j, cls, n_classes)
        if lowpass is not None:
            averages = filters.tanh_lowpass(averages, *lowpass)
        bank = align.prepare_references(filters.subtract_masked_mean(averages, mask), options)
        scores = align.alignment_scores(imgs, bank, options, params=p_j, n_references=n_classes)
        out.append(np.asarray(assign_equal_size(scores)))
    return np.stack(out)


def membership_reproducibility(
    runs: Transform2D, member, images, labels, options, mask_radius: float, lowpass: tuple[float, float] | None = None
) -> np.ndarray:
    """``(c, n)`` int: in how many of the ``L`` runs each member is re-assigned to the class matched with its own
    (``reassign_with_run_averages``, then ``match_two_way`` of each run's partition with the round's classes);
    0 for padding."""
    n_classes = runs.angle.shape[0]
    cls, slot, _ = _members_flat(member, labels)
    new = reassign_with_run_averages(runs, member, images, labels, options, mask_radius, lowpass)
    count = np.zeros(np.shape(member), np.int64)
    for labels_j in new:
        match, _ = match_two_way(cls, labels_j, n_classes)
        count[cls, slot] += match[labels_j] == cls
    return count


def reproducibility_criterion(
    threshold: float,
    radius: float,
    min_fraction: float = 1.0,
    within_class: bool = True,
    max_iter: int = 50,
    options=None,
    lowpass: tuple[float, float] | None = (0.45, 0.2),
):
    """ISAC (2012)'s criterion adapted to one SAC round: membership reproducible across the ``L`` runs.

    A member is stable if, in at least ``ceil(min_fraction L)`` of the runs, re-assigning the round's particles
    to that run's class averages puts it back in the class matched with its own (``membership_reproducibility``)
    and, with ``within_class`` (the 2012 program tested both), it also passes ISAC2's pixel-error test at
    ``threshold``.

    Args:
        threshold: pixel-error threshold (``isac.thld_err``), pixels.
        radius: particle radius (``isac.target_radius``), pixels.
        min_fraction: fraction of the runs in ``(0, 1]`` (1: every run, the 2012 intersection).
        within_class: also require the pixel-error test.
        max_iter: L-BFGS iterations of the pixel-error test.
        options: ``align.AlignOptions`` of the re-assignment (default: rings 1..radius, 3x3 shifts, mirror).
        lowpass: ``(cutoff, falloff)`` of the tanh filter on the run averages (ISAC's ``fh``, ``ff``), or None.
    """
    if not 0.0 < min_fraction <= 1.0:
        raise ValueError(f"stability.min_fraction must be in (0, 1] (got {min_fraction})")
    if options is None:
        from jisac import align
        from jisac.polar import RingGeometry

        options = align.AlignOptions(geometry=RingGeometry(1, int(radius), 1))

    def criterion(runs: Transform2D, member: Array, images=None, labels=None) -> StabilityResult:
        _need_images("reproducibility", images, labels)
        base = pixel_error_stability_classes(runs, member, threshold, radius, max_iter)
        n_runs = runs.angle.shape[1]
        count = membership_reproducibility(runs, member, images, labels, options, radius, lowpass)
        reproducible = count >= math.ceil(min_fraction * n_runs - 1e-6)
        stable = np.asarray(member) & reproducible
        if within_class:
            stable &= np.asarray(base.stable)
        # members outside the mirror-stable set have no averaged parameters: they keep the last run's
        finite = jnp.isfinite(base.error)
        last = Transform2D(*(f[:, -1] for f in runs))
        params = Transform2D(*(jnp.where(finite, a, b) for a, b in zip(base.params, last)))
        return base._replace(stable=jnp.asarray(stable), params=params)

    criterion.name = _option_name("reproducibility", min_fraction=min_fraction, within_class=within_class)
    return criterion


# ------------------------------------------------------------------ new: pixel error relative to the resolution


def split_half_resolution(params: Transform2D, member, images, labels, radius: float, frc_threshold: float = 0.5):
    """Resolution of every class (cycles/px) from the FRC of the averages of its two half-sets.

    Members alternate between the halves in slot order; each half is averaged with ``params`` (fields ``(c, n)``,
    one alignment of every member), masked softly at ``radius``, and the FRC's first crossing of
    ``frc_threshold`` is the class's resolution (``frc_resolution``).

    Returns:
        ``(resolution, frc)``: ``(c,)`` cycles/px and the ``(c, nx // 2 + 1)`` curves.
    """
    from jisac import average, filters

    n_classes = np.shape(member)[0]
    cls, slot, index = _members_flat(member, labels)
    rank = (np.cumsum(np.asarray(member), 1) - 1)[cls, slot]
    imgs = np.asarray(images[index], np.float32)  # only the members' rows (images may be a stack on disk)
    p = Transform2D(*(np.asarray(f)[cls, slot] for f in params))
    halves = average.class_averages(imgs, p, 2 * cls + rank % 2, 2 * n_classes)
    ny, nx = imgs.shape[1:]
    halves = filters.subtract_masked_mean(halves, filters.circular_mask(ny, nx, radius))
    halves = halves * filters.soft_circular_mask(ny, nx, radius)
    halves = halves.reshape(n_classes, 2, ny, nx)
    frc = fourier_ring_correlation(halves[:, 0], halves[:, 1])
    return frc_resolution(frc, frc_threshold, nx), frc


def resolution_criterion(
    threshold: float,
    radius: float,
    fraction: float = 0.3,
    max_error: float = 3.0,
    frc_threshold: float = 0.5,
    max_iter: int = 50,
):
    """Pixel error measured against the class's own resolution (new in jisac).

    ISAC2's pixel error ``e_i`` is compared with a per-class threshold instead of a fixed 0.7 px::

        stable  <=>  e_i < clip(fraction / f_c, threshold, max_error)

    where ``f_c`` (cycles/px) is the class's split-half FRC resolution (``split_half_resolution`` at
    ``frc_threshold``, last run's parameters). ``fraction`` is the largest allowed spread as a fraction of the
    class's resolution length ``1 / f_c``; the test is never stricter than ISAC2's (``threshold``) and never
    accepts a spread above ``max_error`` px.

    Args:
        threshold: ISAC2's pixel-error threshold (``isac.thld_err``), the lower bound, pixels.
        radius: particle radius (``isac.target_radius``), pixels.
        fraction: allowed pixel error in units of the resolution length (> 0; 0.3 gives ISAC2's 0.7 px at
            0.43 cycles/px).
        max_error: upper bound of the allowed pixel error, pixels (>= threshold).
        frc_threshold: FRC level that defines the resolution, in (0, 1).
        max_iter: L-BFGS iterations of the pixel-error test.
    """
    if not fraction > 0:
        raise ValueError(f"stability.fraction must be > 0 (got {fraction})")
    if not max_error >= threshold:
        raise ValueError(f"stability.max_error ({max_error}) must be >= isac.thld_err ({threshold})")
    if not 0.0 < frc_threshold < 1.0:
        raise ValueError(f"stability.frc_threshold must be in (0, 1) (got {frc_threshold})")

    def criterion(runs: Transform2D, member: Array, images=None, labels=None) -> StabilityResult:
        _need_images("resolution", images, labels)
        base = pixel_error_stability_classes(runs, member, threshold, radius, max_iter)
        last = Transform2D(*(f[:, -1] for f in runs))
        resolution, _ = split_half_resolution(last, member, images, labels, radius, frc_threshold)
        allowed = jnp.clip(fraction / resolution, threshold, max_error)  # (c,)
        finite = jnp.isfinite(base.error)  # the mirror-stable members
        enough = finite.sum(1, keepdims=True) > 1
        stable = jnp.asarray(member) & finite & enough & (base.error < allowed[:, None])
        return base._replace(stable=stable)

    criterion.name = _option_name(
        "resolution", fraction=fraction, max_error=max_error, frc_threshold=frc_threshold
    )
    return criterion


CRITERIA = {
    "pixel_error": pixel_error_criterion,
    "reproducibility": reproducibility_criterion,
    "resolution": resolution_criterion,
}


def make_criterion(name: str, threshold: float, radius: float, **options):
    """The criterion called ``name`` (``stability=<name>`` on the command line) with its options.

    Raises ``ValueError`` naming the parameter for an unknown criterion, a threshold or radius that is not
    positive, or an invalid option value.
    """
    if name not in CRITERIA:
        raise ValueError(f"stability={name!r} is not a known criterion; choose one of {sorted(CRITERIA)}")
    if not threshold > 0:
        raise ValueError(f"isac.thld_err (the stability threshold) must be > 0 (got {threshold})")
    if not radius > 0:
        raise ValueError(f"isac.target_radius (the particle radius) must be > 0 (got {radius})")
    return CRITERIA[name](threshold, radius, **options)
