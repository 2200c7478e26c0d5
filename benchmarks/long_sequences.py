# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""Long task sequences: how MagMax, average and OPCM hold up against sequential fine-tuning at T = 5 … 200 tasks.

Setup: **domain-incremental permuted digits.** scikit-learn's bundled `load_digits` (1,797 8×8 images, 10 classes, the
demo's data) is shuffled with the seed and split into a test set (20%), a validation set (10%, only for choosing λ),
a pretraining slice (300 images) and a training set (the rest, 958 images). Task t applies a fixed random permutation
π_t of the pixels to every image (train, validation and test alike); every task has the same 10 classes and one
shared 10-way head. Three sequences (`--permuted-pixels`, `--independent-pixels`):

- **64**: π_t permutes all 64 pixels (permuted MNIST's recipe): the tasks share nothing but the labels, θ_0 is at
  chance on every one of them, and every pair of tasks conflicts in the first layer: the hard case;
- **16**: π_t shuffles 16 pixels at random positions among themselves: related tasks, on which θ_0 keeps ~75%, closer
  to the paper's regime of a pretrained model that already does reasonably well on every task;
- **16-independent** (`--independent-pixels`): the same tasks, but every task is fine-tuned from θ_0 (independent
  experts, the setting in which OPCM and FusionBench report their gains over MagMax) instead of from the previous
  task's weights; its "θ_T, the last expert" row is the last task's expert alone.

A class-incremental split stops at T = 10 (one class per task; the demo runs T = 5), so it cannot say anything about
long sequences; permutations give as many tasks as wanted, all equally hard.

Model: an MLP 64 → 256 → 256 → 10 (ReLU, 85 k parameters). θ_0 is pretrained on the pretraining slice of *unpermuted*
digits (30 epochs, AdamW, lr 2e-3, as the demo pretrains its θ_0), a stand-in for a pretrained model that knows the
classes. Each task is then fine-tuned **from the previous task's weights** (as MagMax prescribes: sequential
fine-tuning, then merge) with the demo's per-task recipe, in a plain torch loop (≈0.3 CPU-s per task; the
`MagMaxTrainer` would add ~0.3 s of overhead per task): a fresh AdamW per task (weight decay 0), linear decay to 0,
batch 32, 5 epochs; lr 1e-3 (the demo's 3e-4 leaves this MLP at ~50% on a new full permutation after 5 epochs, 1e-3
reaches ~88%). The weights after every task give the task vectors τ_t = θ_t − θ_0 (`TaskVector.from_state_dicts`),
which the library merges:

- `sequential fine-tuning`: θ_T itself;
- `average`: `merge_task_vectors(τ_1..τ_T, "average")` (λ = 1: the weight average of θ_1..θ_T);
- `MagMax`: `merge_task_vectors(τ_1..τ_T, "magmax")` (λ = 0.5, the paper's);
- `OPCM`: `merge_task_vectors(τ_1..τ_T, "opcm")` (λ = 1 and α = 0.5, the core's defaults), when the core has it;
- each merge again with **λ chosen on the validation set** (`hf_magmax.scaling.search_scaling_coef` over
  0.1, 0.2, …, 1.0, 1.25, 1.5, 2, mean validation accuracy over the T tasks): marked "λ on val";
- `θ_0 (no training)` and chance (10%) as references, and `θ_t on its own task` (accuracy of each θ_t on the task
  it was just trained on, averaged: what the sequence reaches before any forgetting).

One run of `max(T)` tasks per seed gives every shorter sequence as its prefix (the same θ_1..θ_T), so each T in
`--tasks` is evaluated on its first T tasks: final average accuracy = mean test accuracy over tasks 1..T of the
model after task T. Seeds change the data split, the initialisation, θ_0, the permutations and the batch order;
tables give mean ± sample std over seeds.

Merge cost vs T, measured in the same run on the first sequence's first seed: the online engine (`StateDictMerger`,
one accumulator per tensor, task vectors folded in one at a time, then `result()`), wall time (median of
`--cost-reps`), the peak memory the merge adds above what was resident before it (Linux: VmHWM after a reset,
`malloc_trim` first and a fixed mmap threshold so that freed memory is not silently reused; the task vectors
themselves are already resident and not counted) and the bytes of the accumulators' state after T tasks. The online
result is checked to equal `merge_task_vectors` (bit for bit at the default λ) for every T, method and seed.

Command (1 thread; about 20 min of CPU, more wall time on a busy machine):

    python benchmarks/long_sequences.py

writes `benchmarks/results/long_sequences.json`, `.md` and `.png`. `--quick` is a smoke run (2 and 3 tasks).
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import logging
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hf_magmax import TaskVector, merge_task_vectors
from hf_magmax.merging import ONLINE_MERGES, StateDictMerger, apply_merged, default_scaling_coef
from hf_magmax.scaling import DEFAULT_SCALING_COEF_GRID, ScalingCoefApplier, search_scaling_coef


logger = logging.getLogger("long_sequences")

RESULTS = Path(__file__).resolve().parent / "results"
#: Merge methods compared, in table order (OPCM only where the core has it).
MERGES = ("average", "magmax", "opcm")
LABELS = {"average": "average", "magmax": "MagMax", "opcm": "OPCM"}
DEFAULT_TASKS = (5, 10, 20, 50, 100, 200)
#: λ candidates of the "λ on val" rows: the library's default grid (0.1 … 1.0), extended past 1 so that no method's
#: choice sits on the grid's edge (average's λ = 1 is the plain weight average).
SCALING_COEF_GRID = (*DEFAULT_SCALING_COEF_GRID, 1.25, 1.5, 2.0)
NUM_PIXELS = 64
NUM_CLASSES = 10


# --------------------------------------------------------------------------------------------------------------------
# Data and model
# --------------------------------------------------------------------------------------------------------------------


def load_splits(seed: int, pretrain_examples: int = 300) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`load_digits`, shuffled with `seed`: test (20%), val (10%), pretrain (`pretrain_examples`), train (the rest)."""
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    order = np.random.RandomState(seed).permutation(len(labels))
    x = torch.tensor(images[order] / 16.0, dtype=torch.float32)  # (1797, 64)
    y = torch.tensor(labels[order], dtype=torch.long)
    num_test, num_val = round(0.2 * len(y)), round(0.1 * len(y))
    bounds = np.cumsum([0, num_test, num_val, pretrain_examples, len(y)])
    names = ("test", "val", "pretrain", "train")
    return {name: (x[a:b], y[a:b]) for name, a, b in zip(names, bounds[:-1], bounds[1:])}


def task_permutations(seed: int, num_tasks: int, num_permuted: int = NUM_PIXELS) -> list[torch.Tensor]:
    """Task t's pixel permutation (t = 1..num_tasks): `num_permuted` pixels at random positions shuffled among
    themselves (all 64: a full random permutation). A function of (seed, t) only, so shorter runs are prefixes."""
    perms = []
    for t in range(1, num_tasks + 1):
        rng = np.random.default_rng([seed, num_permuted, t])
        positions = rng.choice(NUM_PIXELS, size=num_permuted, replace=False)
        perm = np.arange(NUM_PIXELS)
        perm[positions] = positions[rng.permutation(num_permuted)]
        perms.append(torch.from_numpy(perm))
    return perms


def build_mlp(hidden: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(NUM_PIXELS, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, NUM_CLASSES)
    )


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, batch_size: int, seed: int):
    """The demo's per-task recipe in a plain loop: fresh AdamW (no weight decay), linear decay to 0, shuffled batches."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    steps = epochs * math.ceil(len(y) / batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), batch_size):
            batch = order[start : start + batch_size]
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()


@torch.no_grad()
def task_accuracies(model: nn.Module, x: torch.Tensor, y: torch.Tensor, perms: Sequence[torch.Tensor]) -> list[float]:
    """Accuracy of `model` on each task (the split `x`, `y` under each permutation), 32 tasks per forward pass."""
    model.eval()
    scores: list[float] = []
    for start in range(0, len(perms), 32):
        chunk = torch.stack(list(perms[start : start + 32]))  # (k, 64)
        inputs = x[:, chunk].transpose(0, 1).reshape(-1, NUM_PIXELS)  # (k·n, 64): task-major
        correct = (model(inputs).argmax(-1) == y.repeat(len(chunk))).view(len(chunk), -1)
        scores += correct.float().mean(1).tolist()
    return scores


# --------------------------------------------------------------------------------------------------------------------
# Merge cost: time and peak memory of the online engine
# --------------------------------------------------------------------------------------------------------------------


class PeakMemory:
    """Peak resident memory added by a call (Linux): VmHWM reset through /proc/self/clear_refs, after `malloc_trim`,
    with a fixed mmap threshold (`mallopt`) so that large buffers come from fresh pages and go back when freed."""

    def __init__(self) -> None:
        self.libc = None
        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: fixed, no dynamic raise after frees
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.libc = libc
        except (OSError, AttributeError):  # not glibc / not Linux: no memory numbers
            logger.warning("peak memory is not measurable here (needs Linux and glibc)")

    @staticmethod
    def _kib(key: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key))

    def measure(self, fn: Callable[[], Any]) -> tuple[Any, float | None]:
        if self.libc is None:
            return fn(), None
        self.libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = self._kib("VmRSS:")
        out = fn()
        return out, (self._kib("VmHWM:") - before) / 1024


def online_merge(method: str, task_vectors: Sequence[TaskVector]) -> tuple[dict[str, torch.Tensor], int]:
    """Fold the task vectors into a `StateDictMerger` one at a time; (the unscaled merged τ, state bytes)."""
    merger = StateDictMerger(method)
    for task_vector in task_vectors:
        merger.update(task_vector)
    return merger.result(), _tensor_bytes(merger.state_dict()["accumulators"])


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def merge_costs(methods: Sequence[str], task_vectors: Sequence[TaskVector], tasks: Sequence[int], reps: int) -> dict:
    """Per method and T: median wall time of the online merge, the peak memory it adds, its state bytes."""
    meter = PeakMemory()
    costs: dict[str, dict[str, dict[str, float | None]]] = {}
    for method in methods:
        online_merge(method, task_vectors[:2])  # warm-up: kernels and code pages loaded before measuring
        costs[method] = {}
        for num_tasks in tasks:
            prefix = task_vectors[:num_tasks]
            times = []
            for _ in range(reps):
                start = time.perf_counter()
                online_merge(method, prefix)
                times.append(time.perf_counter() - start)
            (_, state_bytes), peak_mib = meter.measure(functools.partial(online_merge, method, prefix))
            costs[method][str(num_tasks)] = {
                "seconds": statistics.median(times),
                "peak_mib": peak_mib,
                "state_mib": state_bytes / 2**20,
            }
            logger.info("cost %s T=%d: %s", method, num_tasks, costs[method][str(num_tasks)])
    return costs


# --------------------------------------------------------------------------------------------------------------------
# One seed: the whole sequence, every T evaluated on its prefix
# --------------------------------------------------------------------------------------------------------------------


def run_seed(
    args: argparse.Namespace, seed: int, num_permuted: int, methods: Sequence[str], independent: bool = False
) -> tuple[dict, list[TaskVector]]:
    """Pretrain θ_0, fine-tune max(T) tasks in sequence; at each T of `args.tasks`, evaluate every method on tasks
    1..T. Returns {T: {label: {"final_avg_acc", ...}}} (with "per_task" at T = max(T)) and the task vectors.

    `independent`: every task starts from θ_0 instead of the previous task's weights (independent experts, the
    setting OPCM was published in), so θ_T is only the last task's expert."""
    torch.manual_seed(seed)
    splits = load_splits(seed, args.pretrain_examples)
    perms = task_permutations(seed, max(args.tasks), num_permuted)
    model = build_mlp(args.hidden, seed)
    start = time.perf_counter()
    train(model, *splits["pretrain"], args.pretrain_epochs, 2e-3, args.batch_size, seed)
    theta_0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    logger.info(
        "%s, seed %d: θ_0 pretrained in %.1f s",
        sequence_key(num_permuted, independent),
        seed,
        time.perf_counter() - start,
    )

    scratch = build_mlp(args.hidden, seed)
    task_vectors: list[TaskVector] = []
    own_task: list[float] = []
    checkpoints = set(args.tasks)
    rows: dict[str, dict] = {}
    for t, perm in enumerate(perms, start=1):
        x, y = splits["train"]
        if independent:
            model.load_state_dict(theta_0)
        train(model, x[:, perm], y, args.epochs, args.lr, args.batch_size, seed * 100_003 + t)
        theta_t = {k: v.detach().clone() for k, v in model.state_dict().items()}
        task_vectors.append(TaskVector.from_state_dicts(theta_0, theta_t))
        own_task += task_accuracies(model, *splits["test"], [perm])
        if t not in checkpoints:
            continue
        seen = perms[:t]
        row: dict[str, dict] = {}
        scratch.load_state_dict(theta_0)
        row["θ_0 (no training)"] = {"per_task": task_accuracies(scratch, *splits["test"], seen)}
        row["θ_T, the last expert" if independent else "sequential fine-tuning"] = {
            "per_task": task_accuracies(model, *splits["test"], seen)
        }
        row["θ_t on its own task"] = {"per_task": list(own_task)}
        for method in methods:
            row.update(evaluate_merge(method, task_vectors, theta_0, scratch, splits, seen))
        for values in row.values():
            values["final_avg_acc"] = float(np.mean(values["per_task"]))
            if t == len(perms):  # per-task accuracies kept for the longest sequence only (the JSON stays small)
                values["per_task"] = [round(v, 4) for v in values["per_task"]]
            else:
                del values["per_task"]
        rows[str(t)] = row
        logger.info(
            "%s, seed %d, T=%d (%.0f s): %s",
            sequence_key(num_permuted, independent),
            seed,
            t,
            time.perf_counter() - start,
            ", ".join(f"{k} {100 * v['final_avg_acc']:.1f}" for k, v in row.items()),
        )
    return rows, task_vectors


def evaluate_merge(method, task_vectors, theta_0, scratch, splits, seen) -> dict[str, dict]:
    """The merge of the first T task vectors at the method's default λ and at the λ chosen on validation data."""
    coef = default_scaling_coef(method)
    # the user's one call; the online engine (what the Trainer folds into) must give the same weights
    weights = merge_task_vectors(task_vectors[: len(seen)], method).apply_to(theta_0)
    merged, _ = online_merge(method, task_vectors[: len(seen)])
    engine_diff = max(float((apply_merged(theta_0[k], merged[k], coef) - weights[k]).abs().max()) for k in merged)
    scratch.load_state_dict(weights)
    out = {
        f"{LABELS[method]} (λ={coef:g})": {
            "per_task": task_accuracies(scratch, *splits["test"], seen),
            "scaling_coef": coef,
            "engine_max_abs_diff": engine_diff,
        }
    }
    search = search_scaling_coef(
        ScalingCoefApplier(scratch, merged, base=theta_0),
        lambda: float(np.mean(task_accuracies(scratch, *splits["val"], seen))),
        grid=SCALING_COEF_GRID,
    )
    out[f"{LABELS[method]} (λ on val)"] = {
        "per_task": task_accuracies(scratch, *splits["test"], seen),
        "scaling_coef": search.best,
        "val_curve": [[c, round(s, 4)] for c, s in search.curve.items()],
    }
    return out


# --------------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------------


def summarize(per_seed: Sequence[dict], tasks: Sequence[int]) -> dict[str, dict[str, dict[str, float]]]:
    """label → T → mean/std (over seeds) of the final average accuracy, and the mean λ where there is one."""
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for label in per_seed[0][str(tasks[0])]:
        summary[label] = {}
        for num_tasks in tasks:
            cells = [seed_rows[str(num_tasks)][label] for seed_rows in per_seed]
            values = [c["final_avg_acc"] for c in cells]
            entry = {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}
            if "scaling_coef" in cells[0]:
                entry["scaling_coefs"] = [c["scaling_coef"] for c in cells]
            summary[label][str(num_tasks)] = entry
    return summary


def sequence_key(num_permuted: int, independent: bool) -> str:
    return f"{num_permuted}-independent" if independent else str(num_permuted)


def sequence_title(key: str) -> str:
    num_permuted, _, independent = key.partition("-")
    pixels = "all 64 pixels" if int(num_permuted) == NUM_PIXELS else f"{num_permuted} of the 64 pixels"
    if independent:
        return f"{pixels} permuted per task, independent experts (each task fine-tuned from θ_0)"
    return f"{pixels} permuted per task, sequential fine-tuning"


def markdown(results: dict) -> str:
    tasks = results["tasks"]
    header = ["| method | " + " | ".join(f"T={t}" for t in tasks) + " |", "|---|" + "---:|" * len(tasks)]
    lines = [
        f"Final average accuracy (%) over the T tasks, mean ± std over {len(results['seeds'])} seeds "
        f"({', '.join(map(str, results['seeds']))}); chance = 10.0. Rows marked *λ on val* chose λ on the validation "
        "set.",
    ]
    for key, sequence in results["sequences"].items():
        lines += ["", f"**{sequence_title(key)}**", "", *header]
        for label, by_t in sequence["summary"].items():
            cells = [f"{100 * by_t[str(t)]['mean']:.1f} ± {100 * by_t[str(t)]['std']:.1f}" for t in tasks]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "λ chosen on the validation set (per seed, in seed order):", "", *header]
    for key, sequence in results["sequences"].items():
        for label, by_t in sequence["summary"].items():
            if label.endswith("(λ on val)"):
                cells = ["/".join(f"{c:g}" for c in by_t[str(t)]["scaling_coefs"]) for t in tasks]
                lines.append(f"| {label}, sequence {key} | " + " | ".join(cells) + " |")
    setup = results["setup"]
    lines += [
        "",
        f"Merge cost (the task vectors of the first sequence's first seed, {setup['parameters']:,} parameters = "
        f"{setup['task_vector_mib']:.2f} MiB per task vector): the online `StateDictMerger`, T folds + `result()`; "
        f"time = median of {setup['cost_reps']}; peak = resident memory the merge adds; state = the accumulators' "
        "tensors after T tasks.",
        "",
        *header,
    ]
    costs = results["merge_cost"]
    for method, by_t in costs.items():
        cells = [f"{1000 * by_t[str(t)]['seconds']:.3g}" for t in tasks]
        lines.append(f"| {LABELS[method]} time (ms) | " + " | ".join(cells) + " |")
    for method, by_t in costs.items():
        cells = ["–" if by_t[str(t)]["peak_mib"] is None else f"{by_t[str(t)]['peak_mib']:.2f}" for t in tasks]
        lines.append(f"| {LABELS[method]} peak (MiB) | " + " | ".join(cells) + " |")
    for method, by_t in costs.items():
        cells = [f"{by_t[str(t)]['state_mib']:.2f}" for t in tasks]
        lines.append(f"| {LABELS[method]} state (MiB) | " + " | ".join(cells) + " |")
    per_tv = setup["task_vector_mib"]
    lines.append("| the T task vectors themselves (MiB) | " + " | ".join(f"{t * per_tv:.1f}" for t in tasks) + " |")
    if results["missing_methods"]:
        lines += ["", f"Not run (not in this merge core): {', '.join(results['missing_methods'])}."]
    lines += [
        "",
        f"Largest |online engine − `merge_task_vectors`| over every T, method, sequence and seed: "
        f"{results['engine_max_abs_diff']:g}. Whole run: {results['wall_seconds'] / 60:.1f} min, {setup['threads']} "
        f"thread(s), load average {setup['load_average_1min_after']:.1f} at the end.",
        "",
        f"Command: `{results['command']}`",
    ]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """Top row: accuracy vs T, one panel per sequence. Bottom row: merge time, merge memory and the λ chosen on
    validation data vs T. Log-x throughout."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = results["tasks"]
    sequences = results["sequences"]
    ncols = max(len(sequences), 3)
    fig, axes = plt.subplots(2, ncols, figsize=(5.4 * ncols, 9.2), squeeze=False)
    colors = {}
    for ax, (key, sequence) in zip(axes[0], sequences.items()):
        for label, by_t in sequence["summary"].items():
            if label == "θ_t on its own task":
                style = {"color": "gray", "linestyle": ":"}
            elif label == "θ_0 (no training)":
                style = {"color": "black", "linestyle": "--"}
            else:
                base = label.split(" (")[0]
                style = {"linestyle": "--" if "on val" in label else "-", "marker": "o", "markersize": 3}
                if "on val" in label and base in colors:
                    style["color"] = colors[base]
            mean = np.array([by_t[str(t)]["mean"] for t in tasks]) * 100
            std = np.array([by_t[str(t)]["std"] for t in tasks]) * 100
            (line,) = ax.plot(tasks, mean, label=label, **style)
            colors.setdefault(label.split(" (")[0], line.get_color())
            ax.fill_between(tasks, mean - std, mean + std, color=line.get_color(), alpha=0.12)
        ax.axhline(100 / NUM_CLASSES, color="black", linewidth=0.8, alpha=0.4)
        ax.set(ylabel="final average accuracy (%)", ylim=(0, 100))
        ax.set_title(sequence_title(key).replace(" (each task fine-tuned from θ_0)", ""), fontsize=9)
        ax.legend(fontsize=7)
    for ax in axes[0][len(sequences) :]:
        ax.axis("off")
    time_ax, memory_ax, coef_ax = axes[1][:3]
    per_tv = results["setup"]["task_vector_mib"]
    for method, by_t in results["merge_cost"].items():
        color = colors.get(LABELS[method])
        time_ax.plot(tasks, [by_t[str(t)]["seconds"] for t in tasks], marker="o", color=color, label=LABELS[method])
        peaks = [by_t[str(t)]["peak_mib"] for t in tasks]
        if None not in peaks:
            memory_ax.plot(tasks, peaks, marker="o", color=color, label=f"{LABELS[method]}: peak added")
        states = [by_t[str(t)]["state_mib"] for t in tasks]
        memory_ax.plot(tasks, states, linestyle=":", color=color, label=f"{LABELS[method]}: state")
    memory_ax.plot(tasks, [t * per_tv for t in tasks], color="gray", linestyle="--", label="the T task vectors")
    for key, sequence in sequences.items():
        for label, by_t in sequence["summary"].items():
            if label.endswith("(λ on val)"):
                coefs = [float(np.mean(by_t[str(t)]["scaling_coefs"])) for t in tasks]
                style = {"-": "-", "i": ":"}["i" if "independent" in key else "-"]
                marker = "o" if key.startswith(str(NUM_PIXELS)) else "s"
                coef_ax.plot(
                    tasks, coefs, linestyle=style, marker=marker, color=colors.get(label.split(" (")[0]),
                    label=f"{label.split(' (')[0]}, {key}",
                )  # fmt: skip
    time_ax.set(ylabel="merge wall time (s)", title="Merge time (online engine, T folds + result)", yscale="log")
    memory_ax.set(ylabel="memory (MiB)", title="Merge memory (online engine)", yscale="log")
    coef_ax.set(ylabel="λ chosen on validation (mean over seeds)", title="λ on val vs T (sequence key in legend)")
    for ax in [*axes[0][: len(sequences)], time_ax, memory_ax, coef_ax]:
        ax.set(xscale="log", xlabel="number of tasks T")
        ax.set_xticks(tasks, [str(t) for t in tasks])
        ax.minorticks_off()
    for ax in (time_ax, memory_ax, coef_ax):
        ax.legend(fontsize=7)
    for ax in axes[1][3:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=list(DEFAULT_TASKS), help="sequence lengths T")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(MERGES), choices=MERGES)
    parser.add_argument(
        "--permuted-pixels",
        type=int,
        nargs="+",
        default=[NUM_PIXELS, 16],
        help="one task sequence (sequential fine-tuning) per value: how many of the 64 pixels each task permutes",
    )
    parser.add_argument(
        "--independent-pixels",
        type=int,
        nargs="*",
        default=[16],
        help="the same with independent experts (every task fine-tuned from θ_0); none: leave them out",
    )
    parser.add_argument("--epochs", type=int, default=5, help="epochs per task")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate per task")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=256, help="width of the MLP's two hidden layers")
    parser.add_argument("--pretrain-examples", type=int, default=300)
    parser.add_argument("--pretrain-epochs", type=int, default=30)
    parser.add_argument("--cost-reps", type=int, default=3, help="repetitions of each timed merge (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    parser.add_argument("--name", default="long_sequences", help="stem of the output files")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--quick", action="store_true", help="smoke run: T = 2, 3, one seed, tiny model")
    args = parser.parse_args(argv)
    if args.quick:
        args.tasks, args.seeds, args.epochs, args.hidden = [2, 3], [0], 1, 16
        args.permuted_pixels, args.independent_pixels = [64, 16], [16]
        args.pretrain_epochs, args.cost_reps = 1, 1
    args.tasks = sorted(set(args.tasks))
    if not all(2 <= k <= NUM_PIXELS for k in [*args.permuted_pixels, *args.independent_pixels]):
        parser.error(f"`--permuted-pixels` and `--independent-pixels` take values from 2 to {NUM_PIXELS}.")
    if args.tasks[0] < 1 or args.epochs < 1 or args.hidden < 1 or args.cost_reps < 1 or not args.seeds:
        parser.error("`--tasks`, `--epochs`, `--hidden` and `--cost-reps` must be >= 1, and `--seeds` non-empty.")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("hf_magmax.scaling").setLevel(logging.WARNING)  # one line per λ of every search otherwise
    torch.set_num_threads(args.threads)
    methods = [m for m in args.methods if m in ONLINE_MERGES]
    missing = [m for m in args.methods if m not in ONLINE_MERGES]
    if missing:
        logger.warning("not in this merge core, skipped: %s", ", ".join(missing))
    start = time.perf_counter()
    sequences, costs, diffs = {}, None, []
    families = [(k, False) for k in args.permuted_pixels] + [(k, True) for k in args.independent_pixels]
    for num_permuted, independent in families:
        per_seed = {}
        for seed in args.seeds:
            rows, task_vectors = run_seed(args, seed, num_permuted, methods, independent)
            per_seed[str(seed)] = rows
            diffs += [
                cell["engine_max_abs_diff"]
                for row in rows.values()
                for cell in row.values()
                if "engine_max_abs_diff" in cell
            ]
            if costs is None:  # the first sequence's first seed: merge cost vs T
                costs = merge_costs(methods, task_vectors, args.tasks, args.cost_reps)
                parameters = sum(v.numel() for v in task_vectors[0].values())
                tv_mib = sum(v.numel() * v.element_size() for v in task_vectors[0].values()) / 2**20
            del task_vectors
        sequences[sequence_key(num_permuted, independent)] = {
            "summary": summarize(list(per_seed.values()), args.tasks),
            "per_seed": per_seed,
        }
    command = "python benchmarks/long_sequences.py" + "".join(
        f" {a}" for a in (sys.argv[1:] if argv is None else argv)
    )
    results = {
        "setup": {
            "data": "scikit-learn load_digits, domain-incremental: task t = a fixed random permutation of "
            "`permuted_pixels` pixels at random positions, drawn from (seed, permuted_pixels, t)",
            "splits": {k: len(v[1]) for k, v in load_splits(args.seeds[0], args.pretrain_examples).items()},
            "model": f"MLP 64-{args.hidden}-{args.hidden}-10 (ReLU)",
            "parameters": parameters,
            "task_vector_mib": tv_mib,
            "theta_0": f"pretrained on the unpermuted pretrain split, {args.pretrain_epochs} epochs, AdamW lr 2e-3",
            "per_task": f"{args.epochs} epochs, AdamW lr {args.lr:g} (linear decay, fresh per task, no weight decay), "
            f"batch {args.batch_size}, from the previous task's weights; plain torch loop",
            "scaling_coef_grid": list(SCALING_COEF_GRID),
            "cost_reps": args.cost_reps,
            "threads": args.threads,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu_count": os.cpu_count(),
        },
        "command": command,
        "tasks": args.tasks,
        "seeds": args.seeds,
        "permuted_pixels": args.permuted_pixels,
        "independent_pixels": args.independent_pixels,
        "methods": methods,
        "missing_methods": missing,
        "sequences": sequences,
        "merge_cost": costs,
        "engine_max_abs_diff": max(diffs) if diffs else 0.0,
        "wall_seconds": time.perf_counter() - start,
    }
    results["setup"]["load_average_1min_after"] = os.getloadavg()[0]
    args.output_dir.mkdir(parents=True, exist_ok=True)
    stem = args.output_dir / args.name
    text = json.dumps(results, indent=1, ensure_ascii=False)
    text = re.sub(r"\[\n\s*([^\[\]{}]*?)\n\s*\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
    with open(f"{stem}.json", "w", encoding="utf-8") as f:  # lists of numbers on one line each
        f.write(text + "\n")
    table = markdown(results)
    with open(f"{stem}.md", "w", encoding="utf-8") as f:
        f.write(table)
    if not args.no_plot:
        plot(results, Path(f"{stem}.png"))
    sys.stdout.write(table)
    return results


if __name__ == "__main__":
    main()
