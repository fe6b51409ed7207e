"""Benchmark of the multi-reference polar alignment engine at ISAC's working size.

76 px box, rings 1..29 x 256 angles, 3x3 shifts, mirror, K = 100 references, N = 2,000 particles (defaults).
One *comparison* = one particle x one reference x one shift, all angles and both mirrors.

Measured in one run (the machines are shared and noisy: compare rows of the same run):
- jisac's JAX engine (band-limited, the default) and, for context, the same engine without the band limit;
- the same search written in plain NumPy (float32, same algorithm: bilinear rings, Fourier-domain ring
  normalisation, band-limited frequency blocks, real-embedded batched matmul, irfft, two-stage max), on a subset;
- the machine's float32 matmul peak (best of NumPy/OpenBLAS and XLA on square matrices);
- JIT compile time, peak RSS.

FLOPs per comparison are counted for the work done: the contraction (2 real flops per multiply-add over the
executed frequency blocks, real-embedded: 4 real MACs per complex MAC, straight + mirror), two 256-point
irffts (2.5 n log2 n each), the max over angles, and the particle side (bilinear resampling and ring FFTs at each
shift) shared by the K references. The table also gives the "useful" count (only kept (ring, frequency) pairs).

Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from jisac import align, devices, filters, polar, sharding, synthetic

devices.use_all_cpu_cores()  # before any JAX computation


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def matmul_peak_gflops(size: int = 2048, repeats: int = 5) -> tuple[float, float]:
    """Best float32 square-matmul rate of NumPy and of XLA, GFLOP/s."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    flops = 2.0 * size**3
    best_np = 0.0
    a @ b
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best_np = max(best_np, flops / (time.perf_counter() - t) / 1e9)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    mm = jax.jit(jnp.matmul)
    mm(ja, jb).block_until_ready()
    best_jax = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        mm(ja, jb).block_until_ready()
        best_jax = max(best_jax, flops / (time.perf_counter() - t) / 1e9)
    return best_np, best_jax


def flops_per_comparison(options: align.AlignOptions, n_references: int) -> tuple[float, float]:
    """(executed, useful) real flops of one comparison (see module docstring)."""
    geom = options.geometry
    nm = 2 if options.mirror else 1
    blocks = align.frequency_blocks(geom, options.freq_block)
    executed_pairs = sum((k1 - k0) * (geom.n_rings - r0) for k0, k1, r0 in blocks)
    useful_pairs = int(geom.freq_mask().sum())
    n = geom.n_angles
    fft = 2.5 * n * np.log2(n)
    per_ref = nm * (fft + n)  # irfft + max over angles, per mirror
    resample = geom.n_rings * n * 4 * 3  # 4 corners, ~3 flops each
    particle_side = (resample + geom.n_rings * fft) / n_references
    contraction = lambda pairs: nm * pairs * 4 * 2  # noqa: E731  real-embedded complex MAC
    return (
        contraction(executed_pairs) + per_ref + particle_side,
        contraction(useful_pairs) + per_ref + particle_side,
    )


# --------------------------------------------------------------------------------------- the NumPy search


class NumpySearch:
    """The same search in plain NumPy, float32."""

    def __init__(self, references: np.ndarray, options: align.AlignOptions):
        self.options = options
        geom = options.geometry
        self.geom = geom
        self.offsets = options.grid.offsets().astype(np.float32)
        self.ring_xy = geom.offsets().astype(np.float32)  # (R, A, 2)
        self.weights = geom.weights().astype(np.float32)
        self.mask = geom.freq_mask()
        self.blocks = align.frequency_blocks(geom, options.freq_block)
        rings = self._rings(references, np.zeros((len(references), 1, 2), np.float32))[:, 0]
        spec = np.fft.rfft(rings, axis=-1) * self.mask * self.weights[:, None]  # (K, R, F) complex64
        sign = ((-1.0) ** np.arange(geom.n_freqs)).astype(np.float32)
        both = np.concatenate([np.conj(spec), spec * sign], 0)  # (2K, R, F): straight then mirrored
        self.k = len(references)
        re, im = both.real.transpose(2, 1, 0), both.imag.transpose(2, 1, 0)  # (F, R, 2K)
        emb = np.concatenate([np.concatenate([re, im], -1), np.concatenate([-im, re], -1)], 1)  # (F, 2R, 4K)
        r = geom.n_rings
        self.bank = [
            np.ascontiguousarray(np.concatenate([emb[k0:k1, r0:r], emb[k0:k1, r + r0 :]], 1))
            for k0, k1, r0 in self.blocks
        ]

    def _rings(self, images: np.ndarray, centres: np.ndarray) -> np.ndarray:
        """(b, ny, nx), (b, s, 2) -> (b, s, R, A) bilinear samples (zero outside)."""
        b, ny, nx = images.shape
        pos_x = centres[:, :, None, None, 0] + self.ring_xy[None, None, :, :, 0] + nx // 2
        pos_y = centres[:, :, None, None, 1] + self.ring_xy[None, None, :, :, 1] + ny // 2
        x0 = np.floor(pos_x)
        y0 = np.floor(pos_y)
        fx = (pos_x - x0).astype(np.float32)
        fy = (pos_y - y0).astype(np.float32)
        x0 = x0.astype(np.int64)
        y0 = y0.astype(np.int64)
        padded = np.zeros((b, ny + 2, nx + 2), np.float32)
        padded[:, :ny, :nx] = images  # out-of-range corners read zeros from the border
        flat = padded.reshape(b, -1)
        w = nx + 2
        x0 = np.clip(x0, -1, nx)
        y0 = np.clip(y0, -1, ny)
        base = (y0 % (ny + 2)) * w + (x0 % (nx + 2))
        get = lambda d: np.take_along_axis(flat, (base + d).reshape(b, -1), 1).reshape(base.shape)  # noqa: E731
        return (get(0) * (1 - fx) + get(1) * fx) * (1 - fy) + (get(w) * (1 - fx) + get(w + 1) * fx) * fy

    def search(self, images: np.ndarray, centres: np.ndarray):
        """Best reference index, angle (deg) and score for each particle."""
        geom, k = self.geom, self.k
        b = images.shape[0]
        cand = centres[:, None, :] + self.offsets[None]
        s = cand.shape[1]
        spec = np.fft.rfft(self._rings(images, cand), axis=-1)  # (b, s, R, F) complex64
        n = geom.n_angles
        mean = (self.weights * spec[..., 0].real).sum(-1)
        power = np.abs(spec) ** 2
        ring_sq = (2 * power.sum(-1) - power[..., 0] - power[..., -1]) / n
        var = (self.weights * ring_sq).sum(-1) - mean**2
        spec[..., 0] -= (mean * n)[..., None]
        spec = spec / np.sqrt(var)[..., None, None] * self.mask
        x = spec.reshape(b * s, geom.n_rings, -1).transpose(2, 0, 1)  # (F, bs, R)
        parts = []
        for (k0, k1, r0), bank in zip(self.blocks, self.bank):
            xb = x[k0:k1, :, r0:]
            parts.append(np.matmul(np.concatenate([xb.real, xb.imag], -1), bank))
        prod = np.concatenate(parts, 0)
        m = prod.shape[-1] // 2
        full = np.zeros((geom.n_freqs, b * s, m), np.complex64)
        full[: prod.shape[0]] = prod[..., :m] + 1j * prod[..., m:]
        corr = np.fft.irfft(full.transpose(1, 2, 0), n=n, axis=-1).reshape(b, s, 2, k, n)
        peak = corr.max(-1)  # (b, s, 2, k)
        flat = peak.transpose(0, 3, 2, 1).reshape(b, k, 2 * s)
        best = flat.argmax(-1)
        score = np.take_along_axis(flat, best[..., None], -1)[..., 0]
        mirror, shift = best // s, best % s
        rows = corr[np.arange(b)[:, None], shift, mirror, np.arange(k)[None, :]]  # (b, k, A)
        j = rows.argmax(-1)
        t = np.arange(-3, 4)
        y7 = np.take_along_axis(rows, (j[..., None] + t) % n, -1)
        bb = y7 @ t.astype(np.float32)
        cc = y7 @ (t**2 - 4).astype(np.float32)
        frac = np.clip(np.where(cc < 0, -1.5 * bb / np.where(cc < 0, cc, -1), 0.0), -1, 1)
        angle = (j + frac) * 360.0 / n
        ref = score.argmax(-1)
        pick = lambda a: np.take_along_axis(a, ref[:, None], -1)[:, 0]  # noqa: E731
        return ref, pick(angle), pick(score)


# ------------------------------------------------------------------------------------------------ main


def make_data(n: int, k: int, box: int, seed: int = 0):
    phantom = synthetic.make_phantom(radius=25.0, seed=seed)
    rot, tilt = synthetic.hemisphere_directions(k)
    mask = filters.circular_mask(box, box, 29)
    refs = filters.normalize_in_mask(synthetic.project(phantom, synthetic.euler_to_matrix(rot, tilt, 0.0), box), mask)
    key = jax.random.key(seed)
    truth = jax.random.randint(key, (n,), 0, k)
    particles = synthetic.add_noise(refs[truth], 0.1, jax.random.fold_in(key, 1))
    return np.asarray(refs), np.asarray(particles), np.asarray(truth)


def time_jax(particles, refs, options, particle_chunk, repeats, mesh=None):
    """(first-call seconds, best steady seconds, result) for aligning all particles.

    The first call on one chunk includes the JIT compilation; minus a steady chunk's time it is the compile time.
    """
    bank = jax.block_until_ready(align.prepare_references(jnp.asarray(refs), options))
    run = lambda x: jax.block_until_ready(  # noqa: E731
        align.align_to_references(x, bank, options, particle_chunk=particle_chunk, mesh=mesh)
    )
    t = time.perf_counter()
    run(particles[:particle_chunk])
    first = time.perf_counter() - t
    t = time.perf_counter()
    run(particles[:particle_chunk])
    compile_s = first - (time.perf_counter() - t)
    best = np.inf
    for _ in range(repeats):
        t = time.perf_counter()
        result = run(particles)
        best = min(best, time.perf_counter() - t)
    return compile_s, best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="particles")
    parser.add_argument("--k", type=int, default=100, help="references")
    parser.add_argument("--numpy-n", type=int, default=256, help="particles for the (slower) NumPy search")
    parser.add_argument("--particle-batch", type=int, default=align.AlignOptions().particle_batch)
    parser.add_argument("--reference-chunk", type=int, default=align.AlignOptions().reference_chunk)
    parser.add_argument("--numpy-batch", type=int, default=4, help="particles per NumPy call (its best measured)")
    parser.add_argument("--particle-chunk", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    box = 76
    options = align.AlignOptions(
        particle_batch=args.particle_batch, reference_chunk=args.reference_chunk
    )
    dense = options._replace(geometry=polar.RingGeometry(bandlimit=False))
    refs, particles, truth = make_data(args.n, args.k, box)
    s = options.grid.n_shifts
    comparisons = args.n * args.k * s

    peak_np, peak_jax = matmul_peak_gflops()
    peak = max(peak_np, peak_jax)

    mesh = sharding.data_mesh()
    n_dev = mesh.size
    compile_s, jax_s, result = time_jax(particles, refs, options, args.particle_chunk, args.repeats, mesh)
    _, one_s, _ = time_jax(particles, refs, options, args.particle_chunk, 1)
    _, dense_s, _ = time_jax(particles, refs, dense, args.particle_chunk, 1, mesh)

    nps = NumpySearch(refs, options)
    nn = min(args.numpy_n, args.n)
    centres = np.zeros((args.numpy_batch, 2), np.float32)
    nps.search(particles[: args.numpy_batch], centres)  # warm-up
    t = time.perf_counter()
    np_refs, np_angles, np_scores = [], [], []
    for start in range(0, nn, args.numpy_batch):
        batch = particles[start : start + args.numpy_batch]
        r, a, sc = nps.search(batch, centres[: len(batch)])
        np_refs.append(r)
        np_angles.append(a)
        np_scores.append(sc)
    numpy_s = time.perf_counter() - t
    np_refs, np_scores = np.concatenate(np_refs), np.concatenate(np_scores)

    # The NumPy and JAX searches must agree (same algorithm, both float32).
    jax_refs = np.asarray(result.reference)
    agree = float((np_refs == jax_refs[:nn]).mean())
    score_rel = float(np.max(np.abs(np_scores - np.asarray(result.score)[:nn]) / np.abs(np_scores)))
    right_view = float((jax_refs == truth).mean())

    executed, useful = flops_per_comparison(options, args.k)
    executed_dense, _ = flops_per_comparison(dense, args.k)
    rate = comparisons / jax_s
    rate_one = comparisons / one_s
    rate_dense = comparisons / dense_s
    rate_np = nn * args.k * s / numpy_s
    gflops = rate * executed / 1e9
    g = lambda r, f=executed: r * f / 1e9  # noqa: E731
    rows = [
        (f"jisac JAX, band-limited, {n_dev} CPU devices", rate, gflops, gflops / peak, jax_s),
        ("jisac JAX, band-limited, 1 device", rate_one, g(rate_one), g(rate_one) / peak, one_s),
        (f"jisac JAX, dense rings, {n_dev} CPU devices", rate_dense, g(rate_dense, executed_dense),
         g(rate_dense, executed_dense) / peak, dense_s),
        (f"plain NumPy, same search ({nn} particles)", rate_np, rate_np * executed / 1e9,
         rate_np * executed / 1e9 / peak, numpy_s),
    ]
    print(f"jisac alignment benchmark: N={args.n} particles, K={args.k} references, {box} px box, "
          f"rings {options.geometry.first_ring}..{options.geometry.last_ring} x {options.geometry.n_angles}, "
          f"{s} shifts, mirror; jax {jax.__version__}, numpy {np.__version__}, {jax.devices()[0].platform}, "
          f"{platform.processor() or platform.machine()}")
    print(f"{'implementation':<44} {'comparisons/s':>14} {'GFLOP/s':>9} {'% peak':>7} {'time s':>8}")
    for name, r, g, f, t in rows:
        print(f"{name:<44} {r:>14.3g} {g:>9.1f} {100 * f:>6.1f}% {t:>8.2f}")
    print(f"float32 matmul peak: NumPy {peak_np:.1f} GFLOP/s, XLA {peak_jax:.1f} GFLOP/s")
    print(f"flops per comparison: executed {executed / 1e3:.1f}k (dense {executed_dense / 1e3:.1f}k), "
          f"useful {useful / 1e3:.1f}k")
    print(f"JIT compile (one particle chunk): {compile_s:.2f} s; peak RSS {peak_rss_mb():.0f} MB")
    print(f"checks: right view found {100 * right_view:.1f} %, NumPy/JAX same reference {100 * agree:.1f} %, "
          f"max score difference {score_rel:.1e} (relative)")
    print(json.dumps({
        "comparisons_per_s": round(rate, 1),
        "comparisons_per_s_one_device": round(rate_one, 1),
        "comparisons_per_s_dense": round(rate_dense, 1),
        "devices": n_dev,
        "numpy_comparisons_per_s": round(rate_np, 1),
        "numpy_ratio": round(rate / rate_np, 3),
        "numpy_ratio_one_device": round(rate_one / rate_np, 3),
        "gflops": round(gflops, 2),
        "peak_gflops": round(peak, 1),
        "peak_fraction": round(gflops / peak, 4),
        "compile_s": round(compile_s, 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "n": args.n,
        "k": args.k,
        "shifts": s,
        "right_view_fraction": right_view,
        "numpy_agreement": agree,
        "device": jax.devices()[0].platform,
    }))


if __name__ == "__main__":
    main()
