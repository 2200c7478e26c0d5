# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""Continual fine-tuning with MagMax inside 🤗 Transformers' `Trainer`.

A method is a pair, as in TRL: [`MagMaxConfig`] (a `TrainingArguments`) and [`MagMaxTrainer`] (a `Trainer`). For
existing scripts that already call `trainer.train()` once per task, [`MagMaxCallback`] adds the same merge and metrics
to a plain `Trainer`.

The package, one concept per module:

- `config.py`: [`MagMaxOptions`] (the MagMax fields, shared with the callback) and [`MagMaxConfig`];
- `state.py`: [`MergeState`], θ_0 and the running merge of the tensors this process holds (asked of the merge core);
- `matrices.py`: the accuracy matrices, how a model is scored, `continual_results.json`;
- `run.py`: the run that drives one task sequence (shared by the trainer and the callback);
- `release.py`: the per-task Hub revisions of a run (`push_every_task=True`) and their record;
- `inputs.py`: the task sequence as given, and every check on it before the first step;
- `trainer.py`, `callback.py`: [`MagMaxTrainer`], [`MagMaxCallback`].
"""

from .callback import MagMaxCallback
from .config import MagMaxConfig, MagMaxOptions
from .matrices import RESULTS_NAME, AccuracyMatrices
from .run import STATE_NAME, ContinualRun
from .state import BASE_DIR_NAME, BASE_WEIGHTS_NAME, MERGE_STATE_NAME, CheckpointError, MergeState
from .trainer import MagMaxTrainer


__all__ = [
    "BASE_DIR_NAME",
    "BASE_WEIGHTS_NAME",
    "MERGE_STATE_NAME",
    "RESULTS_NAME",
    "STATE_NAME",
    "AccuracyMatrices",
    "CheckpointError",
    "ContinualRun",
    "MagMaxCallback",
    "MagMaxConfig",
    "MagMaxOptions",
    "MagMaxTrainer",
    "MergeState",
]
