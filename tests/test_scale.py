"""Scale-out: device selection and the mesh, the memory budget, exact class sums, and end-to-end runs whose
results are the same on 1, 2 and 4 devices and in two jax.distributed processes (``tests/scale_worker.py``,
started in fresh processes because the device count is fixed when JAX starts)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import mrcfile
import numpy as np
import pytest

from jisac import align, average, budget, config, devices, memory, rows, sharding, within_group
from jisac import transforms as T
from jisac.diskarray import DiskArray
from tests.helpers import same_outputs

WORKER = Path(__file__).with_name("scale_worker.py")
ROOT = WORKER.parent.parent


def _env():
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("XLA_FLAGS", None)
    env["JAX_PLATFORMS"] = "cpu"  # the workers force CPU devices, also on a machine with a GPU
    return env


@pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 devices (CPU runs force 2; one GPU is 1)")
def test_devices_from_config_and_bad_ids():
    assert devices.parse_device_ids("all") is None
    assert devices.parse_device_ids([0, 1]) == [0, 1]
    assert devices.parse_device_ids("0,1") == [0, 1]
    assert [d.id for d in devices.select_devices([1])] == [jax.devices()[1].id]
    mesh = devices.mesh_from_config(config.HardwareConfig(devices=[1, 0]))
    assert mesh.axis_names == ("data",) and mesh.size == 2
    with pytest.raises(ValueError, match=r"^hardware.devices: no device with id 7 \(available: 0, 1"):
        devices.select_devices([0, 7])
    with pytest.raises(ValueError, match="hardware.devices"):
        devices.select_devices("gpu0")
    with pytest.raises(ValueError, match="hardware.distributed must be"):
        devices.initialize_distributed("maybe")
    assert not devices.initialize_distributed("auto", environ={})  # no cluster: a single process
    assert devices.cluster_detected({"SLURM_NTASKS": "4"}) and not devices.cluster_detected({"SLURM_NTASKS": "1"})
    with pytest.raises(ValueError, match="hardware.memory_budget_mb"):
        config.budget(config.JisacConfig(hardware=config.HardwareConfig(memory_budget_mb=0)))


def test_chunk_sizes_and_budget_follow_the_backend_unless_set():
    def cfg(align=None, hardware_cfg=None):
        return config.JisacConfig(align=align or config.AlignConfig(), hardware=hardware_cfg or config.HardwareConfig())

    cpu, gpu = config.budget(cfg(), "cpu"), config.budget(cfg(), "gpu")
    for name in config.ALIGN_CHUNK_SIZES + ("memory_budget_mb",):
        key = "device_bytes" if name == "memory_budget_mb" else name
        scale = 1 << 20 if name == "memory_budget_mb" else 1
        assert getattr(cpu, key) == budget.BACKEND_PRESETS["cpu"][name] * scale
        assert getattr(gpu, key) == budget.BACKEND_PRESETS["gpu"][name] * scale
    assert config.budget(cfg(config.AlignConfig(reference_chunk=7)), "gpu").reference_chunk == 7
    assert config.budget(cfg(hardware_cfg=config.HardwareConfig(memory_budget_mb=300))).device_bytes == 300 << 20
    assert budget.default_budget("gpu") == gpu._replace(host_bytes=budget.default_budget("gpu").host_bytes)
    assert budget.default_budget() == config.budget(cfg())  # library calls without a budget: the same defaults
    with pytest.raises(ValueError, match=r"^align.particle_chunk must be >= 1 \(got 0\)"):
        config.budget(cfg(config.AlignConfig(particle_chunk=0)))


def test_one_budget_sets_every_chunk_size():
    options = align.AlignOptions()
    big = budget.plan(budget.Budget(device_bytes=1 << 30), options, n_references=1000, box=76, n_devices=2)
    small = budget.plan(budget.Budget(device_bytes=16 << 20), options, n_references=1000, box=76, n_devices=2)
    assert (big.particle_batch, big.reference_chunk) == (4, 50)  # the preferred sizes fit in 1 GB
    assert small.particle_batch * small.reference_chunk < big.particle_batch * big.reference_chunk
    assert small.particle_chunk < big.particle_chunk and small.within_group_particles < big.within_group_particles
    assert big.particle_chunk % (2 * big.particle_batch) == 0


def test_class_sums_are_exact_on_any_mesh(projections50):
    rng = np.random.default_rng(0)
    n, k = 50, 3
    labels = rng.integers(-1, k, n)
    params = T.make_transform(rng.uniform(0, 360, n), rng.uniform(-2, 2, n), rng.uniform(-2, 2, n),
                              rng.integers(0, 2, n).astype(bool))
    one = average.class_sums(projections50, params, labels, k, chunk=16)
    two = average.class_sums(projections50, params, labels, k, chunk=16, mesh=sharding.data_mesh())
    np.testing.assert_array_equal(np.asarray(one.sums), np.asarray(two.sums))  # bit-identical
    np.testing.assert_array_equal(np.asarray(one.counts), np.asarray(two.counts))
    aligned = np.asarray(T.apply_transform(jnp.asarray(projections50), params), np.float64)
    for c in range(k):
        want = aligned[labels == c].sum(0)
        np.testing.assert_allclose(np.asarray(one.sums[c]), want, atol=1e-5 * np.abs(aligned).max() * n)


def test_within_group_in_class_groups_equals_one_call(projections50):
    labels = np.repeat(np.arange(5), 10)
    opts = align.AlignOptions(particle_batch=8, reference_chunk=2)
    wg = within_group.WithinGroupOptions(maxit=3)
    key = jax.random.key(0)
    whole = within_group.within_group_alignment(projections50, labels, 5, key, opts, wg)
    mesh = sharding.data_mesh()
    parts = within_group.within_group_alignment(projections50, labels, 5, key, opts, wg, mesh=mesh, max_particles=20)
    np.testing.assert_array_equal(whole[0], parts[0])
    for a, b in zip(whole[1], parts[1]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert len(within_group._class_groups(labels, np.bincount(labels), 20)) == 3


def test_disk_array_reads_rows_of_npy_and_mrcs(tmp_path):
    truth = np.arange(10 * 4 * 3, dtype=np.float32).reshape(10, 4, 3)
    np.save(tmp_path / "s.npy", truth.astype(">f4"))  # big-endian on disk: read back as native float32
    with mrcfile.new(tmp_path / "s.mrcs") as mrc:
        mrc.set_data(truth)
    for disk in (DiskArray.from_npy(tmp_path / "s.npy"), DiskArray.from_mrc(tmp_path / "s.mrcs")):
        assert disk.shape == (10, 4, 3) and disk.dtype == np.float32 and len(disk) == 10
        np.testing.assert_array_equal(disk[3], truth[3])
        np.testing.assert_array_equal(disk[-1, 1:], truth[-1, 1:])
        np.testing.assert_array_equal(disk[2:9:3], truth[2:9:3])
        idx = np.array([7, 2, 2, 3, 9, 0])  # any order, repeats, runs of consecutive rows
        np.testing.assert_array_equal(disk[idx], truth[idx])
        np.testing.assert_array_equal(disk[idx, :, 0], truth[idx, :, 0])
        np.testing.assert_array_equal(np.asarray(disk), truth)
        np.testing.assert_array_equal(rows.take_rows(disk, [5, 1])[:], truth[[5, 1]])
        with pytest.raises(IndexError, match="out of range"):
            disk[10]
        with pytest.raises(IndexError, match="out of range"):
            disk[np.array([0, 12])]
    with open(tmp_path / "s.npy", "r+b") as f:  # a cut file is an error, not zeros
        f.truncate(200)
    with pytest.raises(EOFError, match="shorter"):
        DiskArray.from_npy(tmp_path / "s.npy")[8:]


def test_lazy_rows_read_what_is_asked(tmp_path):
    data = np.lib.format.open_memmap(tmp_path / "s.npy", mode="w+", dtype=np.float32, shape=(10, 4, 4))
    data[:] = np.arange(10, dtype=np.float32)[:, None, None]
    view = rows.Rows(data, [7, 2, 5])
    np.testing.assert_array_equal(view[1:][:, 0, 0], [2, 5])
    np.testing.assert_array_equal(view[np.array([2, 0])][:, 0, 0], [5, 7])
    padded = rows.RowRange(view, 1, 3, size=4)
    np.testing.assert_array_equal(padded[:][:, 0, 0], [2, 5, 0, 0])
    arr = sharding.put_rows(padded, sharding.data_mesh())
    np.testing.assert_array_equal(sharding.fetch(arr)[:, 0, 0], [2, 5, 0, 0])


def test_memory_snapshot_sees_an_allocation():
    before = memory.memory_snapshot()
    block = np.ones(200 << 20, np.uint8)  # 200 MB, touched
    after = memory.memory_snapshot()
    assert after["rss_mb"] - before["rss_mb"] > 150
    assert after["peak_rss_mb"] >= after["rss_mb"] - 1 and after["peak_rss_mb"] >= before["peak_rss_mb"]
    del block


@pytest.fixture(scope="module")
def device_runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scale")
    subprocess.run([sys.executable, str(WORKER), "devices", str(folder)], check=True, env=_env(), timeout=600,
                   capture_output=True)
    return folder


def _same_results(a: Path, b: Path):
    """Bit for bit: the code promises the same classes, parameters and averages whatever the split."""
    same_outputs(a, b, ("particle_classes.txt", "all_parameters.txt", "class_averages.mrcs", "particles.star"))


@pytest.mark.slow
def test_full_run_is_the_same_on_1_2_and_4_devices(device_runs):
    assert (np.loadtxt(device_runs / "d1" / "particle_classes.txt")[:, 0] > 0).sum() > 0
    for k in (2, 4):
        _same_results(device_runs / "d1", device_runs / f"d{k}")


@pytest.mark.slow
def test_results_do_not_depend_on_the_memory_budget(device_runs):
    """The GPU presets (large chunks, 4 GiB) on the CPU give the CPU presets' classes. Not bit for bit: other
    contraction shapes round differently in float32 (measured: angles within 0.008 deg), so the parameters and
    pixel errors agree to that rounding and the class of every particle is the same."""
    a, b = device_runs / "d1", device_runs / "d1gpu"
    ca, cb = np.loadtxt(a / "particle_classes.txt"), np.loadtxt(b / "particle_classes.txt")
    np.testing.assert_array_equal(ca[:, 0], cb[:, 0])
    np.testing.assert_allclose(ca[:, 1], cb[:, 1], atol=1e-2)  # pixel errors, px
    pa, pb = np.loadtxt(a / "all_parameters.txt"), np.loadtxt(b / "all_parameters.txt")
    np.testing.assert_array_equal(pa[:, 3], pb[:, 3])  # mirror flags
    angle = np.abs((pa[:, 0] - pb[:, 0] + 180.0) % 360.0 - 180.0)
    assert angle.max() < 0.05 and np.abs(pa[:, 1:3] - pb[:, 1:3]).max() < 0.01  # deg, px


@pytest.mark.slow
def test_two_processes_give_the_single_process_result(device_runs):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        subprocess.Popen([sys.executable, str(WORKER), "process", str(device_runs), str(port), str(i)], env=_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)
    ]
    try:
        logs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), logs
    _same_results(device_runs / "d1", device_runs / "p2")
    import json

    summary = json.loads((device_runs / "p2" / "summary.json").read_text())
    assert summary["memory"]["processes"] == 2 and summary["memory"]["devices"] == 4
    assert not (device_runs / "p2" / "scratch" / "working_stack.mrcs").exists()  # memory-mapped, then removed
