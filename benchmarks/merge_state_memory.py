# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""Bytes per parameter of `MergeState`, the Trainer's merge state, per method and dtype: 1 process vs 2 (FSDP2).

Measured on the code's own tensors (`MergeState.resident_bytes()`: private memory held; θ_0 memory-mapped from the
run's base file counts 0), after folding 3 task vectors of a ~2.4 M-parameter MLP:

- `before`: the previous design, θ_0 as a RAM copy + the core's `StateDictMerger` fed with `τ` (fp32 for bf16);
- `1 process`: `MergeState` with θ_0 memory-mapped from `magmax_base/` (what `MagMaxTrainer` does), θ_best for the
  selecting methods;
- `2 processes (per rank)`: `MergeState` on the local shards of `fully_shard`-ed modules (torchrun, gloo, CPU); θ_0's
  shard in RAM, or memory-mapped from a per-rank file. TIES folds its shards with the all-reduced histograms;
- `ZeRO-3, 2 processes (per rank)`: the same on DeepSpeed ZeRO-3 partitions (`deepspeed.initialize`, stage 3,
  `DS_ACCELERATOR=cpu`), when DeepSpeed is installed; θ_0's partition memory-mapped.

    python benchmarks/merge_state_memory.py            # runs the 2-process parts under torchrun itself
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile

import torch
from torch import nn


METHODS = ("magmax", "random_mix", "average", "task_arithmetic", "ties")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TASKS = 3


def build(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(512, 1536), nn.GELU(), nn.Linear(1536, 1024), nn.GELU(), nn.Linear(1024, 64)).to(
        dtype
    )


def perturbed(state: dict, task: int) -> dict:
    generator = torch.Generator().manual_seed(task)
    return {k: (v.float() + 1e-2 * torch.randn(v.shape, generator=generator)).to(v.dtype) for k, v in state.items()}


def one_process(method: str, dtype: torch.dtype, workdir: str) -> dict:
    from hf_magmax.merging import MergeSpec, StateDictMerger
    from hf_magmax.task_vectors import TaskVector
    from hf_magmax.trainer import MergeState

    spec = MergeSpec(method)
    theta_0 = {k: v.detach().clone() for k, v in build(dtype).state_dict().items()}
    params = sum(v.numel() for v in theta_0.values())
    # before: θ_0 in RAM + StateDictMerger on fp32 τ
    merger = StateDictMerger(spec)
    for task in range(TASKS):
        merger.update(TaskVector.from_state_dicts(theta_0, perturbed(theta_0, task)).vector)
    before = sum(v.numel() * v.element_size() for v in theta_0.values())
    for acc in merger.accumulators.values():
        before += sum(v.numel() * v.element_size() for v in acc.state_dict().values() if isinstance(v, torch.Tensor))
    # now: MergeState, θ_0 memory-mapped from the run's base file
    state = MergeState(spec)
    state.snapshot(theta_0)
    path = os.path.join(workdir, f"{method}-{str(dtype)[6:]}.safetensors")
    state.write_base(path)
    state.map_base(path)
    for task in range(TASKS):
        state.fold(perturbed(theta_0, task), task=str(task))
    # the merge is unchanged
    reference = merger.result()
    same = all(torch.equal(state.merged_task_vector(name), reference[name]) for name in reference)
    now = state.resident_bytes()
    return {"params": params, "before": before / params, "now": now["total"] / params, "same_merge": same}


def sharded(output: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from hf_magmax.merging import MergeSpec
    from hf_magmax.trainer import MergeState

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    rows = {}
    for dtype_name, dtype in DTYPES.items():
        for method in METHODS:
            model = build(dtype)
            params = sum(p.numel() for p in model.parameters())
            for layer in model:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            state = MergeState(MergeSpec(method))
            try:
                state.snapshot(model.state_dict())
            except ValueError:
                rows[f"{method}-{dtype_name}"] = None
                continue
            for task in range(TASKS):
                with torch.no_grad():
                    for p in model.parameters():
                        local = p.to_local()
                        generator = torch.Generator().manual_seed(1000 * task + rank)
                        local.add_((1e-2 * torch.randn(local.shape, generator=generator)).to(local.dtype))
                state.fold(model.state_dict(), task=str(task))
            in_ram = state.resident_bytes()["total"] / params
            path = os.path.join(output, f"base-{method}-{dtype_name}-rank{rank}.safetensors")
            state.write_base(path)  # this rank's θ_0 shard, memory-mapped like the 1-process base file
            state.map_base(path)
            rows[f"{method}-{dtype_name}"] = [in_ram, state.resident_bytes()["total"] / params]
    with open(os.path.join(output, f"rank{rank}.json"), "w") as f:
        json.dump(rows, f)
    dist.destroy_process_group()


def zero3(output: str) -> None:
    import deepspeed
    import torch.distributed as dist

    from hf_magmax.merging import MergeSpec
    from hf_magmax.trainer import MergeState

    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    rows = {}
    for dtype_name, dtype in DTYPES.items():
        for method in METHODS:
            params = sum(p.numel() for p in build(dtype).parameters())
            config = {
                "train_micro_batch_size_per_gpu": 1,
                "zero_optimization": {"stage": 3},
                "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
                "zero_allow_untested_optimizer": True,
                "bf16": {"enabled": dtype == torch.bfloat16},
            }
            model = build(dtype)  # (deepspeed.zero.Init on the CPU accelerator partitions fp32 models in bf16)
            engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
            model = engine.module
            state = MergeState(MergeSpec(method))
            state.snapshot(dict(model.named_parameters()))
            for task in range(TASKS):
                with torch.no_grad():
                    for p in model.parameters():
                        generator = torch.Generator().manual_seed(1000 * task + rank)
                        part = p.ds_tensor
                        part.add_((1e-2 * torch.randn(part.shape, generator=generator)).to(part.dtype))
                state.fold(dict(model.named_parameters()), task=str(task))
            path = os.path.join(output, f"z3-base-{method}-{dtype_name}-rank{rank}.safetensors")
            state.write_base(path)
            state.map_base(path)
            rows[f"{method}-{dtype_name}"] = state.resident_bytes()["total"] / params
    with open(os.path.join(output, f"zero3-rank{rank}.json"), "w") as f:
        json.dump(rows, f)
    dist.destroy_process_group()


def _launch(mode: str, workdir: str, env: dict | None = None) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path), **(env or {})}
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
         __file__, mode, workdir],
        check=True, env=env, capture_output=True,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sharded_output")
    parser.add_argument("--zero3_output")
    args = parser.parse_args()
    if args.sharded_output:
        sharded(args.sharded_output)
        return
    if args.zero3_output:
        zero3(args.zero3_output)
        return
    workdir = tempfile.mkdtemp(prefix="merge_state_memory")
    single = {(m, d): one_process(m, dt, workdir) for d, dt in DTYPES.items() for m in METHODS}
    _launch("--sharded_output", workdir)
    ranks = [json.load(open(os.path.join(workdir, f"rank{r}.json"))) for r in (0, 1)]
    zero3_ranks = None
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        pass
    else:
        _launch("--zero3_output", workdir, {"DS_ACCELERATOR": "cpu"})
        zero3_ranks = [json.load(open(os.path.join(workdir, f"zero3-rank{r}.json"))) for r in (0, 1)]
    params = next(iter(single.values()))["params"]
    print(f"merge state after {TASKS} tasks, {params:,} parameters; bytes per parameter of the whole model")
    print(
        "| method | dtype | before (θ_0 RAM + τ) | 1 process (θ_0 mmap) | 2 processes FSDP2, per rank, θ_0 shard in RAM "
        "| 2 processes FSDP2, per rank, θ_0 shard mmap | 2 processes ZeRO-3, per rank, θ_0 partition mmap "
        "| merge unchanged |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for (method, dtype), row in single.items():
        values = [r[f"{method}-{dtype}"] for r in ranks]
        per_rank = [" / ".join(f"{v[i]:.2f}" for v in values) for i in (0, 1)]
        z3 = "no deepspeed"
        if zero3_ranks is not None:
            z3 = " / ".join(f"{r[f'{method}-{dtype}']:.2f}" for r in zero3_ranks)
        print(
            f"| {method} | {dtype} | {row['before']:.2f} | {row['now']:.2f} | {per_rank[0]} | {per_rank[1]} | {z3} | "
            f"{'bit-equal' if row['same_merge'] else 'DIFFERS'} |"
        )
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
