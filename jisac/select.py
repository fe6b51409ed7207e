"""Interface layer (command line): a substack of chosen classes' particles from a finished run folder.

::

    python -m jisac.select run_dir=isac_run classes=[1,3,5]
    python -m jisac.select run_dir=isac_run min_score=0.5
    python -m jisac.select run_dir=isac_run max_resolution_angst=12 min_score=0.4 output=good.star

Options (``key=value`` as in the main command, or ``--key value``):

- ``run_dir`` (required): the run folder (``output_dir`` of ``python -m jisac``); its ``particles.star`` is read.
- ``classes``: class numbers as in ``rlnClassNumber`` / the report: ``[1,3,5]``, ``1,3,5`` or ranges ``1-4,7``.
- ``min_score``: classes whose score (``jisac.ranking``, the report's "score") is at least this, 0 to 1.
- ``max_resolution_angst``: classes whose resolution (``rlnEstimatedResolution`` of ``class_averages.star``, or of
  the beautifier's) is this or better (a smaller number); classes of unknown resolution are left out.
- ``output``: the STAR file to write (default ``run_dir/selected_particles.star``).

Given several, a class must meet all of them. The output is a RELION 3.1 STAR file: the rows of ``particles.star``
whose ``rlnClassNumber`` is chosen, in input order, with all their columns (alignment, CTF, ``jisacMirror``,
``jisacPixelError``, ...), and the optics table unchanged. A relative stack path in ``rlnImageName`` that does not
resolve from the output's folder but does from the input STAR file's folder (``summary.json`` "input") is
rewritten relative to the output's folder (said in a note), so the substack opens where it is written.
When the run's input was a cryoSPARC ``.cs`` file, a ``.cs`` substack is not written yet (planned); import the STAR
file with cryoSPARC's "Import Particle Stack".
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import starfile

from jisac import ranking
from jisac.io.atomic import atomic_path
from jisac.io.errors import StackError

log = logging.getLogger("jisac")
DEFAULT_OUTPUT = "selected_particles.star"


class Selection(NamedTuple):
    """What :func:`select` wrote: the chosen class numbers, the number of particles, the file, and notes for the
    user (one line each)."""

    classes: list
    particles: int
    path: Path
    notes: list


def parse_classes(text: str) -> list[int]:
    """``'[1,3,5]'``, ``'1,3,5'``, ``'1 3 5'``, ``'1-4,7'`` -> sorted unique class numbers."""
    body = str(text).strip().strip("[]()").strip()
    out = set()
    for part in filter(None, re.split(r"[,\s]+", body)):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if m is None:
            raise ValueError(f"classes={text}: '{part}' is not a class number or range; give e.g. classes=[1,3,5]")
        lo, hi = int(m[1]), int(m[2] or m[1])
        if hi < lo:
            raise ValueError(f"classes={text}: range {part} runs backwards; give e.g. 1-4")
        out.update(range(lo, hi + 1))
    if not out:
        raise ValueError(f"classes={text}: no class number given; give e.g. classes=[1,3,5]")
    return sorted(out)


def choose_classes(table: pd.DataFrame, classes=None, min_score: float | None = None,
                   max_resolution_angst: float | None = None) -> list[int]:
    """Class numbers meeting every given criterion. ``table``: :func:`jisac.ranking.class_table` (columns
    ``class``, ``score``, ``resolution_angst``). Raises ``ValueError`` (one line naming the option) when no
    criterion is given, a class number does not exist, or nothing meets the criteria."""
    if classes is None and min_score is None and max_resolution_angst is None:
        raise ValueError("choose classes: give classes=[1,3,5], min_score=0.5 and/or max_resolution_angst=12")
    numbers = table["class"].to_numpy(int)
    keep = np.ones(len(table), bool)
    if classes is not None:
        missing = sorted(set(classes) - set(numbers.tolist()))
        if missing:
            raise ValueError(f"classes: {missing} not in this run (classes 1 to {len(numbers)}); see report.html")
        keep &= np.isin(numbers, list(classes))
    if min_score is not None:
        if not 0.0 <= min_score <= 1.0:
            raise ValueError(f"min_score={min_score}: a score is between 0 and 1")
        keep &= table["score"].to_numpy(float) >= min_score
    if max_resolution_angst is not None:
        res = table["resolution_angst"].to_numpy(float)
        if not np.isfinite(res).any():
            raise ValueError("max_resolution_angst: this run has no per-class resolution (rlnEstimatedResolution in "
                             "class_averages.star or beautify/class_averages.star); select by classes or min_score")
        keep &= np.isfinite(res) & (res <= max_resolution_angst)
    if not keep.any():
        raise ValueError("no class meets the criteria (classes, min_score, max_resolution_angst); see the scores and "
                         "resolutions in report.html")
    return numbers[keep].tolist()


def _relocate_image_names(names: pd.Series, input_dir: Path | None, output_dir: Path) -> tuple[pd.Series, int]:
    """``N@stack`` names whose relative stack path does not resolve beside the output but does beside the input
    STAR file (where the input's names point), rewritten relative to the output's folder; ``(names, rewritten)``."""
    if input_dir is None:
        return names, 0
    moved = {}
    for stack in {str(n).partition("@")[2] for n in names}:
        if stack and not os.path.isabs(stack) and not (output_dir / stack).exists() and (input_dir / stack).exists():
            moved[stack] = os.path.relpath(input_dir / stack, output_dir)
    if not moved:
        return names, 0

    def fix(name: str) -> str:
        number, at, stack = str(name).partition("@")
        return f"{number}@{moved[stack]}" if at and stack in moved else name

    return names.map(fix), len(moved)


def write_substack(particles_star: Path, classes, output: Path, input_dir: Path | None = None) -> tuple[int, int]:
    """Writes the rows of ``particles_star`` whose ``rlnClassNumber`` is in ``classes`` to ``output``
    (atomically), every other table (``optics``) unchanged. ``rlnImageName`` stack paths that resolve only from
    ``input_dir`` (the input STAR file's folder) are rewritten relative to ``output``'s folder, so the substack
    opens where it is written. Returns ``(particles written, stack paths rewritten)``."""
    particles_star = Path(particles_star)
    if not particles_star.is_file():
        raise StackError(f"{particles_star}: no such file; select from a finished run folder (it writes "
                         "particles.star at the end)")
    try:
        blocks = starfile.read(particles_star, always_dict=True)
    except Exception as e:  # starfile raises many kinds; the user needs the file and the reason
        raise StackError(f"{particles_star}: not a readable STAR file ({type(e).__name__}: {e})") from None
    name = "particles" if "particles" in blocks else next(
        (k for k, b in blocks.items() if isinstance(b, pd.DataFrame) and "rlnClassNumber" in b.columns), None)
    if name is None or "rlnClassNumber" not in blocks[name].columns:
        raise StackError(f"{particles_star}: no particle table with _rlnClassNumber; give a jisac run's particles.star")
    table = blocks[name]
    chosen = table[table["rlnClassNumber"].astype(int).isin(list(classes))].reset_index(drop=True)
    rewritten = 0
    if "rlnImageName" in chosen.columns:
        names, rewritten = _relocate_image_names(chosen["rlnImageName"], input_dir, Path(output).resolve().parent)
        chosen = chosen.assign(rlnImageName=names)
    with atomic_path(output) as tmp:
        starfile.write({**blocks, name: chosen}, tmp)
    return len(chosen), rewritten


def select(run_dir, classes=None, min_score: float | None = None, max_resolution_angst: float | None = None,
           output=None) -> Selection:
    """Chooses classes of the run in ``run_dir`` (see :func:`choose_classes`) and writes their particles to
    ``output`` (default ``run_dir/selected_particles.star``)."""
    run_dir = Path(run_dir)
    if not (run_dir / "summary.json").is_file():
        raise StackError(f"{run_dir}: no summary.json; give a finished run folder as run_dir")
    table = ranking.class_table(run_dir)
    if table.empty:
        raise ValueError(f"{run_dir}: the run accepted no class, so there is nothing to select")
    chosen = choose_classes(table, classes, min_score, max_resolution_angst)
    output = Path(output) if output is not None else run_dir / DEFAULT_OUTPUT
    source = str((ranking.read_json(run_dir / "summary.json") or {}).get("input", ""))
    input_dir = Path(source).parent if source.lower().endswith(".star") else None
    n, rewritten = write_substack(run_dir / "particles.star", chosen, output, input_dir)
    notes = []
    if rewritten:
        notes.append(f"rlnImageName: {rewritten} stack path(s) rewritten relative to {output.resolve().parent} "
                     f"(they were relative to the input's folder, {input_dir})")
    if source.lower().endswith(".cs"):
        notes.append(f"the input was a cryoSPARC .cs file ({source}): a .cs substack is not written yet (planned); "
                     "import the STAR file with cryoSPARC's Import Particle Stack")
    return Selection(chosen, n, output, notes)


def _as_options(argv: list[str]) -> list[str]:
    """``key=value`` (Hydra style) -> ``--key=value``; ``--key value`` passes through."""
    return [f"--{a}" if re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", a) else a for a in argv]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jisac.select",
        description="Write the particles of chosen classes of a jisac run as a RELION STAR substack. "
                    "Options as key=value (run_dir=isac_run classes=[1,3,5]) or --key value.")
    parser.add_argument("--run_dir", required=True, help="the run folder (output_dir of python -m jisac)")
    parser.add_argument("--classes", help="class numbers: [1,3,5], 1,3,5 or 1-4,7")
    parser.add_argument("--min_score", type=float, help="keep classes scoring at least this (0 to 1)")
    parser.add_argument("--max_resolution_angst", type=float, help="keep classes with this resolution or better (A)")
    parser.add_argument("--output", help=f"the STAR file to write (default RUN_DIR/{DEFAULT_OUTPUT})")
    args = parser.parse_args(_as_options(sys.argv[1:] if argv is None else argv))
    try:
        classes = parse_classes(args.classes) if args.classes is not None else None
        result = select(args.run_dir, classes, args.min_score, args.max_resolution_angst, args.output)
    except (OSError, ValueError) as err:  # StackError is a ValueError
        print(f"jisac.select: error: {err}", file=sys.stderr)
        return 2
    print(f"{result.particles} particles of classes {result.classes} -> {result.path}")
    for note in result.notes:
        print(f"jisac.select: note: {note}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
