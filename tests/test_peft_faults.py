# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""`merge-lora` / `merge_adapters` faults: outputs that would replace an input, NaN/Inf in and out, broken or
malicious adapter files, one-line errors (exit 2), everything checked before the base is loaded."""

import copy
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml


pytest.importorskip("peft")

from builders import tiny_llama_classifier  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import LlamaForSequenceClassification  # noqa: E402

import hf_magmax.peft.merge as peft_merge  # noqa: E402
from hf_magmax.cli import main  # noqa: E402
from hf_magmax.hub import parse_model_card  # noqa: E402
from hf_magmax.peft import merge_adapters  # noqa: E402


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

Q_PROJ = "model.layers.0.self_attn.q_proj"


def _adapter(base, directory, seed, **kwargs):
    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **kwargs))
    model.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A base saved to disk and loaded back (so adapters record its path), two adapters, one with a head."""
    root = tmp_path_factory.mktemp("lora_faults")
    torch.manual_seed(0)
    tiny_llama_classifier().save_pretrained(root / "base")
    base = LlamaForSequenceClassification.from_pretrained(root / "base")
    adapters = [
        _adapter(base, root / "a1", 1, r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["score"],
                 task_type="SEQ_CLS"),
        _adapter(base, root / "a2", 2, r=2, target_modules=["q_proj"], task_type="SEQ_CLS"),
    ]  # fmt: skip
    return root / "base", adapters


@pytest.fixture
def no_base_loading(monkeypatch):
    """Fail the test if the base model is loaded (the check under test must come first)."""

    def fail(*args, **kwargs):
        raise AssertionError("the base model was loaded before the inputs were checked")

    monkeypatch.setattr(peft_merge, "_load_base_model", fail)


def _cli(*argv):
    return main(["merge-lora", *map(str, argv)])


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("hf-magmax")]
    assert len(lines) == 1 and lines[0].startswith("hf-magmax merge-lora: error: "), err  # (progress bars aside)
    return lines[0]


def _snapshot(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir()) if p.is_file()}


def _copy(adapter, directory) -> Path:
    shutil.copytree(adapter, directory)
    return Path(directory)


# ---------------------------------------------------------------------------------------------------------------------
# data loss: the output may not be, contain or lie inside an input
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["adapter", "parent_of_adapter", "inside_adapter", "base", "inside_base"])
def test_output_that_is_or_holds_an_input_is_refused(inputs, tmp_path, capsys, monkeypatch, no_base_loading, where):
    base, adapters = inputs
    work = tmp_path / "work"
    a1 = _copy(adapters[0], work / "a1")
    base_copy = _copy(base, tmp_path / "base")
    output = {
        "adapter": a1,
        "parent_of_adapter": work,
        "inside_adapter": a1 / "out",
        "base": base_copy,
        "inside_base": base_copy / "merged",
    }[where]
    before = _snapshot(a1), _snapshot(base_copy)
    monkeypatch.chdir(tmp_path)  # inputs named relatively, the output absolutely: compared resolved
    code = _cli("--base", "base", "--adapters", "work/a1", adapters[1], "--output-dir", output, "--overwrite")
    assert code == 2
    err = _one_line_error(capsys)
    assert "`output_dir`" in err and ("adapter" in err or "base model" in err) and "outside every input" in err
    assert (_snapshot(a1), _snapshot(base_copy)) == before


# ---------------------------------------------------------------------------------------------------------------------
# finiteness: inputs, λ, outputs
# ---------------------------------------------------------------------------------------------------------------------


def _poisoned(adapter, directory, value=float("nan")) -> str:
    directory = _copy(adapter, directory)
    path = directory / "adapter_model.safetensors"
    tensors = load_file(path)
    key = f"base_model.model.{Q_PROJ}.lora_B.weight"
    tensors[key][0, 0] = value
    save_file(tensors, path, metadata={"format": "pt"})
    return str(directory)


@pytest.mark.parametrize("method", ["average", "task_arithmetic", "magmax", "ties"])
def test_nan_in_an_adapter_is_an_error_naming_adapter_module_and_tensor(inputs, tmp_path, capsys, method):
    base, adapters = inputs
    bad = _poisoned(adapters[1], tmp_path / "bad")
    out = tmp_path / "out"
    assert _cli("--base", base, "--adapters", adapters[0], bad, "--method", method, "--output-dir", out) == 2
    err = _one_line_error(capsys)
    assert f"adapter {bad!r} holds NaN values in module `{Q_PROJ}`" in err and "lora_B.weight" in err
    assert "--allow-non-finite" in err and not out.exists()
    # the same adapter loaded on a PeftModel by name
    model = PeftModel.from_pretrained(LlamaForSequenceClassification.from_pretrained(base), bad, adapter_name="bad")
    with pytest.raises(ValueError, match=rf"adapter 'bad' holds NaN values in module `{Q_PROJ}`"):
        merge_adapters(model, ["bad"], method=method)
    # allow_non_finite lets it through (and keeps the NaN)
    assert _cli("--base", base, "--adapters", bad, "--method", method, "--output-dir", out, "--allow-non-finite") == 0


@pytest.mark.parametrize("coef", ["nan", "inf", "0", "-1"])
def test_scaling_coef_is_validated_by_the_merge_spec(inputs, tmp_path, capsys, no_base_loading, coef):
    base, adapters = inputs
    assert _cli("--base", base, "--adapters", *adapters, "--scaling-coef", coef, "--output-dir", tmp_path / "o") == 2
    assert "scaling_coef" in _one_line_error(capsys)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "flags",
    [
        ["--scaling-coef", "1e37", "--dtype", "float16"],
        ["--scaling-coef", "1e5", "--dtype", "float16"],  # θ_0 + λ·ΔW above 65504
        ["--scaling-coef", "1e37", "--rank", "2", "--dtype", "float16"],  # the re-factored adapter's factors
    ],
)
def test_non_finite_output_is_an_error_before_anything_is_written(inputs, tmp_path, capsys, flags):
    base, adapters = inputs
    out = tmp_path / "out"
    assert _cli("--base", base, "--adapters", *adapters, *flags, "--output-dir", out) == 2
    err = _one_line_error(capsys)
    assert ("Inf" in err or "NaN" in err) and "scaling_coef" in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if "hf_magmax-tmp" in p.name]


def test_float16_output_dtype(inputs, tmp_path):
    base, adapters = inputs
    assert _cli("--base", base, "--adapters", *adapters, "--dtype", "float16", "--output-dir", tmp_path / "o") == 0
    model = LlamaForSequenceClassification.from_pretrained(tmp_path / "o", dtype="auto")
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    reference = merge_adapters(LlamaForSequenceClassification.from_pretrained(base), adapters).model.state_dict()
    for name, value in model.state_dict().items():  # one rounding of the float32 result
        assert torch.equal(value, reference[name].to(torch.float16)), name


# ---------------------------------------------------------------------------------------------------------------------
# broken inputs: one line, exit 2, checked before the base is loaded
# ---------------------------------------------------------------------------------------------------------------------


def test_truncated_adapter_file(inputs, tmp_path, capsys, no_base_loading):
    base, adapters = inputs
    bad = _copy(adapters[1], tmp_path / "truncated")
    weights = bad / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert _cli("--base", base, "--adapters", adapters[0], bad, "--output-dir", tmp_path / "o") == 2
    err = _one_line_error(capsys)
    assert f"adapter '{bad}': cannot read its weights {weights}" in err


def test_adapter_whose_rank_does_not_match_its_tensors(inputs, tmp_path, capsys, no_base_loading):
    base, adapters = inputs
    bad = _copy(adapters[1], tmp_path / "bad_r")
    config = json.loads((bad / "adapter_config.json").read_text())
    config["r"] = 3
    (bad / "adapter_config.json").write_text(json.dumps(config))
    assert _cli("--base", base, "--adapters", bad, "--output-dir", tmp_path / "o") == 2
    err = _one_line_error(capsys)
    assert f"module `{Q_PROJ}` has LoRA factors of rank 2 but the config gives it r=3" in err


def test_malicious_bin_adapter_is_blocked_in_one_line(inputs, tmp_path, capsys, no_base_loading):
    base, adapters = inputs
    evil = tmp_path / "evil"
    evil.mkdir()
    shutil.copy(Path(adapters[1]) / "adapter_config.json", evil)
    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"x": Payload()}, evil / "adapter_model.bin")
    assert _cli("--base", base, "--adapters", evil, "--output-dir", tmp_path / "o") == 2
    err = _one_line_error(capsys)
    assert f"adapter '{evil}': cannot read its weights {evil / 'adapter_model.bin'}" in err
    assert not marker.exists()


@pytest.mark.parametrize("source", ["~nouser/x", "./missing", "not/an/adapter/path"])
def test_missing_adapter_fails_before_the_base_is_loaded(inputs, tmp_path, capsys, no_base_loading, source):
    base, adapters = inputs
    assert _cli("--base", base, "--adapters", adapters[0], source, "--output-dir", tmp_path / "o") == 2
    assert f"adapter {source!r} is neither" in _one_line_error(capsys)


def test_device_without_cuda_is_one_line(inputs, tmp_path, capsys, no_base_loading):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    base, adapters = inputs
    assert _cli("--base", base, "--adapters", *adapters, "--device", "cuda", "--output-dir", tmp_path / "o") == 2
    assert "CUDA is not available" in _one_line_error(capsys)


# ---------------------------------------------------------------------------------------------------------------------
# the written adapter, card and config
# ---------------------------------------------------------------------------------------------------------------------


def test_modules_to_save_listed_once_and_local_base_never_in_card(inputs, tmp_path, monkeypatch, caplog):
    base, adapters = inputs
    monkeypatch.chdir(base.parent)  # the base named relatively: the same directory the adapters were made for
    with caplog.at_level("WARNING", logger="hf_magmax.peft.loading"):
        assert _cli("--base", "base", "--adapters", *adapters, "--rank", "4", "--output-dir", tmp_path / "o") == 0
    assert "was made for" not in caplog.text
    config = json.loads((tmp_path / "o" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["score"]
    metadata, body = parse_model_card((tmp_path / "o" / "README.md").read_text())
    assert "base_model" not in metadata and str(base) not in json.dumps(metadata)
    recorded = yaml.safe_load((tmp_path / "o" / "magmax_config.yaml").read_text())
    assert recorded["base"] == str(base)  # recorded absolute, so the config re-runs from anywhere


@pytest.mark.parametrize("lora_output", ["merged", "adapter"])
def test_rerun_from_its_own_config_gives_identical_files(inputs, tmp_path, lora_output):
    base, adapters = inputs
    out = tmp_path / "out"
    flags = ["--method", "random_mix", "--seed", "3", "--lora-output", lora_output]
    assert _cli("--base", base, "--adapters", *adapters, *flags, "--output-dir", out) == 0
    first = _snapshot(out)
    assert _cli(out / "magmax_config.yaml", "--overwrite") == 0
    assert _snapshot(out) == first
    # into another directory: the same weights; flags override the file
    assert _cli(out / "magmax_config.yaml", "--output-dir", tmp_path / "again") == 0
    again = _snapshot(tmp_path / "again")
    weights = "model.safetensors" if lora_output == "merged" else "adapter_model.safetensors"
    assert again[weights] == first[weights]
    assert yaml.safe_load(again["magmax_config.yaml"])["output_dir"] == str(tmp_path / "again")


def test_config_errors_name_the_field(inputs, tmp_path, capsys, no_base_loading):
    base, adapters = inputs
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"base": str(base), "adapters": adapters, "output_dir": str(tmp_path / "o"),
                                    "overwrite": "false"}))  # fmt: skip
    assert _cli(path) == 2
    assert "`overwrite`" in _one_line_error(capsys)
    path.write_text(yaml.safe_dump({"base": str(base), "adapters": adapters, "output_dir": "o", "density": 0.5}))
    assert _cli(path) == 2
    assert "`density` only applies to `ties`" in _one_line_error(capsys)


def test_an_older_merge_lora_config_still_runs(inputs, tmp_path):
    base, adapters = inputs
    old = {"base": str(base), "adapters": adapters, "method": "magmax", "scaling_coef": 0.5, "output": "adapter",
           "rank": 2, "adapter_name": "magmax"}  # fmt: skip
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(old))
    assert _cli(path, "--output-dir", tmp_path / "o") == 0
    recorded = yaml.safe_load((tmp_path / "o" / "magmax_config.yaml").read_text())
    assert recorded["lora_output"] == "adapter" and recorded["rank"] == 2 and "adapter_name" not in recorded


# ---------------------------------------------------------------------------------------------------------------------
# one line instead of a traceback (issue #18, item 7)
# ---------------------------------------------------------------------------------------------------------------------


def test_opcm_with_nan_in_the_first_adapter_and_allow_non_finite_is_one_line(inputs, tmp_path, capsys):
    base, adapters = inputs
    bad = _poisoned(adapters[1], tmp_path / "bad")  # NaN in the first task's q_proj: no SVD of the merge so far
    out = tmp_path / "out"
    argv = ["--base", base, "--adapters", bad, adapters[0], "--method", "opcm", "--output-dir", out]
    assert _cli(*argv, "--allow-non-finite") == 2
    err = _one_line_error(capsys)
    assert "opcm cannot project task vector 2" in err and Q_PROJ in err and "NaN or Inf" in err
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


@pytest.mark.parametrize("damage", ["malicious", "truncated"])
def test_a_malicious_or_truncated_bin_base_is_one_line(inputs, tmp_path, capsys, damage):
    base, adapters = inputs
    evil = tmp_path / "evil-base"
    shutil.copytree(base, evil)
    (evil / "model.safetensors").unlink()
    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    if damage == "malicious":
        torch.save({"model.embed_tokens.weight": Payload()}, evil / "pytorch_model.bin")
    else:
        torch.save(load_file(Path(base) / "model.safetensors"), evil / "pytorch_model.bin")
        data = (evil / "pytorch_model.bin").read_bytes()
        (evil / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    assert _cli("--base", evil, "--adapters", adapters[0], "--output-dir", out) == 2
    err = _one_line_error(capsys)
    assert f"cannot load the base model '{evil}'" in err
    assert f"cannot read PyTorch checkpoint {evil / 'pytorch_model.bin'} (memory-mapped, weights only)" in err
    assert not marker.exists() and not out.exists()


# ---------------------------------------------------------------------------------------------------------------------
# inputs that change during the merge (issue #18, item 3)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["base config", "adapter weights"])
def test_an_input_changed_during_a_lora_merge_is_one_error_and_nothing_is_written(
    inputs, tmp_path, capsys, monkeypatch, which
):
    import time

    import hf_magmax.peft.save as peft_save

    base, adapters = inputs
    base_copy, adapter_copy = tmp_path / "base", _copy(adapters[0], tmp_path / "a1")
    shutil.copytree(base, base_copy)
    target = base_copy / "config.json" if which == "base config" else adapter_copy / "adapter_model.safetensors"
    real = peft_save.merge_adapters

    def merge_then_change(*args, **kwargs):  # a second writer changes an input once the merge has read it
        result = real(*args, **kwargs)
        time.sleep(0.02)  # past the filesystem's timestamp granularity
        target.write_bytes(target.read_bytes() + b" ")
        return result

    monkeypatch.setattr(peft_save, "merge_adapters", merge_then_change)
    out = tmp_path / "out"
    assert _cli("--base", base_copy, "--adapters", adapter_copy, "--output-dir", out) == 2
    err = _one_line_error(capsys)
    assert f"input file {target} was rewritten" in err and "nothing was written" in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if "hf_magmax" in p.name]
