"""Inputs that change during a merge (issue #18, item 3): every input file is pinned when it is checked (device,
inode, size, modification time), the files of each tensor are checked before it is read and every file before the
commit; a change is one error naming the file, and nothing is written. A real process whose input is truncated in
place by a second process ends with that one line, not a SIGBUS."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from builders import leftovers, make_family, make_synthetic_family
from safetensors.torch import load_file, save_file

import hf_magmax.checkpoints as checkpoints
from hf_magmax.cli import main
from hf_magmax.io import InputChangedError, PinnedFiles


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("live"), "llama", num_tasks=2)


@pytest.fixture
def family(pristine, tmp_path):
    """A fresh copy of the family (the tests change its files)."""
    base, models = pristine
    root = Path(base).parent
    copy = tmp_path / "family"
    shutil.copytree(root, copy)
    return str(copy / Path(base).name), [str(copy / Path(m).name) for m in models]


def _rewrite_in_place(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-8:] = bytes(8)  # the last values of the last tensor: same size, other content
    with open(path, "r+b") as f:
        f.write(data)


def _replace_by_rename(path: Path) -> None:
    tensors = load_file(path)
    save_file({k: v + 1 for k, v in tensors.items()}, str(path) + ".new", metadata={"format": "pt"})
    os.replace(str(path) + ".new", path)


def _truncate_in_place(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _edit_config(path: Path) -> None:
    path.write_text(path.read_text().replace('"rms_norm_eps"', '"rms_norm_eps" ', 1))


CHANGES = {
    "rewritten": ("models", 0, "model.safetensors", _rewrite_in_place, "was rewritten"),
    "renamed-over": ("models", 1, "model.safetensors", _replace_by_rename, "was replaced by another file"),
    "truncated": ("base", None, "model.safetensors", _truncate_in_place, "was truncated from"),
    "config-edited": ("base", None, "config.json", _edit_config, "was rewritten"),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_an_input_changed_mid_merge_is_one_error_and_nothing_is_written(family, tmp_path, capsys, monkeypatch, change):
    base, models = family
    which, index, name, act, message = CHANGES[change]
    target = Path(base if which == "base" else models[index]) / name
    real = checkpoints._merged_blocks
    seen = []

    def merged_blocks(plan, *args, **kwargs):  # a second writer changes the input after the first tensor
        seen.append(plan.name)
        if len(seen) == 2:
            time.sleep(0.02)  # past the filesystem's timestamp granularity
            act(target)
        return real(plan, *args, **kwargs)

    monkeypatch.setattr(checkpoints, "_merged_blocks", merged_blocks)
    output = tmp_path / "out"
    argv = ["merge", "--base", base, "--models", *models, "--output-dir", str(output), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"input file {target} {message}" in err and "nothing was written" in err
    assert leftovers(output) == []


def test_an_unchanged_merge_is_not_refused(family, tmp_path):
    base, models = family
    output = checkpoints.merge_checkpoints(base, models, tmp_path / "out", show_progress=False)
    assert (output / "model.safetensors").is_file() and (output / "config.json").is_file()


def test_pins_name_what_changed(tmp_path):
    file = tmp_path / "w.safetensors"
    file.write_bytes(b"x" * 10)
    pins = PinnedFiles()
    pins.add(file)
    pins.check()
    file.unlink()
    with pytest.raises(InputChangedError, match="w.safetensors was removed during the merge"):
        pins.check()


def test_a_real_merge_whose_input_is_truncated_by_another_process(tmp_path):
    """A second process truncates a fine-tune in place while a real `hf-magmax merge` reads it through memory maps:
    the merge notices before it touches the lost pages (one line, exit 2, its staging directory removed)."""
    base, models = make_synthetic_family(tmp_path / "family", num_tensors=48, shape=(1024, 1024))
    output = tmp_path / "out"
    src = Path(__file__).resolve().parents[1] / "src"
    env = dict(os.environ, PYTHONPATH=f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "hf_magmax.cli", "merge", "--base", base, "--models", *models, "--output-dir",
           str(output), "--method", "ties", "--no-progress"]  # fmt: skip
    process = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.hf_magmax-tmp-*/*.safetensors")):
        assert process.poll() is None and time.monotonic() < deadline, "the merge never started writing"
        time.sleep(0.01)
    target = Path(models[1]) / "model.safetensors"
    subprocess.run(["truncate", "-s", str(target.stat().st_size * 3 // 4), str(target)], check=True)
    _, err = process.communicate(timeout=120)
    assert process.returncode != -signal.SIGBUS, "killed by SIGBUS"
    assert process.returncode == 2, err
    # the pin check before each tensor names the truncation; a truncation that lands between that check and the
    # file's (re)open is named by the safetensors reader instead: either way one line naming the file
    named = f"input file {target} was truncated from" in err or f"cannot open safetensors file {target}" in err
    assert named and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert leftovers(output) == []
