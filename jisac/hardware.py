"""Where the work runs and how much memory it may use: device selection, the one-axis ``data`` mesh, several
processes (``jax.distributed``), chunk sizes from a memory budget, and a per-stage memory report.

Layout of the work (``shared/jax_notes.md`` §1): particles are split over a one-axis mesh named ``data`` (all
selected devices, of all processes), references are replicated. Every process runs the same Python control flow
on the same host values (small per-particle results are gathered to every process with ``fetch``); the big
per-particle inputs are built with ``put_rows``, which reads only the rows of this process's devices (a stack
on disk or a lazy row view is never read whole). Results do not depend on the device count: per-particle work is the
same computation whatever the split, and class sums are exact (``average`` module docstring); randomness comes
from one key per run, never split per device.
"""

from __future__ import annotations

import logging
import os
import resource
from typing import NamedTuple

import jax
import numpy as np

log = logging.getLogger("jisac")


# ------------------------------------------------------------------------------------------ processes


def cluster_detected(environ=os.environ) -> bool:
    """A multi-task SLURM step or Open MPI job (what ``jax.distributed.initialize()`` detects by itself)."""
    for name in ("SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE"):
        try:
            if int(environ.get(name, "1")) > 1:
                return True
        except ValueError:
            pass
    return False


def _distributed_is_initialized() -> bool:
    return jax.distributed.is_initialized()


def initialize_distributed(mode="auto", coordinator_address=None, num_processes=None, process_id=None,
                           environ=os.environ) -> bool:
    """Calls ``jax.distributed.initialize`` when asked (``true``) or, with ``auto``, when a cluster launcher is
    detected or a coordinator address is given. Must run before any JAX computation. Returns whether this is a
    multi-process run."""
    mode = str(mode).strip().lower()
    if mode not in ("auto", "true", "false"):
        raise ValueError(f"hardware.distributed must be auto, true or false (got {mode!r})")
    if mode == "false":
        return False
    if mode == "auto" and coordinator_address is None and not cluster_detected(environ):
        return False
    if _distributed_is_initialized():
        return jax.process_count() > 1
    kwargs = {k: v for k, v in dict(coordinator_address=coordinator_address, num_processes=num_processes,
                                    process_id=process_id).items() if v is not None}
    try:
        jax.distributed.initialize(**kwargs)
    except (ValueError, RuntimeError) as err:
        raise ValueError(f"hardware.distributed: jax.distributed.initialize failed: {err}") from None
    return jax.process_count() > 1


def is_main_process() -> bool:
    """Process 0 alone writes outputs and logs progress."""
    return jax.process_index() == 0


def quiet_other_processes() -> None:
    """Only process 0 logs below WARNING."""
    if not is_main_process():
        logging.getLogger("jisac").setLevel(logging.WARNING)


def setup(hw) -> None:
    """Applies a ``config.HardwareConfig`` first thing in a run: one CPU device per core, ``jax.distributed`` if
    asked, quiet non-zero processes, and a check of ``hardware.devices``."""
    from jisac import devices

    devices.use_all_cpu_cores()
    initialize_distributed(hw.distributed, hw.coordinator_address, hw.num_processes, hw.process_id)
    quiet_other_processes()
    select_devices(hw.devices)


# ------------------------------------------------------------------------------------------ devices and mesh


def parse_device_ids(spec) -> list[int] | None:
    """``all`` -> None; ``[0, 1]``, ``(0, 1)``, ``"0,1"`` or ``3`` -> a list of ints (GPU ISAC's ``--gpu_devices``)."""
    if spec is None:
        return None
    if isinstance(spec, str):
        text = spec.strip().strip("[]()").strip()
        if text.lower() in ("all", ""):
            return None
        parts = [s.strip() for s in text.split(",") if s.strip()]
    elif isinstance(spec, (int, np.integer)):
        parts = [spec]
    else:
        parts = list(spec)
    try:
        ids = [int(p) for p in parts]
    except (TypeError, ValueError):
        raise ValueError(
            f"hardware.devices must be 'all' or a list of device ids such as [0,1] (got {spec!r})"
        ) from None
    if len(set(ids)) != len(ids):
        raise ValueError(f"hardware.devices lists a device twice: {ids}")
    return ids


def select_devices(spec="all") -> list:
    """The devices named by ``hardware.devices`` (ids as in ``jax.devices()``, of every process)."""
    available = jax.devices()
    ids = parse_device_ids(spec)
    if ids is None:
        return list(available)
    by_id = {d.id: d for d in available}
    unknown = [i for i in ids if i not in by_id]
    if unknown:
        raise ValueError(
            f"hardware.devices: no device with id {', '.join(map(str, unknown))} "
            f"(available: {', '.join(str(d.id) for d in available)}, {available[0].platform})"
        )
    chosen = [by_id[i] for i in ids]
    if jax.process_count() > 1 and not any(d.process_index == jax.process_index() for d in chosen):
        raise ValueError(f"hardware.devices: process {jax.process_index()} has none of the devices {ids}")
    return chosen


def data_mesh(devices=None) -> jax.sharding.Mesh:
    """A one-axis mesh named ``data`` over ``devices`` (default: every device), ordered by process then id so
    each process's devices hold one contiguous block of every sharded array."""
    devices = jax.devices() if devices is None else list(devices)
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    return jax.sharding.Mesh(np.asarray(devices, dtype=object), ("data",))


def mesh_from_config(hw) -> jax.sharding.Mesh:
    return data_mesh(select_devices(hw.devices))


# ------------------------------------------------------------------------------------------ rows in, results out


class RowRange:
    """Rows ``[start, stop)`` of ``images`` (any array-like: NumPy, ``DiskArray``, memory map, ``Rows``), zero-padded to
    ``size`` rows, read lazily: indexing reads only the rows asked for (as float32)."""

    def __init__(self, images, start: int, stop: int, size: int | None = None):
        self.images, self.start, self.stop = images, start, stop
        self.size = stop - start if size is None else size
        self.shape = (self.size,) + tuple(images.shape[1:])
        self.dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        lo, hi, step = key[0].indices(self.size) if isinstance(key[0], slice) else (key[0], key[0] + 1, 1)
        assert step == 1, "RowRange reads contiguous rows"
        real = min(hi, self.stop - self.start)
        data = np.asarray(self.images[self.start + lo : self.start + max(real, lo)], np.float32)
        if hi - lo > data.shape[0]:
            data = np.concatenate([data, np.zeros((hi - lo - data.shape[0],) + data.shape[1:], np.float32)])
        out = data[(slice(None),) + key[1:]]
        return out if isinstance(key[0], slice) else out[0]

    def __array__(self, dtype=None, copy=None):
        return self[:].astype(dtype or np.float32)


def _in_memory(a) -> bool:
    """A NumPy array held in RAM (not a memory map or a file): fancy indexing it is cheap and copies only those
    rows."""
    return isinstance(a, np.ndarray) and not isinstance(a, np.memmap)


def take_rows(images, index):
    """The rows ``index`` of ``images``: a copy of them for an in-memory array, else a lazy ``Rows`` view (a
    stack on disk is never read whole)."""
    return images[np.asarray(index)] if _in_memory(images) else Rows(images, index)


class Rows:
    """A lazy view of the rows ``index`` of ``images`` (e.g. a generation's working set of a working stack
    on disk): slicing it reads only the rows asked for."""

    def __init__(self, images, index):
        self.images, self.index = images, np.asarray(index, np.int64)
        self.shape = (len(self.index),) + tuple(images.shape[1:])
        self.dtype = getattr(images, "dtype", np.dtype(np.float32))

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        rows = self.index[key[0]]
        if np.ndim(rows) == 0:
            return np.asarray(self.images[int(rows)])[key[1:]]
        if _in_memory(self.images):
            return self.images[rows][(slice(None),) + key[1:]]
        # a stack on disk or another lazy view: read in increasing order
        order = np.argsort(rows, kind="stable")
        out = np.empty((len(rows),) + tuple(self.shape[1:]), self.dtype)
        out[order] = np.asarray(self.images[rows[order]])
        return out[(slice(None),) + key[1:]]

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out if dtype is None else out.astype(dtype)


def pad_rows(a, size: int, value=0):
    """``a`` padded along axis 0 to ``size`` rows with ``value``."""
    a = np.asarray(a)
    if a.shape[0] == size:
        return a
    return np.concatenate([a, np.full((size - a.shape[0],) + a.shape[1:], value, a.dtype)])


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
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(a, tiled=True))


def barrier(name: str) -> None:
    """All processes wait here (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# ------------------------------------------------------------------------------------------ memory budget


# Preferred chunk sizes and device memory budget per backend (``align.*``, ``hardware.memory_budget_mb`` left
# null), the fastest measured with benchmarks/bench_chunks.py (docs/benchmarks.md): a CPU core wants small inner
# steps whose correlations stay in its cache (4 x 50); a GPU needs large ones to fill its multiprocessors (an
# H100 ran 3.6x faster at 128 x 200 x 8192 than at the CPU's sizes). The within-group spectrum cache
# (``within_group.WithinGroupOptions.cache_window``) saves resampling on a CPU (1.1-1.5x) but costs more than it
# saves on a GPU (0.81-0.86x on the H100, benchmarks/bench_within_group.py).
BACKEND_PRESETS = {
    "cpu": {"particle_batch": 4, "reference_chunk": 50, "particle_chunk": 256, "memory_budget_mb": 1024,
            "within_group_cache_window": 2},
    "gpu": {"particle_batch": 128, "reference_chunk": 200, "particle_chunk": 8192, "memory_budget_mb": 4096,
            "within_group_cache_window": 0},
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
    from jisac.align import chunk_sizes_for_budget

    half = max(budget.device_bytes // 2, 1)
    opts = options._replace(particle_batch=budget.particle_batch, reference_chunk=budget.reference_chunk)
    batch, ref_chunk = chunk_sizes_for_budget(n_references, opts, memory_budget_bytes=half)
    image = box * box * 4
    per_device = max(batch, min(budget.particle_chunk, half // (image + 24 * n_references)))
    per_device -= per_device % batch
    wg_per_device = max(128, half // (4 * image))
    return Plan(batch, ref_chunk, per_device * n_devices, wg_per_device * n_devices)


def working_stack_on_disk(n: int, box: int, budget: Budget, output_dir):
    """Where to keep the ``(n, box, box)`` float32 working stack on disk when it is above half the host budget or
    the run has several processes (process 0 prepares it once, every process reads its own rows of it,
    ``jisac.diskarray``): ``<output_dir>/scratch/working_stack.mrcs``; else None (kept in memory)."""
    from pathlib import Path

    if n * box * box * 4 <= budget.host_bytes // 2 and jax.process_count() == 1:
        return None
    return Path(output_dir) / "scratch" / "working_stack.mrcs"


# ------------------------------------------------------------------------------------------ memory report


def _current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return float("nan")


def memory_snapshot() -> dict:
    """Peak and current resident memory of this process (MB) and, where the backend reports them, device memory
    in use and its peak (MB, summed over this process's devices; CPU devices report none)."""
    out = {
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
        "rss_mb": round(_current_rss_mb(), 1),
    }
    in_use = peak = 0
    seen = False
    for d in jax.local_devices():
        try:
            stats = d.memory_stats()
        except Exception:  # noqa: BLE001  (backends without statistics raise or return None)
            stats = None
        if stats:
            seen = True
            in_use += stats.get("bytes_in_use", 0)
            peak += stats.get("peak_bytes_in_use", 0)
    if seen:
        out["device_mb"] = round(in_use / 2**20, 1)
        out["device_peak_mb"] = round(peak / 2**20, 1)
    return out


class MemoryReport:
    """Memory after each stage: logged, and kept for ``summary.json`` (``stages``)."""

    def __init__(self):
        self.stages: dict[str, dict] = {}

    def record(self, stage: str) -> dict:
        snap = memory_snapshot()
        self.stages[stage] = snap
        extra = (
            f", device {snap['device_mb']:.0f} MB (peak {snap['device_peak_mb']:.0f} MB)" if "device_mb" in snap else ""
        )
        log.info("memory after %s: peak RSS %.0f MB, RSS %.0f MB%s", stage, snap["peak_rss_mb"], snap["rss_mb"], extra)
        return snap
