"""Execution layer: which devices and processes the work runs on.

On a CPU, XLA runs the alignment kernel's small batched matmuls and FFTs on one core per device, so jisac makes
one CPU device per core and splits particles over them (measured 1.65x on 2 cores, docs/benchmarks.md). The
device count is fixed when the backend starts: ``setup`` (``use_all_cpu_cores``, ``jax.distributed``) runs before
any JAX computation. ``hardware.devices`` picks devices by id (GPU ISAC's ``--gpu_devices``).

Compiled programs are kept in JAX's persistent compilation cache (``enable_compilation_cache``, on by default
under ``jisac.cache.user_cache_root() / "xla"``), so that a second run on the same shapes compiles nothing;
``compilation_stats`` counts the XLA compilations of this process (for ``summary.json``).
"""

from __future__ import annotations

import collections
import importlib.util
import logging
import os
import threading
from pathlib import Path

import jax
import numpy as np
from jax import monitoring

from jisac.sharding import data_mesh, is_main_process

log = logging.getLogger("jisac")


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


# ------------------------------------------------------------------------------------------ compilation

COMPILATION_CACHE_MAX_BYTES = 2 << 30  # least recently used programs are dropped above this (the demo: ~60 MB)


def default_compilation_cache() -> Path:
    """``$XDG_CACHE_HOME/jisac/xla`` (``~/.cache/jisac/xla``): ``jisac.cache.user_cache_root() / "xla"``, beside
    the demo stacks and the preprocessing cache (spelled out here because ``cache`` is a layer above; a test
    keeps the two equal)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "jisac" / "xla"


def enable_compilation_cache(folder: Path | None) -> None:
    """Keeps every compiled XLA program in ``folder`` (JAX's persistent compilation cache) so that a later run
    with the same shapes loads it instead of compiling; ``None`` turns the cache off. Call before any JAX
    computation (JAX decides once per process, at its first compilation, whether the cache is used).

    Every program is cached, however quick its compilation (JAX's default keeps only those above 1 s; jisac's
    many programs of 0.05-2 s each add up to most of a run's compile time). With the ``filelock`` package
    installed the folder is bounded to ``COMPILATION_CACHE_MAX_BYTES`` (least recently used entries go first);
    without it JAX cannot trim it, and it grows by the programs of each new shape (a few MB per run setting)."""
    if folder is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a read-only home must not stop a run: it only compiles every time
        log.warning("compilation cache off: cannot create %s (%s)", folder, err)
        jax.config.update("jax_enable_compilation_cache", False)
        return
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    if importlib.util.find_spec("filelock") is not None:  # JAX needs it to trim the folder (else: no bound)
        jax.config.update("jax_compilation_cache_max_size", COMPILATION_CACHE_MAX_BYTES)


_STATS = {"compilations": 0, "compile_seconds": 0.0, "cache_hits": 0}
_PROGRAMS: collections.Counter = collections.Counter()
_LOCK = threading.Lock()
_COUNTING = []


def _on_duration(event: str, duration: float, fun_name: str = "?", **kwargs) -> None:
    if event == "/jax/core/compile/backend_compile_duration":  # a compilation, or a load from the cache
        with _LOCK:
            _STATS["compilations"] += 1
            _STATS["compile_seconds"] += duration
            _PROGRAMS[fun_name] += 1


def _on_event(event: str, **kwargs) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        with _LOCK:
            _STATS["cache_hits"] += 1


def count_compilations() -> None:
    """Starts counting this process's XLA compilations (idempotent); read them with ``compilation_stats``."""
    if not _COUNTING:
        monitoring.register_event_duration_secs_listener(_on_duration)
        monitoring.register_event_listener(_on_event)
        _COUNTING.append(True)


def compilation_stats(since: dict | None = None) -> dict:
    """Since ``count_compilations`` (or, with ``since``, since that earlier result of this function):
    ``compilations`` (XLA programs compiled, persistent-cache loads excluded), ``cache_hits`` (programs loaded from
    the persistent cache) and ``compile_seconds`` (both, wall time)."""
    with _LOCK:
        hits = _STATS["cache_hits"]
        now = {"compilations": _STATS["compilations"] - hits, "cache_hits": hits,
               "compile_seconds": _STATS["compile_seconds"]}
    if since is not None:
        now = {key: value - since[key] for key, value in now.items()}
    return {**now, "compile_seconds": round(now["compile_seconds"], 2)}


def compiled_programs() -> dict[str, int]:
    """How many times each program (by function name, e.g. ``_scores_chunk``) was compiled or loaded from the
    persistent cache since ``count_compilations``."""
    with _LOCK:
        return dict(_PROGRAMS)


def compilation_count() -> int:
    """XLA programs compiled in this process since ``count_compilations`` (cache loads excluded)."""
    return compilation_stats()["compilations"]


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


def quiet_other_processes() -> None:
    """Only process 0 logs below WARNING."""
    if not is_main_process():
        logging.getLogger("jisac").setLevel(logging.WARNING)


def setup(hw) -> None:
    """Applies a ``config.HardwareConfig`` first thing in a run: one CPU device per core, the persistent
    compilation cache (``hardware.compilation_cache``, default on), ``jax.distributed`` if asked, quiet non-zero
    processes, and a check of ``hardware.devices``."""
    use_all_cpu_cores()
    count_compilations()
    enable_compilation_cache(default_compilation_cache() if getattr(hw, "compilation_cache", True) else None)
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


def mesh_from_config(hw) -> jax.sharding.Mesh:
    return data_mesh(select_devices(hw.devices))
