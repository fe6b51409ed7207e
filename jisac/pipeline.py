"""ISAC end to end on a working stack: checkpoints after every generation, restart, outputs.

Output folder (SPHIRE's bookkeeping kept for familiarity, ``isac_algorithm.md`` §10.1)::

    class_averages.mrcs          accepted averages, ordered so similar views sit together (class k at index k-1)
    class_averages.png           labelled montage
    processed_images.txt         accounted particles (0-based indices into the input stack)
    not_processed_images.txt     the others
    all_parameters.txt           one row per particle: angle, shift x, shift y, mirror (-1: unaccounted), in the
                                 working frame relative to the pre-aligned particle
    particle_classes.txt         one row per particle: class number (1-based index into class_averages.mrcs,
                                 0 unaccounted) and pixel error
    summary.json                 counts per generation, accounted fraction, classes, times, peak memory
    main001/generationGGG/       each generation's averages (all and accepted) as soon as it ends
    checkpoint/state.npz         the run state after the last finished generation (restart)

Every file is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import resource
import time
from pathlib import Path

import numpy as np

from jisac import align, isac, sharding
from jisac.io.atomic import atomic_path, write_json
from jisac.io.mrc import write_stack

log = logging.getLogger("jisac")


class RunMismatchError(ValueError):
    """The output folder holds the state of a different run."""


def fingerprint(p: isac.IsacParams, seed: int, data_id: str) -> str:
    """Identity of a run: its parameters, seed and input (a restart must match it)."""
    text = json.dumps({"params": p.as_dict(), "seed": seed, "data": data_id}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def save_state(path: Path, state: isac.IsacState, run_id: str) -> None:
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
                params=state.params,
                errors=state.errors,
                class_of=state.class_of,
                history=json.dumps(state.history),
                empty_generations=state.empty_generations,
                done=state.done,
            )


def load_state(path: Path, run_id: str) -> isac.IsacState:
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
            averages=list(z["averages"]) if len(sizes) else [],
            members=members,
            params=z["params"],
            errors=z["errors"],
            class_of=z["class_of"],
            history=json.loads(str(z["history"])),
            empty_generations=int(z["empty_generations"]),
            done=bool(z["done"]),
        )


def order_averages(averages: np.ndarray, p: isac.IsacParams) -> np.ndarray:
    """An order of the averages in which similar views sit together.

    Similarity is rotation- and mirror-invariant: the best polar-alignment score of one average against another
    (symmetrised). The order is a greedy nearest-neighbour chain from the average most similar to all others
    (SPHIRE's sp_chains also refines with simulated annealing and rotates each average onto its neighbour; jisac
    keeps averages as they are so members' parameters stay valid).
    """
    k = len(averages)
    if k < 3:
        return np.arange(k)
    options = p.align
    bank = align.prepare_references(np.asarray(averages, np.float32), options)
    table = align.alignment_table(np.asarray(averages, np.float32), bank, options)
    sim = np.asarray(table.score, np.float64)
    sim = (sim + sim.T) / 2
    np.fill_diagonal(sim, -np.inf)
    order = [int(np.argmax(np.where(np.isfinite(sim), sim, 0).sum(1)))]
    left = set(range(k)) - set(order)
    while left:
        last = order[-1]
        nxt = max(left, key=lambda j: sim[last, j])
        order.append(nxt)
        left.remove(nxt)
    return np.asarray(order)


def write_montage(path: Path, averages: np.ndarray, sizes: list[int], columns: int = 10) -> None:
    """A labelled montage of the averages (class number and member count under each)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = max(len(averages), 1)
    cols = min(columns, k)
    rows = -(-k // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.45 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i, (img, n) in enumerate(zip(averages, sizes)):
        ax = axes.ravel()[i]
        ax.imshow(img, cmap="gray")
        ax.set_title(f"{i + 1}: {n}", fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)


def _write_table(path: Path, rows: np.ndarray, fmt) -> None:
    with atomic_path(path) as tmp:
        np.savetxt(tmp, rows, fmt=fmt)


def write_generation(out: Path, state: isac.IsacState, result: isac.GenerationResult, work_idx: np.ndarray) -> None:
    folder = out / "main001" / f"generation{state.generation:03d}"
    folder.mkdir(parents=True, exist_ok=True)
    if result.classes:
        write_stack(folder / "class_averages.mrcs", np.stack([c.average for c in result.classes]))
    if result.accepted:
        write_stack(folder / "good_class_averages.mrcs", np.stack([result.classes[c].average for c in result.accepted]))
    _write_table(folder / "to_process_next.txt", state.pool, "%d")
    with atomic_path(folder / "finished") as tmp:
        tmp.write_text(json.dumps(state.history[-1]) + "\n")


def write_final(out: Path, state: isac.IsacState, p: isac.IsacParams, timings: dict, write: bool = True) -> dict:
    n = len(state.class_of)
    averages = np.asarray(state.averages, np.float32)
    order = order_averages(averages, p) if len(averages) else np.zeros(0, int)
    rank = np.empty(len(order), int)
    rank[order] = np.arange(len(order))
    # (indexed only where accounted: a run that accepts no class has an empty rank)
    class_number = np.zeros(n, int)
    class_number[state.class_of >= 0] = rank[state.class_of[state.class_of >= 0]] + 1
    sizes = [len(state.members[i]) for i in order]
    accounted = np.nonzero(state.class_of >= 0)[0]
    summary = {
        "particles": n,
        "accounted": int(len(accounted)),
        "accounted_fraction": float(len(accounted) / n) if n else 0.0,
        "classes": int(len(averages)),
        "class_sizes": sizes,
        "median_pixel_error": float(np.nanmedian(state.errors)) if len(accounted) else None,
        "generations": state.history,
        "seconds": timings,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "parameters": p.as_dict(),
    }
    if not write:  # another process than 0 of a multi-process run
        return summary
    if len(averages):
        write_stack(out / "class_averages.mrcs", averages[order])
        write_montage(out / "class_averages.png", averages[order], sizes)
    _write_table(out / "processed_images.txt", accounted, "%d")
    _write_table(out / "not_processed_images.txt", np.nonzero(state.class_of < 0)[0], "%d")
    params = state.params.copy()
    params[state.class_of < 0] = (0, 0, 0, -1)
    _write_table(out / "all_parameters.txt", params, ["%.4f", "%.4f", "%.4f", "%d"])
    _write_table(out / "particle_classes.txt", np.stack([class_number, state.errors], -1), ["%d", "%.4f"])
    write_json(out / "summary.json", summary)
    return summary


def classify(
    images: np.ndarray,
    p: isac.IsacParams,
    output_dir: str | Path,
    seed: int = 0,
    data_id: str = "",
    restart: bool = True,
    mesh=None,
    criterion=None,
    budget=None,
) -> dict:
    """Runs ISAC on a working stack ``(n, target_nx, target_nx)``, writing outputs to ``output_dir``.

    With ``restart`` and a checkpoint of the same run (same parameters, seed and ``data_id``) in
    ``output_dir``, continues after its last finished generation; a checkpoint of a different run is refused.
    ``criterion``: the stability criterion (default ISAC2's pixel error). ``budget``: ``Budget`` (chunk
    sizes). With several processes, every process runs this and process 0 alone writes.
    """
    out = Path(output_dir)
    main = sharding.is_main_process()
    if main:
        out.mkdir(parents=True, exist_ok=True)
    p.validate(len(images))
    run_id = fingerprint(p, seed, f"{data_id}|{criterion.name if criterion is not None else 'pixel_error'}")
    ckpt = out / "checkpoint" / "state.npz"
    state = None
    if ckpt.exists():
        state = load_state(ckpt, run_id)  # refuses another run's folder, restart or not
        if not restart:
            raise RunMismatchError(
                f"{out}: holds a finished or interrupted run; use isac.restart=true or another output_dir"
            )
        log.info(
            "restarting after generation %d (%d particles accounted)",
            state.generation,
            int((state.class_of >= 0).sum()),
        )
    t0 = time.perf_counter()

    def on_generation(st, result, work_idx):
        if main:
            write_generation(out, st, result, work_idx)
            save_state(ckpt, st, run_id)
        sharding.barrier(f"generation {st.generation}")

    state = isac.run_isac(images, p, seed, state, mesh, on_generation, progress=log.info, criterion=criterion,
                          budget=budget)
    t_isac = time.perf_counter() - t0
    summary = write_final(out, state, p, {"isac": round(t_isac, 2)}, write=main)
    log.info(
        "%d classes, %d/%d particles accounted (%.0f %%): %s",
        summary["classes"], summary["accounted"], summary["particles"], 100 * summary["accounted_fraction"],
        out / "class_averages.mrcs",
    )
    return summary
