# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""MagMax for LoRA adapters: exact LoRA deltas, adapter merging on the true ΔW, and the SVD re-factor.

A LoRA adapter changes a weight by `ΔW = scaling · B @ A` (PEFT's `get_delta_weight`). Merging the factors A and B
separately (as PEFT's `add_weighted_adapter` does for `linear`/`ties`/`dare`) is not a merge of the adapters' weight
changes; this module merges the dense deltas, one module at a time, through the engine in [`hf_magmax.merging`], and
then either

- folds `θ_0 + λ · ΔW_sel` into the base weights (`output="merged"`: a normal transformers model), or
- re-factors `λ · ΔW_sel` by truncated SVD into a new LoRA adapter (`output="adapter"`: an ordinary PEFT adapter
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

peft is imported inside the functions: `import hf_magmax` does not import it.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .merging import MergeSpec, check_density, check_merge_method, default_scaling_coef


logger = logging.getLogger(__name__)

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
    "save_lora_merge",
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

_SVD_METHODS = ("full", "randomized")


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
        delta = merged.float() - weight.detach().float()
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
            out[f"{name}.{p}"] = trained[p].detach().float() - original.detach().float()
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
    shapes: dict[str, torch.Size] = {}
    for deltas in per_adapter:
        for key, delta in deltas.items():
            shapes.setdefault(key, delta.shape)
    order = [name for name in base_parameters(model) if name in shapes]
    return [{k: deltas[k] if k in deltas else torch.zeros(shapes[k]) for k in order} for deltas in per_adapter]


@torch.no_grad()
def fold_deltas_into_base(base_model: nn.Module, deltas: Mapping[str, Tensor], scaling_coef: float = 1.0) -> nn.Module:
    """Add `scaling_coef · ΔW` to the base model's tensors in place: θ_0 + λ · ΔW.

    The sum is computed in fp32 and rounded once to each tensor's dtype. `base_model` is a plain model whose
    state-dict names are the keys of `deltas`, or a PEFT-wrapped model (then its base layers, not the adapters, are
    changed). Tied tensors are changed once.

    Args:
        base_model (`torch.nn.Module`):
            The model holding θ_0.
        deltas (`dict[str, torch.Tensor]`):
            Base state-dict name → ΔW, e.g. from [`lora_delta_state_dict`] or a merge of several.
        scaling_coef (`float`, *optional*, defaults to `1.0`):
            λ.

    Returns:
        The same `base_model`.

    Raises:
        `KeyError` naming a key the model lacks; `ValueError` naming a tensor whose shape differs.
    """
    check_not_quantized(base_model)
    params = base_parameters(base_model)
    done: set[int] = set()
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
        merged = target.detach().float() + float(scaling_coef) * delta.detach().to(target.device, torch.float32)
        target.data.copy_(merged.to(target.dtype))
    return base_model


# --------------------------------------------------------------------------------------------------------------------
# SVD re-factor: ΔW → LoRA factors
# --------------------------------------------------------------------------------------------------------------------


def _layout(module: nn.Module) -> str:
    """How a base module lays out its weight relative to the LoRA product B @ A."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, Conv1D):
        return "conv1d_transposed"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        return "conv"
    return "other"


def _to_lora_matrix(delta: Tensor, layout: str) -> Tensor:
    """The 2-D matrix M with ΔW = layout(M) and M = B @ A (scaling 1)."""
    if layout in ("embedding", "conv1d_transposed"):
        return delta.T
    if layout == "conv":
        return delta.reshape(delta.shape[0], -1)
    return delta


def _factor_shapes(layout: str, delta_shape: torch.Size, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if layout == "conv":
        out_channels, in_channels, *kernel = delta_shape
        return (rank, in_channels, *kernel), (out_channels, rank, *([1] * len(kernel)))
    rows, cols = (delta_shape[1], delta_shape[0]) if layout in ("embedding", "conv1d_transposed") else delta_shape
    return (rank, cols), (rows, rank)


@torch.no_grad()
def _truncated_svd(matrix: Tensor, rank: int, svd: str, niter: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """U [m, r], S [r], Vh [r, n] of the best rank-`rank` approximation of `matrix` (fp32)."""
    if svd == "full":
        if matrix.shape[0] < matrix.shape[1]:  # LAPACK is ~2× faster on the tall orientation: M = (Mᵀ)ᵀ
            v, s, uh = torch.linalg.svd(matrix.T, full_matrices=False)
            return uh[:rank].T, s[:rank], v[:, :rank].T
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank]
    q = min(rank + 10, *matrix.shape)  # oversampling, as in Halko et al.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(matrix, q=q, niter=niter)
    return u[:, :rank], s[:rank], v[:, :rank].T


@dataclass
class LoraFactorization:
    """A LoRA adapter made from dense deltas by truncated SVD, with its reconstruction errors.

    Unpacks as a 4-tuple `(peft_config, state_dict, errors, overall_error)`.

    Attributes:
        peft_config (`peft.LoraConfig`):
            `r = lora_alpha` (scaling 1; per-module ranks in `rank_pattern` with equal `alpha_pattern`),
            `target_modules` = the exact names of the re-factored modules, `modules_to_save` for full-weight modules,
            `lora_bias=True` if any bias changed.
        state_dict (`dict[str, torch.Tensor]`):
            The adapter in PEFT's saved format (`base_model.model.<module>.lora_A.weight`, ...), fp32.
        errors (`dict[str, float]`):
            Module name → relative reconstruction error `‖ΔW − B A‖_F / ‖ΔW‖_F` (0 for an exact fit).
        overall_error (`float`):
            `sqrt(Σ ‖ΔW − B A‖²) / sqrt(Σ ‖ΔW‖²)` over all re-factored modules.
        ranks (`dict[str, int]`):
            Module name → rank used.
    """

    peft_config: Any
    state_dict: dict[str, Tensor]
    errors: dict[str, float]
    overall_error: float
    ranks: dict[str, int] = field(default_factory=dict)

    def __iter__(self):
        return iter((self.peft_config, self.state_dict, self.errors, self.overall_error))

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write `adapter_config.json` and `adapter_model.safetensors`: a directory `PeftModel.from_pretrained` loads."""
        from safetensors.torch import save_file

        os.makedirs(save_directory, exist_ok=True)
        self.peft_config.save_pretrained(str(save_directory))
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict.items()}
        save_file(tensors, os.path.join(save_directory, "adapter_model.safetensors"), metadata={"format": "pt"})


class _Refactorer:
    """Accumulates re-factored modules one at a time and builds the final `LoraConfig`."""

    def __init__(self, rank: int | Mapping[str, int] | None, svd: str, niter: int, seed: int) -> None:
        if svd not in _SVD_METHODS:
            raise ValueError(f"`svd` must be one of {', '.join(_SVD_METHODS)}, got {svd!r}.")
        if isinstance(rank, bool) or (rank is not None and not isinstance(rank, int | Mapping)):
            raise TypeError(f"`rank` must be a positive int, a dict module name → int, or None; got {rank!r}.")
        if isinstance(rank, int) and rank <= 0:
            raise ValueError(f"`rank` must be a positive integer, got {rank}.")
        self.rank, self.svd, self.niter, self.seed = rank, svd, int(niter), int(seed)
        self.state_dict: dict[str, Tensor] = {}
        self.errors: dict[str, float] = {}
        self.ranks: dict[str, int] = {}
        self.layouts: dict[str, str] = {}
        self.modules_to_save: list[str] = []
        self.bias_modules: list[str] = []
        self.no_bias_modules: list[str] = []
        self._residual_sq = 0.0
        self._norm_sq = 0.0

    def _rank_for(self, name: str, matrix: Tensor) -> int:
        limit = min(matrix.shape)
        if self.rank is None:
            return limit
        rank = self.rank.get(name, None) if isinstance(self.rank, Mapping) else self.rank
        if rank is None:
            return limit
        if rank > limit:
            raise ValueError(
                f"`rank`={rank} is larger than module `{name}` allows: its ΔW is a {matrix.shape[0]}×{matrix.shape[1]} "
                f"matrix, so the rank is at most {limit}. Pass a smaller `rank` (or `rank=None` for a per-module "
                "default)."
            )
        return int(rank)

    @torch.no_grad()
    def add_lora(self, name: str, layout: str, delta: Tensor, bias_delta: Tensor | None, has_base_bias: bool) -> None:
        """Re-factor `delta` (already scaled by λ) of module `name` into LoRA factors."""
        if layout == "other":
            raise ValueError(f"module `{name}` is not a Linear, Conv1D, Embedding or Conv layer: it cannot hold LoRA.")
        matrix = _to_lora_matrix(delta.detach().float(), layout)  # [rows, cols]
        rank = self._rank_for(name, matrix)
        u, s, vh = _truncated_svd(matrix, rank, self.svd, self.niter, self.seed)
        sqrt_s = s.clamp(min=0).sqrt()
        lora_b = u * sqrt_s  # [rows, r]
        lora_a = sqrt_s[:, None] * vh  # [r, cols]
        norm_sq = float(matrix.pow(2).sum())
        residual_sq = float((matrix - lora_b @ lora_a).pow(2).sum())
        self._norm_sq += norm_sq
        self._residual_sq += residual_sq
        self.errors[name] = math.sqrt(residual_sq / norm_sq) if norm_sq > 0 else 0.0
        self.ranks[name] = rank
        self.layouts[name] = layout
        a_shape, b_shape = _factor_shapes(layout, delta.shape, rank)
        prefix = f"{PEFT_PREFIX}{name}"
        if layout == "embedding":
            self.state_dict[f"{prefix}.lora_embedding_A"] = lora_a.reshape(a_shape).contiguous()
            self.state_dict[f"{prefix}.lora_embedding_B"] = lora_b.reshape(b_shape).contiguous()
        else:
            self.state_dict[f"{prefix}.lora_A.weight"] = lora_a.reshape(a_shape).contiguous()
            self.state_dict[f"{prefix}.lora_B.weight"] = lora_b.reshape(b_shape).contiguous()
        if bias_delta is not None:
            if layout == "embedding":
                raise ValueError(f"module `{name}` is an embedding: PEFT has no LoRA bias for embeddings.")
            self.state_dict[f"{prefix}.lora_B.bias"] = bias_delta.detach().float().contiguous()
            self.bias_modules.append(name)
        elif layout != "embedding":
            if has_base_bias:
                self.state_dict[f"{prefix}.lora_B.bias"] = torch.zeros(b_shape[0])
            else:
                self.no_bias_modules.append(name)

    def add_full(self, name: str, tensors: Mapping[str, Tensor]) -> None:
        """Store module `name` as a `modules_to_save` entry with its full (already merged) tensors."""
        for key, value in tensors.items():
            self.state_dict[f"{PEFT_PREFIX}{key}"] = value.detach().contiguous().clone()
        self.modules_to_save.append(name)

    def finish(self, base_model_name_or_path: str | None = None, task_type: str | None = None) -> LoraFactorization:
        from peft import LoraConfig

        if self.bias_modules and self.no_bias_modules:
            raise ValueError(
                f"modules {self.bias_modules[:3]} need a LoRA bias but modules {self.no_bias_modules[:3]} have no base "
                'bias, and PEFT\'s `lora_bias` applies to every target module: use `output="merged"` instead.'
            )
        if not self.bias_modules:
            self.state_dict = {k: v for k, v in self.state_dict.items() if not k.endswith(".lora_B.bias")}
        ranks = sorted(self.ranks.values())
        r = max(set(ranks), key=ranks.count) if ranks else 8  # the most common rank; the others go in rank_pattern
        pattern = {re.escape(name): rank for name, rank in self.ranks.items() if rank != r}
        config = LoraConfig(
            r=r,
            lora_alpha=r,
            target_modules=sorted(self.ranks) or None,
            rank_pattern=pattern,
            alpha_pattern=dict(pattern),
            lora_dropout=0.0,
            bias="none",
            use_rslora=False,
            lora_bias=bool(self.bias_modules),
            fan_in_fan_out=any(layout == "conv1d_transposed" for layout in self.layouts.values()),
            modules_to_save=sorted(self.modules_to_save) or None,
            base_model_name_or_path=base_model_name_or_path,
            task_type=task_type,
        )
        if not self.ranks and not self.modules_to_save:
            raise ValueError("there is nothing to re-factor: every merged delta is zero or no delta was given.")
        overall = math.sqrt(self._residual_sq / self._norm_sq) if self._norm_sq > 0 else 0.0
        return LoraFactorization(config, self.state_dict, self.errors, overall, dict(self.ranks))


def _module_layouts(model: nn.Module | None) -> dict[str, nn.Module]:
    if model is None:
        return {}
    modules = {}
    for name, module in _base_model(model).named_modules():
        modules[name] = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        original = getattr(module, "original_module", None)
        if isinstance(original, nn.Module):
            modules[name] = original
    return modules


def _modules_to_save_names(model: nn.Module | None) -> set[str]:
    if model is None:
        return set()
    from peft.utils.other import ModulesToSaveWrapper

    return {n for n, m in _base_model(model).named_modules() if isinstance(m, ModulesToSaveWrapper)}


@torch.no_grad()
def deltas_to_lora(
    deltas: Mapping[str, Tensor],
    rank: int | Mapping[str, int] | None = None,
    *,
    model: nn.Module | None = None,
    scaling_coef: float = 1.0,
    modules_to_save: Sequence[str] | None = None,
    svd: str = "full",
    niter: int = 4,
    seed: int = 0,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> LoraFactorization:
    """Re-factor dense deltas `scaling_coef · ΔW` into a LoRA adapter by truncated SVD (fp32).

    Per module, `λ·ΔW = U S Vᵀ` truncated to `rank`; the factors are `B = U √S` and `A = √S Vᵀ`, laid out for the
    module type (transposed for `nn.Embedding` and GPT-2's `Conv1D`, `A` as a convolution and `B` as a 1×1
    convolution for conv layers). The config has `lora_alpha = r` (scaling 1), so `scaling · B @ A` is the best
    rank-r approximation of `λ · ΔW`: λ is folded into the factors. A `.bias` delta of a re-factored module becomes a
    LoRA bias (`lora_bias=True`). A delta of any other tensor (e.g. a classification head, a norm), or of a module
    listed in `modules_to_save`, is stored as a `modules_to_save` entry with its full weights `θ_0 + λ·ΔW`, which
    needs `model`.

    Args:
        deltas (`dict[str, torch.Tensor]`):
            Base state-dict name → ΔW (e.g. a merged task vector).
        rank (`int`, `dict[str, int]` or `None`, *optional*):
            Rank of every module, or module name → rank. `None` (or a module missing from the dict): the full rank
            `min(rows, cols)`, which reproduces `λ·ΔW` exactly. A rank above `min(rows, cols)` is an error naming the
            module.
        model (`torch.nn.Module`, *optional*):
            The base model (plain or PEFT-wrapped), to know each module's type and, for `modules_to_save`, θ_0.
            Without it, 2-D deltas are taken as `nn.Linear` and higher ones as convolutions.
        scaling_coef (`float`, *optional*, defaults to `1.0`):
            λ, folded into the factors.
        modules_to_save (`list[str]`, *optional*):
            Modules to store in full rather than as LoRA factors (the `modules_to_save` of a PEFT-wrapped `model` are
            always stored in full).
        svd (`str`, *optional*, defaults to `"full"`):
            `"full"`: `torch.linalg.svd` (exact truncation); `"randomized"`: `torch.svd_lowrank` (Halko et al.), much
            faster for large matrices at small rank.
        niter (`int`, *optional*, defaults to `4`):
            Power iterations of the randomized SVD.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the randomized SVD.
        base_model_name_or_path (`str`, *optional*):
            Written into the adapter config.
        task_type (`str`, *optional*):
            PEFT task type written into the adapter config (e.g. `"CAUSAL_LM"`).

    Returns:
        [`LoraFactorization`]: `(peft_config, state_dict, errors, overall_error)` (also `.ranks`, `.save_pretrained`).

    Example:

    ```python
    >>> import torch
    >>> from hf_magmax.peft import deltas_to_lora
    >>> delta = torch.randn(8, 2) @ torch.randn(2, 6)
    >>> config, state_dict, errors, overall = deltas_to_lora({"layer.weight": delta}, rank=2)
    >>> overall < 1e-5, config.r, config.lora_alpha
    (True, 2, 2)
    ```
    """
    _require_peft()
    refactorer = _Refactorer(rank, svd, niter, seed)
    modules = _module_layouts(model)
    base_tensors = base_parameters(model) if model is not None else {}
    full_modules = set(modules_to_save or ()) | _modules_to_save_names(model)
    by_module: dict[str, dict[str, Tensor]] = {}
    for key, delta in deltas.items():
        module_name, _, param = key.rpartition(".")
        by_module.setdefault(module_name, {})[param] = delta
    for name, tensors in by_module.items():
        module = modules.get(name)
        if module is not None:
            layout = _layout(module)
        else:
            layout = "linear" if tensors.get("weight", torch.empty(0)).dim() == 2 else "conv"
        extra = set(tensors) - {"weight", "bias"}
        factorable = (
            name not in full_modules and "weight" in tensors and not extra and layout != "other"
        ) and tensors["weight"].dim() >= 2
        if factorable:
            weight_delta = float(scaling_coef) * tensors["weight"].float()
            bias = tensors.get("bias")
            bias_delta = None if bias is None else float(scaling_coef) * bias.float()
            has_base_bias = module is not None and getattr(module, "bias", None) is not None
            if not torch.any(weight_delta) and bias_delta is None:
                logger.debug("module %s: merged ΔW is zero, not targeted", name)
                continue
            refactorer.add_lora(name, layout, weight_delta, bias_delta, has_base_bias)
            continue
        if module is None:
            raise ValueError(
                f"the deltas of module `{name}` ({sorted(tensors)}) cannot be LoRA factors and must be saved in full "
                "as `modules_to_save`, which needs θ_0: pass `model=` (the base model)."
            )
        full: dict[str, Tensor] = {}
        for p, original in [*module.named_parameters(), *module.named_buffers()]:
            base_value = base_tensors.get(f"{name}.{p}", original)
            if f"{p}" in tensors and original.is_floating_point():
                value = base_value.detach().float() + float(scaling_coef) * tensors[p].float()
                full[f"{name}.{p}"] = value.to(original.dtype)
            else:
                full[f"{name}.{p}"] = base_value.detach()
        refactorer.add_full(name, full)
    name_or_path = base_model_name_or_path
    if name_or_path is None and model is not None:
        name_or_path = getattr(_base_model(model), "name_or_path", None) or None
    return refactorer.finish(name_or_path, task_type)


# --------------------------------------------------------------------------------------------------------------------
# Merging adapters
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class LoraMergeResult:
    """What [`merge_adapters`] returns.

    Attributes:
        output (`str`):
            `"merged"` or `"adapter"`.
        model (`torch.nn.Module`):
            `output="merged"`: the base model with `θ_0 + λ·ΔW_sel` folded in and every adapter layer removed, a normal
            transformers model. `output="adapter"`: the `PeftModel` holding the merged adapter under `adapter_name`.
        adapter (`LoraFactorization`, *optional*):
            `output="adapter"`: the re-factored adapter (config, state dict, reconstruction errors).
        method (`str`), scaling_coef (`float`), method_kwargs (`dict`), adapters (`list[str]`), adapter_name (`str`),
        rank (`int` or `None`), base_model_name_or_path (`str` or `None`):
            How the merge was made (written into the model card by the CLI).
    """

    output: str
    model: nn.Module | None
    adapter: LoraFactorization | None
    method: str
    scaling_coef: float
    method_kwargs: dict[str, Any]
    adapters: list[str]
    adapter_name: str
    rank: int | dict[str, int] | None
    base_model_name_or_path: str | None = None

    @property
    def peft_config(self):
        return None if self.adapter is None else self.adapter.peft_config

    @property
    def errors(self) -> dict[str, float]:
        """Module name → relative reconstruction error of the re-factored adapter (empty for `output="merged"`)."""
        return {} if self.adapter is None else self.adapter.errors

    @property
    def overall_error(self) -> float | None:
        return None if self.adapter is None else self.adapter.overall_error

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Save the merged model (`save_pretrained` of transformers) or the adapter directory (PEFT's format)."""
        if self.output == "merged":
            self.model.save_pretrained(save_directory, **kwargs)
        else:
            self.adapter.save_pretrained(save_directory)

    def push_to_hub(
        self,
        repo_id: str,
        private: bool = False,
        token: str | bool | None = None,
        commit_message: str | None = None,
    ) -> str:
        """Upload the adapter (or merged model) with its model card and `magmax_config.yaml` to a Hub repo.

        Writes the output with [`save_lora_merge`] into a temporary directory and pushes it with
        [`hf_magmax.hub.push_to_hub`]. Returns the commit URL.
        """
        import tempfile

        from .hub import push_to_hub

        with tempfile.TemporaryDirectory() as tmp:
            folder = save_lora_merge(self, os.path.join(tmp, "output"))
            return push_to_hub(
                folder,
                repo_id,
                private=private,
                token=token,
                commit_message=commit_message or "Upload MagMax LoRA merge",
            )


def _load_base_model(name_or_path: str, dtype: str | torch.dtype = "auto") -> nn.Module:
    """Load a base model by its `config.architectures[0]` class (falls back to `AutoModel`)."""
    import transformers

    from .io import is_hub_id

    if not os.path.isdir(os.path.expanduser(str(name_or_path))) and not is_hub_id(str(name_or_path)):
        raise FileNotFoundError(f"base model {name_or_path!r} is neither a local directory nor a Hub repo id.")
    config = transformers.AutoConfig.from_pretrained(name_or_path)
    architectures = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    if model_class is None:
        model_class = transformers.AutoModel
    if isinstance(dtype, str) and dtype != "auto":
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"`dtype` must be 'auto' or a torch dtype name such as 'bfloat16', got {dtype!r}.")
        dtype = getattr(torch, dtype)
    logger.info("loading base model %s as %s", name_or_path, model_class.__name__)
    return model_class.from_pretrained(name_or_path, dtype=dtype)


def _is_peft_model(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def _resolve_adapter(source: str) -> str:
    """A local directory for an adapter given as a directory or a Hub repo id (downloaded once, into the HF cache)."""
    if os.path.isdir(source):
        return source
    if os.path.exists(source) or source.count("/") > 1 or source.startswith((".", "/", "~")):
        raise FileNotFoundError(
            f"adapter {source!r} is neither an adapter loaded on the model nor a PEFT adapter directory / Hub repo id."
        )
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(
            source, allow_patterns=["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"]
        )
    except Exception as err:
        raise FileNotFoundError(
            f"adapter {source!r} is neither an adapter loaded on the model, nor a local directory, nor a Hub repo id "
            f"that could be downloaded ({type(err).__name__}: {' '.join(str(err).split())[:300]})."
        ) from err


def _check_adapter_source(source: str, model: nn.Module, local: str) -> Any:
    """Load an adapter's config and weights and check they are LoRA and fit the base model. Returns the config."""
    from peft import PeftConfig
    from peft.utils import load_peft_weights

    try:
        config = PeftConfig.from_pretrained(local)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"adapter {source!r} is neither an adapter loaded on the model nor a PEFT adapter directory / Hub repo id "
            f"with an adapter_config.json ({err})."
        ) from err
    peft_type = getattr(config.peft_type, "value", config.peft_type)
    if str(peft_type).upper() != "LORA":
        raise ValueError(
            f"adapter {source!r} is a {peft_type} adapter: only LoRA adapters (peft `LoraConfig`, DoRA included) can "
            "be merged on their weight deltas."
        )
    base = _base_model(model)
    expected = getattr(base, "name_or_path", None)
    if config.base_model_name_or_path and expected and config.base_model_name_or_path != expected:
        logger.warning(
            "adapter %s was made for %s, the base model is %s", source, config.base_model_name_or_path, expected
        )
    weights = load_peft_weights(local, device="cpu")
    modules = _module_layouts(model)
    params = base_parameters(model)
    hint = f"adapter {source!r} was made for another base model (its config names {config.base_model_name_or_path!r})"
    for key, tensor in weights.items():
        name = key.removeprefix(PEFT_PREFIX)
        match = re.match(r"(.*)\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)$", name)
        if match is None:
            if ".lora_" in name:
                continue
            base_name = _base_name(name)
            if base_name in params and params[base_name].shape != tensor.shape:
                raise ValueError(
                    f"{hint}: its tensor for `{base_name}` has shape {tuple(tensor.shape)}, the base model's "
                    f"{tuple(params[base_name].shape)}."
                )
            continue
        module_name, part = match.groups()
        module = modules.get(module_name)
        if module is None:
            raise ValueError(f"{hint}: it has LoRA weights for module `{module_name}`, which the base model lacks.")
        weight = getattr(module, "weight", None)
        if not isinstance(weight, Tensor):
            continue
        layout = _layout(module)
        if layout in ("linear", "conv"):
            out_dim, in_dim = weight.shape[0], weight.shape[1] * getattr(module, "groups", 1)
        else:  # embedding (V, D) and Conv1D (in, out): B @ A is the transpose
            in_dim, out_dim = weight.shape[0], weight.shape[1]
        if part in ("lora_A.weight", "lora_embedding_A"):
            got, want, side = tensor.shape[1], in_dim, "input"
        else:
            got, want, side = tensor.shape[0], out_dim, "output"
        if got != want:
            raise ValueError(
                f"{hint}: module `{module_name}` has {want} {side} features in the base model but {got} in the "
                f"adapter's `{part}` (shape {tuple(tensor.shape)})."
            )
    return config


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


def _zeros_shapes(info: _ModuleInfo, adapter_names: Sequence[str]) -> dict[str, torch.Size]:
    if info.kind == "modules_to_save":
        original = info.module.original_module
        tensors = dict([*original.named_parameters(), *original.named_buffers()])
        return {key: tensors[key.removeprefix(f"{info.name}.")].shape for key in info.keys}
    shapes = {f"{info.name}.weight": info.module.get_base_layer().weight.shape}
    for a in adapter_names:
        if info.module.lora_bias.get(a, False):
            shapes[f"{info.name}.bias"] = info.module.lora_B[a].bias.shape
    return shapes


def _default_rank(info: _ModuleInfo, adapter_names: Sequence[str]) -> int:
    """Sum of the input adapters' ranks on a module, capped by the size of its ΔW."""
    total = sum(int(info.module.r[a]) for a in adapter_names if a in info.module.r)
    weight = info.module.get_base_layer().weight
    return min(total, min(_to_lora_matrix(weight.detach(), _layout(info.module.get_base_layer())).shape))


@torch.no_grad()
def merge_adapters(
    model_or_base: nn.Module | str,
    adapters: Sequence[str | os.PathLike],
    method: str = "magmax",
    scaling_coef: float | None = None,
    output: str = "adapter",
    rank: int | Mapping[str, int] | None = None,
    adapter_name: str = "magmax",
    density: float | None = None,
    seed: int = 0,
    svd: str = "full",
    niter: int = 4,
) -> LoraMergeResult:
    """Merge LoRA adapters on their true weight deltas ΔW, module by module, with the merge engine.

    For every module any adapter changes, each adapter's ΔW (see [`lora_delta_state_dict`]; a module an adapter does
    not touch has ΔW = 0) is folded into an online accumulator of [`hf_magmax.merging`] (`magmax` selects, per element
    of ΔW, the value of largest magnitude; ties go to the later adapter), then the merged `ΔW_sel` is scaled by λ and

    - `output="merged"`: added to the base weights, `θ_0 + λ · ΔW_sel`; the adapter layers are removed and
      `result.model` is a normal transformers model (`save_pretrained`, `push_to_hub`). The base model is changed in
      place, as `merge_and_unload()` does.
    - `output="adapter"`: re-factored by truncated SVD into a LoRA adapter (see [`deltas_to_lora`]: `lora_alpha = r`,
      `B = U√S`, `A = √S Vᵀ`, λ folded in), with the relative reconstruction error per module and overall.
      `result.model` is the `PeftModel` holding it under `adapter_name` (a base model passed in is wrapped in place,
      as `get_peft_model` does; a `PeftModel` passed in gets the new adapter, not activated, and keeps its own);
      `result.save_pretrained(dir)` writes an ordinary adapter directory.

    Only one module's deltas are dense at a time; the base model is loaded once and the adapters (small) are loaded
    onto it. Adapters may differ in rank, alpha, rsLoRA, target modules, `modules_to_save`, DoRA and LoRA bias.

    **Rank of the output adapter** (`rank=None`): per module, the sum of the input adapters' ranks on that module
    (capped by the size of ΔW). That reproduces `task_arithmetic` and `average` merges exactly (the sum of rank-r_i
    matrices has rank ≤ Σ r_i); MagMax, TIES and random mixing select per element, which raises the rank, so their
    re-factored adapter is an approximation whose error the result reports and which falls as `rank` grows.

    Args:
        model_or_base (`PeftModel`, `PreTrainedModel` or `str`):
            A `PeftModel` holding the adapters, or the base model (or its name/path, loaded by its architecture class).
        adapters (`list[str]`):
            In task order: adapter names loaded on `model_or_base`, local adapter directories, or Hub repo ids.
        method (`str`, *optional*, defaults to `"magmax"`):
            `magmax`, `average`, `task_arithmetic`, `ties` or `random_mix`.
        scaling_coef (`float`, *optional*):
            λ. Defaults to the method's default ([`hf_magmax.DEFAULT_SCALING_COEFS`]; 0.5 for MagMax).
        output (`str`, *optional*, defaults to `"adapter"`):
            `"adapter"` or `"merged"`.
        rank (`int` or `dict[str, int]`, *optional*):
            Rank of the output adapter (see above), for every module or per module name (modules not in the dict get
            the default). An error names the module if the rank exceeds what its ΔW allows.
        adapter_name (`str`, *optional*, defaults to `"magmax"`):
            Name of the merged adapter on the returned `PeftModel`.
        density (`float`, *optional*):
            TIES: fraction of each ΔW kept (engine default 0.2).
        seed (`int`, *optional*, defaults to `0`):
            Seed of `random_mix` (per tensor: `seed + position`, as [`hf_magmax.StateDictMerger`]) and of the
            randomized SVD.
        svd (`str`, *optional*, defaults to `"full"`):
            `"full"` or `"randomized"` (`torch.svd_lowrank`, for large matrices).
        niter (`int`, *optional*, defaults to `4`):
            Power iterations of the randomized SVD.

    Returns:
        [`LoraMergeResult`].

    Example:

    ```python
    >>> from hf_magmax.peft import merge_adapters
    >>> result = merge_adapters("path/to/base", ["path/to/adapter_task1", "path/to/adapter_task2"],
    ...                         method="magmax", output="adapter", rank=16)  # doctest: +SKIP
    >>> result.overall_error, result.save_pretrained("magmax-adapter")  # doctest: +SKIP
    ```
    """
    _require_peft()
    from peft import PeftModel

    method = check_merge_method(method)
    if output not in ("adapter", "merged"):
        raise ValueError(f'`output` must be "adapter" or "merged", got {output!r}.')
    if isinstance(adapters, str | os.PathLike) or len(adapters) == 0:
        raise ValueError("`adapters` must be a non-empty list of adapter names, directories or Hub repo ids.")
    method_kwargs: dict[str, Any] = {}
    if density is not None:
        if method != "ties":
            raise ValueError(f'`density` only applies to `method="ties"`, not {method!r}.')
        method_kwargs["density"] = check_density(density)
    if method == "random_mix":
        method_kwargs["seed"] = int(seed)
    coef = default_scaling_coef(method) if scaling_coef is None else float(scaling_coef)
    if svd not in _SVD_METHODS:
        raise ValueError(f"`svd` must be one of {', '.join(_SVD_METHODS)}, got {svd!r}.")

    model = _load_base_model(model_or_base) if isinstance(model_or_base, str | os.PathLike) else model_or_base
    user_peft_model = _is_peft_model(model)
    check_not_quantized(model)
    base_name_or_path = getattr(_base_model(model), "name_or_path", None) or None
    sources = [os.fspath(a) for a in adapters]
    if len(set(sources)) != len(sources):
        raise ValueError(f"`adapters` lists the same adapter more than once: {sources}.")
    if adapter_name in _peft_configs(model):
        raise ValueError(f"the model already has an adapter named {adapter_name!r}: pass another `adapter_name`.")
    loaded = set(_peft_configs(model))
    names: list[str] = []
    loaded_here: list[str] = []
    try:
        for i, adapter in enumerate(sources):
            if adapter in loaded:
                names.append(adapter)
                continue
            local = _resolve_adapter(adapter)
            _check_adapter_source(adapter, model, local)
            name = f"_magmax_input_{i}"
            if _is_peft_model(model):
                model.load_adapter(local, adapter_name=name)
            else:
                model = PeftModel.from_pretrained(model, local, adapter_name=name)
            loaded_here.append(name)
            names.append(name)
        for name in names:
            _check_lora_type(model, name)
        return _merge_loaded(
            model, names, loaded_here, user_peft_model, method, coef, method_kwargs, output, rank, adapter_name, seed,
            svd, niter, sources, base_name_or_path,
        )  # fmt: skip
    except BaseException:
        # leave the caller's model as it was given: drop the adapters loaded here, unwrap a base model
        if user_peft_model:
            for name in loaded_here:
                if name in _peft_configs(model):
                    model.delete_adapter(name)
        elif loaded_here:
            _strip_adapters(model)
        raise


@torch.no_grad()
def _merge_loaded(
    model, names, loaded_here, user_peft_model, method, coef, method_kwargs, output, rank, adapter_name, seed, svd,
    niter, adapter_sources, base_name_or_path,
) -> LoraMergeResult:  # fmt: skip
    """The merge proper, on a model with every adapter loaded (see [`merge_adapters`])."""
    from peft import get_peft_model
    from peft.utils import set_peft_model_state_dict
    from tqdm.auto import tqdm

    task_types = {getattr(_peft_configs(model)[n], "task_type", None) for n in names}
    task_type = task_types.pop() if len(task_types) == 1 else None
    infos = list(_iter_adapted_modules(model, names))
    base_params = base_parameters(model)
    # validate everything before any weight changes
    for info in infos:
        if info.kind == "lora":
            for name in names:
                _check_lora_module(info.name, info.module, name)
            if output == "merged" and f"{info.name}.bias" in info.keys and f"{info.name}.bias" not in base_params:
                raise ValueError(
                    f"module `{info.name}` has a LoRA bias but no base bias, so it cannot be merged into the weights."
                )
    ranks = dict(rank) if isinstance(rank, Mapping) else ({} if rank is None else rank)
    refactorer = _Refactorer(ranks, svd, niter, seed) if output == "adapter" else None

    for info in tqdm(infos, desc=f"merging {len(names)} adapters ({method})", disable=len(infos) < 8 or None):
        shapes = _zeros_shapes(info, names)
        spec = MergeSpec(method, coef, **method_kwargs)
        accumulators = {key: spec.accumulator(key) for key in info.keys}  # random_mix: seeded by the tensor's name
        for name in names:
            deltas = _module_delta(info, name)
            for key, accumulator in accumulators.items():
                delta = deltas.get(key)
                accumulator.update(delta if delta is not None else torch.zeros(shapes[key]))
            del deltas
        merged = {key: accumulator.result() for key, accumulator in accumulators.items()}
        del accumulators
        if output == "merged":
            fold_deltas_into_base(model, merged, coef)
        elif info.kind == "lora":
            weight_delta = coef * merged[f"{info.name}.weight"]
            bias = merged.get(f"{info.name}.bias")
            if not torch.any(weight_delta) and bias is None:
                continue
            if isinstance(refactorer.rank, dict) and info.name not in refactorer.rank:
                refactorer.rank[info.name] = _default_rank(info, names)
            base_layer = info.module.get_base_layer()
            refactorer.add_lora(
                info.name,
                _layout(base_layer),
                weight_delta,
                None if bias is None else coef * bias,
                getattr(base_layer, "bias", None) is not None,
            )
        else:
            full = {}
            for key, delta in merged.items():
                base_value = base_params[key]
                full[key] = (base_value.detach().float() + coef * delta.float()).to(base_value.dtype)
            for p, t in [
                *info.module.original_module.named_parameters(),
                *info.module.original_module.named_buffers(),
            ]:
                full.setdefault(f"{info.name}.{p}", t.detach())
            refactorer.add_full(info.name, full)

    result = LoraMergeResult(
        output=output,
        model=None,
        adapter=None,
        method=method,
        scaling_coef=coef,
        method_kwargs=method_kwargs,
        adapters=adapter_sources,
        adapter_name=adapter_name,
        rank=rank if rank is None or isinstance(rank, int) else dict(rank),
        base_model_name_or_path=base_name_or_path,
    )
    if output == "merged":
        result.model = _strip_adapters(model)
        return result

    result.adapter = refactorer.finish(base_name_or_path, task_type)
    if user_peft_model:
        for name in loaded_here:
            model.delete_adapter(name)
        model.add_adapter(adapter_name, result.adapter.peft_config)
    else:
        base = _strip_adapters(model)
        model = get_peft_model(base, result.adapter.peft_config, adapter_name=adapter_name)
    set_peft_model_state_dict(model, result.adapter.state_dict, adapter_name=adapter_name)
    result.model = model
    logger.info(
        "merged %d adapters (%s, λ=%s) into adapter %r: overall relative reconstruction error %.3g",
        len(names),
        method,
        coef,
        adapter_name,
        result.adapter.overall_error,
    )
    return result


def add_magmax_adapter(
    peft_model: nn.Module,
    adapters: Sequence[str | os.PathLike],
    adapter_name: str = "magmax",
    method: str = "magmax",
    scaling_coef: float | None = None,
    rank: int | None = None,
    **kwargs,
) -> LoraMergeResult:
    """Add the merge of `adapters` to `peft_model` as a new LoRA adapter, like PEFT's `add_weighted_adapter`.

    Unlike `add_weighted_adapter`, the adapters are merged on their dense deltas ΔW (per element, through the merge
    engine) and the merge is re-factored by truncated SVD; see [`merge_adapters`] (`output="adapter"`). The new adapter
    is not made active: call `peft_model.set_adapter(adapter_name)`.

    Args:
        peft_model (`PeftModel`):
            The model; `adapters` are names loaded on it, local directories or Hub repo ids.
        adapters (`list[str]`):
            The adapters, in task order.
        adapter_name (`str`, *optional*, defaults to `"magmax"`):
            Name of the new adapter.
        method (`str`, *optional*, defaults to `"magmax"`), scaling_coef (`float`, *optional*), rank (`int`, *optional*),
        **kwargs:
            As in [`merge_adapters`] (`density`, `seed`, `svd`, `niter`).

    Returns:
        [`LoraMergeResult`] with the reconstruction errors.

    Example:

    ```python
    >>> add_magmax_adapter(peft_model, ["task_1", "task_2"], adapter_name="magmax", rank=16)  # doctest: +SKIP
    >>> peft_model.set_adapter("magmax")  # doctest: +SKIP
    ```
    """
    _require_peft()
    if not _is_peft_model(peft_model):
        raise TypeError(
            f"`peft_model` must be a peft `PeftModel`, got {type(peft_model).__name__}; for a base model use "
            '`merge_adapters(base_model, adapters, output="adapter")`.'
        )
    return merge_adapters(
        peft_model,
        adapters,
        method=method,
        scaling_coef=scaling_coef,
        output="adapter",
        rank=rank,
        adapter_name=adapter_name,
        **kwargs,
    )


# --------------------------------------------------------------------------------------------------------------------
# Writing the result: atomic output directory with a model card
# --------------------------------------------------------------------------------------------------------------------

#: The merge configuration written next to the output (and, as YAML, into its model card).
LORA_MERGE_CONFIG_NAME = "magmax_config.yaml"

_BASE_FILES_SKIPPED = ("config.json", "generation_config.json", "README.md", LORA_MERGE_CONFIG_NAME)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")


def lora_merge_config(result: LoraMergeResult, base: str | None = None) -> dict[str, Any]:
    """The configuration of a LoRA merge as a plain dict (what `hf-magmax merge-lora` needs to re-run it)."""
    config: dict[str, Any] = {
        "base": base or result.base_model_name_or_path,
        "adapters": list(result.adapters),
        "method": result.method,
        "scaling_coef": result.scaling_coef,
        "output": result.output,
    }
    config.update(result.method_kwargs)
    if result.output == "adapter":
        config["rank"] = result.rank
        config["adapter_name"] = result.adapter_name
    return config


def _model_card(result: LoraMergeResult, config: dict[str, Any]) -> tuple[dict[str, Any], str]:
    import yaml

    from .hub import MAGMAX_CITATION

    base = config.get("base")
    model_class = "AutoModel" if result.model is None else type(_base_model(result.model)).__name__
    metadata: dict[str, Any] = {
        "library_name": "peft" if result.output == "adapter" else "transformers",
        "tags": ["merge", "magmax", "hf_magmax", "lora"] + ([result.method] if result.method != "magmax" else []),
    }
    if base and not os.path.isdir(str(base)):  # a Hub id: the Hub links the card to its base model
        metadata["base_model"] = str(base)
        metadata["base_model_relation"] = "adapter" if result.output == "adapter" else "merge"
    adapters = "\n".join(f"| {i + 1} | `{a}` |" for i, a in enumerate(result.adapters))
    if result.output == "adapter":
        ranks = sorted(set(result.adapter.ranks.values()))
        worst = sorted(result.errors.items(), key=lambda kv: -kv[1])[:10]
        rows = "\n".join(f"| `{m}` | {result.adapter.ranks[m]} | {e:.3g} |" for m, e in worst)
        what = (
            f"A LoRA adapter for `{base}`: the merge `λ·ΔW_sel` of the adapters below, computed on their dense weight "
            "deltas ΔW = scaling·B@A (per element, with the merge engine of hf_magmax) and re-factored by truncated "
            f"SVD into rank {ranks[0] if len(ranks) == 1 else f'{ranks[0]}–{ranks[-1]}'} "
            "(`lora_alpha = r`, λ folded into the factors)."
        )
        usage = (
            f"```python\nfrom peft import PeftModel\nfrom transformers import {model_class}\n\n"
            f'base = {model_class}.from_pretrained("{base}")\n'
            'model = PeftModel.from_pretrained(base, "<this repo or directory>")\n```'
        )
        errors = (
            f"\n\n## Reconstruction error\n\nOverall relative error ‖λΔW_sel − BA‖_F / ‖λΔW_sel‖_F: "
            f"**{result.overall_error:.4g}** over {len(result.errors)} module(s) "
            f"({len(result.adapter.peft_config.modules_to_save or [])} module(s) saved in full as `modules_to_save`)."
            f"\n\n| module (largest errors first) | rank | relative error |\n|---|---|---|\n{rows}"
        )
    else:
        what = (
            f"`{base}` with the merge of the LoRA adapters below folded into its weights, θ_0 + λ·ΔW_sel, where ΔW_sel "
            "merges the adapters' dense weight deltas ΔW = scaling·B@A per element (merge engine of hf_magmax). A "
            "normal transformers model: no PEFT needed to load it."
        )
        usage = (
            f"```python\nfrom transformers import {model_class}\n\n"
            f'model = {model_class}.from_pretrained("<this repo or directory>")\n```'
        )
        errors = ""
    body = f"""# MagMax LoRA merge

{what}

- **method:** `{result.method}`{" (MagMax: per element, the value of largest magnitude; ties go to the later adapter)" if result.method == "magmax" else ""}
- **scaling coefficient λ:** {result.scaling_coef}
- **output:** {result.output}{f" (rank: {result.rank if result.rank is not None else 'per module, the sum of the input ranks'})" if result.output == "adapter" else ""}

| task | adapter |
|---|---|
{adapters}{errors}

## Usage

{usage}

## Merge configuration

Re-run with `hf-magmax merge-lora` and these values (also in `{LORA_MERGE_CONFIG_NAME}`):

```yaml
{yaml.safe_dump(config, sort_keys=False).strip()}
```

## Citation

```bibtex
{MAGMAX_CITATION.strip()}
```
"""
    return metadata, body


def _check_output_dir(output_dir: str | os.PathLike, overwrite: bool) -> None:
    """Fail early if `output_dir` is a file, or a non-empty directory without `overwrite`."""
    from pathlib import Path

    from .io import check_output_dir

    check_output_dir(Path(output_dir).absolute(), overwrite)


def save_lora_merge(
    result: LoraMergeResult,
    output_dir: str | os.PathLike,
    overwrite: bool = False,
    base: str | os.PathLike | None = None,
) -> str:
    """Write a LoRA merge atomically: the adapter (or merged model), a model card and `magmax_config.yaml`.

    Everything is written into a temporary directory beside `output_dir` and renamed into place at the end: after an
    error nothing is left at `output_dir`. A merged model also gets the base directory's tokenizer and other non-weight
    files (when `base` is a local directory).

    Args:
        result ([`LoraMergeResult`]):
            What [`merge_adapters`] returned.
        output_dir (`str` or `os.PathLike`):
            The output directory; must be empty or absent unless `overwrite`.
        overwrite (`bool`, *optional*, defaults to `False`):
            Replace a non-empty `output_dir` (the old one is removed only once the new one is in place).
        base (`str` or `os.PathLike`, *optional*):
            The base model as the user named it (for the card and the config); defaults to its `name_or_path`.

    Returns:
        `str`: the output directory.
    """
    import shutil
    from pathlib import Path

    import yaml

    from .hub import write_model_card
    from .io import check_output_dir, staged_output_dir

    output = Path(output_dir).absolute()
    check_output_dir(output, overwrite)
    config = lora_merge_config(result, None if base is None else os.fspath(base))
    with staged_output_dir(output, overwrite) as staging:
        result.save_pretrained(staging)
        base_dir = Path(config["base"]) if config.get("base") else None
        if result.output == "merged" and base_dir is not None and base_dir.is_dir():
            for source in sorted(base_dir.iterdir()):
                if source.is_file() and not source.name.startswith(".") and not source.name.endswith(_WEIGHT_SUFFIXES):
                    if source.name not in _BASE_FILES_SKIPPED and not (staging / source.name).exists():
                        shutil.copy2(source, staging / source.name)
        (staging / LORA_MERGE_CONFIG_NAME).write_text(yaml.safe_dump(config, sort_keys=False))
        metadata, body = _model_card(result, config)
        write_model_card(staging, metadata, body)
    logger.info("LoRA merge (%s, %s) written to %s", result.method, result.output, output)
    return str(output)
