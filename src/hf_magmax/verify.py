# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""Checking a merged model against its recipe: [`verify_merge`] (`hf-magmax verify DIR`).

Every merge writes its configuration as `magmax_config.yaml` beside the weights. `verify_merge(DIR)` (a directory, or
the Hub repo id of a pushed merge) re-computes the merge from that file (inputs as recorded: local paths, Hub repo ids, GGUF files) and compares every tensor of `DIR`,
bit for bit, with the re-computed one:

- a checkpoint merge (`hf-magmax merge`) is re-computed by the streaming merge's own per-tensor generator
  ([`~hf_magmax.checkpoints.merged_tensors`]) and compared block by block as it comes: nothing is written, memory is
  one block per input (one tensor for opcm), whatever the number of models; a merge that saved its winner maps
  (`save_provenance`) has `magmax_provenance.safetensors` compared the same way;
- a LoRA merge into the model (`hf-magmax merge-lora --merged`) is re-computed with
  [`~hf_magmax.peft.merge_adapters`] (in memory, as that merge itself runs), saved with `save_pretrained` into a
  temporary directory and compared tensor by tensor, block by block.

The result names the first difference: a tensor missing from `DIR`, one `DIR` has and the merge does not make, a
dtype or shape that differs, or the first element whose bits differ (its index and both values).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import MERGE_CONFIG_NAME, MergeConfig
from .io import CheckpointReader, expand_path, is_hub_id, read_config, resolve_checkpoint


logger = logging.getLogger(__name__)

__all__ = ["TensorMismatch", "VerifyResult", "verify_merge"]

_INT_VIEWS = {1: "uint8", 2: "int16", 4: "int32", 8: "int64"}
#: Rows per block of a tensor compared from two files (about a million elements, as the merge's blocks).
_BLOCK_ELEMENTS = 1 << 20


@dataclass
class TensorMismatch:
    """The first difference between a merged checkpoint and its re-computation.

    Attributes:
        name (`str`): the tensor.
        reason (`str`): `"missing"` (the merge makes it, the directory lacks it), `"extra"` (the directory has it, the
            merge does not make it), `"dtype"`, `"shape"` or `"values"`.
        index (`tuple[int, ...]`, *optional*): `"values"`: the index of the first differing element.
        expected, found (*optional*): the re-computed and the stored dtype/shape/value.
        count (`int`, *optional*): `"values"`: how many elements of the block holding the first one differ.
    """

    name: str
    reason: str
    index: tuple[int, ...] | None = None
    expected: Any = None
    found: Any = None
    count: int | None = None

    def __str__(self) -> str:
        if self.reason == "missing":
            return f"tensor {self.name!r} is missing: the merge makes it but the directory does not hold it"
        if self.reason == "extra":
            return f"tensor {self.name!r} is not made by the merge but the directory holds it"
        if self.reason in ("dtype", "shape"):
            return f"tensor {self.name!r} has {self.reason} {self.found} but the merge makes {self.expected}"
        more = f" ({self.count} differing element(s) in that block)" if self.count and self.count > 1 else ""
        return (
            f"tensor {self.name!r} differs at index {list(self.index)}: the merge makes {self.expected!r} but the "
            f"directory holds {self.found!r}{more}"
        )


@dataclass
class VerifyResult:
    """What [`verify_merge`] found. True when every tensor matched (`bool(result)`).

    Attributes:
        output_dir (`Path`): the directory checked.
        kind (`str`): `"merge"` (a checkpoint merge) or `"merge-lora"` (a LoRA merge folded into the model).
        num_tensors (`int`): tensors compared and found equal (all of them when it matched).
        mismatch ([`TensorMismatch`], *optional*): the first difference, `None` when everything matched.
    """

    output_dir: Path
    kind: str
    num_tensors: int
    mismatch: TensorMismatch | None = None

    @property
    def ok(self) -> bool:
        return self.mismatch is None

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        if self.ok:
            return (
                f"{self.output_dir}: all {self.num_tensors} tensors match a re-computed `hf-magmax {self.kind}` bit "
                "for bit"
            )
        return f"{self.output_dir}: {self.mismatch} (after {self.num_tensors} matching tensor(s))"


def verify_merge(
    output_dir: str | os.PathLike,
    *,
    base: str | None = None,
    models: list[str] | None = None,
    adapters: list[str] | None = None,
    device: str | None = None,
    token: str | bool | None = None,
    show_progress: bool = True,
) -> VerifyResult:
    """Re-compute a merge from the `magmax_config.yaml` in `output_dir` and compare every tensor bit for bit.

    Works for the outputs of `hf-magmax merge` / [`~hf_magmax.merge_checkpoints`] (streamed: the re-computed tensors
    are compared block by block, never written) and of `hf-magmax merge-lora --merged` (re-computed in memory, as
    that merge runs). The directory matches when it holds exactly the tensors the merge makes (none missing, none
    extra), with the same dtypes, shapes and bits.

    Args:
        output_dir (`str` or `os.PathLike`):
            A merged model directory holding `magmax_config.yaml`, or the Hub repo id of one (downloaded).
        base (`str`, *optional*), models (`list[str]`, *optional*), adapters (`list[str]`, *optional*):
            Use these inputs instead of the recorded ones (inputs that moved, or a merge recorded with relative
            paths run from another directory); same order and meaning as in the merge.
        device (`str`, *optional*):
            Where the math runs (defaults to the recorded `device`).
        token (`str` or `bool`, *optional*):
            Hub token for inputs recorded as Hub repo ids.
        show_progress (`bool`, *optional*, defaults to `True`):
            Show a progress bar over tensors.

    Returns:
        [`VerifyResult`]: `bool(result)` is True when everything matched; `result.mismatch` names the first
        difference. Raises `FileNotFoundError` / `ValueError` (one line naming the file and the fix) when the
        directory or its inputs cannot be read.

    Example:

    ```python
    >>> from hf_magmax import verify_merge
    >>> result = verify_merge("merged")  # doctest: +SKIP
    >>> bool(result), result.num_tensors  # doctest: +SKIP
    (True, 291)
    ```
    """
    directory = _merged_directory(output_dir, token)
    config = _recorded_config(directory, base=base, models=models, adapters=adapters, device=device)
    stored = _stored_tensors(directory)
    try:
        if config.kind == "lora":
            return _verify_lora_merge(directory, config, stored, show_progress=show_progress)
        return _verify_checkpoint_merge(directory, config, stored, token=token, show_progress=show_progress)
    finally:
        stored.close()


def _merged_directory(output_dir: str | os.PathLike, token: str | bool | None) -> Path:
    """A local directory, or a merged model on the Hub (a repo id that is not a local path: downloaded, cached)."""
    path = expand_path(output_dir)
    if path.exists() or not is_hub_id(os.fspath(output_dir)):
        return path
    return resolve_checkpoint(os.fspath(output_dir), token=token)


def _recorded_config(directory: Path, **overrides: Any) -> MergeConfig:
    """The merge recorded in `directory/magmax_config.yaml`, with `overrides` applied, validated."""
    if not directory.is_dir():
        raise FileNotFoundError(f"merged model directory {directory} does not exist: pass the output of a merge.")
    file = directory / MERGE_CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(
            f"{directory} has no {MERGE_CONFIG_NAME}: only the outputs of hf-magmax merges (which record how they were "
            "made) can be verified."
        )
    config = MergeConfig.from_yaml(file)
    if overrides["models"] is not None and config.kind == "lora":
        raise ValueError(f"{file} records a LoRA merge (`adapters`): pass --adapters, not --models.")
    if overrides["adapters"] is not None and config.kind != "lora":
        raise ValueError(f"{file} records a checkpoint merge (`models`): pass --models, not --adapters.")
    config = config.replace(**overrides)
    if not config.output_dir:
        config.output_dir = os.fspath(directory)
    config.validate(source=str(file))
    if config.kind == "lora" and config.lora_output != "merged":
        raise ValueError(
            f"{file} records a LoRA merge written as an adapter (`lora_output: adapter`): verify checks full models "
            "(`hf-magmax merge`, `hf-magmax merge-lora --merged`); an adapter's SVD re-factor is not bit-reproducible "
            "across BLAS builds."
        )
    return config


def _stored_tensors(directory: Path) -> CheckpointReader:
    stored = CheckpointReader(name=os.fspath(directory), path=directory, config=read_config(directory))
    stored.read_tensor_table()
    return stored


# ---------------------------------------------------------------------------------------------------------------------
# the two kinds of merge
# ---------------------------------------------------------------------------------------------------------------------


def _verify_checkpoint_merge(
    directory: Path, config: MergeConfig, stored: CheckpointReader, *, token, show_progress: bool
) -> VerifyResult:
    """Stream the re-computed merge ([`merged_tensors`]) and compare it block by block with `stored`."""
    from .checkpoints import check_merge_inputs, merged_tensors

    try:
        inputs = check_merge_inputs(config, token=token)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"{err} (an input recorded in {directory / MERGE_CONFIG_NAME}; a relative path is read from the current "
            "directory: run verify where the merge ran, or pass the inputs with --base / --models)"
        ) from None
    provenance = None
    try:
        order = sorted(inputs.tensors)
        mismatch = _compare_tables({n: (p.dtype, p.shape) for n, p in inputs.tensors.items()}, stored)
        tracked: set[str] = set()
        if mismatch is None and config.save_provenance:  # the winner maps are tensors of DIR too: compare them
            provenance = _stored_provenance(directory)
            tracked = {name for name, plan in inputs.tensors.items() if plan.kind == "merge"}
            winner_dtype = "uint8" if len(inputs.models) <= 255 else "int16"
            tables = {name: (winner_dtype, inputs.tensors[name].shape) for name in tracked}
            mismatch = _compare_tables(tables, provenance, prefix=f"{provenance.path.name}: ")
        if mismatch is not None:
            return VerifyResult(directory, "merge", 0, mismatch)
        # opcm folds every tensor here (its first pass, under the merge's own bar) before the first comparison
        tensors = merged_tensors(inputs, config.spec, order, device=config.device,
                                 allow_non_finite=config.allow_non_finite, track_winners=tracked,
                                 show_progress=show_progress)  # fmt: skip
        with contextlib.closing(tensors):  # an early mismatch: the spilled running sums are removed now
            return _compare_streams(directory, "merge", ((p.name, blocks) for p, blocks in tensors), stored,
                                    len(order), show_progress, provenance,
                                    desc="Verifying tensors" + config.spec.pass_label(2, "rescale, compare"))  # fmt: skip
    finally:
        inputs.close()
        if provenance is not None:
            provenance.close()


def _stored_provenance(directory: Path) -> CheckpointReader:
    """`magmax_provenance.safetensors` of a merge that saved it (one file: its tensors are the winner maps)."""
    from .io import read_safetensors_header
    from .metrics import PROVENANCE_FILE

    file = directory / PROVENANCE_FILE
    if not file.is_file():
        raise FileNotFoundError(
            f"{directory / MERGE_CONFIG_NAME} records `save_provenance: true` but {file} is missing: the directory is "
            "incomplete."
        )
    provenance = CheckpointReader(name=os.fspath(file), path=file)
    provenance.tensors.update(read_safetensors_header(file))
    return provenance


def _verify_lora_merge(directory: Path, config: MergeConfig, stored: CheckpointReader, *, show_progress: bool):
    """Re-run the LoRA merge in memory, save it as `merge-lora` does (`save_pretrained`) into a temporary directory,
    compare."""
    from .peft import merge_adapters

    result = merge_adapters(
        config.base,
        config.adapters,
        method=config.spec,
        lora_output="merged",
        dtype=config.dtype,
        device=config.device,
        allow_non_finite=config.allow_non_finite,
        show_progress=show_progress,
    )
    with tempfile.TemporaryDirectory(prefix="hf_magmax-verify-") as tmp:
        result.save_pretrained(tmp)
        del result
        expected = _stored_tensors(Path(tmp))
        try:
            mismatch = _compare_tables({n: (i.dtype, i.shape) for n, i in expected.tensors.items()}, stored)
            if mismatch is not None:
                return VerifyResult(directory, "merge-lora", 0, mismatch)
            order = sorted(expected.tensors)
            streams = ((name, _row_blocks_of(expected, name)) for name in order)
            return _compare_streams(directory, "merge-lora", streams, stored, len(order), show_progress)
        finally:
            expected.close()


def _row_blocks_of(checkpoint: CheckpointReader, name: str):
    """A stored tensor in row blocks of about a million elements (what the merge's blocks are)."""
    shape = checkpoint.tensors[name].shape
    view = checkpoint.rows(name)
    if not shape:
        yield view[...], None
        return
    step = max(1, _BLOCK_ELEMENTS // max(1, math.prod(shape[1:])))
    for start in range(0, shape[0], step):
        yield view[start : start + step], None


# ---------------------------------------------------------------------------------------------------------------------
# comparing
# ---------------------------------------------------------------------------------------------------------------------


def _compare_tables(
    expected: dict[str, tuple[str, tuple[int, ...]]], stored: CheckpointReader, prefix: str = ""
) -> TensorMismatch | None:
    """Names, dtypes and shapes, from the headers (no weights read). `prefix` goes before names in the result."""
    missing = sorted(set(expected) - set(stored.tensors))
    if missing:
        return TensorMismatch(prefix + missing[0], "missing")
    extra = sorted(set(stored.tensors) - set(expected))
    if extra:
        return TensorMismatch(prefix + extra[0], "extra")
    for name in sorted(expected):
        dtype, shape = expected[name]
        info = stored.tensors[name]
        if info.dtype != dtype:
            return TensorMismatch(prefix + name, "dtype", expected=dtype, found=info.dtype)
        if tuple(info.shape) != tuple(shape):
            return TensorMismatch(prefix + name, "shape", expected=list(shape), found=list(info.shape))
    return None


def _compare_streams(
    directory: Path,
    kind: str,
    streams,
    stored: CheckpointReader,
    total: int,
    show_progress: bool,
    provenance: CheckpointReader | None = None,
    desc: str = "Verifying tensors",
) -> VerifyResult:
    """Compare `(name, blocks)` streams with the stored tensors block by block (and each block's winner map, where
    one comes, with `provenance`); stop at the first difference."""
    import torch
    from huggingface_hub.utils import tqdm

    matched = 0
    with torch.no_grad(), tqdm(total=total, desc=desc, unit="tensor", disable=not show_progress) as bar:
        for name, blocks in streams:
            shape = stored.tensors[name].shape
            view = stored.rows(name)
            row = 0
            for block, winners in blocks:
                rows = block.shape[0] if block.dim() and shape else None
                found = view[row : row + rows] if rows is not None else view[...]
                mismatch = _first_difference(name, block, found, shape, row)
                if mismatch is None and winners is not None and provenance is not None:
                    stored_winners = provenance.rows(name)
                    found = stored_winners[row : row + rows] if rows is not None else stored_winners[...]
                    expected = winners.to(found.dtype)
                    mismatch = _first_difference(f"{provenance.path.name}: {name}", expected, found, shape, row)
                if mismatch is not None:
                    return VerifyResult(directory, kind, matched, mismatch)
                row += rows or 0
            matched += 1
            bar.update(1)
    logger.info("%s: all %d tensors match the re-computed merge", directory, matched)
    return VerifyResult(directory, kind, matched)


def _first_difference(name: str, expected, found, shape: tuple[int, ...], row: int) -> TensorMismatch | None:
    """The first element whose bits differ (NaN payloads and the sign of zero count), as a [`TensorMismatch`]."""
    import torch

    expected = expected.detach().to("cpu")
    if expected.shape != found.shape:  # a block cut differently: a stored tensor of another shape
        return TensorMismatch(name, "shape", expected=list(expected.shape), found=list(found.shape))
    if expected.dtype != found.dtype:
        return TensorMismatch(name, "dtype", expected=str(expected.dtype), found=str(found.dtype))
    bits = getattr(torch, _INT_VIEWS[expected.element_size()]) if expected.is_floating_point() else None
    a = expected.contiguous().view(bits) if bits is not None else expected.contiguous()
    b = found.contiguous().view(bits) if bits is not None else found.contiguous()
    differ = (a != b).reshape(-1)
    if not bool(differ.any()):
        return None
    first = int(differ.nonzero()[0])
    row_size = math.prod(shape[1:]) if shape else 1
    flat = row * row_size + first
    index = _unravel(flat, shape)
    return TensorMismatch(
        name,
        "values",
        index=index,
        expected=expected.reshape(-1)[first].item(),
        found=found.reshape(-1)[first].item(),
        count=int(differ.sum()),
    )


def _unravel(flat: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    index = []
    for size in reversed(shape):
        index.append(flat % size)
        flat //= size
    return tuple(reversed(index))
