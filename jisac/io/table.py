"""Formats layer: Where each particle's image lives: the common result of every metadata reader (STAR, cryoSPARC .cs,
plain MRC/HDF stacks), from which :class:`jisac.io.stack.ParticleStack` is built."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd


class ParticleTable(NamedTuple):
    """Particles in input order.

    metadata:      one row per particle, RELION column names without the leading underscore (``rlnImageName``,
                   ``rlnDefocusU`` ...), optics-group values merged into each row.
    files:         the distinct image files, resolved paths.
    file_of:       ``(n,)`` int, the position in ``files`` of each particle's image file.
    index_in_file: ``(n,)`` int, the 0-based image index within that file.
    rows:          ``(n,)`` int, the 1-based row of each particle in the metadata file it came from (for messages).
    source:        the file the table was read from (for messages).
    """

    metadata: pd.DataFrame
    files: tuple[Path, ...]
    file_of: np.ndarray
    index_in_file: np.ndarray
    rows: np.ndarray
    source: Path


# The RELION 3.1 labels that describe an optics group rather than a particle (RELION's data_optics table); a writer
# puts these in data_optics when they are constant within each group.
OPTICS_COLUMNS = (
    "rlnOpticsGroupName",
    "rlnImagePixelSize",
    "rlnImageSize",
    "rlnImageDimensionality",
    "rlnVoltage",
    "rlnSphericalAberration",
    "rlnAmplitudeContrast",
    "rlnMicrographOriginalPixelSize",
    "rlnMicrographPixelSize",
    "rlnBeamTiltX",
    "rlnBeamTiltY",
    "rlnOddZernike",
    "rlnEvenZernike",
    "rlnMagMat00",
    "rlnMagMat01",
    "rlnMagMat10",
    "rlnMagMat11",
    "rlnCtfDataArePhaseFlipped",
    "rlnCtfDataAreCtfPremultiplied",
)

# The RELION columns a CTF model needs (rlnPhaseShift is optional: 0 when absent, as in RELION).
CTF_COLUMNS = (
    "rlnDefocusU",
    "rlnDefocusV",
    "rlnDefocusAngle",
    "rlnVoltage",
    "rlnSphericalAberration",
    "rlnAmplitudeContrast",
)


def image_names(indices_0based, path_strings) -> list[str]:
    """RELION image names ``N@path`` (N 1-based) for 0-based indices and one path string per image."""
    return [f"{int(i) + 1:06d}@{p}" for i, p in zip(indices_0based, path_strings)]
