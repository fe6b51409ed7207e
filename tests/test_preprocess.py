"""Working-stack preparation: each step against float64 NumPy or analytic values, the driver's batching and
MRCS output."""

import os

import jax
import jax.numpy as jnp
import mrcfile
import numpy as np
import pytest

from jisac import ctf, filters
from jisac import preprocess as P


def gaussian(n, cx, cy, sigma, amplitude=1.0):
    y, x = np.mgrid[:n, :n] - n // 2
    return (amplitude * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2))).astype(np.float32)


def noisy_blobs(n_images, n, seed=0):
    rng = np.random.default_rng(seed)
    imgs = [gaussian(n, *rng.uniform(-3, 3, 2), n / 10) + 0.1 * rng.standard_normal((n, n)) + rng.uniform(-2, 2)
            for _ in range(n_images)]
    return np.asarray(imgs, np.float32)


def test_background_mean_subtraction_uses_pixels_outside_the_circle():
    imgs = noisy_blobs(3, 32)
    out = np.asarray(P.subtract_background_mean(jnp.asarray(imgs), 10))
    outside = ~filters.circular_mask(32, 32, 10)
    np.testing.assert_allclose(out[:, outside].mean(axis=1), 0.0, atol=1e-5)
    np.testing.assert_allclose(out, imgs - imgs[:, outside].mean(axis=1)[:, None, None], atol=1e-5)


def test_normalisation_outside_mean_inside_std():
    imgs = noisy_blobs(3, 40).astype(np.float64)
    mask = filters.circular_mask(40, 40, 15)
    out = np.asarray(P.normalize_outside_mean_inside_std(jnp.asarray(imgs, jnp.float32), mask))
    want = (imgs - imgs[:, ~mask].mean(1)[:, None, None]) / imgs[:, mask].std(1)[:, None, None]
    np.testing.assert_allclose(out, want, atol=1e-4)


@pytest.mark.parametrize("n, n_out", [(64, 40), (64, 37), (63, 38), (40, 64), (37, 64), (38, 63)])
def test_fourier_resize_keeps_low_frequencies_and_the_centre(n, n_out):
    rng = np.random.default_rng(n + n_out)
    img = rng.standard_normal((n, n))
    out = np.asarray(P.fourier_resize(jnp.asarray(img[None], jnp.float32), n_out))[0]
    assert out.shape == (n_out, n_out)
    # Coefficients strictly below the smaller box's Nyquist, phases about the centre pixels, agree up to (n'/n)^2.
    ft_in = np.fft.fft2(np.fft.ifftshift(img))
    ft_out = np.fft.fft2(np.fft.ifftshift(out))
    m = min(n, n_out)
    k = np.arange(-((m - 1) // 2), (m - 1) // 2 + 1)
    if m % 2 == 0:
        k = k[np.abs(k) < m // 2]
    sel_in, sel_out = np.ix_(k % n, k % n), np.ix_(k % n_out, k % n_out)
    np.testing.assert_allclose(ft_out[sel_out], ft_in[sel_in] * (n_out / n) ** 2, atol=2e-3 * np.abs(ft_in).max())
    # A smooth Gaussian at the centre is resampled onto the new grid with its peak value (pixel n//2 -> n'//2).
    s = n_out / n
    g = P.fourier_resize(jnp.asarray(gaussian(n, 0, 0, 4.0)[None]), n_out)[0]
    np.testing.assert_allclose(np.asarray(g), gaussian(n_out, 0, 0, 4.0 * s), atol=2e-3)
    const = P.fourier_resize(jnp.full((1, n, n), 2.5), n_out)
    np.testing.assert_allclose(np.asarray(const), 2.5, atol=1e-5)


def test_crop_or_pad_centre():
    img = jnp.asarray(np.arange(36, dtype=np.float32).reshape(1, 6, 6))
    assert float(P.crop_or_pad_centre(img, 3)[0, 1, 1]) == float(img[0, 3, 3])
    padded = P.crop_or_pad_centre(img, 9)
    assert padded.shape == (1, 9, 9) and float(padded[0, 4, 4]) == float(img[0, 3, 3])
    assert float(jnp.abs(padded).sum()) == float(jnp.abs(img).sum())


@pytest.mark.parametrize(
    "box, radius",
    [
        (64, 10),  # s = 1.4 > 1: n' = 90, cropped to 40
        (24, 10),  # s = 1.4 > 1: n' = 34, padded to 40
        (64, 14),  # s = 1: n' = 64, cropped
        (40, 14),  # s = 1 and n' = target_nx
        (64, 20),  # s = 0.7 < 1: n' = 45 >= 40, cropped
        (64, 24),  # s = 0.58 < 1: n' = 37 < 40, padded
    ],
)
def test_shapes_and_statistics_for_every_shrink_regime(box, radius):
    target_radius, target_nx = 14, 40
    params = P.PreprocessParams(radius=radius, target_radius=target_radius, target_nx=target_nx)
    params.validate(box)
    assert params.shrunk_size(box) == int(box * target_radius / radius + 0.5)
    imgs = noisy_blobs(4, box)
    out = np.asarray(P.prepare_batch(jnp.asarray(imgs), params))
    assert out.shape == (4, target_nx, target_nx) and out.dtype == np.float32
    n_sh = params.shrunk_size(box)
    if n_sh >= target_nx:
        mask = filters.circular_mask(target_nx, target_nx, target_radius)
        np.testing.assert_allclose(out[:, ~mask].mean(1), 0.0, atol=1e-4)
        np.testing.assert_allclose(out[:, mask].std(1), 1.0, rtol=1e-4)
    else:
        mask = filters.circular_mask(n_sh, n_sh, n_sh / 2 - 2)
        lo = target_nx // 2 - n_sh // 2
        inner = out[:, lo : lo + n_sh, lo : lo + n_sh]
        np.testing.assert_allclose(inner[:, ~mask].mean(1), 0.0, atol=1e-4)
        np.testing.assert_allclose(inner[:, mask].std(1), 1.0, rtol=1e-4)
        assert np.abs(out).sum() == pytest.approx(np.abs(inner).sum(), rel=1e-6)  # zeros around


def test_identity_regime_equals_numpy_pipeline():
    """s = 1 and n = target_nx: the output is the background-subtracted image, normalised (float64 check)."""
    params = P.PreprocessParams(radius=14, target_radius=14, target_nx=32)
    imgs = noisy_blobs(3, 32).astype(np.float64)
    out = np.asarray(P.prepare_batch(jnp.asarray(imgs, jnp.float32), params))
    mask = filters.circular_mask(32, 32, 14)
    x = imgs - imgs[:, ~mask].mean(1)[:, None, None]
    want = (x - x[:, ~mask].mean(1)[:, None, None]) / x[:, mask].std(1)[:, None, None]
    np.testing.assert_allclose(out, want, atol=1e-4)


def test_constant_offsets_do_not_matter():
    params = P.PreprocessParams(radius=24, target_radius=12, target_nx=32, ctf=True)
    p = ctf.make_ctf_params(np.array([12000.0, 20000.0]), pixel_size_angst=1.5)
    imgs = noisy_blobs(2, 64)
    ref = np.asarray(P.prepare_batch(jnp.asarray(imgs), params, p))
    offset = np.asarray(P.prepare_batch(jnp.asarray(imgs + np.array([7.0, -3.0])[:, None, None]), params, p))
    np.testing.assert_allclose(offset, ref, atol=2e-4)


def test_prealignment_shift_centres_the_particle():
    """A particle at (-tx, -ty) from the centre, shifted by (tx, ty), gives the centred particle's output."""
    params = P.PreprocessParams(radius=24, target_radius=12, target_nx=32)
    centred = np.stack([gaussian(64, 0, 0, 5.0)] * 2)
    off = np.stack([gaussian(64, -3, 2, 5.0), gaussian(64, 4.5, -1.25, 5.0)])
    ref = np.asarray(P.prepare_batch(jnp.asarray(centred), params))
    shifted = P.prepare_batch(jnp.asarray(off), params, None, jnp.array([3.0, -4.5]), jnp.array([-2.0, 1.25]))
    np.testing.assert_allclose(np.asarray(shifted), ref, atol=1e-3)


def test_phase_flip_step_is_ctf_phase_flip():
    box = 48
    params = P.PreprocessParams(radius=20, target_radius=20, target_nx=box, ctf=True)
    imgs = noisy_blobs(3, box)
    p = ctf.make_ctf_params(np.array([9000.0, 15000.0, 21000.0]), pixel_size_angst=1.2)
    got = np.asarray(P.prepare_batch(jnp.asarray(imgs), params, p))
    flipped = ctf.phase_flip(P.subtract_background_mean(jnp.asarray(imgs), 20), p)
    want = np.asarray(P.prepare_batch(flipped, params._replace(ctf=False)))
    np.testing.assert_allclose(got, want, atol=1e-4)


def rotational_amplitude_f64(img):
    n = img.shape[-1]
    power = np.abs(np.fft.fft2(img)) ** 2
    f = np.fft.fftfreq(n) * n
    ring = np.rint(np.sqrt(f[:, None] ** 2 + f[None, :] ** 2)).astype(int)
    return np.sqrt(np.array([power[ring == r].mean() for r in range(n // 2 + 1)]))


def test_vpp_whitening_table_and_whitening():
    rng = np.random.default_rng(5)
    n = 32
    # Coloured noise: a known radial gain 1 / (1 + r / 4).
    r = np.sqrt((np.fft.fftfreq(n) * n)[:, None] ** 2 + (np.fft.fftfreq(n) * n)[None, :] ** 2)
    gain = 1.0 / (1.0 + r / 4)
    imgs = np.fft.ifft2(np.fft.fft2(rng.standard_normal((6, n, n))) * gain).real.astype(np.float32)
    table = P.vpp_whitening_table([imgs[:4], imgs[4:]])
    want = 6 / sum(rotational_amplitude_f64(im.astype(np.float64)) for im in imgs)
    want[0] = 1.0
    np.testing.assert_allclose(table, want, rtol=1e-4)
    # (indices, images) pairs are accepted too.
    np.testing.assert_allclose(P.vpp_whitening_table([(np.arange(6), imgs)]), table, rtol=1e-5)
    # Cut and padded to a fixed batch size: the padding does not count.
    np.testing.assert_allclose(P.vpp_whitening_table([imgs[:5], imgs[5:]], batch_size=4), table, rtol=1e-5)
    # Whitened images have a flat rotational amplitude spectrum (rings 1..n/2).
    white = np.asarray(P.apply_radial_table(jnp.asarray(imgs), table))
    amp = np.mean([rotational_amplitude_f64(w.astype(np.float64)) for w in white], axis=0)[1:]
    assert amp.std() / amp.mean() < 0.1
    # The driver computes the same table in its first pass, and whitening enters the output.
    params = P.PreprocessParams(radius=12, target_radius=12, target_nx=n, vpp=True)
    ws = P.prepare_working_stack([(np.arange(6), imgs)], 6, params, batch_size=4)
    np.testing.assert_allclose(ws.whitening_table, table, rtol=1e-5)
    direct = P.prepare_batch(jnp.asarray(imgs), params, whitening_table=jnp.asarray(table, jnp.float32))
    np.testing.assert_allclose(ws.images, np.asarray(direct), atol=1e-4)
    with pytest.raises(ValueError, match="two passes"):
        P.prepare_working_stack(iter([(np.arange(6), imgs)]), 6, params)


def _stack_and_ctf(n_images=7, box=48, seed=2):
    imgs = noisy_blobs(n_images, box, seed)
    rng = np.random.default_rng(seed)
    defocus = rng.uniform(8000, 25000, n_images)
    p = ctf.make_ctf_params(defocus, defocus - 300.0, rng.uniform(0, 180, n_images), pixel_size_angst=1.4)
    shifts = rng.uniform(-2, 2, (n_images, 2)).astype(np.float32)
    return imgs, p, shifts


def test_batching_and_padding_give_the_unbatched_result():
    imgs, p, shifts = _stack_and_ctf()
    params = P.PreprocessParams(radius=20, target_radius=12, target_nx=32, ctf=True)
    whole = np.asarray(P.prepare_batch(jnp.asarray(imgs), params, p, shifts[:, 0], shifts[:, 1]))
    order = np.array([5, 0, 3, 6, 1, 2, 4])
    batches = [(order[:3], imgs[order[:3]]), (order[3:4], imgs[order[3:4]]), (order[4:], imgs[order[4:]])]
    ws = P.prepare_working_stack(batches, 7, params, ctf_params_for_indices=p, shifts=shifts, batch_size=2)
    assert ws.images.shape == (7, 32, 32) and ws.shrink_ratio == pytest.approx(0.6)
    np.testing.assert_allclose(ws.images, whole, atol=1e-4)
    # CTF parameters from a function of the indices give the same.
    ws2 = P.prepare_working_stack(batches, 7, params, ctf_params_for_indices=lambda idx: p.take(idx), shifts=shifts,
                                  batch_size=4)
    np.testing.assert_allclose(ws2.images, whole, atol=1e-4)


@pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 devices (CPU runs force 2; one GPU is 1)")
def test_batches_split_over_devices_give_the_same_stack_bit_for_bit(tmp_path):
    """Each batch's rows split over the devices (batch_size rounded up to a multiple of their count): the images
    are those of one device exactly, in memory and on disk."""
    imgs, p, shifts = _stack_and_ctf()
    params = P.PreprocessParams(radius=20, target_radius=12, target_nx=32, ctf=True)
    batches = [(np.arange(0, 4), imgs[:4]), (np.arange(4, 7), imgs[4:])]
    one = P.prepare_working_stack(batches, 7, params, ctf_params_for_indices=p, shifts=shifts, batch_size=3)
    two = P.prepare_working_stack(batches, 7, params, ctf_params_for_indices=p, shifts=shifts, batch_size=3,
                                  devices=jax.devices()[:2])
    np.testing.assert_array_equal(two.images, one.images)
    disk = P.prepare_working_stack(batches, 7, params, ctf_params_for_indices=p, shifts=shifts, batch_size=3,
                                   devices=jax.devices()[:2], out_path=tmp_path / "w.mrcs")
    with mrcfile.open(disk.path) as mrc:
        np.testing.assert_array_equal(mrc.data, one.images)


def test_mrcs_output_matches_memory_and_failures_leave_no_file(tmp_path):
    imgs, p, shifts = _stack_and_ctf()
    params = P.PreprocessParams(radius=20, target_radius=12, target_nx=32, ctf=True)
    batches = [(np.arange(0, 4), imgs[:4]), (np.arange(4, 7), imgs[4:])]
    mem = P.prepare_working_stack(batches, 7, params, ctf_params_for_indices=p, shifts=shifts, batch_size=3)
    path = tmp_path / "out" / "stack_ali2d.mrcs"
    disk = P.prepare_working_stack(batches, 7, params, ctf_params_for_indices=p, shifts=shifts, batch_size=3,
                                   out_path=path, pixel_size_angst=1.4, reopen_bytes=4096)
    assert disk.images is None and disk.path == path
    with mrcfile.open(path) as mrc:
        assert mrc.is_image_stack()
        np.testing.assert_array_equal(mrc.data, mem.images)
        assert float(mrc.voxel_size.x) == pytest.approx(1.4 / 0.6, rel=1e-5)
        assert float(mrc.header.dmean) == pytest.approx(float(mem.images.mean()), abs=1e-5)
        assert float(mrc.header.dmax) == pytest.approx(float(mem.images.max()))
    assert os.listdir(path.parent) == ["stack_ali2d.mrcs"]  # no temporary left
    bad = tmp_path / "bad.mrcs"
    with pytest.raises(ValueError, match="never came"):
        P.prepare_working_stack(batches[:1], 7, params, ctf_params_for_indices=p, out_path=bad)
    assert not any(f.name.startswith(".bad") or f.name == "bad.mrcs" for f in tmp_path.iterdir())


@pytest.mark.parametrize(
    "kwargs, box, name",
    [
        (dict(radius=0), 64, "radius"),
        (dict(radius=33), 64, "radius"),
        (dict(radius=20, target_radius=0), 64, "target_radius"),
        (dict(radius=20, target_radius=29, target_nx=58), 64, "target_radius"),
        (dict(radius=20, target_nx=0), 64, "target_nx"),
    ],
)
def test_bad_parameters_raise_naming_the_parameter(kwargs, box, name):
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        P.PreprocessParams(**kwargs).validate(box)


def test_driver_validates_and_requires_ctf_parameters():
    imgs = noisy_blobs(2, 32)
    with pytest.raises(ValueError, match="^radius"):
        P.prepare_working_stack([(np.arange(2), imgs)], 2, P.PreprocessParams(radius=17))
    with pytest.raises(ValueError, match="ctf_params_for_indices"):
        P.prepare_working_stack([(np.arange(2), imgs)], 2, P.PreprocessParams(radius=10, ctf=True))
    with pytest.raises(ValueError, match="shifts"):
        P.prepare_working_stack([(np.arange(2), imgs)], 2, P.PreprocessParams(radius=10), shifts=np.zeros((3, 2)))


@pytest.mark.parametrize("n, n_out", [(64, 40), (64, 37), (63, 38), (63, 41), (128, 76), (128, 77)])
def test_shift_and_shrink_is_the_shift_then_the_resize(n, n_out):
    """The fused shift + Fourier crop against the two steps in float64 NumPy: a phase ramp on the rfft2 grid,
    then the centred crop of the full spectrum and the real part of its inverse, times (n'/n)^2."""
    rng = np.random.default_rng(n * n_out)
    imgs = rng.standard_normal((3, n, n))
    sx, sy = rng.uniform(-3, 3, 3), rng.uniform(-3, 3, 3)
    ky, kx = np.fft.fftfreq(n)[:, None], np.fft.rfftfreq(n)[None, :]
    ramp = np.exp(-2j * np.pi * (kx * sx[:, None, None] + ky * sy[:, None, None]))
    if n % 2 == 0:  # fourier_shift keeps the Nyquist column real
        ramp[..., -1] = np.cos(2 * np.pi * (kx[0, -1] * sx[:, None] + ky[None, :, 0] * sy[:, None]))
    shifted = np.fft.irfft2(np.fft.rfft2(imgs) * ramp, s=(n, n))
    ft = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(shifted, axes=(-2, -1))), axes=(-2, -1))
    lo = n // 2 - n_out // 2
    ft = ft[:, lo : lo + n_out, lo : lo + n_out]
    want = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(ft, axes=(-2, -1))).real, axes=(-2, -1)) * (n_out / n) ** 2
    got = np.asarray(P.shift_and_shrink(jnp.asarray(imgs, jnp.float32), jnp.asarray(sx), jnp.asarray(sy), n_out))
    np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max())
    two_steps = P.fourier_resize(filters.fourier_shift(jnp.asarray(imgs, jnp.float32), sx, sy), n_out)
    np.testing.assert_allclose(got, np.asarray(two_steps), atol=2e-5 * np.abs(want).max())
    unshifted = P.shift_and_shrink(jnp.asarray(imgs, jnp.float32), None, None, n_out)
    np.testing.assert_allclose(np.asarray(unshifted), np.asarray(P.fourier_resize(jnp.asarray(imgs, jnp.float32),
                                                                                  n_out)), atol=1e-5 * np.abs(want).max())
    with pytest.raises(ValueError, match="n_out"):
        P.shift_and_shrink(jnp.asarray(imgs, jnp.float32), None, None, n)
