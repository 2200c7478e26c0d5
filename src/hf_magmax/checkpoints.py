# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""Out-of-core merge of Hugging Face checkpoints: stream tensor by tensor, write sharded safetensors atomically.

[`merge_checkpoints`] merges a base model θ_0 and T fine-tuned models θ_1..θ_T (local directories or Hub repo ids)
into `θ_0 + λ · merge(θ_1 − θ_0, ..., θ_T − θ_0)` without ever holding a whole model in memory:

1. **Validate first.** Configs, tensor names, shapes and dtypes are compared from `config.json` and the safetensors
   headers (or the lazily memory-mapped `.bin` state dicts) before a single weight is read; truncated or corrupt
   files, missing shards, other architectures, missing/extra tensors and shape mismatches are reported by name.
2. **Stream.** For each tensor name: read θ_0, fold every `θ_t − θ_0` into an online accumulator of
   [`hf_magmax.merging`] (the one place that holds the merge rule), write `θ_0 + λ · result`. The inputs are
   memory-mapped and read lazily; the element-wise methods (magmax, average, task_arithmetic) go through each tensor
   in blocks of rows of ~1M elements, so their peak memory is a few such blocks; so does ties, after one pass that
   finds each task vector's trim threshold (top-k of the whole tensor, one task vector in memory at a time);
   random_mix (one random stream per tensor) holds a few whole tensors. Either way it does not grow with T or with
   the model's size.
3. **Write atomically.** Sharded safetensors (the layout is planned from the headers, so every shard is streamed to
   disk tensor by tensor) plus an index, the base's config/tokenizer files, a model card and `magmax_config.yaml`,
   all into a temporary directory beside the output that is renamed at the end.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .io import check_output_dir, is_hub_id, staged_output_dir
from .merging import DEFAULT_SCALING_COEFS, check_density, check_merge_method


logger = logging.getLogger(__name__)

__all__ = ["MERGE_CONFIG_NAME", "MERGE_CONFIG_FIELDS", "load_merge_config", "merge_checkpoints", "parse_size"]

#: The merge configuration saved next to the merged weights (the same YAML that `hf-magmax merge CONFIG.yaml` reads).
MERGE_CONFIG_NAME = "magmax_config.yaml"

#: Fields of a merge configuration file and the `merge_checkpoints` argument each one sets.
MERGE_CONFIG_FIELDS: tuple[str, ...] = (
    "base",
    "models",
    "method",
    "scaling_coef",
    "density",
    "seed",
    "dtype",
    "device",
    "max_shard_size",
    "output",
    "overwrite",
    "allow_non_finite",
    "strict_config",
    "push_to_hub",
    "private",
)

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_NAME = "pytorch_model.bin"
WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"

#: Files of the base that are never copied to the output: weights (we write our own) and what we regenerate.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
_REGENERATED = {SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_INDEX_NAME, "README.md", MERGE_CONFIG_NAME}

#: config.json keys that legitimately differ between a base model and its fine-tunes.
_BENIGN_CONFIG_KEYS = {
    "_name_or_path",
    "_commit_hash",
    "_attn_implementation",
    "_attn_implementation_autoset",
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

# safetensors dtype names <-> torch dtype names (no torch import at module level)
_ST_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
    "BOOL": "bool",
}
_TORCH_TO_ST = {v: k for k, v in _ST_DTYPES.items()}
_ITEMSIZE = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "uint16": 2,
    "uint32": 4,
    "uint64": 8,
    "bool": 1,
}
_FLOATING = {"float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"}
#: Methods merged in row blocks of this many elements: those whose result at an element depends only on that element,
#: and ties once its per-tensor trim thresholds are known.
_BLOCKWISE = {"magmax", "average", "task_arithmetic", "ties"}
# 4 MiB of fp32 per block: big enough for torch to use every core and to amortise the per-op overhead (on the 2-core
# benchmark machine, 1M-element blocks merged 1.75x faster than 32k-element ones), small enough to stay a few MiB.
_CHUNK_ELEMENTS = 1 << 20
_DTYPE_ALIASES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}


# ---------------------------------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------------------------------


def parse_size(size: int | str, name: str = "max_shard_size") -> int:
    """Parse a size like `"5GB"`, `"500MB"`, `"2GiB"`, `"100kB"` or a number of bytes into bytes.

    Decimal units (kB, MB, GB, TB) are powers of 1000 and binary units (KiB, MiB, GiB, TiB) powers of 1024, as in
    `transformers`.

    Example:

    ```python
    >>> from hf_magmax.checkpoints import parse_size
    >>> parse_size("5GB"), parse_size("2MiB"), parse_size(1000)
    (5000000000, 2097152, 1000)
    ```
    """
    if isinstance(size, bool):
        raise ValueError(f"`{name}` must be a size like '5GB', '500MB' or a number of bytes, got {size!r}.")
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]i?[bB]|[bB])?\s*", str(size))
        if not match:
            raise ValueError(f"`{name}` must be a size like '5GB', '500MB' or a number of bytes, got {size!r}.")
        number, unit = float(match.group(1)), (match.group(2) or "B").upper()
        base = 1024 if "I" in unit else 1000
        power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
        value = int(number * base**power)
    if value <= 0:
        raise ValueError(f"`{name}` must be positive, got {size!r}.")
    return value


def _normalize_dtype(dtype: Any) -> str | None:
    if dtype is None or dtype == "auto":
        return None
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPE_ALIASES:
        raise ValueError(
            f"`dtype` must be one of float32, float16, bfloat16 (or None to keep the base's), got {dtype!r}."
        )
    return _DTYPE_ALIASES[name]


def _check_device(device: str) -> str:
    device = str(device)
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise ValueError(f"`device` must be 'cpu' or 'cuda' (or 'cuda:N'), got {device!r}.")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"`device` is {device!r} but CUDA is not available here: use `device='cpu'`.")
    return device


# ---------------------------------------------------------------------------------------------------------------------
# reading checkpoints (headers first, weights later)
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class _TensorInfo:
    file: Path
    dtype: str  # torch dtype name, e.g. "float32"
    shape: tuple[int, ...]


@dataclass
class _Checkpoint:
    """One input model: its location, config and tensor table (name -> file/dtype/shape), read without weights."""

    name: str  # as the user gave it
    path: Path
    config: dict | None
    fmt: str = "safetensors"
    tensors: dict[str, _TensorInfo] = field(default_factory=dict)
    _handles: dict[Path, Any] = field(default_factory=dict, repr=False)

    def weight_files(self) -> list[Path]:
        return sorted({info.file for info in self.tensors.values()})

    def _handle(self, name: str):
        file = self.tensors[name].file
        handle = self._handles.get(file)
        if handle is None:
            handle = self._handles[file] = self._open(file)
        return handle

    def get(self, name: str):
        """One tensor, as a lazy view of the memory-mapped file (`safe_open`, or `torch.load(mmap=True)`): bytes are
        read when used. Never write into it."""
        if self.fmt == "safetensors":
            return self._handle(name).get_tensor(name)
        return self._handle(name)[name]

    def _open(self, file: Path):
        if self.fmt == "safetensors":
            from safetensors import safe_open

            try:
                return safe_open(str(file), framework="pt", device="cpu")
            except Exception as err:  # safetensors raises its own error types
                raise ValueError(f"cannot open safetensors file {file}: {err}") from err
        return _load_bin(file)

    def close(self) -> None:
        self._handles.clear()


def _read_safetensors_header(file: Path) -> dict[str, _TensorInfo]:
    """Parse and check a safetensors header: it must be valid JSON and every tensor must lie inside the file."""
    if not file.is_file():
        raise FileNotFoundError(f"weight file {file} does not exist.")
    size = file.stat().st_size
    with open(file, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"corrupt safetensors file {file}: {size} bytes is too short for a header.")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > size - 8 or header_len > 100_000_000:
            raise ValueError(
                f"corrupt or truncated safetensors file {file}: the header claims {header_len} bytes but the file "
                f"has {size}."
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"corrupt safetensors file {file}: its header is not valid JSON ({err}).") from err
    if not isinstance(header, dict):
        raise ValueError(f"corrupt safetensors file {file}: its header is not a JSON object.")
    data_size = size - 8 - header_len
    tensors: dict[str, _TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _ST_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            start, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(
                f"corrupt safetensors file {file}: bad header entry for tensor {name!r} ({err})."
            ) from err
        if end > data_size:
            raise ValueError(
                f"truncated safetensors file {file}: tensor {name!r} ends at byte {end} of the data section but the "
                f"file only holds {data_size} bytes of data. Re-download or re-save the checkpoint."
            )
        if end - start != math.prod(shape) * _ITEMSIZE[dtype]:
            raise ValueError(f"corrupt safetensors file {file}: tensor {name!r} has inconsistent data offsets.")
        tensors[name] = _TensorInfo(file, dtype, shape)
    return tensors


def _load_bin(file: Path) -> dict:
    import torch

    if not file.is_file():
        raise FileNotFoundError(f"weight file {file} does not exist.")
    try:
        state = torch.load(str(file), map_location="cpu", mmap=True, weights_only=True)
    except Exception as err:
        raise ValueError(
            f"cannot read PyTorch checkpoint {file} (memory-mapped, weights only): {err}. Convert it to safetensors "
            "or re-save it with a recent torch."
        ) from err
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ValueError(f"PyTorch checkpoint {file} does not hold a state dict (got {type(state).__name__}).")
    return dict(state)


def _read_index(file: Path) -> dict[str, Path]:
    try:
        weight_map = json.loads(file.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"corrupt index file {file}: expected JSON with a `weight_map` ({err}).") from err
    return {name: file.parent / shard for name, shard in weight_map.items()}


def _read_tensor_table(checkpoint: _Checkpoint) -> None:
    """Fill `checkpoint.tensors` from the safetensors headers (or the memory-mapped `.bin` files)."""
    path = checkpoint.path
    if (path / SAFE_WEIGHTS_INDEX_NAME).is_file() or (path / SAFE_WEIGHTS_NAME).is_file():
        checkpoint.fmt = "safetensors"
        if (path / SAFE_WEIGHTS_INDEX_NAME).is_file():
            weight_map = _read_index(path / SAFE_WEIGHTS_INDEX_NAME)
            files = sorted(set(weight_map.values()))
        else:
            weight_map, files = None, [path / SAFE_WEIGHTS_NAME]
        for file in files:
            header = _read_safetensors_header(file)
            if weight_map is not None:
                listed = {name for name, shard in weight_map.items() if shard == file}
                absent = sorted(listed - set(header))
                if absent:
                    raise ValueError(
                        f"index {path / SAFE_WEIGHTS_INDEX_NAME} lists tensor {absent[0]!r} in {file.name}, but that "
                        "file does not hold it: the checkpoint is corrupt."
                    )
                header = {name: info for name, info in header.items() if name in listed}
            checkpoint.tensors.update(header)
        return
    if (path / WEIGHTS_INDEX_NAME).is_file() or (path / WEIGHTS_NAME).is_file():
        checkpoint.fmt = "bin"
        if (path / WEIGHTS_INDEX_NAME).is_file():
            weight_map = _read_index(path / WEIGHTS_INDEX_NAME)
            files = sorted(set(weight_map.values()))
        else:
            weight_map, files = None, [path / WEIGHTS_NAME]
        for file in files:
            state = _load_bin(file)
            checkpoint._handles[file] = state
            for name, tensor in state.items():
                if weight_map is not None and weight_map.get(name) != file:
                    continue
                if hasattr(tensor, "shape") and hasattr(tensor, "dtype"):
                    checkpoint.tensors[name] = _TensorInfo(
                        file, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape)
                    )
        return
    loose = sorted(p for p in path.glob("*.safetensors") if p.name != "adapter_model.safetensors")
    if loose:
        checkpoint.fmt = "safetensors"
        for file in loose:
            header = _read_safetensors_header(file)
            clash = sorted(set(header) & set(checkpoint.tensors))
            if clash:
                raise ValueError(f"tensor {clash[0]!r} appears in several files of {path} and no index says which.")
            checkpoint.tensors.update(header)
        return
    raise FileNotFoundError(
        f"no model weights in {path}: expected {SAFE_WEIGHTS_NAME}, {SAFE_WEIGHTS_INDEX_NAME}, {WEIGHTS_NAME} or "
        f"{WEIGHTS_INDEX_NAME} (save the model with `save_pretrained`)."
    )


def _read_config(path: Path) -> dict | None:
    file = path / "config.json"
    if not file.is_file():
        return None
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"corrupt config file {file}: {err}") from err
    if not isinstance(config, dict):
        raise ValueError(f"corrupt config file {file}: expected a JSON object.")
    return config


def _resolve(name: str, *, token: str | bool | None, weights: bool) -> Path:
    """A local directory, or a Hub repo id downloaded with `snapshot_download` (weights only when `weights`)."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(
                f"model {name!r} is a file: pass the directory that holds config.json and the weights."
            )
        return path
    if not is_hub_id(name):
        raise FileNotFoundError(f"model directory {name!r} does not exist.")
    from huggingface_hub import snapshot_download

    patterns = {"ignore_patterns": [f"*{s}" for s in _WEIGHT_SUFFIXES]} if not weights else {}
    try:
        return Path(snapshot_download(name, token=token, **patterns))
    except FileNotFoundError as err:  # LocalEntryNotFoundError: offline and not cached
        raise FileNotFoundError(
            f"model {name!r} is not a local directory and is not in the Hub cache (offline mode, or the Hub is "
            f"unreachable): pass a local path or download it first. ({' '.join(str(err).split())})"
        ) from err
    except Exception as err:
        reason = " ".join(str(err).split())
        raise FileNotFoundError(
            f"model {name!r} is not a local directory and could not be fetched from the Hub: {reason}"
        ) from err


def _hub_tensor_table(checkpoint: _Checkpoint, token: str | bool | None) -> bool:
    """For a Hub model, read the safetensors headers remotely (HTTP range requests) before downloading weights."""
    from huggingface_hub import HfApi, constants

    if constants.is_offline_mode():
        return False
    try:
        metadata = HfApi(token=token).get_safetensors_metadata(checkpoint.name)
    except Exception as err:  # not safetensors, or no range support: validate after the download instead
        logger.debug("could not read remote safetensors headers of %s: %s", checkpoint.name, err)
        return False
    for file_name, file_meta in metadata.files_metadata.items():
        for name, info in file_meta.tensors.items():
            dtype = _ST_DTYPES.get(info.dtype, info.dtype.lower())
            checkpoint.tensors[name] = _TensorInfo(checkpoint.path / file_name, dtype, tuple(info.shape))
    return True


# ---------------------------------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------------------------------


def _compare_configs(base: _Checkpoint, model: _Checkpoint, strict: bool) -> None:
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
            f"{model.path / 'config.json'} but {base_type!r} in the base {base.path / 'config.json'}. Only fine-tunes "
            "of the base model can be merged."
        )
    differing = []
    for key in sorted(set(base.config) | set(model.config)):
        if key in _BENIGN_CONFIG_KEYS or "dropout" in key:
            continue
        if base.config.get(key) != model.config.get(key):
            differing.append(key)
    if differing:
        key = differing[0]
        message = (
            f"model {model.name!r} has another config than the base: `{key}` is {model.config.get(key)!r} in "
            f"{model.path / 'config.json'} but {base.config.get(key)!r} in {base.path / 'config.json'}"
            + (f" (and {len(differing) - 1} more key(s): {', '.join(differing[1:6])})" if len(differing) > 1 else "")
        )
        if strict:
            raise ValueError(
                message + ". If the difference is harmless, pass `strict_config=False` (--no-strict-config)."
            )
        logger.warning(message)


def _tied_weights(checkpoint: _Checkpoint) -> dict[str, str]:
    """Tied parameter names of the base's architecture (both directions), from a meta-device instance of the model."""
    config = checkpoint.config or {}
    architectures = config.get("architectures") or []
    if not architectures:
        return {}
    try:
        import torch
        import transformers

        model_class = getattr(transformers, architectures[0])
        model_config = transformers.AutoConfig.from_pretrained(str(checkpoint.path))
        with torch.device("meta"):
            model = model_class(model_config)
        tied = dict(getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or {})
    except Exception as err:
        logger.debug("could not determine the tied weights of %s: %s", checkpoint.name, err)
        return {}
    pairs = {str(target): str(source) for target, source in tied.items() if isinstance(source, str)}
    return {**pairs, **{source: target for target, source in pairs.items()}}


def _plan_names(base: _Checkpoint, models: Sequence[_Checkpoint]) -> list[dict[str, str]]:
    """For every model, map each base tensor name to the name to read in that model (tied aliases resolved).

    Raises naming the first missing or extra tensor, or the first shape/dtype-kind mismatch.
    """
    base_names = set(base.tensors)
    tied: dict[str, str] | None = None
    plans = []
    for model in models:
        names = set(model.tensors)
        plan = {name: name for name in base_names & names}
        if names != base_names:
            if tied is None:
                tied = _tied_weights(base)
            for name in sorted(base_names - names):
                partner = tied.get(name)
                if partner is not None and partner in names:
                    plan[name] = partner  # the model stores only the other member of a tied pair
                    continue
                files = ", ".join(str(f) for f in model.weight_files()[:3])
                raise KeyError(
                    f"model {model.name!r} lacks tensor {name!r} of the base model (read from {files}): the models "
                    "must be fine-tunes of the same architecture."
                )
            for name in sorted(names - base_names):
                partner = tied.get(name)
                if partner is not None and partner in base_names:
                    continue  # a tied copy the base does not store; transformers re-ties it on load
                raise KeyError(
                    f"model {model.name!r} has tensor {name!r} (in {model.tensors[name].file}) that the base model "
                    f"{base.name!r} lacks: the models must be fine-tunes of the same architecture."
                )
        for name, source in plan.items():
            want, got = base.tensors[name], model.tensors[source]
            if want.shape != got.shape:
                raise ValueError(
                    f"shape mismatch for tensor {name!r}: {list(got.shape)} in model {model.name!r} ({got.file}) but "
                    f"{list(want.shape)} in the base model ({want.file})."
                )
            if (want.dtype in _FLOATING) != (got.dtype in _FLOATING):
                raise ValueError(
                    f"tensor {name!r} is {got.dtype} in model {model.name!r} ({got.file}) but {want.dtype} in the "
                    "base model: floating and integer tensors cannot be merged."
                )
        plans.append(plan)
    return plans


# ---------------------------------------------------------------------------------------------------------------------
# writing: streamed safetensors shards
# ---------------------------------------------------------------------------------------------------------------------


def _plan_shards(entries: list[tuple[str, str, tuple[int, ...]]], max_shard_size: int) -> list[list[str]]:
    """Greedy shard plan over `(name, dtype, shape)` in write order; a tensor larger than the limit gets its own."""
    shards: list[list[str]] = [[]]
    current = 0
    for name, dtype, shape in entries:
        nbytes = math.prod(shape) * _ITEMSIZE[dtype]
        if shards[-1] and current + nbytes > max_shard_size:
            shards.append([])
            current = 0
        shards[-1].append(name)
        current += nbytes
    return shards if shards[0] else []


class _ShardWriter:
    """Writes one safetensors file whose header is known up front, tensor by tensor (no whole shard in memory)."""

    def __init__(self, file: Path, entries: list[tuple[str, str, tuple[int, ...]]]) -> None:
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        self.expected: list[tuple[str, str, tuple[int, ...], int]] = []
        for name, dtype, shape in entries:
            nbytes = math.prod(shape) * _ITEMSIZE[dtype]
            header[name] = {
                "dtype": _TORCH_TO_ST[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            self.expected.append((name, dtype, shape, nbytes))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
        self.file = file
        self.nbytes = offset
        self._handle = open(file, "wb")
        self._handle.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    def begin(self, name: str) -> None:
        """Start the next tensor of the header; its bytes follow with `write_part` calls, in row-major order."""
        if self._next >= len(self.expected) or self.expected[self._next][0] != name:
            raise RuntimeError(f"internal error: shard {self.file.name} does not expect {name!r} next.")
        self._written = 0

    def write_part(self, tensor) -> None:
        import torch

        _, dtype, _, nbytes = self.expected[self._next]
        if str(tensor.dtype).removeprefix("torch.") != dtype:
            raise RuntimeError(f"internal error: shard {self.file.name} expected dtype {dtype}, got {tensor.dtype}.")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._handle.write(memoryview(data.numpy()))
        self._written += data.numel()

    def end(self) -> None:
        name, _, _, nbytes = self.expected[self._next]
        if self._written != nbytes:
            raise RuntimeError(f"internal error: tensor {name!r} got {self._written} bytes instead of {nbytes}.")
        self._next += 1

    def write(self, name: str, tensor) -> None:
        """Write one whole tensor."""
        self.begin(name)
        if tuple(tensor.shape) != self.expected[self._next][2]:
            raise RuntimeError(f"internal error: tensor {name!r} has shape {tuple(tensor.shape)}.")
        self.write_part(tensor)
        self.end()

    def close(self) -> None:
        self._handle.close()
        if self._next != len(self.expected):
            raise RuntimeError(f"internal error: shard {self.file.name} is incomplete.")


# ---------------------------------------------------------------------------------------------------------------------
# model card and config file
# ---------------------------------------------------------------------------------------------------------------------


def _merge_config_dict(
    *,
    base: str,
    models: Sequence[str],
    method: str,
    scaling_coef: float,
    density: float | None,
    seed: int | None,
    dtype: str | None,
    device: str,
    max_shard_size: int | str,
    output: str,
    allow_non_finite: bool,
    strict_config: bool,
) -> dict[str, Any]:
    config: dict[str, Any] = {"base": base, "models": list(models), "method": method, "scaling_coef": scaling_coef}
    if method == "ties":
        config["density"] = density
    if method == "random_mix":
        config["seed"] = seed
    config.update({"dtype": dtype, "device": device, "max_shard_size": max_shard_size, "output": output})
    if allow_non_finite:
        config["allow_non_finite"] = True
    if not strict_config:
        config["strict_config"] = False
    return config


def _model_card(config: dict[str, Any], num_parameters: int) -> tuple[dict[str, Any], str]:
    import yaml

    from . import __version__
    from .hub import MAGMAX_CITATION

    method = config["method"]
    metadata = {
        "base_model": config["base"],
        "base_model_relation": "merge",
        "library_name": "transformers",
        "tags": ["merge", "magmax", "hf_magmax"] + ([method] if method != "magmax" else []),
    }
    method_text = {
        "magmax": "MagMax: for every parameter element, the task-vector value with the largest magnitude (sign kept)",
        "average": "the average of the task vectors (with λ = 1, the plain weight average)",
        "task_arithmetic": "task arithmetic: the sum of the task vectors",
        "ties": f"TIES-merging: trim to the top {config.get('density')} of magnitudes, elect signs, disjoint mean",
        "random_mix": f"random mixing: per element, one task's value chosen at random (seed {config.get('seed')})",
    }[method]
    models = "\n".join(f"{i}. `{m}`" for i, m in enumerate(config["models"], start=1))
    body = f"""# {Path(config["output"]).name}

This model is a merge of {len(config["models"])} fine-tuned model(s) of `{config["base"]}` made with
hf_magmax {__version__}.

## Merge details

- **Method:** `{method}`, {method_text}.
- **Merged model:** θ_0 + λ · merge(θ_1 − θ_0, …, θ_T − θ_0), with the task vectors taken in the order below.
- **Scaling coefficient (λ):** {config["scaling_coef"]} (default for `{method}`: {DEFAULT_SCALING_COEFS[method]})
- **Base model (θ_0):** `{config["base"]}`
- **Parameters:** {num_parameters:,}

### Models merged (task order)

{models}

## Configuration

The merge configuration, saved as `{MERGE_CONFIG_NAME}`. Re-run the merge with
`hf-magmax merge {MERGE_CONFIG_NAME}`:

```yaml
{yaml.safe_dump(config, sort_keys=False).rstrip()}
```

## Citation

```bibtex
{MAGMAX_CITATION.strip()}
```
"""
    return metadata, body


def _copy_base_files(base: _Checkpoint, staging: Path) -> list[str]:
    copied = []
    for src in sorted(base.path.rglob("*")):
        rel = src.relative_to(base.path)
        if any(part.startswith(".") for part in rel.parts) or not src.is_file():
            continue
        if src.name.endswith(_WEIGHT_SUFFIXES) or (len(rel.parts) == 1 and src.name in _REGENERATED):
            continue
        target = staging / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)  # follows symlinks (Hub cache snapshots)
        copied.append(rel.as_posix())
    return copied


# ---------------------------------------------------------------------------------------------------------------------
# public entry points
# ---------------------------------------------------------------------------------------------------------------------


def load_merge_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read a merge configuration YAML (the `magmax_config.yaml` a merge writes) into `merge_checkpoints` kwargs.

    Raises:
        `FileNotFoundError` if the file does not exist, `ValueError` naming the file and the offending key otherwise.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"merge config {path} does not exist.")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"merge config {path} is not valid YAML: {err}") from err
    if not isinstance(config, dict):
        raise ValueError(f"merge config {path} must be a YAML mapping with keys like base, models, method.")
    unknown = sorted(set(config) - set(MERGE_CONFIG_FIELDS))
    if unknown:
        raise ValueError(
            f"merge config {path}: unknown key {unknown[0]!r}; valid keys are {', '.join(MERGE_CONFIG_FIELDS)}."
        )
    models = config.get("models")
    if models is not None and (not isinstance(models, list) or not all(isinstance(m, str) for m in models)):
        raise ValueError(f"merge config {path}: `models` must be a list of model paths or Hub repo ids.")
    return config


def merge_checkpoints(
    base: str | os.PathLike,
    models: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    method: str = "magmax",
    scaling_coef: float | str | None = None,
    density: float | None = None,
    seed: int | None = None,
    dtype: str | None = None,
    device: str = "cpu",
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    allow_non_finite: bool = False,
    strict_config: bool = True,
    push_to_hub: str | None = None,
    private: bool = False,
    token: str | bool | None = None,
    show_progress: bool = True,
    score_fn: Any = None,
    scaling_coef_grid: Sequence[float] | None = None,
) -> Path:
    """Merge fine-tuned checkpoints of one base model, streaming tensor by tensor, into a new checkpoint directory.

    The output is `θ_0 + scaling_coef · merge(θ_1 − θ_0, …, θ_T − θ_0)` for every floating tensor (integer and bool
    tensors are copied from the base), written as sharded safetensors with an index, together with the base's
    config, generation config and tokenizer files, a model card (`README.md`) and the merge configuration
    (`magmax_config.yaml`). Nothing is read from the weights before everything that can be checked from configs and
    headers has been checked, and the output appears atomically: after an error (or Ctrl-C) nothing is left at
    `output_dir`.

    Args:
        base (`str` or `os.PathLike`):
            θ_0: a local checkpoint directory or a Hub repo id.
        models (`list[str]`):
            θ_1..θ_T, fine-tunes of `base`, in task order (for `magmax`, ties go to the later task).
        output_dir (`str` or `os.PathLike`):
            Where to write the merged checkpoint. Must not exist or be empty, unless `overwrite`.
        method (`str`, *optional*, defaults to `"magmax"`):
            One of `magmax`, `average`, `task_arithmetic`, `ties`, `random_mix` (see [`hf_magmax.merging`]).
        scaling_coef (`float`, *optional*):
            λ. Defaults to the method's default ([`DEFAULT_SCALING_COEFS`]): 0.5 for `magmax` and `random_mix`, 1.0
            for `average` and `ties`, 0.3 for `task_arithmetic`. `"auto"` chooses λ from `scaling_coef_grid` by
            `score_fn` (see [`~hf_magmax.scaling.select_scaling_coef_for_checkpoints`]); the curve goes into the
            model card and `scaling_coef_search.json`, the chosen λ into `magmax_config.yaml`.
        density (`float`, *optional*):
            `ties` only: fraction of each task vector kept, in (0, 1]. Defaults to 0.2.
        seed (`int`, *optional*):
            `random_mix` only: the seed. Defaults to 0. Tensor number `i` (in sorted name order, floating tensors
            only) uses `seed + i`.
        dtype (`str`, *optional*):
            Output dtype of floating tensors: `float32`, `float16` or `bfloat16`. Defaults to each tensor's dtype in
            the base. The math is done in fp32 (fp64 for fp64 weights) whatever the dtype.
        device (`str`, *optional*, defaults to `"cpu"`):
            `cpu` or `cuda` (`cuda:N`): where the math runs.
        max_shard_size (`int` or `str`, *optional*, defaults to `"5GB"`):
            Largest output shard, like `transformers`: `"5GB"`, `"500MB"`, `"2GiB"` or a number of bytes.
        overwrite (`bool`, *optional*, defaults to `False`):
            Replace a non-empty `output_dir` (atomically: the old one is removed only once the new one is in place).
        allow_non_finite (`bool`, *optional*, defaults to `False`):
            Merge even if an input holds NaN or Inf (by default that is an error naming the tensor and the file).
        strict_config (`bool`, *optional*, defaults to `True`):
            Refuse models whose `config.json` differs from the base's in a non-benign key (names, dtypes, label
            maps, dropout and token ids may differ). A different `model_type` is always refused.
        push_to_hub (`str`, *optional*):
            A Hub repo id to upload the merged model and its card to, after it is complete on disk. If the upload
            fails the local output is kept and a [`~hf_magmax.hub.HubPushError`] says so.
        private (`bool`, *optional*, defaults to `False`):
            Create the Hub repo as private.
        token (`str` or `bool`, *optional*):
            Hub token for downloading inputs and pushing; defaults to the usual `HF_TOKEN` / saved login.
        show_progress (`bool`, *optional*, defaults to `True`):
            Show a progress bar over tensors (also off with `HF_HUB_DISABLE_PROGRESS_BARS=1`).
        score_fn (`Callable[[PreTrainedModel], float]`, *optional*):
            With `scaling_coef="auto"`: scores a merged model on validation data (higher is better).
        scaling_coef_grid (`Sequence[float]`, *optional*):
            With `scaling_coef="auto"`: the candidate λ, defaults to 0.1, 0.2, …, 1.0.

    Returns:
        `Path`: the output directory.

    Example:

    ```python
    >>> from hf_magmax import merge_checkpoints
    >>> merge_checkpoints("ckpt/base", ["ckpt/task1", "ckpt/task2"], "ckpt/merged", method="magmax")  # doctest: +SKIP
    PosixPath('ckpt/merged')
    ```
    """
    # -- 1. arguments ------------------------------------------------------------------------------------------------
    method = check_merge_method(method)
    if isinstance(models, (str, os.PathLike)):
        raise TypeError("`models` must be a list of model paths or Hub repo ids, not a single string.")
    models = [str(m) for m in models]
    if not models:
        raise ValueError("`models` is empty: pass at least one fine-tuned model to merge into the base.")
    if density is not None:
        check_density(density)
        if method != "ties":
            logger.warning("`density` only applies to `ties`; ignored for `%s`.", method)
    if seed is not None and method != "random_mix":
        logger.warning("`seed` only applies to `random_mix`; ignored for `%s`.", method)
    density = 0.2 if density is None else float(density)
    seed = 0 if seed is None else int(seed)
    auto_scaling = isinstance(scaling_coef, str) and scaling_coef == "auto"  # λ chosen by score_fn, see step 2b
    if auto_scaling:
        from .scaling import DEFAULT_SCALING_COEF_GRID, check_scaling_coef_grid

        if not callable(score_fn):
            raise ValueError(
                "`scaling_coef='auto'` needs `score_fn`, a callable `score_fn(model) -> float` that scores a merged "
                "model on validation data; or pass a number as `scaling_coef`."
            )
        scaling_coef_grid = check_scaling_coef_grid(scaling_coef_grid or DEFAULT_SCALING_COEF_GRID)
        scaling_coef = scaling_coef_grid[0]  # placeholder until step 2b
    if scaling_coef is None:
        scaling_coef = DEFAULT_SCALING_COEFS[method]
    if isinstance(scaling_coef, bool) or not isinstance(scaling_coef, (int, float)) or not math.isfinite(scaling_coef):
        raise ValueError(f"`scaling_coef` must be a finite number, got {scaling_coef!r}.")
    scaling_coef = float(scaling_coef)
    out_dtype = _normalize_dtype(dtype)
    shard_bytes = parse_size(max_shard_size)
    output = Path(output_dir).expanduser()
    check_output_dir(output, overwrite)
    device = _check_device(device)

    # -- 2. inputs: configs and tensor tables, no weights read yet ----------------------------------------------------
    names = [str(base), *models]
    checkpoints = [_Checkpoint(name=n, path=_resolve(n, token=token, weights=False), config=None) for n in names]
    for checkpoint in checkpoints:
        checkpoint.config = _read_config(checkpoint.path)
    base_ckpt, model_ckpts = checkpoints[0], checkpoints[1:]
    for model in model_ckpts:
        _compare_configs(base_ckpt, model, strict_config)
    hub_pending = []
    for checkpoint in checkpoints:
        is_remote = not Path(checkpoint.name).expanduser().exists()
        if is_remote and _hub_tensor_table(checkpoint, token):
            hub_pending.append(checkpoint)  # validated from remote headers first, downloaded below
            continue
        if is_remote:  # no remote headers: download now and validate from the local files
            checkpoint.path = _resolve(checkpoint.name, token=token, weights=True)
        _read_tensor_table(checkpoint)
    _plan_names(base_ckpt, model_ckpts)
    for checkpoint in checkpoints:
        if output.resolve() == checkpoint.path.resolve() or output.resolve() in checkpoint.path.resolve().parents:
            raise ValueError(
                f"`output_dir` {output} would replace the input model {checkpoint.name!r}: choose another."
            )
    for checkpoint in hub_pending:
        checkpoint.path = _resolve(checkpoint.name, token=token, weights=True)
        checkpoint.tensors.clear()
        _read_tensor_table(checkpoint)
    plans = _plan_names(base_ckpt, model_ckpts)
    search = None
    if auto_scaling:  # -- 2b. choose λ with score_fn (hf_magmax.scaling), then merge with it as usual
        from .scaling import select_scaling_coef_for_checkpoints

        method_kwargs = {"ties": {"density": density}, "random_mix": {"seed": seed}}.get(method, {})
        search = select_scaling_coef_for_checkpoints(
            base_ckpt.path,
            [m.path for m in model_ckpts],
            score_fn,
            method,
            scaling_coef_grid,
            device=device,
            **method_kwargs,
        )
        scaling_coef = search.best

    # -- 3. stream the merge into a staging directory -----------------------------------------------------------------
    try:
        with staged_output_dir(output, overwrite) as staging:
            num_parameters = _stream_merge(
                base_ckpt,
                model_ckpts,
                plans,
                staging,
                method=method,
                scaling_coef=scaling_coef,
                method_kwargs={"ties": {"density": density}, "random_mix": {"seed": seed}}.get(method, {}),
                out_dtype=out_dtype,
                device=device,
                shard_bytes=shard_bytes,
                allow_non_finite=allow_non_finite,
                show_progress=show_progress,
            )
            _copy_base_files(base_ckpt, staging)
            if out_dtype is not None and (staging / "config.json").is_file():
                config = json.loads((staging / "config.json").read_text())
                config["dtype"] = out_dtype
                config.pop("torch_dtype", None)
                (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            merge_config = _merge_config_dict(
                base=str(base),
                models=models,
                method=method,
                scaling_coef=scaling_coef,
                density=density,
                seed=seed,
                dtype=out_dtype,
                device=device,
                max_shard_size=max_shard_size,
                output=str(output_dir),
                allow_non_finite=allow_non_finite,
                strict_config=strict_config,
            )
            import yaml

            from .hub import write_model_card

            (staging / MERGE_CONFIG_NAME).write_text(yaml.safe_dump(merge_config, sort_keys=False))
            metadata, body = _model_card(merge_config, num_parameters)
            if search is not None:
                from .scaling import scaling_curve_markdown

                body = body.replace("## Configuration", f"{scaling_curve_markdown(search)}\n\n## Configuration", 1)
                (staging / "scaling_coef_search.json").write_text(json.dumps(search.to_dict(), indent=2) + "\n")
            write_model_card(staging, metadata, body)
    finally:
        for checkpoint in checkpoints:
            checkpoint.close()
    logger.info("merged %d model(s) into %s with %s (scaling_coef=%s)", len(models), output, method, scaling_coef)

    # -- 4. push ----------------------------------------------------------------------------------------------------
    if push_to_hub:
        from .hub import push_to_hub as _push

        _push(output, push_to_hub, private=private, token=token, commit_message=f"hf_magmax {method} merge")
    return output


def _stream_merge(
    base: _Checkpoint,
    models: Sequence[_Checkpoint],
    plans: Sequence[Mapping[str, str]],
    staging: Path,
    *,
    method: str,
    scaling_coef: float,
    method_kwargs: Mapping[str, Any],
    out_dtype: str | None,
    device: str,
    shard_bytes: int,
    allow_non_finite: bool,
    show_progress: bool,
) -> int:
    """The merge loop: one tensor at a time, written straight into planned shards. Returns the parameter count."""
    import torch
    from huggingface_hub.utils import tqdm

    from .merging import RandomMixMerge, TiesMerge, make_online_merge, ties_trim_threshold

    names = sorted(base.tensors)
    entries = []
    for name in names:
        info = base.tensors[name]
        dtype = out_dtype if (out_dtype is not None and info.dtype in _FLOATING) else info.dtype
        entries.append((name, dtype, info.shape))
    shards = _plan_shards(entries, shard_bytes)
    entry_by_name = {entry[0]: entry for entry in entries}
    num_shards = len(shards)
    shard_names = (
        [SAFE_WEIGHTS_NAME]
        if num_shards == 1
        else [f"model-{i:05d}-of-{num_shards:05d}.safetensors" for i in range(1, num_shards + 1)]
    )
    weight_map = {name: shard_names[i] for i, shard in enumerate(shards) for name in shard}

    def check_finite(tensor, name: str, checkpoint: _Checkpoint, source: str) -> None:
        if allow_non_finite:
            return
        # one cheap pass: any NaN/Inf makes the sum non-finite; only then look closer (a finite sum may overflow)
        if math.isfinite(float(tensor.sum())):
            return
        if not bool(torch.isfinite(tensor).all()):
            kind = "NaN" if bool(torch.isnan(tensor).any()) else "Inf"
            raise ValueError(
                f"tensor {name!r} of model {checkpoint.name!r} ({checkpoint.tensors[source].file}) holds {kind} "
                "values: fix the checkpoint, or pass `allow_non_finite=True` (--allow-non-finite) to merge anyway."
            )

    def task_vector(view: Any, theta_0: Any, block: slice, name: str, model: Any, source: str) -> torch.Tensor:
        """τ_t = θ_t − θ_0 for rows `block`, in the compute dtype (`theta_0` already there)."""
        theta_t = view[block]
        delta = theta_t.to(device=device, dtype=theta_0.dtype)
        check_finite(delta, name, model, source)
        if delta.data_ptr() != theta_t.data_ptr():  # a fresh copy: subtract in place
            return delta.sub_(theta_0)
        return delta - theta_0  # `theta_t` may be a view of a memory-mapped file: never write into it

    def read_base(views: Sequence[Any], block: slice, name: str) -> torch.Tensor:
        theta_0 = views[0][block]
        compute = torch.float64 if theta_0.dtype == torch.float64 else torch.float32
        theta_0 = theta_0.to(device=device, dtype=compute)
        check_finite(theta_0, name, base, name)
        return theta_0

    def ties_thresholds(name: str, views: Sequence[Any]) -> list[float | None]:
        """Each task vector's TIES trim threshold over the whole tensor (one τ_t in memory at a time), so that the
        merge itself can go through the tensor in row blocks."""
        theta_0 = read_base(views, slice(None), name)
        thresholds = []
        for model, plan, view in zip(models, plans, views[1:]):
            delta = task_vector(view, theta_0, slice(None), name, model, plan[name])
            thresholds.append(ties_trim_threshold(delta, method_kwargs["density"]))
            del delta
        return thresholds

    def merge_block(name: str, views: Sequence[Any], block: slice, kwargs: Mapping[str, Any]):
        """θ_0 + λ · merge(θ_1 − θ_0, ..., θ_T − θ_0) for rows `block` of one tensor (`views`: θ_0, θ_1, ..., θ_T)."""
        theta_0 = read_base(views, block, name)
        # ties gets the whole-tensor trim thresholds, so that a block merges exactly as the whole tensor would
        if method == "ties":
            accumulator = TiesMerge(**kwargs)
        elif method == "random_mix":
            accumulator = RandomMixMerge(**kwargs)
        else:
            accumulator = make_online_merge(method, **kwargs)
        for model, plan, view in zip(models, plans, views[1:]):
            accumulator.update(task_vector(view, theta_0, block, name, model, plan[name]))
        return theta_0 + accumulator.result() * scaling_coef

    total_size = 0
    num_parameters = 0
    progress = tqdm(total=len(names), desc="Merging tensors", unit="tensor", disable=not show_progress)
    writer: _ShardWriter | None = None
    shard_index = -1
    shard_iter: Iterator[int] = iter(range(num_shards))
    try:
        with torch.no_grad():
            for name in names:
                if writer is None or writer._next == len(writer.expected):
                    if writer is not None:
                        writer.close()
                    shard_index = next(shard_iter)
                    writer = _ShardWriter(
                        staging / shard_names[shard_index], [entry_by_name[n] for n in shards[shard_index]]
                    )
                    total_size += writer.nbytes
                _, dtype, shape = entry_by_name[name]
                if base.tensors[name].dtype not in _FLOATING:  # integer / bool buffers are taken from the base
                    theta_0 = base.get(name)
                    num_parameters += theta_0.numel()
                    writer.write(name, theta_0)
                    progress.update(1)
                    continue
                num_parameters += math.prod(shape)
                kwargs = dict(method_kwargs)
                if method == "random_mix":  # seeded by the tensor's name, as every consumer does
                    kwargs["name"] = name
                # element-wise methods stream row blocks of ~_CHUNK_ELEMENTS; so does ties, once each task vector's
                # trim threshold is known (one pass over the whole tensor); random_mix (one random stream per tensor)
                # needs whole tensors
                row = math.prod(shape[1:])
                # lazy views of the memory-mapped inputs: only the rows of the current block are read
                views = [base.get(name)] + [model.get(plan[name]) for model, plan in zip(models, plans)]
                if method in _BLOCKWISE and len(shape) >= 1 and row > 0:
                    step = max(1, _CHUNK_ELEMENTS // row)
                    blocks = [slice(i, min(i + step, shape[0])) for i in range(0, shape[0], step)]
                else:
                    blocks = [slice(None)]
                if method == "ties":
                    kwargs["thresholds"] = ties_thresholds(name, views)
                writer.begin(name)
                for block in blocks:
                    merged = merge_block(name, views, block, kwargs)
                    writer.write_part(merged.to(getattr(torch, dtype)))
                    del merged
                writer.end()
                del views
                progress.update(1)
        if writer is not None:
            writer.close()
    finally:
        progress.close()
        if writer is not None and not writer._handle.closed:
            writer._handle.close()
    if num_shards > 1:
        index = {"metadata": {"total_parameters": num_parameters, "total_size": total_size}, "weight_map": weight_map}
        (staging / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return num_parameters
