"""Class averages: transform every member by its parameters and sum per class (``isac_algorithm.md`` §6.1).

Sums are segment sums over a class label per particle, in fixed-size particle chunks, so there is one
compilation whatever the class sizes are: particles with label ``-1`` (or ``>= n_classes``) are left out.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jisac.transforms import Transform2D, apply_transform

Array = jax.Array


class ClassSums(NamedTuple):
    """Per-class sums of transformed images ``(k, ny, nx)`` and member counts ``(k,)``."""

    sums: Array
    counts: Array

    def averages(self) -> Array:
        """``sums / counts``; empty classes are zero images."""
        return self.sums / jnp.maximum(self.counts, 1)[:, None, None].astype(self.sums.dtype)


@functools.partial(jax.jit, static_argnames=("n_classes",))
def _chunk_sums(images: Array, params: Transform2D, labels: Array, n_classes: int) -> ClassSums:
    aligned = apply_transform(images, params)
    # Labels outside [0, n_classes) go to an extra bucket that is dropped.
    seg = jnp.where((labels >= 0) & (labels < n_classes), labels, n_classes)
    sums = jax.ops.segment_sum(aligned, seg, num_segments=n_classes + 1)[:n_classes]
    counts = jax.ops.segment_sum(jnp.ones_like(seg), seg, num_segments=n_classes + 1)[:n_classes]
    return ClassSums(sums, counts)


def class_sums(images, params: Transform2D, labels, n_classes: int, chunk: int = 256) -> ClassSums:
    """Sums of aligned members per class.

    Args:
        images: ``(n, ny, nx)`` particles (NumPy, memory-mapped or JAX; read chunk by chunk).
        params: ``Transform2D`` with fields of shape ``(n,)``: each member's alignment onto its class.
        labels: ``(n,)`` int class of each particle; ``-1`` excludes it.
        n_classes: number of classes ``k``.
        chunk: particles per jitted call (the last chunk is padded with excluded particles).

    Returns:
        ``ClassSums`` with ``sums`` ``(k, ny, nx)`` float32 and ``counts`` ``(k,)`` int32.
    """
    n = images.shape[0]
    chunk = min(chunk, n)  # a small stack is not padded to a whole chunk
    labels = np.asarray(labels, np.int32)
    fields = [np.asarray(f) for f in params]
    total = None
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        pad = chunk - (stop - start)
        imgs = np.asarray(images[start:stop], np.float32)
        lab = labels[start:stop]
        par = [f[start:stop] for f in fields]
        if pad:
            imgs = np.concatenate([imgs, np.zeros((pad,) + imgs.shape[1:], np.float32)])
            lab = np.concatenate([lab, np.full(pad, -1, np.int32)])
            par = [np.concatenate([f, np.zeros(pad, f.dtype)]) for f in par]
        part = _chunk_sums(jnp.asarray(imgs), Transform2D(*map(jnp.asarray, par)), jnp.asarray(lab), n_classes)
        total = part if total is None else jax.tree.map(jnp.add, total, part)
    return total


def class_averages(images, params: Transform2D, labels, n_classes: int, chunk: int = 256) -> Array:
    """Plain class averages ``(k, ny, nx)``: mean of the aligned members (zero for an empty class)."""
    return class_sums(images, params, labels, n_classes, chunk).averages()
