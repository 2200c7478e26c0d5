# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""Continual supervised fine-tuning with MagMax inside TRL: [`MagMaxSFTConfig`] + [`MagMaxSFTTrainer`].

`MagMaxSFTTrainer` is TRL's `SFTTrainer` (its dataset preparation: text, prompt/completion and conversational
`messages`, completion-only and assistant-only loss, truncation, packing; its fused loss and token accuracy; its
`peft_config` wrapping) running [`~hf_magmax.MagMaxTrainer`]'s task loop: the same merge engine, results file,
checkpoints, resume, model card and continual LoRA. Why a trainer and not only the callback: `SFTTrainer` prepares
its datasets in `__init__`, so a task sequence needs each task prepared the way the first one was, and every check on
all of them (formats, labels) belongs before the first step; resume needs the MagMax state in the checkpoints, which
only the trainer writes. [`~hf_magmax.MagMaxCallback`] works inside a plain `SFTTrainer` too (it prepares each new
`train_dataset` the same way), for scripts that keep their own loop.

Distributed training takes `MagMaxTrainer`'s paths (DDP, FSDP2, DeepSpeed ZeRO-2/3; LoRA under DDP or ZeRO-2). Under
ZeRO-3 each rank folds its partitions of the weights (the LM head's too) and `save_model` consolidates the merged model
once: tests/test_trainer_zero3.py runs MagMaxSFTTrainer so on 2 processes against one process. Keep
`average_tokens_across_devices=True` (the default): every rank's loss is then divided by the completion tokens of the
global batch, as one process would.

Needs `trl` (`pip install "hf_magmax[trl]"`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


try:
    from trl import SFTConfig, SFTTrainer
    from trl.data_utils import is_conversational
except ImportError as err:  # pragma: no cover - exercised without trl only
    raise ImportError(
        'hf_magmax.integrations.trl needs TRL: `pip install "hf_magmax[trl]"` (or `pip install trl`).'
    ) from err

import torch
from torch import Tensor

from ..trainer import MagMaxConfig, MagMaxTrainer
from ..trainer.inputs import check_model_and_optimizers, collect_tasks, freeze, is_peft_model, prepare_dataset


logger = logging.getLogger(__name__)

__all__ = ["MagMaxSFTConfig", "MagMaxSFTTrainer"]


@dataclass
class MagMaxSFTConfig(SFTConfig, MagMaxConfig):
    r"""Configuration of [`MagMaxSFTTrainer`]: TRL's `SFTConfig` (its defaults: `learning_rate=2e-5`, `bf16` when
    supported, `gradient_checkpointing=True`, `logging_steps=10`, …) plus the MagMax options of [`~hf_magmax.MagMaxConfig`]
    (`scaling_coef`, `merge_method`, `final_model`, `lora_output`, `max_steps_per_task`, …).

    Every `SFTConfig` option applies to each task (`packing` packs each task's set on its own). One MagMax option
    resolves differently: `continual_metric` unset means `"mean_token_accuracy"`, the share of loss tokens (the completion with
    completion-only loss) whose greedy next-token prediction is the label under teacher forcing, averaged over the
    evaluation batches — what `SFTTrainer` logs as `eval_mean_token_accuracy`. `"neg_loss"` (minus the evaluation
    loss) is the other built-in choice. `restrict_loss_to_task_classes` (class-incremental heads) does not apply.

    Example:

    ```python
    >>> from hf_magmax import MagMaxSFTConfig
    >>> args = MagMaxSFTConfig(output_dir="out", scaling_coef=0.5, max_length=512, use_cpu=True, report_to="none")
    >>> args.merge_method, args.learning_rate
    ('magmax', 2e-05)
    ```
    """

    def __post_init__(self) -> None:
        super().__post_init__()  # SFTConfig's, then MagMaxConfig's (TrainingArguments' and the MagMax checks)
        if self.restrict_loss_to_task_classes:
            raise ValueError(
                "`restrict_loss_to_task_classes` masks the classes of a classification head; SFT trains a causal "
                "language model: leave it False (use MagMaxConfig + MagMaxTrainer for class-incremental heads)."
            )


def _dataset_format(dataset: Any) -> str:
    """The TRL format of a dataset, from its first example (what `SFTTrainer` reads its loss options from)."""
    example = next(iter(dataset))
    if "input_ids" in example:
        return "tokenized (`input_ids`)"
    style = "conversational" if is_conversational(example) else "standard"
    if "prompt" in example and "completion" in example:
        return f"{style} prompt-completion"
    if "messages" in example or "conversations" in example:
        return f"{style} language modeling (`messages`)"
    return f"{style} language modeling (text)"


def check_task_formats(names: Sequence[str], kinds: Mapping[str, Sequence[Any]]) -> None:
    """Every task's datasets have the first training set's TRL format.

    `SFTTrainer` decides from its `train_dataset` alone whether the loss is completion-only (`completion_only_loss=None`:
    for prompt-completion data), whether `assistant_only_loss` applies, and how EOS is added. A later task in another
    format would silently train on another loss (e.g. on its prompts too), so a mix is refused before training.
    """
    first = _dataset_format(kinds["train_datasets"][0])
    for kind, datasets in kinds.items():
        for name, dataset in zip(names, datasets):
            found = _dataset_format(dataset)
            if found != first:
                raise ValueError(
                    f"task {name!r} of `{kind}` is {found} but task {names[0]!r} of `train_datasets` is {first}: "
                    "SFTTrainer chooses the loss (completion-only, assistant-only) and the EOS handling from the first "
                    "task's format, so every task must have the same one. Convert the datasets to one format first."
                )


class MagMaxSFTTrainer(MagMaxTrainer, SFTTrainer):
    r"""Continual SFT with MagMax: TRL's `SFTTrainer`, task after task, merged (Marczak et al., ECCV 2024).

    `train()` runs [`~hf_magmax.MagMaxTrainer`]'s loop with `SFTTrainer`'s training step: task t starts from the
    weights after task t − 1 with a fresh optimizer and schedule; its task vector (all weights, or with `peft_config`
    the LoRA adapter's ΔW) is folded into the running merge; the sequential and merged models are scored on every
    task's evaluation set; the model ends as `θ_0 + λ · merge(τ_1..τ_T)`. Results go to
    `output_dir/continual_results.json`, checkpoints to `output_dir/task-<k>-<name>/checkpoint-<step>` (with the
    MagMax state: `train(resume_from_checkpoint=True)` resumes bit-identically), and `save_model` / `push_to_hub`
    write the MagMax model card.

    Each task's datasets are prepared by `SFTTrainer`'s own pipeline with the same options as the first task's
    (tokenization, chat template, completion-only / assistant-only labels, truncation to `max_length`, packing), each
    dataset on its own, so a pack never mixes two tasks. Checked before training, beside `SFTTrainer`'s own checks:
    every task in the first task's format (see [`check_task_formats`]), the MagMax checks of `MagMaxTrainer`.

    The first arguments are those of `trl.SFTTrainer`; the MagMax arguments come last.

    Args:
        train_datasets (`list`, `dict[str, Dataset]` or [`~hf_magmax.continual.ContinualSplit`]):
            The tasks' training sets in task order, in any format `SFTTrainer` takes (`text`, `prompt`/`completion`,
            `messages`, or tokenized). `train_dataset` alone is one task.
        eval_datasets (`list` or `dict[str, Dataset]`, *optional*):
            The tasks' evaluation sets (same tasks, same format). Without them no matrix is computed. Unless
            `eval_dataset` is given, they are also the trainer's `eval_dataset` (for `eval_strategy`).
        validation_datasets (`list` or `dict[str, Dataset]`, *optional*):
            Per-task validation sets for `scaling_coef="auto"`; otherwise carved from each prepared training set with
            `args.validation_fraction`.

    Example:

    ```python
    >>> from hf_magmax import MagMaxSFTConfig, MagMaxSFTTrainer
    >>> args = MagMaxSFTConfig(output_dir="out", scaling_coef=0.5, max_steps=100)  # doctest: +SKIP
    >>> trainer = MagMaxSFTTrainer(model, args, processing_class=tokenizer,
    ...                            train_datasets={"qa": qa_train, "code": code_train},
    ...                            eval_datasets={"qa": qa_test, "code": code_test})  # doctest: +SKIP
    >>> trainer.train()  # doctest: +SKIP
    ```
    """

    _tag_names = ["trl", "sft", *MagMaxTrainer._tag_names]

    def __init__(
        self,
        model: Any,
        args: MagMaxSFTConfig | None = None,
        data_collator: Callable | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        compute_loss_func: Callable | None = None,
        compute_metrics: Callable[[Any], dict] | None = None,
        callbacks: list[Any] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None] = (None, None),
        optimizer_cls_and_kwargs: tuple[type[torch.optim.Optimizer], dict[str, Any]] | None = None,
        preprocess_logits_for_metrics: Callable[[Tensor, Tensor], Tensor] | None = None,
        quantization_config: Any = None,
        peft_config: Any = None,
        formatting_func: Callable[[dict], str] | None = None,
        train_datasets: Sequence[Any] | Mapping[str, Any] | None = None,
        eval_datasets: Sequence[Any] | Mapping[str, Any] | None = None,
        validation_datasets: Sequence[Any] | Mapping[str, Any] | None = None,
    ) -> None:
        if args is None:
            args = MagMaxSFTConfig(output_dir="tmp_trainer")
        elif not isinstance(args, MagMaxSFTConfig):
            raise TypeError(
                f"`args` must be a MagMaxSFTConfig, got {type(args).__name__}: build it with "
                "`MagMaxSFTConfig(**sft_config.to_dict(), scaling_coef=...)`, or add MagMaxCallback to your SFTTrainer."
            )
        check_model_and_optimizers(model, optimizers, "MagMaxSFTTrainer")
        names, raw_train, split_classes, raw_eval, raw_val = collect_tasks(
            args, train_dataset, train_datasets, eval_datasets, validation_datasets
        )
        if formatting_func is None and not (args.dataset_kwargs or {}).get("skip_prepare_dataset", False):
            check_task_formats(
                names,
                {
                    "train_datasets": raw_train,
                    **({"eval_datasets": raw_eval} if raw_eval else {}),
                    **({"validation_datasets": raw_val} if raw_val else {}),
                },
            )
        eval_from_tasks = eval_dataset is None and bool(raw_eval)
        if eval_from_tasks:
            eval_dataset = dict(zip(names, raw_eval))

        SFTTrainer.__init__(
            self,
            model,
            args=args,
            data_collator=data_collator,
            train_dataset=raw_train[0],
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_loss_func=compute_loss_func,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            quantization_config=quantization_config,
            peft_config=peft_config,
            formatting_func=formatting_func,
        )
        if not is_peft_model(self.model) and self.args.frozen_modules:
            freeze(self.model, self.args.frozen_modules)

        # every task prepared as SFTTrainer prepared the first one (the first training set and the eval dict: by it)
        train = [self.train_dataset]
        train += [prepare_dataset(self, ds, f"train {n}", True) for n, ds in zip(names[1:], raw_train[1:])]
        if eval_from_tasks:
            evaluation = [self.eval_dataset[n] for n in names]
        else:
            evaluation = [prepare_dataset(self, ds, f"eval {n}", False) for n, ds in zip(names, raw_eval)]
        validation = [prepare_dataset(self, ds, f"validation {n}", False) for n, ds in zip(names, raw_val)]
        for name, dataset in zip(names, train):
            if hasattr(dataset, "__len__") and len(dataset) == 0:
                raise ValueError(
                    f"task {name!r} of `train_datasets` has no example left after SFTTrainer's preparation (every "
                    "example fully masked or truncated away): raise `max_length` or check the completions."
                )
        self._setup_continual(names, train, evaluation, validation, None, split_classes)
        logger.info("MagMaxSFTTrainer: %d task(s) prepared: %s", len(names), ", ".join(names))

    def _model_card_text(self, extra_tags: Sequence[str] = (), **metadata: Any) -> str:
        """The MagMax model card, tagged `trl` and `sft` too."""
        return super()._model_card_text(extra_tags=["trl", "sft", *extra_tags], **metadata)
