"""cryoSPARC files of a result, read back with cryosparc-tools' own Dataset; and a RELION-ready substack whatever
the input format (.cs stacks are .mrc files RELION refuses, HDF stacks RELION cannot read)."""

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import starfile

from jisac.io import hdf, open_stack, outputs
from tests.travel import PIXEL, UNACCOUNTED, write_project

Dataset = pytest.importorskip("cryosparc.dataset").Dataset
CS_FIXTURE = Path(__file__).parent / "fixtures" / "cs_project"
needs_relion = pytest.mark.skipif(shutil.which("relion_image_handler") is None, reason="RELION is not installed")


def test_particles_and_templates_read_back_with_cryosparc_tools(tmp_path, monkeypatch):
    n = 48
    uids = np.arange(n, dtype=np.uint64) * 7919 + 2**40  # as the .cs reader keeps them
    _, out, stack, result, _ = write_project(tmp_path, monkeypatch, metadata_extra={"csUid": uids})
    particles = Dataset.load(out / "cryosparc" / "particles.cs")
    index = np.setdiff1d(np.arange(n), UNACCOUNTED)
    np.testing.assert_array_equal(particles["uid"], uids[index])
    np.testing.assert_array_equal(particles["alignments2D/class"], result.class_number[index] - 1)
    relion_ready = starfile.read(out / "accounted_relion.star")["particles"]
    np.testing.assert_allclose(particles["alignments2D/pose"], np.radians(relion_ready["rlnAnglePsi"]), atol=1e-5)
    shift = np.stack([relion_ready["rlnOriginXAngst"], relion_ready["rlnOriginYAngst"]], -1) / PIXEL
    np.testing.assert_allclose(particles["alignments2D/shift"], shift, atol=1e-4)
    np.testing.assert_array_equal(particles["blob/idx"], np.arange(len(index)))
    assert set(particles["blob/path"]) == {"Jisac/job010/accounted_particles.mrcs"}
    np.testing.assert_allclose(particles["blob/psize_A"], PIXEL)
    np.testing.assert_array_equal(particles["jisac/flipped"], relion_ready["jisacFlipped"])
    np.testing.assert_allclose(particles["ctf/df_angle_rad"], np.radians(relion_ready["rlnDefocusAngle"]), atol=1e-5)
    assert set(np.unique(particles["alignments2D/split"])) == {0, 1}

    templates = Dataset.load(out / "cryosparc" / "templates.cs")
    assert len(templates) == 3 and len(np.unique(templates["uid"])) == 3
    np.testing.assert_array_equal(templates["blob/idx"], [0, 1, 2])  # = alignments2D/class
    assert set(templates["blob/path"]) == {"Jisac/job010/cryosparc/templates.mrc"}
    model = starfile.read(out / "relion" / "run_it000_model.star", always_dict=True)["model_classes"]
    np.testing.assert_allclose(templates["blob/res_A"], model["rlnEstimatedResolution"], rtol=1e-5)


def test_new_uids_without_a_cryosparc_input(tmp_path, monkeypatch):
    _, out, *_ = write_project(tmp_path, monkeypatch)
    uids = Dataset.load(out / "cryosparc" / "particles.cs")["uid"]
    assert len(np.unique(uids)) == len(uids) == 45


def _one_class_result(n: int, box: int) -> outputs.ClassificationResult:
    mirror = (np.arange(n) % 2).astype(np.float32)
    params = np.stack([np.zeros(n), np.zeros(n), np.zeros(n), mirror], -1).astype(np.float32)
    return outputs.ClassificationResult(
        averages=np.zeros((1, box, box), np.float32), class_number=np.ones(n, np.int64), params=params,
        errors=np.full(n, 0.1, np.float32), candidates=np.asarray([n]), history=(),
        parameters={"target_radius": box // 4, "img_per_grp": n}, seconds={})


@pytest.mark.slow
@needs_relion
@pytest.mark.parametrize("kind", ["cs", "hdf"])
def test_relion_reads_the_substack_whatever_the_input(kind, tmp_path, monkeypatch):
    if kind == "cs":
        shutil.copytree(CS_FIXTURE, tmp_path / "cs_project")
        monkeypatch.chdir(tmp_path / "cs_project")
        source = Path("J9") / "particles_numpy.cs"
    else:
        monkeypatch.chdir(tmp_path)
        images = np.random.default_rng(0).normal(size=(5, 16, 16)).astype(np.float32)
        hdf.write_hdf_stack(tmp_path / "particles.hdf", images, 1.5)
        source = Path("particles.hdf")
    stack = open_stack(source)
    n, box = len(stack), stack.box_size
    frame = outputs.InputFrame(stack.metadata, float(stack.pixel_size), box, 1.0, np.zeros((n, 2)), str(source),
                               stack=stack)
    outputs.write_run(Path("out"), _one_class_result(n, box), frame)
    accounted = starfile.read("out/accounted.star")["particles"]["rlnImageName"]
    assert {name.rpartition(".")[2] for name in accounted} == {"mrc" if kind == "cs" else "hdf"}
    proc = subprocess.run(["relion_image_handler", "--i", "out/accounted_relion.star", "--stats"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-400:]
    assert proc.stdout.count(f"(x,y,z,n)= {box} x {box}") == n
    substack = np.asarray(open_stack("out/accounted_relion.star").read(np.arange(n)))
    originals = stack.read(np.arange(n))
    np.testing.assert_array_equal(substack[0::2], originals[0::2])  # unmirrored members are copied as they are
