# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""Start-up of the command line: `hf-magmax --help`, and `hf-magmax merge` up to the first tensor it reads.

Every run is a fresh process on a warm page cache; the table reports the median of `--repeats` runs, taken in
alternation so that a busy moment on a shared machine hits every row alike.

- `python -c pass`, `hf-magmax --help`, `hf-magmax merge --help`: the wall time of the whole process.
- `hf-magmax merge`, time to the first tensor read: the parent takes `time.time()` just before it starts the process;
  the process runs `hf_magmax.cli.main` (what the console script runs) with `hf_magmax.checkpoints._merged_blocks`
  (the function that reads the first row block of the first tensor) wrapped to take `time.time()` when it is first
  called, and prints the difference. Everything before it, Python start-up, imports, argument parsing, reading and
  checking every safetensors header and config, planning the output shards, is in the figure.
- `python -c "import torch, safetensors"`, timed the same way (the time when the imports are done): what any merge
  tool in Python pays before it can read a tensor. The target is the merge within 0.3 s of it.

The inputs are a tiny Llama base and two fine-tunes (built here with transformers), so the first read is the
start-up, not the disk. The modules the merge process has imported by the first read are listed under the table.

    python benchmarks/startup.py --output benchmarks/results/startup.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent

#: runs in the merge process: time the first call of `_merged_blocks`, report it and the top-level modules imported
_FIRST_READ = r"""
import json, os, sys, time
import hf_magmax.checkpoints as checkpoints

_merged_blocks, _seen = checkpoints._merged_blocks, []

def _timed(*args, **kwargs):
    if not _seen:
        _seen.append(time.time())
        modules = sorted({name.split(".")[0] for name in sys.modules})
        with open(os.environ["HF_MAGMAX_STARTUP_REPORT"], "w") as f:
            json.dump({"first_read": _seen[0], "modules": modules}, f)
    return _merged_blocks(*args, **kwargs)

checkpoints._merged_blocks = _timed
from hf_magmax.cli import main
sys.exit(main(sys.argv[1:]))
"""
_IMPORTS_DONE = r"""
import json, os, time
import torch, safetensors
with open(os.environ["HF_MAGMAX_STARTUP_REPORT"], "w") as f:
    json.dump({"first_read": time.time()}, f)
"""


def build_inputs(root: Path) -> tuple[Path, list[Path]]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(root / "base")
    models = []
    for t in range(2):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        model.save_pretrained(root / f"task{t}")
        models.append(root / f"task{t}")
    return root / "base", models


def wall(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    return time.perf_counter() - start


def to_first_read(cmd: list[str], env: dict[str, str], report: Path) -> tuple[float, list[str]]:
    report.unlink(missing_ok=True)
    start = time.time()
    subprocess.run(cmd, check=True, capture_output=True, env={**env, "HF_MAGMAX_STARTUP_REPORT": str(report)})
    data = json.loads(report.read_text())
    return data["first_read"] - start, data.get("modules", [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="runs per row; the median is reported (default: 7)")
    parser.add_argument("--output", type=Path, help="write the markdown report here (also printed)")
    args = parser.parse_args()

    paths = [str(ROOT / "src"), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base, models = build_inputs(tmp)
        merge_args = ["merge", "--base", str(base), "--models", *map(str, models)]
        merge_args += ["--output-dir", str(tmp / "out"), "--overwrite", "--no-progress"]
        py = sys.executable
        walls = {
            "`python -c pass`": [py, "-c", "pass"],
            "`hf-magmax --help`": [py, "-m", "hf_magmax.cli", "--help"],
            "`hf-magmax merge --help`": [py, "-m", "hf_magmax.cli", "merge", "--help"],
        }
        firsts = {
            '`python -c "import torch, safetensors"` (imports done)': [py, "-c", _IMPORTS_DONE],
            "`hf-magmax merge` (first tensor read)": [py, "-c", _FIRST_READ, *merge_args],
        }
        times: dict[str, list[float]] = {label: [] for label in [*walls, *firsts]}
        modules: list[str] = []
        for cmd in [*walls.values(), *firsts.values()]:  # one warm-up run each
            wall(cmd, {**env, "HF_MAGMAX_STARTUP_REPORT": str(tmp / "report.json")})
        for _ in range(args.repeats):
            for label, cmd in walls.items():
                times[label].append(wall(cmd, env))
            for label, cmd in firsts.items():
                seconds, found = to_first_read(cmd, env, tmp / "report.json")
                times[label].append(seconds)
                modules = found or modules
    med = {label: statistics.median(values) for label, values in times.items()}
    reference = med['`python -c "import torch, safetensors"` (imports done)']
    merge = med["`hf-magmax merge` (first tensor read)"]
    heavy = ("torch", "safetensors", "numpy", "huggingface_hub", "transformers", "peft", "yaml", "accelerate")
    lines = [
        "# Start-up of the command line",
        "",
        f"Fresh processes, warm page cache, median of {args.repeats} alternating runs; {os.cpu_count()} cores "
        f"({platform.machine()}), Python {platform.python_version()}, load average "
        f"{os.getloadavg()[0]:.2f} (1 min, after the runs).",
        "",
        "| command | seconds |",
        "|---|---:|",
        *(f"| {label} | {med[label]:.3f} |" for label in times),
        "",
        f"- `hf-magmax --help` ≤ 0.3 s: {med['`hf-magmax --help`']:.3f} s "
        f"({'met' if med['`hf-magmax --help`'] <= 0.3 else 'NOT met'})",
        f"- `hf-magmax merge` reads its first tensor within 0.3 s of `import torch, safetensors`: "
        f"{merge - reference:+.3f} s ({'met' if merge - reference <= 0.3 else 'NOT met'})",
        "- libraries the merge process has imported by its first tensor read: "
        + ", ".join(f"`{m}`" for m in modules if m in heavy)
        + "; not imported: "
        + ", ".join(f"`{m}`" for m in heavy if m not in modules),
        "",
        "Command: `python benchmarks/startup.py"
        + (f" --repeats {args.repeats}" if args.repeats != 7 else "")
        + (f" --output {args.output}" if args.output else "")
        + "`",
        "",
    ]
    report = "\n".join(lines)
    print(report)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(report)


if __name__ == "__main__":
    main()
