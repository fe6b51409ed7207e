"""Typed configuration: Hydra schemas (mutable dataclasses) and their conversion to the frozen, hashable
parameter values the JAX code takes. Nothing below ``jisac.cli`` reads a DictConfig.

Defaults and names follow SPHIRE's ``sp_isac2.py`` in lower case (``shared/isac_algorithm.md`` §1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

from jisac.align import AlignOptions, SearchGrid, chunk_sizes_for_budget
from jisac.polar import RingGeometry


@dataclass
class IsacConfig:
    """ISAC parameters: SPHIRE's ``sp_isac2.py`` options in lower case, same defaults and meaning
    (``shared/isac_algorithm.md`` §1). Lengths are in the shrunken working frame unless stated."""

    radius: Optional[int] = None  # particle radius in pixels of the INPUT stack (required for a real stack)
    img_per_grp: int = 200  # K = floor(N / img_per_grp) classes per generation
    minimum_grp_size: Optional[int] = None  # accepted if stable members > this; default 60 % of img_per_grp
    ctf: bool = False  # phase-flip with the stack's CTF parameters
    vpp: bool = False  # phase-plate data: whiten with the mean rotational amplitude spectrum
    target_radius: int = 29  # particle radius after shrinking; also the outermost ring
    target_nx: int = 76  # working box size
    xr: float = 1.0  # translational search half-range, px
    yr: float = -1.0  # y half-range; -1 means "same as xr"
    ts: float = 1.0  # translational search step, px
    maxit: int = 30  # passes of each reference-free within-group alignment
    center_method: int = -1  # centring of the pre-alignment average: -1 average shift (the one implemented)
    dst: float = 90.0  # coarse rotation step of early within-group passes, degrees
    fl: float = 0.2  # first low-pass cutoff of EQ-K-means averages, cycles/px
    fh: float = 0.45  # final cutoff; also of within-group and final averages
    ff: float = 0.2  # tanh fall-off
    init_iter: int = 7  # maximum SAC rounds per generation
    iter_reali: int = 1  # stability test on rounds whose 0-based index is a multiple of this
    stab_ali: int = 5  # independent alignments per class for the stability test
    thld_err: float = 0.7  # pixel-error threshold for "stable", working pixels
    rand_seed: int = 0  # every random choice derives from jax.random.key(rand_seed)
    skip_prealignment: bool = False
    restart: bool = True  # continue from the last finished generation found in output_dir
    main_iter_limit: int = -1  # stop after this many generations (-1: until the pool is exhausted)

    def params(self, n_particles: int | None = None):
        """Validated, frozen ``isac.IsacParams`` (raises ``ValueError`` naming the option)."""
        from jisac.isac import IsacParams

        minimum = self.minimum_grp_size if self.minimum_grp_size is not None else int(0.6 * self.img_per_grp)
        p = IsacParams(
            img_per_grp=self.img_per_grp,
            minimum_grp_size=minimum,
            target_radius=self.target_radius,
            target_nx=self.target_nx,
            xr=self.xr,
            yr=self.xr if self.yr < 0 else self.yr,
            ts=self.ts,
            maxit=self.maxit,
            dst=self.dst,
            fl=self.fl,
            fh=self.fh,
            ff=self.ff,
            init_iter=self.init_iter,
            iter_reali=self.iter_reali,
            stab_ali=self.stab_ali,
            thld_err=self.thld_err,
            main_iter_limit=self.main_iter_limit,
        )
        p.validate(n_particles)
        if self.center_method != -1:
            raise ValueError(f"isac.center_method={self.center_method}: only -1 (average shift) is implemented")
        return p


@dataclass
class DataConfig:
    stack: Optional[str] = None  # STAR, MRCS/MRC, HDF or .cs; none: the built-in demo stack
    drop_nonfinite: bool = False  # leave out (unaccounted) particles with NaN/Inf pixels instead of stopping
    cache: bool = True  # reuse the working stack + pre-alignment of an earlier run on the same data (jisac.cache)
    cache_dir: Optional[str] = None  # the cache's folder; none: $XDG_CACHE_HOME/jisac/working (~/.cache/jisac/working)


@dataclass
class AlignConfig:
    """The polar alignment engine (``jisac.align``, ``jisac.polar``)."""

    first_ring: int = 1  # SPHIRE --ir
    ring_step: int = 1  # SPHIRE --rs
    n_angles: int = 256  # samples per ring (GPU ISAC)
    bandlimit: bool = True  # skip angular frequencies above ceil(pi r) + 1 on ring r
    # Preferred chunk sizes; null: the preset of the backend the run is on (hardware.BACKEND_PRESETS, the fastest
    # measured with benchmarks/bench_chunks.py). hardware.memory_budget_mb lowers them when needed.
    particle_batch: Optional[int] = None  # particles per inner step inside one jitted call
    reference_chunk: Optional[int] = None  # references per inner step
    particle_chunk: Optional[int] = None  # particles per jitted call and device (host side)

    def chunk_sizes(self, platform: str | None = None) -> dict[str, int]:
        """``{name: size}`` for ``ALIGN_CHUNK_SIZES``: the value set, else the preset of ``platform`` (default:
        JAX's default backend). Raises ``ValueError`` naming the first one below 1."""
        from jisac.hardware import backend_preset

        sizes = {name: backend_preset(name, platform) if getattr(self, name) is None else getattr(self, name)
                 for name in ALIGN_CHUNK_SIZES}
        _require_positive("align", sizes)
        return sizes


ALIGN_CHUNK_SIZES = ("particle_batch", "reference_chunk", "particle_chunk")


def _require_positive(section: str, values: dict) -> None:
    """Stops with one line naming ``section.name`` for the first value below 1."""
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{section}.{name} must be >= 1 (got {value})")


@dataclass
class HardwareConfig:
    """Where the work runs (``jisac.hardware``): devices, memory budgets, several processes."""

    devices: Any = "all"  # "all" or a list of device ids as in jax.devices(), e.g. [0,1] (GPU ISAC's --gpu_devices)
    # per device: sets every chunk size; null: the backend's preset (CPU 1024, GPU 4096)
    memory_budget_mb: Optional[int] = None
    host_memory_budget_mb: int = 8192  # per process: a working stack above half of it stays on disk (read by rows)
    distributed: str = "auto"  # auto|true|false: jax.distributed.initialize() (auto: under SLURM / Open MPI)
    coordinator_address: Optional[str] = None  # host:port of process 0 (else detected from SLURM / Open MPI)
    num_processes: Optional[int] = None
    process_id: Optional[int] = None

    def budget(self, align: "AlignConfig"):
        """The ``hardware.Budget`` for these budgets and ``align``'s preferred chunk sizes (validated)."""
        from jisac.hardware import Budget, parse_device_ids

        sizes = align.chunk_sizes()
        parse_device_ids(self.devices)
        return Budget(self.device_budget_mb() << 20, self.host_memory_budget_mb << 20, **sizes)

    def device_budget_mb(self, platform: str | None = None) -> int:
        """``memory_budget_mb``, else the preset of ``platform`` (default: JAX's default backend); both
        budgets are checked (one line naming the parameter)."""
        from jisac.hardware import backend_preset

        mb = backend_preset("memory_budget_mb", platform) if self.memory_budget_mb is None else self.memory_budget_mb
        _require_positive("hardware", {"memory_budget_mb": mb, "host_memory_budget_mb": self.host_memory_budget_mb})
        return mb


@dataclass
class DemoConfig:
    """The built-in demo stack: noisy projections of a deterministic asymmetric phantom with known views."""

    kind: str = "isac"  # "isac": classify the demo stack; "alignment": align noisy views to the clean ones
    n_views: int = 4
    n_particles: int = 800  # 4 classes at ISAC's default img_per_grp (200): a few minutes on a 2-core CPU
    snr: float = 0.3  # signal variance / noise variance over the image (after the CTF)
    max_shift: float = 2.0  # particles are off-centre by up to this many pixels in x and y


@dataclass
class StabilityConfig:
    """The ``stability`` config group: which criterion decides that a class member is stable
    (``jisac.stability``). ``stability=pixel_error`` (default, ISAC2), ``stability=reproducibility`` (ISAC 2012)
    or ``stability=resolution`` (new); each option node below adds its criterion's own typed options."""

    name: str = "pixel_error"
    max_iter: int = 50  # L-BFGS iterations of the pixel-error corrections

    def _options(self, isac: IsacConfig) -> dict:
        return {"max_iter": self.max_iter}

    def criterion(self, isac: IsacConfig):
        from jisac import stability

        return stability.make_criterion(self.name, isac.thld_err, float(isac.target_radius), **self._options(isac))


@dataclass
class ReproducibilityConfig(StabilityConfig):
    """``stability=reproducibility``: ISAC 2012's reproducible membership, adapted to one SAC round."""

    name: str = "reproducibility"
    min_fraction: float = 1.0  # fraction of the stab_ali runs that must put a member back in its class
    within_class: bool = True  # also require ISAC2's pixel error < isac.thld_err (as the 2012 program did)

    def _options(self, isac: IsacConfig) -> dict:
        from jisac.isac import IsacParams

        # the same polar search as the SAC rounds' multi-reference alignment
        search = IsacParams(
            target_radius=isac.target_radius, target_nx=isac.target_nx, xr=isac.xr,
            yr=isac.xr if isac.yr < 0 else isac.yr, ts=isac.ts,
        ).align_options()
        return dict(super()._options(isac), min_fraction=self.min_fraction, within_class=self.within_class,
                    options=search, lowpass=(isac.fh, isac.ff))


@dataclass
class ResolutionConfig(StabilityConfig):
    """``stability=resolution``: pixel error below ``fraction`` of the class's FRC resolution length."""

    name: str = "resolution"
    fraction: float = 0.3  # allowed pixel error in units of 1 / (class resolution in cycles/px)
    max_error: float = 3.0  # never accept a pixel error above this, px (the lower bound is isac.thld_err)
    frc_threshold: float = 0.5  # split-half FRC level that defines a class's resolution

    def _options(self, isac: IsacConfig) -> dict:
        return dict(super()._options(isac), fraction=self.fraction, max_error=self.max_error,
                    frc_threshold=self.frc_threshold)


@dataclass
class JisacConfig:
    output_dir: str = "outputs/${now:%Y-%m-%d}/${now:%H-%M-%S}"  # results and the run log
    stability: StabilityConfig = field(default_factory=StabilityConfig)
    data: DataConfig = field(default_factory=DataConfig)
    isac: IsacConfig = field(default_factory=IsacConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)


def register() -> None:
    """Registers the schema so ``conf/config.yaml`` can extend it (type-checked overrides)."""
    store = ConfigStore.instance()
    store.store(name="jisac_schema", node=JisacConfig)
    store.store(group="stability", name="pixel_error", node=StabilityConfig(name="pixel_error"))
    store.store(group="stability", name="reproducibility", node=ReproducibilityConfig())
    store.store(group="stability", name="resolution", node=ResolutionConfig())


def align_options(isac: IsacConfig, align: AlignConfig, n_references: int | None = None,
                  memory_budget_mb: int | None = None) -> AlignOptions:
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
    sizes = align.chunk_sizes()
    memory_budget_mb = HardwareConfig(memory_budget_mb=memory_budget_mb).device_budget_mb()
    options = AlignOptions(
        geometry=geometry, grid=grid, particle_batch=sizes["particle_batch"], reference_chunk=sizes["reference_chunk"]
    )
    batch, chunk = chunk_sizes_for_budget(
        n_references or sizes["reference_chunk"], options, memory_budget_bytes=memory_budget_mb << 20
    )
    return options._replace(particle_batch=batch, reference_chunk=chunk)
