"""Pre-alignment of the demo stack (800 particles, 96 px shrunk to 77 px, radius 29, 4 views): the two search
methods (``PrealignOptions.method``) in one process, interleaved.

The input is what ``python -m jisac`` pre-aligns: the demo stack (made once in the user's cache, or in
``XDG_CACHE_HOME``), phase-flipped and shrunk without cropping (``run._working_stack``). Each run is one
``prealign.prealign`` call with the run's seed; its per-pass times come from the progress callback. The first run
of each method includes its compilations (a fresh process, as a clean-clone demo run); the order alternates
between repeats so drift of a shared machine's load hits both. Centring error (``centring_error``): the spread
of the found centres in each particle's clean view (the demo's truth, re-made from its recipe), shrunk px.
Prints a table, then one JSON line.

    python benchmarks/bench_prealign.py [--repeats 2] [--maxit 14]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import numpy as np

from jisac import config, ctf, io, prealign, synthetic
from jisac import transforms as T
from jisac.demo import DEMO_PIXEL, DEMO_RADIUS, demo_stack
from jisac.run import _ctf_params, _working_stack


def demo_input(seed: int = 0):
    """``(images (n, nx', nx') float32, radius, shrink ratio, the demo's synthetic.Simulated truth, key)`` of the
    demo's pre-alignment."""
    cfg = config.JisacConfig()
    path, radius = demo_stack(cfg.demo)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, stack=str(path)),
                              isac=dataclasses.replace(cfg.isac, radius=radius, ctf=True))
    stack = io.open_stack(str(path))
    rp = config.run_params(cfg, len(stack), stack.box_size)
    prep = rp.preprocess
    copies = _working_stack(stack, prep._replace(target_nx=prep.shrunk_size(stack.box_size)),
                            _ctf_params(stack, True), None, DEMO_PIXEL)
    # the demo's truth, re-made from its recipe (demo.demo_stack): the same key gives the same moves
    n = cfg.demo.n_particles
    phantom = synthetic.make_phantom(radius=0.9 * DEMO_RADIUS, seed=seed)
    rot, tilt = synthetic.hemisphere_directions(cfg.demo.n_views)
    views = synthetic.project(phantom, synthetic.euler_to_matrix(rot, tilt, 0.0), stack.box_size)
    rng = np.random.default_rng(seed)
    defocus, astig = rng.uniform(10000.0, 25000.0, n), rng.uniform(0.0, 1000.0, n)
    params = ctf.make_ctf_params(defocus + astig / 2, defocus - astig / 2, rng.uniform(0, 180, n),
                                 pixel_size_angst=DEMO_PIXEL)
    sim = synthetic.simulate(views, n, jax.random.key(seed), cfg.demo.snr, cfg.demo.max_shift, ctf_params=params)
    key = jax.random.fold_in(jax.random.key(rp.seed), 0)  # as run._preprocess
    return np.asarray(copies), rp.isac.target_radius, prep.shrink_ratio, sim, key


def centring_error(shifts: np.ndarray, sim, ratio: float) -> dict:
    """Spread of the found centres, in shrunk px, measured in each particle's clean view.

    The found centre ``-shifts`` (shrunk px) is taken back to the clean view's frame (input px, ``inverse`` of
    the move that made the particle) and scaled to shrunk px. Pre-alignment centres the particles of one view on
    one point of that view, not necessarily its true centre (every view meets the same global average): so each
    view's median point is removed before the distances are taken.
    """
    view = np.asarray(sim.view)
    found = -shifts / ratio  # input px, particle frame
    mat = np.asarray(T.to_matrix(T.inverse(sim.moves)), np.float64)  # particle -> clean view
    in_view = (np.einsum("nij,nj->ni", mat[:, :2, :2], found) + mat[:, :2, 2]) * ratio
    err = np.empty(len(view))
    for g in np.unique(view):
        sel = view == g
        err[sel] = np.hypot(*(in_view[sel] - np.median(in_view[sel], 0)).T)
    return {"median_px": round(float(np.median(err)), 3), "p90_px": round(float(np.percentile(err, 90)), 3),
            "within_1px": round(float(np.mean(err <= 1.0)), 4)}


def run_once(images, radius, key, method: str, maxit: int, verbose: bool = False) -> dict:
    stamps = [time.perf_counter()]
    log = []

    def progress(line):
        stamps.append(time.perf_counter())
        log.append(line)

    options = prealign.PrealignOptions(maxit=maxit, method=method)
    shifts = prealign.prealign(images, radius, key, options, progress=progress)
    if verbose:
        print("\n".join(f"    {line}" for line in log))
    total = time.perf_counter() - stamps[0]
    passes = np.diff(stamps)
    return {"method": method, "total_s": round(total, 2), "passes": len(passes),
            "first_pass_s": round(float(passes[0]), 2),
            "later_pass_s": round(float(np.median(passes[1:])), 3) if len(passes) > 1 else None,
            "shifts": shifts}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--maxit", type=int, default=14)
    parser.add_argument("--methods", default="shift_particles,shift_reference")
    parser.add_argument("--verbose", action="store_true", help="print every pass's progress line")
    args = parser.parse_args()
    t = time.perf_counter()
    images, radius, ratio, sim, key = demo_input()
    print(f"demo input: {images.shape} radius {radius} ({time.perf_counter() - t:.1f} s); "
          f"{jax.device_count()} device(s), stages {prealign.search_stages(images.shape[-1], radius)}")
    methods = args.methods.split(",")
    rows = []
    for rep in range(args.repeats):
        for method in (methods if rep % 2 == 0 else methods[::-1]):
            row = run_once(images, radius, key, method, args.maxit, args.verbose)
            row["run"] = rep + 1
            row["centring"] = centring_error(row["shifts"], sim, ratio)
            rows.append(row)
            print(f"  run {rep + 1} {method}: {row['total_s']} s, {row['passes']} passes", flush=True)
    by_method = {r["method"]: r["shifts"] for r in rows if r["run"] == 1}
    agree = None
    if len(by_method) == 2:
        a, b = by_method.values()
        # the difference of the two found centres, in each particle's clean view, less its view's median
        mat = np.asarray(T.to_matrix(T.inverse(sim.moves)), np.float64)[:, :2, :2]
        diff = np.einsum("nij,nj->ni", mat, b - a)
        view = np.asarray(sim.view)
        d = np.empty(len(view))
        for g in np.unique(view):
            d[view == g] = np.hypot(*(diff[view == g] - np.median(diff[view == g], 0)).T)
        agree = {"median_px": round(float(np.median(d)), 3), "within_1px": round(float(np.mean(d <= 1.0)), 4)}
    print("\n| run | method | total s | passes | first pass s (compiles) | later pass s (median) "
          "| centring error: median / p90 px | within 1 px |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        c = r["centring"]
        print(f"| {r['run']} | {r['method']} | {r['total_s']} | {r['passes']} | {r['first_pass_s']} | "
              f"{r['later_pass_s']} | {c['median_px']} / {c['p90_px']} | {100 * c['within_1px']:.1f} % |")
    if agree is not None:
        print(f"\nthe two methods' centres (run 1, in each clean view, the view's median difference removed): median "
              f"difference {agree['median_px']} px, {100 * agree['within_1px']:.1f} % within 1 px")
    for r in rows:
        del r["shifts"]
    print(json.dumps({"bench": "prealign", "n": len(images), "box": images.shape[-1], "radius": radius,
                      "devices": jax.device_count(), "rows": rows, "methods_agree": agree}))


if __name__ == "__main__":
    main()
