# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""`MergeSpec` (one validated merge), `apply_merged` (THE arithmetic of the merged model), the pure merge functions
(folds of the accumulators), `StateDictMerger` and `merge_task_vectors`. See [`hf_magmax.merging`]."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .methods import (
    _OPTION_CHECKS,
    ONLINE_MERGES,
    AverageMerge,
    MagMaxMerge,
    OnlineMerge,
    OPCMMerge,
    RandomMixMerge,
    TaskArithmeticMerge,
    TiesMerge,
    _check_same_shape,
    _no_grad,
    check_merge_method,
    check_scaling_coef,
    compute_dtype,
)


if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import Tensor


# --------------------------------------------------------------------------------------------------------------------
# MergeSpec: one validated description of a merge, asked by every consumer
# --------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MergeSpec:
    """One merge, validated once: the method, λ, and the method's options.

    The method's facts (see [`OnlineMerge`]) are on `spec.merge_class`: e.g. `blockwise` (False for opcm: fold
    whole tensors) and `needs_model_stats` (opcm: pass [`model_scale`] of all the accumulators to `result`).

    Every consumer (the Trainer, `hf-magmax merge`, the LoRA merger, the λ search, [`merge_task_vectors`]) builds one
    and asks it for accumulators, so the same spec gives the same merge everywhere.

    Args:
        method (`str`, *optional*, defaults to `"magmax"`):
            One of `magmax`, `average`, `task_arithmetic`, `ties`, `random_mix`, `opcm`.
        scaling_coef (`float` or `"auto"`, *optional*):
            λ, a finite number > 0. `None` (the default) means the method's default ([`DEFAULT_SCALING_COEFS`]);
            `"auto"` means a consumer chooses λ on validation data (see [`hf_magmax.scaling`]).
        density (`float`, *optional*):
            TIES only: fraction of each task vector kept, in (0, 1]; defaults to 0.2. An error for other methods.
        seed (`int`, *optional*):
            random_mix only: the seed; defaults to 0. An error for other methods.
        alpha (`float`, *optional*):
            opcm only: share of the merged task vector's singular-value mass whose directions each new task vector is
            kept out of, in [0, 1); defaults to 0.5 (FusionBench). An error for other methods.

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
    alpha: float | None = None

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
        if offset and not self.merge_class.blockwise:
            raise ValueError(
                f"`{self.method}` needs the whole tensor {name!r} (its SVD), not a slice at offset {offset}: fold the "
                "whole tensor (one block, no sharding)."
            )
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
        if self.method == "opcm":
            return OPCMMerge(options["alpha"], name=name)
        if track_winners:
            return self.merge_class(track_winners=True)
        return self.merge_class()

    def tensor_stat(self, task_vector: Tensor, reduce: Callable[[Tensor], Tensor] | None = None) -> Any:
        """The whole-tensor statistic of one task vector that `needs_tensor_stats` methods need (see `accumulator`).

        `reduce`: `task_vector` is one process's part of a tensor split over processes (FSDP2 shards), and `reduce`
        sums an integer tensor over the processes holding the parts (an all-reduce); the statistic is then the whole
        tensor's, on every process (see [`ties_trim_threshold`]).
        """
        if reduce is None:
            return self.merge_class.tensor_stat(task_vector, **self.method_options)
        return self.merge_class.tensor_stat(task_vector, **self.method_options, reduce=reduce)

    def model_scale(self, accumulators: Iterable[OnlineMerge]) -> float:
        """The model-wide factor of the merged task vector, from the accumulators of *every* tensor of the model:
        OPCM's rescale to the mean task-vector norm (`needs_model_stats`); 1.0 for the other methods. Pass it to each
        accumulator's `result(model_scale=...)`."""
        if not self.merge_class.needs_model_stats:
            return 1.0
        return self.merge_class.model_scale_from_stats([acc.model_stat() for acc in accumulators])

    def describe(self) -> str:
        """One line for model cards and logs."""
        options = ", ".join(f"{k} {v}" for k, v in self.method_options.items())
        return self.merge_class.description + (f" ({options})" if options else "")

    def pass_label(self, number: int, action: str = "") -> str:
        """What a progress bar over pass `number` of a two-pass merge (`needs_model_stats`: opcm folds every tensor,
        then rescales) adds to its label, e.g. `" (opcm, pass 2 of 2: rescale, write)"`; `""` for one-pass methods.
        The streaming merge, `verify` and the LoRA merger label their bars with it."""
        if not self.merge_class.needs_model_stats:
            return ""
        return f" ({self.method}, pass {number} of 2{': ' + action if action else ''})"

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
    """A fresh online accumulator of `method` (`density` for `ties`, `seed` for `random_mix`, `alpha` for `opcm`)."""
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


def _fold_only(accumulator: OnlineMerge, task_vectors: Sequence[Tensor]) -> OnlineMerge:
    _check_same_shape(task_vectors)
    for task_vector in task_vectors:
        accumulator.update(task_vector)
    return accumulator


def _fold(accumulator: OnlineMerge, task_vectors: Sequence[Tensor]) -> Tensor:
    return _fold_only(accumulator, task_vectors).result()


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


@_no_grad
def opcm(task_vectors: Sequence[Tensor], alpha: float = 0.5, name: str = "") -> Tensor:
    """OPCM of the task vectors of one tensor, in task order, the tensor taken as the whole model; see [`OPCMMerge`].

    Each task vector after the first is projected off the dominant singular subspace of the merge so far (2-D
    weights; others are added as they are), and the sum is rescaled to the mean task-vector norm. Order-dependent.
    A model's tensors share one rescale: merge state dicts with [`merge_task_vectors`] or [`StateDictMerger`].

    Args:
        task_vectors (`list[torch.Tensor]`): task vectors of one parameter, same shape, in task order.
        alpha (`float`, *optional*, defaults to `0.5`): share of singular-value mass kept out of, in [0, 1).
        name (`str`, *optional*, defaults to `""`): the tensor's name (embedding tables are not projected).

    Example:

    ```python
    >>> import torch
    >>> from hf_magmax.merging.spec import opcm
    >>> out = opcm([torch.tensor([[3.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 1.0], [1.0, 1.0]])])
    >>> out  # τ_2's diagonal (along the merge's singular directions) is removed; the sum rescaled to norm 2.58
    tensor([[2.2353, 0.7451],
            [0.7451, 0.7451]])
    ```
    """
    return _fold(OPCMMerge(alpha, name=name), task_vectors)


#: The pure merge functions by name: `list[Tensor] -> Tensor` (the merged, unscaled task vector).
MERGE_METHODS: dict[str, Callable[..., Tensor]] = {
    "magmax": magmax,
    "average": average,
    "task_arithmetic": task_arithmetic,
    "ties": ties,
    "random_mix": random_mix,
    "opcm": opcm,
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
        track_winners (`bool`, *optional*, defaults to `False`):
            Record, per element, which task's value was kept ([`winners`]; magmax and random_mix): the provenance of
            the merge, one small integer tensor per merged tensor whatever the number of tasks.
        **method_kwargs:
            `density` for `ties`, `seed` for `random_mix`, `alpha` for `opcm` (when `method` is a name). random_mix
            seeds each tensor's draws by its name, as every other consumer does.

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
        self,
        method: str | MergeSpec = "magmax",
        device: str | torch.device = "cpu",
        track_winners: bool = False,
        **method_kwargs,
    ) -> None:
        import torch

        self.spec = _spec(method, None, method_kwargs)
        self.track_winners = bool(track_winners)
        if self.track_winners:
            self.spec.accumulator(track_winners=True)  # validates: only methods that keep one task's value
        self.method = self.spec.method
        self.method_kwargs = self.spec.method_options
        self.device = torch.device(device)
        self.accumulators: dict[str, OnlineMerge] = {}
        self._aliases: dict[str, str] = {}
        self.num_tasks = 0

    @_no_grad
    def update(self, task_vector: Mapping[str, Tensor]) -> None:
        """Fold one task vector (name → floating tensor) in. Every task vector must have the same names."""
        if self.num_tasks == 0:
            self.accumulators = {
                name: self.spec.accumulator(name, track_winners=self.track_winners) for name in task_vector
            }
            self._aliases = _tied_names(task_vector) if self.spec.merge_class.needs_model_stats else {}
        else:
            missing = set(self.accumulators) - set(task_vector)
            extra = set(task_vector) - set(self.accumulators)
            if missing or extra:
                raise KeyError(
                    f"task vector {self.num_tasks} does not cover the same tensors as the earlier ones "
                    f"(missing: {sorted(missing)[:5]}, unexpected: {sorted(extra)[:5]})."
                )
        for name, tensor in task_vector.items():
            if name not in self._aliases:  # a tied tensor is folded once (opcm counts its norm once)
                self.accumulators[name].update(tensor.detach().to(self.device))
        self.num_tasks += 1

    @_no_grad
    def result(self) -> dict[str, Tensor]:
        """The merged task vector (before λ), name → tensor (opcm: rescaled over all tensors, [`MergeSpec.model_scale`])."""
        if self.num_tasks == 0:
            raise ValueError("no task vector has been folded in yet: call `update` at least once before `result`.")
        folded = {name: acc for name, acc in self.accumulators.items() if name not in self._aliases}
        scale = self.spec.model_scale(folded.values())
        merged = {name: acc.result(model_scale=scale) for name, acc in folded.items()}
        return {name: merged[self._aliases.get(name, name)] for name in self.accumulators}

    def winners(self) -> dict[str, Tensor]:
        """Name → the 0-based index of the task whose value each element kept (`uint8`, wider past 255 tasks; ties
        go to the later task). Needs `track_winners=True`. See [`winner_shares`] for the fractions per task."""
        if not self.track_winners:
            raise ValueError(
                "the merger records no winners: build it with `StateDictMerger(..., track_winners=True)`."
            )
        return {name: acc.winners() for name, acc in self.accumulators.items()}

    def state_dict(self) -> dict[str, object]:
        return {
            "method": self.method,
            "method_kwargs": dict(self.method_kwargs),
            "num_tasks": self.num_tasks,
            "accumulators": {name: acc.state_dict() for name, acc in self.accumulators.items()},
            **({"aliases": dict(self._aliases)} if self._aliases else {}),
        }

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        if state["method"] != self.method:
            raise ValueError(f"cannot load a `{state['method']}` merge state into a `{self.method}` merger.")
        self.num_tasks = int(state["num_tasks"])
        self._aliases = dict(state.get("aliases", {}))
        self.accumulators = {}
        for name, acc_state in state["accumulators"].items():
            acc = self.spec.accumulator(name, track_winners=self.track_winners)
            acc.load_state_dict(acc_state)
            self.accumulators[name] = acc


def merge_task_vectors(
    task_vectors: Sequence[Mapping[str, Tensor]] | Sequence[Tensor],
    method: str | MergeSpec = "magmax",
    scaling_coef: float | None = None,
    return_winners: bool = False,
    **method_kwargs,
):
    """Merge task vectors with `method` and scale the result by `scaling_coef`.

    Args:
        task_vectors (`list[TaskVector]`, `list[dict[str, torch.Tensor]]` or `list[torch.Tensor]`):
            Task vectors in task order (for MagMax, ties go to the later task).
        method (`str` or [`MergeSpec`], *optional*, defaults to `"magmax"`):
            One of `magmax`, `average`, `task_arithmetic`, `ties`, `random_mix`, `opcm`, or a whole spec. opcm
            rescales the merged task vector over all the tensors given (the model-wide norms of the paper).
        scaling_coef (`float`, *optional*):
            λ, finite and > 0. Defaults to the method's default ([`DEFAULT_SCALING_COEFS`]): 0.5 for `magmax` and
            `random_mix`, 1.0 for `average`, `ties` and `opcm`, 0.3 for `task_arithmetic`.
        return_winners (`bool`, *optional*, defaults to `False`):
            magmax and random_mix: also return the provenance, per element the 0-based index of the task whose value
            was kept (ties to the later task), of the same kind as the inputs (a dict of tensors, or one tensor).
        **method_kwargs:
            `density` for `ties` (defaults to 0.2), `seed` for `random_mix` (defaults to 0), `alpha` for `opcm`
            (defaults to 0.5).

    Returns:
        The scaled merged task vector `λ · merge(τ_1..τ_T)`, of the same kind as the inputs ([`TaskVector`] for
        task vectors or dicts, a tensor for tensors); with `return_winners=True`, the pair `(merged, winners)`.
        Apply it with `TaskVector.apply_to(base_state_dict)`: the result is bit-identical to
        [`apply_merged`]`(θ_0, merge, λ)`, which every other door uses.

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
        accumulator = spec.accumulator(track_winners=return_winners)
        merged = _scale(_fold(accumulator, list(task_vectors)), coef)
        return (merged, accumulator.winners()) if return_winners else merged

    from ..task_vectors import TaskVector

    names = list(task_vectors[0].keys())
    for i, tv in enumerate(task_vectors[1:], start=1):
        if set(tv.keys()) != set(names):
            missing = sorted(set(names) - set(tv.keys()))[:5]
            extra = sorted(set(tv.keys()) - set(names))[:5]
            raise KeyError(
                f"`task_vectors[{i}]` has other tensors than `task_vectors[0]` (missing: {missing}, extra: {extra})."
            )
    merged, winners = {}, {}
    if spec.merge_class.needs_model_stats:  # opcm: fold every tensor, then one model-wide rescale
        accumulators: dict[str, OnlineMerge] = {}
        first_of: dict[tuple[int, ...], str] = {}
        aliases: dict[str, str] = {}
        for name in names:
            tensors = [tv[name] for tv in task_vectors]
            key = tuple(id(t) for t in tensors)
            if key in first_of:  # a tied tensor (one object under two names): merged once, counted once
                aliases[name] = first_of[key]
                continue
            first_of[key] = name
            accumulators[name] = _fold_only(spec.accumulator(name), tensors)
        scale = spec.model_scale(accumulators.values())
        merged = {name: _scale(acc.result(model_scale=scale), coef) for name, acc in accumulators.items()}
        merged.update({name: merged[first] for name, first in aliases.items()})
        return TaskVector({name: merged[name] for name in names})
    for name in names:
        accumulator = spec.accumulator(name, track_winners=return_winners)
        merged[name] = _scale(_fold(accumulator, [tv[name] for tv in task_vectors]), coef)
        if return_winners:
            winners[name] = accumulator.winners()
    return (TaskVector(merged), winners) if return_winners else TaskVector(merged)


def _tied_names(task_vector: Mapping[str, Tensor]) -> dict[str, str]:
    """Name → the earlier name holding the very same tensor object (tied weights in a `TaskVector`)."""
    first: dict[int, str] = {}
    aliases = {}
    for name, tensor in task_vector.items():
        if id(tensor) in first:
            aliases[name] = first[id(tensor)]
        else:
            first[id(tensor)] = name
    return aliases


def winner_shares(winners: Mapping[str, Tensor], num_tasks: int) -> dict[str, list[float]]:
    """The fraction of elements each task won, per tensor and over all of them (key `"*"`).

    Args:
        winners (`dict[str, torch.Tensor]`): name → winner map, as [`StateDictMerger.winners`] returns it.
        num_tasks (`int`): T, the number of tasks merged.

    Returns:
        `dict[str, list[float]]`: name → `[share of task 1, ..., share of task T]` (each list sums to 1), and `"*"`
        for all elements together.

    Example:

    ```python
    >>> import torch
    >>> from hf_magmax.merging import winner_shares
    >>> winner_shares({"w": torch.tensor([0, 1, 1, 1], dtype=torch.uint8)}, num_tasks=2)
    {'w': [0.25, 0.75], '*': [0.25, 0.75]}
    ```
    """
    import torch

    if num_tasks < 1:
        raise ValueError(f"`num_tasks` must be at least 1, got {num_tasks!r}.")
    shares: dict[str, list[float]] = {}
    total = torch.zeros(num_tasks, dtype=torch.float64)
    for name, winner in winners.items():
        counts = torch.bincount(winner.reshape(-1).long(), minlength=num_tasks).to(torch.float64)
        if counts.numel() > num_tasks:
            raise ValueError(
                f"the winners of {name!r} name task {counts.numel() - 1}, but `num_tasks` is {num_tasks}."
            )
        total += counts
        shares[name] = (counts / max(winner.numel(), 1)).tolist()
    shares["*"] = (total / max(float(total.sum()), 1.0)).tolist()
    return shares


def _scale(tensor: Tensor, coef: float) -> Tensor:
    """`λ · merged` as [`apply_merged`] computes it (in the compute dtype), returned in the merged tensor's dtype."""
    return (tensor.to(compute_dtype(tensor.dtype)) * coef).to(tensor.dtype)
