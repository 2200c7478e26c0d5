# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""The output directory: checks before any work, staging beside it, SIGTERM/SIGHUP like Ctrl-C, stale staging dirs of
dead processes, and the atomic commit (`renameat2(RENAME_EXCHANGE)` under `--overwrite`)."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .formats import expand_path


logger = logging.getLogger(__name__)


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
    """Within the block, SIGTERM and SIGHUP (and Ctrl-C, SIGINT, unless it is ignored) raise [`Terminated`], a
    `KeyboardInterrupt`, so that the cleanup that Ctrl-C runs also runs for them.

    Python runs the handler between two bytecodes, possibly inside library code (torch, safetensors) that turns the
    exception into another error; so whatever leaves the block after a signal arrived is re-raised as [`Terminated`]
    (the CLI then exits with 128 + the signal number, not with a misleading message). Installed only in the main
    thread (Python delivers signals there); the previous handlers are restored after.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        received.append(signum)
        raise Terminated(signum)

    signals = list(_TERMINATING)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signals.append(signal.SIGINT)
    previous = {signum: signal.signal(signum, handler) for signum in signals}
    try:
        yield
    except BaseException as err:
        if received and not isinstance(err, Terminated):
            raise Terminated(received[0]) from err
        raise
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


def check_output_path(
    output: str | os.PathLike,
    inputs: Mapping[str, str | os.PathLike] = {},
    kind: str = "input model",  # noqa: B006
) -> Path:
    """Refuse, before any work, an `output_dir` the atomic commit cannot replace safely.

    That is a symbolic link, the current directory (or one of its parents), an input directory, a directory inside
    an input (its files would be copied into themselves), or a directory that contains an input.

    Args:
        output (`str` or `os.PathLike`): the output directory.
        inputs (`dict[str, str]`): name (as the user gave it) → local directory of every input.
        kind (`str`, *optional*, defaults to `"input model"`): what the inputs are, for the error message (the LoRA
            merger names each input itself and passes `"input"`).

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
                f"`output_dir` {output} would replace the {kind} {name!r} ({source}): choose an `output_dir` "
                "outside every input."
            )
        if source in resolved.parents:
            raise ValueError(
                f"`output_dir` {output} lies inside the {kind} {name!r} ({source}): its files would be copied "
                "into the output, and the next merge would read the output as part of the input. Choose an "
                "`output_dir` outside every input."
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
