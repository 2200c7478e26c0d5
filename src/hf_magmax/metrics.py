# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""Continual-learning metrics from an accuracy matrix, a markdown table of it, and a heatmap plot.

The accuracy matrix `R` has `T + 1` rows and `T` columns for a sequence of `T` tasks:

- row `0` holds the scores of the base model θ_0, before any task was trained;
- row `t` (`1 ≤ t ≤ T`) holds the scores after training on task `t` (tasks counted from 1);
- column `i` (`1 ≤ i ≤ T` in the formulas, index `i - 1` in code) holds the score on task `i`'s evaluation set.

So in the formulas below `R[t][i]` is 1-based in the task index `i`: in Python it is `matrix[t][i - 1]`. Rows are
0-based in both (row 0 is θ_0). Scores can be accuracies in `[0, 1]` or percentages; the metrics keep the unit.

This is the layout [`MagMaxTrainer`] writes to `continual_results.json`, one matrix for the sequentially fine-tuned
model and one for the merged model.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


logger = logging.getLogger(__name__)

__all__ = [
    "CONTINUAL_METRIC_NAMES",
    "accuracy_compute_metrics",
    "compute_continual_metrics",
    "format_matrix",
    "load_accuracy_metric",
    "load_continual_metric",
    "metric_module_path",
    "plot_accuracy_matrix",
    "plot_provenance",
    "provenance_summary",
    "provenance_table",
    "save_provenance",
]

#: The winner maps of a merge (tensor name → task index per element), written by [`save_provenance`].
PROVENANCE_FILE = "magmax_provenance.safetensors"
#: The winner shares (per tensor, per layer, overall), written by [`save_provenance`].
PROVENANCE_SUMMARY_FILE = "magmax_provenance.json"

#: The keys returned by [`compute_continual_metrics`], in this order.
CONTINUAL_METRIC_NAMES: tuple[str, ...] = (
    "final_average_accuracy",
    "average_incremental_accuracy",
    "forgetting",
    "backward_transfer",
    "forward_transfer",
)

_METRICS_MODULES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "metrics_modules")


def _as_matrix(matrix: Any, name: str = "matrix", seen_only: bool = False) -> np.ndarray:
    """Validate the `(T + 1) × T` layout and return a float64 array (missing cells, allowed with `seen_only` for the
    tasks not trained yet, as NaN)."""
    try:
        array = np.asarray(matrix, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"`{name}` must be a (T + 1) × T table of numbers (row 0: θ_0, row t: after task t); rows of different "
            f"lengths or non-numeric entries cannot be read: {err}"
        ) from err
    if array.ndim != 2:
        raise ValueError(
            f"`{name}` must be 2-dimensional, (T + 1) × T (row 0: θ_0, row t: after task t), got {array.ndim} "
            f"dimension(s) with shape {array.shape}."
        )
    rows, cols = array.shape
    if cols < 1:
        raise ValueError(f"`{name}` has no columns: pass at least one task (shape (2, 1) for T = 1).")
    if rows != cols + 1:
        raise ValueError(
            f"`{name}` has shape ({rows}, {cols}) but must be (T + 1) × T = ({cols + 1}, {cols}) for T = {cols} "
            "tasks: row 0 holds the scores of θ_0 before any training, row t the scores after task t. If you have "
            "no θ_0 scores, you cannot compute forward transfer; add a row of the base model's scores first."
        )
    missing = ~np.isfinite(array)
    if seen_only:  # R[t][i] with 1 <= t < T and task i not trained yet (code column >= t) may be missing
        rows_, cols_ = np.indices(array.shape)
        missing &= ~((rows_ >= 1) & (rows_ < cols) & (cols_ >= rows_))
        if np.isinf(array).any():
            raise ValueError(f"`{name}` contains infinite values; every cell must be a finite score.")
    if missing.any():
        t, i = (int(x) for x in np.argwhere(missing)[0])
        where = (
            ""
            if not seen_only
            else f" (with `seen_only=True` only tasks not trained yet may be missing: cell [{t}][{i}])"
        )
        raise ValueError(f"`{name}` contains NaN or infinite values; every cell must be a finite score{where}.")
    return array


def compute_continual_metrics(
    matrix: Sequence[Sequence[float]] | np.ndarray, seen_only: bool = False
) -> dict[str, float]:
    r"""Compute the standard continual-learning metrics from an accuracy matrix.

    With `T` tasks, `R` the `(T + 1) × T` matrix (row 0 = θ_0, row t = after task t, column i = task i, tasks
    1-based in the formulas; `R[t][i]` is `matrix[t][i - 1]` in code):

    - `final_average_accuracy` = (1/T) Σ_{i=1..T} R[T][i]: the mean score of the final model on all tasks.
    - `average_incremental_accuracy` = (1/T) Σ_{t=1..T} [(1/t) Σ_{i=1..t} R[t][i]]: the mean, over the
      sequence, of the average score on the tasks seen so far (Rebuffi et al., 2017).
    - `forgetting` = (1/(T−1)) Σ_{j=1..T−1} [max_{l=1..T−1} R[l][j] − R[T][j]] (Chaudhry et al., 2018): how much
      each earlier task dropped from its best score before the last task. Row 0 (θ_0) is excluded from the max.
      `0.0` when `T = 1`.
    - `backward_transfer` = (1/(T−1)) Σ_{j=1..T−1} (R[T][j] − R[j][j]) (Lopez-Paz & Ranzato, 2017), denominator
      `T − 1` as in TRACE and Mammoth; negative means forgetting. `0.0` when `T = 1`.
    - `forward_transfer` = (1/(T−1)) Σ_{i=2..T} (R[i−1][i] − R[0][i]): how much training on the earlier tasks
      helps a task before it is trained on, relative to θ_0. `0.0` when `T = 1`.

    The unit of the scores (fractions or percentages) is kept.

    Args:
        matrix (`Sequence[Sequence[float]]` or `np.ndarray`):
            The `(T + 1) × T` accuracy matrix described above.
        seen_only (`bool`, *optional*, defaults to `False`):
            The matrix of a run that evaluated, after task t < T, only the tasks trained so far
            (`MagMaxConfig(eval_unseen_tasks=False)`): the cells R[t][i] with 1 ≤ t < T and i > t may be `None` (or
            NaN); every other cell must be a score. The forgetting's max then runs over the rows l = j..T−1 (those of
            the old rows that were evaluated), and forward transfer, which needs R[i−1][i], is not returned.

    Returns:
        `dict[str, float]`: the five metrics, keyed by the names in [`CONTINUAL_METRIC_NAMES`] (without
        `forward_transfer` when `seen_only=True`).

    Example:

    ```python
    >>> from hf_magmax.metrics import compute_continual_metrics
    >>> R = [[0.1, 0.2],  # θ_0
    ...      [0.9, 0.4],  # after task 1
    ...      [0.7, 0.8]]  # after task 2
    >>> m = compute_continual_metrics(R)
    >>> round(m["final_average_accuracy"], 4), round(m["forgetting"], 4), round(m["forward_transfer"], 4)
    (0.75, 0.2, 0.2)
    ```
    """
    R = _as_matrix(matrix, seen_only=seen_only)
    T = R.shape[1]
    final_average_accuracy = float(R[T].mean())
    average_incremental_accuracy = float(np.mean([R[t, :t].mean() for t in range(1, T + 1)]))
    if T == 1:
        forgetting = backward_transfer = forward_transfer = 0.0
    else:
        # columns j = 1..T-1 are code indices 0..T-2; rows l = 1..T-1 are code rows 1..T-1
        best_before_last = np.nanmax(R[1:T, : T - 1], axis=0)  # (T-1,); NaN only where seen_only allows it
        forgetting = float(np.mean(best_before_last - R[T, : T - 1]))
        just_trained = np.array([R[j, j - 1] for j in range(1, T)])  # R[j][j], j = 1..T-1
        backward_transfer = float(np.mean(R[T, : T - 1] - just_trained))
        # R[i-1][i] - R[0][i] for i = 2..T, i.e. code column i-1, rows i-1 and 0
        forward_transfer = float(np.mean([R[i - 1, i - 1] - R[0, i - 1] for i in range(2, T + 1)]))
    metrics = {
        "final_average_accuracy": final_average_accuracy,
        "average_incremental_accuracy": average_incremental_accuracy,
        "forgetting": forgetting,
        "backward_transfer": backward_transfer,
        "forward_transfer": forward_transfer,
    }
    if seen_only:
        del metrics["forward_transfer"]  # R[i-1][i] (a task before it is trained) was not evaluated
    return metrics


def _format_number(value: float, percent: bool, digits: int) -> str:
    if math.isnan(value):
        return "–"
    return f"{100 * value:.{digits}f}" if percent else f"{value:.{digits}f}"


def format_matrix(
    matrix: Sequence[Sequence[float]] | np.ndarray,
    task_names: Sequence[str] | None = None,
    percent: bool = True,
    digits: int = 1,
    row_label: str = "after task",
    average_column: bool = True,
    base_row_name: str = "θ_0",
    seen_only: bool = False,
) -> str:
    """Format an accuracy matrix as a GitHub markdown table.

    Rows are `θ_0` and then `after task t` (`1. <name>`, …), columns the tasks, plus a column with the average over
    the tasks seen so far (`seen avg`, empty for θ_0) and one over all tasks (`all avg`).

    Args:
        matrix (`Sequence[Sequence[float]]` or `np.ndarray`):
            The `(T + 1) × T` accuracy matrix (row 0 = θ_0, row t = after task t, column i = task i).
        task_names (`Sequence[str]`, *optional*):
            One name per task (column); defaults to `task_1`, …, `task_T`.
        percent (`bool`, *optional*, defaults to `True`):
            Multiply the scores by 100 (for accuracies stored as fractions).
        digits (`int`, *optional*, defaults to `1`):
            Decimals to print.
        row_label (`str`, *optional*, defaults to `"after task"`):
            Header of the first column.
        average_column (`bool`, *optional*, defaults to `True`):
            Append the `seen avg` and `all avg` columns.
        base_row_name (`str`, *optional*, defaults to `"θ_0"`):
            Label of row 0.
        seen_only (`bool`, *optional*, defaults to `False`):
            Allow the cells of tasks not trained yet to be missing (as in [`compute_continual_metrics`]); they, and
            the `all avg` of their rows, print as `–`.

    Returns:
        `str`: the markdown table, one line per row, without a trailing newline.

    Example:

    ```python
    >>> from hf_magmax.metrics import format_matrix
    >>> print(format_matrix([[0.5], [1.0]], ["digits"]))
    | after task | digits | seen avg | all avg |
    |---|---:|---:|---:|
    | θ_0 | 50.0 |  | 50.0 |
    | 1. digits | 100.0 | 100.0 | 100.0 |
    ```
    """
    R = _as_matrix(matrix, seen_only=seen_only)
    T = R.shape[1]
    names = _check_task_names(task_names, T)
    header = [row_label, *names] + (["seen avg", "all avg"] if average_column else [])
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for t in range(T + 1):
        label = base_row_name if t == 0 else f"{t}. {names[t - 1]}"
        cells = [_format_number(v, percent, digits) for v in R[t]]
        if average_column:
            seen = "" if t == 0 else _format_number(float(R[t, :t].mean()), percent, digits)
            cells += [seen, _format_number(float(R[t].mean()), percent, digits)]
        lines.append("| " + " | ".join([label, *cells]) + " |")
    return "\n".join(lines)


def _check_task_names(task_names: Sequence[str] | None, num_tasks: int) -> list[str]:
    if task_names is None:
        return [f"task_{i}" for i in range(1, num_tasks + 1)]
    names = [str(n) for n in task_names]
    if len(names) != num_tasks:
        raise ValueError(
            f"`task_names` has {len(names)} name(s) but the matrix has {num_tasks} task column(s): pass one name per "
            "task, in training order."
        )
    return names


def plot_accuracy_matrix(
    matrix: Sequence[Sequence[float]] | np.ndarray,
    task_names: Sequence[str] | None = None,
    path: str | os.PathLike | None = None,
    title: str = "Accuracy matrix",
    percent: bool = True,
    cmap: str = "viridis",
):
    """Draw the accuracy matrix as an annotated heatmap (rows: θ_0 and after each task; columns: tasks).

    Needs matplotlib (`pip install "hf_magmax[plot]"`). Draws on a bare `matplotlib.figure.Figure` (no pyplot, no GUI
    backend), so it works on headless machines and leaves pyplot's state alone.

    Args:
        matrix (`Sequence[Sequence[float]]` or `np.ndarray`):
            The `(T + 1) × T` accuracy matrix (row 0 = θ_0, row t = after task t, column i = task i).
        task_names (`Sequence[str]`, *optional*):
            One name per task; defaults to `task_1`, …, `task_T`.
        path (`str` or `os.PathLike`, *optional*):
            Where to save the figure (the extension picks the format, e.g. `.png`, `.pdf`). Parent folders are
            created. When `None`, the figure is returned without saving.
        title (`str`, *optional*, defaults to `"Accuracy matrix"`):
            Title of the plot.
        percent (`bool`, *optional*, defaults to `True`):
            Annotate cells as percentages (for scores stored as fractions).
        cmap (`str`, *optional*, defaults to `"viridis"`):
            Matplotlib colormap name.

    Returns:
        `matplotlib.figure.Figure`: the figure.

    Example:

    ```python
    >>> from hf_magmax.metrics import plot_accuracy_matrix
    >>> fig = plot_accuracy_matrix([[0.1, 0.1], [0.9, 0.2], [0.7, 0.9]], ["a", "b"], "matrix.png")
    ```
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            'plot_accuracy_matrix needs matplotlib: install it with `pip install "hf_magmax[plot]"`.'
        ) from err

    R = _as_matrix(matrix)
    T = R.shape[1]
    names = _check_task_names(task_names, T)
    shown = 100 * R if percent else R
    # a bare Figure (no pyplot): no GUI backend, no global state, works on headless machines
    fig = Figure(figsize=(1.1 * T + 2.5, 0.7 * (T + 1) + 1.5))
    ax = fig.subplots()
    vmax = 100.0 if percent and R.max() <= 1.0 else float(shown.max())
    image = ax.imshow(shown, cmap=cmap, vmin=min(0.0, float(shown.min())), vmax=vmax, aspect="auto")
    ax.set_xticks(range(T), labels=names, rotation=45, ha="right")
    ax.set_yticks(range(T + 1), labels=["θ_0"] + [f"after {t}. {n}" for t, n in enumerate(names, start=1)])
    ax.set_xlabel("evaluated on task")
    ax.set_title(title)
    mid = (vmax + min(0.0, float(shown.min()))) / 2
    for t in range(T + 1):
        for i in range(T):
            ax.text(
                i,
                t,
                f"{shown[t, i]:.1f}" if percent else f"{shown[t, i]:.2f}",
                ha="center",
                va="center",
                color="black" if shown[t, i] > mid else "white",
                fontsize=8,
            )
    fig.colorbar(image, ax=ax, label="accuracy (%)" if percent else "score")
    fig.tight_layout()
    if path is not None:
        path = os.fspath(path)
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        fig.savefig(path, dpi=120)
        logger.info("Saved the accuracy-matrix heatmap to %s", path)
    return fig


# --------------------------------------------------------------------------------------------------------------------
# Provenance: which task won where
# --------------------------------------------------------------------------------------------------------------------


def _layer_of(name: str) -> str:
    """The layer a tensor belongs to: its name up to the first numeric part (`model.layers.3`), else its module."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1]) or name


def _natural_key(name: str) -> tuple:
    """A sort key that orders the numeric parts of a tensor name by value (`layers.2` before `layers.10`)."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in str(name).split("."))


def provenance_summary(winners: Any, task_names: Sequence[str]) -> dict[str, Any]:
    """The winner shares of a merge: the fraction of elements each task won, overall, per layer and per tensor.

    Args:
        winners (`dict[str, torch.Tensor]`):
            Tensor name → winner map (0-based task index per element), as
            [`~hf_magmax.merging.StateDictMerger.winners`] returns it.
        task_names (`Sequence[str]`):
            One name per task, in merge order.

    Returns:
        `dict`: `{"tasks": [...], "overall": [share per task], "layers": {layer: [...]}, "tensors": {name: [...]}}`.
        A layer is a tensor name up to its first numeric part (`model.layers.3`), else the tensor's module; its
        shares weigh each tensor by its number of elements.
    """
    import torch

    T = len(task_names)
    counts = {
        name: torch.bincount(winner.reshape(-1).long(), minlength=T).to(torch.float64).tolist()
        for name, winner in winners.items()
    }
    return provenance_summary_from_counts(counts, task_names)


def provenance_summary_from_counts(counts: Mapping[str, Sequence[float]], task_names: Sequence[str]) -> dict[str, Any]:
    """[`provenance_summary`] from the number of elements each task won per tensor (`name → [count per task]`):
    what a streaming merge accumulates block by block, without holding any winner map."""
    names = [str(n) for n in task_names]
    T = len(names)

    def normalized(values: Sequence[float]) -> list[float]:
        total = float(sum(values))
        return [float(v) / total if total else 0.0 for v in values]

    tensors, layer_counts, overall = {}, {}, [0.0] * T
    # in name order (numbers by value: layers.2 before layers.10), whatever order the counts came in: a resumed run
    # (winners read back from a checkpoint) writes the same bytes as an uninterrupted one
    for name in sorted(counts, key=_natural_key):
        tensor_counts = counts[name]
        if len(tensor_counts) != T:
            raise ValueError(
                f"the winners of {name!r} count {len(tensor_counts)} tasks, but there are {T} task names."
            )
        tensors[name] = normalized(tensor_counts)
        layer = layer_counts.setdefault(_layer_of(name), [0.0] * T)
        for i, c in enumerate(tensor_counts):
            layer[i] += float(c)
            overall[i] += float(c)
    layers = {layer: normalized(c) for layer, c in layer_counts.items()}
    return {"tasks": names, "overall": normalized(overall), "layers": layers, "tensors": tensors}


def provenance_table(summary: dict[str, Any], top: int = 10) -> str:
    """A short markdown table of a [`provenance_summary`]: the overall share of every task, then the `top` tensors
    where the last task won most (for the model card)."""
    names, overall = summary["tasks"], summary["overall"]
    rows = "\n".join(f"| {i + 1} | `{n}` | {100 * s:.1f}% |" for i, (n, s) in enumerate(zip(names, overall)))
    text = f"| task | name | share of elements won |\n|---|---|---|\n{rows}"
    last = sorted(summary["tensors"].items(), key=lambda kv: (-kv[1][-1], kv[0]))[:top]
    if last and len(names) > 1:
        lines = "\n".join(f"| `{name}` | {100 * s[-1]:.1f}% |" for name, s in last)
        text += (
            f"\n\nThe {len(last)} tensor(s) where the last task (`{names[-1]}`) won most:\n\n"
            f"| tensor | share of the last task |\n|---|---|\n{lines}"
        )
    return text


def save_provenance(
    directory: str | os.PathLike, winners: Any, task_names: Sequence[str], summary: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Write a merge's provenance into `directory`: the winner maps as `magmax_provenance.safetensors` (name →
    `uint8` map, `int16` beyond 256 tasks) and the shares of [`provenance_summary`] as `magmax_provenance.json`.

    Returns:
        `dict`: the summary written.
    """
    import json

    from safetensors.torch import save_file

    summary = provenance_summary(winners, task_names) if summary is None else summary
    os.makedirs(directory, exist_ok=True)
    tensors = {name: w.detach().to("cpu").contiguous() for name, w in winners.items()}
    save_file(tensors, os.path.join(directory, PROVENANCE_FILE), metadata={"tasks": json.dumps(summary["tasks"])})
    with open(os.path.join(directory, PROVENANCE_SUMMARY_FILE), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    return summary


def plot_provenance(
    summary: dict[str, Any],
    path: str | os.PathLike | None = None,
    title: str = "Which task won (share of elements per layer)",
    cmap: str = "magma",
):
    """Draw the per-layer winner shares of a [`provenance_summary`] as a layers × tasks heatmap.

    Needs matplotlib (`pip install "hf_magmax[plot]"`); draws on a bare `matplotlib.figure.Figure` (no pyplot).

    Args:
        summary (`dict`): what [`provenance_summary`] returns.
        path (`str` or `os.PathLike`, *optional*): where to save the figure (parent folders are created).
        title (`str`, *optional*): title of the plot.
        cmap (`str`, *optional*, defaults to `"magma"`): matplotlib colormap name.

    Returns:
        `matplotlib.figure.Figure`: the figure.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            'plot_provenance needs matplotlib: install it with `pip install "hf_magmax[plot]"`.'
        ) from err

    names = list(summary["tasks"])
    layers = list(summary["layers"])
    shares = 100 * np.asarray([summary["layers"][layer] for layer in layers], dtype=float).reshape(len(layers), -1)
    T = len(names)
    fig = Figure(figsize=(0.9 * T + 4.0, 0.3 * len(layers) + 1.8))
    ax = fig.subplots()
    image = ax.imshow(shares, cmap=cmap, vmin=0.0, vmax=100.0, aspect="auto")
    ax.set_xticks(range(T), labels=names, rotation=45, ha="right")
    ax.set_yticks(range(len(layers)), labels=layers, fontsize=7)
    ax.set_xlabel("task")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="elements won (%)")
    fig.tight_layout()
    if path is not None:
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=120)
        logger.info("Saved the provenance heatmap to %s", path)
    return fig


def accuracy_compute_metrics(eval_pred: Any) -> dict[str, float]:
    """`compute_metrics` for [`~transformers.Trainer`]: classification accuracy (argmax over the last logits axis).

    Accepts an [`~transformers.EvalPrediction`] or a `(predictions, label_ids)` tuple. When the model returns several
    outputs (`predictions` is a tuple, e.g. logits and hidden states), the first one is used as the logits. Labels
    equal to `-100` (the ignore index) are skipped.

    Args:
        eval_pred (`EvalPrediction` or `tuple`):
            Predictions (logits of shape `(N, C)`, or already arg-maxed class ids of shape `(N,)`) and labels.

    Returns:
        `dict[str, float]`: `{"accuracy": ...}` as a fraction in `[0, 1]`.

    Example:

    ```python
    >>> import numpy as np
    >>> from hf_magmax.metrics import accuracy_compute_metrics
    >>> accuracy_compute_metrics((np.array([[0.1, 0.9], [0.8, 0.2]]), np.array([1, 1])))
    {'accuracy': 0.5}
    ```
    """
    if hasattr(eval_pred, "predictions") and hasattr(eval_pred, "label_ids"):
        predictions, labels = eval_pred.predictions, eval_pred.label_ids
    else:
        try:
            predictions, labels = eval_pred
        except (TypeError, ValueError) as err:
            raise TypeError(
                "`eval_pred` must be an EvalPrediction or a (predictions, label_ids) tuple, got "
                f"{type(eval_pred).__name__}."
            ) from err
    if isinstance(predictions, (tuple, list)):
        predictions = predictions[0]
    if isinstance(labels, (tuple, list)):
        labels = labels[0]
    predictions = np.asarray(predictions)
    labels = np.asarray(labels).reshape(-1)
    if predictions.ndim >= 2:
        predictions = predictions.reshape(-1, predictions.shape[-1]).argmax(axis=-1)
    predictions = predictions.reshape(-1)
    if predictions.shape[0] != labels.shape[0]:
        raise ValueError(
            f"got {predictions.shape[0]} predictions but {labels.shape[0]} labels: accuracy_compute_metrics expects "
            "one logits row (or class id) per label."
        )
    keep = labels != -100
    if not keep.any():
        return {"accuracy": 0.0}
    return {"accuracy": float((predictions[keep] == labels[keep]).mean())}


def metric_module_path(name: str) -> str:
    """Path of a local `evaluate` module shipped with hf_magmax (`"continual_learning"` or `"accuracy"`).

    Pass it to `evaluate.load`, which then needs no Hub access.

    Args:
        name (`str`):
            The module name, a folder of `hf_magmax/metrics_modules/`.

    Returns:
        `str`: the path of the module's script.
    """
    path = os.path.join(_METRICS_MODULES_DIR, name, f"{name}.py")
    if not os.path.isfile(path):
        available = (
            sorted(
                d
                for d in os.listdir(_METRICS_MODULES_DIR)
                if os.path.isfile(os.path.join(_METRICS_MODULES_DIR, d, f"{d}.py"))
            )
            if os.path.isdir(_METRICS_MODULES_DIR)
            else []
        )
        raise FileNotFoundError(
            f"no local evaluate module named {name!r} at {path}; available: {', '.join(available) or 'none'}."
        )
    return path


def _load_local_module(name: str, **kwargs):
    try:
        import evaluate
    except ImportError as err:
        raise ImportError(
            'loading the evaluate module needs `evaluate`: install it with `pip install "hf_magmax[evaluate]"`.'
        ) from err
    return evaluate.load(metric_module_path(name), **kwargs)


def load_continual_metric(**kwargs):
    """Load the `continual_learning` evaluate module from hf_magmax's local copy (no Hub access).

    Add one row of the accuracy matrix per `add(scores=...)` call (row 0 = θ_0 first) or pass the whole matrix to
    `compute(scores=[...])`; it returns the same dict as [`compute_continual_metrics`].

    Args:
        kwargs:
            Passed to `evaluate.load` (e.g. `experiment_id`).

    Returns:
        `evaluate.EvaluationModule`: the loaded module.

    Example:

    ```python
    >>> from hf_magmax.metrics import load_continual_metric
    >>> metric = load_continual_metric()
    >>> metric.compute(scores=[[0.1, 0.2], [0.9, 0.4], [0.7, 0.8]])["final_average_accuracy"]
    0.75
    ```
    """
    return _load_local_module("continual_learning", **kwargs)


def load_accuracy_metric(**kwargs):
    """Load hf_magmax's local copy of the `accuracy` evaluate module (`evaluate.load("accuracy")` needs the Hub).

    Args:
        kwargs:
            Passed to `evaluate.load`.

    Returns:
        `evaluate.EvaluationModule`: `compute(predictions=..., references=...)` returns `{"accuracy": ...}`.
    """
    return _load_local_module("accuracy", **kwargs)
