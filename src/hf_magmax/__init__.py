# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""hf_magmax: MagMax (max-magnitude merging for continual learning) for the Hugging Face ecosystem.

Every public name resolves lazily, on first access (PEP 562 `__getattr__`, as `transformers` does):
`import hf_magmax` and `import hf_magmax.cli` (what the `hf-magmax` console script runs) import no torch, and
`from hf_magmax import MagMaxTrainer` imports `hf_magmax.trainer` (and so torch and transformers) only then.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any


__version__ = "0.1.0.dev0"

#: submodule -> the public names it provides (the one table of the package surface).
_IMPORT_STRUCTURE: dict[str, tuple[str, ...]] = {
    "checkpoints": ("load_merge_config", "merge_checkpoints"),
    "config": ("MergeConfig",),
    "continual": (
        "ContinualSplit",
        "ContinualTask",
        "class_incremental_split",
        "domain_incremental_split",
        "task_incremental_split",
    ),
    "extras.heads": (
        "CLIP_TEMPLATES",
        "TEXT_TEMPLATES",
        "CLIPZeroShotClassifier",
        "TextZeroShotClassifier",
        "ZeroShotHead",
        "attach_label_embedding_head",
        "label_embedding_head_names",
    ),
    "hub": ("HubPushError", "push_to_hub"),
    "integrations.trl": ("MagMaxSFTConfig", "MagMaxSFTTrainer"),  # imports `trl` on first access
    "merging": (
        "DEFAULT_SCALING_COEFS",
        "MERGE_METHODS",
        "MergeSpec",
        "StateDictMerger",
        "apply_merged",
        "average",
        "magmax",
        "make_online_merge",
        "merge_task_vectors",
        "random_mix",
        "task_arithmetic",
        "ties",
        "winner_shares",
    ),
    "metrics": (
        "accuracy_compute_metrics",
        "compute_continual_metrics",
        "format_matrix",
        "load_continual_metric",
        "plot_accuracy_matrix",
    ),
    "peft": (  # imports the `peft` library lazily, inside the functions
        "LoraFactorization",
        "LoraMergeResult",
        "add_magmax_adapter",
        "deltas_to_lora",
        "fold_deltas_into_base",
        "lora_delta_state_dict",
        "lora_task_vectors",
        "merge_adapters",
    ),
    "scaling": (
        "DEFAULT_SCALING_COEF_GRID",
        "ScalingCoefApplier",
        "ScalingCoefSearch",
        "check_scaling_coef_grid",
        "check_validation_fraction",
        "plot_scaling_curve",
        "search_scaling_coef",
        "select_scaling_coef_for_checkpoints",
        "split_validation",
    ),
    "task_vectors": ("TaskVector",),
    "trainer": ("MagMaxCallback", "MagMaxConfig", "MagMaxTrainer"),
    "verify": ("VerifyResult", "verify_merge"),
}

_NAME_TO_MODULE: dict[str, str] = {name: module for module, names in _IMPORT_STRUCTURE.items() for name in names}

#: sorted; equal to the names of `_IMPORT_STRUCTURE` plus `__version__` (tests/test_package.py checks it)
__all__ = [
    "CLIPZeroShotClassifier",
    "CLIP_TEMPLATES",
    "ContinualSplit",
    "ContinualTask",
    "DEFAULT_SCALING_COEFS",
    "DEFAULT_SCALING_COEF_GRID",
    "HubPushError",
    "LoraFactorization",
    "LoraMergeResult",
    "MERGE_METHODS",
    "MagMaxCallback",
    "MagMaxConfig",
    "MagMaxSFTConfig",
    "MagMaxSFTTrainer",
    "MagMaxTrainer",
    "MergeConfig",
    "MergeSpec",
    "ScalingCoefApplier",
    "ScalingCoefSearch",
    "StateDictMerger",
    "TEXT_TEMPLATES",
    "TaskVector",
    "TextZeroShotClassifier",
    "VerifyResult",
    "ZeroShotHead",
    "__version__",
    "accuracy_compute_metrics",
    "add_magmax_adapter",
    "apply_merged",
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
    "verify_merge",
    "winner_shares",
]

#: submodules reachable as attributes (`hf_magmax.merging` after a bare `import hf_magmax`).
_SUBMODULES = frozenset(
    {
        "checkpoints",
        "cli",
        "config",
        "continual",
        "demo",
        "extras",
        "heads",
        "hub",
        "integrations",
        "io",
        "merging",
        "metrics",
        "peft",
        "scaling",
        "task_vectors",
        "trace",
        "trainer",
        "verify",
    }
)


def __getattr__(name: str) -> Any:
    module_name = _NAME_TO_MODULE.get(name)
    if module_name is not None:
        value = getattr(importlib.import_module(f".{module_name}", __name__), name)
        globals()[name] = value  # resolve once
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__, *_SUBMODULES})


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from .checkpoints import load_merge_config, merge_checkpoints
    from .config import MergeConfig
    from .continual import (
        ContinualSplit,
        ContinualTask,
        class_incremental_split,
        domain_incremental_split,
        task_incremental_split,
    )
    from .extras.heads import (
        CLIP_TEMPLATES,
        TEXT_TEMPLATES,
        CLIPZeroShotClassifier,
        TextZeroShotClassifier,
        ZeroShotHead,
        attach_label_embedding_head,
        label_embedding_head_names,
    )
    from .hub import HubPushError, push_to_hub
    from .integrations.trl import MagMaxSFTConfig, MagMaxSFTTrainer
    from .merging import (
        DEFAULT_SCALING_COEFS,
        MERGE_METHODS,
        MergeSpec,
        StateDictMerger,
        apply_merged,
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
    from .peft import (
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
    from .trainer import MagMaxCallback, MagMaxConfig, MagMaxTrainer
    from .verify import VerifyResult, verify_merge
