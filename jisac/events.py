"""Data layer: what long loops report while they run: one ``Step`` per finished unit of work.

The algorithm loops (``isac.run_isac``, ``prealign.prealign``) call their ``progress`` callback with a ``Step``;
the interface (``progress.StepBars``) turns steps into progress bars and log lines. So a bar never has to parse
a log line, and a library caller gets the counts as numbers (``str(step)`` is the log line).
"""

from __future__ import annotations

from typing import NamedTuple


class Step(NamedTuple):
    """A unit of a long stage finished (or, with ``total=None``, a message that is not part of a counted stage).

    Attributes:
        stage: the counted stage this step belongs to (``"generation 2 (SAC steps)"``,
            ``"pre-alignment +-8 px step 2"``); a new name starts a new stage.
        done: units of the stage finished so far.
        total: the most units the stage can have (it may end sooner); ``None``: not a counted step.
        message: the log line of this step.
        unit: the unit's name (``"step"``, ``"pass"``).
    """

    stage: str
    done: int
    total: int | None
    message: str
    unit: str = "step"

    def __str__(self) -> str:
        return self.message


def note(message: str) -> Step:
    """A message outside any counted stage."""
    return Step("", 0, None, message)
