"""jisac.select: a STAR substack of chosen classes: exactly their particles, every column and the optics kept."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import starfile

from jisac import ranking, select
from tests import fake_run

ROOT = Path(__file__).resolve().parents[1]


def _particles(path):
    return starfile.read(path, always_dict=True)


def test_substack_holds_exactly_the_chosen_classes_particles(tmp_path):
    made = fake_run.make_run(tmp_path)
    result = select.select(tmp_path, classes=[1, 3])
    assert result.classes == [1, 3] and result.path == tmp_path / "selected_particles.star"
    want = np.nonzero(np.isin(made["class_of"], [1, 3]))[0]
    assert result.particles == len(want) == 50
    full, sub = _particles(tmp_path / "particles.star"), _particles(result.path)
    pd.testing.assert_frame_equal(sub["optics"], full["optics"])  # the optics table unchanged
    expected = full["particles"].iloc[want].reset_index(drop=True)
    pd.testing.assert_frame_equal(sub["particles"], expected)  # every column, every value, input order
    assert set(sub["particles"]["rlnClassNumber"]) == {1, 3}
    for col in ("rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst", "jisacMirror", "jisacPixelError", "rlnDefocusU",
                "rlnImageName", "rlnOpticsGroup"):
        assert col in sub["particles"].columns
    np.testing.assert_allclose(sub["particles"]["jisacPixelError"], made["errors"][want], atol=1e-6)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # atomic: no temporary left


def test_thresholds(tmp_path):
    fake_run.make_run(tmp_path, resolution=True)
    table = ranking.class_table(tmp_path)
    cut = float(table["score"].iloc[2]) - 1e-9  # class 3's score: classes 1, 2, 3 score at least that
    assert select.choose_classes(table, min_score=cut) == [1, 2, 3]
    assert select.choose_classes(table, max_resolution_angst=12) == [1, 2]  # 9.5 and 11.0 A
    assert select.choose_classes(table, classes=[2, 3, 4], max_resolution_angst=12) == [2]  # all must hold
    result = select.select(tmp_path, max_resolution_angst=12, output=tmp_path / "out" / "good.star")
    assert result.particles == 55 and result.path.is_file()


def test_bad_requests_fail_with_one_line(tmp_path):
    fake_run.make_run(tmp_path)
    table = ranking.class_table(tmp_path)
    with pytest.raises(ValueError, match=r"classes: \[7\] not in this run"):
        select.choose_classes(table, classes=[1, 7])
    with pytest.raises(ValueError, match="no per-class resolution"):
        select.choose_classes(table, max_resolution_angst=12)
    with pytest.raises(ValueError, match="no class meets"):
        select.choose_classes(table, min_score=0.99)
    with pytest.raises(ValueError, match="give classes"):
        select.choose_classes(table)
    with pytest.raises(ValueError, match="between 0 and 1"):
        select.choose_classes(table, min_score=5)
    with pytest.raises(ValueError, match="no summary.json"):
        select.select(tmp_path / "nothing", classes=[1])


def test_parse_classes():
    assert select.parse_classes("[1,3,5]") == [1, 3, 5]
    assert select.parse_classes("5, 1 3") == [1, 3, 5]
    assert select.parse_classes("1-3,7") == [1, 2, 3, 7]
    for bad in ("[a]", "[]", "4-2"):
        with pytest.raises(ValueError, match="classes="):
            select.parse_classes(bad)


def test_command_line_with_key_value_arguments(tmp_path, capsys):
    fake_run.make_run(tmp_path, input_name="particles.cs")
    assert select.main([f"run_dir={tmp_path}", "classes=[2,4]"]) == 0
    out = capsys.readouterr()
    assert "37 particles of classes [2, 4]" in out.out
    assert ".cs substack is not written yet" in out.err
    sub = _particles(tmp_path / "selected_particles.star")["particles"]
    assert sorted(set(sub["rlnClassNumber"])) == [2, 4] and len(sub) == 37
    assert select.main([f"run_dir={tmp_path}", "classes=[9]"]) == 2
    assert "jisac.select: error: classes: [9] not in this run" in capsys.readouterr().err


def test_python_dash_m(tmp_path):
    """The documented command, in a fresh process (jisac.select must not shadow the standard library's select)."""
    fake_run.make_run(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "jisac.select", f"run_dir={tmp_path}", "classes=1-2",
                           f"output={tmp_path / 'one_two.star'}"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "55 particles of classes [1, 2]" in proc.stdout
    assert len(_particles(tmp_path / "one_two.star")["particles"]) == 55


def test_image_paths_relative_to_the_input_are_rewritten_to_open_from_the_output(tmp_path):
    """The demo's particles.star carries the input's relative names (N@particles.mrcs beside the input STAR);
    the substack must open where it is written."""
    import json

    from jisac.io import mrc, star

    inp = tmp_path / "input"
    inp.mkdir()
    mrc.write_stack(inp / "stack.mrcs", np.zeros((fake_run.N, 8, 8), np.float32), 2.0)
    (inp / "particles_in.star").write_text("placeholder\n")
    run = tmp_path / "run"
    fake_run.make_run(run)
    s = json.loads((run / "summary.json").read_text())
    s["input"] = str(inp / "particles_in.star")
    (run / "summary.json").write_text(json.dumps(s))
    result = select.select(run, classes=[2], output=tmp_path / "out" / "sub.star")
    assert any("rewritten" in n for n in result.notes)
    names = _particles(result.path)["particles"]["rlnImageName"]
    assert all(n.endswith("@../input/stack.mrcs") for n in names)
    table = star.read_star_table(result.path)  # jisac's reader resolves every stack from the output's folder
    assert len(table.metadata) == 25 and table.files == ((inp / "stack.mrcs").resolve(),)
