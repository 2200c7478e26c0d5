"""Worker of tests/test_zero3_state.py (2 processes, gloo, `DS_ACCELERATOR=cpu`): the merge state on DeepSpeed
ZeRO-3 partitions.

Each rank takes θ_0 whole (before `deepspeed.initialize` partitions the model, as the Trainer does), trains 3 tasks
(a few SGD steps each, each rank its own batch) under ZeRO-3, and folds its partitions (`param.ds_tensor`, a flat
slice from `rank · partition size`) into a `MergeState`, which keeps only its part of θ_0; the merged partition is
written back into the model. For the check only, each θ_t is gathered (`GatheredParameters`) and folded into a
one-process `MergeState`. Writes `result_rank<r>.json`.
"""

import argparse
import json
import os

import deepspeed
import torch
import torch.distributed as dist
from torch import nn

from hf_magmax.merging import MergeSpec
from hf_magmax.trainer import MergeState


SPECS = {
    "magmax": MergeSpec("magmax"),
    "random_mix": MergeSpec("random_mix", seed=3),
    "average": MergeSpec("average"),
    "ties": MergeSpec("ties", density=0.3),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build(dtype):
    torch.manual_seed(0)
    # 5 × 48 + 5: sizes that do not split evenly (padded partitions); 64 × 320 above `_RADIX_MIN_NUMEL`
    return nn.Sequential(
        nn.Linear(24, 64), nn.Tanh(), nn.Linear(64, 320), nn.Tanh(), nn.Linear(320, 48), nn.Tanh(), nn.Linear(48, 5)
    ).to(dtype)


def gathered(module):
    params = dict(module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {name: p.detach().clone() for name, p in params.items()}


def run(method, dtype, rank):
    spec = SPECS[method]
    model = build(DTYPES[dtype])
    sharded, single = MergeState(spec), MergeState(spec)
    sharded.snapshot(model.state_dict())  # whole: the model is not partitioned yet
    single.snapshot(model.state_dict())
    config = {
        "train_micro_batch_size_per_gpu": 8,
        "zero_optimization": {"stage": 3},
        "optimizer": {"type": "SGD", "params": {"lr": 0.5}},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": dtype == "bf16"},
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    module = engine.module
    for task in range(3):
        generator = torch.Generator().manual_seed(100 * task + rank)
        for _ in range(2):
            x = torch.randn(8, 24, generator=generator).to(DTYPES[dtype])
            loss = engine(x).float().pow(2).mean() * (task + 1)
            engine.backward(loss)
            engine.step()
        sharded.fold(dict(module.named_parameters()), task=f"t{task}")
        single.fold(gathered(module), task=f"t{task}")
    coef = spec.coef
    equal_parts = all(
        torch.equal(
            sharded.merged_tensor(name, coef),
            single.merged_tensor(name, coef).flatten()[offset : offset + sharded.base[name].numel()],
        )
        for name, offset in sharded.offsets.items()
    )
    sharded.write_into(module, lambda name: sharded.merged_tensor(name, coef))
    whole = gathered(module)
    equal_model = all(torch.equal(whole[name], single.merged_tensor(name, coef)) for name in single.base)
    return {
        "equal_parts": equal_parts,
        "equal_model": equal_model,
        "sharded": sharded.sharded,
        "trained": all(bool(single.merged_task_vector(name).abs().sum() > 0) for name in single.base),
        "rank_bytes": sharded.resident_bytes(),
        "one_process_bytes": single.resident_bytes(),
        "params": sum(t.numel() for t in single.base.values()),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result = {"world_size": world}
    for dtype in DTYPES:
        for method in SPECS:
            result[f"{method}-{dtype}"] = run(method, dtype, rank)
    with open(os.path.join(args.output_dir, f"result_rank{rank}.json"), "w") as f:
        json.dump(result, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
