# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""Continual fine-tuning with MagMax inside 🤗 Transformers' `Trainer`.

A method is a pair, as in TRL: [`MagMaxConfig`] (a `TrainingArguments`) and [`MagMaxTrainer`] (a `Trainer`). The
trainer fine-tunes the model on a sequence of tasks, one after the other (task t starts from the weights after task
t − 1, with a fresh optimizer and learning-rate schedule), folds each task vector `τ_t = θ_t − θ_0` into a running merge
of the merge engine ([`~hf_magmax.merging.StateDictMerger`]: θ_0 and one running tensor set, not T copies), evaluates
the sequential and the merged model on every task after every task, and ends with the merged model
`θ_0 + λ · merge(τ_1, …, τ_T)`.

For existing scripts that already call `trainer.train()` once per task, [`MagMaxCallback`] adds the same merge and
metrics to a plain `Trainer`.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import math
import os
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import TrainOutput, get_last_checkpoint

from .merging import StateDictMerger, check_density, check_merge_method, default_scaling_coef
from .task_vectors import TaskVector, shared_tensor_groups


logger = logging.getLogger(__name__)

__all__ = ["MagMaxCallback", "MagMaxConfig", "MagMaxTrainer"]

#: Name of the results file written to `output_dir`.
RESULTS_NAME = "continual_results.json"
#: Files a checkpoint carries besides the `Trainer`'s own.
STATE_NAME = "magmax_state.json"
BASE_WEIGHTS_NAME = "magmax_base.safetensors"
MERGE_STATE_NAME = "magmax_merge_state.pt"

_FINAL_MODELS = ("merged", "sequential")
_LORA_OUTPUTS = ("merged", "adapter")


# --------------------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------------------


def _check_options(options: Any) -> None:
    """Validate the MagMax options on `options` (a [`MagMaxConfig`] or the callback) in place."""
    from .scaling import DEFAULT_SCALING_COEF_GRID, check_scaling_coef_grid, check_validation_fraction

    coef = options.scaling_coef
    if isinstance(coef, str) and coef.strip().lower() == "none":
        coef = None
    if coef is None:  # the method's default λ (0.5 magmax, 1.0 average/ties, 0.3 task_arithmetic, 0.5 random_mix)
        coef = options.scaling_coef = default_scaling_coef(check_merge_method(options.merge_method))
    if isinstance(coef, str):
        if coef.strip().lower() == "auto":
            options.scaling_coef = "auto"
        else:
            try:
                options.scaling_coef = float(coef)
            except ValueError:
                raise ValueError(
                    f'`scaling_coef` must be a number > 0 or "auto" (choose λ on validation data), got {coef!r}.'
                ) from None
    elif isinstance(coef, bool) or not isinstance(coef, (int, float)):
        raise TypeError(f'`scaling_coef` must be a number > 0 or "auto", got {coef!r} of type {type(coef).__name__}.')
    if options.scaling_coef != "auto":
        options.scaling_coef = float(options.scaling_coef)
        if not math.isfinite(options.scaling_coef) or options.scaling_coef <= 0:
            raise ValueError(
                f"`scaling_coef` must be a finite number > 0 (λ = 0 is θ_0 itself), got {options.scaling_coef!r}. "
                'MagMax uses 0.5; pass "auto" to choose λ on validation data.'
            )
    if options.scaling_coef_grid is not None:
        options.scaling_coef_grid = list(check_scaling_coef_grid(options.scaling_coef_grid))
        if options.scaling_coef != "auto":
            warnings.warn(
                '`scaling_coef_grid` is only used with `scaling_coef="auto"`; it is ignored for a fixed `scaling_coef`.',
                stacklevel=3,
            )
    elif options.scaling_coef == "auto":
        options.scaling_coef_grid = list(DEFAULT_SCALING_COEF_GRID)
    try:
        check_merge_method(options.merge_method)
    except ValueError as err:
        raise ValueError(f"`merge_method`: {err}") from None
    try:
        options.merge_density = check_density(options.merge_density)
    except ValueError:
        raise ValueError(
            f"`merge_density` must be a number in (0, 1] (the fraction TIES keeps), got {options.merge_density!r}."
        ) from None
    if isinstance(options.merge_seed, bool) or not isinstance(options.merge_seed, int):
        raise TypeError(f"`merge_seed` must be an integer, got {options.merge_seed!r}.")
    if options.final_model not in _FINAL_MODELS:
        raise ValueError(f"`final_model` must be one of {', '.join(_FINAL_MODELS)}, got {options.final_model!r}.")
    try:
        torch.device(options.merge_device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f'`merge_device` must name a torch device such as "cpu" or "cuda:0", got {options.merge_device!r}.'
        ) from None
    frozen = options.frozen_modules
    if frozen is not None:
        if isinstance(frozen, str):
            frozen = [frozen]
        frozen = list(frozen)
        for pattern in frozen:
            if not isinstance(pattern, str) or not pattern:
                raise TypeError(f"`frozen_modules` must be a list of module names or regexes, got {pattern!r}.")
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"`frozen_modules` entry {pattern!r} is not a valid regex: {err}.") from None
        options.frozen_modules = frozen
    if options.validation_fraction is not None:
        options.validation_fraction = check_validation_fraction(options.validation_fraction)
    if options.max_validation_samples is not None and (
        isinstance(options.max_validation_samples, bool)
        or not isinstance(options.max_validation_samples, int)
        or options.max_validation_samples < 1
    ):
        raise ValueError(
            f"`max_validation_samples` must be a positive integer or None, got {options.max_validation_samples!r}."
        )
    if options.continual_metric is not None and not isinstance(options.continual_metric, str):
        raise TypeError(
            f"`continual_metric` must be a metric name such as 'accuracy', got {options.continual_metric!r}."
        )


@dataclass
class MagMaxConfig(TrainingArguments):
    r"""Configuration of [`MagMaxTrainer`]: `TrainingArguments` plus the MagMax options.

    Every `TrainingArguments` option applies to each task (the learning-rate schedule, the number of epochs or
    `max_steps`, … restart with every task). Only the MagMax options are listed here.

    Args:
        scaling_coef (`float` or `"auto"`, *optional*, defaults to `0.5`):
            λ: the merged model is `θ_0 + λ · merge(τ_1, …, τ_T)`. `0.5` is the MagMax paper's value. `"auto"` picks
            λ from `scaling_coef_grid` by the mean score on *validation* data of the tasks seen so far. `None` takes
            the merge method's default (`DEFAULT_SCALING_COEFS`: 1.0 for `average` and `ties`, 0.3 for
            `task_arithmetic`).
        scaling_coef_grid (`list[float]`, *optional*):
            Candidate λ for `scaling_coef="auto"`; defaults to 0.1, 0.2, …, 1.0.
        merge_method (`str`, *optional*, defaults to `"magmax"`):
            `magmax`, or a baseline of the merge engine: `average`, `task_arithmetic`, `ties`, `random_mix`.
        merge_density (`float`, *optional*, defaults to `0.2`):
            Fraction of each task vector TIES keeps (`merge_method="ties"` only).
        merge_seed (`int`, *optional*, defaults to `0`):
            Seed of `merge_method="random_mix"`.
        final_model (`str`, *optional*, defaults to `"merged"`):
            Which weights the model holds after `train()`: `"merged"` or `"sequential"` (the weights after the last
            task). Both are evaluated either way.
        eval_merged_every_task (`bool`, *optional*, defaults to `True`):
            Evaluate the merged model after every task (fills the merged accuracy matrix); otherwise only at the end.
        merge_device (`str`, *optional*, defaults to `"cpu"`):
            Where θ_0 and the running merge live. The CPU default leaves accelerator memory unchanged.
        restrict_loss_to_task_classes (`bool`, *optional*, defaults to `False`):
            Class-incremental learning with one head over all classes: mask the logits of the classes that are not in
            the current task out of the training loss (evaluation uses every class).
        frozen_modules (`list[str]`, *optional*):
            Module names (prefixes) or regexes whose parameters are frozen and excluded from the task vectors, e.g. a
            zero-shot label-embedding head.
        validation_fraction (`float`, *optional*, defaults to `0.1`):
            With `scaling_coef="auto"` and no `validation_datasets`: the share of each task's training split held out
            (seeded with `seed`) to choose λ. Never the evaluation data of the accuracy matrices.
        max_validation_samples (`int`, *optional*):
            Use at most this many validation examples per task for each λ of the grid (bounds the cost).
        select_scaling_coef_every_task (`bool`, *optional*):
            With `scaling_coef="auto"`: choose λ after every task (on the tasks seen so far) for the merged row of that
            task, not only after the last. Defaults to `eval_merged_every_task`.
        continual_metric (`str`, *optional*):
            The metric of the accuracy matrices, a key of `compute_metrics`' output without the prefix, e.g.
            `"accuracy"`. Defaults to `"accuracy"` when the training labels are class ids (a built-in accuracy is used
            if `compute_metrics` is not given), and to `"neg_loss"` (minus the evaluation loss, so higher is better
            and forgetting is a loss increase) otherwise, e.g. for causal language models.
        lora_output (`str`, *optional*, defaults to `"merged"`):
            LoRA training only: end with the merged deltas folded into the base model (`"merged"`), or re-factored
            into a new LoRA adapter of rank `lora_rank` (`"adapter"`).
        lora_rank (`int`, *optional*):
            Rank of the re-factored adapter for `lora_output="adapter"`, capped per module by the size of its ΔW;
            defaults to the trained adapter's rank times the number of tasks. The re-factor is exact at full rank.
    """

    # `float | str | None` so that HfArgumentParser parses the command line as a string ("auto" or a number)
    scaling_coef: float | str | None = field(
        default=0.5,
        metadata={"help": 'λ of the merged model θ_0 + λ·merge(τ); 0.5 as in the MagMax paper, or "auto".'},
    )
    scaling_coef_grid: list[float] | None = field(
        default=None,
        metadata={"help": 'Candidate λ for scaling_coef="auto" (default 0.1, 0.2, ..., 1.0).'},
    )
    merge_method: str = field(
        default="magmax",
        metadata={"help": "Merge method: magmax, or a baseline: average, task_arithmetic, ties, random_mix."},
    )
    merge_density: float = field(default=0.2, metadata={"help": "Fraction of each task vector TIES keeps."})
    merge_seed: int = field(default=0, metadata={"help": "Seed of merge_method=random_mix."})
    final_model: str = field(
        default="merged",
        metadata={"help": "Weights the model holds after training: merged or sequential.", "choices": _FINAL_MODELS},
    )
    eval_merged_every_task: bool = field(
        default=True, metadata={"help": "Evaluate the merged model after every task, not only at the end."}
    )
    merge_device: str = field(
        default="cpu", metadata={"help": "Device of θ_0 and the running merge (cpu keeps accelerator memory)."}
    )
    restrict_loss_to_task_classes: bool = field(
        default=False, metadata={"help": "Mask logits of classes outside the current task in the training loss."}
    )
    frozen_modules: list[str] | None = field(
        default=None, metadata={"help": "Module names or regexes to freeze and exclude from the task vectors."}
    )
    validation_fraction: float | None = field(
        default=0.1, metadata={"help": 'Share of each training split held out to choose λ with scaling_coef="auto".'}
    )
    max_validation_samples: int | None = field(
        default=None, metadata={"help": "Validation examples per task used for each λ of the grid."}
    )
    select_scaling_coef_every_task: bool | None = field(
        default=None, metadata={"help": 'With scaling_coef="auto": choose λ after every task, not only the last.'}
    )
    continual_metric: str | None = field(
        default=None,
        metadata={"help": "Metric of the accuracy matrices (e.g. accuracy); default accuracy or neg_loss."},
    )
    lora_output: str = field(
        default="merged",
        metadata={
            "help": "LoRA training: fold the merge into the base (merged) or re-factor it (adapter).",
            "choices": _LORA_OUTPUTS,
        },
    )
    lora_rank: int | None = field(default=None, metadata={"help": "Rank of the re-factored adapter."})

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_options(self)
        if self.lora_output not in _LORA_OUTPUTS:
            raise ValueError(f"`lora_output` must be one of {', '.join(_LORA_OUTPUTS)}, got {self.lora_output!r}.")
        if self.lora_rank is not None and (
            isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank < 1
        ):
            raise ValueError(f"`lora_rank` must be a positive integer, got {self.lora_rank!r}.")
        if self.load_best_model_at_end:
            raise ValueError(
                "`load_best_model_at_end=True` is not supported by MagMaxTrainer: each task is its own run, and "
                "loading a best checkpoint would break the task sequence. Set it to False."
            )


# --------------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------------


def _matches(name: str, patterns: Sequence[str]) -> bool:
    """Whether parameter `name` lies in a module named or matched by one of `patterns` (prefix or full regex)."""
    return any(re.fullmatch(rf"(?:{p})(?:\..*)?", name) for p in patterns)


def _dataset_name(dataset: Any, index: int) -> str:
    name = getattr(dataset, "name", None)
    return name if isinstance(name, str) and name else f"task_{index}"


def _normalize_tasks(datasets: Any, argument: str) -> tuple[list[str], list[Any], list[list | None]]:
    """(names, datasets, classes) from a list, a dict name → dataset, or a `ContinualSplit`."""
    if datasets is None:
        return [], [], []
    if isinstance(datasets, Mapping):
        items = list(datasets.items())
        names = [str(k) for k, _ in items]
        values = [v for _, v in items]
    elif isinstance(datasets, (list, tuple)):
        values = list(datasets)
        names = [_dataset_name(v, i) for i, v in enumerate(values)]
    else:
        raise TypeError(
            f"`{argument}` must be a list of datasets or a dict task name → dataset (in task order), "
            f"got {type(datasets).__name__}."
        )
    classes: list[list | None] = []
    out: list[Any] = []
    for value in values:
        if hasattr(value, "dataset") and hasattr(value, "classes") and hasattr(value, "name"):  # ContinualTask
            classes.append(list(value.classes) or None)
            out.append(value.dataset)
        else:
            classes.append(None)
            out.append(value)
    if len(set(names)) != len(names):
        raise ValueError(f"`{argument}` has duplicate task names {names}: give every task its own name.")
    return names, out, classes


def _label_column(dataset: Any) -> str | None:
    columns = getattr(dataset, "column_names", None)
    if columns is None:
        return None
    for name in ("labels", "label"):
        if name in columns:
            return name
    return None


def _scalar_labels(dataset: Any) -> list[int] | None:
    """The labels of a `datasets.Dataset` if they are class ids (one int per example), else None."""
    column = _label_column(dataset)
    if column is None or len(dataset) == 0:
        return None
    values = list(dataset[column])
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return values
    if all(hasattr(v, "ndim") and v.ndim == 0 for v in values):  # numpy/torch scalars
        return [int(v) for v in values]
    return None


def _num_examples(dataset: Any) -> int | None:
    try:
        return len(dataset)
    except TypeError:  # IterableDataset
        return None


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def _is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _checkpoint_tensor_names(directory: str) -> set[str] | None:
    """The tensor names saved in a checkpoint's safetensors weights (single file or sharded), or None if it has none."""
    from safetensors import safe_open

    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            return set(json.load(f)["weight_map"])
    single = os.path.join(directory, "model.safetensors")
    if not os.path.isfile(single):
        return None
    with safe_open(single, framework="pt") as f:
        return set(f.keys())


def _live_tensors(model: nn.Module) -> dict[str, Tensor]:
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(dict(model.named_buffers(remove_duplicate=False)))
    return tensors


# --------------------------------------------------------------------------------------------------------------------
# The continual run: shared by MagMaxTrainer and MagMaxCallback
# --------------------------------------------------------------------------------------------------------------------


class _ContinualRun:
    """θ_0, the running merge, the accuracy matrices and the chosen λ of one task sequence.

    The Trainer and the callback drive it with the same calls (`begin`, `begin_task`, `end_task`, `finish`), so both
    paths give the same weights and metrics.
    """

    def __init__(
        self,
        options: Any,
        task_names: list[str],
        eval_datasets: list[Any],
        validation_datasets: list[Any] | None,
    ) -> None:
        self.options = options
        self.task_names = list(task_names)
        self.eval_datasets = list(eval_datasets)
        self.validation_datasets = validation_datasets
        self.device = torch.device(options.merge_device)
        self.merger = StateDictMerger(options.merge_method, device=self.device, **self._method_kwargs())
        self.base: dict[str, Tensor] | None = None
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.num_tasks_done = 0
        self.metric: str | None = None
        num = len(self.task_names)
        self.seq_matrix: list[list[float | None]] = [[None] * num for _ in range(num + 1)]
        self.merged_matrix: list[list[float | None]] = [[None] * num for _ in range(num + 1)]
        self.merged_coefs: list[float | None] = [None] * (num + 1)
        self.searches: list[dict[str, Any]] = []
        self.final_scaling_coef: float | None = None
        self.finished = False
        self.lora = False  # set by the trainer for PEFT models: task vectors are ΔW relative to the base
        self.lora_info: dict[str, Any] | None = None

    # -- options ---------------------------------------------------------------------------------------------------

    def _method_kwargs(self) -> dict[str, Any]:
        method = self.options.merge_method
        if method == "ties":
            return {"density": self.options.merge_density}
        if method == "random_mix":
            return {"seed": self.options.merge_seed}
        return {}

    @property
    def auto(self) -> bool:
        return self.options.scaling_coef == "auto"

    def _select_every_task(self) -> bool:
        value = self.options.select_scaling_coef_every_task
        return self.options.eval_merged_every_task if value is None else bool(value)

    def _default_coef(self) -> float:
        return 0.5 if self.auto else float(self.options.scaling_coef)

    # -- weights ---------------------------------------------------------------------------------------------------

    def _weights(self, trainer: Trainer | None, model: nn.Module, initial: bool = False) -> dict[str, Tensor]:
        """The model's full weights: gathered through Accelerate (FSDP/ZeRO-3) once training has started."""
        unwrapped = _unwrap(model)
        if self.lora:
            from .peft import lora_delta_state_dict

            return lora_delta_state_dict(unwrapped, adapter_name=getattr(unwrapped, "active_adapter", "default"))
        if trainer is not None and not initial:
            return trainer.accelerator.get_state_dict(trainer.model_wrapped)
        return unwrapped.state_dict()

    def _names(self, state_dict: Mapping[str, Tensor]) -> list[str]:
        aliases = shared_tensor_groups(state_dict)
        frozen = self.options.frozen_modules or []
        return [
            name
            for name, tensor in state_dict.items()
            if isinstance(tensor, Tensor)
            and tensor.is_floating_point()
            and aliases.get(name, name) == name
            and not _matches(name, frozen)
        ]

    @torch.no_grad()
    def snapshot_base(self, state_dict: Mapping[str, Tensor]) -> None:
        names = self._names(state_dict)
        if not names:
            raise ValueError(
                "the model has no floating-point weights outside `frozen_modules`: there is nothing to train or merge."
            )
        self.base = {name: state_dict[name].detach().to(self.device, copy=True) for name in names}
        self.shapes = {name: tuple(t.shape) for name, t in self.base.items()}

    def check_shapes(self, state_dict: Mapping[str, Tensor], task: int) -> None:
        """Raise if the model's weights no longer match θ_0 (a head resized between tasks, another model...)."""
        for name, shape in self.shapes.items():
            if name not in state_dict:
                raise ValueError(
                    f"before task {task} ({self.task_names[task]!r}) the model lacks the weight {name!r} it had at the "
                    "start: MagMax needs the same architecture for every task (do not replace or resize the model)."
                )
            if tuple(state_dict[name].shape) != shape:
                raise ValueError(
                    f"the weight {name!r} has shape {tuple(state_dict[name].shape)} at task {task} "
                    f"({self.task_names[task]!r}) but {shape} at the start: MagMax needs parameters of the same shape "
                    "for every task. Size the classification head for all classes from the start (class-incremental "
                    "learning with `restrict_loss_to_task_classes=True`) instead of resizing it."
                )

    @torch.no_grad()
    def fold(self, state_dict: Mapping[str, Tensor]) -> None:
        """Fold `τ_t = θ_t − θ_0` into the running merge (on `merge_device`)."""
        finetuned = {name: state_dict[name] for name in self.base}
        task_vector = TaskVector.from_state_dicts(self.base, finetuned, device=self.device)
        self.merger.update(task_vector.vector)
        self.num_tasks_done += 1

    @torch.no_grad()
    def merged_tensor(self, name: str, scaling_coef: float) -> Tensor:
        """`θ_0 + λ · merge` for one tensor, with the same arithmetic as `TaskVector.apply_to(merge_task_vectors(...))`."""
        base = self.base[name]
        compute = torch.float32 if base.dtype in (torch.float16, torch.bfloat16) else base.dtype
        merged = self.merger.accumulators[name].result()
        scaled = (merged.to(compute) * scaling_coef).to(merged.dtype).to(compute)
        return (base.to(compute) + scaled).to(base.dtype)

    @torch.no_grad()
    def merged_state_dict(self, scaling_coef: float) -> dict[str, Tensor]:
        """`θ_0 + λ · merge` for every tensor of the task vectors (a new dict on `merge_device`)."""
        return {name: self.merged_tensor(name, scaling_coef) for name in self.base}

    @torch.no_grad()
    def write_into(self, model: nn.Module, tensors: Callable[[str], Tensor]) -> None:
        """Copy `tensors(name)` into the model's weights in place, for every name of the task vectors."""
        live = _live_tensors(_unwrap(model))
        for name in self.base:
            if name not in live:
                raise KeyError(f"the model has no weight {name!r} to write the merged value into.")
            target = live[name]
            target.copy_(tensors(name).to(target.device, target.dtype))

    # -- LoRA: the task vectors are ΔW; the merged model is the base with ΔW folded in ---------------------------

    def _lora_targets(self, model: nn.Module) -> dict[str, Tensor]:
        from .peft import base_parameters

        params = base_parameters(_unwrap(model))
        missing = [name for name in self.base if name not in params]
        if missing:
            raise KeyError(f"the PEFT model has no base weight {missing[0]!r} for the LoRA delta of that name.")
        return {name: params[name] for name in self.base}

    # -- evaluation ------------------------------------------------------------------------------------------------

    def resolve_metric(self, train_datasets: Sequence[Any]) -> str:
        if self.options.continual_metric is not None:
            return self.options.continual_metric
        for dataset in train_datasets:
            if _label_column(dataset) is not None:
                return "accuracy" if _scalar_labels(dataset) is not None else "neg_loss"
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

    def score(self, trainer: Trainer, dataset: Any, prefix: str) -> float:
        """The continual metric of the model as it is now on `dataset` (higher is better)."""
        from .metrics import accuracy_compute_metrics

        metric = self.metric or "neg_loss"
        predictions = metric not in ("neg_loss", "loss")
        saved = trainer.compute_metrics
        if predictions and saved is None:
            trainer.compute_metrics = accuracy_compute_metrics
        try:
            output = trainer.evaluation_loop(
                trainer.get_eval_dataloader(dataset),
                description="MagMax evaluation",
                prediction_loss_only=not predictions,
                metric_key_prefix=prefix,
            )
        finally:
            trainer.compute_metrics = saved
        metrics = output.metrics
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

    def evaluate_row(self, trainer: Trainer, kind: str) -> list[float]:
        return [self.score(trainer, ds, f"magmax_{kind}_{i}") for i, ds in enumerate(self.eval_datasets)]

    # -- λ ---------------------------------------------------------------------------------------------------------

    def search(self, trainer: Trainer, apply: Callable[[float], None]) -> float:
        """Choose λ on the validation data of the tasks seen so far; returns it (the model is left at that λ)."""
        from .scaling import search_scaling_coef

        seen = self.num_tasks_done
        datasets = (self.validation_datasets or [])[:seen]
        if len(datasets) < seen or any(ds is None for ds in datasets):
            raise ValueError(
                '`scaling_coef="auto"` needs validation data for every task: pass `validation_datasets` or set '
                "`validation_fraction`."
            )

        def score_fn() -> float:
            scores = [self.score(trainer, ds, f"magmax_validation_{i}") for i, ds in enumerate(datasets)]
            return sum(scores) / len(scores)

        result = search_scaling_coef(apply, score_fn, grid=self.options.scaling_coef_grid)
        record = {"after_task": seen, **result.to_dict()}
        self.searches.append(record)
        logs = {f"continual/scaling_coef/{coef:g}": score for coef, score in result.curve.items()}
        logs["continual/scaling_coef"] = result.best
        _log(trainer, logs)
        return result.best

    # -- the sequence ----------------------------------------------------------------------------------------------

    def begin(self, trainer: Trainer | None, model: nn.Module, train_datasets: Sequence[Any]) -> None:
        """Take θ_0. (θ_0 is evaluated at the end of the first task by swapping it in: evaluating before the first
        `train()` would make Accelerate skip the DDP wrapping of the model.)"""
        self.snapshot_base(self._weights(trainer, model, initial=trainer is None or trainer.model_wrapped is model))
        self.metric = self.resolve_metric(train_datasets)

    def begin_task(self, trainer: Trainer | None, model: nn.Module, task: int) -> None:
        if self.lora:
            return
        self.check_shapes(_unwrap(model).state_dict(), task)

    @torch.no_grad()
    def end_task(self, trainer: Trainer | None, model: nn.Module, task: int) -> None:
        """Fold the task vector of `task`, evaluate the sequential and merged models on every task, log, write."""
        state_dict = self._weights(trainer, model)
        if not self.lora:
            self.check_shapes(state_dict, task)
        self.fold(state_dict)
        last = self.num_tasks_done == len(self.task_names)
        evaluate = bool(self.eval_datasets) and trainer is not None
        want_merged = evaluate and (self.options.eval_merged_every_task or last)
        want_search = self.auto and trainer is not None and (last or self._select_every_task())
        want_base = evaluate and self.seq_matrix[0][0] is None
        if not (want_merged or want_search or evaluate):
            del state_dict
            return
        if evaluate:
            row = self.evaluate_row(trainer, "seq")
            self.seq_matrix[self.num_tasks_done] = row
        if want_merged or want_search or want_base:
            with self.merged_weights(model, state_dict) as apply:
                if want_base:  # row 0: θ_0 = θ_0 + 0 · merge
                    apply(0.0)
                    row = self.evaluate_row(trainer, "base")
                    self.seq_matrix[0], self.merged_matrix[0], self.merged_coefs[0] = list(row), list(row), 0.0
                    _log(trainer, {f"continual/base/{n}": v for n, v in zip(self.task_names, row)})
                if want_search or want_merged:
                    coef = self.search(trainer, apply) if want_search else self._current_coef()
                    apply(coef)
                    if want_search and last:
                        self.final_scaling_coef = coef
                    if want_merged:
                        self.merged_matrix[self.num_tasks_done] = self.evaluate_row(trainer, "merged")
                        self.merged_coefs[self.num_tasks_done] = coef
        del state_dict
        if evaluate:
            t = self.num_tasks_done
            logs = {"continual/task": float(t)}
            logs.update({f"continual/seq/{n}": v for n, v in zip(self.task_names, self.seq_matrix[t])})
            if self.merged_matrix[t][0] is not None:
                logs.update({f"continual/merged/{n}": v for n, v in zip(self.task_names, self.merged_matrix[t])})
            _log(trainer, logs)
        if trainer is not None:
            self.write_results(trainer)

    def _current_coef(self) -> float:
        if self.auto:
            for record in reversed(self.searches):
                return float(record["best"])
        return self._default_coef()

    @contextlib.contextmanager
    def merged_weights(self, model: nn.Module, state_dict: Mapping[str, Tensor]) -> Iterator[Callable[[float], None]]:
        """Yields `apply(λ)`, which puts `θ_0 + λ · merge` into the model in place; restores θ_t on exit.

        θ_t is kept as one copy on `merge_device` meanwhile (no second model). For LoRA, the adapter is disabled and
        `ΔW_start + λ · merge` is added to the base weights, which are restored on exit.
        """
        if self.lora:
            targets = self._lora_targets(model)
            saved = {name: t.detach().to(self.device, copy=True) for name, t in targets.items()}

            def apply(coef: float) -> None:
                for name, target in targets.items():
                    value = saved[name].float() + self.merged_tensor(name, coef).float()
                    target.copy_(value.to(target.device, target.dtype))

            with _unwrap(model).disable_adapter():
                try:
                    yield apply
                finally:
                    for name, target in targets.items():
                        target.copy_(saved[name].to(target.device, target.dtype))
        else:
            saved = {name: state_dict[name].detach().to(self.device, copy=True) for name in self.base}
            try:
                yield lambda coef: self.write_into(model, lambda name: self.merged_tensor(name, coef))
            finally:
                self.write_into(model, saved.__getitem__)

    def finish(self, trainer: Trainer | None, model: nn.Module) -> None:
        """After the last task: put the final weights into the model (full fine-tuning) and write the results."""
        if self.num_tasks_done == 0:
            raise ValueError("no task has been trained yet: nothing to merge.")
        if self.final_scaling_coef is None:
            self.final_scaling_coef = self._current_coef()
        if self.options.final_model == "merged" and not self.lora:
            coef = self.final_scaling_coef
            self.write_into(model, lambda name: self.merged_tensor(name, coef))
        self.finished = True
        if trainer is not None:
            summary = self.summary()
            logs = {}
            for kind in ("sequential", "merged"):
                for key, value in summary[kind]["metrics"].items():
                    logs[f"continual/{kind}/{key}"] = value
            logs["continual/final_scaling_coef"] = self.final_scaling_coef
            _log(trainer, logs)
            self.write_results(trainer)

    # -- results ---------------------------------------------------------------------------------------------------

    def _matrix_metrics(self, matrix: list[list[float | None]]) -> dict[str, float]:
        from .metrics import compute_continual_metrics

        if not self.eval_datasets:
            return {}
        done = self.num_tasks_done
        if done == len(self.task_names) and all(v is not None for row in matrix for v in row):
            return compute_continual_metrics(matrix)
        last = matrix[done]
        if done and all(v is not None for v in last):
            return {"final_average_accuracy": sum(last) / len(last)}
        return {}

    def summary(self) -> dict[str, Any]:
        return {
            "task_names": self.task_names,
            "num_tasks_done": self.num_tasks_done,
            "method": self.options.merge_method,
            "method_kwargs": self._method_kwargs(),
            "scaling_coef": self.final_scaling_coef if self.final_scaling_coef is not None else self._current_coef(),
            "scaling_coef_mode": "auto" if self.auto else "fixed",
            "scaling_coef_grid": self.options.scaling_coef_grid if self.auto else None,
            "scaling_coef_search": self.searches,
            "final_model": self.options.final_model,
            "metric": self.metric,
            "sequential": {"matrix": self.seq_matrix, "metrics": self._matrix_metrics(self.seq_matrix)},
            "merged": {
                "matrix": self.merged_matrix,
                "scaling_coefs": self.merged_coefs,
                "metrics": self._matrix_metrics(self.merged_matrix),
            },
            **({"lora": self.lora_info} if self.lora_info is not None else {}),
        }

    def write_results(self, trainer: Trainer) -> None:
        if not trainer.is_world_process_zero():
            return
        os.makedirs(trainer.args.output_dir, exist_ok=True)
        path = os.path.join(trainer.args.output_dir, RESULTS_NAME)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(self.summary(), f, indent=2)
        os.replace(path + ".tmp", path)

    # -- checkpoints -----------------------------------------------------------------------------------------------

    def save(self, directory: str, task: int) -> None:
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        save_file({k: v.contiguous().cpu() for k, v in self.base.items()}, os.path.join(directory, BASE_WEIGHTS_NAME))
        torch.save(self.merger.state_dict(), os.path.join(directory, MERGE_STATE_NAME))
        state = {
            "task": task,
            "num_tasks_done": self.num_tasks_done,
            "task_names": self.task_names,
            "metric": self.metric,
            "seq_matrix": self.seq_matrix,
            "merged_matrix": self.merged_matrix,
            "merged_coefs": self.merged_coefs,
            "searches": self.searches,
            "method": self.options.merge_method,
        }
        with open(os.path.join(directory, STATE_NAME), "w", encoding="utf-8") as f:
            json.dump(state, f, indent=2)

    def load(self, directory: str) -> int:
        """Restore from a checkpoint directory; returns the index of the task the checkpoint was taken in."""
        from safetensors.torch import load_file

        path = os.path.join(directory, STATE_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{directory!r} is not a MagMaxTrainer checkpoint (no {STATE_NAME}): resume from a checkpoint written "
                "by MagMaxTrainer, e.g. output_dir/task-01-<name>/checkpoint-<step>."
            )
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
        if state["task_names"] != self.task_names:
            raise ValueError(
                f"the checkpoint was written for tasks {state['task_names']}, but `train_datasets` has "
                f"{self.task_names}: resume with the same task sequence."
            )
        if state["method"] != self.options.merge_method:
            raise ValueError(
                f"the checkpoint merges with `{state['method']}`, but `merge_method` is "
                f"`{self.options.merge_method}`: resume with the same merge method."
            )
        self.base = {k: v.to(self.device) for k, v in load_file(os.path.join(directory, BASE_WEIGHTS_NAME)).items()}
        self.shapes = {name: tuple(t.shape) for name, t in self.base.items()}
        merge_state = torch.load(
            os.path.join(directory, MERGE_STATE_NAME), map_location=self.device, weights_only=True
        )
        self.merger.load_state_dict(merge_state)
        self.num_tasks_done = int(state["num_tasks_done"])
        self.metric = state["metric"]
        self.seq_matrix = state["seq_matrix"]
        self.merged_matrix = state["merged_matrix"]
        self.merged_coefs = state["merged_coefs"]
        self.searches = state["searches"]
        return int(state["task"])


def _log(trainer: Trainer | None, logs: dict[str, float]) -> None:
    if trainer is None or not logs:
        return
    trainer.log({k: float(v) for k, v in logs.items() if v is not None})


# --------------------------------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------------------------------


class MagMaxTrainer(Trainer):
    r"""Continual fine-tuning over a sequence of tasks with MagMax merging (Marczak et al., ECCV 2024).

    `train()` fine-tunes on the tasks in order: task t starts from the weights after task t − 1, with a fresh optimizer
    and learning-rate schedule. After each task the task vector `τ_t = θ_t − θ_0` is folded into a running merge (θ_0
    and the running state live on `args.merge_device`), and the sequential model and the merged model
    `θ_0 + λ · merge(τ_1..τ_t)` (swapped into the model in place, no second copy) are evaluated on *every* task's eval
    set. The accuracy matrices `R[t][i]` (row 0: θ_0) go to `self.log` under `continual/seq/<task>` and
    `continual/merged/<task>`, and to `output_dir/continual_results.json` with the summary metrics of
    [`~hf_magmax.metrics.compute_continual_metrics`]. At the end the model holds the merged weights
    (`final_model="merged"`) or the sequential ones.

    The first arguments are those of [`~transformers.Trainer`]; the MagMax arguments come last.

    Args:
        train_datasets (`list`, `dict[str, Dataset]` or [`~hf_magmax.continual.ContinualSplit`]):
            The tasks' training sets in task order (a dict maps task names to datasets).
        eval_datasets (`list` or `dict[str, Dataset]`, *optional*):
            The tasks' evaluation sets, same number and names as `train_datasets`. Without them no matrix is computed.
        validation_datasets (`list` or `dict[str, Dataset]`, *optional*):
            Per-task validation sets for `scaling_coef="auto"`; otherwise carved from each training split with
            `args.validation_fraction`.
        task_classes (`list[list[int]]`, *optional*):
            The classes of each task for `restrict_loss_to_task_classes`; defaults to the labels present in each
            training set (or the classes of a `ContinualSplit`).
        peft_config (`peft.PeftConfig`, *optional*):
            Train a LoRA adapter continually instead of all weights: task vectors are the adapter's ΔW relative to the
            base, and the result is the base with the merged ΔW folded in, or a re-factored adapter
            (`args.lora_output`). A [`~peft.PeftModel`] passed as `model` works the same way.

    Example:

    ```python
    >>> from hf_magmax import MagMaxConfig, MagMaxTrainer
    >>> args = MagMaxConfig(output_dir="out", scaling_coef=0.5, num_train_epochs=1, report_to="none")
    >>> trainer = MagMaxTrainer(model, args, train_datasets={"a": train_a, "b": train_b},
    ...                         eval_datasets={"a": test_a, "b": test_b})  # doctest: +SKIP
    >>> trainer.train()  # doctest: +SKIP
    ```
    """

    _tag_names = ["magmax", "merge", "continual-learning"]

    def __init__(
        self,
        model: nn.Module | None = None,
        args: MagMaxConfig | None = None,
        data_collator: Callable | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        model_init: Callable[..., nn.Module] | None = None,
        compute_loss_func: Callable | None = None,
        compute_metrics: Callable[[Any], dict] | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None] = (None, None),
        optimizer_cls_and_kwargs: tuple[type[torch.optim.Optimizer], dict[str, Any]] | None = None,
        preprocess_logits_for_metrics: Callable[[Tensor, Tensor], Tensor] | None = None,
        train_datasets: Sequence[Any] | Mapping[str, Any] | None = None,
        eval_datasets: Sequence[Any] | Mapping[str, Any] | None = None,
        validation_datasets: Sequence[Any] | Mapping[str, Any] | None = None,
        task_classes: Sequence[Sequence[int]] | None = None,
        peft_config: Any = None,
    ) -> None:
        if args is None:
            args = MagMaxConfig(output_dir="tmp_trainer")
        elif not isinstance(args, MagMaxConfig):
            raise TypeError(
                f"`args` must be a MagMaxConfig, got {type(args).__name__}: build it with "
                "`MagMaxConfig(**args.to_dict(), scaling_coef=...)` or use MagMaxCallback with a plain Trainer."
            )
        if model_init is not None:
            raise ValueError("`model_init` is not supported by MagMaxTrainer: pass `model`, the base model θ_0.")
        if model is None:
            raise ValueError("`model` is required: pass the base model θ_0 that the task sequence starts from.")
        if optimizers[0] is not None or optimizers[1] is not None:
            raise ValueError(
                "`optimizers` is not supported: MagMaxTrainer creates a fresh optimizer and schedule for every task. "
                "Pass `optimizer_cls_and_kwargs` (or the `optim` option of the config) instead."
            )
        if train_datasets is None:
            if train_dataset is None:
                raise ValueError(
                    "no tasks: pass `train_datasets`, a list or dict task name → dataset with at least one task."
                )
            train_datasets = [train_dataset]
        elif train_dataset is not None:
            raise ValueError("pass either `train_datasets` (the task sequence) or `train_dataset`, not both.")

        names, datasets, split_classes = _normalize_tasks(train_datasets, "train_datasets")
        if not datasets:
            raise ValueError("no tasks: `train_datasets` is empty; pass at least one task.")
        eval_names, eval_list, _ = _normalize_tasks(eval_datasets, "eval_datasets")
        _check_same_tasks(names, eval_names, eval_datasets, "eval_datasets")
        val_names, val_list, _ = _normalize_tasks(validation_datasets, "validation_datasets")
        _check_same_tasks(names, val_names, validation_datasets, "validation_datasets")

        # LoRA
        self._magmax_lora = False
        if peft_config is not None:
            try:
                from peft import get_peft_model
            except ImportError as err:  # pragma: no cover
                raise ImportError("`peft_config` needs peft: `pip install hf_magmax[peft]`.") from err
            if _is_peft_model(model):
                raise ValueError("`model` is already a PeftModel: do not pass `peft_config` as well.")
            model = get_peft_model(model, peft_config)
        if _is_peft_model(model):
            self._magmax_lora = True
        elif args.frozen_modules:
            _freeze(model, args.frozen_modules)

        if eval_dataset is None and eval_list:
            eval_dataset = dict(zip(names, eval_list))
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=datasets[0],
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            model_init=None,
            compute_loss_func=compute_loss_func,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=(None, None),
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        )
        self.task_names = names
        self.train_datasets = datasets
        self.eval_datasets = eval_list

        _check_datasets(self.model, names, datasets, eval_list)

        # validation data for λ = "auto"
        if self.args.scaling_coef == "auto" and not val_list:
            from .scaling import split_validation

            if self.args.validation_fraction is None:
                raise ValueError(
                    '`scaling_coef="auto"` needs validation data: pass `validation_datasets` or set '
                    "`validation_fraction`."
                )
            carved = [split_validation(ds, self.args.validation_fraction, seed=self.args.seed) for ds in datasets]
            self.train_datasets = [train for train, _ in carved]
            val_list = [validation for _, validation in carved]
            self.train_dataset = self.train_datasets[0]
        if val_list and self.args.max_validation_samples is not None:
            val_list = [_head(ds, self.args.max_validation_samples) for ds in val_list]
        self.validation_datasets = val_list or None

        # class masks for restrict_loss_to_task_classes
        self.task_classes = _resolve_task_classes(task_classes, split_classes, self.train_datasets, names)
        self._magmax_class_mask: Tensor | None = None
        if self.args.restrict_loss_to_task_classes and any(c is None for c in self.task_classes):
            raise ValueError(
                "`restrict_loss_to_task_classes=True` needs each task's classes: pass `task_classes`, or training sets "
                "with a `label`/`labels` column of class ids."
            )

        self._magmax = _ContinualRun(self.args, names, eval_list, self.validation_datasets)
        self._magmax.lora = self._magmax_lora
        self._magmax_task: int | None = None

    # -- the task loop -----------------------------------------------------------------------------------------------

    def train(
        self,
        resume_from_checkpoint: str | bool | None = None,
        trial: Any = None,
        ignore_keys_for_eval: list[str] | None = None,
    ) -> TrainOutput:
        """Fine-tune on every task in order, merging and evaluating after each; see the class docstring.

        Args:
            resume_from_checkpoint (`str` or `bool`, *optional*):
                A checkpoint written by this trainer (`output_dir/task-<k>-<name>/checkpoint-<step>`), or `True` for
                the last one in `output_dir`. Training continues in the middle of task k, with θ_0, the running merge
                and the matrices so far restored.
            trial, ignore_keys_for_eval:
                As in [`~transformers.Trainer.train`].

        Returns:
            [`~transformers.trainer_utils.TrainOutput`]: total steps over all tasks, the mean training loss, and the
            final continual metrics.

        After `train()`, `self.state.log_history` holds the logs of every task (each task's steps count from 0).
        """
        if resume_from_checkpoint is False:
            resume_from_checkpoint = None
        if resume_from_checkpoint is True:
            resume_from_checkpoint = self._last_checkpoint()
        run = self._magmax
        if self._magmax.finished:
            raise RuntimeError("this MagMaxTrainer has already run its task sequence; build a new one to train again.")
        start = 0
        if resume_from_checkpoint is not None:
            start = run.load(resume_from_checkpoint)
            logger.info("Resuming task %d (%s) from %s", start, self.task_names[start], resume_from_checkpoint)
        else:
            run.begin(self, self.model, self.train_datasets)

        total_steps, total_loss = 0, 0.0
        history: list[dict[str, float]] = []
        for task in range(start, len(self.task_names)):
            self._magmax_task = task
            self.train_dataset = self.train_datasets[task]
            self._magmax_class_mask = self._class_mask(task)
            run.begin_task(self, self.model, task)
            # a fresh optimizer and learning-rate schedule for every task
            self.optimizer, self.lr_scheduler = None, None
            logger.info("***** MagMax task %d/%d: %s *****", task + 1, len(self.task_names), self.task_names[task])
            output = super().train(
                resume_from_checkpoint=resume_from_checkpoint if task == start else None,
                trial=trial,
                ignore_keys_for_eval=ignore_keys_for_eval,
            )
            self.optimizer, self.lr_scheduler = None, None
            total_steps += output.global_step
            total_loss += output.training_loss * output.global_step
            run.end_task(self, self.model, task)
            history.extend(self.state.log_history)  # every train() call starts a new TrainerState
        self._magmax_task = None
        self._magmax_class_mask = None
        done = len(self.state.log_history)
        run.finish(self, self.model)
        self.state.log_history = history + self.state.log_history[done:]
        if self._magmax_lora:
            self._finish_lora()
        metrics = {}
        for kind in ("sequential", "merged"):
            for key, value in run.summary()[kind]["metrics"].items():
                metrics[f"continual_{kind}_{key}"] = value
        metrics["scaling_coef"] = run.final_scaling_coef
        return TrainOutput(total_steps, total_loss / max(total_steps, 1), metrics)

    @property
    def continual_results(self) -> dict[str, Any]:
        """The task names, both accuracy matrices, their summary metrics, the method and λ (as in the json file)."""
        return self._magmax.summary()

    def _class_mask(self, task: int) -> Tensor | None:
        if not self.args.restrict_loss_to_task_classes:
            return None
        num_labels = _num_labels(self.model)
        classes = self.task_classes[task]
        size = num_labels if num_labels is not None else max(classes) + 1
        mask = torch.zeros(size, dtype=torch.bool)
        mask[list(classes)] = True
        return mask

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Tensor | Any],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor | tuple[Tensor, Any]:
        """`Trainer.compute_loss`, with the logits of classes outside the current task masked out while training
        when `restrict_loss_to_task_classes=True` (cross-entropy over the current task's classes)."""
        mask = self._magmax_class_mask
        if mask is None or not model.training or "labels" not in inputs or self.compute_loss_func is not None:
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]
        if logits.shape[-1] != mask.numel():
            raise ValueError(
                f"the model returns {logits.shape[-1]} logits but the class mask has {mask.numel()} classes: "
                "`restrict_loss_to_task_classes` needs one head over all classes (set `num_labels`)."
            )
        logits = logits.float().masked_fill(~mask.to(logits.device), torch.finfo(torch.float32).min)
        flat_logits, flat_labels = logits.view(-1, logits.shape[-1]), labels.view(-1).to(logits.device)
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            loss = nn.functional.cross_entropy(flat_logits, flat_labels, ignore_index=-100, reduction="sum")
            loss = loss / num_items_in_batch
            if self.args.average_tokens_across_devices:
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        else:
            loss = nn.functional.cross_entropy(flat_logits, flat_labels, ignore_index=-100)
        return (loss, outputs) if return_outputs else loss

    # -- checkpoints -------------------------------------------------------------------------------------------------

    def _get_output_dir(self, trial: Any) -> str:
        """Checkpoints of task k go to `output_dir/task-<k>-<name>/` (steps restart with every task)."""
        run_dir = super()._get_output_dir(trial)
        if self._magmax_task is None:
            return run_dir
        return os.path.join(run_dir, _task_dir_name(self._magmax_task, self.task_names[self._magmax_task]))

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """`Trainer._save_checkpoint`, plus the MagMax state: task index, θ_0, the running merge and the matrices."""
        super()._save_checkpoint(model, trial)
        if self._magmax_task is None or not self.args.should_save:
            return
        directory = os.path.join(self._get_output_dir(trial), f"checkpoint-{self.state.global_step}")
        self._magmax.save(directory, self._magmax_task)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """`Trainer._load_from_checkpoint`, made exact for models whose saved tensor names differ from their
        in-memory names.

        In transformers v5, `save_pretrained` writes some models (ViT, MoE, VLMs, …) under their original Hub names
        and `from_pretrained` converts them back, but `Trainer` resumes with a plain `load_state_dict(strict=False)` on
        the saved names, which silently leaves the renamed weights untouched (huggingface/transformers#43701). A
        resumed continual run would then continue from the wrong weights. When the checkpoint's names do not cover the
        model's, the checkpoint is loaded through `from_pretrained` (its conversions included) and copied in.
        """
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        from transformers import PreTrainedModel

        target = _unwrap(model if model is not None else self.model)
        if not isinstance(target, PreTrainedModel) or _is_peft_model(target) or self.is_fsdp_enabled:
            return
        saved_names = _checkpoint_tensor_names(resume_from_checkpoint)
        # tied tensors are saved once, under their first name
        needed = {name for name, first in shared_tensor_groups(target.state_dict()).items() if name == first}
        if saved_names is None or needed <= saved_names:
            return
        logger.info(
            "Loading %s through from_pretrained: its tensor names differ from the model's.", resume_from_checkpoint
        )
        reloaded = type(target).from_pretrained(resume_from_checkpoint, dtype=target.dtype)
        result = target.load_state_dict(reloaded.state_dict(), strict=False)
        if result.missing_keys:
            raise ValueError(
                f"could not restore {len(result.missing_keys)} tensor(s) of the model from {resume_from_checkpoint!r}, "
                f"e.g. {result.missing_keys[0]!r}: resume from a checkpoint of the same model."
            )
        del reloaded

    def _last_checkpoint(self) -> str:
        candidates = sorted(glob.glob(os.path.join(self.args.output_dir, "task-*")))
        for task_dir in reversed(candidates):
            checkpoint = get_last_checkpoint(task_dir)
            if checkpoint is not None and os.path.isfile(os.path.join(checkpoint, STATE_NAME)):
                return checkpoint
        raise ValueError(f"no MagMaxTrainer checkpoint found under {self.args.output_dir!r}/task-*/checkpoint-*.")

    # -- LoRA ----------------------------------------------------------------------------------------------------------

    def _finish_lora(self) -> None:
        """Replace the PeftModel by the base with the merged ΔW folded in, or by a re-factored adapter."""
        run = self._magmax
        if self.args.final_model == "sequential":
            return
        from .peft import _strip_adapters, deltas_to_lora, fold_deltas_into_base

        peft_model = _unwrap(self.model)
        coef = run.final_scaling_coef
        # the merged model relative to the *base*: ΔW_start + λ · merge(τ)
        deltas = run.merged_state_dict(coef)
        # default: the trained adapter's rank times the number of tasks; any rank is capped by what each ΔW allows
        rank = self.args.lora_rank or _lora_rank(peft_model) * len(self.task_names)
        ranks = {name.rpartition(".")[0]: min(rank, min(d.shape)) for name, d in deltas.items() if d.ndim == 2}
        task_type = getattr(peft_model.peft_config[peft_model.active_adapter], "task_type", None)
        base_model = _strip_adapters(peft_model)
        run.lora_info = {"output": self.args.lora_output}
        if self.args.lora_output == "merged":
            fold_deltas_into_base(base_model, deltas, 1.0)
            self.model = self.model_wrapped = base_model
            run.write_results(self)
            return
        from peft import get_peft_model, set_peft_model_state_dict

        factorization = deltas_to_lora(deltas, ranks, model=base_model, task_type=task_type)
        self.lora_reconstruction_errors = factorization.errors
        run.lora_info.update(ranks=factorization.ranks, reconstruction_error=factorization.overall_error)
        new_model = get_peft_model(base_model, factorization.peft_config)
        set_peft_model_state_dict(new_model, factorization.state_dict)
        self.model = self.model_wrapped = new_model
        run.write_results(self)

    # -- model card ----------------------------------------------------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """`Trainer.save_model`, plus a model card (tasks, method, λ, results table) in `output_dir/README.md`."""
        super().save_model(output_dir, _internal_call=_internal_call)
        if not _internal_call and self.is_world_process_zero() and self._magmax.num_tasks_done:
            directory = output_dir if output_dir is not None else self.args.output_dir
            with open(os.path.join(directory, "README.md"), "w", encoding="utf-8") as f:
                f.write(self._model_card_text())

    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
    ) -> None:
        """Write the MagMax model card to `output_dir/README.md` (used by `push_to_hub`)."""
        if not self.is_world_process_zero():
            return
        os.makedirs(self.args.output_dir, exist_ok=True)
        extra = [tags] if isinstance(tags, str) else list(tags or [])
        text = self._model_card_text(
            extra_tags=extra, model_name=model_name, language=language, license=license, finetuned_from=finetuned_from
        )
        with open(os.path.join(self.args.output_dir, "README.md"), "w", encoding="utf-8") as f:
            f.write(text)

    def _model_card_text(self, extra_tags: Sequence[str] = (), **metadata: Any) -> str:
        return _model_card(self._magmax, self.model, self.args, extra_tags=extra_tags, **metadata)


# --------------------------------------------------------------------------------------------------------------------
# Callback for existing scripts
# --------------------------------------------------------------------------------------------------------------------


class MagMaxCallback(TrainerCallback):
    r"""MagMax for an existing script that calls `trainer.train()` once per task on its own `Trainer`.

    The callback takes θ_0 at the first `on_train_begin`, folds `τ_t = θ_t − θ_0` into the running merge at every
    `on_train_end`, evaluates the sequential and merged models on `eval_datasets` (if given), and after the
    `num_tasks`-th task writes `θ_0 + λ · merge` into the model (`final_model="merged"`) and
    `output_dir/continual_results.json` — the same weights and metrics as [`MagMaxTrainer`]. It also resets the
    trainer's optimizer and learning-rate schedule after every task, so each task starts fresh as in the paper.

    Args:
        trainer (`transformers.Trainer`, *optional*):
            The trainer to attach to (the callback adds itself). Needed for evaluation, for the optimizer reset and
            for the logs; without it (e.g. passed in `callbacks=[...]`) call [`~MagMaxCallback.attach`] later.
        eval_datasets (`list` or `dict[str, Dataset]`, *optional*):
            The tasks' evaluation sets in task order.
        num_tasks (`int`, *optional*):
            Length of the task sequence; defaults to the number of `eval_datasets`. Without either, call
            [`~MagMaxCallback.finish`] after the last task.
        task_names (`list[str]`, *optional*):
            Names of the tasks (default: the keys of `eval_datasets`, or `task_0`, …).
        validation_datasets (`list` or `dict[str, Dataset]`, *optional*):
            Per-task validation sets for `scaling_coef="auto"`.
        scaling_coef, scaling_coef_grid, merge_method, merge_density, merge_seed, final_model, eval_merged_every_task,
        merge_device, frozen_modules, max_validation_samples, select_scaling_coef_every_task, continual_metric:
            As in [`MagMaxConfig`], same defaults.

    Example:

    ```python
    >>> from hf_magmax import MagMaxCallback
    >>> magmax = MagMaxCallback(trainer, eval_datasets=test_sets, scaling_coef=0.5)  # doctest: +SKIP
    >>> for train_set in train_sets:  # doctest: +SKIP
    ...     trainer.train_dataset = train_set
    ...     trainer.train()
    >>> magmax.results["merged"]["metrics"]  # doctest: +SKIP
    ```
    """

    def __init__(
        self,
        trainer: Trainer | None = None,
        eval_datasets: Sequence[Any] | Mapping[str, Any] | None = None,
        num_tasks: int | None = None,
        task_names: Sequence[str] | None = None,
        validation_datasets: Sequence[Any] | Mapping[str, Any] | None = None,
        scaling_coef: float | str = 0.5,
        scaling_coef_grid: Sequence[float] | None = None,
        merge_method: str = "magmax",
        merge_density: float = 0.2,
        merge_seed: int = 0,
        final_model: str = "merged",
        eval_merged_every_task: bool = True,
        merge_device: str = "cpu",
        frozen_modules: Sequence[str] | None = None,
        max_validation_samples: int | None = None,
        select_scaling_coef_every_task: bool | None = None,
        continual_metric: str | None = None,
    ) -> None:
        self.scaling_coef = scaling_coef
        self.scaling_coef_grid = scaling_coef_grid
        self.merge_method = merge_method
        self.merge_density = merge_density
        self.merge_seed = merge_seed
        self.final_model = final_model
        self.eval_merged_every_task = eval_merged_every_task
        self.merge_device = merge_device
        self.frozen_modules = frozen_modules
        self.validation_fraction = None
        self.max_validation_samples = max_validation_samples
        self.select_scaling_coef_every_task = select_scaling_coef_every_task
        self.continual_metric = continual_metric
        _check_options(self)

        eval_names, eval_list, _ = _normalize_tasks(eval_datasets, "eval_datasets")
        val_names, val_list, _ = _normalize_tasks(validation_datasets, "validation_datasets")
        if num_tasks is None:
            num_tasks = len(eval_list) or (len(task_names) if task_names is not None else None)
        if num_tasks is not None and (not isinstance(num_tasks, int) or num_tasks < 1):
            raise ValueError(f"`num_tasks` must be a positive integer, got {num_tasks!r}.")
        if task_names is not None:
            names = [str(n) for n in task_names]
        elif eval_names and isinstance(eval_datasets, Mapping):
            names = eval_names
        else:
            names = [f"task_{i}" for i in range(num_tasks or 0)]
        if num_tasks is not None and len(names) != num_tasks:
            raise ValueError(f"`task_names` has {len(names)} names but there are {num_tasks} tasks.")
        if eval_list and len(eval_list) != len(names):
            raise ValueError(f"`eval_datasets` has {len(eval_list)} tasks but there are {len(names)} tasks.")
        if val_list and len(val_list) != len(names):
            raise ValueError(f"`validation_datasets` has {len(val_list)} tasks but there are {len(names)} tasks.")
        if self.scaling_coef == "auto" and not val_list:
            raise ValueError('`scaling_coef="auto"` needs `validation_datasets` (one per task) with the callback.')
        if val_list and max_validation_samples is not None:
            val_list = [_head(ds, max_validation_samples) for ds in val_list]
        self.num_tasks = num_tasks
        self._run = _ContinualRun(self, names, eval_list, val_list or None)
        self._train_datasets: list[Any] = []
        self.trainer: Trainer | None = None
        if trainer is not None:
            self.attach(trainer)

    def attach(self, trainer: Trainer) -> MagMaxCallback:
        """Bind the callback to `trainer` (and add it to the trainer's callbacks if it is not there yet)."""
        self.trainer = trainer
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        if self.frozen_modules:
            _freeze(trainer.model, self.frozen_modules)
        return self

    @property
    def results(self) -> dict[str, Any]:
        """Task names, both accuracy matrices, summary metrics, method and λ (as in `continual_results.json`)."""
        return self._run.summary()

    def _task(self) -> int:
        return self._run.num_tasks_done

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self._run.finished:
            raise RuntimeError("MagMaxCallback: the task sequence is finished; make a new callback for a new one.")
        trainer = self.trainer
        if model is not None and _is_peft_model(_unwrap(model)):
            raise ValueError(
                "MagMaxCallback merges full weights; for a PEFT (LoRA) model use `MagMaxTrainer(peft_config=...)`, "
                "whose task vectors are the adapter's ΔW, or merge the saved adapters with `merge_adapters`."
            )
        if trainer is None and self._run.eval_datasets:
            raise ValueError("MagMaxCallback needs the trainer to evaluate: build it with `MagMaxCallback(trainer)`.")
        task = self._task()
        if self.num_tasks is not None and task >= self.num_tasks:
            raise ValueError(f"MagMaxCallback: a task beyond the {self.num_tasks} announced in `num_tasks`.")
        if task >= len(self._run.task_names):  # open-ended sequence
            self._run.task_names.append(f"task_{task}")
            self._run.seq_matrix = [row + [None] for row in self._run.seq_matrix] + [[None] * (task + 1)]
            self._run.merged_matrix = [row + [None] for row in self._run.merged_matrix] + [[None] * (task + 1)]
            self._run.merged_coefs.append(None)
        train_dataset = trainer.train_dataset if trainer is not None else None
        if task == 0:
            if trainer is not None:
                _check_datasets(trainer.model, self._run.task_names, [train_dataset], self._run.eval_datasets)
            self._run.begin(trainer, model, [train_dataset] if train_dataset is not None else [])
        else:
            if trainer is not None:
                _check_datasets(trainer.model, [self._run.task_names[task]], [train_dataset], [])
            self._run.begin_task(trainer, model, task)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        task = self._task()
        self._run.end_task(self.trainer, model, task)
        if self.trainer is not None:
            # a fresh optimizer and learning-rate schedule for the next task
            self.trainer.optimizer, self.trainer.lr_scheduler = None, None
        if self.num_tasks is not None and self._run.num_tasks_done == self.num_tasks:
            self.finish(model)

    def finish(self, model: nn.Module | None = None) -> None:
        """Write the final weights (`θ_0 + λ · merge` for `final_model="merged"`) and the results."""
        if model is None:
            if self.trainer is None:
                raise ValueError("pass the model to `finish(model)` when the callback has no trainer.")
            model = self.trainer.model
        self._run.finish(self.trainer, model)


# --------------------------------------------------------------------------------------------------------------------
# Input checks and small helpers
# --------------------------------------------------------------------------------------------------------------------


def _check_same_tasks(names: list[str], other_names: list[str], other: Any, argument: str) -> None:
    if other is None:
        return
    if len(other_names) != len(names):
        raise ValueError(
            f"`{argument}` has {len(other_names)} task(s) but `train_datasets` has {len(names)}: pass one per task, "
            "in the same order."
        )
    if isinstance(other, Mapping) and other_names != names:
        raise ValueError(
            f"`{argument}` has tasks {other_names} but `train_datasets` has {names}: use the same names in the same "
            "order."
        )


def _num_labels(model: nn.Module) -> int | None:
    config = getattr(_unwrap(model), "config", None)
    return getattr(config, "num_labels", None) if config is not None else None


def _check_datasets(model: nn.Module, names: list[str], train: list[Any], evaluation: list[Any]) -> None:
    """Empty tasks and labels outside the model's head, before any training step."""
    num_labels = None
    class_name = type(_unwrap(model)).__name__
    if not class_name.endswith("ForCausalLM"):
        num_labels = _num_labels(model)
    for kind, datasets in (("train_datasets", train), ("eval_datasets", evaluation)):
        for name, dataset in zip(names, datasets):
            if dataset is None:
                raise ValueError(f"`{kind}` has no dataset for task {name!r}.")
            size = _num_examples(dataset)
            if size == 0:
                raise ValueError(f"task {name!r} of `{kind}` is empty: every task needs at least one example.")
            labels = _scalar_labels(dataset) if num_labels is not None else None
            if labels:
                bad = [v for v in labels if v != -100 and not 0 <= v < num_labels]
                if bad:
                    raise ValueError(
                        f"task {name!r} of `{kind}` has label {bad[0]} but the model's head has {num_labels} classes "
                        f"(0..{num_labels - 1}): build the model with `num_labels` covering every class of every task."
                    )


def _resolve_task_classes(
    task_classes: Sequence[Sequence[int]] | None, split_classes: list, datasets: list, names: list[str]
) -> list[list[int] | None]:
    if task_classes is not None:
        if len(task_classes) != len(names):
            raise ValueError(f"`task_classes` has {len(task_classes)} entries but there are {len(names)} tasks.")
        return [sorted(int(c) for c in classes) for classes in task_classes]
    out = []
    for classes, dataset in zip(split_classes, datasets):
        if classes and all(isinstance(c, int) for c in classes):
            out.append(sorted(classes))
            continue
        labels = _scalar_labels(dataset)
        out.append(sorted({v for v in labels if v != -100}) if labels else None)
    return out


def _freeze(model: nn.Module, patterns: Sequence[str]) -> None:
    unwrapped = _unwrap(model)
    matched = {p: False for p in patterns}
    for name, param in unwrapped.named_parameters():
        for pattern in patterns:
            if _matches(name, [pattern]):
                param.requires_grad_(False)
                matched[pattern] = True
    missing = [p for p, hit in matched.items() if not hit]
    if missing:
        raise ValueError(
            f"`frozen_modules` entry {missing[0]!r} matches no parameter of the model; use a module name such as "
            f"{next(iter(dict(unwrapped.named_parameters())), '<none>').rpartition('.')[0]!r} or a regex."
        )


def _head(dataset: Any, n: int) -> Any:
    size = _num_examples(dataset)
    if size is None or size <= n:
        return dataset
    if hasattr(dataset, "select"):
        return dataset.select(range(n))
    return torch.utils.data.Subset(dataset, range(n))


def _task_dir_name(task: int, name: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name)
    return f"task-{task:02d}-{safe}"


def _lora_rank(peft_model: nn.Module) -> int:
    config = peft_model.peft_config[getattr(peft_model, "active_adapter", "default")]
    return int(getattr(config, "r", 8))


def _model_card(
    run: _ContinualRun, model: nn.Module, args: Any, extra_tags: Sequence[str] = (), **metadata: Any
) -> str:
    from .hub import MAGMAX_CITATION, render_model_card
    from .metrics import format_matrix

    summary = run.summary()
    tags = ["magmax", "merge", "continual-learning", *[t for t in extra_tags if t]]
    card_metadata: dict[str, Any] = {
        "library_name": "peft" if run.lora and _is_peft_model(_unwrap(model)) else "transformers"
    }
    card_metadata["tags"] = list(dict.fromkeys(tags))
    base = metadata.get("finetuned_from") or getattr(getattr(_unwrap(model), "config", None), "_name_or_path", None)
    if base:
        card_metadata["base_model"] = base
    for key in ("language", "license"):
        if metadata.get(key):
            card_metadata[key] = metadata[key]
    title = metadata.get("model_name") or os.path.basename(os.path.normpath(args.output_dir))
    lines = [f"# {title}", ""]
    lines.append(
        f"Fine-tuned sequentially on {len(run.task_names)} task(s) with hf_magmax's `MagMaxTrainer` and merged "
        f"with **{summary['method']}** (scaling coefficient λ = {summary['scaling_coef']:g}"
        + (", chosen on validation data" if run.auto else "")
        + f"). This checkpoint holds the **{summary['final_model']}** model."
    )
    lines += ["", "## Tasks", ""] + [f"{i + 1}. {n}" for i, n in enumerate(run.task_names)]
    lines += ["", "## Merge", "", "```yaml", f"merge_method: {summary['method']}"]
    for key, value in summary["method_kwargs"].items():
        lines.append(f"{key}: {value}")
    lines.append(f"scaling_coef: {summary['scaling_coef']:g}")
    if run.auto:
        lines.append(f"scaling_coef_grid: {summary['scaling_coef_grid']}")
    lines.append(f"final_model: {summary['final_model']}")
    lines.append("```")
    if summary["scaling_coef_search"]:
        last = summary["scaling_coef_search"][-1]
        lines += ["", "## Scaling coefficient (validation)", "", "| λ | validation score |", "|---:|---:|"]
        lines += [f"| {c:g} | {s:.4f} |" for c, s in last["curve"]]
    if run.eval_datasets and run.num_tasks_done == len(run.task_names):
        percent = summary["metric"] == "accuracy"
        for kind, label in (("sequential", "Sequential fine-tuning"), ("merged", f"Merged ({summary['method']})")):
            matrix = summary[kind]["matrix"]
            if all(v is not None for row in matrix for v in row):
                lines += ["", f"## {label}: {summary['metric']} matrix", ""]
                lines.append(format_matrix(matrix, run.task_names, percent=percent))
        lines += ["", "## Summary", "", "| metric | sequential | merged |", "|---|---:|---:|"]
        seq, merged = summary["sequential"]["metrics"], summary["merged"]["metrics"]
        for key in seq:
            m = merged.get(key)
            lines.append(f"| {key} | {seq[key]:.4f} | {'' if m is None else f'{m:.4f}'} |")
    lines += ["", "## Citation", "", "```bibtex", MAGMAX_CITATION.strip(), "```"]
    return render_model_card(card_metadata, "\n".join(lines))
