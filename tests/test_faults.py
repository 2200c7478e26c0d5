"""Faults of a real `hf-magmax merge` process: SIGTERM, SIGHUP and SIGINT mid-merge leave nothing at or beside the
output; SIGKILL leaves a staging directory (with the pid in its name) that the next run removes."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from builders import leftovers, make_synthetic_family


@pytest.fixture(scope="module")
def big_family(tmp_path_factory):
    """Base + 2 fine-tunes of 48 tensors of 1M fp32 elements (192 MB each): TIES takes seconds to merge them."""
    return make_synthetic_family(tmp_path_factory.mktemp("faults"), num_tensors=48, shape=(1024, 1024))


@pytest.fixture(scope="module")
def small_family(tmp_path_factory):
    return make_synthetic_family(tmp_path_factory.mktemp("faults-small"), num_tensors=2, shape=(4, 4))


def _env():
    src = Path(__file__).resolve().parents[1] / "src"
    env = dict(os.environ, PYTHONPATH=f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    env["HF_HUB_OFFLINE"] = "1"
    return env


def _merge_cmd(family, output, method="ties"):
    base, models = family
    cmd = [sys.executable, "-m", "hf_magmax.cli", "merge", "--base", base, "--models", *models]
    return [*cmd, "--output-dir", str(output), "--method", method, "--no-progress"]


def _start_and_wait_until_mid_merge(family, output):
    """Start a merge and return once its staging directory holds a shard being written (mid-merge)."""
    process = subprocess.Popen(
        _merge_cmd(family, output), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        staging = [p for p in output.parent.glob(f".{output.name}.hf_magmax-tmp-*") if p.is_dir()]
        shards = [f for s in staging for f in s.glob("*.safetensors")]
        if shards and shards[0].stat().st_size > 0:
            assert process.poll() is None, "the merge finished before it could be interrupted"
            assert str(process.pid) in staging[0].name  # the staging dir names its process
            return process, staging[0]
        if process.poll() is not None:
            raise AssertionError(f"merge exited early: {process.communicate()}")
        time.sleep(0.01)
    process.kill()
    raise AssertionError("the merge never started writing")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=lambda s: s.name)
def test_signal_mid_merge_leaves_nothing(big_family, tmp_path, signum):
    output = tmp_path / "out"
    process, staging = _start_and_wait_until_mid_merge(big_family, output)
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signum, err
    assert "interrupted; nothing partial was left" in err and "Traceback" not in err
    assert not staging.exists()
    assert leftovers(output) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_signal_during_overwrite_keeps_the_old_output(big_family, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("keep")
    process = subprocess.Popen(
        [*_merge_cmd(big_family, output), "--overwrite"], env=_env(), stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".out.hf_magmax-tmp-*/*.safetensors")) and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM
    assert (output / "keep.txt").read_text() == "keep" and leftovers(output) == ["out"]


def test_sigkill_leaves_a_staging_dir_that_the_next_run_removes(big_family, small_family, tmp_path):
    output = tmp_path / "out"
    process, staging = _start_and_wait_until_mid_merge(big_family, output)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert staging.is_dir() and leftovers(output) == [staging.name]  # SIGKILL cannot be handled
    # a live process's staging dir is never touched: one of ours, named with our pid, survives the next run
    alive = tmp_path / f".out.hf_magmax-tmp-{os.getpid()}-live"
    alive.mkdir()
    run = subprocess.run(_merge_cmd(small_family, output, "magmax"), env=_env(), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert not staging.exists()
    assert f"removed {staging}, left by an interrupted merge (process {process.pid} is gone)" in run.stderr
    assert alive.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, "out"])
    assert (output / "model.safetensors").is_file()
