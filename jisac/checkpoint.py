"""Workflow layer: checkpoints of a run, so that a killed run restarts from its last finished generation.

A checkpoint is the ``isac.IsacState`` after a generation, tagged with the run's fingerprint (its parameters,
seed, input and stability criterion): a restart continues only the same run, and a folder holding another run's
state is refused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from jisac import isac
from jisac.io.atomic import atomic_path


class RunMismatchError(ValueError):
    """The output folder holds the state of a different run."""


def fingerprint(p: isac.IsacParams, seed: int, data_id: str) -> str:
    """Identity of a run: its parameters, seed and input (a restart must match it)."""
    text = json.dumps({"params": p.as_dict(), "seed": seed, "data": data_id}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def save_state(path: Path, state: isac.IsacState, run_id: str) -> None:
    """Writes ``state`` to ``path`` (NumPy ``.npz``, atomically), tagged with the run's fingerprint."""
    members = np.concatenate(state.members) if state.members else np.zeros(0, np.int64)
    sizes = np.array([len(m) for m in state.members], np.int64)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(
                f,
                run_id=run_id,
                generation=state.generation,
                pool=state.pool,
                averages=np.asarray(state.averages, np.float32) if state.averages else np.zeros((0, 1, 1), np.float32),
                members=members,
                sizes=sizes,
                candidates=np.asarray(state.candidates, np.int64),
                params=state.params,
                errors=state.errors,
                class_of=state.class_of,
                history=json.dumps(state.history),
                empty_generations=state.empty_generations,
                done=state.done,
            )


def load_state(path: Path, run_id: str) -> isac.IsacState:
    """The state saved at ``path``; ``RunMismatchError`` if it belongs to another run (``run_id``)."""
    with np.load(path, allow_pickle=False) as z:
        if str(z["run_id"]) != run_id:
            raise RunMismatchError(
                f"{path.parent.parent}: holds the state of a different run (other parameters, seed or input); "
                "choose another output_dir or remove it"
            )
        sizes = z["sizes"]
        members = np.split(z["members"], np.cumsum(sizes)[:-1]) if len(sizes) else []
        return isac.IsacState(
            generation=int(z["generation"]),
            pool=z["pool"],
            averages=tuple(z["averages"]) if len(sizes) else (),
            members=tuple(members),
            candidates=tuple(int(c) for c in z["candidates"]),
            params=z["params"],
            errors=z["errors"],
            class_of=z["class_of"],
            history=tuple(json.loads(str(z["history"]))),
            empty_generations=int(z["empty_generations"]),
            done=bool(z["done"]),
        )
