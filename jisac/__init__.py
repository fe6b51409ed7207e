"""Interface layer: jisac, ISAC (Iterative Stable Alignment and Clustering) 2D classification for cryo-EM, in JAX.

For library users, ``jisac.classify`` runs ISAC on a prepared working stack and writes the output folder::

    import jisac
    from jisac import isac

    summary = jisac.classify(working_stack, isac.make_params(img_per_grp=100), "run1", seed=0)

The command line (``python -m jisac``) does the same from a particle stack, with pre-alignment and preparation.
"""

from __future__ import annotations

from pathlib import Path

from jisac import isac, pipeline
from jisac.io import outputs

__all__ = ["classify"]


def classify(images, params: isac.IsacParams, output_dir: str | Path, seed: int = 0, *, restart: bool = True,
             criterion=None, mesh=None, budget=None, data_id: str = "") -> dict:
    """Runs ISAC on a working stack and writes its output folder; returns the summary (also ``summary.json``).

    Args:
        images: ``(n, target_nx, target_nx)`` float32 working stack (normalised inside the particle radius, as
            ``jisac.preprocess.prepare_working_stack`` makes it; NumPy, a stack on disk or a lazy row view).
        params: ISAC's parameters (``isac.make_params(...)`` takes SPHIRE's option names).
        output_dir: the output folder (checkpoints, each generation's averages, the final files).
        seed: every random choice derives from ``jax.random.key(seed)``.
        restart: continue a run found in ``output_dir`` (same parameters, seed and ``data_id``).
        criterion: a ``jisac.criteria.Criterion`` (default ISAC2's pixel error).
        mesh: a one-axis device mesh (``jisac.sharding.data_mesh()``) to split the particles over devices.
        budget: ``jisac.budget.Budget`` (chunk sizes; never changes results).
        data_id: identifies the input in the run's fingerprint.
    """
    result = pipeline.classify(images, params, output_dir, seed=seed, data_id=data_id, restart=restart, mesh=mesh,
                               criterion=criterion, budget=budget)
    return outputs.write_run(Path(output_dir), result)
