# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""FusionBench's own general OPCM on checkpoint directories, for `benchmarks/opcm_merge.py`.

Run with the python of the virtual environment where `fusion-bench` (>= 0.2.33) is installed (it is not a dependency
of hf_magmax):

    FB_PYTHON benchmarks/_fusionbench_opcm.py --base BASE --models M1 M2 ... --output OUT --alpha 0.5 \
        --timings timings.json --max-cpu-seconds 1800

This runs `fusion_bench.method.opcm.opcm_general.OPCM` (FusionBench's config `method/opcm/opcm_general.yaml`: any
model pool; the weight of every `nn.Linear` projected with a full SVD, every other parameter added, the model-wide
rescale after every task) with `shuffle_order=False` (the tasks in the order given, as hf_magmax merges them),
`save_on_every_step=False` and no evaluation, on the pool FusionBench builds for causal language models
(`fusion_bench.modelpool.CausalLMPool`: `_pretrained_` and one entry per fine-tune, each loaded with
`AutoModelForCausalLM.from_pretrained` in `--dtype`), and writes the merged model with `save_pretrained`.

Nothing here changes FusionBench's arithmetic. Two things are added around it:

- FusionBench's `fusion_bench.method.opcm` package `__init__` imports its CLIP variants, which import names that
  transformers 5 removed (`CLIPVisionTransformer`), so `import fusion_bench.method.opcm.opcm_general` fails there; the
  module is then loaded from its file unchanged, without the package `__init__` ([`load_fusion_bench_opcm`]).
- The CPU and wall time at the start of every task's layer-wise merge are written to `--timings` (JSON) as the run
  goes; with `--max-cpu-seconds`, the run stops at the first task boundary past that much CPU time and writes no
  model (`"completed": false`), so that a long run is capped with what it measured.

FusionBench runs OPCM in the dtype the models are loaded in: on the CPU, `torch.linalg.svd` has no bf16 kernel, so
bf16 checkpoints are loaded in fp32 (`--dtype float32`, the default).
"""

import argparse
import importlib
import json
import logging
import sys
import time
import types
from pathlib import Path


class _CpuBudgetSpent(Exception):
    pass


def load_fusion_bench_opcm() -> type:
    """FusionBench's general `OPCM` class, from `fusion_bench/method/opcm/opcm_general.py` unchanged: imported
    normally where the package imports, else without the package `__init__` (its CLIP variants fail to import under
    transformers 5)."""
    try:
        from fusion_bench.method.opcm.opcm_general import OPCM
    except ImportError:
        import fusion_bench.method

        package = types.ModuleType("fusion_bench.method.opcm")
        package.__path__ = [str(Path(fusion_bench.method.__file__).parent / "opcm")]
        sys.modules["fusion_bench.method.opcm"] = package
        OPCM = importlib.import_module("fusion_bench.method.opcm.opcm_general").OPCM
    return OPCM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="θ_0: a transformers causal-LM directory")
    parser.add_argument("--models", nargs="+", required=True, help="the fine-tunes, in task order")
    parser.add_argument("--output", required=True, help="directory of the merged model (save_pretrained)")
    parser.add_argument("--alpha", type=float, default=0.5, help="OPCM's alpha (FusionBench's default: 0.5)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="dtype the models load in")
    parser.add_argument("--timings", type=Path, required=True, help="JSON file of the CPU/wall time at each task")
    parser.add_argument("--max-cpu-seconds", type=float, help="stop at the first task boundary past this CPU time")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import torch
    from fusion_bench.modelpool import CausalLMPool

    OPCM = load_fusion_bench_opcm()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    marks: list[dict] = []

    def mark(event: str) -> None:
        marks.append({"event": event, "cpu_s": time.process_time() - cpu0, "wall_s": time.perf_counter() - wall0})
        record = {"completed": event == "done", "num_tasks": len(args.models), "marks": marks}
        args.timings.write_text(json.dumps(record, indent=1))

    class TimedOPCM(OPCM):
        """FusionBench's OPCM; only the time at the start of each task's layer-wise merge is recorded."""

        def _layer_wise_merge(self, merged_model, pretrained_model, task_model, model_name):
            mark(f"start {model_name}")
            if args.max_cpu_seconds is not None and marks[-1]["cpu_s"] > args.max_cpu_seconds:
                raise _CpuBudgetSpent
            return super()._layer_wise_merge(merged_model, pretrained_model, task_model, model_name)

    torch.set_grad_enabled(False)
    models = {"_pretrained_": args.base, **{f"task{t}": path for t, path in enumerate(args.models)}}
    pool = CausalLMPool(models, tokenizer=None, model_kwargs={"torch_dtype": args.dtype})
    algorithm = TimedOPCM(
        alpha=args.alpha, shuffle_order=False, save_on_every_step=False, evaluate_on_every_step=False
    )
    try:
        merged = algorithm.run(pool)
    except _CpuBudgetSpent:
        mark("stopped: --max-cpu-seconds spent")
        return
    mark("merged")
    merged.save_pretrained(args.output)
    mark("done")


if __name__ == "__main__":
    main()
