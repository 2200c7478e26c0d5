# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""The inputs of a LoRA merge, checked before anything is merged or written: the base model, the adapters (found,
readable, LoRA, finite, of the rank their config says, made for this base), the device and the output path.

Every user mistake is a `ValueError` / `FileNotFoundError` in one line that names the adapter, module or tensor and
the fix. peft is imported inside the functions.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..io import input_identity
from .deltas import PEFT_PREFIX, _base_model, _base_name, base_parameters
from .refactor import _layout, _module_layouts


logger = logging.getLogger(__name__)

#: The files of a saved PEFT adapter that the merger reads.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


def _one_line(err: BaseException, limit: int = 300) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())[:limit]}"


def _is_local_path(source: str) -> bool:
    """Whether `source` names a local path (it exists, or reads as a path rather than a Hub repo id)."""
    from ..io import is_hub_id

    return os.path.exists(os.path.expanduser(source)) or not is_hub_id(source)


def check_output_not_input(output_dir: str | os.PathLike, inputs: Iterable[tuple[str, str]]) -> None:
    """Refuse an `output_dir` that is a symbolic link or the current directory, or that is, contains or lies inside
    one of the inputs: [`hf_magmax.io.check_output_path`], the same check as `hf-magmax merge`'s.

    `inputs` are `(what, path)` pairs such as `("adapter", "lora/task1")`; Hub ids and absent paths are skipped.
    """
    from ..io import check_output_path

    check_output_path(output_dir)
    for what, source in inputs:
        if Path(os.path.expanduser(os.fspath(source))).exists():  # Hub ids and absent paths are named elsewhere
            check_output_path(output_dir, {os.fspath(source): source}, kind=what)


def check_device(device: str | torch.device | None) -> torch.device | None:
    """Parse `device` and refuse one this machine does not have (before anything is loaded)."""
    if device is None:
        return None
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"`device` must be cpu, cuda or cuda:N, got {device!r} ({_one_line(err)}).") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"`device` is {device!r} but CUDA is not available here: pass `device='cpu'` (--device cpu)."
            )
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(
                f"`device` is {device!r} but this machine has {torch.cuda.device_count()} CUDA device(s)."
            )
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"`device` is {device!r} but MPS is not available here: pass `device='cpu'`.")
    return parsed


def _load_base_model(
    name_or_path: str, dtype: str | torch.dtype = "auto", device: str | torch.device | None = None
) -> nn.Module:
    """Load a base model by its `config.architectures[0]` class (falls back to `AutoModel`): `io.load_pretrained`."""
    from ..io import load_pretrained

    model = load_pretrained(name_or_path, dtype=dtype, what="base model")
    if device is not None and torch.device(device).type != "cpu":
        model = model.to(device)
    return model


def _resolve_adapter(source: str) -> str:
    """A local directory for an adapter given as a directory or a Hub repo id (downloaded once, into the HF cache)."""
    local = os.path.expanduser(source)
    if os.path.isdir(local):
        if not os.path.isfile(os.path.join(local, "adapter_config.json")):
            raise FileNotFoundError(
                f"adapter {source!r} is a directory without adapter_config.json: pass a PEFT adapter directory "
                "(what `PeftModel.save_pretrained` writes)."
            )
        return local
    if _is_local_path(source):
        raise FileNotFoundError(
            f"adapter {source!r} is neither an adapter loaded on the model nor a PEFT adapter directory / Hub repo id."
        )
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(source, allow_patterns=list(ADAPTER_FILES))
    except Exception as err:
        raise FileNotFoundError(
            f"adapter {source!r} is neither an adapter loaded on the model, nor a local directory, nor a Hub repo id "
            f"that could be downloaded ({_one_line(err)})."
        ) from err


def _read_adapter_config(source: str, local: str) -> Any:
    """The adapter's `PeftConfig`; refuses a non-LoRA adapter or an unreadable config in one line."""
    from peft import PeftConfig

    try:
        config = PeftConfig.from_pretrained(local)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise FileNotFoundError(
            f"adapter {source!r} has no readable adapter_config.json ({_one_line(err)}): pass a PEFT adapter "
            "directory or Hub repo id."
        ) from None
    peft_type = getattr(config.peft_type, "value", config.peft_type)
    if str(peft_type).upper() != "LORA":
        raise ValueError(
            f"adapter {source!r} is a {peft_type} adapter: only LoRA adapters (peft `LoraConfig`, DoRA included) can "
            "be merged on their weight deltas."
        )
    return config


def _read_adapter_weights(source: str, local: str) -> dict[str, Tensor]:
    """The adapter's tensors (safetensors, or a `.bin` loaded with `weights_only=True`); one line if unreadable."""
    from peft.utils import load_peft_weights

    try:
        return load_peft_weights(local, device="cpu")
    except Exception as err:  # truncated or corrupt files, pickles that weights_only refuses, missing files
        files = [f for f in ADAPTER_FILES[1:] if os.path.exists(os.path.join(local, f))]
        where = os.path.join(local, files[0]) if files else local
        raise ValueError(
            f"adapter {source!r}: cannot read its weights {where} ({_one_line(err, 200)}). Re-save the adapter with "
            "`PeftModel.save_pretrained` (safetensors)."
        ) from None


def check_finite_tensors(tensors: Mapping[str, Tensor], source: str, allow_non_finite: bool = False) -> None:
    """Refuse NaN/Inf in an adapter's tensors, naming the adapter, the module and the tensor."""
    if allow_non_finite:
        return
    for key, tensor in tensors.items():
        if not tensor.is_floating_point() or bool(torch.isfinite(tensor).all()):
            continue
        kind = "NaN" if bool(torch.isnan(tensor).any()) else "Inf"
        name = key.removeprefix(PEFT_PREFIX)
        module = re.split(r"\.(?:lora_|modules_to_save\b)", name)[0]
        raise ValueError(
            f"adapter {source!r} holds {kind} values in module `{module}` (tensor `{name}`): fix or retrain the "
            "adapter, or pass `allow_non_finite=True` (--allow-non-finite) to merge anyway."
        )


def _check_ranks(source: str, config: Any, weights: Mapping[str, Tensor]) -> None:
    """Refuse an adapter whose LoRA factors do not have the rank its config gives them."""
    from peft.utils.other import get_pattern_key

    factors: dict[str, dict[str, Tensor]] = {}
    for key, tensor in weights.items():
        match = re.match(r"(.*)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(\.weight)?$", key)
        if match:
            factors.setdefault(match.group(1).removeprefix(PEFT_PREFIX), {})[match.group(2)[-1]] = tensor
    rank_pattern = dict(getattr(config, "rank_pattern", None) or {})
    for module, parts in factors.items():
        expected = int(config.r)
        if rank_pattern:
            key = get_pattern_key(list(rank_pattern), module)
            expected = int(rank_pattern.get(key, expected))
        a, b = parts.get("A"), parts.get("B")
        got = a.shape[0] if a is not None else (b.shape[1] if b is not None and b.dim() > 1 else expected)
        got_b = b.shape[1] if b is not None and b.dim() > 1 else got
        if got != expected or got_b != expected:
            raise ValueError(
                f"adapter {source!r} does not match its adapter_config.json: module `{module}` has LoRA factors of "
                f"rank {got if got != expected else got_b} but the config gives it r={expected}. Re-save the adapter "
                "with `PeftModel.save_pretrained`, or fix `r` / `rank_pattern` in its config."
            )


def _check_fits_base(source: str, config: Any, weights: Mapping[str, Tensor], model: nn.Module) -> None:
    """Refuse an adapter made for another base model, naming the module whose shape differs."""
    base = _base_model(model)
    expected = getattr(base, "name_or_path", None)
    made_for = config.base_model_name_or_path
    if made_for and expected and input_identity(made_for) != input_identity(expected):
        logger.warning("adapter %s was made for %s, the base model is %s", source, made_for, expected)
    modules = _module_layouts(model)
    params = base_parameters(model)
    hint = f"adapter {source!r} was made for another base model (its config names {made_for!r})"
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


def check_adapter_source(
    source: str, local: str, model: nn.Module | None = None, allow_non_finite: bool = False
) -> Any:
    """Read an adapter's config and weights and check them: LoRA, readable, finite, ranks as configured, and (with
    `model`) made for this base model. Returns the adapter's `PeftConfig`."""
    config = _read_adapter_config(source, local)
    weights = _read_adapter_weights(source, local)
    check_finite_tensors(weights, source, allow_non_finite)
    _check_ranks(source, config, weights)
    if model is not None:
        _check_fits_base(source, config, weights, model)
    return config


def load_adapter_onto(model: nn.Module, source: str, local: str, name: str) -> nn.Module:
    """Load a checked adapter onto `model` under `name` (wrapping a plain model in a `PeftModel`); PEFT's load errors
    become one line naming the adapter."""
    from peft import PeftModel

    try:
        if isinstance(model, PeftModel):
            model.load_adapter(local, adapter_name=name)
            return model
        return PeftModel.from_pretrained(model, local, adapter_name=name)
    except (RuntimeError, KeyError) as err:
        first = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))
        raise ValueError(f"adapter {source!r} cannot be loaded onto the base model: {first[:300]}") from None
