"""Formats layer: the ISAC2 run files SPHIRE's companion tools read (the beautifier ``sp_compute_isac_avg.py`` and
``sp_pipe.py isac_substack``; ``isac_algorithm.md`` §10, §12, ``field_formats.md`` §2b).

- ``README_shrink_ratio.txt``: ISAC2's text, whose 6th and 7th lines (``readlines()[5]``, ``[6]``) hold the shrink
  ratio (working px per input px, ``%.5f``) and the particle radius in input pixels (``%.5f``);
- ``2dalignment/initial2Dparams.txt``: one row per input particle ``[0, tx, ty, 0]`` (angle, pre-alignment shift in
  input pixels, mirror), SPHIRE's ``write_text_row`` layout (``"  %12d"`` for integers, floats right-aligned in
  14 columns), read back with ``read_text_row`` (split on whitespace, int else float);
- ``class_averages.hdf``: the accepted averages with ``members`` (0-based input indices) and ``n_objects``. ISAC2
  writes them in acceptance order; jisac keeps only its final order, so this file holds the same averages in the
  same order as ``ordered_class_averages.hdf`` (the beautifier numbers its outputs by position in this file).

``all_parameters.txt`` (ISAC's own parameters in the working frame) is written by ``io.outputs``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from jisac.io import hdf
from jisac.io.atomic import atomic_path

_README = """
Since for processing purposes isac changes the image dimensions,
adjustment of pixel size needs to be made in subsequent steps, (e.g.
running sxviper.py). The shrink ratio and radius used for this particular isac run is
--------
{ratio:.5f}
{radius:.5f}
--------
To get the pixel size for the isac output the user needs to divide
the original pixel size by the above value. This info is saved in
the following file: README_shrink_ratio.txt
(written by jisac)
"""


def write_shrink_ratio(path: Path, shrink_ratio: float, radius: float) -> None:
    """``README_shrink_ratio.txt``: lines 6 and 7 hold the shrink ratio and the radius (input px)."""
    with atomic_path(path) as tmp:
        tmp.write_text(_README.format(ratio=float(shrink_ratio), radius=float(radius)))


def write_initial_params(path: Path, prealign_shifts: np.ndarray) -> None:
    """``2dalignment/initial2Dparams.txt``: rows ``[0, tx, ty, 0]``, shifts in input pixels."""
    shifts = np.asarray(prealign_shifts, np.float64).reshape(-1, 2)
    lines = [f"  {0:12d}  {x:12.6f}  {y:12.6f}  {0:12d}\n" for x, y in shifts]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text("".join(lines))


def write_run_files(out: Path, averages: np.ndarray, members: Sequence[np.ndarray], *, shrink_ratio: float,
                    radius: float, prealign_shifts: np.ndarray, working_pixel_size: float) -> None:
    """The SPHIRE files of the module docstring in ``out``."""
    out = Path(out)
    write_shrink_ratio(out / "README_shrink_ratio.txt", shrink_ratio, radius)
    write_initial_params(out / "2dalignment" / "initial2Dparams.txt", prealign_shifts)
    if len(averages):
        hdf.write_class_averages(out / "class_averages.hdf", averages, members, working_pixel_size)
