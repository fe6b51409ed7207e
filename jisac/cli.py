"""Interface layer: Command line: ``python -m jisac [key=value ...]`` (Hydra). Builds the config and calls the library."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import OmegaConf

from jisac import config, devices
from jisac.demo import run_alignment_demo
from jisac.run import run
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


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg) -> float:
    job = SweepJob.current()  # None in a single run
    try:
        typed: config.JisacConfig = OmegaConf.to_object(cfg)
        if job is not None:  # output_dir names the sweep folder; each run writes into its own job folder there
            typed.output_dir = str(job.folder)
        devices.setup(typed.hardware)  # before any JAX computation: devices, jax.distributed
        if typed.data.stack is None and typed.demo.kind == "alignment":
            return run_alignment_demo(typed)["view_accuracy"]
        if typed.demo.kind not in ("isac", "alignment"):
            raise ValueError(f"demo.kind must be 'isac' or 'alignment' (got {typed.demo.kind!r})")
        if typed.data.stack is None:
            _demo_schedule(typed)
        summary = run(typed)
    except (ValueError, FileNotFoundError) as err:
        if job is not None:  # in a sweep: a failed row, and the other runs go on
            return job.failed(err)
        log.error("%s", err)
        print(f"jisac: error: {err}", file=sys.stderr)
        sys.exit(2)
    except Exception as err:
        if job is None:
            raise
        return job.failed(err, unexpected=True)
    if job is not None:
        job.succeeded()
    return summary["accounted_fraction"]
