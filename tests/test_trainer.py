"""MagMaxTrainer / MagMaxConfig / MagMaxCallback: task loop, merge, matrices, logs, card, bad input, auto λ."""

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from tiny_tasks import classification_task, classification_tasks, lm_task, tiny_bert, tiny_llama  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_magmax import TaskVector, merge_task_vectors
from hf_magmax.trainer import MagMaxCallback, MagMaxConfig, MagMaxTrainer


def make_args(tmp_path, **kwargs):
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    defaults.update(kwargs)
    return MagMaxConfig(**defaults)


class Recorder(TrainerCallback):
    """Weights after every task, the LR at every step, every log."""

    def __init__(self):
        self.snapshots, self.lrs, self.logs, self.optimizers = [], [], [], []

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.lrs.append([])
        self.optimizers.append((id(optimizer), len(optimizer.state)))

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self.lrs[-1].append(optimizer.param_groups[0]["lr"])

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def engine_merge(base, snapshots, method="magmax", scaling_coef=0.5, **kwargs):
    tvs = [TaskVector.from_state_dicts(base, s) for s in snapshots]
    return merge_task_vectors(tvs, method=method, scaling_coef=scaling_coef, **kwargs).apply_to(base)


@pytest.mark.parametrize("method", ["magmax", "ties"])
def test_final_weights_equal_engine_merge_of_per_task_checkpoints(tmp_path, method):
    train, evaluation = classification_tasks()
    model = tiny_bert()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    recorder = Recorder()
    args = make_args(tmp_path, merge_method=method, scaling_coef=0.5)
    trainer = MagMaxTrainer(model, args, train_datasets=train, eval_datasets=evaluation, callbacks=[recorder])
    output = trainer.train()

    assert len(recorder.snapshots) == 2
    # task 2 started from the weights after task 1
    assert not torch.equal(recorder.snapshots[0]["classifier.weight"], base["classifier.weight"])
    expected = engine_merge(base, recorder.snapshots, method=method, scaling_coef=0.5)
    final = trainer.model.state_dict()
    for name, value in expected.items():
        assert torch.equal(final[name], value), name
    assert output.global_step == 6
    assert output.metrics["scaling_coef"] == 0.5


def test_sequential_final_model_and_merge_device_state_is_one_tensor_set(tmp_path):
    train, _ = classification_tasks()
    model = tiny_bert()
    recorder = Recorder()
    args = make_args(tmp_path, final_model="sequential")
    trainer = MagMaxTrainer(model, args, train_datasets=train, callbacks=[recorder])
    trainer.train()
    for name, value in recorder.snapshots[-1].items():
        assert torch.equal(trainer.model.state_dict()[name], value), name
    # θ_0 (memory-mapped from output_dir/magmax_base/) and θ_best, one tensor per parameter in the model's dtype, on
    # the CPU: no per-task copies, no fp32 τ
    run = trainer._magmax.state
    assert run.num_tasks == 2 and run.base_file == str(tmp_path / "out" / "magmax_base" / "model.safetensors")
    assert all(t.device.type == "cpu" for t in run.base.values())
    assert not run.accumulators and set(run.best) == set(run.base)
    assert all(run.best[name].dtype == run.base[name].dtype for name in run.base)
    assert run.resident_bytes()["base"] == 0


def test_fresh_optimizer_and_lr_schedule_every_task(tmp_path):
    train, _ = classification_tasks()
    recorder = Recorder()
    args = make_args(tmp_path, max_steps=4, learning_rate=1e-2, lr_scheduler_type="linear")
    MagMaxTrainer(tiny_bert(), args, train_datasets=train, callbacks=[recorder]).train()
    assert len(recorder.lrs) == 2
    for lrs in recorder.lrs:  # the schedule restarts at the peak and decays within each task
        assert lrs[0] == pytest.approx(1e-2)
        assert lrs == sorted(lrs, reverse=True) and lrs[-1] < lrs[0]
    (first_id, first_state), (second_id, second_state) = recorder.optimizers
    assert first_id != second_id and first_state == 0 and second_state == 0  # new optimizer, no Adam moments


def test_matrices_json_logs_and_model_card(tmp_path):
    train, evaluation = classification_tasks()
    recorder = Recorder()
    args = make_args(tmp_path)
    trainer = MagMaxTrainer(tiny_bert(), args, train_datasets=train, eval_datasets=evaluation, callbacks=[recorder])
    trainer.train()

    with open(tmp_path / "out" / "continual_results.json") as f:
        results = json.load(f)
    assert results["task_names"] == ["a", "b"]
    assert results["method"] == "magmax" and results["scaling_coef"] == 0.5 and results["metric"] == "accuracy"
    seq, merged = results["sequential"]["matrix"], results["merged"]["matrix"]
    assert len(seq) == 3 and all(len(row) == 2 for row in seq)
    assert seq[0] == merged[0]  # row 0: θ_0
    assert all(v is not None and 0.0 <= v <= 1.0 for row in seq + merged for v in row)
    for kind in ("sequential", "merged"):
        assert set(results[kind]["metrics"]) == {
            "final_average_accuracy",
            "average_incremental_accuracy",
            "forgetting",
            "backward_transfer",
            "forward_transfer",
        }
    assert results["sequential"]["metrics"]["final_average_accuracy"] == pytest.approx(sum(seq[2]) / 2)

    # the same values went through Trainer.log (so every report_to integration sees them)
    logged = {k: v for log in recorder.logs for k, v in log.items() if k.startswith("continual/")}
    assert logged["continual/seq/a"] == seq[2][0] and logged["continual/merged/b"] == merged[2][1]
    assert "continual/merged/final_average_accuracy" in logged
    history = trainer.state.log_history  # every task's logs, not only the last task's
    assert sum("train_loss" in log for log in history) == 2 and "continual/base/a" in history[0] | history[1]

    # the accuracy matrix is the accuracy of the model on the eval set
    trainer.save_model(str(tmp_path / "final"))
    card = (tmp_path / "final" / "README.md").read_text()
    for text in ("magmax", "continual-learning", "1. a", "2. b", "scaling_coef: 0.5", "| θ_0 |"):
        assert text in card


def test_merged_row_is_accuracy_of_engine_merged_model(tmp_path):
    train, evaluation = classification_tasks()
    model = tiny_bert()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    recorder = Recorder()
    args = make_args(tmp_path, learning_rate=2e-2, max_steps=6)
    trainer = MagMaxTrainer(model, args, train_datasets=train, eval_datasets=evaluation, callbacks=[recorder])
    trainer.train()
    merged = engine_merge(base, recorder.snapshots)
    check = tiny_bert()
    check.load_state_dict(merged)
    check.eval()
    for i, name in enumerate(["a", "b"]):
        ds = evaluation[name]
        with torch.no_grad():
            logits = check(input_ids=torch.tensor(ds["input_ids"]), attention_mask=torch.tensor(ds["attention_mask"]))
        accuracy = (logits.logits.argmax(-1) == torch.tensor(ds["labels"])).float().mean().item()
        assert trainer.continual_results["merged"]["matrix"][2][i] == pytest.approx(accuracy)


def test_restrict_loss_to_task_classes_leaves_other_heads_untouched(tmp_path):
    train, _ = classification_tasks()
    model = tiny_bert()
    head0 = model.classifier.weight.detach().clone()
    recorder = Recorder()
    args = make_args(tmp_path, restrict_loss_to_task_classes=True, final_model="sequential", weight_decay=0.0)
    MagMaxTrainer(model, args, train_datasets=train, callbacks=[recorder]).train()
    after_a = recorder.snapshots[0]["classifier.weight"]
    assert torch.equal(after_a[2:], head0[2:])  # classes of task b: no gradient during task a
    assert not torch.equal(after_a[:2], head0[:2])


def test_frozen_modules_are_frozen_and_outside_the_task_vector(tmp_path):
    train, _ = classification_tasks()
    model = tiny_bert()
    head = {k: v.clone() for k, v in model.classifier.state_dict().items()}
    args = make_args(tmp_path, frozen_modules=["classifier"])
    trainer = MagMaxTrainer(model, args, train_datasets=train)
    assert not any(p.requires_grad for p in model.classifier.parameters())
    trainer.train()
    assert not any(name.startswith("classifier.") for name in trainer._magmax.state.base)
    for k, v in model.classifier.state_dict().items():
        assert torch.equal(v, head[k])


def test_causal_lm_uses_neg_loss(tmp_path):
    train = {"x": lm_task(4, seed=1), "y": lm_task(10, seed=2)}
    evaluation = {"x": lm_task(4, seed=3), "y": lm_task(10, seed=4)}
    args = make_args(tmp_path, max_steps=2)
    trainer = MagMaxTrainer(tiny_llama(), args, train_datasets=train, eval_datasets=evaluation)
    trainer.train()
    results = trainer.continual_results
    assert results["metric"] == "neg_loss"
    assert all(v < 0 for row in results["sequential"]["matrix"] for v in row)


def test_callback_path_equals_trainer_path(tmp_path):
    train, evaluation = classification_tasks()
    trainer = MagMaxTrainer(tiny_bert(), make_args(tmp_path / "t"), train_datasets=train, eval_datasets=evaluation)
    trainer.train()

    plain_args = TrainingArguments(**{k: v for k, v in make_args(tmp_path / "c").to_dict().items() if k in _TA_FIELDS})
    plain = Trainer(tiny_bert(), plain_args, train_dataset=train["a"])
    callback = MagMaxCallback(plain, eval_datasets=evaluation, scaling_coef=0.5)
    for dataset in train.values():
        plain.train_dataset = dataset
        plain.train()

    expected = trainer.model.state_dict()
    for name, value in plain.model.state_dict().items():
        assert torch.equal(value, expected[name]), name
    ours, theirs = trainer.continual_results, callback.results
    for kind in ("sequential", "merged"):
        assert ours[kind]["matrix"] == theirs[kind]["matrix"]
        assert ours[kind]["metrics"] == theirs[kind]["metrics"]
    assert os.path.isfile(tmp_path / "c" / "out" / "continual_results.json")


_TA_FIELDS = {f.name for f in __import__("dataclasses").fields(TrainingArguments) if f.init}


# -- bad input ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"scaling_coef": -1.0}, "`scaling_coef`"),
        ({"scaling_coef": "best"}, "`scaling_coef`"),
        ({"scaling_coef": "auto", "scaling_coef_grid": [0.5, 0.0]}, "`scaling_coef_grid`"),
        ({"validation_fraction": 1.5}, "`validation_fraction`"),
        ({"validation_fraction": 0.0}, "`validation_fraction`"),
        ({"merge_method": "mean"}, "`merge_method`"),
        ({"merge_density": 0.0}, "`merge_density`"),
        ({"final_model": "best"}, "`final_model`"),
        ({"lora_output": "both"}, "`lora_output`"),
        ({"frozen_modules": ["("]}, "`frozen_modules`"),
    ],
)
def test_bad_config(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_args(tmp_path, **kwargs)


class NoStep(TrainerCallback):
    def on_step_begin(self, *args, **kwargs):
        raise AssertionError("a training step ran before the input was checked")


def test_bad_tasks_rejected_before_training(tmp_path):
    train, evaluation = classification_tasks()
    args = make_args(tmp_path)

    def build(**kwargs):
        return MagMaxTrainer(tiny_bert(), args, callbacks=[NoStep()], **kwargs)

    with pytest.raises(ValueError, match="no tasks"):
        build(train_datasets={})
    with pytest.raises(ValueError, match="no tasks"):
        build()
    with pytest.raises(ValueError, match="`eval_datasets` has 1 task"):
        build(train_datasets=train, eval_datasets=[evaluation["a"]])
    with pytest.raises(ValueError, match="same names"):
        build(train_datasets=train, eval_datasets={"b": evaluation["b"], "a": evaluation["a"]})
    with pytest.raises(ValueError, match="empty"):
        build(train_datasets={"a": train["a"], "b": train["b"].select([])})
    with pytest.raises(ValueError, match="label 5 but the model's head has 4 classes"):
        build(train_datasets={"a": train["a"], "c": classification_task([5])})
    with pytest.raises(ValueError, match="`optimizers`"):
        build(train_datasets=train, optimizers=(torch.optim.SGD(tiny_bert().parameters(), lr=0.1), None))


def test_parameter_shape_change_between_tasks_is_rejected(tmp_path):
    train, _ = classification_tasks()
    plain_args = TrainingArguments(**{k: v for k, v in make_args(tmp_path).to_dict().items() if k in _TA_FIELDS})
    model = tiny_bert()
    plain = Trainer(model, plain_args, train_dataset=train["a"])
    MagMaxCallback(plain, num_tasks=2)
    plain.train()
    model.classifier = torch.nn.Linear(16, 6)  # the script resizes the head between tasks
    plain.add_callback(NoStep())
    plain.train_dataset = train["b"]
    with pytest.raises(ValueError, match="classifier.weight.*same shape"):
        plain.train()


# -- λ chosen on validation data ----------------------------------------------------------------------------------


class EvalRecorder(MagMaxTrainer):
    """Records which examples every MagMax evaluation saw (by `example_id`)."""

    seen: dict

    def get_eval_dataloader(self, eval_dataset=None):
        if eval_dataset is not None and not isinstance(eval_dataset, str):
            self._last_ids = set(eval_dataset["example_id"])
        return super().get_eval_dataloader(eval_dataset)

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        self.seen.setdefault(metric_key_prefix.split("_")[1], set()).update(self._last_ids)
        return super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)


def test_auto_scaling_coef_is_validation_argmax_and_matrices_never_see_validation(tmp_path):
    train, evaluation = classification_tasks(num_examples=20)
    model = tiny_bert()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    recorder = Recorder()
    grid = [0.25, 0.5, 1.0]
    args = make_args(
        tmp_path, scaling_coef="auto", scaling_coef_grid=grid, validation_fraction=0.2, learning_rate=2e-2
    )
    EvalRecorder.seen = {}
    trainer = EvalRecorder(model, args, train_datasets=train, eval_datasets=evaluation, callbacks=[recorder])
    validation_ids = [set(ds["example_id"]) for ds in trainer.validation_datasets]
    train_ids = [set(ds["example_id"]) for ds in trainer.train_datasets]
    assert all(len(v) == 4 and len(t) == 16 for v, t in zip(validation_ids, train_ids))  # 20% of 10 per class
    assert all(not (v & t) for v, t in zip(validation_ids, train_ids))
    trainer.train()

    results = trainer.continual_results
    final_search = results["scaling_coef_search"][-1]
    assert final_search["after_task"] == 2
    # recompute the curve by hand: merged model for each λ, mean validation accuracy over both tasks
    curve = {}
    for coef in grid:
        check = tiny_bert()
        check.load_state_dict(engine_merge(base, recorder.snapshots, scaling_coef=coef))
        check.eval()
        accuracies = []
        for ds in trainer.validation_datasets:
            with torch.no_grad():
                logits = check(
                    input_ids=torch.tensor(ds["input_ids"]), attention_mask=torch.tensor(ds["attention_mask"])
                )
            accuracies.append((logits.logits.argmax(-1) == torch.tensor(ds["labels"])).float().mean().item())
        curve[coef] = sum(accuracies) / len(accuracies)
    assert dict((c, s) for c, s in final_search["curve"]) == pytest.approx(curve)
    best = min(curve, key=lambda c: (-curve[c], c))
    assert results["scaling_coef"] == best == final_search["best"]
    trainer.create_model_card()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Scaling coefficient (validation)" in card and f"| {best:g} |" in card
    for name, value in engine_merge(base, recorder.snapshots, scaling_coef=best).items():
        assert torch.equal(trainer.model.state_dict()[name], value), name
    # the matrices only ever saw the eval sets; λ only ever saw the validation sets
    eval_ids = set().union(*(set(ds["example_id"]) for ds in evaluation.values()))
    assert EvalRecorder.seen["seq"] | EvalRecorder.seen["merged"] | EvalRecorder.seen["base"] == eval_ids
    assert EvalRecorder.seen["validation"] == set().union(*validation_ids)


def test_deepcopy_free_construction_keeps_user_model(tmp_path):
    # the trainer trains the model passed in (no copy): θ_0 is kept on the merge device only
    train, _ = classification_tasks()
    model = tiny_bert()
    trainer = MagMaxTrainer(model, make_args(tmp_path), train_datasets=train)
    assert trainer.model is model
    copy.deepcopy(trainer.args)  # the config stays a plain dataclass


def test_image_classification_tiny_vit(tmp_path):
    from datasets import Dataset
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, num_labels=4,
    )  # fmt: skip
    model = ViTForImageClassification(config)
    base = {k: v.clone() for k, v in model.state_dict().items()}

    def images(classes, n, seed):
        generator = torch.Generator().manual_seed(seed)
        labels = [classes[i % len(classes)] for i in range(n)]
        pixels = [(torch.randn(3, 8, 8, generator=generator) + label).tolist() for label in labels]
        return Dataset.from_dict({"pixel_values": pixels, "labels": labels})

    train = {"ab": images([0, 1], 16, 1), "cd": images([2, 3], 16, 2)}
    evaluation = {"ab": images([0, 1], 8, 3), "cd": images([2, 3], 8, 4)}
    recorder = Recorder()
    args = make_args(tmp_path, restrict_loss_to_task_classes=True)
    trainer = MagMaxTrainer(model, args, train_datasets=train, eval_datasets=evaluation, callbacks=[recorder])
    trainer.train()
    for name, value in engine_merge(base, recorder.snapshots).items():
        assert torch.equal(trainer.model.state_dict()[name], value), name
    assert trainer.continual_results["metric"] == "accuracy"
    assert all(v is not None for row in trainer.continual_results["merged"]["matrix"] for v in row)


def test_config_from_the_command_line():
    from transformers import HfArgumentParser

    parser = HfArgumentParser(MagMaxConfig)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", "x", "--scaling_coef", "auto", "--scaling_coef_grid", "0.2", "0.4", "--report_to", "none"]
    )
    assert args.scaling_coef == "auto" and args.scaling_coef_grid == [0.2, 0.4]
    (args,) = parser.parse_args_into_dataclasses(["--output_dir", "x", "--scaling_coef", "0.7", "--report_to", "none"])
    assert args.scaling_coef == 0.7
    default = MagMaxConfig(output_dir="x", merge_method="average", scaling_coef=None, report_to="none")
    assert default.scaling_coef == 1.0  # the method's default λ
    assert MagMaxConfig(output_dir="x", scaling_coef="auto", report_to="none").scaling_coef_grid[-1] == 1.0
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", "x", "--merge_method", "ties", "--merge_density", "0.3", "--report_to", "none"]
    )
    assert args.merge_spec().method_options == {"density": 0.3} and args.scaling_coef == 1.0
    assert '"merge_density": 0.3' in args.to_json_string()


def test_merged_only_at_the_end_with_a_baseline_method(tmp_path):
    train, evaluation = classification_tasks()
    model = tiny_bert()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    recorder = Recorder()
    args = make_args(tmp_path, merge_method="average", scaling_coef=None, eval_merged_every_task=False)
    trainer = MagMaxTrainer(model, args, train_datasets=train, eval_datasets=evaluation, callbacks=[recorder])
    trainer.train()
    results = trainer.continual_results
    assert results["method"] == "average" and results["scaling_coef"] == 1.0  # the method's default λ
    merged = results["merged"]["matrix"]
    assert merged[1] == [None, None] and None not in merged[2]
    assert set(results["merged"]["metrics"]) == {"final_average_accuracy"}
    for name, value in engine_merge(base, recorder.snapshots, method="average", scaling_coef=1.0).items():
        assert torch.equal(trainer.model.state_dict()[name], value), name


def test_push_to_hub_uploads_model_and_card(tmp_path, fake_hub):  # noqa: F811
    train, evaluation = classification_tasks()
    args = make_args(tmp_path, hub_model_id="me/magmax-model", hub_token=fake_hub.token)
    trainer = MagMaxTrainer(tiny_bert(), args, train_datasets=train, eval_datasets=evaluation)
    trainer.train()
    trainer.push_to_hub()
    files = fake_hub.repos["me/magmax-model"].files
    card = files["README.md"].decode()
    assert card.startswith("---") and "- magmax" in card and "- continual-learning" in card
    assert "## Merged (magmax): accuracy matrix" in card and "scaling_coef: 0.5" in card
    assert "model.safetensors" in files and "continual_results.json" in files


def test_push_to_hub_leaves_the_run_folders_local(tmp_path, fake_hub):  # noqa: F811
    """Per-task checkpoints and the run's θ_0 (`magmax_base/`, a full copy of the base) are never uploaded."""
    train, evaluation = classification_tasks()
    args = make_args(
        tmp_path, hub_model_id="me/magmax-run", hub_token=fake_hub.token, save_strategy="steps", save_steps=2
    )
    trainer = MagMaxTrainer(tiny_bert(), args, train_datasets=train, eval_datasets=evaluation)
    trainer.train()
    local = {p.relative_to(args.output_dir).parts[0] for p in Path(args.output_dir).rglob("*") if p.is_file()}
    assert "magmax_base" in local and any(name.startswith("task-") for name in local)
    trainer.push_to_hub()
    pushed = {name.split("/")[0] for name in fake_hub.repos["me/magmax-run"].files}
    assert "model.safetensors" in pushed and "README.md" in pushed
    assert not [name for name in pushed if name.startswith(("task-", "magmax_base"))], sorted(pushed)


def test_hf_magmax_push_of_a_run_leaves_the_run_folders_local_too(tmp_path, fake_hub, caplog):  # noqa: F811
    """`hf-magmax push OUTPUT_DIR` after a run uploads what `trainer.push_to_hub()` uploads (less the
    `training_args.bin` pickle it cannot check), not the per-task checkpoints nor θ_0; a folder that is not a run's
    keeps its `task-*` folders."""
    from hf_magmax.cli import main

    train, evaluation = classification_tasks()
    args = make_args(
        tmp_path, hub_model_id="me/magmax-run", hub_token=fake_hub.token, save_strategy="steps", save_steps=2
    )
    trainer = MagMaxTrainer(tiny_bert(), args, train_datasets=train, eval_datasets=evaluation)
    trainer.train()
    trainer.push_to_hub()
    with caplog.at_level("INFO", logger="hf_magmax.hub"):
        assert main(["push", args.output_dir, "--to-hub", "me/magmax-run-cli", "--no-progress"]) == 0
    by_trainer = set(fake_hub.repos["me/magmax-run"].files)
    by_cli = set(fake_hub.repos["me/magmax-run-cli"].files)
    assert by_cli == by_trainer - {"training_args.bin"}, sorted(by_cli ^ by_trainer)
    assert any("left out of the push" in r.getMessage() and "magmax_base/" in r.getMessage() for r in caplog.records)

    other = tmp_path / "not-a-run"
    tiny_bert().save_pretrained(other)
    (other / "task-notes").mkdir()
    (other / "task-notes" / "notes.txt").write_text("kept")
    assert main(["push", str(other), "--to-hub", "me/not-a-run", "--no-progress"]) == 0
    assert "task-notes/notes.txt" in fake_hub.repos["me/not-a-run"].files


# -- the evaluation leaves the trainer as it was ------------------------------------------------------------------


class ComputeMetricsSpy(MagMaxTrainer):
    """Records `self.compute_metrics` whenever an evaluation runs."""

    def evaluation_loop(self, *args, **kwargs):
        self.seen_compute_metrics.append(self.compute_metrics)
        return super().evaluation_loop(*args, **kwargs)


def test_evaluation_keeps_compute_metrics_and_closes_progress_bars(tmp_path):
    from transformers.trainer_callback import ProgressCallback

    train, evaluation = classification_tasks()
    args = make_args(tmp_path, disable_tqdm=False)
    trainer = ComputeMetricsSpy(tiny_bert(), args, train_datasets=train, eval_datasets=evaluation)
    trainer.seen_compute_metrics = []
    trainer.train()
    assert trainer.seen_compute_metrics and all(m is None for m in trainer.seen_compute_metrics)
    assert trainer.compute_metrics is None
    progress = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, ProgressCallback)]
    assert progress and all(cb.prediction_bar is None for cb in progress)
    # the accuracy computed without a compute_metrics is the accuracy
    matrix = trainer.continual_results["sequential"]["matrix"]
    assert all(0.0 <= v <= 1.0 for row in matrix for v in row)


def test_callback_takes_an_options_object(tmp_path):
    from hf_magmax.trainer import MagMaxOptions

    train, evaluation = classification_tasks()
    results = []
    for how in ("options", "config", "keywords"):
        plain_args = TrainingArguments(
            **{k: v for k, v in make_args(tmp_path / how).to_dict().items() if k in _TA_FIELDS}
        )
        # a MagMaxConfig (TrainingArguments) sets up Accelerate's state: build it before the Trainer that uses it
        config = make_args(tmp_path / "cfg", merge_method="ties", merge_density=0.5) if how == "config" else None
        plain = Trainer(tiny_bert(), plain_args, train_dataset=train["a"])
        if how == "options":
            callback = MagMaxCallback(MagMaxOptions(merge_method="ties", merge_density=0.5), eval_datasets=evaluation)
            callback.attach(plain)
        elif how == "config":
            callback = MagMaxCallback(plain, eval_datasets=evaluation, options=config)
        else:
            callback = MagMaxCallback(plain, eval_datasets=evaluation, merge_method="ties", merge_density=0.5)
        assert callback.options.merge_spec().method_options == {"density": 0.5}
        assert callback.options.scaling_coef == 1.0  # ties' default λ, from the method
        for dataset in train.values():
            plain.train_dataset = dataset
            plain.train()
        results.append((callback.results, {k: v.clone() for k, v in plain.model.state_dict().items()}))
    for other, weights in results[1:]:
        assert other["merged"]["matrix"] == results[0][0]["merged"]["matrix"]
        assert all(torch.equal(weights[k], v) for k, v in results[0][1].items())
    with pytest.raises(TypeError, match="unexpected argument"):
        MagMaxCallback(merge_methd="ties")
    with pytest.raises(ValueError, match="`merge_density` only applies to `ties`"):
        MagMaxCallback(merge_density=0.5)


def test_auto_before_any_search_uses_the_methods_default_scaling_coef(tmp_path):
    # λ is chosen after the last task only; the merged row of task 1 uses the method's default λ (average: 1.0)
    train, evaluation = classification_tasks(num_examples=20)
    args = make_args(
        tmp_path,
        merge_method="average",
        scaling_coef="auto",
        scaling_coef_grid=[0.5, 1.0],
        validation_fraction=0.2,
        select_scaling_coef_every_task=False,
    )
    trainer = MagMaxTrainer(tiny_bert(), args, train_datasets=train, eval_datasets=evaluation)
    trainer.train()
    results = trainer.continual_results
    assert results["merged"]["scaling_coefs"][1] == 1.0
    assert [search["after_task"] for search in results["scaling_coef_search"]] == [2]
