"""Execution layer: how work is laid over devices and processes.

Layout (``shared/jax_notes.md`` §1): particles are split over a one-axis mesh named ``data`` (all selected
devices, of all processes), references are replicated. Every process runs the same Python control flow on the
same host values (small per-particle results are gathered to every process with ``fetch``); the big per-particle
inputs are built with ``put_rows``, which reads only the rows of this process's devices (a stack on disk or a
lazy row view is never read whole). ``over_particles`` is the one ``shard_map`` wrapper of the package and
``to_devices`` the one way a host chunk reaches the devices; ``align``, ``average`` and ``within_group`` use both.
Results do not depend on the device count: per-particle work is the same computation whatever the split, and
class sums are exact (``average`` module docstring); randomness comes from one key per run, never per device.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jisac.rows import Rows, RowRange

PARTICLES = "data"  # the mesh's one axis: particles are split along it


def data_mesh(devices=None) -> jax.sharding.Mesh:
    """A one-axis mesh named ``data`` over ``devices`` (default: every device), ordered by process then id so
    each process's devices hold one contiguous block of every sharded array."""
    devices = jax.devices() if devices is None else list(devices)
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    return jax.sharding.Mesh(np.asarray(devices, dtype=object), (PARTICLES,))


def is_main_process() -> bool:
    """Process 0 alone writes outputs and logs progress."""
    return jax.process_index() == 0


@functools.lru_cache(maxsize=64)
def over_particles(fn, mesh, in_split: tuple[bool, ...], out_split, collectives: bool = False, check_vma: bool = True,
                   **static):
    """``fn`` jitted, and with a ``mesh`` run under ``shard_map`` over its particle axis.

    Args:
        fn: a module-level function of the per-device work.
        mesh: a one-axis mesh or None (one device, plain ``jit``).
        in_split: per positional argument, True when it is split by particles, False when replicated.
        out_split: the same for the outputs: a bool (every output) or a tuple of bools (one per output).
        collectives: ``fn`` sums across devices (``psum``/``pmax`` of class sums): with a mesh it is called with
            ``axis=`` the mesh's axis name, without one with no ``axis`` (nothing to sum across).
        check_vma: ``shard_map``'s check of replication (off where a scan starts from a value that is replicated
            by construction).
        static: keyword arguments bound into ``fn`` (hashable: ``AlignOptions``, class counts, ...).

    Cached on all of its arguments, so a chunk loop compiles once per configuration.
    """
    bound = functools.partial(fn, **static)
    if mesh is None:
        return jax.jit(bound)
    axis = mesh.axis_names[0]
    split, rep = jax.sharding.PartitionSpec(axis), jax.sharding.PartitionSpec()
    spec = lambda s: split if s else rep  # noqa: E731
    out_specs = spec(out_split) if isinstance(out_split, bool) else tuple(map(spec, out_split))
    per_device = functools.partial(bound, axis=axis) if collectives else bound
    return jax.jit(jax.shard_map(per_device, mesh=mesh,
                                 in_specs=tuple(map(spec, in_split)), out_specs=out_specs, check_vma=check_vma))


def to_devices(per_particle, mesh, replicated=()):
    """One host chunk's arguments on the devices: ``per_particle`` (a tuple of row sources and arrays of equal
    length, pytrees allowed) split over ``mesh`` (each process reads only its devices' rows), ``replicated``
    (device arrays) on every device. Without a mesh: plain device arrays. Returns one tuple of both."""
    if mesh is None:
        as_array = lambda a: jnp.asarray(a[:] if isinstance(a, (RowRange, Rows)) else a)  # noqa: E731
        per = jax.tree.map(as_array, tuple(per_particle), is_leaf=lambda a: isinstance(a, (RowRange, Rows)))
        return per + tuple(replicated)
    return tuple(put_rows(tuple(per_particle), mesh)) + tuple(replicate(r, mesh) for r in replicated)


def put_rows(x, mesh: jax.sharding.Mesh):
    """A global array split along axis 0 over ``mesh`` from a host array-like (or a pytree of them); each
    process reads only the rows of its own devices (``jax.make_array_from_callback``)."""
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(mesh.axis_names[0]))

    def one(a):
        if isinstance(a, jax.Array):
            return jax.device_put(a, sharding)
        if not hasattr(a, "shape") or not hasattr(a, "__getitem__"):
            a = np.asarray(a)
        return jax.make_array_from_callback(tuple(a.shape), sharding, lambda idx: np.asarray(a[idx]))

    return jax.tree.map(one, x, is_leaf=lambda a: isinstance(a, (RowRange, Rows)))


def replicate(x, mesh: jax.sharding.Mesh):
    """``x`` (a pytree of host values, the same on every process) replicated on every device of ``mesh``."""
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    return jax.tree.map(
        lambda a: jax.make_array_from_callback(np.shape(a), sharding, lambda idx, a=np.asarray(a): a[idx]), x
    )


def fetch(a) -> np.ndarray:
    """A (possibly multi-process) array as one host NumPy array, the same on every process."""
    if not isinstance(a, jax.Array) or a.is_fully_addressable:
        return np.asarray(a)
    if a.is_fully_replicated:
        return np.asarray(a.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(a, tiled=True))


def barrier(name: str) -> None:
    """All processes wait here (no-op with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
