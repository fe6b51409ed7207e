"""Workflow layer: ISAC from run parameters, a particle stack in, every output file out.

Steps (``shared/isac_algorithm.md`` §3, §10): open the stack (STAR, MRCS, HDF or .cs; the built-in demo stack when
none is given) and turn the configuration into ``config.RunParams`` (every option checked before heavy work);
pre-align shrunk copies for centring (§3.1); prepare the working stack (phase flip, shift, shrink to
``target_radius``, box ``target_nx``, normalise; §3.2) — both reused from the preprocessing cache
(``jisac.cache``) when an earlier run made them; classify with checkpoints (``pipeline.classify``); then write
every output file once from the result (``io.outputs.write_run``) and the report page (``jisac.report``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from pathlib import Path

import jax
import numpy as np

from jisac import beautify, cache, checkpoint, config, ctf, devices, filters, io, memory, pipeline, prealign
from jisac import preprocess, rows
from jisac import progress, sharding
from jisac import report as html_report
from jisac.budget import working_stack_on_disk
from jisac.demo import demo_stack
from jisac.diskarray import DiskArray
from jisac.errors import ConfigError, InputError
from jisac.io import outputs, relion

log = logging.getLogger("jisac")


def _stack_id(path: str) -> str:
    st = os.stat(path)
    return f"{os.path.abspath(path)}:{st.st_size}:{int(st.st_mtime)}"


def _ctf_params(stack, use_ctf: bool):
    if not use_ctf:
        return None
    io.require_ctf_columns(stack.metadata, source=str(stack.source))
    return ctf.CTFParams.from_relion_table(stack.metadata, pixel_size_angst=stack.pixel_size)


def _working_stack(stack, prep: preprocess.PreprocessParams, ctf_params, shifts, pixel_size, disk=None, mesh=None):
    """The prepared stack as an array: in memory, or (``disk``: a path) written there by process 0 and read by
    every process with plain reads of the rows it needs (``jisac.diskarray``, ``working_stack_on_disk``). Each
    batch is split over this process's devices of ``mesh``."""
    batches = lambda: stack.iter_batches(256)  # noqa: E731  (VPP reads the stack twice)
    local = None if mesh is None else [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    if disk is None:
        return preprocess.prepare_working_stack(
            batches, len(stack), prep, ctf_params_for_indices=ctf_params, shifts=shifts, pixel_size_angst=pixel_size,
            devices=local,
        ).images
    if sharding.is_main_process():
        disk.parent.mkdir(parents=True, exist_ok=True)
        preprocess.prepare_working_stack(
            batches, len(stack), prep, ctf_params_for_indices=ctf_params, shifts=shifts, pixel_size_angst=pixel_size,
            out_path=disk, devices=local,
        )
    sharding.barrier(f"working stack {disk.name}")
    return DiskArray.from_mrc(disk)


def run(cfg: config.JisacConfig) -> dict:
    """Runs ISAC as configured; returns the summary (also in ``summary.json``).

    Everything that can be checked before heavy work is checked first, each failing with one ``InputError``
    line: every option (``config.run_params``), the stack (``io.open_stack``), the output folder (writable, not in
    use by another run, not holding another run's state). The folder is locked for the run's duration."""
    out = Path(cfg.output_dir)
    t0 = time.perf_counter()
    if cfg.data.stack is None:
        config.isac_params(cfg)  # a bad option stops before the demo stack is made
        path, radius = demo_stack(cfg.demo)
        log.info("no data.stack given: using the built-in demo stack %s", path)
        if not cfg.isac.ctf:
            log.info("the demo stack carries a CTF: phase flipping it (as isac.ctf=true)")
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, stack=str(path)),
                                  isac=dataclasses.replace(cfg.isac, radius=radius, ctf=True))
    elif cfg.isac.radius is None:
        raise ConfigError("isac.radius is required: the particle radius in pixels of the input stack")
    path = cfg.data.stack
    if cfg.data.pixel_size is not None and not cfg.data.pixel_size > 0:
        raise ConfigError(f"data.pixel_size must be > 0 Angstrom/px (got {cfg.data.pixel_size})")
    stack = io.open_stack(path, pixel_size=cfg.data.pixel_size, project_dir=cfg.data.project_dir)
    n, box = len(stack), stack.box_size
    pixel_size = io.require_pixel_size(stack)
    try:
        rp = config.run_params(cfg, n, box)  # every option checked before heavy work
    except ConfigError as err:
        raise ConfigError(f"{err} (stack {path})") if "isac.radius=" in str(err) else err from None
    ctf_params = _ctf_params(stack, rp.preprocess.ctf)
    prep = rp.preprocess
    if not rp.skip_prealignment:
        try:
            prealign.search_stages(prep.shrunk_size(box), rp.isac.target_radius)
        except ValueError as err:
            raise ConfigError(f"{err}; set isac.skip_prealignment=true or a smaller isac.target_radius") from None
    data_id = repr((_stack_id(str(path)), prep.radius, prep.ctf, prep.vpp, rp.skip_prealignment))
    main = sharding.is_main_process()
    if main:
        checkpoint.prepare_output_dir(out)
    lock = checkpoint.output_dir_lock(out) if main else contextlib.nullcontext()
    with lock:
        # a folder holding another run's state is refused here, before pre-alignment
        checkpoint.refuse_other_run(out, pipeline.run_fingerprint(rp.isac, rp.seed, data_id, rp.criterion),
                                    rp.restart)
        return _run(cfg, rp, stack, path, pixel_size, ctf_params, data_id, out, t0)


def _run(cfg: config.JisacConfig, rp: config.RunParams, stack, path, pixel_size: float, ctf_params, data_id: str,
         out: Path, t0: float) -> dict:
    # this run's compilations only, also when a library or a test calls run() without the CLI's devices.setup
    devices.count_compilations()
    compiled_before = devices.compilation_stats()
    n, box = len(stack), stack.box_size
    mesh = devices.mesh_from_config(cfg.hardware)
    report = memory.MemoryReport()
    p, prep, budget = rp.isac, rp.preprocess, rp.budget
    s = prep.shrink_ratio
    log.info("%d particles, %d px box, %.3f A/px, radius %d px -> shrink ratio %.4f", n, box, pixel_size,
             prep.radius, s)
    timings = {}
    # The preprocessing cache is for single-process runs (several processes would race on its entries).
    digest = cache.data_digest() if rp.cache and jax.process_count() == 1 else None
    keep = _usable_particles(stack, prep.radius, rp.drop_unusable, digest)
    if len(keep) < 2 * p.img_per_grp:
        raise InputError(
            f"{stack.source}: {len(keep)} usable particle(s) of {n} are fewer than 2 x isac.img_per_grp "
            f"({2 * p.img_per_grp}); lower isac.img_per_grp or give more particles"
            if len(keep) else f"{stack.source}: no usable particle (every image is empty, constant or not finite)")
    disk = working_stack_on_disk(n, p.target_nx, budget, out)
    if disk is not None:
        log.info("the working stack (%.0f MB) is above half of hardware.host_memory_budget_mb: kept on disk at %s",
                 n * p.target_nx**2 * 4 / 2**20, disk)
    log.info("%d device(s) (%s), hardware.memory_budget_mb=%d per device", mesh.size, mesh.devices.flat[0].platform,
             budget.device_bytes >> 20)
    shifts, images, cache_record = _cached_preprocessing(rp, stack, ctf_params, keep, pixel_size, digest,
                                                         timings, mesh, disk, report)

    result = pipeline.classify(
        images, p, out, seed=rp.seed, data_id=data_id, restart=rp.restart, mesh=mesh,
        criterion=rp.criterion, budget=budget, pixel_size=pixel_size / s,
        after_generation=lambda state: _refresh_report(out),
    )
    report.record("isac")
    compiled = devices.compilation_stats(since=compiled_before)
    log.info("XLA: %d programs compiled, %d loaded from the compilation cache (%.1f s compiling)",
             compiled["compilations"], compiled["cache_hits"], compiled["compile_seconds"])
    timings["total"] = round(time.perf_counter() - t0, 2)
    result = result._replace(seconds={**result.seconds, **timings}).on_stack(keep, n)
    report.record("outputs")
    extra = {
        "input": str(path),
        "cache": cache_record,
        "memory": {"devices": mesh.size, "processes": jax.process_count(), "stages": report.stages},
        "peak_rss_mb": report.stages["outputs"]["peak_rss_mb"],
        "compilation": compiled,
    }
    if not sharding.is_main_process():
        return {**outputs.summary_of(result), **extra}
    extra.update(radius_px=prep.radius, ctf=prep.ctf)  # what the beautifier needs to run on this folder later
    halves = relion.split_half_averages(result.class_number, result.params, images, keep)  # class resolutions
    frc = np.asarray(filters.fourier_ring_correlation(halves[:, 0], halves[:, 1])) if len(halves) else None
    frame = outputs.InputFrame(stack.metadata, pixel_size, box, s, shifts, str(path), stack=stack, class_frc=frc)
    summary = outputs.write_run(out, result, frame, extra)
    if disk is not None:  # the scratch stacks (read with plain reads: nothing holds them open)
        for scratch in (disk, disk.with_name("prealign_stack.mrcs")):
            scratch.unlink(missing_ok=True)
    if rp.beautify is not None and len(result.averages):
        _beautify(out, rp.beautify, path, cfg.beautify.out_dir)
    _refresh_report(out)
    log.info("outputs: %s (class averages), %s (open it in a browser)", out / "class_averages.mrcs",
             out / "report.html")
    return summary


def _beautify(run_dir: Path, params, stack_path, out_dir=None) -> dict:
    """The beautifier on a finished run folder (``jisac.beautify``), with progress per class batch."""
    t = time.perf_counter()
    with progress.task("beautifier", total=None, unit="class") as bar:
        def advance(done, total):
            bar.set_total(total)
            bar.advance(done - bar.n)

        result = beautify.beautify_run(run_dir, params, stack_path=stack_path, out_dir=out_dir, progress=advance)
    folder = Path(out_dir) if out_dir else run_dir / "beautify"
    log.info("beautified averages (full size, CTF-corrected, resolution per class): %s (%.1f s)",
             folder / "class_averages.mrcs", time.perf_counter() - t)
    return result


def beautify_existing(cfg: config.JisacConfig) -> dict:
    """``python -m jisac beautify.run_dir=RUN``: the beautifier alone on a finished run folder."""
    run_dir = Path(cfg.beautify.run_dir)
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise InputError(f"beautify.run_dir={run_dir}: no summary.json there; give the output_dir of a finished "
                         "jisac run")
    summary = json.loads(summary_path.read_text())
    radius = cfg.beautify.radius_px or summary.get("radius_px")
    if radius is None:
        raise ConfigError(f"beautify.radius_px is required for {run_dir} (its summary.json does not say the radius)")
    stack_path = cfg.beautify.stack or summary.get("input")
    try:
        params = config.beautify_params(cfg, float(radius), bool(summary.get("ctf", False)))
        params.validate(io.open_stack(stack_path).box_size)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    result = _beautify(run_dir, params, stack_path, cfg.beautify.out_dir)
    _refresh_report(run_dir)
    return result


def _refresh_report(out: Path) -> None:
    """Rewrites ``report.html``; a report that cannot be written must never fail the run."""
    try:
        html_report.write_report(out)
    except Exception as err:  # noqa: BLE001
        log.warning("could not write %s: %s", out / "report.html", err)


def _kept(images, keep: np.ndarray):
    """The rows ``keep`` of ``images``: the array itself when nothing was left out, else a copy (in memory) or
    a lazy view (a stack on disk)."""
    if len(keep) == images.shape[0]:
        return images
    return rows.take_rows(images, keep)


def _preprocess(stack, rp: config.RunParams, ctf_params, keep: np.ndarray, pixel_size: float, timings: dict, mesh,
                disk, report) -> tuple[np.ndarray, np.ndarray]:
    """``(shifts (n, 2) float32 original px, working stack (len(keep), target_nx, target_nx) float32)``: the
    pre-alignment (§3.1) and the working stack (§3.2, on ``disk`` when given); stage times go
    into ``timings`` (seconds), memory into ``report``."""
    prep, p, seed = rp.preprocess, rp.isac, rp.seed
    n, box, s = len(stack), stack.box_size, prep.shrink_ratio
    # Pre-alignment: shrunk copies without cropping, centring shifts in original pixels.
    if rp.skip_prealignment:
        shifts = np.zeros((n, 2), np.float32)
    else:
        t = time.perf_counter()
        shrunk_box = prep.shrunk_size(box)
        copies = _working_stack(stack, prep._replace(target_nx=shrunk_box), ctf_params, None, pixel_size,
                                disk and disk.with_name("prealign_stack.mrcs"), mesh)
        shifts_shrunk = np.zeros((n, 2), np.float32)
        with progress.StepBars() as stages:  # one bar per search stage
            shifts_shrunk[keep] = prealign.prealign(
                _kept(copies, keep), p.target_radius, jax.random.fold_in(jax.random.key(seed), 0),
                mesh=mesh, progress=stages,
            )
        del copies
        shifts = (shifts_shrunk / s).astype(np.float32)
        timings["prealignment"] = round(time.perf_counter() - t, 2)
        report.record("prealignment")

    t = time.perf_counter()
    images = _kept(_working_stack(stack, prep, ctf_params, shifts, pixel_size, disk, mesh), keep)
    timings["working_stack"] = round(time.perf_counter() - t, 2)
    log.info("working stack: %d x %d px (%.1f s)", len(images), p.target_nx, timings["working_stack"])
    report.record("working_stack")
    return shifts, images


def _cached_preprocessing(rp: config.RunParams, stack, ctf_params, keep: np.ndarray, pixel_size: float, digest,
                          timings: dict, mesh, disk, report):
    """:func:`_preprocess` through the preprocessing cache (``jisac.cache``): ``(shifts, images, record)`` where
    ``record`` (for summary.json) says ``status`` ("hit", "miss" or "off"), and the entry's ``key`` and ``path``."""
    args = (stack, rp, ctf_params, keep, pixel_size, timings, mesh, disk, report)
    if digest is None:
        shifts, images = _preprocess(*args)
        return shifts, images, {"status": "off"}
    settings = {
        "n": len(stack), "box": stack.box_size, "pixel_size": float(pixel_size), **rp.preprocess._asdict(),
        "skip_prealignment": rp.skip_prealignment, "drop_unusable": rp.drop_unusable,
        # the pre-alignment's random start comes from rand_seed; without pre-alignment the seed plays no part
        "prealignment_seed": None if rp.skip_prealignment else rp.seed,
    }
    key, info = cache.make_key(digest.hexdigest(), settings, ctf_params)
    folder = cache.resolve_folder(rp.cache_dir)
    with cache.entry_lock(folder, key):  # parallel sweep jobs compute a shared entry once
        t = time.perf_counter()
        hit = cache.load(folder, key)
        if hit is not None and len(hit["working"]) == len(keep):
            timings["cache_load"] = round(time.perf_counter() - t, 2)
            log.info("preprocessing cache hit: working stack and pre-alignment from %s (%.1f s)", folder / key,
                     timings["cache_load"])
            return hit["shifts"], hit["working"], {"status": "hit", "key": key, "path": str(folder / key)}
        log.info("preprocessing cache miss: computing the pre-alignment and working stack (key %s)", key)
        shifts, images = _preprocess(*args)
        try:
            entry = cache.store(folder, key, info, working=images, shifts=shifts, keep=keep)
            log.info("stored in the preprocessing cache: %s (%.0f MB)", entry, images.nbytes / 2**20)
        except OSError as err:  # a full or read-only cache folder must not fail the run
            log.warning("could not write the preprocessing cache %s: %s", folder / key, err)
    return shifts, images, {"status": "miss", "key": key, "path": str(folder / key)}


def _usable_particles(stack, radius: int, drop: bool, digest=None) -> np.ndarray:
    """Indices of the usable particles: all pixels finite and not constant inside the particle's circle
    (``radius`` px; an empty or constant image has no signal but would align identically in every stability run
    and pass the test). Stops with one line naming the others unless ``drop`` (``data.drop_unusable``).
    ``digest``: a ``jisac.cache.data_digest()`` fed every image on the way (this pass reads the whole stack)."""
    nonfinite, spread = [], np.zeros(len(stack))
    inside = None
    for idx, images in stack.iter_batches(1024):
        if digest is not None:
            cache.update_digest(digest, images)
        images = np.asarray(images)
        if inside is None:
            inside = filters.circular_mask(images.shape[1], images.shape[2], radius)
        finite = np.isfinite(images.reshape(len(images), -1)).all(1)
        nonfinite.extend(np.asarray(idx)[~finite].tolist())
        with np.errstate(invalid="ignore", over="ignore"):
            spread[np.asarray(idx)] = np.where(finite, images[:, inside].astype(np.float64).std(1), np.nan)
    # constant: no variation inside the circle, relative to the stack's typical particle (a stack of blank
    # images has a typical spread of 0, and then every image is constant)
    typical = np.nanmedian(spread) if np.isfinite(spread).any() else 0.0
    constant = np.nonzero(np.isfinite(spread) & (spread <= 1e-6 * typical))[0].tolist()
    if (nonfinite or constant) and not drop:
        parts = []
        for what, bad in (("NaN or Inf pixels", nonfinite), ("no signal (empty or constant inside the particle "
                                                                "radius)", constant)):
            if bad:
                shown = ", ".join(map(str, bad[:10])) + (" ..." if len(bad) > 10 else "")
                parts.append(f"{len(bad)} particle(s) have {what} (0-based indices {shown})")
        raise io.StackError(f"{stack.source}: " + "; ".join(parts) + "; remove them or set data.drop_unusable=true "
                            "to leave them out")
    if nonfinite:
        log.warning("leaving out %d particle(s) with NaN or Inf pixels (data.drop_unusable=true)", len(nonfinite))
    if constant:
        log.warning("leaving out %d empty or constant particle(s) (data.drop_unusable=true)", len(constant))
    return np.setdiff1d(np.arange(len(stack)), np.asarray(nonfinite + constant, np.int64))
