# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""The output directory: checks before any work, staging beside it (locked with `flock` for the merge's lifetime),
SIGTERM/SIGHUP like Ctrl-C and deferred at the commit and cleanup, stale staging dirs of merges that are gone, and the
atomic commit (`renameat2(RENAME_EXCHANGE)` under `--overwrite`)."""

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
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .formats import expand_path


logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------------
# the entries of a continual run's output_dir that are the run's own, not the model
# ---------------------------------------------------------------------------------------------------------------------

#: A continual run's copy of θ_0 (`MagMaxTrainer`, `MagMaxCallback`): `output_dir/magmax_base/`, as large as the model.
BASE_DIR_NAME = "magmax_base"
#: Where a run writes the folders of its per-task Hub revisions, under `output_dir` (kept only when their push failed).
RELEASES_DIR = "magmax_releases"
#: `output_dir` entries of a continual run that no push uploads: the per-task checkpoint folders, the run's copy of
#: θ_0 and the folders of the per-task Hub revisions kept after a failed push. `Trainer` itself only leaves out
#: `checkpoint-*` and `_*`.
RUN_FOLDER_PATTERNS = ("task-*", f"{BASE_DIR_NAME}*", f"{RELEASES_DIR}*")


def continual_run_folders(folder: str | os.PathLike) -> list[str]:
    """The run's own folders in `folder` ([`RUN_FOLDER_PATTERNS`], top-level directories) when `folder` is the
    `output_dir` of a continual run (it holds `magmax_base/` or a `task-*/checkpoint-*` folder); `[]` for any other
    folder, whose entries are all its own."""
    import fnmatch

    folder = Path(folder)
    if not (folder / BASE_DIR_NAME).is_dir() and not any(p.is_dir() for p in folder.glob("task-*/checkpoint-*")):
        return []
    return sorted(
        entry.name
        for entry in folder.iterdir()
        if entry.is_dir() and any(fnmatch.fnmatchcase(entry.name, pattern) for pattern in RUN_FOLDER_PATTERNS)
    )


# ---------------------------------------------------------------------------------------------------------------------
# signals: SIGTERM and SIGHUP handled like Ctrl-C
# ---------------------------------------------------------------------------------------------------------------------


class Terminated(KeyboardInterrupt):
    """Raised by [`terminate_as_interrupt`]'s handler: SIGTERM or SIGHUP, handled like Ctrl-C (`signum` says which).

    `outcome` says what the interruption left (`None`: nothing partial at the output path); the CLI prints it.
    """

    def __init__(self, signum: int, outcome: str | None = None) -> None:
        self.signum = int(signum)
        self.outcome = outcome
        super().__init__(f"terminated by {signal.Signals(signum).name}")


_TERMINATING = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


class _SignalGuard:
    """The state of one [`terminate_as_interrupt`] block: the signals received, and whether they are deferred.

    The handler runs on the main thread between two bytecodes (Python's C-level handler only sets a flag, whichever
    thread the kernel chose, e.g. one of torch's), so a flag it reads is a reliable way to defer: inside
    [`deferred`] a signal is only recorded, and once one signal has been raised, later ones are only recorded too
    (a second Ctrl-C cannot interrupt the cleanup the first one started).
    """

    def __init__(self) -> None:
        self.received: list[int] = []
        self.depth = 0

    def handler(self, signum: int, frame: Any) -> None:
        self.received.append(signum)
        if self.depth == 0 and len(self.received) == 1:
            raise Terminated(signum)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Signals arriving in the block are recorded, never raised inside it (the caller acts on them after)."""
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1

    def raise_pending(self, outcome: str | None = None) -> None:
        """Raise [`Terminated`] (with `outcome`) if a signal was received (and deferred, or swallowed by a library)."""
        if self.received:
            raise Terminated(self.received[0], outcome)


_NO_GUARD = _SignalGuard()  # outside the main thread: nothing is installed, nothing is ever received


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[_SignalGuard]:
    """Within the block, SIGTERM and SIGHUP (and Ctrl-C, SIGINT, unless it is ignored) raise [`Terminated`], a
    `KeyboardInterrupt`, so that the cleanup that Ctrl-C runs also runs for them.

    Python runs the handler between two bytecodes, possibly inside library code (torch, safetensors) that turns the
    exception into another error; so whatever leaves the block after a signal arrived is re-raised as [`Terminated`]
    (the CLI then exits with 128 + the signal number, not with a misleading message). Only the first signal raises;
    later ones, and those arriving inside the guard's `deferred()` blocks (the commit, the cleanup), are recorded and
    acted on at the next safe point. Installed only in the main thread (Python delivers signals there); the previous
    handlers are restored after. Yields the guard.
    """
    if threading.current_thread() is not threading.main_thread():
        yield _NO_GUARD
        return
    guard = _SignalGuard()
    signals = list(_TERMINATING)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signals.append(signal.SIGINT)
    previous = {signum: signal.signal(signum, guard.handler) for signum in signals}
    try:
        yield guard
    except BaseException as err:
        if guard.received and not isinstance(err, Terminated):
            raise Terminated(guard.received[0]) from err
        raise
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


# ---------------------------------------------------------------------------------------------------------------------
# the output directory: checks, staging, stale staging dirs, atomic commit
# ---------------------------------------------------------------------------------------------------------------------


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output_dir(output: Path, overwrite: bool) -> None:
    """Refuse an `output_dir` that is a file, or a non-empty directory unless `overwrite`.

    Stale entries beside it are handled first ([`remove_stale_staging_dirs`]): an old output that a killed
    `--overwrite` commit had set aside is restored *before* `output` is checked, not after the merge.
    """
    output = Path(output)
    remove_stale_staging_dirs(output)
    _refuse_existing(output, overwrite)


def _refuse_existing(output: Path, overwrite: bool) -> None:
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


#: How long a staging directory may exist before its merge holds its lock (it is created under another name, locked,
#: then renamed; only a process killed in between leaves such a `-new-` entry).
_NEW_GRACE_SECONDS = 3600


def _lock(path: Path) -> int | None:
    """Open the directory `path` (never through a symbolic link) and take an exclusive `flock` on it without waiting.

    Returns the descriptor that holds the lock, or `None` when another process holds it. The kernel releases the lock
    when its holder dies (SIGKILL, OOM killer, power loss for local files), whatever PID namespace, container or
    (on NFS, where Linux maps `flock` to NFS byte-range locks) host it runs in. `OSError` when `path` is a link or
    not a directory; `flock` unsupported by the filesystem: `-1` (no lock, no information).
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, no information
        return -1
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError:  # ENOLCK/EOPNOTSUPP: the filesystem has no flock
        os.close(fd)
        return -1
    return fd


def _unlock(fd: int | None) -> None:
    if fd is not None and fd >= 0:
        os.close(fd)  # closing the (only) descriptor releases the flock


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


def _started_after(pid: int, when: float) -> bool:
    """Whether process `pid` (of this PID namespace) started after the time `when`: then it reuses the pid of the
    process that left an entry last changed at `when` (Linux `/proc`; `False` where that cannot be told)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(
            int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime")
        )
        started = boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return False
    return started > when + 2  # btime has a resolution of one second


def _owner_alive(entry: Path, pid: int) -> bool:
    """For an entry nobody holds a lock on: whether the pid in its name is a live process of this namespace that
    started before the entry was last changed (a merge of an older version, which took no lock). A reused pid (a
    process started later) does not keep a stale entry."""
    if not _process_alive(pid):
        return False
    try:
        changed = entry.lstat().st_ctime
    except OSError:
        return False
    return pid == os.getpid() or not _started_after(pid, changed)


def _make_staging(output: Path) -> tuple[Path, int | None]:
    """Create the staging directory `.<name>.hf_magmax-tmp-<pid>-XXXX` beside `output`, already locked: it is made
    under a `-new-` name, locked, then renamed, so that no other process ever sees it unlocked while it is live."""
    new = Path(tempfile.mkdtemp(prefix=f"{_staging_prefix(output, 'new')}{os.getpid()}-", dir=output.parent))
    try:
        lock = _lock(new)
        staging = new.with_name(_staging_prefix(output, "tmp") + new.name[len(_staging_prefix(output, "new")) :])
        os.rename(new, staging)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    return staging, lock


def remove_stale_staging_dirs(output: str | os.PathLike) -> list[Path]:
    """Remove the staging directories beside `output` left by merges that are gone (SIGKILL, OOM, power loss).

    A live merge holds an exclusive `flock` on its staging directory (`.<name>.hf_magmax-tmp-<pid>-XXXX`) for its
    whole lifetime, so liveness is decided by the lock, which is valid across PID namespaces (containers, a retried
    SLURM or Kubernetes job on the same filesystem) and, where the filesystem supports it, across hosts: a merge
    running elsewhere is never touched. An entry nobody holds a lock on is stale, unless the pid in its name is a
    live process of this namespace that started before the entry was last changed (a merge of an older version,
    which took no lock; a reused pid does not count). An old output set aside by an interrupted non-atomic
    `--overwrite` commit (`.<name>.hf_magmax-old-<pid>-XXXX`, locked while set aside) is moved back when `output` is
    missing, removed otherwise; only a real directory is ever moved there (a symbolic link of that name is left alone,
    with a warning). Each is named in a warning.

    Returns:
        `list[Path]`: what was removed or restored.
    """
    output = expand_path(output)
    parent = output.parent
    if not parent.is_dir():
        return []
    handled = []
    for kind in ("new", "tmp", "old"):
        prefix = _staging_prefix(output, kind)
        for entry in sorted(parent.iterdir()):
            if not entry.name.startswith(prefix):
                continue
            pid_text = entry.name[len(prefix) :].split("-", 1)[0]
            if not pid_text.isdigit():
                continue
            if entry.is_symlink() or not entry.is_dir():
                logger.warning("left %s alone: it is not a directory hf_magmax made (a link or a file)", entry)
                continue
            if kind == "new" and time.time() - entry.lstat().st_ctime < _NEW_GRACE_SECONDS:
                continue  # being created right now (locked and renamed within microseconds)
            try:
                lock = _lock(entry)
            except OSError:  # replaced by a link or a file meanwhile
                continue
            if lock is None:
                continue  # a live merge holds it (in this or another PID namespace, container or host)
            try:
                if _owner_alive(entry, int(pid_text)):
                    continue
                handled.append(_handle_stale(entry, kind, output, pid_text))
            finally:
                _unlock(lock)
    return handled


def _handle_stale(entry: Path, kind: str, output: Path, pid_text: str) -> Path:
    if kind == "old" and not output.exists() and not output.is_symlink():
        os.replace(entry, output)
        logger.warning(
            "restored %s from %s, set aside by an interrupted --overwrite of process %s", output, entry, pid_text
        )
    else:
        shutil.rmtree(entry, ignore_errors=True)
        logger.warning("removed %s, left by an interrupted merge (process %s is gone)", entry, pid_text)
    return entry


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
    _refuse_existing(output, overwrite)
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
    # fallback: two renames (`output` is missing between them; the next run restores it if we are killed there). The
    # old output is locked while it is set aside, so that another merge's cleanup leaves it alone meanwhile.
    old = Path(tempfile.mkdtemp(prefix=f"{_staging_prefix(output, 'old')}{os.getpid()}-", dir=output.parent))
    old.rmdir()
    lock = _lock(output)
    try:
        os.replace(output, old)
        try:
            os.replace(staging, output)
        except BaseException:
            os.replace(old, output)
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        _unlock(lock)


@contextlib.contextmanager
def staged_output_dir(output: str | os.PathLike, overwrite: bool) -> Iterator[Path]:
    """A temporary directory beside `output` to write into; moved to `output` when the block succeeds.

    On any error, Ctrl-C, SIGTERM or SIGHUP the temporary directory is removed and nothing is left at or beside
    `output`. A non-empty `output` is refused unless `overwrite` (then it is replaced only once the new one is
    complete, atomically where the platform allows). Stale staging directories of merges that are gone are removed
    first ([`remove_stale_staging_dirs`]); this one is locked (`flock`) for its whole life, so that no other merge,
    in whatever PID namespace, removes it.

    Signals are acted on only at safe points: the creation, the commit and the cleanup run with signals deferred
    (recorded by the Python-level handler, which the main thread runs, whatever thread of torch the kernel chose), so
    a signal during the commit takes effect after it ([`Terminated`] then says that the new merge is in place) and a
    second Ctrl-C during the cleanup does not cut it short.
    """
    output = expand_path(output)
    check_output_dir(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    with terminate_as_interrupt() as guard:
        with guard.deferred():
            staging, lock = _make_staging(output)
        try:
            try:
                guard.raise_pending()  # a signal during the creation
                yield staging
                guard.raise_pending()  # a signal some library swallowed: never commit after it
                os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it 0o700; a normal directory's permissions
                with guard.deferred():
                    _commit_output(staging, output, overwrite)
            except BaseException:
                with guard.deferred():
                    shutil.rmtree(staging, ignore_errors=True)
                raise
        finally:
            _unlock(lock)
        guard.raise_pending(f"the merge had completed: the new output is in place at {output}")
