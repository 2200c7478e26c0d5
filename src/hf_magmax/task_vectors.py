# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""`TaskVector`: the difference `τ = θ_ft − θ_0` between a fine-tuned and the pretrained state dict."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import Tensor

from .merging import apply_merged, compute_dtype


__all__ = ["TaskVector", "shared_tensor_groups", "subtract"]


@torch.no_grad()
def subtract(finetuned: Tensor, base: Tensor, device: str | torch.device | None = None) -> Tensor:
    """One task-vector tensor `τ = θ_ft − θ_0`, the one place every consumer computes it.

    The difference is taken in fp32 for half-precision weights (fp64 if either is fp64), so that a bf16 or fp16
    checkpoint loses nothing to the subtraction, and returned as a new tensor (a memory-mapped input is never written).

    Args:
        finetuned (`torch.Tensor`): θ_ft (floating).
        base (`torch.Tensor`): θ_0, same shape.
        device (`str` or `torch.device`, *optional*): where τ lives; defaults to `finetuned`'s device.
    """
    compute = torch.promote_types(compute_dtype(finetuned.dtype), compute_dtype(base.dtype))
    target = finetuned.device if device is None else torch.device(device)
    base = base.detach().to(device=target, dtype=compute)
    if finetuned.dtype == compute and finetuned.device == target:  # one pass, no copy first (the same bits)
        return torch.sub(finetuned.detach(), base)
    tau = finetuned.detach().to(device=target, dtype=compute, copy=True)
    return tau.sub_(base)


def shared_tensor_groups(state_dict: Mapping[str, Tensor]) -> dict[str, str]:
    """Map every name of a tied/shared tensor to the first name that shares its storage.

    Tied parameters (e.g. `lm_head.weight` and `model.embed_tokens.weight`) appear under several names in a model's
    `state_dict()`. They are one parameter and must be handled once. Names that share nothing map to themselves.
    """
    first_by_key: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for name, tensor in state_dict.items():
        if not isinstance(tensor, Tensor) or tensor.device.type == "meta" or tensor.numel() == 0:
            aliases[name] = name
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
        aliases[name] = first_by_key.setdefault(key, name)
    return aliases


def _floating(tensor: Tensor) -> bool:
    return isinstance(tensor, Tensor) and tensor.is_floating_point()


class TaskVector(Mapping[str, Tensor]):
    """A task vector: name → `θ_ft − θ_0` for every floating tensor of a model (fp32 for half-precision weights).

    Integer and bool buffers (position ids, token-type ids, masks, counters) are not part of a task vector: when the
    vector is applied they are taken from θ_0. Tied parameters are computed once and the aliases point at the same
    tensor, so merging and applying handle them once.

    Task vectors support `+`, `-`, unary `-` and multiplication by a number, element-wise per tensor.

    Args:
        vector (`dict[str, torch.Tensor]`):
            The differences, name → tensor.

    Example:

    ```python
    >>> import torch
    >>> from hf_magmax import TaskVector
    >>> base = {"w": torch.tensor([1.0, 1.0]), "ids": torch.tensor([0, 1])}
    >>> finetuned = {"w": torch.tensor([2.0, 0.0]), "ids": torch.tensor([0, 1])}
    >>> tv = TaskVector.from_state_dicts(base, finetuned)
    >>> list(tv)
    ['w']
    >>> tv.apply_to(base, scaling_coef=0.5)["w"]
    tensor([1.5000, 0.5000])
    ```
    """

    def __init__(self, vector: Mapping[str, Tensor]) -> None:
        self.vector: dict[str, Tensor] = dict(vector)

    # -- construction --------------------------------------------------------------------------------------------

    @classmethod
    @torch.no_grad()
    def from_state_dicts(
        cls,
        base_state_dict: Mapping[str, Tensor],
        finetuned_state_dict: Mapping[str, Tensor],
        device: str | torch.device | None = None,
    ) -> TaskVector:
        """`τ = θ_ft − θ_0` over the floating tensors of `base_state_dict`.

        Args:
            base_state_dict (`dict[str, torch.Tensor]`):
                θ_0, the pretrained weights.
            finetuned_state_dict (`dict[str, torch.Tensor]`):
                θ_ft. Must hold every floating tensor of θ_0 with the same shape.
            device (`str` or `torch.device`, *optional*):
                Where to put the differences; defaults to the device of the fine-tuned tensors.

        Raises:
            `KeyError` naming the missing or extra tensor, `ValueError` naming a tensor whose shape differs.
        """
        base_floats = [name for name, t in base_state_dict.items() if _floating(t)]
        missing = [name for name in base_floats if name not in finetuned_state_dict]
        if missing:
            raise KeyError(
                f"the fine-tuned state dict lacks {len(missing)} tensor(s) of the base model, e.g. {missing[0]!r}: "
                "was it saved from the same architecture?"
            )
        extra = [name for name, t in finetuned_state_dict.items() if _floating(t) and name not in base_state_dict]
        if extra:
            raise KeyError(
                f"the fine-tuned state dict has {len(extra)} floating tensor(s) the base model lacks, e.g. "
                f"{extra[0]!r}: was it saved from the same architecture (or with a different head)?"
            )
        aliases = shared_tensor_groups(base_state_dict)
        vector: dict[str, Tensor] = {}
        for name in base_floats:
            first = aliases.get(name, name)
            if first != name and first in vector:
                vector[name] = vector[first]  # tied parameter: one tensor under both names
                continue
            base, finetuned = base_state_dict[name], finetuned_state_dict[name]
            if base.shape != finetuned.shape:
                raise ValueError(
                    f"tensor {name!r} has shape {tuple(finetuned.shape)} in the fine-tuned model but "
                    f"{tuple(base.shape)} in the base model: task vectors need the same architecture and head size."
                )
            vector[name] = subtract(finetuned, base, device=device)
        return cls(vector)

    @classmethod
    def from_models(
        cls, base_model: torch.nn.Module, finetuned_model: torch.nn.Module, device: str | torch.device = "cpu"
    ) -> TaskVector:
        """`τ = θ_ft − θ_0` between two models of the same architecture (state dicts compared by name)."""
        return cls.from_state_dicts(base_model.state_dict(), finetuned_model.state_dict(), device=device)

    # -- use -----------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def apply_to(
        self,
        base_state_dict: Mapping[str, Tensor],
        scaling_coef: float = 1.0,
        strict: bool = True,
    ) -> dict[str, Tensor]:
        """`θ_0 + scaling_coef · τ` as a new state dict.

        Floating tensors are computed with [`~hf_magmax.merging.apply_merged`] (fp32 math for fp16/bf16 weights, one
        cast to the base dtype); integer and bool buffers, and any tensor the task vector does not cover, are taken
        from θ_0 unchanged.

        Args:
            base_state_dict (`dict[str, torch.Tensor]`):
                θ_0.
            scaling_coef (`float`, *optional*, defaults to `1.0`):
                λ. (The merged task vector of [`merge_task_vectors`] is already scaled.)
            strict (`bool`, *optional*, defaults to `True`):
                Raise if the task vector holds a tensor that θ_0 lacks.
        """
        if strict:
            extra = [name for name in self.vector if name not in base_state_dict]
            if extra:
                raise KeyError(f"task vector tensor {extra[0]!r} is not in the base state dict.")
        aliases = shared_tensor_groups(base_state_dict)
        merged: dict[str, Tensor] = {}
        for name, base in base_state_dict.items():
            first = aliases.get(name, name)
            if first != name and first in merged:
                merged[name] = merged[first]
                continue
            if name in self.vector and _floating(base):
                merged[name] = apply_merged(base, self.vector[name], scaling_coef)
            else:
                merged[name] = base.clone()
        return merged

    @torch.no_grad()
    def apply_to_model(self, model: torch.nn.Module, scaling_coef: float = 1.0) -> torch.nn.Module:
        """Add `scaling_coef · τ` to `model`'s parameters in place (the model must hold θ_0). Returns the model."""
        params = dict(model.named_parameters(remove_duplicate=False))
        params.update(dict(model.named_buffers(remove_duplicate=False)))
        done: set[int] = set()
        for name, delta in self.vector.items():
            if name not in params:
                raise KeyError(f"task vector tensor {name!r} is not a parameter or buffer of the model.")
            target = params[name]
            if id(target) in done or not target.is_floating_point():
                continue
            done.add(id(target))
            target.copy_(apply_merged(target, delta, scaling_coef))
        return model

    # -- arithmetic ----------------------------------------------------------------------------------------------

    def _combine(self, other: TaskVector, op) -> TaskVector:
        if set(self.vector) != set(other.vector):
            missing = sorted(set(self.vector) ^ set(other.vector))[:5]
            raise KeyError(f"task vectors cover different tensors, e.g. {missing}.")
        return TaskVector({name: op(t, other.vector[name]) for name, t in self.vector.items()})

    def __add__(self, other: TaskVector) -> TaskVector:
        return self._combine(other, torch.add)

    def __sub__(self, other: TaskVector) -> TaskVector:
        return self._combine(other, torch.sub)

    def __neg__(self) -> TaskVector:
        return TaskVector({name: -t for name, t in self.vector.items()})

    def __mul__(self, coef: float) -> TaskVector:
        if not isinstance(coef, (int, float)):
            return NotImplemented
        return TaskVector({name: t * coef for name, t in self.vector.items()})

    __rmul__ = __mul__

    # -- mapping protocol ----------------------------------------------------------------------------------------

    def __getitem__(self, name: str) -> Tensor:
        return self.vector[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.vector)

    def __len__(self) -> int:
        return len(self.vector)

    def __repr__(self) -> str:
        numel = sum(t.numel() for t in self.vector.values())
        return f"TaskVector({len(self.vector)} tensors, {numel:,} elements)"

    def norm(self) -> float:
        """The global L2 norm of the task vector (tied tensors counted once)."""
        seen: set[int] = set()
        total = 0.0
        for t in self.vector.values():
            if id(t) in seen:
                continue
            seen.add(id(t))
            total += float(t.float().pow(2).sum())
        return total**0.5
