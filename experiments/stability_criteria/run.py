"""Compare jisac's stability criteria on synthetic stacks with known views.

For each criterion (``stability=<name>``) and each SNR, ISAC runs on the same stack: noisy projections of a
phantom along ``n_views`` well-spread directions, each rotated in plane, shifted and mirrored at random (no CTF:
the working stack is made directly, as tests/test_pipeline.py does). Reported per run: the accounted fraction,
the view purity of the accounted particles (fraction of them whose view direction is within 15 degrees of
their class's view, a mirrored particle counting as its own view since ISAC aligns mirrors together; the
class's view is its most common one), the number of classes, the median pixel error and the wall time.

    python experiments/stability_criteria/run.py                 # defaults: ~10-15 min on 2 CPU cores
    python experiments/stability_criteria/run.py --n-particles 2000 --img-per-grp 100 --maxit 30 --init-iter 7 \
        --generations -1                                          # bigger: ISAC's schedule, until exhaustion

Defaults are small: 480 particles of 8 views in a 48 px box (radius 18), img_per_grp 60, maxit 10, 2 SAC rounds,
stab_ali 5, one generation (every run then has the same array shapes, so each criterion compiles once).

Writes results.json, results.md (a markdown table) and criteria.png into this folder (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

import jisac
from jisac import criteria, filters, isac, synthetic

HERE = Path(__file__).resolve().parent
PURITY_DEG = 15.0


def make_stack(n: int, n_views: int, snr: float, box: int, radius: int, seed: int):
    """``(images (n, box, box), true view (n,), view directions (n_views, 3))``; the same particles and
    transforms for every SNR (only the noise level changes)."""
    mask = filters.circular_mask(box, box, radius)
    views, directions = synthetic.known_views(n_views, box, radius, seed=seed)
    sim = synthetic.simulate(filters.normalize_in_mask(views, mask), n, jax.random.key(seed + 1), snr, max_shift=1.0)
    return np.asarray(filters.normalize_in_mask(sim.images, mask)), sim.view, np.asarray(directions)


def view_purity(classes: np.ndarray, truth: np.ndarray, directions: np.ndarray) -> float:
    """Fraction of accounted particles (class > 0) within ``PURITY_DEG`` of their class's (most common) view."""
    accounted = classes > 0
    if not accounted.any():
        return float("nan")
    good = 0
    for c in np.unique(classes[accounted]):
        views = truth[classes == c]
        main = directions[np.bincount(views).argmax()]
        cosine = np.clip(np.abs(directions[views] @ main), 0, 1)  # a view and its opposite: same class up to mirror
        good += int((np.degrees(np.arccos(cosine)) <= PURITY_DEG).sum())
    return good / int(accounted.sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--criteria", nargs="+", default=sorted(criteria.CRITERIA))
    ap.add_argument("--snrs", nargs="+", type=float, default=[0.02, 0.05, 0.1, 0.2])
    ap.add_argument("--n-particles", type=int, default=480)
    ap.add_argument("--n-views", type=int, default=8)
    ap.add_argument("--box", type=int, default=48)
    ap.add_argument("--radius", type=int, default=18)
    ap.add_argument("--img-per-grp", type=int, default=60)
    ap.add_argument("--maxit", type=int, default=10, help="within-group passes (ISAC: 30)")
    ap.add_argument("--init-iter", type=int, default=2, help="SAC rounds per generation (ISAC: 7)")
    ap.add_argument("--stab-ali", type=int, default=5)
    ap.add_argument("--generations", type=int, default=1, help="main_iter_limit (-1: until exhaustion)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("--replot", action="store_true", help="only redraw the table and plot from results.json")
    args = ap.parse_args()
    if args.replot:
        rows = json.loads((args.out / "results.json").read_text())["rows"]
        write_table(rows, args.out / "results.md")
        plot(rows, args.out / "criteria.png")
        return

    p = isac.make_params(
        img_per_grp=args.img_per_grp, minimum_grp_size=int(0.6 * args.img_per_grp), target_radius=args.radius,
        target_nx=args.box, maxit=args.maxit, init_iter=args.init_iter, stab_ali=args.stab_ali,
        main_iter_limit=args.generations,
    )
    rows = []
    for snr in args.snrs:
        images, truth, directions = make_stack(args.n_particles, args.n_views, snr, args.box, args.radius, args.seed)
        for name in args.criteria:
            criterion = criteria.make_criterion(name, p.thld_err, float(p.target_radius))
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                summary = jisac.classify(images, p, tmp, seed=args.seed, criterion=criterion)
                seconds = time.perf_counter() - t0
                classes = np.loadtxt(Path(tmp) / "particle_classes.txt")[:, 0].astype(int)
            row = {
                "criterion": name, "snr": snr, "accounted": summary["accounted_fraction"],
                "purity": view_purity(classes, truth, directions), "classes": summary["classes"],
                "median_pixel_error": summary["median_pixel_error"], "generations": len(summary["generations"]),
                "seconds": round(seconds, 1),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    (args.out / "results.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=1) + "\n")
    write_table(rows, args.out / "results.md")
    plot(rows, args.out / "criteria.png")


def write_table(rows: list[dict], path: Path) -> None:
    lines = ["| criterion | SNR | accounted | view purity | classes | median pixel error | generations | time (s) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        err = "–" if r["median_pixel_error"] is None else f"{r['median_pixel_error']:.2f}"
        purity = "–" if np.isnan(r["purity"]) else f"{r['purity']:.3f}"
        lines.append(f"| {r['criterion']} | {r['snr']:g} | {r['accounted']:.3f} | {purity} | {r['classes']} | {err} | "
                     f"{r['generations']} | {r['seconds']:.0f} |")
    path.write_text("\n".join(lines) + "\n")


def plot(rows: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 3.8))
    axes = fig.subplots(1, 3)
    for name in sorted({r["criterion"] for r in rows}):
        rs = sorted((r for r in rows if r["criterion"] == name), key=lambda r: r["snr"])
        snr = [r["snr"] for r in rs]
        acc = [r["accounted"] for r in rs]
        pur = [r["purity"] for r in rs]
        axes[0].plot(snr, acc, "o-", label=name)
        axes[1].plot(snr, pur, "o-", label=name)
        axes[2].plot(acc, pur, "o-", label=name)
        for r in rs:
            axes[2].annotate(f"{r['snr']:g}", (r["accounted"], r["purity"]), fontsize=7, xytext=(3, 3),
                             textcoords="offset points")
    snrs = sorted({r["snr"] for r in rows})
    axes[0].set(xscale="log", xlabel="SNR", ylabel="accounted fraction", ylim=(-0.02, 1.02))
    axes[1].set(xscale="log", xlabel="SNR", ylabel=f"view purity (within {PURITY_DEG:g}°)", ylim=(-0.02, 1.02))
    for ax in axes[:2]:
        ax.set_xticks(snrs, [f"{s:g}" for s in snrs])
        ax.minorticks_off()
    axes[2].set(xlabel="accounted fraction", ylabel="view purity", xlim=(-0.02, 1.02), ylim=(-0.02, 1.02),
                title="labels: SNR")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    main()
