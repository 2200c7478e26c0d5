# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""[`FoldedStates`]: the running sums of a two-pass merge (opcm), spilled to disk between its passes."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any


class FoldedStates:
    """The accumulator states of the first pass of a `needs_model_stats` merge (opcm), spilled to one file.

    OPCM's rescale is model-wide, so its merge runs in two passes: the first folds every tensor's task vectors (one
    SVD per projected weight per task after the first) and `put`s each accumulator's state here; the second `get`s
    each state back into a fresh accumulator (`OnlineMerge.load_state_dict`) and rescales it, instead of folding the
    task vectors again. Memory stays one tensor; disk holds the running sums until [`close`] (4 bytes per merged
    parameter, 8 for fp64). The streaming merge ([`~hf_magmax.merge_checkpoints`], [`~hf_magmax.verify_merge`]) and
    the LoRA merger ([`~hf_magmax.peft.merge_adapters`]) both spill through it.

    Args:
        directory (`str` or `os.PathLike`, *optional*):
            Where the file goes (the streaming merge: its staging directory, removed with it). By default a new
            temporary directory, removed by [`close`].

    Example:

    ```python
    >>> with FoldedStates() as folded:  # doctest: +SKIP
    ...     folded.put("w", accumulator)
    ...     fresh.load_state_dict(folded.get("w", "cpu"))
    ```
    """

    def __init__(self, directory: str | os.PathLike | None = None) -> None:
        self._temporary = tempfile.mkdtemp(prefix="hf_magmax-opcm-") if directory is None else None
        self.path = Path(directory if directory is not None else self._temporary) / ".hf_magmax-folded-states.bin"
        self._file = open(self.path, "w+b")
        self._index: dict[str, dict[str, Any]] = {}

    def put(self, name: str, accumulator: Any) -> None:
        """Append the state of `accumulator` (its `state_dict()`: tensors go to the file) under `name`."""
        import torch

        entry = {}
        for key, value in accumulator.state_dict().items():
            if isinstance(value, torch.Tensor):
                value = value.detach().to("cpu").contiguous()
                entry[key] = (self._file.tell(), value.dtype, tuple(value.shape))
                self._file.write(value.reshape(-1).view(torch.uint8).numpy().data)
            else:
                entry[key] = value
        self._index[name] = entry

    def __contains__(self, name: str) -> bool:
        return name in self._index

    def get(self, name: str, device: Any) -> dict[str, Any]:
        """The state of `name` as `put` saw it (tensors on `device`), for `OnlineMerge.load_state_dict`."""
        import torch

        self._file.flush()
        state = {}
        for key, value in self._index[name].items():
            if isinstance(value, tuple):
                offset, dtype, shape = value
                buffer = bytearray(math.prod(shape) * dtype.itemsize)
                self._file.seek(offset)
                self._file.readinto(buffer)
                value = torch.frombuffer(buffer, dtype=dtype).reshape(shape).to(device)
            state[key] = value
        return state

    def close(self) -> None:
        """Remove the file (and the temporary directory made for it). Safe to call twice."""
        self._file.close()
        self.path.unlink(missing_ok=True)
        if self._temporary is not None:
            os.rmdir(self._temporary)
            self._temporary = None

    def __enter__(self) -> FoldedStates:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
