"""Algorithm layer: Multi-reference polar alignment: every particle against every reference, over all in-plane
rotations, a grid of candidate centres and the mirror (``shared/isac_algorithm.md`` §5).

The score of a particle against a reference at centre ``c``, rotation ``psi`` and mirror flag ``m`` is the
ring-weighted mean product of their ring samples (``polar.RingGeometry.weights``)::

    score = sum_r w_r sum_j ref_r[j] * p_r[(j + psi) mod n]          (p = particle rings around c, mirrored if m)

computed for all ``psi`` at once as ``irfft(conj(A_r) B_r)`` summed over rings. The mirrored correlation uses the
spectra ``(-1)^k A_r`` instead of ``conj(A_r)`` (the x-mirror reverses the rings, §5.4): both are just more
"references" in one contraction. The best angle is refined by a 7-point least-squares parabola (§5.4), the
centre comes from the grid, and the result is reported as the transform that brings the particle onto the
reference (``transforms.from_centre_and_angle``).

Work is split into fixed-size chunks so memory stays bounded whatever N and K are: particles in host-side
chunks of ``particle_chunk`` (the last one padded), inside one jitted call sub-batches of ``particle_batch``
(``lax.map``) and references in chunks of ``reference_chunk`` (padded with masked references). The contraction
is frequency-major and skips the (ring, frequency) pairs the angular band limit leaves empty.

Host memory: ``alignment_table`` returns every pair's parameters and score (17 bytes per pair),
``alignment_scores`` the ``(n, k)`` float32 scores only; ISAC's MRA uses the latter and then
``align_to_assigned``, the same search against each particle's assigned reference alone.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jisac import polar, sharding
from jisac.polar import RingGeometry
from jisac.rows import RowRange, pad_rows
from jisac.transforms import Transform2D, from_centre_and_angle, particle_centre

Array = jax.Array

# 7-point least-squares parabola through samples at t = -3..3 (SPHIRE ``prb1d``, isac_algorithm.md §5.4):
# y ~ a + b t + c (t^2 - 4); b = sum(t y) / 28, c = sum((t^2 - 4) y) / 84; vertex at -b / (2c).
_PARABOLA_T = np.arange(-3, 4, dtype=np.float64)
_PARABOLA_Q = _PARABOLA_T**2 - 4.0


class SearchGrid(NamedTuple):
    """Candidate centres around each particle's current centre (SPHIRE ``xr``, ``yr``, ``ts``).

    Offsets are ``j * ts`` for ``j = -int(xr / ts) .. int(xr / ts)`` (same for y), y outer, x inner. Defaults
    give ISAC's 3x3 grid.
    """

    xr: float = 1.0
    yr: float = 1.0
    ts: float = 1.0

    def offsets(self) -> np.ndarray:
        """``(n_shifts, 2)`` float64 ``(dx, dy)`` offsets in pixels."""
        nx = int(self.xr / self.ts + 1e-6)
        ny = int(self.yr / self.ts + 1e-6)
        dy, dx = np.meshgrid(np.arange(-ny, ny + 1) * self.ts, np.arange(-nx, nx + 1) * self.ts, indexing="ij")
        return np.stack([dx.ravel(), dy.ravel()], -1).astype(np.float64)

    @property
    def n_shifts(self) -> int:
        return len(self.offsets())

    def validate(self) -> None:
        if self.ts <= 0:
            raise ValueError(f"ts (search step) must be > 0 (got {self.ts})")
        if self.xr < 0 or self.yr < 0:
            raise ValueError(f"xr and yr (search ranges) must be >= 0 (got xr={self.xr}, yr={self.yr})")


class AlignOptions(NamedTuple):
    """Static options of a multi-reference search (hashable).

    Attributes:
        geometry: the polar rings.
        grid: candidate centres around each particle's current centre.
        mirror: also search the x-mirrored particle.
        normalize_particles: ring-normalise each particle at each candidate centre (MRA, §5.3). Use it with
            integer grid steps, as ISAC does: bilinear interpolation smooths noise at fractional positions, so on
            a sub-pixel grid normalisation favours those positions at low SNR.
        normalize_references: ring-normalise the references (GPU ISAC does; CPU ISAC only mean-subtracts).
        coarse_step_deg: if > 0, only angles that are multiples of this are tried, without sub-sample refinement
            (SPHIRE's ``dst`` "discrete angle" passes, §5.4); 0 means the full search.
        particle_batch: particles per inner step inside one jitted call.
        reference_chunk: references per inner step.
        freq_block: angular frequencies per block of the band-limited contraction.
    """

    geometry: RingGeometry = RingGeometry()
    grid: SearchGrid = SearchGrid()
    mirror: bool = True
    normalize_particles: bool = True
    normalize_references: bool = False
    coarse_step_deg: float = 0.0
    # Small inner steps keep the (batch x shifts x 2 chunk x 256) correlations in cache: 4 x 50 measured
    # fastest on a 2-core EPYC (docs/benchmarks.md).
    particle_batch: int = 4
    reference_chunk: int = 50
    freq_block: int = 16


class ReferenceBank(NamedTuple):
    """References prepared for the search: weighted ring spectra in frequency-major blocks, chunked.

    Attributes:
        blocks: one array per frequency block, ``(n_chunks, block_freqs, 2 * block_rings, 2 * m)`` float32 with
            ``m = n_mirror * chunk``: the complex spectra (straight ``w_r conj(A)``, then when mirroring
            ``w_r (-1)^k A``) embedded as real matrices ``[[Re, Im], [-Im, Re]]`` so that a particle row
            ``[Re B | Im B]`` times the block gives ``[Re(A B) | Im(A B)]`` in one real matmul (about twice as
            fast on CPU as a complex matmul, measured).
        valid: ``(n_chunks, chunk)`` bool, False for padding references.
    """

    blocks: tuple[Array, ...]
    valid: Array

    @property
    def n_references(self) -> int:
        return int(self.valid.size)


class Alignment(NamedTuple):
    """Best match of each particle over all references: ``reference`` (int32), ``params``, ``score``."""

    reference: Array
    params: Transform2D
    score: Array


class AlignmentTable(NamedTuple):
    """Best parameters and score of every (particle, reference) pair, fields of shape ``(n, k)``."""

    params: Transform2D
    score: Array


def frequency_blocks(geometry: RingGeometry, block: int) -> tuple[tuple[int, int, int], ...]:
    """Static split of the (ring, frequency) plane into dense blocks ``(k0, k1, first_ring_index)``.

    Block ``[k0, k1)`` includes every ring that keeps some frequency ``>= k0``; blocks no ring reaches are
    dropped. Without band limit it is one block of all rings.
    """
    max_freq = geometry.max_freq()
    out = []
    for k0 in range(0, geometry.n_freqs, block):
        k1 = min(k0 + block, geometry.n_freqs)
        rings = np.nonzero(max_freq >= k0)[0]
        if len(rings):
            out.append((k0, k1, int(rings[0])))
    return tuple(out)


def _reference_spectra(references: Array, options: AlignOptions) -> Array:
    """``(k, ny, nx)`` references -> ``(k, n_mirror, n_rings, n_freqs)`` weighted, conjugated spectra."""
    geom = options.geometry
    centres = jnp.zeros((references.shape[0], 1, 2), jnp.float32)
    spec = polar.polar_spectra(references, centres, geom, normalize=options.normalize_references)[:, 0]
    spec = spec * jnp.asarray(geom.weights(), jnp.float32)[:, None]
    parts = [jnp.conj(spec)]
    if options.mirror:
        sign = jnp.asarray((-1.0) ** np.arange(geom.n_freqs), jnp.float32)
        parts.append(spec * sign)
    return jnp.stack(parts, 1)


@functools.partial(jax.jit, static_argnames=("options",))
def prepare_references(references: Array, options: AlignOptions) -> ReferenceBank:
    """Turns ``(k, ny, nx)`` reference images (centred on the box centre) into a ``ReferenceBank``."""
    k = references.shape[0]
    chunk = options.reference_chunk
    n_chunks = -(-k // chunk)
    pad = n_chunks * chunk - k
    spec = _reference_spectra(references, options)  # (k, nm, R, F)
    spec = jnp.pad(spec, ((0, pad), (0, 0), (0, 0), (0, 0)))
    nm = spec.shape[1]
    # (chunks, chunk, nm, R, F) -> (chunks, F, R, nm * chunk): mirror-major inside a chunk.
    spec = spec.reshape(n_chunks, chunk, nm, *spec.shape[2:])
    spec = spec.transpose(0, 4, 3, 2, 1).reshape(n_chunks, spec.shape[4], spec.shape[3], nm * chunk)
    re, im = spec.real, spec.imag  # (chunks, F, R, m)
    embedded = jnp.concatenate(
        [jnp.concatenate([re, im], -1), jnp.concatenate([-im, re], -1)], -2
    )  # (chunks, F, 2R, 2m)
    n_rings = spec.shape[2]
    blocks = tuple(
        jnp.concatenate(
            [embedded[:, k0:k1, r0:n_rings], embedded[:, k0:k1, n_rings + r0 :]], -2
        )
        for k0, k1, r0 in frequency_blocks(options.geometry, options.freq_block)
    )
    valid = (jnp.arange(n_chunks * chunk) < k).reshape(n_chunks, chunk)
    return ReferenceBank(blocks, valid)


def _parabola_offset(samples: Array) -> Array:
    """Sub-sample peak offset from 7 samples centred on the maximum (last axis); clipped to [-1, 1]."""
    b = samples @ jnp.asarray(_PARABOLA_T, jnp.float32)
    c = samples @ jnp.asarray(_PARABOLA_Q, jnp.float32)
    # A maximum needs c < 0; a flat or convex neighbourhood keeps the sample itself.
    offset = jnp.where(c < 0, -1.5 * b / jnp.where(c < 0, c, -1.0), 0.0)
    return jnp.clip(offset, -1.0, 1.0)


def _correlate(spec: Array, blocks: tuple[Array, ...], options: AlignOptions) -> Array:
    """Rotational correlations of particle spectra with one reference chunk.

    Args:
        spec: ``(F, b, s, R)`` complex particle ring spectra (frequency-major).
        blocks: the chunk's real-embedded frequency blocks ``(F_blk, 2 R_blk, 2 m)``.

    Returns:
        ``(b, s, m, n_angles)`` float32 scores for every angle.
    """
    geom = options.geometry
    _, b, s, _ = spec.shape
    x = spec.reshape(spec.shape[0], b * s, -1)
    parts = []
    for (k0, k1, r0), bank in zip(frequency_blocks(geom, options.freq_block), blocks):
        xb = x[k0:k1, :, r0:]
        xb = jnp.concatenate([xb.real, xb.imag], -1)  # (F_blk, bs, 2 R_blk)
        parts.append(jnp.matmul(xb, bank, precision=jax.lax.Precision.HIGHEST))  # (F_blk, bs, 2m)
    # Frequency-last for the irfft; transposing the real [Re | Im] product before making it complex measured
    # ~10 % faster than the other orders. Frequencies above the last block are implicitly zero (irfft pads).
    prod = jnp.concatenate(parts, 0).transpose(1, 2, 0)  # (bs, 2m, F_used)
    m = prod.shape[1] // 2
    corr = jnp.fft.irfft(jax.lax.complex(prod[:, :m], prod[:, m:]), n=geom.n_angles, axis=-1)  # (bs, m, A)
    return corr.reshape(b, s, m, geom.n_angles)


def _angle_step(options: AlignOptions) -> int:
    """Stride of the angles tried, in samples: 1, or the coarse (``dst``) step."""
    if options.coarse_step_deg > 0:
        return max(1, int(options.coarse_step_deg / 360.0 * options.geometry.n_angles))
    return 1


def _candidate_peaks(corr: Array, options: AlignOptions) -> Array:
    """``(b, s, nm*kc, A)`` correlations -> ``(b, kc, nm*s)`` best score over the angles tried, per reference
    and candidate (mirror, centre), ordered ``mirror * s + (s - 1 - shift)``.

    The order makes argmax's first-hit rule reproduce SPHIRE's tie-breaking (§5.5): straight before mirrored,
    later grid points before earlier ones.
    """
    b, s, m, _ = corr.shape
    nm = 2 if options.mirror else 1
    peak = corr[..., :: _angle_step(options)].max(-1).reshape(b, s, nm, m // nm)
    return jnp.flip(peak, 1).transpose(0, 3, 2, 1).reshape(b, m // nm, nm * s)


def _score_per_reference(corr: Array, valid: Array, options: AlignOptions) -> Array:
    """``(b, kc)`` best score per reference (``-inf`` for padding references): the ``score`` of
    ``_best_per_reference`` (the same max, bit for bit) without the parameters."""
    return jnp.where(valid[None, :], _candidate_peaks(corr, options).max(-1), -jnp.inf)


def _best_per_reference(corr: Array, offsets: Array, centre: Array, valid: Array, options: AlignOptions):
    """Reduces ``(b, s, nm*kc, A)`` correlations to the best (angle, centre, mirror, score) per reference.

    Two stages (cheap max first, argmax only for the winner): max over angles, best (centre, mirror), then the
    winner's angle with parabolic refinement. Ties go to the later grid point and to the mirrored match only
    when strictly better (SPHIRE, §5.5).
    """
    n_angles = options.geometry.n_angles
    b, s, m, _ = corr.shape
    kc = m // (2 if options.mirror else 1)
    step = _angle_step(options)
    cand = _candidate_peaks(corr, options)
    best = jnp.argmax(cand, -1)  # (b, kc)
    score = jnp.take_along_axis(cand, best[..., None], -1)[..., 0]
    mirror = best // s
    shift = s - 1 - best % s
    row_index = mirror * kc + jnp.arange(kc)[None, :]  # index into the m axis
    rows = corr[jnp.arange(b)[:, None], shift, row_index]  # (b, kc, A)
    if options.coarse_step_deg > 0:
        j = jnp.argmax(rows[..., ::step], -1) * step
        frac = jnp.zeros_like(j, dtype=jnp.float32)
    else:
        j = jnp.argmax(rows, -1)
        idx = (j[..., None] + jnp.arange(-3, 4)) % n_angles
        frac = _parabola_offset(jnp.take_along_axis(rows, idx, -1))
    angle = (j.astype(jnp.float32) + frac) * (360.0 / n_angles)
    c = centre[:, None, :] + offsets[shift]  # (b, kc, 2)
    params = from_centre_and_angle(c[..., 0], c[..., 1], angle, mirror.astype(bool))
    score = jnp.where(valid[None, :], score, -jnp.inf)
    return params, score


def _particle_spectra(images: Array, centres: Array, options: AlignOptions) -> Array:
    """``(b, ny, nx)`` images, ``(b, 2)`` current centres -> ``(F, b, s, R)`` spectra at every grid centre."""
    offsets = jnp.asarray(options.grid.offsets(), jnp.float32)
    cand = centres[:, None, :] + offsets[None]
    spec = polar.polar_spectra(images, cand, options.geometry, normalize=options.normalize_particles)
    return spec.transpose(3, 0, 1, 2)


def _table_batch(images: Array, centres: Array, bank: ReferenceBank, options: AlignOptions):
    """One particle sub-batch against every reference chunk: ``Transform2D`` and score of shape ``(b, K)``."""
    spec = _particle_spectra(images, centres, options)
    offsets = jnp.asarray(options.grid.offsets(), jnp.float32)

    def one_chunk(args):
        blocks, valid = args
        corr = _correlate(spec, blocks, options)
        return _best_per_reference(corr, offsets, centres, valid, options)

    params, score = jax.lax.map(one_chunk, (bank.blocks, bank.valid))  # leading axis: chunk
    to_bk = lambda a: jnp.moveaxis(a, 0, 1).reshape(a.shape[1], -1)  # noqa: E731
    return jax.tree.map(to_bk, params), to_bk(score)


def _scores_batch(images: Array, centres: Array, bank: ReferenceBank, options: AlignOptions) -> Array:
    """``_table_batch``'s scores alone, ``(b, K)``: the per-pair parameters (the winner's angle refinement and
    centre) are never computed, nor written to the host."""
    spec = _particle_spectra(images, centres, options)

    def one_chunk(args):
        blocks, valid = args
        return _score_per_reference(_correlate(spec, blocks, options), valid, options)

    score = jax.lax.map(one_chunk, (bank.blocks, bank.valid))  # (chunks, b, kc)
    return jnp.moveaxis(score, 0, 1).reshape(score.shape[1], -1)


def _map_batches(fn, images: Array, centres: Array, batch: int):
    """Applies ``fn`` to fixed-size sub-batches of particles with ``lax.map`` (``n`` must divide by ``batch``)."""
    n = images.shape[0]
    out = jax.lax.map(
        lambda args: fn(*args),
        (images.reshape(n // batch, batch, *images.shape[1:]), centres.reshape(n // batch, batch, 2)),
    )
    return jax.tree.map(lambda a: a.reshape(n, *a.shape[2:]), out)


@functools.partial(jax.jit, static_argnames=("options",))
def _table_chunk(images, centres, bank, options):
    return _map_batches(lambda i, c: _table_batch(i, c, bank, options), images, centres, options.particle_batch)


@functools.partial(jax.jit, static_argnames=("options",))
def _scores_chunk(images, centres, bank, options):
    return _map_batches(lambda i, c: _scores_batch(i, c, bank, options), images, centres, options.particle_batch)


@functools.partial(jax.jit, static_argnames=("options",))
def _best_chunk(images, centres, bank, options):
    def best(i, c):
        params, score = _table_batch(i, c, bank, options)
        k = jnp.argmax(score, -1)
        pick = lambda a: jnp.take_along_axis(a, k[:, None], -1)[:, 0]  # noqa: E731
        return k.astype(jnp.int32), jax.tree.map(pick, params), pick(score)

    return _map_batches(best, images, centres, options.particle_batch)


def _iterate_chunks(
    fn, images, params, bank, options: AlignOptions, particle_chunk: int, progress, mesh, labels=None, n_columns=None
):
    """Host loop over fixed-size particle chunks (the last one padded), returning the outputs as host arrays.

    ``fn(images, centres, [labels,] bank, options)``. With a mesh, each chunk is split evenly over its devices
    (one shard per device; with several processes each reads only its devices' rows) and the bank is
    replicated; results are identical to the single-device run. Outputs are written into preallocated host
    arrays (no concatenated copies); ``n_columns`` keeps only the first columns of ``(b, K)`` outputs (drops the
    padding references before they reach the host buffers, so an ``(n, k)`` table is never copied to trim it).
    Each chunk is dispatched before the previous one's results are fetched, so the device computes while the
    host reads the next rows and copies results (on a GPU the host side would otherwise idle it).
    """
    n = images.shape[0]
    n_dev = 1 if mesh is None else mesh.size
    step = options.particle_batch * n_dev
    chunk = max(step, particle_chunk - particle_chunk % step)
    # a small stack is not padded to a whole chunk, only to a few sizes (size_bucket whole steps)
    chunk = min(chunk, size_bucket(-(-n // step)) * step)
    if params is None:
        centres = np.zeros((n, 2), np.float32)
    else:
        cx, cy = (np.broadcast_to(np.asarray(c, np.float32), (n,)) for c in particle_centre(params))
        centres = np.stack([cx, cy], -1)
    n_split = 2 if labels is None else 3
    call_fn = sharding.over_particles(fn, mesh, (True,) * n_split + (False,), True, options=options)
    bank_dev = bank if mesh is None else sharding.replicate(bank, mesh)  # copied to the devices once
    call = lambda *per_particle: call_fn(*sharding.to_devices(per_particle, mesh, (bank_dev,)))  # noqa: E731
    outs = None

    def store(start, stop, result):
        nonlocal outs
        out = jax.tree.map(sharding.fetch, result)
        if n_columns is not None:
            out = jax.tree.map(lambda a: a[:, :n_columns] if a.ndim > 1 else a, out)
        if outs is None:
            outs = jax.tree.map(lambda a: np.empty((n,) + a.shape[1:], a.dtype), out)
        jax.tree.map(lambda dst, src: dst.__setitem__(slice(start, stop), src[: stop - start]), outs, out)
        if progress is not None:
            progress(stop, n)

    pending = None
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        # Padded to the static chunk shape so there is one compilation whatever n is.
        per_particle = [RowRange(images, start, stop, chunk), pad_rows(centres[start:stop], chunk)]
        if labels is not None:
            per_particle.append(pad_rows(np.asarray(labels[start:stop], np.int32), chunk))
        result = call(*per_particle)  # dispatched asynchronously: the device works while the host goes on
        if pending is not None:
            store(*pending)  # the previous chunk's results, fetched while this chunk runs
        pending = (start, stop, result)
    if pending is not None:
        store(*pending)
    return outs


def align_to_references(
    images,
    bank: ReferenceBank,
    options: AlignOptions = AlignOptions(),
    params: Transform2D | None = None,
    particle_chunk: int = 512,
    progress=None,
    mesh: jax.sharding.Mesh | None = None,
) -> Alignment:
    """Best reference, parameters and score for every particle.

    Args:
        images: ``(n, ny, nx)`` particles (NumPy, on disk (``DiskArray``) or JAX array; read chunk by chunk).
        bank: references from ``prepare_references`` (same box size).
        options: the search (must be the options the bank was prepared with).
        params: current parameters; the grid is centred on each particle's current centre
            (``transforms.particle_centre``). ``None`` means the box centre.
        particle_chunk: particles per jitted call (rounded to a multiple of ``options.particle_batch`` times
            the number of devices).
        progress: optional ``callback(done, total)`` called after each chunk.
        mesh: optional one-axis device mesh; each chunk's particles are split over its devices (on a CPU,
            ``jax_num_cpu_devices`` = cores makes one device per core).

    Returns:
        ``Alignment`` with fields of shape ``(n,)``: params bring each particle onto its reference.
    """
    out = _iterate_chunks(_best_chunk, images, params, bank, options, particle_chunk, progress, mesh)
    k, params_, score = jax.tree.map(jnp.asarray, out)
    return Alignment(k, params_, score)


def alignment_table(
    images,
    bank: ReferenceBank,
    options: AlignOptions = AlignOptions(),
    params: Transform2D | None = None,
    particle_chunk: int = 512,
    n_references: int | None = None,
    progress=None,
    mesh: jax.sharding.Mesh | None = None,
) -> AlignmentTable:
    """Best parameters and score of every (particle, reference) pair: fields of shape ``(n, k)``.

    Arguments as ``align_to_references``; ``n_references`` trims the padding references of the last chunk
    (default: all valid references). The table is returned as host (NumPy) arrays, 17 bytes per pair (3.4 GB
    for 200,000 x 1,000): where only the chosen pair's parameters are needed, as in ISAC's MRA, use
    ``alignment_scores`` (4 bytes per pair) and ``align_to_assigned``.
    """
    params_, score = _per_pair(
        _table_chunk, images, bank, options, params, particle_chunk, n_references, progress, mesh
    )
    return AlignmentTable(params_, score)


def alignment_scores(
    images,
    bank: ReferenceBank,
    options: AlignOptions = AlignOptions(),
    params: Transform2D | None = None,
    particle_chunk: int = 512,
    n_references: int | None = None,
    progress=None,
    mesh: jax.sharding.Mesh | None = None,
) -> np.ndarray:
    """Best score of every (particle, reference) pair: ``alignment_table(...).score`` (the same values, bit
    for bit) without the per-pair parameters.

    Arguments as ``alignment_table``. Returns a ``(n, k)`` float32 NumPy array, the only ``n k`` thing held on
    the host (4 bytes per pair; the parameter table would add 13). ISAC's MRA needs the parameters of the
    assigned pair only: get them with ``align_to_assigned`` (the same search restricted to that reference).
    """
    return _per_pair(_scores_chunk, images, bank, options, params, particle_chunk, n_references, progress, mesh)


def _per_pair(fn, images, bank, options, params, particle_chunk, n_references, progress, mesh):
    """``fn``'s ``(n, K)`` per-pair outputs for all particles, trimmed to the first ``n_references`` columns
    (default: every valid reference) before they reach the host buffers."""
    k = int(np.asarray(bank.valid).sum()) if n_references is None else n_references
    return _iterate_chunks(fn, images, params, bank, options, particle_chunk, progress, mesh, n_columns=k)


@functools.partial(jax.jit, static_argnames=("options",))
def prepare_assigned_references(references: Array, options: AlignOptions) -> Array:
    """``(k, ny, nx)`` references -> ``(k, n_mirror, n_rings, n_freqs)`` complex spectra for ``align_to_assigned``."""
    return _reference_spectra(references, options)


def paired_best(spec: Array, refs: Array, centres: Array, options: AlignOptions, coarse: AlignOptions | None = None,
                use_coarse: Array | bool = False):
    """Best parameters and score of each particle against its own one reference.

    Args:
        spec: ``(b, s, R, F)`` particle ring spectra at the ``s`` grid centres around ``centres``.
        refs: ``(b, nm, R, F)`` each particle's reference, as ``prepare_assigned_references`` makes it. ``F``
            may stop below ``n_angles // 2 + 1``: the missing (band-limited) frequencies are zero.
        centres: ``(b, 2)`` current centres (x, y), pixels.
        coarse, use_coarse: optionally a second search (``coarse_step_deg``: the within-group runs' coarse passes)
            and a traced bool saying which one's result to return. The correlations are computed once and both
            searches read them, so one compiled loop serves both kinds of pass (a conditional around two loops
            compiled the alignment twice; the results are bit for bit those of the search asked for).

    Returns:
        ``(params, score)`` with fields of shape ``(b,)``.
    """
    # Only the (ring, frequency) pairs the band limit keeps: blocks of frequencies, each over the rings that reach
    # it (39 % fewer products than the full plane for ISAC's 29 rings; the skipped terms are zeros).
    n_freqs = spec.shape[-1]
    prod = jnp.concatenate([
        jnp.einsum("bsrf,bmrf->bsmf", spec[:, :, r0:, k0:k1], refs[:, :, r0:, k0:k1],
                   precision=jax.lax.Precision.HIGHEST)
        for k0, k1, r0 in frequency_blocks(options.geometry, options.freq_block) if k0 < n_freqs
    ], -1)
    corr = jnp.fft.irfft(prod, n=options.geometry.n_angles, axis=-1)  # (b, s, nm, A)
    offsets = jnp.asarray(options.grid.offsets(), jnp.float32)
    valid = jnp.ones((1,), bool)
    params, score = _best_per_reference(corr, offsets, centres, valid, options)
    if coarse is not None:
        alt, alt_score = _best_per_reference(corr, offsets, centres, valid, coarse)
        params, score = jax.tree.map(lambda f, c: jnp.where(use_coarse, c, f), (params, score), (alt, alt_score))
    return jax.tree.map(lambda a: a[:, 0], params), score[:, 0]


def _paired_batch(images: Array, centres: Array, labels: Array, spectra: Array, options: AlignOptions,
                  coarse: AlignOptions | None = None, use_coarse: Array | bool = False):
    spec = _particle_spectra(images, centres, options).transpose(1, 2, 3, 0)  # (b, s, R, F)
    return paired_best(spec, spectra[labels], centres, options, coarse, use_coarse)


@functools.partial(jax.jit, static_argnames=("options", "coarse"))
def _paired_chunk(images, centres, labels, spectra, options, coarse=None, use_coarse=False):
    """``paired_best`` of every particle at its ``centres`` (resampled here), ``particle_batch`` at a time;
    ``coarse``, ``use_coarse`` as there."""
    n, batch = images.shape[0], options.particle_batch
    out = jax.lax.map(
        lambda args: _paired_batch(*args, spectra, options, coarse, use_coarse),
        (
            images.reshape(n // batch, batch, *images.shape[1:]),
            centres.reshape(n // batch, batch, 2),
            labels.reshape(n // batch, batch),
        ),
    )
    return jax.tree.map(lambda a: a.reshape(n, *a.shape[2:]), out)


def align_to_assigned(
    images,
    spectra: Array,
    labels,
    options: AlignOptions = AlignOptions(),
    params: Transform2D | None = None,
    particle_chunk: int = 512,
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[Transform2D, Array]:
    """Aligns each particle to one given reference: ISAC's within-group alignment step, and the parameters of
    the assigned class after an MRA's equal-size assignment.

    It is the table's search restricted to one reference per particle (same grid about the same current
    centre, same ring normalisation, angle search and mirror tie-breaking; ``_best_per_reference``), so its
    result is ``alignment_table(...)`` at ``(i, labels[i])`` up to float rounding (the contraction sums in
    another order; only a near-tie between two grid points or mirrors can then pick the other), for ``1 / k``
    of the table's work and ``(n,)`` memory. Pass the references the bank was made from, with the same options.

    Args:
        images: ``(n, ny, nx)`` particles.
        spectra: ``prepare_assigned_references(references, options)``, ``(k, n_mirror, n_rings, n_freqs)``.
        labels: ``(n,)`` index of each particle's reference.
        options, params, particle_chunk, mesh: as ``align_to_references``.

    Returns:
        ``(params, score)`` with fields of shape ``(n,)``.
    """
    out = _iterate_chunks(_paired_chunk, images, params, spectra, options, particle_chunk, None, mesh, labels)
    return jax.tree.map(jnp.asarray, out)


def size_bucket(m: int) -> int:
    """1, 2, 4, 8, then the smallest ``j * 2**e >= m`` with ``j`` in 4..7: four sizes per octave, so that shapes
    that change from one generation to the next (class counts, particles per call) fall on few values and compile
    a few programs per run instead of a few per generation, at most 25 % padding above 8 (about 10 % typical).
    """
    m = max(int(m), 1)
    if m <= 8:
        return 1 << (m - 1).bit_length()
    e = m.bit_length() - 3  # m in [4 * 2**e, 8 * 2**e)
    return -(-m // (1 << e)) << e


def chunk_sizes_for_budget(
    n_references: int, options: AlignOptions, memory_budget_bytes: int = 1 << 30
) -> tuple[int, int]:
    """``(particle_batch, reference_chunk)`` whose largest intermediate fits in ``memory_budget_bytes``.

    The largest live arrays of one inner step are the complex products and real correlations,
    ``particle_batch * n_shifts * n_mirror * reference_chunk * n_angles`` values of 4-8 bytes each; we budget
    16 bytes per value for them and their temporaries.
    """
    nm = 2 if options.mirror else 1
    per_pair = options.grid.n_shifts * nm * options.geometry.n_angles * 16
    ref_chunk = max(1, min(n_references, options.reference_chunk))
    batch = options.particle_batch
    while batch > 1 and batch * ref_chunk * per_pair > memory_budget_bytes:
        batch //= 2
    while ref_chunk > 1 and batch * ref_chunk * per_pair > memory_budget_bytes:
        ref_chunk = math.ceil(ref_chunk / 2)
    return batch, ref_chunk
