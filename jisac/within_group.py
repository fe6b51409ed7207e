"""Algorithm layer: Reference-free alignment inside classes, for all classes at once (SPHIRE
``within_group_refinement``, ``isac_algorithm.md`` §7): ISAC's building block for stable class averages and for the
stability test.

From a random start (each member rotated and mirrored at random about its current centre), ``maxit`` passes
alternate between averaging each class with its members' current parameters, low-passing the averages with a
cutoff rising from 0.1 to ``fh``, and aligning every member to its own class average (no ring normalisation,
coarse ``dst`` steps on passes 0, 4, 8, ... while ten or more passes remain). The last pass only averages.
Classes of any sizes go together: every member carries its class label.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jisac import align, average, filters, polar, sharding
from jisac.rows import Rows
from jisac.transforms import Transform2D, apply_transform, from_centre_and_angle, particle_centre

Array = jax.Array


class WithinGroupOptions(NamedTuple):
    """SPHIRE defaults (``isac_algorithm.md`` §1): ``maxit`` 30, ``fh`` 0.45, ``ff`` 0.2, ``dst`` 90."""

    maxit: int = 30
    fh: float = 0.45
    ff: float = 0.2
    dst: float = 90.0
    max_centre: float = 8.0  # search centres are clamped to +-(cnx - ou - 2) px: 8 for ISAC's 76 px box
    # Ring spectra of each particle are kept for a (2w+1)^2 window of integer centres around an anchor and
    # reused while the search grid stays inside it (0: resample every pass). See ``_refresh_windows``. 1 (the
    # 3x3 search grid itself, slid on every move) is ISAC's CPU preset (``budget.BACKEND_PRESETS``: 22 % faster
    # than w = 2 on a CPU, same parameters; a GPU's preset is 0).
    cache_window: int = 1
    # per call, all devices: the window shrinks (w -> ... -> 1 -> none) to fit; the runs of a round share their
    # first windows when twice the cache fits (the demo: 2 x 201 MB at w = 1, 2 x 558 MB at w = 2)
    cache_budget_mb: int = 1536
    # How each pass's class averages are made: "polar" adds the members' cached ring spectra turned into the class
    # frame and makes the average image from them (``_polar_class_sums``, ``polar.spectra_to_image``: no member is
    # transformed; needs the cache); "image" transforms every member (bilinear) and adds the images, as SPHIRE
    # does. The last averages (returned) are always made as images.
    averages: str = "polar"
    # particles per alignment/resampling step of a within-group pass (0: the AlignOptions' particle_batch). On CPU
    # 8 measured 1.5x faster per pass than the MRA's 4 and 1.8x faster resampling (docs/benchmarks.md).
    particle_batch: int = 0


WG_AVERAGES = ("polar", "image")


@functools.partial(jax.jit, static_argnames=('n',))
def random_start(key: Array, params: Transform2D | None, n: int) -> Transform2D:
    """Random in-plane rotation and mirror about each particle's current centre (``(n,)`` fields)."""
    k_angle, k_mirror = jax.random.split(key)
    if params is None:
        cx = cy = jnp.zeros((n,), jnp.float32)
    else:
        cx, cy = particle_centre(params)
    angle = jax.random.uniform(k_angle, (n,), maxval=360.0)
    mirror = jax.random.bernoulli(k_mirror, 0.5, (n,))
    return from_centre_and_angle(cx, cy, angle, mirror)


_SUM_CHUNK = 128  # particles per step of the in-jit class sums (bounds the transformed-image temporaries)
_MIN_ROWS = 32  # fewest rows per device of a call (see _padded_size)


def _class_sums(images, params, seg, n_classes, exponent, reduce):
    """Exact (fixed-point, ``average`` module) sums of transformed images per class inside jit, in chunks,
    added over the devices by ``reduce``: ``(n_classes, ny, nx)`` float32, the same on any number of devices."""
    n = images.shape[0]
    size = min(n, _SUM_CHUNK)  # fewer particles than a chunk (a few averages): one chunk of them
    chunks = n // size

    def add(total, xs):
        imgs, p, s = xs
        hi, lo = average.exact_segment_sum(apply_transform(imgs, p), s, n_classes + 1, exponent)
        return (total[0] + hi[:n_classes], total[1] + lo[:n_classes]), None

    reshape = lambda a: a.reshape(chunks, size, *a.shape[1:])  # noqa: E731
    zero = jnp.zeros((n_classes,) + images.shape[1:], jnp.int32)
    (hi, lo), _ = jax.lax.scan(add, (zero, zero), (reshape(images), jax.tree.map(reshape, params), reshape(seg)))
    hi, lo = reduce((hi, lo))
    return average.limbs_to_float(hi, lo, exponent)


def _integer_grid(options: align.AlignOptions) -> bool:
    """Whether every candidate centre offset is a whole number of pixels (ISAC's ``ts = 1``)."""
    off = options.grid.offsets()
    return bool(np.all(np.abs(off - np.round(off)) < 1e-9))


def _n_used_freqs(options: align.AlignOptions) -> int:
    """Angular frequencies that can be non-zero after the band limit (the rest are never stored)."""
    return int(options.geometry.max_freq().max()) + 1


def _window_spectra(images: Array, centres: Array, window: np.ndarray, options: align.AlignOptions) -> Array:
    """``(b, ny, nx)`` images, ``(b, 2)`` anchors -> ``(b, P, R, F_used)`` ring spectra at ``anchor + window``."""
    pos = centres[:, None, :] + jnp.asarray(window, jnp.float32)[None]
    spec = polar.polar_spectra(images, pos, options.geometry, normalize=options.normalize_particles)
    return spec[..., : _n_used_freqs(options)]


def _window_offsets(w: int) -> np.ndarray:
    """``(P, 2)`` integer offsets ``(x, y)`` of a ``(2w+1)^2`` window, y outer, x inner."""
    wy, wx = np.meshgrid(np.arange(-w, w + 1), np.arange(-w, w + 1), indexing="ij")
    return np.stack([wx.ravel(), wy.ravel()], -1).astype(np.float64)


def _window_index(k: Array, w: int) -> Array:
    """Index in the window of integer offsets ``k`` ``(..., 2)`` (x, y) from the anchor."""
    return (k[..., 1] + w) * (2 * w + 1) + (k[..., 0] + w)


def _refresh_windows(images, centres, cache, anchor, options, wg, n_valid):
    """Makes every particle's window hold its 3x3 search grid about ``centres``.

    Within a run a particle's centre only moves by whole grid steps (``ts = 1``), so the 3x3 candidate centres
    of later passes mostly coincide with ones already resampled. Each particle keeps the spectra of a
    ``(2w+1)^2`` window of integer offsets around an anchor (``cache``: ``(n, P, R, F_used)``, ``anchor``:
    ``(n, 2)``). A particle whose grid would leave its window is brought back one of two ways, ``particle_batch``
    at a time (dynamic numbers of steps; only those particles are written):

    - its centre is a whole step from the anchor and at most one step beyond the window's reach: the window
      slides one pixel towards it (in x, y or both). The ``(2w)^2`` spectra it keeps are moved, and only the new
      edge column and row (``4w + 1`` centres, 9 of 25 at w = 2) are resampled (``_slide_plan``);
    - otherwise (the first windows, a clamped centre): the whole window is resampled about the current centre.

    The spectra are those the uncached search computes (same sample points up to the float rounding of the
    anchor arithmetic), so the results agree with ``cache_window = 0``. Rows from ``n_valid`` on are padding:
    never resampled.

    Returns ``(cache, anchor, k)``: ``k`` ``(n, 2)`` int32, each centre's offset from its anchor.
    """
    n = images.shape[0]
    b = options.particle_batch
    w = wg.cache_window
    window = _window_offsets(w)
    reach = int(np.abs(np.round(options.grid.offsets())).max())
    rel = centres - anchor
    step = jnp.round(rel)
    whole = jnp.all(jnp.abs(rel - step) < 1e-3, -1)
    real = jnp.arange(n) < n_valid
    stale = real & ~(whole & jnp.all(jnp.abs(step) <= w - reach, -1))
    slides = stale & whole & jnp.all(jnp.abs(step) <= w - reach + 1, -1)
    full = stale & ~slides
    shift = (step - jnp.clip(step, -(w - reach), w - reach)).astype(jnp.int32)  # (n, 2) in {-1, 0, 1}

    # the rows of each kind, then the index n (past the last row: its writes are dropped)
    full_rows = jnp.nonzero(full, size=n + b, fill_value=n)[0]
    slide_rows = jnp.nonzero(slides, size=n + b, fill_value=n)[0]

    def resample(j, carry):
        cache, anchor = carry
        rows = jax.lax.dynamic_slice_in_dim(full_rows, j * b, b)
        read = jnp.minimum(rows, n - 1)
        c = centres[read]
        cache = cache.at[rows].set(_window_spectra(images[read], c, window, options), mode="drop")
        return cache, anchor.at[rows].set(c, mode="drop")

    def slide(j, carry):
        cache, anchor = carry
        rows = jax.lax.dynamic_slice_in_dim(slide_rows, j * b, b)
        read = jnp.minimum(rows, n - 1)
        s = shift[read]
        new_anchor = anchor[read] + s.astype(jnp.float32)
        fresh_offsets, source = _slide_plan(s, w)  # (b, 4w+1, 2), (b, P)
        fresh = polar.polar_spectra(images[read], new_anchor[:, None, :] + fresh_offsets, options.geometry,
                                    normalize=options.normalize_particles)[..., : _n_used_freqs(options)]
        both = jnp.concatenate([cache[read], fresh], 1)  # (b, P + 4w + 1, R, F_used)
        moved = both[jnp.arange(b)[:, None], source]
        return cache.at[rows].set(moved, mode="drop"), anchor.at[rows].set(new_anchor, mode="drop")

    cache, anchor = jax.lax.fori_loop(0, (jnp.sum(full) + b - 1) // b, resample, (cache, anchor))
    cache, anchor = jax.lax.fori_loop(0, (jnp.sum(slides) + b - 1) // b, slide, (cache, anchor))
    return cache, anchor, jnp.round(centres - anchor).astype(jnp.int32)  # within +-(w - reach)


def _slide_plan(shift: Array, w: int) -> tuple[Array, Array]:
    """How a ``(2w+1)^2`` window slides by ``shift`` ``(b, 2)`` (x, y in {-1, 0, 1}).

    The new window's edge column (``x = w`` when sliding right or not in x, ``-w`` when sliding left) and edge
    row (likewise in y) are resampled: ``fresh`` ``(b, 4w + 1, 2)`` their offsets from the new anchor, the
    column's ``2w + 1`` first, then the row's ``2w`` others. Every other position's spectra are the old window's
    at ``offset + shift``. Returns ``(fresh, source)``: ``source`` ``(b, P)`` each new position's index in the
    old window (``< P``) or ``P + j`` for the ``j``-th fresh one.
    """
    side = 2 * w + 1
    p = side * side
    edge = jnp.where(shift >= 0, w, -w)  # (b, 2): the resampled column (x) and row (y)
    span = jnp.arange(-w, w + 1)
    others = jnp.sort(jnp.where(span[None, :] == edge[:, :1], w + 1, span[None, :]), -1)[:, : side - 1]  # (b, 2w)
    column = jnp.stack([jnp.broadcast_to(edge[:, :1], (shift.shape[0], side)),
                        jnp.broadcast_to(span, (shift.shape[0], side))], -1)
    row = jnp.stack([others, jnp.broadcast_to(edge[:, 1:], others.shape)], -1)
    fresh = jnp.concatenate([column, row], 1).astype(jnp.float32)  # (b, 4w + 1, 2)
    off = jnp.asarray(_window_offsets(w), jnp.int32)  # (P, 2)
    on_column = off[None, :, 0] == edge[:, None, 0]
    on_row = off[None, :, 1] == edge[:, None, 1]
    row_rank = jnp.sum(off[None, :, :1] > others[:, None, :], -1)  # rank of x among the row's others
    old = _window_index(off[None] + shift[:, None, :], w)
    source = jnp.where(on_column, p + off[None, :, 1] + w, jnp.where(on_row, p + side + row_rank, old))
    return fresh, source


def _cached_align(cache, k, centres, labels, spectra, use_coarse, options, coarse, wg, n_valid):
    """One alignment pass of every particle to its class average (``spectra``), the 3x3 grid read from its
    window (``_refresh_windows``). Padding rows (from ``n_valid``) are skipped: their parameters stay zero.
    Returns the parameters ``(n,)``."""
    n = cache.shape[0]
    b = options.particle_batch
    w = wg.cache_window
    grid = np.round(options.grid.offsets()).astype(np.int32)  # (S, 2)

    def batch(i, out):
        rows = i * b + jnp.arange(b)
        idx = _window_index(k[rows][:, None, :] + grid[None], w)  # (b, S)
        spec = cache[rows[:, None], idx]  # (b, S, R, F_used)
        refs, c = spectra[labels[rows]], centres[rows]  # (b, nm, R, F_used), (b, 2)
        found, _ = align.paired_best(spec, refs, c, options, coarse, use_coarse)
        return jax.tree.map(lambda o, f: jax.lax.dynamic_update_slice_in_dim(o, f, i * b, 0), out, found)

    zeros = jnp.zeros((n,), jnp.float32)
    start = Transform2D(zeros, zeros, zeros, jnp.zeros((n,), bool))
    n_batches = (n_valid + b - 1) // b  # the padding rows after the last particle's batch are skipped
    return jax.lax.fori_loop(0, n_batches, batch, start)


def _polar_sum_scales(images, seg, counts, n_classes, geometry, reduce_max):
    """Fixed-point scales of ``_polar_class_sums``, fixed for a whole run: ``(scale, unscale)``, ``(n,)`` per
    member and ``(n_classes,)`` per class.

    A ring coefficient is at most ``n_angles`` times the largest pixel (a sum of ``n_angles`` samples, or of
    ``m`` samples scaled by ``n_angles / m``), so each class's exponent comes from the largest pixel of its own
    members, and its fraction bits from its member count (``average.single_limb_bits``): a class's sums are the
    same whichever other classes share the call (``max_particles`` groups) and on any number of devices."""
    largest = jax.ops.segment_max(jnp.max(jnp.abs(images), (1, 2)), seg, num_segments=n_classes + 1)[:n_classes]
    exponent = average.fixed_point_exponent(reduce_max(largest) * geometry.n_angles)  # (k,)
    bits = average.single_limb_bits(counts)
    scale = jnp.ldexp(jnp.float32(1.0), bits - exponent)
    scale = jnp.concatenate([scale, jnp.zeros((1,), scale.dtype)])[seg]  # non-members: 0 (their bucket is dropped)
    return scale, jnp.ldexp(jnp.float32(1.0), exponent - bits)


def _polar_class_sums(cache, k, params, seg, scales, n_classes, wg, reduce):
    """Class sums of the members' ring spectra, each turned into its class frame (``polar.rotate_spectra``):
    ``(n_classes, R, F_used)`` complex64, exact fixed-point sums in one int32 limb (``_polar_sum_scales``).

    The spectra at each member's current centre are already in its window (``k``), so no image is transformed:
    this replaces the bilinear transform of every member on every pass (39 % of a call, docs/benchmarks.md).
    (Reading only the band-limited coefficients, or scales gathered per term, measured 3x slower on XLA:CPU.)"""
    n = cache.shape[0]
    scale, unscale = scales
    spec = cache[jnp.arange(n), _window_index(k, wg.cache_window)]  # (n, R, F_used)
    turned = polar.rotate_spectra(spec, params.angle, params.mirror) * scale[:, None, None]
    q = jnp.round(jnp.stack([turned.real, turned.imag], -1)).astype(jnp.int32)  # (n, R, F_used, 2)
    total = reduce(jax.ops.segment_sum(q, seg, num_segments=n_classes + 1)[:n_classes])
    sums = total.astype(jnp.float32) * unscale[:, None, None, None]
    return jax.lax.complex(sums[..., 0], sums[..., 1])


def cache_bytes(n: int, window: int, options: align.AlignOptions) -> int:
    """Bytes of the spectrum cache for ``n`` particles: ``(2w+1)^2`` complex64 spectra per particle
    (545 kB per particle at w = 2 with ISAC's 29 rings)."""
    return n * (2 * window + 1) ** 2 * options.geometry.n_rings * _n_used_freqs(options) * 8


def _uses_cache(options: align.AlignOptions, wg: WithinGroupOptions) -> bool:
    """Whether a run keeps the spectrum cache: a window, and every candidate centre a whole pixel away."""
    return wg.cache_window > 0 and _integer_grid(options)


def _shares_windows(n: int, n_runs: int, options: align.AlignOptions, wg: WithinGroupOptions) -> bool:
    """Whether ``n_runs`` runs of ``n`` rows (``wg.cache_window`` already fitted) share their first windows: the
    kept windows and a run's working copy of them must both fit ``wg.cache_budget_mb``."""
    fits_twice = 2 * cache_bytes(n, wg.cache_window, options) <= wg.cache_budget_mb * 2**20
    return _uses_cache(options, wg) and n_runs > 1 and fits_twice


def _cache_group_particles(n_runs: int, options: align.AlignOptions, wg: WithinGroupOptions) -> int:
    """Most particles per within-group call for which the spectrum cache keeps its full window (and, with several
    runs, their shared first windows) within ``wg.cache_budget_mb``, padding's headroom (1/4) included: classes
    are independent, so a large stack is aligned in groups of whole classes rather than without the cache (which
    costs 3x per run; measured on 10,000 particles, docs/benchmarks.md)."""
    if not _uses_cache(options, wg):
        return 1 << 62
    copies = 2 if n_runs > 1 else 1
    cap = wg.cache_budget_mb * 2**20 // (copies * cache_bytes(1, wg.cache_window, options))
    return max(1, cap * 4 // 5)  # m + m // 4 <= cap: the window estimate of within_group_runs fits


def _cache_window(n: int, options: align.AlignOptions, wg: WithinGroupOptions) -> int:
    """The largest window up to ``wg.cache_window`` whose cache fits ``wg.cache_budget_mb``."""
    w = wg.cache_window
    while w > 0 and cache_bytes(n, w, options) > wg.cache_budget_mb * 2**20:
        w -= 1
    return w


def _first_windows_local(images, valid, centres, options, wg):
    """The spectrum windows of a run's first pass: every particle resampled about its clamped start centre
    (``centres`` ``(n, 2)``, the centres of the parameters the runs start from): ``(cache, anchor)``. They depend
    only on those centres, which the ``stab_ali`` runs of a round share (their random starts differ in angle and
    mirror only), so ``within_group_runs`` may compute them once for all runs; a run that starts without them
    computes the same inside (``_within_group_local``)."""
    n = images.shape[0]
    n_valid = jnp.sum(valid.astype(jnp.int32))
    centres = jnp.clip(centres, -wg.max_centre, wg.max_centre)
    cache = jnp.zeros((n, (2 * wg.cache_window + 1) ** 2, options.geometry.n_rings, _n_used_freqs(options)),
                      jnp.complex64)
    anchor = jnp.full((n, 2), jnp.nan, jnp.float32)
    cache, anchor, _ = _refresh_windows(images, centres, cache, anchor, options, wg, n_valid)
    return cache, anchor


def _within_group_local(images, labels, valid, params, initial, cache, anchor, base, n_classes, options, wg,
                        axis=None):
    """The whole schedule on this device's particles; with ``axis`` (inside ``shard_map``) class sums and
    counts are summed over the devices, so every device sees the same averages. ``initial``: ``(n_classes, ny,
    nx)`` the first pass's class averages, or a ``(0, ny, nx)`` array (the averages of the random start).
    ``cache``, ``anchor``: the spectrum windows to start from (``_first_windows_local`` about ``base``, the
    ``(n, 2)`` centres the run starts from), or ``(0, ...)`` arrays: then they are made here the same way."""
    reduce, reduce_max, seg, exponent, members = _image_sum_setup(images, labels, valid, n_classes, axis)
    counts = jnp.maximum(members, 1).astype(jnp.float32)
    safe_labels = jnp.clip(labels, 0, n_classes - 1)
    coarse = options._replace(coarse_step_deg=wg.dst)

    def cutoff(it):  # of pass it's averages: 0.1 -> fh
        return 0.1 + (wg.fh - 0.1) * it / max(wg.maxit - 1, 1)

    def averages(params, it):
        avg = _class_sums(images, params, seg, n_classes, exponent, reduce) / counts[:, None, None]
        return filters.tanh_lowpass(avg, cutoff(it), wg.ff)

    use_cache = _uses_cache(options, wg)
    if use_cache and wg.averages == "polar":
        scales = _polar_sum_scales(images, seg, members, n_classes, options.geometry, reduce_max)
    # this device's particles come first in its rows, its padding after them (_device_layout)
    n_valid = jnp.sum(valid.astype(jnp.int32))
    n_used = _n_used_freqs(options)
    clamp = lambda c: jnp.clip(c, -wg.max_centre, wg.max_centre)  # noqa: E731

    def centres_of(params):  # (n, 2) search centres: the members' centres, clamped
        cx, cy = particle_centre(params)
        return jnp.stack([clamp(cx), clamp(cy)], -1)

    def references(avg, it):  # the pass's reference spectra from its averages, and whether its search is coarse
        if initial.shape[0]:  # the first pass aligns to the given references (low-passed as that pass's averages)
            avg = jnp.where(it == 0, filters.tanh_lowpass(initial, cutoff(0), wg.ff), avg)
        use_coarse = (wg.dst > 0) & (it % 4 == 0) & (it + 1 <= wg.maxit - 10)
        return align._reference_spectra(avg, options), use_coarse

    def one_pass(it, params):
        centres = centres_of(params)
        spectra, use_coarse = references(averages(params, it), it)
        found, _ = align._paired_chunk(images, centres, safe_labels, spectra, options, coarse, use_coarse)
        return found

    def one_cached_pass(it, carry):
        params, cache, anchor = carry
        centres = centres_of(params)
        cache, anchor, k = _refresh_windows(images, centres, cache, anchor, options, wg, n_valid)
        if wg.averages == "polar":
            sums = _polar_class_sums(cache, k, params, seg, scales, n_classes, wg, reduce)
            avg = polar.spectra_to_image(sums / counts[:, None, None], options.geometry, images.shape[1:])
            avg = filters.tanh_lowpass(avg, cutoff(it), wg.ff)
        else:
            avg = averages(params, it)
        spectra, use_coarse = references(avg, it)
        params = _cached_align(cache, k, centres, safe_labels, spectra[..., :n_used], use_coarse, options, coarse,
                               wg, n_valid)
        return params, cache, anchor

    if use_cache:
        if cache.shape[0] == 0:  # the first windows, as within_group_runs makes them when the runs share them
            cache, anchor = _first_windows_local(images, valid, base, options, wg)
        params, _, _ = jax.lax.fori_loop(0, wg.maxit - 1, one_cached_pass, (params, cache, anchor))
    else:
        params = jax.lax.fori_loop(0, wg.maxit - 1, one_pass, params)
    return params


def _member_averages_local(images, labels, valid, params, n_classes, axis=None):
    """A run's last class averages (unfiltered: ``_final_lowpass`` low-passes them outside, one program whatever
    the mesh, so they are bit-identical on any number of devices), the sums ``_within_group_local``'s image
    averages make. Apart from the run because a stability round does not use them (ISAC keeps only the runs'
    parameters there): only the runs whose averages are asked for pay for them."""
    reduce, _, seg, exponent, members = _image_sum_setup(images, labels, valid, n_classes, axis)
    counts = jnp.maximum(members, 1).astype(jnp.float32)
    return _class_sums(images, params, seg, n_classes, exponent, reduce) / counts[:, None, None]


def _image_sum_setup(images, labels, valid, n_classes, axis):
    """What the exact image class sums of a call need, the same for the passes and the last averages:
    ``(reduce, reduce_max, seg, exponent, members)``: the sum and max over the devices (``axis`` inside
    ``shard_map``, else identities), each row's segment (``n_classes`` for padding and the unlabelled), the
    fixed-point exponent of the members' largest pixel (transformed images, bilinear, never exceed it: one scale
    for all passes) and the member count per class ``(n_classes,)``."""
    reduce = (lambda x: x) if axis is None else (lambda x: jax.lax.psum(x, axis))  # noqa: E731
    reduce_max = (lambda x: x) if axis is None else (lambda x: jax.lax.pmax(x, axis))  # noqa: E731
    seg = jnp.where(valid & (labels >= 0), labels, n_classes)
    max_abs = jnp.max(jnp.abs(jnp.where((seg < n_classes)[:, None, None], images, 0.0)))
    exponent = average.fixed_point_exponent(reduce_max(max_abs))
    members = reduce(jnp.bincount(seg, length=n_classes + 1)[:n_classes])
    return reduce, reduce_max, seg, exponent, members


@functools.partial(jax.jit, static_argnames=("fh", "ff"))
def _final_lowpass(avg, fh, ff):
    return filters.tanh_lowpass(avg, fh, ff)


def within_group_alignment(
    images,
    labels,
    n_classes: int,
    key: Array,
    options: align.AlignOptions = align.AlignOptions(),
    wg: WithinGroupOptions = WithinGroupOptions(),
    params: Transform2D | None = None,
    mesh: jax.sharding.Mesh | None = None,
    max_particles: int | None = None,
    initial: np.ndarray | None = None,
) -> tuple[Array, Transform2D]:
    """Aligns the members of every class to their class average, from a random start.

    The whole schedule is one jitted loop over the particles held on the devices (ISAC's working set: 23 kB per
    76 px particle), padded to a multiple of 128 particles per device (``align.size_bucket`` of them) so that few
    shapes are compiled. Classes are independent, so a stack larger than ``max_particles`` is done in groups of
    whole classes, one call each (every group padded to the same size: one compilation); the result is the same as
    in one call. Each
    particle's ring spectra are cached over a window of centres (``wg.cache_window``; ``cache_bytes``, capped by
    ``wg.cache_budget_mb`` per call): same results, fewer resamplings (docs/benchmarks.md).

    Args:
        images: ``(n, ny, nx)`` particles (NumPy, memory map or a lazy row view: only the rows each call needs,
            of this process's devices, are read).
        labels: ``(n,)`` class of each particle; ``-1`` leaves it out.
        n_classes: number of classes.
        key: PRNG key of the random start (independent keys give the independent runs of the stability test).
        options: polar search options (ring normalisation is switched off here, as in SPHIRE).
        wg: iteration schedule.
        params: current parameters (their centres are kept); ``None`` means the box centre.
        mesh: optional one-axis device mesh: particles are split over its devices, class sums added across them
            (exact integer sums: the same result as one device).
        max_particles: most particles per call (all devices; ``budget.plan``); None: all in one call.
        initial: optional ``(n_classes, ny, nx)`` references of the first pass instead of the averages of the
            random start (``isac.wg_start="folds"``: each stability run starts from its own fold of the members).

    Returns:
        ``(averages, params)``: the final low-passed class averages ``(n_classes, ny, nx)`` and the members'
        parameters ``(n,)``.
    """
    return within_group_runs(images, labels, n_classes, [key], options, wg, params, mesh, max_particles,
                             None if initial is None else [initial])[0]


def within_group_runs(
    images,
    labels,
    n_classes: int,
    keys: list,
    options: align.AlignOptions = align.AlignOptions(),
    wg: WithinGroupOptions = WithinGroupOptions(),
    params: Transform2D | None = None,
    mesh: jax.sharding.Mesh | None = None,
    max_particles: int | None = None,
    initials: list | None = None,
    with_averages: bool = True,
) -> list[tuple[np.ndarray | None, Transform2D]]:
    """Independent ``within_group_alignment`` runs of the same classes from the same centres, one per key (and
    per ``initials`` entry): ISAC's ``stab_ali`` runs of a stability test. The same results as one call per key;
    the particles are put on the devices once per group of classes, and the first pass's spectrum windows (which
    depend only on the shared centres) are resampled once for all runs when twice the cache fits
    ``wg.cache_budget_mb``. Returns ``[(averages, params)]``, one per key; the averages are ``None`` without
    ``with_averages`` (a stability round uses only the parameters)."""
    n = images.shape[0]
    labels = np.asarray(labels, np.int32)
    sizes = np.bincount(labels[labels >= 0], minlength=n_classes)
    if sizes.size and sizes.max() >= average.MAX_TERMS:
        raise ValueError(f"within-group alignment: a class of {sizes.max()} members is above the exact-sum limit "
                         f"({average.MAX_TERMS}); raise isac.img_per_grp's class count (more classes)")
    initials = [None] * len(keys) if initials is None else list(initials)
    if len(initials) != len(keys):
        raise ValueError(f"within_group_runs: {len(keys)} keys but {len(initials)} initial references")
    options = options._replace(normalize_particles=False)
    if wg.particle_batch > 0:
        options = options._replace(particle_batch=wg.particle_batch)
    n_dev = 1 if mesh is None else mesh.size
    # The random starts are drawn for the whole unpadded stack so results depend neither on padding nor on groups.
    starts = [jax.tree.map(np.asarray, random_start(key, params, n)) for key in keys]
    # the centres every run starts from (its first spectrum windows are resampled about them)
    base = np.zeros((n, 2), np.float32) if params is None else np.stack(
        [np.asarray(c, np.float32) for c in particle_centre(params)], -1)
    max_particles = min(max_particles or max(n, 1), _cache_group_particles(len(keys), options, wg))
    groups = _class_groups(labels, sizes, max_particles)
    largest = max(len(g) for g in groups)
    padded = _padded_size(largest, n_dev, options.particle_batch)
    # The window (which decides the numerics: cached or not, polar or image averages) from the group's particles
    # with the padding's headroom, not from the padded rows: the same on any number of devices.
    rows_estimate = largest + largest // 4
    wg = wg._replace(cache_window=_cache_window(rows_estimate, options, wg))
    share = _shares_windows(rows_estimate, len(keys), options, wg)
    # check_vma off: the class-sum scan starts from a zero that is the same on every device
    fn = sharding.over_particles(_within_group_local, mesh, (True,) * 4 + (False, True, True, True), True,
                                 collectives=True, check_vma=False, n_classes=n_classes, options=options, wg=wg)
    member_averages = sharding.over_particles(_member_averages_local, mesh, (True,) * 4, False, collectives=True,
                                              check_vma=False, n_classes=n_classes)
    first_windows = sharding.over_particles(_first_windows_local, mesh, (True,) * 3, True, check_vma=False,
                                            options=options, wg=wg)
    no_first = np.zeros((0,) + tuple(images.shape[1:]), np.float32)
    no_cache = sharding.to_devices((np.zeros((0, 1, 1, 1), np.complex64), np.zeros((0, 2), np.float32)), mesh)
    results = [(np.zeros((n_classes,) + tuple(images.shape[1:]), np.float32) if with_averages else None,
                Transform2D(*(np.array(f, copy=True) for f in start))) for start in starts]
    for rows in groups:
        m = len(rows)
        # every device gets an equal share of the real rows, its padding after them (a pass takes as long as the
        # device with the most real rows; all padding on the last device measured 1.3x slower on 2 devices)
        layout = _device_layout(m, padded, n_dev, options.particle_batch)
        valid = layout >= 0
        src = rows[np.where(valid, layout, 0)]  # stack rows; a padding row repeats the group's first particle

        def lay(a, fill=0):  # a per-particle array of the stack in this call's rows, padding rows = fill
            a = np.asarray(a)[src]
            return np.where(valid.reshape((-1,) + (1,) * (a.ndim - 1)), a, np.asarray(fill, a.dtype))

        dev_images, dev_labels, dev_valid, dev_base = sharding.to_devices(
            (Rows(images, src), lay(labels, -1), valid, lay(base)), mesh)
        in_group = np.zeros(n_classes, bool)
        in_group[np.unique(labels[rows][labels[rows] >= 0])] = True
        windows = None
        for start, first, (averages, out) in zip(starts, initials, results):
            st = sharding.to_devices((Transform2D(*(lay(f) for f in start)),), mesh)[0]
            if share and windows is None:
                windows = first_windows(dev_images, dev_valid, dev_base)
            cache = windows if share else no_cache
            first = no_first if first is None else np.asarray(first, np.float32)
            found = fn(dev_images, dev_labels, dev_valid, st, *sharding.to_devices((), mesh, (first,)), *cache,
                       dev_base)
            if with_averages:
                avg = sharding.fetch(member_averages(dev_images, dev_labels, dev_valid, found))
                averages[in_group] = np.asarray(_final_lowpass(jnp.asarray(avg), wg.fh, wg.ff))[in_group]
            for f_all, f in zip(out, found):
                f_all[src[valid]] = sharding.fetch(f)[valid]
        del windows
    return [(averages, Transform2D(*map(jnp.asarray, out))) for averages, out in results]


def _padded_size(m: int, n_dev: int, batch: int) -> int:
    """Rows per call (all devices) for ``m`` particles: whole steps of ``lcm(_SUM_CHUNK, batch)`` per device,
    ``align.size_bucket`` of them (a few shapes per run whatever the working-set sizes of its generations); below
    one such step per device (the common frame of a few class averages) a power of two of whole batches per
    device, so that 4 averages are not aligned as 128 rows of which 124 are padding."""
    step = int(np.lcm(_SUM_CHUNK, batch))
    per_device = -(-max(m, 1) // n_dev)
    if per_device < step:
        # at least _MIN_ROWS: XLA:CPU computes arrays narrower than a vector register on another code path whose
        # sin/cos round differently (measured: 4 rows moved angles by 3e-5 deg against 128)
        local = -(-max(_MIN_ROWS, 1 << (per_device - 1).bit_length()) // batch) * batch
        if local < _SUM_CHUNK or local % _SUM_CHUNK == 0:
            return local * n_dev
    return align.size_bucket(-(-per_device // step)) * step * n_dev


def _device_layout(m: int, padded: int, n_dev: int, batch: int) -> np.ndarray:
    """``(padded,)`` the particle (``0 .. m-1``) each row of a call holds, ``-1`` for padding: device ``d``'s
    ``padded // n_dev`` rows start with its share of the particles, in order, and end with its padding
    (``_within_group_local`` reads a device's real rows as its first ``n_valid``). The shares are whole
    ``batch`` steps as evenly as possible (the last device takes the remainder), so every particle is in the
    same step of ``batch`` particles with the same neighbours as on one device: XLA:CPU's results can depend on
    an element's place in a vectorised loop, and the same steps keep them bit-identical on any device count."""
    local = padded // n_dev
    steps = -(-m // batch)
    counts = (steps // n_dev + (np.arange(n_dev) < steps % n_dev)) * batch
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    counts = np.clip(m - first, 0, counts)  # the last device with particles takes the remainder
    if padded % n_dev or counts.max(initial=0) > local:
        raise ValueError(f"_device_layout: {m} particles do not fit {padded} rows on {n_dev} devices")
    j = np.arange(local)
    return np.where(j[None] < counts[:, None], first[:, None] + j[None], -1).reshape(-1)


def _class_groups(labels: np.ndarray, sizes: np.ndarray, max_particles: int) -> list[np.ndarray]:
    """Particle indices (increasing) of consecutive groups of whole classes, each at most ``max_particles``
    members unless one class alone is bigger; unlabelled particles are left out (they keep their start)."""
    if int(sizes.sum()) <= max_particles:
        return [np.arange(len(labels))]
    groups, current, count = [], [], 0
    for c, size in enumerate(sizes):
        if current and count + size > max_particles:
            groups.append(current)
            current, count = [], 0
        current.append(c)
        count += int(size)
    groups.append(current)
    return [np.nonzero(np.isin(labels, g))[0] for g in groups if g]
