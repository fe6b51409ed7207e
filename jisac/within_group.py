"""Reference-free alignment inside classes, for all classes at once (SPHIRE ``within_group_refinement``,
``isac_algorithm.md`` §7): ISAC's building block for stable class averages and for the stability test.

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

from jisac import align, filters
from jisac.transforms import Transform2D, apply_transform, from_centre_and_angle, particle_centre

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


_SUM_CHUNK = 128  # particles per step of the in-jit class sums (bounds the transformed-image temporaries)


def _class_sums(images, params, seg, n_classes):
    """Sums of transformed images per class inside jit, in chunks: ``(n_classes, ny, nx)``."""
    n = images.shape[0]
    chunks = n // _SUM_CHUNK

    def add(total, xs):
        imgs, p, s = xs
        return total + jax.ops.segment_sum(apply_transform(imgs, p), s, num_segments=n_classes + 1)[:n_classes], None

    reshape = lambda a: a.reshape(chunks, _SUM_CHUNK, *a.shape[1:])  # noqa: E731
    zero = jnp.zeros((n_classes,) + images.shape[1:], jnp.float32)
    total, _ = jax.lax.scan(add, zero, (reshape(images), jax.tree.map(reshape, params), reshape(seg)))
    return total


def _within_group_local(images, labels, valid, params, n_classes, options, wg, axis=None):
    """The whole schedule on this device's particles; with ``axis`` (inside ``shard_map``) class sums and
    counts are summed over the devices, so every device sees the same averages."""
    reduce = (lambda x: x) if axis is None else (lambda x: jax.lax.psum(x, axis))  # noqa: E731
    seg = jnp.where(valid & (labels >= 0), labels, n_classes)
    counts = reduce(jnp.bincount(seg, length=n_classes + 1)[:n_classes])
    counts = jnp.maximum(counts, 1).astype(jnp.float32)
    safe_labels = jnp.clip(labels, 0, n_classes - 1)
    coarse = options._replace(coarse_step_deg=wg.dst)

    def averages(params, it):
        avg = reduce(_class_sums(images, params, seg, n_classes)) / counts[:, None, None]
        cutoff = 0.1 + (wg.fh - 0.1) * it / max(wg.maxit - 1, 1)
        return filters.tanh_lowpass(avg, cutoff, wg.ff)

    def one_pass(it, params):
        avg = averages(params, it)
        cx, cy = particle_centre(params)
        clamp = lambda c: jnp.clip(c, -wg.max_centre, wg.max_centre)  # noqa: E731
        centres = jnp.stack([clamp(cx), clamp(cy)], -1)
        spectra = align._reference_spectra(avg, options)
        use_coarse = (wg.dst > 0) & (it % 4 == 0) & (it + 1 <= wg.maxit - 10)
        found, _ = jax.lax.cond(
            use_coarse,
            lambda: align._paired_chunk(images, centres, safe_labels, spectra, coarse),
            lambda: align._paired_chunk(images, centres, safe_labels, spectra, options),
        )
        return found

    params = jax.lax.fori_loop(0, wg.maxit - 1, one_pass, params)
    return averages(params, wg.maxit - 1), params


@functools.lru_cache(maxsize=16)
def _within_group_fn(n_classes, options, wg, mesh):
    """The jitted schedule, on one device or split over the particles of a one-axis mesh."""
    fn = functools.partial(_within_group_local, n_classes=n_classes, options=options, wg=wg)
    if mesh is None:
        return jax.jit(fn)
    axis = mesh.axis_names[0]
    split, rep = jax.sharding.PartitionSpec(axis), jax.sharding.PartitionSpec()
    return jax.jit(
        jax.shard_map(
            functools.partial(fn, axis=axis), mesh=mesh, in_specs=(split, split, split, split), out_specs=(rep, split),
            check_vma=False,  # the class-sum scan starts from a zero that is the same on every device
        )
    )


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

    The whole schedule is one jitted loop over the stack held on the device (ISAC's working set: 23 kB per
    76 px particle), padded to a multiple of 128 particles so that few shapes are compiled.

    Args:
        images: ``(n, ny, nx)`` particles.
        labels: ``(n,)`` class of each particle; ``-1`` leaves it out.
        n_classes: number of classes.
        key: PRNG key of the random start (independent keys give the independent runs of the stability test).
        options: polar search options (ring normalisation is switched off here, as in SPHIRE).
        wg: iteration schedule.
        params: current parameters (their centres are kept); ``None`` means the box centre.
        mesh: optional one-axis device mesh: particles are split over its devices, class sums added across them
            (same result as one device up to float summation order).

    Returns:
        ``(averages, params)``: the final low-passed class averages ``(n_classes, ny, nx)`` and the members'
        parameters ``(n,)``.
    """
    n = images.shape[0]
    options = options._replace(normalize_particles=False)
    n_dev = 1 if mesh is None else mesh.size
    step = int(np.lcm(_SUM_CHUNK, options.particle_batch)) * n_dev
    padded = -(-n // step) * step
    pad = padded - n
    imgs = jnp.asarray(np.asarray(images, np.float32))
    lab = jnp.asarray(np.asarray(labels, np.int32))
    # The random start is drawn for the unpadded stack so results do not depend on the padding.
    start = random_start(key, params, n)
    if pad:
        imgs = jnp.concatenate([imgs, jnp.zeros((pad,) + imgs.shape[1:], imgs.dtype)])
        lab = jnp.concatenate([lab, jnp.full((pad,), -1, jnp.int32)])
        start = Transform2D(*(jnp.concatenate([f, jnp.zeros((pad,), f.dtype)]) for f in start))
    valid = jnp.arange(padded) < n
    fn = _within_group_fn(n_classes, options, wg, mesh)
    if mesh is not None:
        split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(mesh.axis_names[0]))
        imgs, lab, valid, start = jax.device_put((imgs, lab, valid, start), split)
    averages, out = fn(imgs, lab, valid, start)
    averages = np.asarray(averages)
    return averages, Transform2D(*(jnp.asarray(np.asarray(f)[:n]) for f in out))
