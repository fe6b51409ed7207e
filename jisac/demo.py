"""Workflow layer: The built-in demo stack (what ``python -m jisac`` classifies with no input) and the alignment-
engine demo.

``demo_stack`` writes, once, a RELION stack of CTF-modulated noisy projections of a deterministic asymmetric
phantom with known views (``particles.star`` + ``particles.mrcs`` in the user's cache folder) and returns it.

The alignment demo (``demo.kind=alignment``) projects a deterministic asymmetric phantom along ``demo.n_views``
directions, makes ``demo.n_particles``
noisy particles from those views with random in-plane rotations, shifts and mirrors, aligns every particle to
every clean view (multi-reference polar alignment), and reports how often the right view, angle and centre were
found, then writes the class averages of the particles by their best view.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import pandas as pd

import jax
import numpy as np

from jisac import align, average, cache, config, ctf, devices, filters, synthetic
from jisac import transforms as T
from jisac.errors import ConfigError
from jisac.io.atomic import write_json
from jisac.io.mrc import write_stack
from jisac.io.star import write_stack_and_star

log = logging.getLogger("jisac")


DEMO_BOX = 96  # px; the particle radius is 36 px, so ISAC shrinks by 29/36 (exercises the resampling)
DEMO_RADIUS = 36
DEMO_PIXEL = 2.0  # Angstrom


def demo_stack(
    demo: config.DemoConfig,
    folder: Path | None = None,
    seed: int = 0,
    box: int = DEMO_BOX,
    radius: int = DEMO_RADIUS,
    pixel_size: float = DEMO_PIXEL,
) -> tuple[Path, int]:
    """``(particles.star path, particle radius in px)`` of the demo stack, made on first use and cached.

    Particles: ``demo.n_particles`` projections of the phantom along ``demo.n_views`` well-spread directions,
    each rotated in plane at random, mirrored at random (the view from the opposite side), shifted by up to
    ``demo.max_shift`` px, modulated by a CTF (300 kV, Cs 2.7 mm, 10 % amplitude contrast, defocus 1.0-2.5 um
    with up to 0.1 um astigmatism) and given white noise at ``demo.snr``. Extra columns ``jisacTrueView`` and
    ``jisacTrueDirectionX/Y/Z`` hold the truth.
    """
    settings = {"n_views": demo.n_views, "n_particles": demo.n_particles, "snr": demo.snr, "max_shift": demo.max_shift,
                "seed": seed, "box": box, "radius": radius, "pixel_size": pixel_size, "version": 1}
    tag = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    folder = (folder or cache.user_cache_root()) / f"demo-{tag}"
    star_path = folder / "particles.star"
    if star_path.exists():
        return star_path, radius
    t0 = time.perf_counter()
    n = demo.n_particles
    phantom = synthetic.make_phantom(radius=0.9 * radius, seed=seed)
    rot, tilt = synthetic.hemisphere_directions(demo.n_views)
    views = synthetic.project(phantom, synthetic.euler_to_matrix(rot, tilt, 0.0), box)
    rng = np.random.default_rng(seed)
    defocus = rng.uniform(10000.0, 25000.0, n)
    astig = rng.uniform(0.0, 1000.0, n)
    params = ctf.make_ctf_params(
        defocus + astig / 2, defocus - astig / 2, rng.uniform(0, 180, n), pixel_size_angst=pixel_size
    )
    sim = synthetic.simulate(views, n, jax.random.key(seed), demo.snr, demo.max_shift, ctf_params=params)
    images, truth, moves = np.asarray(sim.images), sim.view, sim.moves
    directions = synthetic.euler_to_matrix(rot, tilt, 0.0)[:, 2]
    # the mirror image of a projection is the view from the opposite side
    sign = np.where(np.asarray(moves.mirror), -1.0, 1.0)[:, None]
    metadata = pd.DataFrame({
        "rlnDefocusU": np.asarray(params.defocus_u_angst),
        "rlnDefocusV": np.asarray(params.defocus_v_angst),
        "rlnDefocusAngle": np.asarray(params.defocus_angle_deg),
        "rlnVoltage": 300.0,
        "rlnSphericalAberration": 2.7,
        "rlnAmplitudeContrast": 0.1,
        "rlnOpticsGroup": 1,
        "jisacTrueView": truth,
        "jisacTrueDirectionX": directions[truth, 0] * sign[:, 0],
        "jisacTrueDirectionY": directions[truth, 1] * sign[:, 0],
        "jisacTrueDirectionZ": directions[truth, 2] * sign[:, 0],
    })
    tmp = folder.with_name(folder.name + f".{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_stack_and_star(tmp / "particles.star", tmp / "particles.mrcs", images, metadata, pixel_size=pixel_size)
    try:
        os.replace(tmp, folder)  # the cached stack appears complete or not at all
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process made it first
    log.info("made the demo stack (%d particles, %d views, %d px, SNR %.2g, CTF) in %.1f s: %s",
             n, demo.n_views, box, demo.snr, time.perf_counter() - t0, star_path)
    return star_path, radius


def _angle_error(a, b):
    d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)) % 360.0
    return np.minimum(d, 360.0 - d)


def make_demo_particles(isac: config.IsacConfig, demo: config.DemoConfig):
    """Clean views ``(k, n, n)``, particles ``(N, n, n)``, true view index ``(N,)`` and the applied transforms."""
    box, radius = isac.target_nx, isac.target_radius
    mask = filters.circular_mask(box, box, radius)
    views, _ = synthetic.known_views(demo.n_views, box, radius, seed=isac.rand_seed)
    views = filters.normalize_in_mask(views, mask)
    sim = synthetic.simulate(views, demo.n_particles, jax.random.key(isac.rand_seed), demo.snr, demo.max_shift)
    return views, sim.images, sim.view, sim.moves


def run_alignment_demo(cfg: config.JisacConfig) -> dict:
    """Runs the demo; returns (and writes to ``summary.json``) its figures."""
    isac, demo = cfg.isac, cfg.demo
    if demo.n_views < 1 or demo.n_particles < 1:
        raise ConfigError("demo.n_views and demo.n_particles must be >= 1")
    if demo.snr <= 0:
        raise ConfigError(f"demo.snr must be > 0 (got {demo.snr})")
    budget = config.budget(cfg)
    options = config.isac_params(cfg).align
    batch, ref_chunk = align.chunk_sizes_for_budget(
        demo.n_views, options._replace(particle_batch=budget.particle_batch, reference_chunk=budget.reference_chunk),
        memory_budget_bytes=budget.device_bytes,
    )
    options = options._replace(particle_batch=batch, reference_chunk=ref_chunk)
    out = Path(cfg.output_dir)
    t0 = time.perf_counter()
    views, particles, truth, moves = make_demo_particles(isac, demo)
    particles = jax.block_until_ready(particles)
    t_data = time.perf_counter() - t0
    log.info(
        "made %d particles of %d views (%d px box, SNR %.3g) in %.1f s",
        demo.n_particles, demo.n_views, isac.target_nx, demo.snr, t_data,
    )

    t1 = time.perf_counter()
    bank = align.prepare_references(views, options)

    def progress(done, total):
        log.info("aligned %d/%d particles to %d views (%.1f s)", done, total, demo.n_views, time.perf_counter() - t1)

    mesh = devices.mesh_from_config(cfg.hardware)
    log.info("aligning on %d %s device(s)", mesh.size, jax.devices()[0].platform)
    chunk = budget.particle_chunk * mesh.size
    result = align.align_to_references(particles, bank, options, particle_chunk=chunk, progress=progress, mesh=mesh)
    result = jax.block_until_ready(result)
    t_align = time.perf_counter() - t1
    comparisons = demo.n_particles * demo.n_views * options.grid.n_shifts

    found = np.asarray(result.reference)
    correct = found == truth
    truth_params = T.inverse(moves)
    ang = _angle_error(result.params.angle, truth_params.angle)
    centre_found = np.stack([np.asarray(c) for c in T.particle_centre(result.params)], -1)
    centre_true = np.stack([np.asarray(c) for c in T.particle_centre(truth_params)], -1)
    centre_err = np.hypot(*(centre_found - centre_true).T)
    mirror_ok = np.asarray(result.params.mirror) == np.asarray(moves.mirror)

    averages = average.class_averages(particles, result.params, found, demo.n_views, mesh=mesh)
    write_stack(out / "class_averages.mrcs", averages)
    write_stack(out / "views.mrcs", views)
    summary = {
        "n_particles": demo.n_particles,
        "n_views": demo.n_views,
        "snr": demo.snr,
        "view_accuracy": float(correct.mean()),
        "mirror_accuracy": float(mirror_ok[correct].mean()) if correct.any() else 0.0,
        "median_angle_error_deg": float(np.median(ang[correct])) if correct.any() else None,
        "mean_centre_error_px": float(centre_err[correct].mean()) if correct.any() else None,
        "comparisons": comparisons,
        "align_seconds": t_align,
        "comparisons_per_s": comparisons / t_align,
        "devices": [str(d) for d in jax.devices()],
    }
    write_json(out / "summary.json", summary)
    rows = [
        ("particles x views", f"{demo.n_particles} x {demo.n_views} ({options.grid.n_shifts} shifts, mirror)"),
        ("right view found", f"{100 * summary['view_accuracy']:.1f} %"),
        ("right mirror (of those)", f"{100 * summary['mirror_accuracy']:.1f} %"),
        ("median angle error", f"{summary['median_angle_error_deg']:.2f} deg"),
        ("mean centre error", f"{summary['mean_centre_error_px']:.2f} px"),
        ("alignment time", f"{t_align:.1f} s ({summary['comparisons_per_s']:.3g} comparisons/s, compile included)"),
    ]
    width = max(len(r[0]) for r in rows)
    print("\n".join(f"  {name:<{width}}  {value}" for name, value in rows))
    print(f"class averages: {out / 'class_averages.mrcs'} (view k at index k; clean views in views.mrcs)")
    return summary
