"""Ring geometry, resampling direction, Fourier-domain normalisation and the angular band limit."""

import jax.numpy as jnp
import numpy as np
import pytest

from jisac import align, polar
from jisac import transforms as T
from tests import reference_numpy as ref

GEOM = polar.RingGeometry()


def test_default_geometry_is_isacs():
    assert GEOM.n_rings == 29 and GEOM.radii[0] == 1 and GEOM.radii[-1] == 29
    assert GEOM.n_angles == 256 and GEOM.n_freqs == 129
    assert GEOM.weights().sum() * GEOM.n_angles == pytest.approx(1.0)
    np.testing.assert_allclose(GEOM.weights() / GEOM.weights()[0], GEOM.radii)  # weight proportional to r
    assert polar.RingGeometry(first_ring=2, last_ring=10, ring_step=4).radii.tolist() == [2, 6, 10]


def test_band_limit_keeps_about_pi_r_frequencies():
    kept = GEOM.freq_mask().sum()
    assert GEOM.max_freq()[0] == 5 and GEOM.max_freq()[-1] == 93  # ceil(pi r) + 1
    assert GEOM.freq_mask().size / kept > 2.5  # the skipped part of the (ring, frequency) plane
    assert polar.RingGeometry(bandlimit=False).freq_mask().all()


def test_sample_rings_matches_reference(structured_image):
    centres = jnp.asarray([[0.0, 0.0], [1.25, -0.5], [-2.0, 3.0]])
    got = np.asarray(polar.sample_rings(jnp.asarray(structured_image), centres, GEOM))
    px, py = ref.ring_points(GEOM.radii, GEOM.n_angles)
    for c, rings in zip(np.asarray(centres), got):
        want = ref.bilinear(structured_image.astype(np.float64), px + c[0] + 38, py + c[1] + 38)
        np.testing.assert_allclose(rings, want, atol=1e-4)


def test_rotating_the_image_shifts_the_rings_forward(structured_image):
    """Rotating by a = s steps (transforms convention) advances the rings: rings(rotated)[j] = rings[j + s]."""
    step = 360.0 / GEOM.n_angles
    shift = 20
    rotated = T.apply_transform(jnp.asarray(structured_image), T.make_transform(shift * step))
    zero = jnp.zeros((1, 2))
    before = np.asarray(polar.sample_rings(jnp.asarray(structured_image), zero, GEOM))[0]
    after = np.asarray(polar.sample_rings(rotated, zero, GEOM))[0]
    scale = np.abs(before).max()
    outer = slice(10, None)  # inner rings are dominated by interpolation
    assert np.abs(after - np.roll(before, -shift, axis=1))[outer].max() < 0.05 * scale
    assert np.abs(after - np.roll(before, shift, axis=1))[outer].max() > 0.2 * scale  # the wrong way fails


def test_fourier_normalisation_equals_sample_normalisation(structured_image):
    rng = np.random.default_rng(0)
    rings = jnp.asarray(rng.standard_normal((3, GEOM.n_rings, GEOM.n_angles)) * 3 + 2, jnp.float32)
    full = GEOM._replace(bandlimit=False)
    got = np.asarray(polar.ring_spectra(rings, full, normalize=True))
    want = np.fft.rfft(ref.normalize(np.asarray(rings, np.float64), full.weights()), axis=-1)
    np.testing.assert_allclose(got, want, atol=2e-4 * np.abs(want).max())
    limited = np.asarray(polar.ring_spectra(rings, GEOM, normalize=True))
    assert np.all(limited[~GEOM.freq_mask()[None].repeat(3, 0)] == 0)


def test_band_limit_loses_little_of_a_real_image(structured_image):
    rings = polar.sample_rings(jnp.asarray(structured_image), jnp.zeros((1, 2)), GEOM)[0]
    spec = np.abs(np.fft.rfft(np.asarray(rings, np.float64) - np.asarray(rings).mean(), axis=-1)) ** 2
    lost = spec[~GEOM.freq_mask()].sum() / spec.sum()
    assert lost < 1e-3


def test_geometry_validation_names_the_parameter():
    with pytest.raises(ValueError, match="first_ring"):
        polar.RingGeometry(first_ring=0).validate()
    with pytest.raises(ValueError, match="last_ring"):
        polar.RingGeometry(last_ring=40).validate(box_size=76)
    with pytest.raises(ValueError, match="n_angles"):
        polar.RingGeometry(n_angles=255).validate()
    polar.RingGeometry().validate(box_size=76)


SPHIRE_RINGS = GEOM._replace(ring_lengths="sphire")


def test_sphire_ring_lengths_are_numrinits():
    # shared/isac_algorithm.md 5.1: r=1:8, r=2:16, r=3-5:32, r=6-10:64, r=11-20:128, r=21-29:256; 4024 samples
    want = [8, 16] + [32] * 3 + [64] * 5 + [128] * 10 + [256] * 9
    assert SPHIRE_RINGS.ring_sizes().tolist() == want and sum(want) == 4024
    assert GEOM.ring_sizes().tolist() == [256] * 29
    with pytest.raises(ValueError, match="ring_lengths"):
        GEOM._replace(ring_lengths="short").validate()


def test_sphire_ring_spectra_match_a_float64_reference(structured_image):
    """Each ring of m samples: its rfft, times 256 / m, Nyquist coefficient / sqrt(2), zero above m / 2."""
    centres = np.asarray([[0.0, 0.0], [1.25, -0.5]])
    got = np.asarray(polar.polar_spectra(jnp.asarray(structured_image)[None], jnp.asarray(centres)[None],
                                         SPHIRE_RINGS._replace(bandlimit=False)))[0]
    image = structured_image.astype(np.float64)
    for c, spectra in zip(centres, got):
        for i, (r, m) in enumerate(zip(SPHIRE_RINGS.radii, SPHIRE_RINGS.ring_sizes())):
            t = 2 * np.pi * np.arange(m) / m
            ring = ref.bilinear(image, r * np.cos(t) + c[0] + 38, r * np.sin(t) + c[1] + 38)
            want = np.zeros(GEOM.n_freqs, complex)
            want[: m // 2 + 1] = np.fft.rfft(ring) * 256 / m
            if m < 256:
                want[m // 2] /= np.sqrt(2)
            np.testing.assert_allclose(spectra[i], want, atol=2e-4 * np.abs(want).max())


def test_sphire_rings_score_as_constant_rings(structured_image):
    """On a smooth image the two ring layouts give the same spectra up to interpolation (< 1 %), the same
    normalisation, and the same alignment of a rotated, shifted, mirrored copy."""
    img = jnp.asarray(structured_image)[None]
    c = jnp.asarray([[[0.0, 0.0], [1.3, -0.4]]])
    a = np.asarray(polar.polar_spectra(img, c, GEOM, normalize=True))
    b = np.asarray(polar.polar_spectra(img, c, SPHIRE_RINGS, normalize=True))
    assert np.abs(a - b).max() < 0.01 * np.abs(a).max()
    move = T.make_transform(jnp.asarray([37.0]), jnp.asarray([0.6]), jnp.asarray([-0.3]), jnp.asarray([True]))
    particle = T.apply_transform(img, move)
    found = [align.align_to_references(particle, align.prepare_references(img, opts), opts).params
             for opts in (align.AlignOptions(geometry=GEOM), align.AlignOptions(geometry=SPHIRE_RINGS))]
    for p in found:
        assert np.asarray(p.mirror)[0]
        assert abs(float(np.asarray(p.angle)[0]) - float(np.asarray(T.inverse(move).angle)[0])) < 1.0
    assert abs(float(found[0].angle[0]) - float(found[1].angle[0])) < 0.05


def _blobs(points: np.ndarray) -> np.ndarray:
    """A smooth analytic image (three Gaussian blobs, float64) at ``points`` ``(..., 2)`` (x, y) from the box
    centre."""
    out = np.zeros(points.shape[:-1])
    for (mx, my), amp, sigma in (((4.0, -3.0), 1.0, 4.0), ((-9.0, 6.0), -0.7, 3.0), ((2.0, 12.0), 0.5, 5.0)):
        out += amp * np.exp(-((points[..., 0] - mx) ** 2 + (points[..., 1] - my) ** 2) / (2 * sigma**2))
    return out


@pytest.mark.parametrize("mirror", [False, True])
def test_rotated_spectra_are_those_of_the_transformed_image(mirror):
    """``rotate_spectra`` of the rings about c equals the spectra of the image moved by from_centre_and_angle(c,
    a, mirror) (the ``transforms`` convention: output(y) = input(T^-1 y)), both sampled exactly (float64
    reference): the class average of spectra needs no transformed image."""
    c, a = np.array([1.5, -2.0]), 37.3
    offsets = GEOM.offsets()  # (R, A, 2)
    spec_f = np.fft.rfft(_blobs(c + offsets), axis=-1) * GEOM.freq_mask()
    inv = np.asarray(T.to_matrix(T.inverse(T.from_centre_and_angle(c[0], c[1], a, mirror))), np.float64)
    source = offsets @ inv[:2, :2].T + inv[:2, 2]
    spec_g = np.fft.rfft(_blobs(source), axis=-1) * GEOM.freq_mask()
    got = np.asarray(polar.rotate_spectra(jnp.asarray(spec_f, jnp.complex64), a, mirror))
    scale = np.abs(spec_g).max()
    assert np.abs(got - spec_g).max() < 1e-5 * scale  # FLOAT32_RTOL (measured: 1.3e-7)


def test_spectra_to_image_rebuilds_a_smooth_image():
    """The image made from exact ring spectra is the image inside the last ring (radial linear interpolation of
    a smooth image: <= 1 % of its range), and zero a ring step beyond it."""
    spec = jnp.asarray(np.fft.rfft(_blobs(GEOM.offsets()), axis=-1), jnp.complex64)
    img = np.asarray(polar.spectra_to_image(spec, GEOM, (76, 76)))
    y, x = np.mgrid[:76, :76] - 38.0
    truth = _blobs(np.stack([x, y], -1))
    r = np.hypot(x, y)
    inside = r <= GEOM.last_ring
    assert np.abs(img - truth)[inside].max() < 0.01 * np.ptp(truth)
    assert np.all(img[r >= GEOM.last_ring + GEOM.ring_step] == 0)
    for lengths in ("constant", "sphire"):  # the spectra polar_spectra makes come back to the image the same way
        geom = polar.RingGeometry(ring_lengths=lengths)
        image = jnp.asarray(np.where(inside, truth, 0.0)[None], jnp.float32)
        sampled = polar.polar_spectra(image, jnp.zeros((1, 1, 2)), geom)[:, 0]
        back = np.asarray(polar.spectra_to_image(sampled, geom, (76, 76)))[0]
        assert np.abs(back - truth)[r <= GEOM.last_ring - 1].max() < 0.02 * np.ptp(truth)
