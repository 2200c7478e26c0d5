"""Streaming checkpoint merge: equality with the in-memory merge, sharding, dtypes, cards, and every bad input."""

import json
import logging
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from builders import expected_merge, leftovers, load_dir, make_family
from safetensors.torch import load_file, save_file

from hf_magmax import merge_checkpoints, merge_task_vectors
from hf_magmax.checkpoints import MERGE_CONFIG_NAME, load_merge_config, parse_size
from hf_magmax.hub import parse_model_card


METHODS = ["magmax", "average", "task_arithmetic", "ties", "random_mix"]


# ---------------------------------------------------------------------------------------------------------------------
# tiny checkpoint families (base + T fine-tunes), built from configs
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("llama"), "llama", num_tasks=3)


# ---------------------------------------------------------------------------------------------------------------------
# equality with the in-memory merge
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_llama_merge_equals_in_memory_merge_bit_for_bit(llama, tmp_path, method):
    base, models = llama
    kwargs = {"ties": {"density": 0.3}, "random_mix": {"seed": 7}}.get(method, {})
    out = merge_checkpoints(base, models, tmp_path / "out", method=method, show_progress=False, **kwargs)
    merged, expected = load_dir(out), expected_merge(base, models, method, **kwargs)
    assert list(merged) == list(expected)
    for name in expected:
        assert merged[name].dtype == expected[name].dtype
        assert torch.equal(merged[name], expected[name]), name
    assert not torch.equal(merged["model.norm.weight"], load_dir(base)["model.norm.weight"])


@pytest.fixture(scope="module")
def llama_bf16(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("llama_bf16"), "llama", num_tasks=3, dtype=torch.bfloat16)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_merge_checkpoints_equals_the_engine_bit_for_bit(llama, llama_bf16, tmp_path, monkeypatch, method, precision):
    """The streaming merge (in row blocks) and the engine (TaskVector -> merge_task_vectors -> apply_to) agree."""
    import hf_magmax.checkpoints

    monkeypatch.setattr(hf_magmax.checkpoints, "_CHUNK_ELEMENTS", 100)  # many row blocks per tensor
    base, models = llama if precision == "float32" else llama_bf16
    kwargs = {"ties": {"density": 0.3}, "random_mix": {"seed": 11}}.get(method, {})
    out = merge_checkpoints(base, models, tmp_path / "out", method=method, show_progress=False, **kwargs)
    merged, expected = load_dir(out), expected_merge(base, models, method, **kwargs)
    assert list(merged) == list(expected)
    for name in expected:
        assert merged[name].dtype == getattr(torch, precision) == expected[name].dtype
        assert torch.equal(merged[name], expected[name]), name
    base_sd = load_dir(base)
    assert sum(not torch.equal(merged[n], base_sd[n]) for n in base_sd) >= len(base_sd) - 1


@pytest.mark.parametrize("method", METHODS)
def test_row_block_streaming_equals_in_memory_merge(llama, tmp_path, monkeypatch, method):
    import hf_magmax.checkpoints

    monkeypatch.setattr(hf_magmax.checkpoints, "_CHUNK_ELEMENTS", 100)  # many row blocks per tensor
    base, models = llama
    # ties: whole-tensor trim thresholds, then row blocks; random_mix: each block draws at its element offset
    kwargs = {"ties": {"density": 0.3}, "random_mix": {"seed": 3}}.get(method, {})
    out = merge_checkpoints(
        base, models, tmp_path / "out", method=method, dtype="bfloat16", show_progress=False, **kwargs
    )
    merged, expected = load_dir(out), expected_merge(base, models, method, **kwargs)
    assert all(torch.equal(merged[n], expected[n].to(torch.bfloat16)) for n in expected)


@pytest.mark.parametrize("kind", ["bert", "vit"])
def test_bert_and_vit_merge_equals_in_memory_merge(tmp_path, kind):
    base, models = make_family(tmp_path / kind, kind, num_tasks=2)
    out = merge_checkpoints(base, models, tmp_path / "out", scaling_coef=0.7, show_progress=False)
    merged, expected = load_dir(out), expected_merge(base, models, "magmax", scaling_coef=0.7)
    assert merged.keys() == expected.keys()
    assert all(torch.equal(merged[n], expected[n]) for n in expected)


def test_magmax_output_selects_one_task_per_element(llama, tmp_path):
    base, models = llama
    out = merge_checkpoints(base, models, tmp_path / "out", scaling_coef=1.0, show_progress=False)
    merged, base_sd = load_dir(out), load_dir(base)
    tasks = [load_dir(m) for m in models]
    name = "model.layers.0.mlp.up_proj.weight"
    candidates = torch.stack([t[name] for t in tasks])
    assert ((candidates == merged[name]).any(dim=0)).all()  # λ=1: every element is one fine-tune's element
    assert not torch.equal(merged[name], base_sd[name])


# ---------------------------------------------------------------------------------------------------------------------
# sharding, formats, dtypes, tied weights, integer tensors
# ---------------------------------------------------------------------------------------------------------------------


def test_sharded_inputs_and_sharded_output_load_with_from_pretrained(tmp_path):
    from transformers import LlamaForCausalLM

    base, models = make_family(tmp_path, "llama", num_tasks=2, max_shard_size="20KB")
    assert (Path(models[0]) / "model.safetensors.index.json").is_file()
    out = merge_checkpoints(base, models, tmp_path / "out", max_shard_size="10KB", show_progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    for shard in shards:  # every shard respects the limit (no tensor here is larger than it)
        assert (out / shard).stat().st_size < 10_000 + 2_000
        assert all(index["weight_map"][name] == shard for name in load_file(out / shard))
    merged = load_dir(out)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in merged.values())
    assert set(index["weight_map"]) == set(merged)
    expected = expected_merge(base, models, "magmax")
    assert all(torch.equal(merged[n], expected[n]) for n in expected)
    model = LlamaForCausalLM.from_pretrained(out)
    state = model.state_dict()
    assert all(torch.equal(state[n], expected[n]) for n in expected)
    from safetensors import safe_open

    with safe_open(out / shards[0], "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_single_shard_output_and_copied_files(llama, tmp_path):
    base, models = llama
    (Path(base) / "tokenizer.json").write_text('{"fake": "tokenizer"}')
    try:
        out = merge_checkpoints(base, models[:1], tmp_path / "out", show_progress=False)
    finally:
        (Path(base) / "tokenizer.json").unlink()
    files = sorted(p.name for p in out.iterdir())
    assert files == [
        "README.md",
        "config.json",
        "generation_config.json",
        MERGE_CONFIG_NAME,
        "model.safetensors",
        "tokenizer.json",
    ]
    assert (out / "config.json").read_text() == (Path(base) / "config.json").read_text()
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # not the 0o700 of a temporary directory


def test_bin_inputs_sharded_and_single(tmp_path):
    base, models = make_family(tmp_path, "llama", num_tasks=2)
    # re-save the fine-tunes as PyTorch .bin: one single file, one sharded with an index
    for i, model in enumerate(models):
        state = load_file(Path(model) / "model.safetensors")
        (Path(model) / "model.safetensors").unlink()
        if i == 0:
            torch.save(state, Path(model) / "pytorch_model.bin")
        else:
            names = sorted(state)
            halves = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
            weight_map = {}
            for file, keys in halves.items():
                torch.save({k: state[k] for k in keys}, Path(model) / file)
                weight_map.update(dict.fromkeys(keys, file))
            (Path(model) / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    out = merge_checkpoints(base, models, tmp_path / "out", show_progress=False)
    expected = expected_merge(base, models, "magmax")
    merged = load_dir(out)
    assert all(torch.equal(merged[n], expected[n]) for n in expected)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_output_dtype(llama, tmp_path, dtype):
    base, models = llama
    out = merge_checkpoints(base, models, tmp_path / "out", dtype=dtype, show_progress=False)
    merged, expected = load_dir(out), expected_merge(base, models, "magmax")
    torch_dtype = getattr(torch, dtype)
    for name, tensor in expected.items():
        assert merged[name].dtype == torch_dtype
        assert torch.equal(merged[name], tensor.to(torch_dtype)), name  # fp32 math, one rounding at the end
    assert json.loads((out / "config.json").read_text())["dtype"] == dtype


def test_half_inputs_are_merged_in_fp32(tmp_path):
    base, models = make_family(tmp_path, "llama", num_tasks=2)
    for directory in [base, *models]:
        file = Path(directory) / "model.safetensors"
        save_file({k: v.to(torch.bfloat16) for k, v in load_file(file).items()}, file, metadata={"format": "pt"})
    out = merge_checkpoints(base, models, tmp_path / "out", show_progress=False)
    merged = load_dir(out)
    base_sd, tasks = load_dir(base), [load_dir(m) for m in models]
    for name, theta_0 in base_sd.items():
        deltas = [t[name].float() - theta_0.float() for t in tasks]
        stacked = torch.stack(deltas)
        selected = stacked.gather(0, (len(deltas) - 1 - stacked.abs().flip(0).argmax(0, keepdim=True))).squeeze(0)
        want = (theta_0.float() + 0.5 * selected).to(torch.bfloat16)
        assert merged[name].dtype == torch.bfloat16
        assert torch.equal(merged[name], want), name


def test_tied_weights_stored_once_or_twice(tmp_path):
    base, models = make_family(tmp_path, "llama", num_tasks=2, tie=True)
    assert "lm_head.weight" not in load_dir(base)  # save_pretrained stores one tensor of the tied pair
    # the second fine-tune was saved by a tool that writes both members of the pair
    file = Path(models[1]) / "model.safetensors"
    state = load_file(file)
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, file, metadata={"format": "pt"})
    out = merge_checkpoints(base, models, tmp_path / "out", show_progress=False)
    merged = load_dir(out)
    assert "lm_head.weight" not in merged
    expected = expected_merge(base, [models[0], models[0]], "magmax")  # shapes only; recompute the embedding:
    base_sd = load_dir(base)
    name = "model.embed_tokens.weight"
    deltas = [load_dir(m)[name] - base_sd[name] for m in models]
    want = base_sd[name] + merge_task_vectors(deltas, method="magmax")
    assert torch.equal(merged[name], want)
    assert merged.keys() == expected.keys()
    # and the other way round: the base stores both, a fine-tune only the embedding
    shutil.rmtree(out)
    base_file = Path(base) / "model.safetensors"
    base_state = load_file(base_file)
    base_state["lm_head.weight"] = base_state[name].clone()
    save_file(base_state, base_file, metadata={"format": "pt"})
    out = merge_checkpoints(base, models, tmp_path / "out", show_progress=False)
    merged = load_dir(out)
    assert torch.equal(merged["lm_head.weight"], merged[name]) and torch.equal(merged[name], want)


def test_integer_tensors_are_copied_from_the_base(llama, tmp_path):
    base, models = llama
    work = tmp_path / "family"
    shutil.copytree(Path(base).parent, work)
    for i, directory in enumerate(["base", "task0"]):
        file = work / directory / "model.safetensors"
        state = load_file(file)
        state["step_counter"] = torch.tensor([i, 10 * i], dtype=torch.int64)
        state["mask"] = torch.tensor([True, bool(i)])
        save_file(state, file, metadata={"format": "pt"})
    out = merge_checkpoints(work / "base", [work / "task0"], tmp_path / "out", show_progress=False)
    merged = load_dir(out)
    assert torch.equal(merged["step_counter"], torch.tensor([0, 0]))
    assert torch.equal(merged["mask"], torch.tensor([True, False]))


# ---------------------------------------------------------------------------------------------------------------------
# model card, config YAML, atomic writes
# ---------------------------------------------------------------------------------------------------------------------


def test_model_card_and_config_yaml(llama, tmp_path):
    base, models = llama
    out = merge_checkpoints(
        base, models, tmp_path / "out", method="ties", density=0.5, scaling_coef=0.8, show_progress=False
    )
    metadata, body = parse_model_card((out / "README.md").read_text())
    assert "base_model" not in metadata  # a local path is never a card's base_model (it would be pushed)
    assert metadata["library_name"] == "transformers"
    assert {"hf_magmax", "model-merging", "magmax", "ties"} <= set(metadata["tags"])
    assert body.count("@inproceedings") == 1  # the citation once
    config = yaml.safe_load((out / MERGE_CONFIG_NAME).read_text())
    assert config == {
        "base": base,
        "models": models,
        "method": "ties",
        "scaling_coef": 0.8,
        "density": 0.5,
        "output_dir": str(tmp_path / "out"),
        "max_shard_size": "5GB",
        "strict_config": True,
        "extra_tensors": "error",
        "dtype": None,
        "device": "cpu",
        "allow_non_finite": False,
    }
    card_yaml = body.split("```yaml\n", 1)[1].split("```", 1)[0]
    names = [Path(m).name for m in models]  # a card is published: local inputs by their folder names only
    assert yaml.safe_load(card_yaml) == dict(config, base="base", models=names, output_dir="out")
    assert str(tmp_path) not in body and str(Path(base).parent) not in body
    assert "MagMax: Leveraging Model Merging for Seamless Continual Learning" in body
    assert "2407.06322" in body and "Marczak" in body and "ECCV" in body
    assert "hf_magmax 0." in body and "0.8" in body and all(f"`{m}`" in body for m in names)
    kwargs = load_merge_config(out / MERGE_CONFIG_NAME)
    assert kwargs == {"base": base, "models": models, "method": "ties", "scaling_coef": 0.8, "density": 0.5,
                      "output_dir": str(tmp_path / "out")}  # fmt: skip
    # re-running the recorded configuration reproduces the weights
    again_out = merge_checkpoints(**dict(kwargs, output_dir=str(tmp_path / "again")), show_progress=False)
    first, second = load_dir(out), load_dir(again_out)
    assert first.keys() == second.keys() and all(torch.equal(first[n], second[n]) for n in first)


def test_default_scaling_coef_is_recorded_as_null_and_old_files_still_load(llama, tmp_path):
    base, models = llama
    out = merge_checkpoints(base, models[:2], tmp_path / "out", show_progress=False)
    text = (out / MERGE_CONFIG_NAME).read_text()
    assert "scaling_coef: null" in text and yaml.safe_load(text)["scaling_coef"] is None
    # a file of the old schema (`output` was the directory, options of other methods recorded)
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump({"base": base, "models": models, "method": "magmax", "scaling_coef": 0.5,
                                   "dtype": None, "device": "cpu", "max_shard_size": "5GB", "output": "x"}))  # fmt: skip
    kwargs = load_merge_config(old)
    assert kwargs == {"base": base, "models": models, "scaling_coef": 0.5, "output_dir": "x"}
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: b\nmodels: [m]\noutput_dir: o\noverwrite: 'false'\n")
    with pytest.raises(ValueError, match=f"`overwrite` in {bad} must be true or false"):
        load_merge_config(bad)


def test_overwrite_replaces_atomically(llama, tmp_path):
    base, models = llama
    output = tmp_path / "out"
    output.mkdir()
    (output / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match=f"{output}.*not empty.*--overwrite"):
        merge_checkpoints(base, models, output, show_progress=False)
    assert (output / "old.txt").read_text() == "old"
    merge_checkpoints(base, models, output, overwrite=True, show_progress=False)
    assert not (output / "old.txt").exists() and (output / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    # an existing empty directory is fine
    empty = tmp_path / "empty"
    empty.mkdir()
    merge_checkpoints(base, models[:1], empty, show_progress=False)
    assert (empty / "model.safetensors").is_file()


def test_ctrl_c_leaves_nothing(llama, tmp_path, monkeypatch):
    import hf_magmax.checkpoints

    base, models = llama
    real = hf_magmax.checkpoints._row_blocks  # once per merged tensor, on the C path and on the torch path alike
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(hf_magmax.checkpoints, "_row_blocks", interrupted)
    output = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        merge_checkpoints(base, models, output, show_progress=False)
    assert leftovers(output) == []
    # with --overwrite, the old output survives an interrupted merge
    output.mkdir()
    (output / "keep.txt").write_text("keep")
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        merge_checkpoints(base, models, output, overwrite=True, show_progress=False)
    assert (output / "keep.txt").read_text() == "keep" and leftovers(output) == ["out"]


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("100kB") == 100_000
    assert parse_size(1234) == 1234
    for bad in ("five", "0", -3, "5 parsecs"):
        with pytest.raises(ValueError, match="max_shard_size"):
            parse_size(bad)


# ---------------------------------------------------------------------------------------------------------------------
# bad inputs: a clear error naming the culprit, and nothing left behind
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def family(llama, tmp_path):
    """A private, mutable copy of the llama family."""
    work = tmp_path / "family"
    shutil.copytree(Path(llama[0]).parent, work)
    return str(work / "base"), [str(work / f"task{t}") for t in range(3)], tmp_path / "out"


def _edit(directory, edit):
    file = Path(directory) / "model.safetensors"
    state = load_file(file)
    edit(state)
    save_file(state, file, metadata={"format": "pt"})
    return file


def _assert_fails(base, models, output, error, match, **kwargs):
    with pytest.raises(error, match=match):
        merge_checkpoints(base, models, output, show_progress=False, **kwargs)
    assert leftovers(output) == []


def test_other_architecture(family, tmp_path):
    base, models, output = family
    _, bert_models = make_family(tmp_path / "bert", "bert", num_tasks=1)
    _assert_fails(base, [models[0], bert_models[0]], output, ValueError, r"task0'.*another architecture.*bert.*llama")


def test_config_mismatch_strict_and_lenient(family):
    base, models, output = family
    config_file = Path(models[1]) / "config.json"
    config = json.loads(config_file.read_text())
    config["rms_norm_eps"] = 1e-5
    config_file.write_text(json.dumps(config))
    _assert_fails(base, models, output, ValueError, r"task1'.*`rms_norm_eps`.*strict_config=False")
    merge_checkpoints(base, models, output, strict_config=False, show_progress=False)
    assert (output / "model.safetensors").is_file()


def test_benign_config_differences_are_accepted(family, caplog):
    base, models, output = family
    config_file = Path(models[0]) / "config.json"
    config = json.loads(config_file.read_text())
    config.update(
        _name_or_path="someone/finetune", dtype="bfloat16", transformers_version="4.0", attention_dropout=0.1
    )
    config["initializer_range"] = 0.5  # not a field of the architecture: a warning naming it
    for key in ("tie_word_embeddings", "mlp_bias"):  # keys an older transformers did not write: their defaults
        del config[key]
    config_file.write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING, logger="hf_magmax.checkpoints"):
        merge_checkpoints(base, models, output, show_progress=False)
    merged, expected = load_dir(output), expected_merge(base, models, "magmax")
    assert merged.keys() == expected.keys() and all(torch.equal(merged[n], expected[n]) for n in expected)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "task0" in warnings[0] and "`initializer_range` (0.5 vs 0.02)" in warnings[0]
    for benign in ("_name_or_path", "dtype", "transformers_version", "attention_dropout", "tie_word", "mlp_bias"):
        assert benign not in warnings[0]


def test_missing_tensor(family):
    base, models, output = family
    _edit(models[1], lambda sd: sd.pop("model.layers.1.mlp.down_proj.weight"))
    _assert_fails(base, models, output, KeyError, r"task1'.*lacks tensor 'model.layers.1.mlp.down_proj.weight'")


def test_extra_tensor(family):
    base, models, output = family
    _edit(models[2], lambda sd: sd.update(extra_head=torch.zeros(3)))
    _assert_fails(base, models, output, KeyError, r"task2'.*'extra_head'.*base model.*lacks")


def test_shape_mismatch(family):
    base, models, output = family
    _edit(models[0], lambda sd: sd.update({"model.norm.weight": torch.zeros(17)}))
    _assert_fails(base, models, output, ValueError, r"shape mismatch for tensor 'model.norm.weight': \[17\].*task0")


def test_missing_file_and_missing_directory(family, tmp_path):
    base, models, output = family
    _assert_fails(base, [*models, str(tmp_path / "nowhere")], output, FileNotFoundError, "nowhere.*does not exist")
    (Path(models[0]) / "model.safetensors").unlink()
    _assert_fails(base, models, output, FileNotFoundError, r"no model weights in .*task0")


def test_missing_shard(tmp_path):
    base, models = make_family(tmp_path, "llama", num_tasks=2, max_shard_size="20KB")
    shard = Path(models[1]) / "model-00002-of-00002.safetensors"
    shard.unlink()
    _assert_fails(base, models, tmp_path / "out", FileNotFoundError, str(shard))


def test_truncated_safetensors(family):
    base, models, output = family
    file = Path(models[1]) / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 100])
    _assert_fails(base, models, output, ValueError, rf"truncated safetensors file {file}")


def test_corrupt_safetensors(family):
    base, models, output = family
    file = Path(models[0]) / "model.safetensors"
    file.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + b"\x00" * 64)
    _assert_fails(base, models, output, ValueError, rf"corrupt safetensors file {file}.*not valid JSON")
    file.write_bytes(b"\xff" * 64)
    _assert_fails(base, models, output, ValueError, rf"corrupt or truncated safetensors file {file}")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_inputs(family, value):
    base, models, output = family
    name = "model.layers.1.self_attn.v_proj.weight"  # late in the stream: the error comes mid-merge

    def poison(sd):
        sd[name][0, 0] = value

    file = _edit(models[2], poison)
    kind = "NaN" if math.isnan(value) else "Inf"
    _assert_fails(base, models, output, ValueError, rf"'{name}'.*task2.*{file}.*{kind}.*allow_non_finite")
    merge_checkpoints(base, models, output, allow_non_finite=True, show_progress=False)
    assert (output / "model.safetensors").is_file()


def test_huge_finite_inputs_are_not_mistaken_for_non_finite(family):
    # the finiteness check sums each block in fp32 first: here the sum overflows although every value is finite
    base, models, output = family
    name = "model.layers.1.self_attn.v_proj.weight"

    def huge(sd):
        sd[name][0, :4] = 1e38

    _edit(models[1], huge)
    merged = load_dir(merge_checkpoints(base, models, output, method="task_arithmetic", show_progress=False))
    assert torch.isfinite(merged[name]).all() and merged[name][0, 0] > 1e37
    assert torch.equal(merged[name], expected_merge(base, models, "task_arithmetic")[name])


def test_argument_errors(family):
    base, models, output = family
    _assert_fails(base, [], output, ValueError, "`models` is empty")
    _assert_fails(base, models, output, ValueError, "unknown merge method 'maxmag'", method="maxmag")
    for density in (0.0, 1.5, -0.1):
        _assert_fails(
            base, models, output, ValueError, r"`density` must be a number in \(0, 1\]", method="ties", density=density
        )
    _assert_fails(base, models, output, ValueError, "`dtype`", dtype="int8")
    _assert_fails(base, models, output, ValueError, "`max_shard_size`", max_shard_size="big")
    _assert_fails(base, models, output, ValueError, "`scaling_coef`", scaling_coef=float("nan"))
    _assert_fails(base, models, output, ValueError, "`device`", device="tpu")
    if not torch.cuda.is_available():
        _assert_fails(base, models, output, ValueError, "CUDA is not available", device="cuda")
    _assert_fails(base, models[0], output, TypeError, "`models` must be a list")


def test_output_may_not_replace_an_input(family):
    base, models, _ = family
    with pytest.raises(ValueError, match="would replace the input model .*task1"):
        merge_checkpoints(base, models, models[1], overwrite=True, show_progress=False)
    assert (Path(models[1]) / "model.safetensors").is_file()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_device_matches_cpu(llama, tmp_path):
    base, models = llama
    cpu = load_dir(merge_checkpoints(base, models, tmp_path / "cpu", method="ties", show_progress=False))
    cuda = load_dir(
        merge_checkpoints(base, models, tmp_path / "cuda", method="ties", device="cuda", show_progress=False)
    )
    assert all(torch.allclose(cpu[n], cuda[n], atol=1e-6) for n in cpu)


def test_non_empty_output_is_refused_before_any_work(family):
    base, models, output = family
    output.mkdir()
    (output / "precious.bin").write_bytes(b"1")
    with pytest.raises(FileExistsError, match=f"output directory {output} is not empty"):
        merge_checkpoints(base, models, output, show_progress=False)
    assert [p.name for p in output.iterdir()] == ["precious.bin"]
    file_output = output / "precious.bin"
    with pytest.raises(FileExistsError, match="is a file"):
        merge_checkpoints(base, models, file_output, show_progress=False)


# ---------------------------------------------------------------------------------------------------------------------
# Hub repo ids as inputs (served by the fake Hub)
# ---------------------------------------------------------------------------------------------------------------------


def test_hub_inputs_are_validated_from_headers_then_downloaded(llama, tmp_path, monkeypatch):
    from fake_hub import FakeHub
    from huggingface_hub import constants

    base, models = llama
    with FakeHub() as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", hub.token)
        for i, directory in enumerate([base, *models]):
            files = {p.name: p.read_bytes() for p in Path(directory).iterdir()}
            hub.add_repo(f"org/m{i}", files)
        ids = [f"org/m{i}" for i in range(len(models) + 1)]
        out = merge_checkpoints(ids[0], ids[1:], tmp_path / "out", show_progress=False)
        expected = expected_merge(base, models, "magmax")
        merged = load_dir(out)
        assert all(torch.equal(merged[n], expected[n]) for n in expected)
        assert parse_model_card((out / "README.md").read_text())[0]["base_model"] == "org/m0"
        # a shape mismatch in a remote model is found from its header, before any weight is downloaded
        bad = dict(hub.repos["org/m2"].files)
        state = load_file(Path(models[1]) / "model.safetensors")
        state["model.norm.weight"] = torch.zeros(5)
        bad_file = tmp_path / "bad.safetensors"
        save_file(state, bad_file, metadata={"format": "pt"})
        bad["model.safetensors"] = bad_file.read_bytes()
        hub.add_repo("org/bad", bad)
        hub.requests.clear()
        _assert_fails("org/m0", ["org/m1", "org/bad"], tmp_path / "out2", ValueError, "shape mismatch.*org/bad")
        weights = [rng for path, rng in hub.downloads if path == "/org/bad/resolve/main/model.safetensors"]
        assert weights and all(weights)  # only the header was read (Range requests), the weights never downloaded


def test_hub_id_offline_and_not_cached_is_a_clear_error(family, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    base, models, output = family
    _assert_fails(base, ["someone/not-cached"], output, FileNotFoundError, "'someone/not-cached'.*Hub cache.*offline")
