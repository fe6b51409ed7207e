"""Which devices the work runs on.

On a CPU, XLA runs the alignment kernel's small batched matmuls and FFTs on one core per device, so jisac makes
one CPU device per core and splits particles over them (measured 1.65x on 2 cores, docs/benchmarks.md). The
device count is fixed when the backend starts: call ``use_all_cpu_cores`` before any JAX computation.
"""

from __future__ import annotations

import os

import jax


def use_all_cpu_cores() -> None:
    """One XLA CPU device per available core (no effect on GPU backends). Call before any JAX work.

    An explicit ``JAX_NUM_CPU_DEVICES`` in the environment wins (JAX reads it at import): several sweep runs in
    parallel processes (Hydra's joblib launcher) then share the cores instead of each taking all of them."""
    if os.environ.get("JAX_NUM_CPU_DEVICES"):
        return
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    jax.config.update("jax_num_cpu_devices", max(1, cores))


def data_mesh(devices=None) -> jax.sharding.Mesh:
    """A one-axis mesh named ``data`` over ``devices`` (default: every device of the default backend)."""
    devices = jax.devices() if devices is None else list(devices)
    return jax.sharding.Mesh(devices, ("data",))
