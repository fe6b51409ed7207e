"""Per-stage profile of one ``python -m jisac`` demo run (800 particles, 96 px, 4 classes, init_iter=3).

Runs the demo in this process through ``jisac.cli.main`` with timers wrapped around the library's stages
(exclusive times: a stage's own seconds, without the stages it calls), and JAX's monitoring events for tracing,
lowering and XLA compilation (taken out of the stage they happen in). "host<->device" is the time spent in
``sharding.to_devices`` and in ``sharding.fetch`` *after* the result is ready (the wait for the computation is
counted in the stage that asked for it). "other Python" is the wall time no timer saw (the generation loop, the
outputs, the report). Prints a table, then one JSON line.

    XDG_CACHE_HOME=$(mktemp -d) python benchmarks/profile_demo.py            # cold: nothing cached
    python benchmarks/profile_demo.py --out /tmp/run --keep-cache             # reuse $XDG_CACHE_HOME
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

_FRAMES: list[list] = []  # [name, start, child seconds]
TOTALS: dict[str, float] = {}
CALLS: dict[str, int] = {}
EVENTS = {"compilations": 0, "persistent_cache_hits": 0}


def _add(name: str, seconds: float) -> None:
    TOTALS[name] = TOTALS.get(name, 0.0) + seconds


def timed(name: str, fn, label=None):
    """``fn`` with its exclusive time added to ``TOTALS[name]`` (``label(args)`` may rename it per call)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        stage = label(args, kwargs) if label else name
        CALLS[stage] = CALLS.get(stage, 0) + 1
        _FRAMES.append([stage, time.perf_counter(), 0.0])
        try:
            return fn(*args, **kwargs)
        finally:
            stage, start, child = _FRAMES.pop()
            elapsed = time.perf_counter() - start
            _add(stage, elapsed - child)
            if _FRAMES:
                _FRAMES[-1][2] += elapsed

    return wrapper


def _charge(name: str, seconds: float) -> None:
    """An event of ``seconds`` that happened inside the current frame: counted as ``name``, not as the frame."""
    _add(name, seconds)
    if _FRAMES:
        _FRAMES[-1][2] += seconds


def install() -> None:
    import jax
    from jax import monitoring

    from jisac import align, average, criteria, isac, prealign, preprocess, sharding, within_group

    def on_duration(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            EVENTS["compilations"] += 1
            _charge("XLA compilation", duration)
        elif event in ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration"):
            _charge("tracing + lowering", duration)

    def on_event(event, **kw):
        if event == "/jax/compilation_cache/cache_hits":
            EVENTS["persistent_cache_hits"] += 1

    monitoring.register_event_duration_secs_listener(on_duration)
    monitoring.register_event_listener(on_event)

    prealign.prealign = timed("pre-alignment", prealign.prealign)
    preprocess.prepare_working_stack = timed("working stack", preprocess.prepare_working_stack)
    isac.mra_step = timed("MRA step, rest (centring, filters)", isac.mra_step)
    isac.stability_round = timed("stability round, rest", isac.stability_round)
    isac.realign_round = timed("stability round, rest", isac.realign_round)
    align.alignment_scores = timed("MRA scores", align.alignment_scores)
    isac.assign_equal_size = timed("equal-size assignment", isac.assign_equal_size)

    def in_prealign(args, kwargs):
        return any(f[0] == "pre-alignment" for f in _FRAMES)

    align.align_to_assigned = timed("assigned parameters", align.align_to_assigned,
                                    lambda a, k: "pre-alignment" if in_prealign(a, k) else "assigned parameters")
    average.class_averages = timed("averages", average.class_averages,
                                   lambda a, k: "pre-alignment" if in_prealign(a, k) else "averages")

    def wg_label(args, kwargs):
        inside_mra = any(f[0].startswith("MRA step") for f in _FRAMES)
        return "within-group: common frame of averages" if inside_mra else "within-group passes (stab_ali runs)"

    within_group.within_group_alignment = timed("within-group", within_group.within_group_alignment, wg_label)
    criteria.pixel_error_stability_classes = timed("stability test", criteria.pixel_error_stability_classes)

    to_devices, fetch = sharding.to_devices, sharding.fetch

    def timed_to_devices(*args, **kwargs):
        t = time.perf_counter()
        try:
            return to_devices(*args, **kwargs)
        finally:
            _charge("host<->device copies", time.perf_counter() - t)

    def timed_fetch(x, *args, **kwargs):
        jax.block_until_ready(x)  # the wait for the computation stays in the calling stage
        t = time.perf_counter()
        try:
            return fetch(x, *args, **kwargs)
        finally:
            _charge("host<->device copies", time.perf_counter() - t)

    sharding.to_devices, sharding.fetch = timed_to_devices, timed_fetch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="run folder (default: a temporary one)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for python -m jisac")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="jisac_profile_"))
    from jisac import devices

    devices.use_all_cpu_cores()
    install()
    from jisac import cli

    sys.argv = ["jisac", f"output_dir={out}", *args.overrides]
    t0 = time.perf_counter()
    try:
        cli.main()
    except SystemExit:
        pass
    wall = time.perf_counter() - t0
    summary = json.loads((out / "summary.json").read_text())
    seen = sum(TOTALS.values())
    rows = sorted(TOTALS.items(), key=lambda kv: -kv[1]) + [("other Python (no timer)", wall - seen)]
    print(f"\njisac demo profile ({os.environ.get('XDG_CACHE_HOME', '~/.cache')}), wall {wall:.1f} s")
    print(f"| {'stage':42s} | seconds | share | calls |")
    print(f"|{'-' * 44}|---------|-------|-------|")
    for name, s in rows:
        print(f"| {name:42s} | {s:7.1f} | {100 * s / wall:4.0f}% | {CALLS.get(name, ''):>5} |")
    print(f"XLA compilations: {EVENTS['compilations']} (persistent cache hits {EVENTS['persistent_cache_hits']}); "
          f"classes {summary.get('classes')}, accounted {summary.get('accounted_fraction')}")
    print(json.dumps({"wall_s": round(wall, 2), "stages": {k: round(v, 2) for k, v in rows}, "calls": CALLS,
                      **EVENTS, "classes": summary.get("classes"),
                      "accounted_fraction": summary.get("accounted_fraction"), "seconds": summary.get("seconds")}))


if __name__ == "__main__":
    main()
