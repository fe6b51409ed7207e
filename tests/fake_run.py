"""A tiny hand-made run folder (what ``python -m jisac`` writes, at 32 px and 100 particles) for the report,
ranking and selection tests: made in milliseconds, every number known."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from jisac.io import hdf, mrc, star

N = 100
BOX = 32
INPUT_PIXEL = 2.0
WORKING_PIXEL = 2.5
# final class k (1-based) -> (members, generation, mean pixel error)
CLASSES = {1: (30, 1, 0.2), 2: (25, 2, 0.3), 3: (20, 1, 0.5), 4: (12, 2, 0.65)}
# generation -> (particles, classes); candidates per class = particles / classes
GENERATIONS = {1: (100, 3), 2: (50, 2)}
STABLE = {k: m / (GENERATIONS[g][0] / GENERATIONS[g][1]) for k, (m, g, _) in CLASSES.items()}
RESOLUTION = {1: 9.5, 2: 11.0, 3: 14.25, 4: 22.0}


def averages(k: int = 4, box: int = BOX) -> np.ndarray:
    """``k`` distinct images: a Gaussian blob and a bar at a different angle in each, float32 ``(k, box, box)``."""
    y, x = np.mgrid[:box, :box] - box / 2
    out = []
    for i in range(k):
        a = np.pi * i / k
        u = x * np.cos(a) + y * np.sin(a)
        v = -x * np.sin(a) + y * np.cos(a)
        out.append(np.exp(-(u**2 + v**2) / 40) + 0.7 * ((np.abs(v) < 2) & (np.abs(u) < 10)))
    return np.asarray(out, np.float32)


def make_run(folder: Path, *, finished: bool = True, resolution: bool = False, particles_star: bool = True,
             input_name: str = "particles_in.star") -> dict:
    """Writes a run folder; returns what it holds (``class_of`` (N,) 0 = unaccounted, ``errors``, ``avgs``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    avgs = averages()
    class_of = np.zeros(N, int)
    errors = np.full(N, -1.0)
    order = rng.permutation(N)
    start = 0
    for k, (m, _, e) in CLASSES.items():
        idx = order[start:start + m]
        class_of[idx] = k
        errors[idx] = e + np.linspace(-0.05, 0.05, m)  # mean exactly e
        start += m
    history, total = [], 0
    for g, (n, c) in GENERATIONS.items():
        accepted = [k for k, v in CLASSES.items() if v[1] == g]
        acc = sum(CLASSES[k][0] for k in accepted)
        total += acc
        history.append({"generation": g, "particles": n, "classes": c, "accepted_classes": len(accepted),
                        "accounted": acc, "accounted_total": total, "sac_rounds": 3, "seconds": 12.5 * g})
        gen = folder / "main001" / f"generation{g:03d}"
        gen.mkdir(parents=True, exist_ok=True)
        extra = averages(c + 3)[-(c - len(accepted)):] if c > len(accepted) else np.zeros((0, BOX, BOX), np.float32)
        good = avgs[[k - 1 for k in accepted]]
        mrc.write_stack(gen / "class_averages.mrcs", np.concatenate([good, extra]))
        mrc.write_stack(gen / "good_class_averages.mrcs", good)
        (gen / "finished").write_text(json.dumps(history[-1]) + "\n")
    if not finished:
        return {"class_of": class_of, "errors": errors, "avgs": avgs, "history": history}
    mrc.write_stack(folder / "class_averages.mrcs", avgs)
    members = [np.nonzero(class_of == k)[0] for k in CLASSES]
    hdf.write_class_averages(folder / "ordered_class_averages.hdf", avgs, members, WORKING_PIXEL)
    table = pd.DataFrame({
        "rlnReferenceImage": [f"{k}@class_averages.mrcs" for k in CLASSES],
        "rlnClassNumber": list(CLASSES),
        "rlnClassDistribution": [len(m) / N for m in members],
        "jisacMembers": [len(m) for m in members],
    })
    if resolution:
        table["rlnEstimatedResolution"] = [RESOLUTION[k] for k in CLASSES]
    starfile.write({"model_classes": table}, folder / "class_averages.star")
    np.savetxt(folder / "particle_classes.txt", np.stack([class_of, np.where(class_of > 0, errors, np.nan)], -1),
               fmt=["%d", "%.4f"])
    if particles_star:
        meta = pd.DataFrame({
            "rlnImageName": [f"{i + 1}@stack.mrcs" for i in range(N)],
            "rlnDefocusU": 10000.0 + 10 * np.arange(N), "rlnVoltage": 300.0, "rlnImagePixelSize": INPUT_PIXEL,
            "rlnOpticsGroup": 1 + (np.arange(N) >= 60),
        })
        new = pd.DataFrame({
            "rlnClassNumber": class_of, "rlnAnglePsi": np.where(class_of > 0, 3.6 * np.arange(N), 0.0),
            "rlnOriginXAngst": np.where(class_of > 0, 0.5 * (np.arange(N) % 7), 0.0),
            "rlnOriginYAngst": np.where(class_of > 0, -0.25 * (np.arange(N) % 5), 0.0),
            "jisacMirror": np.arange(N) % 2, "jisacPixelError": errors,
        })
        star.write_particle_star(folder / "particles.star", meta, new, box_size=BOX)
    summary = {
        "particles": N, "accounted": int((class_of > 0).sum()), "accounted_fraction": float((class_of > 0).mean()),
        "classes": len(CLASSES), "class_sizes": [CLASSES[k][0] for k in CLASSES],
        "median_pixel_error": float(np.median(errors[class_of > 0])), "generations": history,
        "seconds": {"isac": 25.0, "prealignment": 7.25, "working_stack": 1.5, "total": 36.75},
        "peak_rss_mb": 512.5,
        "parameters": {"img_per_grp": 30, "minimum_grp_size": 10, "thld_err": 0.7, "target_radius": 29,
                       "target_nx": 76, "stab_ali": 5, "init_iter": 3},
        "input": f"/data/{input_name}",
        "cache": {"status": "miss", "key": "abc123", "path": "/tmp/cache/abc123"},
        "memory": {"devices": 2, "processes": 1,
                   "stages": {"prealignment": {"peak_rss_mb": 300.25, "rss_mb": 290.0},
                              "isac": {"peak_rss_mb": 480.75, "rss_mb": 400.0},
                              "outputs": {"peak_rss_mb": 512.5, "rss_mb": 410.0}}},
    }
    (folder / "summary.json").write_text(json.dumps(summary, indent=2))
    (folder / "accounted.star").write_text("# placeholder\n")
    return {"class_of": class_of, "errors": errors, "avgs": avgs, "history": history, "summary": summary}
