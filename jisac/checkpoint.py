"""Workflow layer: the run folder's state: checkpoints, so that a killed run restarts from its last finished
generation, and the guards that keep a folder usable (writable, one run at a time, one run's state).

A checkpoint is the ``isac.IsacState`` after a generation, tagged with the run's fingerprint (its parameters,
seed, input and stability criterion): a restart continues only the same run, and a folder holding another run's
state is refused -- before any heavy work (``refuse_other_run``). ``prepare_output_dir`` turns every unusable
``output_dir`` into one clear line; ``output_dir_lock`` makes a second run on the same folder refuse at once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from jisac import isac
from jisac.errors import OutputDirError
from jisac.io.atomic import atomic_path


class RunMismatchError(OutputDirError):
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
                seeds=np.zeros((0, 1, 1), np.float32) if state.seeds is None else state.seeds,
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
            seeds=z["seeds"] if "seeds" in z.files and len(z["seeds"]) else None,  # None or some averages
        )


CHECKPOINT = Path("checkpoint") / "state.npz"
LOCK = ".jisac.lock"


def prepare_output_dir(out: Path) -> Path:
    """Creates ``out`` (and its parents) and checks that a file can be written there; raises ``OutputDirError``
    with one line for an ``output_dir`` that is a file, lies under a file, or cannot be created or written."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"output_dir={out} is a file, not a folder; choose another output_dir")
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise OutputDirError(f"output_dir={out}: {parent} is a file, so no folder can be made under it; "
                                 "choose another output_dir")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise OutputDirError(f"output_dir={out} cannot be written ({err.strerror or err}); choose a folder you can "
                             "write to") from None
    return out


@contextlib.contextmanager
def output_dir_lock(out: Path):
    """Holds an exclusive lock on ``out`` for a run's duration (``flock`` on ``out/.jisac.lock``, released when the
    process ends, even when killed); a second run on the same folder gets ``OutputDirError`` at once."""
    path = Path(out) / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            raise OutputDirError(f"output_dir={out} is in use by another jisac run (pid {holder}); wait for it to "
                                 "end or choose another output_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock


def refuse_other_run(out: Path, run_id: str, restart: bool) -> isac.IsacState | None:
    """The checkpoint in ``out`` if it is this run's (``restart``) -- else ``None`` when there is none; raises
    ``RunMismatchError`` for another run's state, or for this run's state with ``restart`` off. Cheap: meant to
    run before any heavy work."""
    ckpt = Path(out) / CHECKPOINT
    if not ckpt.exists():
        return None
    state = load_state(ckpt, run_id)
    if not restart:
        raise RunMismatchError(f"{out}: holds a finished or interrupted run; use isac.restart=true or another "
                               "output_dir")
    return state


def last_generation(out: Path) -> int | None:
    """The last finished generation checkpointed in ``out`` (for messages), or None."""
    try:
        with np.load(Path(out) / CHECKPOINT, allow_pickle=False) as z:
            return int(z["generation"])
    except (OSError, KeyError, ValueError):
        return None
