"""Interface layer: the command line, ``python -m jisac [key=value ...]`` (Hydra): builds the configuration, calls
the library, and turns what can go wrong into what a user can act on.

- Input errors (``errors.InputError``: a file, an option, an output folder) print one line and exit with 2.
- A full disk or another I/O failure prints one line saying what to free or fix and that the same command
  continues from the last finished generation (exit 2).
- SIGTERM (SLURM's time limit) and SIGINT (Ctrl-C) stop the run; the checkpoint of the last finished generation is
  intact and a line says how to continue (exit 143 / 130).
- Anything else is a bug in jisac: its traceback, then a line asking to report it (exit 1).

``output_dir`` is checked before Hydra creates it (``preflight``), so an unusable folder is one line too.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
import traceback
from pathlib import Path

import hydra
from omegaconf import OmegaConf

from jisac import checkpoint, config, devices
from jisac.demo import run_alignment_demo
from jisac.errors import ConfigError, InputError
from jisac.run import beautify_existing, run
from jisac.sweep import SweepJob

config.register()
log = logging.getLogger("jisac")

# The design keeps configuration in the top-level conf/ folder of the checkout (installed with `pip install -e .`).
# An absolute path, because Hydra resolves relative paths as Python packages when run with `python -m`.
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


DEMO_INIT_ITER = 3  # SAC rounds per generation in the demo unless isac.init_iter is given (ISAC's default: 7)


def _demo_schedule(typed: config.JisacConfig) -> None:
    """The demo runs 3 SAC rounds per generation (not 7) so it ends in minutes on a laptop CPU; an explicit
    ``isac.init_iter=...`` on the command line wins."""
    from hydra.core.hydra_config import HydraConfig

    given = {o.split("=")[0].lstrip("+~") for o in HydraConfig.get().overrides.task}
    if "isac.init_iter" not in given:
        typed.isac.init_iter = DEMO_INIT_ITER
        log.info("demo: isac.init_iter=%d (ISAC's default is 7; set it to override)", DEMO_INIT_ITER)


class Stopped(BaseException):
    """SIGTERM arrived: unwinds the run like Ctrl-C does (``BaseException``, so no ``except Exception`` stops it)."""


def _on_sigterm(signum, frame):
    raise Stopped()


def _output_dir_override(argv: list[str]) -> str | None:
    """The ``output_dir=`` value on the command line, unless it is a sweep list or an interpolation."""
    for arg in argv:
        key, _, value = arg.partition("=")
        if key.lstrip("+~") == "output_dir" and value and "," not in value and "$" not in value:
            return value
    return None


def preflight(argv: list[str]) -> None:
    """Checks ``output_dir`` before Hydra creates it (Hydra would fail with a traceback): exits with one line."""
    value = _output_dir_override(argv)
    if value is None:
        return
    try:
        checkpoint.prepare_output_dir(Path(value))
    except InputError as err:
        print(f"jisac: error: {err}", file=sys.stderr)
        sys.exit(2)


def failure(err: BaseException, output_dir: str | None) -> int:
    """Prints what a user needs to know about ``err`` and returns the exit status (module docstring)."""
    if isinstance(err, InputError):
        log.error("%s", err)
        print(f"jisac: error: {err}", file=sys.stderr)
        return 2
    generation = checkpoint.last_generation(Path(output_dir)) if output_dir else None
    resume = (f"the checkpoint of generation {generation} in {output_dir}/checkpoint is intact: run the same "
              "command again to continue from there" if generation else "run the same command again to start over")
    if isinstance(err, (Stopped, KeyboardInterrupt)):
        name = "SIGTERM" if isinstance(err, Stopped) else "Ctrl-C (SIGINT)"
        line = f"jisac: stopped by {name}; {resume}"
        log.warning("%s", line)
        print(line, file=sys.stderr)
        return 143 if isinstance(err, Stopped) else 130
    if isinstance(err, OSError) and err.filename is not None:
        what = "disk full" if err.errno == errno.ENOSPC else (err.strerror or str(err))
        line = f"jisac: error: {what} while writing {err.filename}; free space or fix the folder, then {resume}"
        log.error("%s", line)
        print(line, file=sys.stderr)
        return 2
    traceback.print_exception(err)
    line = ("jisac: internal error (a bug in jisac, not in your input): please report it with the traceback above "
            "and the command you ran")
    log.error("%s: %s", line, err)
    print(line, file=sys.stderr)
    return 1


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _hydra_main(cfg) -> float:
    job = SweepJob.current()  # None in a single run
    output_dir = None
    try:
        typed: config.JisacConfig = OmegaConf.to_object(cfg)
        if job is not None:  # output_dir names the sweep folder; each run writes into its own job folder there
            typed.output_dir = str(job.folder)
        output_dir = typed.output_dir
        try:
            devices.setup(typed.hardware)  # before any JAX computation: devices, jax.distributed
        except ValueError as err:  # hardware.* options
            raise ConfigError(str(err)) from None
        if typed.demo.kind not in ("isac", "alignment"):
            raise ConfigError(f"demo.kind must be 'isac' or 'alignment' (got {typed.demo.kind!r})")
        if typed.beautify.run_dir is not None:  # the beautifier alone, on a finished run
            beautify_existing(typed)
            return 0.0
        if typed.data.stack is None and typed.demo.kind == "alignment":
            return run_alignment_demo(typed)["view_accuracy"]
        if typed.data.stack is None:
            _demo_schedule(typed)
        summary = run(typed)
    except InputError as err:
        if job is not None:  # in a sweep: a failed row, and the other runs go on
            return job.failed(err)
        sys.exit(failure(err, output_dir))
    except Exception as err:
        if job is not None:
            return job.failed(err, unexpected=not (isinstance(err, OSError) and err.filename))
        sys.exit(failure(err, output_dir))
    except (Stopped, KeyboardInterrupt) as err:
        sys.exit(failure(err, output_dir))
    if job is not None:
        job.succeeded()
    return summary["accounted_fraction"]


def exit_now() -> None:
    """Ends the ``python -m jisac`` process after a run that returned normally, without JAX's exit handler.

    That handler (``jax._src.api.clean_up``) clears every compiled program and backend one by one, then Python
    frees each live object: 0.7 s of a warm demo run on a 2-core CPU (1 s under load), in a process that is
    ending anyway. The outputs are already written (each renamed into place), the logs are flushed and closed
    here, and a multi-process run is shut down first (``jax.distributed.shutdown``, a no-op otherwise). Only
    ``python -m jisac`` calls this; library users and tests keep Python's normal exit, and so does a sweep
    (``-m``: a launcher's worker processes are stopped by its own exit handlers)."""
    if any(arg in ("-m", "--multirun") for arg in sys.argv[1:]):
        return
    import jax

    jax.distributed.shutdown()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main() -> None:
    """``python -m jisac``: checks ``output_dir``, lets SIGTERM stop the run cleanly, then runs Hydra."""
    preflight(sys.argv[1:])
    signal.signal(signal.SIGTERM, _on_sigterm)
    _hydra_main()
