"""Formats layer: The one error type of jisac's input/output: a :class:`StackError` carries a single line that names
the file, row or parameter at fault and what to do about it, so a user never has to read a traceback from inside a
library."""

from __future__ import annotations

from pathlib import Path

from jisac.errors import InputError


class StackError(InputError):
    """Bad or unreadable input (a stack, a STAR/.cs/HDF file, a missing parameter). The message is one line."""


class StackFileNotFoundError(StackError, FileNotFoundError):
    """A file that was asked for, or that a STAR/.cs file refers to, does not exist."""


def require_file(path, what: str) -> None:
    """Raises unless ``path`` is an existing regular file: a missing path gives :class:`StackFileNotFoundError`
    ("no such <what>"), a folder gives :class:`StackError` saying it is a folder (not "no such file", which would
    send the user looking for something that exists)."""
    path = Path(path)
    if path.is_dir():
        raise StackError(f"{path}: is a folder, not a {what}; give the file itself (e.g. {path}/<name>"
                         f"{path.suffix or ''})")
    if not path.is_file():
        raise StackFileNotFoundError(f"{path}: no such {what}")
