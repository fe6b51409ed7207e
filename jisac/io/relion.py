"""Formats layer: RELION's own files for a jisac result: a mirror-free particle substack, a Class2D result bundle
(``run_it000_{model,data,optimiser,sampling}.star`` + ``run_it000_classes.mrcs``) and ``RELION_OUTPUT_NODES.star``.

Mirrors. RELION's 2D model is a rotation ``psi`` and an origin; it has no in-plane mirror, and its tools ignore
``rlnAngleTilt`` in 2D (``relion_stack_create --apply_transformation`` builds its matrix from psi and the origins
only). A particle that ISAC matched to the x-mirrored class average therefore cannot be described by RELION
relative to the original image. It can relative to the particle's own x-mirror: if ``P`` (mirrored) brings the
image onto the average, ``compose(flip, P)`` (flip the image about its centre column ``nx // 2``, then apply
``P``) is unmirrored (``transforms.compose``). So the RELION-ready substack (``accounted_particles.mrcs``) holds
every accounted particle at its input pixel size and box, mirrored members pre-flipped, and its STAR file gives
psi/origins that hold for every member against the unmirrored class average. Flipping x turns an astigmatism axis
at ``a`` into one at ``-a``, so ``rlnDefocusAngle`` of flipped members is negated (beam tilt x and odd Zernike
terms would need the same care; jisac does not rewrite them and names them in the README).

The Class2D bundle is what ``MlOptimiser::read`` / ``MlModel::read`` (RELION 3.1 and 5) need: the optimiser's
general table, a model with ``model_general``, ``model_classes`` (``rlnReferenceImage``, ``rlnClassDistribution``
over the accounted particles, accuracies, per-class resolution, ``rlnClassPriorOffsetX/Y``), ``model_class_N``
spectra, ``model_groups`` + ``model_group_1`` (RELION 3.1 and the pre-4 path of RELION 5) and
``model_optics_group_N``, a sampling table and a data table of the substack. The per-class resolution is the
0.143 crossing of a split-half FRC of the class members in the working frame (``InputFrame.class_frc``); the
spectra (SSNR from that FRC, noise power 1) are placeholders good enough for display, selection and ranking, not a
noise model to continue a refinement from.
"""

from __future__ import annotations

from pathlib import Path

import mrcfile
import jax.numpy as jnp
import numpy as np
import pandas as pd
import starfile

from jisac import filters
from jisac.io.atomic import atomic_path
from jisac.io.star import portable_path, split_optics
from jisac.transforms import Transform2D, apply_transform, bilinear_sample, compose, make_transform

# The node types RELION 4/5's pipeliner gives Class2D outputs (src/pipeline_jobs.h).
NODE_OPTIMISER = "OptimiserData.star.relion.class2d"
NODE_PARTICLES = "ParticleGroupMetadata.star.relion.class2d"
NODE_AVERAGES = "Image2DGroupMetadata.star.relion"
FRC_THRESHOLD = 0.143


# ------------------------------------------------------------------------------------ mirrors and substacks


def flip_x(images: np.ndarray) -> np.ndarray:
    """x-mirror ``(..., ny, nx)`` images about the centre column ``nx // 2`` (jisac's and RELION's centre):
    column ``c`` takes column ``2 (nx // 2) - c``; for an even box column 0 has no partner and keeps its value."""
    flipped = np.asarray(images)[..., ::-1]
    if images.shape[-1] % 2 == 0:
        flipped = np.roll(flipped, 1, axis=-1)
    return flipped


def mirror_free(p: Transform2D) -> Transform2D:
    """Parameters of the same alignments for images whose mirrored members were :func:`flip_x`-ed: ``compose(flip,
    p)`` where ``p.mirror``, ``p`` elsewhere; every result is unmirrored."""
    mirror = np.asarray(p.mirror, bool)
    flip = make_transform(0.0, 0.0, 0.0, mirror)
    out = compose(flip, p)
    return Transform2D(*(np.asarray(f) for f in out))


def write_substack(path: Path, read, indices: np.ndarray, flip: np.ndarray, pixel_size: float,
                   chunk: int = 256) -> None:
    """Writes the images ``read(indices)`` (input order) to an MRC stack, the rows where ``flip`` is set
    x-mirrored, ``chunk`` images at a time (the substack may be larger than memory), atomically.

    read: a function of 0-based input indices returning ``(m, ny, nx)`` images (``ParticleStack.read``)."""
    indices = np.asarray(indices, np.int64)
    first = np.asarray(read(indices[:1]), np.float32)
    shape = (len(indices),) + first.shape[1:]
    with atomic_path(path) as tmp:
        with mrcfile.new_mmap(tmp, shape=shape, mrc_mode=2, overwrite=True) as mrc:
            mrc.set_image_stack()
            mrc.voxel_size = float(pixel_size)
            for start in range(0, len(indices), chunk):
                rows = slice(start, start + chunk)
                images = np.asarray(read(indices[rows]), np.float32)
                f = np.asarray(flip[rows], bool)
                images[f] = flip_x(images[f])
                mrc.data[rows] = images


# ------------------------------------------------------------------------------------ class averages


def split_half_averages(class_number: np.ndarray, params: np.ndarray, working, keep: np.ndarray | None = None,
                        chunk: int = 128) -> np.ndarray:
    """Each class's two half averages in the working frame: ``(k, 2, nx, nx)`` float32.

    class_number: ``(n,)`` 1-based class of each input particle (0 unaccounted); params: ``(n, 4)`` working-frame
    parameters (``ClassificationResult.params``); working: the working stack (rows indexable with an index array:
    NumPy array or ``DiskArray``), row ``i`` holding input particle ``keep[i]`` (all particles when ``keep`` is
    None). Members are split by their position in the sorted member list, even/odd (as SPHIRE's beautifier)."""
    n = len(class_number)
    row_of = np.arange(n) if keep is None else np.full(n, -1, np.int64)
    if keep is not None:
        row_of[np.asarray(keep, np.int64)] = np.arange(len(keep))
    k = int(class_number.max()) if n else 0
    nx = working.shape[-1]
    sums = np.zeros((k, 2, nx, nx), np.float64)
    counts = np.zeros((k, 2), np.int64)
    members = np.flatnonzero(class_number > 0)
    order = members[np.lexsort((members, class_number[members]))]
    half = np.zeros(n, np.int64)
    for c in range(1, k + 1):
        m = order[class_number[order] == c]
        half[m] = np.arange(len(m)) % 2
    for start in range(0, len(order), chunk):
        idx = order[start:start + chunk]
        pad = chunk - len(idx)  # one compiled shape for every chunk
        rows = np.concatenate([row_of[idx], np.repeat(row_of[idx[:1]], pad)])
        sort = np.argsort(rows, kind="stable")
        images = np.empty((len(rows), nx, nx), np.float32)
        images[sort] = np.asarray(working[rows[sort]], np.float32)
        p = params[np.concatenate([idx, np.repeat(idx[:1], pad)])]
        aligned = np.asarray(apply_transform(images, make_transform(p[:, 0], p[:, 1], p[:, 2], p[:, 3] > 0)))
        for j, i in enumerate(idx):
            sums[class_number[i] - 1, half[i]] += aligned[j]
            counts[class_number[i] - 1, half[i]] += 1
    return (sums / np.maximum(counts, 1)[..., None, None]).astype(np.float32)


def frc_crossing(frc: np.ndarray, threshold: float = FRC_THRESHOLD) -> np.ndarray:
    """Shell (fractional) where each FRC ``(..., shells)`` first falls below ``threshold``
    (``jisac.filters.frc_resolution`` times the box: shell 0 ignored, linear between shells, the last shell when
    it never falls)."""
    frc = np.asarray(frc, np.float64)
    box = 2 * (frc.shape[-1] - 1)
    return np.asarray(filters.frc_resolution(jnp.asarray(frc, jnp.float32), threshold, box), np.float64) * box


def class_resolution_angst(class_frc: np.ndarray, pixel_size: float, threshold: float = FRC_THRESHOLD
                           ) -> np.ndarray:
    """Each class's resolution (Å) from its split-half FRC ``(k, shells)`` measured at ``pixel_size`` Å/px."""
    box = 2 * (np.shape(class_frc)[-1] - 1)
    return box * pixel_size / np.maximum(frc_crossing(class_frc, threshold), 1e-6)


def to_input_box(averages: np.ndarray, shrink_ratio: float, box: int) -> np.ndarray:
    """Working-frame averages ``(k, nw, nw)`` resampled (bilinear) to the input pixel size and box ``(k, box, box)``:
    input pixel ``u`` (from the centre ``box // 2``) lies at working pixel ``u * shrink_ratio`` from ``nw // 2``;
    zero outside the working box."""
    nw = averages.shape[-1]
    u = (np.arange(box, dtype=np.float32) - box // 2) * np.float32(shrink_ratio) + nw // 2
    row, col = np.meshgrid(u, u, indexing="ij")
    return np.stack([np.asarray(bilinear_sample(a, col, row)) for a in np.asarray(averages, np.float32)])


# ------------------------------------------------------------------------------------ the Class2D bundle


def _write_star(path: Path, blocks: dict) -> None:
    with atomic_path(path) as tmp:
        starfile.write(blocks, tmp)


def write_class2d(folder: Path, averages: np.ndarray, particles: pd.DataFrame, *, pixel_size: float,
                  class_frc: np.ndarray | None, frc_pixel_size: float, accuracy_rotations: np.ndarray,
                  accuracy_translations: np.ndarray, particle_diameter: float, do_ctf: bool,
                  root: str = "run_it000") -> dict:
    """Writes a RELION Class2D result into ``folder``; returns ``{file: node type}`` of the files written.

    averages: ``(k, box, box)`` class averages at the input pixel size (``pixel_size`` Å); particles: the data
    table (one row per accounted particle, the substack's rlnImageName, rlnClassNumber 1-based, rlnAnglePsi,
    rlnOriginX/YAngst, CTF and optics columns); class_frc: ``(k, shells)`` split-half FRC in the working frame
    (shell ``s`` at ``s / (2 (shells - 1) frc_pixel_size)`` 1/Å) or None (resolution left at Nyquist);
    accuracy_rotations (deg) and accuracy_translations (Å): ``(k,)``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    k, box = len(averages), int(averages.shape[-1])
    stem = folder / root
    classes = stem.with_name(root + "_classes.mrcs")
    with atomic_path(classes) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(np.ascontiguousarray(averages, np.float32))
            mrc.set_image_stack()
            mrc.voxel_size = float(pixel_size)
    counts = np.bincount(particles["rlnClassNumber"].to_numpy(np.int64), minlength=k + 1)[1:k + 1]
    distribution = counts / max(int(counts.sum()), 1)

    shells = np.arange(box // 2 + 1)
    freq = shells / (box * pixel_size)  # 1/Å
    if class_frc is not None:
        frc_shells = class_frc.shape[-1]
        frc_freq = np.arange(frc_shells) / (2 * (frc_shells - 1) * frc_pixel_size)
        frc = np.stack([np.interp(freq, frc_freq, f, right=0.0) for f in np.asarray(class_frc, np.float64)])
        crossing = frc_crossing(class_frc) / (2 * (frc_shells - 1) * frc_pixel_size)  # 1/Å
        resolution = 1.0 / np.maximum(crossing, 1e-6)
    else:
        frc = np.zeros((k, len(shells)))
        resolution = np.full(k, 2.0 * frc_pixel_size)
    half_set = np.clip(frc, 0.0, 1.0)  # a negative correlation is no signal
    full = np.clip(2 * half_set / (1 + half_set), 0.0, 0.999)  # full-set correlation from half sets
    ssnr = full / (1 - full)
    model_general = {
        "rlnReferenceDimensionality": 2, "rlnDataDimensionality": 2, "rlnOriginalImageSize": box,
        "rlnCurrentResolution": float(np.min(resolution)) if k else 999.0, "rlnCurrentImageSize": box - box % 2,
        "rlnPaddingFactor": 2.0, "rlnIsHelix": 0, "rlnFourierSpaceInterpolator": 1,
        "rlnMinRadiusNnInterpolation": 10, "rlnPixelSize": float(pixel_size), "rlnNrClasses": k, "rlnNrBodies": 1,
        "rlnNrGroups": 1, "rlnTau2FudgeFactor": 2.0, "rlnNormCorrectionAverage": 1.0,
        "rlnSigmaOffsetsAngst": float(np.sqrt(np.mean(particles["rlnOriginXAngst"] ** 2
                                                      + particles["rlnOriginYAngst"] ** 2))) if len(particles) else 0.0,
        "rlnOrientationalPriorMode": 0, "rlnSigmaPriorRotAngle": 0.0, "rlnSigmaPriorTiltAngle": 0.0,
        "rlnSigmaPriorPsiAngle": 0.0, "rlnLogLikelihood": 0.0, "rlnAveragePmax": 1.0,
    }
    model_classes = pd.DataFrame({
        "rlnReferenceImage": [f"{j + 1:06d}@{portable_path(classes)}" for j in range(k)],
        "rlnClassDistribution": distribution,
        "rlnAccuracyRotations": np.asarray(accuracy_rotations, np.float64),
        "rlnAccuracyTranslationsAngst": np.asarray(accuracy_translations, np.float64),
        "rlnEstimatedResolution": resolution,
        "rlnOverallFourierCompleteness": np.ones(k),
        "rlnClassPriorOffsetX": np.zeros(k),
        "rlnClassPriorOffsetY": np.zeros(k),
    })
    blocks = {"model_general": model_general, "model_classes": model_classes}
    with np.errstate(divide="ignore"):
        angstrom = np.where(freq > 0, 1.0 / np.where(freq > 0, freq, 1.0), 999.0)
    for j in range(k):
        blocks[f"model_class_{j + 1}"] = pd.DataFrame({
            "rlnSpectralIndex": shells, "rlnResolution": freq, "rlnAngstromResolution": angstrom,
            "rlnSsnrMap": ssnr[j], "rlnGoldStandardFsc": frc[j], "rlnFourierCompleteness": np.ones(len(shells)),
            "rlnReferenceSigma2": np.ones(len(shells)), "rlnReferenceTau2": ssnr[j],
            "rlnSpectralOrientabilityContribution": np.zeros(len(shells)),
        })
    blocks["model_groups"] = pd.DataFrame({"rlnGroupNumber": [1], "rlnGroupName": ["group"],
                                           "rlnGroupNrParticles": [len(particles)], "rlnGroupScaleCorrection": [1.0]})
    noise = pd.DataFrame({"rlnSpectralIndex": shells, "rlnResolution": freq, "rlnSigma2Noise": np.ones(len(shells))})
    blocks["model_group_1"] = noise  # RELION 3.1 (and RELION 5 reading a model without rlnNrOpticsGroups)
    groups = sorted(set(particles["rlnOpticsGroup"].astype(int))) if "rlnOpticsGroup" in particles else [1]
    for g in groups:
        blocks[f"model_optics_group_{g}"] = noise  # RELION 4/5's name of the same noise spectrum
    model = stem.with_name(root + "_model.star")
    _write_star(model, blocks)

    table = particles.assign(rlnGroupNumber=1, rlnAngleRot=0.0, rlnAngleTilt=0.0, rlnNormCorrection=1.0,
                             rlnLogLikeliContribution=0.0, rlnMaxValueProbDistribution=1.0,
                             rlnNrOfSignificantSamples=1)
    optics, rows = split_optics(table, pixel_size=pixel_size, box_size=box)
    data = stem.with_name(root + "_data.star")
    _write_star(data, {"optics": optics, "particles": rows})

    sampling = stem.with_name(root + "_sampling.star")
    _write_star(sampling, {"sampling_general": {
        "rlnIs3DSampling": 0, "rlnIs3DTranslationalSampling": 0, "rlnPsiStep": 6.0, "rlnOffsetRange": 5.0,
        "rlnOffsetStep": 1.0, "rlnHelicalOffsetStep": -1.0, "rlnSamplingPerturbInstance": 0.0,
        "rlnSamplingPerturbFactor": 0.5, "rlnHealpixOrderOriginal": 2, "rlnPsiStepOriginal": 6.0,
        "rlnOffsetRangeOriginal": 5.0, "rlnOffsetStepOriginal": 1.0}})
    optimiser = stem.with_name(root + "_optimiser.star")
    _write_star(optimiser, {"optimiser_general": _optimiser_general(
        portable_path(folder / "run"), portable_path(model), portable_path(data), portable_path(sampling),
        particle_diameter=particle_diameter, do_ctf=do_ctf,
        accuracy=(float(np.mean(accuracy_rotations)) if k else 0.0,
                  float(np.mean(accuracy_translations)) if k else 0.0),
        best_resolution=1.0 / float(np.min(resolution)) if k else 0.0)})
    return {optimiser: NODE_OPTIMISER, data: NODE_PARTICLES}


def _optimiser_general(root: str, model: str, data: str, sampling: str, *, particle_diameter: float, do_ctf: bool,
                       accuracy: tuple[float, float], best_resolution: float) -> dict:
    """The ``optimiser_general`` table ``MlOptimiser::read`` requires (RELION 3.1 ``src/ml_optimiser.cpp``), with
    the values of a finished, converged Class2D run that split no halves. The iteration counter is 1 although the
    files are named ``it000``: ``relion_refine`` treats iteration 0 as a fresh start (it would ask for ``--ref``),
    so only a counter of at least 1 lets ``relion_refine --continue`` take the bundle as a finished iteration."""
    return {
        "rlnOutputRootName": root, "rlnModelStarFile": model, "rlnExperimentalDataStarFile": data,
        "rlnOrientSamplingStarFile": sampling, "rlnCurrentIteration": 1, "rlnNumberOfIterations": 1,
        "rlnDoSplitRandomHalves": 0, "rlnJoinHalvesUntilThisResolution": -1.0, "rlnAdaptiveOversampleOrder": 1,
        "rlnAdaptiveOversampleFraction": 0.999, "rlnRandomSeed": 0, "rlnParticleDiameter": float(particle_diameter),
        "rlnWidthMaskEdge": 5, "rlnDoZeroMask": 1, "rlnDoSolventFlattening": 0, "rlnDoSolventFscCorrection": 0,
        "rlnSolventMaskName": "None", "rlnSolventMask2Name": "None", "rlnBodyStarFile": "None",
        "rlnTauSpectrumName": "None", "rlnMaximumCoarseImageSize": -1, "rlnHighresLimitExpectation": -1.0,
        "rlnLowresLimitExpectation": -1.0, "rlnIncrementImageSize": 10, "rlnDoMapEstimation": 1,
        "rlnDoFastSubsetOptimisation": 0, "rlnDoExternalReconstruct": 0, "rlnDoStochasticGradientDescent": 0,
        "rlnDoStochasticEM": 0, "rlnDoAutoRefine": 0, "rlnAutoLocalSearchesHealpixOrder": 4,
        "rlnNumberOfIterWithoutResolutionGain": 0, "rlnBestResolutionThusFar": best_resolution,
        "rlnNumberOfIterWithoutChangingAssignments": 0, "rlnDoSkipAlign": 0, "rlnDoSkipRotate": 0,
        "rlnOverallAccuracyRotations": accuracy[0], "rlnOverallAccuracyTranslationsAngst": accuracy[1],
        "rlnChangesOptimalOrientations": 0.0, "rlnChangesOptimalOffsets": 0.0, "rlnChangesOptimalClasses": 0.0,
        "rlnSmallestChangesOrientations": 0.0, "rlnSmallestChangesOffsets": 0.0, "rlnSmallestChangesClasses": 0,
        "rlnLocalSymmetryFile": "None", "rlnDoHelicalRefine": 0, "rlnIgnoreHelicalSymmetry": 0,
        "rlnFourierMask": "None", "rlnHasConverged": 1, "rlnHasHighFscAtResolLimit": 0,
        "rlnHasLargeSizeIncreaseIterationsAgo": 0, "rlnDoCorrectNorm": 0, "rlnDoCorrectScale": 0,
        "rlnDoCorrectCtf": int(do_ctf), "rlnDoIgnoreCtfUntilFirstPeak": 0, "rlnCtfDataArePhaseFlipped": 0,
        "rlnDoOnlyFlipCtfPhases": 0, "rlnRefsAreCtfCorrected": 1, "rlnFixSigmaNoiseEstimates": 0,
        "rlnFixSigmaOffsetEstimates": 0, "rlnMaxNumberOfPooledParticles": 1,
    }


def write_output_nodes(folder: Path, nodes: dict) -> None:
    """``RELION_OUTPUT_NODES.star`` (table ``output_nodes``: rlnPipeLineNodeName, rlnPipeLineNodeTypeLabel), which
    RELION 4/5's pipeliner reads after an External job to add its outputs as typed nodes; names are
    project-relative (relative to the working directory)."""
    table = pd.DataFrame({"rlnPipeLineNodeName": [portable_path(p) for p in nodes],
                          "rlnPipeLineNodeTypeLabel": list(nodes.values())})
    _write_star(Path(folder) / "RELION_OUTPUT_NODES.star", {"output_nodes": table})

