# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""The accuracy matrices of a task sequence, their summary metrics, the results file, and how a model is scored.

`R[t][i]` is the score on task i's evaluation set after task t (row 0: θ_0), for the sequential and the merged model.
Scoring goes through the trainer's own `evaluation_loop`, without touching `trainer.compute_metrics`: when the user
gave none, the accuracy is computed here from the loop's predictions.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any


__all__ = ["RESULTS_NAME", "TOKEN_ACCURACY", "AccuracyMatrices", "resolve_metric", "score"]

#: Name of the results file written to `output_dir`.
RESULTS_NAME = "continual_results.json"


def label_column(dataset: Any) -> str | None:
    columns = getattr(dataset, "column_names", None)
    if columns is None:
        return None
    for name in ("labels", "label"):
        if name in columns:
            return name
    return None


def scalar_labels(dataset: Any) -> list[int] | None:
    """The labels of a `datasets.Dataset` if they are class ids (one int per example), else None."""
    column = label_column(dataset)
    if column is None or len(dataset) == 0:
        return None
    values = list(dataset[column])
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return values
    if all(hasattr(v, "ndim") and v.ndim == 0 for v in values):  # numpy/torch scalars
        return [int(v) for v in values]
    return None


#: TRL's `SFTTrainer` counts this metric inside its `compute_loss` (its `_metrics[mode]`), per batch: the share of the
#: loss tokens (the completion with completion-only loss, the assistant turns with `assistant_only_loss`) whose top-1
#: prediction is the label, under teacher forcing. Its `evaluate()` logs their mean as `eval_mean_token_accuracy`.
TOKEN_ACCURACY = "mean_token_accuracy"


def counted_eval_metrics(trainer: Any) -> dict[str, list[float]] | None:
    """The evaluation metrics a TRL trainer counts in `compute_loss` (`trainer._metrics["eval"]`), or None for a
    trainer that keeps none (e.g. transformers' `Trainer`)."""
    metrics = getattr(trainer, "_metrics", None)
    counted = metrics.get("eval") if isinstance(metrics, dict) else None
    return counted if isinstance(counted, dict) else None


def is_sft_trainer(trainer: Any) -> bool:
    """Whether `trainer` is TRL's `SFTTrainer` (or a subclass), told without importing `trl`."""
    return any(c.__name__ == "SFTTrainer" and c.__module__.startswith("trl.") for c in type(trainer).__mro__)


def resolve_metric(continual_metric: str | None, train_datasets: Sequence[Any], trainer: Any = None) -> str:
    """The metric of the matrices: the one asked for, else TRL's token accuracy inside an `SFTTrainer`, else accuracy
    for class-id labels, else `neg_loss`."""
    if continual_metric is not None:
        return continual_metric
    if trainer is not None and is_sft_trainer(trainer):
        return TOKEN_ACCURACY
    for dataset in train_datasets:
        if label_column(dataset) is not None:
            return "accuracy" if scalar_labels(dataset) is not None else "neg_loss"
        try:
            example = dataset[0]
        except Exception:  # noqa: BLE001 - any dataset without indexing
            break
        label = example.get("labels", example.get("label")) if isinstance(example, Mapping) else None
        if label is not None:
            is_scalar = isinstance(label, int) or (hasattr(label, "ndim") and label.ndim == 0)
            return "accuracy" if is_scalar else "neg_loss"
        break
    return "neg_loss"


def _close_prediction_bar(trainer: Any) -> None:
    """Close the evaluation progress bar that `evaluation_loop` opened (`evaluate()` would close it in `on_evaluate`,
    but calling every callback's `on_evaluate` for an internal evaluation would trigger the user's callbacks)."""
    for callback in trainer.callback_handler.callbacks:
        bar = getattr(callback, "prediction_bar", None)
        if bar is not None:
            bar.close()
            callback.prediction_bar = None


def score(trainer: Any, dataset: Any, prefix: str, metric: str) -> float:
    """The continual metric of the model as it is now on `dataset` (higher is better).

    The trainer's `compute_metrics` is used when it is set; otherwise the accuracy is computed from the predictions
    (the trainer is never modified).
    """
    from transformers import EvalPrediction

    from ..metrics import accuracy_compute_metrics

    counted = counted_eval_metrics(trainer)
    if counted is not None:
        counted.clear()  # only this evaluation's batches; none of them reach the trainer's own logs either
    predictions = metric not in ("neg_loss", "loss", TOKEN_ACCURACY)
    try:
        output = trainer.evaluation_loop(
            trainer.get_eval_dataloader(dataset),
            description="MagMax evaluation",
            prediction_loss_only=not predictions,
            metric_key_prefix=prefix,
        )
    finally:
        _close_prediction_bar(trainer)
        batches = {key: list(values) for key, values in (counted or {}).items()}
        if counted is not None:
            counted.clear()
    metrics = dict(output.metrics)
    if metric == TOKEN_ACCURACY:
        values = batches.get(TOKEN_ACCURACY)
        if not values:
            raise ValueError(
                f"`continual_metric={TOKEN_ACCURACY!r}` is the token accuracy TRL's SFTTrainer counts while it "
                f"evaluates, and {type(trainer).__name__} counted none on `{prefix}`: use it with an SFTTrainer "
                "(or `MagMaxSFTTrainer`), or choose another `continual_metric`."
            )
        return sum(values) / len(values)  # as SFTTrainer's `eval_mean_token_accuracy`
    if predictions and trainer.compute_metrics is None and output.predictions is not None:
        if output.label_ids is None:
            raise ValueError(
                f"`continual_metric={metric!r}` needs labels in the evaluation sets (none came back from `{prefix}`)."
            )
        computed = accuracy_compute_metrics(EvalPrediction(predictions=output.predictions, label_ids=output.label_ids))
        metrics.update({f"{prefix}_{k}": v for k, v in computed.items()})
    if not predictions:
        key = f"{prefix}_loss"
        if key not in metrics:
            raise ValueError(
                f"evaluation returned no loss ({sorted(metrics)}): the eval datasets need labels for "
                "`continual_metric='neg_loss'`; pass `compute_metrics` and `continual_metric` instead."
            )
        return -float(metrics[key]) if metric == "neg_loss" else float(metrics[key])
    key = f"{prefix}_{metric}"
    if key not in metrics:
        available = sorted(k.removeprefix(f"{prefix}_") for k in metrics)
        raise KeyError(
            f"`continual_metric={metric!r}` is not among the evaluation metrics {available}: set "
            "`continual_metric` to one of them, or return it from `compute_metrics`."
        )
    return float(metrics[key])


class AccuracyMatrices:
    """The sequential and merged matrices (T + 1 rows, row 0 θ_0), the λ of each merged row, and the λ searches."""

    def __init__(self, task_names: Sequence[str], seen_only: bool = False) -> None:
        self.task_names = list(task_names)
        #: rows after tasks t < T hold the tasks seen so far only (`eval_unseen_tasks=False`)
        self.seen_only = seen_only
        num = len(self.task_names)
        self.metric: str | None = None
        self.seq: list[list[float | None]] = [[None] * num for _ in range(num + 1)]
        self.merged: list[list[float | None]] = [[None] * num for _ in range(num + 1)]
        self.merged_coefs: list[float | None] = [None] * (num + 1)
        self.searches: list[dict[str, Any]] = []

    def add_task(self, name: str) -> None:
        """Grow the matrices by one task (an open-ended callback sequence)."""
        num = len(self.task_names)
        self.task_names.append(name)
        self.seq = [row + [None] for row in self.seq] + [[None] * (num + 1)]
        self.merged = [row + [None] for row in self.merged] + [[None] * (num + 1)]
        self.merged_coefs.append(None)

    def metrics(self, matrix: list[list[float | None]], done: int) -> dict[str, float]:
        """The summary metrics of a matrix once complete (only the final average while tasks remain)."""
        from ..metrics import compute_continual_metrics

        if done == len(self.task_names) and self.complete(matrix):
            return compute_continual_metrics(matrix, seen_only=self.seen_only)
        last = matrix[done]
        if done and all(v is not None for v in last):
            return {"final_average_accuracy": sum(last) / len(last)}
        return {}

    def complete(self, matrix: list[list[float | None]]) -> bool:
        """Whether every cell of `matrix` the run evaluates is filled (with `seen_only`, rows 1..T−1 hold the tasks
        seen so far only)."""
        last = len(matrix) - 1
        return all(
            v is not None or (self.seen_only and 0 < t < last and i >= t)
            for t, row in enumerate(matrix)
            for i, v in enumerate(row)
        )

    def to_dict(self) -> dict[str, Any]:
        """What a checkpoint records (see [`from_dict`])."""
        return {
            "metric": self.metric,
            "seq_matrix": self.seq,
            "merged_matrix": self.merged,
            "merged_coefs": self.merged_coefs,
            "searches": self.searches,
        }

    def load(self, state: Mapping[str, Any]) -> None:
        self.metric = state["metric"]
        self.seq = state["seq_matrix"]
        self.merged = state["merged_matrix"]
        self.merged_coefs = state["merged_coefs"]
        self.searches = state["searches"]


def write_results(output_dir: str, summary: Mapping[str, Any]) -> str:
    """Write `summary` to `output_dir/continual_results.json` atomically; returns the path."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, RESULTS_NAME)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    os.replace(path + ".tmp", path)
    return path
