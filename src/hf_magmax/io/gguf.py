# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""Reading GGUF checkpoints (llama.cpp's format) as merge inputs: [`GGUFCheckpointReader`].

A GGUF file is read as transformers reads it (`from_pretrained(..., gguf_file=...)`): the config from the GGUF
metadata (`transformers.modeling_gguf_pytorch_utils.load_gguf_checkpoint`), the tensor names mapped to the Hugging
Face names of the architecture (`get_gguf_hf_weights_map`, on a meta-device instance of the model) and every tensor
dequantised with `gguf.dequantize` and passed through transformers' tensor processor of the architecture (e.g. the
row permutation of Llama's q/k projections). The values are the ones `from_pretrained` gives, in float32.

Nothing is dequantised up front: `GGUFReader` memory-maps the file and [`GGUFCheckpointReader.rows`] dequantises only
the rows of the block the merge asks for (for architectures whose processor permutes or transforms whole tensors,
such as GPT-2's transposes, one whole tensor at a time). A merge of GGUF inputs therefore streams like one of
safetensors inputs. GGUF mixture-of-experts layouts that transformers assembles from several GGUF tensors (Qwen2-MoE,
GPT-OSS, MiniMax-M2) are refused: load them with transformers and `save_pretrained` them first.

The output of a merge is never re-quantised: it is written as safetensors in the dequantised dtype (float32) or the
merge's `dtype`.

gguf and torch are imported inside the functions (the `gguf` extra: `pip install hf_magmax[gguf]`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .formats import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME
from .reading import CheckpointReader, TensorInfo


logger = logging.getLogger(__name__)

__all__ = ["GGUF_SUFFIX", "GGUFCheckpointReader", "find_gguf_file"]

GGUF_SUFFIX = ".gguf"
#: transformers' tensor processors that change only names (read row blocks as they are).
_PLAIN_PROCESSORS = ("TensorProcessor", "T5TensorProcessor")
#: processors that transform values element by element (`norm.weight - 1`): applied to each row block.
_ELEMENTWISE_PROCESSORS = ("NemotronTensorProcessor", "Gemma2TensorProcessor")
#: processors that permute rows (Llama's q/k): the permutation is read off the processor itself.
_ROW_PERMUTING_PROCESSORS = ("LlamaTensorProcessor",)
#: processors that assemble one HF tensor from several GGUF tensors (MoE experts): not supported as merge inputs.
_UNSUPPORTED_PROCESSORS = ("Qwen2MoeTensorProcessor", "GptOssTensorProcessor", "MiniMaxM2TensorProcessor")
#: GGUF types read as plain numbers (not dequantised).
_RAW_TYPES = {"I8": "int8", "I16": "int16", "I32": "int32", "I64": "int64", "F64": "float64"}


def _require_gguf():
    try:
        import gguf
    except ImportError as err:
        raise ImportError(
            "reading GGUF checkpoints needs the `gguf` package: `pip install hf_magmax[gguf]` (or `pip install gguf`)."
        ) from err
    return gguf


def find_gguf_file(path: Path) -> Path | None:
    """The GGUF file a merge input names: the `.gguf` file itself, or the one `.gguf` file of a folder that holds no
    safetensors/`.bin` weights (a folder with Hugging Face weights is read as before). `None` otherwise.

    Raises:
        `ValueError` for a folder with several `.gguf` files (naming them: pass the one to merge).
    """
    if path.is_file():
        return path if path.suffix.lower() == GGUF_SUFFIX else None
    if not path.is_dir():
        return None
    ggufs = sorted(p for p in path.iterdir() if p.suffix.lower() == GGUF_SUFFIX and p.is_file())
    if not ggufs:
        return None
    hf_weights = [SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME]
    if any((path / name).is_file() for name in hf_weights) or any(path.glob("*.safetensors")):
        return None
    if len(ggufs) > 1:
        names = ", ".join(p.name for p in ggufs[:4]) + (", ..." if len(ggufs) > 4 else "")
        raise ValueError(f"folder {path} holds {len(ggufs)} GGUF files ({names}): pass the path of the one to merge.")
    return ggufs[0]


def _open_gguf(file: Path):
    """`gguf.GGUFReader` on `file` (memory-mapped), with every tensor checked to lie inside the file."""
    gguf = _require_gguf()
    size = file.stat().st_size
    try:
        reader = gguf.GGUFReader(str(file))
    except Exception as err:  # numpy/ValueError/KeyError on a bad magic, version, field or a cut-off header
        raise ValueError(
            f"corrupt or truncated GGUF file {file} ({size} bytes): gguf cannot read it "
            f"({' '.join(str(err).split()) or type(err).__name__}). Re-download or re-convert it."
        ) from None
    for tensor in reader.tensors:
        if int(tensor.data_offset) + int(tensor.n_bytes) > size:
            raise ValueError(
                f"truncated GGUF file {file}: tensor {tensor.name!r} ends at byte "
                f"{int(tensor.data_offset) + int(tensor.n_bytes)} but the file has {size}. Re-download it."
            )
    return reader


@contextlib.contextmanager
def _gguf_shortcuts(reader=None):
    """transformers' GGUF functions, without their repeated work: `load_gguf_checkpoint` given the `GGUFReader`
    already open (parsing a 49k-token vocabulary costs seconds) and `get_gguf_hf_weights_map` with gguf's tensor name
    map built once per architecture (it rebuilds it for every submodule: 10 s for a 135M Llama). Both functions
    import these names from `gguf` when called, so patching the module attributes for the call is enough."""
    from unittest import mock

    import gguf

    patches = [
        mock.patch.object(gguf, "get_tensor_name_map", functools.lru_cache(maxsize=8)(gguf.get_tensor_name_map))
    ]
    if reader is not None:
        patches.append(mock.patch.object(gguf, "GGUFReader", lambda *args, **kwargs: reader))
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        yield


def _gguf_config(file: Path, reader) -> dict[str, Any]:
    """The config dict transformers makes of the GGUF metadata (`load_gguf_checkpoint(return_tensors=False)`)."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    try:
        with _gguf_shortcuts(reader):
            config = load_gguf_checkpoint(str(file), return_tensors=False)["config"]
    except ValueError as err:  # "GGUF model with architecture X is not supported yet."
        raise ValueError(f"GGUF file {file}: {' '.join(str(err).split())} (transformers cannot read it).") from None
    except Exception as err:
        raise ValueError(f"cannot read the metadata of GGUF file {file}: {err}") from None
    return dict(config)


def _model_class(config):
    """The transformers class whose parameter names a GGUF of this config maps to: `architectures[0]` if named, else
    the causal LM of the model type (what `AutoModelForCausalLM.from_pretrained(..., gguf_file=...)` builds), else
    the seq2seq LM, else the bare model."""
    import transformers

    from .reading import model_class_for

    named = model_class_for(config)
    if named is not None:
        return named
    for auto in (
        "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
        "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
        "MODEL_MAPPING_NAMES",
    ):
        class_name = getattr(transformers.models.auto.modeling_auto, auto).get(config.model_type)
        if isinstance(class_name, (tuple, list)):
            class_name = class_name[0]
        cls = getattr(transformers, class_name, None) if class_name else None
        if cls is not None:
            return cls
    raise ValueError(f"transformers has no model class for model_type {config.model_type!r}.")


@dataclass
class _GGUFEntry:
    """How one HF tensor is read from the GGUF file."""

    tensor: Any  # gguf ReaderTensor
    gguf_name: str
    mode: str  # "rows" (row blocks as they are), "elementwise" (processor per block), "whole" (processor per tensor)
    permutation: Any = None  # "rows": HF row i is GGUF row permutation[i] (numpy), or None


@dataclass
class GGUFCheckpointReader(CheckpointReader):
    """One GGUF input of a merge (a `.gguf` file, or a folder holding one), read as transformers reads it.

    `path` is the `.gguf` file. `config` is transformers' config dict of the GGUF metadata (with `architectures` set
    to the class whose parameter names the tensors get). `tensors` maps Hugging Face names to float32
    [`~hf_magmax.io.TensorInfo`] (the shapes the architecture expects, checked against the GGUF's). [`rows`] returns
    lazily dequantised views.

    Example:

    ```python
    >>> from hf_magmax.io import CheckpointReader
    >>> reader = CheckpointReader.open("SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
    >>> reader.read_tensor_table(); reader.rows("model.layers.0.self_attn.q_proj.weight")[0:64].shape  # doctest: +SKIP
    torch.Size([64, 576])
    ```
    """

    fmt: str = "gguf"
    _entries: dict[str, _GGUFEntry] = field(default_factory=dict, repr=False)
    _reader: Any = field(default=None, repr=False)
    _processor: Any = field(default=None, repr=False)

    @classmethod
    def open_file(cls, name: str, file: Path) -> GGUFCheckpointReader:
        """Read and check the GGUF metadata of `file` (the input `name`): not its tensors yet."""
        reader = _open_gguf(file)
        config = _gguf_config(file, reader)
        checkpoint = cls(name=name, path=file, config=config)
        checkpoint._reader = reader
        config["architectures"] = [_model_class(checkpoint.auto_config()).__name__]
        return checkpoint

    @property
    def is_local(self) -> bool:
        return True

    @property
    def gguf_file(self) -> Path:
        return self.path

    @property
    def config_file(self) -> Path:
        return self.path  # the config is the GGUF metadata

    def auto_config(self):
        """The transformers config of the GGUF metadata (what `AutoConfig.from_pretrained(..., gguf_file=...)` gives)."""
        import transformers

        config = dict(self.config)
        model_type = config.pop("model_type")
        return transformers.AutoConfig.for_model(model_type, **config)

    def read_tensor_table(self) -> None:
        """Map every GGUF tensor to its Hugging Face name and shape (no tensor data read)."""
        import numpy as np
        import torch
        from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

        if self._reader is None:
            self._reader = _open_gguf(self.path)
        config = self.auto_config()
        architecture = self._architecture()
        processor = self.processor
        kind = type(processor).__name__
        if kind in _UNSUPPORTED_PROCESSORS:
            raise ValueError(
                f"GGUF file {self.path} is a {architecture} mixture-of-experts checkpoint whose experts transformers "
                "assembles from several GGUF tensors: not supported as a merge input. Load it with transformers "
                "(`from_pretrained(..., gguf_file=...)`) and `save_pretrained` it, then merge that."
            )
        with torch.device("meta"):
            model = _model_class(config)(config)
        expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        with _gguf_shortcuts():
            mapping = get_gguf_hf_weights_map(model, processor)
        self.tensors.clear()
        self._entries.clear()
        skipped = []
        for tensor in self._reader.tensors:
            type_name = tensor.tensor_type.name
            if type_name not in _RAW_TYPES and not _can_dequantize(tensor):
                raise ValueError(
                    f"GGUF file {self.path}: tensor {tensor.name!r} has type {type_name}, which the installed `gguf` "
                    "cannot dequantise: upgrade gguf (`pip install -U gguf`) or convert the file."
                )
            mode, permutation, hf_name = self._plan(tensor, processor, kind, mapping)
            if hf_name is None:
                skipped.append(tensor.name)
                continue
            if hf_name not in expected:
                raise ValueError(
                    f"GGUF file {self.path}: tensor {tensor.name!r} maps to {hf_name!r}, which "
                    f"{config.architectures[0]} does not have."
                )
            shape = expected[hf_name]
            numel = int(np.prod([int(d) for d in tensor.shape]))
            if numel != math.prod(shape):
                raise ValueError(
                    f"GGUF file {self.path}: tensor {tensor.name!r} has {numel} elements (shape "
                    f"{list(reversed([int(d) for d in tensor.shape]))}) but {hf_name!r} of the config in its metadata "
                    f"has shape {list(shape)}: the file is corrupt or its metadata disagrees with its tensors."
                )
            dtype = _RAW_TYPES.get(type_name, "float32")
            self.tensors[hf_name] = TensorInfo(self.path, dtype, shape)
            self._entries[hf_name] = _GGUFEntry(tensor, tensor.name, mode, permutation)
        if skipped:
            logger.info("GGUF file %s: %d tensor(s) without a transformers parameter skipped (as from_pretrained "
                        "does): %s", self.path, len(skipped), ", ".join(skipped[:5]))  # fmt: skip
        if not self.tensors:
            raise ValueError(
                f"GGUF file {self.path} holds no tensor that transformers maps to {architecture} weights."
            )

    def _architecture(self) -> str:
        from transformers.modeling_gguf_pytorch_utils import read_field

        return read_field(self._reader, "general.architecture")[0]

    def _plan(self, tensor, processor, kind: str, mapping: dict[str, str]):
        """`(mode, row permutation, HF name)` of one GGUF tensor (`HF name` None: transformers skips it)."""
        import numpy as np

        name = tensor.name
        if kind in _PLAIN_PROCESSORS or kind in _ELEMENTWISE_PROCESSORS:
            mode = "rows" if kind in _PLAIN_PROCESSORS else "elementwise"
            return mode, None, mapping.get(name)
        rows = int(tensor.shape[-1]) if len(tensor.shape) > 1 else int(tensor.shape[0])
        if kind in _ROW_PERMUTING_PROCESSORS:
            probe = np.arange(rows, dtype=np.int64).reshape(rows, 1)
            moved = np.asarray(processor.process(weights=probe, name=name).weights).reshape(-1)
            permutation = None if np.array_equal(moved, np.arange(rows)) else moved
            return "rows", permutation, mapping.get(name)
        # any other processor (transposes, reshapes, renames): run it on a zero-stride stand-in for the name, and on
        # the real values one whole tensor at a time
        stand_in = np.broadcast_to(np.zeros((), dtype=np.float32), _numpy_shape(tensor))
        parsed: dict[str, Any] = {"tensors": {}}
        with np.errstate(all="ignore"):
            result = processor.process(
                weights=stand_in, name=name, tensor_key_mapping=mapping, parsed_parameters=parsed
            )
        if result.name is None:  # stored under another name by the processor (GPT-2's output.weight -> lm_head)
            renamed = list(parsed["tensors"])
            return "whole", None, renamed[0] if len(renamed) == 1 else None
        return "whole", None, mapping.get(result.name)

    # -- reading ---------------------------------------------------------------------------------------------------

    def get(self, name: str):
        return self.rows(name)[...]

    def rows(self, name: str) -> _GGUFRows:
        if self._reader is None:
            self._reader = _open_gguf(self.path)
        return _GGUFRows(self, name)

    @property
    def processor(self):
        """transformers' tensor processor of this GGUF's architecture (one per reader)."""
        if self._processor is None:
            from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

            self._processor = TENSOR_PROCESSORS.get(self._architecture(), TensorProcessor)(config=dict(self.config))
        return self._processor

    def close(self) -> None:
        super().close()  # the memory map stays with the reader until the reader itself goes

    # -- side files ------------------------------------------------------------------------------------------------

    def side_files(self, skip_names=()) -> list[Path]:
        """None: the side files of a GGUF input are converted from its metadata, not copied."""
        return []

    def write_side_files(self, directory: Path, skip_names=()) -> None:
        """Write what `save_pretrained` of a model and tokenizer loaded from this GGUF would write beside the
        weights: `config.json`, `generation_config.json` and the tokenizer files (converted from the GGUF
        vocabulary by transformers)."""
        import transformers

        config = self.auto_config()
        config.save_pretrained(directory)
        transformers.GenerationConfig.from_model_config(config).save_pretrained(directory)
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
        except Exception as err:  # a vocabulary transformers cannot convert: the weights are still right
            logger.warning("could not convert the tokenizer of GGUF file %s (%s): no tokenizer files written.",
                           self.path, " ".join(str(err).split()))  # fmt: skip
            return
        tokenizer.save_pretrained(directory)


def _can_dequantize(tensor) -> bool:
    """Whether gguf dequantises this tensor's type (asked on one block of zeros: nothing read from the file)."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, dequantize

    if tensor.tensor_type not in GGML_QUANT_SIZES:
        return False
    _, type_size = GGML_QUANT_SIZES[tensor.tensor_type]
    try:
        dequantize(np.zeros((1, type_size), dtype=np.uint8), tensor.tensor_type)
    except NotImplementedError:
        return False
    return True


def _numpy_shape(tensor) -> tuple[int, ...]:
    """The logical (numpy, row-major) shape of a GGUF tensor: its dims reversed."""
    return tuple(int(d) for d in reversed(list(tensor.shape)))


class _GGUFRows:
    """One tensor of a GGUF checkpoint as a lazily sliced view: `view[a:b]` dequantises only rows `a:b` (for
    row-block modes), `view[...]` the whole tensor; both return a float32 torch tensor in the HF shape."""

    def __init__(self, checkpoint: GGUFCheckpointReader, name: str) -> None:
        self.checkpoint = checkpoint
        self.name = name
        self.entry = checkpoint._entries[name]
        self.info = checkpoint.tensors[name]

    def get_shape(self) -> list[int]:
        return list(self.info.shape)

    def __getitem__(self, index):
        import numpy as np
        import torch

        shape = self.info.shape
        entry = self.entry
        data = entry.tensor.data  # memory-mapped: uint8 blocks for quantised types, the numbers for F32/F16
        whole = index is Ellipsis or index == (Ellipsis,)
        if not whole and not isinstance(index, slice):
            raise TypeError(f"GGUF tensor views take a row slice or `...`, got {index!r}.")
        # row blocks straight from the file where the file's rows are the HF rows (each row is quantised on its own)
        if entry.mode != "whole" and len(shape) > 0 and data.ndim > 0 and data.shape[0] == shape[0]:
            start, stop, step = (0, shape[0], 1) if whole else index.indices(shape[0])
            if step != 1:
                raise ValueError(f"GGUF tensor views take contiguous row slices, got step {step}.")
            part = data[start:stop] if entry.permutation is None else data[entry.permutation[start:stop]]
            values = self._values(part).reshape((stop - start, *shape[1:]))
            return torch.from_numpy(np.array(values, copy=True))
        values = self._values(data)  # one whole tensor (a 1-D quantised tensor, or a processor that needs it whole)
        if entry.mode != "whole":
            values = values.reshape(shape)
            if entry.permutation is not None:
                values = values[entry.permutation]
        out = torch.from_numpy(np.array(values, copy=True))
        return out if whole else out[index]

    def _values(self, raw):
        """Dequantised (or raw-number) values of some rows of the GGUF tensor, through the processor where needed."""
        import numpy as np
        from gguf import dequantize

        entry = self.entry
        type_name = entry.tensor.tensor_type.name
        if type_name in _RAW_TYPES:
            values = np.asarray(raw).view(getattr(np, _RAW_TYPES[type_name]))
        else:
            values = dequantize(raw, entry.tensor.tensor_type)
        if entry.mode == "rows":
            return values
        processor = self.checkpoint.processor
        parsed: dict[str, Any] = {"tensors": {}}
        if entry.mode == "elementwise":
            return processor.process(weights=values, name=entry.gguf_name).weights
        result = processor.process(weights=values, name=entry.gguf_name, tensor_key_mapping={self.name: self.name},
                                   parsed_parameters=parsed)  # fmt: skip
        if result.name is None:
            (tensor,) = parsed["tensors"].values()
            values = tensor.numpy()
        else:
            values = result.weights
        values = np.asarray(values)
        if tuple(values.shape) != tuple(self.info.shape):
            raise ValueError(
                f"GGUF file {self.checkpoint.path}: tensor {entry.gguf_name!r} comes out of transformers' processor "
                f"with shape {list(values.shape)}, but {self.name!r} has shape {list(self.info.shape)}."
            )
        return values
