"""Worker of tests/test_fsdp_state.py (run by torchrun, gloo, CPU): the merge state on FSDP2 (`fully_shard`) shards.

Each rank trains a small model sharded with `fully_shard` over 3 tasks (a few SGD steps each), folds its local shards
into a `MergeState`, and writes the merged shard into the model (TIES: each whole task vector's trim threshold from
the all-reduced histograms). For the check only, the whole θ_t are gathered
(`full_tensor()`) and folded into a one-process `MergeState` as the reference. Writes `result_rank<r>.json`.
"""

import argparse
import json
import os

import torch
import torch.distributed as dist
from torch import nn

from hf_magmax.merging import MergeSpec
from hf_magmax.trainer import MergeState


SPECS = {
    "magmax": MergeSpec("magmax"),
    "random_mix": MergeSpec("random_mix", seed=3),
    "average": MergeSpec("average"),
    "task_arithmetic": MergeSpec("task_arithmetic", scaling_coef=0.7),
    "ties": MergeSpec("ties", density=0.3),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build(dtype, mesh):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    # Linear(64, 320): 20480 elements, above the one-process histogram-select size (`_RADIX_MIN_NUMEL`), the others
    # below it (one process takes `kthvalue` there, the shards always the histograms); 5 rows: uneven shards
    model = nn.Sequential(
        nn.Linear(24, 64), nn.Tanh(), nn.Linear(64, 320), nn.Tanh(), nn.Linear(320, 48), nn.Tanh(), nn.Linear(48, 5)
    ).to(dtype)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full(model):
    return {name: t.full_tensor().clone() for name, t in model.state_dict().items()}


def run(method, dtype, mesh, rank):
    spec = SPECS[method]
    model = build(DTYPES[dtype], mesh)
    sharded, single = MergeState(spec), MergeState(spec)
    sharded.snapshot(model.state_dict())
    single.snapshot(full(model))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for task in range(3):
        generator = torch.Generator().manual_seed(100 * task + rank)  # each rank its own batch, as in data parallel
        for _ in range(2):
            x = torch.randn(8, 24, generator=generator).to(DTYPES[dtype])
            loss = model(x).float().pow(2).mean() * (task + 1)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        sharded.fold(model.state_dict(), task=f"t{task}")
        single.fold(full(model), task=f"t{task}")
    thresholds_equal = None
    if spec.merge_class.needs_tensor_stats:  # the last task's trim thresholds: from the shards = from the whole
        from hf_magmax.task_vectors import subtract
        from hf_magmax.trainer.state import shard_reduce

        live, whole = model.state_dict(), full(model)
        thresholds_equal = all(
            spec.tensor_stat(subtract(live[name].to_local(), sharded.base[name]), reduce=shard_reduce(live[name]))
            == spec.tensor_stat(subtract(whole[name], single.base[name]))
            for name in single.base
        )
    coef = spec.coef
    equal_shards = all(
        torch.equal(
            sharded.merged_tensor(name, coef),
            single.merged_tensor(name, coef)
            .flatten()[offset : offset + sharded.base[name].numel()]
            .view(sharded.base[name].shape),
        )
        for name, offset in sharded.offsets.items()
    )
    sharded.write_into(model, lambda name: sharded.merged_tensor(name, coef))
    gathered = full(model)
    equal_model = all(torch.equal(gathered[name], single.merged_tensor(name, coef)) for name in single.base)
    return {
        "equal_shards": equal_shards,
        "equal_model": equal_model,
        "thresholds_equal": thresholds_equal,
        "sharded": sharded.sharded,
        "rank_bytes": sharded.resident_bytes(),
        "one_process_bytes": single.resident_bytes(),
        "params": sum(t.numel() for t in single.base.values()),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    result = {"world_size": world}
    for dtype in DTYPES:
        for method in SPECS:
            result[f"{method}-{dtype}"] = run(method, dtype, mesh, rank)
    # refused on shards, with the reason: OPCM (whole-tensor SVDs) at once, the winner maps of `save_provenance` at the
    # first fold of a θ_0 taken whole (as the Trainer takes it before Accelerate shards the model)
    errors = {}
    for key, spec, track in (("opcm", MergeSpec("opcm"), False), ("provenance", MergeSpec("magmax"), True)):
        model = build(torch.float32, mesh)
        state = MergeState(spec, track_winners=track)
        try:
            state.snapshot(model.state_dict() if key == "opcm" else full(model))
            state.fold(model.state_dict(), task="t0")
            errors[key] = None
        except ValueError as err:
            errors[key] = str(err)
    # θ_0 from meta weights on rank 1 (FSDP's `cpu_ram_efficient_loading`): the main process's file replaces them
    model = build(torch.float32, mesh)
    whole = full(model)
    taken = whole if rank == 0 else {name: torch.empty_like(t, device="meta") for name, t in whole.items()}
    state, single, unmapped = MergeState(SPECS["magmax"]), MergeState(SPECS["magmax"]), MergeState(SPECS["magmax"])
    state.snapshot(taken)
    unmapped.snapshot(taken)
    single.snapshot(whole)
    path = os.path.join(args.output_dir, "base.safetensors")
    if rank == 0:
        state.write_base(path)
    dist.barrier()
    state.map_base(path)
    with torch.no_grad():
        for p in model.parameters():
            p.to_local().add_(0.1)
    state.fold(model.state_dict(), task="t0")
    single.fold(full(model), task="t0")
    result["meta_base_equal"] = all(
        torch.equal(
            state.merged_tensor(name, 0.5),
            single.merged_tensor(name, 0.5).flatten()[offset:][: part.numel()].view(part.shape),
        )
        for name, offset in state.offsets.items()
        for part in [state.base[name]]
    )
    errors["meta_unmapped"] = None
    if rank == 1:  # raises before any collective (rank 0, with real weights, would wait in the fold's all-reduce)
        try:
            unmapped.fold(model.state_dict(), task="t0")
        except ValueError as err:
            errors["meta_unmapped"] = str(err)
    result["errors"] = errors
    with open(os.path.join(args.output_dir, f"result_rank{rank}.json"), "w") as f:
        json.dump(result, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
