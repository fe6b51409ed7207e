"""The demo (``python -m jisac``: 800 particles, 96 px, 4 classes, init_iter=3) timed cold and warm.

Each run is a fresh ``python -m jisac`` subprocess with a private ``XDG_CACHE_HOME`` (a temporary folder, so
nothing of an earlier run is reused): *cold* starts from an empty cache (the demo stack is made, pre-alignment
and the working stack computed, every program compiled), *warm* is a second run with the same cache (demo stack,
preprocessing cache and, when the code has it, JAX's persistent compilation cache reused). Per stage seconds come
from the run's ``summary.json``; compilations from ``jisac.devices.compilation_stats`` (printed by a wrapper at
exit; absent for code without it). ``--code DIR`` runs another checkout (e.g. the previous commit's
``git worktree``) in the same way, for old-vs-new rows of one run. Prints a table, then one JSON line.

    python benchmarks/bench_demo.py                                  # this checkout, cold + warm
    python benchmarks/bench_demo.py --code /tmp/old --code .         # old vs new
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

# Runs the CLI as ``python -m jisac`` does, then prints the compile counts (when this code counts them).
_WRAPPER = """
import atexit, json, runpy, sys
def _report():
    try:
        from jisac import devices
        stats = devices.compilation_stats()
    except (ImportError, AttributeError):
        stats = None
    print("COMPILE_STATS " + json.dumps(stats), file=sys.stderr, flush=True)
atexit.register(_report)
sys.argv = ["jisac"] + sys.argv[1:]
runpy.run_module("jisac", run_name="__main__")
"""


def _purity(run_dir: Path) -> float | None:
    """Mean share of each class's members that come from its most common true view (``jisacTrueView``)."""
    try:
        import starfile

        table = starfile.read(run_dir / "particles.star")["particles"]
    except Exception:  # noqa: BLE001 - an older run without the column
        return None
    if "jisacTrueView" not in table or "rlnClassNumber" not in table:
        return None
    shares = []
    for _, group in table[table["rlnClassNumber"] > 0].groupby("rlnClassNumber"):
        shares.append(group["jisacTrueView"].value_counts().iloc[0] / len(group))
    return float(np.mean(shares)) if shares else None


def run_once(code: Path, cache: Path, out: Path, overrides: list[str]) -> dict:
    env = {**os.environ, "XDG_CACHE_HOME": str(cache), "PYTHONPATH": str(code)}
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _WRAPPER, f"output_dir={out}", *overrides], cwd=code, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"python -m jisac failed in {code}:\n{proc.stderr[-3000:]}")
    stats = None
    for line in proc.stderr.splitlines():
        if line.startswith("COMPILE_STATS "):
            stats = json.loads(line.split(" ", 1)[1])
    summary = json.loads((out / "summary.json").read_text())
    return {
        "wall_s": round(wall, 1),
        "seconds": summary.get("seconds", {}),
        "compile": summary.get("compilation", stats),
        "classes": summary.get("classes"),
        "class_sizes": summary.get("class_sizes"),
        "accounted_fraction": summary.get("accounted_fraction"),
        "purity": _purity(out),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--code", action="append", default=None, help="checkout(s) to run (default: this one)")
    parser.add_argument("--warm-runs", type=int, default=1)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for python -m jisac")
    args = parser.parse_args()
    codes = [Path(c).resolve() for c in (args.code or [ROOT])]
    rows = []
    for code in codes:
        with tempfile.TemporaryDirectory(prefix="jisac_bench_demo_") as tmp:
            tmp = Path(tmp)
            for i in range(1 + args.warm_runs):
                kind = "cold" if i == 0 else "warm"
                res = run_once(code, tmp / "cache", tmp / f"run{i}", args.overrides)
                res.update(code=str(code), kind=kind)
                rows.append(res)
                print(f"{code} {kind}: {res['wall_s']} s", file=sys.stderr, flush=True)
    stages = ["prealignment", "working_stack", "cache_load", "isac", "total"]
    head = ["code", "run", "wall s", *stages, "compiles (cache loads, s)", "classes", "accounted", "purity"]
    print("\n| " + " | ".join(head) + " |")
    print("|" + "---|" * (len(stages) + 7))
    for r in rows:
        sec = [str(r["seconds"].get(s, "")) for s in stages]
        c = r["compile"]
        comp = f"{c['compilations']} ({c['cache_hits']}, {c['compile_seconds']})" if c else "n/a"
        purity = f"{100 * r['purity']:.1f} %" if r["purity"] is not None else "n/a"
        print(f"| {Path(r['code']).name} | {r['kind']} | {r['wall_s']} | {' | '.join(sec)} | {comp} | "
              f"{r['classes']} {r['class_sizes']} | {100 * r['accounted_fraction']:.1f} % | {purity} |")
    print(json.dumps({"runs": rows}))


if __name__ == "__main__":
    main()
