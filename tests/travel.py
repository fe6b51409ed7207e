"""Shared set-up of the tests/test_outputs_*.py files: a RELION project folder holding the fixture stack written by
relion_stack_create (tests/fixtures/relion_stack), a known classification of it and the output written from it."""

import shutil
from pathlib import Path

import numpy as np

from jisac import filters
from jisac import transforms as T
from jisac.io import open_stack, outputs, relion

FIXTURE = Path(__file__).parent / "fixtures" / "relion_stack"
PIXEL, BOX, RADIUS = 2.0, 24, 9
UNACCOUNTED = [45, 46, 47]


def truth():
    t = np.load(FIXTURE / "truth.npz")
    return {k: t[k] for k in t.files}


def known_result(stack_images: np.ndarray):
    """``(result, working stack, class_frc)``: the classification that the fixture's truth describes, in jisac's
    two steps (pre-alignment shift, then working-frame parameters), working frame = input frame (shrink ratio 1)."""
    t = truth()
    n = len(t["view"])
    full = T.make_transform(t["angle"], t["shift_x"], t["shift_y"], t["mirror"])
    pre = T.make_transform(0.0, t["prealign"][:, 0], t["prealign"][:, 1], False)
    working_params = T.compose(T.inverse(pre), full)  # compose(pre, working) = full
    params = np.stack([np.asarray(working_params.angle), np.asarray(working_params.shift_x),
                       np.asarray(working_params.shift_y), np.asarray(working_params.mirror, np.float32)], -1)
    working = np.asarray(T.apply_transform(stack_images, pre))  # the pre-shifted particles
    class_number = t["view"] + 1
    class_number[UNACCOUNTED] = 0
    params[UNACCOUNTED] = (0.0, 0.0, 0.0, -1.0)
    errors = np.full(n, 0.25, np.float32)
    errors[UNACCOUNTED] = np.nan
    k = len(t["views"])
    result = outputs.ClassificationResult(
        averages=t["views"], class_number=class_number, params=params.astype(np.float32), errors=errors,
        candidates=np.bincount(class_number, minlength=k + 1)[1:] + 2, history=(),
        parameters={"target_radius": RADIUS, "img_per_grp": 16}, seconds={})
    halves = relion.split_half_averages(class_number, result.params, working)
    frc = np.asarray(filters.fourier_ring_correlation(halves[:, 0], halves[:, 1]))
    return result, working, frc


def write_project(tmp_path: Path, monkeypatch, *, metadata_extra: dict | None = None):
    """A RELION project ``tmp_path/project`` (the working directory) with the fixture in Extract/job007/; jisac's
    output in ``project/Jisac/job010``. Returns ``(project, out, stack, result, frame)``."""
    project = tmp_path / "project"
    extract = project / "Extract" / "job007"
    extract.mkdir(parents=True)
    for name in ("particles.star", "particles.mrcs"):
        shutil.copy(FIXTURE / name, extract / name)
    monkeypatch.chdir(project)
    stack = open_stack(extract / "particles.star")
    result, _, frc = known_result(stack.read(np.arange(len(stack))))
    metadata = stack.metadata.assign(**(metadata_extra or {}))
    frame = outputs.InputFrame(metadata, PIXEL, BOX, 1.0, truth()["prealign"], str(extract / "particles.star"),
                               stack=stack, class_frc=frc)
    out = project / "Jisac" / "job010"
    outputs.write_run(out, result, frame)
    return project, out, stack, result, frame
