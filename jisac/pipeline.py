"""Workflow layer: ISAC end to end on a working stack, with a checkpoint and each generation's folder written
after every generation, restart, and the final class order.

``classify`` returns the result in memory (``io.outputs.ClassificationResult``); the files of the output folder
are written from it by ``io.outputs.write_run`` (``jisac.classify`` does both, for library users).
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jisac import align, checkpoint, isac, polar, progress, sharding
from jisac.io import outputs

log = logging.getLogger("jisac")


def order_averages(averages: np.ndarray, p: isac.IsacParams) -> np.ndarray:
    """An order of the averages in which similar views sit together.

    Similarity is rotation- and mirror-invariant: the best correlation of the ring spectra of one average with
    those of another over every in-plane angle and the mirror (``average_similarity``, symmetrised). The order is
    a greedy nearest-neighbour chain from the average most similar to all others (SPHIRE's sp_chains also refines
    with simulated annealing and rotates each average onto its neighbour; jisac keeps averages as they are so
    members' parameters stay valid).
    """
    k = len(averages)
    if k < 3:
        return np.arange(k)
    sim = average_similarity(averages, p.align)
    np.fill_diagonal(sim, -np.inf)
    order = [int(np.argmax(np.where(np.isfinite(sim), sim, 0).sum(1)))]
    left = set(range(k)) - set(order)
    while left:
        last = order[-1]
        nxt = max(left, key=lambda j: sim[last, j])
        order.append(nxt)
        left.remove(nxt)
    return np.asarray(order)


def average_similarity(averages: np.ndarray, options: align.AlignOptions, chunk: int = 64) -> np.ndarray:
    """``(k, k)`` symmetric similarity of centred ``(k, ny, nx)`` averages: the largest normalised correlation
    of their polar rings about the box centre (ring-weighted as in the alignment) over every in-plane angle and
    the mirror, in [-1, 1]; 1 on the diagonal.

    The polar alignment's score at zero shift (the averages are centred), from one resampling per average, the
    correlations over all angles computed on the host in float64 (Parseval: ``irfft`` of the ring-summed cross
    spectra): the run's last step compiles no k x k alignment program of its own (it took 1.7 s of a demo's
    compilation and 0.8 s of tracing on every run)."""
    geom = options.geometry
    k = len(averages)
    padded = np.zeros((align.size_bucket(k),) + np.shape(averages)[1:], np.float32)  # a few compiled shapes
    padded[:k] = averages
    spec = np.asarray(_centred_spectra(padded, geom), np.complex128)[:k]  # (k, R, F)
    weights = np.asarray(geom.weights(), np.float64)[:, None]
    n_angles = geom.n_angles
    self_corr = np.fft.irfft(np.sum(weights * np.abs(spec) ** 2, 1), n=n_angles, axis=-1)[:, 0]
    norm = np.sqrt(np.maximum(self_corr, 1e-300))
    sim = np.empty((k, k))
    for a0 in range(0, k, chunk):
        a = spec[a0:a0 + chunk] * weights
        best = np.full((len(a), k), -np.inf)
        # the other as it is (conjugate spectra), and mirrored (a mirror conjugates the spectra: x(-angle))
        for other in (np.conj(spec), spec):
            corr = np.fft.irfft(np.einsum("arf,brf->abf", a, other), n=n_angles, axis=-1)  # (a, k, angles)
            best = np.maximum(best, corr.max(-1))
        sim[a0:a0 + chunk] = best / (norm[a0:a0 + chunk, None] * norm[None])
    return (sim + sim.T) / 2


@functools.partial(jax.jit, static_argnames=("geometry",))
def _centred_spectra(images, geometry):
    """``(k, ny, nx)`` -> ``(k, R, F)`` ring spectra about the box centre."""
    return polar.polar_spectra(images, jnp.zeros((images.shape[0], 1, 2), jnp.float32), geometry)[:, 0]


def criterion_name(criterion=None) -> str:
    """The name of a run's stability criterion (``None``: ISAC2's pixel error, the default of ``run_isac``)."""
    return criterion.name if criterion is not None else "pixel_error"


def run_fingerprint(p: isac.IsacParams, seed: int, data_id: str, criterion=None) -> str:
    """The identity of a run (``checkpoint.fingerprint`` of its parameters, seed, input and criterion)."""
    return checkpoint.fingerprint(p, seed, f"{data_id}|{criterion_name(criterion)}")


def finish(state: isac.IsacState, p: isac.IsacParams, seconds: dict, criterion=None) -> outputs.ClassificationResult:
    """The final result of a run state: the accepted averages ordered (``order_averages``), every particle's
    class number in that order, its parameters (``(0, 0, 0, -1)`` if unaccounted) and pixel error. The result's
    parameters are ISAC's and, under ``stability``, the name of the criterion that made the classes."""
    n = len(state.class_of)
    averages = np.asarray(state.averages, np.float32) if state.averages else np.zeros((0, p.target_nx, p.target_nx),
                                                                                   np.float32)
    order = order_averages(averages, p) if len(averages) else np.zeros(0, int)
    rank = np.empty(len(order), int)
    rank[order] = np.arange(len(order))
    accounted = state.class_of >= 0
    class_number = np.zeros(n, int)
    class_number[accounted] = rank[state.class_of[accounted]] + 1
    params = state.params.copy()
    params[~accounted] = (0, 0, 0, -1)
    errors = np.where(accounted, state.errors, np.nan).astype(np.float32)
    candidates = np.asarray(state.candidates, np.int64)[order] if len(order) else np.zeros(0, np.int64)
    return outputs.ClassificationResult(averages[order], class_number, params, errors, candidates,
                                        tuple(state.history), dict(p.as_dict(), stability=criterion_name(criterion)),
                                        dict(seconds))


def classify(
    images,
    p: isac.IsacParams,
    output_dir: str | Path,
    seed: int = 0,
    data_id: str = "",
    restart: bool = True,
    mesh=None,
    criterion=None,
    budget=None,
    pixel_size: float | None = None,
    after_generation: Callable[[isac.IsacState], None] | None = None,
) -> outputs.ClassificationResult:
    """Runs ISAC on a working stack ``(n, target_nx, target_nx)``; returns the result in memory.

    After every generation the checkpoint (``output_dir/checkpoint/state.npz``) and the generation's folder
    (``io.outputs.write_generation``; ``pixel_size``: the working pixel size for its MRC headers) are written,
    then ``after_generation(state)`` is called (process 0 only). With ``restart`` and a checkpoint of the same
    run (same parameters, seed, ``data_id`` and criterion), it continues after the last finished generation; a
    checkpoint of a different run is refused. ``criterion``: ``criteria.Criterion`` (default ISAC2's pixel
    error). ``budget``: ``budget.Budget`` (chunk sizes). With several processes, every process runs this and
    process 0 alone writes.
    """
    out = Path(output_dir)
    main = sharding.is_main_process()
    if main:
        out.mkdir(parents=True, exist_ok=True)
    p.validate(len(images))
    run_id = run_fingerprint(p, seed, data_id, criterion)
    ckpt = out / checkpoint.CHECKPOINT
    state = checkpoint.refuse_other_run(out, run_id, restart)  # refuses another run's folder, restart or not
    if state is not None:
        log.info("restarting after generation %d (%d particles accounted)", state.generation, state.accounted)
    t0 = time.perf_counter()

    def on_generation(st: isac.IsacState, result: isac.GenerationResult, work_idx):
        if main:
            averages = np.asarray([c.average for c in result.classes], np.float32)
            outputs.write_generation(out, st.generation, averages, averages[list(result.accepted)], st.pool,
                                     st.history[-1], pixel_size)
            checkpoint.save_state(ckpt, st, run_id)
            if after_generation is not None:
                after_generation(st)
        sharding.barrier(f"generation {st.generation}")

    # one bar per generation (its SAC steps) on the main process; the others only log
    with progress.StepBars(mode=None if sharding.is_main_process() else "off") as bars:
        state = isac.run_isac(images, p, seed, state, mesh, on_generation, progress=bars, criterion=criterion,
                              budget=budget)
    result = finish(state, p, {"isac": round(time.perf_counter() - t0, 2)}, criterion)
    accounted = int(result.accounted.sum())
    log.info("%d classes, %d/%d particles accounted (%.0f %%)", len(result.averages), accounted,
             len(result.class_number), 100 * accounted / max(len(result.class_number), 1))
    return result
