# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""DeepSpeed ZeRO under [`MagMaxTrainer`] and [`MagMaxCallback`]: a fresh engine for every task, and the checks made
before the first step.

Under ZeRO-3 every rank holds the partitions of the parameters (`param.ds_tensor`), and the merge state folds
those, with no gather ([`MergeState`]); under ZeRO-1/2 the parameters are whole on every rank (only the optimizer
states, and under ZeRO-2 the gradients, are partitioned), so the merge state is whole, as under DDP.

One `Trainer.train()` per task: Accelerate destroys the previous task's engine when the next `train()` starts
(`Accelerator.free_memory`), but `Trainer` keeps the destroyed engine in `model_wrapped`, takes the model for
already wrapped and skips `accelerator.prepare`, so no engine is built and the first `accelerator.backward` fails
(`'NoneType' object has no attribute 'backward'`). [`fresh_engine`] hands `train()` the bare model again: Accelerate
then builds a new engine around the same (already partitioned) parameters, with the fresh optimizer and schedule
that every task gets.

After a LoRA run (ZeRO-1/2: ZeRO-3 refuses LoRA) the trainer's model is a new module that no engine holds: the base
with the merged ΔW folded in, or a re-factored adapter. `Trainer.save_model` and `push_to_hub` would still ask the last
task's engine for the weights (`model_wrapped.save_checkpoint`, `accelerator.get_state_dict(trainer.deepspeed)`: the
adapter model before the merge); [`release_engine`] hands the trainer the new model as the plain, whole model it is.
"""

from __future__ import annotations

from typing import Any


__all__ = ["check_deepspeed", "fresh_engine", "gathers_16bit_weights", "release_engine", "zero_stage"]


def zero_stage(trainer: Any) -> int | None:
    """The ZeRO stage of a trainer that trains under DeepSpeed (None without DeepSpeed)."""
    if not getattr(trainer, "is_deepspeed_enabled", False):
        return None
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    return None if plugin is None else int(plugin.zero_stage)


def gathers_16bit_weights(trainer: Any) -> bool:
    """Whether the DeepSpeed config sets `zero_optimization.stage3_gather_16bit_weights_on_model_save: true` (what
    `zero3_save_16bit_model: true` sets in an accelerate config): without it `save_model` cannot consolidate ZeRO-3
    weights (`"auto"` is filled with false by Accelerate)."""
    config = trainer.accelerator.state.deepspeed_plugin.deepspeed_config
    value = config.get("zero_optimization", {}).get("stage3_gather_16bit_weights_on_model_save", False)
    return value is True or str(value).lower() == "true"


def check_deepspeed(trainer: Any, options: Any, lora: bool = False) -> None:
    """Raise, before any training, for what MagMax cannot do under the trainer's DeepSpeed ZeRO-3 config.

    Args:
        trainer (`transformers.Trainer`): the trainer (its Accelerator is built).
        options ([`MagMaxOptions`]): the MagMax options (a [`MagMaxConfig`] is one).
        lora (`bool`, *optional*, defaults to `False`): a PEFT model is trained.
    """
    if zero_stage(trainer) != 3:
        return  # ZeRO-1/2: the parameters are whole on every rank, as under DDP
    where = "under DeepSpeed ZeRO-3 (partitioned weights)"
    if lora:
        raise ValueError(
            f"LoRA training (`peft_config` or a PeftModel) is not supported {where}: the adapter's ΔW = B·A needs "
            "whole B and A. Train LoRA under DDP or ZeRO-2 (`zero_stage: 2`)."
        )
    if options.save_provenance:
        raise ValueError(
            f"`save_provenance` is not supported {where}: the winner maps would be split over the ranks. Drop "
            "`save_provenance`, or train under DDP or ZeRO-2 (`zero_stage: 2`)."
        )
    spec = options.merge_spec()
    if not spec.merge_class.blockwise:
        raise ValueError(
            f"merge_method={spec.method!r} is not supported {where}: it needs each whole tensor (an SVD) and norms "
            "over the whole model. Use magmax, average, task_arithmetic, random_mix or ties, or ZeRO-2."
        )
    if options.push_every_task:
        raise ValueError(
            f"`push_every_task=True` is not supported {where}: no rank holds the whole merged model of a task. Push "
            "the final model with `trainer.push_to_hub()`, or train under ZeRO-2 (`zero_stage: 2`)."
        )
    needs_save = options.final_model == "merged" or bool(getattr(trainer.args, "push_to_hub", False))
    if needs_save and not gathers_16bit_weights(trainer):
        raise ValueError(
            f"the merged model cannot be saved {where} without `stage3_gather_16bit_weights_on_model_save: true` "
            "(DeepSpeed's own checkpoint would hold the optimizer's fp32 weights: the last task's sequential model): "
            "set it in the DeepSpeed config's `zero_optimization` (`zero3_save_16bit_model: true` in an accelerate "
            'config), or use `final_model="sequential"`.'
        )


def fresh_engine(trainer: Any) -> None:
    """Before a task's `Trainer.train()` under DeepSpeed: hand it the bare model, so that Accelerate builds a new
    engine (with the task's fresh optimizer and schedule) instead of reusing the previous task's, which the new
    `train()` destroys first (see the module docstring). A no-op without DeepSpeed and before the first task."""
    if getattr(trainer, "is_deepspeed_enabled", False) and trainer.model_wrapped is not trainer.model:
        trainer.model_wrapped = trainer.model
        trainer.deepspeed = None


def release_engine(trainer: Any) -> None:
    """After the run's model was replaced by a module that no DeepSpeed engine holds (the LoRA run's base with the
    merged ΔW folded in, or its re-factored adapter; under ZeRO-1/2 its weights are whole on every rank): the trainer
    stops treating it as DeepSpeed's, so that `save_model`, `push_to_hub` and `evaluate` use it as a plain model. A
    no-op without DeepSpeed."""
    if getattr(trainer, "is_deepspeed_enabled", False):
        trainer.deepspeed = None
        trainer.is_deepspeed_enabled = False
