"""jisac.progress: a tqdm bar in a terminal, rate-limited log lines elsewhere."""

import io
import logging
import re

import pytest

from jisac import progress


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def _messages(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "jisac"]


def test_log_mode_lines_every_10_percent_with_counts_rate_and_time_left(caplog):
    clock = FakeClock()
    with caplog.at_level(logging.INFO, logger="jisac"):
        with progress.task("pre-alignment", total=20, unit="pass", mode="log", clock=clock) as bar:
            for _ in range(20):
                clock.t += 2.0  # 0.5 pass/s
                bar.advance(1)
    lines = _messages(caplog)
    # one line per 10 % (2, 4, ..., 18 of 20) and the final done line; 100 % is the done line's
    assert len(lines) == 10, lines
    assert lines[0] == "pre-alignment: 2/20 pass (10 %), 0.5 pass/s, 36 s left"
    assert lines[4] == "pre-alignment: 10/20 pass (50 %), 0.5 pass/s, 20 s left"
    assert lines[-1] == "pre-alignment: done, 20/20 pass in 40 s (0.5 pass/s)"


def test_log_mode_rate_limited_by_time_when_steps_are_fine(caplog):
    """1000 small steps, 0.1 s each: 10 % lines (every 10 s) and nothing in between; with a 30 s limit and a
    slow task (1 % per 60 s) every step is logged."""
    clock = FakeClock()
    with caplog.at_level(logging.INFO, logger="jisac"):
        with progress.task("MRA", total=1000, mode="log", clock=clock) as bar:
            for _ in range(1000):
                clock.t += 0.1
                bar.advance()
    assert len(_messages(caplog)) == 10
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="jisac"):
        with progress.task("slow", total=100, mode="log", every_seconds=30, clock=clock) as bar:
            for _ in range(3):
                clock.t += 60
                bar.advance()
    lines = _messages(caplog)
    assert [line.split(":")[1].split()[0] for line in lines[:3]] == ["1/100", "2/100", "3/100"]
    assert "1:37:00 left" in lines[2]  # 97 steps at 60 s


def test_log_mode_unknown_total_counts_only(caplog):
    clock = FakeClock()
    with caplog.at_level(logging.INFO, logger="jisac"):
        with progress.task("generations", mode="log", unit="generation", clock=clock) as bar:
            clock.t += 40
            bar.advance()
    assert _messages(caplog) == ["generations: 1 generation, 0.025 generation/s",
                                 "generations: done, 1 generation in 40 s (0.025 generation/s)"]


def test_terminal_mode_draws_a_bar_with_counts_rate_and_time_left(caplog):
    out = io.StringIO()
    with caplog.at_level(logging.INFO, logger="jisac"):
        with progress.task("SAC rounds", total=4, unit="round", mode="terminal", file=out) as bar:
            for _ in range(4):
                bar.advance(1)
    text = out.getvalue()
    assert "SAC rounds" in text
    assert "4/4" in text and "100%" in text
    assert re.search(r"\d\d:\d\d<\d\d:\d\d", text)  # elapsed<time left
    assert re.search(r"round/s|s/round", text)  # rate
    # no per-step log lines in terminal mode, only the done line for the log file
    lines = _messages(caplog)
    assert len(lines) == 1 and lines[0].startswith("SAC rounds: done, 4/4 round in")


def test_off_mode_is_silent(caplog):
    out = io.StringIO()
    with caplog.at_level(logging.INFO, logger="jisac"):
        with progress.task("x", total=3, mode="off", file=out) as bar:
            bar.advance(3)
    assert out.getvalue() == "" and _messages(caplog) == []
    assert bar.n == 3


def test_mode_resolution(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv(progress.ENV_VAR, raising=False)
    assert progress.resolve_mode(None, io.StringIO()) == "log"
    assert progress.resolve_mode(None, Tty()) == "terminal"
    monkeypatch.setenv(progress.ENV_VAR, "log")
    assert progress.resolve_mode(None, Tty()) == "log"
    progress.set_mode("terminal")
    try:
        assert progress.resolve_mode(None, io.StringIO()) == "terminal"
        assert progress.resolve_mode("off", io.StringIO()) == "off"
    finally:
        progress.set_mode(None)
    with pytest.raises(ValueError, match="use one of"):
        progress.set_mode("fancy")
    monkeypatch.setenv(progress.ENV_VAR, "fancy")
    with pytest.raises(ValueError, match="JISAC_PROGRESS"):
        progress.resolve_mode()


def test_format_seconds():
    assert progress.format_seconds(8.4) == "8 s"
    assert progress.format_seconds(75.2) == "1:15"
    assert progress.format_seconds(3725) == "1:02:05"
    assert progress.format_seconds(float("nan")) == "?"


def test_the_generation_loop_shows_one_bar_per_generation(caplog):
    """progress.StepBars on the generation loop's steps: one task per generation whose units are its SAC steps,
    ended by the generation's closing note (also when it converged early); every step's line is still logged."""
    from jisac.events import Step, note

    progress.set_mode("log")
    try:
        with caplog.at_level("INFO", logger="jisac"), progress.StepBars() as bars:
            for g in (1, 2):
                bars(note(f"generation {g}: 400 particles in 2 classes"))
                stage = f"generation {g} (SAC steps)"
                for step in range(1, 6):
                    bars(Step(stage, step, 12, f"SAC round 1, MRA {step}/5 (cutoff 0.20): 400 particles"))
                bars(Step(stage, 6, 12, "SAC round 1: 390/400 particles stable in 2 classes"))
                bars(note(f"generation {g}: accepted 2/2 classes, 390 particles; accounted so far 390/400 (1 s)"))
        done = [r.getMessage() for r in caplog.records if ": done," in r.getMessage()]
        assert done[0].startswith("generation 1 (SAC steps): done, 6/12 step") and len(done) == 2
        assert sum("MRA 3/5" in r.getMessage() for r in caplog.records) == 2  # the loop's own lines are kept
    finally:
        progress.set_mode(None)


def test_pre_alignment_shows_one_bar_per_stage(caplog):
    """progress.StepBars on pre-alignment's steps: a task per search stage (total = its most passes), closed when
    the next stage starts or when the bars are closed; the pass lines themselves are still logged."""
    from jisac.events import Step

    progress.set_mode("log")
    try:
        with caplog.at_level("INFO", logger="jisac"):
            with progress.StepBars() as bars:
                for stage, passes in (("+-8 px step 2", 3), ("+-4 px step 1", 2)):
                    for k in range(1, passes + 1):
                        bars(Step(f"pre-alignment {stage}", k, 14, f"pre-alignment stage {stage}: pass {k}/14",
                                  unit="pass"))
        done = [r.getMessage() for r in caplog.records if ": done," in r.getMessage()]
        assert done == [d for d in done if "pre-alignment" in d] and len(done) == 2
        assert done[0].startswith("pre-alignment +-8 px step 2: done, 3/14 pass")
        assert done[1].startswith("pre-alignment +-4 px step 1: done, 2/14 pass")
    finally:
        progress.set_mode(None)


def test_the_loops_report_steps_with_counts():
    """The real emitters: a tiny ISAC generation reports its SAC steps as counted steps of one stage, in order,
    and str(step) is the log line."""
    import jax

    from jisac import isac
    from jisac.synthetic import known_view_particles

    parts, _ = known_view_particles(64, 76, 29, 2, 1.0)
    p = isac.make_params(img_per_grp=32, minimum_grp_size=10, init_iter=1, maxit=3)
    steps = []
    isac.run_generation(parts, jax.random.key(0), p, progress=steps.append, name="generation 1")
    counted = [s for s in steps if s.total is not None]
    assert [s.done for s in counted] == list(range(1, p.n_filter_steps + 2))
    assert {s.stage for s in counted} == {"generation 1 (SAC steps)"} and counted[0].total == p.n_filter_steps + 1
    assert str(counted[-1]).startswith("SAC round 1: ") and "stable" in str(counted[-1])
