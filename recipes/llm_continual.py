# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""Continual instruction tuning of a causal LM on Standard CL, Long-15 or SuperNI-15, sequential vs MagMax.

The O-LoRA lineage of LLM continual-learning benchmarks, as "Merge before Forget" (SLAO, ICLR 2026) reports MagMax on
them (Llama-2-7B-chat, LoRA r 8 on q_proj/v_proj, 1 epoch per task, 3 seeds):

- `benchmark: standard_cl`, orders 1-3: dbpedia → amazon → yahoo → agnews, dbpedia → amazon → agnews → yahoo,
  yahoo → amazon → agnews → dbpedia; exact match (published: MagMax 80.3, SeqLoRA 76.0, O-LoRA 77.2, SLAO 80.4,
  MTL 80.9);
- `benchmark: long15`, orders 4-6 of 15 tasks (MNLI, CB, WiC, COPA, QQP, BoolQA, RTE, IMDB, yelp, amazon, SST-2,
  dbpedia, agnews, MultiRC, yahoo); exact match (MagMax 73.4, SeqLoRA 68.7, SLAO 74.8, MTL 78.1);
- `benchmark: superni`, orders 7-8 of 15 Super-NaturalInstructions tasks; ROUGE-L (MagMax 11.2, SeqLoRA 22.6,
  SLAO 37.2, MTL 45.2).

Data: O-LoRA's `CL_Benchmark` folder (github.com/cmnfriend/O-LoRA), `<data_path>/<task type>/<task>/{train,dev,test}.json`
+ `labels.json` (e.g. `TC/dbpedia`), for Standard CL and Long-15; SAPT's `CL_Benchmark` (github.com/circle-hit/SAPT),
`<data_path>/SuperNI/<task>/{train,dev,test}.json`, for SuperNI-15. Prompts are O-LoRA's (`Task:` / `Dataset:` prefix,
the task type's instruction, `Option:` with the label set, the sentence, `Answer:`) and SAPT's for SuperNI
(`Definition: ... Now complete the following example - Input: ... Output: `); sequences are `BOS + prompt + answer +
EOS` with the prompt masked (`hf_magmax.extras.llm_cl`, `hf_magmax.extras.generation`).

For every order and seed, the model is fine-tuned on the tasks in order; before training and after every task the
sequential model and the MagMax model generate answers for every task's test set (greedy). The average performance
(AP, the mean score over all tasks after the last one), BWT and forgetting are averaged over orders and seeds.

Outputs in `output_dir`: `order<o>_seed<s>/continual_results.json` per run (both score matrices, row 0 = the base
model), `llm_cl_results.json` (every run, the mean ± std over runs, the published numbers and their source) and
`results.md` (the table, ours beside the published numbers).

LoRA, the SLAO setting (8 GPUs; one GPU: `python recipes/llm_continual.py --config ...`):

    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml \\
        recipes/llm_continual.py --config recipes/configs/standard_cl_lora.yaml --data_path path/to/O-LoRA/CL_Benchmark
    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml \\
        recipes/llm_continual.py --config recipes/configs/long15_lora.yaml --data_path path/to/O-LoRA/CL_Benchmark
    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml \\
        recipes/llm_continual.py --config recipes/configs/superni_lora.yaml --data_path path/to/SAPT/CL_Benchmark

Full fine-tuning (ZeRO-3):

    accelerate launch --config_file recipes/accelerate_configs/deepspeed_zero3.yaml \\
        recipes/llm_continual.py --config recipes/configs/standard_cl_full_ft.yaml --data_path path/to/CL_Benchmark

One order and seed per launch (to spread runs over machines): `--orders 2 --seeds 1`. Relaunching an interrupted sweep
with `--skip_finished_runs true` reuses the runs already complete in `output_dir`.
"""

from __future__ import annotations

import gc
import json
import logging
import os
from dataclasses import dataclass, field

from recipe_common import args_to_dict, check_launch, end_launch, parse_recipe_args, setup_logging, write_json
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, set_seed

from hf_magmax.extras.generation import run_continual_generation
from hf_magmax.extras.llm_cl import (
    BENCHMARK_METRICS,
    BENCHMARK_ORDERS,
    PUBLISHED_RESULTS,
    TASK_ORDERS,
    load_cl_benchmark,
    reference_table,
    summarize_runs,
)
from hf_magmax.trainer import MagMaxConfig


logger = logging.getLogger(__name__)

#: The text after which the answer starts, per benchmark (O-LoRA's `Answer:`, SAPT's `Output:`).
ANSWER_PREFIXES = {"standard_cl": "Answer:", "long15": "Answer:", "superni": "Output:"}


@dataclass
class ScriptArguments:
    """Benchmark, data, generation and LoRA arguments (training hyperparameters live in `MagMaxConfig`)."""

    model_name_or_path: str = field(
        default="meta-llama/Llama-2-7b-chat-hf", metadata={"help": "Hub id or local folder of the causal LM θ_0."}
    )
    data_path: str | None = field(
        default=None,
        metadata={"help": "The benchmark folder (O-LoRA's or SAPT's `CL_Benchmark`), or a Hub dataset repo id."},
    )
    benchmark: str = field(default="standard_cl", metadata={"help": "`standard_cl`, `long15` or `superni`."})
    orders: list[int] | None = field(
        default=None, metadata={"help": "Task orders to run (default: all of the benchmark: 1-3, 4-6 or 7-8)."}
    )
    seeds: list[int] | None = field(
        default=None, metadata={"help": "Seeds to run every order with (default: the `seed` of the config)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Cap training examples per task."})
    max_test_samples: int | None = field(default=None, metadata={"help": "Cap test examples per task."})
    max_prompt_len: int = field(default=512, metadata={"help": "Prompt tokens kept (O-LoRA: 512 source tokens)."})
    max_answer_len: int = field(default=50, metadata={"help": "Answer tokens trained on (O-LoRA: 50)."})
    max_new_tokens: int = field(default=50, metadata={"help": "Generated tokens per prompt (O-LoRA: 50)."})
    generation_batch_size: int = field(default=8, metadata={"help": "Prompts per generate call (per process)."})
    add_task_name: bool = field(default=True, metadata={"help": "O-LoRA's `Task:<type>` prompt prefix."})
    add_dataset_name: bool = field(default=True, metadata={"help": "O-LoRA's `Dataset:<task>` prompt prefix."})
    use_peft: bool = field(default=False, metadata={"help": "Train a LoRA adapter (the SLAO setting)."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (O-LoRA: 32)."})
    lora_dropout: float = field(default=0.1, metadata={"help": "LoRA dropout (O-LoRA: 0.1)."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "v_proj"], metadata={"help": "Modules LoRA adapts."}
    )
    skip_finished_runs: bool = field(
        default=False,
        metadata={
            "help": "Reuse a run whose `order<o>_seed<s>/continual_results.json` is complete (same tasks, every task "
            "scored) instead of training it again: relaunch an interrupted sweep with the same command."
        },
    )
    save_final_models: bool = field(
        default=False, metadata={"help": "Save every run's final model in its folder (large for a 7B model)."}
    )

    def __post_init__(self):
        if not self.data_path:
            raise ValueError(
                "`data_path` is required: the local `CL_Benchmark` folder (O-LoRA's, or SAPT's for SuperNI)."
            )
        if self.benchmark not in BENCHMARK_ORDERS:
            raise ValueError(f"`benchmark` must be one of {', '.join(BENCHMARK_ORDERS)}, got {self.benchmark!r}.")
        valid = BENCHMARK_ORDERS[self.benchmark]
        self.orders = list(valid) if not self.orders else [int(o) for o in self.orders]
        wrong = [o for o in self.orders if o not in valid]
        if wrong:
            raise ValueError(
                f"`orders` {wrong} are not orders of `benchmark` {self.benchmark!r}: use some of {list(valid)}."
            )


def check_model(args: ScriptArguments) -> None:
    """Fail before any data is read or step trained when the model is not a causal LM."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    config = AutoConfig.from_pretrained(args.model_name_or_path)
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ValueError(
            f"`model_name_or_path` {args.model_name_or_path!r} ({config.model_type!r}) has no causal-LM head "
            "(AutoModelForCausalLM): the benchmarks train and generate with a decoder-only LM such as Llama."
        )


def lora_config(args: ScriptArguments):
    if not args.use_peft:
        return None
    from peft import LoraConfig

    return LoraConfig(
        task_type="CAUSAL_LM",
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=args.lora_target_modules,
    )


def run_one(script_args: ScriptArguments, training_args: MagMaxConfig, order: int, seed: int) -> dict:
    """One order with one seed: train the task sequence, return the trainer's continual results."""
    training_args.seed = seed
    set_seed(seed)
    tasks = TASK_ORDERS[order]
    with training_args.main_process_first(desc="loading the benchmark"):
        data = load_cl_benchmark(
            script_args.data_path,
            tasks,
            splits=("train", "test"),
            max_samples={"train": script_args.max_train_samples, "test": script_args.max_test_samples},
            add_task_name=script_args.add_task_name,
            add_dataset_name=script_args.add_dataset_name,
        )
    tokenizer = AutoTokenizer.from_pretrained(script_args.model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(script_args.model_name_or_path, dtype="auto")
    trainer = run_continual_generation(
        model,
        tokenizer,
        data,
        training_args,
        metric=BENCHMARK_METRICS[script_args.benchmark],
        peft_config=lora_config(script_args),
        max_prompt_len=script_args.max_prompt_len,
        max_answer_len=script_args.max_answer_len,
        generation_kwargs={"max_new_tokens": script_args.max_new_tokens},
        generation_batch_size=script_args.generation_batch_size,
        answer_prefix=ANSWER_PREFIXES[script_args.benchmark],
    )
    if script_args.save_final_models:
        trainer.save_model(training_args.output_dir)
    results = trainer.continual_results
    del trainer, model
    gc.collect()
    return results


def finished_run(output_dir: str, tasks: tuple[str, ...]) -> dict | None:
    """The continual results of a complete earlier run in `output_dir` (the same tasks, the last row of both matrices
    and every row of the sequential one scored), else `None`."""
    path = os.path.join(output_dir, "continual_results.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        results = json.load(f)
    if results.get("task_names") != list(tasks):
        return None
    sequential, merged = results.get("sequential", {}).get("matrix"), results.get("merged", {}).get("matrix")
    if not sequential or not merged or len(sequential) != len(tasks) + 1 or len(merged) != len(tasks) + 1:
        return None
    if any(v is None for row in sequential for v in row) or any(v is None for v in merged[-1]):
        return None
    return results


def summary_rows(script_args: ScriptArguments, summary: dict) -> dict[str, str]:
    """Our rows of the table: `SeqLoRA`/`SeqFT` and `MagMax`, AP as mean ± std over the runs."""
    sequential = "SeqLoRA" if script_args.use_peft else "SeqFT"
    rows = {}
    for kind, label in (("sequential", sequential), ("merged", "MagMax")):
        ap = summary[kind].get("final_average_accuracy")
        if ap is not None:
            rows[f"{label} (ours)"] = f"{ap['mean']:.2f} ± {ap['std']:.2f}"
    return rows


def main(argv=None):
    script_args, training_args = parse_recipe_args((ScriptArguments, MagMaxConfig), argv)
    setup_logging(training_args)
    check_launch(training_args)
    check_model(script_args)
    seeds = [int(s) for s in script_args.seeds] if script_args.seeds else [training_args.seed]
    root = training_args.output_dir
    runs = []
    for order in script_args.orders:
        for seed in seeds:
            training_args.output_dir = os.path.join(root, f"order{order}_seed{seed}")
            results = (
                finished_run(training_args.output_dir, TASK_ORDERS[order]) if script_args.skip_finished_runs else None
            )
            if results is not None:
                logger.info(
                    "order %d, seed %d: complete results in %s, not trained again",
                    order,
                    seed,
                    training_args.output_dir,
                )
            else:
                logger.info("%s order %d %s, seed %d", script_args.benchmark, order, TASK_ORDERS[order], seed)
                results = run_one(script_args, training_args, order, seed)
            runs.append({"order": order, "seed": seed, "tasks": list(TASK_ORDERS[order]), **results})
    training_args.output_dir = root

    summary = summarize_runs(runs)
    table = reference_table(script_args.benchmark, summary_rows(script_args, summary))
    payload = {
        "benchmark": script_args.benchmark,
        "metric": BENCHMARK_METRICS[script_args.benchmark],
        "orders": script_args.orders,
        "seeds": seeds,
        "summary": summary,
        "published": PUBLISHED_RESULTS[script_args.benchmark],
        "table": table,
        "runs": runs,
        "script_args": args_to_dict(script_args),
        "world_size": training_args.world_size,
    }
    if training_args.process_index == 0:
        write_json(os.path.join(root, "llm_cl_results.json"), payload)
        with open(os.path.join(root, "results.md"), "w", encoding="utf-8") as f:
            f.write(f"# {script_args.benchmark}: average performance (%), {len(runs)} run(s)\n\n{table}\n")
        logger.info("%s, %d run(s):\n%s", script_args.benchmark, len(runs), table)
    return payload


if __name__ == "__main__":
    main()
    end_launch()
