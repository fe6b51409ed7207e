"""Shared test helpers and the suite's tolerance policy.

Tolerances (one policy for the whole suite):
- float32 results against float64 NumPy references: ``FLOAT32_RTOL`` relative to the largest magnitude compared;
- recovered alignments against the truth: angles within ``ANGLE_DEG``, shifts within ``SHIFT_PX`` (noise-free),
  looser bounds only where noise is added, stated at the assertion with the reason;
- where the code promises bit-identical results (device count, chunk sizes, restart, same seed): exact equality
  of the written files or arrays, never a tolerance.
"""

from pathlib import Path

import numpy as np

FLOAT32_RTOL = 1e-5
ANGLE_DEG = 1e-2
SHIFT_PX = 1e-3
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def compose_config(overrides: list[str]):
    """The composed Hydra configuration of ``python -m jisac <overrides>`` (a DictConfig)."""
    from hydra import compose, initialize_config_dir

    from jisac import config

    config.register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def angle_difference(a, b) -> np.ndarray:
    """``|a - b|`` in degrees, on the circle (0..180)."""
    d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)) % 360.0
    return np.minimum(d, 360.0 - d)


def class_purity(classes: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each accounted class (class > 0) held by its most common true view."""
    shares = [np.bincount(truth[classes == c]).max() / (classes == c).sum() for c in np.unique(classes[classes > 0])]
    return float(np.mean(shares)) if shares else float("nan")


def same_outputs(a: Path, b: Path, names=("particle_classes.txt", "all_parameters.txt", "class_averages.mrcs")) -> None:
    """Asserts that two run folders hold exactly the same results: text files byte for byte (STAR files without
    their comment lines, which carry a creation time), MRC stacks' data and voxel size (their header labels carry
    one too)."""
    import mrcfile

    def text(path: Path) -> list[str]:
        lines = path.read_text().splitlines()
        return [line for line in lines if not line.startswith("#")] if path.suffix == ".star" else lines

    for name in names:
        if name.endswith((".mrc", ".mrcs")):
            with mrcfile.open(a / name) as ma, mrcfile.open(b / name) as mb:
                assert np.array_equal(ma.data, mb.data) and ma.voxel_size == mb.voxel_size, f"{a} / {b}: {name}"
        else:
            assert text(a / name) == text(b / name), f"{a} and {b} differ in {name}"


def raises_one_line(kind, call, *needles) -> str:
    """Calls ``call()``, which must raise exactly ``kind`` with a one-line message holding every ``needle``;
    returns the message."""
    import pytest

    with pytest.raises(kind) as e:
        call()
    assert e.type is kind, f"expected exactly {kind.__name__}, got {e.type.__name__}: {e.value}"
    message = str(e.value)
    assert "\n" not in message, "the message must be one line"
    for needle in needles:
        assert str(needle) in message, f"{needle!r} not in {message!r}"
    return message
