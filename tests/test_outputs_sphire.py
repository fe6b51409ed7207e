"""The ISAC2 run files SPHIRE's beautifier (sp_compute_isac_avg.py) and sp_pipe.py isac_substack read, parsed
the way those scripts parse them (isac_algorithm.md §10, §12; field_formats.md §2b), give each member's full
alignment."""

import numpy as np
import pandas as pd

from jisac import transforms as T
from jisac.io import hdf, outputs
from tests.helpers import ANGLE_DEG, angle_difference
from tests.travel import UNACCOUNTED, truth

SHRINK, RADIUS_INPUT = 0.5, 18.0  # working px per input px; radius in input px (target_radius 9)


def read_text_row(path):
    """SPHIRE's sp_utilities.read_text_row: whitespace-split rows, each word int() if it parses, else float()."""
    rows = []
    for line in open(path):
        words = line.split()
        if not words:
            continue
        row = []
        for w in words:
            try:
                row.append(int(w))
            except ValueError:
                row.append(float(w))
        rows.append(row)
    return rows


def _write(tmp_path):
    """The fixture's truth as a run on a stack shrunk by 0.5: working shifts are input shifts x 0.5."""
    t = truth()
    n = len(t["view"])
    full = T.make_transform(t["angle"], t["shift_x"], t["shift_y"], t["mirror"])
    pre = T.make_transform(0.0, t["prealign"][:, 0], t["prealign"][:, 1], False)
    w = T.compose(T.inverse(pre), full)
    params = np.stack([np.asarray(w.angle), np.asarray(w.shift_x) * SHRINK, np.asarray(w.shift_y) * SHRINK,
                       np.asarray(w.mirror, np.float32)], -1).astype(np.float32)
    class_number = t["view"] + 1
    class_number[UNACCOUNTED] = 0
    params[UNACCOUNTED] = (0, 0, 0, -1)
    result = outputs.ClassificationResult(
        averages=np.zeros((3, 12, 12), np.float32), class_number=class_number, params=params,
        errors=np.where(class_number > 0, 0.2, np.nan).astype(np.float32), candidates=np.asarray([20, 20, 20]),
        history=(), parameters={"target_radius": 9, "img_per_grp": 16}, seconds={})
    metadata = pd.DataFrame({"rlnImageName": [f"{i + 1}@x.mrcs" for i in range(n)]})
    frame = outputs.InputFrame(metadata, 2.0, 24, SHRINK, t["prealign"], str(tmp_path / "x.star"))
    outputs.write_run(tmp_path, result, frame)
    return t, result, full


def test_beautifier_inputs_give_every_members_full_alignment(tmp_path):
    t, result, full = _write(tmp_path)
    # README_shrink_ratio.txt: the beautifier takes readlines()[5] and [6]
    lines = open(tmp_path / "README_shrink_ratio.txt").readlines()
    assert float(lines[5]) == SHRINK and float(lines[6]) == RADIUS_INPUT
    init = read_text_row(tmp_path / "2dalignment" / "initial2Dparams.txt")
    assert len(init) == len(t["view"]) and all(len(r) == 4 for r in init)
    assert all(r[0] == 0 and r[3] == 0 for r in init)  # [0, tx, ty, 0]
    np.testing.assert_allclose([r[1:3] for r in init], t["prealign"], atol=1e-6)
    isac = read_text_row(tmp_path / "all_parameters.txt")
    # members from class_averages.hdf, as the beautifier reads them
    headers = hdf.read_hdf_headers(tmp_path / "class_averages.hdf")
    assert len(headers) == 3
    for k, h in enumerate(headers):
        members = np.atleast_1d(h["members"]).astype(int)
        assert int(np.atleast_1d(h["n_objects"])[0]) == len(members)
        np.testing.assert_array_equal(np.sort(members), np.flatnonzero(result.class_number == k + 1))
        for i in members:
            a, sx, sy, m = isac[i]
            assert m in (0, 1)  # a member never has mirror -1 (the beautifier would warn, isac_substack stop)
            p0 = T.make_transform(*init[i][:3], bool(init[i][3]))
            p = T.compose(p0, T.make_transform(a, sx / SHRINK, sy / SHRINK, bool(m)))  # combine_params2
            assert angle_difference(p.angle, full.angle[i]) < ANGLE_DEG + 1e-3  # all_parameters.txt: 4 decimals
            np.testing.assert_allclose([p.shift_x, p.shift_y], [full.shift_x[i], full.shift_y[i]], atol=2e-3)
            assert bool(p.mirror) == bool(full.mirror[i])


def test_isac_substack_finds_an_isac_run(tmp_path):
    """sp_pipe.py isac_substack calls a folder an ISAC run when these four exist."""
    _write(tmp_path)
    for path in ("2dalignment", "README_shrink_ratio.txt", "2dalignment/initial2Dparams.txt", "all_parameters.txt"):
        assert (tmp_path / path).exists(), path
    for name in ("class_averages.hdf", "ordered_class_averages.hdf"):
        assert len(hdf.read_hdf_headers(tmp_path / name)) == 3
