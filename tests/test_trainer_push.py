# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""The Trainer's Hub pushes never publish a local path: `MagMaxTrainer.push_to_hub`, its checkpoint pushes
(`hub_strategy`), `MagMaxSFTTrainer`, `MagMaxCallback` on a plain `Trainer` and the per-task revisions all upload
through the rules of `hf_magmax.hub.publishable_files`. Every file of every commit that arrives on the loopback fake
Hub is read, byte by byte, for the local folders of the run (pretrained model loaded from an absolute folder)."""

import io
import json
import os
from pathlib import Path

import pytest
import torch
from tiny_tasks import classification_tasks, tiny_bert, tiny_config
from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

from hf_magmax import HubPushError
from hf_magmax.trainer import MagMaxCallback, MagMaxConfig, MagMaxTrainer


REPO = "me/continual"


def _args(output_dir, token, cls=MagMaxConfig, **kwargs):
    """The tiny trainer tests' config (3 steps, learning rate 5e-3), pushing to `REPO` with `token`."""
    values = dict(max_steps=3, learning_rate=5e-3, push_to_hub=True, hub_model_id=REPO, hub_token=token)
    return tiny_config(output_dir, config_class=cls, **{**values, **kwargs})


@pytest.fixture
def local_model(tmp_path):
    """A pretrained model loaded from an absolute local folder: its `config._name_or_path` is that folder."""
    folder = tmp_path / "models" / "tiny-bert-pretrained"
    tiny_bert().save_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    assert model.config._name_or_path == str(folder)
    return model, folder


def _local_paths(output_dir: Path, model_folder: Path) -> list[str]:
    return [str(output_dir), str(output_dir.parent), str(model_folder), os.getcwd(), str(Path.home())]


def _arrived(fake_hub) -> list[tuple[str, str, bytes]]:
    """Every file of every commit on the fake Hub: (revision, path, bytes)."""
    return [
        (c.revision, name, data)
        for repo in fake_hub.repos.values()
        for c in repo.commits
        for name, data in c.files.items()
    ]


def _leaks(fake_hub, secrets: list[str]) -> str:
    """One line per (revision, file, secret) found on the Hub; empty when nothing leaked."""
    leaks = [
        (revision, name, secret)
        for revision, name, data in _arrived(fake_hub)
        for secret in secrets
        if secret.encode() in data
    ]
    return "\n".join(map(str, sorted(set(leaks))))


def _published_args(data: bytes) -> TrainingArguments:
    return torch.load(io.BytesIO(data), weights_only=False)


@pytest.mark.parametrize("hub_strategy", ["every_save", "checkpoint", "all_checkpoints"])
def test_a_pushed_trainer_run_holds_no_local_path(hub_strategy, tmp_path, local_model, fake_hub):  # noqa: F811
    model, folder = local_model
    output_dir = tmp_path / "runs" / "continual"
    train, evaluation = classification_tasks()
    # the best checkpoint is tracked: trainer_state.json names its local folder (`best_model_checkpoint`)
    best = dict(eval_strategy="steps", eval_steps=2, metric_for_best_model="a_loss")
    args = _args(output_dir, fake_hub.token, hub_strategy=hub_strategy, push_every_task=True, **best)
    trainer = MagMaxTrainer(model, args, train_datasets=train, eval_datasets=evaluation)
    trainer.train()
    trainer.push_to_hub()

    repo = fake_hub.repos[REPO]
    arrived = _arrived(fake_hub)
    names = {name for _, name, _ in arrived}
    # the checkpoint pushes, the per-task revisions and the final push all arrived ...
    assert {"model.safetensors", "config.json", "README.md", "continual_results.json", "training_args.bin"} <= names
    assert {"after-task-1", "after-task-2"} <= set(repo.branches)
    if hub_strategy == "checkpoint":
        assert "last-checkpoint/trainer_state.json" in names
        state = json.loads(repo.files["last-checkpoint/trainer_state.json"])
        assert state["best_model_checkpoint"] == "checkpoint-2", state["best_model_checkpoint"]
    if hub_strategy == "all_checkpoints":
        assert any(n.startswith("checkpoint-") and n.endswith("trainer_state.json") for n in names), sorted(names)
    # ... the run's own folders stayed local ...
    assert not [n for n in names if n.startswith(("task-", "magmax_base", "magmax_releases"))], sorted(names)
    # ... and not one byte of them names a local folder, nor the token
    assert _leaks(fake_hub, [*_local_paths(output_dir, folder), fake_hub.token]) == ""
    # the local run keeps what transformers wrote; the Hub has the public names
    assert str(output_dir).encode() in (output_dir / "training_args.bin").read_bytes()
    published = _published_args(repo.files["training_args.bin"])
    assert type(published) is MagMaxConfig and published.output_dir == "continual"
    assert published.hub_token is None and published.learning_rate == args.learning_rate


def test_a_link_out_of_output_dir_refuses_the_push_before_any_upload(tmp_path, local_model, fake_hub, caplog):  # noqa: F811
    model, _ = local_model
    output_dir = tmp_path / "runs" / "continual"
    secret = tmp_path / "home" / "id_rsa"
    secret.parent.mkdir()
    secret.write_text("private key")
    train, evaluation = classification_tasks()
    args = _args(output_dir, fake_hub.token, save_strategy="no")
    trainer = MagMaxTrainer(model, args, train_datasets=train, eval_datasets=evaluation)
    trainer.train()
    commits = len(fake_hub.repos[REPO].commits)
    (output_dir / "notes.txt").symlink_to(secret)
    with pytest.raises(HubPushError, match=r"notes.txt.*symbolic link"):
        trainer.push_to_hub()
    assert len(fake_hub.repos[REPO].commits) == commits  # nothing uploaded
    assert _leaks(fake_hub, ["private key"]) == ""


@pytest.mark.parametrize("where", ["output_dir", "model folder"])
def test_a_file_holding_a_local_path_refuses_the_push_naming_it(where, tmp_path, local_model, fake_hub):  # noqa: F811
    """Free text cannot be rewritten: a file naming the output folder, or the folder the model was loaded from (not
    under the output's parent here), stops the push before any upload."""
    model, folder = local_model
    output_dir = tmp_path / "runs" / "continual"
    train, evaluation = classification_tasks()
    args = _args(output_dir, fake_hub.token, save_strategy="no")
    trainer = MagMaxTrainer(model, args, train_datasets=train, eval_datasets=evaluation)
    trainer.train()
    (output_dir / "notes.md").write_text(f"trained in {output_dir if where == 'output_dir' else folder}\n")
    with pytest.raises(HubPushError, match=r"notes.md holds the local path"):
        trainer.push_to_hub()
    assert REPO not in fake_hub.repos or not fake_hub.repos[REPO].commits


def test_the_callback_on_a_plain_trainer_publishes_no_local_path(tmp_path, local_model, fake_hub):  # noqa: F811
    model, folder = local_model
    output_dir = tmp_path / "runs" / "callback"
    train, evaluation = classification_tasks()
    args = _args(output_dir, fake_hub.token, cls=TrainingArguments, hub_strategy="checkpoint")
    trainer = Trainer(model, args, train_dataset=train["a"])
    MagMaxCallback(trainer, eval_datasets=evaluation, scaling_coef=0.5)
    for dataset in train.values():
        trainer.train_dataset = dataset
        trainer.train()
    trainer.push_to_hub()

    names = {name for _, name, _ in _arrived(fake_hub)}
    assert {"model.safetensors", "continual_results.json", "training_args.bin"} <= names
    assert "last-checkpoint/trainer_state.json" in names
    assert not [n for n in names if n.startswith(("task-", "magmax_base"))], sorted(names)
    assert _leaks(fake_hub, [*_local_paths(output_dir, folder), fake_hub.token]) == ""
    published = _published_args(fake_hub.repos[REPO].files["training_args.bin"])
    assert type(published) is TrainingArguments and published.output_dir == "callback"


def test_the_sft_trainer_publishes_no_local_path(tmp_path, fake_hub):  # noqa: F811
    pytest.importorskip("trl")
    from tiny_tasks import sft_tasks, tiny_sft_config, tiny_sft_llama, tiny_sft_tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_magmax import MagMaxSFTConfig, MagMaxSFTTrainer

    folder = tmp_path / "models" / "tiny-llama-pretrained"
    tokenizer = tiny_sft_tokenizer()
    tiny_sft_llama(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    output_dir = tmp_path / "runs" / "sft"
    train, evaluation = sft_tasks("prompt_completion", 2)
    hub = dict(push_to_hub=True, hub_model_id=REPO, hub_token=fake_hub.token, hub_strategy="checkpoint")
    trainer = MagMaxSFTTrainer(
        AutoModelForCausalLM.from_pretrained(folder),
        tiny_sft_config(output_dir, **hub),
        processing_class=AutoTokenizer.from_pretrained(folder),
        train_datasets=train,
        eval_datasets=evaluation,
    )
    trainer.train()
    trainer.push_to_hub()

    names = {name for _, name, _ in _arrived(fake_hub)}
    assert {"model.safetensors", "tokenizer.json", "continual_results.json", "training_args.bin"} <= names
    assert "last-checkpoint/trainer_state.json" in names
    assert not [n for n in names if n.startswith(("task-", "magmax_base"))], sorted(names)
    assert _leaks(fake_hub, [*_local_paths(output_dir, folder), fake_hub.token]) == ""
    published = _published_args(fake_hub.repos[REPO].files["training_args.bin"])
    assert type(published) is MagMaxSFTConfig and published.output_dir == "sft" and published.max_length == 32


def test_a_refused_checkpoint_push_is_a_warning_and_training_goes_on(tmp_path, local_model, fake_hub, caplog):  # noqa: F811
    """transformers pushes checkpoints in the background during training: a refused one is skipped with one warning
    naming the file (a continual run can take days); the final `push_to_hub()` refuses the same way."""
    model, _ = local_model
    output_dir = tmp_path / "runs" / "continual"
    output_dir.mkdir(parents=True)
    secret = tmp_path / "home" / "id_rsa"
    secret.parent.mkdir()
    secret.write_text("private key")
    (output_dir / "notes.txt").symlink_to(secret)
    train, evaluation = classification_tasks()
    trainer = MagMaxTrainer(model, _args(output_dir, fake_hub.token), train_datasets=train, eval_datasets=evaluation)
    with caplog.at_level("WARNING", logger="hf_magmax.trainer.trainer"):
        trainer.train()
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Checkpoint push skipped")]
    assert len(skipped) == 4 and all("notes.txt" in m and "symbolic link" in m for m in skipped), skipped
    assert trainer.continual_results["task_names"] == ["a", "b"]  # the run finished
    with pytest.raises(HubPushError, match=r"notes.txt.*symbolic link"):
        trainer.push_to_hub()
    assert fake_hub.repos[REPO].commits == [] and _leaks(fake_hub, ["private key"]) == ""


def test_hf_magmax_push_leaves_a_training_args_pickle_out(tmp_path, fake_hub, caplog):  # noqa: F811
    """Outside a Trainer there are no in-memory args to re-serialize: `training_args.bin`, a pickle that cannot be
    checked for local paths, is left out of the push with one line saying why."""
    from hf_magmax import push_to_hub

    folder = tmp_path / "run"
    tiny_bert().save_pretrained(folder)
    torch.save(TrainingArguments(output_dir=str(folder), hub_token="hf_secret"), folder / "training_args.bin")
    with caplog.at_level("INFO", logger="hf_magmax.hub"):
        push_to_hub(folder, "me/run")
    assert set(fake_hub.repos["me/run"].files) == {"config.json", "model.safetensors"}
    assert any("training_args.bin is left out of the push" in r.getMessage() for r in caplog.records)


def test_public_training_args_replaces_every_local_path_and_token(tmp_path):
    from hf_magmax.hub import public_training_args

    ds_config = tmp_path / "configs" / "zero3.json"
    args = TrainingArguments(output_dir=str(tmp_path / "runs" / "out"), hub_token="hf_secret", report_to="none")
    args.deepspeed = str(ds_config)  # as `deepspeed=` leaves it (a path), without needing DeepSpeed here
    args.fsdp_config = {"xla": False, "dump_dir": [str(tmp_path / "dumps")], "min_num_params": 0}
    public = _published_args(public_training_args(args))
    assert public.output_dir == "out" and public.deepspeed == "zero3.json" and public.hub_token is None
    assert public.fsdp_config == {"xla": False, "dump_dir": ["dumps"], "min_num_params": 0}
    assert public.report_to == args.report_to and public.learning_rate == args.learning_rate
    assert args.output_dir == str(tmp_path / "runs" / "out") and args.hub_token == "hf_secret"  # args unchanged


def test_training_args_that_still_hold_a_local_path_are_left_out(tmp_path, caplog):
    """A path in an attribute that is not rewritten (inside another object): the file is left out, with one warning
    naming it; the model does not need it, so the rest of the push goes on."""
    import types

    from hf_magmax.hub import public_training_args, publishable_files

    folder = tmp_path / "runs" / "out"
    tiny_bert().save_pretrained(folder)
    args = TrainingArguments(output_dir=str(folder), report_to="none")
    torch.save(args, folder / "training_args.bin")
    assert [op.path_in_repo for op in publishable_files(folder, training_args=public_training_args(args))] == [
        "config.json",
        "model.safetensors",
        "training_args.bin",
    ]
    args.plugin = types.SimpleNamespace(cache_dir=str(folder / "cache"))
    with caplog.at_level("WARNING", logger="hf_magmax.hub"):
        operations = publishable_files(folder, training_args=public_training_args(args))
    assert [op.path_in_repo for op in operations] == ["config.json", "model.safetensors"]
    (line,) = [r.getMessage() for r in caplog.records]
    assert "training_args.bin is left out of the push" in line and repr(str(folder)) in line


def test_local_paths_under_known_keys_are_rewritten_at_any_depth(tmp_path):
    """A recipe's `results.json` records the TrainingArguments and the script arguments nested: their local paths are
    published by folder name; Hub ids and other strings (a tokenizer's `/`-tokens) are left as they are."""
    from hf_magmax.hub import publishable_files

    folder = tmp_path / "runs" / "out"
    folder.mkdir(parents=True)
    results = {
        "training_args": {"output_dir": str(folder), "deepspeed": {"zero_optimization": {"stage": 3}}},
        "script_args": {"model_name_or_path": str(tmp_path / "models" / "bert"), "tasks": [{"dataset": "./data/a"}]},
        "hub": {"model_name_or_path": "org/bert", "merges": ["/ h", "/home"]},
    }
    (folder / "results.json").write_text(json.dumps(results))
    (operation,) = publishable_files(folder)
    public = json.loads(operation.path_or_fileobj)
    assert public["training_args"] == {"output_dir": "out", "deepspeed": {"zero_optimization": {"stage": 3}}}
    assert public["script_args"] == {"model_name_or_path": "bert", "tasks": [{"dataset": "a"}]}
    assert public["hub"] == results["hub"]


def test_a_run_whose_revision_pushes_failed_is_pushed_without_local_paths(tmp_path, local_model, fake_hub):  # noqa: F811
    """`continual_results.json` records a failed per-task push with the kept folder and the command that pushes it
    (local paths inside `output_dir`): the final push names them relative to the run's folder."""
    model, folder = local_model
    output_dir = tmp_path / "runs" / "continual"
    train, evaluation = classification_tasks()
    args = _args(output_dir, fake_hub.token, save_strategy="no", push_every_task=True)
    trainer = MagMaxTrainer(model, args, train_datasets=train, eval_datasets=evaluation)
    fake_hub.fail_commits = True
    trainer.train()
    records = trainer.continual_results["hub_revisions"]
    assert [r["status"] for r in records] == ["failed", "failed"] and str(output_dir) in records[0]["retry"]
    fake_hub.fail_commits = False
    trainer.push_to_hub()

    assert _leaks(fake_hub, [*_local_paths(output_dir, folder), fake_hub.token]) == ""
    published = json.loads(fake_hub.repos[REPO].files["continual_results.json"])["hub_revisions"]
    assert published[0]["folder"] == "continual/magmax_releases/after-task-1"
    assert "continual/magmax_releases/after-task-1" in published[0]["retry"]
