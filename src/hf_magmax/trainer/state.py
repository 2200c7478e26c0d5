# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""[`MergeState`]: θ_0 and the running merge of the tensors this process holds, asked of the one merge core.

The state is a thin layer over the accumulators of the run's [`~hf_magmax.merging.MergeSpec`]: `τ_t = θ_t − θ_0`
comes from [`~hf_magmax.task_vectors.subtract`] (fp32 for half-precision models), the merged weights from
[`~hf_magmax.merging.apply_merged`] (one rounding rule), so the Trainer's weights equal the in-memory engine's bit for
bit.

What is resident, per parameter:

- the *selecting* methods (`magmax`, `random_mix`: every merged element is one task's value) keep the winning
  fine-tuned value θ_best in the model's dtype, not τ in fp32; `τ_best = subtract(θ_best, θ_0)` is recomputed when it
  is needed, which gives the same τ bit for bit (2 B/param for a bf16 model, 4 for fp32);
- the other methods keep their accumulators (one fp32 sum; four tensors for `ties`);
- θ_0 is memory-mapped from the run's one base file (`output_dir/magmax_base/`, [`write_base`]) once it is written,
  so it costs page cache, not private memory.

The tensors held are those *this rank owns*: whole tensors under DDP or one process, the local shards of DTensor
parameters under FSDP2 (`fully_shard`) or the partitions of DeepSpeed ZeRO-3 parameters (`ds_tensor`), each with its
global flat offset (random_mix draws by it, so a sharded run equals one process). A θ_0 taken whole before the model
was sharded is cut down to this rank's part at the first fold. TIES needs the trim threshold of each whole task
vector: on shards its histogram select sums the ranks' histograms (an all-reduce of 32768 + 65536 counts per fp32
tensor and task), which gives the one-process threshold bit for bit. OPCM (an SVD of each whole tensor, a rescale
over the whole model: [`merged_task_vector`] applies it, computed once per task from all the accumulators) is refused
on sharded weights.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..io.output import BASE_DIR_NAME
from ..merging import MergeSpec, OnlineMerge, apply_merged
from ..task_vectors import shared_tensor_groups, subtract


__all__ = [
    "BASE_DIR_NAME",
    "BASE_HASH_NAME",
    "BASE_WEIGHTS_NAME",
    "MERGE_STATE_NAME",
    "RANK_BASE_NAME",
    "RANK_MERGE_STATE_NAME",
    "CheckpointError",
    "MergeState",
    "file_sha256",
]

#: θ_0 of a run, written once: `output_dir/magmax_base/model.safetensors` and the sha256 of that file.
BASE_WEIGHTS_NAME = "magmax_base/model.safetensors"
BASE_HASH_NAME = "magmax_base/sha256"
#: A θ_0 taken from shards or partitions (the model was loaded sharded): every rank's part, in `magmax_base/`.
RANK_BASE_NAME = "model-rank{rank}.safetensors"
#: The merge state a checkpoint carries, besides the `Trainer`'s own files.
MERGE_STATE_NAME = "magmax_merge_state.pt"
#: One merge-state file per rank when the state is sharded (FSDP2, ZeRO-3): each rank writes and reads its own.
RANK_MERGE_STATE_NAME = "magmax_merge_state-rank{rank}.pt"
#: Where older checkpoints kept a full copy of θ_0 (still read on resume).
LEGACY_BASE_NAME = "magmax_base.safetensors"

#: Methods whose merged element is one task vector's element: the state may keep θ_best instead of τ.
SELECTING_METHODS = ("magmax", "random_mix")


class CheckpointError(ValueError):
    """A MagMaxTrainer checkpoint file is missing, truncated or corrupt (the message names the file)."""


def file_sha256(path: str) -> str:
    """The sha256 (hex) of a file's content, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def map_safetensors(path: str) -> dict[str, Tensor]:
    """The tensors of a safetensors file, memory-mapped by safetensors (a private file mapping: reading them costs page
    cache, which the kernel can drop, not private memory)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def matches(name: str, patterns: Sequence[str]) -> bool:
    """Whether parameter `name` lies in a module named or matched by one of `patterns` (prefix or full regex)."""
    return any(re.fullmatch(rf"(?:{p})(?:\..*)?", name) for p in patterns)


def unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def reshard(model: nn.Module) -> None:
    """Put FSDP2's sharded parameters back in place: after a forward pass (an evaluation) FSDP2 may leave a module's
    parameters unsharded (the root module by default), and the merge state reads and writes the shards."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without distributed
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def live_tensors(model: nn.Module) -> dict[str, Tensor]:
    reshard(model)
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(dict(model.named_buffers(remove_duplicate=False)))
    return tensors


def local_part(tensor: Tensor) -> tuple[Tensor, int, bool]:
    """`(the part of tensor this rank holds, the global flat offset of its first element, whether it is a shard)`.

    A plain tensor is held whole (offset 0). A DTensor (FSDP2's parameters) gives its local shard: `Shard(0)` over
    the mesh (FSDP2's layout) holds a contiguous run of rows, so its elements are one contiguous range of the flattened
    whole tensor. Other layouts (sharding another dim, partial sums) are refused. A DeepSpeed ZeRO-3 parameter gives
    its partition (`ds_tensor`: rank r holds the flat elements from `r · partition size`, less the end padding).
    """
    partition = _zero3_partition(tensor)
    if partition is not None:
        return partition
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return tensor, 0, False
    if not isinstance(tensor, DTensor):
        return tensor, 0, False
    placements = tensor.placements
    if any(p.is_partial() or (p.is_shard() and p.dim != 0) for p in placements):
        raise ValueError(
            f"a DTensor with placements {placements} is not supported by the merge state: it holds row shards "
            "(Shard(0), FSDP2's layout) or replicated tensors."
        )
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, global_offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, placements)
    row = int(global_offset[0]) if len(global_offset) else 0
    flat_offset = row * math.prod(tensor.shape[1:])
    sharded = any(p.is_shard() for p in placements) and tensor.device_mesh.size() > 1
    return tensor.to_local(), flat_offset, sharded


def _zero3_partition(tensor: Tensor) -> tuple[Tensor, int, bool] | None:
    """`local_part` of a DeepSpeed ZeRO-3 parameter (None for any other tensor)."""
    ds_tensor = getattr(tensor, "ds_tensor", None)
    if ds_tensor is None:
        return None
    import torch.distributed as dist

    group = getattr(tensor, "ds_process_group", None)
    rank, world = dist.get_rank(group=group), dist.get_world_size(group=group)
    size = int(getattr(ds_tensor, "ds_numel", ds_tensor.numel()))  # the partition size, padding included
    offset = rank * size
    valid = max(0, min(size, int(tensor.ds_numel) - offset))  # the last partitions are padded
    return ds_tensor.view(-1).narrow(0, 0, valid), offset, world > 1


def has_zero3_parameters(model: nn.Module) -> bool:
    """Whether the model's parameters are DeepSpeed ZeRO-3 parameters (partitioned, each rank holding `ds_tensor`)."""
    return any(getattr(p, "ds_tensor", None) is not None for p in model.parameters())


def zero3_weights(model: nn.Module) -> dict[str, Tensor]:
    """The model's state dict with the ZeRO-3 parameters themselves (`keep_vars=True`: a detached copy would lose the
    `ds_tensor` partition and `ds_shape`), tied weights under every name; nothing is gathered."""
    return model.state_dict(keep_vars=True)


def sync_zero3_parameters(tensors: Sequence[Tensor]) -> None:
    """After the partitions (`ds_tensor`) of ZeRO-3 parameters were written: release the parameters DeepSpeed holds
    gathered (the persistent ones, below `stage3_param_persistence_threshold`, which its forward reads from
    `param.data`, and any a forward left available) and gather the persistent ones again from the new partitions, as
    DeepSpeed does around a checkpoint. Every rank calls it with the same parameters (collective)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    seen, available = set(), []
    for param in tensors:
        if getattr(param, "ds_tensor", None) is not None and id(param) not in seen:
            seen.add(id(param))
            if param.ds_status == ZeroParamStatus.AVAILABLE:
                available.append(param)
    if not available:
        return
    available[0].partition(param_list=available)  # the partitions are the truth: frees the gathered copies
    persistent = [param for param in available if getattr(param, "ds_persist", False)]
    if persistent:
        persistent[0].all_gather(param_list=persistent)


def global_shape(tensor: Tensor) -> tuple[int, ...]:
    """The whole tensor's shape (a ZeRO-3 parameter's own shape is empty outside a gather: `ds_shape`)."""
    return tuple(getattr(tensor, "ds_shape", tensor.shape))


def shard_reduce(tensor: Tensor) -> Callable[[Tensor], Tensor] | None:
    """For a DTensor split over processes: a function that sums an integer tensor over the processes holding its
    shards (an all-reduce over each sharded mesh dimension), which makes TIES' histogram select give the whole
    tensor's threshold ([`~hf_magmax.merging.ties_trim_threshold`]); None for a tensor this process holds whole."""
    partition = _zero3_partition(tensor)
    if partition is not None:
        groups = [getattr(tensor, "ds_process_group", None)] if partition[2] else []
        return _all_reduce(groups) if groups else None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    if not isinstance(tensor, DTensor):
        return None
    mesh = tensor.device_mesh
    groups = [mesh.get_group(dim) for dim, p in enumerate(tensor.placements) if p.is_shard() and mesh.size(dim) > 1]
    return _all_reduce(groups) if groups else None


def _all_reduce(groups: list) -> Callable[[Tensor], Tensor]:
    def reduce(counts: Tensor) -> Tensor:
        import torch.distributed as dist

        for group in groups:  # the sharded mesh dims (the others replicate the same data), or ZeRO-3's group
            dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
        return counts

    return reduce


def _bits(tensor: Tensor) -> Tensor:
    """The tensor's bits as integers (exact comparison: -0.0 and 0.0 differ, as they do in the merge)."""
    return tensor.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()])


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _nbytes(tensors: Sequence[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class MergeState:
    """θ_0 and the running merge of one task sequence, for the tensors this process holds (see the module docstring).

    Args:
        spec ([`~hf_magmax.merging.MergeSpec`]):
            The merge (method and options; λ is passed to [`merged_tensor`]).
        device (`str` or `torch.device`, *optional*, defaults to `"cpu"`):
            Where θ_0 and the running merge live.
        frozen_modules (`list[str]`, *optional*):
            Module names or regexes left out of the task vectors.
        track_winners (`bool`, *optional*, defaults to `False`):
            magmax and random_mix only: also keep, per element, the index of the task whose value the merge holds
            (`winners`, one `uint8` tensor per merged tensor, `int16` beyond 256 tasks; ties go to the later task, as
            in the core). It is written into checkpoints and restored with them.

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
        self,
        spec: MergeSpec,
        device: str | torch.device = "cpu",
        frozen_modules: Sequence[str] | None = None,
        track_winners: bool = False,
    ) -> None:
        if track_winners:
            spec.accumulator(track_winners=True)  # validates: only methods that keep one task's value per element
        self.spec = spec
        self.track_winners = bool(track_winners)
        self.device = torch.device(device)
        self.frozen_modules = list(frozen_modules or [])
        #: the selecting methods keep θ_best (model dtype) instead of τ (fp32 for half models)
        self.selecting = spec.method in SELECTING_METHODS
        self.base: dict[str, Tensor] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.offsets: dict[str, int] = {}
        self.sharded = False
        #: the file θ_0 is memory-mapped from (None: θ_0 is a copy in memory)
        self.base_file: str | None = None
        self.best: dict[str, Tensor] = {}
        self.accumulators: dict[str, OnlineMerge] = {}
        #: with `track_winners`: name → the task index (0-based, fold order) each element of θ_best came from
        self.winners: dict[str, Tensor] = {}
        self.num_tasks = 0

    # -- θ_0 -------------------------------------------------------------------------------------------------------

    def names(self, state_dict: Mapping[str, Tensor]) -> list[str]:
        """The tensors of the task vectors: floating, not tied to an earlier name, outside `frozen_modules`."""
        local = {name: local_part(t)[0] if isinstance(t, Tensor) else t for name, t in state_dict.items()}
        aliases = shared_tensor_groups(local)
        return [
            name
            for name, tensor in local.items()
            if isinstance(tensor, Tensor)
            and tensor.is_floating_point()
            and aliases.get(name, name) == name
            and not matches(name, self.frozen_modules)
        ]

    @torch.no_grad()
    def snapshot(self, state_dict: Mapping[str, Tensor]) -> None:
        """Take θ_0 (a copy on `device` of the part of each tensor this rank holds) from the model's weights."""
        names = self.names(state_dict)
        if not names:
            raise ValueError(
                "the model has no floating-point weights outside `frozen_modules`: there is nothing to train or merge."
            )
        parts = {name: local_part(state_dict[name]) for name in names}
        sharded = any(part[2] for part in parts.values())
        if sharded:
            self._check_shardable()
        # meta weights (ranks > 0 under FSDP's `cpu_ram_efficient_loading`, before Accelerate broadcasts rank 0's)
        # stay meta until [`map_base`] puts the main process's θ_0 file in their place
        self.base = {
            name: local.detach() if local.is_meta else local.detach().to(self.device, copy=True)
            for name, (local, _, _) in parts.items()
        }
        self.offsets = {name: offset for name, (_, offset, _) in parts.items()}
        self.shapes = {name: global_shape(state_dict[name]) for name in names}
        self.sharded = sharded
        self.base_file = None
        self.best, self.accumulators, self.winners, self.num_tasks = {}, {}, {}, 0

    def check_shapes(self, state_dict: Mapping[str, Tensor], task: str) -> None:
        """Raise if the model's weights no longer match θ_0 (a head resized between tasks, another model...)."""
        for name, shape in self.shapes.items():
            if name not in state_dict:
                raise ValueError(
                    f"at task {task!r} the model lacks the weight {name!r} it had at the start: MagMax needs the same "
                    "architecture for every task (do not replace or resize the model)."
                )
            if global_shape(state_dict[name]) != shape:
                raise ValueError(
                    f"the weight {name!r} has shape {global_shape(state_dict[name])} at task {task!r} but {shape} at "
                    "the start: MagMax needs parameters of the same shape for every task. Size the classification "
                    "head for all classes from the start (class-incremental learning with "
                    "`restrict_loss_to_task_classes=True`) instead of resizing it."
                )

    def write_base(self, path: str) -> str:
        """Write θ_0 (this rank's part) to the safetensors file `path` (atomically); returns its sha256."""
        from safetensors.torch import save_file

        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp"
        save_file({k: v.contiguous().cpu() for k, v in self.base.items()}, tmp)
        digest = file_sha256(tmp)
        os.replace(tmp, path)
        return digest

    def map_base(self, path: str) -> None:
        """Hold θ_0 memory-mapped from `path` (written by [`write_base`]) instead of a copy in memory.

        Only on the CPU (another `merge_device` keeps its copy, except for meta weights, which are read from the file).
        The file must hold the same tensors, bit for bit.
        """
        mapped = map_safetensors(path)
        for name, tensor in self.base.items():
            other = mapped.get(name)
            if other is None or other.dtype != tensor.dtype or other.shape != tensor.shape:
                raise CheckpointError(f"{path!r} does not hold θ_0's tensor {name!r} as the run took it.")
        if self.device.type != "cpu":  # a copy on the device; only meta weights are taken from the file
            self.base = {n: mapped[n].to(self.device) if t.is_meta else t for n, t in self.base.items()}
            return
        self.base = {name: mapped[name] for name in self.base}
        self.base_file = path

    # -- the merge -------------------------------------------------------------------------------------------------

    def local(self, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The part of each task-vector tensor of `state_dict` that this rank holds (the layout θ_0 was taken in)."""
        missing = [name for name, base in self.base.items() if base.is_meta]
        if missing:
            raise ValueError(
                f"θ_0 was taken from meta weights on this rank ({missing[0]!r}, {len(missing)} tensors: FSDP's "
                "`cpu_ram_efficient_loading` loads the model on the main process only) and the main process's θ_0 "
                "file (output_dir/magmax_base/) is not visible here: put `output_dir` on a file system every rank "
                "sees, or set `fsdp_cpu_ram_efficient_loading: false`."
            )
        out = {}
        for name, base in list(self.base.items()):
            tensor, offset, sharded = local_part(state_dict[name])
            if sharded and tuple(base.shape) == self.shapes.get(name) and tuple(tensor.shape) != tuple(base.shape):
                base = self._take_shard(name, tensor, offset)
            if tuple(tensor.shape) != tuple(base.shape) or offset != self.offsets.get(name, 0):
                raise ValueError(
                    f"this rank holds {tuple(tensor.shape)} elements of {name!r} at offset {offset}, but held "
                    f"{tuple(base.shape)} at offset {self.offsets.get(name, 0)} when θ_0 was taken: keep the same "
                    "sharding for the whole run."
                )
            out[name] = tensor
        return out

    def _check_shardable(self) -> None:
        """Raise for what cannot run on sharded weights (FSDP2 shards, ZeRO-3 partitions)."""
        if self.track_winners:
            raise ValueError(
                "`save_provenance` is not supported on sharded (FSDP2 / ZeRO-3) weights: the winner maps would be "
                "split over the ranks. Train under DDP or one process, or drop `save_provenance`."
            )
        if not self.spec.merge_class.blockwise:
            raise ValueError(
                f"merge_method={self.spec.method!r} is not supported on sharded (FSDP2 / ZeRO-3) weights: it needs "
                "each whole tensor (an SVD) and norms over the whole model, which no rank holds. Train under DDP, or "
                "use magmax, average, task_arithmetic, random_mix or ties."
            )

    def _take_shard(self, name: str, shard: Tensor, offset: int) -> Tensor:
        """Keep only this rank's part of a θ_0 taken whole (before Accelerate sharded the model with FSDP2, or before
        DeepSpeed partitioned it): a view of the memory-mapped file, or a copy that frees the whole tensor."""
        self._check_shardable()
        if self.num_tasks and offset != self.offsets.get(name, 0):
            raise ValueError(
                f"this rank holds the elements of {name!r} from offset {offset}, but its merge state was folded from "
                f"offset {self.offsets.get(name, 0)}: resume with the same number of processes and FSDP layout."
            )
        # FSDP2's rows and ZeRO-3's partitions alike: one contiguous range of the flattened whole tensor
        part = self.base[name].reshape(-1).narrow(0, offset, shard.numel()).view(shard.shape)
        self.base[name] = part if self.base_file is not None else part.clone()
        self.offsets[name] = offset
        self.sharded = True
        return self.base[name]

    @torch.no_grad()
    def fold(self, state_dict: Mapping[str, Tensor], task: str) -> None:
        """Fold `τ_t = θ_t − θ_0` (fp32 for half-precision weights) into the running merge; non-finite τ is an error."""
        finetuned = self.local(state_dict)
        # checked before anything is folded: a bad task leaves the state as is (on every rank, when sharded)
        bad = torch.tensor([int((~torch.isfinite(theta)).sum()) for theta in finetuned.values()], dtype=torch.int64)
        if self.sharded and _distributed():
            import torch.distributed as dist

            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        for (name, _), count in zip(finetuned.items(), bad.tolist()):
            if count:
                where = " (in one rank's shard)" if self.sharded else ""
                raise ValueError(
                    f"the task vector of task {task!r} has {count} non-finite value(s) (NaN/Inf) in tensor "
                    f"{name!r}{where}: training diverged. Lower the learning rate (or use `max_grad_norm`) and train "
                    "that task again; it is not merged."
                )
        needs_stats = self.spec.merge_class.needs_tensor_stats
        for name, theta in finetuned.items():
            base = self.base[name]
            tau = subtract(theta, base, device=self.device)
            if self.selecting:
                self.best[name] = self._select(name, theta, tau)
                continue
            if self.num_tasks == 0:
                self.accumulators[name] = self.spec.accumulator(name, offset=self.offsets.get(name, 0))
            accumulator = self.accumulators[name]
            reduce = shard_reduce(state_dict[name]) if needs_stats else None
            if reduce is not None:  # ties on a shard: the whole task vector's threshold, from all ranks' histograms
                # the accumulator reads `thresholds[num_tasks]`; the earlier tasks' are not needed any more
                accumulator.thresholds = [None] * accumulator.num_tasks + [self.spec.tensor_stat(tau, reduce=reduce)]
            accumulator.update(tau)
        self.num_tasks += 1

    def _select(self, name: str, theta: Tensor, tau: Tensor) -> Tensor:
        """θ_best after folding `τ = θ − θ_0`: the core's accumulator chooses on `τ_best = subtract(θ_best, θ_0)`."""
        theta = theta.detach().to(self.device)
        if self.num_tasks == 0:
            if self.track_winners:
                self.winners[name] = torch.zeros(theta.shape, dtype=torch.uint8, device=self.device)
            return theta.clone()
        best = self.best[name]
        tau_best = subtract(best, self.base[name], device=self.device)
        accumulator = self.spec.accumulator(name, offset=self.offsets.get(name, 0), track_winners=self.track_winners)
        state = {
            "method": self.spec.method,
            "num_tasks": self.num_tasks,
            "selected": tau_best,
            "dtype": str(tau_best.dtype).removeprefix("torch."),
        }
        if self.track_winners:
            state["winners"] = self.winners[name]
        accumulator.load_state_dict(state)
        accumulator.update(tau)
        if self.track_winners:  # the core's own winners: ties go to the later task
            self.winners[name] = accumulator.state_dict()["winners"]
        # where the accumulator took τ, θ wins (where τ equals τ_best bit for bit, either θ gives that τ)
        taken = _bits(accumulator.result()) == _bits(tau)
        return torch.where(taken, theta, best)

    @torch.no_grad()
    def merged_task_vector(self, name: str) -> Tensor:
        """The merged task vector (unscaled) of one tensor: `subtract(θ_best, θ_0)` for the selecting methods."""
        if self.num_tasks == 0:
            raise ValueError("no task has been folded in yet: nothing to merge.")
        if self.selecting:
            return subtract(self.best[name], self.base[name], device=self.device)
        return self.accumulators[name].result(model_scale=self._model_scale())

    def _model_scale(self) -> float:
        """The spec's model-wide factor over all the accumulators (opcm), computed once per number of tasks."""
        if not self.spec.merge_class.needs_model_stats:
            return 1.0
        cached = getattr(self, "_scale_cache", None)
        if cached is None or cached[0] != self.num_tasks or cached[1] is not self.accumulators:
            cached = (self.num_tasks, self.accumulators, self.spec.model_scale(self.accumulators.values()))
            self._scale_cache = cached
        return cached[2]

    @torch.no_grad()
    def merged_tensor(self, name: str, scaling_coef: float) -> Tensor:
        """`θ_0 + λ · merge` for one tensor ([`~hf_magmax.merging.apply_merged`]: fp32 math, one cast)."""
        return apply_merged(self.base[name], self.merged_task_vector(name), scaling_coef)

    @torch.no_grad()
    def merged_state_dict(self, scaling_coef: float) -> dict[str, Tensor]:
        """`θ_0 + λ · merge` for every tensor of the task vectors (a new dict on `device`)."""
        return {name: self.merged_tensor(name, scaling_coef) for name in self.base}

    @torch.no_grad()
    def write_into(self, model: nn.Module, tensors: Callable[[str], Tensor]) -> None:
        """Copy `tensors(name)` into the model's weights in place (into the local shard of a DTensor, the partition of a
        ZeRO-3 parameter: the parameters DeepSpeed keeps gathered are then gathered again, on every rank)."""
        live = live_tensors(unwrap(model))
        for name in self.base:
            if name not in live:
                raise KeyError(f"the model has no weight {name!r} to write the merged value into.")
            target = local_part(live[name])[0]
            target.copy_(tensors(name).to(target.device, target.dtype))
        if any(getattr(live[name], "ds_tensor", None) is not None for name in self.base):
            sync_zero3_parameters([live[name] for name in self.base])  # ZeRO-3: the gathered copies follow

    # -- memory ----------------------------------------------------------------------------------------------------

    def state_tensors(self) -> dict[str, list[Tensor]]:
        """The tensors held: `"base"` (θ_0; memory-mapped when `base_file` is set) and `"merge"` (θ_best or the
        accumulators' running tensors)."""
        merge = list(self.best.values()) + list(self.winners.values())
        for accumulator in self.accumulators.values():
            merge += [v for v in accumulator.state_dict().values() if isinstance(v, Tensor)]
        return {"base": list(self.base.values()), "merge": merge}

    def resident_bytes(self) -> dict[str, int]:
        """Bytes of private memory the state holds: `base` (0 when θ_0 is memory-mapped), `merge`, and `total`."""
        tensors = self.state_tensors()
        base = 0 if self.base_file is not None else _nbytes(tensors["base"])
        merge = _nbytes(tensors["merge"])
        return {"base": base, "merge": merge, "total": base + merge}

    # -- checkpoints -----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, object]:
        """The running merge (θ_best or the accumulators), enough to continue folding after a restart."""
        return {
            "method": self.spec.method,
            "method_kwargs": dict(self.spec.method_options),
            "num_tasks": self.num_tasks,
            "accumulators": {name: acc.state_dict() for name, acc in self.accumulators.items()},
            "best": dict(self.best),
            "offsets": dict(self.offsets),
            "shapes": {name: list(shape) for name, shape in self.shapes.items()},
            "sharded": self.sharded,
            **({"winners": dict(self.winners)} if self.track_winners else {}),
        }

    def save(self, directory: str, rank: int | None = None) -> None:
        """Write the running merge to `directory/magmax_merge_state.pt`, or with `rank` (a sharded state: every rank
        calls it) to `directory/magmax_merge_state-rank{rank}.pt`; atomically. θ_0 is written once, by
        [`write_base`]."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, MERGE_STATE_NAME if rank is None else RANK_MERGE_STATE_NAME.format(rank=rank))
        torch.save(self.state_dict(), path + ".tmp")
        os.replace(path + ".tmp", path)

    @staticmethod
    def read(directory: str, device: str | torch.device = "cpu", rank: int | None = None) -> dict:
        """Read the merge state of a checkpoint (with `rank`: that rank's file of a sharded state); a missing or
        corrupt file is a [`CheckpointError`]."""
        merge_path = os.path.join(
            directory, MERGE_STATE_NAME if rank is None else RANK_MERGE_STATE_NAME.format(rank=rank)
        )
        if not os.path.isfile(merge_path):
            raise CheckpointError(
                f"{merge_path!r} is missing: the checkpoint is incomplete (interrupted while saving)."
            )
        try:
            merge_state = torch.load(merge_path, map_location=device, weights_only=True)
        except Exception as err:  # noqa: BLE001 - zip, pickle and OS errors alike
            raise CheckpointError(f"{merge_path!r} is truncated or corrupt ({type(err).__name__}: {err}).") from None
        if not isinstance(merge_state, Mapping) or "accumulators" not in merge_state or "best" not in merge_state:
            raise CheckpointError(
                f"{merge_path!r} is not a MagMax merge state of this version (no θ_best): resume a run written by "
                "this version, or train from the start."
            )
        return dict(merge_state)

    @staticmethod
    def read_base(path: str, sha256: str | None, checkpoint: str) -> dict[str, Tensor]:
        """θ_0 from the run's base file, memory-mapped, after checking its sha256 against the checkpoint's record."""
        if not os.path.isfile(path):
            raise CheckpointError(
                f"{path!r} is missing: the checkpoint {checkpoint!r} needs the run's θ_0 there (it is written once per "
                "run, in output_dir/magmax_base/); keep the checkpoint inside its run directory."
            )
        if sha256 is not None:
            digest = file_sha256(path)
            if digest != sha256:
                raise CheckpointError(
                    f"{path!r} is truncated or corrupt: its sha256 {digest[:16]}… is not the {sha256[:16]}… that "
                    f"the checkpoint {checkpoint!r} recorded (θ_0 must not change during a run)."
                )
        try:
            return map_safetensors(path)
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointError(f"{path!r} is truncated or corrupt ({type(err).__name__}: {err}).") from None

    def restore(self, base: Mapping[str, Tensor], merge_state: Mapping, base_file: str | None = None) -> None:
        """Load what [`read`] / [`read_base`] returned (θ_0 stays memory-mapped on the CPU)."""
        if merge_state["method"] != self.spec.method:
            raise ValueError(f"cannot load a `{merge_state['method']}` merge state into a `{self.spec.method}` one.")
        winners = merge_state.get("winners")
        if self.track_winners and int(merge_state["num_tasks"]) and winners is None:
            raise ValueError(
                "the checkpoint's merge state has no winner maps (it was written without `save_provenance`): resume "
                "with `save_provenance=False`, or train from the start."
            )
        on_cpu = self.device.type == "cpu"
        self.base = {name: t if on_cpu else t.to(self.device) for name, t in base.items()}
        self.base_file = base_file if on_cpu else None
        # the whole tensors' shapes (θ_0 may be the run's whole file while this rank's state holds shards of it)
        shapes = merge_state.get("shapes") or {}
        self.shapes = {name: tuple(shapes.get(name, t.shape)) for name, t in self.base.items()}
        self.offsets = {name: int(merge_state.get("offsets", {}).get(name, 0)) for name in self.base}
        self.sharded = bool(merge_state.get("sharded", False))
        self.num_tasks = int(merge_state["num_tasks"])
        self.best = {name: t.to(self.device) for name, t in merge_state["best"].items()}
        self.winners = {name: t.to(self.device) for name, t in (winners or {}).items()} if self.track_winners else {}
        self.accumulators = {}
        for name, acc_state in merge_state["accumulators"].items():
            accumulator = self.spec.accumulator(name, offset=self.offsets.get(name, 0))
            accumulator.load_state_dict(acc_state)
            self.accumulators[name] = accumulator
