# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""Micro-benchmarks of the merge core: the accumulators' folds and TIES' trim threshold, side by side with the
formulations of the previous release ("today's code", copied below verbatim in spirit: same torch calls) and with a
bare `torch.kthvalue`. Every figure is the median of `--reps` runs; ratios are taken within the same run. Every
contender's output is checked bit for bit against today's before it is timed.

    PYTHONPATH=src python benchmarks/merge_core.py --threads 2 --reps 5 > benchmarks/results/merge_core.md

The machine is shared: read the ratios, not the absolute times, and compare rows of the same run.
"""

# ruff: noqa: B023  (every lambda is timed at once, inside its loop iteration)
from __future__ import annotations

import argparse
import math
import platform
import statistics
import time

import torch

from hf_magmax import merging
from hf_magmax.merging import MagMaxMerge, TaskArithmeticMerge, TiesMerge, ties_trim_threshold
from hf_magmax.merging import kernels as _merge_kernels
from hf_magmax.task_vectors import subtract


# ---------------------------------------------------------------------------------------------------------------------
# Today's code (hf_magmax before this change), kept here as the baseline
# ---------------------------------------------------------------------------------------------------------------------


def old_threshold(task_vector, density):
    if density >= 1.0:
        return None
    numel = task_vector.numel()
    k = int(density * numel)
    if k == 0:
        return math.inf
    magnitudes = task_vector.detach().to(merging.compute_dtype(task_vector.dtype)).abs().flatten()
    return magnitudes.kthvalue(numel - k + 1).values.item()


def old_magmax(tvs):
    selected = tvs[0].clone()
    for tv in tvs[1:]:
        selected = torch.where(tv.abs() >= selected.abs(), tv, selected)
    return selected


def old_sum(tvs):
    total = tvs[0].to(merging.compute_dtype(tvs[0].dtype), copy=True)
    for tv in tvs[1:]:
        total.add_(tv.to(dtype=total.dtype))
    return total


def old_ties(tvs, thresholds):
    for i, tv in enumerate(tvs):
        tv = tv.to(merging.compute_dtype(tv.dtype))
        threshold = thresholds[i]
        trimmed = tv.clone() if threshold is None else torch.where(tv.abs() >= threshold, tv, torch.zeros_like(tv))
        if i == 0:
            zeros = torch.zeros_like(trimmed)
            pos_sum, neg_sum, pos_count, neg_count = zeros.clone(), zeros.clone(), zeros.clone(), zeros.clone()
        positive, negative = trimmed > 0, trimmed < 0
        pos_sum.add_(torch.where(positive, trimmed, 0.0))
        neg_sum.add_(torch.where(negative, trimmed, 0.0))
        pos_count.add_(positive.to(pos_count.dtype))
        neg_count.add_(negative.to(neg_count.dtype))
    return pos_sum, neg_sum, pos_count, neg_count


# ---------------------------------------------------------------------------------------------------------------------
# Today's accumulators, folded
# ---------------------------------------------------------------------------------------------------------------------


def new_fold(cls, tvs, **kwargs):
    acc = cls(**kwargs)
    for tv in tvs:
        acc.update(tv)
    return acc


def median_time(fn, reps):
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bits(t):
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def same(a, b):
    return torch.equal(bits(a), bits(b))


def row(name, seconds, base):
    return f"| {name} | {seconds * 1e3:.1f} | {base / seconds:.2f}× |"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke test)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    reps, T = args.reps, args.tasks
    lines = [
        "## Merge core micro-benchmarks (`benchmarks/merge_core.py`)",
        "",
        f"torch {torch.__version__}, {args.threads} thread(s), {platform.processor() or platform.machine()}, "
        f"median of {reps} runs, T = {T} task vectors; every contender's output equals today's bit for bit.",
        "",
    ]

    # -- TIES trim threshold -------------------------------------------------------------------------------------
    shapes = [(64, 64), (4096, 4096), (32000, 512)] if not args.quick else [(64, 64), (512, 512)]
    lines += ["### TIES trim threshold (density 0.2), one task vector", ""]
    lines += [
        "| tensor | today (`to fp32 → abs → kthvalue`) ms | `kthvalue` on ready magnitudes ms |"
        " histogram select (new) ms | new vs today | new vs bare kthvalue |",
        "|---|---|---|---|---|---|",
    ]
    for shape in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            tv = torch.randn(shape, generator=g).to(dtype)
            k = int(0.2 * tv.numel())
            magnitudes = tv.float().abs().flatten()
            assert ties_trim_threshold(tv, 0.2) == old_threshold(tv, 0.2)
            t_old = median_time(lambda: old_threshold(tv, 0.2), reps)
            t_kth = median_time(lambda: magnitudes.kthvalue(tv.numel() - k + 1), reps)
            t_new = median_time(lambda: ties_trim_threshold(tv, 0.2), reps)
            lines.append(
                f"| {shape[0]}×{shape[1]} {str(dtype).removeprefix('torch.')} | {t_old * 1e3:.2f} | {t_kth * 1e3:.2f} |"
                f" {t_new * 1e3:.2f} | {t_old / t_new:.2f}× | {t_kth / t_new:.2f}× |"
            )
    lines.append("")

    # -- folds -----------------------------------------------------------------------------------------------------
    sizes = [("1M-element block (the streaming merge's)", 1 << 20), ("4096×4096 tensor (whole-tensor merge)", 1 << 24)]
    if args.quick:
        sizes = [("64k", 1 << 16), ("256k", 1 << 18)]
    chunk_default = _merge_kernels._FOLD_CHUNK
    for label, numel in sizes:
        tvs32 = [torch.randn(numel, generator=g) for _ in range(T)]
        tvs16 = [t.to(torch.bfloat16) for t in tvs32]
        lines += [f"### Folds over a {label}, {T} task vectors", "", "| fold | ms | vs today |", "|---|---|---|"]
        # magmax
        ref = old_magmax(tvs32)
        t_old = median_time(lambda: old_magmax(tvs32), reps)
        lines.append(row("magmax fp32, today (`where(|τ| >= |sel|)`, new tensors per task)", t_old, t_old))
        for chunk in (1 << 14, 1 << 16, 1 << 18, 1 << 20):
            _merge_kernels._FOLD_CHUNK = chunk
            assert same(new_fold(MagMaxMerge, tvs32).result(), ref)
            t = median_time(lambda: new_fold(MagMaxMerge, tvs32), reps)
            mark = " (default)" if chunk == chunk_default else ""
            lines.append(row(f"magmax fp32, new: integer bit-pattern select, pieces of {chunk}{mark}", t, t_old))
        _merge_kernels._FOLD_CHUNK = chunk_default
        t_new = median_time(lambda: new_fold(MagMaxMerge, tvs32), reps)
        acc = new_fold(MagMaxMerge, tvs32, track_winners=True)
        assert same(acc.result(), ref)
        t_win = median_time(lambda: new_fold(MagMaxMerge, tvs32, track_winners=True), reps)
        lines.append(
            row(f"magmax fp32, new + `track_winners` ({(t_win / t_new - 1) * 100:+.0f}% vs new)", t_win, t_old)
        )
        ref16 = old_magmax(tvs16)
        t_old16 = median_time(lambda: old_magmax(tvs16), reps)
        assert same(new_fold(MagMaxMerge, tvs16).result(), ref16)
        lines.append(row("magmax bf16, today", t_old16, t_old16))
        lines.append(row("magmax bf16, new", median_time(lambda: new_fold(MagMaxMerge, tvs16), reps), t_old16))
        # the realistic block: τ_t = θ_t − θ_0 (fp32), then the fold, with and without winners
        thetas = [torch.randn(numel, generator=g) for _ in range(T)]
        theta_0 = torch.randn(numel, generator=g)

        def block(track):
            acc = MagMaxMerge(track_winners=track)
            for theta in thetas:
                acc.update(theta - theta_0)
            return acc.result()

        t_block = median_time(lambda: block(False), reps)
        t_block_w = median_time(lambda: block(True), reps)
        lines.append(
            f"| magmax, τ = θ_t − θ_0 then fold: winners cost {(t_block_w / t_block - 1) * 100:+.0f}% "
            f"({t_block * 1e3:.1f} → {t_block_w * 1e3:.1f} ms) | | |"
        )
        # sums
        for name, tvs in (("fp32", tvs32), ("bf16", tvs16)):
            assert same(new_fold(TaskArithmeticMerge, tvs).total, old_sum(tvs))
            t_old = median_time(lambda: old_sum(tvs), reps)
            lines.append(row(f"task_arithmetic {name}, today", t_old, t_old))
            lines.append(
                row(
                    f"task_arithmetic {name}, new",
                    median_time(lambda: new_fold(TaskArithmeticMerge, tvs), reps),
                    t_old,
                )
            )
        # ties with whole-tensor thresholds given (the streaming merge's case)
        for name, tvs in (("fp32", tvs32), ("bf16", tvs16)):
            thresholds = [ties_trim_threshold(tv, 0.2) for tv in tvs]
            ref = old_ties(tvs, thresholds)
            acc = new_fold(TiesMerge, tvs, density=0.2, thresholds=thresholds)
            assert all(same(a, b) for a, b in zip((acc.pos_sum, acc.neg_sum, acc.pos_count, acc.neg_count), ref))
            t_old = median_time(lambda: old_ties(tvs, thresholds), reps)
            lines.append(row(f"ties {name} (thresholds given), today", t_old, t_old))
            t = median_time(lambda: new_fold(TiesMerge, tvs, density=0.2, thresholds=thresholds), reps)
            lines.append(
                row(f"ties {name} (thresholds given), new: bit-pattern trim, clamp/sign sums, pieces", t, t_old)
            )
        lines.append("")

    lines += fused_block_section(g, T, reps, args.quick)
    print("\n".join(lines))


def torch_block(method, theta_0, tasks, thresholds=None):
    """One block of the streaming merge on the torch path: subtract -> accumulator -> apply_merged (bf16 out)."""
    spec = merging.MergeSpec(method)
    base = theta_0.float()
    acc = spec.accumulator("w", stats=thresholds)
    for task in tasks:
        acc.update(subtract(task, base))
    return merging.apply_merged(base, acc.result(), spec.coef, dtype=theta_0.dtype)


def fused_block_section(g, T, reps, quick):
    """The streaming merge's block (bf16 θ_0 and θ_t, bf16 out), torch path vs the fused C folds, over a tensor of
    8M elements cut into blocks of several sizes (the C path only: `_CHUNK_ELEMENTS`)."""
    if _merge_kernels.c_kernels() is None:
        return ["### Fused C folds: not built here (`pip install -e .`)", ""]
    numel = 1 << 18 if quick else 1 << 23
    theta_0 = torch.randn(numel, generator=g).to(torch.bfloat16)
    tasks = [(theta_0.float() + 0.01 * torch.randn(numel, generator=g)).to(torch.bfloat16) for _ in range(T)]
    lines = [
        f"### One tensor of {numel >> 20 or numel}{'M' if numel >> 20 else ''} elements, bf16 in and out, {T} tasks: "
        "the streaming merge's blocks, torch path vs fused C",
        "",
        "| method | block elements | torch path ms | fused C ms | C vs torch | C ns / element / task |",
        "|---|---|---|---|---|---|",
    ]
    block_sizes = [1 << 16, 1 << 18, 1 << 20, 1 << 21] if not quick else [1 << 16]
    for method in ("magmax", "task_arithmetic", "ties"):
        thresholds = None
        if method == "ties":
            base = theta_0.float()
            thresholds = [merging.ties_trim_threshold(subtract(t, base), 0.2) for t in tasks]
            blocks = [(slice(i, i + (1 << 20)), i) for i in range(0, numel, 1 << 20)]
            assert _merge_kernels.fused_ties_thresholds(theta_0, tasks, blocks, 0.2) == thresholds
        for size in block_sizes:
            blocks = [slice(i, i + size) for i in range(0, numel, size)]

            def run_torch():
                return [torch_block(method, theta_0[b], [t[b] for t in tasks], thresholds) for b in blocks]

            def run_c():
                return [
                    _merge_kernels.fused_merge_block(
                        method,
                        theta_0[b],
                        [t[b] for t in tasks],
                        merging.MergeSpec(method).coef,
                        torch.bfloat16,
                        thresholds=thresholds,
                    )[0]
                    for b in blocks
                ]

            assert all(same(a, b) for a, b in zip(run_c(), run_torch()))
            t_torch = median_time(run_torch, reps) if size == 1 << 20 or quick else float("nan")
            t_c = median_time(run_c, reps)
            torch_ms, ratio = ("", "") if math.isnan(t_torch) else (f"{t_torch * 1e3:.1f}", f"{t_torch / t_c:.2f}×")
            lines.append(
                f"| {method} | {size} | {torch_ms} | {t_c * 1e3:.1f} | {ratio} | {t_c / numel / T * 1e9:.3f} |"
            )
        if method == "ties":
            blocks = [(slice(i, i + (1 << 20)), i) for i in range(0, numel, 1 << 20)]
            t_torch = median_time(lambda: [merging.ties_trim_threshold(subtract(t, theta_0.float()), 0.2)
                                           for t in tasks], reps)  # fmt: skip
            t_c = median_time(lambda: _merge_kernels.fused_ties_thresholds(theta_0, tasks, blocks, 0.2), reps)
            lines.append(
                f"| ties thresholds (whole tensor) | {1 << 20} | {t_torch * 1e3:.1f} | {t_c * 1e3:.1f} |"
                f" {t_torch / t_c:.2f}× | {t_c / numel / T * 1e9:.3f} |"
            )
    lines.append("")
    return lines


if __name__ == "__main__":
    main()
