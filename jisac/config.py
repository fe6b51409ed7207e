"""Typed configuration: Hydra schemas (mutable dataclasses) and their conversion to the frozen, hashable
parameter values the JAX code takes. Nothing below ``jisac.cli`` reads a DictConfig.

Defaults and names follow SPHIRE's ``sp_isac2.py`` in lower case (``shared/isac_algorithm.md`` §1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from jisac.align import AlignOptions, SearchGrid, chunk_sizes_for_budget
from jisac.polar import RingGeometry


@dataclass
class IsacConfig:
    """ISAC parameters (SPHIRE names, lower case). Lengths are in the shrunken working frame."""

    target_radius: int = 29  # particle radius after shrinking; also the outermost ring (SPHIRE default)
    target_nx: int = 76  # working box size (SPHIRE default)
    xr: float = 1.0  # translational search half-range, px (SPHIRE --xr)
    yr: float = -1.0  # y half-range; -1 means "same as xr" (SPHIRE --yr)
    ts: float = 1.0  # translational search step, px (SPHIRE --ts)
    rand_seed: int = 0  # every random choice derives from jax.random.key(rand_seed)


@dataclass
class AlignConfig:
    """The polar alignment engine (``jisac.align``, ``jisac.polar``)."""

    first_ring: int = 1  # SPHIRE --ir
    ring_step: int = 1  # SPHIRE --rs
    n_angles: int = 256  # samples per ring (GPU ISAC)
    bandlimit: bool = True  # skip angular frequencies above ceil(pi r) + 1 on ring r
    particle_batch: int = 4  # particles per inner step inside one jitted call
    reference_chunk: int = 50  # references per inner step
    particle_chunk: int = 512  # particles per jitted call (host side)
    memory_budget_mb: int = 1024  # caps particle_batch x reference_chunk intermediates


@dataclass
class DemoConfig:
    """The built-in demonstration: synthetic projections of a phantom, aligned to its clean views."""

    n_views: int = 20
    n_particles: int = 2000
    snr: float = 0.1  # signal variance / noise variance over the image
    max_shift: float = 1.0  # particles are off-centre by up to this many pixels in x and y


@dataclass
class JisacConfig:
    output_dir: str = "outputs/${now:%Y-%m-%d}/${now:%H-%M-%S}"  # results and the run log
    isac: IsacConfig = field(default_factory=IsacConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)


def register() -> None:
    """Registers the schema so ``conf/config.yaml`` can extend it (type-checked overrides)."""
    ConfigStore.instance().store(name="jisac_schema", node=JisacConfig)


def align_options(isac: IsacConfig, align: AlignConfig, n_references: int | None = None) -> AlignOptions:
    """Validated ``AlignOptions`` for the multi-reference search. Raises ``ValueError`` naming the parameter."""
    geometry = RingGeometry(
        first_ring=align.first_ring,
        last_ring=isac.target_radius,
        ring_step=align.ring_step,
        n_angles=align.n_angles,
        bandlimit=align.bandlimit,
    )
    try:
        geometry.validate(box_size=isac.target_nx)
    except ValueError as err:
        raise ValueError(f"isac.target_radius/align.*: {err}") from None
    grid = SearchGrid(xr=isac.xr, yr=isac.xr if isac.yr < 0 else isac.yr, ts=isac.ts)
    try:
        grid.validate()
    except ValueError as err:
        raise ValueError(f"isac.xr/yr/ts: {err}") from None
    reach = geometry.last_ring + max(grid.xr, grid.yr) + 1
    if reach > isac.target_nx // 2:
        raise ValueError(
            f"isac.target_radius ({isac.target_radius}) + isac.xr/yr ({max(grid.xr, grid.yr)}) does not fit in "
            f"isac.target_nx ({isac.target_nx}): rings would leave the box; lower xr or target_radius"
        )
    for name in ("particle_batch", "reference_chunk", "particle_chunk", "memory_budget_mb"):
        if getattr(align, name) < 1:
            raise ValueError(f"align.{name} must be >= 1 (got {getattr(align, name)})")
    options = AlignOptions(
        geometry=geometry, grid=grid, particle_batch=align.particle_batch, reference_chunk=align.reference_chunk
    )
    batch, chunk = chunk_sizes_for_budget(
        n_references or align.reference_chunk, options, memory_budget_bytes=align.memory_budget_mb << 20
    )
    return options._replace(particle_batch=batch, reference_chunk=chunk)
