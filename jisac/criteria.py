"""Algorithm layer: stability criteria, the choice of which class members count as stable.

A criterion is a value, ``Criterion(name, score)``: ``score(runs, member, images=None, labels=None)`` takes the
L parameter sets of every class (``Transform2D`` with fields ``(c, L, n)``, padded), the member mask ``(c, n)``
and, for criteria that need them, the working stack and the members' indices into it (``(c, n)``, -1 padding);
it returns a ``stability.StabilityResult`` with fields ``(c, n)`` (``stable``, a per-member ``error`` score where
lower is better, averaged ``params``). ``name`` names the criterion and its options (it is part of a run's
fingerprint, so a restart with other options is refused). ``make_criterion`` builds one from the ``stability``
config group; ``score`` is a ``functools.partial`` of a module-level function, so its options can be read back.

Every criterion reports ISAC2's pixel error as ``error`` and the pixel-error test's averaged parameters as
``params`` (``consensus``: over the runs it kept), so a run's outputs (``jisacPixelError``, parameters) mean the
same whichever criterion chose the stable members.

Criteria (``stability=<name>``; ``CRITERIA``, ``make_criterion``). All four see the same ``L`` within-group
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
- ``consensus`` (new): ISAC2's test on the largest agreeing subset of the runs. Every subset of at least
  ``min_runs`` of the ``L`` runs is screened per class with the initial corrections alone, and the best subset
  and the full set get the whole test; the one with more stable members decides. At low SNR a reference-free
  alignment from a random start often fails to converge, and ISAC2's test, which needs all ``L`` runs to agree,
  then rejects even a perfect class (``docs/lowsnr.md``); here one or two lost runs are tolerated while the
  remaining ``min_runs`` must still agree to ``thld_err``; a class never keeps fewer members than under ISAC2's
  test (a few may be others). Its ``error`` is the pixel error over the kept runs. With ``per_member`` the runs
  the class's test left out are brought into its frame (fitted on its stable members) and a member is also stable
  when some ``min_runs`` of the usable runs agree on it: at low SNR a member's own alignment is lost in one run or
  another, not always the same one (``docs/lowsnr.md``).
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jisac import align, average, filters
from jisac.assignment import assign_equal_size
from jisac.filters import fourier_ring_correlation, frc_resolution
from jisac.polar import RingGeometry
from jisac.stability import (
    StabilityResult,
    corrected,
    implied_rotation,
    implied_translation,
    initial_agreement,
    pixel_error_stability,
    pixel_error_stability_classes,
    squared_pixel_error,
)
from jisac.transforms import Transform2D, wrap_angle

Array = jnp.ndarray


class Criterion(NamedTuple):
    """A stability criterion: its ``name`` (with options) and its ``score`` function (module docstring)."""

    name: str
    score: Callable[..., StabilityResult]


def _option_name(name: str, **options) -> str:
    return name + "[" + ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in options.items()) + "]"


def _need_images(name: str, images, labels) -> None:
    if images is None or labels is None:
        raise ValueError(f"stability={name} needs the working stack and the members' indices (images=, labels=)")


def pixel_error_score(runs: Transform2D, member: Array, images=None, labels=None, *, threshold: float,
                      radius: float, max_iter: int = 50) -> StabilityResult:
    """ISAC2's criterion (the default): a member is stable if its pixel error is below ``threshold``."""
    return pixel_error_stability_classes(runs, member, threshold, radius, max_iter)


def pixel_error_criterion(threshold: float, radius: float, max_iter: int = 50) -> Criterion:
    return Criterion("pixel_error", functools.partial(pixel_error_score, threshold=threshold, radius=radius,
                                                      max_iter=max_iter))


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
    reference, other = np.asarray(reference, np.int64), np.asarray(other, np.int64)
    table = np.zeros((n_classes, n_classes), np.int64)
    np.add.at(table, (other, reference), 1)
    from scipy.optimize import linear_sum_assignment  # here: 0.2 s of import that only this criterion needs

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
    into classes of equal size (``assignment.assign_equal_size``), as one EQ-K-means step of ISAC.

    Args:
        runs: fields ``(c, L, n)``; member: ``(c, n)`` bool; images: ``(N, ny, nx)``; labels: ``(c, n)`` indices
            into ``images`` (-1 padding); options: ``align.AlignOptions`` of the search; mask_radius: the
            particle radius in pixels (references are mean-subtracted inside it).

    Returns:
        ``(L, m)`` int new class of each of the ``m`` members, in the order of ``np.nonzero(member)``.
    """
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


def reproducibility_score(runs: Transform2D, member: Array, images=None, labels=None, *, threshold: float,
                          radius: float, min_fraction: float, within_class: bool, max_iter: int, options,
                          lowpass) -> StabilityResult:
    """``reproducibility_criterion``'s test (its arguments are documented there)."""
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
        options = align.AlignOptions(geometry=RingGeometry(1, int(radius), 1))

    score = functools.partial(reproducibility_score, threshold=threshold, radius=radius, min_fraction=min_fraction,
                              within_class=within_class, max_iter=max_iter, options=options, lowpass=lowpass)
    return Criterion(_option_name("reproducibility", min_fraction=min_fraction, within_class=within_class), score)


# ------------------------------------------------------------------ new: pixel error relative to the resolution


def split_half_resolution(params: Transform2D, member, images, labels, radius: float, frc_threshold: float = 0.5):
    """Resolution of every class (cycles/px) from the FRC of the averages of its two half-sets.

    Members alternate between the halves in slot order; each half is averaged with ``params`` (fields ``(c, n)``,
    one alignment of every member), masked softly at ``radius``, and the FRC's first crossing of
    ``frc_threshold`` is the class's resolution (``frc_resolution``).

    Returns:
        ``(resolution, frc)``: ``(c,)`` cycles/px and the ``(c, nx // 2 + 1)`` curves.
    """
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


def resolution_score(runs: Transform2D, member: Array, images=None, labels=None, *, threshold: float,
                     radius: float, fraction: float, max_error: float, frc_threshold: float,
                     max_iter: int) -> StabilityResult:
    """``resolution_criterion``'s test (its arguments are documented there)."""
    _need_images("resolution", images, labels)
    base = pixel_error_stability_classes(runs, member, threshold, radius, max_iter)
    last = Transform2D(*(f[:, -1] for f in runs))
    resolution, _ = split_half_resolution(last, member, images, labels, radius, frc_threshold)
    allowed = jnp.clip(fraction / resolution, threshold, max_error)  # (c,)
    finite = jnp.isfinite(base.error)  # the mirror-stable members
    enough = finite.sum(1, keepdims=True) > 1
    stable = jnp.asarray(member) & finite & enough & (base.error < allowed[:, None])
    return base._replace(stable=stable)



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

    score = functools.partial(resolution_score, threshold=threshold, radius=radius, fraction=fraction,
                              max_error=max_error, frc_threshold=frc_threshold, max_iter=max_iter)
    return Criterion(_option_name("resolution", fraction=fraction, max_error=max_error, frc_threshold=frc_threshold),
                     score)


# ------------------------------------------------------------------ new: the largest agreeing subset of the runs


def run_subsets(n_runs: int, min_runs: int) -> tuple[np.ndarray, np.ndarray]:
    """Every subset of the ``n_runs`` runs with at least ``min_runs`` of them, largest first, as run orders: the
    runs left out first, then the subset's in ascending order (so the subset's last run is run ``L - 1`` of the
    order, the test's reference frame).

    Returns:
        ``(order, included)``: ``(S, L)`` int run indices and ``(S, L)`` bool, True for the subset's runs.
    """
    orders, masks = [], []
    for k in range(n_runs, min_runs - 1, -1):
        for subset in itertools.combinations(range(n_runs), k):
            out = [j for j in range(n_runs) if j not in subset]
            orders.append(out + list(subset))
            masks.append([False] * len(out) + [True] * k)
    return np.array(orders, np.int32), np.array(masks, bool)


def _circular_trimmed_mean(values: Array, weight: Array, tolerance: float) -> tuple[Array, Array]:
    """Mean direction of the angles ``values`` (radians, ``(n,)``) over ``weight``, then again over the weighted
    ones within ``tolerance`` of it: ``(mean, near)``, ``near`` the second pass's weights ``(n,)``."""
    first = jnp.angle(jnp.sum(weight * jnp.exp(1j * values)))
    near = weight * (jnp.abs(jnp.angle(jnp.exp(1j * (values - first)))) <= tolerance)
    return jnp.angle(jnp.sum(near * jnp.exp(1j * values))), near


def _trimmed_mean(values: Array, weight: Array, tolerance: float) -> tuple[Array, Array]:
    """``_circular_trimmed_mean`` for a position (pixels)."""
    first = jnp.sum(weight * values) / jnp.maximum(weight.sum(), 1.0)
    near = weight * (jnp.abs(values - first) <= tolerance)
    return jnp.sum(near * values) / jnp.maximum(near.sum(), 1.0), near


def _fit_run(run: Transform2D, target: tuple[Array, Array, Array], weight: Array, threshold: float,
             radius: float) -> tuple[Array, Array]:
    """The correction ``(g rad, tx, ty)`` that brings one run's parameters ``run`` (fields ``(n,)``) onto the
    ``target`` ``(theta rad, X, Y)`` of the weighted members (each member's own correction from
    ``stability.implied_rotation`` and ``implied_translation``, then trimmed means: members on which this run did
    not converge are left out), and how many members support it (agree with it in all three)."""
    theta, big_x, big_y = target
    g, near = _circular_trimmed_mean(implied_rotation(run, theta), weight, 3 * threshold / radius)
    tx_i, ty_i = implied_translation(run, g, big_x, big_y)
    tx, near = _trimmed_mean(tx_i, near, 3 * threshold)
    ty, near = _trimmed_mean(ty_i, near, 3 * threshold)
    return jnp.stack([g, tx, ty]), near.sum()


def _member_subsets(res: StabilityResult, runs: Transform2D, member: Array, kept_runs: Array, subsets: Array,
                    threshold: float, radius: float) -> StabilityResult:
    """``res`` (one class's test on the runs ``kept_runs`` ``(L,)``) with the members that agree on a subset of
    their own added (``consensus_criterion``'s ``per_member``).

    The runs the test left out are brought into its frame, each by the correction that best maps it onto the
    averaged parameters of the test's stable members (``_fit_run``; a run on which fewer than 3 of them agree
    is not used). Then a member is also stable when its mirror flags agree and its pixel error is below
    ``threshold`` on some subset in ``subsets`` ``(S, L)`` (every subset of at least ``min_runs`` runs) of the
    usable runs. Members stable in ``res`` keep their result; a newly stable member gets the error and averaged
    parameters of its largest such subset (the smallest error among equals)."""
    n_runs = runs.angle.shape[0]
    ref = n_runs - 1 - jnp.argmax(kept_runs[::-1])  # the frame: the last kept run
    anchors = res.stable & member
    # which runs the frame mirrors against the reference, from the anchors (by majority)
    differs = runs.mirror != runs.mirror[ref][None]  # (L, n)
    weight = anchors.astype(jnp.int32)
    flipped = 2 * jnp.sum(weight[None] * differs, 1) > jnp.sum(weight)  # (L,)
    relabelled = runs.mirror ^ flipped[:, None]  # (L, n): equal across the runs where the member's mirror agrees
    target = (jnp.deg2rad(res.params.angle), res.params.shift_x, res.params.shift_y)
    kept_corr = jnp.where(kept_runs[None], res.corrections, 0.0)
    kept_corr = kept_corr.at[0].set(jnp.deg2rad(kept_corr[0]))

    def fit(j):  # (3,) and whether run j is usable
        on_frame = anchors & (relabelled[j] == relabelled[ref])
        run = Transform2D(*(f[j] for f in runs))
        corr, support = _fit_run(run, target, on_frame.astype(jnp.float32), threshold, radius)
        return jnp.where(kept_runs[j], kept_corr[:, j], corr), kept_runs[j] | (support >= 3)

    corr, usable_run = jax.vmap(fit, out_axes=(1, 0))(jnp.arange(n_runs))
    usable = jnp.all(subsets <= usable_run[None], 1) & (anchors.sum() >= 3)  # (S,)

    def common_flag(t):  # (n,) the member's mirror flag on the runs of t (meaningful where they agree)
        return jnp.any(relabelled & t[:, None], 0)

    def one_subset(t):  # (n,) the error on subset t (inf where the member's mirror flags disagree on it)
        same = jnp.all(jnp.where(t[:, None], relabelled == common_flag(t)[None], True), 0)
        e2 = squared_pixel_error(runs, corr, radius, t)
        return jnp.where(same & member, jnp.sqrt(e2), jnp.inf)

    err = jax.vmap(one_subset)(subsets)  # (S, n)
    err = jnp.where(usable[:, None], err, jnp.inf)
    size = subsets.sum(1)[:, None]
    passed = err < threshold
    # the largest passing subset, then the smallest error
    key = jnp.where(passed, -size * 1e6 + err, jnp.inf)
    best = jnp.argmin(key, 0)  # (n,)
    t = subsets[best].T  # (L, n) each member's runs
    theta, big_x, big_y = corrected(runs, corr)
    w = t.astype(jnp.float32)
    total = jnp.maximum(w.sum(0), 1.0)
    averaged = Transform2D(
        angle=wrap_angle(jnp.rad2deg(jnp.angle(jnp.sum(w * jnp.exp(1j * theta), 0)))),
        shift_x=jnp.sum(w * big_x, 0) / total, shift_y=jnp.sum(w * big_y, 0) / total,
        mirror=jnp.any(relabelled & t, 0))
    new = passed.any(0) & member & ~res.stable
    params = jax.tree.map(lambda a, b: jnp.where(new, b, a), res.params, averaged)
    error = jnp.where(new, jnp.take_along_axis(err, best[None], 0)[0], res.error)
    return res._replace(stable=res.stable | new, error=error, params=params)


@functools.partial(jax.jit, static_argnames=("max_iter", "per_member"))
def _consensus(runs: Transform2D, member: Array, order: Array, included: Array, threshold: float, radius: float,
               max_iter: int, per_member: bool = False, subsets: Array | None = None) -> StabilityResult:
    """``consensus_score`` on device: runs ``(c, L, n)``, the subsets of ``run_subsets`` (``(S, L)``, the full set
    first; ``subsets``: the same as masks over the runs in their own order, for ``per_member``); fields
    ``(c, n)``."""

    def reordered(r, s):
        return Transform2D(*(f[order[s]] for f in r))

    def screen(r, m):  # (S,): members agreeing with each subset's initial corrections
        return jax.vmap(lambda s: initial_agreement(reordered(r, s), m, threshold, radius, included[s]))(
            jnp.arange(order.shape[0]))

    def test(r, m, s):
        res = pixel_error_stability(reordered(r, s), m, threshold, radius, max_iter, included[s])
        return res._replace(corrections=res.corrections[:, jnp.argsort(order[s])])

    def one_class(r, m):
        candidates = jnp.stack([0, jnp.argmax(screen(r, m))])  # the full set, the best screened subset
        res = jax.vmap(lambda s: test(r, m, s))(candidates)
        pick = jnp.argmax(res.stable.sum(-1))  # ties: the full set
        res = jax.tree.map(lambda a: a[pick], res)
        if per_member:
            s = candidates[pick]
            kept_runs = jnp.zeros(order.shape[1], bool).at[order[s]].set(included[s])
            res = _member_subsets(res, r, m, kept_runs, subsets, threshold, radius)
        return res

    return jax.vmap(one_class)(runs, member)


def consensus_score(runs: Transform2D, member: Array, images=None, labels=None, *, threshold: float,
                    radius: float, min_runs: int, max_iter: int, per_member: bool = False) -> StabilityResult:
    """``consensus_criterion``'s test (its arguments are documented there)."""
    n_runs = runs.angle.shape[1]
    if not 2 <= min_runs <= n_runs:
        raise ValueError(f"stability.min_runs={min_runs} must be between 2 and isac.stab_ali ({n_runs})")
    order, included = run_subsets(n_runs, min_runs)
    subsets = np.zeros_like(included)
    np.put_along_axis(subsets, order, included, 1)
    runs = Transform2D(*(jnp.asarray(f) for f in runs))
    return _consensus(runs, jnp.asarray(member), jnp.asarray(order), jnp.asarray(included), threshold, radius,
                      max_iter, per_member, jnp.asarray(subsets))


def consensus_criterion(threshold: float, radius: float, min_runs: int = 3, max_iter: int = 50,
                        per_member: bool = False) -> Criterion:
    """ISAC2's pixel-error test on the largest agreeing subset of the runs (new in jisac).

    ISAC2 demands that *all* ``L`` within-group alignments of a class agree. At low SNR a reference-free
    alignment from a random start often fails to converge, and one failed run makes every member of the class
    unstable (``docs/lowsnr.md``, "Would a perfect class pass?"). Here every subset of at least ``min_runs`` of
    the ``L`` runs (16 for 3 of 5) is screened per class by how many members agree to ``threshold`` with the
    initial corrections alone (no L-BFGS: cheap); the best-screened subset (ties: the larger) and the full set
    then get ISAC2's whole test -- mirror stability, pruning, L-BFGS corrections, ``e_i < threshold`` -- and the
    one with more stable members decides (ties: the full set). So a class keeps at least as many members as under
    ISAC2's test (not always the same ones: a member stable on all runs may miss on the chosen ones), and a class
    whose runs mostly agree passes although one or two runs are lost; ``error`` and ``params``
    are those of the chosen runs (the last chosen run's frame), ``corrections`` NaN for the runs left out. It
    costs about two ISAC2 tests.

    Args:
        threshold: pixel-error threshold (``isac.thld_err``), pixels.
        radius: particle radius (``isac.target_radius``), pixels.
        min_runs: fewest runs that must agree, ``2 <= min_runs <= isac.stab_ali`` (``stab_ali``: ISAC2).
        max_iter: L-BFGS iterations of the pixel-error test.
        per_member: also count a member stable whose own ``min_runs`` runs agree, each member its own subset
            (``_member_subsets``): the runs the class's test left out are first brought into its frame by a
            correction fitted on its stable members (trimmed means; a run fewer than 3 of them agree with is not
            used), and a newly stable member gets the error and averaged parameters of its largest agreeing
            subset. Members stable without it are unchanged; a class with fewer than 3 stable members gets none.
    """
    if not (isinstance(min_runs, (int, np.integer)) and min_runs >= 2):
        raise ValueError(f"stability.min_runs must be an integer >= 2 (got {min_runs!r})")
    score = functools.partial(consensus_score, threshold=threshold, radius=radius, min_runs=int(min_runs),
                              max_iter=max_iter, per_member=bool(per_member))
    options = {"min_runs": int(min_runs)} | ({"per_member": True} if per_member else {})
    return Criterion(_option_name("consensus", **options), score)


CRITERIA = {
    "pixel_error": pixel_error_criterion,
    "reproducibility": reproducibility_criterion,
    "resolution": resolution_criterion,
    "consensus": consensus_criterion,
}


def make_criterion(name: str, threshold: float, radius: float, **options) -> Criterion:
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
