"""`hf-magmax merge --save-provenance`: the streamed winner maps equal the in-memory engine's, block by block."""

import json
from pathlib import Path

import pytest
import torch
from builders import load_dir, make_family
from safetensors.torch import load_file

from hf_magmax import TaskVector, merge_checkpoints, merge_task_vectors
from hf_magmax.cli import main
from hf_magmax.hub import parse_model_card


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("provenance"), "llama", num_tasks=3)


@pytest.mark.parametrize("method", ["magmax", "random_mix"])
def test_streamed_winners_equal_the_engine(family, tmp_path, monkeypatch, method):
    import hf_magmax.checkpoints

    monkeypatch.setattr(hf_magmax.checkpoints, "_CHUNK_ELEMENTS", 100)  # many row blocks per tensor
    base, models = family
    out = merge_checkpoints(base, models, tmp_path / "out", method=method, save_provenance=True, show_progress=False)
    base_sd = load_dir(base)
    tvs = [TaskVector.from_state_dicts(base_sd, load_dir(m)) for m in models]
    merged, winners = merge_task_vectors(tvs, method, return_winners=True)
    streamed = load_file(out / "magmax_provenance.safetensors")
    assert set(streamed) == set(winners)
    for name, expected in winners.items():
        assert streamed[name].dtype == torch.uint8 and torch.equal(streamed[name], expected), name
    weights = load_dir(out)  # the weights are the same with provenance on
    assert all(torch.equal(weights[n], v) for n, v in merged.apply_to(base_sd).items())
    summary = json.loads((out / "magmax_provenance.json").read_text())
    assert summary["tasks"] == [Path(m).name for m in models] and abs(sum(summary["overall"]) - 1) < 1e-9
    counts = torch.bincount(torch.cat([w.reshape(-1).long() for w in winners.values()]), minlength=3).double()
    assert summary["overall"] == pytest.approx((counts / counts.sum()).tolist())
    assert "model.layers.0" in summary["layers"] and set(summary["tensors"]) == set(winners)
    _, body = parse_model_card((out / "README.md").read_text())
    assert "## Provenance" in body and "share of elements won" in body


def test_cli_flag_and_methods_that_cannot_say(family, tmp_path, capsys):
    base, models = family
    assert main(["merge", "--base", base, "--models", *models, "--output-dir", str(tmp_path / "a"),
                 "--save-provenance", "--no-progress"]) == 0  # fmt: skip
    assert (tmp_path / "a" / "magmax_provenance.safetensors").is_file()
    assert "save_provenance: true" in (tmp_path / "a" / "magmax_config.yaml").read_text()
    capsys.readouterr()
    code = main(["merge", "--base", base, "--models", *models, "--output-dir", str(tmp_path / "b"),
                 "--method", "ties", "--save-provenance"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "save_provenance" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()
    plain = merge_checkpoints(base, models, tmp_path / "c", show_progress=False)
    assert not (plain / "magmax_provenance.safetensors").exists()
