"""The one error type of jisac's input/output: a :class:`StackError` carries a single line that names the file,
row or parameter at fault and what to do about it, so a user never has to read a traceback from inside a library."""

from __future__ import annotations


class StackError(ValueError):
    """Bad or unreadable input (a stack, a STAR/.cs/HDF file, a missing parameter). The message is one line."""


class StackFileNotFoundError(StackError, FileNotFoundError):
    """A file that was asked for, or that a STAR/.cs file refers to, does not exist."""
