"""Bad or suspicious input is refused with one line that does not mislead, and the advice in a message works when
followed (issue "Bad input never gets through")."""

import logging
import re
import shutil
import subprocess

import mrcfile
import numpy as np
import pandas as pd
import pytest

from jisac.io import StackError, StackFileNotFoundError, mrc, open_stack, require_ctf_columns, require_pixel_size
from jisac.io.cryosparc import read_cs_table
from tests.helpers import raises_one_line


def _images(n, box=16, seed=0):
    return np.random.default_rng(seed).normal(size=(n, box, box)).astype(np.float32)


_raises = raises_one_line


# --------------------------------------------------------------------------------------------------- MRC


@pytest.mark.parametrize("dtype, mode", [(np.complex64, 4), (None, 3)])
def test_complex_mrc_is_refused(tmp_path, dtype, mode):
    path = tmp_path / "ft.mrcs"
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(np.zeros((2, 8, 8), np.complex64))
        m.set_image_stack()
    if mode == 3:  # mrcfile cannot write mode 3 (complex int16): same byte count as 2 float32 -> patch the mode
        with mrcfile.new(path, overwrite=True) as m:
            m.set_data(np.zeros((2, 8, 8), np.float32))
            m.set_image_stack()
        with open(path, "r+b") as f:
            f.seek(12)
            f.write(np.int32(3).tobytes())
    _raises(StackError, lambda: open_stack(path), path, f"mode {mode}", "complex")


def test_truncated_mrc_names_expected_and_actual_bytes(tmp_path):
    path = tmp_path / "cut.mrcs"
    mrc.write_stack(path, _images(4), 1.0)
    full = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(full - 100)
    message = _raises(StackError, lambda: open_stack(path), path, "shorter than its header promises",
                      f"{full - 100} bytes", f"expected {full}")
    assert "header does not describe" not in message


def test_volume_mrc_is_refused_but_stacks_are_not(tmp_path):
    volume = _images(8)
    with mrcfile.new(tmp_path / "map.mrc") as m:
        m.set_data(volume)  # mrcfile's default for 3D data: one volume, ispg 1
        assert int(m.header.ispg) == 1
    _raises(StackError, lambda: open_stack(tmp_path / "map.mrc"), tmp_path / "map.mrc", "3D volume", "16 x 16 x 8")
    # the same bytes named .mrcs, or an .mrc whose header says image stack (cryoSPARC's), are stacks
    shutil.copy(tmp_path / "map.mrc", tmp_path / "map.mrcs")
    mrc.write_stack(tmp_path / "stack.mrc", volume, 1.0)
    for name in ("map.mrcs", "stack.mrc"):
        with open_stack(tmp_path / name) as stack:
            assert len(stack) == 8
            np.testing.assert_array_equal(stack[:], volume)


@pytest.mark.parametrize("name", ["x.star", "x.mrcs", "x.hdf", "x.cs"])
def test_folder_named_like_a_file(tmp_path, name):
    (tmp_path / name).mkdir()
    message = _raises(StackError, lambda: open_stack(tmp_path / name), tmp_path / name, "is a folder, not a")
    assert "no such" not in message


def test_missing_file_still_says_no_such_file(tmp_path):
    _raises(StackFileNotFoundError, lambda: open_stack(tmp_path / "gone.mrcs"), "no such")


def test_write_stack_pixel_size_in_header(tmp_path):
    mrc.write_stack(tmp_path / "a.mrcs", _images(2), pixel_size=2.37)
    with mrcfile.open(tmp_path / "a.mrcs") as m:
        assert float(m.voxel_size.x) == pytest.approx(2.37, rel=1e-6)
        assert float(m.voxel_size.y) == pytest.approx(2.37, rel=1e-6)
        assert int(m.header.ispg) == 0
    mrc.write_stack(tmp_path / "b.mrcs", _images(2))  # default kept for callers that pass nothing
    with mrcfile.open(tmp_path / "b.mrcs") as m:
        assert float(m.voxel_size.x) == 1.0
    with open_stack(tmp_path / "a.mrcs") as stack:
        assert stack.pixel_size == pytest.approx(2.37, rel=1e-6)


@pytest.mark.skipif(shutil.which("relion_image_handler") is None, reason="RELION not installed")
def test_write_stack_pixel_size_seen_by_relion(tmp_path):
    mrc.write_stack(tmp_path / "a.mrcs", _images(3), pixel_size=2.37)
    out = subprocess.run(["relion_image_handler", "--i", str(tmp_path / "a.mrcs"), "--stats"], capture_output=True,
                         text=True, timeout=60, cwd=tmp_path)
    text = out.stdout + out.stderr
    sizes = [float(v) for v in re.findall(r"(?:angpix|pixel size)\D*?=?\s*([0-9.]+)", text, re.IGNORECASE)]
    assert sizes and all(s == pytest.approx(2.37, rel=1e-4) for s in sizes), text


# --------------------------------------------------------------------------------------------------- pixel size


def test_pixel_size_advice_works_when_followed(tmp_path):
    mrc.write_stack(tmp_path / "a.mrcs", _images(2), 0.0)  # header voxel size 0: unknown
    with open_stack(tmp_path / "a.mrcs") as stack:
        message = _raises(StackError, stack.require_pixel_size, tmp_path / "a.mrcs", "data.pixel_size=<A/px>")
    key = re.search(r"data\.(\w+)=", message).group(1)
    with open_stack(tmp_path / "a.mrcs", **{key: 1.7}) as stack:
        assert require_pixel_size(stack) == 1.7
        assert (stack.metadata["rlnImagePixelSize"] == 1.7).all()


def test_pixel_size_override_wins_and_must_be_positive(tmp_path):
    mrc.write_stack(tmp_path / "a.mrcs", _images(2), pixel_size=1.1)
    with open_stack(tmp_path / "a.mrcs", pixel_size=2.2) as stack:
        assert stack.pixel_size == 2.2 and (stack.metadata["rlnImagePixelSize"] == 2.2).all()
    for bad in (0, -1.0, float("nan"), "abc"):
        _raises(StackError, lambda: open_stack(tmp_path / "a.mrcs", pixel_size=bad), "data.pixel_size=")


# --------------------------------------------------------------------------------------------------- CTF values


def _ctf_table(n=3, **overrides):
    table = pd.DataFrame({"rlnDefocusU": np.linspace(1e4, 2e4, n), "rlnDefocusV": np.linspace(1e4, 2e4, n) - 500,
                          "rlnDefocusAngle": 10.0, "rlnVoltage": 300.0, "rlnSphericalAberration": 2.7,
                          "rlnAmplitudeContrast": 0.1})
    for column, values in overrides.items():
        table[column] = values
    return table


@pytest.mark.parametrize("column, values, needle", [
    ("rlnVoltage", [300.0, 0.0, 0.0], "not positive"),
    ("rlnVoltage", [-300.0] * 3, "not positive"),
    ("rlnVoltage", [300000.0] * 3, "not volts"),
    ("rlnSphericalAberration", [2.7, -1.0, 2.7], "negative"),
    ("rlnAmplitudeContrast", [10.0] * 3, "fraction"),
])
def test_impossible_ctf_values_are_refused(column, values, needle):
    message = _raises(StackError, lambda: require_ctf_columns(_ctf_table(**{column: values}), "p.star"),
                      "p.star", "_" + column, needle, "isac.ctf=false")
    assert "rows 2" in message or "rows 1" in message


def test_missing_cs_is_refused():
    table = _ctf_table().drop(columns=["rlnSphericalAberration"])
    _raises(StackError, lambda: require_ctf_columns(table, "p.star"), "_rlnSphericalAberration")


def test_suspicious_ctf_values_warn_one_line(caplog):
    with caplog.at_level(logging.WARNING, logger="jisac"):
        require_ctf_columns(_ctf_table(), "good.star")
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="jisac"):
        require_ctf_columns(_ctf_table(rlnDefocusU=[-1e4] * 3, rlnDefocusV=[-1.1e4] * 3), "neg.star")
        require_ctf_columns(_ctf_table(rlnDefocusU=[1e4, 2.5e5, 1e4]), "far.star")
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and all("\n" not in m for m in messages)
    assert "neg.star" in messages[0] and "negative defocus" in messages[0]
    assert "far.star" in messages[1] and "20 um" in messages[1] and "rows 2" in messages[1]


# --------------------------------------------------------------------------------------------------- cryoSPARC


def _cs_with(tmp_path, dtype_idx):
    (tmp_path / "J1").mkdir()
    mrc.write_stack(tmp_path / "J1" / "s.mrcs", _images(3), 1.0)
    records = np.zeros(3, [("uid", "<u8"), ("blob/path", "S16"), ("blob/idx", dtype_idx)])
    records["blob/path"] = "J1/s.mrcs"
    records["blob/idx"] = [0, 1.0, 2]
    (tmp_path / "J2").mkdir()
    with open(tmp_path / "J2" / "p.cs", "wb") as f:
        np.save(f, records)
    return tmp_path / "J2" / "p.cs"


def test_cs_float_index_is_refused(tmp_path):
    path = _cs_with(tmp_path, "<f4")
    _raises(StackError, lambda: read_cs_table(path), path, "blob/idx", "float32", "not an integer")


def test_cs_project_dir_advice_works_when_followed(tmp_path, tmp_path_factory):
    path = _cs_with(tmp_path, "<u4")
    moved = tmp_path_factory.mktemp("elsewhere") / "p.cs"
    shutil.copy(path, moved)
    message = _raises(StackFileNotFoundError, lambda: open_stack(moved), moved, "data.project_dir=<folder>")
    key = re.search(r"data\.(\w+)=", message).group(1)
    with open_stack(moved, **{key: tmp_path}) as stack:
        assert len(stack) == 3


def test_cs_not_a_dataset(tmp_path):
    (tmp_path / "junk.cs").write_bytes(b"hello, not a dataset at all")
    message = _raises(StackError, lambda: open_stack(tmp_path / "junk.cs"), tmp_path / "junk.cs",
                      "not a readable cryoSPARC .cs file")
    assert "pickle" not in message


def test_readers_called_directly_also_say_folder(tmp_path):
    from jisac.io import hdf, star

    for name, reader in [("a.star", star.read_star_table), ("a.hdf", hdf.read_hdf_table),
                         ("a.mrcs", mrc.read_mrc_table), ("a.cs", read_cs_table)]:
        (tmp_path / name).mkdir()
        _raises(StackError, lambda: reader(tmp_path / name), "is a folder")
