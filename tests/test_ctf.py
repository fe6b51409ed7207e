"""The CTF model against analytic truths and a float64 transcription of RELION's formula; phase flipping and
CTF-weighted averages on projections of the synthetic phantom."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from jisac import ctf, synthetic


def wavelength_f64(kv):
    """lambda = h / sqrt(2 m e V (1 + e V / (2 m c^2))), CODATA constants, Angstrom."""
    h, m, e, c = 6.62607015e-34, 9.1093837015e-31, 1.602176634e-19, 299792458.0
    v = kv * 1e3
    return h / math.sqrt(2 * m * e * v * (1 + e * v / (2 * m * c * c))) * 1e10


def wavelength_relion(kv):
    """RELION's CTF::initialise wavelength (its rounded constants), Angstrom."""
    return 12.2643247 / math.sqrt(kv * 1e3 * (1 + kv * 1e3 * 0.978466e-6))


def relion_getctf_f64(kx, ky, u, v, angle_deg, kv, cs_mm, q0, phase_deg):
    """RELION's CTF::initialise + CTF::getCTF (no B-factor, scale 1) written out in float64 NumPy."""
    lam = 12.2643247 / np.sqrt(kv * 1e3 * (1.0 + kv * 1e3 * 0.978466e-6))
    defocus_average = -(u + v) * 0.5
    defocus_deviation = -(u - v) * 0.5
    k1 = np.pi / 2 * 2 * lam
    k2 = np.pi / 2 * cs_mm * 1e7 * lam**3
    k3 = np.arctan(q0 / np.sqrt(1 - q0 * q0))
    k5 = np.deg2rad(phase_deg)
    u2 = kx * kx + ky * ky
    deltaf = defocus_average + defocus_deviation * np.cos(2 * (np.arctan2(ky, kx) - np.deg2rad(angle_deg)))
    deltaf = np.where(u2 == 0, 0.0, deltaf)
    gamma = k1 * deltaf * u2 + k2 * u2 * u2 - k5 - k3
    return -np.sin(gamma)


def test_wavelength():
    assert float(ctf.electron_wavelength_angst(300.0)) == pytest.approx(0.01969, abs=5e-6)
    for kv in (100.0, 200.0, 300.0):
        # The physics (CODATA 2018) to 1e-5; RELION's rounded constants, which jisac uses, to float32 precision.
        assert float(ctf.electron_wavelength_angst(kv)) == pytest.approx(wavelength_f64(kv), rel=1e-5)
        assert float(ctf.electron_wavelength_angst(kv)) == pytest.approx(wavelength_relion(kv), rel=3e-7)


def test_zeros_of_the_pure_defocus_ctf_are_at_sqrt_n_over_lambda_defocus():
    defocus, kv = 20000.0, 300.0
    p = ctf.make_ctf_params(defocus, cs_mm=0.0, amplitude_contrast=0.0, voltage_kv=kv)
    lam = wavelength_relion(kv)
    n = np.arange(1, 8)
    zeros = np.sqrt(n / (lam * defocus))
    mids = np.sqrt((n - 0.5) / (lam * defocus))  # chi = (n - 1/2) pi: extrema +-1
    for angle in (0.0, 0.7, 2.0):  # isotropic: any direction
        kx, ky = np.cos(angle), np.sin(angle)
        np.testing.assert_allclose(np.asarray(ctf.ctf_at(p, zeros * kx, zeros * ky)), 0.0, atol=2e-5)
        np.testing.assert_allclose(np.asarray(ctf.ctf_at(p, mids * kx, mids * ky)), (-1.0) ** (n - 1), atol=1e-5)


def test_ctf_at_zero_frequency_is_plus_amplitude_contrast():
    """RELION's sign: CTF(0) = +A and the CTF is positive up to its first zero (phase flipping keeps the low
    frequencies as they are). Reading RELION's -sin(K1 df k^2 ...) without its negated defocus average would
    give -A."""
    for a in (0.0, 0.07, 0.1, 0.3):
        p = ctf.make_ctf_params(15000.0, amplitude_contrast=a)
        assert float(ctf.ctf_at(p, 0.0, 0.0)) == pytest.approx(a, abs=1e-6)
        assert float(ctf.ctf_at(p, 0.01, 0.0)) > a  # rising towards the first maximum
    # A 90 degree phase plate makes the CTF cos-like: sqrt(1 - A^2) + 0 at k = 0 ... with A = 0, exactly 1.
    p = ctf.make_ctf_params(5000.0, amplitude_contrast=0.0, phase_shift_deg=90.0)
    assert float(ctf.ctf_at(p, 0.0, 0.0)) == pytest.approx(1.0, abs=1e-6)


def test_astigmatism_angle_convention():
    u, v, angle = 10000.0, 20000.0, 30.0
    p = ctf.make_ctf_params(u, v, angle, cs_mm=2.7, amplitude_contrast=0.1)
    k = np.linspace(0.01, 0.3, 9)

    def along(params, deg):
        a = np.deg2rad(deg)
        return np.asarray(ctf.ctf_at(params, k * np.cos(a), k * np.sin(a)))

    iso_u = ctf.make_ctf_params(u, cs_mm=2.7, amplitude_contrast=0.1)
    iso_v = ctf.make_ctf_params(v, cs_mm=2.7, amplitude_contrast=0.1)
    iso_mean = ctf.make_ctf_params((u + v) / 2, cs_mm=2.7, amplitude_contrast=0.1)
    np.testing.assert_allclose(along(p, angle), along(iso_u, 0.0), atol=2e-4)  # U along defocus_angle
    np.testing.assert_allclose(along(p, angle + 180), along(iso_u, 0.0), atol=2e-4)
    np.testing.assert_allclose(along(p, angle + 90), along(iso_v, 0.0), atol=2e-4)  # V perpendicular
    np.testing.assert_allclose(along(p, angle + 45), along(iso_mean, 0.0), atol=2e-4)
    # Hand-computed point: k = 0.1 / A along 30 degrees sees defocus U:
    lam = wavelength_relion(300.0)
    chi = math.pi * lam * u * 0.01 - math.pi / 2 * 2.7e7 * lam**3 * 1e-4
    expected = math.sqrt(1 - 0.01) * math.sin(chi) + 0.1 * math.cos(chi)
    got = float(ctf.ctf_at(p, 0.1 * math.cos(math.radians(30)), 0.1 * math.sin(math.radians(30))))
    assert got == pytest.approx(expected, abs=1e-4)


def test_ctf_2d_matches_relion_transcription():
    rng = np.random.default_rng(1)
    n = 4
    u = rng.uniform(8000, 30000, n)
    v = u - rng.uniform(0, 2000, n)
    angle = rng.uniform(-180, 180, n)
    kv = np.array([300.0, 200.0, 300.0, 100.0])
    cs = np.array([2.7, 2.0, 0.01, 1.4])
    q0 = np.array([0.1, 0.07, 0.0, 0.2])
    phase = np.array([0.0, 0.0, 60.0, 90.0])
    ps = np.array([1.0, 1.3, 2.0, 0.85])
    p = ctf.make_ctf_params(u, v, angle, kv, cs, q0, phase, ps)
    ny, nx = 24, 32
    got = np.asarray(ctf.ctf_2d(p, ny, nx))
    assert got.shape == (n, ny, nx // 2 + 1) and got.dtype == np.float32
    kx = np.fft.rfftfreq(nx)[None, None, :] / ps[:, None, None]
    ky = np.fft.fftfreq(ny)[None, :, None] / ps[:, None, None]
    b = (slice(None), None, None)
    want = relion_getctf_f64(kx, ky, u[b], v[b], angle[b], kv[b], cs[b], q0[b], phase[b])
    np.testing.assert_allclose(got, want, atol=2e-4)
    full = np.asarray(ctf.ctf_2d(p, ny, nx, full=True))
    assert full.shape == (n, ny, nx)
    np.testing.assert_allclose(full[..., : nx // 2], got[..., : nx // 2], atol=1e-6)
    # Friedel symmetry CTF(-k) = CTF(k) (odd sizes: no Nyquist line, every frequency has its opposite).
    odd = np.asarray(ctf.ctf_2d(p, 25, 33, full=True))
    np.testing.assert_allclose(odd[:, 1:, 1:], odd[:, :0:-1, :0:-1], atol=2e-4)


def test_from_relion_table():
    df = pd.DataFrame(
        {
            "rlnDefocusU": [12000.0, 15000.0],
            "rlnDefocusV": [11000.0, 14500.0],
            "rlnDefocusAngle": [10.0, -45.0],
            "rlnVoltage": [300.0, 300.0],
            "rlnSphericalAberration": [2.7, 2.7],
            "rlnAmplitudeContrast": [0.1, 0.1],
            "rlnImagePixelSize": [1.06, 1.06],
        }
    )
    p = ctf.CTFParams.from_relion_table(df)
    np.testing.assert_allclose(p.defocus_v_angst, [11000.0, 14500.0])
    np.testing.assert_allclose(p.phase_shift_deg, 0.0)
    np.testing.assert_allclose(p.pixel_size_angst, 1.06, rtol=1e-6)
    assert p.shape == (2,) and all(np.asarray(f).dtype == np.float32 for f in p)
    p2 = ctf.CTFParams.from_relion_table(df.assign(rlnPhaseShift=[30.0, 40.0]), pixel_size_angst=2.0)
    np.testing.assert_allclose(p2.phase_shift_deg, [30.0, 40.0])
    np.testing.assert_allclose(p2.pixel_size_angst, 2.0)
    np.testing.assert_allclose(p.take(np.array([1])).defocus_u_angst, [15000.0])
    with pytest.raises(ValueError, match="rlnDefocusV"):
        ctf.CTFParams.from_relion_table(df.drop(columns="rlnDefocusV"))
    with pytest.raises(ValueError, match="rlnImagePixelSize"):
        ctf.CTFParams.from_relion_table(df.drop(columns="rlnImagePixelSize"))


@pytest.fixture(scope="module")
def views64():
    phantom = synthetic.make_phantom(radius=20.0, seed=3)
    rot, tilt = synthetic.hemisphere_directions(4)
    views = np.asarray(synthetic.project(phantom, synthetic.euler_to_matrix(rot, tilt, 0.0), 64), np.float64)
    return views - views.mean(axis=(1, 2), keepdims=True)


def _corr(a, b):
    a = a - a.mean()
    b = b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def test_phase_flip_matches_numpy_and_restores_correlation(views64):
    defoci = np.array([9000.0, 14000.0, 20000.0, 26000.0])
    p = ctf.make_ctf_params(defoci, defoci - 500.0, 20.0, amplitude_contrast=0.1, pixel_size_angst=1.0)
    modulated = np.asarray(ctf.apply_ctf(jnp.asarray(views64, jnp.float32), p))
    flipped = np.asarray(ctf.phase_flip(jnp.asarray(modulated), p))
    for clean, mod, flip in zip(views64, modulated, flipped):
        before, after = _corr(clean, mod), _corr(clean, flip)
        # Positive and high: with the opposite CTF sign the flipped image would anti-correlate.
        assert after > before + 0.1 and after > 0.8, (before, after)

    # Against a float64 NumPy transcription: centre in a 2x box, FFT, times sign(CTF), inverse, crop.
    n = 64
    padded = np.zeros((4, 2 * n, 2 * n))
    padded[:, n // 2 : n // 2 + n, n // 2 : n // 2 + n] = modulated
    kx = np.fft.rfftfreq(2 * n)[None, None, :] / 1.0
    ky = np.fft.fftfreq(2 * n)[None, :, None] / 1.0
    b = (slice(None), None, None)
    c = relion_getctf_f64(kx, ky, defoci[b], defoci[b] - 500.0, 20.0, 300.0, 2.7, 0.1, 0.0)
    ref = np.fft.irfft2(np.fft.rfft2(padded) * np.where(c < 0, -1.0, 1.0), s=(2 * n, 2 * n))
    ref = ref[:, n // 2 : n // 2 + n, n // 2 : n // 2 + n]
    np.testing.assert_allclose(flipped, ref, atol=1e-3 * np.abs(ref).max())


def test_phase_flip_without_padding_is_an_involution(views64):
    p = ctf.make_ctf_params(np.full(4, 15000.0), pixel_size_angst=1.5)
    x = jnp.asarray(views64, jnp.float32)
    twice = ctf.phase_flip(ctf.phase_flip(x, p, pad=1), p, pad=1)
    np.testing.assert_allclose(np.asarray(twice), views64, atol=1e-4 * np.abs(views64).max())


def test_wiener_average_recovers_the_image(views64):
    clean = views64[0]
    defoci = np.linspace(8000.0, 30000.0, 8)
    p = ctf.make_ctf_params(defoci, amplitude_contrast=0.1, pixel_size_angst=2.0)
    imgs = ctf.apply_ctf(jnp.broadcast_to(jnp.asarray(clean, jnp.float32), (8, 64, 64)), p)
    ctfs = ctf.ctf_2d(p, 64, 64)
    sums = ctf.ctf_weighted_sum(imgs, ctfs)
    avg = np.asarray(ctf.wiener_filter(sums, 1e4, (64, 64)))
    assert _corr(clean, avg) > 0.995
    # A plain average of the modulated images is much worse.
    assert _corr(clean, np.asarray(imgs).mean(0)) < 0.9
    # Accumulators of chunks add up; weights 0 leave entries out.
    half = ctf.ctf_weighted_sum(imgs[:4], ctfs[:4])
    rest = ctf.ctf_weighted_sum(imgs, ctfs, weights=jnp.array([0.0] * 4 + [1.0] * 4))
    np.testing.assert_allclose(np.asarray(half.ctf_times_ft + rest.ctf_times_ft), np.asarray(sums.ctf_times_ft),
                               rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(np.asarray(half.ctf_squared + rest.ctf_squared), np.asarray(sums.ctf_squared),
                               rtol=1e-5)


def test_phase_flip_is_jittable_and_batched():
    x = jnp.zeros((2, 3, 16, 16)).at[:, :, 8, 8].set(1.0)
    p = ctf.make_ctf_params(jnp.full((2, 3), 12000.0))
    out = jax.jit(ctf.phase_flip)(x, p)
    assert out.shape == (2, 3, 16, 16) and out.dtype == jnp.float32
