"""Configuration layer: the Hydra schema (mutable dataclasses) and ``run_params``, the one conversion of a
composed configuration into the frozen parameters of a whole run. Nothing below ``jisac.run`` reads a config.

Defaults and names follow SPHIRE's ``sp_isac2.py`` in lower case (``shared/isac_algorithm.md`` §1); the schema's
defaults are read from the parameter objects (``isac.IsacParams``, ``polar.RingGeometry``, ...), never written
twice.
"""

from __future__ import annotations

import functools

from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional

from hydra.core.config_store import ConfigStore

from jisac import beautify, criteria, isac
from jisac.align import AlignOptions, SearchGrid
from jisac.budget import Budget, backend_preset
from jisac.devices import parse_device_ids
from jisac.errors import ConfigError
from jisac.polar import RingGeometry
from jisac.preprocess import PreprocessParams

_ISAC = isac.IsacParams()
_RINGS = RingGeometry()
_GRID = SearchGrid()


@dataclass
class IsacConfig:
    """ISAC parameters: SPHIRE's ``sp_isac2.py`` options in lower case, same defaults and meaning
    (``shared/isac_algorithm.md`` §1). Lengths are in the shrunken working frame unless stated."""

    radius: Optional[int] = None  # particle radius in pixels of the INPUT stack (required for a real stack)
    img_per_grp: int = _ISAC.img_per_grp  # K = floor(N / img_per_grp) classes per generation
    minimum_grp_size: Optional[int] = None  # accepted if stable members > this; default 60 % of img_per_grp
    ctf: bool = False  # phase-flip with the stack's CTF parameters
    vpp: bool = False  # phase-plate data: whiten with the mean rotational amplitude spectrum
    target_radius: int = _RINGS.last_ring  # particle radius after shrinking; also the outermost ring
    target_nx: int = _ISAC.target_nx  # working box size
    xr: float = _GRID.xr  # translational search half-range, px
    yr: float = -1.0  # y half-range; -1 means "same as xr"
    ts: float = _GRID.ts  # translational search step, px
    maxit: int = _ISAC.maxit  # passes of each reference-free within-group alignment
    center_method: int = -1  # centring of the pre-alignment average: -1 average shift (the one implemented)
    dst: float = _ISAC.dst  # coarse rotation step of early within-group passes, degrees
    fl: float = _ISAC.fl  # first low-pass cutoff of EQ-K-means averages, cycles/px
    fh: float = _ISAC.fh  # final cutoff; also of within-group and final averages
    ff: float = _ISAC.ff  # tanh fall-off
    init_iter: int = _ISAC.init_iter  # maximum SAC rounds per generation
    iter_reali: int = _ISAC.iter_reali  # stability test on rounds whose 0-based index is a multiple of this
    stab_ali: int = _ISAC.stab_ali  # independent alignments per class for the stability test
    thld_err: float = _ISAC.thld_err  # pixel-error threshold for "stable", working pixels
    rand_seed: int = 0  # every random choice derives from jax.random.key(rand_seed)
    skip_prealignment: bool = False
    restart: bool = True  # continue from the last finished generation found in output_dir
    main_iter_limit: int = _ISAC.main_iter_limit  # stop after this many generations (-1: until the pool is exhausted)
    matching: bool = _ISAC.matching  # ISAC 2012's matching phase: unaccounted particles join accepted classes
    # when both halves of the class agree (jisac.matching); off: ISAC2
    match_quantile: float = _ISAC.match_quantile  # ... and they match it at least as well as this share of its members
    wg_start: str = _ISAC.wg_start  # stability runs start from: random (ISAC2) or folds (each run its own fold's
    # average at the MRA parameters; jisac.isac.fold_references)
    wg_averages: str = _ISAC.wg_averages  # within-group passes' class averages: polar (from the members' cached
    # ring spectra, 2x faster on CPU) or image (SPHIRE's: every member transformed)
    unstable_references: str = _ISAC.unstable_references  # next round's reference of a class with < 5 stable
    # members: top_up (ISAC2: topped up with 5 random members) or members (all members, last stability run's params)
    next_references: str = _ISAC.next_references  # a later generation's first references: random (ISAC2: random
    # particles) or unaccepted (the last generation's unaccepted class averages, most stable members first)


@dataclass
class DataConfig:
    stack: Optional[str] = None  # STAR, MRCS/MRC, HDF or .cs; none: the built-in demo stack
    drop_unusable: bool = False  # leave out (unaccounted) particles with NaN/Inf pixels or no signal (empty,
    # constant) instead of stopping
    cache: bool = True  # reuse the working stack + pre-alignment of an earlier run on the same data (jisac.cache)
    cache_dir: Optional[str] = None  # the cache's folder; none: $XDG_CACHE_HOME/jisac/working (~/.cache/jisac/working)
    pixel_size: Optional[float] = None  # Angstrom/px; overrides the stack's (e.g. an MRC stack with 0 in its header)
    project_dir: Optional[str] = None  # cryoSPARC project folder against which a .cs file's blob paths resolve


@dataclass
class AlignConfig:
    """The polar alignment engine (``jisac.align``, ``jisac.polar``)."""

    first_ring: int = _RINGS.first_ring  # SPHIRE --ir
    ring_step: int = _RINGS.ring_step  # SPHIRE --rs
    n_angles: int = _RINGS.n_angles  # samples per ring (GPU ISAC)
    bandlimit: bool = _RINGS.bandlimit  # skip angular frequencies above ceil(pi r) + 1 on ring r
    # sphire: SPHIRE's power-of-two ring lengths (8 samples on ring 1 ... 256 from ring 21), 46 % fewer samples to
    # interpolate than constant (n_angles on every ring, GPU ISAC's layout and the library's default); the demo
    # gives the same classes either way, 23 % faster ISAC (docs/benchmarks.md)
    ring_lengths: str = _ISAC.align.geometry.ring_lengths
    # Preferred chunk sizes; null: the preset of the backend the run is on (budget.BACKEND_PRESETS, the fastest
    # measured with benchmarks/bench_chunks.py). hardware.memory_budget_mb lowers them when needed.
    particle_batch: Optional[int] = None  # particles per inner step inside one jitted call
    reference_chunk: Optional[int] = None  # references per inner step
    particle_chunk: Optional[int] = None  # particles per jitted call and device (host side)


ALIGN_CHUNK_SIZES = ("particle_batch", "reference_chunk", "particle_chunk")


@dataclass
class HardwareConfig:
    """Where the work runs (``jisac.devices``, ``jisac.budget``): devices, memory budgets, several processes."""

    devices: Any = "all"  # "all" or a list of device ids as in jax.devices(), e.g. [0,1] (GPU ISAC's --gpu_devices)
    # per device: sets every chunk size; null: the backend's preset (CPU 1024, GPU 4096)
    memory_budget_mb: Optional[int] = None
    host_memory_budget_mb: int = 8192  # per process: a working stack above half of it stays on disk (read by rows)
    distributed: str = "auto"  # auto|true|false: jax.distributed.initialize() (auto: under SLURM / Open MPI)
    coordinator_address: Optional[str] = None  # host:port of process 0 (else detected from SLURM / Open MPI)
    num_processes: Optional[int] = None
    process_id: Optional[int] = None
    compilation_cache: bool = True  # keep compiled XLA programs in ~/.cache/jisac/xla: a second run compiles nothing


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
    (``jisac.stability``). ``stability=pixel_error`` (default, ISAC2), ``stability=reproducibility`` (ISAC 2012),
    ``stability=resolution`` or ``stability=consensus`` (new); each option node below adds its criterion's own
    typed options."""

    name: str = "pixel_error"
    max_iter: int = 50  # L-BFGS iterations of the pixel-error corrections

    def options(self, p: isac.IsacParams) -> dict:
        """The criterion's own options (``criteria.make_criterion``'s keywords)."""
        return {"max_iter": self.max_iter}


@dataclass
class ReproducibilityConfig(StabilityConfig):
    """``stability=reproducibility``: ISAC 2012's reproducible membership, adapted to one SAC round."""

    name: str = "reproducibility"
    min_fraction: float = 1.0  # fraction of the stab_ali runs that must put a member back in its class
    within_class: bool = True  # also require ISAC2's pixel error < isac.thld_err (as the 2012 program did)

    def options(self, p: isac.IsacParams) -> dict:
        # the same polar search as the SAC rounds' multi-reference alignment
        return dict(super().options(p), min_fraction=self.min_fraction, within_class=self.within_class,
                    options=p.align, lowpass=(p.fh, p.ff))


@dataclass
class ResolutionConfig(StabilityConfig):
    """``stability=resolution``: pixel error below ``fraction`` of the class's FRC resolution length."""

    name: str = "resolution"
    fraction: float = 0.3  # allowed pixel error in units of 1 / (class resolution in cycles/px)
    max_error: float = 3.0  # never accept a pixel error above this, px (the lower bound is isac.thld_err)
    frc_threshold: float = 0.5  # split-half FRC level that defines a class's resolution

    def options(self, p: isac.IsacParams) -> dict:
        return dict(super().options(p), fraction=self.fraction, max_error=self.max_error,
                    frc_threshold=self.frc_threshold)


@dataclass
class ConsensusConfig(StabilityConfig):
    """``stability=consensus``: ISAC2's pixel-error test on the largest agreeing subset of the stab_ali runs."""

    name: str = "consensus"
    # fewest of the isac.stab_ali within-group runs that must agree (stab_ali: ISAC2's test); unset: 3, or stab_ali
    # when fewer runs are made (so that preset=lowsnr isac.stab_ali=2 runs)
    min_runs: Optional[int] = None
    per_member: bool = False  # also stable: a member whose own min_runs of the runs agree on it (one common frame)

    def options(self, p: isac.IsacParams) -> dict:
        min_runs = min(3, p.stab_ali) if self.min_runs is None else self.min_runs
        if not 2 <= min_runs <= p.stab_ali:
            raise ValueError(f"stability.min_runs={min_runs} must be between 2 and isac.stab_ali ({p.stab_ali})")
        return dict(super().options(p), min_runs=min_runs, per_member=self.per_member)


_BEAUTIFY = beautify.BeautifyParams(radius_px=1.0)


@dataclass
class BeautifyConfig:
    """The beautifier (``jisac.beautify``): full-size, CTF-corrected class averages and a resolution per class.
    Runs at the end of every ISAC run when ``enabled``; ``python -m jisac beautify.run_dir=ISAC/run1`` runs it alone
    on a finished run folder."""

    enabled: bool = True  # at the end of python -m jisac (a few seconds next to the ISAC run)
    run_dir: Optional[str] = None  # beautify this finished run folder instead of running ISAC
    stack: Optional[str] = None  # the run's original stack; none: the one its summary.json names
    out_dir: Optional[str] = None  # none: <run>/beautify
    radius_px: Optional[float] = None  # particle radius, input px; none: the run's isac.radius
    # auto: wiener when the run used the CTF (isac.ctf=true), none otherwise | wiener (split-half SSNR Wiener
    # filter) | flip (phase flip only) | none
    ctf: str = "auto"
    local_refinement: bool = _BEAUTIFY.local_refinement  # refine each member's angle and shift at full size
    refine_angle_range_deg: float = _BEAUTIFY.refine_angle_range_deg
    refine_angle_step_deg: float = _BEAUTIFY.refine_angle_step_deg
    refine_shift_range_px: int = _BEAUTIFY.refine_shift_range_px
    refine_iterations: int = _BEAUTIFY.refine_iterations
    sharpen: str = _BEAUTIFY.sharpen  # none | guinier | bfactor | model
    b_factor: float = _BEAUTIFY.b_factor  # A^2, with sharpen=bfactor (positive sharpens)
    guinier_start_angst: float = _BEAUTIFY.guinier_start_angst
    lowpass: str = str(_BEAUTIFY.lowpass)  # none | resolution | a frequency in cycles/px
    chunk: int = _BEAUTIFY.chunk  # members per jitted call
    frc_threshold: float = _BEAUTIFY.frc_threshold


def beautify_params(cfg: "JisacConfig", radius_px: float, run_used_ctf: bool) -> beautify.BeautifyParams:
    """The beautifier's frozen parameters (``beautify.radius_px`` overrides the run's radius; ``beautify.ctf=auto``
    follows whether the run used the CTF)."""
    b = cfg.beautify
    names = set(beautify.BeautifyParams._fields) & {f for f in BeautifyConfig.__dataclass_fields__}
    values = {name: getattr(b, name) for name in names if name != "radius_px"}
    if values["ctf"] == "auto":
        values["ctf"] = "wiener" if run_used_ctf else "none"
    return beautify.BeautifyParams(radius_px=float(b.radius_px or radius_px), **values)


@dataclass
class JisacConfig:
    output_dir: str = "outputs/${now:%Y-%m-%d}/${now:%H-%M-%S}"  # results and the run log
    stability: StabilityConfig = field(default_factory=StabilityConfig)
    data: DataConfig = field(default_factory=DataConfig)
    isac: IsacConfig = field(default_factory=IsacConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    beautify: BeautifyConfig = field(default_factory=BeautifyConfig)


def register() -> None:
    """Registers the schema so ``conf/config.yaml`` can extend it (type-checked overrides)."""
    store = ConfigStore.instance()
    store.store(name="jisac_schema", node=JisacConfig)
    store.store(group="stability", name="pixel_error", node=StabilityConfig(name="pixel_error"))
    store.store(group="stability", name="reproducibility", node=ReproducibilityConfig())
    store.store(group="stability", name="resolution", node=ResolutionConfig())
    store.store(group="stability", name="consensus", node=ConsensusConfig())


# ------------------------------------------------------------------------------------------ the conversion


class RunParams(NamedTuple):
    """The frozen parameters of a whole run, made once from the configuration by ``run_params``.

    Attributes:
        isac: ISAC's parameters, with the ``AlignOptions`` of every alignment of the run.
        preprocess: the working-stack preparation (radius in input pixels, shrink, CTF).
        budget: memory budgets and preferred chunk sizes (``budget.plan`` sets each generation's sizes).
        criterion: the stability criterion (``criteria.make_criterion``).
        seed: ``isac.rand_seed``.
        restart, skip_prealignment: ``isac.restart``, ``isac.skip_prealignment``.
        drop_unusable, cache, cache_dir: the ``data.*`` keys of the same names.
        beautify: the beautifier's parameters when ``beautify.enabled`` (and the box is known), else None.
    """

    isac: isac.IsacParams
    preprocess: PreprocessParams
    budget: Budget
    criterion: Any
    seed: int = 0
    restart: bool = True
    skip_prealignment: bool = False
    drop_unusable: bool = False
    cache: bool = True
    cache_dir: Optional[str] = None
    beautify: Optional[beautify.BeautifyParams] = None


def _require_positive(section: str, values: dict) -> None:
    """Stops with one line naming ``section.name`` for the first value below 1."""
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{section}.{name} must be >= 1 (got {value})")


def _config_errors(convert):
    """``convert`` with the parameter objects' own ``ValueError`` (which names the option) turned into
    ``ConfigError``: a bad option is an input error, shown as one line."""

    @functools.wraps(convert)
    def checked(*args, **kwargs):
        try:
            return convert(*args, **kwargs)
        except ConfigError:
            raise
        except ValueError as err:
            raise ConfigError(str(err)) from None

    return checked


@_config_errors
def isac_params(cfg: JisacConfig, n_particles: int | None = None) -> isac.IsacParams:
    """The validated ``IsacParams`` of ``cfg`` (``isac.*`` and ``align``'s rings); ``ConfigError`` names the
    option. Part of ``run_params``; on its own for callers that have no stack yet."""
    c, a = cfg.isac, cfg.align
    if c.center_method != -1:
        raise ValueError(f"isac.center_method={c.center_method}: only -1 (average shift) is implemented")
    geometry = RingGeometry(a.first_ring, c.target_radius, a.ring_step, a.n_angles, a.bandlimit, a.ring_lengths)
    try:
        geometry.validate(box_size=c.target_nx)
    except ValueError as err:
        raise ValueError(f"isac.target_radius/align.*: {err}") from None
    grid = SearchGrid(xr=c.xr, yr=c.xr if c.yr < 0 else c.yr, ts=c.ts)
    try:
        grid.validate()
    except ValueError as err:
        raise ValueError(f"isac.xr/yr/ts: {err}") from None
    minimum = c.minimum_grp_size if c.minimum_grp_size is not None else int(0.6 * c.img_per_grp)
    p = isac.IsacParams(
        img_per_grp=c.img_per_grp, minimum_grp_size=minimum, target_nx=c.target_nx, maxit=c.maxit, dst=c.dst,
        fl=c.fl, fh=c.fh, ff=c.ff, init_iter=c.init_iter, iter_reali=c.iter_reali, stab_ali=c.stab_ali,
        thld_err=c.thld_err, main_iter_limit=c.main_iter_limit, matching=c.matching,
        match_quantile=c.match_quantile, wg_start=c.wg_start, wg_averages=c.wg_averages,
        unstable_references=c.unstable_references, next_references=c.next_references,
        align=AlignOptions(geometry=geometry, grid=grid),
    )
    p.validate(n_particles)
    return p


def budget(cfg: JisacConfig, platform: str | None = None) -> Budget:
    """The ``budget.Budget`` of ``cfg.hardware`` and ``cfg.align``'s preferred chunk sizes; a size left null
    is the preset of ``platform`` (default: JAX's default backend). ``ValueError`` names a size below 1."""
    sizes = {name: backend_preset(name, platform) if getattr(cfg.align, name) is None else getattr(cfg.align, name)
             for name in ALIGN_CHUNK_SIZES}
    _require_positive("align", sizes)
    hw = cfg.hardware
    mb = backend_preset("memory_budget_mb", platform) if hw.memory_budget_mb is None else hw.memory_budget_mb
    _require_positive("hardware", {"memory_budget_mb": mb, "host_memory_budget_mb": hw.host_memory_budget_mb})
    parse_device_ids(hw.devices)
    return Budget(mb << 20, hw.host_memory_budget_mb << 20, **sizes)


@_config_errors
def run_params(cfg: JisacConfig, n_particles: int | None = None, box_size: int | None = None,
               platform: str | None = None) -> RunParams:
    """The one conversion: a composed configuration (and the input stack's particle count and box, when known)
    -> the frozen ``RunParams`` of the run. Every option is checked here, before any heavy work; a bad one raises
    ``ConfigError`` (an ``InputError``) naming it (``isac.radius`` is required once a box is given)."""
    p = isac_params(cfg, n_particles)
    radius = cfg.isac.radius
    if box_size is not None:
        if radius is None:
            raise ValueError("isac.radius is required: the particle radius in pixels of the input stack")
        if radius < 1 or radius > box_size // 2:
            raise ValueError(f"isac.radius={radius} must be between 1 and half the box ({box_size // 2} px)")
    prep = PreprocessParams(radius or p.target_radius, p.target_radius, p.target_nx, cfg.isac.ctf, cfg.isac.vpp)
    if box_size is not None:
        prep.validate(box_size)
    s = cfg.stability
    criterion = criteria.make_criterion(s.name, p.thld_err, float(p.target_radius), **s.options(p))
    polish = None
    if cfg.beautify.enabled and box_size is not None:
        polish = beautify_params(cfg, prep.radius, prep.ctf)
        polish.validate(box_size)
    return RunParams(
        isac=p, preprocess=prep, budget=budget(cfg, platform), criterion=criterion, seed=cfg.isac.rand_seed,
        restart=cfg.isac.restart, skip_prealignment=cfg.isac.skip_prealignment,
        drop_unusable=cfg.data.drop_unusable, cache=cfg.data.cache, cache_dir=cfg.data.cache_dir, beautify=polish,
    )
