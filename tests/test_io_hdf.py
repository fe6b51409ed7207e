"""EMAN2/SPHIRE HDF stacks: the layout written, read back with members/n_objects and CTF."""

import h5py
import numpy as np
import pytest

from jisac.io import open_stack
from jisac.io.hdf import parse_eman2_ctf, read_hdf_headers, write_class_averages, write_hdf_stack


def _images(n, box=16, seed=0):
    return np.random.default_rng(seed).normal(size=(n, box, box)).astype(np.float32)


def test_class_averages_layout_and_round_trip(tmp_path):
    averages = _images(4)
    members = [[0, 5, 9], [1], [2, 3, 4, 6, 7], [8, 10]]
    path = tmp_path / "class_averages.hdf"
    write_class_averages(path, averages, members, pixel_size_angst=3.2)

    with h5py.File(path, "r") as f:  # EMAN2's layout, checked directly
        group = f["MDF/images"]
        assert int(np.asarray(group.attrs["imageid_max"]).reshape(-1)[0]) == 3
        assert sorted(group.keys(), key=int) == ["0", "1", "2", "3"]
        image = group["2/image"]
        assert image.dtype == np.float32 and image.shape == (16, 16)
        attrs = group["2"].attrs
        assert attrs["EMAN.members"].dtype == np.int32
        np.testing.assert_array_equal(attrs["EMAN.members"], [2, 3, 4, 6, 7])
        assert int(np.asarray(attrs["EMAN.n_objects"]).reshape(-1)[0]) == 5
        for axis in "xyz":
            assert float(np.asarray(attrs[f"EMAN.apix_{axis}"]).reshape(-1)[0]) == pytest.approx(3.2)

    headers = read_hdf_headers(path)
    assert [list(h["members"]) for h in headers] == members
    assert [h["n_objects"] for h in headers] == [3, 1, 5, 2]
    assert headers[0]["apix_x"] == 3.2  # float32's shortest decimal

    with open_stack(path) as stack:
        assert stack.shape == (4, 16, 16) and stack.pixel_size == pytest.approx(3.2)
        np.testing.assert_array_equal(stack[:], averages)
        np.testing.assert_array_equal(stack[[3, 1]], averages[[3, 1]])
        assert [list(m) for m in stack.metadata["EMAN.members"]] == members
        assert list(stack.metadata["EMAN.n_objects"]) == [3, 1, 5, 2]


def test_hdf_headers_types_and_ctf(tmp_path):
    ctf = "E2.5 0.2 30 50 10 300 2.7 1.5 0.01 3,1,2,3 2,0.5,0.25"
    headers = [{"ctf": ctf, "flag": True, "ptcl_source_image": "mic1.mrc", "weights": [0.5, 1.5]},
               {"ctf": ctf, "flag": False, "ptcl_source_image": "mic2.mrc", "weights": [2.5, 1.0]}]
    path = tmp_path / "particles.hdf"
    write_hdf_stack(path, _images(2), 1.5, headers)
    back = read_hdf_headers(path)
    assert back[0]["flag"] is True and back[1]["flag"] is False
    assert back[1]["ptcl_source_image"] == "mic2.mrc" and back[0]["ctf"] == ctf
    np.testing.assert_allclose(back[1]["weights"], [2.5, 1.0])
    with open_stack(path) as stack:
        md = stack.metadata
        np.testing.assert_allclose(md["rlnDefocusU"], 26000.0)  # (2.5 + 0.2/2) µm
        np.testing.assert_allclose(md["rlnDefocusV"], 24000.0)
        np.testing.assert_allclose(md["rlnDefocusAngle"], 30.0)
        np.testing.assert_allclose(md["rlnAmplitudeContrast"], 0.1)
        np.testing.assert_allclose(md["rlnVoltage"], 300.0)
        np.testing.assert_allclose(md["rlnSphericalAberration"], 2.7)


def test_parse_eman2_ctf_rejects_other_strings():
    assert parse_eman2_ctf("O2.5 0 0 0 0 0 0 0") is None  # EMAN1 CTF: not read
    assert parse_eman2_ctf("E1 2 3") is None
    assert parse_eman2_ctf("hello") is None
    assert parse_eman2_ctf(None) is None
    assert parse_eman2_ctf("E1.0 0 0 0 7 200 2 1.0 0 0")["rlnAmplitudeContrast"] == pytest.approx(0.07)


def test_hdf_without_ctf_has_no_ctf_columns(tmp_path):
    path = tmp_path / "plain.hdf"
    write_hdf_stack(path, _images(3), 1.0)
    with open_stack(path) as stack:
        assert "rlnDefocusU" not in stack.metadata.columns


def test_star_from_hdf_metadata_drops_array_columns(tmp_path):
    """HDF headers carry through to STAR as scalar columns; array cells (EMAN.members) are left out."""
    import starfile

    from jisac.io import star

    write_class_averages(tmp_path / "c.hdf", _images(2), [[], [4, 7]], 2.0)
    with open_stack(tmp_path / "c.hdf") as stack:
        assert list(stack.metadata["EMAN.members"].iloc[0]) == [] and stack.metadata["EMAN.n_objects"][0] == 0
        star.write_particle_star(tmp_path / "c.star", stack.metadata, box_size=stack.box_size)
    particles = starfile.read(tmp_path / "c.star", always_dict=True)["particles"]
    assert "EMAN.members" not in particles.columns and list(particles["EMAN.n_objects"]) == [0, 2]
