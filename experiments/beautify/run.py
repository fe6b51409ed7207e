"""Benchmark of the beautifier (jisac.beautify) on particles simulated from the 70S ribosome map.

Particles are Fourier-slice projections (``jisac.synthetic.map_projector``) of
/work/shared/maps/clean70SRibosome_vol_65p.mrc (65^3, header pixel size 0: taken as 4.5 A/px, so the ~250 A
ribosome spans 56 px), sampled at half that pixel size (2.25 A/px) in a 160 px box.
Classes are made from the truth: each class is a view direction; its members look from within ``--cone`` degrees of
it (tilted about an in-plane axis, so the class frame stays defined), then rotated in plane, shifted, mirrored at
random, CTF-modulated (1-3 um defocus, <= 1000 A astigmatism, 300 kV, applied in a 2x padded box) and drowned in
white noise at ``--snr`` (signal variance inside the particle disc / noise variance). The beautifier gets the true
in-plane parameters perturbed as a working-frame ISAC would leave them (angle +- N(0, 1 deg), shifts +- N(0, 0.5)
working px at shrink 29/radius) through a fake run folder (particles.star + summary.json).

Compared: the full-size averages (Wiener, Wiener + local refinement, phase flip) against the working-frame average
jisac's run computes (preprocess.prepare_batch: phase flip, shrink to radius 29 in 76 px; bilinear alignment with
the same perturbed working parameters), each correlated with the clean CTF-free projection along the class's view
(high-passed below 1/(diameter/3), soft-masked); and each class's split-half FRC-0.143 resolution against the
resolution measured against the truth (FRC 0.5 against the mean of its members' clean class-frame projections, the
image the average estimates).

Usage: python experiments/beautify/run.py [--per-class 200] [--classes 4] [--snr 0.07]
Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import mrcfile
import numpy as np
import starfile

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from jisac import beautify as B  # noqa: E402
from jisac import ctf, filters, preprocess, synthetic, transforms  # noqa: E402
from jisac.io import star  # noqa: E402

MAP = Path("/work/shared/maps/clean70SRibosome_vol_65p.mrc")
MAP_APIX = 4.5  # A/px assumed for the 65^3 map (its header says 0)
BOX = 160
APIX = MAP_APIX / 2  # particles sampled at half the map's pixel size
RADIUS = 60  # input px (the ribosome reaches ~57 px)


def rot_about_axis(axis: np.ndarray, angle_deg: np.ndarray) -> np.ndarray:
    """Rodrigues rotation matrices ``(b, 3, 3)``."""
    a = np.deg2rad(angle_deg)[:, None, None]
    k = axis / np.linalg.norm(axis, axis=1, keepdims=True)
    kx = np.zeros((len(k), 3, 3))
    kx[:, 0, 1], kx[:, 0, 2], kx[:, 1, 0] = -k[:, 2], k[:, 1], k[:, 2]
    kx[:, 1, 2], kx[:, 2, 0], kx[:, 2, 1] = -k[:, 0], -k[:, 1], k[:, 0]
    return np.eye(3) + np.sin(a) * kx + (1 - np.cos(a)) * kx @ kx


def highpass_corr(a: np.ndarray, b: np.ndarray, cutoff: float, mask: np.ndarray) -> float:
    """Correlation of two images after a soft mask and removing frequencies below ``cutoff`` cycles/px."""
    n = a.shape[-1]
    keep = filters.radial_frequency(n, n) >= cutoff
    fa = np.fft.rfft2(a * mask) * keep
    fb = np.fft.rfft2(b * mask) * keep
    return float(np.sum(np.real(fa * np.conj(fb))) / np.sqrt(np.sum(np.abs(fa) ** 2) * np.sum(np.abs(fb) ** 2)))


def truth_resolution(average, truth, mask) -> float:
    frc = np.asarray(filters.fourier_ring_correlation(jnp.asarray(average * mask), jnp.asarray(truth * mask)))
    return APIX / float(filters.frc_resolution(jnp.asarray(frc), 0.5, BOX))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-class", type=int, default=200)
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--snr", type=float, default=0.07)
    ap.add_argument("--cone", type=float, default=10.0, help="view spread within a class, degrees")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--truth-draws", type=int, default=400,
                    help="independent views per class averaged into the expected class average (the truth)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary run folder (+ truth.npz) and say where")
    args = ap.parse_args()
    if not MAP.is_file():
        print(f"{MAP} not found: skipping the beautifier benchmark")
        print(json.dumps({"skipped": f"{MAP} absent"}))
        return
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    vol, _ = synthetic.read_map(MAP)
    # the map's FT zero-padded to BOX^3 voxels (2.46x), as this benchmark has always sampled it
    project = synthetic.map_projector(synthetic.fourier_volume(vol, MAP_APIX, pad=BOX), BOX, APIX)

    k, per = args.classes, args.per_class
    n = k * per
    # class views: spread over tilt 40..90 deg (away from the pole, where rot and psi are degenerate)
    centre_rot = np.linspace(0, 360, k, endpoint=False) + 20
    centre_tilt = np.linspace(45, 90, k)
    r_centre = synthetic.euler_to_matrix(centre_rot, centre_tilt, 0.0)
    labels = np.repeat(np.arange(k), per)
    # members: tilted by up to `cone` deg about a random in-plane axis (no in-plane rotation component)
    phi = rng.uniform(0, 2 * np.pi, n)
    tilt = args.cone * np.sqrt(rng.uniform(0, 1, n))
    r_member = rot_about_axis(np.stack([np.cos(phi), np.sin(phi), np.zeros(n)], 1), tilt) @ r_centre[labels]
    # in-plane Q = (q, t, m): particle = M Shift_t Rot_q (member's class-frame projection); Rz(q) = jisac's R(q)
    q = rng.uniform(0, 360, n)
    t = rng.uniform(-4, 4, (n, 2))
    m = rng.integers(0, 2, n).astype(bool)
    r_part = synthetic.euler_to_matrix(0.0, 0.0, q) @ r_member

    def batched(fn, *arrays, size=100):
        count = len(arrays[0])
        return np.concatenate([np.asarray(fn(*(a[i:i + size] for a in arrays))) for i in range(0, count, size)])

    zero = np.zeros((n, 2), np.float32)
    clean_class_frame = batched(project, r_member.astype(np.float32), zero)  # (n, BOX, BOX)
    clean = batched(project, r_part.astype(np.float32), t.astype(np.float32))
    clean = np.where(m[:, None, None], synthetic.mirror_x(clean), clean)
    truth_centre = np.asarray(project(r_centre.astype(np.float32), np.zeros((k, 2), np.float32)))
    scale = 1.0 / truth_centre.std()
    clean, clean_class_frame, truth_centre = clean * scale, clean_class_frame * scale, truth_centre * scale
    q_true = transforms.make_transform(q, t[:, 0], t[:, 1], m)
    p_true = transforms.inverse(q_true)
    # check the convention: apply_transform(particle, p_true) ~ its class-frame projection
    check = np.asarray(transforms.apply_transform(clean[:4], transforms.Transform2D(*(f[:4] for f in p_true))))
    conv = min(np.corrcoef(check[i].ravel(), clean_class_frame[i].ravel())[0, 1] for i in range(4))

    # CTF in a 2x padded box (the signal delocalised beyond the box is lost, as in a real extraction)
    du = rng.uniform(10000, 30000, n)
    dv = du - rng.uniform(0, 1000, n)
    dang = rng.uniform(0, 180, n)
    cp = ctf.make_ctf_params(du, dv, dang, pixel_size_angst=APIX)
    modulated = batched(lambda im, *f: synthetic.apply_ctf_padded(im, ctf.CTFParams(*f)), clean,
                        *[np.asarray(f) for f in cp])
    disc = filters.circular_mask(BOX, BOX, 55)
    particles = np.asarray(synthetic.add_noise(modulated, args.snr, jax.random.key(args.seed), disc))
    t_sim = time.perf_counter() - t0

    # what ISAC would hand over: working-frame parameters with working-frame errors, composed into input pixels
    s = 29.0 / RADIUS
    pw = transforms.make_transform(np.asarray(p_true.angle) + rng.normal(0, 1.0, n),
                                   np.asarray(p_true.shift_x) * s + rng.normal(0, 0.5, n),
                                   np.asarray(p_true.shift_y) * s + rng.normal(0, 0.5, n), np.asarray(p_true.mirror))
    given = transforms.to_input_frame(np.zeros((n, 2)), pw, s)
    psi, ox, oy, mir = (np.asarray(v) for v in transforms.to_relion(given, APIX))

    tmp = Path(tempfile.mkdtemp(prefix="jisac_beautify_"))
    new = {"rlnClassNumber": labels + 1, "rlnAnglePsi": psi, "rlnOriginXAngst": ox, "rlnOriginYAngst": oy,
           "jisacMirror": mir.astype(int), "rlnDefocusU": du, "rlnDefocusV": dv, "rlnDefocusAngle": dang,
           "rlnVoltage": 300.0, "rlnSphericalAberration": 2.7, "rlnAmplitudeContrast": 0.1}
    star.write_stack_and_star(tmp / "input.star", tmp / "input.mrcs", particles, None, new, pixel_size=APIX)
    run = tmp / "run"
    run.mkdir()
    starfile.write(starfile.read(tmp / "input.star", always_dict=True), run / "particles.star")
    (run / "summary.json").write_text(json.dumps({"input": str(tmp / "input.star")}))

    mask = filters.soft_circular_mask(BOX, BOX, RADIUS, 5.0)
    cutoff = 3.0 / (2 * RADIUS)  # 1 / (diameter / 3)
    # The truth an average estimates is the EXPECTED class average: the mean clean class-frame projection over the
    # class's view distribution, drawn here independently of the members (the mean over the members themselves
    # shares their view-to-view differences, which then read as signal: it flatters an unfiltered average).
    truth_rng = np.random.default_rng(args.seed + 100)
    d = args.truth_draws
    truth_members = []
    for j in range(k):
        phi_t = truth_rng.uniform(0, 2 * np.pi, d)
        tilt_t = args.cone * np.sqrt(truth_rng.uniform(0, 1, d))
        r_t = rot_about_axis(np.stack([np.cos(phi_t), np.sin(phi_t), np.zeros(d)], 1), tilt_t) @ r_centre[j]
        truth_members.append(batched(project, r_t.astype(np.float32), np.zeros((d, 2), np.float32)).mean(0) * scale)
    truth_members = np.stack(truth_members)
    member_means = np.stack([clean_class_frame[labels == j].mean(0) for j in range(k)])
    if args.keep:
        np.savez(tmp / "truth.npz", members=truth_members, member_means=member_means, centre=truth_centre,
                 labels=labels)

    rows = {}
    variants = {
        "wiener": B.BeautifyParams(radius_px=RADIUS, chunk=50, class_batch=k),
        "wiener+refine": B.BeautifyParams(radius_px=RADIUS, chunk=50, class_batch=k, local_refinement=True),
        "flip": B.BeautifyParams(radius_px=RADIUS, chunk=50, class_batch=k, ctf="flip"),
    }
    for name, bp in variants.items():
        t1 = time.perf_counter()
        summ = B.beautify_run(run, bp, out_dir=tmp / f"out_{name}")
        dt = time.perf_counter() - t1
        avgs = mrcfile.read(tmp / f"out_{name}" / "class_averages.mrcs")
        if name == "wiener":  # again, warm: the first call's time includes JIT compilation
            t1 = time.perf_counter()
            B.beautify_run(run, bp, out_dir=tmp / "out_warm")
            warm = time.perf_counter() - t1
        rows[name] = {
            "seconds": round(dt, 1), "particles_per_s": round(n / dt, 1),
            "corr": [highpass_corr(avgs[j], truth_centre[j], cutoff, mask) for j in range(k)],
            "res_frc0143": [c["resolution_angst"] for c in summ["classes"]],
            "res_truth05": [truth_resolution(avgs[j], truth_members[j], mask) for j in range(k)],
            "res_member_mean05": [truth_resolution(avgs[j], member_means[j], mask) for j in range(k)],
            "passes": [c["refinement_passes"] for c in summ["classes"]],
        }

    # parameter errors against the truth: what ISAC handed over vs what local refinement made of it
    def param_errors(q):
        e = transforms.compose(transforms.inverse(p_true), q)  # the identity when q = p_true
        angle = np.abs((np.asarray(e.angle) + 180) % 360 - 180)
        return float(np.median(angle)), float(np.median(np.hypot(np.asarray(e.shift_x), np.asarray(e.shift_y))))

    refined_table = B.read_run_particles(tmp / "out_wiener+refine")
    errors = {"given": param_errors(given),
              "refined": param_errors(B.parameters_from_table(refined_table, APIX))}

    # the working-frame average of a jisac run (same perturbed parameters, working pixels)
    t1 = time.perf_counter()
    pp = preprocess.PreprocessParams(radius=RADIUS, ctf=True)
    work = batched(lambda im, *f: preprocess.prepare_batch(im, pp, ctf.CTFParams(*f)), particles,
                   *[np.asarray(f) for f in cp])
    aligned = np.asarray(transforms.apply_transform(work, pw))
    n_full = int(round(work.shape[-1] / s))
    rows_w = []
    for j in range(k):
        avg = aligned[labels == j].mean(0)
        full = np.asarray(preprocess.crop_or_pad_centre(preprocess.fourier_resize(avg[None], n_full), BOX))[0]
        rows_w.append(full)
    rows["working"] = {
        "seconds": round(time.perf_counter() - t1, 1), "particles_per_s": None,
        "corr": [highpass_corr(rows_w[j], truth_centre[j], cutoff, mask) for j in range(k)],
        "res_frc0143": [None] * k,
        "res_truth05": [truth_resolution(rows_w[j], truth_members[j], mask) for j in range(k)],
        "res_member_mean05": [truth_resolution(rows_w[j], member_means[j], mask) for j in range(k)],
        "passes": [0] * k,
    }

    print(f"{n} particles, {k} classes, box {BOX}, {APIX} A/px, SNR {args.snr}, cone {args.cone} deg, "
          f"radius {RADIUS} px; simulation {t_sim:.1f} s; convention check corr {conv:.4f}")
    print(f"{'variant':16s} {'class':>5s} {'corr(hp)':>9s} {'res0.143 A':>11s} {'res_truth0.5 A':>15s} "
          f"{'diff %':>7s} {'passes':>6s}")
    for name, r in rows.items():
        for j in range(k):
            rf, rt = r["res_frc0143"][j], r["res_truth05"][j]
            diff = "" if rf is None else f"{100 * (rf - rt) / rt:+7.1f}"
            rf_s = "" if rf is None else f"{rf:11.2f}"
            print(f"{name:16s} {j + 1:5d} {r['corr'][j]:9.4f} {rf_s:>11s} {rt:15.2f} {diff:>7s} {r['passes'][j]:6d}")
        print(f"{name:16s} time {r['seconds']} s" + (f", {r['particles_per_s']} particles/s"
                                                      if r["particles_per_s"] else ""))
    print(f"wiener again (compiled): {warm:.1f} s, {n / warm:.1f} particles/s")
    for key, (a, d) in errors.items():
        print(f"parameters {key:8s}: median angle error {a:.2f} deg, median shift error {d:.2f} px")
    result = {"particles": n, "wiener_warm_particles_per_s": round(n / warm, 1),
              "median_param_errors_deg_px": errors, "classes": k, "box": BOX, "pixel_size": APIX, "snr": args.snr,
              "cone_deg": args.cone,
              "convention_check": round(float(conv), 4), "simulation_s": round(t_sim, 1),
              "cpu_count": os.cpu_count(), **{name: r for name, r in rows.items()}}
    if args.keep:
        print(f"kept {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result, default=lambda v: round(float(v), 4)))


if __name__ == "__main__":
    main()
