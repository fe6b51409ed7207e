"""Truth-FRC 0.5 resolution of the Wiener and the plain (sum CTF F / (sum CTF^2 + 1 % of its mean)) averages with
the average masked (as run.py measures), unmasked, and with only the truth masked: the FRC is blind to a gain that
is uniform over each shell, so the two differ only where a mask mixes shells.

Usage: python experiments/beautify/mask_check.py <folder kept by run.py --keep>
"""

import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from jisac import beautify as B  # noqa: E402
from jisac import filters  # noqa: E402
from kept import APIX, BOX, R, load  # noqa: E402

kept = load(sys.argv[1])
t, stack, p, cp = kept.truth, kept.stack, kept.params, kept.ctf
labels = t['labels']; members = [np.flatnonzero(labels == j) for j in range(labels.max() + 1)]
mask = filters.soft_circular_mask(BOX, BOX, R, 5.0)
bp = B.BeautifyParams(radius_px=R, chunk=50, class_batch=4)
s, w, _ = B._batch_pass(stack, members, p, cp, bp)
def res(a, b, m):
    f = np.asarray(filters.fourier_ring_correlation(jnp.asarray(a * m), jnp.asarray(b * m)))
    return APIX / float(filters.frc_resolution(jnp.asarray(f), 0.5, BOX))
for j in range(4):
    sj, wj = s[2*j:2*j+2], w[2*j:2*j+2]; tr = t['members'][j]
    r = B.class_from_sums(sj, wj, bp, APIX)
    wien = B.wiener_average(sj[0] + sj[1], wj[0] + wj[1], r.ssnr, (BOX, BOX))  # unmasked
    tot = wj[0] + wj[1]
    plain = np.fft.irfft2((sj[0] + sj[1]) / (tot + 0.01 * tot.mean()), s=(BOX, BOX))
    one = np.ones((BOX, BOX), np.float32)
    print(f"class {j + 1}: masked: wiener {res(wien, tr, mask):.2f} plain {res(plain, tr, mask):.2f} A | "
          f"unmasked: wiener {res(wien, tr, one):.2f} plain {res(plain, tr, one):.2f} A | "
          f"truth masked only: wiener {res(wien, tr * mask, one):.2f} plain {res(plain, tr * mask, one):.2f} A")
