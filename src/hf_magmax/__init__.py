# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""hf_magmax: MagMax (max-magnitude merging for continual learning) for the Hugging Face ecosystem."""

__version__ = "0.1.0.dev0"

from .checkpoints import load_merge_config, merge_checkpoints
from .continual import (
    ContinualSplit,
    ContinualTask,
    class_incremental_split,
    domain_incremental_split,
    task_incremental_split,
)
from .heads import (
    CLIP_TEMPLATES,
    TEXT_TEMPLATES,
    CLIPZeroShotClassifier,
    TextZeroShotClassifier,
    ZeroShotHead,
    attach_label_embedding_head,
    label_embedding_head_names,
)
from .hub import HubPushError, push_to_hub
from .merging import (
    DEFAULT_SCALING_COEFS,
    MERGE_METHODS,
    StateDictMerger,
    average,
    magmax,
    make_online_merge,
    merge_task_vectors,
    random_mix,
    task_arithmetic,
    ties,
)
from .metrics import (
    accuracy_compute_metrics,
    compute_continual_metrics,
    format_matrix,
    load_continual_metric,
    plot_accuracy_matrix,
)
from .peft import (  # imports peft lazily, inside the functions
    LoraFactorization,
    LoraMergeResult,
    add_magmax_adapter,
    deltas_to_lora,
    fold_deltas_into_base,
    lora_delta_state_dict,
    lora_task_vectors,
    merge_adapters,
)
from .scaling import (
    DEFAULT_SCALING_COEF_GRID,
    ScalingCoefApplier,
    ScalingCoefSearch,
    check_scaling_coef_grid,
    check_validation_fraction,
    plot_scaling_curve,
    search_scaling_coef,
    select_scaling_coef_for_checkpoints,
    split_validation,
)
from .task_vectors import TaskVector


# --- trainer exports (MagMaxConfig, MagMaxTrainer, MagMaxCallback) ---------------------------------------------------
# `transformers.Trainer` imports peft and takes seconds to import, and `import hf_magmax` must stay light (no peft).
# So these three names resolve on first access (PEP 562); `from hf_magmax import MagMaxTrainer` works as usual.
_TRAINER_EXPORTS = ("MagMaxCallback", "MagMaxConfig", "MagMaxTrainer")


def __getattr__(name):
    if name in _TRAINER_EXPORTS:
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'hf_magmax' has no attribute {name!r}")


# --- end trainer exports -----------------------------------------------------------------------------------------

__all__ = [
    "CLIP_TEMPLATES",
    "DEFAULT_SCALING_COEFS",
    "DEFAULT_SCALING_COEF_GRID",
    "MERGE_METHODS",
    "TEXT_TEMPLATES",
    "CLIPZeroShotClassifier",
    "ContinualSplit",
    "ContinualTask",
    "HubPushError",
    "LoraFactorization",
    "LoraMergeResult",
    "MagMaxCallback",
    "MagMaxConfig",
    "MagMaxTrainer",
    "ScalingCoefApplier",
    "ScalingCoefSearch",
    "StateDictMerger",
    "TaskVector",
    "TextZeroShotClassifier",
    "ZeroShotHead",
    "__version__",
    "accuracy_compute_metrics",
    "add_magmax_adapter",
    "attach_label_embedding_head",
    "average",
    "check_scaling_coef_grid",
    "check_validation_fraction",
    "class_incremental_split",
    "compute_continual_metrics",
    "deltas_to_lora",
    "domain_incremental_split",
    "fold_deltas_into_base",
    "format_matrix",
    "label_embedding_head_names",
    "load_continual_metric",
    "load_merge_config",
    "lora_delta_state_dict",
    "lora_task_vectors",
    "magmax",
    "make_online_merge",
    "merge_adapters",
    "merge_checkpoints",
    "merge_task_vectors",
    "plot_accuracy_matrix",
    "plot_scaling_curve",
    "push_to_hub",
    "random_mix",
    "search_scaling_coef",
    "select_scaling_coef_for_checkpoints",
    "split_validation",
    "task_arithmetic",
    "task_incremental_split",
    "ties",
]
