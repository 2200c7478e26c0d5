# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""[`MagMaxCallback`]: the MagMax merge and metrics for an existing script's plain `Trainer`."""

from __future__ import annotations

import dataclasses
import inspect
import os
import types
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn
from transformers import Trainer, TrainerCallback

from .config import MagMaxOptions, check_push_options
from .deepspeed import check_deepspeed, fresh_engine, release_engine
from .inputs import (
    check_datasets,
    freeze,
    head,
    is_peft_model,
    normalize_tasks,
    prepare_dataset,
    prepares_datasets,
    task_dir_name,
)
from .run import ContinualRun
from .state import unwrap


__all__ = ["MagMaxCallback"]

_OPTION_FIELDS = tuple(f.name for f in dataclasses.fields(MagMaxOptions))


def _options(options: MagMaxOptions | None, overrides: Mapping[str, Any]) -> MagMaxOptions:
    """The callback's options: `options` (a copy of its MagMax fields) with the keyword arguments on top."""
    unknown = sorted(set(overrides) - set(_OPTION_FIELDS))
    if unknown:
        raise TypeError(
            f"MagMaxCallback got unexpected argument(s) {', '.join(unknown)}: the MagMax options are "
            f"{', '.join(_OPTION_FIELDS)}."
        )
    if options is not None and not isinstance(options, MagMaxOptions):
        raise TypeError(f"`options` must be a MagMaxOptions or a MagMaxConfig, got {type(options).__name__}.")
    values = {name: getattr(options, name) for name in _OPTION_FIELDS} if options is not None else {}
    values.update(overrides)
    return MagMaxOptions(**values)


class MagMaxCallback(TrainerCallback):
    r"""MagMax for an existing script that calls `trainer.train()` once per task on its own `Trainer`.

    The callback takes θ_0 at the first `on_train_begin`, folds `τ_t = θ_t − θ_0` into the running merge at every
    `on_train_end`, evaluates the sequential and merged models on `eval_datasets` (if given), and after the
    `num_tasks`-th task writes `θ_0 + λ · merge` into the model (`final_model="merged"`) and
    `output_dir/continual_results.json` — the same weights and metrics as [`MagMaxTrainer`]. It also resets the
    trainer's optimizer and learning-rate schedule after every task, so each task starts fresh as in the paper.

    Attached to a plain `Trainer`, the callback makes it behave as [`MagMaxTrainer`] where files are written: the
    checkpoints of the k-th task go to `output_dir/task-<k>-<name>/checkpoint-<step>` (`task-00-...` first, so a
    task's checkpoints no longer overwrite the previous task's; `save_total_limit` applies per task), and once a task
    is done `trainer.save_model(...)` and `trainer.push_to_hub(...)` write the MagMax model card (tasks, method, λ,
    the accuracy matrices) in place of transformers' generic one. It does so by overriding `_get_output_dir`,
    `save_model` and `create_model_card` on that trainer instance only (a `MagMaxTrainer` is left as it is).

    Args:
        trainer (`transformers.Trainer`, *optional*):
            The trainer to attach to (the callback adds itself). Needed for evaluation, for the optimizer reset and
            for the logs; without it (e.g. passed in `callbacks=[...]`) call [`~MagMaxCallback.attach`] later.
        eval_datasets (`list` or `dict[str, Dataset]`, *optional*):
            The tasks' evaluation sets in task order.
        num_tasks (`int`, *optional*):
            Length of the task sequence; defaults to the number of `eval_datasets`. Without either, call
            [`~MagMaxCallback.finish`] after the last task.
        task_names (`list[str]`, *optional*):
            Names of the tasks (default: the keys of `eval_datasets`, or `task_0`, …).
        validation_datasets (`list` or `dict[str, Dataset]`, *optional*):
            Per-task validation sets for `scaling_coef="auto"`.
        options ([`MagMaxOptions`] or [`MagMaxConfig`], *optional*):
            The MagMax options (may also be passed first, in place of `trainer`). Defaults to `MagMaxOptions()`.
        scaling_coef, scaling_coef_grid, merge_method, merge_density, merge_seed, merge_alpha, final_model,
        eval_merged_every_task, eval_unseen_tasks, merge_device, frozen_modules, max_validation_samples,
        select_scaling_coef_every_task, continual_metric, save_provenance, push_every_task, hub_revision_pattern,
        lora_output, lora_rank:
            Each field of [`MagMaxOptions`] as a keyword argument (same defaults), on top of `options`. With
            `push_every_task=True` the trainer's `args.hub_model_id` names the repo (an error at `attach` without it),
            and the merged model is pushed after every task as [`MagMaxTrainer`] does.

    Example:

    ```python
    >>> from hf_magmax import MagMaxCallback
    >>> magmax = MagMaxCallback(trainer, eval_datasets=test_sets, options=MagMaxOptions(scaling_coef=0.5))  # doctest: +SKIP
    >>> for train_set in train_sets:  # doctest: +SKIP
    ...     trainer.train_dataset = train_set
    ...     trainer.train()
    >>> magmax.results["merged"]["metrics"]  # doctest: +SKIP
    ```
    """

    def __init__(
        self,
        trainer: Trainer | MagMaxOptions | None = None,
        eval_datasets: Sequence[Any] | Mapping[str, Any] | None = None,
        num_tasks: int | None = None,
        task_names: Sequence[str] | None = None,
        validation_datasets: Sequence[Any] | Mapping[str, Any] | None = None,
        options: MagMaxOptions | None = None,
        **option_kwargs: Any,
    ) -> None:
        if isinstance(trainer, MagMaxOptions):  # MagMaxCallback(options, ...)
            if options is not None:
                raise TypeError("pass the options once: `MagMaxCallback(options)` or `MagMaxCallback(options=...)`.")
            trainer, options = None, trainer
        self.options = _options(options, option_kwargs)

        eval_names, eval_list, _ = normalize_tasks(eval_datasets, "eval_datasets")
        _, val_list, _ = normalize_tasks(validation_datasets, "validation_datasets")
        if num_tasks is None:
            num_tasks = len(eval_list) or (len(task_names) if task_names is not None else None)
        if num_tasks is not None and (isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1):
            raise ValueError(f"`num_tasks` must be a positive integer, got {num_tasks!r}.")
        if task_names is not None:
            names = [str(n) for n in task_names]
        elif eval_names and isinstance(eval_datasets, Mapping):
            names = eval_names
        else:
            names = [f"task_{i}" for i in range(num_tasks or 0)]
        if num_tasks is not None and len(names) != num_tasks:
            raise ValueError(f"`task_names` has {len(names)} names but there are {num_tasks} tasks.")
        if eval_list and len(eval_list) != len(names):
            raise ValueError(f"`eval_datasets` has {len(eval_list)} tasks but there are {len(names)} tasks.")
        check_push_options(self.options, names)
        if val_list and len(val_list) != len(names):
            raise ValueError(f"`validation_datasets` has {len(val_list)} tasks but there are {len(names)} tasks.")
        if self.options.is_auto and not val_list:
            raise ValueError('`scaling_coef="auto"` needs `validation_datasets` (one per task) with the callback.')
        if val_list and self.options.max_validation_samples is not None:
            val_list = [head(ds, self.options.max_validation_samples) for ds in val_list]
        self.num_tasks = num_tasks
        self._current_task: int | None = None  # the task being trained (for the checkpoint directories)
        self._prepared: list[Any] = []  # datasets the attached SFTTrainer has prepared (never prepared twice)
        self._model: nn.Module | None = None  # the model of the sequence (every task trains this one)
        self._run = ContinualRun(self.options, names, eval_list, val_list or None)
        self.trainer: Trainer | None = None
        if trainer is not None:
            self.attach(trainer)

    def attach(self, trainer: Trainer) -> MagMaxCallback:
        """Bind the callback to `trainer` (and add it to the trainer's callbacks if it is not there yet)."""
        if self.options.push_every_task and not getattr(trainer.args, "hub_model_id", None):
            raise ValueError(
                "`push_every_task=True` needs the Hub repo to push to: set `hub_model_id` in the trainer's "
                "TrainingArguments (`hub_token` and `hub_private_repo` apply too)."
            )
        check_deepspeed(trainer, self.options)  # ZeRO-3: what needs whole tensors, the final save
        self.trainer = trainer
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        self._hook(trainer)
        if prepares_datasets(trainer):  # TRL's SFTTrainer: evaluate on the sets as it prepares its own
            run, names = self._run, self._run.task_names
            run.eval_datasets = [self._prepare(ds, f"eval {n}", False) for n, ds in zip(names, run.eval_datasets)]
            if run.validation_datasets:
                run.validation_datasets = [
                    self._prepare(ds, f"validation {n}", False) for n, ds in zip(names, run.validation_datasets)
                ]
        if self.options.frozen_modules:
            freeze(trainer.model, self.options.frozen_modules)
        return self

    def _hook(self, trainer: Trainer) -> None:
        """Per-task checkpoint directories and the MagMax model card on `trainer` (this instance only)."""
        from .trainer import MagMaxTrainer, public_hub_uploads

        if isinstance(trainer, MagMaxTrainer) or getattr(trainer, "_magmax_callback", None) is self:
            return
        trainer._magmax_callback = self
        callback = self
        get_output_dir, save_model = trainer._get_output_dir, trainer.save_model
        create_model_card = trainer.create_model_card
        push_to_hub, push_from_checkpoint = trainer.push_to_hub, trainer._push_from_checkpoint
        train = trainer.train

        def _train(self, *args: Any, **kwargs: Any) -> Any:
            fresh_engine(self)  # DeepSpeed: each task's train() builds its own engine (a fresh optimizer)
            return train(*args, **kwargs)

        def _get_output_dir(self, trial: Any = None) -> str:
            run_dir = get_output_dir(trial=trial)
            task = callback._current_task
            if task is None:
                return run_dir
            return os.path.join(run_dir, task_dir_name(task, callback._run.task_names[task]))

        def _save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
            save_model(output_dir, _internal_call=_internal_call)
            if not _internal_call and self.is_world_process_zero() and callback._run.num_tasks_done:
                directory = output_dir if output_dir is not None else self.args.output_dir
                with open(os.path.join(directory, "README.md"), "w", encoding="utf-8") as f:
                    f.write(callback.model_card(self))

        def _create_model_card(self, *args: Any, **kwargs: Any) -> None:
            if not callback._run.num_tasks_done:  # nothing merged yet: the trainer's own card
                create_model_card(*args, **kwargs)
                return
            # the trainer's own signature (transformers': language, license, tags, model_name, finetuned_from, …;
            # TRL's: model_name, dataset_name, tags)
            given = inspect.signature(create_model_card).bind_partial(*args, **kwargs).arguments
            language, license, tags = given.get("language"), given.get("license"), given.get("tags")
            model_name, finetuned_from = given.get("model_name"), given.get("finetuned_from")
            if not self.is_world_process_zero():
                return
            os.makedirs(self.args.output_dir, exist_ok=True)
            text = callback.model_card(
                self,
                extra_tags=[tags] if isinstance(tags, str) else list(tags or []),
                model_name=model_name,
                language=language,
                license=license,
                finetuned_from=finetuned_from,
                **{key: kwargs.get(key) for key in ("tasks", "dataset_tags")},  # what the example scripts pass
            )
            with open(os.path.join(self.args.output_dir, "README.md"), "w", encoding="utf-8") as f:
                f.write(text)

        def _push_to_hub(self, *args: Any, **kwargs: Any) -> Any:
            with public_hub_uploads(self):  # per-task checkpoints and θ_0 stay local, no local path
                return push_to_hub(*args, **kwargs)

        def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
            with public_hub_uploads(self, background=True):
                push_from_checkpoint(checkpoint_folder)

        trainer.train = types.MethodType(_train, trainer)
        if prepares_datasets(trainer):
            self._prepared = [trainer.train_dataset, *dict(trainer.eval_dataset or {}).values()]
            get_train_dataloader = trainer.get_train_dataloader

            def _get_train_dataloader(self) -> Any:
                # each task's raw training set, prepared (tokenized, labelled, packed) as the first task's was
                task = callback._task()
                name = callback._run.task_names[task] if task < len(callback._run.task_names) else f"task_{task}"
                self.train_dataset = callback._prepare(self.train_dataset, f"train {name}", True)
                return get_train_dataloader()

            trainer.get_train_dataloader = types.MethodType(_get_train_dataloader, trainer)
        trainer.push_to_hub = types.MethodType(_push_to_hub, trainer)
        trainer._push_from_checkpoint = types.MethodType(_push_from_checkpoint, trainer)
        trainer._get_output_dir = types.MethodType(_get_output_dir, trainer)
        trainer.save_model = types.MethodType(_save_model, trainer)
        trainer.create_model_card = types.MethodType(_create_model_card, trainer)

    def _prepare(self, dataset: Any, name: str, train: bool) -> Any:
        """`dataset` prepared by the attached SFTTrainer (once: a dataset it or this callback prepared is kept)."""
        if dataset is None or any(dataset is known for known in self._prepared):
            return dataset
        prepared = prepare_dataset(self.trainer, dataset, name, train)
        self._prepared.append(prepared)
        return prepared

    def model_card(self, trainer: Trainer | None = None, extra_tags: Sequence[str] = (), **metadata: Any) -> str:
        """The MagMax model card of this run (the one [`MagMaxTrainer`] writes), as markdown text.

        Args:
            trainer (`transformers.Trainer`, *optional*):
                Whose model and `output_dir` the card describes (default: the attached trainer).
            extra_tags (`list[str]`, *optional*):
                Tags added to the card's metadata.
            metadata:
                `model_name`, `language`, `license`, `finetuned_from`, `tasks`, `dataset_tags` (as in
                `Trainer.create_model_card`).
        """
        from .trainer import _model_card

        trainer = trainer if trainer is not None else self.trainer
        if trainer is None:
            raise ValueError("MagMaxCallback.model_card needs a trainer: attach one with `attach(trainer)`.")
        metadata.setdefault("made_with", "MagMaxCallback")
        return _model_card(self._run, trainer.model, trainer.args, extra_tags=extra_tags, **metadata)

    @property
    def results(self) -> dict[str, Any]:
        """Task names, both accuracy matrices, summary metrics, method and λ (as in `continual_results.json`)."""
        return self._run.summary()

    def _task(self) -> int:
        return self._run.num_tasks_done

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self._run.finished:
            raise RuntimeError("MagMaxCallback: the task sequence is finished; make a new callback for a new one.")
        trainer = self.trainer
        task = self._task()
        current = unwrap(model) if model is not None else None
        if task > 0 and current is not None and self._model is not None and current is not self._model:
            raise ValueError(
                f"MagMaxCallback: task {task + 1} trains another model object than task 1 (a new trainer, or a new "
                "PEFT wrapping from `peft_config`): the task vectors would not share θ_0. Re-use one trainer for the "
                "whole sequence and set `trainer.train_dataset` per task (or use MagMaxTrainer / MagMaxSFTTrainer)."
            )
        if task == 0 and current is not None:
            self._model = current
            # a PEFT (LoRA) model: the task vectors are the adapter's ΔW relative to the base, as in MagMaxTrainer
            self._run.lora = is_peft_model(current)
            if self._run.lora and self.options.push_every_task:
                raise ValueError(
                    "`push_every_task=True` is not supported with LoRA training yet: drop it and push the final model "
                    "with `trainer.push_to_hub()`, or train all weights."
                )
        if trainer is None and self.options.push_every_task:
            raise ValueError(
                "MagMaxCallback with `push_every_task=True` needs the trainer: `MagMaxCallback(trainer)`."
            )
        if trainer is None and self._run.eval_datasets:
            raise ValueError("MagMaxCallback needs the trainer to evaluate: build it with `MagMaxCallback(trainer)`.")
        if self.num_tasks is not None and task >= self.num_tasks:
            raise ValueError(f"MagMaxCallback: a task beyond the {self.num_tasks} announced in `num_tasks`.")
        if task >= len(self._run.task_names):  # open-ended sequence
            self._run.matrices.add_task(f"task_{task}")
        train_dataset = trainer.train_dataset if trainer is not None else None
        self._current_task = task
        if task == 0:
            if trainer is not None:
                check_datasets(trainer.model, self._run.task_names, [train_dataset], self._run.eval_datasets)
            self._run.begin(trainer, model, [train_dataset] if train_dataset is not None else [])
        else:
            if trainer is not None:
                check_datasets(trainer.model, [self._run.task_names[task]], [train_dataset], [])
            self._run.begin_task(trainer, model, task)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        task = self._task()
        self._current_task = None
        self._run.end_task(self.trainer, model, task)
        self._run.publish(self.trainer, model, task)  # push_every_task: the merged model as this task's revision
        if self.trainer is not None:
            # a fresh optimizer and learning-rate schedule for the next task
            self.trainer.optimizer, self.trainer.lr_scheduler = None, None
        if self.num_tasks is not None and self._run.num_tasks_done == self.num_tasks:
            self.finish(model)

    def finish(self, model: nn.Module | None = None) -> None:
        """Write the final weights (`θ_0 + λ · merge` for `final_model="merged"`) and the results."""
        if model is None:
            if self.trainer is None:
                raise ValueError("pass the model to `finish(model)` when the callback has no trainer.")
            model = self.trainer.model
        self._run.finish(self.trainer, model)
        if self._run.lora:  # the base with the merged ΔW folded in, or a re-factored adapter (`lora_output`)
            finished = self._run.finish_lora(self.trainer, model)
            if finished is not None and self.trainer is not None:
                self.trainer.model = self.trainer.model_wrapped = finished
                release_engine(self.trainer)  # DeepSpeed: no engine holds the new model
                self._run.write_results(self.trainer)
