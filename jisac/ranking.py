"""Interface layer: a per-class quality score in [0, 1] from what a finished run knows, and the per-class table
of a run folder (members, stable share, pixel error, resolution, score) that the report and the selection read.

The score (:func:`class_scores`) is a weighted mean of four terms, each in [0, 1] and each increasing with quality:

=================  ======  =========================================================================================
term               weight  meaning
=================  ======  =========================================================================================
stable share       0.4     ``stable_fraction``: the share of the class's candidates (its members at the last SAC
                           round's assignment) that passed the stability test. ISAC's own verdict on the class:
                           a class of one view aligns reproducibly; a mixture or a junk class does not.
alignment          0.3     ``exp(-(pi e f_ref)^2)`` with ``e`` the class's mean pixel error (px) and
                           ``f_ref`` = 0.25 cycles/px (half Nyquist): the share of the signal at half Nyquist that
                           the average keeps under a Gaussian misalignment spread of ``e`` px (the same
                           damping law as ``stability=resolution``). 0.7 px (ISAC2's threshold) gives 0.74.
resolution         0.2     ``2 p / d`` clipped to [0, 1]: Nyquist (``2 p``, Å; ``p`` = the averages' pixel size)
                           over the class's split-half resolution ``d`` (Å); 1 at Nyquist. Left out (its weight
                           shared by the others) when ``d`` is unknown (NaN).
size               0.1     ``n / (n + n_half)`` with ``n`` members and ``n_half`` = ``img_per_grp / 2``: noise in
                           an average falls as ``1 / sqrt(n)``; saturating, because beyond a few hundred members
                           other errors dominate.
=================  ======  =========================================================================================

Why these weights: stability is the criterion ISAC itself accepts classes by, so it leads; the pixel error measures
how well the members agree on their alignment, the next most direct evidence; the resolution needs a split-half
estimate that a run may lack, and is largely a consequence of the first two; size mostly repeats the stable share
(accepted classes are all above ``minimum_grp_size``), so it only breaks ties. A weighted *mean* (not a product) so
that the score reads as "the share of an ideal class", one weak term lowers but does not zero it, and the score
is strictly increasing in each term. Compare scores within a run, or between runs of the same data; 0.8 and above
is a class with nearly all candidates stable, sub-pixel agreement and a few hundred members.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import mrcfile
import numpy as np
import pandas as pd

from jisac.io.hdf import HdfImageFile

WEIGHTS = {"stable": 0.4, "alignment": 0.3, "resolution": 0.2, "size": 0.1}
REFERENCE_FREQUENCY = 0.25  # cycles/px: half Nyquist, where the alignment term measures the signal kept
SCORE_COLUMN = "jisacScore"


class ScoreTerms(NamedTuple):
    """The four terms of :func:`class_scores`, each ``(k,)`` in [0, 1] (``resolution`` NaN where unknown)."""

    stable: np.ndarray
    alignment: np.ndarray
    resolution: np.ndarray
    size: np.ndarray


def score_terms(stable_fraction, mean_pixel_error_px, members, resolution_angst=None, pixel_size_angst=None,
                img_per_grp: int = 200) -> ScoreTerms:
    """The terms of the score (see the module docstring), float64 ``(k,)`` each.

    stable_fraction: ``(k,)`` in [0, 1]; mean_pixel_error_px: ``(k,)`` px (>= 0); members: ``(k,)`` counts;
    resolution_angst: ``(k,)`` Å, NaN (or ``None`` for all) where unknown; pixel_size_angst: the averages' pixel
    size (Å), needed with a resolution; img_per_grp: ISAC's class size (sets the size term's half point)."""
    stable = np.clip(np.asarray(stable_fraction, np.float64), 0.0, 1.0)
    k = stable.shape[0]
    err = np.maximum(np.asarray(mean_pixel_error_px, np.float64), 0.0)
    alignment = np.exp(-((np.pi * err * REFERENCE_FREQUENCY) ** 2))
    n = np.maximum(np.asarray(members, np.float64), 0.0)
    size = n / (n + img_per_grp / 2.0)
    if resolution_angst is None or pixel_size_angst is None:
        res = np.full(k, np.nan)
    else:
        d = np.asarray(resolution_angst, np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            res = np.where(d > 0, np.clip(2.0 * float(pixel_size_angst) / d, 0.0, 1.0), np.nan)
    return ScoreTerms(stable, alignment, res, size)


def class_scores(stable_fraction, mean_pixel_error_px, members, resolution_angst=None, pixel_size_angst=None,
                 img_per_grp: int = 200) -> np.ndarray:
    """Per-class score ``(k,)`` in [0, 1]: the weighted mean of :func:`score_terms` with :data:`WEIGHTS`; a class
    whose resolution is unknown is scored on the other three terms (weights renormalised). Arguments as in
    :func:`score_terms`. Pure NumPy, no side effects."""
    terms = score_terms(stable_fraction, mean_pixel_error_px, members, resolution_angst, pixel_size_angst,
                        img_per_grp)
    total = np.zeros_like(terms.stable)
    weight = np.zeros_like(terms.stable)
    for name, w in WEIGHTS.items():
        value = getattr(terms, name)
        known = np.isfinite(value)
        total += np.where(known, w * np.nan_to_num(value), 0.0)
        weight += np.where(known, w, 0.0)
    return total / weight


def with_scores(table: pd.DataFrame, scores) -> pd.DataFrame:
    """A copy of a class table (one row per class, e.g. ``class_averages.star``'s) with ``jisacScore`` set from
    ``scores`` ``(k,)``, rounded to 3 decimals (what a STAR reader needs)."""
    scores = np.asarray(scores, np.float64)
    if len(scores) != len(table):
        raise ValueError(f"{len(scores)} scores for a class table of {len(table)} rows; give one score per class")
    out = table.copy()
    out[SCORE_COLUMN] = np.round(scores, 3)
    return out


# ------------------------------------------------------------------------------------------------ a run folder


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def read_stack(path: Path) -> np.ndarray | None:
    """An MRC(S) stack as float32 ``(n, ny, nx)``, or ``None`` when missing or unreadable (a run in progress may
    be renaming it)."""

    try:
        with mrcfile.open(path, permissive=True) as f:
            data = np.asarray(f.data, np.float32)
    except (OSError, ValueError):
        return None
    return data[None] if data.ndim == 2 else data


def averages_pixel_size(run_dir: Path, beautified: bool = False) -> float | None:
    """Å per pixel of a run's averages: the run's own (working frame) from ``ordered_class_averages.hdf``'s
    ``EMAN.apix_x`` (class_averages.mrcs' header may say 1), the beautifier's from its MRC header."""
    if not beautified:
        try:
            f = HdfImageFile(run_dir / "ordered_class_averages.hdf")
        except (OSError, ValueError):  # StackError is a ValueError
            return None
        f.close()
        return f.pixel_size
    try:
        with mrcfile.open(run_dir / "beautify" / "class_averages.mrcs", header_only=True, permissive=True) as f:
            p = float(f.voxel_size.x)
    except (OSError, ValueError):
        return None
    return p if p > 0 else None


def _read_star_table(path: Path) -> pd.DataFrame | None:
    """The first (or ``particles`` / ``model_classes``) table of a STAR file, or ``None``."""
    import starfile

    if not path.is_file():
        return None
    try:
        blocks = starfile.read(path, always_dict=True)
    except Exception:  # starfile raises many kinds; a report must not fail on one unreadable file
        return None
    for name in ("particles", "model_classes"):
        if isinstance(blocks.get(name), pd.DataFrame):
            return blocks[name]
    frames = [b for b in blocks.values() if isinstance(b, pd.DataFrame)]
    return frames[0] if frames else None


def particle_classes(run_dir: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """``(class_number (n,) int, pixel_error (n,) float px, NaN where unaccounted)`` from ``particles.star``
    (``rlnClassNumber``, ``jisacPixelError``), else from ``particle_classes.txt`` (the same numbers, written
    with summary.json); ``None`` when neither is there."""
    table = _read_star_table(run_dir / "particles.star")
    if table is not None and {"rlnClassNumber", "jisacPixelError"} <= set(table.columns):
        classes = table["rlnClassNumber"].to_numpy(int)
        errors = table["jisacPixelError"].to_numpy(np.float64)
    elif (run_dir / "particle_classes.txt").is_file():
        data = pd.read_csv(run_dir / "particle_classes.txt", sep=r"\s+", header=None).to_numpy(np.float64)
        classes, errors = data[:, 0].astype(int), data[:, 1]
    else:
        return None
    errors = np.where((classes > 0) & (errors >= 0), errors, np.nan)
    return classes, errors


def _generation_of(averages: np.ndarray, run_dir: Path) -> np.ndarray:
    """For each final average, the generation whose ``good_class_averages.mrcs`` holds the identical image
    (0 when none does). The final averages are the generations' float32 arrays written again, so they match
    bit for bit; matched by their bytes (a dict, not k x k comparisons)."""
    first_gen: dict[bytes, int] = {}
    for folder in sorted((run_dir / "main001").glob("generation[0-9][0-9][0-9]")):
        good = read_stack(folder / "good_class_averages.mrcs")
        if good is None or good.shape[1:] != averages.shape[1:]:
            continue
        g = int(folder.name[len("generation"):])
        for x in good:
            first_gen.setdefault(np.ascontiguousarray(x, np.float32).tobytes(), g)
    return np.array([first_gen.get(np.ascontiguousarray(a, np.float32).tobytes(), 0) for a in averages], int)


def stable_fractions(members: np.ndarray, averages: np.ndarray | None, run_dir: Path, history: list,
                     img_per_grp: int) -> np.ndarray:
    """Share of each class's candidates that were stable: ``members / candidates``, where the candidates are the
    class's members at its generation's equal-size assignment, ``particles / classes`` of that generation
    (``summary.json`` "generations"), found by matching the average to the generation folders; ``img_per_grp``
    where the generation is unknown. ``(k,)`` in [0, 1]."""
    candidates = np.full(len(members), float(img_per_grp))
    if averages is not None and len(averages) == len(members) and history:
        by_gen = {h["generation"]: h["particles"] / max(h["classes"], 1) for h in history if h.get("classes")}
        for i, g in enumerate(_generation_of(averages, run_dir)):
            if g in by_gen:
                candidates[i] = by_gen[g]
    return np.clip(np.asarray(members, np.float64) / candidates, 0.0, 1.0)


def _resolutions(run_dir: Path, k: int) -> tuple[np.ndarray, float | None]:
    """``(resolution (k,) Å, NaN where unknown; pixel size (Å) of the averages it refers to)``: the column
    ``rlnEstimatedResolution`` of ``class_averages.star``, else of ``beautify/class_averages.star``."""
    for star_path, beautified in ((run_dir / "class_averages.star", False),
                                  (run_dir / "beautify" / "class_averages.star", True)):
        table = _read_star_table(star_path)
        if table is None or "rlnEstimatedResolution" not in table.columns:
            continue
        res = np.full(k, np.nan)
        number = (table["rlnClassNumber"].to_numpy(int) if "rlnClassNumber" in table.columns
                  else np.arange(1, len(table) + 1))
        values = pd.to_numeric(table["rlnEstimatedResolution"], errors="coerce").to_numpy(np.float64)
        ok = (number >= 1) & (number <= k)
        res[number[ok] - 1] = values[ok]
        return res, averages_pixel_size(run_dir, beautified)
    return np.full(k, np.nan), None


def class_table(run_dir) -> pd.DataFrame:
    """One row per final class of a finished run folder: ``class`` (1-based, as ``rlnClassNumber``), ``members``,
    ``stable_fraction``, ``mean_pixel_error`` (px, working frame), ``resolution_angst`` (NaN where unknown),
    ``score`` (:func:`class_scores`). Empty when the run has no ``summary.json`` or no class."""
    run_dir = Path(run_dir)
    summary = read_json(run_dir / "summary.json") or {}
    k = int(summary.get("classes") or 0)
    columns = ["class", "members", "stable_fraction", "mean_pixel_error", "resolution_angst", "score"]
    if not k:
        return pd.DataFrame(columns=columns)
    img_per_grp = int((summary.get("parameters") or {}).get("img_per_grp") or 200)
    per_particle = particle_classes(run_dir)
    if per_particle is not None:
        classes, errors = per_particle
        members = np.bincount(classes[classes > 0], minlength=k + 1)[1:k + 1]
        mean_error = np.array([np.nanmean(errors[classes == c]) if members[c - 1] else np.nan
                               for c in range(1, k + 1)])
    else:
        members = np.asarray(summary.get("class_sizes") or [0] * k)
        mean_error = np.full(k, np.nan)
    averages = read_stack(run_dir / "class_averages.mrcs")
    written = _read_star_table(run_dir / "class_averages.star")
    if written is not None and "jisacStableFraction" in written.columns and len(written) == k:
        stable = pd.to_numeric(written["jisacStableFraction"], errors="coerce").to_numpy(np.float64)  # exact
    else:  # a run folder written before the stable share was recorded
        stable = stable_fractions(members, averages, run_dir, summary.get("generations") or [], img_per_grp)
    resolution, res_pixel = _resolutions(run_dir, k)
    # an unknown pixel error (no per-particle table) scores as ISAC2's threshold: accepted, nothing better known
    thld = float((summary.get("parameters") or {}).get("thld_err") or 0.7)
    scores = class_scores(stable, np.where(np.isfinite(mean_error), mean_error, thld), members, resolution,
                          res_pixel, img_per_grp)
    return pd.DataFrame({
        "class": np.arange(1, k + 1), "members": members.astype(int), "stable_fraction": stable,
        "mean_pixel_error": mean_error, "resolution_angst": resolution, "score": scores,
    })
