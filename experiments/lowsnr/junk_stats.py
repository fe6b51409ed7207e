"""Can a per-image statistic tell aggregates from particles before ISAC? (the junk that ISAC lets in, docs/lowsnr.md)

Simulates the harness's stack (``run.py``'s options: 64 px at 6 A/px, radius 23 px, CTF, +-2 px shifts; junk half
empty ice, half aggregates of 2-4 overlapping particles) without running ISAC, and scores each image by the
variance of its pixels inside the particle disc (``inner``), in a ring outside it (26-31 px, ``outer``) and the sum
of the two, each over the stack's median. Prints, per SNR and statistic, the AUC of aggregates against true
particles (the chance that an aggregate scores higher), and the share of aggregates and of empty ice above the
true particles' 99th percentile (what a filter that loses 1 % of the particles would remove); then one JSON line.

    python experiments/lowsnr/junk_stats.py --snr 0.05 0.1 0.2      # ~1 min per SNR on 2 cores; skips without the map
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import MAP, MAP_APIX  # noqa: E402

from jisac import synthetic  # noqa: E402

BOX, PIXEL, RADIUS = 64, 6.0, 23.0
OUTER = (26.0, 31.0)  # px: the ring outside the particle disc (and the harness's +-2 px shifts)


def image_statistics(images: np.ndarray) -> dict[str, np.ndarray]:
    """``(n, box, box)`` images -> ``{name: (n,)}`` variance inside the disc, in the outer ring and their sum,
    each over the stack's median (1 = a typical image)."""
    y, x = np.mgrid[:BOX, :BOX] - BOX // 2
    r = np.hypot(x, y)
    img = np.asarray(images, np.float64)
    inner = img[:, r <= RADIUS].var(1)
    outer = img[:, (r > OUTER[0]) & (r <= OUTER[1])].var(1)
    inner, outer = inner / np.median(inner), outer / np.median(outer)
    return {"inner": inner, "outer": outer, "both": inner + outer}


def auc(high: np.ndarray, low: np.ndarray) -> float:
    """P(a value of ``high`` > a value of ``low``), ties counted half."""
    return float((high[:, None] > low[None, :]).mean() + 0.5 * (high[:, None] == low[None, :]).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--snr", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    ap.add_argument("--junk", type=float, default=0.1, help="junk fraction: half empty ice, half aggregates")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not MAP.exists():
        print(f"skipped: {MAP} is absent")
        return
    vol, _ = synthetic.read_map(MAP)
    mft = synthetic.fourier_volume(vol, MAP_APIX)
    rows = []
    for snr in args.snr:
        sim = synthetic.simulate_from_map(mft, args.n, jax.random.key(args.seed), snr, box=BOX, pixel_size=PIXEL,
                                          radius=RADIUS, ice_fraction=args.junk / 2, aggregate_fraction=args.junk / 2)
        kind = np.asarray(sim.junk_kind)
        for name, stat in image_statistics(np.asarray(sim.images)).items():
            particles, aggregates = stat[kind == synthetic.JUNK_NONE], stat[kind == synthetic.JUNK_AGGREGATE]
            cut = np.quantile(particles, 0.99)
            rows.append({"snr": snr, "statistic": name, "auc_aggregates": round(auc(aggregates, particles), 3),
                         "aggregates_above_p99": round(float((aggregates > cut).mean()), 3),
                         "ice_above_p99": round(float((stat[kind == synthetic.JUNK_ICE] > cut).mean()), 3)})
    print("| SNR | statistic | AUC aggregates vs particles | aggregates above particles' p99 | empty ice above it |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['snr']:g} | {r['statistic']} | {r['auc_aggregates']:.3f} | {r['aggregates_above_p99']:.2f} | "
              f"{r['ice_above_p99']:.2f} |")
    print(json.dumps({"n": args.n, "junk": args.junk, "seed": args.seed, "rows": rows}))


if __name__ == "__main__":
    main()
