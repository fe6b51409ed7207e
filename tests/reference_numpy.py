"""Float64 NumPy reference implementations: slow, direct, obviously right.

They restate the definitions (``jisac/transforms.py``, ``jisac/polar.py``, ``jisac/align.py`` docstrings) without
any of the tricks the JAX code uses (no FFT correlation, no frequency blocks, no Fourier-domain normalisation,
no chunking):

- a transform is its 3x3 matrix; applying it samples ``in(T^-1 u)`` bilinearly;
- the score of a candidate transform ``P`` is the ring-weighted inner product of the reference's rings with the
  rings of the particle *aligned by P*, each ring normalised (when asked) and band-limited by zeroing its
  spectrum above ``ceil(pi r) + 1``; the search tries every grid centre, every one of the ``n_angles`` angles and
  both mirrors, then refines the best angle with the 7-point parabola.
"""

from __future__ import annotations

import numpy as np


def rotation(angle_deg):
    a = np.deg2rad(angle_deg)
    return np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])


def matrix(angle, sx, sy, mirror) -> np.ndarray:
    """3x3 homogeneous matrix of ``T(v) = M (R v + s)``."""
    m = np.diag([-1.0, 1.0]) if mirror else np.eye(2)
    out = np.eye(3)
    out[:2, :2] = m @ rotation(angle)
    out[:2, 2] = m @ np.array([sx, sy], np.float64)
    return out


def bilinear(image: np.ndarray, col: np.ndarray, row: np.ndarray) -> np.ndarray:
    """Bilinear interpolation at float (col, row), zero outside."""
    ny, nx = image.shape
    padded = np.zeros((ny + 4, nx + 4))
    padded[2:-2, 2:-2] = image
    c = np.clip(col + 2, 0, nx + 2.999)
    r = np.clip(row + 2, 0, ny + 2.999)
    c0 = np.floor(c).astype(int)
    r0 = np.floor(r).astype(int)
    fc, fr = c - c0, r - r0
    return (
        padded[r0, c0] * (1 - fr) * (1 - fc)
        + padded[r0, c0 + 1] * (1 - fr) * fc
        + padded[r0 + 1, c0] * fr * (1 - fc)
        + padded[r0 + 1, c0 + 1] * fr * fc
    )


def apply_transform(image: np.ndarray, angle, sx, sy, mirror) -> np.ndarray:
    """``out(T v) = in(v)``: sample ``in`` at ``T^-1 u`` for every output pixel ``u`` (no background fill)."""
    ny, nx = image.shape
    y, x = np.mgrid[:ny, :nx].astype(np.float64)
    u = np.stack([x.ravel() - nx // 2, y.ravel() - ny // 2, np.ones(x.size)])
    src = np.linalg.inv(matrix(angle, sx, sy, mirror)) @ u
    return bilinear(image, src[0] + nx // 2, src[1] + ny // 2).reshape(ny, nx)


def ring_points(radii, n_angles):
    t = 2 * np.pi * np.arange(n_angles) / n_angles
    r = np.asarray(radii, np.float64)[:, None]
    return r * np.cos(t), r * np.sin(t)  # (R, A) each


def bandlimit(rings: np.ndarray, radii) -> np.ndarray:
    """Zeroes each ring's angular frequencies above ``ceil(pi r) + 1`` (rings on the last two axes)."""
    spec = np.fft.rfft(rings, axis=-1)
    k = np.arange(spec.shape[-1])
    keep = k[None, :] <= (np.ceil(np.pi * np.asarray(radii)) + 1)[:, None]
    return np.fft.irfft(spec * keep, n=rings.shape[-1], axis=-1)


def ring_weights(radii, n_angles):
    r = np.asarray(radii, np.float64)
    return r / (n_angles * r.sum())


def normalize(rings: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted zero mean / unit std over the last two axes (ring, angle)."""
    ww = w[:, None]
    mean = (rings * ww).sum((-2, -1), keepdims=True)
    var = (((rings - mean) ** 2) * ww).sum((-2, -1), keepdims=True)
    return (rings - mean) / np.sqrt(var)


def aligned_rings(image, centre, angles_deg, mirror, radii, n_angles):
    """Rings (around the box centre) of ``image`` aligned by ``P = from_centre_and_angle(centre, a, mirror)``.

    ``T_P(v) = M R(a) (v - c)``, so ``T_P^-1(u) = c + R(a)^T M u``. Returns ``(len(angles), R, A)``.
    """
    ny, nx = image.shape
    px, py = ring_points(radii, n_angles)
    m = -1.0 if mirror else 1.0
    out = []
    for a in np.atleast_1d(angles_deg):
        rt = rotation(a).T
        ux, uy = m * px, py
        sx = centre[0] + rt[0, 0] * ux + rt[0, 1] * uy
        sy = centre[1] + rt[1, 0] * ux + rt[1, 1] * uy
        out.append(bilinear(image, sx + nx // 2, sy + ny // 2))
    return np.stack(out)


def parabola_offset(y7: np.ndarray) -> float:
    t = np.arange(-3, 4)
    b = (t * y7).sum() / 28.0
    c = ((t**2 - 4) * y7).sum() / 84.0
    if c >= 0:
        return 0.0
    return float(np.clip(-b / (2 * c), -1.0, 1.0))


def search(
    particle: np.ndarray,
    references: np.ndarray,
    grid_offsets: np.ndarray,
    radii,
    n_angles: int = 256,
    centre=(0.0, 0.0),
    normalize_particle: bool = True,
    mirror: bool = True,
):
    """Best (score, angle, centre_x, centre_y, mirror) of one particle against each reference.

    Returns a list of dicts, one per reference.
    """
    w = ring_weights(radii, n_angles)
    ref_rings = np.stack(
        [bandlimit(aligned_rings(r, (0.0, 0.0), [0.0], False, radii, n_angles)[0], radii) for r in references]
    )  # (K, R, A)
    angles = 360.0 * np.arange(n_angles) / n_angles
    best = [None] * len(references)
    for off in grid_offsets:
        c = (centre[0] + off[0], centre[1] + off[1])
        for m in [False, True] if mirror else [False]:
            rings = aligned_rings(particle, c, angles, m, radii, n_angles)  # (A, R, A)
            if normalize_particle:
                rings = normalize(rings, w)
            rings = bandlimit(rings, radii)
            scores = np.einsum("kra,jra,r->kj", ref_rings, rings, w)  # (K, n_angles)
            for k in range(len(references)):
                j = int(np.argmax(scores[k]))
                s = scores[k, j]
                cur = best[k]
                if cur is None or s > cur["score"]:
                    y7 = scores[k, (j + np.arange(-3, 4)) % n_angles]
                    angle = (j + parabola_offset(y7)) * 360.0 / n_angles % 360.0
                    best[k] = dict(score=s, angle=angle, centre_x=c[0], centre_y=c[1], mirror=m)
    return best


def params_from_centre(centre_x, centre_y, angle, mirror):
    """``compose((0, -c, 0), (angle, 0, mirror))`` -> (angle, sx, sy, mirror)."""
    s = rotation(angle) @ np.array([-centre_x, -centre_y])
    return angle % 360.0, s[0], s[1], mirror
