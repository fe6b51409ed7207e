"""ISAC from a configuration on a RELION stack: STAR in, RELION/SPHIRE files out; bad input fails fast."""

import dataclasses
import subprocess
import sys

import jax
import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from jisac import transforms as T
from jisac import config, run, synthetic
from jisac.io import hdf
from jisac.io.star import write_stack_and_star
from tests.helpers import class_purity

BOX, RADIUS, N = 48, 18, 240


@pytest.fixture(scope="module")
def star_stack(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stack")
    views, _ = synthetic.known_views(4, BOX, RADIUS)
    sim = synthetic.simulate(views, N, jax.random.key(0), 0.3, max_shift=1.0)
    meta = pd.DataFrame({"rlnMicrographName": [f"mic{i % 7}.mrc" for i in range(N)], "myTruth": sim.view})
    write_stack_and_star(folder / "particles.star", folder / "particles.mrcs", np.asarray(sim.images), meta,
                         pixel_size=1.5)
    return folder / "particles.star", sim.view, sim.moves


def small_config(stack, out, **isac):
    settings = dict(radius=RADIUS, img_per_grp=30, minimum_grp_size=20, target_radius=RADIUS, target_nx=BOX,
                    maxit=10, init_iter=2, stab_ali=3, rand_seed=0)
    settings.update(isac)
    return config.JisacConfig(
        output_dir=str(out), data=config.DataConfig(stack=str(stack)), isac=config.IsacConfig(**settings)
    )


def test_star_in_relion_and_sphire_files_out(star_stack, tmp_path):
    path, truth, moves = star_stack
    summary = run.run(small_config(path, tmp_path))
    assert summary["accounted_fraction"] >= 0.5
    particles = starfile.read(tmp_path / "particles.star")["particles"]
    assert len(particles) == N
    for column in ("rlnClassNumber", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst", "jisacMirror",
                   "jisacPixelError", "rlnMicrographName", "myTruth", "rlnImageName"):
        assert column in particles.columns, column
    np.testing.assert_array_equal(particles["myTruth"].to_numpy(), truth)  # input order and columns carried
    classes = particles["rlnClassNumber"].to_numpy()
    accounted = starfile.read(tmp_path / "accounted.star")["particles"]
    assert len(accounted) == (classes > 0).sum()
    # each class mostly holds one view
    assert class_purity(classes, truth) > 0.85
    # the HDF averages carry their members, the same as particles.star says
    headers = hdf.read_hdf_headers(tmp_path / "ordered_class_averages.hdf")
    assert len(headers) == summary["classes"]
    for k, h in enumerate(headers):
        members = np.sort(np.atleast_1d(h["members"]))
        np.testing.assert_array_equal(members, np.nonzero(classes == k + 1)[0])
        assert int(np.atleast_1d(h["n_objects"])[0]) == len(members)
    model = starfile.read(tmp_path / "class_averages.star")
    assert len(model) == summary["classes"]
    # the beautifier ran at the end (full box and pixel size, a resolution per class), the report was written,
    # and the beautifier runs alone on the finished folder too (beautify.run_dir)
    with mrcfile.open(tmp_path / "beautify" / "class_averages.mrcs") as mrc:
        assert mrc.data.shape == (summary["classes"], BOX, BOX) and mrc.voxel_size.x == pytest.approx(1.5)
    assert (tmp_path / "report.html").stat().st_size > 0
    again = run.beautify_existing(dataclasses.replace(small_config(path, tmp_path), beautify=config.BeautifyConfig(
        run_dir=str(tmp_path), out_dir=str(tmp_path / "again"))))
    assert (tmp_path / "again" / "class_averages.mrcs").exists() and again
    # psi and origins against the truth: a particle is its view moved by ``moves``, so the alignment that the STAR
    # file describes (input pixels) composed after ``moves`` is the same rigid transform for every member of a
    # class (the class average's own frame is arbitrary): its angle, shift and mirror flag must agree
    found = T.from_relion(particles["rlnAnglePsi"], particles["rlnOriginXAngst"], particles["rlnOriginYAngst"],
                          particles["jisacMirror"].to_numpy() > 0, pixel_size_angst=1.5)
    frame = T.compose(moves, found)  # (n,): the class frame seen from each particle's own view
    for c in np.unique(classes[classes > 0]):
        m = (classes == c) & (truth == np.bincount(truth[classes == c]).argmax())  # the class's own view
        angle = np.asarray(frame.angle)[m]
        mean = np.degrees(np.angle(np.mean(np.exp(1j * np.radians(angle)))))
        spread = np.abs((angle - mean + 180) % 360 - 180)
        assert np.median(spread) < 2.0 and np.quantile(spread, 0.9) < 5.0, (c, np.sort(spread)[-5:])
        for f in (frame.shift_x, frame.shift_y):
            off = np.asarray(f)[m] - np.median(np.asarray(f)[m])
            assert np.quantile(np.abs(off), 0.9) < 1.0, (c, np.sort(np.abs(off))[-5:])  # px
        mirrored = np.asarray(frame.mirror)[m].mean()
        assert max(mirrored, 1 - mirrored) >= 0.95, (c, mirrored)  # one mirror relation per class


def test_bad_input_fails_before_work(star_stack, tmp_path):
    path = star_stack[0]
    with pytest.raises(ValueError, match="isac.radius is required"):
        run.run(small_config(path, tmp_path, radius=None))
    with pytest.raises(ValueError, match="minimum_grp_size"):
        run.run(small_config(path, tmp_path, minimum_grp_size=40))
    with pytest.raises(ValueError, match="rlnDefocusU"):
        run.run(small_config(path, tmp_path, ctf=True))
    with pytest.raises(ValueError, match="between 1 and half the box"):
        run.run(small_config(path, tmp_path, radius=30))
    with pytest.raises(FileNotFoundError, match="nothing.star"):
        run.run(small_config(tmp_path / "nothing.star", tmp_path))


@pytest.mark.slow
def test_command_line_reports_one_line_errors(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "jisac", f"data.stack={tmp_path}/missing.star", "isac.radius=10",
         f"output_dir={tmp_path}/o"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "jisac: error:" in proc.stderr and "missing.star" in proc.stderr
    assert "Traceback" not in proc.stderr
