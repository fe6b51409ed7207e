"""ParticleStack over MRC/MRCS stacks: indexing, batches, lazy reads, open_stack dispatch."""

import numpy as np
import pytest

from jisac.io import ParticleStack, check_finite, mrc, open_stack
from jisac.io.mrc import MrcImageFile


def _images(n=12, box=16, seed=0):
    return np.random.default_rng(seed).normal(size=(n, box, box)).astype(np.float32)


@pytest.fixture
def stack_file(tmp_path):
    images = _images()
    path = tmp_path / "particles.mrcs"
    mrc.write_stack(path, images, pixel_size_angst=1.25)
    return path, images


def test_mrcs_metadata_and_geometry(stack_file):
    path, images = stack_file
    with open_stack(path) as stack:
        assert isinstance(stack, ParticleStack)
        assert len(stack) == 12 and stack.box_size == 16 and stack.shape == (12, 16, 16)
        assert stack.pixel_size == pytest.approx(1.25)
        md = stack.metadata
        assert len(md) == 12
        assert md["rlnImageName"].iloc[0] == f"000001@{path}" and md["rlnImageName"].iloc[11] == f"000012@{path}"
        assert (md["rlnOpticsGroup"] == 1).all()
        assert np.allclose(md["rlnImagePixelSize"], 1.25)


def test_indexing_returns_exactly_the_right_images(stack_file):
    path, images = stack_file
    with open_stack(path) as stack:
        assert stack[3].shape == (16, 16) and stack[3].dtype == np.float32
        np.testing.assert_array_equal(stack[3], images[3])
        np.testing.assert_array_equal(stack[-1], images[-1])
        np.testing.assert_array_equal(stack[2:9:3], images[2:9:3])
        order = np.array([7, 0, 7, 11, 3])
        np.testing.assert_array_equal(stack[order], images[order])
        mask = np.arange(12) % 4 == 1
        np.testing.assert_array_equal(stack[mask], images[mask])
        assert stack[np.array([], int)].shape == (0, 16, 16)
        with pytest.raises(IndexError):
            stack[12]


def test_single_image_mrc(tmp_path):
    import mrcfile

    image = _images(1)[0]
    with mrcfile.new(tmp_path / "one.mrc") as m:
        m.set_data(image)
        m.voxel_size = 2.0
    with open_stack(tmp_path / "one.mrc") as stack:
        assert stack.shape == (1, 16, 16)
        np.testing.assert_array_equal(stack[0], image)


def test_iter_batches_reads_only_each_batch(stack_file, monkeypatch):
    path, images = stack_file
    requested = []
    original = MrcImageFile.read

    def spy(self, indices):
        # not loaded: the reader holds no image array, only the header facts (shape, dtype, data offset)
        assert not any(isinstance(v, np.ndarray) for v in vars(self).values())
        requested.append(np.asarray(indices).copy())
        return original(self, indices)

    monkeypatch.setattr(MrcImageFile, "read", spy)
    with open_stack(path) as stack:
        batches = list(stack.iter_batches(5))
    assert [len(b[0]) for b in batches] == [5, 5, 2]
    assert [len(r) for r in requested] == [5, 5, 2]  # never the whole stack at once
    np.testing.assert_array_equal(np.concatenate([b[0] for b in batches]), np.arange(12))
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), images)


def test_iter_batches_padded_and_subset(stack_file):
    path, images = stack_file
    with open_stack(path) as stack:
        batches = list(stack.iter_batches(5, indices=[11, 2, 4, 6, 8, 10, 1], pad=True))
    assert all(b[1].shape == (5, 16, 16) for b in batches)
    np.testing.assert_array_equal(batches[1][0], [10, 1, -1, -1, -1])
    np.testing.assert_array_equal(batches[1][1][:2], images[[10, 1]])
    assert not batches[1][1][2:].any()


def test_pixel_size_override(stack_file):
    path, _ = stack_file
    with open_stack(path, pixel_size=2.5) as stack:
        assert stack.pixel_size == 2.5 and (stack.metadata["rlnImagePixelSize"] == 2.5).all()
        assert stack.require_pixel_size() == 2.5


def test_file_cache_is_bounded(tmp_path):
    """More stacks than max_open_files: files are closed and reopened, values stay right."""
    from jisac.io import star

    images = _images(9)
    for k in range(3):
        mrc.write_stack(tmp_path / f"s{k}.mrcs", images[3 * k:3 * k + 3], 1.0)
    names = [f"{i % 3 + 1}@s{i // 3}.mrcs" for i in range(9)]
    import pandas as pd

    star.write_particle_star(tmp_path / "p.star", pd.DataFrame({"rlnImageName": names}), pixel_size=1.0,
                             box_size=16)
    with open_stack(tmp_path / "p.star", max_open_files=1) as stack:
        np.testing.assert_array_equal(stack[[8, 0, 4, 3]], images[[8, 0, 4, 3]])
        assert len(stack._open) == 1


def test_check_finite_mask():
    images = _images(6)
    images[1, 3, 3] = np.nan
    images[4, 0, 0] = np.inf
    mask = check_finite(images, np.arange(10, 16), drop_nonfinite=True)
    np.testing.assert_array_equal(mask, [True, False, True, True, False, True])
    assert check_finite(_images(3), np.arange(3)).all()


def test_mrc_reads_only_the_asked_images_in_any_order(tmp_path):
    """Plain reads of runs of consecutive images (no memory map): any order, repeats, int16 data after an
    extended header, and an index past the end is an IndexError naming the file."""
    import mrcfile

    from jisac.io import mrc

    x = np.random.default_rng(0).normal(size=(37, 12, 10)).astype(np.float32)
    with mrcfile.new(tmp_path / "s.mrcs") as m:
        m.set_extended_header(np.zeros(7, dtype=[("a", "<i4")]))
        m.set_data((x * 100).astype(np.int16))
        m.set_image_stack()
    f = mrc.MrcImageFile(tmp_path / "s.mrcs")
    want = (x * 100).astype(np.int16).astype(np.float32)
    idx = [5, 6, 7, 0, 36, 6, 20, 21, 3]
    np.testing.assert_array_equal(f.read(idx), want[idx])
    np.testing.assert_array_equal(f.read(np.arange(37)), want)
    assert f.read([]).shape == (0, 12, 10)
    with pytest.raises(IndexError, match="s.mrcs: image index out of range"):
        f.read([37])
