# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""`MergeConfig`: the one schema of a merge, for `hf-magmax merge` (checkpoints) and `hf-magmax merge-lora` (adapters).

Every merge writes its configuration as `magmax_config.yaml` beside the result, and both subcommands re-run from it
(`hf-magmax merge merged/magmax_config.yaml`, flags override fields). Values read from YAML are type-checked: a
quoted `"false"` for a boolean is an error naming the field, never a truthy string.

This module does not import torch.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .merging import MergeSpec, check_scaling_coef


logger = logging.getLogger(__name__)

__all__ = ["EXTRA_TENSORS", "LORA_OUTPUTS", "MERGE_CONFIG_NAME", "OUTPUT_DTYPES", "MergeConfig"]

#: The merge configuration saved next to the merged weights (the same YAML both subcommands read).
MERGE_CONFIG_NAME = "magmax_config.yaml"
#: The first line of a published `magmax_config.yaml` (and of the one in a model card).
PUBLIC_CONFIG_NOTE = "# local inputs are named by their folder only; a Hub id re-runs as it is\n"
#: What `merge-lora` writes: a full model with the merge folded in, or a re-factored LoRA adapter.
LORA_OUTPUTS = ("merged", "adapter")
#: Output dtypes of merged floating tensors (`None`: each tensor keeps the base's dtype).
OUTPUT_DTYPES = ("float32", "float16", "bfloat16")
_SVDS = ("full", "randomized")
EXTRA_TENSORS = ("error", "last")

# field -> expected YAML kind, for the type check of hand-written files
_KINDS = {
    "base": "str",
    "models": "list[str]",
    "adapters": "list[str]",
    "method": "str",
    "scaling_coef": "coef",
    "density": "float",
    "seed": "int",
    "alpha": "float",
    "output_dir": "str",
    "lora_output": "str",
    "rank": "int",
    "svd": "str",
    "svd_seed": "int",
    "dtype": "str",
    "device": "str",
    "max_shard_size": "size",
    "overwrite": "bool",
    "allow_non_finite": "bool",
    "strict_config": "bool",
    "extra_tensors": "str",
    "push_to_hub": "str",
    "revision": "str",
    "private": "bool",
    "save_provenance": "bool",
}


@dataclasses.dataclass
class MergeConfig:
    """One merge: what is merged, how, and where the result goes.

    The same fields are the keys of `magmax_config.yaml`, the flags of `hf-magmax merge` / `merge-lora`
    (`output_dir` ↔ `--output-dir`) and the arguments of [`merge_checkpoints`] / [`merge_adapters`].

    Args:
        base (`str`):
            The base (pretrained) model θ_0: a local directory or a Hub repo id.
        models (`list[str]`, *optional*):
            Fine-tuned checkpoints θ_1..θ_T in task order (`hf-magmax merge`).
        adapters (`list[str]`, *optional*):
            LoRA adapters in task order (`hf-magmax merge-lora`). Exactly one of `models` and `adapters`.
        method (`str`, *optional*, defaults to `"magmax"`):
            The merge method ([`hf_magmax.merging.ONLINE_MERGES`]).
        scaling_coef (`float` or `"auto"`, *optional*):
            λ; `None` means the method's default (recorded as `null`, so a re-run with another method takes that
            method's default).
        density (`float`, *optional*): ties only, defaults to 0.2.
        seed (`int`, *optional*): random_mix only, defaults to 0.
        alpha (`float`, *optional*): opcm only, in [0, 1), defaults to 0.5 (FusionBench).
        output_dir (`str`):
            The output directory (always a directory).
        lora_output (`str`, *optional*, defaults to `"merged"`):
            Adapters only: `"merged"` (the base with the merge folded in, a full model) or `"adapter"` (a LoRA
            adapter re-factored by SVD).
        rank (`int`, *optional*): adapters with `lora_output="adapter"`: the output rank (default: the sum of ranks).
        svd (`str`, *optional*, defaults to `"full"`): `"full"` or `"randomized"` SVD for the re-factor.
        svd_seed (`int`, *optional*, defaults to `0`): seed of the randomized SVD.
        dtype (`str`, *optional*): dtype of the merged floating tensors (`float32`, `float16`, `bfloat16`); defaults
            to the base's.
        device (`str`, *optional*, defaults to `"cpu"`): where the math runs (`cpu`, `cuda`, `cuda:N`).
        max_shard_size (`int` or `str`, *optional*, defaults to `"5GB"`): largest output shard.
        overwrite (`bool`, *optional*, defaults to `False`): replace a non-empty `output_dir` (atomically).
        allow_non_finite (`bool`, *optional*, defaults to `False`): merge inputs holding NaN/Inf.
        strict_config (`bool`, *optional*, defaults to `True`): refuse fine-tunes whose architecture differs.
        extra_tensors (`str`, *optional*, defaults to `"error"`): checkpoints only: tensors only the fine-tunes have
            (a new head) are an error (`"error"`) or taken from the last model (`"last"`).
        push_to_hub (`str`, *optional*): a Hub repo id to upload the result to.
        revision (`str`, *optional*): with `push_to_hub`, the branch to push to (if missing, created at the new
            commit once the upload is done; `main` itself is left as it is); defaults to `main`.
        private (`bool`, *optional*, defaults to `False`): with `push_to_hub`, create a private repo.
        save_provenance (`bool`, *optional*, defaults to `False`): magmax and random_mix only: write which task won
            each element (`magmax_provenance.safetensors`, the shares in `magmax_provenance.json` and the card).
    """

    base: str | None = None
    models: list[str] | None = None
    adapters: list[str] | None = None
    method: str = "magmax"
    scaling_coef: float | str | None = None
    density: float | None = None
    seed: int | None = None
    alpha: float | None = None
    output_dir: str | None = None
    lora_output: str = "merged"
    rank: int | None = None
    svd: str = "full"
    svd_seed: int = 0
    dtype: str | None = None
    device: str = "cpu"
    max_shard_size: int | str = "5GB"
    overwrite: bool = False
    allow_non_finite: bool = False
    strict_config: bool = True
    extra_tensors: str = "error"
    push_to_hub: str | None = None
    revision: str | None = None
    private: bool = False
    save_provenance: bool = False

    # -- kinds and validation --------------------------------------------------------------------------------------

    @property
    def kind(self) -> str:
        """`"checkpoints"` (full fine-tuned models) or `"lora"` (adapters)."""
        return "lora" if self.adapters else "checkpoints"

    @property
    def spec(self) -> MergeSpec:
        """The validated [`~hf_magmax.merging.MergeSpec`] of this merge."""
        return MergeSpec(self.method, self.scaling_coef, density=self.density, seed=self.seed, alpha=self.alpha)

    def validate(self, source: str | None = None) -> MergeConfig:
        """Check every field (types, choices, what belongs together) before anything is read or written.

        Args:
            source (`str`, *optional*): where the values came from (a YAML path), named in errors.

        Returns:
            `self`, for chaining. Raises `ValueError` with one line naming the field and the fix.
        """
        where = f" in {source}" if source else ""
        for name, kind in _KINDS.items():
            setattr(self, name, _check_kind(name, getattr(self, name), kind, where))
        if self.models and self.adapters:
            raise ValueError(f"`models` and `adapters` are both set{where}: a merge takes checkpoints or adapters.")
        for name in ("base", "output_dir"):
            if not getattr(self, name):
                raise ValueError(
                    f"`{name}` is missing{where}: a merge needs `base`, `models`/`adapters` and `output_dir`."
                )
        if not self.models and not self.adapters:
            raise ValueError(f"`models` is missing{where}: pass the fine-tuned models (or `adapters`) to merge.")
        try:
            self.spec  # noqa: B018 - validates method, λ and the method's options
        except ValueError as err:
            raise ValueError(f"{str(err).rstrip('.')}{where}.") from None
        if self.lora_output not in LORA_OUTPUTS:
            raise ValueError(
                f"`lora_output` must be one of {', '.join(LORA_OUTPUTS)}{where}, got {self.lora_output!r}."
            )
        if self.extra_tensors not in EXTRA_TENSORS:
            raise ValueError(
                f"`extra_tensors` must be one of {', '.join(EXTRA_TENSORS)}{where}, got {self.extra_tensors!r}."
            )
        if self.svd not in _SVDS:
            raise ValueError(f"`svd` must be one of {', '.join(_SVDS)}{where}, got {self.svd!r}.")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"`rank` must be a positive integer{where}, got {self.rank!r}.")
        if self.rank is not None and (self.kind != "lora" or self.lora_output != "adapter"):
            raise ValueError(f"`rank` only applies to an adapter output (`lora_output: adapter`){where}.")
        if self.dtype is not None and self.dtype not in OUTPUT_DTYPES:
            raise ValueError(f"`dtype` must be one of {', '.join(OUTPUT_DTYPES)}{where}, got {self.dtype!r}.")
        if self.push_to_hub is not None:  # '' too: an empty repo id is an error, not "no push"
            from .hub import check_repo_id

            try:
                check_repo_id(self.push_to_hub)
            except ValueError as err:
                raise ValueError(f"{str(err).rstrip('.')}{where}.") from None
        if self.private and not self.push_to_hub:
            raise ValueError(f"`private` only applies with `push_to_hub`{where}: name the repo to create.")
        if self.revision is not None:
            from .hub import check_branch_name

            if not self.push_to_hub:
                raise ValueError(f"`revision` only applies with `push_to_hub`{where}: name the repo to push to.")
            check_branch_name(self.revision, "revision")
        if self.save_provenance and not self.spec.merge_class.can_track_winners:
            raise ValueError(
                f"`save_provenance` needs a method that keeps one task's value per element (magmax, random_mix), not "
                f"`{self.method}`{where}: drop `save_provenance` or change the method."
            )
        return self

    def replace(self, **changes: Any) -> MergeConfig:
        """A copy with `changes` applied (values of `None` are ignored, as unset flags are)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    # -- YAML ------------------------------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str | None = None) -> MergeConfig:
        """Build a config from plain values (a parsed YAML mapping); unknown keys are an error naming them.

        The keys of older files are read too: `output` (a directory, or `adapter`/`merged` in a LoRA merge's file).
        """
        where = f" in {source}" if source else ""
        data = dict(data)
        if "output" in data:  # older files: `output` was the directory (merge) or adapter/merged (merge-lora)
            legacy = data.pop("output")
            key = "lora_output" if legacy in LORA_OUTPUTS and data.get("adapters") else "output_dir"
            if key in data:
                raise ValueError(
                    f"both `output` (the older name of `{key}`) and `{key}` are set{where}: keep `{key}` only."
                )
            data[key] = legacy
        if data.get("adapters") and data.get("adapter_name") == "magmax":  # older merge-lora files: the default name
            data.pop("adapter_name")
        fields = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ValueError(f"unknown key {unknown[0]!r}{where}; valid keys are {', '.join(fields)}.")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> MergeConfig:
        """Read a `magmax_config.yaml` (or a hand-written one). The values are type-checked by [`validate`] when
        the merge runs; errors name the file and the field.

        Only a regular file of at most 1 MiB is read (a directory, FIFO, device or socket is refused by what it is,
        without opening it for reading); YAML aliases (`*name`, which can expand a few lines into billions of
        values) and a key given twice are refused, naming the line."""
        import yaml

        path = Path(path).expanduser()
        text = _read_config_text(path)
        try:
            data = yaml.load(text, Loader=_strict_loader())  # noqa: S506 - a SafeLoader without aliases
        except _RefusedYAML as err:
            raise ValueError(f"merge config {path}: {err}") from None
        except yaml.YAMLError as err:
            raise ValueError(f"merge config {path} is not valid YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ValueError(f"merge config {path} must be a YAML mapping with keys like base, models, method.")
        config = cls.from_dict(data, source=str(path))
        for name, kind in _KINDS.items():  # type-check now, so that the error names the file
            setattr(config, name, _check_kind(name, getattr(config, name), kind, f" in {path}"))
        return config

    def to_dict(self) -> dict[str, Any]:
        """The fields that describe this merge, for `magmax_config.yaml` (options of other kinds left out)."""
        spec = self.spec
        out: dict[str, Any] = {"base": self.base}
        out["adapters" if self.kind == "lora" else "models"] = list(self.adapters or self.models or [])
        out.update(spec.to_dict())
        out["output_dir"] = self.output_dir
        if self.kind == "lora":
            out["lora_output"] = self.lora_output
            if self.lora_output == "adapter":
                out.update({"rank": self.rank, "svd": self.svd, "svd_seed": self.svd_seed})
        else:
            out.update({"max_shard_size": self.max_shard_size, "strict_config": self.strict_config})
            out["extra_tensors"] = self.extra_tensors
        out.update({"dtype": self.dtype, "device": self.device, "allow_non_finite": self.allow_non_finite})
        if self.save_provenance:
            out["save_provenance"] = True
        return out

    def to_public_dict(self) -> dict[str, Any]:
        """[`to_dict`] as others may read it (a model card, a pushed `magmax_config.yaml`): Hub ids as given, every
        local path (base, models, adapters, output_dir) by its last component only (see
        [`~hf_magmax.io.public_name`]), so that no user, project or mount name is published."""
        from .io import public_name

        out = self.to_dict()
        out["base"] = public_name(out["base"])
        key = "adapters" if "adapters" in out else "models"
        out[key] = [public_name(name) for name in out[key]]
        out["output_dir"] = public_name(out["output_dir"])
        return out

    def to_local_dict(self) -> dict[str, Any]:
        """[`to_dict`] as the `magmax_config.yaml` beside the weights records it: local paths (base, models, adapters,
        output_dir) made absolute ([`~hf_magmax.io.absolute_name`]), so that the file re-runs the merge from any
        working directory of this machine; Hub ids as given."""
        from .io import absolute_name

        out = self.to_dict()
        out["base"] = absolute_name(out["base"])
        key = "adapters" if "adapters" in out else "models"
        out[key] = [absolute_name(name) for name in out[key]]
        if out["output_dir"] is not None:
            out["output_dir"] = os.path.abspath(os.path.expanduser(out["output_dir"]))  # always local
        return out

    def to_yaml(self, public: bool = False) -> str:
        """[`to_local_dict`] as YAML text (absolute local paths), with the effective λ noted where the method's
        default is recorded; `public`: [`to_public_dict`] instead, with a comment saying that local paths are shown by
        their folder names."""
        import yaml

        data = self.to_public_dict() if public else self.to_local_dict()
        text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
        if public:
            text = PUBLIC_CONFIG_NOTE + text
        if self.scaling_coef is None:
            default = self.spec.coef
            text = text.replace(
                "scaling_coef: null\n",
                f"scaling_coef: null  # the default of the method ({default:g} for {self.method})\n",
                1,
            )
        return text


#: The largest merge configuration file read (a real one is a few hundred bytes).
MAX_CONFIG_BYTES = 1 << 20


class _RefusedYAML(ValueError):
    """A YAML construct a merge configuration may not use (an alias, a key given twice)."""


def _read_config_text(path: Path) -> str:
    """The text of a merge configuration file: a regular file of at most [`MAX_CONFIG_BYTES`], never a directory,
    FIFO, device or socket (those are named, and a FIFO is never opened for reading, so nothing blocks)."""
    import stat

    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise FileNotFoundError(
            f"merge config {path} does not exist: pass the path of a magmax_config.yaml."
        ) from None
    if stat.S_ISDIR(mode):
        inside = path / MERGE_CONFIG_NAME
        hint = f" (it holds {inside}: pass that)" if inside.is_file() else ""
        raise IsADirectoryError(
            f"merge config {path} is a directory{hint}: pass the path of a YAML file such as magmax_config.yaml."
        )
    if not stat.S_ISREG(mode):
        what = _file_kind(mode)
        raise ValueError(f"merge config {path} is {what}, not a regular file (not read): pass a YAML file.")
    # O_NONBLOCK: if the path was swapped for a FIFO since the stat, opening it does not wait for a writer
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ValueError(
                f"merge config {path} is {_file_kind(os.fstat(f.fileno()).st_mode)}, not a regular file (not "
                "read): pass a YAML file."
            )
        raw = f.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise ValueError(
            f"merge config {path} is larger than {MAX_CONFIG_BYTES >> 20} MiB: a merge configuration is a few lines "
            "of YAML; pass a magmax_config.yaml."
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"merge config {path} is not UTF-8 text ({err.reason} at byte {err.start}).") from None


def _file_kind(mode: int) -> str:
    import stat

    for test, what in (
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a directory"),
    ):
        if test(mode):
            return what
    return "not a regular file"


def _strict_loader():
    """A `yaml.SafeLoader` that refuses aliases (`*name`, before anything is expanded) and a key given twice."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise _RefusedYAML(
                    f"line {event.start_mark.line + 1} uses the YAML alias *{event.anchor}: aliases are not "
                    "accepted in a merge configuration (they can expand a few lines into billions of values); "
                    "write the values out."
                )
            return super().compose_node(parent, index)

        def construct_mapping(self, node, deep=False):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if isinstance(key_node, yaml.ScalarNode):
                    key = self.construct_object(key_node)
                    line = key_node.start_mark.line + 1
                    if key in seen:
                        raise _RefusedYAML(
                            f"the key {key!r} is given twice (lines {seen[key]} and {line}): keep one of them."
                        )
                    seen[key] = line
            return super().construct_mapping(node, deep=deep)

    return StrictLoader


def _check_kind(name: str, value: Any, kind: str, where: str) -> Any:
    """Type-check one field as YAML gives it; returns the value (numbers given as numeric strings are parsed)."""
    if value is None:
        return None
    bad = f"`{name}`{where} must be "
    if kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(
                f"{bad}true or false, got {value!r} ({type(value).__name__}): write `{name}: true` or "
                f"`{name}: false` without quotes."
            )
        return value
    if kind == "str":
        if not isinstance(value, (str, os.PathLike)):
            raise ValueError(f"{bad}a string, got {value!r} ({type(value).__name__}).")
        return os.fspath(value)
    if kind == "list[str]":
        if isinstance(value, (str, os.PathLike)):
            raise ValueError(f"{bad}a list of paths or Hub repo ids, got the single string {value!r}: use a list.")
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, (str, os.PathLike)) for v in value):
            raise ValueError(f"{bad}a list of paths or Hub repo ids, got {value!r}.")
        return [os.fspath(v) for v in value]
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{bad}an integer, got {value!r} ({type(value).__name__}).")
        return value
    if kind == "float":
        number = _number(value)
        if number is None:
            raise ValueError(f"{bad}a number, got {value!r} ({type(value).__name__}).")
        return number
    if kind == "coef":
        try:
            return check_scaling_coef(value)
        except ValueError as err:
            raise ValueError(f"{err}".rstrip(".") + f"{where}.") from None
    if kind == "size":
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(f'{bad}a size such as "5GB", "500MB" or a number of bytes, got {value!r}.')
        return value
    raise AssertionError(kind)  # pragma: no cover


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):  # YAML 1.1 reads `1e-3` as a string
        try:
            number = float(value)
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None
