# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""[`MergeState`]: θ_0 and the running merge of the tensors this process holds, asked of the one merge core.

The state is a thin layer over [`~hf_magmax.merging.StateDictMerger`] built from the run's
[`~hf_magmax.merging.MergeSpec`]: `τ_t = θ_t − θ_0` comes from [`~hf_magmax.task_vectors.TaskVector`] (fp32 for
half-precision models), the merged weights from [`~hf_magmax.merging.apply_merged`] (one rounding rule), so the
Trainer's weights equal the in-memory engine's bit for bit. Under DDP (or one process) the tensors held are whole.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..merging import MergeSpec, StateDictMerger, apply_merged
from ..task_vectors import TaskVector, shared_tensor_groups


__all__ = ["BASE_WEIGHTS_NAME", "MERGE_STATE_NAME", "CheckpointError", "MergeState"]

#: Files a checkpoint carries for the merge state, besides the `Trainer`'s own.
BASE_WEIGHTS_NAME = "magmax_base.safetensors"
MERGE_STATE_NAME = "magmax_merge_state.pt"


class CheckpointError(ValueError):
    """A MagMaxTrainer checkpoint file is missing, truncated or corrupt (the message names the file)."""


def matches(name: str, patterns: Sequence[str]) -> bool:
    """Whether parameter `name` lies in a module named or matched by one of `patterns` (prefix or full regex)."""
    return any(re.fullmatch(rf"(?:{p})(?:\..*)?", name) for p in patterns)


def unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def live_tensors(model: nn.Module) -> dict[str, Tensor]:
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(dict(model.named_buffers(remove_duplicate=False)))
    return tensors


class MergeState:
    """θ_0 and the running merge of one task sequence, for the tensors this process holds.

    Args:
        spec ([`~hf_magmax.merging.MergeSpec`]):
            The merge (method and options; λ is passed to [`merged_tensor`]).
        device (`str` or `torch.device`, *optional*, defaults to `"cpu"`):
            Where θ_0 and the running merge live.
        frozen_modules (`list[str]`, *optional*):
            Module names or regexes left out of the task vectors.

    Example:

    ```python
    >>> import torch
    >>> from hf_magmax.merging import MergeSpec
    >>> from hf_magmax.trainer import MergeState
    >>> state = MergeState(MergeSpec("magmax"))
    >>> state.snapshot({"w": torch.zeros(2)})
    >>> state.fold({"w": torch.tensor([1.0, -3.0])}, task="a")
    >>> state.fold({"w": torch.tensor([-2.0, 1.0])}, task="b")
    >>> state.merged_tensor("w", 0.5)
    tensor([-1.0000, -1.5000])
    ```
    """

    def __init__(
        self, spec: MergeSpec, device: str | torch.device = "cpu", frozen_modules: Sequence[str] | None = None
    ) -> None:
        self.spec = spec
        self.device = torch.device(device)
        self.frozen_modules = list(frozen_modules or [])
        self.merger = StateDictMerger(spec, device=self.device)
        self.base: dict[str, Tensor] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}

    @property
    def num_tasks(self) -> int:
        return self.merger.num_tasks

    # -- θ_0 -------------------------------------------------------------------------------------------------------

    def names(self, state_dict: Mapping[str, Tensor]) -> list[str]:
        """The tensors of the task vectors: floating, not tied to an earlier name, outside `frozen_modules`."""
        aliases = shared_tensor_groups(state_dict)
        return [
            name
            for name, tensor in state_dict.items()
            if isinstance(tensor, Tensor)
            and tensor.is_floating_point()
            and aliases.get(name, name) == name
            and not matches(name, self.frozen_modules)
        ]

    @torch.no_grad()
    def snapshot(self, state_dict: Mapping[str, Tensor]) -> None:
        """Take θ_0 (a copy on `device`) from the model's weights."""
        names = self.names(state_dict)
        if not names:
            raise ValueError(
                "the model has no floating-point weights outside `frozen_modules`: there is nothing to train or merge."
            )
        self.base = {name: state_dict[name].detach().to(self.device, copy=True) for name in names}
        self.shapes = {name: tuple(t.shape) for name, t in self.base.items()}

    def check_shapes(self, state_dict: Mapping[str, Tensor], task: str) -> None:
        """Raise if the model's weights no longer match θ_0 (a head resized between tasks, another model...)."""
        for name, shape in self.shapes.items():
            if name not in state_dict:
                raise ValueError(
                    f"at task {task!r} the model lacks the weight {name!r} it had at the start: MagMax needs the same "
                    "architecture for every task (do not replace or resize the model)."
                )
            if tuple(state_dict[name].shape) != shape:
                raise ValueError(
                    f"the weight {name!r} has shape {tuple(state_dict[name].shape)} at task {task!r} but {shape} at "
                    "the start: MagMax needs parameters of the same shape for every task. Size the classification "
                    "head for all classes from the start (class-incremental learning with "
                    "`restrict_loss_to_task_classes=True`) instead of resizing it."
                )

    # -- the merge -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def fold(self, state_dict: Mapping[str, Tensor], task: str) -> None:
        """Fold `τ_t = θ_t − θ_0` (fp32 for half-precision weights) into the running merge; non-finite τ is an error."""
        finetuned = {name: state_dict[name] for name in self.base}
        task_vector = TaskVector.from_state_dicts(self.base, finetuned, device=self.device)
        for name, tensor in task_vector.items():
            if not bool(torch.isfinite(tensor).all()):
                bad = int((~torch.isfinite(tensor)).sum())
                raise ValueError(
                    f"the task vector of task {task!r} has {bad} non-finite value(s) (NaN/Inf) in tensor {name!r}: "
                    "training diverged. Lower the learning rate (or use `max_grad_norm`) and train that task again; "
                    "it is not merged."
                )
        self.merger.update(task_vector.vector)

    @torch.no_grad()
    def merged_tensor(self, name: str, scaling_coef: float) -> Tensor:
        """`θ_0 + λ · merge` for one tensor ([`~hf_magmax.merging.apply_merged`]: fp32 math, one cast)."""
        return apply_merged(self.base[name], self.merger.accumulators[name].result(), scaling_coef)

    @torch.no_grad()
    def merged_state_dict(self, scaling_coef: float) -> dict[str, Tensor]:
        """`θ_0 + λ · merge` for every tensor of the task vectors (a new dict on `device`)."""
        return {name: self.merged_tensor(name, scaling_coef) for name in self.base}

    @torch.no_grad()
    def write_into(self, model: nn.Module, tensors: Callable[[str], Tensor]) -> None:
        """Copy `tensors(name)` into the model's weights in place, for every name of the task vectors."""
        live = live_tensors(unwrap(model))
        for name in self.base:
            if name not in live:
                raise KeyError(f"the model has no weight {name!r} to write the merged value into.")
            target = live[name]
            target.copy_(tensors(name).to(target.device, target.dtype))

    # -- checkpoints -----------------------------------------------------------------------------------------------

    def save(self, directory: str) -> None:
        """Write θ_0 (`magmax_base.safetensors`) and the running merge (`magmax_merge_state.pt`) to `directory`."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        save_file({k: v.contiguous().cpu() for k, v in self.base.items()}, os.path.join(directory, BASE_WEIGHTS_NAME))
        torch.save(self.merger.state_dict(), os.path.join(directory, MERGE_STATE_NAME))

    @staticmethod
    def read(directory: str, device: str | torch.device = "cpu") -> tuple[dict[str, Tensor], dict]:
        """Read θ_0 and the merge state of a checkpoint; a missing or corrupt file is a [`CheckpointError`]."""
        from safetensors.torch import load_file

        base_path = os.path.join(directory, BASE_WEIGHTS_NAME)
        merge_path = os.path.join(directory, MERGE_STATE_NAME)
        for path in (base_path, merge_path):
            if not os.path.isfile(path):
                raise CheckpointError(f"{path!r} is missing: the checkpoint is incomplete (interrupted while saving).")
        try:
            base = {k: v.to(device) for k, v in load_file(base_path).items()}
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointError(f"{base_path!r} is truncated or corrupt ({type(err).__name__}: {err}).") from None
        try:
            merge_state = torch.load(merge_path, map_location=device, weights_only=True)
        except Exception as err:  # noqa: BLE001 - zip, pickle and OS errors alike
            raise CheckpointError(f"{merge_path!r} is truncated or corrupt ({type(err).__name__}: {err}).") from None
        if not isinstance(merge_state, Mapping) or "accumulators" not in merge_state:
            raise CheckpointError(f"{merge_path!r} is not a MagMax merge state.")
        return base, dict(merge_state)

    def restore(self, base: Mapping[str, Tensor], merge_state: Mapping) -> None:
        """Load what [`read`] returned."""
        self.merger.load_state_dict(merge_state)
        self.base = dict(base)
        self.shapes = {name: tuple(t.shape) for name, t in self.base.items()}
