# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""The merge core: the MagMax rule, the baselines, and every fact about a merge method.

This module is the single place that holds the merge methods. Every other part of hf_magmax (the streaming
checkpoint merge, the LoRA merger, the Trainer, the λ search, the CLI) asks it:

- **A method is a class** ([`OnlineMerge`] subclass) that carries its facts: its `method` name, its
  `default_scaling_coef`, its `options` and their defaults, whether it needs a whole-tensor statistic before it can
  fold row blocks (`needs_tensor_stats`, TIES' trim threshold), and whether it draws random numbers per tensor
  (`seeded_per_tensor`, random_mix, seeded by the tensor's *name* and the element's position so that every consumer,
  in blocks or in shards, draws the same choices), and, for OPCM (the continual merge by SVD projection), that it
  needs whole tensors (`blockwise=False`), a rescale computed over the whole model (`needs_model_stats`), and that
  it is `order_dependent` and not `associative`. An instance is an online accumulator: it folds the task vectors of
  one tensor in, one at a time, with memory independent of the number of tasks.
- **[`MergeSpec`]** is the one validated description of a merge (method, λ, density, seed, alpha) that every consumer
  builds, with one policy: λ finite and > 0 (or `"auto"`), options only for the method that takes them.
- **[`apply_merged`]** is THE arithmetic of the merged model, `θ_0 + λ · merged`: math in fp32 for half-precision
  inputs (fp64 for fp64), one cast to the output dtype at the end.
- **Pure functions** `list[Tensor] -> Tensor` (the PEFT convention), [`magmax`], [`average`], [`task_arithmetic`],
  [`ties`], [`random_mix`], [`opcm`], are folds of the accumulators, so the batch and the online results are the same
  bits.

Task vectors `τ_t = θ_t − θ_0` are always relative to the pretrained θ_0 and computed in fp32 for half-precision
weights ([`hf_magmax.task_vectors.subtract`]). Importing this module does not import torch (the console script reads
the method names and defaults from here); torch is imported when a tensor is first touched.
"""

from __future__ import annotations

from .kernels import _RADIX_MIN_NUMEL, _kth_largest_magnitude  # noqa: F401  (tested directly)
from .methods import (
    DEFAULT_SCALING_COEFS,
    ONLINE_MERGES,
    AverageMerge,
    MagMaxMerge,
    OnlineMerge,
    OPCMMerge,
    RandomMixMerge,
    TaskArithmeticMerge,
    TiesMerge,
    check_alpha,
    check_density,
    check_merge_method,
    check_scaling_coef,
    compute_dtype,
    default_scaling_coef,
    opcm_project,
    opcm_projects,
    ties_trim_threshold,
)
from .spec import (
    MERGE_METHODS,
    MergeSpec,
    StateDictMerger,
    apply_merged,
    average,
    magmax,
    make_online_merge,
    merge_task_vectors,
    opcm,
    random_mix,
    task_arithmetic,
    ties,
    winner_shares,
)


__all__ = [
    "DEFAULT_SCALING_COEFS",
    "MERGE_METHODS",
    "ONLINE_MERGES",
    "AverageMerge",
    "MagMaxMerge",
    "MergeSpec",
    "OPCMMerge",
    "OnlineMerge",
    "RandomMixMerge",
    "StateDictMerger",
    "TaskArithmeticMerge",
    "TiesMerge",
    "apply_merged",
    "average",
    "check_alpha",
    "check_density",
    "check_merge_method",
    "check_scaling_coef",
    "compute_dtype",
    "default_scaling_coef",
    "magmax",
    "make_online_merge",
    "merge_task_vectors",
    "opcm",
    "opcm_project",
    "opcm_projects",
    "random_mix",
    "task_arithmetic",
    "ties",
    "ties_trim_threshold",
    "winner_shares",
]
