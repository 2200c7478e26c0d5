# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""Provenance (issue 14, part 1) in the LoRA merger and the Trainer: which task won each element, the files."""

import copy
import json

import pytest
import torch
from torch import nn


peft = pytest.importorskip("peft")

from builders import tiny_llama_classifier as tiny_llama  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from hf_magmax.config import MergeConfig  # noqa: E402
from hf_magmax.merging import StateDictMerger, winner_shares  # noqa: E402
from hf_magmax.metrics import provenance_summary, provenance_table  # noqa: E402
from hf_magmax.peft import lora_delta_state_dict, merge_adapters  # noqa: E402
from hf_magmax.peft.save import save_lora_merge  # noqa: E402


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# -- LoRA merger ----------------------------------------------------------------------------------------------------


def _rank_one_adapters(rows: list[list[float]]) -> nn.Module:
    """A PeftModel on one Linear(4, 4) whose adapter `t` has ΔW = outer(rows[t], 1): row i of ΔW is rows[t][i]."""
    base = nn.Sequential(nn.Linear(4, 4, bias=False))
    config = LoraConfig(r=1, lora_alpha=1, target_modules=["0"], init_lora_weights=False)
    model = get_peft_model(base, config, adapter_name="t0")
    for t in range(1, len(rows)):
        model.add_adapter(f"t{t}", copy.deepcopy(config))
    layer = model.base_model.model[0]
    with torch.no_grad():
        for t, row in enumerate(rows):
            layer.lora_A[f"t{t}"].weight.copy_(torch.ones(1, 4))
            layer.lora_B[f"t{t}"].weight.copy_(torch.tensor(row).reshape(4, 1))
    return model


def test_lora_winners_known_by_hand_ties_to_the_later_adapter():
    # row 0: task 1 larger; row 1: task 0 larger; rows 2 and 3: equal magnitudes (a tie: the later adapter wins)
    model = _rank_one_adapters([[1.0, 1.0, 1.0, 1.0], [2.0, 0.0, 1.0, -1.0]])
    theta_0 = model.base_model.model[0].get_base_layer().weight.detach().clone()
    result = merge_adapters(model, ["t0", "t1"], scaling_coef=1.0, save_provenance=True, show_progress=False)
    (name,) = result.winners
    assert name.endswith("0.weight")
    winners = result.winners[name]
    assert winners.dtype == torch.uint8
    assert torch.equal(winners, torch.tensor([1, 0, 1, 1], dtype=torch.uint8)[:, None].expand(4, 4))
    merged = torch.tensor([2.0, 1.0, 1.0, -1.0])[:, None].expand(4, 4)
    assert torch.equal(result.model[0].weight.detach(), theta_0 + merged)
    assert result.winner_shares() == {name: [0.25, 0.75], "*": [0.25, 0.75]}


def test_lora_winners_equal_the_dense_engine_and_are_written(tmp_path):
    torch.manual_seed(0)
    base = tiny_llama()
    paths, dense = [], []
    configs = [dict(target_modules=["q_proj", "v_proj"]), dict(target_modules=["q_proj", "down_proj"])]
    for i, kwargs in enumerate(configs * 2):  # 4 adapters, each module untouched by some (ΔW = 0 there)
        torch.manual_seed(i)
        adapter = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, init_lora_weights=False, **kwargs))
        adapter.save_pretrained(tmp_path / f"a{i}")
        paths.append(str(tmp_path / f"a{i}"))
        dense.append(lora_delta_state_dict(adapter))
    keys = sorted({k for tv in dense for k in tv})
    merger = StateDictMerger("magmax", track_winners=True)
    for tv in dense:
        merger.update({k: tv.get(k, torch.zeros_like(base.state_dict()[k])) for k in keys})
    expected = merger.winners()

    result = merge_adapters(copy.deepcopy(base), paths, save_provenance=True, show_progress=False)
    assert sorted(result.winners) == keys
    for key in keys:
        assert torch.equal(result.winners[key], expected[key]), key
    assert len(set(torch.cat([w.flatten() for w in result.winners.values()]).tolist())) == 4  # every task won some

    out = save_lora_merge(result, tmp_path / "out")
    saved = load_file(f"{out}/magmax_provenance.safetensors")
    assert sorted(saved) == keys and all(torch.equal(saved[k], expected[k]) for k in keys)
    summary = json.loads((tmp_path / "out" / "magmax_provenance.json").read_text())
    shares = winner_shares(expected, 4)
    assert summary["overall"] == pytest.approx(shares["*"])
    assert sorted(summary["tensors"]) == keys  # pytest.approx takes no nested dicts (pytest >= 9.1): one per tensor
    for key in keys:
        assert summary["tensors"][key] == pytest.approx(shares[key]), key
    assert set(summary["layers"]) == {k.split(".self_attn")[0].split(".mlp")[0] for k in keys}
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Provenance" in card and "where the last task" in card and "magmax_provenance.safetensors" in card
    assert "save_provenance: true" in (tmp_path / "out" / "magmax_config.yaml").read_text()

    plain = save_lora_merge(merge_adapters(copy.deepcopy(base), paths, show_progress=False), tmp_path / "plain")
    assert not (tmp_path / "plain" / "magmax_provenance.safetensors").exists()
    assert "save_provenance" not in (tmp_path / "plain" / "magmax_config.yaml").read_text() and plain


def test_save_provenance_needs_a_selecting_method(tmp_path):
    model = _rank_one_adapters([[1.0, 1.0, 1.0, 1.0], [2.0, 0.0, 1.0, -1.0]])
    for method in ("ties", "average", "task_arithmetic"):
        with pytest.raises(ValueError, match="save_provenance.*magmax, random_mix"):
            merge_adapters(model, ["t0", "t1"], method=method, save_provenance=True)
        config = MergeConfig(base="b", adapters=["a"], output_dir="o", method=method, save_provenance=True)
        with pytest.raises(ValueError, match="save_provenance.*magmax, random_mix"):
            config.validate()
    with pytest.raises(ValueError, match="save_provenance"):
        MergeConfig(base="b", adapters=["a"], output_dir="o", save_provenance="yes").validate()
    result = merge_adapters(model, ["t0", "t1"], method="random_mix", save_provenance=True, show_progress=False)
    assert set(result.winners) == {"0.weight"} or all(k.endswith("0.weight") for k in result.winners)


def test_provenance_table_and_layers():
    winners = {
        "model.layers.0.q.weight": torch.tensor([0, 1, 1, 1], dtype=torch.uint8),
        "model.layers.0.k.weight": torch.tensor([0, 0, 0, 0], dtype=torch.uint8),
        "model.layers.1.q.weight": torch.tensor([1, 1], dtype=torch.uint8),
        "score.weight": torch.tensor([0, 1], dtype=torch.uint8),
    }
    summary = provenance_summary(winners, ["a", "b"])
    assert summary["layers"] == {"model.layers.0": [0.625, 0.375], "model.layers.1": [0.0, 1.0], "score": [0.5, 0.5]}
    assert summary["overall"] == [0.5, 0.5]
    table = provenance_table(summary, top=2)
    assert "| 1 | `a` | 50.0% |" in table
    assert table.index("model.layers.1.q.weight") < table.index("model.layers.0.q.weight")
    assert "score.weight" not in table and "model.layers.0.k.weight" not in table


def test_merge_lora_cli_save_provenance(tmp_path, capsys):
    from hf_magmax.cli import main

    torch.manual_seed(0)
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    adapters = []
    for i in range(2):
        torch.manual_seed(i)
        get_peft_model(copy.deepcopy(base), LoraConfig(r=2, init_lora_weights=False)).save_pretrained(
            tmp_path / f"a{i}"
        )
        adapters.append(str(tmp_path / f"a{i}"))
    argv = ["merge-lora", "--base", str(tmp_path / "base"), "--adapters", *adapters, "--output-dir"]
    assert main([*argv, str(tmp_path / "out"), "--save-provenance", "--no-progress"]) == 0
    winners = load_file(tmp_path / "out" / "magmax_provenance.safetensors")
    assert winners and all(w.dtype == torch.uint8 for w in winners.values())
    assert main([*argv, str(tmp_path / "o2"), "--save-provenance", "--method", "ties"]) == 2
    assert "save_provenance" in capsys.readouterr().err and not (tmp_path / "o2").exists()


# -- Trainer: the merge state ---------------------------------------------------------------------------------------


def _fold_all(state, thetas):
    for t, theta in enumerate(thetas):
        state.fold(theta, task=f"t{t}")


def test_merge_state_winners_known_by_hand_ties_to_the_later_task():
    from hf_magmax.merging import MergeSpec
    from hf_magmax.trainer import MergeState

    state = MergeState(MergeSpec("magmax"), track_winners=True)
    state.snapshot({"w": torch.zeros(5)})
    # τ_1..τ_3 (θ_0 = 0): element 0 → task 2 (largest), 1 → task 0, 2 → a tie of tasks 0 and 1 (|−2| = |2|) → 1,
    # 3 → a tie of all three → 2, 4 → task 1
    _fold_all(state, [{"w": torch.tensor(v)} for v in ([1.0, 5.0, 2.0, 1.0, 0.0], [2.0, 1.0, -2.0, 1.0, 3.0],
                                                         [3.0, 0.0, 1.0, -1.0, 0.5])])  # fmt: skip
    assert state.winners["w"].dtype == torch.uint8
    assert state.winners["w"].tolist() == [2, 0, 1, 2, 1]
    assert state.merged_task_vector("w").tolist() == [3.0, 5.0, -2.0, -1.0, 3.0]


@pytest.mark.parametrize("method", ["magmax", "random_mix"])
def test_merge_state_winners_equal_the_core_and_survive_a_checkpoint(method, tmp_path):
    from hf_magmax.merging import MergeSpec
    from hf_magmax.trainer import MergeState

    torch.manual_seed(0)
    base = {"a.weight": torch.randn(6, 5), "b.bias": torch.randn(7)}
    # rounded task vectors, so that ties happen
    thetas = [{k: v + torch.randint(-2, 3, v.shape).float() for k, v in base.items()} for _ in range(4)]
    spec = MergeSpec(method)
    core = StateDictMerger(spec, track_winners=True)
    for theta in thetas:
        core.update({k: theta[k] - base[k] for k in base})

    state = MergeState(spec, track_winners=True)
    state.snapshot(base)
    _fold_all(state, thetas[:2])
    state.save(str(tmp_path))
    resumed = MergeState(spec, track_winners=True)
    resumed.restore(base, MergeState.read(str(tmp_path)))
    assert all(torch.equal(resumed.winners[k], state.winners[k]) for k in base)
    _fold_all(resumed, thetas[2:])
    expected = core.winners()
    for name in base:
        assert torch.equal(resumed.winners[name], expected[name]), name
        assert torch.equal(resumed.merged_task_vector(name), core.result()[name])
    with pytest.raises(ValueError, match="save_provenance"):
        plain = MergeState(spec)
        plain.snapshot(base)
        _fold_all(plain, thetas[:1])
        plain.save(str(tmp_path / "plain"))
        MergeState(spec, track_winners=True).restore(base, MergeState.read(str(tmp_path / "plain")))


def test_merge_state_memory_is_flat_in_the_number_of_tasks():
    from hf_magmax.merging import MergeSpec
    from hf_magmax.trainer import MergeState

    sizes = {}
    for T in (2, 12):
        state = MergeState(MergeSpec("magmax"), track_winners=True)
        state.snapshot({"w": torch.zeros(100, 10)})
        _fold_all(state, [{"w": torch.randn(100, 10)} for _ in range(T)])
        sizes[T] = state.resident_bytes()["merge"]
    plain = MergeState(MergeSpec("magmax"))
    plain.snapshot({"w": torch.zeros(100, 10)})
    _fold_all(plain, [{"w": torch.randn(100, 10)} for _ in range(2)])
    assert sizes[2] == sizes[12] == plain.resident_bytes()["merge"] + 1000  # θ_best + one uint8 per element


# -- Trainer: end to end --------------------------------------------------------------------------------------------


def _trainer_run(output_dir, callbacks=(), resume=None, **kwargs):
    from tiny_tasks import classification_task, tiny_bert

    from hf_magmax.trainer import MagMaxConfig, MagMaxTrainer

    train = {n: classification_task(c, 16, seed=i) for i, (n, c) in enumerate({"a": [0, 1], "b": [2, 3]}.items())}
    evaluation = {
        n: classification_task(ds.unique("labels"), 8, seed=10 + i) for i, (n, ds) in enumerate(train.items())
    }
    args = MagMaxConfig(
        output_dir=str(output_dir), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
        save_strategy="steps", save_steps=2, report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
        save_provenance=True, **kwargs,
    )  # fmt: skip
    trainer = MagMaxTrainer(
        tiny_bert(), args, train_datasets=train, eval_datasets=evaluation, callbacks=list(callbacks)
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_trainer_writes_provenance_and_resume_keeps_the_maps(tmp_path):
    from tiny_tasks import Crash

    reference = _trainer_run(tmp_path / "reference")
    out = tmp_path / "reference"
    winners = load_file(out / "magmax_provenance.safetensors")
    state = reference._magmax.state
    assert sorted(winners) == sorted(state.base)
    assert all(w.dtype == torch.uint8 and torch.equal(w, state.winners[k]) for k, w in winners.items())
    results = json.loads((out / "continual_results.json").read_text())
    provenance = results["provenance"]
    assert provenance == json.loads((out / "magmax_provenance.json").read_text())
    assert provenance["tasks"] == ["a", "b"] and sum(provenance["overall"]) == pytest.approx(1.0)
    assert provenance["overall"] == pytest.approx(winner_shares(winners, 2)["*"])
    assert "bert.encoder.layer.0" in provenance["layers"] and 0 < provenance["overall"][1] < 1
    reference.save_model()
    card = (out / "README.md").read_text()
    assert "## Provenance" in card and "| 2 | `b` |" in card
    pytest.importorskip("matplotlib")
    assert (out / "magmax_provenance.png").stat().st_size > 0

    with pytest.raises(KeyboardInterrupt):
        _trainer_run(tmp_path / "crashed", callbacks=[Crash(task=1, step=2)])
    resumed = _trainer_run(tmp_path / "crashed", resume=True)
    again = load_file(tmp_path / "crashed" / "magmax_provenance.safetensors")
    assert all(torch.equal(again[k], winners[k]) for k in winners)
    expected = reference.model.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in resumed.model.state_dict().items())


def test_trainer_save_provenance_needs_a_selecting_method(tmp_path):
    from hf_magmax.trainer import MagMaxConfig, MagMaxOptions

    for method in ("ties", "average", "task_arithmetic"):
        with pytest.raises(ValueError, match="save_provenance=True.*magmax, random_mix"):
            MagMaxConfig(output_dir=str(tmp_path), merge_method=method, save_provenance=True, report_to="none")
    with pytest.raises(ValueError, match="save_provenance"):
        MagMaxOptions(save_provenance="yes")
    assert MagMaxOptions(merge_method="random_mix", save_provenance=True).save_provenance
