# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""Memory per rank of `MagMaxTrainer` under DeepSpeed ZeRO-3 on CPU (2 processes), against a plain `Trainer` running
the same tasks, and against DDP.

A Llama built from a config (`--hidden 768 --layers 4 --vocab 16000`: 53 M parameters, 212 MB in fp32) is saved once
and loaded with `from_pretrained` in every run; each run trains `--tasks` causal-LM tasks of `--steps` steps (AdamW,
batch 2 × 64 tokens per rank, a fresh optimizer per task), no evaluation, and is a fresh 2-process launch:

- `ZeRO-3`: `accelerate launch --config_file recipes/accelerate_configs/deepspeed_zero3.yaml --num_processes 2
  --mixed_precision no|bf16` (`zero3_init_flag: true`: `from_pretrained` loads the model partitioned, so θ_0 is taken
  from the partitions), `DS_ACCELERATOR=cpu`, gloo;
- `DDP`: `torchrun --nproc_per_node 2` (gloo).

Per rank: the peak of `RssAnon` (anonymous memory: weights, gradients, optimizer states, the merge state; sampled every
5 ms), the peak RSS (`VmHWM`, which also counts memory-mapped files), and the merge state's own bytes
(`MergeState.resident_bytes()`: `merge` = θ_best or the accumulators, `base` = θ_0's private bytes, 0 when it is
memory-mapped from the run's base file). The plain `Trainer` baseline calls `hf_magmax.trainer.deepspeed.fresh_engine`
before each task's `train()` (without it a second `train()` under DeepSpeed fails).

    PYTHONPATH=src python benchmarks/trainer_zero3_memory.py --output benchmarks/results/trainer_zero3_memory.md
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from _memory import AnonPeak, proc_status  # benchmarks/ is sys.path[0] when run as a script


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ZERO3_CONFIG = os.path.join(ROOT, "recipes", "accelerate_configs", "deepspeed_zero3.yaml")
#: (name, launcher, mixed precision, trainer)
CASES = (
    ("ZeRO-3, fp32", "zero3", "no", "magmax"),
    ("ZeRO-3, fp32", "zero3", "no", "plain"),
    ("ZeRO-3, bf16 mixed precision", "zero3", "bf16", "magmax"),
    ("ZeRO-3, bf16 mixed precision", "zero3", "bf16", "plain"),
    ("DDP, fp32", "ddp", "no", "magmax"),
    ("DDP, fp32", "ddp", "no", "plain"),
)
MIB = 1 << 20


def build_model(cli: argparse.Namespace, path: str) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=cli.vocab,
        hidden_size=cli.hidden,
        intermediate_size=cli.hidden * 8 // 3,
        num_hidden_layers=cli.layers,
        num_attention_heads=cli.hidden // 64,
        num_key_value_heads=cli.hidden // 64,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def tasks(cli: argparse.Namespace) -> dict:
    import torch
    from datasets import Dataset

    out = {}
    for task in range(cli.tasks):
        generator = torch.Generator().manual_seed(task)
        ids = torch.randint(0, cli.vocab, (2 * 2 * cli.steps, 64), generator=generator).tolist()
        out[f"task{task}"] = Dataset.from_dict({"input_ids": ids, "labels": ids})
    return out


def worker(cli: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from hf_magmax import MagMaxConfig, MagMaxTrainer
    from hf_magmax.trainer.deepspeed import fresh_engine

    torch.set_num_threads(1)
    sampler = AnonPeak()
    sampler.start()
    magmax = cli.trainer == "magmax"
    config_class = MagMaxConfig if magmax else TrainingArguments
    args = config_class(
        output_dir=os.path.join(cli.workdir, f"run-{cli.case}"),
        max_steps=cli.steps,
        per_device_train_batch_size=2,
        learning_rate=1e-4,
        optim="adamw_torch",
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        ddp_backend="gloo" if cli.launcher == "ddp" else None,
        bf16=cli.precision == "bf16",  # as the accelerate config's mixed precision (DeepSpeed checks they match)
        **({"merge_method": "magmax", "scaling_coef": 0.5} if magmax else {}),
    )
    model = AutoModelForCausalLM.from_pretrained(os.path.join(cli.workdir, "model"))
    partitioned = any(getattr(p, "ds_tensor", None) is not None for p in model.parameters())
    train = tasks(cli)
    start = time.perf_counter()
    if magmax:
        trainer = MagMaxTrainer(model, args, train_datasets=train)
        trainer.train()
        state = trainer._magmax.state.resident_bytes()
    else:
        trainer = Trainer(model, args, train_dataset=next(iter(train.values())))
        for dataset in train.values():
            trainer.train_dataset = dataset
            trainer.optimizer, trainer.lr_scheduler = None, None
            fresh_engine(trainer)
            trainer.train()
        state = None
    seconds = time.perf_counter() - start
    sampler.running = False
    sampler.join()
    result = {
        "distributed_type": str(trainer.accelerator.distributed_type).rsplit(".", 1)[-1],
        "partitioned_at_load": partitioned,
        "dtype": str(next(trainer.model.parameters()).dtype).removeprefix("torch."),
        "anon_peak": sampler.peak,
        "hwm": proc_status("VmHWM"),
        "state": state,
        "seconds": seconds,
    }
    with open(os.path.join(cli.workdir, f"{cli.case}-rank{args.process_index}.json"), "w") as f:
        json.dump(result, f)


def launch(cli: argparse.Namespace, case: int, workdir: str) -> list[dict]:
    _, launcher, precision, trainer = CASES[case]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    if launcher == "zero3":
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", ZERO3_CONFIG]
        cmd += ["--num_processes", "2", "--mixed_precision", precision, "--main_process_port", port]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    cmd += [__file__, "--worker", "--case", str(case), "--workdir", workdir, "--trainer", trainer]
    cmd += [
        "--launcher",
        launcher,
        "--precision",
        precision,
        "--steps",
        str(cli.steps),
        "--tasks",
        str(cli.tasks),
        "--vocab",
        str(cli.vocab),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"case {CASES[case]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return [json.load(open(os.path.join(workdir, f"{case}-rank{rank}.json"))) for rank in (0, 1)]


def report(cli: argparse.Namespace, params: int, results: dict) -> str:
    lines = [
        f"Llama from a config: hidden {cli.hidden}, {cli.layers} layers, vocab {cli.vocab}: {params:,} parameters "
        f"({params * 4 / MIB:.0f} MiB in fp32); {cli.tasks} tasks × {cli.steps} steps, AdamW, batch 2 × 64 tokens per "
        "rank, no evaluation; 2 processes, gloo, CPU. Per rank (rank 0 / rank 1).",
        "",
        "| run | trainer | params dtype | peak RssAnon (MiB) | peak RSS, VmHWM (MiB) | merge state (θ_best), bytes "
        "| θ_0 private bytes | merge state, B/param of the whole model | wall (s) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for case, ranks in results.items():
        name, _, _, trainer = CASES[case]
        state = [r["state"] for r in ranks]
        merge = " / ".join(f"{s['merge']:,}" for s in state) if state[0] else "—"
        base = " / ".join(f"{s['base']:,}" for s in state) if state[0] else "—"
        per_param = " / ".join(f"{s['merge'] / params:.2f}" for s in state) if state[0] else "—"
        anon = " / ".join(f"{r['anon_peak'] / MIB:.0f}" for r in ranks)
        hwm = " / ".join(f"{r['hwm'] / MIB:.0f}" for r in ranks)
        kind = "MagMaxTrainer" if trainer == "magmax" else "Trainer"
        lines.append(
            f"| {name} ({ranks[0]['distributed_type']}) | {kind} | {ranks[0]['dtype']} | {anon} | {hwm} | {merge} "
            f"| {base} | {per_param} | {max(r['seconds'] for r in ranks):.1f} |"
        )
    lines.append("")
    for case in range(0, len(CASES), 2):
        if case in results and case + 1 in results:
            with_magmax, plain = results[case], results[case + 1]
            added = [(m["anon_peak"] - p["anon_peak"]) / MIB for m, p in zip(with_magmax, plain)]
            lines.append(
                f"- {CASES[case][0]}: MagMaxTrainer − Trainer, peak RssAnon per rank: "
                + " / ".join(f"{a:+.0f} MiB" for a in added)
                + f" (the merge state: {with_magmax[0]['state']['merge'] / MIB:.0f} MiB per rank)"
            )
    lines += ["", f"Command: `PYTHONPATH=src python benchmarks/trainer_zero3_memory.py` ({_versions()})."]
    return "\n".join(lines)


def _versions() -> str:
    import deepspeed
    import torch
    import transformers

    return (
        f"torch {torch.__version__}, transformers {transformers.__version__}, deepspeed {deepspeed.__version__}, "
        f"{os.cpu_count()} CPU cores"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--tasks", type=int, default=2)
    parser.add_argument("--output", default=None)
    parser.add_argument("--cases", default=",".join(str(i) for i in range(len(CASES))))
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--case", type=int)
    parser.add_argument("--workdir")
    parser.add_argument("--trainer")
    parser.add_argument("--launcher")
    parser.add_argument("--precision")
    cli = parser.parse_args()
    if cli.worker:
        worker(cli)
        return
    workdir = tempfile.mkdtemp(prefix="trainer_zero3_memory")
    try:
        params = build_model(cli, os.path.join(workdir, "model"))
        results = {case: launch(cli, case, workdir) for case in map(int, cli.cases.split(","))}
        text = report(cli, params, results)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(text)
    if cli.output:
        with open(cli.output, "w", encoding="utf-8") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
