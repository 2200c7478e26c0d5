# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""Writing checkpoints: safetensors shards planned up front and streamed block by block; the other files."""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .formats import ITEMSIZE, SAFE_WEIGHTS_INDEX_NAME, ST_DTYPES, WEIGHT_SUFFIXES


_TORCH_TO_ST = {v: k for k, v in ST_DTYPES.items()}


# ---------------------------------------------------------------------------------------------------------------------
# writing: streamed safetensors shards
# ---------------------------------------------------------------------------------------------------------------------


class ShardedSafetensorsWriter:
    """Write a checkpoint as safetensors shards whose layout is planned up front, tensor by tensor, block by block.

    The plan comes from huggingface_hub's shard planner (`split_state_dict_into_shards_factory`, the one
    `save_torch_state_dict` uses) over the tensors' sizes; the writing is ours: each shard's header is known before its
    first byte, so tensors stream to disk in row blocks and no shard is ever held in memory (neither huggingface_hub
    nor safetensors can write a file without all its tensors in memory). Tensors must be written in [`order`].

    Args:
        directory (`Path`): where the shards (and the index, when there are several) go.
        entries (`list[tuple[str, str, tuple[int, ...]]]`): `(name, dtype name, shape)` of every tensor.
        max_shard_size (`int`): the largest shard in bytes (a tensor larger than that gets a shard of its own).
        filename_pattern (`str`, *optional*, defaults to `"model{suffix}.safetensors"`): the shards' file names.

    Example:

    ```python
    >>> import torch, tempfile, pathlib
    >>> from hf_magmax.io import ShardedSafetensorsWriter
    >>> out = pathlib.Path(tempfile.mkdtemp())
    >>> with ShardedSafetensorsWriter(out, [("w", "float32", (2, 3))], 10**9) as writer:
    ...     writer.write("w", torch.zeros(2, 3))
    >>> sorted(p.name for p in out.iterdir())
    ['model.safetensors']
    ```
    """

    def __init__(
        self,
        directory: Path,
        entries: Sequence[tuple[str, str, tuple[int, ...]]],
        max_shard_size: int,
        filename_pattern: str = "model{suffix}.safetensors",
    ):
        from huggingface_hub import split_state_dict_into_shards_factory

        self.directory = Path(directory)
        self.entries = {name: (name, dtype, tuple(shape)) for name, dtype, shape in entries}
        split = split_state_dict_into_shards_factory(
            self.entries,
            get_storage_size=lambda entry: math.prod(entry[2]) * ITEMSIZE[entry[1]],
            get_storage_id=lambda entry: None,
            filename_pattern=filename_pattern,
            max_shard_size=max_shard_size,
        )
        self.is_sharded = split.is_sharded
        self.shards: list[tuple[str, list[str]]] = list(split.filename_to_tensors.items())
        self.weight_map = dict(split.tensor_to_filename)
        self.total_size = int(split.metadata["total_size"])
        self._queue: Iterator[tuple[str, list[str]]] = iter(self.shards)
        self._handle = None
        self._pending: list[tuple[str, str, tuple[int, ...], int]] = []
        self._current: tuple[str, int, int] | None = None  # name, bytes expected, bytes written
        self.num_parameters = 0

    @property
    def order(self) -> list[str]:
        """The tensor names in the order they must be written."""
        return [name for _, names in self.shards for name in names]

    def _open_next_shard(self) -> None:
        filename, names = next(self._queue)
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        self._pending = []
        for name in names:
            _, dtype, shape = self.entries[name]
            nbytes = math.prod(shape) * ITEMSIZE[dtype]
            header[name] = {
                "dtype": _TORCH_TO_ST[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            self._pending.append((name, dtype, shape, nbytes))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
        self._handle = open(self.directory / filename, "wb")
        self._handle.write(struct.pack("<Q", len(raw)) + raw)
        self._filename = filename

    def begin(self, name: str) -> None:
        """Start the next tensor; its bytes follow with [`write_part`] calls, in row-major order, then [`end`]."""
        if self._current is not None:
            raise RuntimeError(f"internal error: tensor {self._current[0]!r} was not ended before {name!r}.")
        if not self._pending:
            if self._handle is not None:
                self._handle.close()
            self._open_next_shard()
        expected, _, shape, nbytes = self._pending[0]
        if expected != name:
            raise RuntimeError(f"internal error: shard {self._filename} expects {expected!r} next, not {name!r}.")
        self._current = (name, nbytes, 0)
        self.num_parameters += math.prod(shape)

    def write_part(self, tensor) -> None:
        """The next rows of the current tensor (any shape; its dtype must be the planned one)."""
        import torch

        name, nbytes, written = self._current
        dtype = self._pending[0][1]
        if str(tensor.dtype).removeprefix("torch.") != dtype:
            raise RuntimeError(f"internal error: tensor {name!r} must be written as {dtype}, got {tensor.dtype}.")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._handle.write(memoryview(data.numpy()))
        self._current = (name, nbytes, written + data.numel())

    def end(self) -> None:
        name, nbytes, written = self._current
        if written != nbytes:
            raise RuntimeError(f"internal error: tensor {name!r} got {written} bytes instead of {nbytes}.")
        self._pending.pop(0)
        self._current = None

    def write(self, name: str, tensor) -> None:
        """Write one whole tensor."""
        self.begin(name)
        if tuple(tensor.shape) != self.entries[name][2]:
            raise RuntimeError(f"internal error: tensor {name!r} has shape {tuple(tensor.shape)}.")
        self.write_part(tensor)
        self.end()

    def close(self) -> None:
        """Finish the last shard and write the index (several shards only). Every planned tensor must be written."""
        if self._handle is not None:
            self._handle.close()
        if self._pending or self._current is not None or next(self._queue, None) is not None:
            raise RuntimeError("internal error: the checkpoint was closed before every planned tensor was written.")
        if self.is_sharded:
            index = {
                "metadata": {"total_parameters": self.num_parameters, "total_size": self.total_size},
                "weight_map": dict(sorted(self.weight_map.items())),
            }
            (self.directory / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    def __enter__(self) -> ShardedSafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._handle is not None:
            self._handle.close()


# ---------------------------------------------------------------------------------------------------------------------
# side files and models
# ---------------------------------------------------------------------------------------------------------------------


def copy_non_weight_files(
    source: str | os.PathLike, target: str | os.PathLike, skip_names: Iterable[str] = ()
) -> list[str]:
    """Copy a checkpoint's other files (config, generation config, tokenizer, sub-folders such as `1_Pooling/`) from
    `source` to `target`: everything but weights, hidden files and the top-level `skip_names`.

    Never copies `target` into itself (a target inside `source` is skipped). Returns the copied relative paths.
    """
    source, target = Path(source), Path(target)
    target_resolved = target.resolve()
    skip = set(skip_names)
    copied = []
    for src in sorted(source.rglob("*")):
        rel = src.relative_to(source)
        if any(part.startswith(".") for part in rel.parts) or not src.is_file():
            continue
        if src.name.endswith(WEIGHT_SUFFIXES) or (len(rel.parts) == 1 and src.name in skip):
            continue
        if src.resolve() == target_resolved or target_resolved in src.resolve().parents:
            continue
        destination = target / rel
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, destination)  # follows symlinks (Hub cache snapshots)
        copied.append(rel.as_posix())
    return copied
