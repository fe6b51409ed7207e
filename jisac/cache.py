"""Workflow layer: Preprocessing cache: the working stack and the pre-alignment shifts of a stack, reused by later
runs on the same data (a parameter sweep runs ISAC many times on one stack; pre-alignment and the working stack only
depend on the input and a few settings).

An entry is a folder ``<cache_dir>/<key>/`` holding

- ``working.npy``: the working stack of the kept particles, ``(n_kept, target_nx, target_nx)`` float32;
- ``shifts.npy``: the pre-alignment centring shifts, ``(n, 2)`` float32, original pixels (zeros when skipped);
- ``keep.npy``: the input indices classified, ``(n_kept,)`` int64 (particles without NaN/Inf pixels);
- ``info.json``: what the key was made from; written last, so an entry without it is incomplete and ignored.

Every file is written under a temporary name and renamed (``jisac.io.atomic``): a killed run, or two sweep jobs
writing the same entry at once, never leave a half-written file that looks complete. Runs that need the same
entry at the same time take turns (:func:`entry_lock`): the first computes it, the others then hit.

The key is a SHA-256 over the pixel data (as read, float32; hashed while the stack is scanned for non-finite
pixels, which reads it anyway), the stack's size and pixel size, the CTF parameters when they are used, and every
setting the two steps depend on (``PREP_KEYS``), plus ``CACHE_VERSION``. It does not depend on the file's path or
time stamp: a moved or copied stack still hits, a rewritten one with the same name misses.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np

from jisac.diskarray import DiskArray
from jisac.io.atomic import atomic_path, write_json

log = logging.getLogger("jisac")

# Bump when the pre-alignment or the working-stack preparation changes what it computes: old entries then miss.
CACHE_VERSION = 3  # 3: pre-alignment shifts the reference, not the particles (prealign.PrealignOptions.method)
ARRAYS = ("working", "shifts", "keep")


def user_cache_root() -> Path:
    """``$XDG_CACHE_HOME/jisac`` (``~/.cache/jisac`` when unset): jisac's caches (demo stacks, working stacks)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "jisac"


def default_folder() -> Path:
    """``<user_cache_root>/working``, beside the demo stacks."""
    return user_cache_root() / "working"


def resolve_folder(cache_dir: str | None) -> Path:
    """The cache folder for ``data.cache_dir`` (``None``: :func:`default_folder`; ``~`` is expanded)."""
    return default_folder() if cache_dir in (None, "") else Path(os.path.expanduser(cache_dir))


def data_digest() -> "hashlib._Hash":
    """The running hash of a stack's pixels; feed it every batch of images, in input order."""
    return hashlib.sha256()


def update_digest(digest, images: np.ndarray) -> None:
    """Adds a batch of images ``(b, ny, nx)`` to ``digest`` (as little-endian float32, so the same pixels give the
    same key whatever the file's own dtype or byte order)."""
    digest.update(np.ascontiguousarray(images, dtype="<f4"))  # the buffer itself: no copy when already float32


def make_key(pixels_sha256: str, settings: dict, ctf_params=None) -> tuple[str, dict]:
    """``(key, info)``: a 20-hex-digit key and the JSON-able description it was made from.

    Args:
        pixels_sha256: hex digest of the stack's pixels (:func:`data_digest`).
        settings: every setting that changes the working stack or the pre-alignment (radius, target_radius,
            target_nx, ctf, vpp, skip_prealignment, the pre-alignment seed, drop_unusable, n, box, pixel size).
        ctf_params: the ``CTFParams`` the working stack is phase-flipped with, or ``None``.
    """
    info = {"version": CACHE_VERSION, "pixels_sha256": pixels_sha256, **settings}
    if ctf_params is not None:
        h = hashlib.sha256()
        for field in ctf_params:
            h.update(np.ascontiguousarray(np.broadcast_to(np.asarray(field, np.float64), np.shape(ctf_params[0])),
                                          dtype="<f8").tobytes())
        info["ctf_sha256"] = h.hexdigest()
    key = hashlib.sha256(json.dumps(info, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return key, info


def load(folder: Path, key: str) -> dict[str, np.ndarray] | None:
    """The arrays of entry ``key`` (``working``, ``shifts``, ``keep``), or ``None`` when it is absent or incomplete."""
    entry = Path(folder) / key
    if not (entry / "info.json").exists():
        return None
    try:
        # the working stack is read by rows as needed (as the scratch file is, jisac.diskarray); the small arrays
        # are loaded whole
        return {name: DiskArray.from_npy(entry / f"{name}.npy") if name == "working" else np.load(entry / f"{name}.npy")
                for name in ARRAYS}
    except (OSError, ValueError) as err:  # a damaged entry is a miss, not a failed run
        log.warning("preprocessing cache entry %s is unreadable (%s): recomputing", entry, err)
        return None


@contextlib.contextmanager
def entry_lock(folder: Path, key: str):
    """Holds an exclusive lock on entry ``key`` (``<folder>/<key>.lock``, ``fcntl.flock``) for the look-up and,
    on a miss, the computation and storing of the entry.

    Parallel sweep jobs on one stack (Hydra's joblib or SLURM launchers) then compute a shared entry once: the
    first takes the lock, the others wait for it (saying so in the log) and hit. Where no lock can be taken (a
    read-only folder, a filesystem without ``flock``, not POSIX) the run goes on without one: the entry is then
    computed more than once, and the atomic writes keep it whole.
    """
    try:
        import fcntl

        Path(folder).mkdir(parents=True, exist_ok=True)
        handle = open(Path(folder) / f"{key}.lock", "a")
    except (ImportError, OSError) as err:
        log.debug("preprocessing cache: no lock for %s (%s)", key, err)
        yield
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("preprocessing cache: another run is preparing entry %s; waiting for it", key)
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as err:  # e.g. a filesystem that does not support locks
            log.debug("preprocessing cache: no lock for %s (%s)", key, err)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def store(folder: Path, key: str, info: dict, **arrays) -> Path:
    """Writes entry ``key`` (each ``.npy`` atomically, ``info.json`` last) and returns its folder. ``arrays``:
    NumPy arrays, or a ``DiskArray`` (a working stack on disk), which is copied in row blocks, never read whole."""
    entry = Path(folder) / key
    for name in ARRAYS:
        with atomic_path(entry / f"{name}.npy") as tmp:
            with open(tmp, "wb") as f:  # a file object, so np.save does not append ".npy" to the temporary name
                _save_npy(f, arrays[name])
    write_json(entry / "info.json", info)
    return entry


def _save_npy(f, array, rows_per_write: int = 4096) -> None:
    """``np.save`` of ``array`` to the open file ``f``; an array-like that is not a NumPy array (``DiskArray``)
    is written ``rows_per_write`` rows at a time, as float32."""
    if isinstance(array, np.ndarray):
        np.save(f, array)
        return
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype("<f4")), "fortran_order": False,
              "shape": tuple(array.shape)}
    np.lib.format.write_array_header_1_0(f, header)
    for start in range(0, array.shape[0], rows_per_write):
        f.write(np.ascontiguousarray(array[start : start + rows_per_write], dtype="<f4").tobytes())
