"""Formats layer: Reading and writing the field's file formats: particle stacks in (:func:`open_stack`), results out."""

from jisac.io.checks import check_finite, require_ctf_columns, require_pixel_size
from jisac.io.errors import StackError, StackFileNotFoundError
from jisac.io.stack import ParticleStack, open_stack

__all__ = [
    "ParticleStack",
    "StackError",
    "StackFileNotFoundError",
    "check_finite",
    "open_stack",
    "require_ctf_columns",
    "require_pixel_size",
]
