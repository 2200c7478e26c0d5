# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""Task splits for continual learning: turn a `datasets.Dataset` into a sequence of tasks.

Three standard scenarios (van de Ven & Tolias, 2019):

- [`class_incremental_split`]: the classes of a label column are dealt into `T` disjoint groups; task `t` holds the
  examples of its group. One head over all classes; the model must tell all classes apart at the end.
- [`domain_incremental_split`]: one task per value of a domain column (e.g. source, year, style); every task has the
  same label space.
- [`task_incremental_split`]: separate datasets, one per task, used in a given order.

Each split returns a [`ContinualSplit`], a list of [`ContinualTask`] (name, dataset, classes) that also remembers how
it was made, so the same split can be applied to the evaluation data with [`ContinualSplit.apply_to`]:

```python
>>> from datasets import Dataset
>>> from hf_magmax.continual import class_incremental_split
>>> train = Dataset.from_dict({"x": list(range(12)), "label": [0, 1, 2, 3, 4, 5] * 2})
>>> tasks = class_incremental_split(train, num_tasks=3, seed=0)
>>> tasks.class_order, tasks.task_classes
([5, 2, 1, 3, 0, 4], [[5, 2], [1, 3], [0, 4]])
>>> test_tasks = tasks.apply_to(train)  # same classes per task, e.g. on the test split
```

`split.as_dict()` gives `{task name: dataset}` in task order and `split.task_classes` the classes of every task, the
two things [`MagMaxTrainer`] takes (`train_datasets=`, `task_classes=`).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np


if TYPE_CHECKING:
    from datasets import Dataset


logger = logging.getLogger(__name__)

__all__ = [
    "ContinualSplit",
    "ContinualTask",
    "class_incremental_split",
    "domain_incremental_split",
    "task_incremental_split",
]


@dataclass
class ContinualTask:
    """One task of a continual-learning sequence.

    Args:
        name (`str`):
            The task name (used as the key of `train_datasets`/`eval_datasets` and in result tables).
        dataset (`datasets.Dataset`):
            The examples of this task.
        classes (`list`):
            The label values this task holds (for a class-incremental split: the task's classes, in class order; for
            the other splits: the sorted labels present, or `[]` when there is no label column).
        domain (`Any`, *optional*):
            The value of the domain column for a domain-incremental split, else `None`.
    """

    name: str
    dataset: Dataset
    classes: list = field(default_factory=list)
    domain: Any = None

    def __repr__(self) -> str:
        domain = f", domain={self.domain!r}" if self.domain is not None else ""
        return f"ContinualTask(name={self.name!r}, num_rows={len(self.dataset)}, classes={self.classes!r}{domain})"


class ContinualSplit(list):
    """A list of [`ContinualTask`] in training order, plus how it was made.

    Attributes:
        kind (`str`): `"class_incremental"`, `"domain_incremental"` or `"task_incremental"`.
        label_column (`str` or `None`): the label column the classes were read from.
        domain_column (`str` or `None`): the domain column (domain-incremental only).
        class_order (`list` or `None`): every class in the order tasks receive them (class-incremental only); pass
            it back as `class_order=` to split another dataset the same way.
    """

    def __init__(
        self,
        tasks: Sequence[ContinualTask],
        kind: str,
        label_column: str | None = None,
        domain_column: str | None = None,
        class_order: list | None = None,
    ) -> None:
        super().__init__(tasks)
        self.kind = kind
        self.label_column = label_column
        self.domain_column = domain_column
        self.class_order = class_order

    @property
    def task_names(self) -> list[str]:
        """The task names, in training order."""
        return [task.name for task in self]

    @property
    def task_classes(self) -> list[list]:
        """The classes of every task, in training order (what `MagMaxTrainer(task_classes=...)` takes)."""
        return [list(task.classes) for task in self]

    @property
    def datasets(self) -> list[Dataset]:
        """The task datasets, in training order."""
        return [task.dataset for task in self]

    def as_dict(self) -> dict[str, Dataset]:
        """`{task name: dataset}` in training order (what `MagMaxTrainer(train_datasets=...)` takes)."""
        return {task.name: task.dataset for task in self}

    def apply_to(self, dataset: Dataset) -> ContinualSplit:
        """Split another dataset (e.g. the test split) into the same tasks: same names, classes or domains, order.

        Args:
            dataset (`datasets.Dataset`):
                A dataset with the same label (class-incremental) or domain (domain-incremental) column.

        Returns:
            [`ContinualSplit`]: the tasks over `dataset`. Every task must have at least one example.
        """
        if self.kind == "class_incremental":
            return class_incremental_split(
                dataset,
                label_column=self.label_column,
                class_order=self.class_order,
                classes_per_task=[len(task.classes) for task in self],
                task_names=self.task_names,
            )
        if self.kind == "domain_incremental":
            return domain_incremental_split(
                dataset,
                domain_column=self.domain_column,
                domain_order=[task.domain for task in self],
                label_column=self.label_column,
                task_names=self.task_names,
            )
        raise ValueError(
            "a task-incremental split has one separate dataset per task, so it cannot be applied to a single "
            "dataset: build the evaluation split with `task_incremental_split` from the evaluation datasets instead."
        )

    def __repr__(self) -> str:
        body = ",\n  ".join(repr(task) for task in self)
        return f"ContinualSplit(kind={self.kind!r}, tasks=[\n  {body}\n])"


def _check_column(dataset: Dataset, column: str, argument: str) -> list:
    columns = list(dataset.column_names)
    if column not in columns:
        raise ValueError(
            f"`{argument}={column!r}` is not a column of the dataset; its columns are {columns}. Pass the name of "
            "the column that holds the values to split by."
        )
    return _column_values(dataset, column)


def _column_values(dataset: Dataset, column: str) -> list:
    """Plain Python values of a column, whatever the dataset's format (torch/numpy formats give tensors)."""
    return [_native(value) for value in dataset.with_format(None)[column]]


def _sorted_unique(values: Sequence[Hashable]) -> list:
    unique = list(dict.fromkeys(values))
    try:
        return sorted(unique)
    except TypeError:  # mixed types: keep order of first appearance
        return unique


def _native(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _indices_by_value(values: Sequence[Hashable]) -> dict[Hashable, list[int]]:
    by_value: dict[Hashable, list[int]] = {}
    for index, value in enumerate(values):
        by_value.setdefault(value, []).append(index)
    return by_value


def _check_task_names(task_names: Sequence[str] | None, num_tasks: int, default: list[str]) -> list[str]:
    if task_names is None:
        return default
    names = [str(name) for name in task_names]
    if len(names) != num_tasks:
        raise ValueError(f"`task_names` has {len(names)} name(s) but the split has {num_tasks} task(s).")
    if len(set(names)) != len(names):
        raise ValueError(f"`task_names` must be unique, got {names}.")
    return names


def class_incremental_split(
    dataset: Dataset,
    label_column: str = "label",
    num_tasks: int | None = None,
    classes_per_task: int | Sequence[int] | None = None,
    class_order: Sequence[Hashable] | None = None,
    seed: int | None = None,
    task_names: Sequence[str] | None = None,
) -> ContinualSplit:
    """Class-incremental split: deal the classes of `label_column` into disjoint groups, one task per group.

    The classes are taken in `class_order` (default: sorted, or a random permutation when `seed` is given) and cut
    into consecutive groups of `classes_per_task`; task `t` holds every example whose label is in group `t`, in the
    dataset's original row order. Labels are kept as they are (one head over all classes).

    To split the evaluation data the same way, call `split.apply_to(test_dataset)`, or pass
    `class_order=split.class_order` and the same `classes_per_task`.

    Args:
        dataset (`datasets.Dataset`):
            The dataset to split.
        label_column (`str`, *optional*, defaults to `"label"`):
            The column with the class of every example.
        num_tasks (`int`, *optional*):
            Number of tasks `T`; the number of classes must be divisible by it. Give this or `classes_per_task`.
        classes_per_task (`int` or `Sequence[int]`, *optional*):
            Classes in every task (an `int`), or in each task (a sequence summing to the number of classes).
        class_order (`Sequence`, *optional*):
            The classes in the order tasks receive them. Every class must occur in the dataset. Classes of the
            dataset missing from `class_order` are dropped (with a warning).
        seed (`int`, *optional*):
            Draw the class order as a random permutation of the sorted classes with this seed (ignored when
            `class_order` is given).
        task_names (`Sequence[str]`, *optional*):
            One name per task; defaults to `task_1`, …, `task_T`.

    Returns:
        [`ContinualSplit`]: the tasks, with `class_order` set.

    Example:

    ```python
    >>> from datasets import Dataset
    >>> from hf_magmax.continual import class_incremental_split
    >>> ds = Dataset.from_dict({"x": list(range(8)), "label": [0, 1, 2, 3] * 2})
    >>> split = class_incremental_split(ds, classes_per_task=2)
    >>> split.task_classes, [len(t.dataset) for t in split]
    ([[0, 1], [2, 3]], [4, 4])
    ```
    """
    labels = _check_column(dataset, label_column, "label_column")
    by_class = _indices_by_value(labels)
    present = _sorted_unique(labels)
    if not present:
        raise ValueError("`dataset` is empty: there are no classes to split into tasks.")

    if class_order is not None:
        order = [_native(c) for c in class_order]
        if len(set(order)) != len(order):
            duplicates = sorted({str(c) for c in order if order.count(c) > 1})
            raise ValueError(f"`class_order` lists classes more than once: {', '.join(duplicates)}.")
        missing = [c for c in order if c not in by_class]
        if missing:
            raise ValueError(
                f"`class_order` has classes that are not present in column {label_column!r} of the dataset: "
                f"{missing}; present classes: {present}."
            )
        dropped = [c for c in present if c not in set(order)]
        if dropped:
            warnings.warn(
                f"classes {dropped} of column {label_column!r} are not in `class_order`; their "
                f"{sum(len(by_class[c]) for c in dropped)} example(s) are left out of every task.",
                stacklevel=2,
            )
    elif seed is not None:
        order = [present[i] for i in np.random.RandomState(seed).permutation(len(present))]
    else:
        order = present

    num_classes = len(order)
    if classes_per_task is None and num_tasks is None:
        raise ValueError(
            f"pass `num_tasks` or `classes_per_task` to say how to group the {num_classes} classes into tasks."
        )
    if isinstance(classes_per_task, Sequence) and not isinstance(classes_per_task, str):
        sizes = [int(n) for n in classes_per_task]
        if any(n < 1 for n in sizes):
            raise ValueError(f"`classes_per_task` must be positive, got {sizes}.")
        if sum(sizes) != num_classes:
            raise ValueError(
                f"`classes_per_task` {sizes} sums to {sum(sizes)}, but there are {num_classes} classes to split."
            )
        if num_tasks is not None and num_tasks != len(sizes):
            raise ValueError(f"`num_tasks={num_tasks}` but `classes_per_task` lists {len(sizes)} task sizes.")
    elif classes_per_task is not None:
        per_task = int(classes_per_task)
        if per_task < 1:
            raise ValueError(f"`classes_per_task` must be at least 1, got {per_task}.")
        if num_classes % per_task:
            raise ValueError(
                f"{num_classes} classes are not divisible into tasks of `classes_per_task={per_task}`; pass a list "
                "of per-task sizes, or a `class_order` with a multiple of it."
            )
        if num_tasks is not None and num_tasks * per_task != num_classes:
            raise ValueError(
                f"`num_tasks={num_tasks}` × `classes_per_task={per_task}` = {num_tasks * per_task}, but there are "
                f"{num_classes} classes; pass only one of the two, or a `class_order` with the classes to use."
            )
        sizes = [per_task] * (num_classes // per_task)
    else:
        if num_tasks < 1:
            raise ValueError(f"`num_tasks` must be at least 1, got {num_tasks}.")
        if num_classes % num_tasks:
            raise ValueError(
                f"{num_classes} classes are not divisible into `num_tasks={num_tasks}` tasks; pass "
                "`classes_per_task` as a list of per-task sizes for an uneven split."
            )
        sizes = [num_classes // num_tasks] * num_tasks

    names = _check_task_names(task_names, len(sizes), [f"task_{t}" for t in range(1, len(sizes) + 1)])
    tasks = []
    start = 0
    for name, size in zip(names, sizes):
        classes = order[start : start + size]
        start += size
        indices = sorted(i for c in classes for i in by_class[c])
        tasks.append(ContinualTask(name=name, dataset=dataset.select(indices), classes=list(classes)))
    logger.debug("class-incremental split: %s", [(t.name, t.classes, len(t.dataset)) for t in tasks])
    return ContinualSplit(tasks, kind="class_incremental", label_column=label_column, class_order=list(order))


def domain_incremental_split(
    dataset: Dataset,
    domain_column: str,
    domain_order: Sequence[Hashable] | None = None,
    label_column: str | None = "label",
    task_names: Sequence[str] | None = None,
) -> ContinualSplit:
    """Domain-incremental split: one task per value of `domain_column`, all tasks sharing the label space.

    Args:
        dataset (`datasets.Dataset`):
            The dataset to split.
        domain_column (`str`):
            The column whose values define the tasks (e.g. `"source"`).
        domain_order (`Sequence`, *optional*):
            The domains in training order (default: sorted). Every domain must occur in the dataset; domains of the
            dataset missing from it are dropped (with a warning).
        label_column (`str`, *optional*, defaults to `"label"`):
            Column to read each task's `classes` from; `None` (or a missing column) leaves `classes` empty.
        task_names (`Sequence[str]`, *optional*):
            One name per task; defaults to the domain values as strings.

    Returns:
        [`ContinualSplit`]: the tasks; each task's `domain` holds its domain value.

    Example:

    ```python
    >>> from datasets import Dataset
    >>> from hf_magmax.continual import domain_incremental_split
    >>> ds = Dataset.from_dict({"text": list("abcd"), "source": ["news", "web", "news", "web"], "label": [0, 1, 1, 0]})
    >>> split = domain_incremental_split(ds, "source", domain_order=["web", "news"])
    >>> split.task_names, split.task_classes
    (['web', 'news'], [[0, 1], [0, 1]])
    ```
    """
    domains = _check_column(dataset, domain_column, "domain_column")
    labels = (
        _column_values(dataset, label_column)
        if label_column is not None and label_column in dataset.column_names
        else None
    )
    by_domain = _indices_by_value(domains)
    present = _sorted_unique(domains)
    if not present:
        raise ValueError("`dataset` is empty: there are no domains to split into tasks.")
    if domain_order is None:
        order = present
    else:
        order = [_native(d) for d in domain_order]
        if not order:
            raise ValueError("`domain_order` is empty: list at least one domain.")
        if len(set(order)) != len(order):
            raise ValueError(f"`domain_order` lists a domain more than once: {order}.")
        missing = [d for d in order if d not in by_domain]
        if missing:
            raise ValueError(
                f"`domain_order` has domains not present in column {domain_column!r}: {missing}; present: {present}."
            )
        dropped = [d for d in present if d not in set(order)]
        if dropped:
            warnings.warn(
                f"domains {dropped} of column {domain_column!r} are not in `domain_order`; their examples are left "
                "out of every task.",
                stacklevel=2,
            )
    names = _check_task_names(task_names, len(order), [str(d) for d in order])
    tasks = []
    for name, domain in zip(names, order):
        indices = by_domain[domain]
        classes = _sorted_unique([labels[i] for i in indices]) if labels is not None else []
        tasks.append(ContinualTask(name=name, dataset=dataset.select(indices), classes=classes, domain=domain))
    return ContinualSplit(
        tasks,
        kind="domain_incremental",
        label_column=label_column if labels is not None else None,
        domain_column=domain_column,
    )


def task_incremental_split(
    datasets: Mapping[str, Dataset] | Sequence[Dataset],
    label_column: str | None = "label",
    task_names: Sequence[str] | None = None,
) -> ContinualSplit:
    """Task-incremental sequence: separate datasets, one per task, in the given order.

    Args:
        datasets (`dict[str, Dataset]` or `list[Dataset]`):
            The task datasets in training order; dict keys are the task names.
        label_column (`str`, *optional*, defaults to `"label"`):
            Column to read each task's `classes` from; `None` (or a missing column) leaves `classes` empty.
        task_names (`Sequence[str]`, *optional*):
            Names for a list of datasets (default `task_1`, …); not allowed with a dict.

    Returns:
        [`ContinualSplit`]: the tasks.

    Example:

    ```python
    >>> from datasets import Dataset
    >>> from hf_magmax.continual import task_incremental_split
    >>> split = task_incremental_split({"sst2": Dataset.from_dict({"label": [0, 1]}),
    ...                                 "rte": Dataset.from_dict({"label": [1, 1]})})
    >>> split.task_names, split.task_classes
    (['sst2', 'rte'], [[0, 1], [1]])
    ```
    """
    if isinstance(datasets, Mapping):
        if task_names is not None:
            raise ValueError("`task_names` cannot be combined with a dict of datasets: the dict keys are the names.")
        names = [str(k) for k in datasets]
        items = list(datasets.values())
    else:
        items = list(datasets)
        names = _check_task_names(task_names, len(items), [f"task_{t}" for t in range(1, len(items) + 1)])
    if not items:
        raise ValueError("`datasets` is empty: pass at least one task dataset.")
    tasks = []
    for name, dataset in zip(names, items):
        if not hasattr(dataset, "column_names"):
            raise TypeError(f"task {name!r} is a {type(dataset).__name__}, expected a `datasets.Dataset`.")
        if len(dataset) == 0:
            raise ValueError(f"task {name!r} has no examples: every task needs at least one.")
        classes = (
            _sorted_unique(_column_values(dataset, label_column))
            if label_column is not None and label_column in dataset.column_names
            else []
        )
        tasks.append(ContinualTask(name=name, dataset=dataset, classes=classes))
    return ContinualSplit(tasks, kind="task_incremental", label_column=label_column)
