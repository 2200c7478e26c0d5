# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""Merging LoRA adapters on their true ΔW: [`merge_adapters`] and [`add_magmax_adapter`].

The merge asks the one core of [`hf_magmax.merging`] for everything: a [`MergeSpec`] validates λ and the method's
options (`density` only for ties, `seed` only for random_mix), `spec.accumulator(name)` folds each tensor's ΔWs
(random_mix seeded by the tensor's name), and [`apply_merged`] forms θ_0 + λ·ΔW_sel (through
[`fold_deltas_into_base`]): a LoRA merge equals the dense engine on the same ΔWs bit for bit.

peft is imported inside the functions.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..io import FoldedStates, warn_if_degenerate
from ..merging import MergeSpec, apply_merged
from .deltas import (
    _base_model,
    _check_lora_module,
    _check_lora_type,
    _iter_adapted_modules,
    _module_delta,
    _ModuleInfo,
    _peft_configs,
    _require_peft,
    _strip_adapters,
    base_parameters,
    check_finite_output,
    check_not_quantized,
    fold_deltas_into_base,
)
from .loading import (
    _load_base_model,
    _resolve_adapter,
    check_adapter_source,
    check_device,
    check_finite_tensors,
    load_adapter_onto,
)
from .refactor import SVD_METHODS, LoraFactorization, _layout, _Refactorer, _to_lora_matrix


logger = logging.getLogger(__name__)

__all__ = ["LoraMergeResult", "add_magmax_adapter", "merge_adapters"]

#: What a LoRA merge writes (as `MergeConfig.lora_output` and `--lora-output`): a full model, or a LoRA adapter.
LORA_OUTPUTS = ("merged", "adapter")
#: Output dtypes of the merged floating tensors (as `MergeConfig.dtype` and `--dtype`).
OUTPUT_DTYPES = ("float32", "float16", "bfloat16")


# --------------------------------------------------------------------------------------------------------------------
# The result
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class LoraMergeResult:
    """What [`merge_adapters`] returns.

    Attributes:
        lora_output (`str`):
            `"merged"` or `"adapter"` (`.output` is a deprecated alias).
        model (`torch.nn.Module`):
            `"merged"`: the base model with `θ_0 + λ·ΔW_sel` folded in and every adapter layer removed, a normal
            transformers model. `"adapter"`: the `PeftModel` holding the merged adapter under `adapter_name`.
        adapter (`LoraFactorization`, *optional*):
            `"adapter"`: the re-factored adapter (config, state dict, reconstruction errors).
        spec ([`MergeSpec`]):
            The merge (method, λ as given, options).
        method (`str`), scaling_coef (`float`, the λ used), method_kwargs (`dict`), adapters (`list[str]`),
        adapter_name (`str`), rank (`int` or `None`), base_model_name_or_path (`str` or `None`), svd (`str`),
        svd_seed (`int`), dtype (`str` or `None`), allow_non_finite (`bool`):
            How the merge was made (written into `magmax_config.yaml` and the model card).
        winners (`dict[str, torch.Tensor]`, *optional*):
            With `save_provenance=True`: per merged tensor (`"<module>.weight"`, ...), the 0-based index of the adapter
            whose ΔW element the merge kept (`uint8`, `int16` beyond 256 adapters; ties go to the later adapter).
            [`save_lora_merge`] writes it as `magmax_provenance.safetensors` and the shares into the card and
            `magmax_provenance.json`; see [`~hf_magmax.merging.winner_shares`].
    """

    lora_output: str
    model: nn.Module | None
    adapter: LoraFactorization | None
    method: str
    scaling_coef: float
    method_kwargs: dict[str, Any]
    adapters: list[str]
    adapter_name: str
    rank: int | dict[str, int] | None
    base_model_name_or_path: str | None = None
    spec: MergeSpec | None = None
    svd: str = "full"
    svd_seed: int = 0
    dtype: str | None = None
    allow_non_finite: bool = False
    winners: dict[str, torch.Tensor] | None = None

    @property
    def save_provenance(self) -> bool:
        """Whether the merge recorded its winner maps (`winners`)."""
        return self.winners is not None

    def winner_shares(self) -> dict[str, list[float]]:
        """Per merged tensor (and overall, key `"*"`), the fraction of ΔW elements each adapter won."""
        from ..merging import winner_shares

        if self.winners is None:
            raise ValueError("the merge recorded no winners: run `merge_adapters(..., save_provenance=True)`.")
        return winner_shares(self.winners, len(self.adapters))

    @property
    def output(self) -> str:
        """Deprecated alias of `lora_output`."""
        return self.lora_output

    @property
    def peft_config(self):
        return None if self.adapter is None else self.adapter.peft_config

    @property
    def errors(self) -> dict[str, float]:
        """Module name → relative reconstruction error of the re-factored adapter (empty for `"merged"`)."""
        return {} if self.adapter is None else self.adapter.errors

    @property
    def overall_error(self) -> float | None:
        return None if self.adapter is None else self.adapter.overall_error

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Save the merged model (`save_pretrained` of transformers) or the adapter directory (PEFT's format)."""
        if self.lora_output == "merged":
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

        from ..hub import push_to_hub
        from .save import save_lora_merge

        with tempfile.TemporaryDirectory() as tmp:
            folder = save_lora_merge(self, os.path.join(tmp, "output"))
            return push_to_hub(
                folder,
                repo_id,
                private=private,
                token=token,
                commit_message=commit_message or "Upload MagMax LoRA merge",
            )


# --------------------------------------------------------------------------------------------------------------------
# Validation of the request (before anything is loaded)
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _LoraMergeRequest:
    """A validated LoRA merge request: what to merge into what, and how."""

    spec: MergeSpec
    lora_output: str
    rank: int | Mapping[str, int] | None
    adapter_name: str
    svd: str
    niter: int
    svd_seed: int
    dtype: torch.dtype | None
    allow_non_finite: bool
    show_progress: bool
    save_provenance: bool = False

    @property
    def coef(self) -> float:
        return self.spec.coef

    @property
    def dtype_name(self) -> str | None:
        return None if self.dtype is None else str(self.dtype).removeprefix("torch.")


def _lora_spec(method: str | MergeSpec, scaling_coef: Any, density: Any, seed: Any, alpha: Any = None) -> MergeSpec:
    if isinstance(method, MergeSpec):
        if density is not None or seed is not None or alpha is not None:
            raise TypeError("pass `density` / `seed` / `alpha` on the `MergeSpec`, not beside it.")
        spec = method if scaling_coef is None else method.with_scaling_coef(scaling_coef)
    else:
        spec = MergeSpec(method, scaling_coef, density=density, seed=seed, alpha=alpha)
    if spec.is_auto:
        raise ValueError(
            '`scaling_coef="auto"` is not supported by the LoRA merger (it has no validation data): pass a number, '
            "or leave it unset for the method's default."
        )
    return spec


def _check_request(
    method, scaling_coef, lora_output, rank, adapter_name, density, seed, svd, niter, svd_seed, dtype,
    allow_non_finite, show_progress, save_provenance=False, alpha=None,
) -> _LoraMergeRequest:  # fmt: skip
    spec = _lora_spec(method, scaling_coef, density, seed, alpha)
    if not isinstance(save_provenance, bool):
        raise ValueError(f"`save_provenance` must be True or False, got {save_provenance!r}.")
    if save_provenance and not spec.merge_class.can_track_winners:
        raise ValueError(
            f"`save_provenance` needs a method that keeps one adapter's value per element (magmax, random_mix), not "
            f"`{spec.method}`: drop `save_provenance` or change the method."
        )
    if lora_output is None:
        lora_output = "adapter" if rank is not None else "merged"
    if lora_output not in LORA_OUTPUTS:
        raise ValueError(f'`lora_output` must be "merged" or "adapter", got {lora_output!r}.')
    if rank is not None and lora_output != "adapter":
        raise ValueError('`rank` only applies to `lora_output="adapter"` (a re-factored adapter): leave it unset.')
    if svd not in SVD_METHODS:
        raise ValueError(f"`svd` must be one of {', '.join(SVD_METHODS)}, got {svd!r}.")
    for name, value in (("svd_seed", svd_seed), ("niter", niter)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"`{name}` must be a non-negative integer, got {value!r}.")
    if isinstance(dtype, str):
        if dtype not in OUTPUT_DTYPES:
            raise ValueError(f"`dtype` must be one of {', '.join(OUTPUT_DTYPES)} (or unset), got {dtype!r}.")
        dtype = getattr(torch, dtype)
    elif dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(
            f"`dtype` must be a floating torch dtype or one of {', '.join(OUTPUT_DTYPES)}, got {dtype!r}."
        )
    if not isinstance(allow_non_finite, bool):
        raise ValueError(f"`allow_non_finite` must be True or False, got {allow_non_finite!r}.")
    return _LoraMergeRequest(
        spec, lora_output, rank, adapter_name, svd, niter, svd_seed, dtype, allow_non_finite, bool(show_progress),
        save_provenance,
    )  # fmt: skip


def _check_sources(adapters: Sequence[str | os.PathLike]) -> list[str]:
    if isinstance(adapters, str | os.PathLike) or len(adapters) == 0:
        raise ValueError("`adapters` must be a non-empty list of adapter names, directories or Hub repo ids.")
    sources = [os.fspath(a) for a in adapters]
    warn_if_degenerate(sources, "adapters")  # one named twice merges, with `hf-magmax merge`'s warning
    return sources


def _is_peft_model(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


# --------------------------------------------------------------------------------------------------------------------
# merge_adapters
# --------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def merge_adapters(
    model_or_base: nn.Module | str,
    adapters: Sequence[str | os.PathLike],
    method: str | MergeSpec = "magmax",
    scaling_coef: float | None = None,
    lora_output: str | None = None,
    rank: int | Mapping[str, int] | None = None,
    adapter_name: str = "magmax",
    density: float | None = None,
    seed: int | None = None,
    svd: str = "full",
    niter: int = 4,
    svd_seed: int = 0,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    allow_non_finite: bool = False,
    show_progress: bool = True,
    save_provenance: bool = False,
    output: str | None = None,
    alpha: float | None = None,
) -> LoraMergeResult:
    """Merge LoRA adapters on their true weight deltas ΔW, module by module, with the merge engine.

    For every module any adapter changes, each adapter's ΔW (see [`lora_delta_state_dict`]; a module an adapter does
    not touch has ΔW = 0) is folded into the accumulator `spec.accumulator(name)` of [`hf_magmax.merging`] (`magmax`
    selects, per element of ΔW, the value of largest magnitude; ties go to the later adapter), then

    - `lora_output="merged"` (the default): `θ_0 + λ · ΔW_sel` is folded into the base weights with
      [`hf_magmax.merging.apply_merged`] (the rounding rule of every merge: bit-identical to the dense engine on the
      same ΔWs); the adapter layers are removed and `result.model` is a normal transformers model. The base model
      is changed in place, as `merge_and_unload()` does.
    - `lora_output="adapter"` (also the default when `rank` is given): `λ · ΔW_sel` is re-factored by truncated SVD
      into a LoRA adapter (see [`deltas_to_lora`]: `lora_alpha = r`, `B = U√S`, `A = √S Vᵀ`, λ folded in), with the
      relative reconstruction error per module and overall. `result.model` is the `PeftModel` holding it under
      `adapter_name` (a base model passed in is wrapped in place; a `PeftModel` passed in gets the new adapter, not
      activated, and keeps its own); `result.save_pretrained(dir)` writes an ordinary adapter directory.

    Everything checkable is checked first: the spec, every adapter (found, readable, LoRA, ranks as its config says,
    no NaN/Inf, made for this base) before the base is loaded or any weight changes; a non-finite merged tensor
    (e.g. θ_0 + λ·ΔW overflowing float16) is an error naming it, raised before that module changes (a model passed
    in keeps the modules folded before it; a base given by name is yours untouched). Only one module's deltas are
    dense at a time.

    **Rank of the output adapter** (`rank=None`): per module, the sum of the input adapters' ranks on that module
    (capped by the size of ΔW). That reproduces `task_arithmetic` and `average` merges exactly; MagMax, TIES and
    random mixing select per element, which raises the rank, so their re-factored adapter is an approximation whose
    error the result reports and which falls as `rank` grows.

    Args:
        model_or_base (`PeftModel`, `PreTrainedModel` or `str`):
            A `PeftModel` holding the adapters, or the base model (or its name/path, loaded by its architecture class
            once every adapter has been checked).
        adapters (`list[str]`):
            In task order: adapter names loaded on `model_or_base`, local adapter directories, or Hub repo ids.
        method (`str` or [`MergeSpec`], *optional*, defaults to `"magmax"`):
            `magmax`, `average`, `task_arithmetic`, `ties`, `random_mix` or `opcm`, or a whole spec. opcm (SVD
            projection of each ΔW, one rescale over all modules) runs in two passes: the first folds every module
            (one SVD per projected weight per adapter after the first) and keeps each running sum in a temporary file
            ([`~hf_magmax.io.FoldedStates`], 4 bytes per merged parameter); the second rescales them.
        scaling_coef (`float`, *optional*):
            λ, finite and > 0. Defaults to the method's default ([`hf_magmax.DEFAULT_SCALING_COEFS`]).
        lora_output (`str`, *optional*):
            `"merged"` or `"adapter"`; defaults to `"adapter"` when `rank` is given, else `"merged"` (as
            [`~hf_magmax.config.MergeConfig`]). `output=` is a deprecated alias.
        rank (`int` or `dict[str, int]`, *optional*):
            Rank of the output adapter (see above), for every module or per module name.
        adapter_name (`str`, *optional*, defaults to `"magmax"`):
            Name of the merged adapter on the returned `PeftModel`.
        density (`float`, *optional*):
            TIES only: fraction of each ΔW kept (defaults to 0.2); an error for other methods.
        seed (`int`, *optional*):
            random_mix only (defaults to 0; each tensor's draws are seeded by its name, as everywhere in hf_magmax);
            an error for other methods.
        svd (`str`, *optional*, defaults to `"full"`):
            `"full"` or `"randomized"` (`torch.svd_lowrank`, for large matrices).
        niter (`int`, *optional*, defaults to `4`):
            Power iterations of the randomized SVD.
        svd_seed (`int`, *optional*, defaults to `0`):
            Seed of the randomized SVD.
        dtype (`str` or `torch.dtype`, *optional*):
            dtype of the merged floating tensors (`float32`, `float16`, `bfloat16`); defaults to the base's. The
            math runs in float32 either way.
        device (`str`, *optional*):
            Where the base is loaded and the math runs when `model_or_base` is a name (a model passed in stays where
            it is).
        allow_non_finite (`bool`, *optional*, defaults to `False`):
            Merge adapters holding NaN/Inf and keep non-finite results (default: an error naming the tensor).
        show_progress (`bool`, *optional*, defaults to `True`):
            Show a progress bar over the modules (for more than a few modules).
        save_provenance (`bool`, *optional*, defaults to `False`):
            magmax and random_mix only (an error for other methods): record, per element of every merged ΔW, which
            adapter won (`result.winners`, one small integer tensor per merged tensor; ties go to the later adapter).
        alpha (`float`, *optional*):
            opcm only: the share of singular-value mass each new ΔW is projected off, in [0, 1) (defaults to 0.5).

    Returns:
        [`LoraMergeResult`].

    Example:

    ```python
    >>> from hf_magmax.peft import merge_adapters
    >>> result = merge_adapters("path/to/base", ["path/to/adapter_task1", "path/to/adapter_task2"],
    ...                         method="magmax", lora_output="adapter", rank=16)  # doctest: +SKIP
    >>> result.overall_error, result.save_pretrained("magmax-adapter")  # doctest: +SKIP
    ```
    """
    _require_peft()
    if output is not None:
        warnings.warn(
            '`output=` of `merge_adapters` is deprecated: pass `lora_output="merged"` or `"adapter"` (the name of '
            "`MergeConfig.lora_output` and `--lora-output`).",
            FutureWarning,
            stacklevel=2,
        )
        if lora_output is not None and lora_output != output:
            raise ValueError(
                f"`output={output!r}` and `lora_output={lora_output!r}` disagree: pass `lora_output` only."
            )
        lora_output = output
    request = _check_request(
        method, scaling_coef, lora_output, rank, adapter_name, density, seed, svd, niter, svd_seed, dtype,
        allow_non_finite, show_progress, save_provenance, alpha,
    )  # fmt: skip
    sources = _check_sources(adapters)
    check_device(device)

    resolved: dict[str, str] = {}
    if isinstance(model_or_base, str | os.PathLike):
        # every adapter first: a missing, unreadable or non-finite adapter fails before the base is loaded
        for source in sources:
            resolved[source] = _resolve_adapter(source)
            check_adapter_source(source, resolved[source], None, request.allow_non_finite)
        model = _load_base_model(os.fspath(model_or_base), device=device)
    else:
        model = model_or_base
    user_peft_model = _is_peft_model(model)
    check_not_quantized(model)
    base_name_or_path = getattr(_base_model(model), "name_or_path", None) or None
    if adapter_name in _peft_configs(model):
        raise ValueError(f"the model already has an adapter named {adapter_name!r}: pass another `adapter_name`.")
    loaded = set(_peft_configs(model))
    names: list[str] = []
    loaded_here: list[str] = []
    try:
        for i, source in enumerate(sources):
            if source in loaded:
                names.append(source)
                continue
            local = resolved.get(source) or _resolve_adapter(source)
            check_adapter_source(source, local, model, request.allow_non_finite)
            name = f"_magmax_input_{i}"
            model = load_adapter_onto(model, source, local, name)
            loaded_here.append(name)
            names.append(name)
        for name in names:
            _check_lora_type(model, name)
        return _merge_loaded(model, names, dict(zip(names, sources)), loaded_here, user_peft_model, request,
                             base_name_or_path)  # fmt: skip
    except BaseException:
        # leave the caller's model as it was given: drop the adapters loaded here, unwrap a base model
        if user_peft_model:
            for name in loaded_here:
                if name in _peft_configs(model):
                    model.delete_adapter(name)
        elif loaded_here:
            _strip_adapters(model)
        raise


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


def _check_before_merging(
    infos: Sequence[_ModuleInfo], names: Sequence[str], sources: Mapping[str, str], request: _LoraMergeRequest, params
) -> None:
    """Everything checkable on the loaded model, before any weight changes: layers, biases, finiteness."""
    for info in infos:
        for name in names:
            if info.kind == "lora":
                _check_lora_module(info.name, info.module, name)
            tensors = {
                f"{info.name}.{p}": t
                for p, t in info.module.named_parameters()
                if name in p.split(".") and not p.startswith("base_layer.")
            }
            check_finite_tensors(tensors, sources[name], request.allow_non_finite)
        bias = f"{info.name}.bias"
        if info.kind == "lora" and request.lora_output == "merged" and bias in info.keys and bias not in params:
            raise ValueError(
                f"module `{info.name}` has a LoRA bias but no base bias, so it cannot be merged into the weights."
            )


def _merged_module(
    info: _ModuleInfo,
    names: Sequence[str],
    spec: MergeSpec,
    winners: dict[str, torch.Tensor] | None = None,
    model_scale: float | None = None,
    folded: FoldedStates | None = None,
) -> dict:
    """ΔW_sel of one module: each adapter's ΔW folded into `spec.accumulator(tensor name)`, in task order.

    With `winners` (a dict), each tensor's winner map (which adapter's element was kept) is stored into it. opcm:
    `folded` holds the running sums of the first pass ([`_fold_modules`]), restored here instead of folded again, and
    `model_scale` is their factor over every module."""
    if folded is not None:
        device = next(info.module.parameters()).device
        accumulators = {key: spec.accumulator(key) for key in info.keys}
        for key, accumulator in accumulators.items():
            accumulator.load_state_dict(folded.get(key, device))
    else:
        accumulators = _module_accumulators(info, names, spec, track=winners is not None)
    if winners is not None:
        winners.update({key: accumulator.winners().cpu() for key, accumulator in accumulators.items()})
    return {key: accumulator.result(model_scale=model_scale) for key, accumulator in accumulators.items()}


def _fold_modules(
    infos: Sequence[_ModuleInfo], names: Sequence[str], spec: MergeSpec, folded: FoldedStates, disable: bool | None
) -> float:
    """opcm (`needs_model_stats`), pass 1: fold every module's ΔWs (one SVD per projected weight per adapter after
    the first), spill each tensor's running sum to `folded`, and return the model-wide factor of the merged ΔW."""
    stats = []
    for info in tqdm(infos, desc=f"folding {len(names)} adapters{spec.pass_label(1)}", disable=disable):
        for key, accumulator in _module_accumulators(info, names, spec).items():
            stats.append(accumulator.model_stat())
            folded.put(key, accumulator)
    return spec.merge_class.model_scale_from_stats(stats)


def _module_accumulators(info: _ModuleInfo, names: Sequence[str], spec: MergeSpec, track: bool = False) -> dict:
    """Each tensor of one module with every adapter's ΔW folded in (a whole tensor: every method, opcm included)."""
    shapes = _zeros_shapes(info, names)
    device = next(info.module.parameters()).device  # ΔW lives where the module does (cpu, or `device`)
    # random_mix: seeded by the tensor's name
    accumulators = {key: spec.accumulator(key, track_winners=track) for key in info.keys}
    for name in names:
        deltas = _module_delta(info, name)
        for key, accumulator in accumulators.items():
            delta = deltas.get(key)
            accumulator.update(delta if delta is not None else torch.zeros(shapes[key], device=device))
        del deltas
    return accumulators


def _check_finite_model(model: nn.Module, coef: float) -> None:
    for name, tensor in base_parameters(model).items():
        if tensor.is_floating_point():
            check_finite_output(tensor.detach(), name, coef)


@torch.no_grad()
def _merge_loaded(
    model: nn.Module,
    names: list[str],
    sources: dict[str, str],
    loaded_here: list[str],
    user_peft_model: bool,
    request: _LoraMergeRequest,
    base_name_or_path: str | None,
) -> LoraMergeResult:
    """The merge proper, on a model with every adapter loaded (see [`merge_adapters`])."""
    from peft import get_peft_model
    from peft.utils import set_peft_model_state_dict

    spec, coef, merged_output = request.spec, request.coef, request.lora_output == "merged"
    task_types = {getattr(_peft_configs(model)[n], "task_type", None) for n in names}
    task_type = task_types.pop() if len(task_types) == 1 else None
    infos = list(_iter_adapted_modules(model, names))
    base_params = base_parameters(model)
    _check_before_merging(infos, names, sources, request, base_params)
    rank = request.rank
    ranks = dict(rank) if isinstance(rank, Mapping) else ({} if rank is None else rank)
    refactorer = None if merged_output else _Refactorer(ranks, request.svd, request.niter, request.svd_seed)
    winners: dict[str, torch.Tensor] | None = {} if request.save_provenance else None

    disable = True if not request.show_progress else (len(infos) < 8 or None)
    two_passes = spec.merge_class.needs_model_stats  # opcm: fold every module first, keep the sums, then rescale
    with FoldedStates() if two_passes else contextlib.nullcontext() as folded:
        model_scale = _fold_modules(infos, names, spec, folded, disable) if two_passes else None
        label = spec.pass_label(2, "rescale") or f" ({spec.method})"
        for info in tqdm(infos, desc=f"merging {len(names)} adapters{label}", disable=disable):
            merged = _merged_module(info, names, spec, winners, model_scale, folded)
            if merged_output:
                fold_deltas_into_base(
                    model, merged, coef, dtype=request.dtype, allow_non_finite=request.allow_non_finite
                )
            elif info.kind == "lora":
                weight_delta = merged[f"{info.name}.weight"] * coef
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
                    None if bias is None else bias * coef,
                    getattr(base_layer, "bias", None) is not None,
                )
            else:
                full = {key: apply_merged(base_params[key].detach(), delta, coef) for key, delta in merged.items()}
                if not request.allow_non_finite:
                    for key, value in full.items():
                        check_finite_output(value, key, coef)
                for p, t in [
                    *info.module.original_module.named_parameters(),
                    *info.module.original_module.named_buffers(),
                ]:
                    full.setdefault(f"{info.name}.{p}", t.detach())
                refactorer.add_full(info.name, full)

    result = LoraMergeResult(
        lora_output=request.lora_output,
        model=None,
        adapter=None,
        method=spec.method,
        scaling_coef=coef,
        method_kwargs=spec.method_options,
        adapters=list(sources.values()),
        adapter_name=request.adapter_name,
        rank=rank if rank is None or isinstance(rank, int) else dict(rank),
        base_model_name_or_path=base_name_or_path,
        spec=spec,
        svd=request.svd,
        svd_seed=request.svd_seed,
        dtype=request.dtype_name,
        allow_non_finite=request.allow_non_finite,
        winners=winners,
    )
    if merged_output:
        result.model = _strip_adapters(model)
        if request.dtype is not None:
            result.model.to(request.dtype)
        if not request.allow_non_finite:
            _check_finite_model(result.model, coef)
        return result

    result.adapter = refactorer.finish(base_name_or_path, task_type)
    if request.dtype is not None:
        result.adapter.state_dict = {
            k: v.to(request.dtype) if v.is_floating_point() else v for k, v in result.adapter.state_dict.items()
        }
    if not request.allow_non_finite:
        for key, value in result.adapter.state_dict.items():
            if value.is_floating_point():
                check_finite_output(value, key, coef)
    peft_config = _fresh_config(result.adapter.peft_config)  # PEFT extends the config it is given: keep ours as is
    if user_peft_model:
        for name in loaded_here:
            model.delete_adapter(name)
        model.add_adapter(request.adapter_name, peft_config)
    else:
        base = _strip_adapters(model)
        model = get_peft_model(base, peft_config, adapter_name=request.adapter_name)
    set_peft_model_state_dict(model, result.adapter.state_dict, adapter_name=request.adapter_name)
    result.model = model
    logger.info(
        "merged %d adapters with %s (λ=%s) into one LoRA adapter (PEFT adapter name %r): overall relative "
        "reconstruction error %.3g",
        len(names),
        spec.method,
        coef,
        request.adapter_name,
        result.adapter.overall_error,
    )
    return result


def _fresh_config(config: Any) -> Any:
    import copy

    return copy.deepcopy(config)


def add_magmax_adapter(
    peft_model: nn.Module,
    adapters: Sequence[str | os.PathLike],
    adapter_name: str = "magmax",
    method: str | MergeSpec = "magmax",
    scaling_coef: float | None = None,
    rank: int | None = None,
    **kwargs,
) -> LoraMergeResult:
    """Add the merge of `adapters` to `peft_model` as a new LoRA adapter, like PEFT's `add_weighted_adapter`.

    Unlike `add_weighted_adapter`, the adapters are merged on their dense deltas ΔW (per element, through the merge
    engine) and the merge is re-factored by truncated SVD; see [`merge_adapters`] (`lora_output="adapter"`). The new
    adapter is not made active: call `peft_model.set_adapter(adapter_name)`.

    Args:
        peft_model (`PeftModel`):
            The model; `adapters` are names loaded on it, local directories or Hub repo ids.
        adapters (`list[str]`):
            The adapters, in task order.
        adapter_name (`str`, *optional*, defaults to `"magmax"`):
            Name of the new adapter.
        method (`str`, *optional*, defaults to `"magmax"`), scaling_coef (`float`, *optional*), rank (`int`, *optional*),
        **kwargs:
            As in [`merge_adapters`] (`density`, `seed`, `svd`, `niter`, `svd_seed`, `allow_non_finite`).

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
            '`merge_adapters(base_model, adapters, lora_output="adapter")`.'
        )
    return merge_adapters(
        peft_model,
        adapters,
        method=method,
        scaling_coef=scaling_coef,
        lora_output="adapter",
        rank=rank,
        adapter_name=adapter_name,
        **kwargs,
    )
