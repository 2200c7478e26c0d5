# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""Benchmark: streaming checkpoint merge (`hf-magmax merge`) vs the I/O floor and vs mergekit, in one run.

Builds a ~100M-parameter Llama base from a config plus T fine-tunes (the base plus seeded noise, bf16 safetensors),
then runs each contender in a fresh subprocess and measures its wall time and its peak anonymous memory (RssAnon of
the process tree, sampled every 10 ms; RSS would count the memory-mapped inputs):

- the I/O floor (`benchmarks/io_floor.py`): read every tensor of the T+1 inputs, write one output, no math;
- `hf-magmax merge` with magmax, task_arithmetic and ties;
- mergekit (`mergekit-yaml --lazy-unpickle`, CPU) with task_arithmetic and ties, same inputs, same λ/density;
- `hf-magmax merge` magmax with T=2, to show that memory does not grow with T.

mergekit pins its own dependencies, so it lives in a separate virtual environment:

    python -m venv benchmarks/_work/mk-venv
    benchmarks/_work/mk-venv/bin/pip install torch==2.13.0 mergekit

Run (the full run takes a few minutes and ~2.5 GB of disk under benchmarks/_work/):

    python benchmarks/merge_checkpoints.py --num-tasks 8 --size 100m --output benchmarks/results/merge_checkpoints.md

Smoke run: `python benchmarks/merge_checkpoints.py --num-tasks 2 --size tiny --output /tmp/bench.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path


HERE = Path(__file__).resolve().parent
SIZES = {
    # name: (vocab, hidden, intermediate, layers, heads)
    "tiny": (1000, 64, 128, 2, 4),
    "small": (8000, 256, 688, 4, 4),
    "100m": (16000, 768, 2048, 12, 12),
}


# ---------------------------------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------------------------------


def build_checkpoints(work: Path, size: str, num_tasks: int) -> tuple[Path, list[Path], int]:
    """Base + `num_tasks` fine-tunes (bf16 safetensors). Re-used if already built with the same settings."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab, hidden, intermediate, layers, heads = SIZES[size]
    stamp = {"size": size, "num_tasks": num_tasks, "version": 1}
    root = work / f"ckpts-{size}"
    if (root / "stamp.json").is_file() and json.loads((root / "stamp.json").read_text())["num_tasks"] >= num_tasks:
        base = root / "base"
        count = sum(t.numel() for t in load_file(base / "model.safetensors").values())
        return base, [root / f"task{t}" for t in range(num_tasks)], count
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(root / "base")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    count = sum(t.numel() for t in state.values())
    del model
    for t in range(num_tasks):
        generator = torch.Generator().manual_seed(1000 + t)
        task = {
            k: (v.float() + torch.randn(v.shape, generator=generator) * 0.01).to(v.dtype) for k, v in state.items()
        }
        (root / f"task{t}").mkdir()
        save_file(task, root / f"task{t}" / "model.safetensors", metadata={"format": "pt"})
        for extra in ("config.json", "generation_config.json"):
            shutil.copy(root / "base" / extra, root / f"task{t}" / extra)
        del task
    (root / "stamp.json").write_text(json.dumps(stamp))
    return root / "base", [root / f"task{t}" for t in range(num_tasks)], count


# ---------------------------------------------------------------------------------------------------------------------
# measuring a subprocess
# ---------------------------------------------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return found


def _rss_anon_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure(cmd: list[str], log: Path, env: dict[str, str]) -> tuple[float, float]:
    """Run `cmd`; return (wall seconds, peak RssAnon of its process tree in MiB). Raises if it fails."""
    with open(log, "w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        peak = 0
        while proc.poll() is None:
            pids, total, todo = set(), 0, [proc.pid]
            while todo:
                pid = todo.pop()
                if pid in pids:
                    continue
                pids.add(pid)
                total += _rss_anon_kib(pid)
                todo += _children(pid)
            peak = max(peak, total)
            time.sleep(0.01)
        wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {proc.returncode}; see {log}")
    return wall, peak / 1024


def warm_page_cache(paths: list[Path]) -> None:
    for path in paths:
        for file in path.glob("*.safetensors"):
            with open(file, "rb") as f:
                while f.read(1 << 24):
                    pass


# ---------------------------------------------------------------------------------------------------------------------
# contenders
# ---------------------------------------------------------------------------------------------------------------------


def hf_magmax_cmd(base: Path, models: list[Path], out: Path, method: str) -> list[str]:
    cmd = [sys.executable, "-m", "hf_magmax.cli", "--log-level", "WARNING", "merge", "--base", str(base)]
    cmd += ["--models", *map(str, models), "--method", method, "--output", str(out), "--no-progress"]
    if method == "ties":
        cmd += ["--density", "0.2"]
    return cmd


def mergekit_cmd(python: Path, base: Path, models: list[Path], out: Path, method: str, work: Path) -> list[str]:
    import yaml

    parameters = {"weight": 0.3} if method == "task_arithmetic" else {"weight": 1.0, "density": 0.2}
    config = {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(m), "parameters": dict(parameters)} for m in models],
        "parameters": {"normalize": method == "ties"},  # task_arithmetic: θ0 + 0.3·Στ; ties: disjoint mean (λ=1)
        "dtype": "float32",
        "out_dtype": "bfloat16",
    }
    config_file = work / f"mergekit-{method}-{len(models)}.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    script = python.parent / "mergekit-yaml"
    return [str(script), str(config_file), str(out), "--lazy-unpickle", "--no-cuda", "--quiet", "--no-copy-tokenizer"]


def max_abs_diff(a: Path, b: Path) -> tuple[float, float]:
    from safetensors.torch import load_file

    def load(d: Path) -> dict:
        state = {}
        for file in sorted(d.glob("*.safetensors")):
            state.update(load_file(file))
        return state

    left, right = load(a), load(b)
    if set(left) != set(right):
        return float("nan"), float("nan")
    worst = max(float((left[k].float() - right[k].float()).abs().max()) for k in left)
    differ = sum(int((left[k] != right[k]).sum()) for k in left) / sum(t.numel() for t in left.values())
    return worst, differ


# ---------------------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-tasks", type=int, default=8, help="T, the number of fine-tuned models (default: 8)")
    parser.add_argument("--size", choices=sorted(SIZES), default="100m", help="model size preset (default: 100m)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per contender; the fastest is reported")
    parser.add_argument(
        "--repeat-limit", type=float, default=120.0, help="a contender whose first run takes longer runs only once"
    )
    parser.add_argument("--work-dir", type=Path, default=HERE / "_work" / "merge_checkpoints")
    parser.add_argument(
        "--mergekit-python",
        type=Path,
        default=HERE / "_work" / "mk-venv" / "bin" / "python",
        help="python of the virtual environment where mergekit is installed",
    )
    parser.add_argument("--skip-mergekit", action="store_true")
    parser.add_argument(
        "--threads",
        type=int,
        help="OMP_NUM_THREADS of every contender (default: unset, torch's own choice); on a shared machine 1 keeps "
        "the runs from stalling on busy cores",
    )
    parser.add_argument("--output", type=Path, help="write the markdown report here (also printed)")
    args = parser.parse_args()

    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    base, models, num_params = build_checkpoints(work, args.size, args.num_tasks)
    small_t = min(2, args.num_tasks)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1", TOKENIZERS_PARALLELISM="false")
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    threads = f"{args.threads} thread(s) per run (OMP_NUM_THREADS)" if args.threads else "torch's default threads"
    input_gb = sum(f.stat().st_size for d in [base, *models] for f in d.glob("*.safetensors")) / 1e9
    warm_page_cache([base, *models])

    contenders: list[tuple[str, str, int, list[str] | None, str]] = []  # label, method, T, cmd, note
    outs: dict[str, Path] = {}

    def add(label: str, method: str, num_tasks: int, make_cmd, note: str = "") -> None:
        out = work / "out" / label.replace(" ", "_").replace("/", "_").replace("=", "")
        outs[label] = out
        contenders.append((label, method, num_tasks, make_cmd(out) if make_cmd else None, note))

    T = args.num_tasks
    floor_cmd = [sys.executable, str(HERE / "io_floor.py"), "--base", str(base), "--models"]
    add("I/O floor", "-", T, lambda out: [*floor_cmd, *map(str, models), "--output", str(out)])
    for method in ("magmax", "task_arithmetic", "ties"):
        add(f"hf_magmax {method}", method, T, lambda out, m=method: hf_magmax_cmd(base, models, out, m))
    mergekit_note = ""
    if args.skip_mergekit:
        mergekit_note = "skipped (--skip-mergekit)"
    elif not (args.mergekit_python.parent / "mergekit-yaml").is_file():
        mergekit_note = f"not installed at {args.mergekit_python.parent} (see the module docstring)"
    for method in ("task_arithmetic", "ties"):
        if mergekit_note:
            add(f"mergekit {method}", method, T, None, mergekit_note)
        else:
            add(
                f"mergekit {method}",
                method,
                T,
                lambda out, m=method: mergekit_cmd(args.mergekit_python, base, models, out, m, work),
            )
    add(
        f"I/O floor T={small_t}",
        "-",
        small_t,
        lambda out: [*floor_cmd, *map(str, models[:small_t]), "--output", str(out)],
    )
    add(
        f"hf_magmax magmax T={small_t}",
        "magmax",
        small_t,
        lambda out: hf_magmax_cmd(base, models[:small_t], out, "magmax"),
    )

    results: dict[str, tuple[float, float] | str] = {}
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    for label, _, _, cmd, note in contenders:
        if cmd is None:
            results[label] = note
            continue
        runs = []
        try:
            for r in range(args.repeats):
                shutil.rmtree(outs[label], ignore_errors=True)
                runs.append(measure(cmd, logs / f"{outs[label].name}-{r}.log", env))
                os.sync()
                if runs[0][0] > args.repeat_limit:  # slow runs are measured once
                    break
        except RuntimeError as err:
            results[label] = f"failed: {err}"
            print(results[label], file=sys.stderr)
            continue
        results[label] = min(runs)
        print(f"{label:32s} {results[label][0]:8.2f} s {results[label][1]:9.1f} MiB", file=sys.stderr)

    # agreement with mergekit on the same method (outputs are bf16)
    agreement = {}
    for method in ("task_arithmetic", "ties"):
        ours, theirs = outs[f"hf_magmax {method}"], outs[f"mergekit {method}"]
        if isinstance(results.get(f"mergekit {method}"), tuple) and isinstance(
            results.get(f"hf_magmax {method}"), tuple
        ):
            agreement[method] = max_abs_diff(ours, theirs)

    # report
    floor = results["I/O floor"]
    lines = [
        "# Streaming checkpoint merge: hf_magmax vs the I/O floor vs mergekit",
        "",
        f"Llama from a config, {num_params / 1e6:.1f}M parameters, bf16 safetensors; base + T={T} fine-tunes "
        f"({input_gb:.2f} GB of inputs, page cache warm); CPU: {os.cpu_count()} cores "
        f"({platform.processor() or platform.machine()}), {threads}, Python {platform.python_version()}. Each row is a fresh "
        f"subprocess (fastest of {args.repeats}; a run over {args.repeat_limit:g} s is not repeated); peak "
        "anonymous memory is the RssAnon of the process tree sampled every 10 ms (it includes the Python interpreter "
        "and the imported libraries). The I/O floor copies every input byte into private memory and writes its "
        "output with `safetensors.save_file`; hf_magmax reads the memory-mapped inputs in place and streams its "
        "output, which is how it can come in under the floor.",
        "",
        "| run | method | T | wall time (s) | vs I/O floor | peak anon. memory (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for label, method, num_tasks, _, _ in contenders:
        result = results[label]
        if isinstance(result, str):
            lines.append(f"| {label} | {method} | {num_tasks} | {result} | | |")
            continue
        ref = floor if num_tasks == T else results.get(f"I/O floor T={small_t}")
        ratio = f"{result[0] / ref[0]:.2f}x" if isinstance(ref, tuple) else ""
        lines.append(f"| {label} | {method} | {num_tasks} | {result[0]:.2f} | {ratio} | {result[1]:.0f} |")
    lines += ["", "Targets:", ""]

    def check(ok: bool) -> str:
        return "met" if ok else "NOT met"

    magmax = results["hf_magmax magmax"]
    if isinstance(magmax, tuple) and isinstance(floor, tuple):
        ratio = magmax[0] / floor[0]
        lines.append(f"- magmax within 1.3x of the I/O floor: {ratio:.2f}x ({check(ratio <= 1.3)})")
    for method in ("task_arithmetic", "ties"):
        ours, theirs = results.get(f"hf_magmax {method}"), results.get(f"mergekit {method}")
        if isinstance(ours, tuple) and isinstance(theirs, tuple):
            lines.append(
                f"- faster than mergekit on {method}: {ours[0]:.2f} s vs {theirs[0]:.2f} s, "
                f"{theirs[0] / ours[0]:.2f}x ({check(ours[0] < theirs[0])}); peak memory {ours[1]:.0f} vs "
                f"{theirs[1]:.0f} MiB; outputs (bf16) differ on {agreement[method][1]:.2%} of the elements, by at "
                f"most {agreement[method][0]:.2e}"
            )
        else:
            lines.append(f"- faster than mergekit on {method}: mergekit {theirs}")
    notes = []
    if "ties" in agreement:
        notes += [
            "",
            "TIES differs from mergekit where task-vector magnitudes tie at the top-k trimming threshold: hf_magmax "
            "keeps every element at the threshold (`hf_magmax.merging.TiesMerge`), mergekit's `topk` keeps exactly "
            "k of them. Task vectors of bf16 checkpoints have many such ties. task_arithmetic differs only by "
            "float rounding.",
        ]
    small = results.get(f"hf_magmax magmax T={small_t}")
    if isinstance(magmax, tuple) and isinstance(small, tuple):
        growth = magmax[1] / small[1] - 1
        lines.append(
            f"- peak anonymous memory flat in T: T={T} {magmax[1]:.0f} MiB vs T={small_t} {small[1]:.0f} MiB, "
            f"{growth:+.1%} ({check(growth <= 0.10)})"
        )
    lines += notes
    lines += [
        "",
        "Command:",
        "",
        "```bash",
        f"python benchmarks/merge_checkpoints.py --num-tasks {T} --size {args.size} --repeats {args.repeats}"
        + (f" --repeat-limit {args.repeat_limit:g}" if args.repeats > 1 and args.repeat_limit != 120 else "")
        + (f" --threads {args.threads}" if args.threads else "")
        + (f" --output {args.output}" if args.output else ""),
        "```",
        "",
    ]
    report = "\n".join(lines)
    print(report)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(report)
    shutil.rmtree(work / "out", ignore_errors=True)


if __name__ == "__main__":
    main()
