# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""Matching the checkpoints of a merge before any weight is read: configs compared semantically, tensors matched by
name across the ways real checkpoints are saved.

- [`compare_configs`]: both configs loaded with `AutoConfig` (every default filled in, so keys an older transformers
  did not write are not differences); fields that define the architecture or the tensor shapes must agree, other
  differences are a warning naming them.
- [`plan_tensors`]: a base saved as `BertModel` and fine-tunes saved as `BertForSequenceClassification` (the model
  class's `base_model_prefix`, `bert.`), old LayerNorm names `gamma`/`beta` (transformers' "legacy" renames), tied
  weights stored once or twice, integer buffers (`position_ids`) only the base stores; tensors only the fine-tunes
  have (a new head) are an error naming them, or taken from the last model.
- [`warn_if_degenerate`]: an input that is the base itself, or one named twice (a local path compared resolved), merges
  without error but rarely as meant: a warning naming it (`hf-magmax merge` and `merge-lora` alike).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .formats import input_identity
from .reading import CheckpointReader, model_class_for


logger = logging.getLogger(__name__)

__all__ = ["TensorPlan", "compare_configs", "plan_tensors", "warn_if_degenerate"]

#: config keys that legitimately differ between a base model and its fine-tunes (never warned about).
_BENIGN_CONFIG_KEYS = {
    "_name_or_path",
    "_commit_hash",
    "_attn_implementation",
    "_attn_implementation_autoset",
    "architectures",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "id2label",
    "label2id",
    "problem_type",
    "finetuning_task",
    "task_specific_params",
    "use_cache",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "sep_token_id",
}
#: Words of a config key that make it define the architecture or the tensor shapes (refused when they differ).
_ARCHITECTURE_WORDS = {
    "size", "dim", "num", "n", "layers", "layer", "heads", "head", "experts", "expert", "vocab", "positions",
    "position", "eps", "act", "rope", "embd", "window", "kv", "tie", "cross", "decoder", "encoder", "groups",
}  # fmt: skip
#: transformers' legacy renames of LayerNorm parameters (`conversion_mapping.py`, "legacy"), applied on load.
_LEGACY_NAMES = (
    (re.compile(r"LayerNorm\.gamma$"), "LayerNorm.weight"),
    (re.compile(r"LayerNorm\.beta$"), "LayerNorm.bias"),
)


@dataclass
class TensorPlan:
    """One output tensor: where its inputs are and how it is made."""

    name: str  # in the output
    dtype: str  # output dtype
    shape: tuple[int, ...]
    kind: str  # "merge" (θ_0 + λ·merge), "base" (an integer/bool buffer of θ_0), "last" (only the models have it)
    base: str | None = None  # name in θ_0
    sources: list[str] = field(default_factory=list)  # name in each model ("merge"); in the last model ("last")


def _config_dict(checkpoint: CheckpointReader) -> dict[str, Any]:
    """The config as transformers reads it (every default filled in), else the raw `config.json`."""
    try:
        return checkpoint.auto_config().to_dict()
    except Exception as err:  # a model type this transformers does not know, remote code, ...
        logger.debug("AutoConfig could not read %s (%s): comparing raw config.json", checkpoint.name, err)
        return dict(checkpoint.config or {})


def _same(a: Any, b: Any) -> bool:
    """Config values equal, floats as float32 (GGUF metadata stores them so: `rms_norm_eps` 1e-6 is read back as
    9.99999997e-07, the same number in the float32 math that uses it)."""
    if isinstance(a, float) and isinstance(b, float):
        import struct

        return a == b or struct.pack("<f", a) == struct.pack("<f", b)
    return a == b


def _is_architecture_key(key: str) -> bool:
    return bool(set(key.lower().split("_")) & _ARCHITECTURE_WORDS)


def compare_configs(base: CheckpointReader, model: CheckpointReader, strict: bool) -> None:
    if base.config is None or model.config is None:
        if (base.config is None) != (model.config is None):
            logger.warning(
                "only one of %s and %s has a config.json: cannot check that they are the same architecture.",
                base.name,
                model.name,
            )
        return
    base_type, model_type = base.config.get("model_type"), model.config.get("model_type")
    if base_type != model_type:
        raise ValueError(
            f"model {model.name!r} is of another architecture: model_type {model_type!r} in "
            f"{model.config_file} but {base_type!r} in the base {base.config_file}. Only fine-tunes "
            "of the base model can be merged."
        )
    if model.config == base.config:  # the same config.json (the usual fine-tune): nothing can differ, no AutoConfig
        return
    base_config, model_config = _config_dict(base), _config_dict(model)
    differing = [
        key
        for key in sorted(set(base_config) | set(model_config))
        if key not in _BENIGN_CONFIG_KEYS
        and "dropout" not in key
        and not _same(base_config.get(key), model_config.get(key))
    ]
    architecture = [key for key in differing if _is_architecture_key(key)]
    other = [key for key in differing if key not in architecture]
    if other:
        logger.warning(
            "model %r has another config than the base in %s (not fields of the architecture: merged anyway)",
            model.name,
            ", ".join(f"`{key}` ({model_config.get(key)!r} vs {base_config.get(key)!r})" for key in other[:6]),
        )
    if architecture:
        key = architecture[0]
        message = (
            f"model {model.name!r} has another config than the base: `{key}` is {model_config.get(key)!r} in "
            f"{model.config_file} but {base_config.get(key)!r} in {base.config_file}"
            + (f" (and {len(architecture) - 1} more: {', '.join(architecture[1:6])})" if len(architecture) > 1 else "")
        )
        if strict:
            raise ValueError(
                message + ". If the difference is harmless, pass `strict_config=False` (--no-strict-config)."
            )
        logger.warning(message)


def warn_if_degenerate(inputs: Sequence[str], field: str = "models", base: str | None = None) -> None:
    """Warn about inputs that merge without error but are rarely what was meant: one that is the base itself (its task
    vector is zero), one named twice (the same task vector merged twice). Local paths are compared resolved
    ([`~hf_magmax.io.formats.input_identity`]: `a`, `./a/` and a link to `a` are one input), Hub repo ids as given.

    Args:
        inputs (`list[str]`): the merged inputs, in task order.
        field (`str`, *optional*, defaults to `"models"`): the argument they were given as (`"models"`,
            `"adapters"`), named in the warning.
        base (`str`, *optional*): the base model (θ_0), for a merge of checkpoints.
    """
    noun = {"models": "fine-tuned model", "adapters": "adapter"}.get(field, "input")
    base_identity = None if base is None else input_identity(base)
    seen: dict[str, int] = {}
    for task, name in enumerate(inputs, start=1):
        identity = input_identity(name)
        if identity == base_identity:
            logger.warning(
                "%s %d of `%s` (%r) is the base model itself: its task vector is zero, so it adds nothing to the "
                "merge (and pulls average and TIES towards the base); pass a %s instead",
                field.removesuffix("s"),
                task,
                field,
                name,
                noun,
            )
        elif identity in seen:
            logger.warning(
                "`%s` names %r twice (tasks %d and %d): the same task vector is merged twice; pass each %s once",
                field,
                name,
                seen[identity],
                task,
                noun,
            )
        seen.setdefault(identity, task)


def _model_class(checkpoints: Sequence[CheckpointReader]):
    """The transformers class of the first checkpoint whose config names one (for the prefix and tied weights)."""
    import transformers

    for checkpoint in checkpoints:
        config = checkpoint.config or {}
        cls = model_class_for(transformers.PretrainedConfig(architectures=config.get("architectures") or []))
        if cls is not None:
            return cls, checkpoint
    return None, None


def _tied_weights(checkpoints: Sequence[CheckpointReader]) -> dict[str, str]:
    """Tied parameter names (both directions), from a meta-device instance of the base's architecture."""
    try:
        import torch

        model_class, checkpoint = _model_class(checkpoints)
        if model_class is None:
            return {}
        with torch.device("meta"):
            model = model_class(checkpoint.auto_config())
        tied = dict(getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or {})
    except Exception as err:
        logger.debug("could not determine the tied weights: %s", err)
        return {}
    pairs = {str(target): str(source) for target, source in tied.items() if isinstance(source, str)}
    return {**pairs, **{source: target for target, source in pairs.items()}}


def _base_model_prefix(checkpoints: Sequence[CheckpointReader]) -> str:
    try:
        model_class, _ = _model_class(checkpoints)
    except Exception as err:  # transformers missing or broken: no prefix mapping
        logger.debug("no model class for the prefix mapping: %s", err)
        return ""
    return getattr(model_class, "base_model_prefix", "") or ""


@dataclass
class _Names:
    """One checkpoint's tensor names, matched across ways of saving: canonical name (the `base_model_prefix`
    stripped, legacy LayerNorm names renamed) → the name in the checkpoint."""

    checkpoint: CheckpointReader
    prefix: str
    by_key: dict[str, str]

    @classmethod
    def of(cls, checkpoint: CheckpointReader, prefix: str) -> _Names:
        by_key: dict[str, str] = {}
        for name in checkpoint.tensors:
            key = cls.canonical(name, prefix)
            if key in by_key:
                raise ValueError(
                    f"model {checkpoint.name!r} holds both {by_key[key]!r} and {name!r}, which are the same "
                    "parameter: re-save it with `save_pretrained`."
                )
            by_key[key] = name
        return cls(checkpoint, prefix, by_key)

    @staticmethod
    def canonical(name: str, prefix: str) -> str:
        if prefix and name.startswith(prefix + "."):
            name = name[len(prefix) + 1 :]
        for pattern, replacement in _LEGACY_NAMES:
            name = pattern.sub(replacement, name)
        return name

    def output_name(self, key: str) -> str:
        """The name this checkpoint's layout gives `key` (today's names; prefixed where it prefixes its own)."""
        own = self.by_key.get(key)
        if own is not None:
            prefixed = bool(self.prefix) and own.startswith(self.prefix + ".")
        else:
            prefixed = bool(self.prefix) and any(n.startswith(self.prefix + ".") for n in self.by_key.values())
        return f"{self.prefix}.{key}" if prefixed else key


def plan_tensors(
    base: CheckpointReader,
    models: list[CheckpointReader],
    *,
    extra_tensors: str = "error",
    dtype: str | None = None,
    warn: bool = True,
) -> tuple[dict[str, TensorPlan], CheckpointReader]:
    """Match every tensor of every model to the base's: the plan of every output tensor, and the checkpoint whose
    layout (names, config) the output follows. Raises naming the first missing/extra/mismatched tensor.

    Args:
        base (`CheckpointReader`), models (`list[CheckpointReader]`): with their tensor tables read.
        extra_tensors (`str`, *optional*, defaults to `"error"`): floating tensors only the models have are an
            error, or (`"last"`) taken from the last model, whose layout the output then follows.
        dtype (`str`, *optional*): the output dtype of floating tensors (default: each one's dtype).
        warn (`bool`, *optional*, defaults to `True`): log what `extra_tensors="last"` drops (off for a plan made
            only to validate, before the same plan is made again).
    """
    same = all(set(model.tensors) == set(base.tensors) for model in models)
    prefix = "" if same else _base_model_prefix([base, *models])
    tied = {} if same else _tied_weights([base, *models])
    tied = {_Names.canonical(k, prefix): _Names.canonical(v, prefix) for k, v in tied.items()}
    base_names = _Names.of(base, prefix)
    model_names = [_Names.of(model, prefix) for model in models]
    sources: dict[str, list[str]] = {key: [] for key in base_names.by_key}
    extras: dict[str, tuple[CheckpointReader, str]] = {}  # canonical name -> the first model that has it, its name
    for names in model_names:
        for key, source in _match(base_names, names, tied).items():
            sources[key].append(source)
        for key, name in names.by_key.items():
            if key in base_names.by_key or tied.get(key) in base_names.by_key:
                continue  # a tied copy the base does not store; transformers re-ties it on load
            if names.checkpoint.tensors[name].is_floating:
                extras.setdefault(key, (names.checkpoint, name))
            else:
                logger.warning(
                    "model %r has integer tensor %r that the base lacks: not written", names.checkpoint.name, name
                )
    layout = _check_extras(extras, base_names, model_names[-1], extra_tensors)
    if extras and warn:
        _warn_about_dropped_extras(extras, model_names)
    plans = {}
    for key, base_name in base_names.by_key.items():
        info = base.tensors[base_name]
        kind = "merge" if info.is_floating else "base"
        out_dtype = (dtype or info.dtype) if info.is_floating else info.dtype
        plan = TensorPlan(
            layout.output_name(key), out_dtype, info.shape, kind, base_name, sources[key] if kind == "merge" else []
        )
        plans[plan.name] = plan
    for key in extras:  # only with extra_tensors="last": from the last model
        info = layout.checkpoint.tensors[layout.by_key[key]]
        plan = TensorPlan(layout.output_name(key), dtype or info.dtype, info.shape, "last", None, [layout.by_key[key]])
        plans[plan.name] = plan
    return plans, layout.checkpoint


def _match(base: _Names, model: _Names, tied: dict[str, str]) -> dict[str, str]:
    """canonical name → the model's tensor for every tensor of the base it must provide (checked: shapes, kinds)."""
    matched = {}
    for key, base_name in base.by_key.items():
        want = base.checkpoint.tensors[base_name]
        if key in model.by_key:
            source = model.by_key[key]
        elif tied.get(key) in model.by_key:
            source = model.by_key[tied[key]]  # the model stores only the other member of a tied pair
        elif not want.is_floating:
            continue  # an integer/bool buffer only the base stores (`position_ids`): taken from the base anyway
        else:
            files = ", ".join(str(f) for f in model.checkpoint.weight_files()[:3])
            raise KeyError(
                f"model {model.checkpoint.name!r} lacks tensor {base_name!r} of the base model (read from {files}): "
                "the models must be fine-tunes of the same architecture."
            )
        got = model.checkpoint.tensors[source]
        if want.shape != got.shape:
            raise ValueError(
                f"shape mismatch for tensor {base_name!r}: {list(got.shape)} in model {model.checkpoint.name!r} "
                f"({got.file}) but {list(want.shape)} in the base model ({want.file})."
            )
        if want.is_floating != got.is_floating:
            raise ValueError(
                f"tensor {base_name!r} is {got.dtype} in model {model.checkpoint.name!r} ({got.file}) but "
                f"{want.dtype} in the base model: floating and integer tensors cannot be merged."
            )
        if want.is_floating:
            matched[key] = source
    return matched


def _warn_about_dropped_extras(extras: dict, models: list[_Names]) -> None:
    """`extra_tensors="last"`: the earlier models' versions of the extra tensors are dropped; say so where they differ
    in shape from the last model's (heads for other label sets: the output keeps only the last model's labels)."""
    last = models[-1]
    differing = []
    for key in extras:
        want = last.checkpoint.tensors[last.by_key[key]].shape
        for names in models[:-1]:
            if key in names.by_key and (got := names.checkpoint.tensors[names.by_key[key]].shape) != want:
                differing.append(f"{names.by_key[key]!r} is {list(got)} in {names.checkpoint.name!r}")
    if differing:
        more = f" (and {len(differing) - 3} more)" if len(differing) > 3 else ""
        logger.warning(
            "the fine-tuned models' extra tensors differ in shape: %s%s, but the output takes them from the last "
            "model %r, with its config (labels, head size): the other models' heads are dropped",
            "; ".join(differing[:3]),
            more,
            last.checkpoint.name,
        )
    logger.info(
        "extra tensors %s taken from the last model %r (extra_tensors='last'), with its config",
        ", ".join(repr(last.by_key[key]) for key in list(extras)[:5]) + (" ..." if len(extras) > 5 else ""),
        last.checkpoint.name,
    )


def _check_extras(extras: dict, base: _Names, last: _Names, extra_tensors: str) -> _Names:
    """Whose layout the output follows: the base's, or the last model's when its extra tensors are taken."""
    if not extras:
        return base
    model, name = next(iter(extras.values()))
    if extra_tensors == "error":
        others = [n for _, n in list(extras.values())[1:6]]
        more = f" (and {len(extras) - 1} more: {', '.join(others)})" if len(extras) > 1 else ""
        raise KeyError(
            f"model {model.name!r} has tensor {name!r} (in {model.tensors[name].file}){more} that the base model "
            f"{base.checkpoint.name!r} lacks: a new head? Pass `extra_tensors='last'` (--extra-tensors last) to take "
            "such tensors from the last model, or merge fine-tunes of the same architecture."
        )
    missing = [key for key in extras if key not in last.by_key]
    if missing:
        model, name = extras[missing[0]]
        raise KeyError(
            f"tensor {name!r} of model {model.name!r} is in neither the base nor the last model "
            f"{last.checkpoint.name!r}: with `extra_tensors='last'` the extra tensors are taken from the last model."
        )
    return last
