"""What jisac promises under bad input, kill, full disk and concurrent runs (docs/reliability.md)."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import jax
import mrcfile
import numpy as np
import pytest

import jisac
from jisac import checkpoint, cli, config, isac, prealign, run, synthetic
from jisac.errors import ConfigError, InputError, OutputDirError
from jisac.io import StackError, outputs
from jisac.io.star import write_stack_and_star
from tests.helpers import same_outputs

BOX, RADIUS = 32, 12


def _stack(tmp_path, images, name="p"):
    write_stack_and_star(tmp_path / f"{name}.star", tmp_path / f"{name}.mrcs", images, pixel_size=2.0)
    return tmp_path / f"{name}.star"


def _cfg(stack, out, data=None, **isac_options):
    settings = dict(radius=RADIUS, img_per_grp=30, minimum_grp_size=10, target_radius=RADIUS, target_nx=BOX)
    settings.update(isac_options)
    return config.JisacConfig(output_dir=str(out), data=config.DataConfig(stack=str(stack), **(data or {})),
                              isac=config.IsacConfig(**settings))


def _particles(n, seed=0):
    views, _ = synthetic.known_views(3, BOX, RADIUS)
    return np.array(synthetic.simulate(views, n, jax.random.key(seed), 0.5).images)  # a writable copy


@pytest.fixture
def no_prealignment(monkeypatch):
    """Fails the test if heavy work starts: every check here must come before pre-alignment."""
    def forbidden(*args, **kwargs):
        raise AssertionError("pre-alignment started before the input was checked")

    monkeypatch.setattr(prealign, "prealign", forbidden)


# --------------------------------------------------------------------------------------- 1. blank particles


def test_a_stack_of_blank_or_constant_images_is_refused(tmp_path, no_prealignment):
    for value in (0.0, 3.5):
        stack = _stack(tmp_path, np.full((70, BOX, BOX), value, np.float32), name=f"c{value}")
        with pytest.raises(StackError, match=r"70 particle\(s\) have no signal"):
            run.run(_cfg(stack, tmp_path / "out"))
        with pytest.raises(InputError, match="no usable particle"):
            run.run(_cfg(stack, tmp_path / "out", data={"drop_unusable": True}))


def test_blank_particles_among_real_ones_are_named_or_left_out(tmp_path, no_prealignment):
    images = _particles(70)
    images[[4, 9]] = 0.0
    images[20] = 1.25  # constant
    stack = _stack(tmp_path, images)
    with pytest.raises(StackError, match=r"3 particle\(s\) have no signal .*0-based indices 4, 9, 20\)"):
        run.run(_cfg(stack, tmp_path / "out"))
    keep = run._usable_particles(jisac.io.open_stack(stack), RADIUS, drop=True)
    np.testing.assert_array_equal(keep, np.setdiff1d(np.arange(70), [4, 9, 20]))
    # left out, fewer than two classes' worth remain: one clear line, not an internal error
    with pytest.raises(InputError, match=r"67 usable particle\(s\) of 70 are fewer than 2 x isac.img_per_grp"):
        run.run(_cfg(stack, tmp_path / "out", data={"drop_unusable": True}, img_per_grp=34))


@pytest.mark.filterwarnings("ignore:Data array contains NaN values")
def test_nan_particles_stop_the_run_or_are_left_out(tmp_path, no_prealignment):
    images = _particles(70)
    images[[3, 40], 5, 5] = np.nan
    stack = _stack(tmp_path, images)
    with pytest.raises(StackError, match=r"2 particle\(s\) have NaN or Inf pixels \(0-based indices 3, 40\)"):
        run.run(_cfg(stack, tmp_path / "out"))
    keep = run._usable_particles(jisac.io.open_stack(stack), RADIUS, drop=True)
    np.testing.assert_array_equal(keep, np.setdiff1d(np.arange(70), [3, 40]))


# --------------------------------------------------------------------------------------- 2. options


@pytest.mark.parametrize("option,value,message", [
    ("xr", -1.0, "isac.xr/yr/ts"),
    ("ts", 0.0, "isac.xr/yr/ts"),
    ("maxit", 1, "isac.maxit"),
    ("fh", 0.7, "isac.fh"),
    ("target_nx", 20, "target_radius"),
])
def test_numeric_options_are_checked_before_work(tmp_path, no_prealignment, option, value, message):
    stack = _stack(tmp_path, _particles(70))
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        run.run(_cfg(stack, tmp_path / "out", **{option: value}))


def test_the_pixel_size_advice_works_when_followed(tmp_path, no_prealignment):
    path = tmp_path / "zero.mrcs"
    with mrcfile.new(path) as mrc:
        mrc.set_data(_particles(70))
        mrc.voxel_size = 0.0
    with pytest.raises(StackError, match=r"data\.pixel_size="):
        run.run(_cfg(path, tmp_path / "out"))
    # following the advice, the run gets past the pixel size (and stops at the next, deliberate, check)
    with pytest.raises(ConfigError, match="2 x isac.img_per_grp"):
        run.run(_cfg(path, tmp_path / "out", data={"pixel_size": 1.7}, img_per_grp=40))


# --------------------------------------------------------------------------------------- 3. output folders


def test_unusable_output_folders_are_one_line(tmp_path):
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    cases = [(a_file, "is a file, not a folder"), (a_file / "sub" / "out", "is a file, so no folder can be made"),
             ("/proc/jisac-cannot-be-here/out", "cannot be written")]
    for out, message in cases:
        with pytest.raises(OutputDirError, match=message):
            checkpoint.prepare_output_dir(out)


@pytest.mark.slow
def test_command_line_refuses_an_unusable_output_folder_in_one_line(tmp_path):
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    for out in (a_file, a_file / "out"):
        proc = subprocess.run([sys.executable, "-m", "jisac", f"output_dir={out}"], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1 and "jisac: error: output_dir=" in proc.stderr, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "jisac", f"output_dir={tmp_path / 'o'}", "isac.ts=0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "isac.xr/yr/ts" in proc.stderr and "Traceback" not in proc.stderr


def test_a_bug_shows_as_a_bug_and_an_input_error_as_one_line(capsys):
    assert cli.failure(ConfigError("isac.ts must be > 0"), None) == 2
    err = capsys.readouterr().err
    assert err == "jisac: error: isac.ts must be > 0\n"
    try:
        raise ValueError("an internal inconsistency")
    except ValueError as bug:
        assert cli.failure(bug, None) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "a bug in jisac" in err and "please report it" in err


def test_a_full_disk_leaves_the_last_checkpoint_usable(tmp_path, monkeypatch, capsys):
    """The disk fills while generation 2 is written: the error is one line saying how to continue, the
    checkpoint of generation 1 loads, and the same call then ends exactly as an uninterrupted run."""
    images = np.asarray(_particles(240, seed=2))
    p = isac.make_params(img_per_grp=30, minimum_grp_size=20, target_radius=RADIUS, target_nx=BOX, maxit=6,
                         init_iter=1, stab_ali=3, thld_err=0.4, main_iter_limit=2)
    whole = jisac.classify(images, p, tmp_path / "whole", seed=1)
    assert len(whole["generations"]) == 2
    real = outputs.write_generation

    def disk_full_in_generation_2(out, generation, *args, **kwargs):
        if generation == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(out / "main001" / "generation002"))
        return real(out, generation, *args, **kwargs)

    monkeypatch.setattr(outputs, "write_generation", disk_full_in_generation_2)
    out = tmp_path / "full"
    with pytest.raises(OSError) as caught:
        jisac.classify(images, p, out, seed=1)
    assert cli.failure(caught.value, str(out)) == 2
    line = capsys.readouterr().err
    assert "disk full" in line and "generation 1" in line and "run the same command again" in line
    assert checkpoint.last_generation(out) == 1
    monkeypatch.setattr(outputs, "write_generation", real)
    jisac.classify(images, p, out, seed=1)
    same_outputs(out, tmp_path / "whole")


# --------------------------------------------------------------------------------------- 6. before any work


def test_a_folder_holding_another_run_is_refused_before_prealignment(tmp_path, no_prealignment):
    stack = _stack(tmp_path, _particles(70))
    out = tmp_path / "out"
    (out / "checkpoint").mkdir(parents=True)
    checkpoint.save_state(out / checkpoint.CHECKPOINT, isac.IsacState.start(70), "another-run")
    with pytest.raises(checkpoint.RunMismatchError, match="different run"):
        run.run(_cfg(stack, out))


# --------------------------------------------------------------------------------------- concurrency, signals


def test_a_second_run_on_the_same_folder_refuses_at_once(tmp_path, no_prealignment):
    stack = _stack(tmp_path, _particles(70))
    out = checkpoint.prepare_output_dir(tmp_path / "out")
    with checkpoint.output_dir_lock(out):
        with pytest.raises(OutputDirError, match=f"in use by another jisac run \\(pid {os.getpid()}\\)"):
            run.run(_cfg(stack, out))
    with checkpoint.output_dir_lock(out):  # released: usable again
        pass


def _cli_command(stack, out):
    """``python -m jisac`` on a 240-particle 32 px stack that needs two generations (thld_err 0.3; at 0.4 the polar
    within-group averages account 195 in generation 1 and end the run there): the SIGTERM and
    SIGKILL tests run exactly this, so that their four processes share the session's persistent compilation cache
    (``XDG_CACHE_HOME``, conftest.py) and only the first compiles."""
    return [sys.executable, "-m", "jisac", f"data.stack={stack}", f"output_dir={out}", f"isac.radius={RADIUS}",
            f"isac.target_radius={RADIUS}", f"isac.target_nx={BOX}", "isac.img_per_grp=30", "isac.minimum_grp_size=20",
            "isac.maxit=6", "isac.init_iter=1", "isac.stab_ali=3", "isac.thld_err=0.3", "isac.main_iter_limit=2",
            "isac.skip_prealignment=true", "data.cache=false", "beautify.enabled=false",
            "align.ring_lengths=constant"]  # SPHIRE's ring lengths account this stack in one generation


@pytest.fixture(scope="module")
def cli_stack(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli_stack")
    return _stack(folder, np.asarray(_particles(240, seed=3)))


def _start_and_wait_for_generation_1(command, out):
    """Starts ``command`` and returns the process once generation 1's checkpoint is written (still running: the
    data need a second generation)."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / checkpoint.CHECKPOINT).exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before it could be stopped"
    return proc


@pytest.mark.slow
def test_sigterm_stops_cleanly_saying_how_to_continue(cli_stack, tmp_path):
    out = tmp_path / "out"
    proc = _start_and_wait_for_generation_1(_cli_command(cli_stack, out), out)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM" in err and "run the same command again" in err and "Traceback" not in err
    assert checkpoint.last_generation(out) >= 1  # intact and loadable; that the same command then ends as an
    # uninterrupted run is test_killed_process_restarts_to_the_same_result (SIGKILL), below
    assert not (out / "summary.json").exists()  # a stopped run does not look finished


@pytest.mark.slow
def test_killed_process_restarts_to_the_same_result(cli_stack, tmp_path):
    """SIGKILL a real ``python -m jisac`` once its first generation is checkpointed; the same command again
    finishes with exactly the classes of an uninterrupted run."""
    full = tmp_path / "full"
    subprocess.run(_cli_command(cli_stack, full), check=True, capture_output=True, timeout=600)
    generations = json.loads((full / "summary.json").read_text())["generations"]
    assert len(generations) >= 2, "the data must need more than one generation for this test"
    killed = tmp_path / "killed"
    victim = _start_and_wait_for_generation_1(_cli_command(cli_stack, killed), killed)
    os.kill(victim.pid, signal.SIGKILL)
    victim.communicate()
    assert victim.returncode == -signal.SIGKILL
    assert not (killed / "summary.json").exists()
    subprocess.run(_cli_command(cli_stack, killed), check=True, capture_output=True, timeout=600)
    for name in ("particle_classes.txt", "all_parameters.txt"):
        np.testing.assert_array_equal(np.loadtxt(killed / name), np.loadtxt(full / name))


@pytest.mark.parametrize("argv, code", [([], 0), (["-m"], 3)])
def test_exit_now_ends_a_single_run_at_once_and_leaves_a_sweep_to_python(tmp_path, argv, code):
    """``python -m jisac`` ends with ``cli.exit_now``: exit status 0 with the logs and output flushed, and no
    exit handler run (JAX's clears every cache first); a sweep (``-m``) keeps Python's exit and its handlers."""
    log_file = tmp_path / "run.log"
    script = (
        "import atexit, logging, os, sys\n"
        "from jisac import cli\n"
        f"sys.argv = ['jisac'] + {argv!r}\n"
        f"handler = logging.FileHandler({str(log_file)!r}); logging.getLogger('t').addHandler(handler)\n"
        "logging.getLogger('t').warning('logged')\n"
        "atexit.register(lambda: os._exit(3))\n"  # runs only if Python's own exit does
        "print('printed', end='')\n"
        "cli.exit_now()\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == code, proc.stderr
    assert proc.stdout == "printed"
    assert log_file.read_text() == "logged\n"
