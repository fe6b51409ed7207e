"""Realistic low-SNR benchmark of jisac's ISAC: particles simulated from a 70S ribosome map, scored against the truth.

Simulation (``jisac.synthetic.simulate_from_map``): projections of /work/shared/maps/clean70SRibosome_vol_65p.mrc
(65^3; its header says 0 A/px, taken as 4.5 A/px as in experiments/beautify) at random views on the sphere (RELION
Euler angles), 64 px at 6 A/px (the ribosome spans ~42 px: isac.radius=23), centres shifted +-2 px, CTF in a 2x
padded box (300 kV, Cs 2.7 mm, 10 % amplitude contrast, defocus U 1-3 um, up to 500 A astigmatism), white noise at
one level per stack: SNR = mean signal variance inside the particle disc (radius 23 px) over the noise variance.
Optional junk (``--junk``: a fraction, half empty ice = noise alone, half aggregates = 2-4 overlapping projections),
its truth kept aside. The stack is written as a RELION STAR + MRCS (CTF columns) and classified by the library's
whole run (``jisac.run.run``: pre-alignment, phase flip, shrink, ISAC generations) with the configuration composed
from conf/ exactly as ``python -m jisac`` would, from the variant's overrides plus any given after ``--``.

Metrics (experiments/lowsnr/metrics.py; "true" = not junk):
  accounted    share of true particles accounted (and of all particles, ``accounted_all``)
  spread       member-weighted mean angle (deg) of a class's true views to its axial mean view
  ideal        the same for an ideal partition of the same accounted true particles into as many equal classes
  ratio        spread / ideal (1 = as tight as possible at this class size; the target is <= 4/3)
  pure15       share of accounted particles within 15 deg of their class's view (junk counts as impure)
  inplane      median in-plane angle error (deg) after one rigid transform per class; mirror_ok the share of
               members whose mirror flag agrees with their class's majority
  corr         median over classes of the high-passed (below 1/(diameter/3)) correlation of each average with the
               clean projection of its class's view (brought into the average's frame with the class's consensus
               transform, best integer shift within +-4 px; the average is phase-flipped, the projection CTF-free,
               so even a perfect average scores below 1); corr_noise the same for a pure-noise image (the floor)
  junk_rej     share of junk left unaccounted
  seconds, generations (accepted classes per generation in ``history``)

    python experiments/lowsnr/run.py --n 1000 --snr 0.05 0.2                     # the isac2 baseline row
    python experiments/lowsnr/run.py --n 1000 --snr 0.05 --variant resolution      # another named variant
    python experiments/lowsnr/run.py --n 1000 --snr 0.05 --name mine -- isac.thld_err=1.5   # any overrides

Prints a table, then one JSON line; writes one JSON file per (variant, SNR) into --results
(experiments/lowsnr/results/ by default); ``--table`` prints the table of every JSON file there.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import hydra
import numpy as np
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402

import metrics as M  # noqa: E402
from jisac import cli, config, devices, filters, synthetic  # noqa: E402
from jisac import run as jrun  # noqa: E402
from jisac import transforms as T  # noqa: E402
from jisac.diskarray import DiskArray  # noqa: E402
from jisac.io import star  # noqa: E402

MAP = Path("/work/shared/maps/clean70SRibosome_vol_65p.mrc")
MAP_APIX = 4.5  # A/px assumed for the 65^3 map (its header says 0), as in experiments/beautify
HERE = Path(__file__).resolve().parent
# A variant is a named set of overrides on top of BASE: `isac2` is ISAC2 as it is (preset=isac2, the default),
# `lowsnr` the preset for yield (preset=lowsnr: consensus + members); the others are ISAC2 with what they name.
BASE = ["isac.img_per_grp=100", "isac.ctf=true", "beautify.enabled=false"]
_ISAC2 = ["preset=isac2"]
VARIANTS = {
    "lowsnr": ["preset=lowsnr"],
    "isac2": _ISAC2,
    "resolution": _ISAC2 + ["stability=resolution"],
    "consensus": _ISAC2 + ["stability=consensus"],
    "consensus_members": _ISAC2 + ["stability=consensus", "isac.unstable_references=members"],
    "consensus_per_member": _ISAC2 + ["stability=consensus", "stability.per_member=true"],
    "consensus_per_member_members": _ISAC2 + ["stability=consensus", "stability.per_member=true",
                                              "isac.unstable_references=members"],
    "reproducibility": _ISAC2 + ["stability=reproducibility"],
    "members": _ISAC2 + ["isac.unstable_references=members"],
    "members_seeded": _ISAC2 + ["isac.unstable_references=members", "isac.next_references=unaccepted"],
}


def compose(overrides: list[str]) -> config.JisacConfig:
    """The typed configuration ``python -m jisac <overrides>`` would run with."""
    with hydra.initialize_config_dir(config_dir=str(cli.CONF_DIR), version_base="1.3"):
        cfg = hydra.compose("config", overrides=overrides)
    return OmegaConf.to_object(cfg)


def write_stack(sim: synthetic.MapParticles, folder: Path) -> Path:
    """The particles as a RELION 3.1 STAR + MRCS with CTF columns and the truth in jisacTrue* columns (not read by
    jisac)."""
    c = sim.ctf
    cols = {"rlnDefocusU": np.asarray(c.defocus_u_angst), "rlnDefocusV": np.asarray(c.defocus_v_angst),
            "rlnDefocusAngle": np.asarray(c.defocus_angle_deg), "rlnVoltage": np.asarray(c.voltage_kv),
            "rlnSphericalAberration": np.asarray(c.cs_mm), "rlnAmplitudeContrast": np.asarray(c.amplitude_contrast),
            "jisacTrueRot": sim.rot, "jisacTrueTilt": sim.tilt, "jisacTruePsi": sim.psi,
            "jisacTrueJunk": sim.junk_kind.astype(int)}
    path = folder / "particles.star"
    star.write_stack_and_star(path, folder / "particles.mrcs", np.asarray(sim.images), None, cols,
                              pixel_size=sim.pixel_size)
    return path


def evaluate(sim: synthetic.MapParticles, run_dir: Path, mft: synthetic.MapFT, radius: float) -> dict:
    """The metrics of a finished run folder against the truth."""
    classes = np.loadtxt(run_dir / "particle_classes.txt", ndmin=2)[:, 0].astype(int)
    params = np.loadtxt(run_dir / "all_parameters.txt", ndmin=2)  # working frame: angle, sx, sy, mirror
    summary = json.loads((run_dir / "summary.json").read_text())
    true = ~sim.is_junk
    dirs = M.view_directions(sim.rot, sim.tilt)
    acc = classes > 0
    out = {"accounted": float(acc[true].mean()), "accounted_all": float(acc.mean()),
           "classes": int(summary["classes"]),
           "junk_rejected": float((~acc[sim.is_junk]).mean()) if sim.is_junk.any() else None}
    for kind, name in ((synthetic.JUNK_ICE, "ice"), (synthetic.JUNK_AGGREGATE, "aggregates")):
        of_kind = sim.junk_kind == kind  # which junk gets in: empty ice (no signal) or aggregates (strong signal)
        out[f"junk_rejected_{name}"] = float((~acc[of_kind]).mean()) if of_kind.any() else None
    lab_true = np.where(true, classes, 0)
    k = len(np.unique(lab_true[lab_true > 0]))
    out["spread"] = M.mean_spread(dirs, lab_true)
    if k:
        acc_true = np.flatnonzero(lab_true > 0)
        ideal = M.ideal_partition(dirs[acc_true], k) if len(acc_true) >= k else None
        out["ideal_spread"] = M.mean_spread(dirs[acc_true], ideal)
        out["ideal_pure15"] = M.purity(dirs[acc_true], ideal)  # the best pure15 this class size allows
    else:
        out["ideal_spread"] = out["ideal_pure15"] = float("nan")
    out["spread_ratio"] = out["spread"] / out["ideal_spread"] if out["ideal_spread"] > 0 else float("nan")
    out["pure15"] = M.purity(dirs, classes)
    inpl = M.inplane_errors(sim.rot, sim.tilt, sim.psi, lab_true, params[:, 0], params[:, 3] > 0)
    e = inpl["error"][lab_true > 0]
    out["inplane_median_deg"] = float(np.nanmedian(e)) if np.isfinite(e).any() else float("nan")
    out["mirror_ok"] = float(inpl["mirror_ok"][lab_true > 0].mean()) if (lab_true > 0).any() else float("nan")

    # averages against the clean projection of their class's view, in the working frame
    corrs, noise_corrs = [], []
    avg_path = run_dir / "class_averages.mrcs"
    if avg_path.exists() and inpl["frames"]:
        averages = DiskArray.from_mrc(avg_path)
        averages = np.asarray(averages.read(np.arange(len(averages))))
        nx = averages.shape[-1]
        p = summary["parameters"]
        work_apix = sim.pixel_size * radius / p["target_radius"]
        project = synthetic.map_projector(mft, nx, work_apix)
        mask = filters.soft_circular_mask(nx, nx, p["target_radius"] + 2, 3.0)
        cutoff = 3.0 / (2 * p["target_radius"])  # 1 / (diameter / 3), cycles/px
        rng = np.random.default_rng(0)
        for c in sorted(inpl["frames"]):
            ref = np.asarray(project(inpl["frames"][c][None].astype(np.float32), np.zeros((1, 2), np.float32)))
            angle, mirror = inpl["consensus"][c]
            template = np.asarray(T.apply_transform(ref, T.make_transform([angle], [0.0], [0.0], [mirror])))[0]
            corrs.append(M.best_shift_corr(averages[c - 1], template, cutoff, mask))
            noise_corrs.append(M.best_shift_corr(rng.standard_normal((nx, nx)), template, cutoff, mask))
    out["corr_median"] = float(np.median(corrs)) if corrs else float("nan")
    out.update(generation_averages(run_dir, mft, sim.pixel_size, radius, summary["parameters"]))
    out["corr_per_class"] = [round(v, 3) for v in corrs]
    out["corr_noise_median"] = float(np.median(noise_corrs)) if noise_corrs else float("nan")
    out["generations"] = len(summary["generations"])
    out["history"] = [{k2: g[k2] for k2 in ("generation", "particles", "classes", "accepted_classes", "accounted",
                                            "seconds")} for g in summary["generations"]]
    return out


def generation_averages(run_dir: Path, mft: synthetic.MapFT, pixel_size: float, radius: float, p: dict,
                        n_views: int = 150) -> dict:
    """Every generation's averages (accepted and not) scored without membership: the best high-passed
    correlation with any clean view (``metrics.best_match_corr`` over ``n_views`` hemisphere directions), and the
    same for a phase-randomised copy of each (the floor an average holding no view reaches). An average counts as
    "a view" when it beats its own floor by ``VIEW_MARGIN``."""
    folders = sorted((run_dir / "main001").glob("generation*"))
    if not folders:
        return {}
    first = DiskArray.from_mrc(folders[0] / "class_averages.mrcs")
    nx = first.shape[-1]
    work_apix = pixel_size * radius / p["target_radius"]
    rot, tilt = synthetic.hemisphere_directions(n_views)
    lib = synthetic.in_batches(synthetic.map_projector(mft, nx, work_apix),
                               synthetic.euler_to_matrix(rot, tilt, 0.0).astype(np.float32),
                               np.zeros((n_views, 2), np.float32))
    mask = filters.soft_circular_mask(nx, nx, p["target_radius"] + 2, 3.0)
    cutoff = 3.0 / (2 * p["target_radius"])
    rows = []
    for g, folder in enumerate(folders, 1):
        if not (folder / "class_averages.mrcs").exists():
            continue
        allv = DiskArray.from_mrc(folder / "class_averages.mrcs")
        allv = np.asarray(allv.read(np.arange(len(allv))))
        accepted = np.zeros(len(allv), bool)
        if (folder / "good_class_averages.mrcs").exists():
            good = DiskArray.from_mrc(folder / "good_class_averages.mrcs")
            good = np.asarray(good.read(np.arange(len(good))))
            accepted = np.array([any(np.array_equal(a, b) for b in good) for a in allv])
        score = M.best_match_corr(allv, lib, cutoff, mask)
        floor = M.best_match_corr(M.phase_randomised(allv, seed=g), lib, cutoff, mask)
        looks = score - floor >= VIEW_MARGIN
        rows.append({"generation": g, "accepted": accepted.tolist(), "view_corr": np.round(score, 3).tolist(),
                     "floor": np.round(floor, 3).tolist(),
                     "rejected_like_views": int((looks & ~accepted).sum()),
                     "rejected_like_noise": int((~looks & ~accepted).sum()),
                     "accepted_like_noise": int((~looks & accepted).sum())})
    return {"generation_averages": rows,
            "rejected_like_views": sum(r["rejected_like_views"] for r in rows),
            "rejected_like_noise": sum(r["rejected_like_noise"] for r in rows)}


VIEW_MARGIN = 0.1  # best-view correlation above the phase-randomised floor that counts as "looks like a view"

COLUMNS = [("variant", "variant", "{}"), ("n", "n", "{}"), ("snr", "snr", "{:g}"), ("junk", "junk", "{:g}"),
           ("accounted", "accounted", "{:.3f}"), ("classes", "classes", "{}"), ("spread", "spread", "{:.1f}"),
           ("ideal", "ideal_spread", "{:.1f}"), ("ratio", "spread_ratio", "{:.2f}"), ("pure15", "pure15", "{:.3f}"),
           ("ideal15", "ideal_pure15", "{:.3f}"),
           ("inplane", "inplane_median_deg", "{:.1f}"), ("mirror_ok", "mirror_ok", "{:.3f}"),
           ("corr", "corr_median", "{:.3f}"), ("corr_noise", "corr_noise_median", "{:.3f}"),
           ("junk_rej", "junk_rejected", "{:.3f}"), ("rej_view", "rejected_like_views", "{}"),
           ("rej_noise", "rejected_like_noise", "{}"), ("gens", "generations", "{}"), ("seconds", "seconds", "{:.0f}")]


def _cell(row: dict, key: str, fmt: str) -> str:
    v = row.get(key)
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    return fmt.format(v)


def table(rows: list[dict]) -> str:
    """A markdown table of result rows."""
    lines = ["| " + " | ".join(c[0] for c in COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r, key, fmt) for _, key, fmt in COLUMNS) + " |")
    return "\n".join(lines)


def _plain(v):
    """JSON-safe: NaN -> None, floats rounded to 4 decimals, NumPy scalars to Python."""
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, (float, np.floating)):
        return round(float(v), 4) if np.isfinite(v) else None
    if isinstance(v, np.integer):
        return int(v)
    return v


def _git_commit() -> str:
    """HEAD's short hash, with ``+changes`` when the tree's tracked files differ from it (the code that runs is not
    that commit's)."""
    try:
        def git(*a):
            return subprocess.run(["git", *a], cwd=HERE, capture_output=True, text=True, check=True).stdout.strip()

        return git("rev-parse", "--short", "HEAD") + ("+changes" if git("status", "--porcelain", "-uno") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1000, help="particles (junk included)")
    ap.add_argument("--snr", type=float, nargs="+", default=[0.05])
    ap.add_argument("--junk", type=float, default=0.0, help="junk fraction (half empty ice, half aggregates)")
    ap.add_argument("--seed", type=int, default=0, help="simulation seed (ISAC's isac.rand_seed is separate)")
    ap.add_argument("--box", type=int, default=64)
    ap.add_argument("--pixel-size", type=float, default=6.0, help="A/px of the particles")
    ap.add_argument("--radius", type=int, default=23, help="particle radius, px (isac.radius, SNR disc)")
    ap.add_argument("--generations", type=int, default=-1, help="isac.main_iter_limit (-1: until exhausted)")
    ap.add_argument("--variant", default="isac2", choices=sorted(VARIANTS))
    ap.add_argument("--name", default=None, help="the row's name (default: the variant, plus the extra overrides)")
    ap.add_argument("--results", type=Path, default=HERE / "results")
    ap.add_argument("--keep", action="store_true", help="keep the stack and run folders (printed)")
    ap.add_argument("--work", type=Path, default=None, help="folder for the stack and run folders (default: a temp)")
    ap.add_argument("--table", action="store_true", help="only print the table of every JSON file in --results")
    ap.add_argument("--evaluate", type=Path, default=None,
                    help="score this finished run folder instead of running ISAC (the same --n/--snr/--seed/... "
                         "simulate the same stack; one --snr)")
    args = ap.parse_args(argv)
    if args.table:
        rows = [json.loads(p.read_text()) for p in sorted(args.results.glob("*.json"))]
        print(table(rows))
        return
    if not MAP.is_file():
        print(f"{MAP} not found: skipping the low-SNR benchmark")
        print(json.dumps({"skipped": f"{MAP} absent"}))
        return
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    for noisy in ("jax", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    name = args.name or "_".join([args.variant] + extra)
    overrides = BASE + VARIANTS[args.variant] + [f"isac.radius={args.radius}",
                                                 f"isac.main_iter_limit={args.generations}"] + extra
    devices.setup(compose(overrides + ["data.stack=x", "output_dir=x"]).hardware)  # before any JAX work

    commit = _git_commit()  # the code this process loaded, not what HEAD is when the row is written
    vol, _ = synthetic.read_map(MAP)
    mft = synthetic.fourier_volume(vol, MAP_APIX)
    rows = []
    args.results.mkdir(parents=True, exist_ok=True)
    for snr in args.snr:
        if args.work is not None:
            args.work.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"jisac_lowsnr_{snr:g}_", dir=args.work))
        t0 = time.perf_counter()
        sim = synthetic.simulate_from_map(mft, args.n, jax.random.key(args.seed), snr, box=args.box,
                                          pixel_size=args.pixel_size, radius=args.radius,
                                          ice_fraction=args.junk / 2, aggregate_fraction=args.junk / 2)
        t_sim = time.perf_counter() - t0
        if args.evaluate is None:
            stack = write_stack(sim, tmp)
            run_dir = tmp / "run"
            cfg = compose(overrides + [f"data.stack={stack}", f"output_dir={run_dir}"])
            t0 = time.perf_counter()
            jrun.run(cfg)
            seconds = time.perf_counter() - t0
        else:  # a run made earlier: its own wall time (from loading the stack to the outputs)
            run_dir = args.evaluate
            seconds = json.loads((run_dir / "summary.json").read_text())["seconds"]["total"]
        row = {"variant": name, "overrides": overrides, "n": args.n, "snr": snr, "junk": args.junk,
               "seed": args.seed, "box": args.box, "pixel_size": args.pixel_size, "radius": args.radius,
               "seconds": round(seconds, 1), "simulation_s": round(t_sim, 1),
               **evaluate(sim, run_dir, mft, args.radius),
               "commit": commit, "machine": f"{platform.node()} {os.cpu_count()} cpu",
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        rows.append(row)
        tag = f"{name}_n{args.n}_snr{snr:g}_junk{args.junk:g}_seed{args.seed}".replace("=", "-").replace("/", "-")
        (args.results / f"{tag}.json").write_text(json.dumps(_plain(row), indent=1) + "\n")
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        print(table([row]).splitlines()[-1], flush=True)
    print(table(rows))
    print(json.dumps(_plain(rows)))


if __name__ == "__main__":
    main()
