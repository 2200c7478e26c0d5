# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""Every door gives the same merge: for every method, in fp32 and bf16, bit for bit (`torch.equal`).

The reference is the in-memory engine: `TaskVector.from_state_dicts(θ_0, θ_t)` for each task's end weights →
`merge_task_vectors(spec)` → `apply_to(θ_0)`. Each door is a `*_door(method, dtype, tmp_path)` function returning
`(θ_0, [θ_1..θ_T], final weights)`; the streaming merge (`cli_door`) merges the same θ_t saved as checkpoints, and
`test_trainer_cli_and_engine_doors_agree` compares all three.
"""

import pytest
import torch
from safetensors.torch import load_file
from tiny_tasks import classification_tasks, tiny_bert
from transformers import TrainerCallback

from hf_magmax import TaskVector, merge_checkpoints, merge_task_vectors
from hf_magmax.merging import MergeSpec
from hf_magmax.trainer import MagMaxConfig, MagMaxTrainer


#: One spec per method, with non-default options where the method has them (so the options reach every door).
SPECS = {
    "magmax": MergeSpec("magmax"),
    "average": MergeSpec("average"),
    "task_arithmetic": MergeSpec("task_arithmetic", scaling_coef=0.7),
    "ties": MergeSpec("ties", density=0.3),
    "random_mix": MergeSpec("random_mix", seed=7),
    "opcm": MergeSpec("opcm", alpha=0.3),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def engine_merge(theta_0, thetas, spec):
    """The in-memory engine: τ_t from each task's end weights, merged with `spec`, applied to θ_0."""
    task_vectors = [TaskVector.from_state_dicts(theta_0, theta) for theta in thetas]
    return merge_task_vectors(task_vectors, spec).apply_to(theta_0)


class EndOfTask(TrainerCallback):
    """θ_t after every task (a copy of the weights the Trainer folds)."""

    def __init__(self):
        self.thetas = []

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.thetas.append({k: v.detach().clone() for k, v in model.state_dict().items()})


def trainer_door(method, dtype, tmp_path):
    """MagMaxTrainer over two tasks; returns θ_0, θ_1..θ_T and the final (merged) weights."""
    spec = SPECS[method]
    model = tiny_bert().to(DTYPES[dtype])
    theta_0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    args = MagMaxConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=5e-2,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        merge_method=spec.method,
        scaling_coef=spec.scaling_coef,
        merge_density=spec.density,
        merge_seed=spec.seed,
        merge_alpha=spec.alpha,
    )
    train, _ = classification_tasks()
    end = EndOfTask()
    trainer = MagMaxTrainer(model, args, train_datasets=train, callbacks=[end])
    trainer.train()
    return theta_0, end.thetas, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def cli_door(theta_0, thetas, spec, dtype, tmp_path):
    """The streaming merge (`hf-magmax merge`'s engine) of θ_0..θ_T saved as transformers checkpoints."""
    paths = []
    for i, theta in enumerate([theta_0, *thetas]):
        model = tiny_bert().to(DTYPES[dtype])
        model.load_state_dict(theta)
        model.save_pretrained(tmp_path / f"theta_{i}")
        paths.append(str(tmp_path / f"theta_{i}"))
    out = merge_checkpoints(
        paths[0],
        paths[1:],
        tmp_path / "merged",
        method=spec.method,
        scaling_coef=spec.scaling_coef,
        density=spec.density,
        seed=spec.seed,
        alpha=spec.alpha,
        show_progress=False,
    )
    return load_file(out / "model.safetensors")


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("method", sorted(SPECS))
def test_trainer_cli_and_engine_doors_agree(method, dtype, tmp_path):
    theta_0, thetas, final = trainer_door(method, dtype, tmp_path)
    assert len(thetas) == 2
    expected = engine_merge(theta_0, thetas, SPECS[method])
    assert set(expected) == set(final)
    changed = 0
    for name, value in expected.items():
        assert final[name].dtype == value.dtype == theta_0[name].dtype, name
        assert torch.equal(final[name], value), f"{method} {dtype}: {name} differs from the engine's merge"
        changed += not torch.equal(value, theta_0[name])
    assert changed > 10  # the merge moved the weights: the comparison is not θ_0 against θ_0
    streamed = cli_door(theta_0, thetas, SPECS[method], dtype, tmp_path)
    floating = {name for name, value in expected.items() if value.is_floating_point()}
    assert floating <= set(streamed)
    for name in sorted(floating):
        assert torch.equal(streamed[name], final[name]), f"{method} {dtype}: {name}: the streaming merge differs"
