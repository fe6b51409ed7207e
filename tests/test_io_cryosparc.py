"""cryoSPARC .cs files made with np.save of a structured array."""

from pathlib import Path

import numpy as np
import pytest

from jisac.io import StackFileNotFoundError, mrc, open_stack, require_ctf_columns

_DTYPE = [("uid", "<u8"), ("blob/path", "S64"), ("blob/idx", "<u4"), ("blob/shape", "<u4", (2,)),
          ("blob/psize_A", "<f4"), ("ctf/accel_kv", "<f4"), ("ctf/cs_mm", "<f4"), ("ctf/amp_contrast", "<f4"),
          ("ctf/df1_A", "<f4"), ("ctf/df2_A", "<f4"), ("ctf/df_angle_rad", "<f4"), ("ctf/phase_shift_rad", "<f4")]


@pytest.fixture
def cs_project(tmp_path):
    """<project>/J3/extract/{m0,m1}.mrc and <project>/J5/particles.cs referring to them as '>J3/extract/...'."""
    rng = np.random.default_rng(0)
    stacks = [rng.normal(size=(3, 20, 20)).astype(np.float32) for _ in range(2)]
    (tmp_path / "J3" / "extract").mkdir(parents=True)
    (tmp_path / "J5").mkdir()
    for k, images in enumerate(stacks):
        mrc.write_stack(tmp_path / "J3" / "extract" / f"m{k}.mrc", images, 1.1)
    pairs = [(1, 2), (0, 0), (1, 0), (0, 2)]
    records = np.zeros(len(pairs), _DTYPE)
    records["uid"] = [11, 12, 13, 14]
    records["blob/path"] = [(">" if j % 2 else "") + f"J3/extract/m{k}.mrc" for j, (k, _) in enumerate(pairs)]
    records["blob/idx"] = [i for _, i in pairs]
    records["blob/shape"] = 20
    records["blob/psize_A"] = 1.1
    records["ctf/accel_kv"] = 300
    records["ctf/cs_mm"] = 2.7
    records["ctf/amp_contrast"] = 0.07
    records["ctf/df1_A"] = [10000, 12000, 14000, 16000]
    records["ctf/df2_A"] = [9000, 11000, 13000, 15000]
    records["ctf/df_angle_rad"] = [0.0, np.pi / 2, -np.pi / 4, 1.0]
    records["ctf/phase_shift_rad"] = [0.0, 0.0, np.pi / 2, 0.0]
    with open(tmp_path / "J5" / "particles.cs", "wb") as f:  # cryoSPARC writes via a file object: no .npy suffix
        np.save(f, records)
    return tmp_path, stacks, pairs, records


def test_cs_images_and_ctf(cs_project):
    root, stacks, pairs, records = cs_project
    with open_stack(root / "J5" / "particles.cs") as stack:
        assert len(stack) == 4 and stack.box_size == 20
        np.testing.assert_array_equal(stack[:], np.stack([stacks[k][i] for k, i in pairs]))
        md = stack.metadata
        assert md["rlnImageName"].iloc[0] == "000003@J3/extract/m1.mrc"
        assert md["rlnImageName"].iloc[1] == "000001@J3/extract/m0.mrc"  # '>' stripped
        np.testing.assert_allclose(md["rlnDefocusU"], [10000, 12000, 14000, 16000])
        np.testing.assert_allclose(md["rlnDefocusV"], [9000, 11000, 13000, 15000])
        np.testing.assert_allclose(md["rlnDefocusAngle"], [0.0, 90.0, -45.0, np.degrees(1.0)], rtol=1e-6)
        np.testing.assert_allclose(md["rlnPhaseShift"], [0.0, 0.0, 90.0, 0.0], atol=1e-5)
        np.testing.assert_allclose(md["rlnVoltage"], 300)
        np.testing.assert_allclose(md["rlnSphericalAberration"], 2.7, rtol=1e-6)
        np.testing.assert_allclose(md["rlnAmplitudeContrast"], 0.07, rtol=1e-6)
        np.testing.assert_array_equal(md["csUid"], [11, 12, 13, 14])
        assert stack.pixel_size == pytest.approx(1.1, rel=1e-6)
        require_ctf_columns(md)


def test_cs_project_dir(cs_project, tmp_path_factory):
    root, stacks, pairs, _ = cs_project
    moved = tmp_path_factory.mktemp("elsewhere") / "particles.cs"
    moved.write_bytes((root / "J5" / "particles.cs").read_bytes())
    with pytest.raises(StackFileNotFoundError) as e:
        open_stack(moved)
    assert e.type is StackFileNotFoundError
    assert str(moved) in str(e.value) and "row 1" in str(e.value) and "J3/extract/m1.mrc" in str(e.value)
    with open_stack(moved, project_dir=root) as stack:
        np.testing.assert_array_equal(stack[0], stacks[1][2])


# --------------------------------------------------------------------------------------------------- fixtures made
# by cryosparc-tools itself (tests/fixtures/make_cs_fixtures.py): a 391-field NumPy-format file and a CSDAT file


FIXTURES = Path(__file__).parent / "fixtures" / "cs_project"


@pytest.mark.parametrize("name", ["particles_numpy.cs", "particles_csdat.cs"])
def test_cs_fixtures_written_by_cryosparc_tools(name):
    import mrcfile

    path = FIXTURES / "J9" / name
    with mrcfile.open(FIXTURES / "J2" / "extract" / "particles.mrc", permissive=True) as m:
        images = np.asarray(m.data, np.float32)
    with open_stack(path) as stack:
        assert len(stack) == 4 and stack.box_size == 16 and stack.pixel_size == pytest.approx(1.5)
        order = [4, 0, 5, 2]
        np.testing.assert_array_equal(stack[:], images[order])
        md = stack.metadata
        assert list(md["rlnImageName"]) == [f"{i + 1:06d}@J2/extract/particles.mrc" for i in order]
        np.testing.assert_array_equal(md["csUid"], [9001, 9002, 9003, 9004])
        assert md["csUid"].dtype == np.uint64
        np.testing.assert_array_equal(md["rlnOpticsGroup"], [1, 2, 1, 2])
        np.testing.assert_allclose(md["rlnDefocusU"], [12000, 15000, 18000, 21000])
        np.testing.assert_allclose(md["rlnDefocusV"], [11500, 14000, 17800, 20000])
        np.testing.assert_allclose(md["rlnDefocusAngle"], np.degrees([0.1, -0.5, 1.2, 3.0]), rtol=1e-6)
        np.testing.assert_allclose(md["rlnPhaseShift"], [0, 0, 60, 0], atol=1e-4)
        np.testing.assert_allclose(md["rlnVoltage"], 300)
        np.testing.assert_allclose(md["rlnSphericalAberration"], 2.7, rtol=1e-6)
        np.testing.assert_allclose(md["rlnAmplitudeContrast"], 0.1, rtol=1e-6)
        require_ctf_columns(md, path)


def test_cs_numpy_fixture_is_beyond_np_load():
    """Why cryosparc-tools: np.load (the previous reader) refuses the real-sized NumPy header."""
    with pytest.raises(ValueError, match="Header info length"):
        np.load(FIXTURES / "J9" / "particles_numpy.cs", allow_pickle=False)


def test_cs_exp_group_zero_becomes_optics_group_one(tmp_path):
    from cryosparc.dataset import Dataset

    mrc.write_stack(tmp_path / "s.mrcs", np.zeros((2, 8, 8), np.float32), 1.0)
    d = Dataset.allocate(2, [("blob/path", "O"), ("blob/idx", "<u4"), ("ctf/exp_group_id", "<u4")])
    d["blob/path"] = "s.mrcs"
    d["blob/idx"] = [0, 1]
    d["ctf/exp_group_id"] = [0, 3]
    d.save(tmp_path / "p.cs")
    with open_stack(tmp_path / "p.cs") as stack:
        np.testing.assert_array_equal(stack.metadata["rlnOpticsGroup"], [1, 4])
