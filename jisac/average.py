"""Algorithm layer: Class averages: transform every member by its parameters and sum per class (``isac_algorithm.md``
§6.1).

Sums are segment sums over a class label per particle, in fixed-size particle chunks, so there is one
compilation whatever the class sizes are: particles with label ``-1`` (or ``>= n_classes``) are left out.

**Exact, order-independent sums.** A float32 sum depends on the order of its terms; split over devices (a
``psum`` of per-device partial sums) it differs from the one-device sum in the last bits, and ISAC's argmax
decisions downstream can flip on such differences (measured: within-group averages differing by 6e-7 between 1
and 2 devices moved angles by 6e-5 deg). So class sums are computed in fixed point: every value is scaled by a
power of two ``2^(FIXED_BITS - e)`` with ``2^e >= max |value|`` (a global maximum, taken with ``pmax``), rounded
to an integer and split into two int32 limbs (``hi = q >> 12``, ``lo = q & 4095``); the limbs are summed as
integers (exact, any order, any device count) and turned back into float32 once. The resolution is
``2^(e - 22)``, i.e. float32's own relative precision at the largest value. Integer limbs stay exact for up to
``MAX_TERMS`` terms per class and call.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jisac import sharding
from jisac.rows import RowRange, pad_rows
from jisac.transforms import Transform2D, apply_transform

Array = jax.Array

FIXED_BITS = 22  # |value| <= 2^e maps to |q| <= 2^22 (plus rounding): float32's 24-bit precision, with headroom
_LO_BITS = 12  # lo limb in [0, 4096), hi limb in [-2^10, 2^10]: both sums fit int32 for MAX_TERMS terms
MAX_TERMS = 1 << 19  # terms per class and call for which the int32 limb sums cannot overflow


class ClassSums(NamedTuple):
    """Per-class sums of transformed images ``(k, ny, nx)`` and member counts ``(k,)``."""

    sums: Array
    counts: Array

    def averages(self) -> Array:
        """``sums / counts``; empty classes are zero images."""
        return self.sums / jnp.maximum(self.counts, 1)[:, None, None].astype(self.sums.dtype)


def fixed_point_exponent(max_abs: Array) -> Array:
    """int32 ``e`` with ``max_abs <= 2^e`` (the scale of the fixed-point sums)."""
    return jnp.ceil(jnp.log2(jnp.maximum(max_abs, jnp.float32(1e-30)))).astype(jnp.int32)


def exact_segment_sum(values: Array, seg: Array, num_segments: int, exponent: Array) -> tuple[Array, Array]:
    """Fixed-point segment sums of float32 ``values`` ``(n, ...)``: int32 limbs ``(hi, lo)``, each
    ``(num_segments, ...)``; add limbs of several calls (or devices) as integers, then ``limbs_to_float``."""
    q = jnp.round(values * jnp.ldexp(jnp.float32(1.0), FIXED_BITS - exponent)).astype(jnp.int32)
    hi = jax.ops.segment_sum(jnp.right_shift(q, _LO_BITS), seg, num_segments=num_segments)
    lo = jax.ops.segment_sum(jnp.bitwise_and(q, (1 << _LO_BITS) - 1), seg, num_segments=num_segments)
    return hi, lo


def single_limb_bits(max_terms: Array) -> Array:
    """int32 fraction bits for fixed-point sums in one limb of at most ``max_terms`` terms per segment (values
    scaled so that ``|value| <= 2^b``; ``within_group._polar_class_sums``): the largest ``b`` (at most
    ``FIXED_BITS``) with ``max_terms * 2^b <= 2^30``, so the int32 sum cannot overflow (22 bits up to 256 terms,
    20 at 1,024)."""
    need = jnp.ceil(jnp.log2(jnp.maximum(max_terms, 1).astype(jnp.float32))).astype(jnp.int32)
    return jnp.minimum(FIXED_BITS, 30 - need)


def limbs_to_float(hi: Array, lo: Array, exponent: Array) -> Array:
    """float32 value of fixed-point limb sums (a deterministic function of the exact integers)."""
    total = hi.astype(jnp.float32) * jnp.float32(1 << _LO_BITS) + lo.astype(jnp.float32)
    return total * jnp.ldexp(jnp.float32(1.0), exponent - FIXED_BITS)


def _limbs_to_float64(hi: np.ndarray, lo: np.ndarray, exponent: int) -> np.ndarray:
    """Host version, exact: an int64 total below 2^53 times a power of two."""
    total = hi.astype(np.int64) * (1 << _LO_BITS) + lo.astype(np.int64)
    return np.ldexp(total.astype(np.float64), int(exponent) - FIXED_BITS)


def _chunk_sums_local(images, params, labels, n_classes, axis=None):
    """One chunk's limbs and counts; with ``axis`` (inside ``shard_map``) summed over the devices."""
    aligned = apply_transform(images, params)
    # Labels outside [0, n_classes) go to an extra bucket that is dropped.
    seg = jnp.where((labels >= 0) & (labels < n_classes), labels, n_classes)
    max_abs = jnp.max(jnp.abs(jnp.where((seg < n_classes)[:, None, None], aligned, 0.0)))
    if axis is not None:
        max_abs = jax.lax.pmax(max_abs, axis)
    exponent = fixed_point_exponent(max_abs)
    hi, lo = exact_segment_sum(aligned, seg, n_classes + 1, exponent)
    counts = jax.ops.segment_sum(jnp.ones_like(seg), seg, num_segments=n_classes + 1)
    out = (hi[:n_classes], lo[:n_classes], counts[:n_classes])
    if axis is not None:
        out = jax.lax.psum(out, axis)
    return out + (exponent,)


def class_sums(images, params: Transform2D, labels, n_classes: int, chunk: int = 256, mesh=None) -> ClassSums:
    """Sums of aligned members per class, exact whatever the device count (see the module docstring).

    Args:
        images: ``(n, ny, nx)`` particles (NumPy, on disk, a lazy row view or JAX; read chunk by chunk).
        params: ``Transform2D`` with fields of shape ``(n,)``: each member's alignment onto its class.
        labels: ``(n,)`` int class of each particle; ``-1`` excludes it.
        n_classes: number of classes ``k``.
        chunk: particles per jitted call (the last chunk is padded with excluded particles). Chunks cover fixed
            ranges of particle indices; each chunk's exact sum is added on the host in float64.
        mesh: optional one-axis device mesh: each chunk is split over its devices (and, with several processes,
            each process reads only its devices' rows).

    Returns:
        ``ClassSums`` with ``sums`` ``(k, ny, nx)`` float32 and ``counts`` ``(k,)`` int32.
    """
    n = images.shape[0]
    n_dev = 1 if mesh is None else mesh.size
    chunk = min(chunk, 1 << max(n - 1, 0).bit_length())  # a small stack: padded to a power of two (few shapes)
    padded_chunk = -(-chunk // n_dev) * n_dev
    labels = np.asarray(labels, np.int32)
    fields = [np.asarray(f) for f in params]
    fn = sharding.over_particles(_chunk_sums_local, mesh, (True, True, True), False, collectives=True,
                                 n_classes=n_classes)
    total = counts = None
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        rows = RowRange(images, start, stop, padded_chunk)
        lab = pad_rows(labels[start:stop], padded_chunk, -1)
        par = Transform2D(*(pad_rows(f[start:stop], padded_chunk) for f in fields))
        hi, lo, cnt, exponent = (sharding.fetch(a) for a in fn(*sharding.to_devices((rows, par, lab), mesh)))
        part = _limbs_to_float64(hi, lo, exponent)
        total = part if total is None else total + part
        counts = cnt if counts is None else counts + cnt
    return ClassSums(jnp.asarray(total.astype(np.float32)), jnp.asarray(counts.astype(np.int32)))


def class_averages(images, params: Transform2D, labels, n_classes: int, chunk: int = 256, mesh=None) -> Array:
    """Plain class averages ``(k, ny, nx)``: mean of the aligned members (zero for an empty class)."""
    return class_sums(images, params, labels, n_classes, chunk, mesh).averages()
