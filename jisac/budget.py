"""Execution layer: memory budgets, and the chunk sizes they allow.

``Budget`` holds the per-device and per-process budgets and the preferred (fastest measured) chunk sizes; ``plan``
turns it into one generation's chunk sizes for its class count and box. Nothing here changes a result: chunking
only decides how much is computed at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import jax

from jisac.align import chunk_sizes_for_budget, size_bucket


# Preferred chunk sizes and device memory budget per backend (``align.*``, ``hardware.memory_budget_mb`` left
# null), the fastest measured with benchmarks/bench_chunks.py (docs/benchmarks.md): a CPU core wants small inner
# steps whose correlations stay in its cache (4 x 50); a GPU needs large ones to fill its multiprocessors (an
# H100 ran 3.6x faster at 128 x 200 x 8192 than at the CPU's sizes). The within-group spectrum cache
# (``within_group.WithinGroupOptions.cache_window``) saves resampling on a CPU (1.1-1.5x) but costs more than it
# saves on a GPU (0.81-0.86x on the H100, benchmarks/bench_within_group.py). On a CPU its 3x3 window (w = 1: the
# search grid itself, slid on every move) beat the 5x5 one (w = 2) by 22 % per stability round of 2,000 particles
# (same parameters): a pass reads 9 spectra per particle either way, but from 196 kB instead of 545 kB per
# particle, and the memory traffic, not the resampling, bounds a pass (docs/benchmarks.md, session 7).
BACKEND_PRESETS = {
    "cpu": {"particle_batch": 4, "reference_chunk": 50, "particle_chunk": 256, "memory_budget_mb": 1024,
            "within_group_cache_window": 1, "within_group_particle_batch": 8},
    "gpu": {"particle_batch": 128, "reference_chunk": 200, "particle_chunk": 8192, "memory_budget_mb": 4096,
            "within_group_cache_window": 0, "within_group_particle_batch": 0},
}


def backend_preset(name: str, platform: str | None = None) -> int:
    """``BACKEND_PRESETS``' ``name`` for ``platform`` (``cpu``, ``gpu``/``cuda``/``rocm``, ``tpu``; default: JAX's
    default backend); any accelerator takes the GPU's."""
    platform = platform or jax.default_backend()
    return BACKEND_PRESETS["cpu" if platform == "cpu" else "gpu"][name]


class Budget(NamedTuple):
    """Memory budgets and the preferred (fastest measured) chunk sizes they may shrink.

    Attributes:
        device_bytes: per device: bounds every jitted call's working set (MRA sub-steps and chunks, within-group
            particles per call).
        host_bytes: per process: above it the working stack stays on disk (``jisac.diskarray``), not in RAM.
        particle_batch, reference_chunk, particle_chunk: ``align.*`` preferred sizes (upper bounds);
            ``particle_chunk`` is per device.
    """

    # the CPU presets (``default_budget`` gives any backend's)
    device_bytes: int = BACKEND_PRESETS["cpu"]["memory_budget_mb"] << 20
    host_bytes: int = 8 << 30
    particle_batch: int = BACKEND_PRESETS["cpu"]["particle_batch"]
    reference_chunk: int = BACKEND_PRESETS["cpu"]["reference_chunk"]
    particle_chunk: int = BACKEND_PRESETS["cpu"]["particle_chunk"]


def default_budget(platform: str | None = None) -> Budget:
    """The ``Budget`` of a default configuration on ``platform`` (default: JAX's default backend): its preset
    device budget and chunk sizes, 8 GiB of host memory (``config.HardwareConfig().budget(config.AlignConfig())``
    without the config objects, for library calls that pass no budget)."""
    sizes = {name: backend_preset(name, platform) for name in ("particle_batch", "reference_chunk", "particle_chunk")}
    return Budget(device_bytes=backend_preset("memory_budget_mb", platform) << 20, **sizes)


class Plan(NamedTuple):
    """Chunk sizes of one generation: the MRA's inner steps and particles per call (all devices), and the most
    particles one within-group call holds (all devices)."""

    particle_batch: int
    reference_chunk: int
    particle_chunk: int
    within_group_particles: int


def plan(budget: Budget, options, n_references: int, box: int, n_devices: int) -> Plan:
    """Chunk sizes for ``n_references`` references of ``box`` px images on ``n_devices`` devices.

    Per device, half the budget goes to the alignment's inner intermediates (``align.chunk_sizes_for_budget``),
    the other half to what scales with the particles of one call: the images and, in the MRA, their row of the
    (particle, reference) table (6 values of 4 bytes per reference); a within-group call also keeps about three
    image-sized temporaries per particle (transformed image, ring samples, spectra).
    """
    half = max(budget.device_bytes // 2, 1)
    opts = options._replace(particle_batch=budget.particle_batch, reference_chunk=budget.reference_chunk)
    batch, ref_chunk = chunk_sizes_for_budget(n_references, opts, memory_budget_bytes=half)
    image = box * box * 4
    per_device = max(batch, min(budget.particle_chunk, half // (image + 24 * n_references)))
    per_device -= per_device % batch
    wg_per_device = max(128, half // (4 * image))
    return Plan(batch, ref_chunk, per_device * n_devices, wg_per_device * n_devices)


def class_bucket(k: int, reference_chunk: int) -> int:
    """Classes a generation of ``k`` classes is compiled for: ``size_bucket(k)`` up to one reference chunk, else
    whole chunks (up to 8 exactly, then ``size_bucket`` of them: the MRA's cost grows with the chunks, so no
    power-of-two rounding there). The padding references are masked (``isac``): results are those of ``k``
    classes."""
    chunk = max(int(reference_chunk), 1)
    if k <= chunk:
        return min(size_bucket(k), chunk)
    chunks = -(-k // chunk)
    return (chunks if chunks <= 8 else size_bucket(chunks)) * chunk


def working_stack_on_disk(n: int, box: int, budget: Budget, output_dir):
    """Where to keep the ``(n, box, box)`` float32 working stack on disk when it is above half the host budget or
    the run has several processes (process 0 prepares it once, every process reads its own rows of it,
    ``jisac.diskarray``): ``<output_dir>/scratch/working_stack.mrcs``; else None (kept in memory)."""
    if n * box * box * 4 <= budget.host_bytes // 2 and jax.process_count() == 1:
        return None
    return Path(output_dir) / "scratch" / "working_stack.mrcs"
