"""Algorithm layer: Pre-alignment: reference-free alignment of the whole stack, kept only for centring
(``isac_algorithm.md`` §3.1, SPHIRE ``ali2d_base`` as called by ``sp_isac2.py``).

All particles are aligned to their global average over several search stages (coarse to fine translational
ranges), ``maxit`` passes each. Every pass centres the average by the members' mean displacement (SPHIRE's
``center_method = -1``), low-passes it and aligns every particle to it. Only the resulting centre is kept:
the shift that moves each particle's centre to the box centre, ``t = -particle_centre(P)`` (rotation and mirror
are discarded).

Two ways to search a pass (``PrealignOptions.method``), both over the same grid of candidate offsets ``o``:

- ``"shift_particles"`` (SPHIRE's): every particle is resampled in polar coordinates about each candidate centre
  ``c + o`` (``c`` its current centre) and correlated with the reference's rings about the box centre:
  ``n x n_shifts`` polar transforms per pass.
- ``"shift_reference"`` (the default, several times faster): there is only one reference, so the reference is
  resampled about each ``d = -o`` instead (``n_shifts`` copies, prepared once per pass as a bank of references)
  and every particle once, about ``c``; ``align.align_to_references`` picks the best (copy, angle, mirror).
  Matching particle rings about ``c`` at angle ``psi`` (mirror ``m``) with reference rings about ``d`` is the
  rigid map ``T(v) = M_m R(psi) (v - c) + d`` (``transforms`` convention), so the particle point that lands on
  the reference's centre is ``c' = c - R(-psi) M_m d = c + R(-psi) M_m o``: the found parameters are
  ``from_centre_and_angle(c', psi, m)``. The candidate centres are the same grid rotated (and mirrored) about
  ``c`` by the particle's own angle: equally spaced, the same count, and identical where ``psi = 0``. The
  reference is masked to the particle radius ``R`` (as SPHIRE's ``ref_ali2d`` does; ``shift_particles`` keeps
  jisac's unmasked reference) and both ring sets reach ``R`` plus the longest offset, so that a candidate's
  score covers the reference's whole disc, as SPHIRE's does (``align_to_shifted_reference``).

Differences from SPHIRE, on purpose: the reference's low-pass cutoff rises on a fixed schedule (0.1 -> ``fh``)
instead of a tanh fit to the even/odd FRC; the first pass starts from a random rotation and mirror per
particle (as ISAC's within-group alignment) rather than from zero; by default the (masked) reference is shifted
instead of the particles (above).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jisac import align, average, filters
from jisac.events import Step
from jisac.polar import RingGeometry
from jisac.transforms import Transform2D, compose, from_centre_and_angle, make_transform, particle_centre
from jisac.within_group import random_start


def search_stages(box: int, target_radius: int) -> list[tuple[int, int]]:
    """``(range, step)`` of each stage for a shrunk box (SPHIRE: nx' = 77, radius 29 -> (8, 2), (4, 1))."""
    txrm = (box - 2 * (target_radius + 1)) // 2
    if txrm < 0:
        raise ValueError(
            f"pre-alignment: the particle (target_radius {target_radius}) does not fit in the shrunk {box} px box"
        )
    stages = []
    while txrm // 4 > 0:
        step = txrm // 4
        stages.append((4 * step, step))
        txrm //= 2
    return stages or [(txrm, 1)]


class PrealignOptions(NamedTuple):
    """``maxit`` passes per stage at most (SPHIRE's hidden constant 14). A stage ends early after a pass that
    moved at most a fraction ``unsettled`` of the particles' centres by more than ``tol`` px (``unsettled < 0``:
    always ``maxit`` passes). Measured on the demo (docs/benchmarks.md): after 8-9 passes of the first stage and
    1-2 of the second (``shift_particles``; ``shift_reference``: 10 and 3), every pass moves the same 1-2 % of
    particles back and forth by one grid step while the rest stay put to 1e-3 px, so the remaining passes only
    spend time. The reference's cutoff follows the full
    schedule (pass ``j`` of stage ``s`` has the cutoff of pass ``s * maxit + j``), so a stage that ends early
    does not change the next stage's cutoffs.

    ``method`` is how a pass searches the candidate centres (module docstring): ``"shift_reference"`` (one polar
    transform per particle and one per candidate offset) or ``"shift_particles"`` (SPHIRE's: one per particle
    and candidate offset). ``particle_batch`` is the particles per inner step of the ``"shift_reference"``
    search (one centre each, so larger than the multi-centre searches' 4)."""

    maxit: int = 14
    fh: float = 0.4
    ff: float = 0.2
    tol: float = 0.05
    unsettled: float = 0.02
    method: str = "shift_reference"
    particle_batch: int = 16


METHODS = ("shift_reference", "shift_particles")


def shifted_copies(image: jax.Array, offsets: np.ndarray) -> jax.Array:
    """``(s, ny, nx)`` copies of a ``(ny, nx)`` image, copy ``j`` moved by the integer offset ``o_j``:
    ``copy_j(v) = image(v - o_j)``, so its rings about the box centre are the image's rings about ``-o_j``.

    A periodic integer shift (exact, no interpolation). The search shifts the masked reference, zero outside the
    disc of radius ``target_radius``, and ``search_stages`` keeps that disc inside the box when moved by any
    offset: nothing wraps round, and rings beyond the box read zero as bilinear sampling does.
    """
    return _rolled(jnp.asarray(image), _integer_offsets(offsets))


def _integer_offsets(offsets: np.ndarray) -> jax.Array:
    o = np.rint(offsets)
    if not np.allclose(o, offsets):
        raise ValueError(f"pre-alignment: the shift_reference search needs integer offsets (got {offsets.tolist()})")
    return jnp.asarray(o, jnp.int32)


def _rolled(image: jax.Array, offsets: jax.Array) -> jax.Array:
    """``shifted_copies`` for ``(s, 2)`` int32 offsets (traced: one program whatever the grid's spacing)."""
    ny, nx = image.shape[-2:]
    rows = (jnp.arange(ny)[None, :] - offsets[:, 1, None]) % ny  # (s, ny)
    cols = (jnp.arange(nx)[None, :] - offsets[:, 0, None]) % nx  # (s, nx)
    return image[rows[:, :, None], cols[:, None, :]]


def shifted_reference_geometry(geometry: RingGeometry, *grids: align.SearchGrid) -> RingGeometry:
    """The rings of the ``shift_reference`` search: ``geometry``'s, out to ``last_ring`` plus the longest offset
    of ``grids`` (rounded up), so that a disc of radius ``last_ring`` about any candidate centre lies inside
    them. ``prealign`` passes every stage's grid: one geometry for all stages compiles the search once."""
    reach = max(int(np.ceil(np.max(np.hypot(*grid.offsets().T)) - 1e-9)) for grid in grids)
    return geometry._replace(last_ring=geometry.last_ring + reach)


def masked_reference(reference: jax.Array, radius: int) -> jax.Array:
    """SPHIRE's pre-alignment reference (``ref_ali2d``): minus its mean inside the circle of ``radius`` px about
    the box centre, times that circle (zero outside)."""
    ny, nx = reference.shape[-2:]
    mask = jnp.asarray(filters.circular_mask(ny, nx, radius))
    mean = jnp.sum(jnp.where(mask, reference, 0.0)) / jnp.sum(mask)
    return jnp.where(mask, reference - mean, 0.0)


def align_to_shifted_reference(images, reference: jax.Array, current: Transform2D, opts: align.AlignOptions,
                               particle_batch: int = 16, mesh: jax.sharding.Mesh | None = None,
                               rings: RingGeometry | None = None) -> Transform2D:
    """One pre-alignment search by shifting the reference (module docstring): the best of ``opts.grid``'s
    offsets, every angle and the mirror for each particle, reported as the transform onto the reference.

    The reference is masked to the disc of radius ``R = opts.geometry.last_ring`` (``masked_reference``) and
    both sets of rings reach ``R`` plus the longest offset (``shifted_reference_geometry``). The score of a
    candidate is then the weighted sum of reference x particle over the reference's whole disc, whichever the
    candidate: the integral SPHIRE's search (particle rings about the candidate, radius ``R``) takes against the
    masked reference. With rings of radius ``R`` only, the particle's window would stay on its current centre
    and scores of neighbouring candidates would depend on where the search started (measured: a few per cent of
    particles then hop between two centres every pass and the stages do not settle).

    Args:
        images: ``(n, ny, nx)`` particles.
        reference: ``(ny, nx)`` the one reference (centred on the box centre).
        current: ``Transform2D`` with fields ``(n,)``: the particles' rings are taken about its centres.
        opts: the search; ``opts.grid`` must have integer offsets.
        particle_batch: particles per inner step.
        mesh: optional device mesh (``align.align_to_references``).
        rings: the rings searched; default ``shifted_reference_geometry(opts.geometry, opts.grid)`` (wider ones
            give the same scores up to sampling).

    Returns:
        ``Transform2D`` with fields ``(n,)``, ``from_centre_and_angle(c + R(-psi) M_m o, psi, m)``.
    """
    n_shifts = opts.grid.n_shifts
    # one centre per particle; the bank's references are the reference's shifted copies (one chunk)
    rings = shifted_reference_geometry(opts.geometry, opts.grid) if rings is None else rings
    ref_opts = opts._replace(geometry=rings,
                             grid=align.SearchGrid(0.0, 0.0, 1.0), reference_chunk=n_shifts,
                             particle_batch=particle_batch)
    bank = _shifted_bank(reference, _integer_offsets(opts.grid.offsets()), opts.geometry.last_ring, ref_opts)
    best = align.align_to_references(images, bank, ref_opts, params=current, mesh=mesh)
    return _moved_centres(best.params, best.reference, jnp.asarray(opts.grid.offsets(), jnp.float32))


@functools.partial(jax.jit, static_argnames=("radius", "options"))
def _shifted_bank(reference: jax.Array, offsets: jax.Array, radius: int, options: align.AlignOptions):
    """The bank of the masked reference's copies shifted by ``(s, 2)`` int32 ``offsets``, in one program (the
    first pass's time is mostly compilation: one program instead of a dozen eager ones)."""
    return align.prepare_references(_rolled(masked_reference(reference, radius), offsets), options)


@jax.jit
def _moved_centres(found: Transform2D, index: jax.Array, offsets: jax.Array) -> Transform2D:
    """``from_centre_and_angle(c + R(-psi) M_m o, psi, m)`` for the search's ``found`` parameters (centre ``c``,
    angle ``psi``, mirror ``m``) and the offsets ``o = offsets[index]`` of the chosen copies."""
    cx, cy = particle_centre(found)
    o = offsets[index]
    ox = jnp.where(found.mirror, -o[:, 0], o[:, 0])
    # R(-psi) (ox, oy) with R(a) = [[cos a, sin a], [-sin a, cos a]] (transforms' convention)
    a = jnp.deg2rad(-found.angle)
    dx = jnp.cos(a) * ox + jnp.sin(a) * o[:, 1]
    dy = -jnp.sin(a) * ox + jnp.cos(a) * o[:, 1]
    return from_centre_and_angle(cx + dx, cy + dy, found.angle, found.mirror)


@functools.partial(jax.jit, static_argnames=("falloff", "limit"))
def _centred_reference(avg: jax.Array, params: Transform2D, cutoff, falloff: float, limit: int):
    """One pass's reference and starting centres, in one program: the average ``(1, ny, nx)`` shifted by minus
    the members' mean displacement (SPHIRE's ``center_method = -1``), the members' ``params`` with it, the
    average low-passed (tanh, ``cutoff``/``falloff`` cycles/px), and every particle's current centre clipped to
    ``+-limit`` px as a ``Transform2D`` (the search starts there). Returns ``(reference, params, start)``."""
    disp_x = jnp.mean(jnp.where(params.mirror, -params.shift_x, params.shift_x))
    disp_y = jnp.mean(params.shift_y)
    avg = filters.fourier_shift(avg, -disp_x, -disp_y)
    params = compose(params, make_transform(0.0, -disp_x, -disp_y, False))
    avg = filters.tanh_lowpass(avg, cutoff, falloff)
    cx, cy = particle_centre(params)
    start = from_centre_and_angle(jnp.clip(cx, -limit, limit), jnp.clip(cy, -limit, limit), 0.0, False)
    return avg, params, start


def prealign(
    images,
    target_radius: int,
    key: jax.Array,
    options: PrealignOptions = PrealignOptions(),
    mesh: jax.sharding.Mesh | None = None,
    progress=None,
) -> np.ndarray:
    """Centring shifts ``(n, 2)`` (pixels of ``images``) that move each particle's centre to the box centre.

    Args:
        images: ``(n, nx, nx)`` particles (shrunk so the particle radius is ``target_radius``), normalised.
        target_radius: particle radius in pixels of ``images``: the outermost ring.
        key: PRNG key of the random start.
    """
    if options.method not in METHODS:
        raise ValueError(f"pre-alignment: PrealignOptions.method must be one of {METHODS} (got {options.method!r})")
    n, box = images.shape[0], images.shape[-1]
    stages = search_stages(box, target_radius)
    geometry = RingGeometry(1, target_radius, 1)
    labels = np.zeros(n, np.int32)
    params = random_start(key, None, n)
    total = len(stages) * options.maxit
    grids = [align.SearchGrid(rng_, rng_, step) for rng_, step in stages]
    rings = shifted_reference_geometry(geometry, *grids)
    for stage, (rng_, step) in enumerate(stages):
        before = None
        opts = align.AlignOptions(
            geometry=geometry, grid=align.SearchGrid(rng_, rng_, step), normalize_particles=False, reference_chunk=1
        )
        for it in range(options.maxit):
            avg = average.class_averages(images, params, labels, 1, mesh=mesh)
            cutoff = 0.1 + (options.fh - 0.1) * (stage * options.maxit + it + 1) / total
            avg, params, centred = _centred_reference(avg, params, cutoff, options.ff, box // 2 - target_radius - 2)
            if options.method == "shift_reference":
                params = align_to_shifted_reference(images, avg[0], centred, opts, options.particle_batch, mesh, rings)
            else:
                spectra = align.prepare_assigned_references(avg, opts)
                params, _ = align.align_to_assigned(images, spectra, labels, opts, params=centred, mesh=mesh)
            after = np.stack([np.asarray(c) for c in particle_centre(params)], -1)
            change = np.full(n, np.inf) if before is None else np.hypot(*(after - before).T)
            moved = int(np.sum(change > options.tol))
            before = after
            if progress is not None:
                progress(Step(f"pre-alignment +-{rng_} px step {step}", it + 1, options.maxit,
                              f"pre-alignment stage +-{rng_} px step {step}: pass {it + 1}/{options.maxit}, "
                              f"{moved} centres moved by more than {options.tol:g} px (largest {np.max(change):.3g})",
                              unit="pass"))
            if moved <= options.unsettled * n:
                break
    cx, cy = particle_centre(params)
    return -np.stack([np.asarray(cx), np.asarray(cy)], -1)
