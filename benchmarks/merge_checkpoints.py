# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""Benchmark: streaming checkpoint merge (`hf-magmax merge`) vs the I/O floor, mergekit and FusionBench, in one run.

Builds a ~100M-parameter Llama base from a config plus T fine-tunes (the base plus seeded noise, safetensors in
`--dtype`), then runs each contender in a fresh subprocess and measures its wall time and its peak anonymous memory
(RssAnon of the process tree, sampled every 10 ms; RSS would count the memory-mapped inputs):

- the I/O floor (`benchmarks/io_floor.py`): read every tensor of the T+1 inputs, write one output, no math;
- `hf-magmax merge` with magmax, task_arithmetic and ties;
- mergekit (`mergekit-yaml --lazy-unpickle`, CPU) with task_arithmetic and ties, same inputs, same λ/density;
- FusionBench's MagMax (`fusion_bench.method.magmax.MagMaxAlgorithm` on a `CausalLMPool`, run by
  `benchmarks/_fusionbench_magmax.py`), λ = 0.5 as ours;
- the I/O floor and `hf-magmax merge` magmax with T=2, to show that memory does not grow with T.

`--cache warm` runs every contender with its inputs in the page cache (read once before); `--cache cold` evicts the
inputs first, before every run (`os.sync()`, then `posix_fadvise(POSIX_FADV_DONTNEED)` on every input file: this
evicts only these files, where writing `/proc/sys/vm/drop_caches` would empty the cache of every process on the
machine; the share of input bytes still resident after the eviction, from `fincore`, is in the report). Python, torch
and the tools stay cached either way. `--cache both` (default) does both. The outputs of every contender are compared
with hf_magmax's output of the same method (max |Δ| and the share of elements that differ).

mergekit and FusionBench pin their own dependencies, so each lives in a separate virtual environment (install torch
first, from the same version as here, then the tool):

    python -m venv benchmarks/_work/mk-venv
    benchmarks/_work/mk-venv/bin/pip install torch==2.13.0 mergekit
    python -m venv benchmarks/_work/fb-venv
    benchmarks/_work/fb-venv/bin/pip install torch==2.13.0 fusion-bench==0.2.33

Run (bf16 and fp32 take ~2 GB and ~4 GB of disk under benchmarks/_work/ and a few minutes each):

    python benchmarks/merge_checkpoints.py --num-tasks 8 --size 100m --dtype bfloat16 float32 \
        --output benchmarks/results/merge_checkpoints.md

Smoke run: `python benchmarks/merge_checkpoints.py --num-tasks 2 --size tiny --output /tmp/bench.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
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


def build_checkpoints(work: Path, size: str, num_tasks: int, dtype: str) -> tuple[Path, list[Path], int]:
    """Base + `num_tasks` fine-tunes (safetensors in `dtype`). Re-used if already built with the same settings."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab, hidden, intermediate, layers, heads = SIZES[size]
    stamp = {"size": size, "num_tasks": num_tasks, "dtype": dtype, "version": 1}
    root = work / (f"ckpts-{size}" if dtype == "bfloat16" else f"ckpts-{size}-{dtype}")
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
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
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


def measure(cmd: list[str], log: Path, env: dict[str, str]) -> tuple[float, float, float]:
    """Run `cmd`; return (wall seconds, peak RssAnon of its process tree in MiB, CPU seconds: user + system of the
    process and the children it waited for). Raises if it fails."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
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
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {proc.returncode}; see {log}")
    return wall, peak / 1024, cpu


def contender_env(threads: int | None) -> dict[str, str]:
    """The environment of every timed run: offline, no progress bars, this checkout's `src` first on the path, and
    `threads` OpenMP/MKL threads when given."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent / "src"), *filter(None, [env.get("PYTHONPATH")])])
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def input_files(paths: list[Path]) -> list[Path]:
    return sorted(file for path in paths for file in path.iterdir() if file.is_file())


def warm_page_cache(paths: list[Path]) -> None:
    for file in input_files(paths):
        with open(file, "rb") as f:
            while f.read(1 << 24):
                pass


def evict_page_cache(paths: list[Path]) -> None:
    """Write back dirty pages, then drop the inputs' pages from the page cache (these files only)."""
    os.sync()
    for file in input_files(paths):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_share(paths: list[Path]) -> float | None:
    """Share of the inputs' bytes in the page cache (`fincore`), or None where `fincore` is missing."""
    files = input_files(paths)
    if shutil.which("fincore") is None:
        return None
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES,SIZE", *map(str, files)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = [tuple(map(int, line.split())) for line in out.splitlines() if line.strip()]
    return min(1.0, sum(r for r, _ in rows) / max(1, sum(size for _, size in rows)))  # RES counts whole pages


# ---------------------------------------------------------------------------------------------------------------------
# contenders
# ---------------------------------------------------------------------------------------------------------------------

#: what every contender computes: λ = 0.3 for task_arithmetic (θ_0 + 0.3·Στ), λ = 1 and density 0.2 for ties (the
#: disjoint mean), λ = 0.5 for magmax
TIES_DENSITY = 0.2
TA_SCALING = 0.3
MAGMAX_SCALING = 0.5


@dataclass
class Contender:
    label: str
    method: str
    num_tasks: int
    cmd: list[str] | None  # None: not run, `note` says why
    out: Path
    note: str = ""
    reference: str | None = None  # the label of the hf_magmax row its output is compared with


def hf_magmax_cmd(base: Path, models: list[Path], out: Path, method: str) -> list[str]:
    cmd = [sys.executable, "-m", "hf_magmax.cli", "--log-level", "WARNING", "merge", "--base", str(base)]
    cmd += ["--models", *map(str, models), "--method", method, "--output", str(out), "--no-progress"]
    if method == "ties":
        cmd += ["--density", str(TIES_DENSITY)]
    elif method == "task_arithmetic":
        cmd += ["--scaling-coef", str(TA_SCALING)]
    elif method == "magmax":
        cmd += ["--scaling-coef", str(MAGMAX_SCALING)]
    return cmd


def mergekit_cmd(
    python: Path, base: Path, models: list[Path], out: Path, method: str, work: Path, dtype: str
) -> list[str]:
    import yaml

    parameters = {"weight": TA_SCALING} if method == "task_arithmetic" else {"weight": 1.0, "density": TIES_DENSITY}
    config = {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(m), "parameters": dict(parameters)} for m in models],
        "parameters": {"normalize": method == "ties"},  # task_arithmetic: θ0 + 0.3·Στ; ties: disjoint mean (λ=1)
        "dtype": "float32",
        "out_dtype": dtype,
    }
    config_file = work / f"mergekit-{method}-{len(models)}-{dtype}.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    script = python.parent / "mergekit-yaml"
    return [str(script), str(config_file), str(out), "--lazy-unpickle", "--no-cuda", "--quiet", "--no-copy-tokenizer"]


def fusionbench_cmd(python: Path, base: Path, models: list[Path], out: Path, dtype: str) -> list[str]:
    cmd = [str(python), str(HERE / "_fusionbench_magmax.py"), "--base", str(base), "--models", *map(str, models)]
    return cmd + ["--output", str(out), "--scaling-factor", str(MAGMAX_SCALING), "--dtype", dtype]


def load_dir(directory: Path) -> dict:
    from safetensors.torch import load_file

    state = {}
    for file in sorted(directory.glob("*.safetensors")):
        state.update(load_file(file))
    return state


def agreement(ours: Path, theirs: Path) -> dict:
    """max |Δ| and the share of elements that differ between two outputs (compared in fp32, same tensor names)."""
    left, right = load_dir(ours), load_dir(theirs)
    if set(left) != set(right):
        missing, extra = sorted(set(left) - set(right)), sorted(set(right) - set(left))
        return {"error": f"tensor names differ (missing {missing[:3]}, extra {extra[:3]})"}
    worst, differ, total, dtypes = 0.0, 0, 0, set()
    for name, a in left.items():
        b = right[name]
        dtypes.add(f"{a.dtype}/{b.dtype}".replace("torch.", ""))
        worst = max(worst, float((a.float() - b.float()).abs().max()))
        differ += int((a.float() != b.float()).sum())
        total += a.numel()
    return {"max_abs": worst, "differ": differ / total, "dtypes": sorted(dtypes)}


# ---------------------------------------------------------------------------------------------------------------------
# one dtype: build, run, compare, report
# ---------------------------------------------------------------------------------------------------------------------


def contenders_for(args, work: Path, dtype: str, base: Path, models: list[Path]) -> list[Contender]:
    T, small_t = len(models), min(2, len(models))
    outs = work / "out"
    found: list[Contender] = []

    def add(label, method, num_tasks, make_cmd, note="", reference=None):
        out = outs / f"{dtype}-{label.replace(' ', '_').replace('/', '_').replace('=', '')}"
        found.append(Contender(label, method, num_tasks, make_cmd(out) if make_cmd else None, out, note, reference))

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
        make = None if mergekit_note else (
            lambda out, m=method: mergekit_cmd(args.mergekit_python, base, models, out, m, work, dtype)
        )  # fmt: skip
        add(f"mergekit {method}", method, T, make, mergekit_note, reference=f"hf_magmax {method}")

    fusionbench_note = ""
    if args.skip_fusionbench:
        fusionbench_note = "skipped (--skip-fusionbench)"
    elif not args.fusionbench_python.is_file():
        fusionbench_note = f"not installed at {args.fusionbench_python} (see the module docstring)"
    make = (
        None if fusionbench_note else (lambda out: fusionbench_cmd(args.fusionbench_python, base, models, out, dtype))
    )
    add("FusionBench magmax", "magmax", T, make, fusionbench_note, reference="hf_magmax magmax")

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
    return found


def run_contenders(args, contenders: list[Contender], inputs: list[Path], env: dict, logs: Path) -> dict:
    """results[(label, cache)] = {"seconds", "peak_mib"} or {"error"}; cold runs evict the inputs before each run."""
    results: dict[tuple[str, str], dict] = {}
    resident: dict[str, list[float]] = {"cold": [], "warm": []}
    for cache in args.caches:
        if cache == "warm":
            warm_page_cache(inputs)
        for c in contenders:
            if c.cmd is None:
                continue
            runs = []
            try:
                for r in range(args.repeats):
                    shutil.rmtree(c.out, ignore_errors=True)
                    os.sync()
                    if cache == "cold":
                        evict_page_cache(inputs)
                    share = resident_share(inputs)
                    if share is not None:
                        resident[cache].append(share)
                    runs.append(measure(c.cmd, logs / f"{c.out.name}-{cache}-{r}.log", env))
                    if runs[0][0] > args.repeat_limit:  # slow runs are measured once
                        break
            except RuntimeError as err:
                results[(c.label, cache)] = {"error": f"failed: {err}"}
                print(results[(c.label, cache)]["error"], file=sys.stderr)
                continue
            seconds, peak, cpu = min(runs)
            results[(c.label, cache)] = {"seconds": seconds, "peak_mib": peak, "cpu": cpu, "runs": len(runs)}
            print(f"{c.out.name:40s} {cache} {seconds:8.2f} s {peak:9.1f} MiB ({len(runs)} run(s))", file=sys.stderr)
    results[("_resident", "cold")] = {"max": max(resident["cold"], default=None)}
    results[("_resident", "warm")] = {"min": min(resident["warm"], default=None)}
    return results


def compare_outputs(contenders: list[Contender], results: dict, caches: list[str]) -> dict[str, dict]:
    """Each contender's output (of its last run) vs the hf_magmax output of the same method."""
    by_label = {c.label: c for c in contenders}
    found = {}
    for c in contenders:
        ours = by_label.get(c.reference) if c.reference else None
        ran = any("seconds" in results.get((c.label, cache), {}) for cache in caches)
        ours_ran = ours is not None and any("seconds" in results.get((ours.label, cache), {}) for cache in caches)
        if ran and ours_ran:
            found[c.label] = agreement(ours.out, c.out)
    return found


def percent(share: float) -> str:
    """A share as a percentage that does not read 0.00% for a few elements."""
    return "0%" if share == 0 else f"{share:.2%}" if share >= 1e-4 else f"{100 * share:.1e}%"


def report_dtype(args, dtype: str, num_params: int, input_gb: float, contenders, results, agree) -> list[str]:
    T = args.num_tasks
    small_t = min(2, T)
    caches = args.caches
    floor = {cache: results.get(("I/O floor", cache), {}).get("seconds") for cache in caches}
    floor_small = {cache: results.get((f"I/O floor T={small_t}", cache), {}).get("seconds") for cache in caches}
    short = {"bfloat16": "bf16", "float32": "fp32"}[dtype]

    def cell(label: str, cache: str, num_tasks: int) -> tuple[str, str, str]:
        result = results.get((label, cache))
        if result is None:
            return "", "", ""
        if "error" in result:
            return result["error"].split(";")[0], "", ""
        ref = (floor if num_tasks == T else floor_small)[cache]
        return f"{result['seconds']:.2f}", f"{result['seconds'] / ref:.2f}x" if ref else "", f"{result['cpu']:.2f}"

    header = "| run | method | T |"
    rule = "|---|---|---|"
    for cache in caches:
        header += f" {cache} (s) | {cache} vs I/O floor | {cache}, CPU time (s) |"
        rule += "---|---|---|"
    header += " peak anon. memory (MiB) | vs hf_magmax, same method: max abs. diff | elements that differ |"
    rule += "---|---|---|"
    resident_cold = results.get(("_resident", "cold"), {}).get("max")
    resident_warm = results.get(("_resident", "warm"), {}).get("min")
    cache_text = []
    if "warm" in caches:
        cache_text.append(
            "warm: inputs read once before"
            + (
                f" ({resident_warm:.0%} of the input bytes resident before each run, `fincore`)"
                if resident_warm is not None
                else ""
            )
        )
    if "cold" in caches:
        cache_text.append(
            "cold: the inputs evicted from the page cache before every run with `posix_fadvise(POSIX_FADV_DONTNEED)`"
            + (
                f" (at most {resident_cold:.1%} of the input bytes resident after it, `fincore`)"
                if resident_cold is not None
                else ""
            )
        )
    lines = [
        f"## {short}",
        "",
        f"Llama from a config, {num_params / 1e6:.1f}M parameters, {short} safetensors; base + T={T} fine-tunes "
        f"({input_gb:.2f} GB of inputs). Page cache: " + "; ".join(cache_text) + ".",
        "",
        header,
        rule,
    ]
    for c in contenders:
        if c.cmd is None:
            lines.append(f"| {c.label} | {c.method} | {c.num_tasks} |" + " |" * (3 * len(caches)) + f" {c.note} | | |")
            continue
        row = f"| {c.label} | {c.method} | {c.num_tasks} |"
        for cache in caches:
            seconds, ratio, cpu = cell(c.label, cache, c.num_tasks)
            row += f" {seconds} | {ratio} | {cpu} |"
        peaks = [results.get((c.label, cache), {}).get("peak_mib") for cache in caches]
        peak = peaks[0] if peaks and peaks[0] is not None else next((p for p in peaks if p is not None), None)
        row += f" {peak:.0f} |" if peak is not None else " |"
        match = agree.get(c.label)
        if match is None:
            row += " | |"
        elif "error" in match:
            row += f" {match['error']} | |"
        else:
            row += f" {match['max_abs']:.3g} | {percent(match['differ'])} |"
        lines.append(row)

    def check(ok: bool) -> str:
        return "met" if ok else "NOT met"

    def seconds(label: str, cache: str) -> float | None:
        return results.get((label, cache), {}).get("seconds")

    lines += ["", f"Targets ({short}):", ""]
    for cache in caches:
        suffix = "" if cache == caches[0] else f", {cache} cache"
        note = f" ({cache} page cache)" if cache == caches[0] else ""
        magmax, ties, fl = seconds("hf_magmax magmax", cache), seconds("hf_magmax ties", cache), floor[cache]

        def cpu_ratio(label: str, cache: str = cache) -> str:
            ours, ref = results[(label, cache)]["cpu"], results[("I/O floor", cache)]["cpu"]
            return f"; in CPU time {ours / ref:.2f}x"

        if magmax and fl:
            lines.append(
                f"- magmax within 1.3x of the I/O floor{suffix}: {magmax / fl:.2f}x ({check(magmax / fl <= 1.3)})"
                f"{note}{cpu_ratio('hf_magmax magmax')}"
            )
        if ties and fl:
            lines.append(
                f"- ties within 4x of the I/O floor{suffix}: {ties / fl:.2f}x ({check(ties / fl <= 4)}){note}"
                f"{cpu_ratio('hf_magmax ties')}"
            )
        for rival, method in (("mergekit", "task_arithmetic"), ("mergekit", "ties"), ("FusionBench", "magmax")):
            ours, theirs = seconds(f"hf_magmax {method}", cache), seconds(f"{rival} {method}", cache)
            if ours and theirs:
                peak_ours = results[(f"hf_magmax {method}", cache)]["peak_mib"]
                peak_theirs = results[(f"{rival} {method}", cache)]["peak_mib"]
                lines.append(
                    f"- faster than {rival} on {method}{suffix}: {ours:.2f} s vs {theirs:.2f} s, {theirs / ours:.2f}x "
                    f"({check(ours < theirs)}); peak memory {peak_ours:.0f} vs {peak_theirs:.0f} MiB"
                )
            else:
                why = results.get((f"{rival} {method}", cache), {}).get("error") or next(
                    (c.note for c in contenders if c.label == f"{rival} {method}"), "not run"
                )
                lines.append(f"- faster than {rival} on {method}{suffix}: {why}")
    first = caches[0]
    big, small = (
        results.get(("hf_magmax magmax", first), {}),
        results.get((f"hf_magmax magmax T={small_t}", first), {}),
    )
    if "peak_mib" in big and "peak_mib" in small:
        growth = big["peak_mib"] / small["peak_mib"] - 1
        lines.append(
            f"- peak anonymous memory flat in T: T={T} {big['peak_mib']:.0f} MiB vs T={small_t} "
            f"{small['peak_mib']:.0f} MiB, {growth:+.1%} ({check(growth <= 0.10)}; {first} cache)"
        )

    lines += ["", "Agreement of the outputs:", ""]
    for rival, method in (("mergekit", "task_arithmetic"), ("mergekit", "ties"), ("FusionBench", "magmax")):
        match = agree.get(f"{rival} {method}")
        if match is None or "error" in match:
            continue
        exact = match["max_abs"] == 0
        text = f"- {rival} {method} vs hf_magmax {method}: " + (
            "bit for bit equal"
            if exact
            else f"max abs. difference {match['max_abs']:.3g}, {percent(match['differ'])} of the elements differ"
        )
        if method == "task_arithmetic" and not exact:
            text += " (float rounding: mergekit sums in its own order)"
        if method == "ties" and not exact:
            text += (
                " (mergekit's `topk` keeps exactly k magnitudes per task vector, hf_magmax keeps every element tied at "
                "the trimming threshold, `hf_magmax.merging.TiesMerge`; "
                + ("task vectors of bf16 checkpoints have many such ties)" if dtype == "bfloat16" else "rare in fp32)")
            )
        if rival == "FusionBench":
            text += (
                " (same rule: per element the task vector of largest magnitude, ties to the later task, θ_0 + λ·τ; "
                "FusionBench computes τ, the selection and θ_0 + λ·τ in fp32 when the checkpoints are fp32, as "
                "hf_magmax does)"
                if exact
                else " (same selection rule, ties to the later task; FusionBench computes τ = θ_t − θ_0 and "
                "θ_0 + λ·τ in the checkpoints' dtype, so each is rounded to bf16, where hf_magmax computes τ and "
                "θ_0 + λ·τ in fp32 and rounds once at the end: the outputs differ by bf16 roundings, and where two "
                "tasks' |τ| are within a rounding of each other the rounded τ can pick the other task, which moves "
                "that element by up to λ·|τ_a − τ_b|)"
                if dtype == "bfloat16"
                else ""
            )
        lines.append(text)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-tasks", type=int, default=8, help="T, the number of fine-tuned models (default: 8)")
    parser.add_argument("--size", choices=sorted(SIZES), default="100m", help="model size preset (default: 100m)")
    parser.add_argument(
        "--dtype",
        nargs="+",
        choices=["bfloat16", "float32"],
        default=["bfloat16"],
        help="dtype(s) of the checkpoints; several: one section each, in this order (default: bfloat16)",
    )
    parser.add_argument(
        "--cache",
        choices=["warm", "cold", "both"],
        default="both",
        help="page cache of the inputs: warm, cold (evicted before every run), or both (default)",
    )
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
    parser.add_argument(
        "--fusionbench-python",
        type=Path,
        default=HERE / "_work" / "fb-venv" / "bin" / "python",
        help="python of the virtual environment where fusion-bench is installed",
    )
    parser.add_argument("--skip-mergekit", action="store_true")
    parser.add_argument("--skip-fusionbench", action="store_true")
    parser.add_argument(
        "--threads",
        type=int,
        help="OMP_NUM_THREADS of every contender (default: unset, torch's own choice); on a shared machine 1 keeps "
        "the runs from stalling on busy cores",
    )
    parser.add_argument("--output", type=Path, help="write the markdown report here (also printed)")
    args = parser.parse_args()
    args.caches = ["warm", "cold"] if args.cache == "both" else [args.cache]

    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    env = contender_env(args.threads)
    threads = f"{args.threads} thread(s) per run (OMP_NUM_THREADS)" if args.threads else "torch's default threads"
    started, load_before = time.perf_counter(), os.getloadavg()
    sections = []
    for dtype in args.dtype:
        base, models, num_params = build_checkpoints(work, args.size, args.num_tasks, dtype)
        inputs = [base, *models]
        input_gb = sum(f.stat().st_size for f in input_files(inputs) if f.suffix == ".safetensors") / 1e9
        contenders = contenders_for(args, work, dtype, base, models)
        results = run_contenders(args, contenders, inputs, env, logs)
        agree = compare_outputs(contenders, results, args.caches)
        sections.append(report_dtype(args, dtype, num_params, input_gb, contenders, results, agree))
        shutil.rmtree(work / "out", ignore_errors=True)
    load_after = os.getloadavg()

    lines = [
        "# Streaming checkpoint merge: hf_magmax vs the I/O floor vs mergekit vs FusionBench",
        "",
        f"One run of `benchmarks/merge_checkpoints.py`: every contender on the same inputs, each row a fresh "
        f"subprocess (fastest of {args.repeats}; a run over {args.repeat_limit:g} s is not repeated). CPU: "
        f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}), {threads}, Python "
        f"{platform.python_version()}; load average (1/5/15 min) {load_before[0]:.2f}/{load_before[1]:.2f}/"
        f"{load_before[2]:.2f} before and {load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f} after the "
        f"{(time.perf_counter() - started) / 60:.1f} min run. Peak anonymous memory is the RssAnon of the process "
        "tree sampled every 10 ms (it includes the Python interpreter and the imported libraries; of the first cache "
        "mode's run). CPU time is user + system time of the process tree: on a machine shared with other jobs the "
        "wall time also holds the time a run waited for a core, the CPU time does not (nor the time it waited for "
        "the disk). The I/O floor copies every input byte into private memory and writes its output with "
        "`safetensors.save_file`; hf_magmax reads the memory-mapped inputs in place and streams its output, which "
        "is how it can come in under the floor. Same λ and density everywhere: magmax λ = 0.5, task_arithmetic "
        "λ = 0.3, ties density 0.2 with λ = 1 (disjoint mean).",
        "",
    ]
    for section in sections:
        lines += section + [""]
    lines += [
        "Command:",
        "",
        "```bash",
        f"python benchmarks/merge_checkpoints.py --num-tasks {args.num_tasks} --size {args.size} "
        f"--dtype {' '.join(args.dtype)} --cache {args.cache} --repeats {args.repeats}"
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


if __name__ == "__main__":
    main()
