# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""MagMaxTrainer faults: resume falls back to the last complete checkpoint, corrupt files are one-line errors that
name the file, bad inputs are refused before the first step, and non-finite task vectors are never merged."""

import json
import shutil

import pytest
import torch
from tiny_tasks import Crash, classification_task, classification_tasks, tiny_bert, tiny_config
from transformers import TrainerCallback

from hf_magmax.trainer import (
    BASE_WEIGHTS_NAME,
    MERGE_STATE_NAME,
    STATE_NAME,
    CheckpointError,
    MagMaxCallback,
    MagMaxTrainer,
)


class Steps(TrainerCallback):
    def __init__(self):
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


class NoStep(TrainerCallback):
    def on_step_begin(self, *args, **kwargs):
        raise AssertionError("a training step ran before the input was checked")


def three_tasks():
    return {
        "a": classification_task([0, 1], 16, seed=1),
        "b": classification_task([2, 3], 16, seed=2),
        "c": classification_task([0, 3], 16, seed=3),
    }


def make_args(output_dir, **kwargs):
    return tiny_config(output_dir, **kwargs)


def run(output_dir, callbacks=(), resume=None):
    trainer = MagMaxTrainer(
        tiny_bert(), make_args(output_dir), train_datasets=three_tasks(), callbacks=list(callbacks)
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.fixture(scope="module")
def crashed(tmp_path_factory):
    """A reference run, and a run killed in task b at step 3 (task-01-b/checkpoint-2 is its newest checkpoint)."""
    root = tmp_path_factory.mktemp("faults")
    reference = {k: v.clone() for k, v in run(root / "reference").model.state_dict().items()}
    with pytest.raises(KeyboardInterrupt):
        run(root / "crashed", callbacks=[Crash(task=1, step=2)])
    assert (root / "crashed" / "task-01-b" / "checkpoint-2" / STATE_NAME).is_file()
    return root, reference


def _copy_crashed(crashed, tmp_path):
    root, reference = crashed
    out = tmp_path / "out"
    shutil.copytree(root / "crashed", out)
    return out, reference


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage", ["no_state", "truncated_state", "truncated_merge_state"])
def test_resume_falls_back_to_the_last_complete_checkpoint_of_the_same_task(crashed, tmp_path, damage):
    out, reference = _copy_crashed(crashed, tmp_path)
    # a newer checkpoint of task b, left incomplete or corrupt by a kill while saving
    newest = out / "task-01-b" / "checkpoint-3"
    shutil.copytree(out / "task-01-b" / "checkpoint-2", newest)
    if damage == "no_state":
        (newest / STATE_NAME).unlink()
    elif damage == "truncated_state":
        _truncate(newest / STATE_NAME)
    else:
        _truncate(newest / MERGE_STATE_NAME)
    steps = Steps()
    resumed = run(out, callbacks=[steps], resume=True)
    # resumed at task b step 2: 2 steps of b and 4 of c (not task b again from the start: 4 + 4)
    assert steps.steps == 6
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, reference[name]), name


class _Payload:
    """A pickle that would run a command when unpickled without `weights_only`."""

    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED",))


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"])
@pytest.mark.parametrize("damage", ["truncated", "malicious"])
def test_resume_falls_back_when_a_file_trainer_reads_is_damaged(crashed, tmp_path, monkeypatch, name, damage):
    out, reference = _copy_crashed(crashed, tmp_path)
    newest = out / "task-01-b" / "checkpoint-3"
    shutil.copytree(out / "task-01-b" / "checkpoint-2", newest)
    assert (newest / name).is_file()
    if damage == "truncated":
        _truncate(newest / name)
    elif name.endswith(".safetensors"):  # a header that claims more data than the file holds
        data = (newest / name).read_bytes()
        (newest / name).write_bytes(data[:-16])
    else:
        torch.save({"state": _Payload()}, newest / name)
    monkeypatch.chdir(tmp_path)
    steps = Steps()
    resumed = run(out, callbacks=[steps], resume=True)  # task-01-b/checkpoint-2, not the damaged checkpoint-3
    assert steps.steps == 6
    assert not (tmp_path / "PWNED").exists()
    for key, value in resumed.model.state_dict().items():
        assert torch.equal(value, reference[key]), key
    # named explicitly, the damaged checkpoint is one error naming the file, before any step
    trainer = MagMaxTrainer(tiny_bert(), make_args(out), train_datasets=three_tasks(), callbacks=[NoStep()])
    with pytest.raises(CheckpointError, match=name) as info:
        trainer.train(resume_from_checkpoint=str(newest))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", [STATE_NAME, MERGE_STATE_NAME, BASE_WEIGHTS_NAME])
def test_a_truncated_checkpoint_file_is_one_error_naming_it(crashed, tmp_path, name):
    out, _ = _copy_crashed(crashed, tmp_path)
    checkpoint = out / "task-01-b" / "checkpoint-2"
    # θ_0 lives once per run (output_dir/magmax_base/), the rest in the checkpoint
    _truncate(out / name if name == BASE_WEIGHTS_NAME else checkpoint / name)
    trainer = MagMaxTrainer(tiny_bert(), make_args(out), train_datasets=three_tasks(), callbacks=[NoStep()])
    with pytest.raises(CheckpointError, match=name) as info:
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert "\n" not in str(info.value) and "truncated or corrupt" in str(info.value)


@pytest.mark.parametrize("damage", ["missing", "replaced"])
def test_resume_checks_the_runs_base_file_against_the_checkpoints_hash(crashed, tmp_path, damage):
    out, _ = _copy_crashed(crashed, tmp_path)
    checkpoint = out / "task-01-b" / "checkpoint-2"
    base = out / BASE_WEIGHTS_NAME
    if damage == "missing":
        base.unlink()
        message = "is missing"
    else:  # a θ_0 file of the same size and layout, but other values
        from safetensors.torch import load_file, save_file

        save_file({k: v + 1 for k, v in load_file(base).items()}, base)
        message = "sha256 .* is not the .* that the checkpoint"
    trainer = MagMaxTrainer(tiny_bert(), make_args(out), train_datasets=three_tasks(), callbacks=[NoStep()])
    with pytest.raises(CheckpointError, match=message) as info:
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert "\n" not in str(info.value) and "magmax_base/model.safetensors" in str(info.value)


def test_resume_with_only_broken_checkpoints_says_so(tmp_path):
    (tmp_path / "task-00-a" / "checkpoint-2").mkdir(parents=True)
    (tmp_path / "task-00-a" / "checkpoint-2" / STATE_NAME).write_text("{")
    trainer = MagMaxTrainer(tiny_bert(), make_args(tmp_path), train_datasets=three_tasks(), callbacks=[NoStep()])
    with pytest.raises(ValueError, match="no complete MagMaxTrainer checkpoint"):
        trainer.train(resume_from_checkpoint=True)


# -- inputs checked before the first step -------------------------------------------------------------------------


def test_bad_inputs_are_refused_before_training(tmp_path):
    train, evaluation = classification_tasks()
    args = make_args(tmp_path, save_strategy="no")

    def build(**kwargs):
        return MagMaxTrainer(tiny_bert(), args, callbacks=[NoStep()], **kwargs)

    no_labels = train["b"].remove_columns("labels")
    with pytest.raises(ValueError, match="task 'b' of `train_datasets` has no label column"):
        build(train_datasets={"a": train["a"], "b": no_labels})
    strings = no_labels.add_column("labels", ["neg", "pos"] * 8)
    with pytest.raises(ValueError, match="task 'b' of `train_datasets` has string labels"):
        build(train_datasets={"a": train["a"], "b": strings})
    with pytest.raises(ValueError, match="`task_classes` for task 'b' has class 7, outside the model's head of 4"):
        build(train_datasets=train, task_classes=[[0, 1], [2, 7]])
    with pytest.raises(ValueError, match="`task_classes` has 1 entries"):
        build(train_datasets=train, task_classes=[[0, 1]])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_merge_device_cuda_without_cuda_is_a_config_error(tmp_path):
    with pytest.raises(ValueError, match="`merge_device` = 'cuda', but this machine has no cuda device"):
        make_args(tmp_path, merge_device="cuda")
    with pytest.raises(ValueError, match="`merge_device`"):
        MagMaxCallback(merge_device="cuda:0")


def test_merge_options_of_another_method_are_errors(tmp_path):
    with pytest.raises(ValueError, match="`merge_density` only applies to `ties`"):
        make_args(tmp_path, merge_method="magmax", merge_density=0.3)
    with pytest.raises(ValueError, match="`merge_seed` only applies to `random_mix`"):
        make_args(tmp_path, merge_method="ties", merge_seed=1)
    assert make_args(tmp_path, merge_method="ties").merge_density is None  # the method's default, 0.2


class Diverge(TrainerCallback):
    """Puts a NaN into one weight at the end of task `task` (a diverged run)."""

    def __init__(self, task):
        self.task, self.seen = task, -1

    def on_train_begin(self, args, state, control, **kwargs):
        self.seen += 1

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.seen == self.task and state.global_step == state.max_steps:
            with torch.no_grad():
                model.classifier.weight[0, 0] = float("nan")


def test_a_non_finite_task_vector_is_an_error_naming_task_and_tensor(tmp_path):
    train, _ = classification_tasks()
    args = make_args(tmp_path, save_strategy="no", max_steps=2)
    trainer = MagMaxTrainer(tiny_bert(), args, train_datasets=train, callbacks=[Diverge(task=1)])
    with pytest.raises(ValueError, match=r"task 'b' has 1 non-finite value.*'classifier\.weight'"):
        trainer.train()
    assert trainer._magmax.state.num_tasks == 1  # task a merged, task b not


def test_results_file_round_trip_is_json(crashed):
    root, _ = crashed
    with open(root / "crashed" / "task-01-b" / "checkpoint-2" / STATE_NAME) as f:
        state = json.load(f)
    assert state["task"] == 1 and state["method"] == "magmax" and state["method_kwargs"] == {}
