# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""The task sequence as the user gives it (lists, dicts, a `ContinualSplit`), and every check on it before the first
training step: empty tasks, missing or string labels, labels or `task_classes` outside the model's head."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .matrices import is_sft_trainer, label_column, scalar_labels
from .state import matches, unwrap


def dataset_name(dataset: Any, index: int) -> str:
    name = getattr(dataset, "name", None)
    return name if isinstance(name, str) and name else f"task_{index}"


def normalize_tasks(datasets: Any, argument: str) -> tuple[list[str], list[Any], list[list | None]]:
    """(names, datasets, classes) from a list, a dict name → dataset, or a `ContinualSplit`."""
    if datasets is None:
        return [], [], []
    if isinstance(datasets, Mapping):
        items = list(datasets.items())
        names = [str(k) for k, _ in items]
        values = [v for _, v in items]
    elif isinstance(datasets, (list, tuple)):
        values = list(datasets)
        names = [dataset_name(v, i) for i, v in enumerate(values)]
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


def collect_tasks(
    args: Any, train_dataset: Any, train_datasets: Any, eval_datasets: Any, validation_datasets: Any
) -> tuple[list[str], list[Any], list[list | None], list[Any], list[Any]]:
    """The task sequence a MagMax trainer is given, checked: `(names, train, split classes, eval, validation)`.

    `train_datasets` (a list, a dict name → dataset or a `ContinualSplit`) or, for a single task, `train_dataset`;
    the eval and validation sets must name the same tasks; per-task schedules and Hub branches must fit the tasks.
    """
    from .config import check_per_task_length, check_push_options

    if train_datasets is None:
        if train_dataset is None:
            raise ValueError(
                "no tasks: pass `train_datasets`, a list or dict task name → dataset with at least one task."
            )
        train_datasets = [train_dataset]
    elif train_dataset is not None:
        raise ValueError("pass either `train_datasets` (the task sequence) or `train_dataset`, not both.")

    names, datasets, split_classes = normalize_tasks(train_datasets, "train_datasets")
    if not datasets:
        raise ValueError("no tasks: `train_datasets` is empty; pass at least one task.")
    check_per_task_length(args, len(datasets))
    check_push_options(args, names)  # every task's branch is a valid git branch name
    eval_names, eval_list, _ = normalize_tasks(eval_datasets, "eval_datasets")
    check_same_tasks(names, eval_names, eval_datasets, "eval_datasets")
    val_names, val_list, _ = normalize_tasks(validation_datasets, "validation_datasets")
    check_same_tasks(names, val_names, validation_datasets, "validation_datasets")
    return names, datasets, split_classes, eval_list, val_list


def check_model_and_optimizers(model: Any, optimizers: tuple[Any, Any], trainer: str) -> None:
    """The continual trainers' shared refusals: no base model, or a fixed optimizer/schedule (`trainer` names the
    class in the message)."""
    if model is None:
        raise ValueError("`model` is required: pass the base model θ_0 that the task sequence starts from.")
    if optimizers[0] is not None or optimizers[1] is not None:
        raise ValueError(
            f"`optimizers` is not supported: {trainer} creates a fresh optimizer and schedule for every task. "
            "Pass `optimizer_cls_and_kwargs` (or the `optim` option of the config) instead."
        )


def num_examples(dataset: Any) -> int | None:
    try:
        return len(dataset)
    except TypeError:  # IterableDataset
        return None


def is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def checkpoint_tensor_names(directory: str) -> set[str] | None:
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


def check_same_tasks(names: list[str], other_names: list[str], other: Any, argument: str) -> None:
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


def num_labels(model: nn.Module) -> int | None:
    """The size of a classification head (`config.num_labels`), None for causal LMs and models without one."""
    unwrapped = unwrap(model)
    if type(unwrapped).__name__.endswith("ForCausalLM"):
        return None
    config = getattr(unwrapped, "config", None)
    return getattr(config, "num_labels", None) if config is not None else None


def _string_label(dataset: Any) -> str | None:
    column = label_column(dataset)
    if column is None or not num_examples(dataset):
        return None
    first = dataset[0][column] if hasattr(dataset, "__getitem__") else None
    return first if isinstance(first, str) else None


def check_datasets(
    model: nn.Module, names: list[str], train: list[Any], evaluation: list[Any], label_names: Sequence[str] = ()
) -> None:
    """Every check on the tasks' data before any training step: empty tasks, a task without the label column the
    others have, string labels, and class ids outside the model's head."""
    head_size = num_labels(model)
    wanted = ("labels", "label", *label_names)
    for kind, datasets in (("train_datasets", train), ("eval_datasets", evaluation)):
        has_labels: dict[str, bool] = {}
        for name, dataset in zip(names, datasets):
            if dataset is None:
                raise ValueError(f"`{kind}` has no dataset for task {name!r}.")
            if num_examples(dataset) == 0:
                raise ValueError(f"task {name!r} of `{kind}` is empty: every task needs at least one example.")
            columns = getattr(dataset, "column_names", None)
            if columns is not None:
                has_labels[name] = any(c in columns for c in wanted)
            text = _string_label(dataset)
            if text is not None:
                raise ValueError(
                    f"task {name!r} of `{kind}` has string labels (e.g. {text!r}): the model needs class ids. Map them "
                    'first, e.g. `dataset.class_encode_column("label")` or `dataset.map(...)` with one id per class.'
                )
            labels = scalar_labels(dataset) if head_size is not None else None
            if labels:
                bad = [v for v in labels if v != -100 and not 0 <= v < head_size]
                if bad:
                    raise ValueError(
                        f"task {name!r} of `{kind}` has label {bad[0]} but the model's head has {head_size} classes "
                        f"(0..{head_size - 1}): build the model with `num_labels` covering every class of every task."
                    )
        if any(has_labels.values()) and not all(has_labels.values()):
            missing = next(name for name, has in has_labels.items() if not has)
            with_labels = next(name for name, has in has_labels.items() if has)
            raise ValueError(
                f"task {missing!r} of `{kind}` has no label column (`labels` or `label`) but task {with_labels!r} "
                "has one: give every task its labels (the model computes no loss without them)."
            )


def resolve_task_classes(
    task_classes: Sequence[Sequence[int]] | None,
    split_classes: list,
    datasets: list,
    names: list[str],
    head_size: int | None = None,
) -> list[list[int] | None]:
    """Each task's classes: `task_classes`, else a `ContinualSplit`'s, else the labels present; checked against the
    head."""
    if task_classes is not None:
        if isinstance(task_classes, (str, bytes)) or len(task_classes) != len(names):
            count = len(task_classes) if not isinstance(task_classes, (str, bytes)) else "a string of"
            raise ValueError(
                f"`task_classes` has {count} entries but there are {len(names)} tasks: pass one per task."
            )
        out = []
        for name, classes in zip(names, task_classes):
            values = list(classes)
            if not values or any(isinstance(c, bool) or not isinstance(c, int) for c in values):
                raise ValueError(
                    f"`task_classes` for task {name!r} must be a non-empty list of class ids (ints), got {classes!r}."
                )
            if head_size is not None:
                bad = [c for c in values if not 0 <= c < head_size]
                if bad:
                    raise ValueError(
                        f"`task_classes` for task {name!r} has class {bad[0]}, outside the model's head of {head_size} "
                        f"classes (0..{head_size - 1}): build the model with `num_labels` covering every class."
                    )
            out.append(sorted(values))
        return out
    out = []
    for classes, dataset in zip(split_classes, datasets):
        if classes and all(isinstance(c, int) for c in classes):
            out.append(sorted(classes))
            continue
        labels = scalar_labels(dataset)
        out.append(sorted({v for v in labels if v != -100}) if labels else None)
    return out


def freeze(model: nn.Module, patterns: Sequence[str]) -> None:
    unwrapped = unwrap(model)
    matched = {p: False for p in patterns}
    for name, param in unwrapped.named_parameters():
        for pattern in patterns:
            if matches(name, [pattern]):
                param.requires_grad_(False)
                matched[pattern] = True
    missing = [p for p, hit in matched.items() if not hit]
    if missing:
        raise ValueError(
            f"`frozen_modules` entry {missing[0]!r} matches no parameter of the model; use a module name such as "
            f"{next(iter(dict(unwrapped.named_parameters())), '<none>').rpartition('.')[0]!r} or a regex."
        )


def head(dataset: Any, n: int) -> Any:
    size = num_examples(dataset)
    if size is None or size <= n:
        return dataset
    if hasattr(dataset, "select"):
        return dataset.select(range(n))
    return torch.utils.data.Subset(dataset, range(n))


def task_dir_name(task: int, name: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name)
    return f"task-{task:02d}-{safe}"


def prepares_datasets(trainer: Any) -> bool:
    """Whether `trainer` turns raw datasets into model inputs itself, one dataset at a time: TRL's `SFTTrainer`
    (tokenization of text, prompt/completion or `messages`, the completion-only / assistant-only labels, truncation,
    packing) unless `dataset_kwargs={"skip_prepare_dataset": True}`."""
    return is_sft_trainer(trainer) and not getattr(trainer, "_skip_prepare_dataset", False)


def is_prepared(dataset: Any) -> bool:
    """A dataset an `SFTTrainer` already packed (its `seq_lengths` column): preparing it again would pack the packs."""
    return "seq_lengths" in (getattr(dataset, "column_names", None) or ())


def prepare_dataset(trainer: Any, dataset: Any, name: str, train: bool) -> Any:
    """`dataset` as `trainer` prepares its own `train_dataset` (`train=True`) or evaluation sets: for TRL's
    `SFTTrainer`, through its own `_prepare_dataset` with the same options (`packing`, or `eval_packing` for
    evaluation sets, and the `formatting_func`), so that every task is prepared exactly like the first one. Each
    dataset is prepared (and packed) on its own: a pack never holds examples of two tasks. Other trainers, and
    datasets already packed, are returned as they are."""
    if dataset is None or not prepares_datasets(trainer) or is_prepared(dataset):
        return dataset
    args = trainer.args
    packing = args.packing if train or args.eval_packing is None else args.eval_packing
    return trainer._prepare_dataset(
        dataset, trainer.processing_class, args, packing, getattr(trainer, "_formatting_func", None), name
    )
