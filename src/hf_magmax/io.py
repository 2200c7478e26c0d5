# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""Checkpoint IO shared by every reader and writer of hf_magmax.

- **Reading** ([`CheckpointReader`]): one checkpoint directory's config and tensor table (name → file, dtype, shape)
  from the safetensors headers (or the memory-mapped `.bin` state dicts), checked before a weight is read; tensors are
  then read lazily, one block of rows at a time. The weight files are chosen as `transformers.from_pretrained` chooses
  them (`model.safetensors` before its index, safetensors before `.bin`), and index entries must stay inside the
  checkpoint directory.
- **Writing** ([`ShardedSafetensorsWriter`]): sharded safetensors whose layout is planned up front (huggingface_hub's
  shard planner), streamed to disk tensor by tensor and block by block, plus the index.
- **The output directory** ([`staged_output_dir`]): everything is written into a staging directory beside
  `output_dir` (`.<name>.hf_magmax-tmp-<pid>-XXXX`), moved into place at the end (with `--overwrite`, an atomic
  exchange on Linux: `output_dir` never goes missing). Ctrl-C, SIGTERM and SIGHUP remove the staging directory; a
  staging directory left by a killed process (SIGKILL, power loss) is removed by the next run. [`check_output_path`]
  refuses, before any work, outputs that are symlinks, the current directory, an input, inside an input, or that
  contain an input.
- [`copy_non_weight_files`], [`load_pretrained`] (a model by the class its config names), [`is_hub_id`],
  [`parse_size`].

Importing this module does not import torch.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import math
import os
import re
import shutil
import signal
import struct
import sys
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any


logger = logging.getLogger(__name__)

__all__ = [
    "CheckpointReader",
    "ShardedSafetensorsWriter",
    "Terminated",
    "TensorInfo",
    "check_output_dir",
    "check_output_path",
    "copy_non_weight_files",
    "expand_path",
    "is_hub_id",
    "load_pretrained",
    "parse_size",
    "remove_stale_staging_dirs",
    "resolve_checkpoint",
    "staged_output_dir",
    "terminate_as_interrupt",
]

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


def is_hub_id(name: str) -> bool:
    """Whether `name` reads as a Hub repo id (`name` or `namespace/name`) rather than a local path."""
    return bool(re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name)) and not name.startswith((".", "-")) and ".." not in name


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


# ---------------------------------------------------------------------------------------------------------------------
# signals: SIGTERM and SIGHUP handled like Ctrl-C
# ---------------------------------------------------------------------------------------------------------------------


class Terminated(KeyboardInterrupt):
    """Raised by [`terminate_as_interrupt`]'s handler: SIGTERM or SIGHUP, handled like Ctrl-C (`signum` says which)."""

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        super().__init__(f"terminated by {signal.Signals(signum).name}")


_TERMINATING = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise [`Terminated`] (a `KeyboardInterrupt`), so that the cleanup that
    Ctrl-C runs also runs for them. Installed only in the main thread (Python delivers signals there), and the previous
    handlers are restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Terminated(signum)

    previous = {signum: signal.signal(signum, handler) for signum in _TERMINATING}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    """Defer SIGINT/SIGTERM/SIGHUP (e.g. a second Ctrl-C) while a cleanup runs, so the cleanup finishes."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    blocked = {signal.SIGINT, *_TERMINATING}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


# ---------------------------------------------------------------------------------------------------------------------
# the output directory: checks, staging, stale staging dirs, atomic commit
# ---------------------------------------------------------------------------------------------------------------------


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output_dir(output: Path, overwrite: bool) -> None:
    """Refuse an `output_dir` that is a file, or a non-empty directory unless `overwrite`."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"output {output} exists and is a file: choose a directory path for `output_dir`.")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise FileExistsError(
            f"output directory {output} is not empty: choose another `output_dir`, or pass `overwrite=True` "
            "(--overwrite) to replace it."
        )


def check_output_path(output: str | os.PathLike, inputs: Mapping[str, str | os.PathLike] = {}) -> Path:  # noqa: B006
    """Refuse, before any work, an `output_dir` the atomic commit cannot replace safely.

    That is a symbolic link, the current directory (or one of its parents), an input directory, a directory inside
    an input (its files would be copied into themselves), or a directory that contains an input.

    Args:
        output (`str` or `os.PathLike`): the output directory.
        inputs (`dict[str, str]`): name (as the user gave it) → local directory of every input.

    Returns:
        `Path`: the output path, `~` expanded. Raises `ValueError` naming the case and the fix.
    """
    path = expand_path(output)
    if path.is_symlink():
        raise ValueError(
            f"`output_dir` {path} is a symbolic link (to {os.readlink(path)}): the merge replaces the directory, "
            "not the link's target. Pass the real directory path."
        )
    resolved = path.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise ValueError(
            f"`output_dir` {output} is the current directory (or contains it): the merge creates `output_dir` "
            "anew. Name a new directory, e.g. `--output-dir merged`."
        )
    for name, directory in inputs.items():
        source = expand_path(directory).resolve()
        if resolved == source or resolved in source.parents:
            raise ValueError(
                f"`output_dir` {output} would replace the input model {name!r} ({source}): choose another "
                "`output_dir`."
            )
        if source in resolved.parents:
            raise ValueError(
                f"`output_dir` {output} lies inside the input model {name!r} ({source}): its files would be copied "
                "into the output, and the next merge would read the output as part of the input. Choose a directory "
                "outside it."
            )
    return path


def _staging_prefix(output: Path, kind: str = "tmp") -> str:
    return f".{output.name}.hf_magmax-{kind}-"


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    except OSError:
        return True
    return True


def remove_stale_staging_dirs(output: str | os.PathLike) -> list[Path]:
    """Remove the staging directories beside `output` left by merges whose process is gone (SIGKILL, power loss).

    Staging directories carry the pid of their process (`.<name>.hf_magmax-tmp-<pid>-XXXX`); those of live
    processes (a merge running now) are left alone. An old output set aside by an interrupted non-atomic
    `--overwrite` commit (`.<name>.hf_magmax-old-<pid>-XXXX`) is moved back when `output` is missing, removed
    otherwise. Each is named in a warning.

    Returns:
        `list[Path]`: what was removed or restored.
    """
    output = expand_path(output)
    parent = output.parent
    if not parent.is_dir():
        return []
    handled = []
    for kind in ("tmp", "old"):
        prefix = _staging_prefix(output, kind)
        for entry in sorted(parent.iterdir()):
            if not entry.name.startswith(prefix):
                continue
            pid_text = entry.name[len(prefix) :].split("-", 1)[0]
            if not pid_text.isdigit() or _process_alive(int(pid_text)):
                continue
            if kind == "old" and not output.exists():
                os.replace(entry, output)
                logger.warning(
                    "restored %s from %s, set aside by an interrupted --overwrite of process %s",
                    output,
                    entry,
                    pid_text,
                )
            else:
                shutil.rmtree(entry, ignore_errors=True)
                logger.warning("removed %s, left by an interrupted merge (process %s is gone)", entry, pid_text)
            handled.append(entry)
    return handled


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux `renameat2(RENAME_EXCHANGE)`); `False` where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM):
        return False  # the kernel or the filesystem does not support it
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def _commit_output(staging: Path, output: Path, overwrite: bool) -> None:
    """Move the finished staging directory to `output` (replacing an old one only when `overwrite`)."""
    check_output_dir(output, overwrite)
    if not output.exists():
        os.replace(staging, output)
        return
    if not any(output.iterdir()):
        try:
            os.replace(staging, output)  # POSIX: renaming onto an empty directory replaces it atomically
            return
        except OSError:
            output.rmdir()
            os.replace(staging, output)
            return
    if _exchange(staging, output):  # the new output in, the old one at the staging path: no missing window
        shutil.rmtree(staging, ignore_errors=True)
        return
    # fallback: two renames (`output` is missing between them; the next run restores it if we are killed there)
    old = Path(tempfile.mkdtemp(prefix=f"{_staging_prefix(output, 'old')}{os.getpid()}-", dir=output.parent))
    old.rmdir()
    os.replace(output, old)
    try:
        os.replace(staging, output)
    except BaseException:
        os.replace(old, output)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_output_dir(output: str | os.PathLike, overwrite: bool) -> Iterator[Path]:
    """A temporary directory beside `output` to write into; moved to `output` when the block succeeds.

    On any error, Ctrl-C, SIGTERM or SIGHUP the temporary directory is removed and nothing is left at or beside
    `output`. A non-empty `output` is refused unless `overwrite` (then it is replaced only once the new one is
    complete, atomically where the platform allows). Staging directories of dead processes are removed first.
    """
    output = expand_path(output)
    check_output_dir(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging_dirs(output)
    with terminate_as_interrupt():
        staging = Path(tempfile.mkdtemp(prefix=f"{_staging_prefix(output)}{os.getpid()}-", dir=output.parent))
        try:
            yield staging
            os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it 0o700; give it a normal directory's permissions
            with _signals_blocked():
                _commit_output(staging, output, overwrite)
        except BaseException:
            with _signals_blocked():
                shutil.rmtree(staging, ignore_errors=True)
            raise


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

    Tensors are read lazily ([`get`]: a view of the memory-mapped file) after [`read_tensor_table`] (local files) or
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
        """Resolve `name` ([`resolve_checkpoint`]) and read its config (not its tensors yet)."""
        path = resolve_checkpoint(name, token=token, weights=weights)
        return cls(name=name, path=path, config=read_config(path))

    @property
    def is_local(self) -> bool:
        return expand_path(self.name).exists()

    def weight_files(self) -> list[Path]:
        return sorted({info.file for info in self.tensors.values()})

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
        """One tensor, as a lazy view of the memory-mapped file (`safe_open`, or `torch.load(mmap=True)`): bytes are
        read when used. Never write into it."""
        file = self.tensors[name].file
        handle = self._handles.get(file)
        if handle is None:
            handle = self._handles[file] = self._open(file)
        if self.fmt == "safetensors":
            return handle.get_tensor(name)
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

    def __init__(self, directory: Path, entries: Sequence[tuple[str, str, tuple[int, ...]]], max_shard_size: int):
        from huggingface_hub import split_state_dict_into_shards_factory

        self.directory = Path(directory)
        self.entries = {name: (name, dtype, tuple(shape)) for name, dtype, shape in entries}
        split = split_state_dict_into_shards_factory(
            self.entries,
            get_storage_size=lambda entry: math.prod(entry[2]) * ITEMSIZE[entry[1]],
            get_storage_id=lambda entry: None,
            filename_pattern="model{suffix}.safetensors",
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


def model_class_for(config: Any, default: Any = None):
    """The transformers class named first in `config.architectures` that transformers has, else `default`."""
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return default


def load_pretrained(path: str | os.PathLike, dtype: Any = "auto", **kwargs: Any):
    """Load a model with the class its config names (`config.architectures[0]`, else `AutoModel`).

    Args:
        path (`str` or `os.PathLike`): a local checkpoint directory or a Hub repo id.
        dtype (`str` or `torch.dtype`, *optional*, defaults to `"auto"`): the checkpoint's dtype, or e.g.
            `"bfloat16"` / `torch.float32`.
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
        raise FileNotFoundError(f"model {path!r} is neither a local directory nor a Hub repo id.")
    if isinstance(dtype, str) and dtype != "auto":
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"`dtype` must be 'auto' or a torch dtype name such as 'bfloat16', got {dtype!r}.")
        dtype = getattr(torch, dtype)
    config = transformers.AutoConfig.from_pretrained(path, **kwargs)
    model_class = model_class_for(config, transformers.AutoModel)
    logger.info("loading %s as %s", path, model_class.__name__)
    return model_class.from_pretrained(path, dtype=dtype, **kwargs)
