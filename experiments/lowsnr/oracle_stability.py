"""How stable are ideal classes? ISAC's stability test on classes made from the truth.

The low-SNR rows (``docs/lowsnr.md``) lose most particles in classes that fail the stability test. This asks
whether a *perfect* class would pass it: the particles of a finished harness run's working stack (the
preprocessing cache's ``working.npy``, pre-aligned and shrunk exactly as ISAC sees them) are grouped by their
true views into an ideal equal-size partition (``metrics.ideal_partition``, classes of ``--img-per-grp``), and one
stability round runs on those classes exactly as ISAC's does (``stab_ali`` within-group runs from random starts,
then the criterion). A random partition of the same particles is the control. Prints, per partition and
criterion (every criterion judges the same runs): how many classes have more than ``minimum_grp_size`` stable
members (ISAC would accept them), the share of stable particles, the share whose mirror flag the runs reproduce
(SPHIRE's mirror stability: the others are never stable), the median pixel error of those (the L-BFGS fit of
the runs) and the shares of all members under 1.5 and 3 px, then one JSON line.

    python experiments/lowsnr/oracle_stability.py ~/.cache/jisac/working/<key>/working.npy --n 5000 --snr 0.05

``--n/--snr/--junk/--seed`` must be those of the run that made the working stack (the truth is simulated again
from them, as ``run.py`` and ``match_quantiles.py`` do). ``--thld-err`` and ``--criterion pixel_error resolution
consensus:3`` (``consensus:<min_runs>``, ``consensus:3m`` with ``per_member``) judge the same runs' alignments
with other criteria.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import metrics as M  # noqa: E402
from run import MAP, MAP_APIX  # noqa: E402

from jisac import criteria, devices, filters, isac, sharding, synthetic, within_group  # noqa: E402
from jisac import transforms as T  # noqa: E402
from jisac.transforms import identity  # noqa: E402


def stability_runs(images, labels: np.ndarray, p: isac.IsacParams, key, mesh, restarts: int = 1):
    """The ``stab_ali`` within-group runs of one stability round (ISAC's ``stability_round`` up to the verdict)
    of the classes ``labels`` (0..k-1): ``(runs, index, member)`` as the criterion sees them (``runs`` fields
    ``(k_pad, L, n)``). With ``restarts`` > 1, ``restarts * stab_ali`` independent runs are made and, per class,
    the ``stab_ali`` whose final class average has the most energy inside the particle disc (a coherent sum: the
    run aligned its members) are kept; every run is still from its own random start."""
    n = len(labels)
    steps = isac.generation_steps(n, p, mesh)
    labels = labels.astype(np.int32)
    keys = list(jax.random.split(key, p.stab_ali * restarts))
    results = within_group.within_group_runs(images, labels, steps.k_pad, keys, steps.options, steps.wg,
                                             identity((n,)), mesh, max_particles=steps.sizes.within_group_particles,
                                             with_averages=restarts > 1)
    run_params = [params for _, params in results]
    if restarts > 1:
        disc = filters.circular_mask(images.shape[-1], images.shape[-1], p.target_radius)
        energy = np.stack([np.sum((np.asarray(a) * disc) ** 2, (1, 2)) for a, _ in results])  # (runs, k_pad)
        best = np.argsort(-energy, axis=0, kind="stable")[: p.stab_ali]  # (stab_ali, k_pad): per class
        fields = [np.stack([np.asarray(f) for f in field]) for field in zip(*run_params)]  # 4 x (runs, n)
        run_params = [T.Transform2D(*(f[best[j][labels], np.arange(n)] for f in fields)) for j in range(p.stab_ali)]
    index, member = isac.class_members(labels, steps.k_pad)
    safe = np.maximum(index, 0)
    runs = jax.tree.map(lambda *a: np.stack([np.asarray(x) for x in a])[:, safe].transpose(1, 0, 2), *run_params)
    return runs, index, member


def verdict(runs, index, member, k: int, images, crit, minimum_grp_size: int) -> dict:
    """The criterion's verdict on the runs of ``stability_runs`` for the ``k`` real classes, summarised."""
    res = crit.score(runs, jnp.asarray(member), images=images, labels=index)
    stable = (np.asarray(res.stable) & member)[:k]
    e = np.asarray(res.error)[:k][member[:k]]  # every member; inf where its mirror flag is not reproduced
    per_class = stable.sum(1)
    consistent = np.isfinite(e)
    return {"classes": k, "accepted": int((per_class > minimum_grp_size).sum()),
            "stable_share": float(stable.sum() / member[:k].sum()),
            "accepted_share": float(per_class[per_class > minimum_grp_size].sum() / member[:k].sum()),
            "stable_per_class_median": float(np.median(per_class)),
            "mirror_consistent": float(consistent.mean()),
            "error_median_px": float(np.median(e[consistent])) if consistent.any() else float("nan"),
            "error_under_1.5px": float((e < 1.5).mean()),
            "error_under_3px": float((e < 3.0).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("working", type=Path, help="a harness run's working stack (preprocessing cache's working.npy)")
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--snr", type=float, default=0.05)
    parser.add_argument("--junk", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0, help="the simulation seed of the run")
    parser.add_argument("--img-per-grp", type=int, default=100)
    parser.add_argument("--thld-err", type=float, default=0.7)
    parser.add_argument("--stab-ali", type=int, default=5, help="within-group runs per class (isac.stab_ali)")
    parser.add_argument("--criterion", nargs="+", default=["pixel_error"],
                        help="criteria to score the same runs with: pixel_error, resolution, consensus[:min_runs[m]] "
                             "(m: per_member)")
    parser.add_argument("--key", type=int, default=0, help="seed of the within-group runs' random starts")
    parser.add_argument("--restarts", type=int, nargs="+", default=[1],
                        help="runs per stability run; the best by class-average energy are tested (1: ISAC2)")
    args = parser.parse_args()
    devices.use_all_cpu_cores()
    mesh = sharding.data_mesh() if len(jax.devices()) > 1 else None
    work = np.load(args.working, mmap_mode="r")
    keep = np.load(args.working.parent / "keep.npy")
    vol, _ = synthetic.read_map(MAP)
    sim = synthetic.simulate_from_map(synthetic.fourier_volume(vol, MAP_APIX), args.n, jax.random.key(args.seed),
                                      args.snr, box=64, pixel_size=6.0, radius=23, ice_fraction=args.junk / 2,
                                      aggregate_fraction=args.junk / 2)
    rows = keep[~sim.is_junk[keep]] if sim.is_junk.any() else keep  # working rows are stack rows' order in keep
    work_rows = np.flatnonzero(np.isin(keep, rows))
    dirs = M.view_directions(sim.rot, sim.tilt)[keep[work_rows]]
    k = len(work_rows) // args.img_per_grp
    info = json.loads((args.working.parent / "info.json").read_text())
    p = isac.make_params(target_radius=info["target_radius"], target_nx=info["target_nx"],
                         img_per_grp=args.img_per_grp, minimum_grp_size=int(0.6 * args.img_per_grp),
                         thld_err=args.thld_err, stab_ali=args.stab_ali)
    crits = []
    for spec in args.criterion:
        name, _, min_runs = spec.partition(":")
        per_member = min_runs.endswith("m")  # consensus:3m: per-member subsets (stability.per_member=true)
        options = {"min_runs": int(min_runs.rstrip("m") or 3), "per_member": per_member} if name == "consensus" else {}
        crits.append(criteria.make_criterion(name, p.thld_err, float(p.target_radius), **options))
    images = np.asarray(work[work_rows], np.float32)
    partitions = {"ideal (true views)": M.ideal_partition(dirs, k) - 1,
                  "random": np.random.default_rng(0).permutation(np.arange(len(work_rows)) % k)}
    out = {"n": args.n, "snr": args.snr, "particles": int(len(work_rows)), "img_per_grp": args.img_per_grp,
           "thld_err": args.thld_err, "stab_ali": args.stab_ali, "rows": []}
    print(f"{len(work_rows)} particles, SNR {args.snr}, {k} classes of {args.img_per_grp}, thld_err {args.thld_err} px, "
          f"{args.stab_ali} runs per class")
    print(f"{'partition':<20} {'criterion':<22} {'spread':>7} {'accepted':>9} {'stable':>7} {'in accepted':>12} "
          f"{'mirror ok':>10} {'median err':>11} {'<1.5 px':>8} {'<3 px':>7} {'s':>6}")
    for (name, labels), restarts in ((pl, r) for r in args.restarts for pl in partitions.items()):
        t = time.perf_counter()
        runs, index, member = stability_runs(images, labels, p, jax.random.key(args.key), mesh, restarts)
        seconds = time.perf_counter() - t
        name = name if restarts == 1 else f"{name.split()[0]}, best {p.stab_ali} of {p.stab_ali * restarts}"
        for crit in crits:
            t = time.perf_counter()
            r = verdict(runs, index, member, k, images, crit, p.minimum_grp_size)
            r.update(partition=name, criterion=crit.name, spread_deg=M.mean_spread(dirs, labels + 1),
                     runs_s=round(seconds, 1), verdict_s=round(time.perf_counter() - t, 1))
            out["rows"].append(r)
            print(f"{name:<20} {crit.name:<22} {r['spread_deg']:>6.1f}° {r['accepted']:>4}/{r['classes']:<4} "
                  f"{r['stable_share']:>7.3f} {r['accepted_share']:>12.3f} {r['mirror_consistent']:>10.3f} "
                  f"{r['error_median_px']:>10.2f}px {r['error_under_1.5px']:>8.3f} {r['error_under_3px']:>7.3f} "
                  f"{seconds + r['verdict_s']:>6.1f}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
