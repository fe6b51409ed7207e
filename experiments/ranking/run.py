"""Does the class score (``jisac.ranking``, ``jisacScore``) put junk-rich and mixed-view classes at the bottom?

A synthetic stack with known views and known junk: ``--n`` particles, ``--junk`` of them junk (half pure noise
like empty ice, half "aggregates": two projections of different views overlapped), the rest projections of
``--views`` well-spread views with random in-plane rotations, shifts and mirrors, white noise at ``--snr``. ISAC runs
with a lenient stability threshold (``--thld-err``, px) so that some bad classes get accepted, then every accepted
class is labelled *good* (≥ 90 % of its members from one view, < 10 % junk) or *bad*, and the score's separation is
measured: the AUC (the chance that a random good class scores above a random bad one) and the share of bad classes
among the bottom quarter of the ranking.

    python experiments/ranking/run.py            # ~5 minutes on 2 CPU cores

Prints a table of classes, then one JSON line of key figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import jisac  # noqa: E402
from jisac import filters, isac, ranking, synthetic  # noqa: E402


def make_stack(n: int, n_views: int, junk: float, snr: float, box: int, radius: int, seed: int):
    """``(images (n, box, box), view (n,): -1 for junk)``, normalised inside the particle radius."""
    mask = filters.circular_mask(box, box, radius)
    views, _ = synthetic.known_views(n_views, box, radius, seed=seed)
    views = np.asarray(filters.normalize_in_mask(views, mask))
    rng = np.random.default_rng(seed)
    n_junk = int(round(junk * n))
    kind = np.zeros(n, int)  # 0 particle, 1 empty ice, 2 aggregate
    kind[rng.choice(n, n_junk, replace=False)] = rng.integers(1, 3, n_junk)
    clean = views[rng.integers(0, n_views, n)]
    other = views[rng.integers(0, n_views, n)]
    shift = np.roll(other, (radius // 2, radius // 3), axis=(1, 2))
    clean = np.where((kind == 2)[:, None, None], 0.7 * clean + 0.7 * shift, clean)
    clean = np.where((kind == 1)[:, None, None], 0.0, clean)
    sim = synthetic.simulate(clean, n, jax.random.key(seed), snr, max_shift=1.0, view=np.arange(n))
    images = np.array(sim.images)  # writable
    # empty ice: noise of the same power as the particles' noise (add_noise scales to the signal, which is 0)
    noise_sd = np.sqrt(np.var(views[:, mask], axis=1).mean() / snr)
    images[kind == 1] = rng.normal(0.0, noise_sd, (int((kind == 1).sum()), box, box))
    truth = np.where(kind == 0, _view_of(clean, views), -1)
    return np.asarray(filters.normalize_in_mask(images, mask)), truth


def _view_of(clean: np.ndarray, views: np.ndarray) -> np.ndarray:
    flat = clean.reshape(len(clean), -1)
    ref = views.reshape(len(views), -1)
    return np.argmin(((flat[:, None, :] - ref[None]) ** 2).sum(-1), 1)


def auc(good_scores: np.ndarray, bad_scores: np.ndarray) -> float:
    """P(a random good class scores above a random bad one); ties count half."""
    if not len(good_scores) or not len(bad_scores):
        return float("nan")
    diff = good_scores[:, None] - bad_scores[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=800)
    ap.add_argument("--views", type=int, default=6)
    ap.add_argument("--junk", type=float, default=0.25)
    ap.add_argument("--snr", type=float, default=0.1)
    ap.add_argument("--box", type=int, default=48)
    ap.add_argument("--radius", type=int, default=18)
    ap.add_argument("--img-per-grp", type=int, default=40)
    ap.add_argument("--thld-err", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    images, truth = make_stack(args.n, args.views, args.junk, args.snr, args.box, args.radius, args.seed)
    p = isac.make_params(img_per_grp=args.img_per_grp, minimum_grp_size=int(0.5 * args.img_per_grp),
                         target_radius=args.radius, target_nx=args.box, maxit=8, init_iter=2, stab_ali=3,
                         thld_err=args.thld_err, main_iter_limit=2)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        summary = jisac.classify(images, p, tmp, seed=args.seed)
        table = ranking.class_table(tmp)
        classes = np.loadtxt(Path(tmp) / "particle_classes.txt")[:, 0].astype(int)
    seconds = time.perf_counter() - t0
    rows = []
    for c, score in zip(table["class"], table["score"]):
        t = truth[classes == c]
        junk_share = float((t < 0).mean())
        purity = float(np.bincount(t[t >= 0]).max() / len(t)) if (t >= 0).any() else 0.0
        rows.append({"class": int(c), "members": len(t), "score": float(score), "junk": junk_share,
                     "purity": purity, "good": purity >= 0.9 and junk_share < 0.1})
    df = pd.DataFrame(rows).sort_values("score", ascending=False)
    print(df.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    good, bad = df[df["good"]]["score"].to_numpy(), df[~df["good"]]["score"].to_numpy()
    bottom = df.tail(max(1, len(df) // 4))
    junk_accounted = float(((truth < 0) & (classes > 0)).sum() / max((truth < 0).sum(), 1))
    print(json.dumps({
        "classes": len(df), "good": int(len(good)), "bad": int(len(bad)), "auc": auc(good, bad),
        "bad_share_in_bottom_quarter": float((~bottom["good"]).mean()) if len(df) else None,
        "bad_share_overall": float((~df["good"]).mean()) if len(df) else None,
        "accounted_fraction": summary["accounted_fraction"], "junk_accounted": junk_accounted,
        "seconds": round(seconds, 1), "n": args.n, "junk": args.junk, "snr": args.snr, "thld_err": args.thld_err,
    }))


if __name__ == "__main__":
    main()
