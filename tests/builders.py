# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""Shared builders for the tests: tiny models from configs, checkpoint families on disk, the in-memory reference merge.

Test modules import from here (never from each other); `conftest.py` turns the common ones into fixtures.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from hf_magmax import TaskVector, merge_task_vectors


def tiny_model(kind: str, tie: bool = False):
    if kind == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            tie_word_embeddings=tie,
        )
        return LlamaForCausalLM(config)
    if kind == "bert":
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=32,
            num_labels=3,
        )
        return BertForSequenceClassification(config)
    if kind == "vit":
        from transformers import ViTConfig, ViTForImageClassification

        config = ViTConfig(
            image_size=8,
            patch_size=4,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            num_labels=3,
        )
        return ViTForImageClassification(config)
    raise ValueError(kind)


def make_family(root: Path, kind: str = "llama", num_tasks: int = 3, tie: bool = False, dtype=None, **save_kwargs):
    """Save a base model and `num_tasks` fine-tunes (base + seeded noise per task) under `root` (in `dtype`, e.g.
    `torch.bfloat16`, when given)."""
    torch.manual_seed(0)
    base = tiny_model(kind, tie=tie)
    (base if dtype is None else base.to(dtype)).save_pretrained(root / "base", **save_kwargs)
    tasks = []
    for t in range(num_tasks):
        model = tiny_model(kind, tie=tie)
        if dtype is not None:
            model.to(dtype)
        model.load_state_dict(base.state_dict())
        generator = torch.Generator().manual_seed(100 + t)
        with torch.no_grad():
            for p in model.parameters():
                p.add_((torch.randn(p.shape, generator=generator) * 0.02).to(p.dtype))
        model.save_pretrained(root / f"task{t}", **save_kwargs)
        tasks.append(str(root / f"task{t}"))
    return str(root / "base"), tasks


def make_synthetic_family(
    root: Path, num_tensors: int, shape: tuple[int, ...], num_tasks: int = 2, dtype=torch.float32
):
    """A base and `num_tasks` fine-tunes of `num_tensors` random tensors of `shape` (plain safetensors, no config), for
    tests that need many or large tensors quickly."""
    generator = torch.Generator().manual_seed(0)
    base = {f"layer{i:03d}.weight": torch.randn(shape, generator=generator).to(dtype) for i in range(num_tensors)}
    paths = []
    for name in ["base", *(f"task{t}" for t in range(num_tasks))]:
        directory = root / name
        directory.mkdir(parents=True, exist_ok=True)
        state = (
            base
            if name == "base"
            else {k: (v + 0.01 * torch.randn(shape, generator=generator)).to(dtype) for k, v in base.items()}
        )
        save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
        paths.append(str(directory))
    return paths[0], paths[1:]


def load_dir(path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory (safetensors, sharded or not), sorted by name."""
    path = Path(path)
    state = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(file))
    for file in sorted(path.glob("*.bin")):
        state.update(torch.load(file, weights_only=True))
    return dict(sorted(state.items()))


def expected_merge(base: str, models: list[str], method: str, **kwargs) -> dict[str, torch.Tensor]:
    """The in-memory reference: TaskVector + merge_task_vectors + apply_to (tensors in sorted name order)."""
    base_sd = load_dir(base)
    task_vectors = [TaskVector.from_state_dicts(base_sd, load_dir(m)) for m in models]
    return merge_task_vectors(task_vectors, method=method, **kwargs).apply_to(base_sd)


def leftovers(output: Path) -> list[str]:
    """Anything our merge could have left beside or at `output` (temp/old directories or the output itself)."""
    found = [p.name for p in output.parent.iterdir() if p.name.startswith(f".{output.name}.")]
    if output.exists():
        found.append(output.name)
    return found


def tiny_llama_classifier(hidden_size: int = 16) -> nn.Module:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=hidden_size,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_labels=3,
        pad_token_id=0,
    )
    return LlamaForSequenceClassification(config).eval()
