"""Parameter sweeps: ``python -m jisac -m ...`` runs every combination, a failed run is a failed row, the summary
(CSV, Markdown, plot) is written at the end, and runs on the same data reuse the preprocessing cache."""

import json
import logging
import math
import subprocess
import sys
import time

import mrcfile
import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.slow  # Hydra multiruns in subprocesses

from jisac import cache, synthetic, sweep
from jisac.diskarray import DiskArray
from jisac.io.star import write_stack_and_star

BOX, RADIUS, N = 32, 12, 60  # tiny: 3-4 classes of 15-20 particles; every JAX compile counts
TINY = ["beautify.enabled=false", "isac.radius=12", "isac.target_radius=12", "isac.target_nx=32", "isac.maxit=3",
        "isac.init_iter=1",
        "isac.stab_ali=2", "isac.main_iter_limit=1"]
RESULTS = ("particle_classes.txt", "all_parameters.txt")


def _sweep(stack, out, cache_dir, *overrides):
    return subprocess.run(
        [sys.executable, "-m", "jisac", "-m", f"data.stack={stack}", f"output_dir={out}", f"data.cache_dir={cache_dir}",
         *TINY, *overrides],
        capture_output=True, text=True, timeout=600,
    )


@pytest.fixture(scope="module")
def first_sweep(tmp_path_factory):
    """A 2 x 2 sweep on a fresh cache in which one combination is invalid (minimum_grp_size 18 > img_per_grp 15).
    4 and 3 classes: one class-count bucket (``align.size_bucket``), so the second run compiles nothing new."""
    folder = tmp_path_factory.mktemp("sweep")
    parts, _ = synthetic.known_view_particles(N, BOX, RADIUS, n_views=3, snr=0.5)
    stack = folder / "p.star"
    write_stack_and_star(stack, folder / "p.mrcs", parts, pixel_size=2.0)
    proc = _sweep(stack, folder / "s1", folder / "cache", "isac.img_per_grp=15,20", "isac.minimum_grp_size=10,18")
    return stack, folder, proc


def test_sweep_writes_a_row_per_run_and_a_failed_run_is_a_failed_row(first_sweep):
    _, folder, proc = first_sweep
    out = folder / "s1"
    # the sweep went on after the failed run, wrote the summary, then exited 1 (Hydra's convention) naming it
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "run 1 failed: isac.minimum_grp_size (18) > isac.img_per_grp (15)" in proc.stderr
    assert "Traceback" not in proc.stderr
    table = pd.read_csv(out / "sweep_summary.csv", keep_default_na=False)
    assert list(table.columns) == ["job", "isac.img_per_grp", "isac.minimum_grp_size", *sweep.RESULT_COLUMNS]
    assert len(table) == 4
    assert table[["isac.img_per_grp", "isac.minimum_grp_size"]].values.tolist() == [
        [15, 10], [15, 18], [20, 10], [20, 18]
    ]
    assert table["status"].tolist() == ["ok", "failed", "ok", "ok"]
    failed = table.iloc[1]
    assert failed["error"].startswith("isac.minimum_grp_size (18) > isac.img_per_grp (15)")
    assert failed["classes"] == "" and failed["montage"] == ""
    assert json.loads((out / "1" / "status.json").read_text())["status"] == "failed"
    # each ok row carries its own run's numbers, from its own job folder
    for _, row in table[table["status"] == "ok"].iterrows():
        summary = json.loads((out / str(row["job"]) / "summary.json").read_text())
        assert int(row["classes"]) == summary["classes"]
        assert float(row["accounted_fraction"]) == pytest.approx(summary["accounted_fraction"])
        assert float(row["wall_s"]) > 0
        assert summary["parameters"]["img_per_grp"] == row["isac.img_per_grp"]
        if summary["classes"]:
            assert row["montage"] == f"{row['job']}/class_averages.png" and (out / row["montage"]).exists()
            sizes = summary["class_sizes"]
            assert float(row["mean_class_size"]) == pytest.approx(sum(sizes) / len(sizes))
            assert float(row["median_pixel_error"]) == pytest.approx(summary["median_pixel_error"])
    assert int(table.iloc[0]["classes"]) >= 1  # the first run found classes, so its montage link is tested
    # the first run computed the working stack, the later ones (same data, same preprocessing) reused it
    assert table["cache"].tolist() == ["miss", "", "hit", "hit"]
    assert "preprocessing cache hit" in (out / "2" / "cli.log").read_text()
    markdown = (out / "sweep_summary.md").read_text()
    assert "| 0 | 15 | 10 | ok |" in markdown and "[class_averages.png](0/class_averages.png)" in markdown
    assert "**failed**: isac.minimum_grp_size (18)" in markdown
    assert (out / "sweep_summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_second_sweep_hits_the_cache_and_gives_the_uncached_results(first_sweep):
    stack, folder, _ = first_sweep
    proc = _sweep(stack, folder / "s2", folder / "cache", "isac.img_per_grp=15", "isac.minimum_grp_size=10",
                  "isac.thld_err=0.7,1.4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pd.read_csv(folder / "s2" / "sweep_summary.csv")
    assert table["status"].tolist() == ["ok", "ok"] and table["isac.thld_err"].tolist() == [0.7, 1.4]
    assert table["cache"].tolist() == ["hit", "hit"]
    cached = json.loads((folder / "s2" / "0" / "summary.json").read_text())
    uncached = json.loads((folder / "s1" / "0" / "summary.json").read_text())  # same parameters, computed afresh
    assert cached["cache"]["status"] == "hit" and uncached["cache"]["status"] == "miss"
    assert cached["cache"]["key"] == uncached["cache"]["key"]
    assert "prealignment" not in cached["seconds"] and "prealignment" in uncached["seconds"]
    for name in RESULTS:
        np.testing.assert_array_equal(np.loadtxt(folder / "s2" / "0" / name), np.loadtxt(folder / "s1" / "0" / name))
    np.testing.assert_array_equal(mrcfile.read(folder / "s2" / "0" / "class_averages.mrcs"),
                                  mrcfile.read(folder / "s1" / "0" / "class_averages.mrcs"))
    assert cached["classes"] == uncached["classes"] and cached["accounted"] == uncached["accounted"]


def test_summary_can_be_rebuilt_by_hand(first_sweep, tmp_path, capsys):
    _, folder, _ = first_sweep
    before = (folder / "s1" / "sweep_summary.csv").read_text()
    for name in (sweep.CSV, sweep.MARKDOWN, sweep.PLOT):
        (folder / "s1" / name).unlink()
    assert sweep.main([str(folder / "s1")]) == 0
    assert (folder / "s1" / "sweep_summary.csv").read_text() == before
    assert (folder / "s1" / sweep.MARKDOWN).exists() and (folder / "s1" / sweep.PLOT).exists()
    assert "4 runs, 3 ok, 1 failed" in capsys.readouterr().out
    assert sweep.main([str(tmp_path)]) == 2  # no job folders: one line, no traceback
    assert "no sweep job folders" in capsys.readouterr().err


def _fake_job(sweep_dir, name, overrides, summary=None, status=None):
    job = sweep_dir / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if summary is not None:
        (job / "summary.json").write_text(json.dumps(summary))
    if status is not None:
        (job / "status.json").write_text(json.dumps(status))
    return job


def test_unexpected_errors_and_killed_runs_are_rows(tmp_path, caplog):
    """A job's unexpected exception: one line (with its type) in status.json, the traceback in the log; a job that
    left neither summary.json nor status.json (killed) is an incomplete row. Job folders sort by number."""
    done = {"classes": 2, "class_sizes": [10, 30], "accounted_fraction": 0.5, "median_pixel_error": 0.25,
            "seconds": {"total": 3.0}, "cache": {"status": "off"}}
    _fake_job(tmp_path, "10", ["data.stack=p.star", "isac.xr=1"], summary=done)
    failing = _fake_job(tmp_path, "2", ["data.stack=p.star", "isac.xr=3"])
    _fake_job(tmp_path, "1", ["data.stack=p.star", "isac.xr=2"])
    try:
        raise RuntimeError("device lost\nsecond line")
    except RuntimeError as err:
        with caplog.at_level(logging.ERROR, logger="jisac"):
            assert math.isnan(sweep.SweepJob(failing).failed(err, unexpected=True))
    assert "Traceback" in caplog.text and "device lost" in caplog.text
    status = json.loads((failing / "status.json").read_text())
    assert status["status"] == "failed" and status["error"] == "RuntimeError: device lost"
    table, swept, common = sweep.collect(tmp_path)
    assert swept == ["isac.xr"] and common == {"data.stack": "p.star"}
    assert table["job"].tolist() == ["1", "2", "10"]
    assert table["status"].tolist() == ["incomplete", "failed", "ok"]
    ok = table.iloc[2]
    assert (ok["classes"], ok["mean_class_size"], ok["wall_s"], ok["cache"]) == (2, 20.0, 3.0, "off")
    assert sweep.SweepJob.current() is None  # outside a Hydra multirun: a single run keeps exit code 2


def test_cache_key_follows_the_data_and_every_preprocessing_setting():
    def digest(images):
        d = cache.data_digest()
        cache.update_digest(d, images)
        return d.hexdigest()

    images = np.random.default_rng(0).standard_normal((4, 8, 8)).astype(np.float32)
    settings = {"radius": 12, "target_radius": 12, "target_nx": 32, "ctf": False, "vpp": False, "prealignment_seed": 0}
    key, info = cache.make_key(digest(images), settings)
    assert cache.make_key(digest(images.astype(">f4")), settings)[0] == key  # pixels, not the file's byte order
    assert cache.make_key(digest(images + np.float32(1e-6)), settings)[0] != key
    for name, value in [("radius", 13), ("target_nx", 36), ("ctf", True), ("vpp", True), ("prealignment_seed", 1)]:
        assert cache.make_key(digest(images), {**settings, name: value})[0] != key, name
    from jisac import ctf

    params = ctf.make_ctf_params(np.full(4, 1.5e4), np.full(4, 1.4e4), np.zeros(4), pixel_size_angst=2.0)
    with_ctf = cache.make_key(digest(images), settings, params)[0]
    assert with_ctf != key
    other = ctf.make_ctf_params(np.full(4, 1.6e4), np.full(4, 1.4e4), np.zeros(4), pixel_size_angst=2.0)
    assert cache.make_key(digest(images), settings, other)[0] != with_ctf
    assert info["pixels_sha256"] == digest(images) and info["version"] == cache.CACHE_VERSION


def test_cache_entry_round_trip_with_a_working_stack_on_disk(tmp_path):
    working = np.random.default_rng(1).standard_normal((9, 6, 6)).astype(np.float32)
    with mrcfile.new(tmp_path / "working_stack.mrcs") as mrc:  # a scratch working stack, as run.py writes one
        mrc.set_data(working)
    on_disk = DiskArray.from_mrc(tmp_path / "working_stack.mrcs")
    shifts, keep = np.zeros((10, 2), np.float32), np.delete(np.arange(10), 4)
    entry = cache.store(tmp_path / "c", "k1", {"n": 10}, working=on_disk, shifts=shifts, keep=keep)
    hit = cache.load(tmp_path / "c", "k1")
    assert isinstance(hit["working"], DiskArray) and entry == tmp_path / "c" / "k1"
    np.testing.assert_array_equal(hit["working"][:], working)
    np.testing.assert_array_equal(np.load(entry / "working.npy"), working)  # a plain .npy file for NumPy too
    np.testing.assert_array_equal(hit["keep"], keep)


def test_a_second_run_waits_for_the_entry_another_run_is_preparing(tmp_path, caplog):
    holder = subprocess.Popen(  # another run holding the entry's lock for a moment
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); "
         "print('locked', flush=True); time.sleep(1.0)", str(tmp_path / "k2.lock")],
        stdout=subprocess.PIPE, text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    t0 = time.monotonic()
    with caplog.at_level(logging.INFO, logger="jisac"):
        with cache.entry_lock(tmp_path, "k2"):
            waited = time.monotonic() - t0  # the lock only comes once the other run lets go (after its 1 s)
    assert waited > 0.5, waited
    assert "another run is preparing entry k2; waiting for it" in caplog.text
    holder.wait(timeout=10)
