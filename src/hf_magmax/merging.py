# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""The merge core: the MagMax rule, the baselines, and every fact about a merge method.

This module is the single place that holds the merge methods. Every other part of hf_magmax (the streaming
checkpoint merge, the LoRA merger, the Trainer, the λ search, the CLI) asks it:

- **A method is a class** ([`OnlineMerge`] subclass) that carries its facts: its `method` name, its
  `default_scaling_coef`, its `options` and their defaults, whether it needs a whole-tensor statistic before it can
  fold row blocks (`needs_tensor_stats`, TIES' trim threshold), and whether it draws random numbers per tensor
  (`seeded_per_tensor`, random_mix, seeded by the tensor's *name* and the element's position so that every consumer,
  in blocks or in shards, draws the same choices). An instance is an online accumulator: it folds the task vectors of
  one tensor in, one at a time, with memory independent of the number of tasks.
- **[`MergeSpec`]** is the one validated description of a merge (method, λ, density, seed) that every consumer
  builds, with one policy: λ finite and > 0 (or `"auto"`), options only for the method that takes them.
- **[`apply_merged`]** is THE arithmetic of the merged model, `θ_0 + λ · merged`: math in fp32 for half-precision
  inputs (fp64 for fp64), one cast to the output dtype at the end.
- **Pure functions** `list[Tensor] -> Tensor` (the PEFT convention), [`magmax`], [`average`], [`task_arithmetic`],
  [`ties`], [`random_mix`], are folds of the accumulators, so the batch and the online results are the same bits.

Task vectors `τ_t = θ_t − θ_0` are always relative to the pretrained θ_0 and computed in fp32 for half-precision
weights ([`hf_magmax.task_vectors.subtract`]). Importing this module does not import torch (the console script reads
the method names and defaults from here); torch is imported when a tensor is first touched.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from ._merge_kernels import (  # noqa: F401  (the CPU fast paths; tests import some from here)
    _MASK32,
    _RADIX_MIN_NUMEL,
    _bitwise_fold_ok,
    _kth_largest_magnitude,
    _mix32,
    add_widened,
    fold_magmax_bits,
    fold_ties_pieces,
)


if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import Tensor


__all__ = [
    "DEFAULT_SCALING_COEFS",
    "MERGE_METHODS",
    "ONLINE_MERGES",
    "AverageMerge",
    "MagMaxMerge",
    "MergeSpec",
    "OnlineMerge",
    "RandomMixMerge",
    "StateDictMerger",
    "TaskArithmeticMerge",
    "TiesMerge",
    "apply_merged",
    "average",
    "check_density",
    "check_merge_method",
    "check_scaling_coef",
    "compute_dtype",
    "default_scaling_coef",
    "magmax",
    "make_online_merge",
    "merge_task_vectors",
    "random_mix",
    "task_arithmetic",
    "ties",
    "ties_trim_threshold",
]


def _no_grad(fn: Callable) -> Callable:
    """`torch.no_grad()` as a decorator that imports torch only when the function runs."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype merge math runs in: fp64 for fp64, fp32 for everything else (fp32, fp16, bf16, fp8)."""
    import torch

    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_same_shape(tensors: Sequence[Tensor], name: str = "task_vectors") -> None:
    if len(tensors) == 0:
        raise ValueError(f"`{name}` is empty: pass at least one task vector to merge.")
    first = tensors[0]
    for i, t in enumerate(tensors):
        if not t.is_floating_point():
            raise TypeError(f"`{name}[{i}]` has dtype {t.dtype}; task vectors must be floating point.")
        if t.shape != first.shape:
            raise ValueError(
                f"`{name}[{i}]` has shape {tuple(t.shape)} but `{name}[0]` has shape {tuple(first.shape)}: "
                "all task vectors of one parameter must have the same shape."
            )


# --------------------------------------------------------------------------------------------------------------------
# Validation of the options (one policy for the Trainer, the CLI, the LoRA merger and the Python API)
# --------------------------------------------------------------------------------------------------------------------


def check_merge_method(method: str) -> str:
    """Return `method` if it names a merge method, else raise an error that lists the valid names."""
    if method not in ONLINE_MERGES:
        raise ValueError(f"unknown merge method {method!r}: choose one of {', '.join(sorted(ONLINE_MERGES))}.")
    return method


def check_scaling_coef(scaling_coef: Any, allow_auto: bool = True) -> float | str:
    """Validate λ: a finite number > 0 (numbers given as strings, e.g. from YAML, are parsed), or `"auto"`."""
    value = scaling_coef
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto" and allow_auto:
            return "auto"
        try:
            value = float(text)
        except ValueError:
            hint = ' or "auto" (choose λ on validation data)' if allow_auto else ""
            raise ValueError(f"`scaling_coef` must be a number > 0{hint}, got {scaling_coef!r}.") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(
            f"`scaling_coef` must be a finite number > 0, got {scaling_coef!r} of type {type(scaling_coef).__name__}."
        )
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"`scaling_coef` must be a finite number > 0 (λ = 0 is θ_0 itself), got {scaling_coef!r}. "
            "MagMax uses 0.5; leave it unset for the method's default."
        )
    return value


def check_density(density: Any) -> float:
    """Validate TIES' `density` (fraction of each task vector kept), which must lie in (0, 1]."""
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < float(density) <= 1.0:
        raise ValueError(f"`density` must be a number in (0, 1], got {density!r}. TIES' published default is 0.2.")
    return float(density)


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"`seed` must be a non-negative integer, got {seed!r}.")
    return int(seed)


_OPTION_CHECKS: dict[str, Callable[[Any], Any]] = {"density": check_density, "seed": _check_seed}


# --------------------------------------------------------------------------------------------------------------------
# The methods: online accumulators that carry their facts
# --------------------------------------------------------------------------------------------------------------------


class OnlineMerge:
    """A merge method, and its online accumulator: fold the task vectors of one tensor in, one at a time.

    The class attributes are the method's facts, read by every consumer:

    - `method`: the name (`"magmax"`, ...); `description`: one line for model cards;
    - `default_scaling_coef`: λ when the user sets none;
    - `options`: the options the method takes and their defaults (`{"density": 0.2}` for TIES);
    - `needs_tensor_stats`: the method needs one statistic of each *whole* task vector ([`tensor_stat`]) before it
      can fold row blocks or shards of the tensor independently (TIES' trim threshold); all methods fold blocks;
    - `seeded_per_tensor`: the method draws random numbers, seeded by the tensor's name and the element's position;
    - `can_track_winners`: the method keeps one task's value per element and can record which (`track_winners=True`,
      `winners()`): MagMax and random mix.

    Memory is a fixed number of tensors of the parameter's shape, independent of how many task vectors are folded.
    `state_dict`/`load_state_dict` make the running state checkpointable (the Trainer saves it with each checkpoint).

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

    method: ClassVar[str] = ""
    description: ClassVar[str] = ""
    default_scaling_coef: ClassVar[float] = 1.0
    options: ClassVar[dict[str, Any]] = {}
    needs_tensor_stats: ClassVar[bool] = False
    seeded_per_tensor: ClassVar[bool] = False
    can_track_winners: ClassVar[bool] = False

    def __init__(self) -> None:
        self.num_tasks = 0
        self._dtype: torch.dtype | None = None
        self._shape: torch.Size | None = None

    @classmethod
    def tensor_stat(cls, task_vector: Tensor, **options: Any) -> Any:
        """The statistic of one whole task vector that `needs_tensor_stats` methods need first (None for others)."""
        return None

    @_no_grad
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
        self._update(task_vector.detach())
        self.num_tasks += 1

    @_no_grad
    def result(self) -> Tensor:
        """The merged task vector (unscaled), a new tensor in the dtype of the first task vector folded in."""
        if self.num_tasks == 0:
            raise ValueError("no task vector has been folded in yet: call `update` at least once before `result`.")
        out = self._result()
        return out.to(self._dtype) if out.dtype != self._dtype else out

    def _update(self, task_vector: Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _result(self) -> Tensor:  # pragma: no cover - abstract
        """A new tensor (never the running state itself)."""
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
        import torch

        if state.get("method", self.method) != self.method:
            raise ValueError(f"cannot load a `{state['method']}` merge state into a `{self.method}` accumulator.")
        self.num_tasks = int(state["num_tasks"])
        if self.num_tasks:
            tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
            for key, value in tensors.items():
                setattr(self, key, value.clone())
            self._dtype = getattr(torch, str(state["dtype"]))
            self._shape = next(iter(tensors.values())).shape


class _SelectsOneTask(OnlineMerge):
    """Shared by the methods that keep, per element, one task's value (MagMax, random mix): the running selection and,
    with `track_winners=True`, the index of the task it came from (the provenance of every element)."""

    can_track_winners = True

    def __init__(self, track_winners: bool = False) -> None:
        super().__init__()
        self.track_winners = bool(track_winners)

    def _start(self, task_vector: Tensor) -> None:
        import torch

        self.selected = task_vector.clone(memory_format=torch.contiguous_format)
        if self.track_winners:
            self._winners = torch.zeros(task_vector.shape, dtype=torch.uint8, device=task_vector.device)

    def _winners_for_next_task(self) -> Tensor:
        """The winner map, widened when the next task's index no longer fits its dtype (uint8, then int16)."""
        import torch

        if self.num_tasks == 256:
            self._winners = self._winners.to(torch.int16)
        elif self.num_tasks == 2**15:
            self._winners = self._winners.to(torch.int32)
        return self._winners

    def winners(self) -> Tensor:
        """Per element, the 0-based index (in fold order) of the task whose value the merge kept.

        `uint8` while at most 256 tasks were folded in, then `int16` (`int32` beyond 32768 tasks); a new tensor of the
        parameter's shape. Needs `track_winners=True`.
        """
        if not self.track_winners:
            raise ValueError(
                f"this `{self.method}` accumulator does not track winners: create it with `track_winners=True` "
                "(`spec.accumulator(name, track_winners=True)`)."
            )
        if self.num_tasks == 0:
            raise ValueError("no task vector has been folded in yet: call `update` at least once before `winners`.")
        return self._winners.clone()

    def _result(self) -> Tensor:
        return self.selected.clone()

    def _state_tensors(self) -> dict[str, Tensor]:
        state = {"selected": self.selected}
        if self.track_winners:
            state["winners"] = self._winners
        return state

    def load_state_dict(self, state: Mapping[str, Tensor | int | str]) -> None:
        if self.track_winners and int(state["num_tasks"]) and "winners" not in state:
            raise ValueError(
                f"cannot resume a `{self.method}` accumulator with `track_winners=True` from a state saved without "
                "winners: create it with `track_winners=False`, or restart the merge."
            )
        state = dict(state)
        winners = state.pop("winners", None)
        super().load_state_dict(state)
        if winners is not None:
            self.track_winners = True
            self._winners = winners.clone()


class MagMaxMerge(_SelectsOneTask):
    """MagMax (Marczak et al., ECCV 2024): per element keep the task vector value with the largest `|τ|`, sign kept.

    Ties go to the later task (`>=`). The state is one tensor, in the input dtype: selection never does arithmetic,
    so every output element is bit-identical to one input element. The selection is associative, so folding one task
    at a time equals selecting over all of them at once. On CPU the fold compares and selects on the bit patterns
    (integer operations, in cache-sized pieces); elsewhere with `torch.where`; both give the same bits.

    Args:
        track_winners (`bool`, *optional*, defaults to `False`):
            Also keep, per element, the index of the winning task ([`winners`]): one `uint8` tensor (`int16` beyond
            256 tasks) of the parameter's shape, saved by `state_dict`.
    """

    method = "magmax"
    description = "MagMax: per element, the task vector with the largest magnitude (sign kept)"
    default_scaling_coef = 0.5  # the value used throughout the MagMax paper

    def _update(self, task_vector: Tensor) -> None:
        import torch

        if self.num_tasks == 0:
            self._start(task_vector)
            return
        task_vector = task_vector.to(device=self.selected.device, dtype=self.selected.dtype)
        winners = self._winners_for_next_task() if self.track_winners else None
        if _bitwise_fold_ok(self.selected, task_vector):
            fold_magmax_bits(self.selected, task_vector, winners, self.num_tasks)
            return
        take = task_vector.abs() >= self.selected.abs()  # ties (>=) go to the later task
        self.selected = torch.where(take, task_vector, self.selected)
        if winners is not None:
            winners.masked_fill_(take, self.num_tasks)


class TaskArithmeticMerge(OnlineMerge):
    """Task arithmetic (Ilharco et al., ICLR 2023): the sum of the task vectors, accumulated in fp32 for half inputs."""

    method = "task_arithmetic"
    description = "task arithmetic: the sum of the task vectors"
    default_scaling_coef = 0.3  # the usual default for a sum of several task vectors (Ilharco et al.; FusionBench)

    def _update(self, task_vector: Tensor) -> None:
        if self.num_tasks == 0:
            self.total = task_vector.to(compute_dtype(task_vector.dtype), copy=True)
            return
        add_widened(self.total, task_vector.to(device=self.total.device))

    def _result(self) -> Tensor:
        return self.total.clone()

    def _state_tensors(self) -> dict[str, Tensor]:
        return {"total": self.total}


class AverageMerge(TaskArithmeticMerge):
    """The mean of the task vectors; with `scaling_coef=1` the merged model is the plain weight average."""

    method = "average"
    description = "the mean of the task vectors (λ = 1: the weight average)"
    default_scaling_coef = 1.0

    def _result(self) -> Tensor:
        return self.total / self.num_tasks


class TiesMerge(OnlineMerge):
    """TIES-merging (Yadav et al., NeurIPS 2023), computed online.

    1. *Trim*: each task vector keeps its top-`density` fraction of elements by magnitude (per tensor, as PEFT and
       mergekit do; elements equal to the threshold are kept), the rest become 0.
    2. *Elect*: per element, the sign of the total trimmed mass `Σ_t trimmed_t`.
    3. *Disjoint mean*: the mean of the trimmed values that agree with the elected sign (zeros excluded).

    The online form keeps four tensors: the sums and counts of positive and negative trimmed values. The elected sign
    is `sign(pos_sum + neg_sum)` and the disjoint mean `pos_sum / pos_count` or `neg_sum / neg_count`.

    Args:
        density (`float`, *optional*, defaults to `0.2`):
            Fraction of each task vector's elements kept by magnitude, in (0, 1]. 0.2 is TIES' published default.
        thresholds (`list[float | None]`, *optional*):
            The trim threshold of each task vector, in task order, as [`ties_trim_threshold`] computes it on the
            *whole* tensor ([`tensor_stat`]). With them, task vectors may be folded in slices (the streaming merge
            goes through a tensor in row blocks) and the result equals the whole-tensor merge bit for bit.
    """

    method = "ties"
    description = "TIES-merging: trim to the top-density magnitudes, elect the sign by mass, disjoint mean"
    default_scaling_coef = 1.0  # the disjoint mean is already on the scale of one task vector
    options = {"density": 0.2}
    needs_tensor_stats = True

    def __init__(self, density: float = 0.2, thresholds: Sequence[float | None] | None = None) -> None:
        super().__init__()
        self.density = check_density(density)
        self.thresholds = None if thresholds is None else list(thresholds)

    @classmethod
    def tensor_stat(cls, task_vector: Tensor, density: float = 0.2) -> float | None:
        return ties_trim_threshold(task_vector, density)

    def _threshold(self, task_vector: Tensor) -> float | None:
        """This task vector's trim threshold: the given one (whole-tensor, for slices), or computed here."""
        if self.thresholds is None:
            return ties_trim_threshold(task_vector, self.density)
        if self.num_tasks >= len(self.thresholds):
            raise ValueError(f"`thresholds` holds {len(self.thresholds)} values, but more task vectors came in.")
        return self.thresholds[self.num_tasks]

    def _update(self, task_vector: Tensor) -> None:
        import torch

        compute = compute_dtype(task_vector.dtype)
        threshold = self._threshold(task_vector)
        if self.num_tasks == 0:
            zeros = torch.zeros(task_vector.shape, dtype=compute, device=task_vector.device)
            self.pos_sum, self.neg_sum = zeros.clone(), zeros.clone()
            self.pos_count, self.neg_count = zeros.clone(), zeros.clone()
        task_vector = task_vector.to(self.pos_sum.device)
        on_cpu = self.pos_sum.device.type == "cpu" and self.pos_sum.dtype == compute
        if on_cpu and task_vector.is_contiguous() and all(t.is_contiguous() for t in self._state_tensors().values()):
            fold_ties_pieces((self.pos_sum, self.neg_sum, self.pos_count, self.neg_count), task_vector, threshold)
            return
        tv = task_vector.to(compute)
        # keep everything at least as large as the threshold (ties at the threshold are kept)
        trimmed = tv if threshold is None else torch.where(tv.abs() >= threshold, tv, torch.zeros_like(tv))
        positive, negative = trimmed > 0, trimmed < 0
        self.pos_sum.add_(torch.where(positive, trimmed, 0.0))
        self.neg_sum.add_(torch.where(negative, trimmed, 0.0))
        self.pos_count.add_(positive.to(self.pos_count.dtype))
        self.neg_count.add_(negative.to(self.neg_count.dtype))

    def _result(self) -> Tensor:
        import torch

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


class RandomMixMerge(_SelectsOneTask):
    """Random mixing (the MagMax paper's baseline): per element, the value of one task chosen uniformly at random.

    Computed online by reservoir sampling: the t-th task vector (1-based) replaces each element with probability
    `1/t`, which leaves every task equally likely. The draw of element `i` (its position in the flattened tensor) for
    task `t` is a counter-based hash of `(seed, name, t, i)`: it depends on nothing else, so a tensor folded whole,
    in row blocks, or as one rank's shard (pass the block's first element as `offset`) draws the same choices, and
    every consumer that names the tensor the same way gets the same merge.

    Args:
        seed (`int`, *optional*, defaults to `0`):
            Seed of the random choice.
        name (`str`, *optional*, defaults to `""`):
            The tensor's name (state-dict key); each tensor gets its own stream.
        offset (`int`, *optional*, defaults to `0`):
            Position, in the flattened whole tensor, of the first element of the slices folded in.
        track_winners (`bool`, *optional*, defaults to `False`):
            Also keep, per element, the index of the task drawn ([`winners`]), as [`MagMaxMerge`] does.
    """

    method = "random_mix"
    description = "random mixing: per element, one task's value chosen uniformly at random"
    default_scaling_coef = 0.5  # like MagMax, it selects one task's value per element
    options = {"seed": 0}
    seeded_per_tensor = True

    def __init__(self, seed: int = 0, name: str = "", offset: int = 0, track_winners: bool = False) -> None:
        super().__init__(track_winners)
        self.seed, self.name, self.offset = _check_seed(seed), str(name), int(offset)
        self._key = _mix32(_mix32(self.seed & _MASK32) ^ (self.seed >> 32) ^ zlib.crc32(self.name.encode("utf-8")))

    def _replace(self, shape: torch.Size, device: torch.device) -> Tensor:
        """True where task number `num_tasks` (0-based) replaces the reservoir: with probability 1/(num_tasks + 1)."""
        import torch

        numel = math.prod(shape)
        index = torch.arange(self.offset, self.offset + numel, dtype=torch.int64, device=device)
        task_key = _mix32(self._key ^ self.num_tasks)
        h = _mix32(_mix32((index & _MASK32) ^ task_key) ^ (index >> 32))  # uniform on [0, 2**32)
        return (h * (self.num_tasks + 1) < 2**32).view(shape)  # exact integer test of u < 1 / (t + 1)

    def _update(self, task_vector: Tensor) -> None:
        import torch

        if self.num_tasks == 0:
            self._start(task_vector)
            return
        task_vector = task_vector.to(device=self.selected.device, dtype=self.selected.dtype)
        replace = self._replace(task_vector.shape, self.selected.device)
        self.selected = torch.where(replace, task_vector, self.selected)
        if self.track_winners:
            self._winners_for_next_task().masked_fill_(replace, self.num_tasks)


#: The merge methods (their classes), by name.
ONLINE_MERGES: dict[str, type[OnlineMerge]] = {
    cls.method: cls for cls in (MagMaxMerge, AverageMerge, TaskArithmeticMerge, TiesMerge, RandomMixMerge)
}

#: Default `scaling_coef` (λ) of every method, read from the method classes: the merged model is
#: `θ_0 + λ · merged_task_vector`. magmax 0.5 (the MagMax paper), average 1.0 (the weight average),
#: task_arithmetic 0.3 (Ilharco et al.), ties 1.0 (Yadav et al.), random_mix 0.5 (like MagMax).
DEFAULT_SCALING_COEFS: dict[str, float] = {name: cls.default_scaling_coef for name, cls in ONLINE_MERGES.items()}


def default_scaling_coef(method: str) -> float:
    """The default `scaling_coef` (λ) of `method`; see [`DEFAULT_SCALING_COEFS`]."""
    return ONLINE_MERGES[check_merge_method(method)].default_scaling_coef


def ties_trim_threshold(task_vector: Tensor, density: float) -> float | None:
    """TIES' trim threshold of one task vector: the k-th largest magnitude, k = int(density · numel).

    Returns `None` when nothing is trimmed (`density` 1) and `inf` when nothing is kept (k = 0). The value is exactly
    `|τ|.kthvalue(numel − k + 1)` on the fp32 magnitudes (fp64 for fp64; NaN counts as the largest magnitude), found
    without sorting for fp32, fp16 and bf16 tensors: a histogram select on the bit patterns of `|τ|` (see
    [`_kth_largest_magnitude`]), several times faster than `kthvalue` on large tensors.
    """
    import torch

    if density >= 1.0:
        return None
    numel = task_vector.numel()
    k = int(density * numel)
    if k == 0:
        return math.inf
    task_vector = task_vector.detach()
    if numel >= _RADIX_MIN_NUMEL and task_vector.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return _kth_largest_magnitude(task_vector, k)
    magnitudes = task_vector.to(compute_dtype(task_vector.dtype)).abs().flatten()
    return magnitudes.kthvalue(numel - k + 1).values.item()


# --------------------------------------------------------------------------------------------------------------------
# MergeSpec: one validated description of a merge, asked by every consumer
# --------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MergeSpec:
    """One merge, validated once: the method, λ, and the method's options.

    Every consumer (the Trainer, `hf-magmax merge`, the LoRA merger, the λ search, [`merge_task_vectors`]) builds one
    and asks it for accumulators, so the same spec gives the same merge everywhere.

    Args:
        method (`str`, *optional*, defaults to `"magmax"`):
            One of `magmax`, `average`, `task_arithmetic`, `ties`, `random_mix`.
        scaling_coef (`float` or `"auto"`, *optional*):
            λ, a finite number > 0. `None` (the default) means the method's default ([`DEFAULT_SCALING_COEFS`]);
            `"auto"` means a consumer chooses λ on validation data (see [`hf_magmax.scaling`]).
        density (`float`, *optional*):
            TIES only: fraction of each task vector kept, in (0, 1]; defaults to 0.2. An error for other methods.
        seed (`int`, *optional*):
            random_mix only: the seed; defaults to 0. An error for other methods.

    Example:

    ```python
    >>> from hf_magmax import MergeSpec
    >>> spec = MergeSpec("ties", density=0.3)
    >>> spec.coef, spec.method_options
    (1.0, {'density': 0.3})
    >>> MergeSpec("magmax", density=0.3)
    Traceback (most recent call last):
    ...
    ValueError: `density` only applies to `ties`, not to `magmax`: leave it unset.
    ```
    """

    method: str = "magmax"
    scaling_coef: float | str | None = None
    density: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        cls = ONLINE_MERGES.get(self.method)
        if cls is None:
            check_merge_method(self.method)
        if self.scaling_coef is not None:
            object.__setattr__(self, "scaling_coef", check_scaling_coef(self.scaling_coef))
        for option in _OPTION_CHECKS:
            value = getattr(self, option)
            if value is None:
                continue
            if option not in cls.options:
                takers = [name for name, c in ONLINE_MERGES.items() if option in c.options]
                raise ValueError(
                    f"`{option}` only applies to `{'`, `'.join(takers)}`, not to `{self.method}`: leave it unset."
                )
            object.__setattr__(self, option, _OPTION_CHECKS[option](value))

    # -- facts ---------------------------------------------------------------------------------------------------

    @property
    def merge_class(self) -> type[OnlineMerge]:
        """The method's class ([`OnlineMerge`] subclass), which carries its facts."""
        return ONLINE_MERGES[self.method]

    @property
    def is_auto(self) -> bool:
        """Whether λ is to be chosen on validation data (`scaling_coef="auto"`)."""
        return self.scaling_coef == "auto"

    @property
    def scaling_coef_is_default(self) -> bool:
        """Whether λ is the method's default (the user set none)."""
        return self.scaling_coef is None

    @property
    def coef(self) -> float:
        """λ as a number: the one set, or the method's default. Raises under `"auto"` until a λ is chosen."""
        if self.is_auto:
            raise ValueError(
                '`scaling_coef="auto"` has no value until λ is chosen on validation data: '
                "call `spec.with_scaling_coef(best)` with the chosen λ."
            )
        return self.merge_class.default_scaling_coef if self.scaling_coef is None else float(self.scaling_coef)

    @property
    def method_options(self) -> dict[str, Any]:
        """The method's options with their defaults filled in (`{}` for methods without options)."""
        options = {}
        for name, default in self.merge_class.options.items():
            value = getattr(self, name)
            options[name] = default if value is None else value
        return options

    def with_scaling_coef(self, scaling_coef: float | str | None) -> MergeSpec:
        """The same merge with another λ (e.g. the one an `"auto"` search chose)."""
        return dataclasses.replace(self, scaling_coef=scaling_coef)

    # -- use -----------------------------------------------------------------------------------------------------

    def accumulator(
        self, name: str = "", *, offset: int = 0, stats: Sequence[Any] | None = None, track_winners: bool = False
    ) -> OnlineMerge:
        """A fresh accumulator for the tensor `name`.

        Args:
            name (`str`, *optional*):
                The tensor's state-dict name: random_mix seeds its draws by it.
            offset (`int`, *optional*, defaults to `0`):
                Position of the first element folded in, in the flattened whole tensor (row blocks, shards).
            stats (`list`, *optional*):
                For `needs_tensor_stats` methods (ties): each task vector's [`OnlineMerge.tensor_stat`] over the whole
                tensor, in task order; needed when the task vectors are folded in slices.
            track_winners (`bool`, *optional*, defaults to `False`):
                Record, per element, which task's value was kept (`acc.winners()`); only for methods that keep one
                task's value per element (`can_track_winners`: magmax, random_mix).
        """
        if track_winners and not self.merge_class.can_track_winners:
            takers = [n for n, c in ONLINE_MERGES.items() if c.can_track_winners]
            raise ValueError(
                f"`track_winners` only applies to `{'`, `'.join(takers)}` (one task's value per element), not to "
                f"`{self.method}`: leave it unset."
            )
        options = self.method_options
        if self.method == "ties":
            return TiesMerge(options["density"], thresholds=stats)
        if self.method == "random_mix":
            return RandomMixMerge(options["seed"], name=name, offset=offset, track_winners=track_winners)
        if track_winners:
            return self.merge_class(track_winners=True)
        return self.merge_class()

    def tensor_stat(self, task_vector: Tensor) -> Any:
        """The whole-tensor statistic of one task vector that `needs_tensor_stats` methods need (see `accumulator`)."""
        return self.merge_class.tensor_stat(task_vector, **self.method_options)

    def describe(self) -> str:
        """One line for model cards and logs."""
        options = ", ".join(f"{k} {v}" for k, v in self.method_options.items())
        return self.merge_class.description + (f" ({options})" if options else "")

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain values (for `magmax_config.yaml`): λ is recorded as `null` when it is the default, so a
        re-run with another method takes that method's default."""
        out: dict[str, Any] = {"method": self.method, "scaling_coef": self.scaling_coef}
        out.update(self.method_options)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MergeSpec:
        """Inverse of [`to_dict`]; options of another method than `method` are ignored."""
        method = check_merge_method(data.get("method", "magmax"))
        options = {k: data.get(k) for k in _OPTION_CHECKS if k in ONLINE_MERGES[method].options}
        return cls(method, data.get("scaling_coef"), **options)


def make_online_merge(method: str = "magmax", **method_kwargs) -> OnlineMerge:
    """A fresh online accumulator of `method` (`density` for `ties`, `seed` for `random_mix`)."""
    return MergeSpec(method, **_checked_kwargs(method, method_kwargs)).accumulator()


def _checked_kwargs(method: str, method_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    allowed = ONLINE_MERGES[check_merge_method(method)].options
    unknown = set(method_kwargs) - set(allowed)
    if unknown:
        hint = f"`{method}` takes {', '.join(sorted(allowed))}" if allowed else f"`{method}` takes no options"
        raise TypeError(f"unexpected option(s) {', '.join(sorted(unknown))} for merge method `{method}`: {hint}.")
    return dict(method_kwargs)


def _spec(method: str | MergeSpec, scaling_coef: Any = None, method_kwargs: Mapping[str, Any] | None = None):
    if isinstance(method, MergeSpec):
        if method_kwargs:
            raise TypeError("pass the options on the `MergeSpec`, not as keyword arguments beside it.")
        return method if scaling_coef is None else method.with_scaling_coef(scaling_coef)
    return MergeSpec(method, scaling_coef, **_checked_kwargs(method, method_kwargs or {}))


# --------------------------------------------------------------------------------------------------------------------
# THE arithmetic of the merged model
# --------------------------------------------------------------------------------------------------------------------


@_no_grad
def apply_merged(theta_0: Tensor, merged: Tensor, scaling_coef: float, dtype: torch.dtype | None = None) -> Tensor:
    """`θ_0 + λ · merged` for one tensor: the one rounding rule of every consumer.

    The math runs in fp32 (fp64 if either input is fp64): `merged · λ`, then `+ θ_0`, then one cast to `dtype`
    (θ_0's dtype by default). Integer and bool tensors are not merged: callers take them from θ_0.

    Args:
        theta_0 (`torch.Tensor`): the base weights (floating).
        merged (`torch.Tensor`): the merged task vector (unscaled), same shape.
        scaling_coef (`float`): λ.
        dtype (`torch.dtype`, *optional*): the output dtype; defaults to θ_0's.

    Returns:
        `torch.Tensor`: a new tensor on θ_0's device.
    """
    import torch

    compute = torch.promote_types(compute_dtype(theta_0.dtype), compute_dtype(merged.dtype))
    out = merged.to(device=theta_0.device, dtype=compute)
    out = out.mul_(scaling_coef) if out is not merged else out * scaling_coef
    out.add_(theta_0.to(compute))
    target = theta_0.dtype if dtype is None else dtype
    return out if out.dtype == target else out.to(target)


# --------------------------------------------------------------------------------------------------------------------
# Pure functions: list[Tensor] -> Tensor (the merged, unscaled task vector), folds of the accumulators
# --------------------------------------------------------------------------------------------------------------------


def _fold(accumulator: OnlineMerge, task_vectors: Sequence[Tensor]) -> Tensor:
    _check_same_shape(task_vectors)
    for task_vector in task_vectors:
        accumulator.update(task_vector)
    return accumulator.result()


@_no_grad
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
    return _fold(MagMaxMerge(), task_vectors)


@_no_grad
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
    return _fold(AverageMerge(), task_vectors)


@_no_grad
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
    return _fold(TaskArithmeticMerge(), task_vectors)


@_no_grad
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
    return _fold(TiesMerge(density), task_vectors)


@_no_grad
def random_mix(task_vectors: Sequence[Tensor], seed: int = 0, name: str = "") -> Tensor:
    """Per element, the value of one task vector chosen uniformly at random (seeded); see [`RandomMixMerge`].

    Args:
        task_vectors (`list[torch.Tensor]`): task vectors of one parameter, same shape.
        seed (`int`, *optional*, defaults to `0`): the seed.
        name (`str`, *optional*, defaults to `""`): the tensor's name; merges of a state dict pass it, so that each
            tensor has its own draws and every consumer draws the same ones.

    Example:

    ```python
    >>> import torch
    >>> from hf_magmax import random_mix
    >>> out = random_mix([torch.zeros(4), torch.ones(4)], seed=0)
    >>> bool(((out == 0) | (out == 1)).all())
    True
    ```
    """
    return _fold(RandomMixMerge(seed, name=name), task_vectors)


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
    """Online merge of whole task vectors (dicts name → tensor): one accumulator per floating tensor.

    Memory is the running state (one tensor set for `magmax`, `random_mix` and the sums; four for `ties`),
    independent of the number of tasks. This is what the Trainer folds each task into.

    Args:
        method (`str` or [`MergeSpec`], *optional*, defaults to `"magmax"`):
            The merge method, or a whole spec.
        device (`str` or `torch.device`, *optional*, defaults to `"cpu"`):
            Where the running state lives.
        **method_kwargs:
            `density` for `ties`, `seed` for `random_mix` (when `method` is a name). random_mix seeds each tensor's
            draws by its name, as every other consumer does.

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

    def __init__(
        self, method: str | MergeSpec = "magmax", device: str | torch.device = "cpu", **method_kwargs
    ) -> None:
        import torch

        self.spec = _spec(method, None, method_kwargs)
        self.method = self.spec.method
        self.method_kwargs = self.spec.method_options
        self.device = torch.device(device)
        self.accumulators: dict[str, OnlineMerge] = {}
        self.num_tasks = 0

    @_no_grad
    def update(self, task_vector: Mapping[str, Tensor]) -> None:
        """Fold one task vector (name → floating tensor) in. Every task vector must have the same names."""
        if self.num_tasks == 0:
            self.accumulators = {name: self.spec.accumulator(name) for name in task_vector}
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

    @_no_grad
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
        for name, acc_state in state["accumulators"].items():
            acc = self.spec.accumulator(name)
            acc.load_state_dict(acc_state)
            self.accumulators[name] = acc


def merge_task_vectors(
    task_vectors: Sequence[Mapping[str, Tensor]] | Sequence[Tensor],
    method: str | MergeSpec = "magmax",
    scaling_coef: float | None = None,
    **method_kwargs,
):
    """Merge task vectors with `method` and scale the result by `scaling_coef`.

    Args:
        task_vectors (`list[TaskVector]`, `list[dict[str, torch.Tensor]]` or `list[torch.Tensor]`):
            Task vectors in task order (for MagMax, ties go to the later task).
        method (`str` or [`MergeSpec`], *optional*, defaults to `"magmax"`):
            One of `magmax`, `average`, `task_arithmetic`, `ties`, `random_mix`, or a whole spec.
        scaling_coef (`float`, *optional*):
            λ, finite and > 0. Defaults to the method's default ([`DEFAULT_SCALING_COEFS`]): 0.5 for `magmax` and
            `random_mix`, 1.0 for `average` and `ties`, 0.3 for `task_arithmetic`.
        **method_kwargs:
            `density` for `ties` (defaults to 0.2), `seed` for `random_mix` (defaults to 0).

    Returns:
        The scaled merged task vector `λ · merge(τ_1..τ_T)`, of the same kind as the inputs ([`TaskVector`] for
        task vectors or dicts, a tensor for tensors). Apply it with `TaskVector.apply_to(base_state_dict)`: the
        result is bit-identical to [`apply_merged`]`(θ_0, merge, λ)`, which every other door uses.

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
    spec = _spec(method, scaling_coef, method_kwargs)
    if len(task_vectors) == 0:
        raise ValueError("`task_vectors` is empty: pass at least one task vector to merge.")
    coef = spec.coef

    if not isinstance(task_vectors[0], Mapping):
        return _scale(_fold(spec.accumulator(), list(task_vectors)), coef)

    from .task_vectors import TaskVector

    names = list(task_vectors[0].keys())
    for i, tv in enumerate(task_vectors[1:], start=1):
        if set(tv.keys()) != set(names):
            missing = sorted(set(names) - set(tv.keys()))[:5]
            extra = sorted(set(tv.keys()) - set(names))[:5]
            raise KeyError(
                f"`task_vectors[{i}]` has other tensors than `task_vectors[0]` (missing: {missing}, extra: {extra})."
            )
    merged = {name: _scale(_fold(spec.accumulator(name), [tv[name] for tv in task_vectors]), coef) for name in names}
    return TaskVector(merged)


def _scale(tensor: Tensor, coef: float) -> Tensor:
    """`λ · merged` as [`apply_merged`] computes it (in the compute dtype), returned in the merged tensor's dtype."""
    return (tensor.to(compute_dtype(tensor.dtype)) * coef).to(tensor.dtype)
