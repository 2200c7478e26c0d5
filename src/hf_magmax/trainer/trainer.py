# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""[`MagMaxTrainer`]: continual fine-tuning with MagMax inside 🤗 Transformers' `Trainer`.

The trainer fine-tunes the model on a sequence of tasks, one after the other (task t starts from the weights after
task t − 1, with a fresh optimizer and learning-rate schedule), folds each task vector `τ_t = θ_t − θ_0` into the
running merge of a [`~hf_magmax.trainer.MergeState`], evaluates the sequential and the merged model on every task after
every task, and ends with the merged model `θ_0 + λ · merge(τ_1, …, τ_T)`. Every merge fact comes from the one
[`~hf_magmax.merging.MergeSpec`] of the config.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from typing import Any

import torch
from torch import Tensor, nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput

from ..io import RUN_FOLDER_PATTERNS
from ..task_vectors import shared_tensor_groups
from .config import MagMaxConfig
from .deepspeed import check_deepspeed, fresh_engine, release_engine
from .inputs import (
    check_datasets,
    check_model_and_optimizers,
    checkpoint_tensor_names,
    collect_tasks,
    freeze,
    head,
    is_peft_model,
    num_labels,
    resolve_task_classes,
    task_dir_name,
)
from .matrices import RESULTS_NAME
from .run import ContinualRun
from .state import CheckpointError, unwrap


logger = logging.getLogger(__name__)

__all__ = ["MagMaxTrainer"]

#: The model weight files one of which a complete checkpoint holds (full model or PEFT adapter).
_MODEL_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
)


#: Files of a checkpoint that `Trainer` itself reads on resume (weights-only pickles), besides the model weights.
_TRAINER_PICKLES = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "rng_state_*.pth", "scaler.pt")


def check_trainer_files(checkpoint: str) -> None:
    """Check that the files `Trainer` reads on resume are complete and loadable before choosing `checkpoint`.

    The model weights (safetensors headers against the file sizes, `.bin` and the optimizer, scheduler and RNG
    states loaded memory-mapped with `weights_only=True`, as `Trainer` loads them): a file truncated by a kill while
    saving, or a pickle that is not weights only, is a [`CheckpointError`] naming it, so that resume falls back to an
    older checkpoint instead of failing with a traceback half-way through `Trainer`'s restore.
    """
    from pathlib import Path

    from transformers.trainer_pt_utils import safe_globals  # numpy's RNG state, as `Trainer` allows it

    from ..io import read_index, read_safetensors_header

    def fail(path: str, err: BaseException) -> CheckpointError:
        reason = " ".join(f"{type(err).__name__}: {err}".split())[:300]
        return CheckpointError(f"{path!r} is truncated, corrupt or not weights-only ({reason}).")

    names = ("model.safetensors", "adapter_model.safetensors")
    files = [os.path.join(checkpoint, n) for n in names if os.path.isfile(os.path.join(checkpoint, n))]
    index = os.path.join(checkpoint, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            files += sorted({os.fspath(p) for p in read_index(Path(index)).values()})
        except ValueError as err:
            raise fail(index, err) from None
    for file in files:
        try:
            read_safetensors_header(Path(file))
        except (OSError, ValueError) as err:
            raise fail(file, err) from None
    pickles = [os.path.join(checkpoint, n) for n in ("pytorch_model.bin", "adapter_model.bin")]
    for pattern in _TRAINER_PICKLES:
        pickles += sorted(glob.glob(os.path.join(glob.escape(checkpoint), pattern)))
    for file in pickles:
        if not os.path.isfile(file):
            continue
        try:
            with safe_globals():
                torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # noqa: BLE001 - zip, pickle and OS errors alike
            raise fail(file, err) from None


class MagMaxTrainer(Trainer):
    r"""Continual fine-tuning over a sequence of tasks with MagMax merging (Marczak et al., ECCV 2024).

    `train()` fine-tunes on the tasks in order: task t starts from the weights after task t − 1, with a fresh optimizer
    and learning-rate schedule. After each task the task vector `τ_t = θ_t − θ_0` is folded into a running merge (θ_0
    and the running state live on `args.merge_device`), and the sequential model and the merged model
    `θ_0 + λ · merge(τ_1..τ_t)` (swapped into the model in place, no second copy) are evaluated on *every* task's eval
    set. The accuracy matrices `R[t][i]` (row 0: θ_0) go to `self.log` under `continual/seq/<task>` and
    `continual/merged/<task>`, and to `output_dir/continual_results.json` with the summary metrics of
    [`~hf_magmax.metrics.compute_continual_metrics`]. At the end the model holds the merged weights
    (`final_model="merged"`) or the sequential ones.

    The first arguments are those of [`~transformers.Trainer`]; the MagMax arguments come last.

    Args:
        train_datasets (`list`, `dict[str, Dataset]` or [`~hf_magmax.continual.ContinualSplit`]):
            The tasks' training sets in task order (a dict maps task names to datasets).
        eval_datasets (`list` or `dict[str, Dataset]`, *optional*):
            The tasks' evaluation sets, same number and names as `train_datasets`. Without them no matrix is computed.
        validation_datasets (`list` or `dict[str, Dataset]`, *optional*):
            Per-task validation sets for `scaling_coef="auto"`; otherwise carved from each training split with
            `args.validation_fraction`.
        task_classes (`list[list[int]]`, *optional*):
            The classes of each task for `restrict_loss_to_task_classes`; defaults to the labels present in each
            training set (or the classes of a `ContinualSplit`).
        peft_config (`peft.PeftConfig`, *optional*):
            Train a LoRA adapter continually instead of all weights: task vectors are the adapter's ΔW relative to the
            base, and the result is the base with the merged ΔW folded in, or a re-factored adapter
            (`args.lora_output`). A [`~peft.PeftModel`] passed as `model` works the same way.

    Example:

    ```python
    >>> from hf_magmax import MagMaxConfig, MagMaxTrainer
    >>> args = MagMaxConfig(output_dir="out", scaling_coef=0.5, num_train_epochs=1, report_to="none")
    >>> trainer = MagMaxTrainer(model, args, train_datasets={"a": train_a, "b": train_b},
    ...                         eval_datasets={"a": test_a, "b": test_b})  # doctest: +SKIP
    >>> trainer.train()  # doctest: +SKIP
    ```
    """

    _tag_names = ["magmax", "merge", "continual-learning"]

    def __init__(
        self,
        model: nn.Module | None = None,
        args: MagMaxConfig | None = None,
        data_collator: Callable | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        model_init: Callable[..., nn.Module] | None = None,
        compute_loss_func: Callable | None = None,
        compute_metrics: Callable[[Any], dict] | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None] = (None, None),
        optimizer_cls_and_kwargs: tuple[type[torch.optim.Optimizer], dict[str, Any]] | None = None,
        preprocess_logits_for_metrics: Callable[[Tensor, Tensor], Tensor] | None = None,
        train_datasets: Sequence[Any] | Mapping[str, Any] | None = None,
        eval_datasets: Sequence[Any] | Mapping[str, Any] | None = None,
        validation_datasets: Sequence[Any] | Mapping[str, Any] | None = None,
        task_classes: Sequence[Sequence[int]] | None = None,
        peft_config: Any = None,
    ) -> None:
        if args is None:
            args = MagMaxConfig(output_dir="tmp_trainer")
        elif not isinstance(args, MagMaxConfig):
            raise TypeError(
                f"`args` must be a MagMaxConfig, got {type(args).__name__}: build it with "
                "`MagMaxConfig(**args.to_dict(), scaling_coef=...)` or use MagMaxCallback with a plain Trainer."
            )
        if model_init is not None:
            raise ValueError("`model_init` is not supported by MagMaxTrainer: pass `model`, the base model θ_0.")
        check_model_and_optimizers(model, optimizers, "MagMaxTrainer")
        names, datasets, split_classes, eval_list, val_list = collect_tasks(
            args, train_dataset, train_datasets, eval_datasets, validation_datasets
        )

        # LoRA
        if peft_config is not None:
            try:
                from peft import get_peft_model
            except ImportError as err:  # pragma: no cover
                raise ImportError("`peft_config` needs peft: `pip install hf_magmax[peft]`.") from err
            if is_peft_model(model):
                raise ValueError("`model` is already a PeftModel: do not pass `peft_config` as well.")
            model = get_peft_model(model, peft_config)
        if not is_peft_model(model) and args.frozen_modules:
            freeze(model, args.frozen_modules)

        if eval_dataset is None and eval_list:
            eval_dataset = dict(zip(names, eval_list))
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=datasets[0],
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            model_init=None,
            compute_loss_func=compute_loss_func,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=(None, None),
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        )
        self._setup_continual(names, datasets, eval_list, val_list, task_classes, split_classes)

    def _setup_continual(
        self,
        names: list[str],
        datasets: list[Any],
        eval_list: list[Any],
        val_list: list[Any],
        task_classes: Sequence[Sequence[int]] | None = None,
        split_classes: Sequence[Any] | None = None,
    ) -> None:
        """After `Trainer.__init__`: the task sequence as the trainer will consume it (every check on its data, the
        validation data of `scaling_coef="auto"`, the class masks) and the [`ContinualRun`] that drives it. A trainer
        that prepares its datasets itself (`MagMaxSFTTrainer`) calls it with the prepared ones."""
        split_classes = list(split_classes) if split_classes is not None else [None] * len(datasets)
        self._magmax_lora = is_peft_model(unwrap(self.model))
        if self._magmax_lora and self.args.push_every_task:
            raise ValueError(
                "`push_every_task=True` is not supported with LoRA training yet (each revision would be the base "
                "with the merged ΔW folded in): drop `push_every_task` and push the final model with "
                "`trainer.push_to_hub()`, or train all weights."
            )
        self.task_names = names
        self.train_datasets = datasets
        self.eval_datasets = eval_list

        check_datasets(self.model, names, datasets, eval_list, label_names=self.args.label_names or ())

        # validation data for λ = "auto"
        if self.args.scaling_coef == "auto" and not val_list:
            from ..scaling import split_validation

            if self.args.validation_fraction is None:
                raise ValueError(
                    '`scaling_coef="auto"` needs validation data: pass `validation_datasets` or set '
                    "`validation_fraction`."
                )
            carved = [split_validation(ds, self.args.validation_fraction, seed=self.args.seed) for ds in datasets]
            self.train_datasets = [train for train, _ in carved]
            val_list = [validation for _, validation in carved]
            self.train_dataset = self.train_datasets[0]
        if val_list and self.args.max_validation_samples is not None:
            val_list = [head(ds, self.args.max_validation_samples) for ds in val_list]
        self.validation_datasets = val_list or None

        # class masks for restrict_loss_to_task_classes
        self.task_classes = resolve_task_classes(
            task_classes, split_classes, self.train_datasets, names, head_size=num_labels(self.model)
        )
        self._magmax_class_mask: Tensor | None = None
        if self.args.restrict_loss_to_task_classes and any(c is None for c in self.task_classes):
            raise ValueError(
                "`restrict_loss_to_task_classes=True` needs each task's classes: pass `task_classes`, or training sets "
                "with a `label`/`labels` column of class ids."
            )

        check_deepspeed(self, self.args, lora=self._magmax_lora)  # ZeRO-3: what needs whole tensors, the final save
        self._magmax = ContinualRun(self.args, names, eval_list, self.validation_datasets, lora=self._magmax_lora)
        self._magmax_task: int | None = None

    # -- the task loop -----------------------------------------------------------------------------------------------

    def train(
        self,
        resume_from_checkpoint: str | bool | None = None,
        trial: Any = None,
        ignore_keys_for_eval: list[str] | None = None,
    ) -> TrainOutput:
        """Fine-tune on every task in order, merging and evaluating after each; see the class docstring.

        Args:
            resume_from_checkpoint (`str` or `bool`, *optional*):
                A checkpoint written by this trainer (`output_dir/task-<k>-<name>/checkpoint-<step>`), or `True` for
                the last one in `output_dir`. Training continues in the middle of task k, with θ_0, the running merge
                and the matrices so far restored.
            trial, ignore_keys_for_eval:
                As in [`~transformers.Trainer.train`].

        Returns:
            [`~transformers.trainer_utils.TrainOutput`]: total steps over all tasks, the mean training loss, and the
            final continual metrics.

        After `train()`, `self.state.log_history` holds the logs of every task (each task's steps count from 0).
        """
        run = self._magmax
        if run.finished:
            raise RuntimeError("this MagMaxTrainer has already run its task sequence; build a new one to train again.")
        if resume_from_checkpoint is False:
            resume_from_checkpoint = None
        start = 0
        if resume_from_checkpoint is True:
            resume_from_checkpoint, start = self._resume_from_last_complete_checkpoint()
        elif resume_from_checkpoint is not None:
            check_trainer_files(os.fspath(resume_from_checkpoint))
            start = run.load(os.fspath(resume_from_checkpoint))
        if resume_from_checkpoint is not None:
            logger.info("Resuming task %d (%s) from %s", start, self.task_names[start], resume_from_checkpoint)
            # the Hub revisions pushed after the checkpoint was taken (read before the results file is rewritten)
            run.releases.recover(os.path.join(self.args.output_dir, RESULTS_NAME))
        else:
            run.begin(self, self.model, self.train_datasets)
            run.write_base(self)  # θ_0 once per run: output_dir/magmax_base/, then memory-mapped from there

        total_steps, total_loss = 0, 0.0
        history: list[dict[str, float]] = []
        schedule = (self.args.num_train_epochs, self.args.max_steps)
        try:
            for task in range(start, len(self.task_names)):
                self._magmax_task = task
                self._set_task_schedule(task)
                output = self._train_task(task, start, resume_from_checkpoint, trial, ignore_keys_for_eval)
                total_steps += output.global_step
                total_loss += output.training_loss * output.global_step
                run.end_task(self, self.model, task)
                run.publish(self, self.model, task)  # push_every_task: the merged model as this task's revision
                history.extend(self.state.log_history)  # every train() call starts a new TrainerState
        finally:
            self.args.num_train_epochs, self.args.max_steps = schedule
        self._magmax_task = None
        self._magmax_class_mask = None
        done = len(self.state.log_history)
        run.finish(self, self.model)
        self.state.log_history = history + self.state.log_history[done:]
        if self._magmax_lora:
            self._finish_lora()
        metrics = {}
        for kind in ("sequential", "merged"):
            for key, value in run.summary()[kind]["metrics"].items():
                metrics[f"continual_{kind}_{key}"] = value
        metrics["scaling_coef"] = run.final_scaling_coef
        return TrainOutput(total_steps, total_loss / max(total_steps, 1), metrics)

    def _set_task_schedule(self, task: int) -> None:
        """The epochs / steps of `task`: `num_train_epochs_per_task` / `max_steps_per_task` override the global ones
        (`max_steps` wins over epochs, as in `TrainingArguments`)."""
        epochs, steps = self.args.num_train_epochs_per_task, self.args.max_steps_per_task
        if epochs is not None:
            self.args.num_train_epochs = epochs[task]
            if steps is None:
                self.args.max_steps = -1
        if steps is not None:
            self.args.max_steps = steps[task]

    def _train_task(
        self, task: int, start: int, resume_from_checkpoint: str | None, trial: Any, ignore_keys_for_eval: Any
    ) -> TrainOutput:
        """One task's `Trainer.train`, with a fresh optimizer and learning-rate schedule."""
        self.train_dataset = self.train_datasets[task]
        self._magmax_class_mask = self._class_mask(task)
        self._magmax.begin_task(self, self.model, task)
        self.optimizer, self.lr_scheduler = None, None
        fresh_engine(self)  # DeepSpeed: a new engine around the same parameters, not the previous task's
        logger.info(
            "***** MagMax task %d/%d: %s (epochs %s, max_steps %s) *****",
            task + 1,
            len(self.task_names),
            self.task_names[task],
            self.args.num_train_epochs,
            self.args.max_steps,
        )
        output = super().train(
            resume_from_checkpoint=resume_from_checkpoint if task == start else None,
            trial=trial,
            ignore_keys_for_eval=ignore_keys_for_eval,
        )
        self.optimizer, self.lr_scheduler = None, None
        return output

    @property
    def continual_results(self) -> dict[str, Any]:
        """The task names, both accuracy matrices, their summary metrics, the method and λ (as in the json file)."""
        return self._magmax.summary()

    def _class_mask(self, task: int) -> Tensor | None:
        if not self.args.restrict_loss_to_task_classes:
            return None
        head_size = num_labels(self.model)
        classes = self.task_classes[task]
        size = head_size if head_size is not None else max(classes) + 1
        mask = torch.zeros(size, dtype=torch.bool)
        mask[list(classes)] = True
        return mask

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Tensor | Any],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor | tuple[Tensor, Any]:
        """`Trainer.compute_loss`, with the logits of classes outside the current task masked out while training
        when `restrict_loss_to_task_classes=True` (cross-entropy over the current task's classes)."""
        mask = self._magmax_class_mask
        if mask is None or not model.training or "labels" not in inputs or self.compute_loss_func is not None:
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]
        if logits.shape[-1] != mask.numel():
            raise ValueError(
                f"the model returns {logits.shape[-1]} logits but the class mask has {mask.numel()} classes: "
                "`restrict_loss_to_task_classes` needs one head over all classes (set `num_labels`)."
            )
        logits = logits.float().masked_fill(~mask.to(logits.device), torch.finfo(torch.float32).min)
        flat_logits, flat_labels = logits.view(-1, logits.shape[-1]), labels.view(-1).to(logits.device)
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            loss = nn.functional.cross_entropy(flat_logits, flat_labels, ignore_index=-100, reduction="sum")
            loss = loss / num_items_in_batch
            if self.args.average_tokens_across_devices:
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        else:
            loss = nn.functional.cross_entropy(flat_logits, flat_labels, ignore_index=-100)
        return (loss, outputs) if return_outputs else loss

    # -- checkpoints -------------------------------------------------------------------------------------------------

    def _get_output_dir(self, trial: Any) -> str:
        """Checkpoints of task k go to `output_dir/task-<k>-<name>/` (steps restart with every task)."""
        run_dir = super()._get_output_dir(trial)
        if self._magmax_task is None:
            return run_dir
        return os.path.join(run_dir, task_dir_name(self._magmax_task, self.task_names[self._magmax_task]))

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """`Trainer._save_checkpoint`, plus the MagMax state: task index, θ_0, the running merge and the matrices."""
        super()._save_checkpoint(model, trial)
        sharded = self._magmax.state.sharded  # FSDP2: every rank writes its part of the merge state
        if self._magmax_task is None or not (self.args.should_save or sharded):
            return
        directory = os.path.join(self._get_output_dir(trial), f"checkpoint-{self.state.global_step}")
        self._magmax.save(directory, self._magmax_task, main=self.args.should_save)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """`Trainer._load_from_checkpoint`, made exact for models whose saved tensor names differ from their
        in-memory names.

        In transformers v5, `save_pretrained` writes some models (ViT, MoE, VLMs, …) under their original Hub names
        and `from_pretrained` converts them back, but `Trainer` resumes with a plain `load_state_dict(strict=False)` on
        the saved names, which silently leaves the renamed weights untouched (huggingface/transformers#43701). A
        resumed continual run would then continue from the wrong weights. When the checkpoint's names do not cover the
        model's, the checkpoint is loaded through `from_pretrained` (its conversions included) and copied in.
        """
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        from transformers import PreTrainedModel

        target = unwrap(model if model is not None else self.model)
        if not isinstance(target, PreTrainedModel) or is_peft_model(target) or self.is_fsdp_enabled:
            return
        saved_names = checkpoint_tensor_names(resume_from_checkpoint)
        # tied tensors are saved once, under their first name
        needed = {name for name, first in shared_tensor_groups(target.state_dict()).items() if name == first}
        if saved_names is None or needed <= saved_names:
            return
        logger.info(
            "Loading %s through from_pretrained: its tensor names differ from the model's.", resume_from_checkpoint
        )
        reloaded = type(target).from_pretrained(resume_from_checkpoint, dtype=target.dtype)
        result = target.load_state_dict(reloaded.state_dict(), strict=False)
        if result.missing_keys:
            raise ValueError(
                f"could not restore {len(result.missing_keys)} tensor(s) of the model from {resume_from_checkpoint!r}, "
                f"e.g. {result.missing_keys[0]!r}: resume from a checkpoint of the same model."
            )
        del reloaded

    def _checkpoints_newest_first(self) -> list[str]:
        """Every `output_dir/task-<k>-<name>/checkpoint-<step>`, newest (highest task, then step) first."""
        found = []
        for task_dir in glob.glob(os.path.join(self.args.output_dir, "task-*")):
            task_match = re.match(r"task-(\d+)-", os.path.basename(task_dir))
            if task_match is None or not os.path.isdir(task_dir):
                continue
            for checkpoint in glob.glob(os.path.join(task_dir, f"{PREFIX_CHECKPOINT_DIR}-*")):
                step = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", os.path.basename(checkpoint))
                if step is not None and os.path.isdir(checkpoint):
                    found.append((int(task_match.group(1)), int(step.group(1)), checkpoint))
        return [path for _, _, path in sorted(found, reverse=True)]

    def _resume_from_last_complete_checkpoint(self) -> tuple[str, int]:
        """Load the newest checkpoint that is complete and reads; incomplete or corrupt ones are skipped (logged)."""
        candidates = self._checkpoints_newest_first()
        for checkpoint in candidates:
            weights = any(os.path.isfile(os.path.join(checkpoint, name)) for name in _MODEL_WEIGHTS)
            if not weights and not glob.glob(os.path.join(checkpoint, "global_step*")):  # DeepSpeed's own files
                logger.warning("Skipping the checkpoint %s: it has no model weights (incomplete).", checkpoint)
                continue
            try:
                check_trainer_files(checkpoint)
                return checkpoint, self._magmax.load(checkpoint)
            except (FileNotFoundError, CheckpointError) as err:
                logger.warning("Skipping the checkpoint %s: %s", checkpoint, err)
        raise ValueError(
            f"no complete MagMaxTrainer checkpoint found under {self.args.output_dir!r}/task-*/checkpoint-* "
            f"({len(candidates)} incomplete or corrupt): train from the start with `resume_from_checkpoint=None`."
        )

    # -- LoRA ----------------------------------------------------------------------------------------------------------

    def _finish_lora(self) -> None:
        """Replace the PeftModel by the base with the merged ΔW folded in, or by a re-factored adapter."""
        finished = self._magmax.finish_lora(self, self.model)
        if finished is not None:
            self.model = self.model_wrapped = finished
            release_engine(self)  # DeepSpeed: no engine holds the new model
            self.lora_reconstruction_errors = self._magmax.lora_reconstruction_errors
            self._magmax.write_results(self)

    # -- Hub ---------------------------------------------------------------------------------------------------------

    def push_to_hub(self, *args: Any, **kwargs: Any) -> Any:
        """`Trainer.push_to_hub`, published as `hf-magmax push` publishes: see [`public_hub_uploads`] (the run's
        own folders stay local, no local path is published, a file that would publish one refuses the push)."""
        with public_hub_uploads(self):
            return super().push_to_hub(*args, **kwargs)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        with public_hub_uploads(self, background=True):
            super()._push_from_checkpoint(checkpoint_folder)

    # -- model card ----------------------------------------------------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """`Trainer.save_model`, plus a model card (tasks, method, λ, results table) in `output_dir/README.md`."""
        super().save_model(output_dir, _internal_call=_internal_call)
        if not _internal_call and self.is_world_process_zero() and self._magmax.num_tasks_done:
            directory = output_dir if output_dir is not None else self.args.output_dir
            with open(os.path.join(directory, "README.md"), "w", encoding="utf-8") as f:
                f.write(self._model_card_text())

    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
    ) -> None:
        """Write the MagMax model card to `output_dir/README.md` (used by `push_to_hub`)."""
        if not self.is_world_process_zero():
            return
        os.makedirs(self.args.output_dir, exist_ok=True)
        extra = [tags] if isinstance(tags, str) else list(tags or [])
        text = self._model_card_text(
            extra_tags=extra,
            model_name=model_name,
            language=language,
            license=license,
            finetuned_from=finetuned_from,
            tasks=tasks,
            dataset_tags=dataset_tags,
        )
        with open(os.path.join(self.args.output_dir, "README.md"), "w", encoding="utf-8") as f:
            f.write(text)

    def _model_card_text(self, extra_tags: Sequence[str] = (), **metadata: Any) -> str:
        return _model_card(self._magmax, self.model, self.args, extra_tags=extra_tags, **metadata)


@contextlib.contextmanager
def public_hub_uploads(trainer: Trainer, background: bool = False) -> Iterator[None]:
    """Within the block, Hub uploads through transformers' shared `HfApi` (what `Trainer.push_to_hub` and the
    checkpoint pushes of `hub_strategy` call) publish as `hf-magmax push` does, through
    [`hf_magmax.hub.upload_public_folder`]: [`~hf_magmax.io.RUN_FOLDER_PATTERNS`] are not uploaded, the local paths in the configs
    are replaced by public names, `training_args.bin` is re-serialized from `trainer.args` without local paths nor
    tokens ([`hf_magmax.hub.public_training_args`]), and a file that still holds a local path (of the output folder,
    its parent, the current or home directory, or the local folder the model or the tokenizer was loaded from), or a
    link out of the folder, refuses the upload before any request.

    A refused foreground push raises [`~hf_magmax.hub.HubPushError`] naming the file. A refused checkpoint push
    (`background=True`: transformers pushes checkpoints in the background while training goes on) is one warning
    naming the file; nothing of it is uploaded and training goes on (the final `push_to_hub()` refuses the same way).
    """
    from transformers.utils.hub import hf_api

    from ..hub import HubPushError, public_training_args, upload_public_folder

    api = hf_api()

    def upload_public(*, ignore_patterns: Any = None, **kwargs: Any) -> Any:
        patterns = [ignore_patterns] if isinstance(ignore_patterns, str) else list(ignore_patterns or [])
        try:
            return upload_public_folder(
                api,
                ignore_patterns=[*patterns, *RUN_FOLDER_PATTERNS],
                training_args=public_training_args(trainer.args),
                local_paths=_loaded_from(trainer),
                **kwargs,
            )
        except HubPushError as err:
            if not background:
                raise
            logger.warning("Checkpoint push skipped: %s", err)
            refused: Future = Future()  # what transformers tracks of a background push (`PushInProgress`)
            refused.set_exception(err)
            return refused

    api.upload_folder = upload_public  # this instance only, for this block
    try:
        yield
    finally:
        del api.upload_folder


def _loaded_from(trainer: Trainer) -> list[str]:
    """The local folders the model (its base, for a PeftModel) and the tokenizer/processor were loaded from, and
    their parents (where the other local inputs of a run usually sit)."""
    model = unwrap(trainer.model)
    base = model.get_base_model() if is_peft_model(model) else model
    names = [getattr(getattr(base, "config", None), "_name_or_path", None)]
    names.append(getattr(getattr(trainer, "processing_class", None), "name_or_path", None))
    folders = [os.path.abspath(name) for name in names if isinstance(name, str) and name and os.path.isdir(name)]
    return [*folders, *(os.path.dirname(folder) for folder in folders)]


def _model_card(
    run: ContinualRun,
    model: nn.Module,
    args: Any,
    extra_tags: Sequence[str] = (),
    revision: str | None = None,
    made_with: str = "MagMaxTrainer",
    **metadata: Any,
) -> str:
    """The card of a continual run, through the one card builder ([`hf_magmax.hub.build_model_card`]).

    With `revision` (a per-task Hub revision, `push_every_task`): the card of the merged model after the tasks so far
    (their order, λ now, the accuracy rows so far, the provenance shares when recorded). `made_with`: what ran the
    loop (`MagMaxTrainer`, or `MagMaxCallback` on a plain `Trainer`). `metadata` takes what `Trainer.create_model_card`
    takes and transformers' example scripts pass: `model_name`, `language`, `license`, `finetuned_from` (the card's
    `base_model` when it is a Hub id), `tasks` (its `pipeline_tag` when there is one) and `dataset_tags` (`datasets`).
    """
    from ..hub import build_model_card
    from ..metrics import format_matrix

    summary = run.summary()
    done, total = run.num_tasks_done, len(run.task_names)
    base = metadata.get("finetuned_from") or getattr(getattr(unwrap(model), "config", None), "_name_or_path", None)
    title = metadata.get("model_name") or os.path.basename(os.path.normpath(args.output_dir))
    coef = summary["scaling_coef"] if revision is None else run.current_coef()
    trained = f"{total} task(s)" if done == total else f"the first {done} of {total} task(s)"
    holds = (
        f"This checkpoint holds the **{summary['final_model']}** model."
        if revision is None
        else f"This revision (`{revision}`) holds the **merged** model after task {done} ({run.task_names[done - 1]})."
    )
    intro = (
        f"Fine-tuned sequentially on {trained} with hf_magmax's `{made_with}` and merged "
        f"with **{summary['method']}** (scaling coefficient λ = {coef:g}"
        + (", chosen on validation data" if run.spec.is_auto else "")
        + f"). {holds}"
    )
    tasks = "\n".join(f"{i + 1}. {n}" for i, n in enumerate(run.task_names[: max(done, 1) if revision else total]))
    if revision is not None and done < total:
        tasks += "\n\nStill to come: " + ", ".join(run.task_names[done:]) + "."
    sections: dict[str, str] = {"Tasks" if revision is None else "Task order so far": tasks}
    merge = [f"merge_method: {summary['method']}"]
    merge += [f"{key}: {value}" for key, value in summary["method_kwargs"].items()]
    merge.append(f"scaling_coef: {coef:g}")
    if run.spec.is_auto:
        merge.append(f"scaling_coef_grid: {summary['scaling_coef_grid']}")
    if revision is None:
        merge.append(f"final_model: {summary['final_model']}")
    sections["Merge"] = "```yaml\n" + "\n".join(merge) + "\n```"
    if summary["scaling_coef_search"]:
        last = summary["scaling_coef_search"][-1]
        rows = [f"| {c:g} | {s:.4f} |" for c, s in last["curve"]]
        sections["Scaling coefficient (validation)"] = "\n".join(["| λ | validation score |", "|---:|---:|", *rows])
    if run.eval_datasets and (done == total or (revision is not None and done)):
        percent = summary["metric"] == "accuracy"
        for kind, label in (("sequential", "Sequential fine-tuning"), ("merged", f"Merged ({summary['method']})")):
            # the matrix so far: rows θ_0 .. after task `done`, columns the tasks seen so far
            matrix = [row[:done] for row in summary[kind]["matrix"][: done + 1]]
            if run.matrices.complete(matrix):
                sections[f"{label}: {summary['metric']} matrix"] = format_matrix(
                    matrix, run.task_names[:done], percent=percent, seen_only=run.matrices.seen_only
                )
        rows = ["| metric | sequential | merged |", "|---|---:|---:|"]
        seq, merged = summary["sequential"]["metrics"], summary["merged"]["metrics"]
        for key in seq:
            m = merged.get(key)
            rows.append(f"| {key} | {seq[key]:.4f} | {'' if m is None else f'{m:.4f}'} |")
        if done == total:
            sections["Summary"] = "\n".join(rows)
    if "provenance" in summary:
        from ..metrics import PROVENANCE_FILE, provenance_table

        sections["Provenance"] = (
            "Which task won each merged element (ties go to the later task); the winner maps are in "
            f"`{PROVENANCE_FILE}`, the shares per tensor and per layer in `continual_results.json`.\n\n"
            + provenance_table(summary["provenance"])
        )
    card = build_model_card(
        title,
        intro,
        sections,
        base_model=base,
        base_model_relation="finetune",
        library_name="peft" if run.lora and is_peft_model(unwrap(model)) else "transformers",
        method=summary["method"],
        lora=run.lora,
        continual=True,
        tags=[t for t in extra_tags if t],
        language=metadata.get("language") or None,
        license=metadata.get("license") or None,
        pipeline_tag=_one(metadata.get("tasks")),
        datasets=_listed(metadata.get("dataset_tags")),
    )
    return str(card)


def _one(value: str | Sequence[str] | None) -> str | None:
    """A task tag given as `"text-classification"` or `["text-classification"]` (transformers' `tasks`); None for none
    or several."""
    values = [value] if isinstance(value, str) else list(value or [])
    return values[0] if len(values) == 1 and values[0] else None


def _listed(value: str | Sequence[str] | None) -> list[str] | None:
    values = [value] if isinstance(value, str) else [v for v in value or [] if v]
    return values or None
