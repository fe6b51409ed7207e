"""What the diagnostic scripts (mask_check.py, split_check.py) load from a folder kept by ``run.py --keep``."""

from pathlib import Path
from typing import NamedTuple

import numpy as np

from jisac import beautify as B
from jisac import ctf
from jisac.io import open_stack

APIX, BOX, R = 2.25, 160, 60  # run.py's defaults: pixel size (A), box (px), particle radius (px)


class Kept(NamedTuple):
    truth: dict  # truth.npz: labels (per particle), members (per class: the expected clean average)
    stack: object  # the simulated input stack
    params: object  # each particle's parameters from the run's particles.star (input px)
    ctf: object  # each particle's CTF parameters
    labels: np.ndarray


def load(folder) -> Kept:
    folder = Path(folder)
    truth = dict(np.load(folder / "truth.npz"))
    table = B.read_run_particles(folder / "run")
    params = B.parameters_from_table(table, APIX)
    ctf_params = ctf.CTFParams(*(np.asarray(f) for f in ctf.CTFParams.from_relion_table(table, APIX)))
    return Kept(truth, open_stack(folder / "input.star"), params, ctf_params, truth["labels"])
