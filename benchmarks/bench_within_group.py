"""Within-group (reference-free) alignment, ISAC's inner loop: the spectrum cache against resampling every pass.

N noisy projections of the built-in phantom (76 px, ISAC's working box) in classes of 100, one run of the full
schedule (``maxit`` 30 passes) with ``cache_window`` 0 (resample the 3x3 grid every pass) and 2 (reuse each
particle's ring spectra over a 5x5 window of centres). Prints a table and, last, one JSON line.

    python benchmarks/bench_within_group.py            # 1,000 particles
    python benchmarks/bench_within_group.py --n 4000
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import jax
import numpy as np

from jisac import align, devices, sharding, synthetic, within_group
from jisac import transforms as T

devices.use_all_cpu_cores()


def stack(n: int, seed: int = 0):
    views, _ = synthetic.known_views(max(1, n // 100), 76, 25.0 / 0.85, seed=seed)
    labels = np.arange(n) * len(views) // n
    sim = synthetic.simulate(views, n, jax.random.key(seed), 0.3, max_shift=2.0, view=labels)
    return np.asarray(sim.images), labels, len(views)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per setting (after one warm-up)")
    args = parser.parse_args()
    parts, labels, k = stack(args.n)
    mesh = sharding.data_mesh()
    options = align.AlignOptions()
    seconds, results = {}, {}
    for window in (0, 2):
        wg = within_group.WithinGroupOptions(cache_window=window)
        run = lambda: within_group.within_group_alignment(parts, labels, k, jax.random.key(1), options, wg, mesh=mesh)  # noqa: E731
        run()  # compile
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            results[window] = run()
            times.append(time.perf_counter() - t)
        seconds[window] = min(times)
    (_, p0), (_, p2) = results[0], results[2]
    d = np.abs(np.asarray(T.wrap_angle(np.asarray(p2.angle) - np.asarray(p0.angle))))
    max_angle = float(np.minimum(d, 360 - d).max())
    same_mirror = bool(np.array_equal(np.asarray(p0.mirror), np.asarray(p2.mirror)))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    passes = within_group.WithinGroupOptions().maxit - 1
    print(f"within-group alignment, {args.n} particles x 76 px, {k} classes, {passes} passes "
          f"({jax.devices()[0].platform}, {len(jax.devices())} devices, jax {jax.__version__})")
    print(f"  {'setting':<28} {'seconds':>8} {'particle-passes/s':>18}")
    for window, label in ((0, "resample every pass"), (2, "spectrum cache, window 5x5")):
        print(f"  {label:<28} {seconds[window]:8.2f} {args.n * passes / seconds[window]:18.0f}")
    print(f"  speed-up {seconds[0] / seconds[2]:.2f}x; largest angle difference {max_angle:.2e} deg; "
          f"mirrors identical: {same_mirror}; peak RSS {rss:.0f} MB")
    print(json.dumps({
        "n": args.n, "uncached_s": round(seconds[0], 2), "cached_s": round(seconds[2], 2),
        "speedup": round(seconds[0] / seconds[2], 2), "max_angle_diff_deg": max_angle, "mirrors_identical": same_mirror,
        "peak_rss_mb": round(rss, 1), "devices": len(jax.devices()), "platform": jax.devices()[0].platform,
    }))


if __name__ == "__main__":
    main()
