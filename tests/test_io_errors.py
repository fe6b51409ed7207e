"""Bad input: each case raises the exact error type with one line naming the file/row/parameter."""

import numpy as np
import pandas as pd
import pytest
import starfile

from jisac.io import (StackError, StackFileNotFoundError, check_finite, mrc, open_stack, require_ctf_columns,
                      require_pixel_size)
from tests.helpers import raises_one_line


def _images(n, box=16, ny=None, seed=0):
    return np.random.default_rng(seed).normal(size=(n, ny or box, box)).astype(np.float32)


_raises = raises_one_line


def _star(path, names, **columns):
    particles = pd.DataFrame({"rlnImageName": names, **columns})
    starfile.write({"particles": particles}, path)  # a RELION 3.0-style single table


def test_missing_file(tmp_path):
    _raises(StackFileNotFoundError, lambda: open_stack(tmp_path / "nope.star"), tmp_path / "nope.star")
    assert issubclass(StackFileNotFoundError, FileNotFoundError) and issubclass(StackError, ValueError)


def test_unknown_extension(tmp_path):
    (tmp_path / "particles.txt").write_text("hello")
    _raises(StackError, lambda: open_stack(tmp_path / "particles.txt"), "particles.txt", ".star")


def test_bdb_explains_conversion():
    _raises(StackError, lambda: open_stack("bdb:stacks#data"), "bdb:stacks#data", "e2proc2d.py bdb:stacks#data")


def test_star_without_image_name(tmp_path):
    starfile.write({"particles": pd.DataFrame({"rlnCoordinateX": [1.0, 2.0]})}, tmp_path / "coords.star")
    _raises(StackError, lambda: open_stack(tmp_path / "coords.star"), tmp_path / "coords.star", "_rlnImageName")


def test_not_a_star_file(tmp_path):
    (tmp_path / "broken.star").write_bytes(b"\x00\x01 not a star file")
    _raises(StackError, lambda: open_stack(tmp_path / "broken.star"), tmp_path / "broken.star")


def test_bad_image_name(tmp_path):
    mrc.write_stack(tmp_path / "a.mrcs", _images(2), 1.0)
    _star(tmp_path / "p.star", ["1@a.mrcs", "x@a.mrcs"])
    _raises(StackError, lambda: open_stack(tmp_path / "p.star"), tmp_path / "p.star", "row 2", "x@a.mrcs")


def test_referenced_stack_missing(tmp_path):
    mrc.write_stack(tmp_path / "a.mrcs", _images(2), 1.0)
    _star(tmp_path / "p.star", ["1@a.mrcs", "2@a.mrcs", "1@gone/b.mrcs"])
    _raises(StackFileNotFoundError, lambda: open_stack(tmp_path / "p.star"),
            tmp_path / "p.star", "row 3", "gone/b.mrcs")


def test_index_beyond_stack(tmp_path):
    mrc.write_stack(tmp_path / "a.mrcs", _images(3), 1.0)
    _star(tmp_path / "p.star", ["1@a.mrcs", "3@a.mrcs", "4@a.mrcs"])
    _raises(StackError, lambda: open_stack(tmp_path / "p.star"),
            tmp_path / "p.star", "row 3", "image 4", "holds 3 images", "a.mrcs")


def test_index_zero_is_rejected(tmp_path):
    mrc.write_stack(tmp_path / "a.mrcs", _images(3), 1.0)
    _star(tmp_path / "p.star", ["1@a.mrcs", "0@a.mrcs"])
    _raises(StackError, lambda: open_stack(tmp_path / "p.star"), "row 2", "0@a.mrcs")


def test_non_square_images(tmp_path):
    mrc.write_stack(tmp_path / "rect.mrcs", _images(2, box=16, ny=20), 1.0)
    _raises(StackError, lambda: open_stack(tmp_path / "rect.mrcs"), tmp_path / "rect.mrcs", "16 x 20", "square")


def test_mixed_box_sizes(tmp_path):
    mrc.write_stack(tmp_path / "a.mrcs", _images(2, box=16), 1.0)
    mrc.write_stack(tmp_path / "b.mrcs", _images(2, box=24), 1.0)
    _star(tmp_path / "p.star", ["1@a.mrcs", "1@b.mrcs"])
    _raises(StackError, lambda: open_stack(tmp_path / "p.star"), "b.mrcs", "24 px", "16 px", "one box size")


def test_mixed_pixel_sizes(tmp_path):
    mrc.write_stack(tmp_path / "a.mrcs", _images(2), 1.0)
    _star(tmp_path / "p.star", ["1@a.mrcs", "2@a.mrcs"], rlnImagePixelSize=[1.0, 1.3])
    _raises(StackError, lambda: open_stack(tmp_path / "p.star"), tmp_path / "p.star", "pixel sizes")


def test_pixel_size_missing_or_zero(tmp_path):
    mrc.write_stack(tmp_path / "a.mrcs", _images(2), 0.0)  # header voxel size 0
    with open_stack(tmp_path / "a.mrcs") as stack:
        assert stack.pixel_size is None
        _raises(StackError, stack.require_pixel_size, tmp_path / "a.mrcs", "pixel_size")
        _raises(StackError, lambda: require_pixel_size(stack), "pixel size unknown")
    with open_stack(tmp_path / "a.mrcs", pixel_size=1.7) as stack:
        assert require_pixel_size(stack) == 1.7


def test_require_ctf_columns(tmp_path):
    metadata = pd.DataFrame({"rlnImageName": ["1@a.mrcs"], "rlnDefocusU": [1e4], "rlnVoltage": [300.0]})
    message = _raises(StackError, lambda: require_ctf_columns(metadata, tmp_path / "p.star"), tmp_path / "p.star",
                      "_rlnDefocusV", "_rlnDefocusAngle", "_rlnSphericalAberration", "_rlnAmplitudeContrast",
                      "isac.ctf")
    assert "_rlnDefocusU" not in message and "_rlnVoltage," not in message
    full = pd.DataFrame({c: [1.0, np.nan] for c in ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnVoltage",
                                                     "rlnSphericalAberration", "rlnAmplitudeContrast")})
    _raises(StackError, lambda: require_ctf_columns(full, "p.star"), "p.star", "rows 2")


def test_check_finite_raises_naming_images():
    images = _images(8)
    for i in (1, 3, 4, 5, 6, 7):
        images[i, 0, 0] = np.nan
    images[3, 1, 1] = -np.inf
    message = _raises(StackError, lambda: check_finite(images, np.arange(100, 108), source="stack.mrcs"),
                      "stack.mrcs", "6 image(s)", "101, 103, 104, 105, 106 ...", "drop_nonfinite")
    assert "107" not in message


def test_cs_without_blob_fields(tmp_path):
    with open(tmp_path / "bad.cs", "wb") as f:
        np.save(f, np.zeros(3, [("uid", "<u8"), ("ctf/df1_A", "<f4")]))
    _raises(StackError, lambda: open_stack(tmp_path / "bad.cs"), tmp_path / "bad.cs", "blob/path")


def test_hdf_without_eman2_layout(tmp_path):
    import h5py

    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["data"] = np.zeros((2, 4, 4))
    _raises(StackError, lambda: open_stack(tmp_path / "other.h5"), tmp_path / "other.h5", "/MDF/images")


def test_bad_indexing_is_index_error(tmp_path):
    mrc.write_stack(tmp_path / "a.mrcs", _images(3), 1.0)
    with open_stack(tmp_path / "a.mrcs") as stack:
        with pytest.raises(IndexError):
            stack[[0, 3]]
        with pytest.raises(IndexError):
            stack[np.array([True, False])]
