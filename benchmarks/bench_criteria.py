"""The stability test's own cost per SAC round: ISAC2's pixel-error test against ``stability=consensus`` (and its
``per_member``).

Parameter sets of ``--classes`` classes of ``--members`` (ISAC pads classes to one shape) from ``stab_ali`` runs:
every run is the truth seen from its own frame plus 0.3 deg / 0.1 px of noise, and in a third of the classes
one run and in another third two runs are random (runs that did not converge, as at low SNR). Each criterion is
timed on the same runs: the first call (compilation included) and the best of ``--repeats`` later calls, with
how many members it keeps. Prints a table and, last, one JSON line.

    python benchmarks/bench_criteria.py                  # 64 classes of 128, 5 runs
    python benchmarks/bench_criteria.py --classes 256
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from jisac import criteria, devices
from jisac import transforms as T

devices.use_all_cpu_cores()


def runs_with_lost(n_classes: int, n_members: int, n_runs: int, seed: int = 0) -> T.Transform2D:
    """Fields ``(c, L, n)``: consistent runs, with 1 (classes ``c % 3 == 1``) or 2 (``c % 3 == 2``) runs lost."""
    rng = np.random.default_rng(seed)
    shape = (n_classes, n_members)
    truth = T.make_transform(rng.uniform(0, 360, shape), rng.uniform(-2, 2, shape), rng.uniform(-2, 2, shape),
                             rng.integers(0, 2, shape).astype(bool))
    runs = []
    for j in range(n_runs):
        g = T.make_transform(rng.uniform(0, 360), *rng.uniform(-3, 3, 2), j % 2 == 1) if j < n_runs - 1 \
            else T.identity()
        p = T.compose(truth, T.inverse(g))
        lost = (np.arange(n_classes) % 3 == 1) & (j == 0) | (np.arange(n_classes) % 3 == 2) & (j in (1, n_runs - 1))
        angle = np.where(lost[:, None], rng.uniform(0, 360, shape), np.asarray(p.angle) + rng.normal(0, 0.3, shape))
        sx = np.where(lost[:, None], rng.uniform(-3, 3, shape), np.asarray(p.shift_x) + rng.normal(0, 0.1, shape))
        sy = np.where(lost[:, None], rng.uniform(-3, 3, shape), np.asarray(p.shift_y) + rng.normal(0, 0.1, shape))
        mirror = np.where(lost[:, None], rng.integers(0, 2, shape).astype(bool), np.asarray(p.mirror))
        runs.append(T.Transform2D(*(np.asarray(a, d) for a, d in ((angle, np.float32), (sx, np.float32),
                                                                   (sy, np.float32), (mirror, bool)))))
    return jax.tree.map(lambda *a: jnp.asarray(np.stack(a, 1)), *runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--classes", type=int, default=64)
    ap.add_argument("--members", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5, help="isac.stab_ali")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    runs = runs_with_lost(args.classes, args.members, args.runs)
    member = jnp.ones((args.classes, args.members), bool)
    settings = ([("pixel_error", {})] + [("consensus", {"min_runs": k}) for k in range(args.runs - 1, 2, -1)]
                + [("consensus", {"min_runs": 3, "per_member": True})])
    rows = []
    for name, options in settings:
        crit = criteria.make_criterion(name, 0.7, 29.0, **options)
        t = time.perf_counter()
        res = jax.block_until_ready(crit.score(runs, member))
        first = time.perf_counter() - t
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            jax.block_until_ready(crit.score(runs, member))
            times.append(time.perf_counter() - t)
        stable = np.asarray(res.stable).sum(1)
        rows.append({"criterion": crit.name, "first_s": round(first, 2), "s": round(min(times), 3),
                     "stable": int(stable.sum()), "classes_over_60pct": int((stable > 0.6 * args.members).sum())})
    base = rows[0]["s"]
    print(f"{args.classes} classes of {args.members}, {args.runs} runs (a third with 1 run lost, a third with 2), "
          f"{jax.devices()[0].platform}")
    print(f"{'criterion':<38} {'first call (s)':>15} {'per round (s)':>14} {'x ISAC2':>8} {'stable':>7} "
          f"{'classes > 60 %':>15}")
    for r in rows:
        print(f"{r['criterion']:<38} {r['first_s']:>15.2f} {r['s']:>14.3f} {r['s'] / base:>8.2f} {r['stable']:>7} "
              f"{r['classes_over_60pct']:>15}")
    print(json.dumps({"classes": args.classes, "members": args.members, "runs": args.runs, "rows": rows}))


if __name__ == "__main__":
    main()
