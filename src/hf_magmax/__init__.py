# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""hf_magmax: MagMax (max-magnitude merging for continual learning) for the Hugging Face ecosystem."""

__version__ = "0.1.0.dev0"

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


__all__ = [
    "DEFAULT_SCALING_COEFS",
    "DEFAULT_SCALING_COEF_GRID",
    "MERGE_METHODS",
    "ScalingCoefApplier",
    "ScalingCoefSearch",
    "StateDictMerger",
    "TaskVector",
    "__version__",
    "average",
    "check_scaling_coef_grid",
    "check_validation_fraction",
    "magmax",
    "make_online_merge",
    "merge_task_vectors",
    "plot_scaling_curve",
    "random_mix",
    "search_scaling_coef",
    "select_scaling_coef_for_checkpoints",
    "split_validation",
    "task_arithmetic",
    "ties",
]
