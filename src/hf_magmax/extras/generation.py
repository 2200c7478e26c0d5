# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""Continual instruction tuning of a causal LM scored by generation: the run driver of the LLM benchmarks.

[`GenerationMagMaxTrainer`] is a [`~hf_magmax.trainer.MagMaxTrainer`] whose evaluation generates an answer for every
prompt of a task's evaluation set and scores the answers (exact match, ROUGE-L or any function), so the sequential
and the MagMax score matrices are generation scores in `[0, 100]`. [`run_continual_generation`] builds it from
per-task datasets with the columns `prompt`, `answer` and (optionally) `references`, as
[`~hf_magmax.extras.llm_cl.load_cl_benchmark`] returns them, and trains the whole task sequence.

Example:

```python
>>> from hf_magmax import MagMaxConfig
>>> from hf_magmax.extras.generation import run_continual_generation
>>> from hf_magmax.extras.llm_cl import TASK_ORDERS, load_cl_benchmark
>>> tasks = load_cl_benchmark("CL_Benchmark", TASK_ORDERS[1])  # doctest: +SKIP
>>> args = MagMaxConfig(output_dir="out", scaling_coef=0.5, num_train_epochs=1, report_to="none")
>>> trainer = run_continual_generation(model, tokenizer, tasks, args, metric="exact_match")  # doctest: +SKIP
>>> trainer.continual_results["merged"]["metrics"]["final_average_accuracy"]  # doctest: +SKIP
```
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from transformers.trainer_utils import EvalLoopOutput

from ..trainer import MagMaxConfig, MagMaxTrainer
from .llm_cl import ANSWER_PREFIX, extract_answer, score_cl_task
from .trace import TraceDataCollator, generate_trace_predictions


logger = logging.getLogger(__name__)

__all__ = ["TASK_COLUMN", "GenerationMagMaxTrainer", "run_continual_generation"]

#: The column of every evaluation set that names its task (so the score function knows which task it scores).
TASK_COLUMN = "cl_task"

#: `metric(task, predictions, dataset) -> score in [0, 100]`.
ScoreFunction = Callable[[str, list[str], Any], float]


class GenerationMagMaxTrainer(MagMaxTrainer):
    """`MagMaxTrainer` whose evaluation generates answers and scores them (the continual metric `score`, 0-100).

    Every evaluation dataset holds `prompt` and a [`TASK_COLUMN`] column with its task name, and `references` (a list
    of strings per row) or `answer`. Answers are generated greedily unless `generation_kwargs` says otherwise (under
    several processes the prompts are split between the ranks and gathered), cut after `answer_prefix` when the model
    repeats it, and scored with `metric`.

    Args:
        metric (`str`, `dict[str, str]` or callable, *optional*, defaults to `"exact_match"`):
            `"exact_match"` or `"rouge_l"` for every task, a dict task → one of them, or a function
            `metric(task, predictions, dataset) -> float`.
        generation_kwargs (`dict`, *optional*):
            `generate` arguments, e.g. `{"max_new_tokens": 50}`.
        generation_batch_size (`int`, *optional*, defaults to 8):
            Prompts per `generate` call and process.
        max_prompt_len (`int`, *optional*, defaults to 512):
            Prompt tokens kept (left truncation).
        answer_prefix (`str`, *optional*, defaults to `"Answer:"`):
            See [`~hf_magmax.extras.llm_cl.extract_answer`]; `""` keeps the whole generated text, stripped; `None`
            scores the decoded text exactly as generated (TRACE).

    The other arguments are those of [`~hf_magmax.trainer.MagMaxTrainer`].
    """

    def __init__(
        self,
        *args: Any,
        metric: str | Mapping[str, str] | ScoreFunction = "exact_match",
        generation_kwargs: Mapping[str, Any] | None = None,
        generation_batch_size: int = 8,
        max_prompt_len: int = 512,
        answer_prefix: str | None = ANSWER_PREFIX,
        **kwargs: Any,
    ) -> None:
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if training_args is not None and training_args.remove_unused_columns:
            raise ValueError(
                "`remove_unused_columns` must be False: the collator and the evaluation read the raw `prompt` / "
                "`answer` text columns."
            )
        if training_args is not None and training_args.continual_metric not in (None, "score"):
            raise ValueError("`continual_metric` of a generation run is its `score`; leave it unset or set 'score'.")
        if generation_batch_size < 1:
            raise ValueError(f"`generation_batch_size` must be >= 1, got {generation_batch_size}.")
        super().__init__(*args, **kwargs)
        self.metric = metric
        self.generation_kwargs = dict(generation_kwargs or {})
        self.generation_batch_size = generation_batch_size
        self.max_prompt_len = max_prompt_len
        self.answer_prefix = answer_prefix

    def score_predictions(self, task: str, predictions: list[str], dataset: Any) -> float:
        """Score the answers of one task with `self.metric`."""
        if callable(self.metric):
            return float(self.metric(task, predictions, dataset))
        name = self.metric.get(task) if isinstance(self.metric, Mapping) else self.metric
        if name is None:
            raise KeyError(f"`metric` names no metric for task {task!r}; it covers {', '.join(self.metric)}.")
        references = dataset["references"] if "references" in dataset.column_names else dataset["answer"]
        return score_cl_task(predictions, references, name)

    def evaluation_loop(
        self,
        dataloader: Any,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> EvalLoopOutput:
        dataset = dataloader.dataset
        task = dataset[0][TASK_COLUMN] if TASK_COLUMN in dataset.column_names else metric_key_prefix
        generated = generate_trace_predictions(
            self.model,  # the unwrapped model (the Trainer keeps the DDP/FSDP wrapper in `model_wrapped`)
            self.processing_class,
            dataset["prompt"],
            batch_size=self.generation_batch_size,
            max_prompt_len=self.max_prompt_len,
            **self.generation_kwargs,
        )
        if self.answer_prefix is not None:
            generated = [extract_answer(text, self.answer_prefix) for text in generated]
        predictions = generated
        score = self.score_predictions(task, predictions, dataset)
        logger.info("%s: %s = %.2f", metric_key_prefix, task, score)
        return EvalLoopOutput(
            predictions=None, label_ids=None, metrics={f"{metric_key_prefix}_score": score}, num_samples=len(dataset)
        )


def run_continual_generation(
    model: Any,
    tokenizer: Any,
    tasks: Mapping[str, Mapping[str, Any]],
    args: MagMaxConfig,
    metric: str | Mapping[str, str] | ScoreFunction = "exact_match",
    peft_config: Any = None,
    train_split: str = "train",
    eval_split: str = "test",
    max_prompt_len: int = 512,
    max_answer_len: int = 50,
    generation_kwargs: Mapping[str, Any] | None = None,
    generation_batch_size: int = 8,
    answer_prefix: str | None = ANSWER_PREFIX,
    train: bool = True,
) -> GenerationMagMaxTrainer:
    """Fine-tune `model` on every task in order and score the sequential and the MagMax model after each task.

    Args:
        model ([`~transformers.PreTrainedModel`]):
            The causal LM θ_0.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            Its tokenizer; set to left padding and truncation here, `pad_token` defaulting to `unk` or `eos`.
        tasks (`dict[str, DatasetDict]`):
            Task name → splits with `prompt`, `answer` (and `references`), in learning order.
        args ([`~hf_magmax.trainer.MagMaxConfig`]):
            The run's configuration; `remove_unused_columns` is set to `False` and `continual_metric` to `"score"`.
        metric (`str`, `dict` or callable, *optional*, defaults to `"exact_match"`):
            See [`GenerationMagMaxTrainer`].
        peft_config (`peft.PeftConfig`, *optional*):
            Train a LoRA adapter (MagMax then merges the LoRA deltas ΔW).
        train_split (`str`, *optional*, defaults to `"train"`), eval_split (`str`, *optional*, defaults to `"test"`):
            The splits trained on and scored.
        max_prompt_len (`int`, *optional*, defaults to 512), max_answer_len (`int`, *optional*, defaults to 50):
            Token budgets (O-LoRA: 512 source tokens, 50 target tokens).
        generation_kwargs (`dict`, *optional*):
            `generate` arguments; `max_new_tokens` defaults to `max_answer_len`.
        generation_batch_size (`int`, *optional*, defaults to 8):
            Prompts per `generate` call.
        answer_prefix (`str`, *optional*, defaults to `"Answer:"`):
            See [`~hf_magmax.extras.llm_cl.extract_answer`].
        train (`bool`, *optional*, defaults to `True`):
            Run `trainer.train()` before returning (`False` returns the trainer untrained, e.g. to resume).

    Returns:
        [`GenerationMagMaxTrainer`]: the trainer; `trainer.continual_results` holds both score matrices.
    """
    if not tasks:
        raise ValueError("`tasks` is empty: pass task name → DatasetDict, in learning order.")
    for name, parts in tasks.items():
        for split in (train_split, eval_split):
            if split not in parts:
                raise ValueError(f"task {name!r} has no {split!r} split (it has {', '.join(parts)}).")
        if "prompt" not in parts[train_split].column_names or "answer" not in parts[train_split].column_names:
            raise ValueError(f"task {name!r}: the datasets need the columns `prompt` and `answer`.")
    args.remove_unused_columns = False
    args.continual_metric = "score"
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    kwargs = {"max_new_tokens": max_answer_len, **(generation_kwargs or {})}
    train_datasets = {name: parts[train_split] for name, parts in tasks.items()}
    eval_datasets = {
        name: parts[eval_split].add_column(TASK_COLUMN, [name] * len(parts[eval_split]))
        for name, parts in tasks.items()
    }
    trainer = GenerationMagMaxTrainer(
        model=model,
        args=args,
        data_collator=TraceDataCollator(tokenizer, max_prompt_len=max_prompt_len, max_answer_len=max_answer_len),
        processing_class=tokenizer,
        train_datasets=train_datasets,
        eval_datasets=eval_datasets,
        peft_config=peft_config,
        metric=metric,
        generation_kwargs=kwargs,
        generation_batch_size=generation_batch_size,
        max_prompt_len=max_prompt_len,
        answer_prefix=answer_prefix,
    )
    if train:
        trainer.train()
    return trainer
