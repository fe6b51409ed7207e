"""Interface layer: progress of long stages that a person can read, in a terminal and in a log.

One small API for every long stage (pre-alignment passes, SAC rounds, MRA steps, generations)::

    with progress.task("pre-alignment", total=n_passes, unit="pass") as bar:
        for _ in range(n_passes):
            ...
            bar.advance(1)

Two renderings, chosen once per task:

- ``"terminal"``: a tqdm progress bar on stderr with counts, percentage, rate and time left
  (``pre-alignment: 43%|████▎     | 6/14 [00:12<00:16, 0.49pass/s]``). While the bar is shown, console log lines
  are written above it (``tqdm.contrib.logging``), so the bar is not torn; log files are left alone. When it ends
  one ``done`` line goes to the ``jisac`` logger so the log file records the stage too.
- ``"log"``: plain ``logging.getLogger("jisac").info`` lines with counts, rate and time left, rate-limited to one
  line per ``every_fraction`` of the total (10 %) or per ``every_seconds`` (30 s), whichever comes first, plus a
  final ``done`` line. For output that is not a terminal: CI, SLURM logs, ``cli.log``.
- ``"off"``: nothing (library use, tests of other modules).

``"auto"`` (the default) is ``"terminal"`` when stderr is a terminal, else ``"log"``. Force a mode for the whole
process with :func:`set_mode` or the environment variable ``JISAC_PROGRESS`` (``terminal``, ``log``, ``off``,
``auto``), or for one task with ``task(..., mode=...)``; tests give ``file=`` (terminal mode writes the bar there)
and ``clock=`` (a fake time source).

Why tqdm (rather than rich): it has no dependencies of its own, renders counts/rate/time left out of the box,
writes to any file object (so tests capture it), and ships the logging redirect that keeps log lines and a live bar
from overwriting each other; rich would bring markdown-it-py and pygments for the same bar.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from typing import Callable, Iterator, TextIO

log = logging.getLogger("jisac")

MODES = ("auto", "terminal", "log", "off")
ENV_VAR = "JISAC_PROGRESS"
_forced: str | None = None


def set_mode(mode: str | None) -> None:
    """Forces every later task into ``mode`` (one of :data:`MODES`); ``None`` restores the default (the
    environment variable ``JISAC_PROGRESS``, else ``"auto"``)."""
    global _forced
    if mode is not None and mode not in MODES:
        raise ValueError(f"progress mode {mode!r}: use one of {', '.join(MODES)}")
    _forced = mode


def resolve_mode(mode: str | None = None, file: TextIO | None = None) -> str:
    """The concrete mode (``terminal``, ``log`` or ``off``) for a task: the task's own ``mode``, else the forced
    one (:func:`set_mode`), else ``$JISAC_PROGRESS``, else ``auto`` (terminal iff ``file`` or stderr is a tty)."""
    chosen = mode or _forced or os.environ.get(ENV_VAR, "").strip().lower() or "auto"
    if chosen not in MODES:
        raise ValueError(f"{ENV_VAR}={chosen!r}: use one of {', '.join(MODES)}")
    if chosen != "auto":
        return chosen
    stream = file if file is not None else sys.stderr
    try:
        return "terminal" if stream.isatty() else "log"
    except (AttributeError, ValueError):  # a closed or file-like stream without isatty
        return "log"


def format_seconds(seconds: float) -> str:
    """``75.2 -> '1:15'``, ``3725 -> '1:02:05'``, ``8.4 -> '8 s'``; ``'?'`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    if seconds < 60:
        return f"{seconds:.0f} s"
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Task:
    """A running stage: :meth:`advance` it; read ``n``, ``total``, ``elapsed``, ``rate`` (units/s) and
    ``remaining`` (s, ``nan`` when unknown)."""

    def __init__(self, description: str, total: int | None, unit: str, mode: str, file: TextIO | None,
                 every_fraction: float, every_seconds: float, clock: Callable[[], float]):
        self.description, self.total, self.unit, self.mode = description, total, unit, mode
        self.n = 0
        self._clock = clock
        self._t0 = clock()
        self._every_fraction, self._every_seconds = every_fraction, every_seconds
        self._last_line_t = self._t0
        self._last_line_step = 0  # the last every_fraction step logged
        self._bar = None
        if mode == "terminal":
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=description, unit=unit, file=file if file is not None else sys.stderr,
                             dynamic_ncols=True, leave=True, mininterval=0.5)

    @property
    def elapsed(self) -> float:
        return self._clock() - self._t0

    @property
    def rate(self) -> float:
        t = self.elapsed
        return self.n / t if t > 0 else math.nan

    @property
    def remaining(self) -> float:
        if not self.total or self.n <= 0:
            return math.nan
        return max(self.total - self.n, 0) / self.rate if self.rate > 0 else math.nan

    def status(self) -> str:
        """One line: ``'pre-alignment: 6/14 pass (43 %), 0.49 pass/s, 16 s left'``."""
        count = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        share = f" ({100 * self.n / self.total:.0f} %)" if self.total else ""
        rate = f", {self.rate:.3g} {self.unit}/s" if math.isfinite(self.rate) else ""
        left = f", {format_seconds(self.remaining)} left" if math.isfinite(self.remaining) else ""
        return f"{self.description}: {count} {self.unit}{share}{rate}{left}"

    def set_total(self, total: int) -> None:
        """The number of units, once it is known (a task started with ``total=None``)."""
        self.total = total
        if self._bar is not None:
            self._bar.total = total
            self._bar.refresh()

    def advance(self, steps: int = 1) -> None:
        """Counts ``steps`` more units done."""
        self.n += steps
        if self._bar is not None:
            self._bar.update(steps)
        elif self.mode == "log":
            self._maybe_log()

    def _maybe_log(self) -> None:
        now = self._clock()
        due = now - self._last_line_t >= self._every_seconds
        if self.total:
            step = math.floor(self.n / self.total / self._every_fraction + 1e-9)
            due = due or step > self._last_line_step
        else:
            step = self._last_line_step
        if due and (not self.total or self.n < self.total):  # the final line is close()'s
            log.info("%s", self.status())
            self._last_line_t, self._last_line_step = now, step

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self.mode == "off":
            return
        rate = f" ({self.rate:.3g} {self.unit}/s)" if math.isfinite(self.rate) and self.n else ""
        count = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        log.info("%s: done, %s %s in %s%s", self.description, count, self.unit, format_seconds(self.elapsed), rate)


@contextlib.contextmanager
def task(description: str, total: int | None = None, *, unit: str = "it", mode: str | None = None,
         file: TextIO | None = None, every_fraction: float = 0.1, every_seconds: float = 30.0,
         clock: Callable[[], float] = time.monotonic) -> Iterator[Task]:
    """Shows the progress of one stage while the block runs (see the module docstring).

    description: what runs (``"pre-alignment"``); total: the number of units (``None``: unknown, counts only);
    unit: the unit's name (``"pass"``, ``"round"``); mode: ``auto``/``terminal``/``log``/``off`` for this task;
    file: where terminal mode draws the bar (stderr); every_fraction, every_seconds: log mode's rate limit;
    clock: seconds, monotonic (tests pass a fake one)."""
    concrete = resolve_mode(mode, file)
    t = Task(description, total, unit, concrete, file, every_fraction, every_seconds, clock)
    if concrete == "terminal" and file is None:
        # console log lines go above the bar instead of through it; file handlers are untouched
        from tqdm.contrib.logging import logging_redirect_tqdm

        redirect = logging_redirect_tqdm()
    else:
        redirect = contextlib.nullcontext()
    try:
        with redirect:
            yield t
    finally:
        t.close()


class StepBars:
    """Progress of ``events.Step``s (what ``isac.run_isac`` and ``prealign.prealign`` report): every step's message
    goes to the ``jisac`` logger, and each counted stage gets its own task (bar or log lines, as ``task``) that
    follows the step counts; a step of another stage, or a note (``total=None``), closes the open one (a stage may
    end before its ``total``: a generation that converges, a pre-alignment stage whose centres settle).

    Use it as a context manager (or call ``close``) so the last stage's task is closed."""

    def __init__(self, mode: str | None = None, file: TextIO | None = None):
        self.mode, self.file = mode, file
        self.stage: str | None = None
        self._context = None
        self._task: Task | None = None

    def __call__(self, step) -> None:
        log.info("%s", step.message)
        if step.stage != self.stage or step.total is None:
            self.close()
        if step.total is None:
            return
        if self._task is None:
            self.stage = step.stage
            self._context = task(step.stage, total=step.total, unit=step.unit, mode=self.mode, file=self.file)
            self._task = self._context.__enter__()
        self._task.advance(step.done - self._task.n)

    def close(self) -> None:
        if self._context is not None:
            self._context.__exit__(None, None, None)
        self._context, self._task, self.stage = None, None, None

    def __enter__(self) -> "StepBars":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
