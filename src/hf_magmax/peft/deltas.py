# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""LoRA task vectors: the exact ΔW of every supported adapter type, and θ_0 + λ·ΔW folded into a base model.

See [`hf_magmax.peft`] for what a task vector is for each kind of adapter. peft is imported inside the functions.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..merging import apply_merged
from ..task_vectors import subtract


logger = logging.getLogger(__name__)

__all__ = [
    "base_parameters",
    "check_not_quantized",
    "fold_deltas_into_base",
    "lora_delta_state_dict",
    "lora_task_vectors",
]

#: Prefix of every key in a saved PEFT adapter (`adapter_model.safetensors`).
PEFT_PREFIX = "base_model.model."

#: Class names of quantized layers and parameters (bitsandbytes, GPTQ, AWQ, HQQ, EETQ, torchao, optimum-quanto).
QUANTIZED_CLASS_NAMES = frozenset(
    {
        "Linear4bit",
        "Linear8bitLt",
        "Params4bit",
        "Int8Params",
        "QuantLinear",
        "GPTQLinear",
        "WQLinear_GEMM",
        "WQLinear_GEMV",
        "HQQLinear",
        "EetqLinear",
        "AffineQuantizedTensor",
        "QLinear",
        "QBytesTensor",
    }
)


def _require_peft():
    try:
        import peft
    except ImportError as err:  # pragma: no cover - peft is installed in the test environment
        raise ImportError(
            'merging LoRA adapters needs peft: install it with `pip install "hf_magmax[peft]"`.'
        ) from err
    return peft


# --------------------------------------------------------------------------------------------------------------------
# Walking a model with LoRA layers
# --------------------------------------------------------------------------------------------------------------------


def _base_model(model: nn.Module) -> nn.Module:
    """The model whose module names are the base model's (a `PeftModel`'s `get_base_model()`, else `model`)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def _peft_configs(model: nn.Module) -> dict[str, Any]:
    configs = getattr(model, "peft_config", None)
    if isinstance(configs, Mapping):
        return dict(configs)
    return {}


def _base_name(name: str) -> str:
    """State-dict name in the base model of a parameter of the PEFT-wrapped model (`.base_layer`, wrappers removed)."""
    name = name.replace(".base_layer.", ".").replace(".original_module.", ".")
    return name


def base_parameters(model: nn.Module) -> dict[str, Tensor]:
    """The base model's parameters and floating buffers by their base state-dict names, also on a PEFT-wrapped model.

    LoRA factors and the trained copies of `modules_to_save` are left out; the wrapped base layers and
    `original_module`s are listed under the names the plain base model gives them. Tied parameters appear once per
    name (they are the same tensor).
    """
    base = _base_model(model)
    out: dict[str, Tensor] = {}
    for name, tensor in [*base.named_parameters(remove_duplicate=False), *base.named_buffers(remove_duplicate=False)]:
        if any(part.startswith("lora_") or part == "modules_to_save" for part in name.split(".")):
            continue
        out[_base_name(name)] = tensor
    return out


def _is_quantized_module(module: nn.Module) -> bool:
    if type(module).__name__ in QUANTIZED_CLASS_NAMES:
        return True
    weight = getattr(module, "weight", None)
    if isinstance(weight, Tensor):
        if type(weight).__name__ in QUANTIZED_CLASS_NAMES:
            return True
        if not weight.is_floating_point():
            return True
    return bool(getattr(module, "quant_state", None) is not None or hasattr(module, "qweight"))


def check_not_quantized(model: nn.Module) -> None:
    """Refuse a quantized base model: MagMax needs the exact base weights θ_0 to fold into or to compare against.

    Raises:
        `ValueError` naming the quantization config or the first quantized module, with the fix: load the base
        model without `quantization_config` (in fp32/bf16/fp16), merge, and quantize the result afterwards.
    """
    fix = (
        "MagMax needs the exact base weights: load the base model without `quantization_config` (in fp32, bf16 or "
        "fp16), merge the adapters, and quantize the merged model afterwards if you need to."
    )
    base = _base_model(model)
    config = getattr(base, "config", None)
    quantization_config = getattr(config, "quantization_config", None)
    if quantization_config is not None or getattr(base, "is_quantized", False):
        method = getattr(quantization_config, "quant_method", None)
        if method is None and isinstance(quantization_config, Mapping):
            method = quantization_config.get("quant_method")
        raise ValueError(f"the base model is quantized (quantization_config: quant_method={method!r}). {fix}")
    for name, module in base.named_modules():
        target = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        if _is_quantized_module(target):
            raise ValueError(f"module `{name}` of the base model is quantized ({type(target).__name__}). {fix}")


def _check_lora_type(model: nn.Module, adapter_name: str) -> None:
    configs = _peft_configs(model)
    if configs:
        if adapter_name not in configs:
            raise KeyError(
                f"adapter {adapter_name!r} is not loaded on the model (loaded: {sorted(configs)}). Load it with "
                "`model.load_adapter(path, adapter_name=...)` or pass one of the loaded names."
            )
        peft_type = getattr(configs[adapter_name], "peft_type", None)
        peft_type = getattr(peft_type, "value", peft_type)
        if str(peft_type).upper() != "LORA":
            raise ValueError(
                f"adapter {adapter_name!r} is a {peft_type} adapter: only LoRA adapters (peft `LoraConfig`, DoRA "
                "included) can be merged on their weight deltas."
            )
        if getattr(configs[adapter_name], "trainable_token_indices", None):
            raise ValueError(
                f"adapter {adapter_name!r} uses `trainable_token_indices` (trainable tokens), which the LoRA merger "
                "does not support: train with `modules_to_save=[embedding]` instead."
            )


@dataclass
class _ModuleInfo:
    """One module a set of adapters changes: a LoRA layer or a `modules_to_save` wrapper."""

    name: str
    module: nn.Module
    kind: str  # "lora" or "modules_to_save"
    keys: list[str] = field(default_factory=list)


def _iter_adapted_modules(model: nn.Module, adapter_names: Sequence[str]) -> Iterator[_ModuleInfo]:
    """The modules that any of `adapter_names` changes, in the base model's module order, with their delta keys."""
    _require_peft()
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import ModulesToSaveWrapper

    base = _base_model(model)
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            present = [a for a in adapter_names if a in module.lora_A or a in module.lora_embedding_A]
            if not present:
                continue
            keys = [f"{name}.weight"]
            if any(module.lora_bias.get(a, False) for a in present):
                keys.append(f"{name}.bias")
            yield _ModuleInfo(name, module, "lora", keys)
        elif isinstance(module, ModulesToSaveWrapper):
            if not any(a in module.modules_to_save for a in adapter_names):
                continue
            keys = [
                f"{name}.{p}"
                for p, t in [
                    *module.original_module.named_parameters(),
                    *module.original_module.named_buffers(),
                ]
                if t.is_floating_point()
            ]
            yield _ModuleInfo(name, module, "modules_to_save", keys)
        elif isinstance(module, BaseTunerLayer):
            layer_names = [getattr(module, n, {}) for n in getattr(module, "adapter_layer_names", ())]
            if any(
                a in layer
                for layer in layer_names
                if isinstance(layer, Mapping | nn.ModuleDict | nn.ParameterDict)
                for a in adapter_names
            ):
                raise ValueError(
                    f"module `{name}` holds a {type(module).__name__} adapter layer: only LoRA adapters can be merged "
                    "on their weight deltas."
                )


def _check_lora_module(name: str, module: nn.Module, adapter_name: str) -> None:
    """Refuse, naming the module, what the merger cannot turn into an exact ΔW (checked before any weight changes)."""
    from peft.tuners.lora.layer import Conv1d, Conv2d, Conv3d, Embedding, Linear

    if adapter_name not in module.lora_A and adapter_name not in module.lora_embedding_A:
        return
    if not isinstance(module, Linear | Embedding | Conv1d | Conv2d | Conv3d):
        raise ValueError(
            f"module `{name}` is a LoRA {type(module).__name__} layer, which the LoRA merger does not support "
            "(supported: LoRA on nn.Linear, transformers Conv1D, nn.Embedding, nn.Conv1d/2d/3d)."
        )
    if getattr(module, "merged", False):
        raise ValueError(
            f"module `{name}` has adapters merged into its base weight ({module.merged_adapters}), so the base "
            "weight is not θ_0: call `model.unmerge_adapter()` first."
        )
    base_layer = module.get_base_layer()
    if getattr(base_layer, "groups", 1) > 1:
        raise ValueError(
            f"module `{name}` is a grouped convolution (groups={base_layer.groups}); PEFT cannot merge LoRA into it, "
            "and neither can the LoRA merger."
        )
    variant = getattr(module, "lora_variant", {}).get(adapter_name)
    if variant is not None and not module.use_dora.get(adapter_name, False):
        raise ValueError(
            f"module `{name}` uses the LoRA variant {type(variant).__name__} for adapter {adapter_name!r}; only plain "
            "LoRA and DoRA adapters can be merged on their weight deltas."
        )


@torch.no_grad()
def _lora_module_delta(name: str, module: nn.Module, adapter_name: str) -> dict[str, Tensor]:
    """ΔW (and Δbias) of one LoRA layer for one adapter, fp32, in the base weight's layout (PEFT's exact semantics)."""
    if adapter_name not in module.lora_A and adapter_name not in module.lora_embedding_A:
        return {}
    _check_lora_module(name, module, adapter_name)
    base_layer = module.get_base_layer()
    variant = getattr(module, "lora_variant", {}).get(adapter_name)
    weight = base_layer.weight
    if variant is None:
        delta = module.get_delta_weight(adapter_name).float()
    else:  # DoRA: τ = W_dora − W_0, the dense merged weight (magnitude rescaling included) minus θ_0, exact
        merged = variant.merge_safe(module, adapter_name, weight.detach().clone())
        module._cache_pop(f"{adapter_name}-weight_norm")
        delta = subtract(merged, weight)
    if delta.shape != weight.shape:  # pragma: no cover - PEFT guarantees the layout
        raise ValueError(f"module `{name}`: ΔW has shape {tuple(delta.shape)} but the weight {tuple(weight.shape)}.")
    out = {f"{name}.weight": delta}
    if module.lora_bias.get(adapter_name, False):
        out[f"{name}.bias"] = (module.lora_B[adapter_name].bias * module.scaling[adapter_name]).float()
    return out


@torch.no_grad()
def _modules_to_save_delta(name: str, module: nn.Module, adapter_name: str) -> dict[str, Tensor]:
    if adapter_name not in module.modules_to_save:
        return {}
    trained = dict(module.modules_to_save[adapter_name].named_parameters())
    trained.update(dict(module.modules_to_save[adapter_name].named_buffers()))
    out: dict[str, Tensor] = {}
    for p, original in [*module.original_module.named_parameters(), *module.original_module.named_buffers()]:
        if original.is_floating_point():
            out[f"{name}.{p}"] = subtract(trained[p], original)
    return out


def _module_delta(info: _ModuleInfo, adapter_name: str) -> dict[str, Tensor]:
    if info.kind == "lora":
        return _lora_module_delta(info.name, info.module, adapter_name)
    return _modules_to_save_delta(info.name, info.module, adapter_name)


@torch.no_grad()
def lora_delta_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, Tensor]:
    """The dense task vector of one LoRA adapter: ΔW per changed tensor, keyed by the base model's state-dict names.

    For a `PeftModel` (or any model with LoRA layers injected, e.g. by `inject_adapter_in_model`), returns, in fp32,
    what `merge_and_unload()` would add to each base tensor: PEFT's `get_delta_weight` for plain LoRA (`lora_alpha / r`
    or rsLoRA scaling, `rank_pattern` / `alpha_pattern`, `fan_in_fan_out`, Linear / Embedding / Conv layers),
    `scaling · lora_B.bias` for LoRA biases, `W_dora − W_0` for DoRA, and `trained copy − original` for every floating
    parameter of a `modules_to_save` module. Modules the adapter does not touch are absent (their ΔW is 0).

    Args:
        model (`PeftModel` or `torch.nn.Module`):
            The model holding the adapter.
        adapter_name (`str`, *optional*, defaults to `"default"`):
            Which adapter (PEFT's name).

    Returns:
        `dict[str, torch.Tensor]`: base state-dict name (e.g. `"model.layers.0.self_attn.q_proj.weight"`) → ΔW.

    Raises:
        `KeyError` if the adapter is not loaded; `ValueError` naming the module for non-LoRA adapters, unsupported
        LoRA variants and layers, and quantized base models.

    Example:

    ```python
    >>> from peft import LoraConfig, get_peft_model
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from hf_magmax.peft import lora_delta_state_dict
    >>> config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...                      num_attention_heads=2, num_key_value_heads=1)
    >>> model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=2, target_modules=["q_proj"],
    ...                        init_lora_weights=False))
    >>> sorted(lora_delta_state_dict(model))
    ['model.layers.0.self_attn.q_proj.weight']
    ```
    """
    _require_peft()
    _check_lora_type(model, adapter_name)
    check_not_quantized(model)
    deltas: dict[str, Tensor] = {}
    found = False
    for info in _iter_adapted_modules(model, [adapter_name]):
        found = True
        deltas.update(_module_delta(info, adapter_name))
    if not found and not _peft_configs(model):
        raise KeyError(f"no LoRA layer of the model holds an adapter named {adapter_name!r}.")
    return deltas


@torch.no_grad()
def lora_task_vectors(model: nn.Module, adapter_names: Sequence[str]) -> list[dict[str, Tensor]]:
    """The dense task vectors of several adapters over the same tensors, ready for the merge engine.

    Each dict holds every tensor that any of the adapters changes, in the base model's order, with ΔW = 0 where an
    adapter does not touch a module. All of them are dense in memory at once: for large models use
    [`merge_adapters`], which holds one module at a time.

    Example:

    ```python
    >>> from hf_magmax import merge_task_vectors
    >>> task_vectors = lora_task_vectors(peft_model, ["task_1", "task_2"])  # doctest: +SKIP
    >>> merged = merge_task_vectors(task_vectors, method="magmax")  # λ·ΔW_sel, λ = 0.5  # doctest: +SKIP
    ```
    """
    per_adapter = [lora_delta_state_dict(model, name) for name in adapter_names]
    like: dict[str, Tensor] = {}
    for deltas in per_adapter:
        for key, delta in deltas.items():
            like.setdefault(key, delta)
    order = [name for name in base_parameters(model) if name in like]
    return [{k: deltas[k] if k in deltas else torch.zeros_like(like[k]) for k in order} for deltas in per_adapter]


def _strip_adapters(model: nn.Module) -> nn.Module:
    """Remove every LoRA layer and `modules_to_save` wrapper (without merging) and return the plain base model."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import ModulesToSaveWrapper

    base = _base_model(model)
    for name, module in list(base.named_modules()):
        if isinstance(module, ModulesToSaveWrapper):
            replacement = module.original_module
        elif isinstance(module, BaseTunerLayer):
            replacement = module.get_base_layer()
        else:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = base.get_submodule(parent_name) if parent_name else base
        setattr(parent, child, replacement)
    if "peft_config" in base.__dict__:
        del base.__dict__["peft_config"]
    return base


@torch.no_grad()
def fold_deltas_into_base(
    base_model: nn.Module,
    deltas: Mapping[str, Tensor],
    scaling_coef: float = 1.0,
    *,
    dtype: torch.dtype | None = None,
    allow_non_finite: bool = True,
) -> nn.Module:
    """Add `scaling_coef · ΔW` to the base model's tensors in place: θ_0 + λ · ΔW.

    Each tensor is [`hf_magmax.merging.apply_merged`]`(θ_0, ΔW, λ)`, the one rounding rule of every merge (math in
    fp32, one cast to the tensor's dtype, or to `dtype`). `base_model` is a plain model whose state-dict names are the
    keys of `deltas`, or a PEFT-wrapped model (then its base layers, not the adapters, are changed). Tied tensors are
    changed once. Every new value is computed and checked before the first tensor changes.

    Args:
        base_model (`torch.nn.Module`):
            The model holding θ_0.
        deltas (`dict[str, torch.Tensor]`):
            Base state-dict name → ΔW, e.g. from [`lora_delta_state_dict`] or a merge of several.
        scaling_coef (`float`, *optional*, defaults to `1.0`):
            λ.
        dtype (`torch.dtype`, *optional*):
            The dtype of the changed tensors (default: each keeps its own).
        allow_non_finite (`bool`, *optional*, defaults to `True`):
            With `False`, a NaN/Inf in a result (e.g. θ_0 + λ·ΔW overflowing float16) is a `ValueError` naming the
            tensor, raised before any tensor changes.

    Returns:
        The same `base_model`.

    Raises:
        `KeyError` naming a key the model lacks; `ValueError` naming a tensor whose shape differs.
    """
    check_not_quantized(base_model)
    params = base_parameters(base_model)
    done: set[int] = set()
    updates: list[tuple[Tensor, Tensor]] = []
    for name, delta in deltas.items():
        if name not in params:
            raise KeyError(
                f"delta {name!r} names no parameter of the base model: were the deltas computed for another model?"
            )
        target = params[name]
        if delta.shape != target.shape:
            raise ValueError(
                f"delta {name!r} has shape {tuple(delta.shape)} but the base tensor has {tuple(target.shape)}: the "
                "adapters were made for another base model."
            )
        if id(target) in done:
            continue
        done.add(id(target))
        merged = apply_merged(target.detach(), delta.detach(), float(scaling_coef), dtype=dtype)
        if not allow_non_finite:
            check_finite_output(merged, name, scaling_coef)
        updates.append((target, merged))
    for target, merged in updates:
        if merged.dtype == target.dtype:
            target.data.copy_(merged)
        else:
            target.data = merged
    return base_model


def check_finite_output(tensor: Tensor, name: str, scaling_coef: float) -> None:
    """Refuse a merged tensor holding NaN/Inf, naming it and the fix (a non-finite output is never written)."""
    if bool(torch.isfinite(tensor).all()):
        return
    kind = "NaN" if bool(torch.isnan(tensor).any()) else "Inf"
    raise ValueError(
        f"the merged tensor {name!r} holds {kind} values (θ_0 + λ·ΔW with λ={scaling_coef:g} in {tensor.dtype}): "
        "lower `scaling_coef`, choose a wider `dtype` (float32), or pass `allow_non_finite=True` "
        "(--allow-non-finite) to write it anyway."
    )
