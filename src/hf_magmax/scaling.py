# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""Choose the scaling coefficient λ on validation data.

The merged model is `θ_0 + λ · τ_merged`. The MagMax paper fixes λ = 0.5 by hand; in practice the best λ moves with the
learning rate, the seed and the head. This module picks λ from a grid by the score of the merged model on *validation*
data (never the data used for the reported results):

- [`search_scaling_coef`]: the generic search. It takes an `apply_fn(λ)` that puts θ_0 + λ·τ into the model (in place)
  and a `score_fn()` that scores the model as it is now, and returns a [`ScalingCoefSearch`] (best λ, best score,
  whole curve). The Trainer and [`select_scaling_coef_for_checkpoints`] are built on it.
- [`ScalingCoefApplier`]: an `apply_fn` that re-applies θ_0 + λ·τ to a model in place, without a copy of the model.
- [`select_scaling_coef_for_checkpoints`]: the same choice for merges of saved checkpoints outside the Trainer
  (`merge_checkpoints(..., scaling_coef="auto", score_fn=...)`).
- [`split_validation`]: carve a validation split from a training split with a fixed seed (stratified by label).
- [`plot_scaling_curve`]: draw the curve (needs the `plot` extra).
"""

from __future__ import annotations

import logging
import math
import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor


if TYPE_CHECKING:  # pragma: no cover
    import datasets

    from .merging import MergeSpec


logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_SCALING_COEF_GRID",
    "ScalingCoefApplier",
    "ScalingCoefSearch",
    "check_scaling_coef_grid",
    "check_validation_fraction",
    "plot_scaling_curve",
    "scaling_curve_markdown",
    "search_scaling_coef",
    "select_scaling_coef_for_checkpoints",
    "split_validation",
]

#: The default grid of λ: 0.1, 0.2, …, 1.0 (exact decimal values).
DEFAULT_SCALING_COEF_GRID: tuple[float, ...] = tuple(round(0.1 * k, 10) for k in range(1, 11))


# --------------------------------------------------------------------------------------------------------------------
# Validation of user input
# --------------------------------------------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_scaling_coef_grid(grid: Sequence[float]) -> tuple[float, ...]:
    """Validate a grid of scaling coefficients λ and return it as a tuple of floats (order kept, duplicates dropped).

    Args:
        grid (`Sequence[float]`):
            Candidate values of λ; every value must be a finite number > 0.

    Returns:
        `tuple[float, ...]`: the grid as floats.

    Raises:
        `ValueError` (or `TypeError` for a non-number) naming `scaling_coef_grid`.

    Example:

    ```python
    >>> from hf_magmax.scaling import check_scaling_coef_grid
    >>> check_scaling_coef_grid([0.25, 0.5, 1])
    (0.25, 0.5, 1.0)
    ```
    """
    if isinstance(grid, (str, bytes)) or not isinstance(grid, Sequence) and not hasattr(grid, "__iter__"):
        raise TypeError(f"`scaling_coef_grid` must be a list of numbers > 0, e.g. [0.1, 0.2, ..., 1.0]; got {grid!r}.")
    values = list(grid)
    if not values:
        raise ValueError("`scaling_coef_grid` is empty: pass at least one value of λ > 0, e.g. [0.3, 0.5, 0.7, 1.0].")
    out: list[float] = []
    for value in values:
        if not _is_number(value):
            raise TypeError(f"`scaling_coef_grid` must hold numbers > 0, but it holds {value!r}.")
        value = float(value)
        if not math.isfinite(value) or value <= 0:
            raise ValueError(
                f"`scaling_coef_grid` must hold finite values > 0 (λ = 0 is the base model θ_0), but it holds "
                f"{value!r}. Use e.g. [0.1, 0.2, ..., 1.0]."
            )
        if value not in out:
            out.append(value)
    return tuple(out)


def check_validation_fraction(fraction: float) -> float:
    """Validate `validation_fraction`: the share of each training split held out for validation, in (0, 1).

    Example:

    ```python
    >>> from hf_magmax.scaling import check_validation_fraction
    >>> check_validation_fraction(0.1)
    0.1
    ```
    """
    if not _is_number(fraction) or not 0.0 < float(fraction) < 1.0:
        raise ValueError(
            f"`validation_fraction` must be a number strictly between 0 and 1 (e.g. 0.1 holds out 10% of each "
            f"task's training split), got {fraction!r}."
        )
    return float(fraction)


def _check_score(score: Any, coef: float) -> float:
    if isinstance(score, Tensor) and score.numel() == 1:
        score = score.item()
    if hasattr(score, "item") and not _is_number(score) and getattr(score, "size", None) == 1:  # numpy scalars
        score = score.item()
    if not _is_number(score):
        raise TypeError(
            f"`score_fn` must return a single number (higher is better), but for λ = {coef} it returned "
            f"{score!r} of type {type(score).__name__}. Return e.g. the mean validation accuracy as a float."
        )
    score = float(score)
    if math.isnan(score):
        raise ValueError(
            f"`score_fn` returned NaN for λ = {coef}: the score must be a number. Check the validation data (is it "
            "empty?) and the metric."
        )
    return score


# --------------------------------------------------------------------------------------------------------------------
# The search
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class ScalingCoefSearch:
    """The result of [`search_scaling_coef`].

    Attributes:
        best (`float`): the chosen λ.
        best_score (`float`): its score.
        curve (`dict[float, float]`): λ → score for every λ of the grid, in grid order.
        greater_is_better (`bool`): whether a higher score was better.
    """

    best: float
    best_score: float
    curve: dict[float, float] = field(default_factory=dict)
    greater_is_better: bool = True

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict: `best`, `best_score`, `greater_is_better` and the curve as `[[λ, score], …]`."""
        return {
            "best": self.best,
            "best_score": self.best_score,
            "greater_is_better": self.greater_is_better,
            "curve": [[coef, score] for coef, score in self.curve.items()],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ScalingCoefSearch:
        """Inverse of [`~ScalingCoefSearch.to_dict`]."""
        curve = data["curve"]
        pairs = curve.items() if isinstance(curve, Mapping) else curve
        return cls(
            best=float(data["best"]),
            best_score=float(data["best_score"]),
            curve={float(c): float(s) for c, s in pairs},
            greater_is_better=bool(data.get("greater_is_better", True)),
        )


def search_scaling_coef(
    apply_fn: Callable[[float], None],
    score_fn: Callable[[], float],
    grid: Sequence[float] = DEFAULT_SCALING_COEF_GRID,
    greater_is_better: bool = True,
    apply_best: bool = True,
) -> ScalingCoefSearch:
    """Pick λ from `grid` by the score of the merged model: for each λ, `apply_fn(λ)` then `score_fn()`.

    Ties go to the **smaller λ** (the merged model closer to θ_0), whatever the grid order.

    Args:
        apply_fn (`Callable[[float], None]`):
            Puts `θ_0 + λ · τ_merged` into the model that `score_fn` scores (e.g. a [`ScalingCoefApplier`]).
        score_fn (`Callable[[], float]`):
            Scores the model as it is now on **validation** data, e.g. the mean validation accuracy over the tasks
            seen so far. Must return a number (a float, an int, a one-element tensor or numpy scalar); NaN is an error.
        grid (`Sequence[float]`, *optional*, defaults to [`DEFAULT_SCALING_COEF_GRID`]):
            Candidate values of λ (0.1, 0.2, …, 1.0 by default), each > 0.
        greater_is_better (`bool`, *optional*, defaults to `True`):
            Set to `False` when the score is a loss.
        apply_best (`bool`, *optional*, defaults to `True`):
            Call `apply_fn(best)` at the end, so the model is left at the chosen λ.

    Returns:
        [`ScalingCoefSearch`]: the chosen λ (`best`), its score and the whole curve (λ → score, in grid order).

    Example:

    ```python
    >>> from hf_magmax.scaling import search_scaling_coef
    >>> state = {}
    >>> result = search_scaling_coef(
    ...     apply_fn=lambda coef: state.update(coef=coef),
    ...     score_fn=lambda: -((state["coef"] - 0.6) ** 2),  # a curve peaking at λ = 0.6
    ... )
    >>> result.best
    0.6
    ```
    """
    grid = check_scaling_coef_grid(grid)
    if not callable(apply_fn):
        raise TypeError(f"`apply_fn` must be callable as `apply_fn(scaling_coef)`, got {type(apply_fn).__name__}.")
    if not callable(score_fn):
        raise TypeError(f"`score_fn` must be callable as `score_fn() -> float`, got {type(score_fn).__name__}.")
    curve: dict[float, float] = {}
    for coef in grid:
        apply_fn(coef)
        curve[coef] = _check_score(score_fn(), coef)
        logger.info("scaling_coef %g: validation score %.6g", coef, curve[coef])
    sign = 1.0 if greater_is_better else -1.0
    # highest score; among equal scores, the smaller λ
    best = min(curve, key=lambda coef: (-sign * curve[coef], coef))
    if apply_best:
        apply_fn(best)
    logger.info("chose scaling_coef %g (validation score %.6g)", best, curve[best])
    return ScalingCoefSearch(best=best, best_score=curve[best], curve=curve, greater_is_better=greater_is_better)


class ScalingCoefApplier:
    """An `apply_fn` for [`search_scaling_coef`]: re-applies `θ_0 + λ · τ_merged` to a model in place.

    With `base` (θ_0, name → tensor), each call writes [`~hf_magmax.merging.apply_merged`]`(θ_0, τ_merged, λ)`: the
    very weights every other door (the Trainer, `merge_checkpoints`, `TaskVector.apply_to`) writes, bit for bit, at
    the cost of one copy of θ_0. Without it no copy is kept: the model must hold `θ_0 + current · τ_merged` when the
    applier is built (`current=0`: the model holds θ_0) and each call adds `(λ − current) · τ_merged` in place (math
    in fp32). In fp32 the weights then match `θ_0 + λ · τ` to float rounding (≈1e-7 relative); for fp16/bf16 models
    the rounding adds up over the grid, so pass `base` there.

    Args:
        model (`torch.nn.Module`):
            The model to modify.
        merged_task_vector (`Mapping[str, torch.Tensor]`):
            The merged, **unscaled** task vector (name → tensor), e.g. `StateDictMerger.result()`. Names are those of
            `model.state_dict()`; tied names are applied once.
        current (`float`, *optional*, defaults to `0.0`):
            The λ the model holds now (ignored with `base`).
        base (`Mapping[str, torch.Tensor]`, *optional*):
            θ_0 for the names of `merged_task_vector`: apply exactly with the merge core's one rounding rule.

    Example:

    ```python
    >>> import torch
    >>> from hf_magmax.scaling import ScalingCoefApplier
    >>> model = torch.nn.Linear(1, 1, bias=False)
    >>> _ = model.weight.data.fill_(1.0)
    >>> apply = ScalingCoefApplier(model, {"weight": torch.tensor([[2.0]])})
    >>> apply(0.5); model.weight.item()
    2.0
    >>> apply(0.25); model.weight.item()
    1.5
    ```
    """

    def __init__(
        self,
        model: torch.nn.Module,
        merged_task_vector: Mapping[str, Tensor],
        current: float = 0.0,
        base: Mapping[str, Tensor] | None = None,
    ) -> None:
        self.model = model
        self.current = float(current)
        self.base = base
        self._names: list[str] = []
        targets = dict(model.named_parameters(remove_duplicate=False))
        targets.update(dict(model.named_buffers(remove_duplicate=False)))
        self._pairs: list[tuple[Tensor, Tensor]] = []
        seen: set[int] = set()
        for name, delta in merged_task_vector.items():
            if name not in targets:
                raise KeyError(
                    f"merged task vector tensor {name!r} is not a parameter or buffer of the model: was the task "
                    "vector computed from this architecture's `state_dict()`?"
                )
            target = targets[name]
            if id(target) in seen or not target.is_floating_point():
                continue
            seen.add(id(target))
            if tuple(delta.shape) != tuple(target.shape):
                raise ValueError(
                    f"merged task vector tensor {name!r} has shape {tuple(delta.shape)}, the model's has "
                    f"{tuple(target.shape)}."
                )
            if base is not None and name not in base:
                raise KeyError(f"`base` has no tensor {name!r} of the merged task vector: pass θ_0's state dict.")
            self._pairs.append((target, delta))
            self._names.append(name)

    @torch.no_grad()
    def __call__(self, scaling_coef: float) -> None:
        from .merging import apply_merged

        if self.base is not None:
            for name, (target, delta) in zip(self._names, self._pairs):
                target.copy_(apply_merged(self.base[name], delta, float(scaling_coef)).to(target.device, target.dtype))
            self.current = float(scaling_coef)
            return
        step = float(scaling_coef) - self.current
        if step != 0.0:
            for target, delta in self._pairs:
                update = delta.to(device=target.device, dtype=torch.float32) * step
                if target.dtype == torch.float32:
                    target.add_(update)
                else:
                    target.copy_((target.float() + update).to(target.dtype))
        self.current = float(scaling_coef)


# --------------------------------------------------------------------------------------------------------------------
# Merges of saved checkpoints
# --------------------------------------------------------------------------------------------------------------------


def _load_model(path: str | os.PathLike, model_class: Any | None, torch_dtype: torch.dtype | None, **kwargs):
    if model_class is None:  # the class the config names: the one loader of hf_magmax
        from .io import load_pretrained

        return load_pretrained(path, dtype="auto" if torch_dtype is None else torch_dtype, **kwargs).eval()
    return model_class.from_pretrained(path, dtype=torch_dtype, **kwargs).eval()


def select_scaling_coef_for_checkpoints(
    base: str | os.PathLike,
    models: Sequence[str | os.PathLike],
    score_fn: Callable[[torch.nn.Module], float],
    method: str | MergeSpec = "magmax",
    grid: Sequence[float] = DEFAULT_SCALING_COEF_GRID,
    greater_is_better: bool = True,
    model_class: Any | None = None,
    torch_dtype: torch.dtype | None = torch.float32,
    device: str | torch.device = "cpu",
    **method_kwargs,
) -> ScalingCoefSearch:
    """Choose λ for a merge of saved checkpoints by a user score (the `scaling_coef="auto"` of `merge_checkpoints`).

    θ_0 is loaded once as a transformers model (the class named in the base config's `architectures`, else
    `AutoModel`); the fine-tuned models are loaded one at a time and folded into the merge state
    ([`~hf_magmax.StateDictMerger`] of the one [`~hf_magmax.merging.MergeSpec`]) once; then for each λ of the grid the
    model is set to [`~hf_magmax.merging.apply_merged`]`(θ_0, τ_merged, λ)` in place, the same weights the merge
    writes, and `score_fn(model)` is called. Peak memory: the model, a copy of θ_0, one fine-tuned model and the
    merge state.

    Args:
        base (`str` or `os.PathLike`):
            Directory of the pretrained checkpoint θ_0 (`save_pretrained` layout).
        models (`Sequence[str | os.PathLike]`):
            Directories of the fine-tuned checkpoints, in task order.
        score_fn (`Callable[[torch.nn.Module], float]`):
            Scores a model on **validation** data (higher is better unless `greater_is_better=False`). It receives the
            loaded model, in eval mode, on `device`.
        method (`str` or [`~hf_magmax.merging.MergeSpec`], *optional*, defaults to `"magmax"`):
            The merge method (see [`~hf_magmax.MERGE_METHODS`]), or a whole spec (its λ is ignored: λ is searched).
        grid (`Sequence[float]`, *optional*, defaults to [`DEFAULT_SCALING_COEF_GRID`]):
            Candidate values of λ.
        greater_is_better (`bool`, *optional*, defaults to `True`):
            Whether a higher score is better.
        model_class (*optional*):
            The transformers class to load with (e.g. `AutoModelForSequenceClassification`), if the config's
            `architectures` does not name the one `score_fn` needs.
        torch_dtype (`torch.dtype`, *optional*, defaults to `torch.float32`):
            dtype the models are loaded and scored in.
        device (`str` or `torch.device`, *optional*, defaults to `"cpu"`):
            Where the model and the merge state live.
        **method_kwargs:
            `density` for `ties`, `seed` for `random_mix` (when `method` is a name). random_mix draws are seeded by
            tensor name and element position, as in every other door, so the scored merge is the written one.

    Returns:
        [`ScalingCoefSearch`]: the chosen λ, its score and the curve. The model is not returned; write the merge
        with `merge_checkpoints(..., scaling_coef=result.best)`.
    """
    from .merging import MergeSpec, StateDictMerger
    from .task_vectors import TaskVector

    grid = check_scaling_coef_grid(grid)
    if not callable(score_fn):
        raise TypeError(
            f"`score_fn` must be callable as `score_fn(model) -> float` when `scaling_coef='auto'`, got {score_fn!r}."
        )
    models = [models] if isinstance(models, (str, os.PathLike)) else list(models)
    if not models:
        raise ValueError("`models` is empty: pass the directories of the fine-tuned checkpoints to merge.")
    if isinstance(method, MergeSpec):
        if method_kwargs:
            raise TypeError("pass the options on the `MergeSpec`, not as keyword arguments beside it.")
        spec = method.with_scaling_coef(None)
    else:
        spec = MergeSpec(method, **method_kwargs)
    merger = StateDictMerger(spec, device=device)
    model = _load_model(base, model_class, torch_dtype).to(device)
    theta_0 = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    for index, path in enumerate(models):
        finetuned = _load_model(path, type(model), torch_dtype).to(device)
        merger.update(TaskVector.from_state_dicts(theta_0, finetuned.state_dict()))
        del finetuned
        logger.info("folded task vector %d/%d (%s) into the %s merge", index + 1, len(models), path, spec.method)
    applier = ScalingCoefApplier(model, merger.result(), base=theta_0)
    del merger

    def score() -> float:
        with torch.no_grad():
            return score_fn(model)

    return search_scaling_coef(applier, score, grid, greater_is_better=greater_is_better, apply_best=False)


# --------------------------------------------------------------------------------------------------------------------
# Validation splits
# --------------------------------------------------------------------------------------------------------------------


def _scalar_labels(dataset: datasets.Dataset, column: str) -> list | None:
    values = dataset[column]
    if all(isinstance(v, (int, str, bool)) or (_is_number(v) and float(v).is_integer()) for v in values):
        return list(values)
    return None


def split_validation(
    dataset: datasets.Dataset,
    fraction: float,
    seed: int = 42,
    label_column: str | None = "auto",
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Carve a validation split from a training split: deterministic, disjoint, stratified by label.

    Each class keeps `round(fraction · n_class)` of its examples for validation (at least one, and at least one for
    training, when the class has two or more), drawn with a `numpy` generator seeded with `seed`. Both splits keep the
    original order of the rows.

    Args:
        dataset (`datasets.Dataset`):
            The training split of one task.
        fraction (`float`):
            Share of the examples held out for validation, in (0, 1).
        seed (`int`, *optional*, defaults to `42`):
            Seed of the draw: the same seed gives the same split.
        label_column (`str`, *optional*, defaults to `"auto"`):
            Column to stratify by. `"auto"` uses `label` or `labels` when the dataset has one with scalar values;
            `None` draws without stratification.

    Returns:
        `tuple[datasets.Dataset, datasets.Dataset]`: `(train, validation)`.

    Example:

    ```python
    >>> from datasets import Dataset
    >>> from hf_magmax.scaling import split_validation
    >>> ds = Dataset.from_dict({"x": list(range(20)), "label": [0, 1] * 10})
    >>> train, validation = split_validation(ds, 0.2)
    >>> len(train), len(validation), sorted(validation["label"])
    (16, 4, [0, 0, 1, 1])
    ```
    """
    import numpy as np

    fraction = check_validation_fraction(fraction)
    num_rows = len(dataset)
    if num_rows < 2:
        raise ValueError(
            f"cannot hold out a validation split from a dataset of {num_rows} example(s); pass more data."
        )
    labels = None
    if label_column == "auto":
        for name in ("label", "labels"):
            if name in dataset.column_names:
                labels = _scalar_labels(dataset, name)
                if labels is not None:
                    break
    elif label_column is not None:
        if label_column not in dataset.column_names:
            raise KeyError(
                f"`label_column` {label_column!r} is not a column of the dataset (columns: {dataset.column_names})."
            )
        labels = _scalar_labels(dataset, label_column)
        if labels is None:
            raise ValueError(f"`label_column` {label_column!r} must hold one class per row to stratify by.")

    rng = np.random.default_rng(seed)
    groups: dict[Any, list[int]] = {}
    for index, label in enumerate(labels if labels is not None else [0] * num_rows):
        groups.setdefault(label, []).append(index)
    validation: list[int] = []
    for key in sorted(groups, key=repr):
        indices = np.asarray(groups[key])
        count = round(fraction * len(indices))
        if len(indices) >= 2:
            count = min(max(count, 1), len(indices) - 1)
        validation.extend(rng.permutation(indices)[:count].tolist())
    validation_set = set(validation)
    train = [i for i in range(num_rows) if i not in validation_set]
    if not validation or not train:
        raise ValueError(
            f"`validation_fraction={fraction}` leaves an empty split for a dataset of {num_rows} examples; "
            "choose a fraction that keeps examples on both sides."
        )
    return dataset.select(train), dataset.select(sorted(validation))


def scaling_curve_markdown(search: ScalingCoefSearch, score_name: str = "validation score") -> str:
    """A model-card section: the chosen λ and the whole curve as a markdown table (the chosen row in bold).

    Example:

    ```python
    >>> from hf_magmax.scaling import ScalingCoefSearch, scaling_curve_markdown
    >>> print(scaling_curve_markdown(ScalingCoefSearch(best=0.5, best_score=0.9, curve={0.5: 0.9, 1.0: 0.8})))
    ## Scaling coefficient chosen on validation data
    <BLANKLINE>
    λ = 0.5 has the best validation score (0.9) over the grid 0.5, 1. Ties go to the smaller λ.
    <BLANKLINE>
    | λ | validation score |
    |---|---|
    | **0.5** | **0.9** |
    | 1 | 0.8 |
    ```
    """
    grid = ", ".join(f"{coef:g}" for coef in search.curve)
    lines = [
        "## Scaling coefficient chosen on validation data",
        "",
        f"λ = {search.best:g} has the best {score_name} ({search.best_score:.4g}) over the grid {grid}. "
        "Ties go to the smaller λ.",
        "",
        f"| λ | {score_name} |",
        "|---|---|",
    ]
    for coef, score in search.curve.items():
        cells = (f"{coef:g}", f"{score:.4g}")
        if coef == search.best:
            cells = tuple(f"**{cell}**" for cell in cells)
        lines.append(f"| {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------------------------------


def plot_scaling_curve(
    curve: Mapping[float, float] | ScalingCoefSearch,
    path: str | os.PathLike,
    best: float | None = None,
    title: str | None = None,
    ylabel: str = "validation score",
    extra_curves: Mapping[str, Mapping[float, float]] | None = None,
) -> str:
    """Draw the score against λ and save the figure to `path` (PNG, PDF or SVG by extension).

    Needs matplotlib: `pip install "hf_magmax[plot]"`.

    Args:
        curve (`dict[float, float]` or [`ScalingCoefSearch`]):
            λ → score. A [`ScalingCoefSearch`] also gives `best`.
        path (`str` or `os.PathLike`):
            Output file.
        best (`float`, *optional*):
            λ to mark as chosen.
        title (`str`, *optional*):
            Figure title.
        ylabel (`str`, *optional*, defaults to `"validation score"`):
            Label of the y axis.
        extra_curves (`dict[str, dict[float, float]]`, *optional*):
            More curves to draw beside it, by legend label (e.g. `{"test": test_curve}`).

    Returns:
        `str`: the path written.
    """
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError('plot_scaling_curve needs matplotlib: pip install "hf_magmax[plot]"') from error

    if isinstance(curve, ScalingCoefSearch):
        best = curve.best if best is None else best
        curve = curve.curve
    if not curve:
        raise ValueError("`curve` is empty: pass λ → score for at least one λ.")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    coefs = sorted(curve)
    ax.plot(coefs, [curve[c] for c in coefs], marker="o", label=ylabel)
    for label, other in (extra_curves or {}).items():
        other_coefs = sorted(other)
        ax.plot(other_coefs, [other[c] for c in other_coefs], marker=".", linestyle="--", label=label)
    if best is not None:
        ax.axvline(best, color="grey", linestyle=":", label=f"chosen λ = {best:g}")
    ax.set_xlabel("scaling coefficient λ")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
