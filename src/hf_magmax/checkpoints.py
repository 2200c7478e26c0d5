# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""Out-of-core merge of Hugging Face checkpoints: stream tensor by tensor, write sharded safetensors atomically.

[`merge_checkpoints`] merges a base model θ_0 and T fine-tuned models θ_1..θ_T (local directories or Hub repo ids)
into `θ_0 + λ · merge(θ_1 − θ_0, ..., θ_T − θ_0)` without ever holding a whole model in memory. It reads as its steps:

1. **Check the inputs** (`check_merge_inputs`). Configs are compared semantically (both loaded with `AutoConfig`: fields
   that define the architecture and the tensor shapes must agree, other differences are a warning naming them);
   tensor names, shapes and dtypes are compared from the safetensors headers (or the memory-mapped `.bin` state
   dicts) before a single weight is read. Names are matched across the ways real checkpoints are saved: a base saved
   as `BertModel` and fine-tunes saved as `BertForSequenceClassification` (the `bert.` prefix, the model class's
   `base_model_prefix`), old LayerNorm names `gamma`/`beta`, tied weights stored once or twice, integer buffers
   (`position_ids`) that only the base stores. Tensors only the fine-tunes have (a new head) are an error naming
   them, or, with `extra_tensors="last"`, taken from the last model.
2. **Stream the merge** (`_stream_merge`). For each tensor, in row blocks of ~1M elements: read θ_0, fold every
   `τ_t = θ_t − θ_0` ([`hf_magmax.task_vectors.subtract`]) into the method's accumulator
   (`MergeSpec.accumulator(name, offset=...)`; TIES first gets each whole task vector's trim threshold,
   `MergeSpec.tensor_stat`), write [`~hf_magmax.merging.apply_merged`]`(θ_0, merged, λ)`. The result is bit-identical
   to the in-memory engine (`TaskVector` → `merge_task_vectors` → `apply_to`) for every method. On CPU, magmax,
   task_arithmetic, average and ties run these steps fused in C, one pass per task per element
   (`merging.kernels.fused_merge_block`, the same bits; `HF_MAGMAX_DISABLE_CKERNELS=1` turns it off). OPCM folds
   whole tensors (`blockwise=False`: its SVD), and its rescale is model-wide (`needs_model_stats`): a first pass folds
   every tensor once (`_fold_model`, one SVD per 2-D weight per task) and spills each running sum to the staging
   directory ([`~hf_magmax.io.FoldedStates`]); the second pass only rescales them and writes. Memory is still one tensor.
3. **Write the side files** (`_write_side_files`): the base's config and tokenizer files, `magmax_config.yaml`
   ([`~hf_magmax.config.MergeConfig`]) and a model card, all in the staging directory that is moved into place at the
   end ([`~hf_magmax.io.staged_output_dir`]).
4. **Push** to the Hub, if asked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import EXTRA_TENSORS, MERGE_CONFIG_NAME, MergeConfig
from .io import (
    SAFE_WEIGHTS_INDEX_NAME,
    WEIGHTS_INDEX_NAME,
    CheckpointReader,
    FoldedStates,
    PinnedFiles,
    ShardedSafetensorsWriter,
    check_output_dir,
    check_output_path,
    copy_side_file,
    expand_path,
    is_hub_id,
    parse_size,
    public_name,
    staged_output_dir,
    warn_if_degenerate,
)
from .io.matching import TensorPlan, compare_configs, plan_tensors
from .merging import MergeSpec, apply_merged, compute_dtype, kernels


logger = logging.getLogger(__name__)

__all__ = [
    "EXTRA_TENSORS",
    "MERGE_CONFIG_FIELDS",
    "MERGE_CONFIG_NAME",
    "MergeInputs",
    "check_merge_inputs",
    "load_merge_config",
    "merge_checkpoints",
    "merge_checkpoints_kwargs",
    "merged_tensors",
    "parse_size",
]

#: Fields of a merge configuration file that `merge_checkpoints` takes (as keyword arguments of the same names).
MERGE_CONFIG_FIELDS: tuple[str, ...] = (
    "base",
    "models",
    "method",
    "scaling_coef",
    "density",
    "seed",
    "alpha",
    "dtype",
    "device",
    "max_shard_size",
    "output_dir",
    "overwrite",
    "allow_non_finite",
    "strict_config",
    "extra_tensors",
    "save_provenance",
    "push_to_hub",
    "revision",
    "private",
)

#: Files of the base that are regenerated, never copied.
_REGENERATED = {SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_INDEX_NAME, "README.md", MERGE_CONFIG_NAME}

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
# public entry points
# ---------------------------------------------------------------------------------------------------------------------


def load_merge_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read a merge configuration YAML (a `magmax_config.yaml`, old or new) into `merge_checkpoints` keyword arguments.

    The file is read by [`~hf_magmax.config.MergeConfig.from_yaml`] (values type-checked: a quoted `"false"` for a
    boolean is an error naming the field and the file); fields it leaves unset are left out.

    Raises:
        `FileNotFoundError` if the file does not exist, `ValueError` naming the file and the offending key otherwise.
    """
    config = MergeConfig.from_yaml(path)
    if config.adapters:
        raise ValueError(f"merge config {path} merges LoRA `adapters`: run it with `hf-magmax merge-lora`.")
    return merge_checkpoints_kwargs(config)


def merge_checkpoints_kwargs(config: MergeConfig) -> dict[str, Any]:
    """The keyword arguments of [`merge_checkpoints`] that `config` sets (fields left at their default left out)."""
    defaults = MergeConfig()
    return {
        key: getattr(config, key)
        for key in MERGE_CONFIG_FIELDS
        if getattr(config, key) is not None
        and (key in ("base", "models", "output_dir") or getattr(config, key) != getattr(defaults, key))
    }


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
    extra_tensors: str = "error",
    save_provenance: bool = False,
    alpha: float | None = None,
    revision: str | None = None,
) -> Path:
    """Merge fine-tuned checkpoints of one base model, streaming tensor by tensor, into a new checkpoint directory.

    The output is `θ_0 + scaling_coef · merge(θ_1 − θ_0, …, θ_T − θ_0)` for every floating tensor (integer and bool
    tensors are copied from the base), written as sharded safetensors with an index, together with the base's
    config, generation config and tokenizer files, a model card (`README.md`) and the merge configuration
    (`magmax_config.yaml`). Nothing is read from the weights before everything that can be checked from configs and
    headers has been checked, and the output appears atomically: after an error, Ctrl-C, SIGTERM or SIGHUP nothing
    is left at or beside `output_dir`.

    Args:
        base (`str` or `os.PathLike`):
            θ_0: a local checkpoint directory or a Hub repo id.
        models (`list[str]`):
            θ_1..θ_T, fine-tunes of `base`, in task order (for `magmax`, ties go to the later task).
        output_dir (`str` or `os.PathLike`):
            Where to write the merged checkpoint. Must not exist or be empty, unless `overwrite`; must not be a
            symlink, the current directory, an input, inside an input or contain one.
        method (`str`, *optional*, defaults to `"magmax"`):
            One of `magmax`, `average`, `task_arithmetic`, `ties`, `random_mix` (see [`hf_magmax.merging`]).
        scaling_coef (`float`, *optional*):
            λ, finite and > 0. Defaults to the method's default ([`DEFAULT_SCALING_COEFS`]): 0.5 for `magmax` and
            `random_mix`, 1.0 for `average` and `ties`, 0.3 for `task_arithmetic`. `"auto"` chooses λ from
            `scaling_coef_grid` by `score_fn` (see [`~hf_magmax.scaling.select_scaling_coef_for_checkpoints`]); the
            curve goes into the model card and `scaling_coef_search.json`, the chosen λ into `magmax_config.yaml`.
        density (`float`, *optional*):
            `ties` only: fraction of each task vector kept, in (0, 1]. Defaults to 0.2.
        seed (`int`, *optional*):
            `random_mix` only: the seed. Defaults to 0. Draws are seeded by the seed, the tensor's name in the base
            and the element's position, as in every other consumer.
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
            Merge even if an input holds NaN or Inf, or the result overflows `dtype` (by default that is an error
            naming the tensor and the file).
        strict_config (`bool`, *optional*, defaults to `True`):
            Refuse models whose config differs from the base's in a field that defines the architecture or the
            tensor shapes (other differences are a warning). A different `model_type` is always refused.
        push_to_hub (`str`, *optional*):
            A Hub repo id to upload the merged model and its card to, after it is complete on disk. If the upload
            fails the local output is kept and a [`~hf_magmax.hub.HubPushError`] says so.
        private (`bool`, *optional*, defaults to `False`):
            Create the Hub repo as private.
        revision (`str`, *optional*):
            With `push_to_hub`: the branch to push to (if missing, created at the new commit once the upload is
            done, so a failed upload never leaves it serving another model; `main` is left as it is).
        token (`str` or `bool`, *optional*):
            Hub token for downloading inputs and pushing; defaults to the usual `HF_TOKEN` / saved login.
        show_progress (`bool`, *optional*, defaults to `True`):
            Show a progress bar over tensors (also off with `HF_HUB_DISABLE_PROGRESS_BARS=1`).
        score_fn (`Callable[[PreTrainedModel], float]`, *optional*):
            With `scaling_coef="auto"`: scores a merged model on validation data (higher is better).
        scaling_coef_grid (`Sequence[float]`, *optional*):
            With `scaling_coef="auto"`: the candidate λ, defaults to 0.1, 0.2, …, 1.0.
        extra_tensors (`str`, *optional*, defaults to `"error"`):
            Floating tensors that the fine-tuned models have and the base lacks (a new classification head):
            `"error"` refuses them by name; `"last"` takes them from the last model (what sequential fine-tuning
            ends with), and the output then follows the last model's layout and config.
        save_provenance (`bool`, *optional*, defaults to `False`):
            magmax and random_mix: also write which task won where, `magmax_provenance.safetensors` (per merged
            tensor, the 0-based task index of every element, `uint8` up to 255 tasks, else `int16`; ties to the later
            task), streamed block by block like the weights, and the shares per task, layer and tensor as
            `magmax_provenance.json` and a table in the model card.
        alpha (`float`, *optional*):
            `opcm` only: the share of singular-value mass each new task vector is projected off, in [0, 1). Defaults
            to 0.5 (FusionBench).

    Returns:
        `Path`: the output directory.

    Example:

    ```python
    >>> from hf_magmax import merge_checkpoints
    >>> merge_checkpoints("ckpt/base", ["ckpt/task1", "ckpt/task2"], "ckpt/merged", method="magmax")  # doctest: +SKIP
    PosixPath('ckpt/merged')
    ```
    """
    config = _check_arguments(locals())
    warn_if_degenerate(config.models, "models", base=config.base)
    spec = config.spec
    output = check_output_path(output_dir, _local_inputs([config.base, *config.models]))
    check_output_dir(output, overwrite)
    inputs = check_merge_inputs(config, token=token)
    search = None
    try:
        if inputs.gguf_inputs:
            if spec.is_auto:
                raise ValueError(
                    "`scaling_coef='auto'` loads each candidate merge with transformers, which a GGUF input does not "
                    "support here: pass a number as `scaling_coef` (--scaling-coef)."
                )
            logger.info("GGUF input(s) %s dequantised to float32 while merging; the output is NOT re-quantised: it is "
                        "written as safetensors in %s.", ", ".join(c.name for c in inputs.gguf_inputs),
                        config.dtype or "each tensor's dtype in the base (float32 for a GGUF base)")  # fmt: skip
        if spec.is_auto:
            spec, search = _search_scaling_coef(inputs, spec, score_fn, scaling_coef_grid, config.device)
            config = config.replace(scaling_coef=spec.coef)
        with staged_output_dir(output, overwrite) as staging:
            with ShardedSafetensorsWriter(staging, inputs.entries(), parse_size(max_shard_size)) as writer:
                provenance = _Provenance(staging, inputs, writer.order) if config.save_provenance else None
                _stream_merge(inputs, spec, writer, provenance, device=config.device,
                              allow_non_finite=allow_non_finite, show_progress=show_progress)  # fmt: skip
            summary = provenance.finish() if provenance is not None else None
            _write_side_files(staging, inputs, config, writer.num_parameters, search, summary)
            inputs.pins.check()  # every input as it was checked, weights and side files alike: else nothing
    finally:
        inputs.close()
    logger.info("merged %d model(s) into %s with %s", len(config.models), output, spec.describe())
    if push_to_hub is not None:
        from .hub import interrupted_push
        from .hub import push_to_hub as push

        with interrupted_push(output, push_to_hub, config.revision):
            push(output, push_to_hub, private=private, token=token, revision=config.revision,
                 commit_message=f"hf_magmax {spec.method} merge")  # fmt: skip
    return output


# ---------------------------------------------------------------------------------------------------------------------
# 0. arguments
# ---------------------------------------------------------------------------------------------------------------------


def _check_arguments(args: dict[str, Any]) -> MergeConfig:
    """The arguments of `merge_checkpoints` as one validated [`MergeConfig`] (nothing read yet)."""
    models = args["models"]
    if isinstance(models, (str, os.PathLike)):
        raise TypeError("`models` must be a list of model paths or Hub repo ids, not a single string.")
    models = [os.fspath(m) for m in models]
    if not models:
        raise ValueError("`models` is empty: pass at least one fine-tuned model to merge into the base.")
    if args["extra_tensors"] not in EXTRA_TENSORS:
        raise ValueError(f"`extra_tensors` must be one of {', '.join(EXTRA_TENSORS)}, got {args['extra_tensors']!r}.")
    spec = MergeSpec(args["method"], args["scaling_coef"], args["density"], args["seed"], args["alpha"])
    if spec.is_auto and not callable(args["score_fn"]):
        raise ValueError(
            "`scaling_coef='auto'` needs `score_fn`, a callable `score_fn(model) -> float` that scores a merged "
            "model on validation data; or pass a number as `scaling_coef`."
        )
    parse_size(args["max_shard_size"])
    config = MergeConfig(
        base=os.fspath(args["base"]),
        models=models,
        method=spec.method,
        scaling_coef=spec.scaling_coef,
        density=spec.density,
        seed=spec.seed,
        alpha=spec.alpha,
        output_dir=os.fspath(args["output_dir"]),
        dtype=_normalize_dtype(args["dtype"]),
        device=_check_device(args["device"]),
        max_shard_size=args["max_shard_size"],
        overwrite=args["overwrite"],
        allow_non_finite=args["allow_non_finite"],
        strict_config=args["strict_config"],
        extra_tensors=args["extra_tensors"],
        save_provenance=args["save_provenance"],  # type-checked by `validate`: "yes" is refused
        push_to_hub=args["push_to_hub"],
        revision=args["revision"],
        private=args["private"],
    )
    return config.validate()


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


def _local_inputs(names: Sequence[str]) -> dict[str, Path]:
    return {name: expand_path(name) for name in names if expand_path(name).exists()}


# ---------------------------------------------------------------------------------------------------------------------
# 1. inputs: configs and tensor tables, no weights read
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class MergeInputs:
    """The checked inputs of a merge: the checkpoints, the plan of every output tensor, whose layout the output has."""

    base: CheckpointReader
    models: list[CheckpointReader]
    tensors: dict[str, TensorPlan]
    layout: CheckpointReader  # the base, or the last model when it brings extra tensors
    pins: PinnedFiles = dataclasses.field(default_factory=PinnedFiles)  # every input file, as it was checked

    def entries(self) -> list[tuple[str, str, tuple[int, ...]]]:
        return [(plan.name, plan.dtype, plan.shape) for plan in sorted(self.tensors.values(), key=lambda p: p.name)]

    @property
    def gguf_inputs(self) -> list[CheckpointReader]:
        """The GGUF inputs (dequantised on read; the output is not re-quantised)."""
        return [c for c in (self.base, *self.models) if c.fmt == "gguf"]

    def close(self) -> None:
        for checkpoint in (self.base, *self.models):
            checkpoint.close()


def check_merge_inputs(config: MergeConfig, token: str | bool | None) -> MergeInputs:
    """Read and compare configs and tensor tables (Hub models from their remote headers first, then downloaded)."""
    checkpoints = [CheckpointReader.open(name, token=token, weights=False) for name in [config.base, *config.models]]
    base, models = checkpoints[0], checkpoints[1:]
    for model in models:
        compare_configs(base, model, config.strict_config)
    remote = [c for c in checkpoints if not c.is_local]
    for checkpoint in checkpoints:
        if checkpoint in remote and checkpoint.read_remote_tensor_table(token):
            continue  # validated from the remote headers first, downloaded below
        if checkpoint in remote:  # no remote headers: download now and validate from the local files
            checkpoint.path = CheckpointReader.open(checkpoint.name, token=token).path
            remote.remove(checkpoint)
        checkpoint.read_tensor_table()
    _plan_tensors(base, models, config, warn=False)  # validation only: planned again below
    for checkpoint in remote:
        checkpoint.path = CheckpointReader.open(checkpoint.name, token=token).path
        checkpoint.read_tensor_table()
    side_files = base.side_files(_REGENERATED)  # the side files to copy: a link out of the base is refused now
    inputs = _plan_tensors(base, models, config)
    for file in [*(f for checkpoint in checkpoints for f in checkpoint.input_files()), *side_files]:
        inputs.pins.add(file)  # pinned now, checked per tensor and before the commit
    return inputs


def _plan_tensors(
    base: CheckpointReader, models: list[CheckpointReader], config: MergeConfig, warn: bool = True
) -> MergeInputs:
    plans, layout = plan_tensors(base, models, extra_tensors=config.extra_tensors, dtype=config.dtype, warn=warn)
    return MergeInputs(base, models, plans, layout)


def _search_scaling_coef(inputs: MergeInputs, spec: MergeSpec, score_fn, grid, device: str):
    """`scaling_coef="auto"`: choose λ with `score_fn` ([`hf_magmax.scaling`]); returns the spec with it."""
    from .scaling import DEFAULT_SCALING_COEF_GRID, check_scaling_coef_grid, select_scaling_coef_for_checkpoints

    search = select_scaling_coef_for_checkpoints(
        inputs.base.path,
        [m.path for m in inputs.models],
        score_fn,
        spec.method,
        check_scaling_coef_grid(grid or DEFAULT_SCALING_COEF_GRID),
        device=device,
        **spec.method_options,
    )
    return spec.with_scaling_coef(search.best), search


# ---------------------------------------------------------------------------------------------------------------------
# 2. the merge loop
# ---------------------------------------------------------------------------------------------------------------------


def _stream_merge(
    inputs: MergeInputs,
    spec: MergeSpec,
    writer: ShardedSafetensorsWriter,
    provenance: _Provenance | None = None,
    *,
    device: str,
    allow_non_finite: bool,
    show_progress: bool,
) -> None:
    """The merge loop: one tensor at a time, in row blocks, written straight into the planned shards."""
    import torch
    from huggingface_hub.utils import tqdm

    tracked = {name for name in writer.order if provenance is not None and provenance.covers(name)}
    tensors = merged_tensors(inputs, spec, writer.order, device=device, allow_non_finite=allow_non_finite,
                             track_winners=tracked, spill_dir=writer.directory,
                             show_progress=show_progress)  # fmt: skip
    desc = "Merging tensors" + spec.pass_label(2, "rescale, write")
    with torch.no_grad(), contextlib.closing(tensors), tqdm(total=len(writer.order), desc=desc, unit="tensor",
                                                            disable=not show_progress) as progress:  # fmt: skip
        for plan, blocks in tensors:
            writer.begin(plan.name)
            if plan.name in tracked:
                provenance.begin(plan.name)
            for block, winners in blocks:
                writer.write_part(block)
                if plan.name in tracked:
                    provenance.write_part(plan.name, winners)
            writer.end()
            if plan.name in tracked:
                provenance.end()
            progress.update(1)


def merged_tensors(
    inputs: MergeInputs,
    spec: MergeSpec,
    order: Sequence[str],
    *,
    device: str = "cpu",
    allow_non_finite: bool = False,
    track_winners: Collection[str] = (),
    spill_dir: str | os.PathLike | None = None,
    show_progress: bool = False,
) -> Iterator[tuple[TensorPlan, Iterator]]:
    """Every output tensor of a merge, in `order`, as `(plan, blocks)`: `blocks` yields `(block, winners)` in row
    order (whole tensors for methods that do not fold in blocks, and for tensors copied from one input), each block
    in the output dtype, exactly the bits [`merge_checkpoints`] writes. The one generator behind the streaming merge
    and [`~hf_magmax.verify.verify_merge`]; memory is one block (one tensor for opcm), whatever T.

    `needs_model_stats` methods (opcm) fold every tensor here, before this returns (one SVD per 2-D weight per task
    after the first), keeping each running sum in one file in `spill_dir` (default: a new temporary directory); the
    blocks then only rescale them, and the file is removed once the iterator is exhausted or closed.

    Args:
        inputs ([`MergeInputs`]): what [`check_merge_inputs`] returned.
        spec ([`~hf_magmax.merging.MergeSpec`]): the merge.
        order (`list[str]`): output tensor names (keys of `inputs.tensors`).
        track_winners (`Collection[str]`, *optional*): tensors whose winner maps to yield (else `winners` is None).
        spill_dir (`str` or `os.PathLike`, *optional*): opcm only: where the running sums wait between the passes
            (4 bytes per merged parameter; the streaming merge uses its staging directory).
        show_progress (`bool`, *optional*, defaults to `False`): opcm only: a progress bar over the first pass.
    """
    folded, model_scale = None, 1.0
    if spec.merge_class.needs_model_stats:
        folded = FoldedStates(spill_dir)
        try:
            model_scale = _fold_model(inputs, spec, order, folded, device=device, allow_non_finite=allow_non_finite,
                                      show_progress=show_progress)  # fmt: skip
        except BaseException:
            folded.close()
            raise
    return _merged_stream(inputs, spec, order, folded, model_scale, device=device, allow_non_finite=allow_non_finite,
                          track_winners=track_winners)  # fmt: skip


def _merged_stream(inputs, spec, order, folded, model_scale, *, device, allow_non_finite, track_winners):
    try:
        for name in order:
            plan = inputs.tensors[name]
            inputs.pins.check(_files_of(plan, inputs))  # before touching its memory maps (a truncation: SIGBUS)
            yield plan, _merged_blocks(plan, inputs, spec, device=device, allow_non_finite=allow_non_finite,
                                       track_winners=name in track_winners, model_scale=model_scale,
                                       folded=folded)  # fmt: skip
    finally:
        if folded is not None:
            folded.close()


def _files_of(plan: TensorPlan, inputs: MergeInputs) -> list[Path]:
    """The input files the output tensor `plan` is read from."""
    if plan.kind == "last":  # a tensor of the last model only
        return [inputs.models[-1].tensors[plan.sources[0]].file]
    files = [inputs.base.tensors[plan.base].file]
    return files + [model.tensors[source].file for model, source in zip(inputs.models, plan.sources)]


class _Provenance:
    """The winner maps of a streaming merge, written block by block into `magmax_provenance.safetensors` (one file,
    planned up front like the weights), and the per-tensor counts that the shares are made of."""

    def __init__(self, staging: Path, inputs: MergeInputs, order: Sequence[str]) -> None:
        from .metrics import PROVENANCE_FILE

        self.task_names = [public_name(model.name) for model in inputs.models]  # published: no local path
        num_tasks = len(self.task_names)
        self.dtype = "uint8" if num_tasks <= 255 else "int16"
        plans = [inputs.tensors[name] for name in order]  # the weights' order: both files are written side by side
        entries = [(plan.name, self.dtype, plan.shape) for plan in plans if plan.kind == "merge"]
        pattern = PROVENANCE_FILE.replace(".safetensors", "{suffix}.safetensors")  # one file: no shard limit
        self.writer = ShardedSafetensorsWriter(staging, entries, max_shard_size=2**62, filename_pattern=pattern)
        self.counts: dict[str, list[float]] = {}
        self._names = {name for name, _, _ in entries}

    def covers(self, name: str) -> bool:
        return name in self._names

    def begin(self, name: str) -> None:
        self.writer.begin(name)
        self.counts[name] = [0.0] * len(self.task_names)

    def write_part(self, name: str, winners) -> None:
        import torch

        counts = torch.bincount(winners.reshape(-1), minlength=len(self.task_names)).tolist()
        self.counts[name] = [a + b for a, b in zip(self.counts[name], counts)]
        self.writer.write_part(winners.to(getattr(torch, self.dtype)))

    def end(self) -> None:
        self.writer.end()

    def finish(self) -> dict[str, Any]:
        """Close the file; write the shares (`magmax_provenance.json`); return them."""
        from .metrics import PROVENANCE_SUMMARY_FILE, provenance_summary_from_counts

        self.writer.close()
        summary = provenance_summary_from_counts(self.counts, self.task_names)
        (self.writer.directory / PROVENANCE_SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        return summary


def _row_blocks(shape: tuple[int, ...]) -> list[tuple[Any, int]]:
    """`(index, offset)` of the row blocks of ~`_CHUNK_ELEMENTS` elements (offset: first flat element of the block)."""
    row = math.prod(shape[1:])
    if len(shape) == 0 or row == 0:
        return [(Ellipsis, 0)]
    step = max(1, _CHUNK_ELEMENTS // row)
    return [(slice(i, min(i + step, shape[0])), i * row) for i in range(0, shape[0], step)]


def _fold_model(
    inputs: MergeInputs,
    spec: MergeSpec,
    order: Sequence[str],
    folded: FoldedStates,
    *,
    device: str,
    allow_non_finite: bool,
    show_progress: bool,
) -> float:
    """Pass 1 of a `needs_model_stats` merge (opcm): fold every whole tensor, spill its state to `folded`, and return
    the model-wide factor of the merged task vector from every tensor's
    [`~hf_magmax.merging.OnlineMerge.model_stat`]."""
    import torch
    from huggingface_hub.utils import tqdm

    from .task_vectors import subtract

    names = [name for name in order if inputs.tensors[name].kind == "merge"]
    logger.info(
        "%s: pass 1 of 2 folds the %d merged tensors of %d model(s) (one SVD per 2-D weight per task after the first) "
        "for the model-wide rescale; pass 2 rescales and writes them",
        spec.method,
        len(names),
        len(inputs.models),
    )
    stats = []
    with torch.no_grad(), tqdm(total=len(names), desc=f"Folding tensors{spec.pass_label(1)}", unit="tensor",
                               disable=not show_progress) as progress:  # fmt: skip
        for name in names:
            plan = inputs.tensors[name]
            inputs.pins.check(_files_of(plan, inputs))
            theta_0 = _widened(inputs.base.rows(plan.base)[...], device)
            _check_finite(theta_0, allow_non_finite, plan.base, inputs.base)
            accumulator = spec.accumulator(plan.base)
            for model, source in zip(inputs.models, plan.sources):
                tau = subtract(model.rows(source)[...], theta_0, device=device)
                _check_finite(tau, allow_non_finite, source, model)
                accumulator.update(tau)
                del tau
            stats.append(accumulator.model_stat())
            folded.put(plan.name, accumulator)
            progress.update(1)
    return spec.merge_class.model_scale_from_stats(stats)


def _merged_blocks(
    plan: TensorPlan,
    inputs: MergeInputs,
    spec: MergeSpec,
    *,
    device: str,
    allow_non_finite: bool,
    track_winners=False,
    model_scale: float = 1.0,
    folded: FoldedStates | None = None,
):
    """The output tensor `plan`, block by block, in its output dtype: `(block, winners of the block or None)`."""
    import torch

    from .task_vectors import subtract

    dtype = getattr(torch, plan.dtype)
    if plan.kind == "base":  # integer / bool buffers are taken from the base
        yield inputs.base.get(plan.base), None
        return
    if folded is not None and plan.name in folded:  # opcm, pass 2: the state folded in pass 1, rescaled
        accumulator = spec.accumulator(plan.base)
        accumulator.load_state_dict(folded.get(plan.name, device))
        theta_0 = _widened(inputs.base.rows(plan.base)[...], device)
        yield _checked(apply_merged(theta_0, accumulator.result(model_scale=model_scale), spec.coef, dtype=dtype),
                       plan, spec, allow_non_finite), None  # fmt: skip
        return
    if plan.kind == "last":  # a tensor only the fine-tunes have (a new head): the last model's
        model = inputs.models[-1]
        tensor = model.get(plan.sources[0])
        _check_finite(tensor, allow_non_finite, plan.sources[0], model)
        yield tensor.to(dtype), None
        return
    # lazily sliced views of the inputs: only the rows of the current block are read from disk
    base_view = inputs.base.rows(plan.base)
    views = [model.rows(source) for model, source in zip(inputs.models, plan.sources)]
    blocks = _row_blocks(plan.shape) if spec.merge_class.blockwise else [(Ellipsis, 0)]  # opcm: whole tensors
    # the fused C folds (one pass per task per element, `kernels.fused_merge_block`) where they apply; any block they
    # decline (not built, other dtypes or devices, a non-finite value) takes the torch path below, with the same bits
    fused = device == "cpu" and spec.method in kernels.FUSED_METHODS and kernels.c_kernels() is not None
    stats = None
    if spec.merge_class.needs_tensor_stats:  # ties: each whole task vector's trim threshold
        if fused:
            stats = kernels.fused_ties_thresholds(base_view, views, blocks, spec.method_options["density"])
        if stats is None:  # the torch path: one τ_t at a time
            theta_0 = _widened(base_view[...], device)
            stats = [spec.tensor_stat(subtract(view[...], theta_0, device=device)) for view in views]
            del theta_0
    for block, offset in blocks:
        if fused:
            done = kernels.fused_merge_block(spec.method, base_view[block], [view[block] for view in views], spec.coef,
                                             dtype, thresholds=stats, track_winners=track_winners)  # fmt: skip
            if done is not None:
                yield done
                continue
        # θ_0 is converted to the compute dtype once per block, not once per task vector: `subtract` and `apply_merged`
        # then find it already there (a widening to fp32 is exact, so the bits are the same)
        theta_0 = _widened(base_view[block], device)
        _check_finite(theta_0, allow_non_finite, plan.base, inputs.base)
        accumulator = spec.accumulator(plan.base, offset=offset, stats=stats, track_winners=track_winners)
        for model, source, view in zip(inputs.models, plan.sources, views):
            tau = subtract(view[block], theta_0, device=device)
            _check_finite(tau, allow_non_finite, source, model)
            accumulator.update(tau)
            del tau
        merged = apply_merged(theta_0, accumulator.result(model_scale=model_scale), spec.coef, dtype=dtype)
        yield _checked(merged, plan, spec, allow_non_finite), accumulator.winners() if track_winners else None


def _checked(merged, plan: TensorPlan, spec: MergeSpec, allow_non_finite: bool):
    """`merged`, after checking that it is finite (unless `allow_non_finite`)."""
    if not allow_non_finite and not _is_finite(merged):
        raise ValueError(
            f"the merged tensor {plan.name!r} is not finite in {plan.dtype} although every input is (λ = "
            f"{spec.coef:g}): choose a wider `dtype` (--dtype float32) or a smaller `scaling_coef`, or pass "
            "`allow_non_finite=True` (--allow-non-finite)."
        )
    return merged


def _widened(tensor, device: str):
    """`tensor` on `device` in the merge's compute dtype (fp32 for half, fp64 for fp64; a no-op when it is there)."""
    return tensor.to(device=device, dtype=compute_dtype(tensor.dtype))


def _is_finite(tensor) -> bool:
    import torch

    # one cheap pass: any NaN/Inf makes the sum non-finite; only then look closer (a sum of finite values may
    # overflow). The sum runs in fp32 (fp64 for fp64): 6x faster than an fp64 sum of fp32 values, as exact a test.
    total = tensor.sum(dtype=torch.float64 if tensor.dtype == torch.float64 else torch.float32)
    return math.isfinite(float(total)) or bool(torch.isfinite(tensor).all())


def _check_finite(tensor, allow_non_finite: bool, name: str, checkpoint: CheckpointReader) -> None:
    if allow_non_finite or _is_finite(tensor):
        return
    import torch

    kind = "NaN" if bool(torch.isnan(tensor).any()) else "Inf"
    raise ValueError(
        f"tensor {name!r} of model {checkpoint.name!r} ({checkpoint.tensors[name].file}) holds {kind} values: fix "
        "the checkpoint, or pass `allow_non_finite=True` (--allow-non-finite) to merge anyway."
    )


# ---------------------------------------------------------------------------------------------------------------------
# 3. side files: config, tokenizer, magmax_config.yaml, model card
# ---------------------------------------------------------------------------------------------------------------------


def _write_side_files(
    staging: Path, inputs: MergeInputs, config: MergeConfig, num_parameters: int, search: Any, provenance: Any = None
) -> None:
    inputs.base.write_side_files(staging, skip_names=_REGENERATED)  # a GGUF base: converted from its metadata
    if inputs.layout is not inputs.base and inputs.layout.config_file.name == "config.json":
        copy_side_file(inputs.layout.path, "config.json", staging)  # its head, labels, architectures
    dtype = config.dtype or ("float32" if inputs.base.fmt == "gguf" else None)  # a GGUF base is dequantised to fp32
    if dtype is not None and (staging / "config.json").is_file():
        model_config = json.loads((staging / "config.json").read_text())
        model_config["dtype"] = dtype
        model_config.pop("torch_dtype", None)
        (staging / "config.json").write_text(json.dumps(model_config, indent=2, sort_keys=True) + "\n")
    (staging / MERGE_CONFIG_NAME).write_text(config.to_yaml(), encoding="utf-8")
    if search is not None:
        (staging / "scaling_coef_search.json").write_text(json.dumps(search.to_dict(), indent=2) + "\n")
    from .hub import write_model_card

    gguf = [c.name for c in inputs.gguf_inputs]
    write_model_card(staging, _model_card(config, num_parameters, search, provenance, gguf))


def _model_card(
    config: MergeConfig, num_parameters: int, search: Any = None, provenance: Any = None, gguf: Sequence[str] = ()
):
    """The card of a checkpoint merge, through the one card builder ([`hf_magmax.hub.model_card_text`], the text of `build_model_card`)."""
    from . import __version__
    from .hub import model_card_text

    spec = config.spec
    hub_base = config.base if is_hub_id(config.base) and not expand_path(config.base).exists() else None
    base_name = hub_base or expand_path(config.base).name  # a local path is never published, only its name

    def shown(model: str) -> str:
        return model if is_hub_id(model) and not expand_path(model).exists() else expand_path(model).name

    models = "\n".join(f"{i}. `{shown(m)}`" for i, m in enumerate(config.models, start=1))
    if any(expand_path(name).exists() for name in [config.base, *config.models]):
        models += (
            "\n\nLocal models are named by their folder only (here and in the configuration below); the "
            f"`{MERGE_CONFIG_NAME}` written beside the weights records their absolute paths, so it re-runs the merge "
            "from any directory of the machine that made it."
        )
    default = " (the method's default)" if spec.scaling_coef_is_default else ""
    details = (
        f"- **Method:** `{spec.method}`, {spec.describe()}.\n"
        "- **Merged model:** θ_0 + λ · merge(θ_1 − θ_0, …, θ_T − θ_0), with the task vectors taken in the order "
        "below.\n"
        f"- **Scaling coefficient (λ):** {spec.coef:g}{default}\n"
        f"- **Base model (θ_0):** `{base_name}`" + ("" if hub_base else " (a local model, named by its folder)") + "\n"
        f"- **Parameters:** {num_parameters:,}"
    )
    sections = {"Merge details": details, "Models merged (task order)": models}
    if gguf:
        shown_gguf = ", ".join(f"`{shown(name)}`" for name in gguf)
        sections["GGUF inputs"] = (
            f"{shown_gguf} {'was' if len(gguf) == 1 else 'were'} read from GGUF and dequantised to float32 as "
            "transformers loads GGUF (`from_pretrained(..., gguf_file=...)`). The merge is **not re-quantised**: "
            f"these weights are safetensors in {config.dtype or 'float32'}, and the config and tokenizer files were "
            "converted from the GGUF metadata. Quantise them again with llama.cpp if you need a GGUF."
        )
    if search is not None:
        from .scaling import scaling_curve_markdown

        sections["Scaling coefficient"] = scaling_curve_markdown(search)
    if provenance is not None:
        from .metrics import PROVENANCE_FILE, provenance_table

        sections["Provenance"] = (
            f"Which task won where (saved per element in `{PROVENANCE_FILE}`):\n\n{provenance_table(provenance)}"
        )
    return model_card_text(
        expand_path(config.output_dir).name,
        f"This model is a merge of {len(config.models)} fine-tuned model(s) of "
        + (f"`{hub_base}`" if hub_base else f"a local base model `{base_name}`")
        + f" made with hf_magmax {__version__}.",
        sections,
        base_model=hub_base,
        base_model_relation="merge",
        method=spec.method,
        merge_config=config.to_yaml(public=True),  # a card is for others: no local path in it
        config_file=MERGE_CONFIG_NAME,
        rerun_command=f"hf-magmax merge {MERGE_CONFIG_NAME}",
    )
