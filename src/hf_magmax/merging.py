# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""Merge math: pure tensor functions over task vectors, and their online (running) accumulators.

This module is the single place that holds the MagMax rule and the baselines. Every other part of hf_magmax (the
streaming checkpoint merge, the LoRA merger, the Trainer) calls into it.

Every method exists in two shapes that give bit-identical results:

- a pure function, `list[Tensor] -> Tensor` (the PEFT convention), e.g. [`magmax`], [`ties`];
- an online accumulator ([`OnlineMerge`] subclass) that folds task vectors in one at a time with memory independent
  of the number of tasks, e.g. [`MagMaxMerge`]. The streaming merge and the Trainer use these.

The functions return the *merged task vector* (unscaled). The merged model is `θ_0 + scaling_coef · merged`; see
[`merge_task_vectors`] and [`DEFAULT_SCALING_COEFS`] for the default coefficient of every method.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor


__all__ = [
    "DEFAULT_SCALING_COEFS",
    "MERGE_METHODS",
    "AverageMerge",
    "MagMaxMerge",
    "OnlineMerge",
    "RandomMixMerge",
    "StateDictMerger",
    "TaskArithmeticMerge",
    "TiesMerge",
    "average",
    "check_merge_method",
    "default_scaling_coef",
    "magmax",
    "make_online_merge",
    "merge_task_vectors",
    "random_mix",
    "task_arithmetic",
    "ties",
    "ties_trim_threshold",
]

#: Default `scaling_coef` (λ) of every method: the merged model is `θ_0 + λ · merged_task_vector`.
#:
#: - `magmax`: 0.5, the value used throughout the MagMax paper (Marczak et al., ECCV 2024).
#: - `average`: 1.0, so that the result is the plain weight average of the fine-tuned models.
#: - `task_arithmetic`: 0.3, the usual default for a sum of several task vectors (Ilharco et al., 2023; FusionBench).
#: - `ties`: 1.0, the disjoint mean is already on the scale of a single task vector (Yadav et al., 2023).
#: - `random_mix`: 0.5, like MagMax, since it also selects one task's value per element (the paper's baseline).
DEFAULT_SCALING_COEFS: dict[str, float] = {
    "magmax": 0.5,
    "average": 1.0,
    "task_arithmetic": 0.3,
    "ties": 1.0,
    "random_mix": 0.5,
}


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16/bf16 (and fp8) are merged in fp32; fp32/fp64 keep their own precision."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _check_same_shape(tensors: Sequence[Tensor], name: str = "task_vectors") -> None:
    if len(tensors) == 0:
        raise ValueError(f"`{name}` is empty: pass at least one task vector to merge.")
    first = tensors[0]
    for i, t in enumerate(tensors[1:], start=1):
        if t.shape != first.shape:
            raise ValueError(
                f"`{name}[{i}]` has shape {tuple(t.shape)} but `{name}[0]` has shape {tuple(first.shape)}: "
                "all task vectors of one parameter must have the same shape."
            )
        if not t.is_floating_point():
            raise TypeError(f"`{name}[{i}]` has dtype {t.dtype}; task vectors must be floating point.")
    if not first.is_floating_point():
        raise TypeError(f"`{name}[0]` has dtype {first.dtype}; task vectors must be floating point.")


# --------------------------------------------------------------------------------------------------------------------
# Online accumulators
# --------------------------------------------------------------------------------------------------------------------


class OnlineMerge:
    """Base class of the online accumulators: fold task vectors of one parameter in, one at a time.

    Memory is a fixed number of tensors of the parameter's shape, independent of how many task vectors are folded.
    Subclasses implement `_update` and `_result`; `state_dict`/`load_state_dict` make the running state
    checkpointable (the Trainer saves it with each checkpoint).

    Example:

    ```python
    >>> import torch
    >>> from hf_magmax.merging import MagMaxMerge
    >>> acc = MagMaxMerge()
    >>> acc.update(torch.tensor([1.0, -3.0]))
    >>> acc.update(torch.tensor([-2.0, 1.0]))
    >>> acc.result()
    tensor([-2., -3.])
    ```
    """

    method: str = ""

    def __init__(self) -> None:
        self.num_tasks = 0
        self._dtype: torch.dtype | None = None
        self._shape: torch.Size | None = None

    @torch.no_grad()
    def update(self, task_vector: Tensor) -> None:
        """Fold one task vector (a floating tensor of the parameter's shape) into the running merge."""
        if not task_vector.is_floating_point():
            raise TypeError(f"task vectors must be floating point, got dtype {task_vector.dtype}.")
        if self._shape is None:
            self._shape, self._dtype = task_vector.shape, task_vector.dtype
        elif task_vector.shape != self._shape:
            raise ValueError(
                f"task vector {self.num_tasks} has shape {tuple(task_vector.shape)}, but the earlier ones have "
                f"shape {tuple(self._shape)}."
            )
        self._update(task_vector)
        self.num_tasks += 1

    @torch.no_grad()
    def result(self) -> Tensor:
        """The merged task vector (unscaled), in the dtype of the first task vector folded in."""
        if self.num_tasks == 0:
            raise ValueError("no task vector has been folded in yet: call `update` at least once before `result`.")
        return self._result().to(self._dtype)

    def _update(self, task_vector: Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _result(self) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _state_tensors(self) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def state_dict(self) -> dict[str, Tensor | int | str]:
        """The running state: tensors plus `num_tasks`, enough to continue folding after a restart."""
        state: dict[str, Tensor | int | str] = {"num_tasks": self.num_tasks, "method": self.method}
        if self.num_tasks:
            state.update(self._state_tensors())
            state["dtype"] = str(self._dtype).removeprefix("torch.")
        return state

    def load_state_dict(self, state: Mapping[str, Tensor | int | str]) -> None:
        if state.get("method", self.method) != self.method:
            raise ValueError(f"cannot load a `{state['method']}` merge state into a `{self.method}` accumulator.")
        self.num_tasks = int(state["num_tasks"])
        if self.num_tasks:
            tensors = {k: v for k, v in state.items() if isinstance(v, Tensor)}
            for key, value in tensors.items():
                setattr(self, key, value.clone())
            self._dtype = getattr(torch, str(state["dtype"]))
            self._shape = next(iter(tensors.values())).shape


class MagMaxMerge(OnlineMerge):
    """Running max-magnitude selection: per element keep the value with the largest `|τ|`, sign kept.

    Ties go to the later task (`>=`), exactly as [`magmax`]. The state is one tensor, in the input dtype: selection
    never does arithmetic, so every output element is bit-identical to one input element.
    """

    method = "magmax"

    def _update(self, task_vector: Tensor) -> None:
        if self.num_tasks == 0:
            self.selected = task_vector.detach().clone()
        else:
            task_vector = task_vector.to(device=self.selected.device, dtype=self.selected.dtype)
            # ties (>=) go to the later task
            self.selected = torch.where(task_vector.abs() >= self.selected.abs(), task_vector, self.selected)

    def _result(self) -> Tensor:
        return self.selected.clone()

    def _state_tensors(self) -> dict[str, Tensor]:
        return {"selected": self.selected}


class TaskArithmeticMerge(OnlineMerge):
    """Running sum of task vectors (task arithmetic, Ilharco et al., 2023), accumulated in fp32 for half inputs."""

    method = "task_arithmetic"

    def _update(self, task_vector: Tensor) -> None:
        if self.num_tasks == 0:
            self.total = task_vector.detach().to(_compute_dtype(task_vector.dtype), copy=True)
        else:
            self.total.add_(task_vector.to(device=self.total.device, dtype=self.total.dtype))

    def _result(self) -> Tensor:
        return self.total.clone()

    def _state_tensors(self) -> dict[str, Tensor]:
        return {"total": self.total}


class AverageMerge(TaskArithmeticMerge):
    """Running mean of task vectors; with `scaling_coef=1` the merged model is the plain weight average."""

    method = "average"

    def _result(self) -> Tensor:
        return self.total / self.num_tasks


class TiesMerge(OnlineMerge):
    """TIES-merging (Yadav et al., NeurIPS 2023), computed online.

    1. *Trim*: each task vector keeps its top-`density` fraction of elements by magnitude (per tensor, as PEFT and
       mergekit do), the rest become 0.
    2. *Elect*: per element, the sign of the total trimmed mass `Σ_t trimmed_t`.
    3. *Disjoint mean*: the mean of the trimmed values that agree with the elected sign (zeros excluded).

    The online form keeps four tensors: the sums and counts of positive and negative trimmed values. The elected sign
    is `sign(pos_sum + neg_sum)` and the disjoint mean `pos_sum / pos_count` or `neg_sum / neg_count`.

    Args:
        density (`float`, *optional*, defaults to `0.2`):
            Fraction of each task vector's elements kept by magnitude, in (0, 1]. 0.2 is TIES' published default.
        thresholds (`list[float | None]`, *optional*):
            The trim threshold of each task vector, in task order, as [`ties_trim_threshold`] computes it on the
            *whole* tensor. With them, task vectors may be folded in slices (the streaming merge does this to go
            through a tensor in row blocks) and the result equals the whole-tensor merge bit for bit.
    """

    method = "ties"

    def __init__(self, density: float = 0.2, thresholds: Sequence[float | None] | None = None) -> None:
        super().__init__()
        self.density = check_density(density)
        self.thresholds = None if thresholds is None else list(thresholds)

    def _trim(self, task_vector: Tensor) -> Tensor:
        tv = task_vector.detach().to(_compute_dtype(task_vector.dtype))
        if self.thresholds is not None:
            if self.num_tasks >= len(self.thresholds):
                raise ValueError(f"`thresholds` holds {len(self.thresholds)} values, but more task vectors came in.")
            threshold = self.thresholds[self.num_tasks]
        else:
            threshold = ties_trim_threshold(tv, self.density)
        if threshold is None:
            return tv.clone()
        # keep everything at least as large as the threshold (ties at the threshold are kept)
        return torch.where(tv.abs() >= threshold, tv, torch.zeros_like(tv))

    def _update(self, task_vector: Tensor) -> None:
        trimmed = self._trim(task_vector)
        if self.num_tasks == 0:
            zeros = torch.zeros_like(trimmed)
            self.pos_sum, self.neg_sum = zeros.clone(), zeros.clone()
            self.pos_count, self.neg_count = zeros.clone(), zeros.clone()
        trimmed = trimmed.to(self.pos_sum.device)
        positive, negative = trimmed > 0, trimmed < 0
        self.pos_sum.add_(torch.where(positive, trimmed, 0.0))
        self.neg_sum.add_(torch.where(negative, trimmed, 0.0))
        self.pos_count.add_(positive.to(self.pos_count.dtype))
        self.neg_count.add_(negative.to(self.neg_count.dtype))

    def _result(self) -> Tensor:
        elected_positive = (self.pos_sum + self.neg_sum) >= 0
        total = torch.where(elected_positive, self.pos_sum, self.neg_sum)
        count = torch.where(elected_positive, self.pos_count, self.neg_count)
        return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))

    def _state_tensors(self) -> dict[str, Tensor]:
        return {
            "pos_sum": self.pos_sum,
            "neg_sum": self.neg_sum,
            "pos_count": self.pos_count,
            "neg_count": self.neg_count,
        }


class RandomMixMerge(OnlineMerge):
    """Random mixing (the MagMax paper's baseline): per element, the value of one task chosen uniformly at random.

    Computed online by reservoir sampling: the t-th task vector (1-based) replaces each element with probability
    `1/t`, which leaves every task equally likely. The draws come from a `torch.Generator` seeded with `seed`, one
    draw per task; results are reproducible for the same seed, task order and shapes.

    Args:
        seed (`int`, *optional*, defaults to `0`):
            Seed of the random choice.
    """

    method = "random_mix"

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = int(seed)
        self._generator = torch.Generator(device="cpu").manual_seed(self.seed)

    def _update(self, task_vector: Tensor) -> None:
        if self.num_tasks == 0:
            self.selected = task_vector.detach().clone()
            return
        draw = torch.rand(task_vector.shape, generator=self._generator)
        replace = (draw * (self.num_tasks + 1) < 1.0).to(self.selected.device)
        task_vector = task_vector.to(device=self.selected.device, dtype=self.selected.dtype)
        self.selected = torch.where(replace, task_vector, self.selected)

    def _result(self) -> Tensor:
        return self.selected.clone()

    def _state_tensors(self) -> dict[str, Tensor]:
        return {"selected": self.selected, "generator_state": self._generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Tensor | int | str]) -> None:
        state = dict(state)
        generator_state = state.pop("generator_state", None)
        super().load_state_dict(state)
        if generator_state is not None:
            self._generator.set_state(generator_state)


#: Online accumulator class of every merge method, by name.
ONLINE_MERGES: dict[str, type[OnlineMerge]] = {
    "magmax": MagMaxMerge,
    "average": AverageMerge,
    "task_arithmetic": TaskArithmeticMerge,
    "ties": TiesMerge,
    "random_mix": RandomMixMerge,
}


def ties_trim_threshold(task_vector: Tensor, density: float) -> float | None:
    """TIES' trim threshold of one task vector: the k-th largest magnitude, k = int(density · numel).

    Returns `None` when nothing is trimmed (`density` 1) and `inf` when nothing is kept (k = 0).
    """
    if density >= 1.0:
        return None
    numel = task_vector.numel()
    k = int(density * numel)
    if k == 0:
        return math.inf
    magnitudes = task_vector.detach().to(_compute_dtype(task_vector.dtype)).abs().flatten()
    return magnitudes.kthvalue(numel - k + 1).values.item()


def check_density(density: float) -> float:
    """Validate TIES' `density` (fraction kept), which must lie in (0, 1]."""
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < float(density) <= 1.0:
        raise ValueError(f"`density` must be a number in (0, 1], got {density!r}. TIES' published default is 0.2.")
    return float(density)


def check_merge_method(method: str) -> str:
    """Return `method` if it names a merge method, else raise an error that lists the valid names."""
    if method not in ONLINE_MERGES:
        raise ValueError(f"unknown merge method {method!r}: choose one of {', '.join(sorted(ONLINE_MERGES))}.")
    return method


def default_scaling_coef(method: str) -> float:
    """The default `scaling_coef` (λ) of `method`; see [`DEFAULT_SCALING_COEFS`]."""
    return DEFAULT_SCALING_COEFS[check_merge_method(method)]


def _method_kwargs(method: str, method_kwargs: Mapping[str, object]) -> dict[str, object]:
    allowed = {"ties": {"density"}, "random_mix": {"seed"}}.get(method, set())
    unknown = set(method_kwargs) - allowed
    if unknown:
        hint = f"`{method}` takes {', '.join(sorted(allowed))}" if allowed else f"`{method}` takes no options"
        raise TypeError(f"unexpected option(s) {', '.join(sorted(unknown))} for merge method `{method}`: {hint}.")
    return dict(method_kwargs)


def make_online_merge(method: str = "magmax", **method_kwargs) -> OnlineMerge:
    """A fresh online accumulator of `method` (`density` for `ties`, `seed` for `random_mix`)."""
    method = check_merge_method(method)
    return ONLINE_MERGES[method](**_method_kwargs(method, method_kwargs))


# --------------------------------------------------------------------------------------------------------------------
# Pure functions: list[Tensor] -> Tensor (the merged, unscaled task vector)
# --------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def magmax(task_vectors: Sequence[Tensor]) -> Tensor:
    """MagMax: per element, the task-vector value with the largest magnitude, its sign kept.

    Ties go to the later task. Every output element is bit-identical to the element of one input.

    Args:
        task_vectors (`list[torch.Tensor]`):
            Task vectors `τ_t = θ_t − θ_0` of one parameter, all of the same shape, in task order.

    Returns:
        `torch.Tensor`: the selected task vector (unscaled), in the input dtype.

    Example:

    ```python
    >>> import torch
    >>> from hf_magmax import magmax
    >>> magmax([torch.tensor([1.0, -3.0, 2.0]), torch.tensor([-2.0, 1.0, -2.0])])
    tensor([-2., -3., -2.])
    ```
    """
    _check_same_shape(task_vectors)
    if len(task_vectors) == 1:
        return task_vectors[0].clone()
    dtype = task_vectors[0].dtype
    stacked = torch.stack([t.to(dtype) for t in task_vectors])  # [T, *shape]
    # argmax returns the first maximum; searching the reversed stack makes ties go to the later task
    last_index = len(task_vectors) - 1
    index = last_index - stacked.abs().flip(0).argmax(dim=0, keepdim=True)  # [1, *shape]
    return stacked.gather(0, index).squeeze(0)


def _fold(method: str, task_vectors: Sequence[Tensor], **method_kwargs) -> Tensor:
    _check_same_shape(task_vectors)
    accumulator = make_online_merge(method, **method_kwargs)
    for task_vector in task_vectors:
        accumulator.update(task_vector)
    return accumulator.result()


@torch.no_grad()
def average(task_vectors: Sequence[Tensor]) -> Tensor:
    """Mean of the task vectors (fp32 math for half inputs). With `scaling_coef=1.0`: the weight average.

    Example:

    ```python
    >>> import torch
    >>> from hf_magmax import average
    >>> average([torch.tensor([1.0, -3.0]), torch.tensor([-2.0, 1.0])])
    tensor([-0.5000, -1.0000])
    ```
    """
    return _fold("average", task_vectors)


@torch.no_grad()
def task_arithmetic(task_vectors: Sequence[Tensor]) -> Tensor:
    """Sum of the task vectors (task arithmetic; default `scaling_coef` 0.3).

    Example:

    ```python
    >>> import torch
    >>> from hf_magmax import task_arithmetic
    >>> task_arithmetic([torch.tensor([1.0, -3.0]), torch.tensor([-2.0, 1.0])])
    tensor([-1., -2.])
    ```
    """
    return _fold("task_arithmetic", task_vectors)


@torch.no_grad()
def ties(task_vectors: Sequence[Tensor], density: float = 0.2) -> Tensor:
    """TIES-merging: trim to the top-`density` magnitudes per task vector, elect the sign by total mass, disjoint mean.

    See [`TiesMerge`] for the exact definition.

    Args:
        task_vectors (`list[torch.Tensor]`):
            Task vectors of one parameter, same shape.
        density (`float`, *optional*, defaults to `0.2`):
            Fraction of elements each task vector keeps, in (0, 1].

    Example:

    ```python
    >>> import torch
    >>> from hf_magmax import ties
    >>> ties([torch.tensor([1.0, -3.0]), torch.tensor([3.0, 1.0])], density=1.0)
    tensor([ 2., -3.])
    ```
    """
    return _fold("ties", task_vectors, density=density)


@torch.no_grad()
def random_mix(task_vectors: Sequence[Tensor], seed: int = 0) -> Tensor:
    """Per element, the value of one task vector chosen uniformly at random (seeded); see [`RandomMixMerge`].

    Example:

    ```python
    >>> import torch
    >>> from hf_magmax import random_mix
    >>> out = random_mix([torch.zeros(4), torch.ones(4)], seed=0)
    >>> bool(((out == 0) | (out == 1)).all())
    True
    ```
    """
    return _fold("random_mix", task_vectors, seed=seed)


#: The pure merge functions by name: `list[Tensor] -> Tensor` (the merged, unscaled task vector).
MERGE_METHODS: dict[str, Callable[..., Tensor]] = {
    "magmax": magmax,
    "average": average,
    "task_arithmetic": task_arithmetic,
    "ties": ties,
    "random_mix": random_mix,
}


# --------------------------------------------------------------------------------------------------------------------
# State-dict level
# --------------------------------------------------------------------------------------------------------------------


class StateDictMerger:
    """Online merge of whole task vectors (dicts name → tensor): one [`OnlineMerge`] per floating tensor.

    Memory is the running state (one tensor set for `magmax`, `random_mix` and the sums; four for `ties`),
    independent of the number of tasks. This is what the Trainer folds each task into.

    Args:
        method (`str`, *optional*, defaults to `"magmax"`):
            One of [`MERGE_METHODS`].
        device (`str` or `torch.device`, *optional*, defaults to `"cpu"`):
            Where the running state lives.
        **method_kwargs:
            `density` for `ties`, `seed` for `random_mix`. For `random_mix`, each tensor gets its own generator
            seeded with `seed + its position in the first task vector`.

    Example:

    ```python
    >>> import torch
    >>> from hf_magmax import StateDictMerger
    >>> merger = StateDictMerger("magmax")
    >>> merger.update({"w": torch.tensor([1.0, -3.0])})
    >>> merger.update({"w": torch.tensor([-2.0, 1.0])})
    >>> merger.result()["w"]
    tensor([-2., -3.])
    ```
    """

    def __init__(self, method: str = "magmax", device: str | torch.device = "cpu", **method_kwargs) -> None:
        self.method = check_merge_method(method)
        self.method_kwargs = _method_kwargs(self.method, method_kwargs)
        self.device = torch.device(device)
        self.accumulators: dict[str, OnlineMerge] = {}
        self.num_tasks = 0

    def _new_accumulator(self, position: int) -> OnlineMerge:
        kwargs = dict(self.method_kwargs)
        if self.method == "random_mix":
            kwargs["seed"] = int(kwargs.get("seed", 0)) + position
        return make_online_merge(self.method, **kwargs)

    @torch.no_grad()
    def update(self, task_vector: Mapping[str, Tensor]) -> None:
        """Fold one task vector (name → floating tensor) in. Every task vector must have the same names."""
        if self.num_tasks == 0:
            self.accumulators = {name: self._new_accumulator(i) for i, name in enumerate(task_vector)}
        else:
            missing = set(self.accumulators) - set(task_vector)
            extra = set(task_vector) - set(self.accumulators)
            if missing or extra:
                raise KeyError(
                    f"task vector {self.num_tasks} does not cover the same tensors as the earlier ones "
                    f"(missing: {sorted(missing)[:5]}, unexpected: {sorted(extra)[:5]})."
                )
        for name, tensor in task_vector.items():
            self.accumulators[name].update(tensor.detach().to(self.device))
        self.num_tasks += 1

    @torch.no_grad()
    def result(self) -> dict[str, Tensor]:
        """The merged task vector (unscaled), name → tensor."""
        if self.num_tasks == 0:
            raise ValueError("no task vector has been folded in yet: call `update` at least once before `result`.")
        return {name: acc.result() for name, acc in self.accumulators.items()}

    def state_dict(self) -> dict[str, object]:
        return {
            "method": self.method,
            "method_kwargs": dict(self.method_kwargs),
            "num_tasks": self.num_tasks,
            "accumulators": {name: acc.state_dict() for name, acc in self.accumulators.items()},
        }

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        if state["method"] != self.method:
            raise ValueError(f"cannot load a `{state['method']}` merge state into a `{self.method}` merger.")
        self.num_tasks = int(state["num_tasks"])
        self.accumulators = {}
        for i, (name, acc_state) in enumerate(state["accumulators"].items()):
            acc = self._new_accumulator(i)
            acc.load_state_dict(acc_state)
            self.accumulators[name] = acc


def merge_task_vectors(
    task_vectors: Sequence[Mapping[str, Tensor]] | Sequence[Tensor],
    method: str = "magmax",
    scaling_coef: float | None = None,
    **method_kwargs,
):
    """Merge task vectors with `method` and scale the result by `scaling_coef`.

    Args:
        task_vectors (`list[TaskVector]`, `list[dict[str, torch.Tensor]]` or `list[torch.Tensor]`):
            Task vectors in task order (for MagMax, ties go to the later task).
        method (`str`, *optional*, defaults to `"magmax"`):
            One of `magmax`, `average`, `task_arithmetic`, `ties`, `random_mix`.
        scaling_coef (`float`, *optional*):
            λ. Defaults to the method's default ([`DEFAULT_SCALING_COEFS`]): 0.5 for `magmax` and `random_mix`,
            1.0 for `average` and `ties`, 0.3 for `task_arithmetic`.
        **method_kwargs:
            `density` for `ties` (defaults to 0.2), `seed` for `random_mix` (defaults to 0).

    Returns:
        The scaled merged task vector `λ · merge(τ_1..τ_T)`, of the same kind as the inputs ([`TaskVector`] for
        task vectors or dicts, a tensor for tensors). Apply it with `TaskVector.apply_to(base_state_dict)`.

    Example:

    ```python
    >>> import torch
    >>> from hf_magmax import TaskVector, merge_task_vectors
    >>> base = {"w": torch.zeros(2)}
    >>> tv1 = TaskVector.from_state_dicts(base, {"w": torch.tensor([1.0, -3.0])})
    >>> tv2 = TaskVector.from_state_dicts(base, {"w": torch.tensor([-2.0, 1.0])})
    >>> merge_task_vectors([tv1, tv2], method="magmax")["w"]  # 0.5 * [-2, -3]
    tensor([-1.0000, -1.5000])
    ```
    """
    method = check_merge_method(method)
    method_kwargs = _method_kwargs(method, method_kwargs)
    if method == "ties":
        check_density(method_kwargs.get("density", 0.2))
    if len(task_vectors) == 0:
        raise ValueError("`task_vectors` is empty: pass at least one task vector to merge.")
    coef = default_scaling_coef(method) if scaling_coef is None else float(scaling_coef)

    if isinstance(task_vectors[0], Tensor):
        merged = MERGE_METHODS[method](list(task_vectors), **method_kwargs)
        return _scale(merged, coef)

    from .task_vectors import TaskVector

    names = list(task_vectors[0].keys())
    for i, tv in enumerate(task_vectors[1:], start=1):
        if set(tv.keys()) != set(names):
            missing = sorted(set(names) - set(tv.keys()))[:5]
            extra = sorted(set(tv.keys()) - set(names))[:5]
            raise KeyError(
                f"`task_vectors[{i}]` has other tensors than `task_vectors[0]` (missing: {missing}, extra: {extra})."
            )
    merged: dict[str, Tensor] = {}
    for position, name in enumerate(names):
        kwargs = dict(method_kwargs)
        if method == "random_mix":  # same per-tensor seeding as StateDictMerger, so both agree
            kwargs["seed"] = int(kwargs.get("seed", 0)) + position
        merged[name] = _scale(MERGE_METHODS[method]([tv[name] for tv in task_vectors], **kwargs), coef)
    return TaskVector(merged)


def _scale(tensor: Tensor, coef: float) -> Tensor:
    return (tensor.to(_compute_dtype(tensor.dtype)) * coef).to(tensor.dtype)
