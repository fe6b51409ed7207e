"""RELION STAR files: 3.0 and 3.1 written by hand and by starfile, many stacks, relative paths, writers."""

import os

import numpy as np
import pandas as pd
import pytest
import starfile

from jisac.io import mrc, open_stack, require_ctf_columns, star


def _images(n, box=16, seed=0):
    return np.random.default_rng(seed).normal(size=(n, box, box)).astype(np.float32)


STAR_30 = """
data_

loop_
_rlnImageName #1
_rlnMicrographName #2
_rlnDefocusU #3
_rlnDefocusV #4
_rlnDefocusAngle #5
_rlnVoltage #6
_rlnSphericalAberration #7
_rlnAmplitudeContrast #8
_rlnMagnification #9
_rlnDetectorPixelSize #10
000002@Particles/a.mrcs mics/m1.mrc 10000.5 9800.25 12.5 300 2.7 0.1 50000 7.5
000001@Particles/a.mrcs mics/m1.mrc 11000.0 10800.0 -3.0 300 2.7 0.1 50000 7.5
3@Particles/b.mrcs      mics/m2.mrc 20000.0 19000.0 45.0 300 2.7 0.1 50000 7.5
"""

STAR_31 = """
# version 30001

data_optics

loop_
_rlnOpticsGroup #1
_rlnOpticsGroupName #2
_rlnAmplitudeContrast #3
_rlnSphericalAberration #4
_rlnVoltage #5
_rlnImagePixelSize #6
_rlnImageSize #7
_rlnImageDimensionality #8
           1 opticsGroup1     0.100000     2.700000   300.000000     1.500000           16            2
           2 opticsGroup2     0.070000     0.010000   200.000000     1.500000           16            2


# version 30001

data_particles

loop_
_rlnCoordinateX #1
_rlnCoordinateY #2
_rlnImageName #3
_rlnDefocusU #4
_rlnDefocusV #5
_rlnDefocusAngle #6
_rlnPhaseShift #7
_rlnOpticsGroup #8
  100.000000   200.000000 000003@Particles/b.mrcs 15000.000000 14000.000000    30.000000     0.000000            2
  110.000000   210.000000 000001@Particles/a.mrcs 12000.000000 11000.000000    10.000000    90.000000            1
  120.000000   220.000000 000002@Particles/b.mrcs 13000.000000 12500.000000    20.000000     0.000000            1
"""


@pytest.fixture
def project(tmp_path):
    """A RELION-like project: Particles/a.mrcs (2 images) and Particles/b.mrcs (3 images)."""
    a, b = _images(2, seed=1), _images(3, seed=2)
    (tmp_path / "Particles").mkdir()
    mrc.write_stack(tmp_path / "Particles" / "a.mrcs", a, 1.5)
    mrc.write_stack(tmp_path / "Particles" / "b.mrcs", b, 1.5)
    return tmp_path, a, b


def test_relion30_by_hand(project):
    root, a, b = project
    (root / "p30.star").write_text(STAR_30)
    with open_stack(root / "p30.star") as stack:
        assert len(stack) == 3 and stack.box_size == 16
        assert stack.pixel_size == pytest.approx(1.5)  # 7.5 µm * 1e4 / 50000
        np.testing.assert_array_equal(stack[:], np.stack([a[1], a[0], b[2]]))
        md = stack.metadata
        assert list(md["rlnImageName"]) == ["000002@Particles/a.mrcs", "000001@Particles/a.mrcs",
                                            "3@Particles/b.mrcs"]
        np.testing.assert_allclose(md["rlnDefocusU"], [10000.5, 11000.0, 20000.0])
        np.testing.assert_allclose(md["rlnDefocusV"], [9800.25, 10800.0, 19000.0])
        np.testing.assert_allclose(md["rlnDefocusAngle"], [12.5, -3.0, 45.0])
        assert list(md["rlnMicrographName"]) == ["mics/m1.mrc", "mics/m1.mrc", "mics/m2.mrc"]  # carried through
        assert (md["rlnOpticsGroup"] == 1).all()
        require_ctf_columns(md)


def test_relion31_by_hand_merges_optics(project):
    root, a, b = project
    (root / "p31.star").write_text(STAR_31)
    with open_stack(root / "p31.star") as stack:
        np.testing.assert_array_equal(stack[:], np.stack([b[2], a[0], b[1]]))
        md = stack.metadata
        np.testing.assert_allclose(md["rlnVoltage"], [200.0, 300.0, 300.0])
        np.testing.assert_allclose(md["rlnSphericalAberration"], [0.01, 2.7, 2.7])
        np.testing.assert_allclose(md["rlnAmplitudeContrast"], [0.07, 0.1, 0.1])
        np.testing.assert_allclose(md["rlnPhaseShift"], [0.0, 90.0, 0.0])
        np.testing.assert_allclose(md["rlnCoordinateX"], [100, 110, 120])
        assert list(md["rlnOpticsGroupName"]) == ["opticsGroup2", "opticsGroup1", "opticsGroup1"]
        assert stack.pixel_size == pytest.approx(1.5)
        require_ctf_columns(md)


def test_star_written_by_starfile_many_stacks(tmp_path):
    """Ten stacks in a subfolder, particles interleaved across them; a starfile-written 3.1 file."""
    stacks = [_images(4, seed=k) for k in range(10)]
    (tmp_path / "Extract").mkdir()
    for k, images in enumerate(stacks):
        mrc.write_stack(tmp_path / "Extract" / f"mic{k}.mrcs", images, 2.0)
    rng = np.random.default_rng(0)
    pairs = [(k, i) for k in range(10) for i in range(4)]
    pairs = [pairs[j] for j in rng.permutation(len(pairs))]
    particles = pd.DataFrame({
        "rlnImageName": [f"{i + 1:06d}@Extract/mic{k}.mrcs" for k, i in pairs],
        "rlnDefocusU": rng.uniform(5000, 30000, len(pairs)),
        "rlnDefocusV": rng.uniform(5000, 30000, len(pairs)),
        "rlnDefocusAngle": rng.uniform(-180, 180, len(pairs)),
        "rlnOpticsGroup": 1,
    })
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["og"], "rlnImagePixelSize": [2.0],
                           "rlnVoltage": [300.0], "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1],
                           "rlnImageSize": [16], "rlnImageDimensionality": [2]})
    starfile.write({"optics": optics, "particles": particles}, tmp_path / "particles.star")
    with open_stack(tmp_path / "particles.star") as stack:
        expected = np.stack([stacks[k][i] for k, i in pairs])
        np.testing.assert_array_equal(stack[:], expected)
        for indices, images in stack.iter_batches(7):
            np.testing.assert_array_equal(images, expected[indices])
        np.testing.assert_allclose(stack.metadata["rlnDefocusU"], particles["rlnDefocusU"], rtol=1e-6)
        assert (stack.metadata["rlnVoltage"] == 300.0).all()


def test_relative_paths_fall_back_to_working_directory(project, monkeypatch):
    """The STAR file sits in a job folder; its paths are relative to the project folder (the cwd)."""
    root, a, b = project
    (root / "Class2D" / "job001").mkdir(parents=True)
    (root / "Class2D" / "job001" / "p31.star").write_text(STAR_31)
    monkeypatch.chdir(root)
    with open_stack(root / "Class2D" / "job001" / "p31.star") as stack:
        np.testing.assert_array_equal(stack[1], a[0])


def test_absolute_paths(project):
    root, a, b = project
    text = STAR_30.replace("Particles/", f"{root}/Particles/")
    (root / "sub").mkdir()
    (root / "sub" / "abs.star").write_text(text)
    with open_stack(root / "sub" / "abs.star") as stack:
        np.testing.assert_array_equal(stack[2], b[2])


def test_write_stack_and_star_round_trip(project):
    """Read 3.1 -> write a new stack + STAR with new columns -> read back: images, input and new columns."""
    root, a, b = project
    (root / "p31.star").write_text(STAR_31)
    with open_stack(root / "p31.star") as stack:
        images, metadata = stack[:], stack.metadata
    new = {"rlnClassNumber": [3, 1, 2], "rlnAnglePsi": [10.0, -20.5, 0.25]}
    out = root / "out"
    star.write_stack_and_star(out / "isac.star", out / "stacks" / "shrunk.mrcs", images, metadata, new,
                              pixel_size=1.5)
    text = (out / "isac.star").read_text()
    assert "data_optics" in text and "data_particles" in text and "000001@stacks/shrunk.mrcs" in text
    blocks = starfile.read(out / "isac.star", always_dict=True)
    assert {"rlnVoltage", "rlnImagePixelSize", "rlnImageSize"} <= set(blocks["optics"].columns)
    assert "rlnVoltage" not in blocks["particles"].columns  # optics values go to data_optics
    with open_stack(out / "isac.star") as back:
        np.testing.assert_array_equal(back[:], images)
        md = back.metadata
        np.testing.assert_array_equal(md["rlnClassNumber"], [3, 1, 2])
        np.testing.assert_allclose(md["rlnAnglePsi"], [10.0, -20.5, 0.25])
        for column in ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnPhaseShift", "rlnVoltage",
                       "rlnSphericalAberration", "rlnAmplitudeContrast", "rlnCoordinateX"):
            np.testing.assert_allclose(md[column], metadata[column], rtol=1e-6, err_msg=column)
        assert list(md["rlnOpticsGroup"]) == list(metadata["rlnOpticsGroup"])
        assert back.pixel_size == pytest.approx(1.5)


def test_write_particle_star_is_atomic(tmp_path, monkeypatch):
    """A failed write leaves neither the file nor a temporary behind."""
    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(starfile, "write", fail)
    with pytest.raises(RuntimeError):
        star.write_particle_star(tmp_path / "x.star", pd.DataFrame({"rlnImageName": ["1@a.mrcs"]}))
    assert os.listdir(tmp_path) == []
