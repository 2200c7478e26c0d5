"""Pushing to the Hub (issue #18, item 6), on the loopback fake Hub: a branch is created only after its commit, so a
refused or interrupted upload leaves it as it was; `hf-magmax push DIR` uploads an existing output; repo ids are
checked before a merge; an interrupted push says where the complete merge is and how to push it (a real process,
SIGINT while the Hub holds the commit)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from builders import leftovers, make_synthetic_family

from hf_magmax import HubPushError, push_to_hub
from hf_magmax.cli import main
from hf_magmax.hub import write_model_card


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return make_synthetic_family(tmp_path_factory.mktemp("push"), num_tensors=2, shape=(4, 4))


def _folder(tmp_path, name="model", content=b"new") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(content * 100)
    write_model_card(folder, {"library_name": "transformers", "tags": ["merge"]}, "# A model")
    return folder


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def _requests(fake_hub, repo="me/x"):
    return [(method, path.removeprefix(f"/api/models/{repo}")) for method, path in fake_hub.requests]


def test_a_new_branch_is_created_at_the_new_commit_after_the_upload(fake_hub, tmp_path):
    folder = _folder(tmp_path)
    push_to_hub(folder, "me/x", revision="after-task-1")
    repo = fake_hub.repos["me/x"]
    assert set(repo.branches) == {"after-task-1"}  # the temporary upload branch is gone
    assert repo.branches["after-task-1"] == _files(folder) and repo.files == {}  # main is left as it is
    assert repo.heads["after-task-1"] == repo.commits[-1].oid
    calls = _requests(fake_hub)
    commit = next(i for i, (m, p) in enumerate(calls) if m == "POST" and p.startswith("/commit/"))
    branch = calls.index(("POST", "/branch/after-task-1"))
    assert commit < branch  # commit, then branch


def test_a_refused_upload_leaves_a_new_branch_missing_and_an_old_one_untouched(fake_hub, tmp_path):
    push_to_hub(_folder(tmp_path, "old", b"old"), "me/x", revision="dev")
    repo = fake_hub.repos["me/x"]
    before = dict(repo.branches["dev"]), repo.heads["dev"]
    fake_hub.fail_commits = True
    with pytest.raises(HubPushError, match=r"kept at .*push it with: hf-magmax push .* --to-hub me/x --revision new"):
        push_to_hub(_folder(tmp_path), "me/x", revision="new")
    assert "new" not in repo.branches and set(repo.branches) == {"dev"}  # no branch serving main's model
    with pytest.raises(HubPushError):
        push_to_hub(_folder(tmp_path, "newer"), "me/x", revision="dev")
    assert (repo.branches["dev"], repo.heads["dev"]) == before


def test_push_command_uploads_an_existing_output(fake_hub, tmp_path, capsys):
    folder = _folder(tmp_path)
    assert main(["push", str(folder), "--to-hub", "me/x", "--revision", "b", "--private"]) == 0
    repo = fake_hub.repos["me/x"]
    assert repo.private and repo.branches["b"] == _files(folder) and repo.files == {}
    assert capsys.readouterr().out.strip().endswith(repo.heads["b"])
    assert main(["push", str(folder), "--to-hub", "me/x"]) == 0
    assert repo.files == _files(folder)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--to-hub", ""], "`--to-hub` must be a Hub repo id"),
        (["--to-hub", "me/x y"], "`--to-hub` = 'me/x y' is not a valid Hub repo id"),
        (["--to-hub", "me/x", "--revision", "a b"], "not a valid git branch name"),
    ],
)
def test_push_command_refuses_bad_arguments_before_any_request(fake_hub, tmp_path, capsys, argv, message):
    assert main(["push", str(_folder(tmp_path)), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not fake_hub.requests


def test_push_command_refuses_a_missing_directory(tmp_path, capsys):
    assert main(["push", str(tmp_path / "missing"), "--to-hub", "me/x"]) == 2
    assert "is not a directory" in capsys.readouterr().err


@pytest.mark.parametrize("repo_id", ["", "me/x y", "a/b/c"])
def test_an_invalid_repo_id_is_refused_before_the_merge(family, fake_hub, tmp_path, capsys, repo_id):
    base, models = family
    output = tmp_path / "out"
    argv = ["merge", "--base", base, "--models", *models, "--output-dir", str(output), "--no-progress"]
    assert main([*argv, "--push-to-hub", repo_id]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "`push_to_hub`" in err and "Hub repo id" in err
    assert leftovers(output) == [] and not fake_hub.requests


def test_an_interrupted_push_says_where_the_complete_merge_is(family, fake_hub, tmp_path):
    """A real process: SIGINT while the Hub holds its commit. The merge is complete on disk, the message says so and
    gives the command that pushes it; the branch was never created; that command then pushes it."""
    base, models = family
    output = tmp_path / "out"
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    env.pop("TRANSFORMERS_OFFLINE", None)  # read as HF_HUB_OFFLINE by huggingface_hub (the fixture lifts that one)
    fake_hub.stall.add("commit")
    cmd = [sys.executable, "-m", "hf_magmax.cli", "merge", "--base", base, "--models", *models, "--output-dir",
           str(output), "--no-progress", "--push-to-hub", "me/x", "--revision", "b"]  # fmt: skip
    process = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert fake_hub.stalled.wait(timeout=120), "the push never reached its commit"
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
        fake_hub.stall.clear()
    assert process.returncode == 130, err
    assert "Traceback" not in err and "nothing partial was left" not in err
    assert (
        f"interrupted; the merge is complete at {output}, but its push to the Hub repo 'me/x' was interrupted" in err
    )
    assert f"push it with: hf-magmax push {output} --to-hub me/x --revision b" in err
    assert (output / "model.safetensors").is_file() and leftovers(output) == ["out"]
    time.sleep(0.1)
    repo = fake_hub.repos["me/x"]
    assert "b" not in repo.branches and not repo.commits
    assert main(["push", str(output), "--to-hub", "me/x", "--revision", "b"]) == 0
    assert repo.branches["b"]["model.safetensors"] == (output / "model.safetensors").read_bytes()
