"""Within-group (reference-free) alignment, ISAC's inner loop: resampling every pass, the spectrum cache, and
class averages made from the cached spectra.

N noisy projections of the built-in phantom (76 px, ISAC's working box) in classes of 100, one run of the full
schedule (``maxit`` 30 passes) per setting: ``cache_window`` 0 (resample the 3x3 grid every pass, image averages),
2 with image averages (reuse each particle's ring spectra over a 5x5 window of centres; SPHIRE's averages: every
member transformed), 2 with polar averages (the averages made from the members' cached spectra), and the last
with ISAC's within-group batch on this backend (``budget.BACKEND_PRESETS``: ISAC's default settings).
Accuracy against the truth: a member is "aligned" when its found transform composed with its true move is its
class's consensus (same mirror, angle within 3 degrees, shift within 1 px). Prints a table and, last, one JSON
line.

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

from jisac import align, budget, devices, polar, sharding, synthetic, within_group
from jisac import transforms as T

devices.use_all_cpu_cores()


def stack(n: int, seed: int = 0):
    views, _ = synthetic.known_views(max(1, n // 100), 76, 25.0 / 0.85, seed=seed)
    labels = np.arange(n) * len(views) // n
    sim = synthetic.simulate(views, n, jax.random.key(seed), 0.3, max_shift=2.0, view=labels)
    return np.asarray(sim.images), labels, len(views), sim.moves


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per setting (after one warm-up)")
    parser.add_argument("--ring-lengths", default="sphire", choices=polar.RING_LENGTHS,
                        help="ring lengths (ISAC's default: sphire)")
    args = parser.parse_args()
    parts, labels, k, moves = stack(args.n)
    mesh = sharding.data_mesh()
    options = align.AlignOptions(geometry=align.RingGeometry(ring_lengths=args.ring_lengths))
    batch = budget.backend_preset("within_group_particle_batch")
    settings = {"uncached": (0, "image", 0), "cached": (2, "image", 0), "polar": (2, "polar", 0),
                "polar_batch": (2, "polar", batch)}
    runs = {name: (lambda w=w, a=a, b=b: within_group.within_group_alignment(
        parts, labels, k, jax.random.key(1), options,
        within_group.WithinGroupOptions(cache_window=w, averages=a, particle_batch=b), mesh=mesh))
        for name, (w, a, b) in settings.items()}
    for run in runs.values():
        run()  # compile
    times = {name: [] for name in runs}
    results = {}
    for _ in range(args.repeats):  # interleaved: the settings share the machine's noise
        for name, run in runs.items():
            t = time.perf_counter()
            results[name] = run()
            times[name].append(time.perf_counter() - t)
    seconds = {name: min(t) for name, t in times.items()}
    aligned = {name: aligned_share(params, moves, labels, k) for name, (_, params) in results.items()}
    p0, p2 = results["uncached"][1], results["cached"][1]
    d = np.abs(np.asarray(T.wrap_angle(np.asarray(p2.angle) - np.asarray(p0.angle))))
    max_angle = float(np.minimum(d, 360 - d).max())
    same_mirror = bool(np.array_equal(np.asarray(p0.mirror), np.asarray(p2.mirror)))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    passes = within_group.WithinGroupOptions().maxit - 1
    print(f"within-group alignment, {args.n} particles x 76 px, {k} classes, {passes} passes, rings "
          f"{args.ring_lengths} ({jax.devices()[0].platform}, {len(jax.devices())} devices, jax {jax.__version__})")
    print(f"  {'setting':<40} {'seconds':>8} {'particle-passes/s':>18} {'aligned':>8}")
    labels_of = {"uncached": "resample every pass, image averages", "cached": "spectrum cache 5x5, image averages",
                 "polar": "spectrum cache 5x5, polar averages",
                 "polar_batch": f"... and {batch} particles per step (ISAC's)"}
    for name in runs:
        print(f"  {labels_of[name]:<40} {seconds[name]:8.2f} {args.n * passes / seconds[name]:18.0f} "
              f"{aligned[name]:8.3f}")
    print(f"  cache vs uncached: {seconds['uncached'] / seconds['cached']:.2f}x, largest angle difference "
          f"{max_angle:.2e} deg, mirrors identical: {same_mirror}; polar averages vs image: "
          f"{seconds['cached'] / seconds['polar']:.2f}x; peak RSS {rss:.0f} MB")
    print(json.dumps({
        "n": args.n, "ring_lengths": args.ring_lengths, "uncached_s": round(seconds["uncached"], 2),
        "cached_s": round(seconds["cached"], 2), "polar_s": round(seconds["polar"], 2),
        "speedup": round(seconds["uncached"] / seconds["cached"], 2),
        "polar_speedup": round(seconds["cached"] / seconds["polar"], 2),
        "polar_batch_s": round(seconds["polar_batch"], 2), "within_group_particle_batch": batch,
        "aligned": {name: round(v, 4) for name, v in aligned.items()},
        "max_angle_diff_deg": max_angle, "mirrors_identical": same_mirror,
        "peak_rss_mb": round(rss, 1), "devices": len(jax.devices()), "platform": jax.devices()[0].platform,
    }))


def aligned_share(params: T.Transform2D, moves: T.Transform2D, labels: np.ndarray, k: int) -> float:
    """Share of members whose ``params`` composed with their true move (the transform from the clean view to the
    class frame) is their class's consensus: the majority mirror, the circular median angle within 3 degrees, the
    median shift within 1 px."""
    g = jax.tree.map(np.asarray, T.compose(moves, params))
    ok = np.zeros(len(labels), bool)
    for c in range(k):
        m = labels == c
        mirror = np.mean(g.mirror[m]) >= 0.5
        sel = m & (g.mirror == mirror)
        a = np.deg2rad(g.angle[sel])
        centre = np.angle(np.mean(np.exp(1j * a)))
        centre = centre + np.median(np.angle(np.exp(1j * (a - centre))))
        d = np.rad2deg(np.abs(np.angle(np.exp(1j * (a - centre)))))
        sx, sy = g.shift_x[sel], g.shift_y[sel]
        near = (d < 3.0) & (np.hypot(sx - np.median(sx), sy - np.median(sy)) < 1.0)
        ok[np.nonzero(sel)[0][near]] = True
    return float(ok.mean())


if __name__ == "__main__":
    main()
