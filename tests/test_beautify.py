"""The beautifier: Wiener average vs a float64 NumPy reference, split-half SSNR, resolution, parameters through a
written particles.star, and an end-to-end run on a tiny fake run folder."""

import json

import jax
import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from jisac import beautify as B
from jisac import ctf, filters, synthetic, transforms
from jisac.io import hdf, star
from tests import reference_numpy as ref


# ------------------------------------------------------------------------------ float64 reference


def _ref_ctf(kx, ky, u, v, angle_deg, kv=300.0, cs_mm=2.7, amp=0.1):
    """RELION's CTF restated in float64 (jisac/ctf.py docstring); k in 1/A."""
    volts = kv * 1e3
    lam = 12.2643247 / np.sqrt(volts * (1.0 + 0.978466e-6 * volts))
    k2 = kx * kx + ky * ky
    theta = np.arctan2(ky, kx)
    defocus = 0.5 * ((u + v) + (u - v) * np.cos(2.0 * (theta - np.deg2rad(angle_deg))))
    chi = np.pi * lam * defocus * k2 - 0.5 * np.pi * cs_mm * 1e7 * lam**3 * k2 * k2
    return np.sin(chi + np.arcsin(amp))


def _pad_rfft(ft):
    n = ft.shape[0]
    pos = (n + 1) // 2
    out = np.zeros((2 * n, n + 1), complex)
    out[:pos, : n // 2 + 1] = ft[:pos]
    out[2 * n - (n - pos):, : n // 2 + 1] = ft[pos:]
    return out


def _ref_aligned_ft_and_ctf(img, p, cp, apix):
    """float64: rfft2 of in(R^T M u) sampled bilinearly on the 2x upsampled image, times the ramp of M s; and the
    CTF evaluated at the raw-frame frequency of each class-frame frequency (image and CTF rotated together)."""
    n = img.shape[-1]
    angle, sx, sy, mirror = p
    up = np.fft.irfft2(_pad_rfft(np.fft.rfft2(img.astype(np.float64))) * 4, s=(2 * n, 2 * n))
    c = n // 2
    y, x = np.mgrid[:n, :n].astype(np.float64) - c
    mx = -x if mirror else x
    a = np.deg2rad(angle)
    src_x = np.cos(a) * mx - np.sin(a) * y
    src_y = np.sin(a) * mx + np.cos(a) * y
    g = ref.bilinear(up, 2 * (src_x + c), 2 * (src_y + c))
    kx = np.fft.rfftfreq(n)[None, :] * np.ones((n, 1))
    ky = np.fft.fftfreq(n)[:, None] * np.ones((1, n // 2 + 1))
    msx = -sx if mirror else sx
    ft = np.fft.rfft2(g) * np.exp(-2j * np.pi * (kx * msx + ky * sy))
    # class-frame frequency k = M R k_raw  ->  k_raw = R^T M k
    mkx = -kx if mirror else kx
    raw_kx = np.cos(a) * mkx - np.sin(a) * ky
    raw_ky = np.sin(a) * mkx + np.cos(a) * ky
    u, v, th = cp
    return ft, _ref_ctf(raw_kx / apix, raw_ky / apix, u, v, th)


def test_wiener_average_matches_float64_numpy_reference():
    rng = np.random.default_rng(3)
    n, count, apix, radius = 32, 10, 2.5, 12.0
    images = rng.standard_normal((count, n, n)).astype(np.float32)
    p = transforms.make_transform(rng.uniform(0, 360, count), rng.uniform(-3, 3, count), rng.uniform(-3, 3, count),
                                  rng.integers(0, 2, count).astype(bool))
    u = rng.uniform(8000, 20000, count)
    v = u - rng.uniform(0, 3000, count)
    th = rng.uniform(-90, 90, count)
    cp = ctf.make_ctf_params(u, v, th, pixel_size_angst=apix)
    seg = (np.arange(count) % 2).astype(np.int32)  # two halves of one class
    s, w = B._chunk_sums(images, p, cp, seg, radius=radius, mode="wiener", n_seg=2)
    ssnr = np.linspace(5.0, 0.01, n // 2 + 1)
    got = B.wiener_average(np.asarray(s).sum(0), np.asarray(w).sum(0), ssnr, (n, n))

    normed = np.asarray(B.normalise_background(images, radius), np.float64)
    num = np.zeros((n, n // 2 + 1), complex)
    den = np.zeros((n, n // 2 + 1))
    for i in range(count):
        ft, c = _ref_aligned_ft_and_ctf(normed[i], [np.asarray(f)[i] for f in p], (u[i], v[i], th[i]), apix)
        num += c * ft
        den += c * c
    shell = np.minimum(np.rint(np.hypot(np.fft.rfftfreq(n)[None], np.fft.fftfreq(n)[:, None]) * n), n // 2)
    want = np.fft.irfft2(num / (den + 1.0 / ssnr[shell.astype(int)]), s=(n, n))
    # float32 FFTs and interpolation weights: 1e-4 of the image's largest value
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())


def test_split_half_ssnr_recovers_known_snr():
    rng = np.random.default_rng(0)
    n, snr_half = 128, 0.5
    signal = rng.standard_normal((n, n))
    noise_sd = np.sqrt(1.0 / snr_half)
    a = signal + noise_sd * rng.standard_normal((n, n))
    b = signal + noise_sd * rng.standard_normal((n, n))
    ssnr, frc = B.split_half_ssnr(a, b)
    # SNR of the average of both halves is twice a half's: 1.0. Shells 10..64 hold ~ 60-400 coefficients each;
    # their mean FRC has a standard error ~ 0.005, i.e. ~ 3 % on the SSNR.
    assert np.mean(frc[10:]) == pytest.approx(snr_half / (1 + snr_half), abs=0.01)
    assert np.mean(ssnr[10:]) == pytest.approx(2 * snr_half, rel=0.06)


def test_resolution_at_0143_on_an_analytic_frc():
    n, apix, f0 = 128, 2.0, 0.2
    freq = np.arange(n // 2 + 1) / n
    frc = np.exp(-((freq / f0) ** 2))
    want_freq = f0 * np.sqrt(np.log(1 / 0.143))  # where exp(-(f/f0)^2) = 0.143
    got = B.resolution_angst(frc, 0.143, n, apix)
    # linear interpolation between shells 1/128 apart on a curve of slope ~ -1.7 per cycle/px: < 0.5 % error
    assert got == pytest.approx(apix / want_freq, rel=5e-3)


def test_parameters_through_particles_star_equal_to_input_frame(tmp_path):
    rng = np.random.default_rng(1)
    n, apix, shrink = 40, 1.3, 29 / 61
    shifts = rng.uniform(-5, 5, (n, 2))
    working = transforms.make_transform(rng.uniform(0, 360, n), rng.uniform(-4, 4, n), rng.uniform(-4, 4, n),
                                        rng.integers(0, 2, n).astype(bool))
    full = transforms.to_input_frame(shifts, working, shrink)
    psi, ox, oy, mirror = (np.asarray(v) for v in transforms.to_relion(full, apix))
    meta = pd.DataFrame({"rlnImageName": [f"{i + 1}@stack.mrcs" for i in range(n)]})
    star.write_particle_star(tmp_path / "particles.star", meta, {
        "rlnClassNumber": np.ones(n, int), "rlnAnglePsi": psi, "rlnOriginXAngst": ox, "rlnOriginYAngst": oy,
        "jisacMirror": mirror.astype(int)}, pixel_size=apix, box_size=64)
    table = B.read_run_particles(tmp_path)
    got = B.parameters_from_table(table, float(table["rlnImagePixelSize"].iloc[0]))
    d_angle = (np.asarray(got.angle) - np.asarray(full.angle) + 180) % 360 - 180
    assert np.abs(d_angle).max() < 1e-4
    assert np.abs(np.asarray(got.shift_x) - np.asarray(full.shift_x)).max() < 1e-4
    assert np.abs(np.asarray(got.shift_y) - np.asarray(full.shift_y)).max() < 1e-4
    assert np.array_equal(np.asarray(got.mirror), np.asarray(full.mirror))


def _fake_run(tmp_path, n_per_class=24, snr=5.0, box=64, apix=3.0, seed=0):
    """A run folder with 3 classes of a phantom: particles.star with the true parameters, summary.json."""
    rng = np.random.default_rng(seed)
    phantom = synthetic.make_phantom(radius=20.0, seed=1)
    rot, tilt = synthetic.hemisphere_directions(3)
    views = np.asarray(synthetic.project(phantom, synthetic.euler_to_matrix(rot, tilt, 0), box))
    k = len(views)
    labels = np.repeat(np.arange(k), n_per_class)
    n = len(labels)
    p = transforms.make_transform(rng.uniform(0, 360, n), rng.uniform(-2, 2, n), rng.uniform(-2, 2, n),
                                  rng.integers(0, 2, n).astype(bool))
    clean = np.asarray(transforms.apply_transform(views[labels], transforms.inverse(p)))
    u = rng.uniform(10000, 20000, n)
    cp = ctf.make_ctf_params(u, u - 500, rng.uniform(0, 180, n), pixel_size_angst=apix)
    particles = np.asarray(ctf.apply_ctf(clean, cp))
    disc = filters.circular_mask(box, box, 20)  # SNR = signal variance inside the particle disc / noise variance
    particles = np.asarray(synthetic.add_noise(particles, snr, jax.random.key(seed), disc))
    psi, ox, oy, mirror = (np.asarray(v) for v in transforms.to_relion(p, apix))
    new = {"rlnClassNumber": labels + 1, "rlnAnglePsi": psi, "rlnOriginXAngst": ox, "rlnOriginYAngst": oy,
           "jisacMirror": mirror.astype(int), "rlnDefocusU": u, "rlnDefocusV": u - 500,
           "rlnDefocusAngle": np.asarray(cp.defocus_angle_deg), "rlnVoltage": 300.0,
           "rlnSphericalAberration": 2.7, "rlnAmplitudeContrast": 0.1}
    run = tmp_path / "run"
    run.mkdir()
    star.write_stack_and_star(tmp_path / "input.star", tmp_path / "input.mrcs", particles, None, new,
                              pixel_size=apix)
    # the run's particles.star: the input's columns plus the run's (image names as the input gives them)
    blocks = starfile.read(tmp_path / "input.star", always_dict=True)
    starfile.write(blocks, run / "particles.star")
    (run / "summary.json").write_text(json.dumps({"input": str(tmp_path / "input.star")}))
    return run, views, labels, apix


def test_beautify_run_end_to_end(tmp_path):
    run, views, labels, apix = _fake_run(tmp_path)
    box = views.shape[-1]
    seen = []
    bp = B.BeautifyParams(radius_px=22.0, chunk=16, class_batch=2)
    summary = B.beautify_run(run, bp, progress=lambda done, total: seen.append((done, total)))
    out = run / "beautify"
    assert seen == [(2, 3), (3, 3)]
    with mrcfile.open(out / "class_averages.mrcs") as m:
        averages = np.asarray(m.data)
        assert averages.shape == (3, box, box)
        assert float(m.voxel_size.x) == pytest.approx(apix)
    mask = filters.soft_circular_mask(box, box, 22.0, 5.0)
    for k in range(3):
        a = np.asarray(averages[k] * mask).ravel()
        t = np.asarray(views[k] * mask).ravel()
        assert np.corrcoef(a, t)[0, 1] > 0.9, k
    headers = hdf.read_hdf_headers(out / "class_averages.hdf")
    assert [h["n_objects"] for h in headers] == [int((labels == k).sum()) for k in range(3)]
    assert np.array_equal(headers[1]["members"], np.flatnonzero(labels == 1))
    assert headers[0]["resolution_angst"] == pytest.approx(summary["classes"][0]["resolution_angst"], rel=1e-5)
    table = B.read_run_particles(out)
    assert len(table) == len(labels)
    for name in ("resolutions.json", "FH_list.txt", "init_isac_params.txt", "params_avg/params_avg_002.txt"):
        assert (out / name).is_file(), name
    for c in summary["classes"]:
        assert 2 * apix <= c["resolution_angst"] < 30.0
    # sharpening and the low-pass at each class's resolution run through the same path (kernels already compiled)
    sharp = B.beautify_run(run, bp._replace(sharpen="bfactor", b_factor=50.0, lowpass="resolution"),
                           out_dir=tmp_path / "sharp")
    assert [c["b_factor"] for c in sharp["classes"]] == [50.0] * 3
    assert mrcfile.read(tmp_path / "sharp" / "class_averages.mrcs").shape == (3, box, box)


def test_refine_local_moves_perturbed_parameters_towards_the_truth():
    rng = np.random.default_rng(5)
    box, apix, count = 64, 3.0, 16
    phantom = synthetic.make_phantom(radius=20.0, seed=1)
    view = np.asarray(synthetic.project(phantom, synthetic.euler_to_matrix([30.0], [60.0], 0.0), box))[0]
    p = transforms.make_transform(rng.uniform(0, 360, count), rng.uniform(-2, 2, count), rng.uniform(-2, 2, count),
                                  rng.integers(0, 2, count).astype(bool))
    u = rng.uniform(10000, 20000, count)
    cp = ctf.make_ctf_params(u, u - 800, rng.uniform(0, 180, count), pixel_size_angst=apix)
    clean = np.asarray(transforms.apply_transform(np.broadcast_to(view, (count, box, box)), transforms.inverse(p)))
    particles = np.asarray(synthetic.add_noise(ctf.apply_ctf(clean, cp), 10.0, jax.random.key(0),
                                               filters.circular_mask(box, box, 20)))
    # perturb about the class centre: 1.5 deg and up to 1.2 px, inside the search range (2 deg, 2 px)
    d_angle = rng.choice([-1.5, 1.5], count)
    d_shift = rng.uniform(-1.2, 1.2, (count, 2))
    start = transforms.compose(p, transforms.make_transform(d_angle, d_shift[:, 0], d_shift[:, 1], False))
    bp = B.BeautifyParams(radius_px=22.0)
    refined, score = B.refine_local(particles, start, cp, view, bp)

    def errors(q):
        e = transforms.compose(transforms.inverse(p), q)  # identity when q = p
        angle = (np.asarray(e.angle) + 180) % 360 - 180
        return np.abs(angle), np.hypot(np.asarray(e.shift_x), np.asarray(e.shift_y))

    a0, s0 = errors(start)
    a1, s1 = errors(refined)
    assert np.all(np.isfinite(np.asarray(score)))
    # 1.5 deg at a 20 px radius moves the edge by only 0.5 px: the angle error at least halves (0.5 deg grid);
    # the shift (parabolic peak) gets within 0.35 px on average
    assert np.mean(a1) < 0.5 * np.mean(a0)
    assert np.mean(s1) < 0.35 < np.mean(s0)


def test_guinier_fit_recovers_a_known_b_factor_and_sharpening_undoes_it():
    rng = np.random.default_rng(2)
    n, apix, b_true = 128, 2.0, 120.0
    k = filters.radial_frequency(n, n) / apix  # 1/A
    phases = np.fft.rfft2(rng.standard_normal((n, n)))
    ft = phases / np.maximum(np.abs(phases), 1e-12) * np.exp(-b_true * k**2 / 4)
    image = np.fft.irfft2(ft, s=(n, n))
    # unit amplitudes times exp(-B k^2 / 4): the fit of ln(amplitude) on k^2 from 20 A to Nyquist is exact up to
    # the shell averaging of a curve (< 2 %)
    b = B.guinier_bfactor(image, apix, start_angst=20.0)
    assert b == pytest.approx(b_true, rel=0.02)
    sharp, b_applied = B.sharpen(image, apix, "guinier", start_angst=20.0)
    assert b_applied == pytest.approx(b)
    amp = B.rotational_amplitude(sharp)
    assert np.ptp(amp[5:]) / np.mean(amp[5:]) < 0.1  # flat again
    low, _ = B.sharpen(image, apix, "none", lowpass_freq=0.1)
    amp_low = B.rotational_amplitude(low)
    assert amp_low[int(0.2 * n)] < 1e-3 * B.rotational_amplitude(image)[int(0.2 * n)]


def test_bad_inputs_fail_fast_naming_the_file_or_option(tmp_path):
    from jisac.io import StackError

    with pytest.raises(StackError, match="particles.star: no such file"):
        B.beautify_run(tmp_path, B.BeautifyParams(radius_px=10.0))
    with pytest.raises(ValueError, match="beautify.ctf"):
        B.BeautifyParams(radius_px=10.0, ctf="wien").validate(64)
    with pytest.raises(ValueError, match="beautify.radius_px"):
        B.BeautifyParams(radius_px=40.0).validate(64)


def test_lowpass_option_accepts_a_numeric_string_from_the_command_line():
    assert B.BeautifyParams(radius_px=10.0, lowpass="0.2").lowpass_frequency() == pytest.approx(0.2)
    B.BeautifyParams(radius_px=10.0, lowpass="0.2").validate(64)
    B.BeautifyParams(radius_px=10.0, lowpass="resolution").validate(64)
    with pytest.raises(ValueError, match="beautify.lowpass"):
        B.BeautifyParams(radius_px=10.0, lowpass="0.7").validate(64)
    with pytest.raises(ValueError, match="beautify.lowpass"):
        B.BeautifyParams(radius_px=10.0, lowpass="sharp").validate(64)


def test_model_sharpening_gives_the_analytic_power_spectrum():
    rng = np.random.default_rng(4)
    n, apix = 96, 1.5
    image = np.fft.irfft2(np.fft.rfft2(rng.standard_normal((n, n))) * np.exp(-filters.radial_frequency(n, n) * 8),
                          s=(n, n))
    out, _ = B.sharpen(image, apix, "model")
    power = B.shell_mean(np.abs(np.fft.rfft2(out.astype(np.float64))) ** 2)
    model = B.penczek_model_power(np.arange(n // 2 + 1) / (n * apix))
    ratio = power[1:] / model[1:]
    # one gain per shell: the output's shell power is the model's times one constant (float32 image: 1e-4)
    np.testing.assert_allclose(ratio, ratio.mean(), rtol=1e-4)
    total_in = B.shell_mean(np.abs(np.fft.rfft2(image)) ** 2)[1:].sum()
    assert power[1:].sum() == pytest.approx(total_in, rel=1e-3)
