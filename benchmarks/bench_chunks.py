"""Chunk sizes of the multi-reference alignment on this machine: which ``align.particle_batch``,
``align.reference_chunk`` and ``align.particle_chunk`` are fastest here.

One MRA score pass (``align.alignment_scores``, as ``isac.run_generation`` runs it) of ``--n`` random 76 px
particles against ``--k`` references, at ISAC's default search (3x3 shifts, mirror, rings 1..29 x 256), for every
combination of the sizes given. Each row: compile seconds (first call on one chunk minus a steady one), best of
``--repeats`` steady passes, comparisons/s (one comparison = one particle x one reference x one shift, all angles,
both mirrors, as in bench_align.py) and the device's peak memory where the backend reports it. The defaults in
``conf/config.yaml`` come from this table (CPU) and its GPU run (docs/benchmarks.md).

    python benchmarks/bench_chunks.py --n 4096 --k 100
    python benchmarks/bench_chunks.py --batches 4,16,64 --ref-chunks 50,100,200 --particle-chunks 256,4096
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import jax
import numpy as np

from jisac import align, devices, filters, memory, sharding


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=4096, help="particles")
    parser.add_argument("--k", type=int, default=100, help="references")
    parser.add_argument("--batches", type=ints, default=[4, 16], help="align.particle_batch values")
    parser.add_argument("--ref-chunks", type=ints, default=[50, 100], help="align.reference_chunk values")
    parser.add_argument("--particle-chunks", type=ints, default=[256, 1024], help="align.particle_chunk values")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    devices.use_all_cpu_cores()
    mesh = sharding.data_mesh()
    rng = np.random.default_rng(0)
    box = 76
    images = rng.normal(size=(args.n, box, box)).astype(np.float32)
    mask = filters.circular_mask(box, box, 29)
    refs = filters.subtract_masked_mean(rng.normal(size=(args.k, box, box)).astype(np.float32), mask)
    rows = []
    for batch, ref_chunk, chunk in itertools.product(args.batches, args.ref_chunks, args.particle_chunks):
        options = align.AlignOptions(particle_batch=batch, reference_chunk=ref_chunk)
        bank = jax.block_until_ready(align.prepare_references(refs, options))
        run = lambda x: align.alignment_scores(x, bank, options, particle_chunk=chunk, mesh=mesh)  # noqa: E731,B023
        t = time.perf_counter()
        run(images[:chunk])
        first = time.perf_counter() - t
        t = time.perf_counter()
        run(images[:chunk])
        steady_chunk = time.perf_counter() - t
        best = np.inf
        for _ in range(args.repeats):
            t = time.perf_counter()
            run(images)
            best = min(best, time.perf_counter() - t)
        mem = memory.memory_snapshot()
        rows.append({"particle_batch": batch, "reference_chunk": ref_chunk, "particle_chunk": chunk,
                     "compile_s": round(first - steady_chunk, 2), "seconds": round(best, 3),
                     "comparisons_per_s": round(args.n * args.k * options.grid.n_shifts / best, 1),
                     "device_peak_mb": mem.get("device_peak_mb")})
    print(f"MRA score pass: {args.n} particles x {args.k} references, {box} px, {mesh.size} "
          f"{jax.default_backend()} device(s), jax {jax.__version__}")
    print("| particle_batch | reference_chunk | particle_chunk | compile s | pass s | comparisons/s | device peak MB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['particle_batch']} | {r['reference_chunk']} | {r['particle_chunk']} | {r['compile_s']:.2f} | "
              f"{r['seconds']:.3f} | {r['comparisons_per_s']:.3g} | {r['device_peak_mb'] or '-'} |")
    best = max(rows, key=lambda r: r["comparisons_per_s"])
    print(json.dumps({"backend": jax.default_backend(), "devices": mesh.size, "n": args.n, "k": args.k,
                      "best": best, "rows": rows}))


if __name__ == "__main__":
    main()
