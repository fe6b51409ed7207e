"""FRC curves behind experiments/beautify/results.md: the truth FRC and split-half FRC of the Wiener, plain
(sum CTF F / (sum CTF^2 + 1 % of its mean)) and phase-flip averages, per class, shells 10-29.

Usage: python experiments/beautify/frc_curves.py <folder kept by run.py --keep>
"""

import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from jisac import beautify as B  # noqa: E402
from jisac import ctf, filters  # noqa: E402
from jisac.io import open_stack  # noqa: E402

APIX, BOX, RADIUS = 2.25, 160, 60


def main():
    tmp = Path(sys.argv[1])
    t = np.load(tmp / "truth.npz")
    stack = open_stack(tmp / "input.star")
    table = B.read_run_particles(tmp / "run")
    p = B.parameters_from_table(table, APIX)
    cp = ctf.CTFParams(*(np.asarray(f) for f in ctf.CTFParams.from_relion_table(table, APIX)))
    labels = t["labels"]
    members = [np.flatnonzero(labels == j) for j in range(labels.max() + 1)]
    mask = filters.soft_circular_mask(BOX, BOX, RADIUS, 5.0)

    def truth_frc(img, truth):
        frc = np.asarray(filters.fourier_ring_correlation(jnp.asarray(img * mask), jnp.asarray(truth * mask)))
        return APIX / float(filters.frc_resolution(jnp.asarray(frc), 0.5, BOX)), frc

    sums = {}
    for mode in ("wiener", "flip"):
        bp = B.BeautifyParams(radius_px=RADIUS, chunk=50, class_batch=len(members), ctf=mode)
        sums[mode] = B._batch_pass(stack, members, p, cp, bp)[:2] + (bp,)
    shells = slice(10, 30)
    for j in range(len(members)):
        s, w, bp = sums["wiener"]
        sj, wj = s[2 * j:2 * j + 2], w[2 * j:2 * j + 2]
        wiener = B.class_from_sums(sj, wj, bp, APIX)
        total = wj[0] + wj[1]
        plain = np.fft.irfft2((sj[0] + sj[1]) / (total + 1e-2 * total.mean()), s=(BOX, BOX))
        sf, wf, bpf = sums["flip"]
        flip = B.class_from_sums(sf[2 * j:2 * j + 2], wf[2 * j:2 * j + 2], bpf, APIX)
        a, b, c = (truth_frc(img, t["members"][j]) for img in (wiener.average, plain, flip.average))
        print(f"class {j + 1}: truth FRC 0.5 at wiener {a[0]:.2f} A, plain {b[0]:.2f} A, flip {c[0]:.2f} A; "
              f"split-half 0.143 at wiener {wiener.resolution_angst:.2f} A, flip {flip.resolution_angst:.2f} A")
        print("  truth FRC wiener ", np.round(a[1][shells], 2))
        print("  truth FRC flip   ", np.round(c[1][shells], 2))
        print("  half FRC wiener  ", np.round(wiener.frc[shells], 2))
        print("  half FRC flip    ", np.round(flip.frc[shells], 2))


if __name__ == "__main__":
    main()
