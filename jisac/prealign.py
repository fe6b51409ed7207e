"""Algorithm layer: Pre-alignment: reference-free alignment of the whole stack, kept only for centring
(``isac_algorithm.md`` §3.1, SPHIRE ``ali2d_base`` as called by ``sp_isac2.py``).

All particles are aligned to their global average over several search stages (coarse to fine translational
ranges), ``maxit`` passes each. Every pass centres the average by the members' mean displacement (SPHIRE's
``center_method = -1``), low-passes it and aligns every particle to it. Only the resulting centre is kept:
the shift that moves each particle's centre to the box centre, ``t = -particle_centre(P)`` (rotation and mirror
are discarded).

Differences from SPHIRE, on purpose: the reference's low-pass cutoff rises on a fixed schedule (0.1 -> ``fh``)
instead of a tanh fit to the even/odd FRC; the first pass starts from a random rotation and mirror per
particle (as ISAC's within-group alignment) rather than from zero.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jisac import align, average, filters
from jisac.events import Step
from jisac.polar import RingGeometry
from jisac.transforms import compose, from_centre_and_angle, make_transform, particle_centre
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
    1-2 of the second, every pass moves the same 1-2 % of particles back and forth by one grid step while the
    rest stay put to 1e-3 px, so the remaining passes only spend time. The reference's cutoff follows the full
    schedule (pass ``j`` of stage ``s`` has the cutoff of pass ``s * maxit + j``), so a stage that ends early
    does not change the next stage's cutoffs."""

    maxit: int = 14
    fh: float = 0.4
    ff: float = 0.2
    tol: float = 0.05
    unsettled: float = 0.02


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
    n, box = images.shape[0], images.shape[-1]
    stages = search_stages(box, target_radius)
    geometry = RingGeometry(1, target_radius, 1)
    labels = np.zeros(n, np.int32)
    params = random_start(key, None, n)
    total = len(stages) * options.maxit
    for stage, (rng_, step) in enumerate(stages):
        before = None
        opts = align.AlignOptions(
            geometry=geometry, grid=align.SearchGrid(rng_, rng_, step), normalize_particles=False, reference_chunk=1
        )
        for it in range(options.maxit):
            avg = average.class_averages(images, params, labels, 1, mesh=mesh)
            # centre the average: shift it by minus the members' mean displacement, and the members with it
            sx = np.asarray(params.shift_x)
            disp = np.array(
                [np.mean(np.where(np.asarray(params.mirror), -sx, sx)), np.mean(np.asarray(params.shift_y))]
            )
            avg = filters.fourier_shift(avg, -disp[0], -disp[1])
            params = compose(params, make_transform(0.0, -disp[0], -disp[1], False))
            cutoff = 0.1 + (options.fh - 0.1) * (stage * options.maxit + it + 1) / total
            avg = filters.tanh_lowpass(avg, cutoff, options.ff)
            cx, cy = particle_centre(params)
            limit = box // 2 - target_radius - 2
            centred = from_centre_and_angle(jnp.clip(cx, -limit, limit), jnp.clip(cy, -limit, limit), 0.0, False)
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
