# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""File names, dtype tables, sizes and names shared by the readers and writers (no torch import)."""

from __future__ import annotations

import os
import re
from pathlib import Path


SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_NAME = "pytorch_model.bin"
WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"
#: Suffixes of weight files: never copied by [`copy_non_weight_files`], not downloaded for a config-only look.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")

# safetensors dtype names <-> torch dtype names (no torch import at module level)
ST_DTYPES = {
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
_TORCH_TO_ST = {v: k for k, v in ST_DTYPES.items()}
ITEMSIZE = {
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
FLOATING = {"float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"}


def expand_path(path: str | os.PathLike) -> Path:
    """`Path(path).expanduser()`, with an unknown user (`~nouser/x`) a `FileNotFoundError` naming the path."""
    try:
        return Path(path).expanduser()
    except RuntimeError as err:  # "Could not determine home directory"
        raise FileNotFoundError(
            f"path {os.fspath(path)!r} cannot be expanded ({err}): pass an existing path."
        ) from None


def input_identity(name: str | os.PathLike) -> str:
    """What makes two inputs one: an existing local path resolved (relative, `~`, a trailing `/`, symbolic links),
    any other name (a Hub repo id) as given."""
    try:
        path = expand_path(name)
    except FileNotFoundError:  # `~nouser/x`: no local path here (the reader says so when it opens the input)
        return os.fspath(name)
    return os.path.realpath(path) if path.exists() else os.fspath(name)


def is_hub_id(name: str) -> bool:
    """Whether `name` reads as a Hub repo id (`name` or `namespace/name`) rather than a local path."""
    return bool(re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name)) and not name.startswith((".", "-")) and ".." not in name


def absolute_name(name: str | os.PathLike | None) -> str | None:
    """How an input is recorded on this machine (the `magmax_config.yaml` beside the weights): a local path made
    absolute (`~` expanded, links kept), so that the file re-runs from any working directory; a Hub repo id as given.

    Example:

    ```python
    >>> import os
    >>> from hf_magmax.io import absolute_name
    >>> absolute_name("org/model"), absolute_name("/data/ckpt/./task1") == os.path.normpath("/data/ckpt/task1")
    ('org/model', True)
    ```
    """
    local = _local_path(name)
    return os.path.abspath(local) if local is not None else name if name is None else os.fspath(name)


def public_name(name: str | os.PathLike | None) -> str | None:
    """How an input is named where others can read it (a model card, a pushed `magmax_config.yaml`): a Hub repo id
    as given, a local path by its last component only (`/home/alice/runs/task1` -> `task1`), never the path itself.

    Example:

    ```python
    >>> from hf_magmax.io import public_name
    >>> public_name("org/model"), public_name("/home/alice/ckpt/task1/"), public_name("./ckpt/base")
    ('org/model', 'task1', 'base')
    ```
    """
    local = _local_path(name)
    if local is None:
        return name if name is None else os.fspath(name)
    return Path(os.path.normpath(local)).name or os.fspath(name)


def _local_path(name: str | os.PathLike | None) -> str | None:
    """`name` as a local path (`~` expanded), or `None` for no name or a Hub repo id that is not a local path."""
    if name is None:
        return None
    name = os.fspath(name)
    local = os.path.expanduser(name)
    return None if is_hub_id(name) and not os.path.exists(local) else local


def parse_size(size: int | str, name: str = "max_shard_size") -> int:
    """Parse a size like `"5GB"`, `"500MB"`, `"2GiB"`, `"100kB"` or a number of bytes into bytes.

    Decimal units (kB, MB, GB, TB) are powers of 1000 and binary units (KiB, MiB, GiB, TiB) powers of 1024, as in
    `transformers` (huggingface_hub's `parse_size_to_int` knows only the decimal ones, hence this one).

    Example:

    ```python
    >>> from hf_magmax.io import parse_size
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
