"""Algorithm layer: The contrast transfer function (CTF) in RELION's conventions, phase flipping and CTF-weighted
averages.

Model (RELION ``src/ctf.h`` ``CTF::getCTF`` and ``src/ctf.cpp`` ``CTF::initialise``, restated; checked against
the analytic zeros and hand-computed values in ``tests/test_ctf.py``). For a spatial frequency ``k`` (1/Angstrom)
with azimuth ``theta = atan2(k_y, k_x)`` (x = columns, y = rows):

    defocus(theta) = [(u + v) + (u - v) cos(2 (theta - defocus_angle))] / 2        (u, v > 0: underfocus)
    chi(k)         = pi lambda defocus(theta) k^2 - (pi / 2) Cs lambda^3 k^4
    CTF(k)         = sin(chi + phase_shift + asin(A))
                   = sqrt(1 - A^2) sin(chi + phase_shift) + A cos(chi + phase_shift)

so the defocus along the direction ``defocus_angle`` is ``u``, ``CTF(0) = +A`` without a phase plate and the
CTF is positive up to its first zero. (RELION writes the argument as ``gamma = K1 (-defocus) k^2 + K2 k^4 - K5
- K3`` with ``K1 = pi lambda``, ``K2 = pi/2 Cs lambda^3``, ``K3 = atan(A / sqrt(1 - A^2))``, ``K5`` the phase
shift and ``CTF = -sin(gamma)``; its stored defocus average is *minus* (u + v)/2, which is what makes the two
forms equal. Read without that minus sign, the formula gives ``CTF(0) = -A`` and phase flipping would invert
every image: see the test ``test_ctf_at_zero_frequency_is_plus_amplitude_contrast``.)

All functions take batched parameters (``CTFParams`` fields of a common shape ``batch``) and compute in
float32. Frequencies follow NumPy's FFT layout (``fftfreq`` rows, ``rfftfreq`` or ``fftfreq`` columns), unshifted.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# lambda = h / sqrt(2 m e V (1 + e V / (2 m c^2))) in Angstrom for V in volts, with RELION's constants
# (``CTF::initialise``): h / sqrt(2 m e) = 12.2643247 A V^1/2 and e / (2 m c^2) = 0.978466e-6 / V. CODATA 2018
# values give a wavelength 6e-6 smaller; RELION's are kept so CTF zeros agree with RELION's to float32 precision.
_WAVELENGTH_COEFF_ANGST = 12.2643247
_RELATIVISTIC_PER_VOLT = 0.978466e-6

_ANGST_PER_MM = 1e7


class CTFParams(NamedTuple):
    """CTF parameters of one or many images (a pytree; every field has the same shape ``batch``).

    Attributes:
        defocus_u_angst: defocus along the direction ``defocus_angle_deg`` (RELION ``rlnDefocusU``), Angstrom,
            positive = underfocus.
        defocus_v_angst: defocus perpendicular to it (``rlnDefocusV``), Angstrom.
        defocus_angle_deg: angle from the x axis (columns) to the U direction (``rlnDefocusAngle``), degrees,
            counter-clockwise towards +y (rows).
        voltage_kv: accelerating voltage (``rlnVoltage``), kV.
        cs_mm: spherical aberration (``rlnSphericalAberration``), mm.
        amplitude_contrast: fraction A in [0, 1) (``rlnAmplitudeContrast``).
        phase_shift_deg: phase-plate phase shift (``rlnPhaseShift``), degrees.
        pixel_size_angst: pixel size of the images the CTF applies to (``rlnImagePixelSize``), Angstrom.
    """

    defocus_u_angst: Array
    defocus_v_angst: Array
    defocus_angle_deg: Array
    voltage_kv: Array
    cs_mm: Array
    amplitude_contrast: Array
    phase_shift_deg: Array
    pixel_size_angst: Array

    @property
    def shape(self) -> tuple[int, ...]:
        return jnp.shape(self.defocus_u_angst)

    def take(self, indices) -> "CTFParams":
        """The parameters of the images at ``indices`` (NumPy or JAX integer array) along the first axis."""
        return CTFParams(*(f[indices] for f in self))

    @classmethod
    def from_relion_table(cls, table, pixel_size_angst: float | None = None) -> "CTFParams":
        """Builds float32 parameters from a pandas DataFrame with RELION column names (no leading underscore).

        Columns ``rlnDefocusU``, ``rlnDefocusV``, ``rlnDefocusAngle``, ``rlnVoltage``, ``rlnSphericalAberration``
        and ``rlnAmplitudeContrast`` are required (RELION 3.1+ keeps the last three in ``data_optics``: merge
        them into the particle table first); ``rlnPhaseShift`` defaults to 0. The pixel size is
        ``pixel_size_angst`` when given, else the ``rlnImagePixelSize`` column.

        Raises:
            ValueError: naming the missing column.
        """
        required = {
            "defocus_u_angst": "rlnDefocusU",
            "defocus_v_angst": "rlnDefocusV",
            "defocus_angle_deg": "rlnDefocusAngle",
            "voltage_kv": "rlnVoltage",
            "cs_mm": "rlnSphericalAberration",
            "amplitude_contrast": "rlnAmplitudeContrast",
        }
        missing = [col for col in required.values() if col not in table.columns]
        if missing:
            raise ValueError(f"RELION table lacks CTF column(s) {', '.join(missing)}")
        n = len(table)

        def column(name):
            return np.asarray(table[name].to_numpy(), np.float32)

        fields = {field: column(col) for field, col in required.items()}
        has_phase = "rlnPhaseShift" in table.columns
        fields["phase_shift_deg"] = column("rlnPhaseShift") if has_phase else np.zeros(n, np.float32)
        if pixel_size_angst is not None:
            fields["pixel_size_angst"] = np.full(n, pixel_size_angst, np.float32)
        elif "rlnImagePixelSize" in table.columns:
            fields["pixel_size_angst"] = column("rlnImagePixelSize")
        else:
            raise ValueError("RELION table lacks rlnImagePixelSize: pass pixel_size_angst")
        return cls(**{f: fields[f] for f in cls._fields})


def make_ctf_params(
    defocus_u_angst,
    defocus_v_angst=None,
    defocus_angle_deg=0.0,
    voltage_kv=300.0,
    cs_mm=2.7,
    amplitude_contrast=0.1,
    phase_shift_deg=0.0,
    pixel_size_angst=1.0,
) -> CTFParams:
    """Float32 ``CTFParams`` broadcast to a common shape; ``defocus_v_angst`` defaults to ``defocus_u_angst``."""
    if defocus_v_angst is None:
        defocus_v_angst = defocus_u_angst
    values = (defocus_u_angst, defocus_v_angst, defocus_angle_deg, voltage_kv, cs_mm, amplitude_contrast,
              phase_shift_deg, pixel_size_angst)
    return CTFParams(*jnp.broadcast_arrays(*(jnp.asarray(v, jnp.float32) for v in values)))


def electron_wavelength_angst(voltage_kv):
    """Relativistic electron wavelength in Angstrom for an accelerating voltage in kV (0.01969 A at 300 kV)."""
    volts = jnp.asarray(voltage_kv, jnp.float32) * 1e3
    return _WAVELENGTH_COEFF_ANGST / jnp.sqrt(volts * (1.0 + _RELATIVISTIC_PER_VOLT * volts))


def _ctf(params: CTFParams, kx: Array, ky: Array) -> Array:
    """The CTF formula on arrays that already broadcast (frequencies in 1/Angstrom)."""
    u, v, angle, kv, cs, amp, phase = params[:7]
    lam = electron_wavelength_angst(kv)
    k2 = kx * kx + ky * ky
    # cos(2 (theta - angle)) with theta = atan2(ky, kx), from cos 2theta and sin 2theta as ratios of the
    # frequencies: no arctangent and cosine per Fourier pixel (they were 3/4 of a stack's phase flips' CTF time)
    safe = jnp.where(k2 > 0, k2, 1.0)
    cos2, sin2 = jnp.where(k2 > 0, (kx * kx - ky * ky) / safe, 1.0), 2.0 * kx * ky / safe
    a = 2.0 * jnp.deg2rad(angle)
    defocus = 0.5 * ((u + v) + (u - v) * (cos2 * jnp.cos(a) + sin2 * jnp.sin(a)))
    chi = jnp.pi * lam * defocus * k2 - 0.5 * jnp.pi * (cs * _ANGST_PER_MM) * lam**3 * k2 * k2
    # asin(A) = RELION's atan(A / sqrt(1 - A^2)), the amplitude-contrast phase.
    return jnp.sin(chi + jnp.deg2rad(phase) + jnp.arcsin(amp))


def _expand(params: CTFParams, ndim: int) -> CTFParams:
    """Float32 fields with ``ndim`` trailing unit axes (to broadcast against a frequency grid)."""
    return CTFParams(*(jnp.asarray(f, jnp.float32).reshape(jnp.shape(f) + (1,) * ndim) for f in params))


def ctf_at(params: CTFParams, kx_inv_angst, ky_inv_angst) -> Array:
    """The CTF at spatial frequencies ``(kx, ky)`` in 1/Angstrom (x = columns, y = rows).

    ``kx``/``ky`` broadcast against each other; the result has shape ``params.shape + kx.shape`` (the
    parameters get trailing axes for the frequency dimensions). ``pixel_size_angst`` is not used.
    """
    kx = jnp.asarray(kx_inv_angst, jnp.float32)
    ky = jnp.asarray(ky_inv_angst, jnp.float32)
    return _ctf(_expand(params, max(kx.ndim, ky.ndim)), kx, ky)


def frequency_grid(ny: int, nx: int, full: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(kx, ky)`` in cycles per pixel on the ``rfft2`` grid ``(ny, nx // 2 + 1)`` (or ``fft2`` when ``full``)."""
    kx = (np.fft.fftfreq(nx) if full else np.fft.rfftfreq(nx))[None, :]
    ky = np.fft.fftfreq(ny)[:, None]
    return np.broadcast_arrays(kx, ky)


def ctf_2d(params: CTFParams, ny: int, nx: int, full: bool = False) -> Array:
    """The CTF of ``(ny, nx)`` images on their FFT grid.

    Returns:
        ``params.shape + (ny, nx // 2 + 1)`` float32 (``rfft2`` layout), or ``params.shape + (ny, nx)`` (``fft2``
        layout) when ``full``; unshifted (zero frequency at ``[0, 0]``).
    """
    kx, ky = frequency_grid(ny, nx, full)
    p = _expand(params, 2)
    # Frequencies in 1/Angstrom per image: cycles/pixel divided by that image's pixel size.
    return _ctf(p, jnp.asarray(kx, jnp.float32) / p.pixel_size_angst, jnp.asarray(ky, jnp.float32) / p.pixel_size_angst)


def ctf_sign(ctf: Array) -> Array:
    """+1 where ``ctf >= 0``, -1 where it is negative (RELION's ``do_only_flip_phases``: zeros count as +1)."""
    return jnp.where(ctf < 0, -1.0, 1.0).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("pad",))
def phase_flip(images: Array, params: CTFParams, pad: int = 2) -> Array:
    """Multiplies each image's Fourier transform by the sign of its CTF (SPHIRE ``filt_ctf(binary=True)``).

    The image is centred in a zero-filled box ``pad`` times larger, filtered there (so the CTF is sampled
    ``pad`` times more finely and the filter's ringing wraps around less) and cropped back, as SPHIRE does
    with its default ``dopad``. Subtract the background mean first so the zero padding adds no edge.

    Args:
        images: ``(..., ny, nx)`` float images.
        params: CTF parameters with shape ``images.shape[:-2]`` (pixel size of these images).
        pad: padding factor (1 = no padding).

    Returns:
        ``(..., ny, nx)`` float32 phase-flipped images.
    """
    images = jnp.asarray(images, jnp.float32)
    ny, nx = images.shape[-2:]
    py, px = pad * ny, pad * nx
    y0, x0 = py // 2 - ny // 2, px // 2 - nx // 2  # keeps the centre (n // 2) on the padded centre
    lead = [(0, 0)] * (images.ndim - 2)
    # rfft2 and irfft2 of the padded box one axis at a time: only the ny rows that hold the image are transformed
    # along x on the way in, and only the ny rows the crop keeps on the way out (the same values; 1/4 fewer FFTs)
    rows = jnp.fft.rfft(jnp.pad(images, lead + [(0, 0), (x0, px - nx - x0)]), axis=-1)
    spectra = jnp.fft.fft(jnp.pad(rows, lead + [(y0, py - ny - y0), (0, 0)]), axis=-2)
    flipped = jnp.fft.ifft(spectra * ctf_sign(ctf_2d(params, py, px)), axis=-2)[..., y0 : y0 + ny, :]
    return jnp.fft.irfft(flipped, n=px, axis=-1)[..., x0 : x0 + nx].astype(jnp.float32)


def apply_ctf(images: Array, params: CTFParams) -> Array:
    """Multiplies each image's Fourier transform by its CTF (the forward model; no padding, periodic)."""
    images = jnp.asarray(images, jnp.float32)
    ny, nx = images.shape[-2:]
    return jnp.fft.irfft2(jnp.fft.rfft2(images) * ctf_2d(params, ny, nx), s=(ny, nx)).astype(jnp.float32)


class CTFWeightedSum(NamedTuple):
    """Fourier-space accumulators of a CTF-corrected average (``rfft2`` layout, ``(ny, nx // 2 + 1)``).

    Attributes:
        ctf_times_ft: ``sum_i CTF_i F_i`` (complex64).
        ctf_squared: ``sum_i CTF_i^2`` (float32).
    """

    ctf_times_ft: Array
    ctf_squared: Array


def ctf_weighted_sum(images: Array, ctfs: Array, weights: Array | None = None) -> CTFWeightedSum:
    """Accumulators ``sum_i w_i CTF_i F_i`` and ``sum_i w_i CTF_i^2`` over the first axis.

    Args:
        images: ``(n, ny, nx)`` images (already aligned).
        ctfs: ``(n, ny, nx // 2 + 1)`` their CTFs (``ctf_2d``).
        weights: optional ``(n,)`` weights (e.g. 0 for padding entries of a fixed-size chunk).

    Sums of chunks add field by field, so a large class can be accumulated in pieces.
    """
    ft = jnp.fft.rfft2(jnp.asarray(images, jnp.float32))
    ctfs = jnp.asarray(ctfs, jnp.float32)
    if weights is not None:
        ctfs_w = ctfs * jnp.asarray(weights, jnp.float32)[:, None, None]
    else:
        ctfs_w = ctfs
    return CTFWeightedSum(jnp.sum(ctfs_w * ft, axis=0), jnp.sum(ctfs_w * ctfs, axis=0))


@functools.partial(jax.jit, static_argnames=('shape',))
def wiener_filter(sums: CTFWeightedSum, snr, shape: tuple[int, int]) -> Array:
    """The Wiener-filtered average ``sum CTF_i F_i / (sum CTF_i^2 + 1 / snr)`` as a ``shape`` float32 image.

    ``snr`` (> 0) is a scalar or broadcasts against the ``rfft2`` grid (e.g. a radial SNR profile).
    """
    ratio = sums.ctf_times_ft / (sums.ctf_squared + 1.0 / jnp.asarray(snr, jnp.float32))
    return jnp.fft.irfft2(ratio, s=shape).astype(jnp.float32)
