# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""`hf-magmax merge-lora`: adapter and merged outputs, model card, atomic output, errors, Hub ids and push."""

import copy
import os
from pathlib import Path

import pytest
import torch
import yaml


pytest.importorskip("peft")

from builders import tiny_llama_classifier as _tiny_llama  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import LlamaForSequenceClassification  # noqa: E402

from hf_magmax.cli import main  # noqa: E402
from hf_magmax.hub import parse_model_card  # noqa: E402
from hf_magmax.peft import merge_adapters  # noqa: E402


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _adapter(base, directory, seed, **kwargs):
    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **kwargs))
    model.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge_lora")
    torch.manual_seed(0)
    base = _tiny_llama()
    base.save_pretrained(root / "base")
    adapters = [
        _adapter(
            base, root / "a1", 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["score"]
        ),
        _adapter(base, root / "a2", 2, r=2, lora_alpha=2, target_modules=["q_proj", "down_proj"]),
    ]
    return root / "base", adapters


def _parent_is_clean(path):
    return not [p for p in os.listdir(path.parent) if ".hf_magmax-tmp-" in p or ".old-" in p]


def test_adapter_output_with_card(checkpoints, tmp_path):
    base, adapters = checkpoints
    out = tmp_path / "magmax-lora"
    argv = ["merge-lora", "--base", str(base), "--adapters", *adapters, "--rank", "4", "--output", str(out)]
    assert main(argv) == 0
    assert {p.name for p in out.iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "README.md",
        "magmax_config.yaml",
    }
    metadata, body = parse_model_card((out / "README.md").read_text())
    assert metadata["library_name"] == "peft" and "magmax" in metadata["tags"]
    assert "base_model" not in metadata  # a local directory is no Hub id (the body names it)
    names = [f"`{Path(a).name}`" for a in adapters]  # a card is published: local folders by name only
    for text in ["`magmax`", "**scaling coefficient λ:** 0.5", "rank: 4", "Reconstruction error", *names]:
        assert text in body
    assert str(Path(adapters[0]).parent) not in body
    config = yaml.safe_load((out / "magmax_config.yaml").read_text())
    assert config == {  # the one schema (MergeConfig): λ null = the method's default
        "base": str(base),
        "adapters": adapters,
        "method": "magmax",
        "scaling_coef": None,
        "output_dir": str(out),
        "lora_output": "adapter",
        "rank": 4,
        "svd": "full",
        "svd_seed": 0,
        "dtype": None,
        "device": "cpu",
        "allow_non_finite": False,
    }
    card_config = yaml.safe_load(body.split("```yaml\n", 1)[1].split("```", 1)[0])
    assert card_config == dict(config, base="base", adapters=["a1", "a2"], output_dir="magmax-lora")
    # the directory is an ordinary PEFT adapter, equal to the library's result
    base_model = LlamaForSequenceClassification.from_pretrained(base)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base_model), out).merge_and_unload().state_dict()
    expected = merge_adapters(copy.deepcopy(base_model), adapters, rank=4).model.merge_and_unload().state_dict()
    for name, value in expected.items():
        torch.testing.assert_close(loaded[name], value, atol=1e-6, rtol=0)
    assert _parent_is_clean(out)


def test_merged_output_and_overwrite(checkpoints, tmp_path):
    base, adapters = checkpoints
    out = tmp_path / "merged"
    argv = [
        "merge-lora",
        "--base",
        str(base),
        "--adapters",
        *adapters,
        "--merged",
        "--method",
        "ties",
        "--density",
        "0.5",
    ]
    assert main([*argv, "--scaling-coef", "0.8", "--output", str(out)]) == 0
    merged = LlamaForSequenceClassification.from_pretrained(out)
    expected = merge_adapters(
        LlamaForSequenceClassification.from_pretrained(base),
        adapters,
        method="ties",
        density=0.5,
        scaling_coef=0.8,
        lora_output="merged",
    ).model
    for name, value in expected.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[name], value, atol=0, rtol=0)
    metadata, body = parse_model_card((out / "README.md").read_text())
    assert metadata["library_name"] == "transformers" and "`ties`" in body and "density: 0.5" in body
    # a non-empty output is refused without --overwrite, replaced with it
    assert main([*argv, "--output", str(out)]) == 2
    assert main([*argv, "--output", str(out), "--overwrite"]) == 0
    assert yaml.safe_load((out / "magmax_config.yaml").read_text())["scaling_coef"] is None  # ties' default
    assert "**scaling coefficient λ:** 1\n" in (out / "README.md").read_text()
    assert _parent_is_clean(out)


def test_bad_adapter_leaves_nothing(checkpoints, tmp_path, capsys):
    base, adapters = checkpoints
    other = _adapter(_tiny_llama(hidden_size=32), tmp_path / "other", 3, r=2, target_modules=["q_proj"])
    out = tmp_path / "out"
    assert main(["merge-lora", "--base", str(base), "--adapters", adapters[0], other, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "merge-lora: error:" in err and "module `model.layers.0.self_attn.q_proj`" in err and "another base" in err
    assert not out.exists() and _parent_is_clean(out)
    assert (
        main(["merge-lora", "--base", str(base), "--adapters", *adapters, "--rank", "99", "--output", str(out)]) == 2
    )
    assert "`rank`=99 is larger than module" in capsys.readouterr().err
    assert not out.exists() and _parent_is_clean(out)
    # --merged and --rank exclude each other
    argv = ["merge-lora", "--base", str(base), "--adapters", *adapters, "--merged", "--rank", "2", "--output", "x"]
    assert main(argv) == 2
    assert "--rank only applies to an adapter output" in capsys.readouterr().err
    missing = str(tmp_path / "no-such-base")
    assert main(["merge-lora", "--base", missing, "--adapters", *adapters, "--output", str(out)]) == 2
    assert f"base model {missing!r} is neither a local directory nor a Hub repo id" in capsys.readouterr().err
    assert not out.exists() and _parent_is_clean(out)


def test_hub_ids_and_push(checkpoints, fake_hub, tmp_path):  # noqa: F811
    base, adapters = checkpoints
    for repo_id, directory in [("org/base", base), ("org/lora-1", adapters[0]), ("org/lora-2", adapters[1])]:
        fake_hub.add_repo(repo_id, {p.name: p.read_bytes() for p in Path(directory).iterdir()})
    out = tmp_path / "pushed"
    argv = [
        "merge-lora",
        "--base",
        "org/base",
        "--adapters",
        "org/lora-1",
        "org/lora-2",
        "--method",
        "task_arithmetic",
        "--lora-output",
        "adapter",
    ]
    assert main([*argv, "--output", str(out), "--push-to-hub", "me/magmax-lora", "--private"]) == 0
    repo = fake_hub.repos["me/magmax-lora"]
    assert repo.private is True
    assert set(repo.files) >= {"adapter_config.json", "adapter_model.safetensors", "README.md", "magmax_config.yaml"}
    assert b"org/lora-2" in repo.files["README.md"]
    metadata, _ = parse_model_card(repo.files["README.md"].decode())
    assert metadata["base_model"] == "org/base" and metadata["base_model_relation"] == "adapter"
    # the default rank (sum of input ranks) reproduces the linear merge exactly
    local = merge_adapters(
        LlamaForSequenceClassification.from_pretrained(base), adapters, method="task_arithmetic", lora_output="adapter"
    )
    assert local.overall_error < 1e-5


def test_result_push_to_hub(checkpoints, fake_hub):  # noqa: F811
    base, adapters = checkpoints
    result = merge_adapters(LlamaForSequenceClassification.from_pretrained(base), adapters, lora_output="merged")
    url = result.push_to_hub("me/merged-lora")
    repo = fake_hub.repos["me/merged-lora"]
    assert url.startswith(fake_hub.url) and repo.private is False
    assert {"config.json", "model.safetensors", "README.md", "magmax_config.yaml"} <= set(repo.files)
    assert repo.commits[-1].message == "Upload MagMax LoRA merge"


def test_the_log_names_the_method_of_an_adapter_merge(checkpoints, tmp_path, caplog):
    base, adapters = checkpoints
    argv = ["merge-lora", "--base", str(base), "--adapters", *adapters, "--method", "ties", "--rank", "4"]
    with caplog.at_level("INFO", logger="hf_magmax"):
        assert main([*argv, "--output", str(tmp_path / "ties-lora"), "--no-progress"]) == 0
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("merged ")]
    assert line.startswith(f"merged {len(adapters)} adapters with ties (λ=") and "into adapter 'magmax'" not in line


def test_an_adapter_given_twice_merges_with_the_merge_s_warning(checkpoints, tmp_path, caplog):
    """The same adapter named twice (as given, with a trailing `/`, or through a link) merges, with the warning
    `hf-magmax merge` gives for a model named twice (one helper, `hf_magmax.io.warn_if_degenerate`)."""
    base, adapters = checkpoints
    link = tmp_path / "link-to-a1"
    link.symlink_to(adapters[0], target_is_directory=True)
    twins = [adapters[0], adapters[0] + "/", str(link), adapters[1]]
    argv = ["merge-lora", "--base", str(base), "--adapters", *twins, "--merged", "--no-progress"]
    with caplog.at_level("WARNING", logger="hf_magmax"):
        assert main([*argv, "--output-dir", str(tmp_path / "out")]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "twice" in r.getMessage()]
    assert len(warnings) == 2, warnings
    assert "`adapters` names" in warnings[0] and "twice (tasks 1 and 2)" in warnings[0], warnings
    assert "twice (tasks 1 and 3)" in warnings[1] and "pass each adapter once" in warnings[1], warnings
    assert (tmp_path / "out" / "model.safetensors").is_file()
    caplog.clear()
    argv = ["merge-lora", "--base", str(base), "--adapters", *adapters, "--merged", "--no-progress"]
    with caplog.at_level("WARNING", logger="hf_magmax"):
        assert main([*argv, "--output-dir", str(tmp_path / "ok")]) == 0
    assert not [r for r in caplog.records if "twice" in r.getMessage()]
