"""Data layer: 2D rigid transforms: the one place where jisac's alignment convention is defined.

Convention (SPHIRE's, ``shared/isac_algorithm.md`` §4). A parameter set ``P = (angle, shift_x, shift_y, mirror)``
with the angle in degrees and shifts in pixels is the map of pixel coordinates, taken relative to the image centre
``(nx // 2, ny // 2)`` (x = column, y = row)::

    T_P(v) = M_m (R(angle) v + s),   R(a) = [[cos a, sin a], [-sin a, cos a]],   M_1 = diag(-1, 1),  M_0 = I

i.e. rotate, then translate, then mirror x -> -x. Applying ``P`` to an image moves the pixel at ``v`` to
``T_P(v)``: ``out(T_P(v)) = in(v)``. Alignment parameters are the transform that brings a raw particle onto its
reference, so ``apply_transform(particle, P) ~ reference``.

``compose(p1, p2)`` is "apply p1, then p2" (SPHIRE's ``combine_params2``); ``inverse(p)`` undoes ``p``. The
particle centre in the raw image is the point ``P`` maps to the box centre (``particle_centre``): polar
searches are centred there.

RELION describes the same relation from the other side (the reference is rotated by ``psi`` and shifted to land
on the particle; the particle's centre lies at ``-origin``). For a non-mirrored particle::

    psi = -angle (mod 360),      origin = R(-angle) s = -particle_centre(P)      (pixels; x Angstrom/px for Angst)

A mirrored particle is described by the same formulas relative to the x-mirrored class average (RELION's 2D
model has no mirror; jisac writes the flag in its own column). ``to_relion``/``from_relion`` implement this and
``tests/test_transforms.py`` checks it against RELION's forward model written out independently.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


class Transform2D(NamedTuple):
    """Alignment parameters of one or many images (a pytree; every field has the same shape).

    Attributes:
        angle: in-plane rotation, degrees.
        shift_x: translation along x (columns), pixels.
        shift_y: translation along y (rows), pixels.
        mirror: bool, True when the x-mirror is applied after rotation and translation.
    """

    angle: Array
    shift_x: Array
    shift_y: Array
    mirror: Array


def make_transform(angle=0.0, shift_x=0.0, shift_y=0.0, mirror=False) -> Transform2D:
    """Builds a float32/bool ``Transform2D``, broadcasting all fields to a common shape (any array-likes:
    scalars, lists, NumPy or JAX arrays, pandas columns)."""
    return _make_transform(*map(_as_array, (angle, shift_x, shift_y, mirror)))


def _as_array(a):
    """``a`` as a JAX or NumPy array (jitted functions take no lists or pandas columns)."""
    return a if isinstance(a, jax.Array) else np.asarray(a)


@jax.jit
def _make_transform(angle, shift_x, shift_y, mirror) -> Transform2D:
    angle, shift_x, shift_y, mirror = jnp.broadcast_arrays(
        jnp.asarray(angle, jnp.float32),
        jnp.asarray(shift_x, jnp.float32),
        jnp.asarray(shift_y, jnp.float32),
        jnp.asarray(mirror, bool),
    )
    return Transform2D(angle, shift_x, shift_y, mirror)


@functools.partial(jax.jit, static_argnames=('shape',))
def identity(shape: tuple[int, ...] = ()) -> Transform2D:
    """The identity transform, broadcast to ``shape``."""
    zeros = jnp.zeros(shape, jnp.float32)
    return Transform2D(zeros, zeros, zeros, jnp.zeros(shape, bool))


@jax.jit
def wrap_angle(angle: Array) -> Array:
    """Angle in degrees wrapped into [0, 360)."""
    wrapped = jnp.mod(angle, 360.0)
    # float32 mod can return exactly 360 for tiny negative inputs.
    return jnp.where(wrapped >= 360.0, wrapped - 360.0, wrapped)


def _rotate(angle_deg: Array, x: Array, y: Array) -> tuple[Array, Array]:
    """R(angle) (x, y) with R(a) = [[cos a, sin a], [-sin a, cos a]]."""
    a = jnp.deg2rad(angle_deg)
    c, s = jnp.cos(a), jnp.sin(a)
    return c * x + s * y, -s * x + c * y


def to_matrix(p: Transform2D) -> Array:
    """Homogeneous 3x3 matrices ``[[M R, M s], [0, 0, 1]]`` of shape ``p.angle.shape + (3, 3)``."""
    a = jnp.deg2rad(p.angle)
    c, s = jnp.cos(a), jnp.sin(a)
    sign = jnp.where(p.mirror, -1.0, 1.0).astype(c.dtype)
    zero, one = jnp.zeros_like(c), jnp.ones_like(c)
    rows = [
        jnp.stack([sign * c, sign * s, sign * p.shift_x], -1),
        jnp.stack([-s, c, p.shift_y], -1),
        jnp.stack([zero, zero, one], -1),
    ]
    return jnp.stack(rows, -2)


@jax.jit
def compose(p1: Transform2D, p2: Transform2D) -> Transform2D:
    """The transform "apply ``p1``, then ``p2``" (``T_p2 o T_p1``); SPHIRE's ``combine_params2``.

    Closed form (``R(b) M_1 = M_1 R(-b)``): if p1 is not mirrored, ``angle = a1 + a2``, ``s = R(a2) s1 + s2``;
    if it is, ``angle = a1 - a2``, ``s = R(-a2) s1 + M_1 s2``; the mirror flags add modulo 2.
    """
    m1 = p1.mirror
    a2 = jnp.where(m1, -p2.angle, p2.angle)
    rx, ry = _rotate(a2, p1.shift_x, p1.shift_y)
    sx2 = jnp.where(m1, -p2.shift_x, p2.shift_x)
    return Transform2D(
        angle=wrap_angle(p1.angle + a2),
        shift_x=rx + sx2,
        shift_y=ry + p2.shift_y,
        mirror=jnp.logical_xor(m1, p2.mirror),
    )


@jax.jit
def inverse(p: Transform2D) -> Transform2D:
    """The transform that undoes ``p``: ``(-a, -R(-a) s, 0)``, or ``(a, -M_1 R(-a) s, 1)`` when mirrored."""
    rx, ry = _rotate(-p.angle, p.shift_x, p.shift_y)
    return Transform2D(
        angle=wrap_angle(jnp.where(p.mirror, p.angle, -p.angle)),
        shift_x=jnp.where(p.mirror, rx, -rx),
        shift_y=-ry,
        mirror=p.mirror,
    )


@jax.jit
def particle_centre(p: Transform2D) -> tuple[Array, Array]:
    """Where the particle centre lies in the raw image (pixels from the box centre): the point ``c`` with
    ``T_P(c) = 0``, i.e. ``c = -R(-angle) s`` whether or not ``P`` mirrors (the mirror fixes the origin).

    This is ``inverse(p)``'s shift only for an unmirrored ``p``: a mirrored inverse applies its shift before its
    mirror, so its shift is the x-mirrored centre. SPHIRE likewise takes the centre from the inverse of
    ``(angle, sx, sy)`` with the mirror left out (``inverse_transform2``).
    """
    rx, ry = _rotate(-p.angle, p.shift_x, p.shift_y)
    return -rx, -ry


@jax.jit
def from_centre_and_angle(centre_x: Array, centre_y: Array, angle: Array, mirror: Array) -> Transform2D:
    """``compose((0, -c, 0), (angle, 0, mirror))``: rotate (and mirror) about the raw-image point ``c``.

    This is how a polar search reports its result: the rings were centred on ``c`` and the best rotation was
    ``angle`` (SPHIRE ``ormq``, ``isac_algorithm.md`` §5.5 step 4).
    """
    rx, ry = _rotate(angle, -centre_x, -centre_y)
    return Transform2D(wrap_angle(angle), rx, ry, jnp.asarray(mirror, bool))


# ----------------------------------------------------------------------------------------------- RELION


@jax.jit
def to_relion(p: Transform2D, pixel_size_angst: float | Array = 1.0):
    """RELION's ``(rlnAnglePsi [deg, (-180, 180]], rlnOriginXAngst, rlnOriginYAngst, mirror)`` for ``p``.

    See the module docstring for the derivation; mirrored particles are described relative to the mirrored
    class average.
    """
    psi = wrap_angle(-p.angle)
    psi = jnp.where(psi > 180.0, psi - 360.0, psi)
    # The particle is ref'(R(angle) v + s) with ref' the (mirrored, if flagged) average: origin = R(-angle) s.
    ox, oy = _rotate(-p.angle, p.shift_x, p.shift_y)
    return psi, ox * pixel_size_angst, oy * pixel_size_angst, p.mirror


def from_relion(psi, origin_x_angst, origin_y_angst, mirror=False, pixel_size_angst=1.0) -> Transform2D:
    """Inverse of ``to_relion``: jisac parameters from RELION's psi (deg) and origins (Angstrom) (array-likes:
    NumPy or JAX arrays, lists, pandas columns)."""
    return _from_relion(*map(_as_array, (psi, origin_x_angst, origin_y_angst, mirror, pixel_size_angst)))


@jax.jit
def _from_relion(psi, origin_x_angst, origin_y_angst, mirror, pixel_size_angst) -> Transform2D:
    psi = jnp.asarray(psi, jnp.float32)
    angle = -psi
    ox = jnp.asarray(origin_x_angst, jnp.float32) / pixel_size_angst
    oy = jnp.asarray(origin_y_angst, jnp.float32) / pixel_size_angst
    sx, sy = _rotate(angle, ox, oy)  # s = R(angle) origin
    mirror = jnp.broadcast_to(jnp.asarray(mirror, bool), angle.shape)
    return Transform2D(wrap_angle(angle), sx, sy, mirror)


# ------------------------------------------------------------------------------------- input frame


def to_input_frame(prealign_shifts, working_params: Transform2D, shrink_ratio: float) -> Transform2D:
    """A particle's full 2D alignment in the pixels of the INPUT stack, from ISAC's two steps.

    ISAC pre-aligns a shrunk copy of every particle (its centring shift, here already in input pixels) and then
    aligns the shifted, shrunk working image (``working_params``, working pixels). The full alignment is the
    pre-alignment shift followed by ISAC's parameters with their shifts divided by ``shrink_ratio``
    (working px / input px). The STAR writer and the beautifier both use this one function.

    Args:
        prealign_shifts: ``(n, 2)`` ``(x, y)`` pre-alignment shifts, input pixels.
        working_params: ``Transform2D`` with fields ``(n,)``, working pixels.
        shrink_ratio: working pixels per input pixel (``target_radius / radius``).

    Returns:
        ``Transform2D`` with fields ``(n,)``: apply it to the input image to bring it onto the class average
        (scaled to the input pixel size).
    """
    shifts = np.asarray(prealign_shifts, np.float32)
    isac = make_transform(working_params.angle, np.asarray(working_params.shift_x) / shrink_ratio,
                          np.asarray(working_params.shift_y) / shrink_ratio, working_params.mirror)
    return compose(make_transform(0.0, shifts[:, 0], shifts[:, 1], False), isac)


# ------------------------------------------------------------------------------------- image resampling


def _bilinear_sample(image: Array, col: Array, row: Array) -> tuple[Array, Array]:
    """Bilinear samples of one ``(ny, nx)`` image at float pixel positions, and a mask of in-bounds points.

    Points outside the image read zero from their missing neighbours; ``inside`` flags positions whose four
    neighbours all lie in the image.
    """
    ny, nx = image.shape
    c0 = jnp.floor(col)
    r0 = jnp.floor(row)
    fc = col - c0
    fr = row - r0
    c0 = c0.astype(jnp.int32)
    r0 = r0.astype(jnp.int32)
    flat = image.reshape(-1)

    def corner(dr, dc):
        rr, cc = r0 + dr, c0 + dc
        ok = (rr >= 0) & (rr < ny) & (cc >= 0) & (cc < nx)
        idx = jnp.clip(rr, 0, ny - 1) * nx + jnp.clip(cc, 0, nx - 1)
        return jnp.where(ok, jnp.take(flat, idx), 0.0)

    value = (
        corner(0, 0) * (1 - fr) * (1 - fc)
        + corner(0, 1) * (1 - fr) * fc
        + corner(1, 0) * fr * (1 - fc)
        + corner(1, 1) * fr * fc
    )
    inside = (c0 >= 0) & (c0 < nx - 1) & (r0 >= 0) & (r0 < ny - 1)
    return value, inside


@jax.jit
def bilinear_sample(image: Array, col: Array, row: Array) -> Array:
    """Bilinear samples of a ``(ny, nx)`` image at float (column, row) positions; zero outside."""
    return _bilinear_sample(image, col, row)[0]


def _apply_one(image: Array, p: Transform2D) -> Array:
    ny, nx = image.shape
    y, x = jnp.meshgrid(
        jnp.arange(ny, dtype=jnp.float32) - ny // 2, jnp.arange(nx, dtype=jnp.float32) - nx // 2, indexing="ij"
    )
    # out(u) = in(T^-1 u) with T^-1 u = R(angle)^T (M u - s)
    mx = jnp.where(p.mirror, -x, x) - p.shift_x
    my = y - p.shift_y
    src_x, src_y = _rotate(-p.angle, mx, my)
    value, inside = _bilinear_sample(image, src_x + nx // 2, src_y + ny // 2)
    # SPHIRE's "background" mode: a pixel whose source falls outside keeps its own input value.
    return jnp.where(inside, value, image)


@jax.jit
def apply_transform(images: Array, p: Transform2D) -> Array:
    """Applies ``p`` to images by bilinear interpolation: ``out(T_p(v)) = in(v)``.

    Args:
        images: ``(..., ny, nx)`` float images.
        p: transforms whose fields have shape ``images.shape[:-2]`` (or broadcast to it).

    Returns:
        Images of the same shape. Output pixels whose source lies outside the image keep their input value
        (SPHIRE's background mode).
    """
    batch = images.shape[:-2]
    p = Transform2D(*(jnp.broadcast_to(f, batch) for f in p))
    flat_imgs = images.reshape((-1,) + images.shape[-2:])
    flat_p = Transform2D(*(f.reshape(-1) for f in p))
    out = jax.vmap(_apply_one)(flat_imgs, flat_p)
    return out.reshape(images.shape)
