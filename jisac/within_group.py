"""Reference-free alignment inside classes, for all classes at once (SPHIRE ``within_group_refinement``,
``isac_algorithm.md`` §7): ISAC's building block for stable class averages and for the stability test.

From a random start (each member rotated and mirrored at random about its current centre), ``maxit`` passes
alternate between averaging each class with its members' current parameters, low-passing the averages with a
cutoff rising from 0.1 to ``fh``, and aligning every member to its own class average (no ring normalisation,
coarse ``dst`` steps on passes 0, 4, 8, ... while ten or more passes remain). The last pass only averages.
Classes of any sizes go together: every member carries its class label.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jisac import align, average, filters
from jisac.transforms import Transform2D, from_centre_and_angle, particle_centre

Array = jax.Array


class WithinGroupOptions(NamedTuple):
    """SPHIRE defaults (``isac_algorithm.md`` §1): ``maxit`` 30, ``fh`` 0.45, ``ff`` 0.2, ``dst`` 90."""

    maxit: int = 30
    fh: float = 0.45
    ff: float = 0.2
    dst: float = 90.0
    max_centre: float = 8.0  # search centres are clamped to +-(cnx - ou - 2) px: 8 for ISAC's 76 px box


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


def within_group_alignment(
    images,
    labels,
    n_classes: int,
    key: Array,
    options: align.AlignOptions = align.AlignOptions(),
    wg: WithinGroupOptions = WithinGroupOptions(),
    params: Transform2D | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[Array, Transform2D]:
    """Aligns the members of every class to their class average, from a random start.

    Args:
        images: ``(n, ny, nx)`` particles.
        labels: ``(n,)`` class of each particle; ``-1`` leaves it out.
        n_classes: number of classes.
        key: PRNG key of the random start (independent keys give the independent runs of the stability test).
        options: polar search options (ring normalisation is switched off here, as in SPHIRE).
        wg: iteration schedule.
        params: current parameters (their centres are kept); ``None`` means the box centre.
        mesh: optional device mesh for the alignment passes.

    Returns:
        ``(averages, params)``: the final low-passed class averages ``(n_classes, ny, nx)`` and the members'
        parameters ``(n,)``.
    """
    n = images.shape[0]
    labels = np.asarray(labels, np.int32)
    options = options._replace(normalize_particles=False)
    coarse = options._replace(coarse_step_deg=wg.dst)
    params = random_start(key, params, n)
    for it in range(wg.maxit):
        averages = average.class_averages(images, params, labels, n_classes)
        cutoff = 0.1 + (wg.fh - 0.1) * it / max(wg.maxit - 1, 1)
        averages = filters.tanh_lowpass(averages, cutoff, wg.ff)
        if it == wg.maxit - 1:
            break
        use = coarse if (wg.dst > 0 and it % 4 == 0 and it + 1 <= wg.maxit - 10) else options
        cx, cy = particle_centre(params)
        clamp = lambda c: jnp.clip(c, -wg.max_centre, wg.max_centre)  # noqa: E731
        centred = from_centre_and_angle(clamp(cx), clamp(cy), 0.0, False)
        spectra = align.prepare_assigned_references(averages, use)
        # Particles outside every class align to class 0 and are ignored by the averages.
        found, _ = align.align_to_assigned(images, spectra, np.maximum(labels, 0), use, params=centred, mesh=mesh)
        params = found
    return averages, params
