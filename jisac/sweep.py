"""Workflow layer: Parameter sweeps: ``python -m jisac -m isac.img_per_grp=50,100,200 isac.thld_err=0.7,1.4`` runs every
combination (Hydra multirun) and ends with a summary of all runs in the sweep folder:

- ``sweep_summary.csv``: one row per run: the swept parameters, status (ok/failed + the one-line error), number of
  classes, accounted fraction, median pixel error, mean class size, wall time (s), preprocessing cache status,
  and the run's montage ``class_averages.png`` relative to the sweep folder;
- ``sweep_summary.md``: the same table, readable, with links to the montages;
- ``sweep_summary.png``: accounted fraction and class count against each swept parameter.

The sweep folder is ``output_dir`` (``hydra.sweep.dir``); each run writes into its own job folder inside it
(``hydra.sweep.subdir``, the job number). The summary is built only from the job folders (each job's
``.hydra/overrides.yaml``, ``summary.json`` and ``status.json``), so it works with any Hydra launcher (basic,
joblib, submitit) and can be rebuilt by hand: ``python -m jisac.sweep SWEEP_DIR``.

Inside a sweep, a run that fails (bad parameters for one combination, or an unexpected error) does not stop the
others: :class:`SweepJob` writes ``status.json`` (``status`` "failed", the one-line ``error``) into its job folder,
the traceback of an unexpected error goes to the job's log, and the run is a failed row of the summary.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np
from hydra.experimental.callback import Callback
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from jisac.io.atomic import atomic_path, write_json

log = logging.getLogger("jisac")

STATUS_FILE = "status.json"
CSV, MARKDOWN, PLOT = "sweep_summary.csv", "sweep_summary.md", "sweep_summary.png"
# Result columns after the swept parameters, in order (the CSV's header).
RESULT_COLUMNS = ["status", "error", "classes", "accounted_fraction", "median_pixel_error", "mean_class_size",
                  "wall_s", "cache", "montage"]


def _one_line(err: BaseException, with_type: bool) -> str:
    text = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {text}" if with_type or not text else text


class SweepJob:
    """One run of a sweep, seen from inside: records how it ended in ``<job folder>/status.json``."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.t0 = time.perf_counter()

    @classmethod
    def current(cls) -> "SweepJob | None":
        """The running Hydra multirun job, or ``None`` in a single run (or outside Hydra)."""
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
            return None
        return cls(HydraConfig.get().runtime.output_dir)

    def _write(self, **fields) -> None:
        write_json(self.folder / STATUS_FILE, {**fields, "seconds": round(time.perf_counter() - self.t0, 2)})

    def succeeded(self) -> None:
        self._write(status="ok", error="")

    def failed(self, err: BaseException, unexpected: bool = False) -> float:
        """Records the failure (one line; with the exception's type when ``unexpected``, whose traceback goes to
        the job's log) and returns NaN, the job's value for Hydra (a failed job must not raise: Hydra's basic
        sweeper would then stop before the summary is written)."""
        line = _one_line(err, with_type=unexpected)
        if unexpected:
            log.error("run failed: %s", line, exc_info=(type(err), err, err.__traceback__))
        else:
            log.error("run failed: %s", line)
        self._write(status="failed", error=line)
        return math.nan


def job_folders(sweep_dir: str | os.PathLike) -> list[Path]:
    """The job folders of a sweep: the folders below ``sweep_dir`` holding ``.hydra/overrides.yaml``, in job
    order (``hydra.job.num``; folder name when unknown)."""
    sweep_dir = Path(sweep_dir)
    found = []
    for root, dirs, _ in os.walk(sweep_dir):
        here = Path(root)
        if here != sweep_dir and (here / ".hydra" / "overrides.yaml").exists():
            found.append(here)
            dirs[:] = []  # a job's own folders (main001/, checkpoint/, ...) hold no jobs
        else:
            dirs[:] = [d for d in dirs if not d.startswith(".")]
    return sorted(found, key=lambda f: (_job_number(f), str(f)))


def _job_number(folder: Path) -> float:
    try:
        from omegaconf import OmegaConf

        return float(OmegaConf.load(folder / ".hydra" / "hydra.yaml").hydra.job.num)
    except Exception:  # an older or hand-made folder: order by name
        name = folder.name
        return float(name) if name.isdigit() else math.inf


def _overrides(folder: Path) -> dict[str, str]:
    from omegaconf import OmegaConf

    pairs = {}
    for item in OmegaConf.to_container(OmegaConf.load(folder / ".hydra" / "overrides.yaml")) or []:
        key, _, value = str(item).partition("=")
        # Hydra saves an interpolation given on the command line escaped (${a} as $\{a\}); show it as typed
        pairs[key.lstrip("+~")] = value.replace("\\{", "{").replace("\\}", "}")
    return pairs


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _row(folder: Path, sweep_dir: Path) -> dict:
    summary = _read_json(folder / "summary.json")
    status = _read_json(folder / STATUS_FILE)
    row = {"job": folder.relative_to(sweep_dir).as_posix()}
    if status is not None:  # written at the end of every sweep job: the latest attempt's word
        row["status"], row["error"] = status.get("status", "failed"), status.get("error", "")
    elif summary is not None:
        row["status"], row["error"] = "ok", ""
    else:
        row["status"], row["error"] = "incomplete", "no summary.json or status.json: still running, or killed"
    if row["status"] == "ok" and summary is not None:
        sizes = summary.get("class_sizes") or []
        row.update(
            classes=summary.get("classes"),
            accounted_fraction=summary.get("accounted_fraction"),
            median_pixel_error=summary.get("median_pixel_error"),
            mean_class_size=sum(sizes) / len(sizes) if sizes else None,
            cache=(summary.get("cache") or {}).get("status"),
        )
        row["wall_s"] = (summary.get("seconds") or {}).get("total")
    if status is not None and status.get("seconds") is not None:
        row["wall_s"] = status["seconds"]  # the whole job, failed ones included
    montage = folder / "class_averages.png"
    row["montage"] = montage.relative_to(sweep_dir).as_posix() if row["status"] == "ok" and montage.exists() else ""
    return row


def collect(sweep_dir: str | os.PathLike):
    """``(table, swept, common)``: a DataFrame with a row per job (columns ``job``, the swept parameters, then
    ``RESULT_COLUMNS``), the swept parameter names (overrides whose value differs between jobs), and the overrides
    common to all jobs (``{key: value}``)."""
    import pandas as pd

    sweep_dir = Path(sweep_dir)
    folders = job_folders(sweep_dir)
    overrides = [_overrides(f) for f in folders]
    keys = list(dict.fromkeys(k for o in overrides for k in o))
    swept = [k for k in keys if len({o.get(k) for o in overrides}) > 1]
    common = {k: overrides[0][k] for k in keys if k not in swept} if overrides else {}
    rows = []
    for folder, o in zip(folders, overrides):
        rows.append({"job": "", **{k: o.get(k, "") for k in swept}, **_row(folder, sweep_dir)})
    table = pd.DataFrame(rows, columns=["job", *swept, *RESULT_COLUMNS])
    table["classes"] = table["classes"].astype("Int64")  # a count, blank for failed runs (not 2.0)
    for k in swept:  # numbers as numbers (CSV readers and the plot)
        converted = pd.to_numeric(table[k], errors="coerce")
        if converted.notna().all():
            table[k] = converted
    return table, swept, common


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value).replace("|", "\\|")


def _markdown(table, swept: list[str], common: dict, sweep_dir: Path) -> str:
    ok = int((table["status"] == "ok").sum())
    lines = [f"# Sweep summary: {sweep_dir}", "",
             f"{len(table)} runs: {ok} ok, {len(table) - ok} failed or incomplete."]
    if common:
        lines.append("Common to all runs: " + ", ".join(f"`{k}={v}`" for k, v in common.items()) + ".")
    lines += ["", "Accounted fraction and class count against the swept parameters: `sweep_summary.png`.", ""]
    header = ["job", *swept, "status", "classes", "accounted", "median pixel error", "mean class size", "wall (s)",
              "cache", "montage"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, r in table.iterrows():
        status = r["status"] if r["status"] == "ok" else f"**{r['status']}**: {r['error']}"
        montage = f"[class_averages.png]({r['montage']})" if r["montage"] else ""
        accounted = "" if _cell(r["accounted_fraction"]) == "" else f"{100 * r['accounted_fraction']:.0f} %"
        cells = [r["job"], *(r[k] for k in swept), status, r["classes"], accounted, r["median_pixel_error"],
                 r["mean_class_size"], r["wall_s"], r["cache"], montage]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _plot(table, swept: list[str], path: Path) -> None:
    """Accounted fraction (top) and classes (bottom) against each swept parameter; one line per combination of
    the other swept parameters. Failed runs are left out (named in the title)."""
    ok = table[table["status"] == "ok"]
    axes_for = swept or ["job"]
    fig = Figure(figsize=(4.2 * len(axes_for), 5.6))
    axes = fig.subplots(2, len(axes_for), squeeze=False)
    for j, param in enumerate(axes_for):
        others = [k for k in swept if k != param]
        values = list(dict.fromkeys(table[param]))  # every value tried, failed runs' included
        numeric = all(isinstance(v, (int, float, np.number)) for v in values)
        position = (lambda v: v) if numeric else {v: i for i, v in enumerate(values)}.__getitem__
        groups = ok.groupby(others, sort=False) if others else [((), ok)]
        for label, group in groups:
            group = group.sort_values(param) if numeric else group
            x = [position(v) for v in group[param]]
            label = ", ".join(f"{k}={v}" for k, v in zip(others, label if isinstance(label, tuple) else (label,)))
            for i, (column, name) in enumerate((("accounted_fraction", "accounted fraction"), ("classes", "classes"))):
                axes[i, j].plot(x, group[column].astype(float), "o-", label=label or None)
                axes[i, j].set_ylabel(name)
        for i in range(2):
            axes[i, j].set_xlabel(param)
            axes[i, j].grid(alpha=0.3)
            if numeric:
                axes[i, j].set_xticks(sorted(values))
            else:
                axes[i, j].set_xticks(range(len(values)), [str(v) for v in values], rotation=30, fontsize=8)
        axes[1, j].yaxis.set_major_locator(MaxNLocator(integer=True))
        axes[0, j].set_ylim(-0.02, 1.02)
        if others:
            axes[0, j].legend(fontsize=7)
    failed = len(table) - len(ok)
    fig.suptitle(f"{len(ok)} of {len(table)} runs" + (f" ({failed} failed, not shown)" if failed else ""))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")


def write_summary(sweep_dir: str | os.PathLike):
    """Writes ``sweep_summary.csv``, ``.md`` and ``.png`` into ``sweep_dir`` (each atomically) and returns the
    table (see :func:`collect`). Raises ``FileNotFoundError`` when ``sweep_dir`` holds no job folder."""
    sweep_dir = Path(sweep_dir)
    table, swept, common = collect(sweep_dir)
    if table.empty:
        raise FileNotFoundError(f"{sweep_dir}: no sweep job folders (with .hydra/overrides.yaml) found")
    with atomic_path(sweep_dir / CSV) as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(sweep_dir / MARKDOWN) as tmp:
        tmp.write_text(_markdown(table, swept, common, sweep_dir))
    _plot(table, swept, sweep_dir / PLOT)
    return table


class SweepSummary(Callback):
    """Hydra callback (``hydra.callbacks`` in ``conf/config.yaml``): writes the sweep summary when a multirun ends.

    When a run failed, the process then exits with status 1 (Hydra's own convention for a sweep with a failed
    job), after every other run has finished and the summary is written."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            table = write_summary(sweep_dir)
        except Exception as err:  # the runs' own outputs stand; say why there is no summary
            print(f"jisac: could not write the sweep summary in {sweep_dir}: {_one_line(err, True)}", file=sys.stderr)
            traceback.print_exc()
            sys.exit(1)
        bad = table[table["status"] != "ok"]
        print(f"jisac: {len(table)} runs, {len(table) - len(bad)} ok, {len(bad)} failed: {sweep_dir / MARKDOWN}")
        if len(bad):
            for _, r in bad.iterrows():
                print(f"jisac: run {r['job']} {r['status']}: {r['error']}", file=sys.stderr)
            sys.exit(1)


def main(argv: list[str] | None = None) -> int:
    """``python -m jisac.sweep SWEEP_DIR``: (re)builds the summary of a sweep folder."""
    parser = argparse.ArgumentParser(prog="python -m jisac.sweep", description=main.__doc__)
    parser.add_argument("sweep_dir", help="the sweep folder (output_dir of `python -m jisac -m ...`)")
    args = parser.parse_args(argv)
    try:
        table = write_summary(args.sweep_dir)
    except (OSError, ValueError) as err:
        print(f"jisac.sweep: error: {err}", file=sys.stderr)
        return 2
    ok = int((table["status"] == "ok").sum())
    print(f"{len(table)} runs, {ok} ok, {len(table) - ok} failed: {Path(args.sweep_dir) / MARKDOWN}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
