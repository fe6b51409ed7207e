"""The matching phase (``isac.matching``) at several quantiles, on a finished low-SNR run: its checkpoint's stable
members and averages, its working stack (the preprocessing cache's ``working.npy``), the truth re-simulated with
the same options as ``run.py``. Prints one line per quantile: matched, accounted true particles, spread ratio,
junk accounted.

    python experiments/lowsnr/match_quantiles.py RUN_DIR WORKING_NPY --n 1000 --snr 0.1 --junk 0.1 -q 0.1 0.25 0.5
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import metrics as M  # noqa: E402
from run import MAP, MAP_APIX  # noqa: E402

from jisac import devices, isac, matching, synthetic  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("working", type=Path, help="the run's working stack (preprocessing cache's working.npy)")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--snr", type=float, default=0.1)
    parser.add_argument("--junk", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-q", "--quantiles", type=float, nargs="+", default=[0.1, 0.25, 0.5])
    args = parser.parse_args()
    devices.use_all_cpu_cores()
    work = np.load(args.working, mmap_mode="r")
    keep = np.load(args.working.parent / "keep.npy")
    z = np.load(args.run_dir / "checkpoint" / "state.npz")
    params, errors, class_of, averages = z["params"], z["errors"], z["class_of"], z["averages"]
    stable = np.isfinite(errors) & (class_of >= 0)
    k = averages.shape[0]
    members = tuple(np.flatnonzero(stable & (class_of == c)) for c in range(k))
    pool = np.flatnonzero(~stable)
    p = json.loads((args.run_dir / "summary.json").read_text())["parameters"]
    ip = isac.make_params(target_radius=p["target_radius"], xr=p["xr"], ring_lengths=p.get("ring_lengths", "constant"))
    vol, _ = synthetic.read_map(MAP)
    sim = synthetic.simulate_from_map(synthetic.fourier_volume(vol, MAP_APIX), args.n, jax.random.key(args.seed),
                                      args.snr, box=64, pixel_size=6.0, radius=23, ice_fraction=args.junk / 2,
                                      aggregate_fraction=args.junk / 2)
    dirs, true = M.view_directions(sim.rot, sim.tilt), ~sim.is_junk
    for q in [None] + list(args.quantiles):
        cls = np.where(stable, class_of, -1)
        n_matched = 0
        if q is not None:
            m = matching.match_particles(work, pool, members, params, averages, ip.align, ip.fh, ip.ff, q)
            cls[m.particles], n_matched = m.classes, len(m.particles)
        lab = np.zeros(args.n, int)
        lab[keep] = cls + 1
        lab_true = np.where(true, lab, 0)
        acc_true = np.flatnonzero(lab_true > 0)
        ratio = M.mean_spread(dirs, lab_true) / M.mean_spread(dirs[acc_true], M.ideal_partition(dirs[acc_true], k))
        junk = (lab[sim.is_junk] > 0).mean() if sim.is_junk.any() else float("nan")
        print(f"quantile {q}: matched {n_matched}, accounted {(lab[true] > 0).mean():.3f}, spread ratio {ratio:.2f}, "
              f"junk accounted {junk:.3f}", flush=True)


if __name__ == "__main__":
    main()
