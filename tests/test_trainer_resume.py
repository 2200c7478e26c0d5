"""MagMaxTrainer checkpoints carry the task index, θ_0, the running merge and the matrices; resume is exact."""

import hashlib
import json

import pytest
import torch
from tiny_tasks import Crash, classification_task, tiny_bert, tiny_config  # noqa: E402

from hf_magmax.trainer import BASE_WEIGHTS_NAME, MERGE_STATE_NAME, STATE_NAME, MagMaxConfig, MagMaxTrainer


def tasks():
    train = {
        "a": classification_task([0, 1], 16, seed=1),
        "b": classification_task([2, 3], 16, seed=2),
        "c": classification_task([0, 3], 16, seed=3),
    }
    evaluation = {
        name: classification_task(ds.unique("labels"), 8, seed=10 + i) for i, (name, ds) in enumerate(train.items())
    }
    return train, evaluation


def run(output_dir, callbacks=(), resume=None, method="magmax"):
    train, evaluation = tasks()
    args = tiny_config(output_dir, merge_method=method)
    trainer = MagMaxTrainer(
        tiny_bert(), args, train_datasets=train, eval_datasets=evaluation, callbacks=list(callbacks)
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.mark.parametrize("method", ["magmax", "random_mix"])
def test_resume_in_the_middle_of_a_task_gives_the_same_merge(tmp_path, method):
    reference = run(tmp_path / "reference", method=method)

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "crashed", callbacks=[Crash(task=1, step=2)], method=method)
    checkpoint = tmp_path / "crashed" / "task-01-b" / "checkpoint-2"
    for name in (STATE_NAME, MERGE_STATE_NAME):
        assert (checkpoint / name).is_file(), name
    # θ_0 is written once per run, and each checkpoint records its file and sha256
    base = tmp_path / "crashed" / BASE_WEIGHTS_NAME
    assert base.is_file() and not list(checkpoint.glob("*base*"))
    with open(checkpoint / STATE_NAME) as f:
        state = json.load(f)
    assert state["task"] == 1 and state["num_tasks_done"] == 1
    assert state["base"]["sha256"] == hashlib.sha256(base.read_bytes()).hexdigest()
    assert (checkpoint / state["base"]["file"]).resolve() == base.resolve()
    assert not (tmp_path / "crashed" / "task-02-c").exists()

    resumed = run(tmp_path / "crashed", resume=True, method=method)  # finds task-01-b/checkpoint-2
    expected = reference.model.state_dict()
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, expected[name]), name
    ours, theirs = resumed.continual_results, reference.continual_results
    for kind in ("sequential", "merged"):
        assert ours[kind]["matrix"] == theirs[kind]["matrix"]


def test_resume_from_a_checkpoint_of_another_sequence_is_rejected(tmp_path):
    run(tmp_path / "first")
    train, _ = tasks()
    args = MagMaxConfig(output_dir=str(tmp_path / "x"), max_steps=4, report_to="none", use_cpu=True)
    other = MagMaxTrainer(tiny_bert(), args, train_datasets={"z": train["a"], "b": train["b"], "c": train["c"]})
    with pytest.raises(ValueError, match="same task sequence"):
        other.train(resume_from_checkpoint=str(tmp_path / "first" / "task-01-b" / "checkpoint-2"))
    with pytest.raises(FileNotFoundError, match="not a MagMaxTrainer checkpoint"):
        other.train(resume_from_checkpoint=str(tmp_path))


def test_a_resumed_run_writes_the_same_provenance_bytes(tmp_path):
    """`magmax_provenance.json` of a resumed run is byte-identical to an uninterrupted run's (same keys, same order:
    a run resumed in its first task makes its winner maps in the order of θ_0 read back, not the model's)."""

    def run_with_provenance(output_dir, callbacks=(), resume=None):
        train, evaluation = tasks()
        args = tiny_config(output_dir, save_provenance=True)
        trainer = MagMaxTrainer(tiny_bert(), args, train_datasets=train, callbacks=list(callbacks))
        trainer.train(resume_from_checkpoint=resume)

    run_with_provenance(tmp_path / "reference")
    with pytest.raises(KeyboardInterrupt):
        run_with_provenance(tmp_path / "crashed", callbacks=[Crash(task=0, step=2)])  # before any fold
    run_with_provenance(tmp_path / "crashed", resume=True)
    name = "magmax_provenance.json"
    assert (tmp_path / "crashed" / name).read_bytes() == (tmp_path / "reference" / name).read_bytes()
