"""Throughput and peak memory of reading an MRCS stack and preparing ISAC's working stack from it.

Makes an N-particle 128 px float32 MRCS in a temporary folder (written in chunks through a memory map, so making
it needs little memory), then streams it through ``jisac.preprocess.prepare_working_stack`` with ISAC's shapes
(radius 50 -> target_radius 29, target_nx 76; CTF phase flipping with random defoci; random pre-alignment shifts)
into an MRCS on disk. Prints a table and, last, one JSON line.

    python benchmarks/bench_io.py             # N = 50,000 (3.3 GB input, 1.2 GB output on disk)
    python benchmarks/bench_io.py --n 2000    # a quick check
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import mrcfile
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jisac import ctf  # noqa: E402
from jisac import preprocess as P  # noqa: E402


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def make_stack(path: Path, n: int, box: int, chunk: int, seed: int = 0) -> None:
    """Writes ``n`` noisy centred blobs as an MRCS, ``chunk`` images per reopened memory map."""
    with mrcfile.new_mmap(path, shape=(n, box, box), mrc_mode=2, overwrite=True) as mrc:
        mrc.set_image_stack()
        mrc.voxel_size = 1.0
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:box, :box] - box // 2
    blob = np.exp(-(x**2 + y**2) / (2 * (box / 8) ** 2)).astype(np.float32)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        data = rng.standard_normal((stop - start, box, box), dtype=np.float32)
        data += blob
        # Reopening per chunk unmaps the written pages, so they do not pile up in resident memory.
        with mrcfile.mmap(path, mode="r+") as mrc:
            mrc.data[start:stop] = data


def read_batches(path: Path, batch_size: int, reopen: int):
    """Yields ``(indices, images)`` from a memory-mapped MRCS, reopening the map every ``reopen`` images."""
    with mrcfile.mmap(path, mode="r") as mrc:
        n = mrc.data.shape[0]
    for group in range(0, n, reopen):
        with mrcfile.mmap(path, mode="r") as mrc:
            for start in range(group, min(n, group + reopen), batch_size):
                stop = min(n, start + batch_size, group + reopen)
                yield np.arange(start, stop), np.array(mrc.data[start:stop])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50_000, help="particles (default 50,000)")
    ap.add_argument("--box", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--dir", type=Path, default=None, help="working folder (default: a temporary one, removed)")
    args = ap.parse_args()

    params = P.PreprocessParams(radius=50, target_radius=29, target_nx=76, ctf=True)
    params.validate(args.box)
    workdir = Path(tempfile.mkdtemp(prefix="jisac_bench_io_", dir=args.dir))
    try:
        stack = workdir / "particles.mrcs"
        out = workdir / "stack_ali2d.mrcs"
        t0 = time.perf_counter()
        make_stack(stack, args.n, args.box, chunk=1024)
        t_make = time.perf_counter() - t0
        rss_after_make = peak_rss_mb()

        rng = np.random.default_rng(1)
        defocus = rng.uniform(8000, 30000, args.n)
        ctf_params = ctf.make_ctf_params(
            defocus, defocus - rng.uniform(0, 1000, args.n), rng.uniform(0, 180, args.n), pixel_size_angst=1.1
        )
        shifts = rng.uniform(-3, 3, (args.n, 2)).astype(np.float32)
        reopen = 2048  # 128 MiB of 128 px input per memory map

        # Compile once, outside the timing, with the driver's exact argument types.
        b = args.batch_size
        t0 = time.perf_counter()
        warm_ctf = ctf.CTFParams(*(jnp.asarray(np.asarray(f)[:b], jnp.float32) for f in ctf_params))
        jax.block_until_ready(
            P.prepare_batch(np.zeros((b, args.box, args.box), np.float32), params, warm_ctf, shifts[:b, 0],
                            shifts[:b, 1])
        )
        t_compile = time.perf_counter() - t0

        t0 = time.perf_counter()
        n_read = sum(idx.size for idx, _ in read_batches(stack, b, reopen))
        t_read = time.perf_counter() - t0
        assert n_read == args.n

        t0 = time.perf_counter()
        ws = P.prepare_working_stack(
            lambda: read_batches(stack, b, reopen), args.n, params, ctf_params_for_indices=ctf_params,
            shifts=shifts, out_path=out, batch_size=b, pixel_size_angst=1.1,
        )
        t_prep = time.perf_counter() - t0
        with mrcfile.mmap(ws.path, mode="r") as mrc:
            assert mrc.data.shape == (args.n, 76, 76)
            sample = np.array(mrc.data[: min(args.n, 64)])
        mask, mask_box = P.normalization_mask(params, args.box)
        lo = 76 // 2 - mask_box // 2
        inner = sample[:, lo : lo + mask_box, lo : lo + mask_box]
        inside_std = float(inner[:, mask].std(axis=1).mean())

        rss = peak_rss_mb()
        in_gb = args.n * args.box**2 * 4 / 1e9
        out_gb = args.n * 76**2 * 4 / 1e9
        result = {
            "n": args.n,
            "box": args.box,
            "batch_size": b,
            "device": str(jax.devices()[0]),
            "make_stack_s": round(t_make, 2),
            "compile_s": round(t_compile, 2),
            "read_only_s": round(t_read, 2),
            "read_only_particles_per_s": round(args.n / t_read, 1),
            "read_preprocess_write_s": round(t_prep, 2),
            "particles_per_s": round(args.n / t_prep, 1),
            "peak_rss_mb": round(rss, 1),
            "peak_rss_after_make_mb": round(rss_after_make, 1),
            "input_gb": round(in_gb, 3),
            "output_gb": round(out_gb, 3),
        }
        rows = [
            ("particles", f"{args.n} x {args.box}^2 px -> 76^2 px (radius 50 -> 29, CTF flip, shifts)"),
            ("device", result["device"]),
            ("make input stack", f"{t_make:.2f} s ({in_gb:.2f} GB)"),
            ("compile", f"{t_compile:.2f} s"),
            ("read only (mmap)", f"{t_read:.2f} s, {args.n / t_read:,.0f} particles/s"),
            ("read + prepare + write", f"{t_prep:.2f} s, {args.n / t_prep:,.0f} particles/s ({out_gb:.2f} GB out)"),
            ("check: std inside mask", f"{inside_std:.4f} (1 expected)"),
            ("peak RSS", f"{rss:.0f} MiB (after making the stack: {rss_after_make:.0f} MiB)"),
        ]
        width = max(len(k) for k, _ in rows)
        for k, v in rows:
            print(f"{k:<{width}}  {v}")
        print(json.dumps(result))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
