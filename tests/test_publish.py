# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""Nothing private leaves the machine: no file from outside an input folder (symbolic links), no local path in what
is published. What arrives on the (loopback fake) Hub is listed and checked file by file."""

import copy
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from builders import leftovers, make_family, tiny_llama_classifier

from hf_magmax import HubPushError, merge_checkpoints, push_to_hub
from hf_magmax.cli import main
from hf_magmax.io import copy_non_weight_files, non_weight_files, public_name


SECRET = "-----BEGIN OPENSSH PRIVATE KEY----- not for the Hub"


@pytest.fixture
def family(tmp_path):
    base, models = make_family(tmp_path / "ckpt", "llama", num_tasks=2)
    return Path(base), models


@pytest.fixture
def secret(tmp_path):
    path = tmp_path / "home" / ".ssh" / "id_rsa"
    path.parent.mkdir(parents=True)
    path.write_text(SECRET)
    return path


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def _text_files(files: dict[str, bytes]) -> dict[str, str]:
    return {name: data.decode() for name, data in files.items() if not name.endswith(".safetensors")}


# --- symbolic links: never followed out of an input folder -----------------------------------------------------------


@pytest.mark.parametrize("kind", ["file", "folder", "dangling"])
def test_merge_refuses_a_link_out_of_the_base_before_any_work(kind, family, secret, tmp_path, capsys, fake_hub):  # noqa: F811
    base, models = family
    link = base / ("notes.txt" if kind != "folder" else "assets")
    target = {"file": secret, "folder": secret.parent, "dangling": tmp_path / "gone.txt"}[kind]
    link.symlink_to(target)
    out = tmp_path / "out"
    capsys.readouterr()
    argv = ["merge", "--base", str(base), "--models", *models, "--output-dir", str(out), "--push-to-hub", "me/x"]
    assert main([*argv, "--no-progress"]) == 2
    line = _one_line(capsys)
    assert str(link) in line and "symbolic link" in line
    assert leftovers(out) == [] and fake_hub.repos == {}  # nothing written, nothing pushed


def test_merge_lora_refuses_a_link_out_of_the_base(secret, tmp_path, capsys):
    peft = pytest.importorskip("peft")
    base = tiny_llama_classifier()
    base.save_pretrained(tmp_path / "base")
    lora = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "a1")
    (tmp_path / "base" / "tokenizer.model").symlink_to(secret)
    out = tmp_path / "merged"
    capsys.readouterr()
    argv = ["merge-lora", "--base", str(tmp_path / "base"), "--adapters", str(tmp_path / "a1"), "--merged"]
    assert main([*argv, "--output-dir", str(out), "--no-progress"]) == 2
    assert "tokenizer.model" in _one_line(capsys) and leftovers(out) == []


def test_links_inside_the_folder_are_copied_as_files(family, tmp_path):
    base, models = family
    (base / "real_vocab.json").write_text('{"a": 1}')
    (base / "vocab.json").symlink_to("real_vocab.json")
    (base / "sub").mkdir()
    (base / "sub" / "extra.txt").symlink_to(base / "real_vocab.json")
    out = merge_checkpoints(str(base), models, tmp_path / "out", show_progress=False)
    for name in ["vocab.json", "sub/extra.txt"]:
        assert not (out / name).is_symlink() and (out / name).read_text() == '{"a": 1}'


def test_hub_cache_snapshots_are_links_into_blobs(family, tmp_path):
    base, _ = family
    repo = tmp_path / "hub" / "models--org--base"
    snapshot = repo / "snapshots" / "0123abc"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in base.iterdir():  # how huggingface_hub lays out its cache: relative links into ../../blobs
        shutil.copy(file, repo / "blobs" / file.name)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", file.name))
    assert non_weight_files(snapshot) == ["config.json", "generation_config.json"]
    copied = copy_non_weight_files(snapshot, tmp_path / "copy")
    assert copied == ["config.json", "generation_config.json"] and not (tmp_path / "copy" / "config.json").is_symlink()
    # the same link into another repo's blobs is out of the folder
    (tmp_path / "hub" / "models--org--other" / "blobs").mkdir(parents=True)
    (tmp_path / "hub" / "models--org--other" / "blobs" / "x").write_text(SECRET)
    (snapshot / "x.txt").symlink_to(Path("..", "..", "..", "models--org--other", "blobs", "x"))
    with pytest.raises(ValueError, match="x.txt is a symbolic link"):
        non_weight_files(snapshot)


def test_hidden_links_are_neither_copied_nor_refused(family, secret, tmp_path):
    base, _ = family
    (base / ".cache").mkdir()
    (base / ".cache" / "key").symlink_to(secret)
    (base / ".key").symlink_to(secret)
    assert ".key" not in non_weight_files(base) and all(not p.startswith(".") for p in non_weight_files(base))


# --- local paths: published by their folder names only --------------------------------------------------------------


def test_public_name():
    assert public_name("org/model") == "org/model" and public_name("model") == "model"
    assert public_name("/home/alice/project/ckpt/task1/") == "task1" and public_name("./ckpt/base") == "base"
    assert public_name("~alice/runs/base") == "base" and public_name(None) is None


def test_a_pushed_merge_holds_no_local_path(family, tmp_path, fake_hub):  # noqa: F811
    base, models = family
    out = tmp_path / "out"
    argv = ["merge", "--base", str(base), "--models", *models, "--output-dir", str(out), "--push-to-hub", "me/m"]
    assert main([*argv, "--save-provenance", "--no-progress"]) == 0
    arrived = fake_hub.repos["me/m"].files
    local = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert sorted(arrived) == sorted(local) == sorted(
        ["README.md", "config.json", "generation_config.json", "magmax_config.yaml", "model.safetensors",
         "magmax_provenance.json", "magmax_provenance.safetensors"]
    )  # fmt: skip
    for name, text in _text_files(arrived).items():  # file by file: neither the paths nor the user's folders
        assert str(tmp_path) not in text and "/ckpt/" not in text, name
        if name != "magmax_config.yaml":
            assert arrived[name] == local[name], name  # published as written
    config = yaml.safe_load(arrived["magmax_config.yaml"])
    assert (config["base"], config["models"], config["output_dir"]) == ("base", ["task0", "task1"], "out")
    assert arrived["magmax_config.yaml"].startswith(b"# local inputs are named by their folder only")
    assert json.loads(arrived["magmax_provenance.json"])["tasks"] == ["task0", "task1"]
    # the folder itself still re-runs the merge here, from its own config
    assert yaml.safe_load((out / "magmax_config.yaml").read_text())["base"] == str(base)
    assert (
        main(["merge", str(out / "magmax_config.yaml"), "--output-dir", str(tmp_path / "again"), "--no-progress"]) == 0
    )


def test_a_pushed_lora_adapter_holds_no_local_path(tmp_path, fake_hub):  # noqa: F811
    peft = pytest.importorskip("peft")
    base = tiny_llama_classifier()
    base.save_pretrained(tmp_path / "base")
    adapters = []
    for i in range(2):
        torch.manual_seed(i)
        model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["q_proj"],
                                                                       init_lora_weights=False))  # fmt: skip
        model.save_pretrained(tmp_path / f"a{i}")
        adapters.append(str(tmp_path / f"a{i}"))
    out = tmp_path / "lora-out"
    argv = ["merge-lora", "--base", str(tmp_path / "base"), "--adapters", *adapters, "--rank", "2"]
    assert main([*argv, "--output-dir", str(out), "--push-to-hub", "me/lora", "--no-progress"]) == 0
    arrived = fake_hub.repos["me/lora"].files
    assert sorted(arrived) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "magmax_config.yaml"]
    for name, text in _text_files(arrived).items():
        assert str(tmp_path) not in text, name
    assert json.loads(arrived["adapter_config.json"])["base_model_name_or_path"] == "base"
    assert yaml.safe_load(arrived["magmax_config.yaml"])["adapters"] == ["a0", "a1"]
    assert "| 1 | `a0` |" in arrived["README.md"].decode()
    local = json.loads((out / "adapter_config.json").read_text())
    assert local["base_model_name_or_path"] == str(tmp_path / "base")  # the local folder keeps what PEFT wrote


def test_a_file_with_a_local_path_is_not_pushed(tmp_path, fake_hub):  # noqa: F811
    folder = tmp_path / "project" / "model"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "notes.md").write_text(f"trained from {tmp_path / 'project' / 'data'} on my machine\n")
    with pytest.raises(HubPushError, match="notes.md holds the local path") as err:
        push_to_hub(folder, "me/notes")
    assert "nothing was pushed" in str(err.value) and fake_hub.repos == {}
    assert (folder / "notes.md").is_file()


def test_a_link_out_of_the_pushed_folder_is_not_followed(tmp_path, secret, fake_hub):  # noqa: F811
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "extra.txt").symlink_to(secret)
    with pytest.raises(HubPushError, match="symbolic link"):
        push_to_hub(folder, "me/linked")
    assert fake_hub.repos == {}


def test_no_local_path_from_a_relative_merge(family, tmp_path, fake_hub, monkeypatch):  # noqa: F811
    base, models = family
    monkeypatch.chdir(tmp_path)
    rel = [os.path.relpath(m, tmp_path) for m in models]
    assert main(["merge", "--base", os.path.relpath(base, tmp_path), "--models", *rel, "--output-dir", "merged",
                 "--push-to-hub", "me/rel", "--no-progress"]) == 0  # fmt: skip
    arrived = fake_hub.repos["me/rel"].files
    config = yaml.safe_load(arrived["magmax_config.yaml"])
    assert (config["base"], config["models"], config["output_dir"]) == ("base", ["task0", "task1"], "merged")
    for name, text in _text_files(arrived).items():
        assert str(tmp_path) not in text and "ckpt/" not in text, name
