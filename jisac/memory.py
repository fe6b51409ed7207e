"""Execution layer: the memory report, peak and current memory after each stage of a run."""

from __future__ import annotations

import logging
import os
import resource

import jax

log = logging.getLogger("jisac")


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
