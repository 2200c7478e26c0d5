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


def non_weight_files(source: str | os.PathLike, skip_names: Iterable[str] = ()) -> list[str]:
    """The relative paths of a checkpoint folder's other files (config, generation config, tokenizer, sub-folders such
    as `1_Pooling/`): everything but weights, hidden files and the top-level `skip_names`, sorted.

    A symbolic link is never followed out of the folder: a link that resolves inside `source` is listed (and copied
    as a plain file), a link that points outside it, or nowhere, is refused with an error naming the link, so that a
    cloned repo's `notes.txt -> ~/.ssh/id_rsa` can never reach an output or the Hub. The one exception is a Hub cache
    snapshot (`models--org--name/snapshots/<rev>/`), whose files are links into the same repo's `blobs/`.

    Raises:
        `ValueError` for a link out of the folder (or a dangling one), naming it and the fix.
    """
    source = Path(source)
    allowed = link_roots(source)
    skip = set(skip_names)
    found = []
    for folder, dirs, files in os.walk(source, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files) + [d for d in dirs if (Path(folder) / d).is_symlink()]:
            path = Path(folder) / name
            rel = path.relative_to(source)
            if name.startswith(".") or name.endswith(WEIGHT_SUFFIXES) or (len(rel.parts) == 1 and name in skip):
                continue
            if path.is_symlink():
                resolve_inside(path, source, allowed)
                if path.is_dir():
                    continue  # a link to a folder inside: its files are listed where they really are
            found.append(rel.as_posix())
    return sorted(found)


def link_roots(source: str | os.PathLike) -> list[Path]:
    """Where a link inside the folder `source` may point: `source` itself, and a Hub cache snapshot's `blobs/`."""
    root = Path(source).resolve()
    if root.parent.name == "snapshots" and (root.parent.parent / "blobs").is_dir():  # huggingface_hub's cache layout
        return [root, (root.parent.parent / "blobs").resolve()]
    return [root]


def resolve_inside(path: Path, source: Path, allowed: list[Path] | None = None) -> Path:
    """`path` (inside the folder `source`) resolved, if it stays inside `allowed` (defaults to
    [`link_roots`]`(source)`); else a `ValueError` naming the link. The one check behind every copy and push."""
    if allowed is None:
        allowed = link_roots(source)
    rel = path.relative_to(source)
    try:
        target = path.resolve(strict=True)
    except (OSError, RuntimeError):  # dangling, or a loop
        raise ValueError(
            f"{path} is a symbolic link that points nowhere ({os.readlink(path)!r}): hf_magmax copies the other files "
            f"of {source} into the output, so remove the link or replace it with the file."
        ) from None
    if not any(target == root or root in target.parents for root in allowed):
        raise ValueError(
            f"{path} is a symbolic link to {os.readlink(path)!r}, outside {source}: hf_magmax never copies a file "
            f"from outside an input folder into an output (it could be published). Remove the link, or replace it "
            f"with a copy of the file if `{rel.as_posix()}` belongs to the model."
        )
    return target


def copy_non_weight_files(
    source: str | os.PathLike, target: str | os.PathLike, skip_names: Iterable[str] = ()
) -> list[str]:
    """Copy a checkpoint's other files ([`non_weight_files`]: config, generation config, tokenizer, sub-folders
    such as `1_Pooling/`) from `source` to `target`, each as a plain file.

    Never copies `target` into itself (a target inside `source` is skipped), never follows a link out of `source`
    (refused, see [`non_weight_files`]). Returns the copied relative paths.
    """
    source, target = Path(source), Path(target)
    target_resolved = target.resolve()
    copied = []
    for rel in non_weight_files(source, skip_names):
        resolved = (source / rel).resolve()
        if resolved == target_resolved or target_resolved in resolved.parents:
            continue
        copy_side_file(source, rel, target)
        copied.append(rel)
    return copied


def copy_side_file(source: str | os.PathLike, rel: str, target: str | os.PathLike) -> Path:
    """Copy `source/rel` to `target/rel` as a plain file, refusing a link out of `source` (see
    [`non_weight_files`]); checked at the copy itself, so a folder changed since it was listed cannot leak a file."""
    source = Path(source)
    resolved = resolve_inside(source / rel, source)
    destination = Path(target) / rel
    destination.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(resolved, destination)  # the checked file's content, never a link
    shutil.copystat(resolved, destination)
    return destination
