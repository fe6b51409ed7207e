"""Outputs RELION takes as its own: image paths that resolve from the project folder, pixel sizes in every MRC, the
mirror-free substack checked with relion_stack_create's own resampling, and the Class2D bundle read (and written
back) by relion_refine's MlOptimiser::read. RELION tests skip when RELION is not installed."""

import os
import shutil
import subprocess
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile

from jisac import filters
from jisac.io import open_stack, relion
from tests.travel import BOX, PIXEL, UNACCOUNTED, truth, write_project

HAVE_RELION = shutil.which("relion_image_handler") is not None
needs_relion = pytest.mark.skipif(not HAVE_RELION, reason="RELION is not installed")


@pytest.fixture
def project(tmp_path, monkeypatch):
    return write_project(tmp_path, monkeypatch)


def _stack_paths(names) -> set[str]:
    return {n.partition("@")[2] for n in names}


def _correlation(a, b) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def test_image_paths_resolve_from_the_project_folder(project, tmp_path, monkeypatch):
    root, out, stack, result, _ = project
    # the input names 'N@particles.mrcs' resolve only beside the input STAR file; written names from the project
    particles = starfile.read(out / "particles.star")["particles"]
    assert _stack_paths(particles["rlnImageName"]) == {"Extract/job007/particles.mrcs"}
    relion_ready = starfile.read(out / "accounted_relion.star")["particles"]
    assert _stack_paths(relion_ready["rlnImageName"]) == {"Jisac/job010/accounted_particles.mrcs"}
    model = starfile.read(out / "class_averages.star")
    assert _stack_paths(model["rlnReferenceImage"]) == {"Jisac/job010/class_averages.mrcs"}
    bundle = starfile.read(out / "relion" / "run_it000_model.star", always_dict=True)["model_classes"]
    assert _stack_paths(bundle["rlnReferenceImage"]) == {"Jisac/job010/relion/run_it000_classes.mrcs"}
    for name in ("particles.star", "accounted.star", "accounted_relion.star"):
        expected = stack.read(np.arange(len(stack))) if name == "particles.star" else None
        with open_stack(out / name) as written:  # from the project folder
            if expected is not None:
                np.testing.assert_array_equal(written.read(np.arange(len(written))), expected)
    # from another folder, by RELION's rule alone (each path against the project folder)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for table in (particles, relion_ready):
        for path in _stack_paths(table["rlnImageName"]):
            assert not Path(path).is_absolute() and (root / path).is_file()
    for path in _stack_paths(model["rlnReferenceImage"]) | _stack_paths(bundle["rlnReferenceImage"]):
        assert (root / path).is_file()


def test_paths_outside_the_working_directory_are_absolute(tmp_path, monkeypatch):
    root, out, *_ = write_project(tmp_path, monkeypatch)
    inside = tmp_path / "elsewhere"
    inside.mkdir()
    monkeypatch.chdir(inside)  # now the project is outside the working directory
    from tests.travel import known_result
    from jisac.io import outputs
    stack = open_stack(root / "Extract" / "job007" / "particles.star")
    result, _, frc = known_result(stack.read(np.arange(len(stack))))
    frame = outputs.InputFrame(stack.metadata, PIXEL, BOX, 1.0, truth()["prealign"], str(stack.source), stack=stack,
                               class_frc=frc)
    outputs.write_run(inside / "o", result, frame)
    names = _stack_paths(starfile.read(inside / "o" / "particles.star")["particles"]["rlnImageName"])
    assert names == {str((root / "Extract" / "job007" / "particles.mrcs").resolve())}
    assert _stack_paths(starfile.read(inside / "o" / "class_averages.star")["rlnReferenceImage"]) == {
        "o/class_averages.mrcs"}


def test_every_mrc_carries_its_pixel_size(project):
    _, out, *_ = project
    expected = {"class_averages.mrcs": PIXEL, "accounted_particles.mrcs": PIXEL,
                "relion/run_it000_classes.mrcs": PIXEL, "cryosparc/templates.mrc": PIXEL}
    found = {str(p.relative_to(out)) for p in out.rglob("*.mrc*")}
    assert found == set(expected)
    for name, size in expected.items():
        with mrcfile.open(out / name, permissive=True) as m:
            assert float(m.voxel_size.x) == pytest.approx(size), name


def test_substack_is_the_accounted_particles_with_mirrored_ones_flipped(project):
    _, out, stack, result, _ = project
    t = truth()
    index = np.setdiff1d(np.arange(len(stack)), UNACCOUNTED)
    substack = mrcfile.read(out / "accounted_particles.mrcs")
    originals = stack.read(index)
    mirrored = t["mirror"][index]
    np.testing.assert_array_equal(substack[~mirrored], originals[~mirrored])
    # even box 24: column c takes column 24 - c about the centre 12; column 0 has no partner and keeps its value
    np.testing.assert_array_equal(substack[mirrored][..., 1:], originals[mirrored][..., 1:][..., ::-1])
    table = starfile.read(out / "accounted_relion.star")["particles"]
    np.testing.assert_array_equal(table["jisacFlipped"].to_numpy(), mirrored.astype(int))
    meta = stack.metadata.iloc[index]
    np.testing.assert_allclose(table["rlnDefocusAngle"], np.where(mirrored, -1, 1) * meta["rlnDefocusAngle"], atol=1e-4)


@pytest.mark.slow
@needs_relion
def test_relion_resamples_every_member_onto_its_class_average(project):
    """relion_stack_create --apply_transformation (RELION's own psi/origin resampling): every member of the
    mirror-free substack lands on its view as well as the unmirrored members do; accounted.star (original images,
    no mirror in RELION) gets only the unmirrored ones right, which is why the substack exists."""
    root, out, stack, *_ = project
    t = truth()
    index = np.setdiff1d(np.arange(len(stack)), UNACCOUNTED)
    mirrored = t["mirror"][index]
    scores = {}
    for name in ("accounted_relion", "accounted"):
        subprocess.run(["relion_stack_create", "--i", str((out / f"{name}.star").relative_to(root)), "--o",
                        f"aligned_{name}", "--apply_transformation"], cwd=root, check=True, capture_output=True)
        aligned = mrcfile.read(root / f"aligned_{name}.mrcs")
        scores[name] = np.asarray([_correlation(a, t["views"][t["view"][i]]) for a, i in zip(aligned, index)])
    free = scores["accounted_relion"]
    assert free.min() > 0.98, np.sort(free)[:5]  # bilinear resampling of 24 px blobs with 2 % noise
    assert abs(free[mirrored].mean() - free[~mirrored].mean()) < 0.01
    assert scores["accounted"][~mirrored].min() > 0.98
    assert scores["accounted"][mirrored].max() < 0.95  # an unrepresented mirror really is wrong


@pytest.mark.slow
@needs_relion
def test_relion_reads_the_particle_files(project):
    root, out, *_ = project
    for name in ("accounted.star", "accounted_relion.star", "relion/run_it000_data.star"):
        proc = subprocess.run(["relion_image_handler", "--i", str((out / name).relative_to(root)), "--stats"],
                              cwd=root, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-500:]
        assert proc.stdout.count("(x,y,z,n)= 24 x 24") == 45, name


def test_class2d_bundle_tables(project):
    _, out, _, result, frame = project
    model = starfile.read(out / "relion" / "run_it000_model.star", always_dict=True)
    general, classes = model["model_general"], model["model_classes"]
    assert general["rlnNrClasses"] == 3 and general["rlnOriginalImageSize"] == BOX
    assert general["rlnPixelSize"] == PIXEL
    for column in ("rlnReferenceImage", "rlnClassDistribution", "rlnAccuracyRotations",
                   "rlnAccuracyTranslationsAngst", "rlnEstimatedResolution", "rlnOverallFourierCompleteness",
                   "rlnClassPriorOffsetX", "rlnClassPriorOffsetY"):
        assert column in classes.columns, column
    sizes = np.asarray([len(m) for m in result.members()])
    np.testing.assert_allclose(classes["rlnClassDistribution"], sizes / sizes.sum(), atol=1e-6)
    assert classes["rlnClassDistribution"].sum() == pytest.approx(1.0, abs=1e-5)  # 6 decimals in the file
    # the resolution is the 0.143 crossing of the split-half FRC, as jisac.filters computes it
    expected = PIXEL / np.asarray(filters.frc_resolution(frame.class_frc, 0.143, BOX))
    np.testing.assert_allclose(classes["rlnEstimatedResolution"], expected, rtol=1e-5)
    for j in range(3):
        assert len(model[f"model_class_{j + 1}"]) == BOX // 2 + 1
    assert {"model_groups", "model_group_1", "model_optics_group_1"} <= set(model)
    nodes = starfile.read(out / "RELION_OUTPUT_NODES.star")
    assert dict(zip(nodes["rlnPipeLineNodeName"], nodes["rlnPipeLineNodeTypeLabel"])) == {
        "Jisac/job010/relion/run_it000_optimiser.star": relion.NODE_OPTIMISER,
        "Jisac/job010/relion/run_it000_data.star": relion.NODE_PARTICLES,
        "Jisac/job010/class_averages.star": relion.NODE_AVERAGES,
    }


def test_frc_crossing_is_filters_rule():
    rng = np.random.default_rng(3)
    frc = np.sort(rng.uniform(-0.2, 1.0, (20, 13)), axis=1)[:, ::-1]
    np.testing.assert_allclose(relion.frc_crossing(frc) / 24, np.asarray(filters.frc_resolution(frc, 0.143, 24)),
                               rtol=1e-6)


def test_averages_resampled_to_the_input_frame():
    """A Gaussian of width w working px is one of width w / s input px, centred on box // 2."""
    s, nw, box = 0.5, 32, 48
    yw, xw = np.mgrid[:nw, :nw] - nw // 2
    working = np.exp(-(xw**2 + yw**2) / (2 * 3.0**2))[None].astype(np.float32)
    y, x = np.mgrid[:box, :box] - box // 2
    expected = np.exp(-(x**2 + y**2) / (2 * (3.0 / s) ** 2))
    got = relion.to_input_box(working, s, box)[0]
    # bilinear error <= h^2/8 max|f''| per axis (h = 1 working px, |f''| <= 1/sigma^2 = 1/9): 0.014 per axis
    assert np.abs(got - expected).max() < 2 * 0.0139 + 1e-3


@pytest.mark.slow
@needs_relion
def test_relion_refine_reads_and_rewrites_the_bundle(project):
    """relion_refine --continue runs MlOptimiser::read (optimiser, model via MlModel::read, data, sampling) and,
    with --iter equal to the bundle's iteration, writes the model back through RELION's own writer."""
    root, out, *_ = project
    (root / "Cont").mkdir()
    proc = subprocess.run(["relion_refine", "--continue", "Jisac/job010/relion/run_it000_optimiser.star", "--o",
                           "Cont/run", "--iter", "1", "--j", "1", "--dont_combine_weights_via_disc"],
                          cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-800:] + proc.stderr[-800:]
    ours = starfile.read(out / "relion" / "run_it000_model.star", always_dict=True)["model_classes"]
    theirs = starfile.read(root / "Cont" / "run_it001_model.star", always_dict=True)["model_classes"]
    np.testing.assert_allclose(theirs["rlnClassDistribution"], ours["rlnClassDistribution"], atol=1e-5)
    # RELION recomputes the resolution from the SSNR map we wrote, by its own rule (the last shell before
    # SSNR < 1, i.e. a half-set FRC of 1/3; jisac's rlnEstimatedResolution is the coarser-looking 0.143 crossing)
    for j, theirs_res in enumerate(theirs["rlnEstimatedResolution"]):
        ssnr = starfile.read(out / "relion" / "run_it000_model.star", always_dict=True)[f"model_class_{j + 1}"]
        shell = int(np.argmax(ssnr["rlnSsnrMap"].to_numpy()[1:] < 1.0))  # first shell >= 1 below 1, minus one
        assert theirs_res == pytest.approx(BOX * PIXEL / shell, rel=1e-5)
        assert theirs_res >= ours["rlnEstimatedResolution"][j]
    np.testing.assert_allclose(mrcfile.read(root / "Cont" / "run_it001_classes.mrcs"),
                               mrcfile.read(out / "relion" / "run_it000_classes.mrcs"), atol=1e-5)
    data = starfile.read(root / "Cont" / "run_it001_data.star")["particles"]
    assert len(data) == 45 and os.path.basename(data["rlnImageName"].iloc[0].partition("@")[2]) == \
        "accounted_particles.mrcs"


def test_relion_external_job_arguments_become_jisac_overrides(tmp_path):
    from jisac import relion_external

    job = tmp_path / "External" / "job012"
    calls = []
    argv = ["--o", str(job), "--in_parts", "Extract/job007/particles.star", "--j", "4", "--isac.radius", "40"]
    assert relion_external.main(argv, run=lambda cmd: calls.append(cmd) or 0) == 0
    assert calls[0][1:] == ["-m", "jisac", "data.stack=Extract/job007/particles.star", f"output_dir={job}",
                            "isac.radius=40"]
    assert (job / "RELION_JOB_EXIT_SUCCESS").exists()
    assert relion_external.main(argv, run=lambda cmd: 2) == 2
    assert (job / "RELION_JOB_EXIT_FAILURE").exists() and not (job / "RELION_JOB_EXIT_SUCCESS").exists()
    assert relion_external.main(["--o", str(job)], run=lambda cmd: 0) == 2  # no --in_parts
