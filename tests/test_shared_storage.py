"""Merges on shared storage and under signals (issue #18, items 4 and 5).

- Staleness of a staging directory is decided by a `flock` its merge holds for its whole life, valid across PID
  namespaces: a merge in another PID namespace (a real one, `unshare -pf`, where the machine allows it) is never
  cleaned up by a second merge on the same output; a reused pid does not keep a stale directory; an old output set
  aside by a killed commit is restored before the up-front checks, and never through a link.
- Signals are acted on at safe points only, in a process with threads: a signal during the commit takes effect after
  it and says the new merge is in place; a signal a library swallowed never lets the commit happen; a second Ctrl-C
  during the cleanup leaves nothing and no traceback.
"""

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from builders import leftovers, make_synthetic_family
from safetensors import safe_open

import hf_magmax.io.output as io_output
from hf_magmax.cli import main
from hf_magmax.io import Terminated, remove_stale_staging_dirs, staged_output_dir


@pytest.fixture(scope="module")
def big_family(tmp_path_factory):
    """Base + 2 fine-tunes of 48 tensors of 1M fp32 elements: TIES takes seconds to merge them."""
    return make_synthetic_family(tmp_path_factory.mktemp("shared-big"), num_tensors=48, shape=(1024, 1024))


@pytest.fixture(scope="module")
def small_family(tmp_path_factory):
    return make_synthetic_family(tmp_path_factory.mktemp("shared-small"), num_tensors=2, shape=(4, 4))


def _env(threads="1"):
    src = Path(__file__).resolve().parents[1] / "src"
    env = dict(os.environ, PYTHONPATH=f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS=threads)
    env["HF_HUB_OFFLINE"] = "1"
    return env


def _merge_cmd(family, output, method="ties", *extra):
    base, models = family
    cmd = [sys.executable, "-m", "hf_magmax.cli", "merge", "--base", base, "--models", *models]
    return [*cmd, "--output-dir", str(output), "--method", method, "--no-progress", *extra]


def _tensor_names(output: Path) -> set[str]:
    names = set()
    for file in output.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            names.update(f.keys())
    return names


def _wait_for(predicate, what, timeout=120):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# ---------------------------------------------------------------------------------------------------------------------
# item 4: staleness by lock, valid across PID namespaces
# ---------------------------------------------------------------------------------------------------------------------


def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    try:
        run = subprocess.run(["unshare", "-pf", "--mount-proc", "true"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return run.returncode == 0


def _start_in_another_pid_namespace(cmd, env):
    """`cmd` in a new PID namespace, with a pid (30001 there) that no process of this namespace has: the old cleanup
    would call such a merge "gone". Its own process group, so that the whole group can be stopped and continued."""
    script = "echo 30000 > /proc/sys/kernel/ns_last_pid 2>/dev/null; " + " ".join(f"'{c}'" for c in cmd)
    return subprocess.Popen(
        ["unshare", "-pf", "--mount-proc", "sh", "-c", script],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip


@pytest.mark.skipif(not _unshare_works(), reason="`unshare -pf --mount-proc` is not allowed here")
def test_a_merge_in_another_pid_namespace_is_never_cleaned_up(big_family, small_family, tmp_path):
    output = tmp_path / "out"
    first = _start_in_another_pid_namespace(_merge_cmd(big_family, output, "ties", "--overwrite"), _env())
    try:
        _wait_for(lambda: list(tmp_path.glob(".out.hf_magmax-tmp-*/*.safetensors")), "the first merge's shards")
        staging = next(tmp_path.glob(".out.hf_magmax-tmp-*"))
        pid = int(staging.name.split("-tmp-")[1].split("-")[0])
        os.killpg(first.pid, signal.SIGSTOP)  # hold it mid-merge while the second merge runs
        assert not Path(f"/proc/{pid}").exists() or pid != 30001  # its pid means nothing in this namespace
        second = subprocess.run(
            _merge_cmd(small_family, output, "magmax", "--overwrite"), env=_env(), capture_output=True, text=True
        )
        assert second.returncode == 0, second.stderr
        assert "removed" not in second.stderr and staging.is_dir()  # the live merge's staging dir is untouched
        assert _tensor_names(output) == {"layer000.weight", "layer001.weight"}
    finally:
        os.killpg(first.pid, signal.SIGCONT)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err  # not lost: it completes and replaces the second merge's output
    assert len(_tensor_names(output)) == 48 and leftovers(output) == ["out"]


def _hold_lock(directory: Path):
    """Another process that holds an exclusive flock on `directory` (as a live merge does on its staging dir)."""
    code = (
        "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX); "
        "print('locked', flush=True); sys.stdin.read()"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code, str(directory)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "locked"
    return process


def test_a_locked_staging_dir_is_live_whatever_its_pid_says(tmp_path, caplog):
    """The simulated form of the namespace test: the pid in the name is dead here, a lock is held on the directory
    (a merge in another container or host). Left alone while the lock is held, removed once its holder is gone."""
    output = tmp_path / "out"
    staging = tmp_path / f".out.hf_magmax-tmp-{_dead_pid()}-abcd"
    staging.mkdir()
    (staging / "model-00001-of-00002.safetensors").write_bytes(b"x" * 100)
    holder = _hold_lock(staging)
    try:
        assert remove_stale_staging_dirs(output) == [] and staging.is_dir()
    finally:
        holder.stdin.close()
        holder.wait()
    with caplog.at_level(logging.WARNING, logger="hf_magmax.io"):
        assert remove_stale_staging_dirs(output) == [staging]  # the kernel released the lock of the dead holder
    assert not staging.exists() and "left by an interrupted merge" in caplog.text


def test_our_staging_dir_is_locked_for_the_merge_lifetime(tmp_path):
    output = tmp_path / "out"
    with staged_output_dir(output, overwrite=False) as staging:
        fd = io_output._lock(staging)
        assert fd is None  # held by the merge (another open file description cannot take it)
        (staging / "w").write_text("x")
        assert remove_stale_staging_dirs(output) == [] and staging.is_dir()
    assert (output / "w").read_text() == "x" and leftovers(output) == ["out"]


def test_a_reused_pid_does_not_keep_a_stale_dir(tmp_path, monkeypatch):
    output = tmp_path / "out"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = tmp_path / f".out.hf_magmax-tmp-{sleeper.pid}-abcd"  # an older version's dir: no lock, a live pid
        stale.mkdir()
        assert remove_stale_staging_dirs(output) == []  # its process may be that merge: kept
        # the same pid, now a process that started after the directory was last changed: a reused pid
        changed = stale.lstat().st_ctime
        monkeypatch.setattr(io_output, "_started_after", lambda pid, when: pid == sleeper.pid and when <= changed)
        assert remove_stale_staging_dirs(output) == [stale]
    finally:
        sleeper.kill()
        sleeper.wait()


def test_process_start_times_are_read_from_proc():
    if not Path("/proc/self/stat").exists():
        pytest.skip("no /proc")
    assert io_output._started_after(os.getpid(), 0.0)  # this process started after 1970
    assert not io_output._started_after(os.getpid(), time.time())  # and before now


def test_an_old_output_is_restored_before_the_up_front_check(small_family, tmp_path, capsys, monkeypatch):
    """A killed fallback commit left the old output aside: the next merge restores it first, and then refuses the
    non-empty output at once, instead of merging for hours and failing at the commit."""
    import hf_magmax.checkpoints as checkpoints

    output = tmp_path / "out"
    old = tmp_path / f".out.hf_magmax-old-{_dead_pid()}-abcd"
    old.mkdir()
    (old / "keep.txt").write_text("keep")
    monkeypatch.setattr(checkpoints, "_stream_merge", lambda *a, **k: pytest.fail("merged before the checks"))
    base, models = small_family
    assert main(["merge", "--base", base, "--models", *models, "--output-dir", str(output), "--no-progress"]) == 2
    assert f"output directory {output} is not empty" in capsys.readouterr().err
    assert (output / "keep.txt").read_text() == "keep" and leftovers(output) == ["out"]


def test_a_link_named_like_an_old_output_never_becomes_the_output(tmp_path, caplog):
    output = tmp_path / "out"
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "secret.txt").write_text("x")
    link = tmp_path / f".out.hf_magmax-old-{_dead_pid()}-abcd"
    link.symlink_to(target)
    with caplog.at_level(logging.WARNING, logger="hf_magmax.io"):
        assert remove_stale_staging_dirs(output) == []
    assert not output.exists() and not output.is_symlink()
    assert link.is_symlink() and (target / "secret.txt").is_file()  # left alone, named in a warning
    assert f"left {link} alone" in caplog.text


# ---------------------------------------------------------------------------------------------------------------------
# item 5: signals at safe points only, with threads
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def busy_thread():
    """A second thread, as torch has: the kernel may deliver a process signal to it instead of the main thread."""
    stop = threading.Event()
    thread = threading.Thread(target=lambda: stop.wait(60), daemon=True)
    thread.start()
    yield thread
    stop.set()
    thread.join()


def test_a_signal_during_the_commit_takes_effect_after_it_and_says_so(tmp_path, monkeypatch, busy_thread):
    output = tmp_path / "out"
    output.mkdir()
    (output / "old.txt").write_text("old")
    real_exchange = io_output._exchange

    def exchange_then_signal(a, b):
        done = real_exchange(a, b)
        os.kill(os.getpid(), signal.SIGTERM)  # lands between the exchange and the removal of the old output
        time.sleep(0.05)  # (delivered meanwhile, to whichever thread)
        return done

    monkeypatch.setattr(io_output, "_exchange", exchange_then_signal)
    with pytest.raises(Terminated) as info:
        with staged_output_dir(output, overwrite=True) as staging:
            (staging / "new.txt").write_text("new")
    assert info.value.signum == signal.SIGTERM
    assert info.value.outcome == f"the merge had completed: the new output is in place at {output}"
    assert sorted(p.name for p in output.iterdir()) == ["new.txt"]
    assert leftovers(output) == ["out"]  # no hidden copy of the old output


def test_a_signal_a_library_swallowed_never_lets_the_commit_happen(tmp_path, busy_thread):
    output = tmp_path / "out"
    with pytest.raises(Terminated):
        with staged_output_dir(output, overwrite=False) as staging:
            (staging / "partial.txt").write_text("x")
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.5)
            except KeyboardInterrupt:
                pass  # some library code turning it into nothing
    assert leftovers(output) == []


def test_a_second_signal_during_the_cleanup_does_not_cut_it_short(tmp_path, monkeypatch, busy_thread):
    output = tmp_path / "out"
    real_rmtree = shutil.rmtree
    calls = []

    def rmtree_with_ctrl_c(path, *args, **kwargs):
        calls.append(path)
        os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C while the cleanup runs
        time.sleep(0.05)
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(io_output.shutil, "rmtree", rmtree_with_ctrl_c)
    with pytest.raises(Terminated) as info:
        with staged_output_dir(output, overwrite=False) as staging:
            (staging / "partial.txt").write_text("x")
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
    assert info.value.signum == signal.SIGINT and info.value.outcome is None
    assert calls and leftovers(output) == []


def test_sigterm_in_the_overwrite_commit_of_a_real_process_reports_the_new_merge(small_family, tmp_path):
    """A real `hf-magmax merge --overwrite` with torch threads (OMP_NUM_THREADS=2), SIGTERM while the commit removes
    a large old output: exit 143, the truth ("the new output is in place"), nothing hidden left beside it."""
    output = tmp_path / "out"
    output.mkdir()
    for i in range(40):  # a large old output: its removal, inside the commit, takes a while
        sub = output / f"d{i:02d}"
        sub.mkdir()
        for j in range(500):
            (sub / f"f{j}").write_bytes(b"")
    process = subprocess.Popen(
        _merge_cmd(small_family, output, "magmax", "--overwrite"), env=_env("2"), stderr=subprocess.PIPE, text=True
    )
    _wait_for(lambda: (output / "model.safetensors").exists() or process.poll() is not None, "the exchange")
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    if process.returncode == 0:
        pytest.skip("the commit finished before the signal arrived (machine too fast for this timing)")
    assert process.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "nothing partial was left" not in err
    assert f"interrupted; the merge had completed: the new output is in place at {output}." in err
    assert (output / "model.safetensors").is_file() and not (output / "d00").exists()
    assert leftovers(output) == ["out"]


@pytest.mark.parametrize("signals", [2, 3])
def test_repeated_ctrl_c_mid_merge_leaves_nothing_and_no_traceback(big_family, tmp_path, signals):
    output = tmp_path / "out"
    process = subprocess.Popen(_merge_cmd(big_family, output), env=_env("2"), stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: list(tmp_path.glob(".out.hf_magmax-tmp-*/*.safetensors")), "the merge's shards")
    for _ in range(signals):
        process.send_signal(signal.SIGINT)
        time.sleep(0.002)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "Traceback" not in err and "interrupted; nothing partial was left" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []
