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
- **GGUF** ([`GGUFCheckpointReader`], `gguf.py`): a `.gguf` file (or a folder holding one) read as transformers reads
  it, each block of rows dequantised when it is read; [`CheckpointReader.open`] returns one for such inputs.
- **Spilling** ([`FoldedStates`], `spill.py`): the running sums of a two-pass merge (opcm) kept on disk between its
  passes, so that every SVD runs once and memory stays one tensor.
- [`copy_non_weight_files`] (never a link out of the input folder: [`non_weight_files`] refuses it), [`load_pretrained`] (a model by the class its config names), [`is_hub_id`],
  [`parse_size`].

The package is split by concern: `formats` (names, dtypes, sizes), `output` (the output directory), `reading`,
`gguf`, `writing`, `spill`; everything is importable from `hf_magmax.io`. Importing it does not import torch.
"""

from .formats import (
    FLOATING,
    ITEMSIZE,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    ST_DTYPES,
    WEIGHT_SUFFIXES,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    absolute_name,
    expand_path,
    input_identity,
    is_hub_id,
    parse_size,
    public_name,
)
from .gguf import GGUFCheckpointReader, find_gguf_file
from .matching import warn_if_degenerate
from .output import (
    BASE_DIR_NAME,
    RELEASES_DIR,
    RUN_FOLDER_PATTERNS,
    Terminated,
    check_output_dir,
    check_output_path,
    continual_run_folders,
    remove_stale_staging_dirs,
    staged_output_dir,
    terminate_as_interrupt,
)
from .reading import (
    CheckpointReader,
    InputChangedError,
    PinnedFiles,
    TensorInfo,
    load_bin,
    load_pretrained,
    model_class_for,
    pin_checkpoint,
    read_config,
    read_index,
    read_safetensors_header,
    resolve_checkpoint,
)
from .spill import FoldedStates
from .writing import (
    ShardedSafetensorsWriter,
    copy_non_weight_files,
    copy_side_file,
    link_roots,
    non_weight_files,
    resolve_inside,
)


__all__ = [
    "BASE_DIR_NAME",
    "CheckpointReader",
    "FLOATING",
    "FoldedStates",
    "GGUFCheckpointReader",
    "ITEMSIZE",
    "InputChangedError",
    "PinnedFiles",
    "RELEASES_DIR",
    "RUN_FOLDER_PATTERNS",
    "SAFE_WEIGHTS_INDEX_NAME",
    "SAFE_WEIGHTS_NAME",
    "ST_DTYPES",
    "ShardedSafetensorsWriter",
    "TensorInfo",
    "Terminated",
    "WEIGHTS_INDEX_NAME",
    "WEIGHTS_NAME",
    "WEIGHT_SUFFIXES",
    "absolute_name",
    "check_output_dir",
    "check_output_path",
    "continual_run_folders",
    "copy_non_weight_files",
    "copy_side_file",
    "expand_path",
    "find_gguf_file",
    "input_identity",
    "is_hub_id",
    "link_roots",
    "load_bin",
    "load_pretrained",
    "model_class_for",
    "non_weight_files",
    "parse_size",
    "pin_checkpoint",
    "public_name",
    "read_config",
    "read_index",
    "read_safetensors_header",
    "remove_stale_staging_dirs",
    "resolve_checkpoint",
    "resolve_inside",
    "staged_output_dir",
    "terminate_as_interrupt",
    "warn_if_degenerate",
]
