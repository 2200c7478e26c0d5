# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""Benchmark: MagMax through mergekit and FusionBench (`hf_magmax.integrations`) vs `hf-magmax merge`, in one run.

On the checkpoints of `benchmarks/merge_checkpoints.py` (a Llama from a config plus T fine-tunes: the base plus seeded
noise, safetensors in `--dtype`), each row a fresh subprocess, inputs in the page cache (read once before):

- `hf-magmax merge --method magmax` (λ = 0.5): the reference;
- `hf-magmax mergekit-yaml` with `merge_method: magmax` (mergekit's own `run_merge`, `--lazy-unpickle`, CPU, with
  hf_magmax's method registered), and with mergekit's own `task_arithmetic` (λ = 0.5, same YAML shape) to show what
  mergekit's machinery costs by itself;
- FusionBench (`benchmarks/_fusionbench_magmax.py`, a `CausalLMPool`): hf_magmax's `HfMagMaxAlgorithm` and
  FusionBench's own `MagMaxAlgorithm`, both MagMax with λ = 0.5.

Every MagMax output is compared with the reference: the integrations must agree bit for bit (0 elements differ);
FusionBench's own MagMax agrees in fp32 and differs by bf16 roundings in bf16 (benchmarks/README.md).

mergekit must be importable by this Python (`pip install "hf_magmax[mergekit]"`); FusionBench lives in a virtual
environment on top of it (`python -m venv --system-site-packages VENV && VENV/bin/pip install fusion-bench`), passed
as `--fusionbench-python VENV/bin/python`. Run:

    python benchmarks/integrations.py --size 100m --num-tasks 4 --dtype bfloat16 float32 --threads 1 \
        --fusionbench-python VENV/bin/python --output benchmarks/results/integrations.md

Smoke run: `python benchmarks/integrations.py --size tiny --num-tasks 2 --output /tmp/integrations.md`.
"""

from __future__ import annotations

import argparse
import os
import platform
import runpy
import shutil
import sys
import time
from pathlib import Path


HERE = Path(__file__).resolve().parent
_BENCH = runpy.run_path(str(HERE / "merge_checkpoints.py"), run_name="merge_checkpoints")
build_checkpoints, measure, agreement = _BENCH["build_checkpoints"], _BENCH["measure"], _BENCH["agreement"]
warm_page_cache, input_files, SIZES = _BENCH["warm_page_cache"], _BENCH["input_files"], _BENCH["SIZES"]

SCALING_COEF = 0.5


def commands(args, work: Path, base: Path, models: list[Path], dtype: str) -> list[tuple[str, list[str] | None, str]]:
    """(label, command or None, note) of every row; the first row is the reference."""
    import yaml

    cli = [sys.executable, "-m", "hf_magmax.cli", "--log-level", "WARNING"]
    rows = []

    def out(label: str) -> Path:
        return work / "out" / f"{dtype}-{label}"

    merge = [*cli, "merge", "--base", str(base), "--models", *map(str, models), "--method", "magmax"]
    rows.append(("hf-magmax merge", [*merge, "--scaling-coef", str(SCALING_COEF), "--no-progress",
                                     "--output", str(out("hf-magmax merge"))], ""))  # fmt: skip
    try:
        import mergekit  # noqa: F401

        mergekit_note = ""
    except ImportError:
        mergekit_note = 'mergekit is not installed here (pip install "hf_magmax[mergekit]")'
    for method, label in (("magmax", "mergekit + hf_magmax magmax"), ("task_arithmetic", "mergekit task_arithmetic")):
        parameters = {"scaling_coef": SCALING_COEF} if method == "magmax" else {"lambda": SCALING_COEF}
        config = {"merge_method": method, "base_model": str(base), "parameters": parameters}
        config["models"] = [{"model": str(m), **({"parameters": {"weight": 1.0}} if method != "magmax" else {})}
                            for m in models]  # fmt: skip
        config_file = work / f"{method}-{dtype}.yml"
        config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        command = [*cli, "mergekit-yaml", str(config_file), str(out(label)), "--lazy-unpickle", "--no-cuda"]
        rows.append((label, None if mergekit_note else [*command, "--quiet", "--no-copy-tokenizer"], mergekit_note))
    fb_note = "" if args.fusionbench_python and args.fusionbench_python.is_file() else "no --fusionbench-python"
    for algorithm, label in (("hf_magmax", "FusionBench + hf_magmax magmax"), ("fusion_bench", "FusionBench magmax")):
        command = [str(args.fusionbench_python), str(HERE / "_fusionbench_magmax.py"), "--base", str(base)]
        command += ["--models", *map(str, models), "--output", str(out(label)), "--scaling-factor", str(SCALING_COEF)]
        rows.append((label, None if fb_note else [*command, "--dtype", dtype, "--algorithm", algorithm], fb_note))
    return rows


def run_dtype(args, work: Path, dtype: str, env: dict) -> list[str]:
    base, models, num_params = build_checkpoints(work, args.size, args.num_tasks, dtype)
    inputs = [base, *models]
    input_gb = sum(f.stat().st_size for f in input_files(inputs) if f.suffix == ".safetensors") / 1e9
    rows = commands(args, work, base, models, dtype)
    reference = work / "out" / f"{dtype}-{rows[0][0]}"
    lines = [
        f"### {dtype}",
        "",
        f"Llama from a config, {num_params / 1e6:.1f}M parameters, {dtype} safetensors; base + T={len(models)} "
        f"fine-tunes ({input_gb:.2f} GB of inputs), warm page cache.",
        "",
        "| run | wall (s) | CPU time (s) | peak anon. memory (MiB) | vs `hf-magmax merge`: max abs. diff | elements "
        "that differ |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, command, note in rows:
        if command is None:
            lines.append(f"| {label} | not run: {note} | | | | |")
            continue
        out = work / "out" / f"{dtype}-{label}"
        shutil.rmtree(out, ignore_errors=True)
        warm_page_cache(inputs)
        best = None
        for _ in range(args.repeats):
            shutil.rmtree(out, ignore_errors=True)
            result = measure(command, work / "logs" / f"{dtype}-{label}.log", env)
            best = result if best is None or result[0] < best[0] else best
        wall, peak, cpu = best
        compared = ""
        if out != reference and "magmax" in label:
            agree = agreement(reference, out)
            if "error" in agree:
                compared = f" {agree['error']} | |"
            else:
                compared = f" {agree['max_abs']:.3g} | {agree['differ'] * 100:.3g}% |"
        lines.append(f"| {label} | {wall:.2f} | {cpu:.2f} | {peak:.0f} |{compared or ' | |'}")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-tasks", type=int, default=4, help="T, the number of fine-tuned models (default: 4)")
    parser.add_argument("--size", choices=sorted(SIZES), default="100m", help="model size preset (default: 100m)")
    parser.add_argument("--dtype", nargs="+", choices=["bfloat16", "float32"], default=["bfloat16", "float32"])
    parser.add_argument("--repeats", type=int, default=1, help="runs per row; the fastest is reported")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of every run (default: unset)")
    parser.add_argument("--work-dir", type=Path, default=HERE / "_work" / "merge_checkpoints")
    parser.add_argument("--fusionbench-python", type=Path, help="python of a virtual environment with fusion-bench")
    parser.add_argument("--output", type=Path, help="write the markdown report here (also printed)")
    args = parser.parse_args()

    work = args.work_dir
    (work / "logs").mkdir(parents=True, exist_ok=True)
    env = _BENCH["contender_env"](args.threads)
    started, load_before = time.perf_counter(), os.getloadavg()
    sections = [line for dtype in args.dtype for line in run_dtype(args, work, dtype, env)]
    shutil.rmtree(work / "out", ignore_errors=True)
    load_after = os.getloadavg()
    threads = f"{args.threads} thread(s) per run" if args.threads else "torch's default threads"
    text = "\n".join(
        [
            "# MagMax through mergekit and FusionBench (hf_magmax.integrations) vs `hf-magmax merge`",
            "",
            f"One run of `benchmarks/integrations.py` (fastest of {args.repeats} per row; each row a fresh "
            f"subprocess, Python start-up and imports included). CPU: {os.cpu_count()} cores "
            f"({platform.processor() or platform.machine()}), {threads}, Python {platform.python_version()}; load "
            f"average (1 min) {load_before[0]:.2f} before and {load_after[0]:.2f} after the "
            f"{(time.perf_counter() - started) / 60:.1f} min run (a shared machine: read the CPU times). Peak "
            "anonymous memory: RssAnon of the process tree, sampled every 10 ms. λ = 0.5 everywhere.",
            "",
            *sections,
            f"Command: `python benchmarks/integrations.py {' '.join(sys.argv[1:])}`",
            "",
        ]
    )
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)


if __name__ == "__main__":
    main()
