"""Full ISAC on a synthetic stack: wall time per stage, peak RSS, classes, accounted fraction.

The stack: N CTF-modulated noisy projections (128 px, 2 A/px, particle radius 50 px) of the built-in phantom along
``--views`` directions, written as a RELION STAR + MRCS in a temporary folder, then classified exactly as
``python -m jisac data.stack=... isac.radius=50 isac.ctf=true isac.img_per_grp=100`` would (default ISAC
parameters otherwise). Prints a table and, last, one JSON line.

    python benchmarks/bench_isac.py               # N = 10,000 (about 45 min on a 2-core CPU; docs/benchmarks.md)
    python benchmarks/bench_isac.py --n 1000      # a quick check
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import resource
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import starfile

from jisac import config, devices, run
from jisac.demo import demo_stack

devices.use_all_cpu_cores()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=10000)
    parser.add_argument("--views", type=int, default=0, help="distinct views (default: n / img_per_grp)")
    parser.add_argument("--img-per-grp", type=int, default=100)
    parser.add_argument("--snr", type=float, default=0.3)
    args = parser.parse_args()
    # Progress lines (stage, generation, SAC round, elapsed time) on stderr; the table and JSON go to stdout.
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("jax", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    views = args.views or max(1, args.n // args.img_per_grp)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        demo = config.DemoConfig(n_views=views, n_particles=args.n, snr=args.snr, max_shift=2.0)
        star, radius = demo_stack(demo, folder=tmp, box=128, radius=50, pixel_size=2.0)
        make_s = time.perf_counter() - t
        cfg = config.JisacConfig(
            output_dir=str(tmp / "run"),
            data=config.DataConfig(stack=str(star)),
            isac=config.IsacConfig(radius=radius, ctf=True, img_per_grp=args.img_per_grp),
        )
        t = time.perf_counter()
        summary = run.run(cfg)
        wall = time.perf_counter() - t
        particles = starfile.read(tmp / "run" / "particles.star")["particles"]
    truth = particles["jisacTrueView"].to_numpy()
    classes = particles["rlnClassNumber"].to_numpy()
    purity = [np.bincount(truth[classes == c]).max() / (classes == c).sum() for c in np.unique(classes[classes > 0])]
    seconds = summary["seconds"]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    rows = [
        ("particles", f"{args.n} x 128 px, {views} views, SNR {args.snr}, CTF"),
        ("make the stack", f"{make_s:.1f} s"),
        ("pre-alignment", f"{seconds.get('prealignment', 0):.1f} s"),
        ("working stack", f"{seconds.get('working_stack', 0):.1f} s"),
        ("ISAC generations", f"{seconds.get('isac', 0):.1f} s ({len(summary['generations'])} generations)"),
        ("total wall time", f"{wall:.1f} s"),
        ("classes", f"{summary['classes']}"),
        ("accounted", f"{100 * summary['accounted_fraction']:.1f} %"),
        ("mean class purity (true view)", f"{100 * np.mean(purity):.1f} %" if purity else "-"),
        ("peak RSS", f"{rss:.0f} MB"),
    ]
    print(f"jisac ISAC benchmark ({jax.devices()[0].platform}, {len(jax.devices())} devices, jax {jax.__version__})")
    for name, value in rows:
        print(f"  {name:<30} {value}")
    print(json.dumps({
        "n": args.n, "views": views, "img_per_grp": args.img_per_grp, "wall_s": round(wall, 1),
        "prealignment_s": seconds.get("prealignment"), "working_stack_s": seconds.get("working_stack"),
        "isac_s": seconds.get("isac"), "generations": len(summary["generations"]), "classes": summary["classes"],
        "accounted_fraction": round(summary["accounted_fraction"], 4),
        "mean_purity": round(float(np.mean(purity)), 4) if purity else None, "peak_rss_mb": round(rss, 1),
        "device": jax.devices()[0].platform,
    }))


if __name__ == "__main__":
    main()
