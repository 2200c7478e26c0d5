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
from .task_vectors import TaskVector


__all__ = [
    "DEFAULT_SCALING_COEFS",
    "MERGE_METHODS",
    "StateDictMerger",
    "TaskVector",
    "__version__",
    "average",
    "magmax",
    "make_online_merge",
    "merge_task_vectors",
    "random_mix",
    "task_arithmetic",
    "ties",
]
