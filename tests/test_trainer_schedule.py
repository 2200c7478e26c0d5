"""Per-task schedules: `num_train_epochs_per_task` / `max_steps_per_task` give each task its own length and LR schedule."""

import pytest
import torch
from tiny_tasks import classification_task, tiny_bert
from transformers import TrainerCallback

from hf_magmax.trainer import MagMaxConfig, MagMaxTrainer


class Steps(TrainerCallback):
    """Records each task's optimizer steps (as `TrainerState.max_steps` saw them) and crashes where asked."""

    def __init__(self, crash_at=None):
        self.max_steps, self.steps, self.crash_at = [], [], crash_at

    def on_train_begin(self, args, state, control, **kwargs):
        self.max_steps.append(state.max_steps)
        self.steps.append(0)

    def on_step_end(self, args, state, control, **kwargs):
        self.steps[-1] += 1
        if self.crash_at == (len(self.steps) - 1, state.global_step):
            raise KeyboardInterrupt("simulated crash")


def tasks():
    return {"a": classification_task([0, 1], 8, seed=1), "b": classification_task([2, 3], 8, seed=2)}


def config(output_dir, **kwargs):
    defaults = dict(per_device_train_batch_size=4, learning_rate=1e-2, report_to="none", use_cpu=True, seed=0)
    defaults.update(disable_tqdm=True, save_strategy="no")
    return MagMaxConfig(output_dir=str(output_dir), **{**defaults, **kwargs})


def test_epochs_per_task_set_each_task_length_and_restore_the_args(tmp_path):
    steps = Steps()
    args = config(tmp_path, num_train_epochs=1, num_train_epochs_per_task=[3, 1])
    trainer = MagMaxTrainer(tiny_bert(), args, train_datasets=tasks(), callbacks=[steps])
    output = trainer.train()
    assert steps.max_steps == [6, 2] and steps.steps == [6, 2]  # 8 examples / batch 4 = 2 steps per epoch
    assert output.global_step == 8
    assert trainer.args.num_train_epochs == 1 and trainer.args.max_steps == -1


def test_max_steps_per_task_wins_and_a_resumed_task_runs_its_own_remaining_steps(tmp_path):
    def run(directory, callback, resume=None):
        args = config(directory, max_steps=100, max_steps_per_task=[3, 5], save_strategy="steps", save_steps=2)
        trainer = MagMaxTrainer(tiny_bert(), args, train_datasets=tasks(), callbacks=[callback])
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    reference_steps = Steps()
    reference = run(tmp_path / "reference", reference_steps)
    assert reference_steps.max_steps == [3, 5] and reference_steps.steps == [3, 5]

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "crashed", Steps(crash_at=(1, 3)))  # task b crashes after its checkpoint-2
    resumed_steps = Steps()
    resumed = run(tmp_path / "crashed", resumed_steps, resume=True)
    assert resumed_steps.max_steps == [5] and resumed_steps.steps == [3]  # task b: steps 3, 4, 5 of its own 5
    expected = reference.model.state_dict()
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, expected[name]), name


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_train_epochs_per_task": [1, 0]}, r"`num_train_epochs_per_task`\[1\] must be a positive number"),
        ({"max_steps_per_task": [2, 1.5]}, r"`max_steps_per_task`\[1\] must be a positive integer"),
        ({"max_steps_per_task": []}, "`max_steps_per_task` is empty"),
        ({"max_steps_per_task": "3"}, "one entry per task"),
    ],
)
def test_bad_per_task_schedules_are_config_errors(tmp_path, kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        config(tmp_path, **kwargs)


def test_a_per_task_schedule_of_the_wrong_length_names_the_option(tmp_path):
    args = config(tmp_path, num_train_epochs_per_task=[1, 2, 3])
    with pytest.raises(ValueError, match="`num_train_epochs_per_task` has 3 entries but there are 2 tasks"):
        MagMaxTrainer(tiny_bert(), args, train_datasets=tasks())
