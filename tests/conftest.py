"""Shared fixtures: small synthetic data made once per session (tests make their own data)."""

import os

# The suite runs in two worker processes (pyproject's addopts): on a GPU machine they share the GPU, so neither
# may take JAX's default 75 % of its memory up front. Read when the backend starts, i.e. after this.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Two CPU devices for the whole session (must precede any JAX computation): single-device code runs on the
# first, sharded code on both (see jax_notes.md: the device count is fixed once the backend starts).
jax.config.update("jax_num_cpu_devices", 2)

from jisac import filters, synthetic


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Caches (the demo stack, the preprocessing cache) go to a temporary folder, not the user's ~/.cache;
    subprocesses inherit it through the environment."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg_cache")))
        yield


@pytest.fixture(scope="session")
def phantom():
    return synthetic.make_phantom(radius=25.0, seed=0)


@pytest.fixture(scope="session")
def projections50(phantom):
    """50 distinct views (Fibonacci hemisphere) of the phantom in a 76 px box, float32 ``(50, 76, 76)``,
    normalised inside ISAC's particle radius (29 px) as ISAC's working stack is."""
    rot, tilt = synthetic.hemisphere_directions(50)
    views = synthetic.project(phantom, synthetic.euler_to_matrix(rot, tilt, 0.0), 76)
    return np.asarray(filters.normalize_in_mask(views, filters.circular_mask(76, 76, 29)))


@pytest.fixture(scope="session")
def structured_image(projections50):
    """One asymmetric, structured 76 px image (a projection of the phantom)."""
    return projections50[7]
