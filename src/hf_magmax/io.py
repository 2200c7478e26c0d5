# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""Checkpoint IO shared by every writer of hf_magmax: the atomic output directory, Hub-id recognition.

Outputs appear atomically: everything is written into a staging directory beside `output_dir`, which is renamed into
place at the end; on any error or Ctrl-C the staging directory is removed and nothing is left at `output_dir`.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


__all__ = ["check_output_dir", "is_hub_id", "staged_output_dir"]


def is_hub_id(name: str) -> bool:
    """Whether `name` reads as a Hub repo id (`name` or `namespace/name`) rather than a local path."""
    return bool(re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name)) and not name.startswith((".", "-")) and ".." not in name


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------------------------------------------------------------
# atomic output directory
# ---------------------------------------------------------------------------------------------------------------------


def check_output_dir(output: Path, overwrite: bool) -> None:
    """Refuse an `output_dir` that is a file, or a non-empty directory unless `overwrite`."""
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"output {output} exists and is a file: choose a directory path for `output`.")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise FileExistsError(
            f"output directory {output} is not empty: choose another `output`, or pass `overwrite=True` (--overwrite) "
            "to replace it."
        )


def _commit_output(staging: Path, output: Path, overwrite: bool) -> None:
    """Move the finished staging directory to `output` (replacing an old one only when `overwrite`)."""
    check_output_dir(output, overwrite)
    if output.is_dir() and not any(output.iterdir()):
        output.rmdir()
    if output.exists():  # overwrite: rename the old one aside, the new one in, then delete the old one
        old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
        old.rmdir()
        os.replace(output, old)
        try:
            os.replace(staging, output)
        except BaseException:
            os.replace(old, output)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, output)


@contextlib.contextmanager
def staged_output_dir(output: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary directory beside `output` to write into; renamed to `output` when the block succeeds.

    On any error or Ctrl-C the temporary directory is removed and nothing is left at `output`. A non-empty `output` is
    refused unless `overwrite` (then it is replaced only once the new one is complete).
    """
    check_output_dir(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.hf_magmax-tmp-", dir=output.parent))
    try:
        yield staging
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it 0o700; give it the permissions of a normal directory
        _commit_output(staging, output, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
