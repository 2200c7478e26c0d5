# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""The merge methods: online accumulators ([`OnlineMerge`] subclasses) that carry each method's facts, and the
validation of their options. See [`hf_magmax.merging`] for the whole core."""

from __future__ import annotations

import functools
import math
import re
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from .kernels import (  # noqa: F401  (the CPU fast paths; tests import some from here)
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


def check_alpha(alpha: Any) -> float:
    """Validate OPCM's `alpha`, the share of the merged task vector's singular-value mass whose directions a new task
    vector is kept out of; it must lie in [0, 1)."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) < 1.0:
        raise ValueError(
            f"`alpha` must be a number in [0, 1), got {alpha!r}. OPCM's published (FusionBench) default is 0.5."
        )
    return float(alpha)


_OPTION_CHECKS: dict[str, Callable[[Any], Any]] = {"density": check_density, "seed": _check_seed, "alpha": check_alpha}


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
      can fold row blocks or shards of the tensor independently (TIES' trim threshold); every method but OPCM
      folds blocks;
    - `seeded_per_tensor`: the method draws random numbers, seeded by the tensor's name and the element's position;
    - `can_track_winners`: the method keeps one task's value per element and can record which (`track_winners=True`,
      `winners()`): MagMax and random mix;
    - `blockwise`: the tensor may be folded in row blocks or shards (each element's merge depends on that element
      and, with `needs_tensor_stats`, a whole-tensor statistic). False for OPCM, whose SVD needs the *whole* tensor:
      consumers fold it in one block, and sharded (FSDP2) weights are refused;
    - `needs_model_stats`: the merged task vector is rescaled by one factor computed from *every* tensor of the model
      (OPCM's norm-adaptive λ_t): consumers fold all tensors, then pass [`MergeSpec.model_scale`] of all the
      accumulators (or [`model_scale_from_stats`] of their [`model_stat`]s) to `result(model_scale=...)`;
    - `order_dependent`: reordering the tasks changes the merge beyond tie-breaking and random draws (OPCM projects
      each task vector against the merge of the tasks before it); `associative`: merges of parts of the task
      sequence combine into the merge of all of it (the running state is sums or maxima: MagMax, the sums, TIES;
      not random mix's reservoir, nor OPCM).

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
    blockwise: ClassVar[bool] = True
    needs_model_stats: ClassVar[bool] = False
    order_dependent: ClassVar[bool] = False
    associative: ClassVar[bool] = True

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
    def result(self, model_scale: float | None = None) -> Tensor:
        """The merged task vector (before λ), a new tensor in the dtype of the first task vector folded in.

        Args:
            model_scale (`float`, *optional*):
                `needs_model_stats` methods (OPCM) only: the model-wide factor of the merged task vector,
                [`MergeSpec.model_scale`] of all the model's accumulators. Defaults to this tensor's own factor (the
                tensor taken as the whole model). The result is `model_scale · merged`, in the compute dtype, then
                cast. Other methods ignore it.
        """
        if self.num_tasks == 0:
            raise ValueError("no task vector has been folded in yet: call `update` at least once before `result`.")
        out = self._result()
        if self.needs_model_stats:
            scale = type(self).model_scale_from_stats([self.model_stat()]) if model_scale is None else model_scale
            if scale != 1.0:
                out = out.mul_(scale)
        return out.to(self._dtype) if out.dtype != self._dtype else out

    def model_stat(self) -> Any:
        """`needs_model_stats` methods: this tensor's share of the model-wide statistic (None for others)."""
        return None

    @classmethod
    def model_scale_from_stats(cls, stats: Sequence[Any]) -> float:
        """`needs_model_stats` methods: the model-wide factor from every tensor's [`model_stat`] (1.0 for others)."""
        return 1.0

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
    def tensor_stat(
        cls, task_vector: Tensor, density: float = 0.2, reduce: Callable[[Tensor], Tensor] | None = None
    ) -> float | None:
        return ties_trim_threshold(task_vector, density, reduce=reduce)

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
    associative = False  # a reservoir: the draw of task t depends on t, the number of tasks before it

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


#: Names of 2-D tensors that are embedding tables, not linear maps: OPCM adds their task vectors unprojected, as
#: FusionBench does for every parameter that is not an `nn.Linear` weight.
_EMBEDDING_NAME = re.compile(r"(^|\.)([^.]*embed[^.]*|wte|wpe|shared)(\.|$)", re.IGNORECASE)


def opcm_projects(name: str, shape: Sequence[int]) -> bool:
    """Whether OPCM projects the task vectors of the tensor `name` of `shape`: 2-D weights of linear maps.

    FusionBench projects the weights of `nn.Linear` modules and adds every other parameter (biases, LayerNorm,
    embeddings, convolutions) unprojected. A state dict has no modules: here every 2-D tensor is projected except
    those whose name says embedding (a `.`-separated part containing `embed`, or GPT-2's `wte`/`wpe`, T5's `shared`).
    """
    return len(shape) == 2 and min(shape) > 0 and not _EMBEDDING_NAME.search(name)


def opcm_project(merged: Tensor, task_vector: Tensor, alpha: float) -> Tensor:
    """OPCM's projection of a new task vector against the merged task vector so far (one 2-D tensor).

    With the SVD `merged = U Σ Vᵀ` (singular values in decreasing order) and `P = Uᵀ τ V` the new task vector in
    that basis, OPCM removes from `P` (1) its diagonal, the component along every `u_i v_iᵀ`, and (2) the block
    `P[:k, :k]` among the top `k` singular directions, `k` the first index at which the cumulative share of
    singular-value mass `cumsum(σ) / sum(σ)` exceeds `alpha`. It returns `U P' Vᵀ`. This is FusionBench's
    `merge_linear_weights` (full SVD, `u @ P' @ v.T`); here it is computed as `τ − U_r E V_rᵀ` with the thin SVD
    (`E` the removed entries, which all lie in the first `r = min(m, n)` rows and columns), the same matrix in exact
    arithmetic without the `m × m` and `n × n` factors, and with `E` applied as its block and its diagonal (the rest of
    `P` is never formed). A wide matrix (`m < n`) is projected as its transpose
    (`svd(Aᵀ) = V Σ Uᵀ`, and the removed pattern is symmetric: the same matrix in exact arithmetic), because LAPACK's
    SVD of a tall matrix is about twice as fast as of a wide one. A zero `merged` has no singular subspace
    (FusionBench's result then depends on the basis LAPACK returns): the task vector is returned as is.

    Args:
        merged (`torch.Tensor`): the merged task vector so far, 2-D, in the compute dtype.
        task_vector (`torch.Tensor`): the new task vector, same shape and dtype.
        alpha (`float`): the share of singular-value mass, in [0, 1).

    Returns:
        `torch.Tensor`: the projected task vector, a new tensor.
    """
    import torch

    if merged.shape[0] < merged.shape[1]:  # wide: project the transpose (a tall SVD is ~2x faster)
        return opcm_project(merged.T, task_vector.T, alpha).T
    u, s, vh = torch.linalg.svd(merged, full_matrices=False)  # u: (m, r), s: (r,), vh: (r, n)
    total = s.sum()
    if not bool(total > 0):
        return task_vector.clone()
    split = int((s.cumsum(dim=0) / total > alpha).float().argmax())
    # the removed entries of P = Uᵀ τ V: its top-left (split, split) block and its diagonal; the rest of P is never
    # formed (U P' Vᵀ = U_k P_kk V_kᵀ + Σ_{i≥k} p_ii u_i v_iᵀ: half the matrix products of forming P and U P' Vᵀ)
    left = u.T @ task_vector  # (r, n): Uᵀ τ
    diagonal = (left * vh).sum(dim=1)  # (r,): p_ii = u_iᵀ τ v_i
    block = left[:split] @ vh[:split].T  # (k, k): P[:k, :k]
    out = task_vector - u[:, :split] @ (block @ vh[:split])
    return out.sub_((u[:, split:] * diagonal[split:]) @ vh[split:])


class OPCMMerge(OnlineMerge):
    """OPCM (Tang et al., "Merging Models on the Fly Without Retraining", NeurIPS 2025; FusionBench's `opcm`).

    Continual merging by orthogonal projection: the first task vector is the merge; every later one is first
    projected off the merged task vector's dominant singular subspace ([`opcm_project`], per 2-D weight of a linear
    map, see [`opcm_projects`]; other tensors are added unprojected), then added to the running sum `S`. The merged
    task vector is `S` rescaled to the mean norm of the task vectors seen, `model_scale · S` with
    `model_scale = mean_t ‖τ_t‖ / ‖S‖`, the norms taken over *the whole model* (every merged tensor): FusionBench's
    norm-adaptive λ_t. With λ = 1 (the default) the merged model is FusionBench's, `θ_0 + model_scale · S`.

    Facts the consumers read: OPCM is **order-dependent** (each task vector is projected against the merge of the
    ones before it: reversing the task order changes the result) and **not associative** (merges of parts of the
    sequence do not combine); it needs the **whole tensor** (`blockwise=False`: the SVD) and **the whole model**
    (`needs_model_stats`: the rescale). The state is the fp32 sum (fp64 for fp64) and one norm per task, so
    resuming from `state_dict` continues bit for bit. FusionBench shuffles the models by default
    (`shuffle_order=True`); here they are merged in the order given. The SVD runs in the compute dtype on the
    accumulator's device (FusionBench: the fabric's device).

    Args:
        alpha (`float`, *optional*, defaults to `0.5`):
            Share of the merged task vector's singular-value mass (`cumsum(σ) / sum(σ)`) whose directions a new
            task vector is kept out of, in [0, 1). 0.5 is FusionBench's default (`config/method/opcm/opcm.yaml`).
        name (`str`, *optional*, defaults to `""`):
            The tensor's name: embedding tables (by name) are not projected.
    """

    method = "opcm"
    description = (
        "OPCM: each task vector projected off the merge's top singular subspace, the sum rescaled to the mean "
        "task-vector norm"
    )
    default_scaling_coef = 1.0  # OPCM's own λ_t (the model-wide rescale) replaces λ: λ = 1 is FusionBench's merge
    options = {"alpha": 0.5}
    blockwise = False
    needs_model_stats = True
    order_dependent = True
    associative = False

    def __init__(self, alpha: float = 0.5, name: str = "") -> None:
        super().__init__()
        self.alpha = check_alpha(alpha)
        self.name = str(name)

    @property
    def projects(self) -> bool:
        """Whether this tensor's task vectors are projected ([`opcm_projects`])."""
        return self._shape is not None and opcm_projects(self.name, tuple(self._shape))

    def _update(self, task_vector: Tensor) -> None:
        import torch

        tau = task_vector.to(compute_dtype(task_vector.dtype))
        norm = torch.linalg.vector_norm(tau, dtype=torch.float64).reshape(1).cpu()
        if self.num_tasks == 0:
            self.total = tau.clone(memory_format=torch.contiguous_format)
            self.task_norms = norm
            return
        tau = tau.to(self.total.device)
        if self.projects:
            try:
                tau = opcm_project(self.total, tau, self.alpha)
            except torch.linalg.LinAlgError as err:  # a NaN/Inf in the merge so far (`allow_non_finite`): no SVD
                finite = bool(torch.isfinite(self.total).all())
                reason = "it did not converge" if finite else "the merge so far holds NaN or Inf values"
                raise ValueError(
                    f"opcm cannot project task vector {self.num_tasks + 1} of tensor {self.name!r}: the SVD of the "
                    f"merge of the tasks before it failed ({reason}; {' '.join(str(err).split())[:120]}). Fix the "
                    "input that holds NaN/Inf, or merge with another method (`allow_non_finite` cannot apply to "
                    "opcm's projection)."
                ) from None
        self.total.add_(tau)
        self.task_norms = torch.cat([self.task_norms, norm])

    def _result(self) -> Tensor:
        return self.total.clone()

    def model_stat(self) -> tuple[list[float], float]:
        """This tensor's part of the model-wide norms: `(‖τ_t‖ of every task t, ‖S‖)`, over this tensor."""
        import torch

        merged = float(torch.linalg.vector_norm(self.total, dtype=torch.float64))
        return [float(n) for n in self.task_norms.tolist()], merged

    @classmethod
    def model_scale_from_stats(cls, stats: Sequence[tuple[Sequence[float], float]]) -> float:
        """`mean_t ‖τ_t‖ / ‖S‖` over the whole model, from every tensor's [`model_stat`] (in any order: the sums are
        exactly rounded, `math.fsum`). 1.0 when the merged task vector is zero."""
        stats = list(stats)
        if not stats:
            return 1.0
        num_tasks = len(stats[0][0])
        task_norms = [math.sqrt(math.fsum(s[0][t] ** 2 for s in stats)) for t in range(num_tasks)]
        merged = math.sqrt(math.fsum(s[1] ** 2 for s in stats))
        if num_tasks == 0 or not merged > 0:
            return 1.0
        return (math.fsum(task_norms) / num_tasks) / merged

    def _state_tensors(self) -> dict[str, Tensor]:
        return {"total": self.total, "task_norms": self.task_norms}

    def load_state_dict(self, state: Mapping[str, Tensor | int | str]) -> None:
        super().load_state_dict(state)
        if self.num_tasks:
            self._shape = self.total.shape


#: The merge methods (their classes), by name.
ONLINE_MERGES: dict[str, type[OnlineMerge]] = {
    cls.method: cls for cls in (MagMaxMerge, AverageMerge, TaskArithmeticMerge, TiesMerge, RandomMixMerge, OPCMMerge)
}

#: Default `scaling_coef` (λ) of every method, read from the method classes: the merged model is
#: `θ_0 + λ · merged_task_vector`. magmax 0.5 (the MagMax paper), average 1.0 (the weight average),
#: task_arithmetic 0.3 (Ilharco et al.), ties 1.0 (Yadav et al.), random_mix 0.5 (like MagMax), opcm 1.0 (its own
#: norm-adaptive rescale is the λ of the paper; λ = 1 is FusionBench's merge).
DEFAULT_SCALING_COEFS: dict[str, float] = {name: cls.default_scaling_coef for name, cls in ONLINE_MERGES.items()}


def default_scaling_coef(method: str) -> float:
    """The default `scaling_coef` (λ) of `method`; see [`DEFAULT_SCALING_COEFS`]."""
    return ONLINE_MERGES[check_merge_method(method)].default_scaling_coef


def ties_trim_threshold(
    task_vector: Tensor, density: float, reduce: Callable[[Tensor], Tensor] | None = None
) -> float | None:
    """TIES' trim threshold of one task vector: the k-th largest magnitude, k = int(density · numel).

    Returns `None` when nothing is trimmed (`density` 1) and `inf` when nothing is kept (k = 0). The value is exactly
    `|τ|.kthvalue(numel − k + 1)` on the fp32 magnitudes (fp64 for fp64; NaN counts as the largest magnitude), found
    without sorting for fp32, fp16 and bf16 tensors: a histogram select on the bit patterns of `|τ|` (see
    [`_kth_largest_magnitude`]), several times faster than `kthvalue` on large tensors.

    `reduce` is for a task vector split over processes (FSDP2 shards): a function that sums an integer tensor over
    the processes holding the parts (e.g. `dist.all_reduce` over the shard group, returning its argument). Then
    `task_vector` is this process's part, `numel` the sum of the parts' sizes, every histogram is summed with it, and
    each process gets the whole tensor's threshold, bit for bit what one process computes on the whole tensor. Every
    process of the group must call it (fp32, fp16 and bf16 only).
    """
    import torch

    if density >= 1.0:
        return None
    numel = task_vector.numel()
    if reduce is not None:
        if task_vector.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(
                f"the TIES threshold of a task vector split over processes needs fp32, fp16 or bf16, not "
                f"{task_vector.dtype}: train in one of them, or under DDP."
            )
        numel = int(reduce(torch.tensor([numel], dtype=torch.int64))[0])  # the whole tensor's size
    k = int(density * numel)
    if k == 0:
        return math.inf
    task_vector = task_vector.detach()
    if reduce is not None or (
        numel >= _RADIX_MIN_NUMEL and task_vector.dtype in (torch.float32, torch.float16, torch.bfloat16)
    ):
        return _kth_largest_magnitude(task_vector, k, reduce=reduce, numel=numel)
    magnitudes = task_vector.to(compute_dtype(task_vector.dtype)).abs().flatten()
    return magnitudes.kthvalue(numel - k + 1).values.item()
