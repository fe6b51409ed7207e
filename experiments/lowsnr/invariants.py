"""Can rotation-invariant features group low-SNR particles by view before any alignment? (issue 16)

ISAC's first MRA starts from random particles as references; at SNR 0.05 its classes never form views
(docs/lowsnr.md). A start that groups particles by view *without* aligning them would give the MRA a head start.
Rotation- (and mirror-) invariant features are the classic way (e.g. the angular power spectra of rings, or the
rotational invariants of the 2D power spectrum, which are also shift-invariant). This measures how well an
equal-size k-means on such features (after PCA) separates views, against an ideal equal-size partition of the
same particles and a random one, on the low-SNR harness's particles (simulated from the ribosome map, phase
flipped with their CTF; ``run.py``'s stack for the same --n/--snr/--seed). No ISAC run: 20 s per SNR.

Features (each standardised per component, then PCA to --dims):
  rings        |angular spectrum| of rings 1..23 about the box centre, frequencies 0..15, images low-passed (0.15)
  rings_true   the same about each particle's true centre (the upper bound of a perfect centring)
  power        |angular spectrum| (even frequencies 2..16) of the 2D power spectrum's rings 1..16, each over its
               DC term (a per-radius ratio: the isotropic CTF envelope cancels); shift-invariant

    python experiments/lowsnr/invariants.py --snr 0.05 0.2 1.0

Prints a table (spread: member-weighted mean angle of a class's views to its axial mean view, as in run.py), then
one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import metrics as M  # noqa: E402
from jisac import assignment, ctf, filters, polar, synthetic  # noqa: E402
from jisac import transforms as T  # noqa: E402

MAP = Path("/work/shared/maps/clean70SRibosome_vol_65p.mrc")
MAP_APIX = 4.5


def ring_features(images: np.ndarray, centres: np.ndarray, radius: int, kmax: int = 16,
                  lowpass: float = 0.15) -> np.ndarray:
    """``(n, radius * kmax)`` magnitudes of the rings' angular spectra about ``centres`` ``(n, 2)``."""
    x = filters.tanh_lowpass(jnp.asarray(images), lowpass, 0.1)
    geometry = polar.RingGeometry(first_ring=1, last_ring=radius, n_angles=128)
    spec = polar.polar_spectra(x, jnp.asarray(centres, jnp.float32)[:, None, :], geometry)[:, 0]
    return np.abs(np.asarray(spec[:, :, :kmax])).reshape(len(images), -1)


def power_features(images: np.ndarray, rmax: int = 16, kmax: int = 17) -> np.ndarray:
    """``(n, rmax * 8)``: the 2D power spectrum's rings, their even angular frequencies over their DC term."""
    power = np.abs(np.fft.fftshift(np.fft.fft2(images), axes=(1, 2))) ** 2
    geometry = polar.RingGeometry(first_ring=1, last_ring=rmax, n_angles=128)
    spec = np.asarray(polar.polar_spectra(jnp.asarray(power, jnp.float32), jnp.zeros((len(images), 1, 2)),
                                          geometry))[:, 0]
    return (np.abs(spec[:, :, 2:kmax:2]) / (np.abs(spec[:, :, :1]) + 1e-12)).reshape(len(images), -1)


def pca(features: np.ndarray, dims: int) -> np.ndarray:
    f = (features - features.mean(0)) / (features.std(0) + 1e-12)
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    return u[:, :dims] * s[:dims]


def equal_size_kmeans(x: np.ndarray, k: int, restarts: int = 5, iters: int = 30, seed: int = 0) -> np.ndarray:
    """Labels ``1..k``: Lloyd iterations with ISAC's equal-size assignment (``assignment.assign_equal_size``) on
    minus the squared distances, from random particles; the best of ``restarts`` by total distance."""
    rng = np.random.default_rng(seed)
    best = (np.inf, None)
    for _ in range(restarts):
        centres = x[rng.choice(len(x), k, replace=False)]
        labels = None
        for _ in range(iters):
            dist = ((x[:, None, :] - centres[None]) ** 2).sum(-1)
            new = np.asarray(assignment.assign_equal_size(jnp.asarray(-dist, jnp.float32)))
            if labels is not None and np.array_equal(new, labels):
                break
            labels = new
            centres = np.stack([x[labels == j].mean(0) for j in range(k)])
        cost = float(dist[np.arange(len(x)), labels].sum())
        if cost < best[0]:
            best = (cost, labels + 1)
    return best[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--snr", type=float, nargs="+", default=[0.05, 0.2, 1.0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--img-per-grp", type=int, default=100)
    ap.add_argument("--dims", type=int, nargs="+", default=[10, 30])
    args = ap.parse_args()
    if not MAP.is_file():
        print(json.dumps({"skipped": f"{MAP} absent"}))
        return
    vol, _ = synthetic.read_map(MAP)
    mft = synthetic.fourier_volume(vol, MAP_APIX)
    k = args.n // args.img_per_grp
    rows = []
    for snr in args.snr:
        sim = synthetic.simulate_from_map(mft, args.n, jax.random.key(args.seed), snr)
        dirs = M.view_directions(sim.rot, sim.tilt)
        images = np.asarray(sim.images) - np.asarray(sim.images).mean((1, 2), keepdims=True)
        flipped = np.asarray(ctf.phase_flip(images, sim.ctf))
        true_centres = np.stack([sim.shift_x, sim.shift_y], -1)
        ideal = M.ideal_partition(dirs, k)
        random = np.random.default_rng(1).permutation(np.arange(args.n) % k) + 1
        rows.append({"snr": snr, "features": "ideal partition", "dims": None, "spread": M.mean_spread(dirs, ideal),
                     "pure15": M.purity(dirs, ideal)})
        rows.append({"snr": snr, "features": "random partition", "dims": None,
                     "spread": M.mean_spread(dirs, random), "pure15": M.purity(dirs, random)})
        features = {"rings": ring_features(flipped, np.zeros((args.n, 2)), 23),
                    "rings_true": ring_features(flipped, true_centres, 23),
                    "power": power_features(flipped)}
        for name, f in features.items():
            for dims in args.dims:
                labels = equal_size_kmeans(pca(f, dims), k)
                rows.append({"snr": snr, "features": name, "dims": dims, "spread": M.mean_spread(dirs, labels),
                             "pure15": M.purity(dirs, labels)})
                print(f"snr {snr:g} {name} pca {dims}: spread {rows[-1]['spread']:.1f}", flush=True)
    print(f"\n{args.n} particles, {k} classes of {args.img_per_grp}")
    print("| SNR | features | PCA dims | spread (deg) | pure15 |\n| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['snr']:g} | {r['features']} | {r['dims'] or '-'} | {r['spread']:.1f} | {r['pure15']:.3f} |")
    print(json.dumps([{**r, "spread": round(r["spread"], 2), "pure15": round(r["pure15"], 4)} for r in rows]))


if __name__ == "__main__":
    main()
