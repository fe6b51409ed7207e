"""Formats layer: the one writer of a run's output files, from its result in memory.

A classification returns a ``ClassificationResult`` (averages in their final order, each particle's class,
working-frame parameters and pixel error); ``write_run`` writes every file of the output folder from it, once.
With an ``InputFrame`` (the input stack's table, pixel size, box, the pre-alignment shifts and the shrink ratio)
it also writes the files that refer to the input stack (STAR, HDF). ``write_generation`` writes a generation's
folder as soon as the generation ends. Every file is written under a temporary name and renamed when complete.

Output folder (SPHIRE's bookkeeping kept for familiarity, ``isac_algorithm.md`` §10.1)::

    class_averages.mrcs          accepted averages, ordered so similar views sit together (class k at index k-1),
                                 the working pixel size in the header
    class_averages.png           labelled montage
    class_averages.star          RELION model table: rlnReferenceImage, rlnClassNumber, rlnClassDistribution
                                 (over the accounted particles), jisacMembers, jisacStableFraction,
                                 jisacMeanPixelError, jisacScore
    ordered_class_averages.hdf   EMAN2/SPHIRE HDF: EMAN.members (0-based input indices), EMAN.n_objects
    particles.star               every input particle: the input's columns, rlnClassNumber (0 = unaccounted),
                                 rlnAnglePsi, rlnOriginXAngst/YAngst (input pixels, RELION's convention),
                                 jisacMirror, jisacPixelError
    accounted.star               the accounted particles only
    accounted_particles.mrcs     (with the input stack) the accounted particles at the input pixel size, mirrored
                                 members x-flipped (io.relion): RELION reads it whatever the input format
    accounted_relion.star        that substack with psi/origins that hold for EVERY member (no mirror left),
                                 rlnDefocusAngle negated for flipped members, jisacFlipped, jisacInputIndex
    relion/                      a RELION Class2D result: run_it000_{optimiser,model,data,sampling}.star and
                                 run_it000_classes.mrcs (averages resampled to the input pixel size and box)
    RELION_OUTPUT_NODES.star     the nodes a RELION 4/5 External job adds (optimiser, data, class averages)
    cryosparc/                   particles.cs (uids passed through, alignments2D/*), templates.cs + templates.mrc
    README_shrink_ratio.txt, 2dalignment/initial2Dparams.txt, class_averages.hdf
                                 what SPHIRE's beautifier and isac_substack read besides all_parameters.txt
    processed_images.txt         accounted particles (0-based indices into the input stack)
    not_processed_images.txt     the others
    all_parameters.txt           one row per particle: angle, shift x, shift y, mirror (-1: unaccounted), in the
                                 working frame relative to the pre-aligned particle
    particle_classes.txt         one row per particle: class number (0 unaccounted) and pixel error
    summary.json                 counts per generation, accounted fraction, classes, times, memory
    main001/generationGGG/       each generation's averages (all and accepted) as soon as it ends

Every image path in a written STAR file is relative to the working directory at write time (RELION resolves paths
against the folder it runs in, the project folder), or absolute when the file lies outside it; every MRC file
carries its pixel size (working pixel size for working-frame averages, input pixel size otherwise).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import starfile
from matplotlib.figure import Figure

from jisac import ranking
from jisac.io import cryosparc_out, hdf, relion, sphire, star
from jisac.io.atomic import atomic_path, write_json
from jisac.io.mrc import write_stack
from jisac.transforms import Transform2D, to_input_frame, to_relion


class ClassificationResult(NamedTuple):
    """A finished classification, in memory, in the final class order (class ``j`` is number ``j + 1``).

    Attributes:
        averages: ``(k, nx, nx)`` float32 class averages (working frame).
        class_number: ``(n,)`` int, 1-based class of each particle; 0 = unaccounted.
        params: ``(n, 4)`` float32 ``(angle deg, shift_x px, shift_y px, mirror)`` in the working frame,
            relative to the pre-aligned particle; ``(0, 0, 0, -1)`` for unaccounted particles.
        errors: ``(n,)`` float32 pixel error (working px); NaN for unaccounted particles.
        candidates: ``(k,)`` int, each class's size when it was tested (its stable share is members / this).
        history: one dict per finished generation.
        parameters: ISAC's parameters by SPHIRE's names (``IsacParams.as_dict()``).
        seconds: wall time per stage.
    """

    averages: np.ndarray
    class_number: np.ndarray
    params: np.ndarray
    errors: np.ndarray
    candidates: np.ndarray
    history: tuple
    parameters: dict
    seconds: dict

    @property
    def accounted(self) -> np.ndarray:
        return self.class_number > 0

    def members(self) -> list[np.ndarray]:
        """The 0-based particle indices of each class (increasing), in one sort rather than a pass over all
        particles per class (the writer asks for them several times; k x n comparisons each at 10^3 x 10^6)."""
        k = len(self.averages)
        order = np.argsort(self.class_number, kind="stable")
        counts = np.bincount(self.class_number, minlength=k + 1)[: k + 1]
        return np.split(order[counts[0]:], np.cumsum(counts[1:])[:-1]) if k else []

    def mean_pixel_errors(self) -> np.ndarray:
        """``(k,)`` each class's mean pixel error (working px); NaN for an empty class."""
        return np.asarray([float(np.nanmean(self.errors[m])) if len(m) else np.nan for m in self.members()])

    def on_stack(self, keep: np.ndarray, n: int) -> "ClassificationResult":
        """The result of a run on the rows ``keep`` of an ``n``-particle stack, for the whole stack (the others
        unaccounted)."""
        if len(keep) == n:
            return self
        class_number = np.zeros(n, self.class_number.dtype)
        params = np.tile(np.asarray([0.0, 0.0, 0.0, -1.0], np.float32), (n, 1))
        errors = np.full(n, np.nan, np.float32)
        class_number[keep], params[keep], errors[keep] = self.class_number, self.params, self.errors
        return self._replace(class_number=class_number, params=params, errors=errors)


class InputFrame(NamedTuple):
    """What ties the working frame to the input stack.

    Attributes:
        metadata: one row per input particle (``ParticleStack.metadata``, RELION column names).
        pixel_size: input pixel size, Å.
        box_size: input box, px.
        shrink_ratio: working px per input px (``target_radius / radius``).
        prealign_shifts: ``(n, 2)`` pre-alignment shifts, input px.
        source: the input stack's path (for summary.json).
        stack: the open input ``ParticleStack`` (its ``table`` says which file each image was resolved to, its
            ``read`` gives the images for the RELION-ready substack), or None (then image names are rewritten
            from ``metadata`` and ``source`` alone and no substack, RELION bundle or cryoSPARC files are written).
        class_frc: ``(k, target_nx // 2 + 1)`` split-half FRC of each class in the working frame (final class
            order; ``io.relion.split_half_averages`` + ``filters.fourier_ring_correlation``), or None.
    """

    metadata: pd.DataFrame
    pixel_size: float
    box_size: int
    shrink_ratio: float
    prealign_shifts: np.ndarray
    source: str
    stack: object = None
    class_frc: np.ndarray | None = None

    @property
    def working_pixel_size(self) -> float:
        return self.pixel_size / self.shrink_ratio


# ------------------------------------------------------------------------------------------ per generation


def write_generation(out: Path, generation: int, averages: np.ndarray, accepted: np.ndarray, pool: np.ndarray,
                     record: dict, pixel_size: float | None = None) -> None:
    """``main001/generationGGG/``: all averages of the generation's last round, the accepted ones, the particles
    left for the next generation and ``finished`` (the generation's record, one JSON line, written last)."""
    folder = Path(out) / "main001" / f"generation{generation:03d}"
    folder.mkdir(parents=True, exist_ok=True)
    if len(averages):
        write_stack(folder / "class_averages.mrcs", averages, pixel_size=pixel_size)
    if len(accepted):
        write_stack(folder / "good_class_averages.mrcs", accepted, pixel_size=pixel_size)
    write_table(folder / "to_process_next.txt", pool, "%d")
    with atomic_path(folder / "finished") as tmp:
        tmp.write_text(json.dumps(record) + "\n")


# ------------------------------------------------------------------------------------------ the run


def write_table(path: Path, rows: np.ndarray, fmt) -> None:
    with atomic_path(path) as tmp:
        np.savetxt(tmp, rows, fmt=fmt)


def write_montage(path: Path, averages: np.ndarray, sizes, columns: int = 10) -> None:
    """A labelled montage of the averages (class number and member count under each), PNG. Drawn on a
    ``matplotlib.figure.Figure``: no pyplot state, no backend switch in the caller's process."""
    k = max(len(averages), 1)
    cols = min(columns, k)
    rows = -(-k // cols)
    fig = Figure(figsize=(1.3 * cols, 1.45 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i, (img, n) in enumerate(zip(averages, sizes)):
        ax = axes.ravel()[i]
        ax.imshow(img, cmap="gray")
        ax.set_title(f"{i + 1}: {n}", fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")


def class_statistics(result: ClassificationResult, img_per_grp: int, resolution_angst=None,
                     pixel_size: float | None = None) -> pd.DataFrame:
    """One row per class: members, stable share, mean pixel error, resolution (Å, when known; of averages of
    ``pixel_size`` Å/px) and the ranking score (``jisac.ranking``)."""
    groups = result.members()
    members = np.asarray([len(m) for m in groups], np.int64)
    errors = result.mean_pixel_errors()
    # members without a pixel error joined in the matching phase (``jisac.matching``): not stable ones
    n_stable = np.asarray([int(np.isfinite(result.errors[m]).sum()) for m in groups], np.int64)
    stable = n_stable / np.maximum(np.asarray(result.candidates, np.float64), 1.0)
    score = ranking.class_scores(stable, np.nan_to_num(errors), members, resolution_angst, pixel_size,
                                 img_per_grp=img_per_grp)
    table = {"jisacMembers": members, "jisacStableFraction": np.round(stable, 4),
             "jisacMeanPixelError": np.round(errors, 4)}
    if resolution_angst is not None:
        table["rlnEstimatedResolution"] = np.round(np.asarray(resolution_angst, np.float64), 2)
    table[ranking.SCORE_COLUMN] = np.round(score, 3)
    return pd.DataFrame(table)


def summary_of(result: ClassificationResult) -> dict:
    n = len(result.class_number)
    accounted = int(result.accounted.sum())
    return {
        "particles": n,
        "accounted": accounted,
        "accounted_fraction": float(accounted / n) if n else 0.0,
        "classes": int(len(result.averages)),
        "class_sizes": [len(m) for m in result.members()],
        "median_pixel_error": float(np.nanmedian(result.errors)) if accounted else None,
        "generations": list(result.history),
        "seconds": dict(result.seconds),
        "parameters": dict(result.parameters),
    }


def write_run(out: Path, result: ClassificationResult, frame: InputFrame | None = None,
              extra_summary: dict | None = None) -> dict:
    """Writes every output file of a finished run (module docstring) from ``result``; the STAR and HDF files
    that refer to the input stack need its ``frame``. Returns the summary (also in ``summary.json``, with
    ``extra_summary`` merged in)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    k = len(result.averages)
    working_pixel = frame.working_pixel_size if frame is not None else None
    sizes = [len(m) for m in result.members()]
    if k:
        write_stack(out / "class_averages.mrcs", result.averages, pixel_size=working_pixel)
        write_montage(out / "class_averages.png", result.averages, sizes)
    accounted = result.accounted
    write_table(out / "processed_images.txt", np.nonzero(accounted)[0], "%d")
    write_table(out / "not_processed_images.txt", np.nonzero(~accounted)[0], "%d")
    write_table(out / "all_parameters.txt", result.params, ["%.4f", "%.4f", "%.4f", "%d"])
    write_table(out / "particle_classes.txt", np.stack([result.class_number, result.errors], -1), ["%d", "%.4f"])
    if frame is not None:
        _write_relion_and_sphire(out, result, frame, img_per_grp=int(result.parameters.get("img_per_grp", 200)))
    summary = summary_of(result)
    summary.update(extra_summary or {})
    write_json(out / "summary.json", summary)
    return summary


def input_frame_params(result: ClassificationResult, frame: InputFrame) -> Transform2D:
    """Every particle's full alignment in input pixels (``transforms.to_input_frame``); zero for unaccounted."""
    p = result.params
    full = to_input_frame(frame.prealign_shifts, Transform2D(p[:, 0], p[:, 1], p[:, 2], p[:, 3] > 0),
                          frame.shrink_ratio)
    accounted = result.accounted
    return Transform2D(*(np.where(accounted, np.asarray(f), np.zeros_like(np.asarray(f))) for f in full))


def image_names(frame: InputFrame) -> list[str]:
    """Every particle's ``rlnImageName`` with its stack path relative to the working directory (absolute outside
    it): from the file the reader resolved (``frame.stack.table``), else by the STAR reader's rule (beside the
    input file, then the working directory) from ``frame.metadata``."""
    table = getattr(frame.stack, "table", None)
    if table is not None:
        return star.portable_image_names(table.files, table.file_of, table.index_in_file)
    names = frame.metadata["rlnImageName"].astype(str).tolist()
    folder = Path(frame.source).parent
    out = []
    for name in names:
        number, at, path = name.partition("@")
        if not at:
            number, path = "1", number
        candidates = [Path(path)] if Path(path).is_absolute() else [folder / path, Path(path)]
        found = next((c for c in candidates if c.exists()), None)
        out.append(f"{number}@{star.portable_path(found)}" if found is not None else name)
    return out


def _write_relion_and_sphire(out: Path, result: ClassificationResult, frame: InputFrame, img_per_grp: int) -> None:
    """particles.star, accounted.star, class_averages.star, ordered_class_averages.hdf, the SPHIRE run files and,
    with the input stack, the RELION-ready substack, the RELION Class2D bundle and the cryoSPARC files."""
    accounted = result.accounted
    full = input_frame_params(result, frame)
    psi, ox, oy, mirror = (np.asarray(v) for v in to_relion(full, frame.pixel_size))
    new = pd.DataFrame({
        "rlnImageName": image_names(frame),
        "rlnClassNumber": result.class_number,
        "rlnAnglePsi": psi,
        "rlnOriginXAngst": ox,
        "rlnOriginYAngst": oy,
        "jisacMirror": mirror.astype(int),
        "jisacPixelError": np.nan_to_num(result.errors, nan=-1.0),
    })
    star.write_particle_star(out / "particles.star", frame.metadata, new, pixel_size=frame.pixel_size,
                             box_size=frame.box_size)
    if accounted.any():
        star.write_particle_star(
            out / "accounted.star", frame.metadata[accounted].reset_index(drop=True),
            new[accounted].reset_index(drop=True), pixel_size=frame.pixel_size, box_size=frame.box_size,
        )
    target_radius = float(result.parameters.get("target_radius", frame.shrink_ratio * frame.box_size / 2))
    sphire.write_run_files(out, result.averages, result.members(), shrink_ratio=frame.shrink_ratio,
                           radius=target_radius / frame.shrink_ratio, prealign_shifts=frame.prealign_shifts,
                           working_pixel_size=frame.working_pixel_size)
    k = len(result.averages)
    if not k:
        return
    members = result.members()
    n_accounted = max(int(accounted.sum()), 1)
    resolution = (relion.class_resolution_angst(frame.class_frc, frame.working_pixel_size)
                  if frame.class_frc is not None else None)
    hdf.write_class_averages(out / "ordered_class_averages.hdf", result.averages, members, frame.working_pixel_size)
    table = pd.concat([pd.DataFrame({
        "rlnReferenceImage": [f"{j + 1:06d}@{star.portable_path(out / 'class_averages.mrcs')}" for j in range(k)],
        "rlnClassNumber": np.arange(1, k + 1),
        "rlnClassDistribution": [len(m) / n_accounted for m in members],
    }), class_statistics(result, img_per_grp, resolution, frame.working_pixel_size)], axis=1)
    with atomic_path(out / "class_averages.star") as tmp:
        starfile.write({"model_classes": table}, tmp)
    if frame.stack is not None:
        _write_relion_ready(out, result, frame, full, target_radius)


def _write_relion_ready(out: Path, result: ClassificationResult, frame: InputFrame, full: Transform2D,
                        target_radius: float) -> None:
    """accounted_particles.mrcs + accounted_relion.star (mirror-free), relion/ (Class2D bundle),
    RELION_OUTPUT_NODES.star and cryosparc/ (module docstring)."""
    index = np.flatnonzero(result.accounted)
    flipped = np.asarray(full.mirror, bool)[index]
    substack = out / "accounted_particles.mrcs"
    relion.write_substack(substack, frame.stack.read, index, flipped, frame.pixel_size)
    free = relion.mirror_free(Transform2D(*(np.asarray(f)[index] for f in full)))
    psi, ox, oy, _ = (np.asarray(v) for v in to_relion(free, frame.pixel_size))
    metadata = frame.metadata.iloc[index].reset_index(drop=True)
    classes = result.class_number[index]
    members = result.members()
    half = np.zeros(len(result.class_number), np.int64)
    for m in members:
        half[m] = np.arange(len(m)) % 2
    new = {
        "rlnImageName": [f"{i + 1:06d}@{star.portable_path(substack)}" for i in range(len(index))],
        "rlnClassNumber": classes,
        "rlnAnglePsi": psi,
        "rlnOriginXAngst": ox,
        "rlnOriginYAngst": oy,
        "jisacFlipped": flipped.astype(int),
        "jisacInputIndex": index,
        "jisacPixelError": result.errors[index],
    }
    if "rlnDefocusAngle" in metadata.columns:
        angle = metadata["rlnDefocusAngle"].to_numpy(np.float64)
        new["rlnDefocusAngle"] = np.where(flipped, -angle, angle)  # x-mirroring turns the axis at a into -a
    particles = metadata.copy()
    for column, values in new.items():
        particles[column] = values
    star.write_particle_star(out / "accounted_relion.star", particles, pixel_size=frame.pixel_size,
                             box_size=frame.box_size)

    averages = relion.to_input_box(result.averages, frame.shrink_ratio, frame.box_size)
    err = np.nan_to_num(result.mean_pixel_errors())  # an empty class (none is accepted empty) counts as 0
    nodes = relion.write_class2d(
        out / "relion", averages, particles.drop(columns=["jisacFlipped", "jisacInputIndex"]),
        pixel_size=frame.pixel_size, class_frc=frame.class_frc, frc_pixel_size=frame.working_pixel_size,
        accuracy_rotations=np.degrees(err / max(target_radius, 1.0)),
        accuracy_translations=err * frame.working_pixel_size,
        particle_diameter=2.0 * target_radius / frame.shrink_ratio * frame.pixel_size,
        do_ctf="rlnDefocusU" in metadata.columns,
    )
    nodes[out / "class_averages.star"] = relion.NODE_AVERAGES
    relion.write_output_nodes(out, nodes)

    model = starfile.read(out / "relion" / "run_it000_model.star", always_dict=True)["model_classes"]
    cs = out / "cryosparc"
    cs.mkdir(exist_ok=True)
    cryosparc_out.write_particles(
        cs / "particles.cs", metadata, substack=substack, box=frame.box_size, pixel_size=frame.pixel_size,
        class_number=classes, psi=psi, origin_px=np.stack([ox, oy], -1) / frame.pixel_size, flipped=flipped,
        split=half[index], error=result.errors[index])
    cryosparc_out.write_templates(cs, averages, frame.pixel_size, model["rlnEstimatedResolution"].to_numpy())
