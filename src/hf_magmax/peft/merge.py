# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""Merging LoRA adapters on their true ΔW: loading and checking the inputs, [`merge_adapters`],
[`add_magmax_adapter`], and the atomic output ([`save_lora_merge`]).

peft is imported inside the functions.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..merging import MergeSpec, check_density, check_merge_method, default_scaling_coef
from .deltas import (
    PEFT_PREFIX,
    _base_model,
    _base_name,
    _check_lora_module,
    _check_lora_type,
    _iter_adapted_modules,
    _module_delta,
    _ModuleInfo,
    _peft_configs,
    _require_peft,
    _strip_adapters,
    base_parameters,
    check_not_quantized,
    fold_deltas_into_base,
)
from .refactor import SVD_METHODS, LoraFactorization, _layout, _module_layouts, _Refactorer, _to_lora_matrix


logger = logging.getLogger(__name__)

__all__ = ["LoraMergeResult", "add_magmax_adapter", "merge_adapters", "save_lora_merge"]

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

        from ..hub import push_to_hub

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

    from ..io import is_hub_id

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
    if svd not in SVD_METHODS:
        raise ValueError(f"`svd` must be one of {', '.join(SVD_METHODS)}, got {svd!r}.")

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

    from ..hub import MAGMAX_CITATION

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

    from ..io import check_output_dir

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

    from ..hub import write_model_card
    from ..io import check_output_dir, staged_output_dir

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
