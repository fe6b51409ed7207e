"""Scale-out benchmark: a large 128 px stack made on the fly on disk, preprocessing, one multi-reference
alignment pass, one equal-size assignment and the assigned classes' parameters at ``img_per_grp`` 200 (1,000
classes for 200,000 particles), as one MRA iteration of ``isac.run_generation``.

The stack (an MRCS written batch by batch through a memory map, never held in memory): noisy projections of the
built-in phantom along 64 directions, randomly rotated and shifted. Preprocessing streams it into the 76 px
working stack (in memory, or on disk above half of ``--host-budget-mb``, read by rows); the MRA uses the
chunk sizes ``budget.plan`` derives from ``--budget-mb`` per device; references are ``n / img_per_grp``
random particles. The MRA keeps only the ``(n, k)`` float32 score table on the host (``--full-table``: also
every pair's parameters, the former path, 17 instead of 4 bytes per pair). Prints a table per stage (seconds,
particles/s, peak RSS so far) and, last, one JSON line with ``particles_per_s`` (MRA + assignment + parameters)
and ``peak_rss_mb``. ``--device-table`` also runs the MRA + assignment + parameters in fresh processes on 1, 2
and 4 (forced CPU) devices and prints their throughput.

    python benchmarks/bench_scale.py                 # 200,000 particles (about 1 hour of MRA on a 2-core CPU)
    python benchmarks/bench_scale.py --n 2000 --device-table
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax


def make_stack_on_disk(path: Path, n: int, box: int, radius: int, batch: int = 1000) -> None:
    import mrcfile
    import numpy as np

    from jisac import synthetic
    from jisac import transforms as T

    phantom = synthetic.make_phantom(radius=0.85 * radius, seed=0)
    rot, tilt = synthetic.hemisphere_directions(64)
    views = np.asarray(synthetic.project(phantom, synthetic.euler_to_matrix(rot, tilt, 0.0), box))
    with mrcfile.new_mmap(path, shape=(n, box, box), mrc_mode=2, overwrite=True) as mrc:
        mrc.set_image_stack()
        mrc.voxel_size = 2.0
    rng = np.random.default_rng(0)
    for start in range(0, n, batch):
        b = min(batch, n - start)
        q = T.make_transform(rng.uniform(0, 360, b), rng.uniform(-2, 2, b), rng.uniform(-2, 2, b), np.zeros(b, bool))
        imgs = T.apply_transform(views[rng.integers(0, len(views), b)], q)
        imgs = synthetic.add_noise(imgs, 0.3, jax.random.key(start))
        with mrcfile.mmap(path, mode="r+") as mrc:  # reopened per batch: written pages do not pile up in RSS
            mrc.data[start : start + b] = np.asarray(imgs)


def classify_pass(images, k: int, budget, mesh, full_table: bool = False) -> dict:
    """One MRA pass against ``k`` references, one equal-size assignment and each particle's parameters for its
    class, as ``isac.run_generation`` does: the MRA keeps only the ``(n, k)`` scores (``align.alignment_scores``)
    and the parameters come from the paired search (``align.align_to_assigned``). ``full_table``: the former
    path instead (``align.alignment_table``, parameters of every pair on the host), for comparison. Seconds and
    peak RSS (MB) after each stage."""
    import numpy as np

    from jisac import align, filters, isac, memory
    from jisac.budget import plan as plan_chunks
    from jisac.assignment import assign_equal_size

    p = isac.IsacParams()
    options = p.align
    plan = plan_chunks(budget, options, k, p.target_nx, mesh.size)
    options = options._replace(particle_batch=plan.particle_batch, reference_chunk=plan.reference_chunk)
    n = images.shape[0]
    refs = np.asarray(images[np.sort(np.random.default_rng(1).choice(n, k, replace=False))])
    mask = filters.circular_mask(p.target_nx, p.target_nx, p.target_radius)
    peak = lambda: memory.memory_snapshot()["peak_rss_mb"]  # noqa: E731
    t = time.perf_counter()
    masked = filters.subtract_masked_mean(refs, mask)
    bank = align.prepare_references(masked, options)
    if full_table:
        table = align.alignment_table(images, bank, options, mesh=mesh, particle_chunk=plan.particle_chunk)
        scores = table.score
    else:
        scores = align.alignment_scores(images, bank, options, mesh=mesh, particle_chunk=plan.particle_chunk)
    t_mra, rss_mra = time.perf_counter() - t, peak()
    t = time.perf_counter()
    labels = np.asarray(assign_equal_size(scores))
    t_assign, rss_assign = time.perf_counter() - t, peak()
    del scores
    t = time.perf_counter()
    if full_table:
        params = [np.asarray(a)[np.arange(n), labels] for a in table.params]
        del table
    else:
        params, _ = align.align_to_assigned(images, align.prepare_assigned_references(masked, options), labels,
                                            options, mesh=mesh, particle_chunk=plan.particle_chunk)
    t_params, rss_params = time.perf_counter() - t, peak()
    sizes = np.bincount(labels, minlength=k)
    return {"mra_s": t_mra, "assign_s": t_assign, "params_s": t_params, "class_size_min": int(sizes.min()),
            "class_size_max": int(sizes.max()), "plan": plan._asdict(),
            "peak_rss_mb": {"mra": rss_mra, "assign": rss_assign, "params": rss_params}}


def device_run(n: int, img_per_grp: int, budget_mb: int | None, full_table: bool = False) -> None:
    """Child process of ``--device-table``: the MRA + assignment + parameters on all (forced) devices; prints one
    JSON line."""
    import numpy as np

    from jisac import config, sharding

    rng = np.random.default_rng(0)
    images = rng.normal(size=(n, 76, 76)).astype(np.float32)
    mesh = sharding.data_mesh()
    budget = config.budget(config.JisacConfig(hardware=config.HardwareConfig(memory_budget_mb=budget_mb)))
    res = classify_pass(images, max(2, n // img_per_grp), budget, mesh, full_table)
    res["devices"] = mesh.size
    res["particles_per_s"] = n / (res["mra_s"] + res["assign_s"] + res["params_s"])
    print(json.dumps(res))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--box", type=int, default=128)
    parser.add_argument("--img-per-grp", type=int, default=200)
    parser.add_argument("--budget-mb", type=int, default=None,
                        help="hardware.memory_budget_mb (per device; default: the backend's preset)")
    parser.add_argument("--host-budget-mb", type=int, default=3072, help="hardware.host_memory_budget_mb")
    parser.add_argument("--device-table", action="store_true", help="also MRA + assignment on 1, 2, 4 devices")
    parser.add_argument("--full-table", action="store_true",
                        help="keep every pair's parameters on the host (alignment_table), the pre-issue-5 path")
    parser.add_argument("--child-devices", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_devices:
        jax.config.update("jax_num_cpu_devices", args.child_devices)
        return device_run(args.n, args.img_per_grp, args.budget_mb, args.full_table)

    from jisac import devices

    devices.use_all_cpu_cores()
    from jisac import config, memory, preprocess, sharding
    from jisac.budget import working_stack_on_disk
    from jisac.diskarray import DiskArray
    from jisac.io import open_stack

    # the budgets and chunk sizes `python -m jisac` would use here (the backend's presets unless --budget-mb)
    budget = config.budget(config.JisacConfig(hardware=config.HardwareConfig(
        memory_budget_mb=args.budget_mb, host_memory_budget_mb=args.host_budget_mb)))
    mesh = sharding.data_mesh()
    k = args.n // args.img_per_grp
    radius = int(0.4 * args.box)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        make_stack_on_disk(tmp / "stack.mrcs", args.n, args.box, radius)
        rows.append(("make stack on disk", time.perf_counter() - t, args.n, memory.memory_snapshot()["peak_rss_mb"]))

        t = time.perf_counter()
        prep = preprocess.PreprocessParams(radius, 29, 76)
        # jisac's own stack reader, as `python -m jisac` reads a stack (plain reads, nothing stays resident)
        with open_stack(tmp / "stack.mrcs") as stack:
            batches = lambda: stack.iter_batches(512)  # noqa: E731
            disk = working_stack_on_disk(args.n, 76, budget, tmp)
            if disk is not None:
                disk.parent.mkdir(parents=True)
            working = preprocess.prepare_working_stack(batches, args.n, prep, out_path=disk)
        # on disk: read by rows with plain reads, as `python -m jisac` does (jisac.diskarray)
        images = working.images if disk is None else DiskArray.from_mrc(disk)
        rows.append(("preprocess (76 px)", time.perf_counter() - t, args.n, memory.memory_snapshot()["peak_rss_mb"]))

        res = classify_pass(images, k, budget, mesh, args.full_table)
        rows.append((f"MRA ({k} refs{', full table' if args.full_table else ''})", res["mra_s"], args.n,
                     res["peak_rss_mb"]["mra"]))
        rows.append(("equal-size assignment", res["assign_s"], args.n, res["peak_rss_mb"]["assign"]))
        rows.append(("assigned class params", res["params_s"], args.n, res["peak_rss_mb"]["params"]))

    print(f"{args.n} particles, {args.box} px -> 76 px, {k} classes, {mesh.size} {jax.default_backend()} device(s), "
          f"working stack {'on disk' if disk is not None else 'in memory'}; plan {res['plan']}")
    print(f"| {'stage':<30} | {'seconds':>8} | {'particles/s':>11} | {'peak RSS MB':>11} |")
    print(f"|{'-' * 32}|{'-' * 10}|{'-' * 13}|{'-' * 13}|")
    for name, sec, count, rss in rows:
        print(f"| {name:<30} | {sec:8.1f} | {count / sec:11.1f} | {rss:11.0f} |")
    out = {"n": args.n, "box": args.box, "classes": k, "devices": mesh.size,
           "full_table": args.full_table,
           "particles_per_s": args.n / (res["mra_s"] + res["assign_s"] + res["params_s"]),
           "peak_rss_mb": memory.memory_snapshot()["peak_rss_mb"],
           "seconds": {name: round(sec, 2) for name, sec, _, _ in rows}}
    if args.device_table:
        table = []
        for d in (1, 2, 4):
            proc = subprocess.run([sys.executable, __file__, "--n", str(args.n), "--img-per-grp", str(args.img_per_grp),
                                   "--child-devices", str(d)]
                                  + ["--budget-mb", str(args.budget_mb)] * bool(args.budget_mb)
                                  + ["--full-table"] * args.full_table,
                                  capture_output=True, text=True, check=True, env=dict(os.environ))
            table.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print("\n| devices | MRA s | assignment s | parameters s | particles/s |\n|---|---|---|---|---|")
        for r in table:
            print(f"| {r['devices']} | {r['mra_s']:.1f} | {r['assign_s']:.2f} | {r['params_s']:.2f} | "
                  f"{r['particles_per_s']:.1f} |")
        out["device_table"] = [{key: r[key] for key in ("devices", "mra_s", "assign_s", "params_s", "particles_per_s")}
                               for r in table]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
