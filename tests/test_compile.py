"""Compilation: a run compiles a bounded set of programs (class counts and working-set sizes fall on a few
buckets, padding classes never change a result), and a second run loads them from the persistent cache."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jisac import align, average, budget, cache, criteria, devices, filters, isac

ROOT = Path(__file__).resolve().parent.parent

# The device programs of a generation's steps (alignment, class sums, within-group, stability): those that are
# expensive to compile. Small element-wise programs on (n,) arrays are not counted.
KERNELS = {"_scores_chunk", "_table_chunk", "_paired_chunk",
           "_chunk_sums_local", "_within_group_local", "_first_windows_local", "prepare_references",
           "prepare_assigned_references", "apply_transform", "pixel_error_stability", "_final_lowpass"}

P = isac.make_params(target_radius=10, img_per_grp=4, minimum_grp_size=2, target_nx=32, maxit=4, stab_ali=2,
                     init_iter=1)


def _generation(n, bucket=True, seed=0):
    """One generation's steps (start, one MRA step, one stability round) on ``n`` noise images of 32 px."""
    images = np.random.default_rng(seed).normal(size=(n, 32, 32)).astype(np.float32)
    steps = isac.generation_steps(n, P, bucket=bucket)
    state = isac.start_generation(images, jax.random.key(n), steps)
    state = isac.mra_step(images, state, 0.2, steps)
    crit = criteria.pixel_error_criterion(P.thld_err, float(P.target_radius))
    return steps, isac.stability_round(images, state, steps, crit)


def _kernels_compiled(before):
    after = devices.compiled_programs()
    return {name: after[name] - before.get(name, 0) for name in KERNELS if after.get(name, 0) > before.get(name, 0)}


def test_size_buckets():
    assert [align.size_bucket(m) for m in (1, 2, 3, 5, 8, 9, 11, 17, 33, 100)] == [1, 2, 4, 8, 8, 10, 12, 20, 40, 112]
    for m in range(1, 5000):
        b = align.size_bucket(m)
        assert m <= b and (m <= 8 or b <= 1.25 * m), m
    assert len({align.size_bucket(m) for m in range(1, 10001)}) <= 4 * 14 + 4  # four per octave
    assert budget.class_bucket(4, 50) == 4 and budget.class_bucket(100, 50) == 100  # demo, bench_isac: no padding
    assert [budget.class_bucket(k, 50) for k in (3, 33, 45, 101, 449, 451, 1000)] == [4, 40, 48, 150, 500, 500, 1000]


SMALL_PROGRAMS_PER_SIZE = 80


@pytest.mark.slow
def test_generations_of_other_sizes_compile_no_new_kernel():
    """Generations of 9 and 10 classes (36 and 40 particles) run the same device programs: the second compiles
    none of them; only the equal-size assignment (exact (n, k)) and small element-wise programs on (n,) arrays."""
    devices.count_compilations()
    _generation(36)  # 9 classes, compiled for 10
    before, count = devices.compiled_programs(), devices.compilation_count()
    steps, _ = _generation(40)  # 10 classes
    assert steps.k_pad == 10
    assert _kernels_compiled(before) == {}
    second = devices.compilation_count() - count
    before, count = devices.compiled_programs(), devices.compilation_count()
    _generation(38)  # 9 classes again, another working-set size
    assert _kernels_compiled(before) == {}
    third = devices.compilation_count() - count
    # what a new working-set size still compiles is a bounded set of small programs on (n,) arrays (the equal-size
    # assignment and eager element-wise steps: 39-51 measured), the same few dozen whatever the generation
    assert max(second, third) <= SMALL_PROGRAMS_PER_SIZE, (second, third)


def test_padding_classes_change_nothing():
    """9 classes compiled for 10 give the labels, parameters, stable members and averages of 9 classes."""
    s_pad, (state_pad, classes_pad) = _generation(36, bucket=True, seed=3)
    s_raw, (state_raw, classes_raw) = _generation(36, bucket=False, seed=3)
    assert (s_pad.k_pad, s_raw.k_pad) == (10, 9)
    np.testing.assert_array_equal(state_pad.labels, state_raw.labels)
    for a, b in zip(state_pad.params, state_raw.params):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(state_pad.references)[:9], np.asarray(state_raw.references))
    assert not np.any(np.asarray(state_pad.references)[9:])  # the padding class stays empty
    assert len(classes_pad) == len(classes_raw) == 9
    for a, b in zip(classes_pad, classes_raw):
        np.testing.assert_array_equal(a.members, b.members)
        np.testing.assert_array_equal(a.average, b.average)


def test_compilation_stats_since_a_snapshot_count_only_what_came_after():
    """``run.run`` reports its own compilations as the difference from a snapshot taken at its start (a library
    caller has no ``devices.setup``; before, such a run logged a misleading "0 programs compiled")."""
    devices.count_compilations()
    jax.jit(lambda x: x * 2.0 - 1.0)(np.ones(3, np.float32)).block_until_ready()  # before the snapshot
    snapshot = devices.compilation_stats()
    # a new function: compiled, or loaded from a persistent cache another test switched on
    jax.jit(lambda x: jax.numpy.cos(x) * 7.25 + 0.5)(np.ones(5, np.float32)).block_until_ready()
    since = devices.compilation_stats(since=snapshot)
    assert since["compilations"] + since["cache_hits"] == 1
    assert since["compile_seconds"] > 0
    total = devices.compilation_stats()
    assert total["compilations"] + total["cache_hits"] >= 2


def test_default_folder_is_beside_jisacs_other_caches(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert devices.default_compilation_cache() == cache.user_cache_root() / "xla"


_CHILD = """
import json, sys
from types import SimpleNamespace
import jax, jax.numpy as jnp
from jisac import devices
hw = SimpleNamespace(distributed="false", coordinator_address=None, num_processes=None, process_id=None,
                     devices="all", compilation_cache=sys.argv[1] == "on")
devices.setup(hw)
f = jax.jit(lambda x: jnp.fft.rfft(jnp.sin(x) * 3.0).real.sum())
f(jnp.arange(64.0)).block_until_ready()
print(json.dumps(devices.compilation_stats()))
"""


def _child(tmp_path, mode):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", _CHILD, mode], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_second_process_compiles_nothing(tmp_path):
    first = _child(tmp_path, "on")
    assert first["compilations"] >= 1 and first["cache_hits"] == 0
    assert any((tmp_path / "jisac" / "xla").iterdir())
    second = _child(tmp_path, "on")
    assert second["compilations"] == 0 and second["cache_hits"] == first["compilations"]
    off = _child(tmp_path, "off")  # hardware.compilation_cache=false: compiles again
    assert off["compilations"] == first["compilations"] and off["cache_hits"] == 0


def test_unstable_classes_keep_their_members_average_as_reference():
    """``isac.unstable_references="members"``: a class with fewer than 5 stable members takes the average of all
    its members at the last stability run's parameters as its next reference, instead of ISAC2's top-up of random
    members at zero parameters; stable sets and parameters are those of ISAC2. (Here, beside ``_generation``, so
    that it reuses its compiled programs.)"""
    images = np.random.default_rng(7).normal(size=(40, 32, 32)).astype(np.float32)
    crit = criteria.pixel_error_criterion(1e-4, float(P.target_radius))  # noise at a tiny threshold: none stable
    out = {}
    for mode in isac.UNSTABLE_REFERENCES:
        steps = isac.generation_steps(40, P._replace(unstable_references=mode))
        state = isac.start_generation(images, jax.random.key(3), steps)
        state = isac.mra_step(images, state, 0.2, steps)
        out[mode] = isac.stability_round(images, state, steps, crit)
    (top, top_classes), (mem, mem_classes) = out["top_up"], out["members"]
    assert all(len(c.members) == 0 for c in top_classes + mem_classes)
    for a, b in zip(top.params, mem.params):  # the same runs: the same parameters
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    k = len(mem_classes)
    expected = filters.tanh_lowpass(average.class_averages(images, mem.params, mem.labels, k), P.fh, P.ff)
    np.testing.assert_allclose(np.asarray(mem.references)[:k], np.asarray(expected), atol=1e-5)
    # ISAC2's top-up averages 5 random members at zero parameters: far from the average of all 10
    assert np.abs(np.asarray(top.references)[:k] - np.asarray(expected)).max() > 1e-3
