# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""The SVD re-factor: dense deltas λ·ΔW → LoRA factors (B = U√S, A = √S Vᵀ), with the reconstruction errors.

peft is imported inside the functions.
"""

from __future__ import annotations

import logging
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..merging import apply_merged
from .deltas import PEFT_PREFIX, _base_model, _require_peft, base_parameters


logger = logging.getLogger(__name__)

__all__ = ["LoraFactorization", "deltas_to_lora"]

#: The SVDs of the re-factor: `torch.linalg.svd` (exact truncation) or `torch.svd_lowrank` (randomized).
SVD_METHODS = ("full", "randomized")

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
        if svd not in SVD_METHODS:
            raise ValueError(f"`svd` must be one of {', '.join(SVD_METHODS)}, got {svd!r}.")
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
        if not bool(torch.isfinite(matrix).all()):
            kind = "NaN" if bool(torch.isnan(matrix).any()) else "Inf"
            raise ValueError(
                f"the merged λ·ΔW of module `{name}` holds {kind} values, which cannot be re-factored: lower "
                "`scaling_coef` (λ), or check the adapters for NaN/Inf."
            )
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
                'bias, and PEFT\'s `lora_bias` applies to every target module: use `lora_output="merged"` instead.'
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
    svd_seed: int = 0,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    seed: int | None = None,
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
        svd_seed (`int`, *optional*, defaults to `0`):
            Seed of the randomized SVD (`seed=` is a deprecated alias).
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
    if seed is not None:
        warnings.warn(
            "`seed` of `deltas_to_lora` is deprecated: it is the seed of the randomized SVD, pass `svd_seed=`.",
            FutureWarning,
            stacklevel=2,
        )
        svd_seed = seed
    refactorer = _Refactorer(rank, svd, niter, svd_seed)
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
                full[f"{name}.{p}"] = apply_merged(
                    base_value.detach(), tensors[p], float(scaling_coef), original.dtype
                )
            else:
                full[f"{name}.{p}"] = base_value.detach()
        refactorer.add_full(name, full)
    name_or_path = base_model_name_or_path
    if name_or_path is None and model is not None:
        name_or_path = getattr(_base_model(model), "name_or_path", None) or None
    return refactorer.finish(name_or_path, task_type)
