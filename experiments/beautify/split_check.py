"""Split-half FRC vs the product of each half's FRC against the truth, over 6 random even/odd splits of class 1
(plain sum CTF F / (sum CTF^2 + 1 % of its mean) halves), shells 16-21. Independent half noise predicts equality.

Usage: python experiments/beautify/split_check.py <folder kept by run.py --keep>
"""

import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from jisac import beautify as B  # noqa: E402
from jisac import filters  # noqa: E402
from kept import BOX, R, load  # noqa: E402

kept = load(sys.argv[1])
t, stack, p, cp = kept.truth, kept.stack, kept.params, kept.ctf
labels = t['labels']
mask = filters.soft_circular_mask(BOX, BOX, R, 5.0)
bp = B.BeautifyParams(radius_px=R, chunk=50, class_batch=8)
def frc(a, b):
    return np.asarray(filters.fourier_ring_correlation(jnp.asarray(a * mask), jnp.asarray(b * mask)))
rng = np.random.default_rng(0)
j = 0
m = np.flatnonzero(labels == j)
mems = [rng.permutation(m) for _ in range(6)]
s, w, _ = B._batch_pass(stack, mems, p, cp, bp)
sh = slice(16, 22)
for i in range(6):
    h = [np.fft.irfft2(s[2*i+q] / (w[2*i+q] + 0.01 * w[2*i+q].mean()), s=(BOX, BOX)) for q in range(2)]
    f01 = frc(*h)[sh]; r0 = frc(h[0], t['members'][j])[sh]; r1 = frc(h[1], t['members'][j])[sh]
    print(i, 'h-h', np.round(f01, 2), ' r0*r1', np.round(r0 * r1, 2))
