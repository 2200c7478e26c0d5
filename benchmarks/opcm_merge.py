# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""Benchmark: the streaming OPCM merge (`hf-magmax merge --method opcm`) beside magmax and TIES on the same inputs.

Builds the inputs of `benchmarks/merge_checkpoints.py` (a Llama from a config plus T fine-tunes: the base plus seeded
noise, safetensors in `--dtype`), reads them once into the page cache, then runs each contender in a fresh subprocess
and reports its wall time, its CPU time (user + system: on a shared machine the wall time also holds the time a run
waited for a core) and its peak anonymous memory (RssAnon of the process tree), with OPCM's ratio to TIES:

- `hf-magmax merge` with magmax (λ = 0.5), ties (density 0.2) and opcm (alpha 0.5, λ = 1), from this tree;
- with `--before-src DIR`, opcm from another checkout's `src` (for example the version before a change), on the
  same inputs; its output is compared with this tree's (max |Δ|);
- FusionBench's own general OPCM (`fusion_bench.method.opcm.opcm_general.OPCM`, config `method/opcm/opcm_general`)
  where `--fusionbench-python` exists, through `benchmarks/_fusionbench_opcm.py`: the same inputs loaded as
  FusionBench's `CausalLMPool` loads them, in fp32 (FusionBench computes in the models' dtype, and the CPU has no bf16
  SVD), tasks in the given order, no saving per step, no evaluation. FusionBench projects with a full SVD
  (`full_matrices=True`: a 16000 × 16000 `U` for the 100m preset's `lm_head`); `--fusionbench-timeout` caps its CPU
  time (it then stops at a task boundary and the report gives the per-task times it measured, and says so). Its
  output is compared with hf_magmax's: max |Δ|, and the relative Frobenius error of the merged task vector,
  `‖θ_fb − θ_ours‖ / ‖θ_fb − θ_0‖`, beside the same two figures for FusionBench's own output rounded to bf16 (the
  rounding floor of a bf16 output).

OPCM costs one SVD per 2-D weight (not embeddings) per task after the first; the report counts them and times them
alone (`torch.linalg.svd` of random matrices of the same shapes, as many, in a fresh subprocess): the floor of any
exact OPCM on the machine; then the whole projections the same way (`opcm_project`: the SVDs and the matrix
products), so that the rest of OPCM's time (reading, norms, the two passes, writing) shows too.

Run (on a shared machine, one thread per run keeps the runs from stalling on busy cores):

    python benchmarks/opcm_merge.py --num-tasks 8 --size 100m --threads 1 \
        --fusionbench-python /path/to/fb-venv/bin/python --output benchmarks/results/opcm_merge.md

(`--before-src /path/to/old/checkout/src` adds the opcm of another checkout.) The fusion-bench environment:
`python -m venv --system-site-packages fb-venv && fb-venv/bin/pip install "fusion-bench>=0.2.33"` (check that it
keeps torch at the version of the other runs).

Smoke run: `python benchmarks/opcm_merge.py --num-tasks 2 --size tiny --output /tmp/opcm.md`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from merge_checkpoints import (  # noqa: E402
    SIZES,
    agreement,
    build_checkpoints,
    contender_env,
    hf_magmax_cmd,
    measure,
    warm_page_cache,
)


def svd_count(base: Path, num_tasks: int) -> tuple[int, int]:
    """(projected 2-D weights, SVDs of one OPCM merge of `num_tasks` models): one per weight per task but the first."""
    from safetensors import safe_open

    from hf_magmax.merging import opcm_projects

    with safe_open(base / "model.safetensors", framework="pt") as f:
        projected = sum(opcm_projects(name, f.get_slice(name).get_shape()) for name in f.keys())
    return projected, projected * max(0, num_tasks - 1)


#: run in a fresh interpreter: the SVDs of one OPCM merge alone (`svd`), or its whole projections (`project`:
#: `opcm_project`, the SVD and the matrix products), on random matrices of the projected shapes (wide matrices
#: transposed, as `opcm_project` does): no exact OPCM on this machine can take less than the first
SVD_FLOOR = """
import sys, torch
from safetensors import safe_open
from hf_magmax.merging import opcm_project, opcm_projects
base, projections, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
with safe_open(base, framework="pt") as f:
    shapes = [tuple(f.get_slice(n).get_shape()) for n in f.keys() if opcm_projects(n, f.get_slice(n).get_shape())]
generator = torch.Generator().manual_seed(0)
for shape in shapes:
    matrix = torch.randn(max(shape), min(shape), generator=generator)
    task_vector = torch.randn(max(shape), min(shape), generator=generator)
    for _ in range(projections):
        if mode == "svd":
            torch.linalg.svd(matrix, full_matrices=False)
        else:
            opcm_project(matrix, task_vector, 0.5)
"""


SVD_ROW = "SVDs of one OPCM merge alone (the floor)"
PROJECT_ROW = "its projections alone (SVDs + matrix products)"
FB_ROW = "FusionBench opcm (opcm_general.OPCM)"


def fusionbench_run(args, base: Path, models: list[Path], out: Path, env: dict, logs: Path) -> tuple[tuple, dict]:
    """FusionBench's general OPCM on the inputs (`benchmarks/_fusionbench_opcm.py`): its report row and timings."""
    timings = logs / "fusionbench-opcm-timings.json"
    cmd = [str(args.fusionbench_python), str(HERE / "_fusionbench_opcm.py"), "--base", str(base), "--models"]
    cmd += [*map(str, models), "--output", str(out), "--alpha", "0.5", "--timings", str(timings)]
    cmd += ["--max-cpu-seconds", str(args.fusionbench_timeout)]
    shutil.rmtree(out, ignore_errors=True)
    seconds, peak, cpu = measure(cmd, logs / "fusionbench-opcm.log", env)
    record = json.loads(timings.read_text())
    starts = [m["cpu_s"] for m in record["marks"] if m["event"].startswith("start")]
    steps = [b - a for a, b in zip(starts, [*starts[1:], record["marks"][-1]["cpu_s"]])]
    per_task = f"{len(steps)} projected task(s), {min(steps):.1f}-{max(steps):.1f} s CPU each" if steps else "no task"
    if starts:  # the rest of its CPU time: imports (lightning, hydra...), loading θ_0 and the first model
        per_task += f" ({record['marks'][-1]['cpu_s'] - starts[0]:.1f} s from the first projected task to the end)"
    if record["completed"]:
        note = f"fp32 (as FusionBench loads it; no bf16 SVD on the CPU); {per_task}"
    else:
        done = len(steps) - 1  # the last start is where it stopped
        note = (
            f"STOPPED at the cap (`--fusionbench-timeout {args.fusionbench_timeout:g}` CPU s) after {done} of "
            f"{len(models) - 1} projected tasks: the times are of the part it ran; {per_task}"
        )
    return (FB_ROW, "opcm", seconds, peak, cpu, note), record


def compare_to_fusionbench(ours: Path, theirs: Path, base: Path) -> dict[str, float]:
    """How close hf_magmax's merged model is to FusionBench's: max |Δ| and `‖θ_fb − θ_ours‖ / ‖θ_fb − θ_0‖` (over
    the whole model, fp64), with the same two figures for FusionBench's output rounded to the dtype of ours (the
    rounding floor), and the share of elements of ours equal to that rounding."""
    from safetensors import safe_open

    def files(directory: Path) -> dict[str, Path]:
        found = {}
        for file in sorted(directory.glob("*.safetensors")):
            with safe_open(file, framework="pt") as f:
                found.update(dict.fromkeys(f.keys(), file))
        return found

    def tensor(where: dict[str, Path], name: str):
        with safe_open(where[name], framework="pt") as f:
            return f.get_tensor(name)

    mine, fb, zero = files(ours), files(theirs), files(base)
    if set(mine) != set(fb):
        return {"error": f"tensor names differ: {sorted(set(mine) ^ set(fb))[:4]}"}
    sums = {"diff": [], "floor": [], "tv": [], "dot": [], "ours": [], "scaled": []}
    out = {"max_abs": 0.0, "floor_max_abs": 0.0, "equal": 0, "total": 0}
    for name in mine:
        a = tensor(mine, name)
        b = tensor(fb, name).double()
        rounded = b.to(a.dtype).double()
        a = a.double()
        sums["diff"].append(float(((a - b) ** 2).sum()))
        sums["floor"].append(float(((rounded - b) ** 2).sum()))
        theta_0 = tensor(zero, name).double()
        sums["tv"].append(float(((b - theta_0) ** 2).sum()))
        sums["dot"].append(float(((b - theta_0) * (a - theta_0)).sum()))
        sums["ours"].append(float(((a - theta_0) ** 2).sum()))
        out["max_abs"] = max(out["max_abs"], float((a - b).abs().max()))
        out["floor_max_abs"] = max(out["floor_max_abs"], float((rounded - b).abs().max()))
        out["equal"] += int((a == rounded).sum())
        out["total"] += a.numel()
    tv = math.sqrt(math.fsum(sums["tv"]))
    out["rel_fro"] = math.sqrt(math.fsum(sums["diff"])) / tv
    out["floor_rel_fro"] = math.sqrt(math.fsum(sums["floor"])) / tv
    # the least-squares factor c with θ_fb − θ_0 ≈ c · (θ_ours − θ_0): a model-wide rescale that differs shows here
    out["scale"] = math.fsum(sums["dot"]) / math.fsum(sums["ours"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-tasks", type=int, default=8, help="T, the number of fine-tuned models (default: 8)")
    parser.add_argument("--size", choices=sorted(SIZES), default="100m", help="model size preset (default: 100m)")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of every contender (default: torch's choice)")
    parser.add_argument("--before-src", type=Path, help="also run opcm with this `src` directory on PYTHONPATH")
    parser.add_argument(
        "--fusionbench-python",
        type=Path,
        default=HERE / "_work" / "fb-venv" / "bin" / "python",
        help="python of the virtual environment where fusion-bench is installed",
    )
    parser.add_argument(
        "--fusionbench-timeout",
        type=float,
        default=1800.0,
        help="CPU seconds after which FusionBench's OPCM stops at the next task boundary (default: 1800)",
    )
    parser.add_argument("--work-dir", type=Path, default=HERE / "_work" / "merge_checkpoints")
    parser.add_argument("--output", type=Path, help="write the markdown report here (also printed)")
    args = parser.parse_args()

    work = args.work_dir
    (work / "logs").mkdir(parents=True, exist_ok=True)
    env = contender_env(args.threads)
    started, load_before = time.perf_counter(), os.getloadavg()
    base, models, num_params = build_checkpoints(work, args.size, args.num_tasks, args.dtype)
    models = models[: args.num_tasks]
    warm_page_cache([base, *models])
    outs = work / "out-opcm"

    rows = []  # (label, method, seconds, peak MiB, cpu seconds, note)
    runs = [(f"hf_magmax {m}", m, env) for m in ("magmax", "ties", "opcm")]
    if args.before_src:
        before_env = dict(env, PYTHONPATH=str(args.before_src.resolve()))
        runs.append((f"hf_magmax opcm, before ({args.before_src})", "opcm", before_env))
    for label, method, run_env in runs:
        out = outs / (label.split(",")[0].replace(" ", "_") + ("-before" if "before" in label else ""))
        shutil.rmtree(out, ignore_errors=True)
        seconds, peak, cpu = measure(
            hf_magmax_cmd(base, models, out, method), work / "logs" / f"{out.name}.log", run_env
        )
        rows.append((label, method, seconds, peak, cpu, ""))
        print(f"{label:50s} {seconds:8.2f} s  CPU {cpu:8.2f} s  {peak:7.0f} MiB", file=sys.stderr)
    floor_cmd = [sys.executable, "-c", SVD_FLOOR, str(base / "model.safetensors")]
    for mode, label in [("svd", SVD_ROW), ("project", PROJECT_ROW)]:
        start_s, _, start_cpu = measure([*floor_cmd, "0", mode], work / "logs" / f"{mode}-floor-0.log", env)
        seconds, peak, cpu = measure(
            [*floor_cmd, str(max(0, len(models) - 1)), mode], work / "logs" / f"{mode}-floor.log", env
        )
        seconds, cpu = seconds - start_s, cpu - start_cpu  # start-up alone subtracted
        note = f"random matrices, same shapes; start-up ({start_cpu:.2f} s CPU) subtracted"
        rows.append((label, "-", seconds, peak, cpu, note))
        print(f"{label:50s} {seconds:8.2f} s  CPU {cpu:8.2f} s", file=sys.stderr)
    fusionbench_out, fusionbench_match, fp32_match = outs / "fusionbench_opcm", None, None
    if args.fusionbench_python.is_file():
        try:
            row, record = fusionbench_run(args, base, models, fusionbench_out, env, work / "logs")
        except RuntimeError as err:  # its failure is a result: the row says so, the log has it
            rows.append((FB_ROW, "opcm", None, None, None, f"FAILED: {err}"))
        else:
            rows.append(row)
            print(f"{row[0]:50s} {row[2]:8.2f} s  CPU {row[4]:8.2f} s  {row[3]:7.0f} MiB", file=sys.stderr)
            if record["completed"]:
                fusionbench_match = compare_to_fusionbench(outs / "hf_magmax_opcm", fusionbench_out, base)
                if args.dtype != "float32":  # the same merge written in fp32: compared without the output rounding
                    out32 = outs / "hf_magmax_opcm-fp32"
                    cmd = [*hf_magmax_cmd(base, models, out32, "opcm"), "--dtype", "float32"]
                    s32, peak32, cpu32 = measure(cmd, work / "logs" / f"{out32.name}.log", env)
                    note = "`--dtype float32`: compared with FusionBench's fp32 output"
                    rows.append(("hf_magmax opcm, fp32 output", "opcm", s32, peak32, cpu32, note))
                    fp32_match = compare_to_fusionbench(out32, fusionbench_out, base)
    else:
        note = f"not run: no fusion-bench environment at {args.fusionbench_python} (`--fusionbench-python`)"
        rows.append((FB_ROW, "opcm", None, None, None, note))
    load_after = os.getloadavg()

    seconds = {label: (s, cpu) for label, _, s, _, cpu, _ in rows if s is not None}
    ties_wall, ties_cpu = seconds["hf_magmax ties"]
    projected, svds = svd_count(base, len(models))
    lines = [
        "# The streaming OPCM merge beside magmax and TIES",
        "",
        f"One run of `benchmarks/opcm_merge.py`: Llama from a config, {num_params / 1e6:.1f}M parameters, "
        f"{args.dtype} safetensors, base + T={len(models)} fine-tunes, inputs in the page cache; each row a fresh "
        f"subprocess. CPU: {os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
        + (f"{args.threads} thread(s) per run" if args.threads else "torch's default threads")
        + f", Python {platform.python_version()}; load average (1/5/15 min) {load_before[0]:.2f}/{load_before[1]:.2f}/"
        f"{load_before[2]:.2f} before and {load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f} after the "
        f"{(time.perf_counter() - started) / 60:.1f} min run. OPCM projects {projected} 2-D weights: "
        f"{svds} SVDs for T={len(models)} (one per weight per task after the first).",
        "",
        "| run | method | wall (s) | CPU time (s) | wall vs ties | CPU time vs ties | peak anon. memory (MiB) | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, method, s, peak, cpu, note in rows:
        if s is None:
            lines.append(f"| {label} | {method} | | | | | | {note} |")
            continue
        lines.append(
            f"| {label} | {method} | {s:.2f} | {cpu:.2f} | {s / ties_wall:.2f}x | {cpu / ties_cpu:.2f}x | {peak:.0f} "
            f"| {note} |"
        )
    opcm_wall, opcm_cpu = seconds["hf_magmax opcm"]
    floor_cpu, project_cpu = seconds[SVD_ROW][1], seconds[PROJECT_ROW][1]
    lines += [
        "",
        f"- OPCM within 3x of TIES: {opcm_cpu / ties_cpu:.1f}x in CPU time, {opcm_wall / ties_wall:.1f}x wall "
        f"({'met' if opcm_cpu <= 3 * ties_cpu else 'NOT met'}); its {svds} SVDs alone take {floor_cpu:.1f} s of CPU "
        f"time ({floor_cpu / ties_cpu:.1f}x TIES, {floor_cpu / opcm_cpu:.0%} of OPCM's); the whole projections "
        f"(SVDs + the matrix products of `opcm_project`) {project_cpu:.1f} s ({project_cpu / opcm_cpu:.0%}), so "
        f"{opcm_cpu - project_cpu:.1f} s for the rest (reading, norms, the two passes, writing)",
    ]
    if fusionbench_match is not None:
        fb_wall, fb_cpu = seconds[FB_ROW]
        m = fusionbench_match
        lines.append(
            f"- FusionBench's OPCM: {fb_cpu / opcm_cpu:.2f}x hf_magmax's CPU time ({fb_wall / opcm_wall:.2f}x wall). "
            + (
                m["error"]
                if "error" in m
                else f"hf_magmax's {args.dtype} output vs FusionBench's fp32 one: max |Δ| {m['max_abs']:.3g}, relative "
                f"Frobenius error of the merged task vector {m['rel_fro']:.3g}; FusionBench's output rounded to "
                f"{args.dtype} alone: max |Δ| {m['floor_max_abs']:.3g}, relative {m['floor_rel_fro']:.3g}; "
                f"{m['equal'] / m['total']:.2%} of hf_magmax's elements equal that rounding; least-squares factor "
                f"c in θ_fb − θ_0 ≈ c · (θ_ours − θ_0): {m['scale']:.6f}"
            )
        )
    if fp32_match is not None and "error" not in fp32_match:
        m = fp32_match
        lines.append(
            f"- hf_magmax's fp32 output (`--dtype float32`) vs FusionBench's: max |Δ| {m['max_abs']:.3g}, relative "
            f"Frobenius error of the merged task vector {m['rel_fro']:.3g}, {m['equal'] / m['total']:.2%} of the "
            f"elements equal; least-squares factor c in θ_fb − θ_0 ≈ c · (θ_ours − θ_0): {m['scale']:.6f}"
        )
    before = [label for label in seconds if "before" in label]
    if before:
        old_wall, old_cpu = seconds[before[0]]
        match = agreement(outs / "hf_magmax_opcm", outs / "hf_magmax_opcm-before")
        lines.append(
            f"- OPCM now vs before: {old_cpu / opcm_cpu:.2f}x less CPU time, {old_wall / opcm_wall:.2f}x less wall "
            f"time; outputs: max abs. difference {match.get('max_abs', float('nan')):.3g}, "
            f"{match.get('differ', float('nan')):.2%} of the elements differ ({', '.join(match.get('dtypes', []))})"
        )
    shutil.rmtree(outs, ignore_errors=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)


if __name__ == "__main__":
    main()
