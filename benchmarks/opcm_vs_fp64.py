# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""Benchmark: how far two fp32 OPCM merges (hf_magmax's, FusionBench's) are from the same merge computed in fp64.

OPCM's projection is per tensor (each weight is projected against its own running sum), and its rescale is one
model-wide factor. So for a few tensors this recomputes the running sum `S` in fp64 from the inputs
(`opcm_project` in fp64, task after task), fits each output's merged task vector to it, `θ − θ_0 ≈ c · S` (least
squares: `c` is that output's model-wide factor), and reports `c` and the residual `‖θ − θ_0 − c S‖ / ‖θ − θ_0‖`:
what is left is the rounding of the fp32 computation, amplified where the projection is ill-conditioned.

The two outputs: `hf-magmax merge --method opcm --dtype float32` and `benchmarks/_fusionbench_opcm.py`, on the
inputs of `benchmarks/opcm_merge.py`:

    python benchmarks/opcm_vs_fp64.py --base WORK/ckpts-100m/base --models WORK/ckpts-100m/task{0..7} \
        --outputs hf_magmax=OURS_FP32_DIR fusion_bench=FB_DIR
"""

import argparse
from pathlib import Path


DEFAULT_TENSORS = [
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.5.mlp.down_proj.weight",
    "model.layers.11.mlp.up_proj.weight",
    "lm_head.weight",
    "model.layers.3.input_layernorm.weight",
    "model.embed_tokens.weight",
]


def read(directory: Path, name: str):
    from safetensors import safe_open

    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            if name in f.keys():
                return f.get_tensor(name).double()
    raise KeyError(f"{name} is not in {directory}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--models", type=Path, nargs="+", required=True, help="the fine-tunes, in task order")
    parser.add_argument("--outputs", nargs="+", required=True, help="LABEL=DIR of each merged model to check")
    parser.add_argument("--tensors", nargs="+", default=DEFAULT_TENSORS)
    parser.add_argument("--alpha", type=float, default=0.5)
    args = parser.parse_args()

    from hf_magmax.merging import opcm_project, opcm_projects

    outputs = dict(item.split("=", 1) for item in args.outputs)
    print("| tensor | projected | " + " | ".join(f"{label}: c | {label}: residual" for label in outputs) + " |")
    print("|---|---|" + "---:|---:|" * len(outputs))
    for name in args.tensors:
        theta_0 = read(args.base, name)
        task_vectors = [read(model, name) - theta_0 for model in args.models]
        projects = opcm_projects(name, task_vectors[0].shape)
        total = task_vectors[0].clone()
        for task_vector in task_vectors[1:]:
            total += opcm_project(total, task_vector, args.alpha) if projects else task_vector
        cells = []
        for directory in outputs.values():
            merged = read(Path(directory), name) - theta_0
            c = float((merged * total).sum() / (total * total).sum())
            cells += [f"{c:.6f}", f"{float((merged - c * total).norm() / merged.norm()):.3g}"]
        print(f"| `{name}` | {'yes' if projects else 'no'} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
