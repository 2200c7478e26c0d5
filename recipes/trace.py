# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""Continual instruction tuning of an LLM on TRACE (Wang et al., 2023), sequential fine-tuning vs MagMax.

The eight TRACE tasks are learned in order, C-STANCE → FOMC → MeetingBank → Py150 → ScienceQA → NumGLUE-cm →
NumGLUE-ds → 20Minuten, from TRACE's data layout `<data_path>/<task>/{train,eval,test}.json` (a local folder or a Hub
dataset repo). Sequences are collated as TRACE does (`BOS + prompt + answer + EOS`, the prompt masked, no chat
template). Before training and after every task, the sequentially fine-tuned model and the MagMax-merged model generate
answers for the test set of every task, scored with TRACE's metric of that task (exact match, ScienceQA answer letter,
ROUGE-L, edit similarity, SARI; all in [0, 100]).

Outputs in `output_dir`: `continual_results.json` (both score matrices, row 0 = the base model), `trace_results.json`
(TRACE's OP and BWT for sequential fine-tuning and for MagMax, plus the arguments), the final model.

Full fine-tuning (TRACE's SeqFT setting, 8 GPUs, ZeRO-3):

    accelerate launch --config_file recipes/accelerate_configs/deepspeed_zero3.yaml \
        recipes/trace.py --config recipes/configs/trace_full_ft.yaml

LoRA (TRACE's LoRA setting: r 8, alpha 32, dropout 0.1 on q_proj/v_proj, lr 1e-4, epochs per task 5,3,7,5,3,5,5,7):

    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml \
        recipes/trace.py --config recipes/configs/trace_lora.yaml

The 500-sample release (LLM-CL-Benchmark_500, the variant recent papers report; TreeLoRA's scripts):

    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml \
        recipes/trace.py --config recipes/configs/trace_500_lora.yaml

FSDP: `--config_file recipes/accelerate_configs/fsdp.yaml`. One GPU: `python recipes/trace.py --config ...`.
Resume an interrupted run with `--resume_from_checkpoint true`; push with `--push_to_hub true --hub_model_id you/name`.

What was run where: the first two commands above (full fine-tuning, LoRA), exactly as written except for
`--num_processes 2 --mixed_precision no` (the configs say 8 GPUs and bf16), run end to end on CPU (2 processes, gloo;
DeepSpeed 0.19.8 with `DS_ACCELERATOR=cpu`) with a tiny Llama, the tiny TRACE fixture and
`recipes/configs/tiny_trace.yaml`, 2 tasks, each writing `trace_results.json` (`tests/test_recipes_launch.py`). Under
the ZeRO-3 config the model is loaded partitioned (`zero3_init_flag`), each rank folds its partitions, and `save_model`
consolidates the merged model once (`zero3_save_16bit_model: true`; without it MagMaxTrainer refuses to start, since
DeepSpeed's own checkpoint would hold the sequential model). The LoRA command trains under DDP. `torchrun
--nproc_per_node 2 recipes/trace.py ...` (DDP, full fine-tuning) is tested too (`tests/test_recipes.py`). Neither 7B
config has been run here (no GPU); FSDP on CPU is not run by Accelerate (see recipes/README.md).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from recipe_common import (
    check_launch,
    end_launch,
    finish_run,
    parse_recipe_args,
    resume_argument,
    setup_logging,
    write_json,
)
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, set_seed

from hf_magmax.extras.generation import TASK_COLUMN, GenerationMagMaxTrainer
from hf_magmax.extras.llm_cl import PUBLISHED_RESULTS, reference_table
from hf_magmax.trace import (
    TRACE_TASKS,
    TraceDataCollator,
    load_trace,
    score_trace_task,
    trace_summary,
)
from hf_magmax.trainer import MagMaxConfig
from hf_magmax.trainer.config import check_per_task_length


logger = logging.getLogger(__name__)


@dataclass
class ScriptArguments:
    """Data, generation and LoRA arguments of the TRACE recipe (training hyperparameters live in `MagMaxConfig`)."""

    model_name_or_path: str = field(
        default="meta-llama/Llama-2-7b-chat-hf", metadata={"help": "Hub id or local folder of the causal LM θ_0."}
    )
    data_path: str | None = field(
        default=None,
        metadata={"help": "TRACE data: a local folder or a Hub dataset repo with `<task>/{train,eval,test}.json`."},
    )
    tasks: list[str] = field(
        default_factory=lambda: list(TRACE_TASKS), metadata={"help": "Tasks in learning order (TRACE's by default)."}
    )
    max_prompt_len: int = field(default=1024, metadata={"help": "Prompt tokens kept (left truncation), as TRACE."})
    max_answer_len: int = field(default=512, metadata={"help": "Answer tokens kept in training, as TRACE."})
    max_new_tokens: int = field(default=256, metadata={"help": "Generated tokens per test prompt."})
    generation_batch_size: int = field(default=8, metadata={"help": "Prompts per generate call (per process)."})
    do_sample: bool = field(default=False, metadata={"help": "Sample (TRACE: temperature 0.1) instead of greedy."})
    temperature: float = field(default=0.1, metadata={"help": "Sampling temperature when `do_sample`."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Cap training examples per task."})
    max_test_samples: int | None = field(default=None, metadata={"help": "Cap test examples per task."})
    use_peft: bool = field(default=False, metadata={"help": "Train a LoRA adapter (TRACE's LoRA setting)."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.1, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "v_proj"], metadata={"help": "Modules LoRA adapts."}
    )
    trace_variant: str = field(
        default="5000",
        metadata={
            "help": "The release the data comes from, `5000` (LLM-CL-Benchmark_5000) or `500` (LLM-CL-Benchmark_500, "
            "500 training samples per task): selects the published numbers printed beside ours."
        },
    )

    def __post_init__(self):
        if not self.data_path:
            raise ValueError("`data_path` is required: a local TRACE folder or a Hub dataset repo id.")
        self.trace_variant = str(self.trace_variant)
        if self.trace_variant not in ("5000", "500"):
            raise ValueError(f"`trace_variant` must be `5000` or `500`, got {self.trace_variant!r}.")
        if not self.tasks:
            raise ValueError(f"`tasks` is empty: list TRACE tasks in learning order, e.g. {list(TRACE_TASKS)}.")


def score_trace(task: str, predictions: list[str], dataset) -> float:
    """TRACE's metric of `task` on the generated answers (the prompts are SARI's sources)."""
    return score_trace_task(task, predictions, dataset["answer"], sources=dataset["prompt"])


def check_model(args: ScriptArguments) -> None:
    """Fail before any download or training step when the model is not a causal LM."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    config = AutoConfig.from_pretrained(args.model_name_or_path)
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ValueError(
            f"`model_name_or_path` {args.model_name_or_path!r} ({config.model_type!r}) has no causal-LM head "
            "(AutoModelForCausalLM): TRACE trains and generates with a decoder-only LM such as Llama."
        )


def main(argv=None):
    script_args, training_args = parse_recipe_args((ScriptArguments, MagMaxConfig), argv)
    setup_logging(training_args)
    check_launch(training_args)
    set_seed(training_args.seed)
    if training_args.continual_metric not in (None, "score"):
        raise ValueError("`continual_metric` of the TRACE recipe is its generation `score`; leave it unset.")
    training_args.continual_metric = "score"
    training_args.remove_unused_columns = False  # the collator needs the raw `prompt` / `answer` text

    check_per_task_length(training_args, len(script_args.tasks))  # TRACE's per-task epochs: one per task
    check_model(script_args)
    with training_args.main_process_first(desc="loading TRACE"):
        trace = load_trace(
            script_args.data_path,
            tasks=script_args.tasks,
            splits=("train", "test"),
            max_samples={"train": script_args.max_train_samples, "test": script_args.max_test_samples},
        )
    train_datasets, eval_datasets = {}, {}
    for task, parts in trace.items():
        train_datasets[task] = parts["train"]
        eval_datasets[task] = parts["test"].add_column(TASK_COLUMN, [task] * len(parts["test"]))  # names the metric

    tokenizer = AutoTokenizer.from_pretrained(script_args.model_name_or_path)
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(script_args.model_name_or_path, dtype="auto")

    peft_config = None
    if script_args.use_peft:
        from peft import LoraConfig

        peft_config = LoraConfig(
            task_type="CAUSAL_LM",
            r=script_args.lora_r,
            lora_alpha=script_args.lora_alpha,
            lora_dropout=script_args.lora_dropout,
            target_modules=script_args.lora_target_modules,
        )
    generation_kwargs = {"max_new_tokens": script_args.max_new_tokens, "do_sample": script_args.do_sample}
    if script_args.do_sample:
        generation_kwargs["temperature"] = script_args.temperature

    trainer = GenerationMagMaxTrainer(
        model=model,
        args=training_args,
        data_collator=TraceDataCollator(
            tokenizer, max_prompt_len=script_args.max_prompt_len, max_answer_len=script_args.max_answer_len
        ),
        processing_class=tokenizer,
        train_datasets=train_datasets,
        eval_datasets=eval_datasets,
        peft_config=peft_config,
        metric=score_trace,
        generation_kwargs=generation_kwargs,
        generation_batch_size=script_args.generation_batch_size,
        max_prompt_len=script_args.max_prompt_len,
        answer_prefix=None,  # TRACE scores the decoded answer as it is
    )
    trainer.train(resume_from_checkpoint=resume_argument(training_args))
    trainer.save_model(training_args.output_dir)

    results = trainer.continual_results
    trace_scores = {}
    for kind, label in (("sequential", "SeqFT"), ("merged", "MagMax")):
        matrix = results[kind]["matrix"]
        if all(v is not None for row in matrix[1:] for v in row):
            trace_scores[label] = {"matrix": matrix, **trace_summary(matrix)}
    payload = finish_run(trainer, training_args, script_args, None, recipe="trace")
    reference = f"trace_{script_args.trace_variant}"
    table = reference_table(reference, {f"{label} (ours), OP": s["OP"] for label, s in trace_scores.items()})
    if trainer.is_world_process_zero():
        write_json(
            os.path.join(training_args.output_dir, "trace_results.json"),
            {
                "tasks": list(trace),
                "scores": trace_scores,
                "published": PUBLISHED_RESULTS[reference],
                "table": table,
                "script_args": payload["script_args"],
            },
        )
        for label, scores in trace_scores.items():
            logger.info("TRACE %s: OP %.2f, BWT %.2f", label, scores["OP"], scores["BWT"])
        logger.info(
            "TRACE (%s samples per task), ours beside the published numbers:\n%s", script_args.trace_variant, table
        )
    return trace_scores


if __name__ == "__main__":
    main()
    end_launch()
