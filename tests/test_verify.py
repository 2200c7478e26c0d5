# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""`hf-magmax verify DIR` / `verify_merge`: a fresh merge matches bit for bit (every method, dtypes, shards, Hub
inputs, merge-lora --merged); one changed element, a missing or an extra tensor is named; unreadable inputs are one
line with exit code 2."""

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from builders import make_family
from safetensors.torch import load_file, save_file

from hf_magmax import merge_checkpoints, verify_merge
from hf_magmax.cli import main
from hf_magmax.config import MERGE_CONFIG_NAME
from hf_magmax.merging import opcm_projects


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("verify_family"), "llama", num_tasks=3)


@pytest.fixture(scope="module")
def merged(family, tmp_path_factory):
    base, models = family
    return merge_checkpoints(base, models, tmp_path_factory.mktemp("verify") / "merged", show_progress=False)


def _copy(directory: Path, tmp_path: Path) -> Path:
    target = tmp_path / directory.name
    shutil.copytree(directory, target)
    return target


def _edit_weights(directory: Path, edit) -> None:
    """Rewrite `model.safetensors` of `directory` with `edit(state_dict)` applied."""
    file = directory / "model.safetensors"
    state = load_file(file)
    edit(state)
    save_file(state, file, metadata={"format": "pt"})


def _verify_cli(capsys, directory, *flags):
    code = main(["verify", str(directory), "--no-progress", *flags])
    captured = capsys.readouterr()
    return code, captured.out.strip(), captured.err.strip()


def test_fresh_merge_verifies(merged, capsys):
    code, out, err = _verify_cli(capsys, merged)
    assert code == 0, (out, err)
    num_tensors = len(load_file(merged / "model.safetensors"))
    assert out == f"OK: {merged}: all {num_tensors} tensors match a re-computed `hf-magmax merge` bit for bit"
    result = verify_merge(merged, show_progress=False)
    assert result and result.ok and result.mismatch is None and result.num_tensors == num_tensors


def test_one_changed_element_is_named(merged, tmp_path, capsys):
    directory = _copy(merged, tmp_path)
    name = "model.layers.1.mlp.up_proj.weight"

    def bump(state):
        state[name][3, 5] = torch.nextafter(state[name][3, 5], torch.tensor(float("inf")))  # one ulp: one bit pattern

    _edit_weights(directory, bump)
    code, out, _ = _verify_cli(capsys, directory)
    assert code == 1
    assert out.startswith(f"MISMATCH: {directory}: tensor {name!r} differs at index [3, 5]: the merge makes "), out
    result = verify_merge(directory, show_progress=False)
    assert not result and result.mismatch.name == name and result.mismatch.index == (3, 5)
    expected = load_file(merged / "model.safetensors")[name][3, 5].item()
    assert result.mismatch.expected == expected and result.mismatch.found != expected
    assert result.mismatch.count == 1


def test_bits_not_values(tmp_path):
    """-0.0 where the merge makes +0.0 is a difference (`torch.equal` calls them equal); the same NaN is not."""
    for name in ("base", "task1", "task2"):
        (tmp_path / name).mkdir()
        save_file({"w": torch.tensor([0.0, 1.0, float("nan")])}, tmp_path / name / "model.safetensors")
    out = merge_checkpoints(tmp_path / "base", [tmp_path / "task1", tmp_path / "task2"], tmp_path / "m",
                            allow_non_finite=True, show_progress=False)  # fmt: skip
    assert verify_merge(out, show_progress=False)  # NaN where the merge makes the same NaN matches
    _edit_weights(out, lambda state: state["w"].__setitem__(0, -0.0))
    mismatch = verify_merge(out, show_progress=False).mismatch
    assert mismatch.name == "w" and mismatch.index == (0,) and mismatch.expected == 0.0 and mismatch.found == 0.0


def test_missing_and_extra_tensors(merged, tmp_path, capsys):
    missing = _copy(merged, tmp_path / "a")
    _edit_weights(missing, lambda state: state.pop("model.layers.0.self_attn.k_proj.weight"))
    code, out, _ = _verify_cli(capsys, missing)
    assert code == 1 and "tensor 'model.layers.0.self_attn.k_proj.weight' is missing" in out
    extra = _copy(merged, tmp_path / "b")
    _edit_weights(extra, lambda state: state.__setitem__("model.extra.weight", torch.zeros(2)))
    code, out, _ = _verify_cli(capsys, extra)
    assert code == 1 and "tensor 'model.extra.weight' is not made by the merge" in out
    retyped = _copy(merged, tmp_path / "c")
    _edit_weights(retyped, lambda state: state.__setitem__("model.norm.weight", state["model.norm.weight"].half()))
    code, out, _ = _verify_cli(capsys, retyped)
    assert code == 1 and "tensor 'model.norm.weight' has dtype float16 but the merge makes float32" in out


@pytest.mark.parametrize(
    "kwargs",
    [
        {"method": "ties", "density": 0.5, "dtype": "bfloat16", "max_shard_size": "2KB"},
        {"method": "random_mix", "seed": 3, "save_provenance": True},
        {"method": "opcm", "alpha": 0.3},
        {"method": "average", "dtype": "float16"},
    ],
)
def test_every_method_verifies(family, tmp_path, kwargs):
    base, models = family
    out = merge_checkpoints(base, models, tmp_path / "m", show_progress=False, **kwargs)
    result = verify_merge(out, show_progress=False)
    assert result, str(result)
    if kwargs.get("save_provenance"):  # the winner maps are tensors of the directory too
        file = out / "magmax_provenance.safetensors"
        winners = load_file(file)
        name = "model.layers.0.mlp.down_proj.weight"
        winners[name][0, 0] = (winners[name][0, 0] + 1) % 3
        save_file(winners, file)
        mismatch = verify_merge(out, show_progress=False).mismatch
        assert mismatch.name == f"magmax_provenance.safetensors: {name}" and mismatch.index == (0, 0)
    if "max_shard_size" in kwargs:
        assert (out / "model.safetensors.index.json").is_file()
        shard = sorted(out.glob("model-*.safetensors"))[-1]
        state = load_file(shard)
        name = sorted(state)[0]
        state[name] = state[name].flip(0) if state[name].dim() else state[name]
        save_file(state, shard, metadata={"format": "pt"})
        assert verify_merge(out, show_progress=False).mismatch.name == name


def test_opcm_verify_shows_its_first_pass_and_runs_each_svd_once(family, tmp_path, monkeypatch, capsys):
    """The re-computed opcm merge folds every tensor before the first comparison (minutes on a real model): verify
    shows that first pass with the merge's own bar, and, like the merge, runs one SVD per projected weight per task."""
    base, models = family
    out = merge_checkpoints(base, models, tmp_path / "m", method="opcm", show_progress=False)
    capsys.readouterr()
    projected = [name for name, t in load_file(out / "model.safetensors").items() if opcm_projects(name, t.shape)]
    svd, shown = torch.linalg.svd, []

    def counting_svd(matrix, *args, **kwargs):
        shown.append(capsys.readouterr().err)  # what the terminal showed before this SVD
        return svd(matrix, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", counting_svd)
    assert verify_merge(out, show_progress=True)
    assert len(shown) == (len(models) - 1) * len(projected) > 0
    assert "Folding tensors (opcm, pass 1 of 2)" in shown[0]  # a bar before the first SVD, as the merge shows
    assert "Verifying tensors (opcm, pass 2 of 2: rescale, compare)" in capsys.readouterr().err
    shown.clear()
    assert main(["verify", str(out), "--no-progress"]) == 0  # and none with --no-progress
    assert "Folding tensors" not in "".join(shown) + capsys.readouterr().err


def test_moved_inputs_need_overrides(family, tmp_path, capsys):
    base, models = family
    inputs = tmp_path / "inputs"
    shutil.copytree(Path(base).parent, inputs)
    moved = [str(inputs / Path(m).name) for m in models]
    out = merge_checkpoints(str(inputs / "base"), moved, tmp_path / "m", show_progress=False)
    shutil.move(inputs, tmp_path / "elsewhere")
    code, out_text, err = _verify_cli(capsys, out)
    assert code == 2 and not out_text
    assert err.startswith("hf-magmax verify: error: ") and len(err.splitlines()) == 1
    assert "pass the inputs with --base / --models" in err
    elsewhere = tmp_path / "elsewhere"
    flags = ["--base", str(elsewhere / "base"), "--models", *[str(elsewhere / Path(m).name) for m in models]]
    assert _verify_cli(capsys, out, *flags)[0] == 0


def test_unreadable_directories_are_one_line(tmp_path, merged, capsys):
    code, _, err = _verify_cli(capsys, tmp_path / "nope")
    assert code == 2 and "does not exist" in err and len(err.splitlines()) == 1
    bare = _copy(merged, tmp_path)
    (bare / MERGE_CONFIG_NAME).unlink()
    code, _, err = _verify_cli(capsys, bare)
    assert code == 2 and f"has no {MERGE_CONFIG_NAME}" in err
    code, _, err = _verify_cli(capsys, merged, "--adapters", "a")
    assert code == 2 and "records a checkpoint merge" in err


def test_hub_inputs(family, fake_hub, tmp_path, capsys):  # noqa: F811
    base, models = family
    names = ["org/verify-base", "org/verify-1", "org/verify-2", "org/verify-3"]
    for repo_id, directory in zip(names, [base, *models]):
        fake_hub.add_repo(repo_id, {p.name: p.read_bytes() for p in Path(directory).iterdir()})
    out = merge_checkpoints(names[0], names[1:], tmp_path / "m", show_progress=False, push_to_hub="me/verified")
    assert yaml.safe_load((out / MERGE_CONFIG_NAME).read_text())["models"] == names[1:]
    assert _verify_cli(capsys, out)[0] == 0
    code, text, err = _verify_cli(capsys, "me/verified")  # the pushed merge, downloaded from the Hub and re-computed
    assert code == 0 and "all " in text, (text, err)
    repo = fake_hub.repos["me/verified"]
    name = "model.norm.weight"
    state = load_file(out / "model.safetensors")
    state[name][1] += 1
    file = tmp_path / "changed.safetensors"
    save_file(state, file, metadata={"format": "pt"})
    fake_hub.add_repo("me/verified-changed", {**repo.files, "model.safetensors": file.read_bytes()})
    code, text, _ = _verify_cli(capsys, "me/verified-changed")
    assert code == 1 and f"tensor {name!r} differs at index [1]" in text


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    pytest.importorskip("peft")
    import copy

    from builders import tiny_llama_classifier
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("verify_lora")
    torch.manual_seed(0)
    base = tiny_llama_classifier()
    base.save_pretrained(root / "base")
    adapters = []
    for seed, modules in [(1, ["q_proj", "v_proj"]), (2, ["q_proj", "down_proj"])]:
        torch.manual_seed(seed)
        model = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, r=2, target_modules=modules))
        model.save_pretrained(root / f"a{seed}")
        adapters.append(str(root / f"a{seed}"))
    return root, adapters


@pytest.mark.filterwarnings("ignore::FutureWarning")
class TestMergeLora:
    def test_merged_output_verifies_and_a_change_is_named(self, lora, tmp_path, capsys):
        root, adapters = lora
        out = tmp_path / "merged"
        argv = ["merge-lora", "--base", str(root / "base"), "--adapters", *adapters, "--merged", "--output", str(out)]
        assert main([*argv, "--no-progress"]) == 0
        code, text, err = _verify_cli(capsys, out)
        assert code == 0, (text, err)
        assert "match a re-computed `hf-magmax merge-lora` bit for bit" in text
        name = "model.layers.0.self_attn.q_proj.weight"
        _edit_weights(out, lambda state: state[name].__setitem__((1, 2), state[name][1, 2] * 2 + 1))
        code, text, _ = _verify_cli(capsys, out)
        assert code == 1 and f"tensor {name!r} differs at index [1, 2]" in text

    def test_adapter_output_is_refused(self, lora, tmp_path, capsys):
        root, adapters = lora
        out = tmp_path / "adapter"
        argv = [
            "merge-lora",
            "--base",
            str(root / "base"),
            "--adapters",
            *adapters,
            "--rank",
            "2",
            "--output",
            str(out),
        ]
        assert main([*argv, "--no-progress"]) == 0
        code, _, err = _verify_cli(capsys, out)
        assert code == 2 and "lora_output: adapter" in err and len(err.splitlines()) == 1
