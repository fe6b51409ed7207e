"""The one conversion from configuration to run parameters: every key reaches the parameter it names."""

import dataclasses

import pytest

from jisac import config

N, BOX = 1000, 128

# key -> (override value, where it lands in RunParams). Every key of the schema that the conversion reads must be
# here: the test below fails on a key that is missing, so a new key cannot be silently ignored again (as
# align.n_angles once was in an ISAC run).
REACHES = {
    "isac.radius": (40, lambda r: r.preprocess.radius),
    "isac.img_per_grp": (100, lambda r: r.isac.img_per_grp),
    "isac.minimum_grp_size": (50, lambda r: r.isac.minimum_grp_size),
    "isac.ctf": (True, lambda r: r.preprocess.ctf),
    "isac.vpp": (True, lambda r: r.preprocess.vpp),
    "isac.target_radius": (25, lambda r: (r.isac.target_radius, r.preprocess.target_radius)),
    "isac.target_nx": (80, lambda r: (r.isac.target_nx, r.preprocess.target_nx)),
    "isac.xr": (2.0, lambda r: (r.isac.align.grid.xr, r.isac.align.grid.yr)),
    "isac.yr": (2.0, lambda r: r.isac.align.grid.yr),
    "isac.ts": (0.5, lambda r: r.isac.align.grid.ts),
    "isac.maxit": (10, lambda r: r.isac.maxit),
    "isac.dst": (45.0, lambda r: r.isac.dst),
    "isac.fl": (0.1, lambda r: r.isac.fl),
    "isac.fh": (0.4, lambda r: r.isac.fh),
    "isac.ff": (0.1, lambda r: r.isac.ff),
    "isac.init_iter": (3, lambda r: r.isac.init_iter),
    "isac.iter_reali": (2, lambda r: r.isac.iter_reali),
    "isac.stab_ali": (3, lambda r: r.isac.stab_ali),
    "isac.thld_err": (1.5, lambda r: (r.isac.thld_err, r.criterion.score.keywords["threshold"])),
    "isac.rand_seed": (7, lambda r: r.seed),
    "isac.skip_prealignment": (True, lambda r: r.skip_prealignment),
    "isac.restart": (False, lambda r: r.restart),
    "isac.main_iter_limit": (2, lambda r: r.isac.main_iter_limit),
    "isac.matching": (True, lambda r: r.isac.matching),
    "isac.match_quantile": (0.3, lambda r: r.isac.match_quantile),
    "isac.wg_start": ("folds", lambda r: r.isac.wg_start),
    "isac.wg_averages": ("image", lambda r: r.isac.wg_averages),
    "isac.unstable_references": ("members", lambda r: r.isac.unstable_references),
    "isac.next_references": ("unaccepted", lambda r: r.isac.next_references),
    "align.first_ring": (2, lambda r: r.isac.align.geometry.first_ring),
    "align.ring_step": (2, lambda r: r.isac.align.geometry.ring_step),
    "align.n_angles": (128, lambda r: r.isac.align.geometry.n_angles),
    "align.bandlimit": (False, lambda r: r.isac.align.geometry.bandlimit),
    "align.ring_lengths": ("constant", lambda r: r.isac.align.geometry.ring_lengths),
    "align.particle_batch": (8, lambda r: r.budget.particle_batch),
    "align.reference_chunk": (20, lambda r: r.budget.reference_chunk),
    "align.particle_chunk": (64, lambda r: r.budget.particle_chunk),
    "hardware.memory_budget_mb": (300, lambda r: r.budget.device_bytes),
    "hardware.host_memory_budget_mb": (2048, lambda r: r.budget.host_bytes),
    "data.drop_unusable": (True, lambda r: r.drop_unusable),
    "data.cache": (False, lambda r: r.cache),
    "data.cache_dir": ("/tmp/elsewhere", lambda r: r.cache_dir),
    "stability.max_iter": (20, lambda r: r.criterion.score.keywords["max_iter"]),
    "beautify.enabled": (False, lambda r: r.beautify is None),
    "beautify.radius_px": (30.0, lambda r: r.beautify.radius_px),
    "beautify.ctf": ("flip", lambda r: r.beautify.ctf),  # auto: none here (isac.ctf=false)
    "beautify.local_refinement": (True, lambda r: r.beautify.local_refinement),
    "beautify.refine_angle_range_deg": (4.0, lambda r: r.beautify.refine_angle_range_deg),
    "beautify.refine_angle_step_deg": (1.0, lambda r: r.beautify.refine_angle_step_deg),
    "beautify.refine_shift_range_px": (3, lambda r: r.beautify.refine_shift_range_px),
    "beautify.refine_iterations": (1, lambda r: r.beautify.refine_iterations),
    "beautify.sharpen": ("guinier", lambda r: r.beautify.sharpen),
    "beautify.b_factor": (-50.0, lambda r: r.beautify.b_factor),
    "beautify.guinier_start_angst": (20.0, lambda r: r.beautify.guinier_start_angst),
    "beautify.lowpass": ("resolution", lambda r: r.beautify.lowpass),
    "beautify.chunk": (16, lambda r: r.beautify.chunk),
    "beautify.frc_threshold": (0.5, lambda r: r.beautify.frc_threshold),
}
# Keys read elsewhere, before or beside the conversion (where the run goes, which devices and processes, the demo).
NOT_RUN_PARAMETERS = {
    "output_dir", "isac.center_method", "data.stack", "data.pixel_size", "data.project_dir", "hardware.devices",
    "hardware.distributed", "hardware.compilation_cache",
    "hardware.coordinator_address", "hardware.num_processes", "hardware.process_id", "stability.name",
    "beautify.run_dir", "beautify.stack", "beautify.out_dir",
} | {f"demo.{f.name}" for f in dataclasses.fields(config.DemoConfig)}


def _keys(node, prefix=""):
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            yield from _keys(value, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name


def _with(cfg: config.JisacConfig, key: str, value) -> config.JisacConfig:
    section, name = key.split(".")
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{name: value})})


def _base() -> config.JisacConfig:
    return _with(config.JisacConfig(), "isac.radius", 50)


def test_every_key_is_accounted_for():
    assert set(_keys(config.JisacConfig())) == set(REACHES) | NOT_RUN_PARAMETERS


@pytest.mark.parametrize("key", sorted(REACHES))
def test_an_override_changes_the_parameter_it_names(key):
    value, where = REACHES[key]
    before = config.run_params(_base(), N, BOX, platform="cpu")
    after = config.run_params(_with(_base(), key, value), N, BOX, platform="cpu")
    assert where(after) != where(before), key
    # ... and nothing it does not name changes the ISAC parameters' alignment but the alignment keys
    if not key.startswith(("align.", "isac.target_radius", "isac.xr", "isac.yr", "isac.ts")):
        assert after.isac.align == before.isac.align, key


def test_schema_defaults_are_the_parameter_objects_defaults():
    from jisac import isac

    defaults = config.run_params(_base(), N, BOX, platform="cpu").isac
    assert defaults._replace(minimum_grp_size=60) == isac.IsacParams()  # 60 % of img_per_grp (SPHIRE's rule)


@pytest.mark.parametrize("key,value,message", [
    ("isac.xr", -1.0, "isac.xr/yr/ts"),
    ("isac.ts", 0.0, "isac.xr/yr/ts"),
    ("align.n_angles", 0, "align"),
    ("isac.stab_ali", 1, "isac.stab_ali"),
    ("isac.center_method", 1, "isac.center_method"),
    ("isac.radius", 70, "isac.radius=70"),
    ("hardware.memory_budget_mb", 0, "hardware.memory_budget_mb"),
    ("isac.wg_start", "fold", "isac.wg_start must be one of"),
    ("isac.wg_averages", "polr", "isac.wg_averages must be one of"),
    ("isac.unstable_references", "all", "isac.unstable_references must be one of"),
    ("isac.next_references", "failed", "isac.next_references must be one of"),
])
def test_a_bad_value_is_refused_naming_its_key(key, value, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        config.run_params(_with(_base(), key, value), N, BOX, platform="cpu")


def test_presets_isac2_by_default_and_lowsnr_change_only_what_they_name():
    """``python -m jisac`` runs ISAC2 (``preset=isac2``: the schema's defaults, which are ``isac.IsacParams()``'s,
    and the pixel-error criterion); ``preset=lowsnr`` changes the criterion to ``consensus`` and
    ``isac.unstable_references`` to ``members`` and nothing else; a command-line override applies over either."""
    from omegaconf import OmegaConf

    from jisac import isac
    from tests.helpers import compose_config

    def comparable(r):  # the criterion is a partial: compare its function and keywords
        return r._replace(criterion=(r.criterion.name, r.criterion.score.func, r.criterion.score.keywords))

    def params(overrides):
        return comparable(config.run_params(OmegaConf.to_object(compose_config(["isac.radius=50"] + overrides)), N,
                                            BOX, platform="cpu"))

    default, isac2, lowsnr = params([]), params(["preset=isac2"]), params(["preset=lowsnr"])
    assert default == isac2 == comparable(config.run_params(_base(), N, BOX, platform="cpu"))  # the schema's
    assert (isac2.criterion[0], isac2.isac.unstable_references) == ("pixel_error", "top_up")
    assert isac2.isac._replace(minimum_grp_size=60) == isac.IsacParams()
    assert (lowsnr.criterion[0], lowsnr.isac.unstable_references) == ("consensus[min_runs=3]", "members")
    assert lowsnr.isac == isac2.isac._replace(unstable_references="members")
    assert lowsnr._replace(isac=isac2.isac, criterion=isac2.criterion) == isac2  # nothing else differs
    assert params(["stability=consensus", "isac.unstable_references=members"]) == lowsnr
    assert params(["preset=lowsnr", "stability=pixel_error", "isac.unstable_references=top_up"]) == isac2
    # consensus asks 3 agreeing runs, or all of them when fewer are made (isac.stab_ali=2)
    assert params(["preset=lowsnr", "isac.stab_ali=2"]).criterion[0] == "consensus[min_runs=2]"
    with pytest.raises(ValueError, match=r"stability.min_runs=3 must be between 2 and isac.stab_ali \(2\)"):
        params(["preset=lowsnr", "isac.stab_ali=2", "stability.min_runs=3"])
