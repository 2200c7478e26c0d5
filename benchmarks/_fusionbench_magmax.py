# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""FusionBench's own MagMax on checkpoint directories, for `benchmarks/merge_checkpoints.py`.

Run with the python of the virtual environment where `fusion-bench` is installed (it is not a dependency of
hf_magmax):

    benchmarks/_work/fb-venv/bin/python benchmarks/_fusionbench_magmax.py --base BASE --models M1 M2 ... \
        --output OUT --scaling-factor 0.5 --dtype bfloat16

FusionBench merges a model pool in memory. This loads it the way FusionBench itself does for causal language models
(`fusion_bench.modelpool.CausalLMPool`: `_pretrained_` and one entry per fine-tune, each loaded with
`AutoModelForCausalLM.from_pretrained` when the algorithm asks for it, in `--dtype`), runs
`fusion_bench.method.magmax.MagMaxAlgorithm` (which keeps θ_0 and the running selection, and loads one fine-tune at
a time), and writes the merged model with `save_pretrained`. Nothing here changes FusionBench's arithmetic.

`--algorithm hf_magmax` runs hf_magmax's FusionBench algorithm instead
(`hf_magmax.integrations.fusion_bench.HfMagMaxAlgorithm`, MagMax, same λ) on the same pool: hf_magmax must be
importable there (`PYTHONPATH=src`), as `benchmarks/integrations.py` arranges.
"""

import argparse
import logging


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="θ_0: a transformers causal-LM directory")
    parser.add_argument("--models", nargs="+", required=True, help="the fine-tunes, in task order")
    parser.add_argument("--output", required=True, help="directory of the merged model (save_pretrained)")
    parser.add_argument("--scaling-factor", type=float, default=0.5, help="λ (FusionBench's default: 0.5)")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], required=True, help="dtype the models load in")
    parser.add_argument(
        "--algorithm",
        choices=["fusion_bench", "hf_magmax"],
        default="fusion_bench",
        help="FusionBench's own MagMaxAlgorithm (default) or hf_magmax's HfMagMaxAlgorithm",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import torch
    from fusion_bench.method.magmax import MagMaxAlgorithm
    from fusion_bench.modelpool import CausalLMPool

    torch.set_grad_enabled(False)
    models = {"_pretrained_": args.base, **{f"task{t}": path for t, path in enumerate(args.models)}}
    pool = CausalLMPool(models, tokenizer=None, model_kwargs={"torch_dtype": args.dtype})
    if args.algorithm == "hf_magmax":
        from hf_magmax.integrations.fusion_bench import HfMagMaxAlgorithm

        algorithm = HfMagMaxAlgorithm(method="magmax", scaling_coef=args.scaling_factor)
    else:
        algorithm = MagMaxAlgorithm(scaling_factor=args.scaling_factor, inplace=True)
    merged = algorithm.run(pool)
    merged.save_pretrained(args.output)


if __name__ == "__main__":
    main()
