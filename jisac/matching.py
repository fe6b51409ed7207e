"""Algorithm layer: The matching phase (ISAC 2012's idea, not ISAC2's): particles left unaccounted after a
generation are aligned against the accepted classes and join one when their match is reproducible.

Reproducible means two independent halves of the class agree. Each accepted class's stable members are split in
two halves (alternate members); each half gives its own average (members at their stable parameters, low-passed at
``fh`` as ISAC's references). A candidate is scored against all ``2 k`` half averages with ISAC's MRA search
(ring-normalised, all rotations, the translational grid, mirror). It joins class ``c`` when

- ``c`` is its best class against the first halves AND against the second halves (independent evidence: noise
  agrees by chance with probability ~``1 / k``), and
- against both halves its score reaches the ``quantile`` of the class's own members' scores against the half they
  did NOT build (so the members' scores are not inflated by their own noise in the average): the candidate matches
  the class at least as well as that share of its stable members do.

Matched particles take their parameters from the same search against the full class average. They carry no
pixel error (they were not tested for stability): the outputs keep them apart by a NaN error.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np

from jisac import align, average, filters
from jisac.rows import take_rows
from jisac.transforms import Transform2D


class Matches(NamedTuple):
    """Matched candidates: ``particles`` (indices into the images given), their ``classes`` (into the averages),
    ``params`` (``(m, 4)`` float32 rows angle, shift_x, shift_y, mirror onto the class average), ``scores``
    ``(m, 2)`` against the two halves, and the classes' ``thresholds`` ``(k, 2)``."""

    particles: np.ndarray
    classes: np.ndarray
    params: np.ndarray
    scores: np.ndarray
    thresholds: np.ndarray


def _rows_params(rows: np.ndarray) -> Transform2D:
    """``(n, 4)`` parameter rows -> ``Transform2D`` (mirror as bool)."""
    rows = np.asarray(rows, np.float32)
    return Transform2D(rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3] > 0.5)


def half_labels(members: tuple[np.ndarray, ...]) -> tuple[np.ndarray, np.ndarray]:
    """All members (concatenated) and their half-class labels ``2 c + h`` (alternate members in index order)."""
    idx, lab = [], []
    for c, m in enumerate(members):
        m = np.sort(np.asarray(m, np.int64))
        idx.append(m)
        lab.append(2 * c + (np.arange(len(m)) % 2))
    return np.concatenate(idx), np.concatenate(lab).astype(np.int32)


def match_particles(
    images,
    candidates: np.ndarray,
    members: tuple[np.ndarray, ...],
    params: np.ndarray,
    averages: np.ndarray,
    options: align.AlignOptions,
    fh: float,
    ff: float,
    quantile: float,
    mesh: jax.sharding.Mesh | None = None,
) -> Matches:
    """The candidates that match an accepted class reproducibly (module docstring).

    Args:
        images: ``(n, nx, nx)`` working stack (NumPy, memory map or lazy rows).
        candidates: indices of the unaccounted particles to try.
        members: per accepted class, the indices of its stable members.
        params: ``(n, 4)`` parameter rows of the working stack (members' stable parameters).
        averages: ``(k, nx, nx)`` the accepted classes' averages (ISAC's, low-passed at ``fh``).
        options: ISAC's MRA options (ring-normalised particles, its grid and chunk sizes).
        fh, ff: the low-pass of the half averages (ISAC's ``fh``, ``ff``).
        quantile: share of the members a candidate must match at least as well as (0..1).
        mesh: optional device mesh.
    """
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"isac.match_quantile must be in [0, 1] (got {quantile})")
    candidates = np.asarray(candidates, np.int64)
    k = len(members)
    empty = Matches(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 4), np.float32),
                    np.zeros((0, 2), np.float32), np.full((k, 2), np.inf, np.float32))
    if k == 0 or len(candidates) == 0 or min(len(m) for m in members) < 2:
        return empty
    nx = images.shape[-1]
    mask = filters.circular_mask(nx, nx, options.geometry.last_ring)
    idx, lab = half_labels(members)
    member_images = take_rows(images, idx)
    halves = average.class_averages(member_images, _rows_params(params[idx]), lab, 2 * k, mesh=mesh)
    halves = filters.subtract_masked_mean(filters.tanh_lowpass(halves, fh, ff), mask)
    bank = align.prepare_references(halves, options)
    # members against every half (only the other half of their own class is used): the calibration
    member_scores = align.alignment_scores(member_images, bank, options, mesh=mesh, n_references=2 * k)
    other = lab ^ 1  # the half a member did not build
    own_other = member_scores[np.arange(len(idx)), other]
    thresholds = np.full((k, 2), np.inf, np.float32)
    for c in range(k):
        for h in range(2):
            s = own_other[other == 2 * c + h]
            if len(s):
                thresholds[c, h] = np.quantile(s, quantile)
    cand_images = take_rows(images, candidates)
    scores = align.alignment_scores(cand_images, bank, options, mesh=mesh, n_references=2 * k)
    first, second = scores[:, 0::2], scores[:, 1::2]
    c1, c2 = first.argmax(1), second.argmax(1)
    s1 = first[np.arange(len(candidates)), c1]
    s2 = second[np.arange(len(candidates)), c2]
    keep = (c1 == c2) & (s1 >= thresholds[c1, 0]) & (s2 >= thresholds[c2, 1])
    if not keep.any():
        return empty._replace(thresholds=thresholds)
    chosen = np.nonzero(keep)[0]
    labels = c1[chosen].astype(np.int32)
    refs = filters.subtract_masked_mean(np.asarray(averages, np.float32), mask)
    found, _ = align.align_to_assigned(take_rows(images, candidates[chosen]),
                                       align.prepare_assigned_references(refs, options), labels, options, mesh=mesh)
    rows = np.stack([np.asarray(f, np.float32) for f in found], -1)
    return Matches(candidates[chosen], labels.astype(np.int64), rows,
                   np.stack([s1[chosen], s2[chosen]], -1).astype(np.float32), thresholds)
