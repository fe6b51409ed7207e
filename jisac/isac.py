"""Algorithm layer: The ISAC2 generation loop (``shared/isac_algorithm.md`` §8-§10), on a preprocessed working stack.

A *generation* runs SAC rounds on the working set: multi-reference alignment + equal-size assignment +
filtered, centred averages (``n_filter_steps`` times, cutoff rising from ``fl`` to ``fh``), the averages put in a
common frame, then a within-group round: every class aligned reference-free ``stab_ali`` times from independent
random starts and tested for stability. Classes whose stable members number more than ``minimum_grp_size`` are
accepted; their stable members are *accounted*. The rest go back to the pool for the next generation. The run
stops when generation 1 accepts nothing or the pool is too small for two classes (§10).

This module is the thin Python loop around the jitted library functions; randomness comes from one
``jax.random`` key per generation (split per round and per stability run), so the same seed gives the same
result on any number of devices.

Intended behaviour where SPHIRE has a quirk (``isac_algorithm.md`` §14): five filter steps per round from
0.20 to 0.40 (SPHIRE runs six because of float accumulation); initial references drawn from the run's key, not
a fixed seed 9023.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jisac import align, average, criteria, filters, matching, rows, within_group
from jisac.events import Step, note
from jisac.budget import Budget, Plan, backend_preset, class_bucket, default_budget, plan
from jisac.assignment import assign_equal_size
from jisac.polar import RingGeometry
from jisac.transforms import Transform2D, apply_transform, compose, identity, make_transform, particle_centre

log = logging.getLogger("jisac")


WG_STARTS = ("random", "folds")
UNSTABLE_REFERENCES = ("top_up", "members")
NEXT_REFERENCES = ("random", "unaccepted")
# MRA steps of stacks whose (n, k) table of scores and parameters fits this keep it (``mra_step``)
MRA_TABLE_BYTES = 64 * 2**20


class IsacParams(NamedTuple):
    """Frozen ISAC parameters (SPHIRE names and defaults, ``isac_algorithm.md`` §1). Lengths in working pixels.

    Each setting is held once: the polar rings (``first_ring``, ``target_radius`` as the last ring,
    ``ring_step``, ``n_angles``, the band limit) and the search grid (``xr``, ``yr``, ``ts``) live in ``align``,
    the ``AlignOptions`` every alignment of the run uses; ``target_radius``, ``xr``, ``yr`` and ``ts`` read
    them from there. Build one from SPHIRE's flat option names with ``make_params``.
    """

    img_per_grp: int = 200
    minimum_grp_size: int = 60
    target_nx: int = 76
    maxit: int = 30
    dst: float = 90.0
    fl: float = 0.2
    fh: float = 0.45
    ff: float = 0.2
    init_iter: int = 7
    iter_reali: int = 1
    stab_ali: int = 5
    thld_err: float = 0.7
    filter_step: float = 0.05  # cutoff increment between MRA iterations (SPHIRE constant)
    main_iter_limit: int = -1  # stop after this many generations (-1: until the pool is exhausted)
    # ISAC 2012's matching phase (``jisac.matching``; off = ISAC2): after a generation that accepted classes, the
    # pool's particles join an accepted class when both halves of the class agree and they match it at least as
    # well as the ``match_quantile`` share of its stable members do
    matching: bool = False
    match_quantile: float = 0.1
    # where each stability run's first pass starts: "random" (ISAC2: the averages of random rotations and mirrors
    # of the members) or "folds" (the average of its own disjoint fold of the members at their MRA parameters)
    wg_start: str = "random"
    # how within-group passes make their class averages: "polar" from the members' cached ring spectra (no member
    # transformed; 2x faster on CPU) or "image" (SPHIRE's: every member transformed, bilinear); within_group.py
    wg_averages: str = "polar"
    # the next round's reference of a class with fewer than 5 stable members: "top_up" (ISAC2: the stable members
    # topped up to 5 with random members at zero parameters) or "members" (all its members at the last stability
    # run's parameters, so that a class still forming keeps what the within-group runs found)
    unstable_references: str = "top_up"
    # a later generation's first references: "random" (ISAC2: particles of its pool drawn at random) or
    # "unaccepted" (the previous generation's unaccepted class averages, the classes with most stable members first,
    # then random particles), so that classes still forming when a generation ended go on forming
    next_references: str = "random"
    # rings 1..target_radius at SPHIRE's lengths (the engine's own default, AlignOptions(), is 256 on every ring),
    # xr/yr/ts grid, mirror
    align: align.AlignOptions = align.AlignOptions(geometry=RingGeometry(ring_lengths="sphire"))

    @property
    def target_radius(self) -> int:
        """Particle radius after shrinking, working px: the outermost ring."""
        return self.align.geometry.last_ring

    @property
    def xr(self) -> float:
        return self.align.grid.xr

    @property
    def yr(self) -> float:
        return self.align.grid.yr

    @property
    def ts(self) -> float:
        return self.align.grid.ts

    @property
    def n_filter_steps(self) -> int:
        """MRA iterations per SAC round: cutoffs fl, fl + step, ... below fh (five with the defaults)."""
        return max(1, math.ceil((self.fh - self.fl) / self.filter_step - 1e-6))

    @property
    def max_centre(self) -> float:
        """Largest allowed centre offset, ``cnx - ou - 2`` (SPHIRE's ``mashi``; 8 for 76/29)."""
        return float(self.target_nx // 2 + 1 - self.target_radius - 2)

    def as_dict(self) -> dict:
        """Every setting by SPHIRE's flat name (for ``summary.json`` and the run's fingerprint); the alignment's
        chunk sizes are left out: they tune speed, never results."""
        flat = {name: value for name, value in self._asdict().items() if name != "align"}
        g, grid = self.align.geometry, self.align.grid
        flat.update(target_radius=g.last_ring, first_ring=g.first_ring, ring_step=g.ring_step, n_angles=g.n_angles,
                    bandlimit=g.bandlimit, ring_lengths=g.ring_lengths, xr=grid.xr, yr=grid.yr, ts=grid.ts)
        return flat

    def validate(self, n_particles: int | None = None) -> None:
        """Raises ``ValueError`` naming the parameter, before any heavy work."""
        if self.img_per_grp < 2:
            raise ValueError(f"isac.img_per_grp must be >= 2 (got {self.img_per_grp})")
        if self.minimum_grp_size > self.img_per_grp:
            raise ValueError(
                f"isac.minimum_grp_size ({self.minimum_grp_size}) > isac.img_per_grp ({self.img_per_grp}): "
                "a class could never be accepted; lower minimum_grp_size"
            )
        if self.stab_ali < 2:
            raise ValueError(f"isac.stab_ali must be >= 2 for a stability test (got {self.stab_ali})")
        if self.wg_start not in WG_STARTS:
            raise ValueError(f"isac.wg_start must be one of {WG_STARTS} (got {self.wg_start!r})")
        if self.unstable_references not in UNSTABLE_REFERENCES:
            raise ValueError(f"isac.unstable_references must be one of {UNSTABLE_REFERENCES} "
                             f"(got {self.unstable_references!r})")
        if self.next_references not in NEXT_REFERENCES:
            raise ValueError(f"isac.next_references must be one of {NEXT_REFERENCES} (got {self.next_references!r})")
        if self.wg_averages not in within_group.WG_AVERAGES:
            raise ValueError(f"isac.wg_averages must be one of {within_group.WG_AVERAGES} (got {self.wg_averages!r})")
        if not 0.0 <= self.match_quantile <= 1.0:
            raise ValueError(f"isac.match_quantile must be in [0, 1] (got {self.match_quantile})")
        if self.thld_err <= 0:
            raise ValueError(f"isac.thld_err must be > 0 (got {self.thld_err})")
        if self.init_iter < 1 or self.iter_reali < 1 or self.maxit < 2:
            raise ValueError("isac.init_iter and isac.iter_reali must be >= 1 and isac.maxit >= 2")
        if not 0 < self.fl <= self.fh <= 0.5 or self.ff <= 0:
            raise ValueError(
                f"need 0 < isac.fl <= isac.fh <= 0.5 and isac.ff > 0 (got {self.fl}, {self.fh}, {self.ff})"
            )
        if self.target_radius + max(self.xr, self.yr) + 1 > self.target_nx // 2:
            raise ValueError(
                f"isac.target_radius ({self.target_radius}) + isac.xr ({max(self.xr, self.yr)}) does not fit in "
                f"isac.target_nx ({self.target_nx}); lower xr or target_radius"
            )
        if n_particles is not None and n_particles < 2 * self.img_per_grp:
            raise ValueError(
                f"{n_particles} particles are fewer than 2 x isac.img_per_grp ({2 * self.img_per_grp}): "
                "lower img_per_grp"
            )


def make_params(target_radius: int = 29, xr: float = 1.0, yr: float | None = None, ts: float = 1.0,
                first_ring: int = 1, ring_step: int = 1, n_angles: int = 256, bandlimit: bool = True,
                ring_lengths: str = "sphire",
                **settings) -> IsacParams:
    """``IsacParams`` from SPHIRE's flat option names (``yr=None``: same as ``xr``); ``settings`` are the other
    ``IsacParams`` fields (``img_per_grp=100``, ...)."""
    options = align.AlignOptions(
        geometry=RingGeometry(first_ring, target_radius, ring_step, n_angles, bandlimit, ring_lengths),
        grid=align.SearchGrid(xr, xr if yr is None else yr, ts),
    )
    return IsacParams(align=options, **settings)


class ClassResult(NamedTuple):
    """One class at the end of a SAC round: its average (working frame), its stable members (indices into the
    working set of that generation), their averaged parameters and pixel errors, and how many members the class
    had when it was tested (``candidates``: the stable share is ``len(members) / candidates``)."""

    average: np.ndarray
    members: np.ndarray
    params: Transform2D
    errors: np.ndarray
    candidates: int


class GenerationResult(NamedTuple):
    """What one generation returns: every class of its last SAC round (accepted or not), the accepted ones'
    indices, how many SAC rounds ran and whether the stable sets converged before ``init_iter`` rounds."""

    classes: tuple[ClassResult, ...]
    accepted: tuple[int, ...]
    sac_rounds: int
    converged: bool
    seconds: float


class SacState(NamedTuple):
    """The state a generation carries from one step to the next (all for the ``n`` particles of its working set).

    Attributes:
        references: ``(k, nx, nx)`` current class references.
        params: ``Transform2D`` with fields ``(n,)``: each particle's alignment onto its class.
        labels: ``(n,)`` int class of each particle (after the last equal-size assignment).
        key: the generation's PRNG key, split at every random step.
    """

    references: jax.Array
    params: Transform2D
    labels: np.ndarray
    key: jax.Array


class Steps(NamedTuple):
    """Static settings of one generation's steps: ISAC's parameters, the chunk sizes ``plan`` chose for its class
    count, the within-group schedule, the particle mask and the class count.

    ``padded_classes`` (``>= n_classes``, ``budget.class_bucket``): the class count the device programs are
    compiled for. References ``n_classes..padded_classes - 1`` are zero images that never take part: their score
    columns are dropped before the assignment, no particle is labelled with them, and their averages stay zero.
    So a generation of 3 classes and one of 4 run the same programs, with the results of their own class count.
    """

    p: IsacParams
    options: align.AlignOptions
    sizes: Plan
    wg: within_group.WithinGroupOptions
    mask: np.ndarray
    n_classes: int
    padded_classes: int = 0  # 0: n_classes (no padding)

    @property
    def k_pad(self) -> int:
        return max(self.padded_classes, self.n_classes)


def class_members(labels: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Padded member lists, the criteria's input layout: ``(k, n_max)`` indices (``-1`` padding) and the mask."""
    sizes = np.bincount(labels[labels >= 0], minlength=n_classes)
    n_max = max(int(sizes.max()), 1)
    index = np.full((n_classes, n_max), -1, np.int64)
    for c in range(n_classes):
        m = np.nonzero(labels == c)[0]
        index[c, : len(m)] = m
    return index, index >= 0


def _recentre(averages: jax.Array, params: Transform2D, labels: np.ndarray, n_classes: int):
    """Shift each average by minus its members' mean displacement and compose the members' parameters
    accordingly (SPHIRE's centring of EQ-K-means averages, §8.1 step 4)."""
    disp_x = np.where(np.asarray(params.mirror), -np.asarray(params.shift_x), np.asarray(params.shift_x))
    disp_y = np.asarray(params.shift_y)
    count = np.maximum(np.bincount(labels, minlength=n_classes), 1)
    mean_x = np.bincount(labels, disp_x, minlength=n_classes) / count
    mean_y = np.bincount(labels, disp_y, minlength=n_classes) / count
    averages = filters.fourier_shift(averages, -mean_x, -mean_y)
    params = compose(params, make_transform(0.0, -mean_x[labels], -mean_y[labels], False))
    return averages, params


def _platform(mesh) -> tuple[str, int]:
    """The backend and the device count the work runs on: the mesh's, or JAX's default device."""
    return (jax.default_backend(), 1) if mesh is None else (mesh.devices.flat[0].platform, mesh.size)


def generation_steps(n: int, p: IsacParams, mesh=None, budget: Budget | None = None, bucket: bool = True) -> Steps:
    """The ``Steps`` of a generation of ``n`` particles: ``n // img_per_grp`` classes; chunk sizes from
    ``budget`` (default: the backend's presets) for the mesh's device count (results do not depend on them).
    ``bucket``: compile for ``budget.class_bucket`` classes (a few class counts per run; same results)."""
    k = n // p.img_per_grp
    platform, n_dev = _platform(mesh)
    budget = budget or default_budget(platform)
    # the reference chunk the budget allows for many references (plan gives min(k, it) for k references)
    chunk = plan(budget, p.align, budget.reference_chunk, p.target_nx, n_dev).reference_chunk
    k_pad = class_bucket(k, chunk) if bucket else k
    sizes = plan(budget, p.align, k_pad, p.target_nx, n_dev)
    options = p.align._replace(particle_batch=sizes.particle_batch, reference_chunk=sizes.reference_chunk)
    wg = within_group.WithinGroupOptions(maxit=p.maxit, fh=p.fh, ff=p.ff, dst=p.dst, max_centre=p.max_centre,
                                         cache_window=backend_preset("within_group_cache_window", platform),
                                         averages=p.wg_averages,
                                         particle_batch=backend_preset("within_group_particle_batch", platform))
    mask = filters.circular_mask(p.target_nx, p.target_nx, p.target_radius)
    return Steps(p, options, sizes, wg, mask, k, k_pad)


def start_generation(images, key: jax.Array, steps: Steps, seeds: np.ndarray | None = None) -> SacState:
    """Initial references: ``k`` particles drawn at random (without replacement) from the generation's key; with
    ``seeds`` ``(m, nx, nx)`` (``isac.next_references="unaccepted"``) the first ``min(m, k)`` references are those
    instead (the same draw for the rest, so a run without seeds is unchanged)."""
    n = images.shape[0]
    k_init, key = jax.random.split(key)
    references = jnp.asarray(images[np.asarray(jax.random.choice(k_init, n, (steps.n_classes,), replace=False))])
    if seeds is not None and len(seeds):
        m = min(len(seeds), steps.n_classes)
        references = references.at[:m].set(jnp.asarray(seeds[:m], references.dtype))
    return SacState(_pad_classes(references, steps.k_pad), identity((n,)), np.zeros(n, np.int32), key)


def _pad_classes(a, k_pad: int):
    """``a`` ``(k, ...)`` with zero rows up to ``(k_pad, ...)`` (the masked padding classes of ``Steps``)."""
    a = jnp.asarray(a)
    return a if a.shape[0] >= k_pad else jnp.pad(a, [(0, k_pad - a.shape[0])] + [(0, 0)] * (a.ndim - 1))


def mra_step(images, state: SacState, cutoff: float, steps: Steps, mesh=None) -> SacState:
    """One EQ-K-means iteration (§8.1 steps 1-5): multi-reference alignment about each particle's centre,
    equal-size assignment, filtered (``cutoff``) and centred averages, the averages put in a common frame."""
    p, options, k, k_pad = steps.p, steps.options, steps.n_classes, steps.k_pad
    params, key = state.params, state.key
    # 1-2. references (mean-subtracted in the mask) and multi-reference alignment about each centre
    cx, cy = (np.asarray(c) for c in particle_centre(params))
    far = (np.abs(cx) > p.max_centre) | (np.abs(cy) > p.max_centre)
    params = Transform2D(*(np.where(far, 0, np.asarray(f)).astype(np.asarray(f).dtype) for f in params))
    # A small stack keeps the whole (n, k) table of scores and parameters (17 bytes per pair) and takes the
    # assigned pair's parameters from it; a large one keeps only the scores (4 bytes per pair: 0.8 GB at
    # 200,000 x 1,000) and searches the assigned pair again (``align_to_assigned``, 1/k of the MRA's work, which
    # for a few classes is as much as the MRA: every particle resampled again).
    masked_refs = filters.subtract_masked_mean(state.references, steps.mask)
    bank = align.prepare_references(masked_refs, options)
    keep_table = images.shape[0] * k * 17 <= MRA_TABLE_BYTES
    # the padding references' columns are dropped here: they never reach the assignment
    table = (align.alignment_table if keep_table else align.alignment_scores)(
        images, bank, options, params=params, mesh=mesh, particle_chunk=steps.sizes.particle_chunk, n_references=k)
    scores = table.score if keep_table else table
    del bank
    # 3. equal-size assignment, then each particle's parameters for its class: the table's entry for the pair, or
    # the same search against that one reference (the same up to rounding)
    labels = np.asarray(assign_equal_size(scores))
    del scores
    if keep_table:
        rows = np.arange(len(labels))
        params = Transform2D(*(jnp.asarray(np.asarray(f)[rows, labels]) for f in table.params))
    else:
        params, _ = align.align_to_assigned(images, align.prepare_assigned_references(masked_refs, options), labels,
                                            options, params=params, mesh=mesh,
                                            particle_chunk=steps.sizes.particle_chunk)
    del table
    # 4. filtered, centred averages
    averages = average.class_averages(images, params, labels, k_pad, mesh=mesh)  # padding classes: zero images
    averages = filters.tanh_lowpass(averages, cutoff, p.ff)
    averages, params = _recentre(averages, params, labels, k_pad)
    # 5. the averages in a common frame (of the k real ones: the padding would join their class)
    key, k_common = jax.random.split(key)
    _, avg_params = within_group.within_group_alignment(
        np.asarray(averages)[:k], np.zeros(k, np.int32), 1, k_common, options, steps.wg
    )
    params = compose(params, jax.tree.map(lambda a: np.asarray(a)[labels], avg_params))
    avg_params = Transform2D(*(_pad_classes(f, k_pad) for f in avg_params))  # padding: identity (all zero)
    references = apply_transform(jnp.asarray(averages), avg_params)
    return SacState(references, params, labels, key)


def fold_references(images, state: SacState, n_folds: int, k_pad: int, key: jax.Array, mesh=None) -> np.ndarray:
    """``(n_folds, k_pad, nx, nx)``: each class's members dealt at random into ``n_folds`` disjoint folds, and
    each fold's average at the members' current (MRA) parameters (``isac.wg_start="folds"``)."""
    labels = np.asarray(state.labels)
    perm = np.asarray(jax.random.permutation(key, len(labels)))
    order = perm[np.argsort(labels[perm], kind="stable")]  # grouped by class, each class in a random order
    grouped = labels[order]
    fold = np.zeros(len(labels), np.int64)
    # a member's rank in its class's random order (one sort, not a pass over all particles per class)
    fold[order] = (np.arange(len(order)) - np.searchsorted(grouped, grouped)) % n_folds
    fold_labels = np.where(labels >= 0, labels * n_folds + fold, -1).astype(np.int32)
    avgs = np.asarray(average.class_averages(images, state.params, fold_labels, k_pad * n_folds, mesh=mesh))
    return avgs.reshape(k_pad, n_folds, *avgs.shape[1:]).transpose(1, 0, 2, 3)


def _within_group_runs(images, state: SacState, n_runs: int, steps: Steps, mesh, with_averages: bool = True):
    """``n_runs`` independent within-group alignments of every class: ``(state with the key advanced, last
    run's averages (``None`` without ``with_averages``), [each run's parameters])``. With ``wg_start="folds"``
    (and several runs) run ``j``'s first pass aligns to the averages of fold ``j`` of the members
    (``fold_references``) instead of those of its random start: independent subsets of the class, so runs of a
    class with no common signal still disagree."""
    key = state.key
    initial = [None] * n_runs
    if steps.p.wg_start == "folds" and n_runs > 1:
        key, k_fold = jax.random.split(key)
        initial = list(fold_references(images, state, n_runs, steps.k_pad, k_fold, mesh))
    keys = []
    for _ in initial:
        key, k_run = jax.random.split(key)
        keys.append(k_run)
    results = within_group.within_group_runs(
        images, state.labels, steps.k_pad, keys, steps.options, steps.wg, state.params, mesh,
        max_particles=steps.sizes.within_group_particles, initials=initial, with_averages=with_averages,
    )
    avgs, runs = results[-1][0], [wparams for _, wparams in results]
    return state._replace(key=key), avgs, runs


def realign_round(images, state: SacState, steps: Steps, mesh=None) -> SacState:
    """A within-group round without the stability test (rounds whose index is not a multiple of
    ``iter_reali``): one alignment of every class; its averages become the references."""
    state, avgs, runs = _within_group_runs(images, state, 1, steps, mesh)
    return state._replace(references=avgs, params=runs[-1])


def stability_round(images, state: SacState, steps: Steps, criterion, mesh=None
                    ) -> tuple[SacState, tuple[ClassResult, ...]]:
    """A within-group round with the stability test (§8.1 step 7, §9): ``stab_ali`` independent alignments of
    every class, the criterion's verdict per member, and the classes' averages of their stable members (the new
    references). Stable members take their averaged parameters, the others the last run's."""
    n, k, k_pad = images.shape[0], steps.n_classes, steps.k_pad
    state, _, run_params = _within_group_runs(images, state, steps.p.stab_ali, steps, mesh, with_averages=False)
    labels, key = state.labels, state.key
    index, member = class_members(labels, k_pad)  # padding classes: no member
    safe = np.maximum(index, 0)
    # (k, L, n_max), gathered on the host (as eager JAX ops these were 12 small programs to compile or load)
    runs = jax.tree.map(lambda *a: np.stack([np.asarray(x) for x in a])[:, safe].transpose(1, 0, 2), *run_params)
    res = criterion.score(runs, jnp.asarray(member), images=images, labels=index)
    stable = np.asarray(res.stable) & member
    params = run_params[-1]  # unstable members keep the last run's parameters
    # Class averages of the stable members only (SPHIRE tops a class up to 5 members with random others at
    # zero parameters, so that it still gives a reference for the next round).
    avg_labels = np.full(n, -1, np.int32)
    avg_params = Transform2D(*(np.zeros(n, np.asarray(f).dtype) for f in params))
    found, forming = [], []  # forming: member rows of classes averaged whole (isac.unstable_references="members")
    res_params, res_error = [np.asarray(a) for a in res.params], np.asarray(res.error)
    for c in range(k):
        idx = index[c][stable[c]]
        c_params = Transform2D(*(a[c][stable[c]] for a in res_params))
        avg_labels[idx] = c
        for f_all, f_c in zip(avg_params, c_params):
            f_all[idx] = f_c
        if len(idx) < 5 and steps.p.unstable_references == "members":
            forming.append(index[c][member[c]])
            avg_labels[forming[-1]] = c
        elif len(idx) < 5:
            pool = np.setdiff1d(index[c][member[c]], idx)
            extra = np.asarray(jax.random.permutation(jax.random.fold_in(key, c), pool))[: 5 - len(idx)]
            avg_labels[extra] = c
        found.append((idx, c_params, res_error[c][stable[c]], int(member[c].sum())))
    ref_params = avg_params  # a forming class's members are averaged at the last run's parameters
    if forming:
        rows = np.concatenate(forming)
        ref_params = Transform2D(*(a.copy() for a in avg_params))
        for r, f in zip(ref_params, params):
            r[rows] = np.asarray(f)[rows]
    references = filters.tanh_lowpass(
        average.class_averages(images, ref_params, avg_labels, k_pad, mesh=mesh), steps.p.fh, steps.p.ff
    )
    host_references = np.asarray(references)
    classes = tuple(ClassResult(host_references[c], idx, c_params, errors, size)
                    for c, (idx, c_params, errors, size) in enumerate(found))
    # stable members take their averaged parameters (already gathered in avg_params)
    is_stable = np.zeros(n, bool)
    is_stable[np.concatenate([c.members for c in classes]).astype(np.int64)] = True
    params = Transform2D(*(np.where(is_stable, a, np.asarray(f)) for a, f in zip(avg_params, params)))
    return SacState(references, params, labels, key), classes


def agreement(previous: tuple[ClassResult, ...], current: tuple[ClassResult, ...]) -> float:
    """Overlap of two rounds' stable sets, class by class: ``|intersection| / |union|`` summed over classes."""
    inter = sum(len(np.intersect1d(a.members, b.members)) for a, b in zip(previous, current))
    union = sum(len(a.members) for a in previous) + sum(len(b.members) for b in current) - inter
    return inter / union if union else 0.0


def run_generation(
    images,
    key: jax.Array,
    p: IsacParams,
    mesh: jax.sharding.Mesh | None = None,
    progress: Callable[[Step], None] | None = None,
    criterion: criteria.Criterion | None = None,
    budget: Budget | None = None,
    name: str = "generation",
    seeds: np.ndarray | None = None,
) -> GenerationResult:
    """One ISAC generation on the working set ``images`` ``(n, nx, nx)`` (normalised, 76 px by default; NumPy,
    a stack on disk (``jisac.diskarray.DiskArray``) or a lazy ``rows.Rows`` view): SAC rounds of ``mra_step``
    (``n_filter_steps`` times) then ``stability_round`` (or ``realign_round``), until the stable sets converge
    (SPHIRE's rule: agreement above 0.5 and rising by less than 0.05) or ``init_iter`` rounds ran.

    ``progress`` gets a ``events.Step`` per MRA step and per within-group round, of the stage ``"<name> (SAC
    steps)"`` (``init_iter * (n_filter_steps + 1)`` steps at most; a generation that converges ends sooner).
    ``criterion``: a stability criterion (``criteria.make_criterion``); default ISAC2's pixel error with
    ``p.thld_err`` and the particle radius ``p.target_radius``. ``budget``: memory budgets that set the chunk
    sizes (``budget.plan``; default: the backend's presets); results do not depend on it, nor on the mesh's
    device count. ``seeds``: first references instead of random particles (``start_generation``).
    """
    if criterion is None:
        criterion = criteria.pixel_error_criterion(p.thld_err, float(p.target_radius))
    t0 = time.perf_counter()
    say = progress or (lambda msg: None)
    n = images.shape[0]
    steps = generation_steps(n, p, mesh, budget)
    state = start_generation(images, key, steps, seeds)
    previous, prev_agreement = None, 0.0
    classes: tuple[ClassResult, ...] = ()
    converged = False
    sac_round = 0
    stage, total, done = f"{name} (SAC steps)", p.init_iter * (p.n_filter_steps + 1), 0
    while sac_round < p.init_iter and not converged:
        for step in range(p.n_filter_steps):
            cutoff = p.fl + step * p.filter_step
            state = mra_step(images, state, cutoff, steps, mesh)
            done += 1
            say(Step(stage, done, total, f"SAC round {sac_round + 1}, MRA {step + 1}/{p.n_filter_steps} "
                                         f"(cutoff {cutoff:.2f}): {n} particles in {steps.n_classes} classes"))
        tested = sac_round % p.iter_reali == 0
        sac_round += 1
        done += 1
        if not tested:
            state = realign_round(images, state, steps, mesh)
            say(Step(stage, done, total, f"SAC round {sac_round}: within-group alignment of {steps.n_classes} "
                                         "classes (no stability test)"))
            continue
        state, classes = stability_round(images, state, steps, criterion, mesh)
        n_stable = sum(len(c.members) for c in classes)
        say(Step(stage, done, total, f"SAC round {sac_round}: {n_stable}/{n} particles stable in "
                                     f"{steps.n_classes} classes"))
        if previous is not None:
            now = agreement(previous, classes)
            converged = now > 0.5 and 0.0 < now - prev_agreement < 0.05
            prev_agreement = now
        previous = classes
    accepted = tuple(c for c, cls in enumerate(classes) if len(cls.members) > p.minimum_grp_size)
    return GenerationResult(classes, accepted, sac_round, converged, time.perf_counter() - t0)


class IsacState(NamedTuple):
    """Everything a run carries from one generation to the next (a checkpoint restores it exactly).

    Indices are into the working stack. ``params`` rows are ``(angle, shift_x, shift_y, mirror)`` in the working
    frame, relative to the pre-aligned image (SPHIRE's ``all_parameters.txt``); ``class_of`` is the 0-based
    accepted class (-1: unaccounted). Per accepted class (in acceptance order): ``averages``, ``members`` and
    ``candidates`` (the class's size when it was tested); ``history`` has one dict per finished generation.
    ``seeds``: ``(m, nx, nx)`` the last generation's unaccepted class averages that start the next one
    (``isac.next_references="unaccepted"``; ``unaccepted_averages``), ``None`` otherwise.
    """

    generation: int
    pool: np.ndarray
    averages: tuple
    members: tuple
    candidates: tuple
    params: np.ndarray
    errors: np.ndarray
    class_of: np.ndarray
    history: tuple
    empty_generations: int = 0
    done: bool = False
    seeds: np.ndarray | None = None

    @classmethod
    def start(cls, n: int) -> "IsacState":
        return cls(
            generation=0,
            pool=np.arange(n),
            averages=(),
            members=(),
            candidates=(),
            params=np.zeros((n, 4), np.float32),
            errors=np.full(n, np.nan, np.float32),
            class_of=np.full(n, -1, np.int64),
            history=(),
        )

    @property
    def accounted(self) -> int:
        return int((self.class_of >= 0).sum())


def keep_going(p: IsacParams, generation: int, n_bad: int, n_new_good: int, empty_generations: int) -> bool:
    """SPHIRE's termination rule (§10 step 4): stop when generation 1 accepts nothing or the pool left is too
    small for two classes (``int(1.2 |bad|) < 2 img_per_grp``), or after ``main_iter_limit`` generations.
    SPHIRE repeats a later generation that accepts nothing on the same pool, possibly for ever; jisac retries
    once (new random starts) and stops after two empty generations in a row."""
    if generation == 1 and n_new_good == 0:
        return False
    if n_bad == 0 or int(1.2 * n_bad) < 2 * p.img_per_grp:
        return False
    if empty_generations >= 2:
        return False
    return p.main_iter_limit < 0 or generation < p.main_iter_limit


def accept_generation(state: IsacState, result: GenerationResult, work_idx: np.ndarray, p: IsacParams) -> IsacState:
    """The run state after a generation on the pool ``work_idx``: its accepted classes' stable members become
    accounted (with their parameters and pixel errors), the rest stay in the pool. Pure: ``state`` is unchanged."""
    g = state.generation + 1
    params, errors, class_of = state.params.copy(), state.errors.copy(), state.class_of.copy()
    averages, members, candidates = list(state.averages), list(state.members), list(state.candidates)
    n_good = 0
    for c in result.accepted:
        cls = result.classes[c]
        m = work_idx[cls.members]
        averages.append(cls.average)
        members.append(m)
        candidates.append(cls.candidates)
        params[m] = np.stack([np.asarray(f, np.float32) for f in cls.params], -1)
        errors[m] = cls.errors
        class_of[m] = len(averages) - 1
        n_good += len(m)
    taken = (np.concatenate([work_idx[result.classes[c].members] for c in result.accepted])
             if result.accepted else np.array([], int))
    pool = np.setdiff1d(work_idx, taken)
    empty = 0 if result.accepted else state.empty_generations + 1
    row = {
        "generation": g,
        "particles": int(len(work_idx)),
        "classes": len(result.classes),
        "accepted_classes": len(result.accepted),
        "accounted": n_good,
        "accounted_total": int((class_of >= 0).sum()),
        "sac_rounds": result.sac_rounds,
        "converged": bool(result.converged),
        "seconds": round(result.seconds, 3),
    }
    return IsacState(
        generation=g, pool=pool, averages=tuple(averages), members=tuple(members), candidates=tuple(candidates),
        params=params, errors=errors, class_of=class_of, history=state.history + (row,), empty_generations=empty,
        done=not keep_going(p, g, len(pool), len(result.accepted), empty),
        seeds=unaccepted_averages(result) if p.next_references == "unaccepted" else None,
    )


def unaccepted_averages(result: GenerationResult) -> np.ndarray | None:
    """``(m, nx, nx)`` the generation's unaccepted class averages (its last references), the classes with the
    most stable members first (ties: class order), or ``None`` if it accepted every class: where
    ``isac.next_references="unaccepted"`` starts the next generation."""
    accepted = set(result.accepted)
    failed = [c for c in range(len(result.classes)) if c not in accepted]
    order = sorted(failed, key=lambda c: -len(result.classes[c].members))  # stable sort: ties keep class order
    return np.stack([np.asarray(result.classes[c].average, np.float32) for c in order]) if order else None


def _matching_options(p: IsacParams, n_references: int, mesh, budget: Budget | None) -> align.AlignOptions:
    """ISAC's MRA options with the chunk sizes ``plan`` gives for ``n_references`` references."""
    platform, n_dev = _platform(mesh)
    sizes = plan(budget or default_budget(platform), p.align, n_references, p.target_nx, n_dev)
    return p.align._replace(particle_batch=sizes.particle_batch, reference_chunk=sizes.reference_chunk)


def accept_matches(state: IsacState, found: matching.Matches, p: IsacParams, n_new_classes: int) -> IsacState:
    """The run state after a matching phase: the matched particles join their classes (with their parameters and
    no pixel error) and leave the pool; the generation's history row counts them. Pure."""
    if len(found.particles) == 0:
        row = dict(state.history[-1], matched=0)
        return state._replace(history=state.history[:-1] + (row,))
    params, class_of = state.params.copy(), state.class_of.copy()
    params[found.particles] = found.params
    class_of[found.particles] = found.classes
    members = tuple(np.sort(np.concatenate([m, found.particles[found.classes == c]]))
                    for c, m in enumerate(state.members))
    pool = np.setdiff1d(state.pool, found.particles)
    row = dict(state.history[-1], matched=int(len(found.particles)), accounted_total=int((class_of >= 0).sum()))
    return state._replace(
        pool=pool, params=params, class_of=class_of, members=members, history=state.history[:-1] + (row,),
        done=not keep_going(p, state.generation, len(pool), n_new_classes, state.empty_generations),
    )


def run_isac(
    images,
    p: IsacParams,
    seed: int = 0,
    state: IsacState | None = None,
    mesh: jax.sharding.Mesh | None = None,
    on_generation: Callable[[IsacState, GenerationResult, np.ndarray], None] | None = None,
    progress: Callable[[Step], None] | None = None,
    criterion: criteria.Criterion | None = None,
    budget: Budget | None = None,
) -> IsacState:
    """Runs (or, given a checkpointed ``state``, resumes) ISAC on a working stack ``(n, nx, nx)``.

    Generation ``g`` uses the key ``fold_in(key(seed), g)``, so a resumed run ends exactly as an uninterrupted
    one. ``on_generation(state, result, working_indices)`` is called after each finished generation (write
    outputs and a checkpoint there). ``images`` may be a stack on disk: each generation reads its working set
    lazily (``rows.Rows``), chunk by chunk. ``progress`` gets ``events.Step``s: the generations' SAC steps
    (``run_generation``) and, between them, notes (``str(step)`` is the log line).
    """
    n = images.shape[0]
    p.validate(n)
    root = jax.random.key(seed)
    state = IsacState.start(n) if state is None else state
    say = progress or (lambda msg: None)
    while not state.done:
        g = state.generation + 1
        work_idx = state.pool
        say(note(f"generation {g}: {len(work_idx)} particles in {len(work_idx) // p.img_per_grp} classes"))
        working = rows.take_rows(images, work_idx)
        result = run_generation(working, jax.random.fold_in(root, g), p, mesh, progress, criterion, budget,
                                name=f"generation {g}", seeds=state.seeds)
        state = accept_generation(state, result, work_idx, p)
        say(note(f"generation {g}: accepted {len(result.accepted)}/{len(result.classes)} classes, "
            f"{state.history[-1]['accounted']} particles; accounted so far {state.accounted}/{n} "
            f"({result.seconds:.0f} s)"))
        if p.matching and result.accepted and len(state.pool):
            found = matching.match_particles(images, state.pool, state.members, state.params,
                                             np.stack(state.averages), _matching_options(p, 2 * len(state.members),
                                                                                         mesh, budget),
                                             p.fh, p.ff, p.match_quantile, mesh)
            state = accept_matches(state, found, p, len(result.accepted))
            tried = len(found.particles) + len(state.pool)
            say(note(f"generation {g}: matching phase added {len(found.particles)} of {tried} unaccounted particles "
                     f"to the accepted classes; accounted so far {state.accounted}/{n}"))
        if on_generation is not None:
            on_generation(state, result, work_idx)
    return state
