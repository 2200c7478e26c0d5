# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""MagMax for LoRA adapters: exact LoRA deltas, adapter merging on the true ΔW, and the SVD re-factor.

A LoRA adapter changes a weight by `ΔW = scaling · B @ A` (PEFT's `get_delta_weight`). Merging the factors A and B
separately (as PEFT's `add_weighted_adapter` does for `linear`/`ties`/`dare`) is not a merge of the adapters' weight
changes; this module merges the dense deltas, one module at a time, through the engine in [`hf_magmax.merging`], and
then either

- folds `θ_0 + λ · ΔW_sel` into the base weights (`lora_output="merged"`: a normal transformers model), or
- re-factors `λ · ΔW_sel` by truncated SVD into a new LoRA adapter (`lora_output="adapter"`: an ordinary PEFT adapter
  directory), reporting the relative reconstruction error per module and overall.

**What a task vector is for each kind of adapter** (the dict of [`lora_delta_state_dict`], keyed by the *base*
model's state-dict names such as `model.layers.0.self_attn.q_proj.weight`):

- plain LoRA on `nn.Linear`, `nn.Embedding`, `nn.Conv1d/2d/3d` and GPT-2's `Conv1D` (`fan_in_fan_out`): PEFT's own
  `get_delta_weight`, i.e. `scaling · B @ A` laid out like the base weight, with `scaling = lora_alpha / r`
  (`lora_alpha / √r` with `use_rslora`, per module with `rank_pattern` / `alpha_pattern`);
- LoRA biases (`lora_bias=True`): `scaling · lora_B.bias` under the module's `.bias` name;
- DoRA (`use_dora=True`): τ = W_dora − W_0, the dense difference of the merged weight (magnitude rescaling included)
  and the base weight. This is exact, and it is what `merge_and_unload()` adds; it is *not* of rank r, so re-factoring
  a merged DoRA adapter into plain LoRA reports a non-zero reconstruction error;
- `modules_to_save`: the full-weight difference `trained copy − original` of every floating parameter.

Every one of these equals `merge_and_unload()` minus the base weights (tested). Other PEFT types (IA3, LoHa, ...)
and LoRA variants other than DoRA (aLoRA, Arrow, ...), LoRA on `target_parameters`, `MultiheadAttention`, grouped
convolutions, trainable tokens and quantized base models are refused with an error naming the module.

The package: `deltas` (ΔW of every adapter type, folding into a base), `refactor` (the SVD re-factor), `merge`
([`merge_adapters`], [`add_magmax_adapter`]), `loading` (the inputs, checked before anything is merged), `save`
([`save_lora_merge`], the config and card, [`run_lora_merge`]). peft is imported
inside the functions: `import hf_magmax` does not import it.
"""

from .deltas import (
    PEFT_PREFIX,  # noqa: F401 - re-exported
    QUANTIZED_CLASS_NAMES,  # noqa: F401 - re-exported
    _base_model,  # noqa: F401 - re-exported
    _strip_adapters,  # noqa: F401 - used by hf_magmax.trainer
    base_parameters,
    check_not_quantized,
    fold_deltas_into_base,
    lora_delta_state_dict,
    lora_task_vectors,
)
from .loading import _load_base_model  # noqa: F401 - used by hf_magmax.cli
from .merge import LoraMergeResult, add_magmax_adapter, merge_adapters
from .refactor import SVD_METHODS, LoraFactorization, deltas_to_lora  # noqa: F401
from .save import (
    LORA_MERGE_CONFIG_NAME,  # noqa: F401
    _check_output_dir,  # noqa: F401 - used by hf_magmax.cli
    lora_merge_config,  # noqa: F401
    run_lora_merge,
    save_lora_merge,
)


__all__ = [
    "LoraFactorization",
    "LoraMergeResult",
    "add_magmax_adapter",
    "base_parameters",
    "check_not_quantized",
    "deltas_to_lora",
    "fold_deltas_into_base",
    "lora_delta_state_dict",
    "lora_task_vectors",
    "merge_adapters",
    "run_lora_merge",
    "save_lora_merge",
]
