"""Data layer: the one exception type for problems with what the user gave (a file, an option, an output folder).

An ``InputError`` carries a single line that names the file, row, option or folder at fault and says what to do;
the command line prints that line and exits with status 2. Every other exception is a bug in jisac and is shown
as one (a traceback and a request to report it), so input errors stay clear and bugs stay visible.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input: one line naming the file, option or folder and what to do about it."""


class ConfigError(InputError):
    """An option (``section.key``) that cannot be used, found before any work."""


class OutputDirError(InputError):
    """An ``output_dir`` that cannot be used: a file, under a file, not writable, in use by another run, or holding
    another run's state."""
