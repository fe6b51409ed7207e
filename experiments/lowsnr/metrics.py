"""Metrics of a 2D classification against the truth of a simulated stack (experiments/lowsnr).

Views are unit viewing directions (RELION: the third row of the rotation, ``view_directions``). A 2D class may
hold a view and the view from the opposite side, whose projection is its mirror image, so every angle between
views here is axial: ``arccos |u . v|`` (0 to 90 deg), and a class's view is the axial mean of its members' views
(the leading eigenvector of ``sum u u^T``, which does not care about the sign of each ``u``).

- ``class_spreads``: mean angle of a class's members to the class's view.
- ``ideal_partition``: the same views split into classes of equal size minimising that spread (equal-size
  axial k-means), the yardstick a classification's spread is compared with.
- ``purity``: share of accounted particles within 15 deg of their class's view (junk counts as outside).
- ``inplane_errors``: the in-plane angle each member was given, against the truth, after one rigid transform
  per class (the class average's frame is arbitrary).
- ``highpass_corr`` / ``best_shift_corr``: correlation of an average with the clean projection of its class's
  view after removing low frequencies, so a blurry blob cannot score well.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jisac import assignment, filters, synthetic
from jisac import transforms as T


def view_directions(rot, tilt) -> np.ndarray:
    """``(n, 3)`` unit viewing directions (RELION: row 3 of ``euler_to_matrix(rot, tilt, psi)``), NaN where the
    angles are NaN (junk)."""
    r, t = np.deg2rad(np.asarray(rot, np.float64)), np.deg2rad(np.asarray(tilt, np.float64))
    return np.stack([np.sin(t) * np.cos(r), np.sin(t) * np.sin(r), np.cos(t)], -1)


def axial_angle(u, v) -> np.ndarray:
    """Angle in degrees between views, a view and its opposite being the same (0..90)."""
    c = np.abs(np.sum(np.asarray(u) * np.asarray(v), -1))
    return np.degrees(np.arccos(np.clip(c, 0.0, 1.0)))


def axial_mean(dirs: np.ndarray) -> np.ndarray:
    """The axial mean ``(3,)`` of ``(m, 3)`` unit views (NaN rows ignored; NaN if none)."""
    d = dirs[np.all(np.isfinite(dirs), 1)]
    if not len(d):
        return np.full(3, np.nan)
    w, v = np.linalg.eigh(d.T @ d)
    return v[:, -1]


def class_spreads(dirs: np.ndarray, labels: np.ndarray) -> dict[int, float]:
    """``{class: mean axial angle (deg) of its members (true particles only) to their axial mean}`` for every
    label > 0 with at least one true particle."""
    out = {}
    for c in np.unique(labels[labels > 0]):
        d = dirs[(labels == c) & np.all(np.isfinite(dirs), 1)]
        if len(d):
            out[int(c)] = float(axial_angle(d, axial_mean(d)).mean())
    return out


def mean_spread(dirs: np.ndarray, labels: np.ndarray) -> float:
    """Member-weighted mean of ``class_spreads`` (NaN if no class)."""
    s = class_spreads(dirs, labels)
    if not s:
        return float("nan")
    sizes = {c: int(((labels == c) & np.all(np.isfinite(dirs), 1)).sum()) for c in s}
    return float(sum(s[c] * sizes[c] for c in s) / sum(sizes.values()))


def ideal_partition(dirs: np.ndarray, k: int, iters: int = 30, restarts: int = 3, seed: int = 0) -> np.ndarray:
    """Labels ``(m,)`` in ``1..k`` splitting ``m`` views into ``k`` classes of equal size (``m // k``, the last
    class taking the rest) with small axial spread: Lloyd iterations of equal-size k-means on ``|u . c|`` (the
    greedy equal-size assignment ISAC itself uses, ``assignment.assign_equal_size``), from farthest-point seeds;
    the best of ``restarts`` by mean spread."""
    dirs = np.asarray(dirs, np.float64)
    m = len(dirs)
    if k < 1 or m < k:
        raise ValueError(f"ideal_partition: need 1 <= k <= m views (k={k}, m={m})")
    rng = np.random.default_rng(seed)
    best, best_spread = None, np.inf
    for _ in range(restarts):
        centres = [dirs[rng.integers(m)]]
        for _ in range(1, k):  # farthest point from the centres so far (axially)
            dist = np.min(np.stack([axial_angle(dirs, c) for c in centres]), 0)
            centres.append(dirs[int(np.argmax(dist))])
        centres = np.stack(centres)
        labels = None
        for _ in range(iters):
            scores = np.abs(dirs @ centres.T).astype(np.float32)
            new = np.asarray(assignment.assign_equal_size(scores))
            if labels is not None and np.array_equal(new, labels):
                break
            labels = new
            centres = np.stack([axial_mean(dirs[labels == j]) if np.any(labels == j) else centres[j]
                                for j in range(k)])
        s = mean_spread(dirs, labels + 1)
        if s < best_spread:
            best, best_spread = labels + 1, s
    return best


def purity(dirs: np.ndarray, labels: np.ndarray, max_deg: float = 15.0) -> float:
    """Share of accounted particles (label > 0) within ``max_deg`` of their class's axial mean view; junk
    (NaN view) counts as outside. NaN when nothing is accounted."""
    acc = labels > 0
    if not acc.any():
        return float("nan")
    good = 0
    for c in np.unique(labels[acc]):
        d = dirs[labels == c]
        centre = axial_mean(d)
        ok = np.all(np.isfinite(d), 1)
        good += int((axial_angle(d[ok], centre) <= max_deg).sum())
    return good / int(acc.sum())


def class_frame(dirs: np.ndarray) -> np.ndarray:
    """``(3, 3)`` RELION rotation (psi = 0) whose view is the axial mean of ``dirs``."""
    d = axial_mean(dirs)
    d = d if d[2] >= 0 else -d
    tilt = np.degrees(np.arccos(np.clip(d[2], -1, 1)))
    rot = np.degrees(np.arctan2(d[1], d[0]))
    return synthetic.euler_to_matrix(rot, tilt, 0.0)


def truth_transforms(rot, tilt, psi, frame: np.ndarray) -> T.Transform2D:
    """The 2D transforms ``Q`` (angle, mirror; no shift) with ``particle ~ apply_transform(ref, Q)``, ``ref`` the
    projection along ``frame`` (``class_frame``), for members whose views are near ``frame``'s or its opposite.

    A view R near frame F (``R ~ Rz(phi) F``) is ``ref`` rotated in plane by phi (``transforms``' convention: the
    projection at psi is the one at psi = 0 with ``apply_transform(., angle=psi)``). A view from the opposite side
    is ``diag(1, -1, -1) R'`` with R' near F: its projection is the y-mirror of R''s, the transform
    ``(180 deg, mirror)``, applied after the rotation."""
    mats = synthetic.euler_to_matrix(rot, tilt, psi)
    flip = (mats[:, 2] @ frame[2]) < 0
    mats = np.where(flip[:, None, None], np.diag([1.0, -1.0, -1.0]) @ mats, mats)
    rel = mats @ frame.T  # ~ Rz(phi): [[cos, sin], [-sin, cos]] in the top-left block
    phi = np.degrees(np.arctan2(rel[:, 0, 1] - rel[:, 1, 0], rel[:, 0, 0] + rel[:, 1, 1]))
    zero = np.zeros(len(phi))
    rotate = T.make_transform(phi, zero, zero, np.zeros(len(phi), bool))
    ymirror = T.make_transform(np.where(flip, 180.0, 0.0), zero, zero, flip)
    return T.compose(rotate, ymirror)


def _wrap(a):
    return (np.asarray(a) + 180.0) % 360.0 - 180.0


class InplaneResult(dict):
    """``{"error": (n,) deg (NaN outside), "mirror_ok": (n,) bool, "frames": {class: frame (3, 3)},
    "consensus": {class: (angle deg, mirror)}}``."""


def inplane_errors(rot, tilt, psi, labels: np.ndarray, angle, mirror) -> InplaneResult:
    """In-plane angle errors of the accounted true particles, up to one rigid transform per class.

    ``angle``, ``mirror``: the alignment each particle was given (jisac's convention: ``apply_transform(particle,
    P) ~ class average``). With the truth ``Q`` (``truth_transforms``), ``compose(Q, P)`` maps the class's
    reference projection onto the average: the same transform G for every member when the alignment is right.
    G's mirror is the members' majority; its angle the circular mean over those; a member's error is the wrapped
    difference of its angle from G's (members whose mirror disagrees: ``mirror_ok`` False, error NaN)."""
    n = len(labels)
    err = np.full(n, np.nan)
    mirror_ok = np.zeros(n, bool)
    frames, consensus = {}, {}
    dirs = view_directions(rot, tilt)
    finite = np.all(np.isfinite(dirs), 1)
    for c in np.unique(labels[labels > 0]):
        idx = np.flatnonzero((labels == c) & finite)
        if not len(idx):
            continue
        frame = class_frame(dirs[idx])
        q = truth_transforms(np.asarray(rot)[idx], np.asarray(tilt)[idx], np.asarray(psi)[idx], frame)
        p = T.make_transform(np.asarray(angle)[idx], np.zeros(len(idx)), np.zeros(len(idx)),
                             np.asarray(mirror, bool)[idx])
        e = T.compose(q, p)
        e_angle, e_mirror = np.asarray(e.angle, np.float64), np.asarray(e.mirror, bool)
        majority = bool(e_mirror.mean() > 0.5)
        same = e_mirror == majority
        a = np.deg2rad(e_angle[same])
        centre = np.degrees(np.arctan2(np.sin(a).mean(), np.cos(a).mean()))
        err[idx[same]] = np.abs(_wrap(e_angle[same] - centre))
        mirror_ok[idx] = same
        frames[int(c)] = frame
        consensus[int(c)] = (float(centre), majority)
    return InplaneResult(error=err, mirror_ok=mirror_ok, frames=frames, consensus=consensus)


def highpass_corr(a: np.ndarray, b: np.ndarray, cutoff: float, mask: np.ndarray) -> float:
    """Correlation of two images after a (soft) ``mask`` and removing frequencies below ``cutoff`` cycles/px."""
    n = a.shape[-1]
    keep = filters.radial_frequency(n, n) >= cutoff
    fa = np.fft.rfft2(a * mask) * keep
    fb = np.fft.rfft2(b * mask) * keep
    den = np.sqrt(np.sum(np.abs(fa) ** 2) * np.sum(np.abs(fb) ** 2))
    return float(np.sum(np.real(fa * np.conj(fb))) / den) if den > 0 else float("nan")


def best_shift_corr(average: np.ndarray, template: np.ndarray, cutoff: float, mask: np.ndarray,
                    max_shift: int = 4) -> float:
    """``highpass_corr`` of ``average`` with ``template`` moved by the best integer shift within ``+-max_shift``
    px (the average's centre is ISAC's choice)."""
    best = -np.inf
    for dy in range(-max_shift, max_shift + 1):
        for dx in range(-max_shift, max_shift + 1):
            best = max(best, highpass_corr(average, np.roll(template, (dy, dx), (0, 1)), cutoff, mask))
    return float(best)


def best_match_corr(averages: np.ndarray, projections: np.ndarray, cutoff: float, mask: np.ndarray,
                    angle_step: float = 6.0, max_shift: int = 3) -> np.ndarray:
    """For each average ``(m, n, n)``, the best high-passed correlation with any of ``projections`` ``(k, n, n)``
    (clean views from one hemisphere: the mirror search covers the other) over in-plane angles in
    ``angle_step`` steps, mirror and integer shifts within ``+-max_shift`` px: ``(m,)``.

    Needs no membership, so it also scores the averages of classes that failed stability: an average that looks
    like a ribosome view scores near the accepted ones, one that is noise near the score of a pure-noise image
    (the search's own bias; run it on noise to get that floor)."""
    n = averages.shape[-1]
    keep = jnp.asarray(np.fft.fftfreq(n)[:, None] ** 2 + np.fft.fftfreq(n)[None, :] ** 2 >= cutoff**2, jnp.float32)

    def filt(x):
        f = jnp.fft.ifft2(jnp.fft.fft2(x * mask) * keep).real
        return f / jnp.sqrt(jnp.sum(f * f, axis=(-2, -1), keepdims=True))

    fa = jnp.fft.fft2(filt(jnp.asarray(averages, jnp.float32)))  # (m, n, n)
    shifts = np.r_[0:max_shift + 1, n - max_shift:n]
    angles = np.arange(0.0, 360.0, angle_step)
    turns = T.make_transform(np.tile(angles, 2), 0.0, 0.0, np.repeat([False, True], len(angles)))

    @jax.jit
    def one_view(proj):
        t = T.apply_transform(jnp.broadcast_to(proj, (len(turns.angle), n, n)), turns)
        ft = jnp.fft.fft2(filt(t))  # (r, n, n)
        cc = jnp.fft.ifft2(fa[:, None] * jnp.conj(ft)[None]).real  # (m, r, n, n): sum_x a(x) t(x - s)
        return cc[:, :, shifts][:, :, :, shifts].max(axis=(1, 2, 3))

    best = np.full(len(averages), -np.inf)
    for proj in np.asarray(projections, np.float32):
        best = np.maximum(best, np.asarray(one_view(jnp.asarray(proj))))
    return best


def phase_randomised(images: np.ndarray, seed: int = 0) -> np.ndarray:
    """Copies of ``images`` ``(m, n, n)`` with the same amplitude spectrum and random phases (the phases of white
    noise, so the result stays real): the null model of an average that holds no view."""
    rng = np.random.default_rng(seed)
    f = np.fft.fft2(images)
    noise_phase = np.exp(1j * np.angle(np.fft.fft2(rng.standard_normal(images.shape))))
    return np.fft.ifft2(np.abs(f) * noise_phase).real.astype(np.float32)
