# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""Reading checkpoints: headers first (safetensors, `.bin` memory-mapped), weights lazily; `load_pretrained`."""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from .formats import (
    FLOATING,
    ITEMSIZE,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    ST_DTYPES,
    WEIGHT_SUFFIXES,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    expand_path,
    is_hub_id,
)


logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------------
# reading checkpoints (headers first, weights later)
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class TensorInfo:
    """Where one tensor of a checkpoint lives and what it is, read from a header (no weights)."""

    file: Path
    dtype: str  # torch dtype name, e.g. "float32"
    shape: tuple[int, ...]

    @property
    def is_floating(self) -> bool:
        return self.dtype in FLOATING


def resolve_checkpoint(name: str, *, token: str | bool | None = None, weights: bool = True) -> Path:
    """A local directory, or a Hub repo id downloaded with `snapshot_download` (weights only when `weights`)."""
    path = expand_path(name)
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(
                f"model {name!r} is a file: pass the directory that holds config.json and the weights."
            )
        return path
    if not is_hub_id(name):
        raise FileNotFoundError(f"model directory {name!r} does not exist.")
    from huggingface_hub import snapshot_download

    patterns = {"ignore_patterns": [f"*{s}" for s in WEIGHT_SUFFIXES]} if not weights else {}
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


def read_safetensors_header(file: Path) -> dict[str, TensorInfo]:
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
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = ST_DTYPES[entry["dtype"]]
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
        if end - start != math.prod(shape) * ITEMSIZE[dtype]:
            raise ValueError(f"corrupt safetensors file {file}: tensor {name!r} has inconsistent data offsets.")
        tensors[name] = TensorInfo(file, dtype, shape)
    return tensors


def load_bin(file: Path) -> dict:
    """A `.bin` state dict, memory-mapped and with `weights_only=True` (a pickle cannot run code)."""
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


def read_index(file: Path) -> dict[str, Path]:
    """The `weight_map` of a sharded checkpoint's index, name → shard path; every shard must lie in the directory."""
    try:
        weight_map = json.loads(file.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("`weight_map` is not a mapping")
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise ValueError(f"corrupt index file {file}: expected JSON with a `weight_map` ({err}).") from err
    out = {}
    for name, shard in weight_map.items():
        relative = PurePosixPath(str(shard))
        if relative.is_absolute() or ".." in relative.parts or "\\" in str(shard) or not relative.parts:
            raise ValueError(
                f"index file {file} maps tensor {name!r} to {shard!r}, outside the checkpoint directory: shard names "
                "must be file names in that directory. The index is corrupt or was tampered with."
            )
        out[name] = file.parent / relative
    return out


def read_config(path: Path) -> dict | None:
    """`config.json` of a checkpoint directory as a dict (`None` when there is none)."""
    file = path / "config.json"
    if not file.is_file():
        return None
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"corrupt config file {file}: {err}") from err
    if not isinstance(config, dict):
        raise ValueError(f"corrupt config file {file}: expected a JSON object.")
    return config


@dataclass
class CheckpointReader:
    """One input checkpoint: its location, config and tensor table (name → file/dtype/shape), read without weights.

    Tensors are read on demand ([`get`]: a whole tensor, [`rows`]: only the rows sliced) after [`read_tensor_table`] (local files) or
    [`read_remote_tensor_table`] (a Hub repo's headers over HTTP ranges).

    Args:
        name (`str`): the checkpoint as the user gave it (a path or a Hub repo id), named in errors.
        path (`Path`): its local directory (for a Hub id, the snapshot; possibly without weights yet).
    """

    name: str
    path: Path
    config: dict | None = None
    fmt: str = "safetensors"
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    _handles: dict[Path, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, name: str, *, token: str | bool | None = None, weights: bool = True) -> CheckpointReader:
        """Resolve `name` ([`resolve_checkpoint`]) and read its config (not its tensors yet).

        A local `.gguf` file, or a folder holding one `.gguf` file and no safetensors/`.bin` weights, gives a
        [`~hf_magmax.io.gguf.GGUFCheckpointReader`] (dequantised lazily, as transformers reads GGUF)."""
        local = expand_path(name)
        if local.exists():
            from .gguf import GGUFCheckpointReader, find_gguf_file

            gguf_file = find_gguf_file(local)
            if gguf_file is not None:
                return GGUFCheckpointReader.open_file(name, gguf_file)
        path = resolve_checkpoint(name, token=token, weights=weights)
        return cls(name=name, path=path, config=read_config(path))

    @property
    def config_file(self) -> Path:
        """Where the config was read from (named in errors)."""
        return self.path / "config.json"

    def auto_config(self):
        """The transformers config of this checkpoint (`AutoConfig.from_pretrained`: every default filled in)."""
        import transformers

        return transformers.AutoConfig.from_pretrained(str(self.path))

    def side_files(self, skip_names=()) -> list[Path]:
        """The files [`write_side_files`] copies, listed now (so that a link out of the folder is refused before any
        work, and the files can be pinned)."""
        from .writing import non_weight_files

        return [self.path / rel for rel in non_weight_files(self.path, skip_names)]

    def write_side_files(self, directory: Path, skip_names=()) -> None:
        """Copy the checkpoint's non-weight files (config, tokenizer, ...) into `directory`, except `skip_names`."""
        from .writing import copy_non_weight_files

        copy_non_weight_files(self.path, directory, skip_names=skip_names)

    @property
    def is_local(self) -> bool:
        return expand_path(self.name).exists()

    def weight_files(self) -> list[Path]:
        return sorted({info.file for info in self.tensors.values()})

    def input_files(self) -> list[Path]:
        """Every file the merge reads from this checkpoint: its weight files, their index and `config.json`."""
        extra = [self.path / n for n in ("config.json", SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_INDEX_NAME)]
        return self.weight_files() + [p for p in extra if p.is_file()]

    def read_tensor_table(self) -> None:
        """Fill `tensors` from the headers of the files `from_pretrained` would load.

        Like transformers: `model.safetensors`, else `model.safetensors.index.json`, else `pytorch_model.bin`, else
        its index (files beside the chosen one that `from_pretrained` ignores are named in a warning); else loose
        `*.safetensors` files.
        """
        path = self.path
        self.tensors.clear()
        chosen = next(
            (
                n
                for n in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)
                if (path / n).is_file()
            ),
            None,
        )
        if chosen is None:
            self._read_loose_safetensors()
            return
        ignored = [
            n
            for n in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)
            if n != chosen and (path / n).is_file() and not (chosen == SAFE_WEIGHTS_NAME and n == WEIGHTS_NAME)
        ]
        if ignored:
            logger.warning(
                "model %r has %s and also %s: reading %s, as transformers' from_pretrained does; the other "
                "file(s) are ignored (a stale leftover? remove them to avoid confusion).",
                self.name,
                chosen,
                ", ".join(ignored),
                chosen,
            )
        self.fmt = "safetensors" if "safetensors" in chosen else "bin"
        weight_map = read_index(path / chosen) if chosen.endswith(".index.json") else None
        files = sorted(set(weight_map.values())) if weight_map is not None else [path / chosen]
        for file in files:
            table = read_safetensors_header(file) if self.fmt == "safetensors" else self._bin_table(file)
            if weight_map is not None:
                listed = {name for name, shard in weight_map.items() if shard == file}
                absent = sorted(listed - set(table))
                if absent:
                    raise ValueError(
                        f"index {path / chosen} lists tensor {absent[0]!r} in {file.name}, but that file does not "
                        "hold it: the checkpoint is corrupt."
                    )
                table = {name: info for name, info in table.items() if name in listed}
            self.tensors.update(table)

    def _bin_table(self, file: Path) -> dict[str, TensorInfo]:
        state = load_bin(file)
        self._handles[file] = state
        return {
            name: TensorInfo(file, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape))
            for name, tensor in state.items()
            if hasattr(tensor, "shape") and hasattr(tensor, "dtype")
        }

    def _read_loose_safetensors(self) -> None:
        loose = sorted(p for p in self.path.glob("*.safetensors") if p.name != "adapter_model.safetensors")
        if not loose:
            raise FileNotFoundError(
                f"no model weights in {self.path}: expected {SAFE_WEIGHTS_NAME}, {SAFE_WEIGHTS_INDEX_NAME}, "
                f"{WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME} (save the model with `save_pretrained`)."
            )
        self.fmt = "safetensors"
        for file in loose:
            header = read_safetensors_header(file)
            clash = sorted(set(header) & set(self.tensors))
            if clash:
                raise ValueError(
                    f"tensor {clash[0]!r} appears in several files of {self.path} and no index says which."
                )
            self.tensors.update(header)

    def read_remote_tensor_table(self, token: str | bool | None = None) -> bool:
        """For a Hub model, read the safetensors headers remotely (HTTP range requests) before downloading weights.

        Returns `False` when that is not possible (offline, not safetensors, no range support)."""
        from huggingface_hub import HfApi, constants

        if constants.is_offline_mode():
            return False
        try:
            metadata = HfApi(token=token).get_safetensors_metadata(self.name)
        except Exception as err:  # not safetensors, or no range support: validate after the download instead
            logger.debug("could not read remote safetensors headers of %s: %s", self.name, err)
            return False
        self.tensors.clear()
        for file_name, file_meta in metadata.files_metadata.items():
            for name, info in file_meta.tensors.items():
                dtype = ST_DTYPES.get(info.dtype, info.dtype.lower())
                self.tensors[name] = TensorInfo(self.path / file_name, dtype, tuple(info.shape))
        return True

    def get(self, name: str):
        """One whole tensor (read from the memory-mapped file; for `.bin` a view of it: never write into it). For
        block-wise reading use [`rows`]."""
        file = self.tensors[name].file
        handle = self._handles.get(file)
        if handle is None:
            handle = self._handles[file] = self._open(file)
        if self.fmt == "safetensors":
            return handle.get_tensor(name)
        return handle[name]

    def rows(self, name: str):
        """One tensor as a lazily sliced view: `view[a:b]` reads only rows `a:b` from the file (safetensors'
        `get_slice`; the memory-mapped tensor for `.bin`), `view[...]` the whole tensor."""
        file = self.tensors[name].file
        handle = self._handles.get(file)
        if handle is None:
            handle = self._handles[file] = self._open(file)
        if self.fmt == "safetensors":
            return handle.get_slice(name)
        return handle[name]

    def _open(self, file: Path):
        if self.fmt == "safetensors":
            from safetensors import safe_open

            try:
                return safe_open(str(file), framework="pt", device="cpu")
            except Exception as err:  # safetensors raises its own error types
                raise ValueError(f"cannot open safetensors file {file}: {err}") from err
        return load_bin(file)

    def close(self) -> None:
        self._handles.clear()


class InputChangedError(ValueError):
    """An input file of a merge changed after it was checked (rewritten, truncated, replaced or removed)."""


class PinnedFiles:
    """The input files of a merge, pinned when they were checked: device, inode, size and modification time (ns).

    Weights are read lazily through memory maps, so a file rewritten in place, or replaced by a rename (a trainer
    still saving into the folder), would contribute old tensors before the change and new ones after; a config
    edited meanwhile would be copied beside weights it does not describe. [`check`] compares the files with their
    pins: the merge checks the files of each tensor before reading it, and every file once more before the commit,
    so a changed input is one error naming the file, and nothing is written.

    Example:

    ```python
    >>> from hf_magmax.io import PinnedFiles
    >>> pins = PinnedFiles()
    >>> pins.add("ckpt/base/model.safetensors")  # doctest: +SKIP
    >>> pins.check()  # doctest: +SKIP
    ```
    """

    def __init__(self) -> None:
        self.stamps: dict[Path, tuple[int, int, int, int] | None] = {}

    def __len__(self) -> int:
        return len(self.stamps)

    @staticmethod
    def _stamp(path: Path) -> tuple[int, int, int, int] | None:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def add(self, path: str | os.PathLike) -> None:
        """Pin `path` as it is now (following links, as reading it does)."""
        path = Path(path)
        if path not in self.stamps:
            self.stamps[path] = self._stamp(path)

    def check(self, paths: Iterable[str | os.PathLike] | None = None) -> None:
        """Raise [`InputChangedError`] naming the first of `paths` (default: every pinned file) that changed."""
        for path in self.stamps if paths is None else map(Path, paths):
            if path not in self.stamps:
                continue
            then, now = self.stamps[path], self._stamp(path)
            if now == then:
                continue
            if now is None:
                what = "was removed"
            elif then is None:
                what = "appeared"
            elif now[:2] != then[:2]:
                what = "was replaced by another file (renamed over it)"
            elif now[2] < then[2]:
                what = f"was truncated from {then[2]} to {now[2]} bytes"
            else:
                what = f"was rewritten ({then[2]} -> {now[2]} bytes, modified again)"
            raise InputChangedError(
                f"input file {path} {what} during the merge: the result would mix its old and new content, so "
                "nothing was written. Re-run once the inputs no longer change (is a trainer still saving there?)."
            )


def pin_checkpoint(pins: PinnedFiles, path: str | os.PathLike, extra: Iterable[str] = ()) -> None:
    """Pin what a load of the checkpoint directory `path` reads (its configs, the weight files `from_pretrained` or
    PEFT choose, their index and shards) and the relative paths `extra` (side files to be copied); a path that is not
    a local directory (a Hub id) is skipped."""
    path = Path(path)
    if not path.is_dir():
        return
    names = ("config.json", "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", SAFE_WEIGHTS_NAME,
             WEIGHTS_NAME)  # fmt: skip
    for name in names:
        if (path / name).is_file():
            pins.add(path / name)
    for index in (SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_INDEX_NAME):
        if (path / index).is_file():
            pins.add(path / index)
            for shard in sorted(set(read_index(path / index).values())):
                pins.add(shard)
    for rel in extra:
        pins.add(path / rel)


def model_class_for(config: Any, default: Any = None):
    """The transformers class named first in `config.architectures` that transformers has, else `default`."""
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return default


def load_pretrained(path: str | os.PathLike, dtype: Any = "auto", what: str = "model", **kwargs: Any):
    """Load a model with the class its config names (`config.architectures[0]`, else `AutoModel`).

    Args:
        path (`str` or `os.PathLike`): a local checkpoint directory or a Hub repo id.
        dtype (`str` or `torch.dtype`, *optional*, defaults to `"auto"`): the checkpoint's dtype, or e.g.
            `"bfloat16"` / `torch.float32`.
        what (`str`, *optional*, defaults to `"model"`): what the model is, for the error message ("base model").
        **kwargs: passed to `from_pretrained` (and to `AutoConfig.from_pretrained`).

    Example:

    ```python
    >>> from hf_magmax.io import load_pretrained
    >>> model = load_pretrained("ckpt/merged", dtype="float32")  # doctest: +SKIP
    ```
    """
    import torch
    import transformers

    path = os.fspath(expand_path(path)) if expand_path(path).exists() else os.fspath(path)
    if not os.path.isdir(path) and not is_hub_id(path):
        raise FileNotFoundError(f"{what} {path!r} is neither a local directory nor a Hub repo id.")
    if isinstance(dtype, str) and dtype != "auto":
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"`dtype` must be 'auto' or a torch dtype name such as 'bfloat16', got {dtype!r}.")
        dtype = getattr(torch, dtype)
    if os.path.isdir(path):  # the weight files from_pretrained reads, checked first: one line naming a bad one
        try:
            reader = CheckpointReader(name=path, path=Path(path))
            reader.read_tensor_table()
            reader.close()
        except ValueError as err:
            raise ValueError(f"cannot load the {what} {path!r}: {err}") from None
    config = transformers.AutoConfig.from_pretrained(path, **kwargs)
    model_class = model_class_for(config, transformers.AutoModel)
    logger.info("loading %s as %s", path, model_class.__name__)
    try:
        return model_class.from_pretrained(path, dtype=dtype, **kwargs)
    except (pickle.UnpicklingError, RuntimeError) as err:  # torch.load: a pickle that is not weights only, a bad zip
        reason = " ".join(f"{type(err).__name__}: {err}".split())[:300]
        raise ValueError(
            f"cannot load the {what} {path!r}: its weights are corrupt or not weights-only (blocked, not run: "
            f"{reason}). Convert it to safetensors or re-save it with a recent torch."
        ) from err
