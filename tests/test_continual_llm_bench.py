"""Helpers of `benchmarks/continual_llm.py` (the real-LLM run itself needs SmolLM2 and Debian's word lists)."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import EvalPrediction

from hf_magmax import compute_continual_metrics


ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("continual_llm", ROOT / "benchmarks" / "continual_llm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_scoring_reads_the_answer_position_and_restricts_to_the_labels(bench):
    label_ids = [5, 7, 9]
    preprocess, compute = bench.make_scoring(label_ids)
    logits = torch.zeros(2, 4, 12)
    labels = torch.full((2, 4), -100)
    labels[0, 2], labels[1, 3] = 7, 9  # answers at positions 2 and 3, predicted at positions 1 and 2
    logits[0, 1, 7], logits[0, 1, 11] = 2.0, 1.0  # row 0: the label 7 wins everywhere
    logits[1, 2, 5], logits[1, 2, 3] = 1.0, 3.0  # row 1: among the labels 5 wins; over the vocabulary 3 does
    logits[1, 3, 9] = 10.0  # the position of the answer itself is not read
    predictions = preprocess(logits, labels)
    assert predictions.tolist() == [[7, 7], [5, 3]]
    metrics = compute(EvalPrediction(predictions=predictions.numpy(), label_ids=labels.numpy()))
    assert metrics == {"accuracy": 0.5, "greedy_accuracy": 0.5}


def test_lower_triangle_metrics_equal_the_library_on_seen_cells(bench):
    matrix = [[0.3, 0.1, 0.0], [0.9, None, None], [0.5, 0.8, None], [0.2, 0.6, 0.95]]
    mine = bench.lower_triangle_metrics(matrix)
    library = compute_continual_metrics(matrix, seen_only=True)
    for key, value in mine.items():
        assert value == pytest.approx(library[key]), key


def test_layout_is_class_incremental_disjoint_and_readable(bench, tmp_path, monkeypatch):
    words = {
        label: [f"{label.lower()[:3]}w{'abcdefgh'[i % 8]}{'ijklmnop'[i // 8]}" for i in range(11)]
        for label in bench.CORPORA
    }
    # exactly the 11 words each language needs, plus a word in two lists, a capitalised one and a short one: never used
    words["French"] += ["shared", "Upper", "abc"]
    words["English"] += ["shared"]
    dict_dir = tmp_path / "dict"
    dict_dir.mkdir()
    for label, (name, encoding, _, _) in bench.CORPORA.items():
        (dict_dir / name).write_text("\n".join(words[label]) + "\n", encoding=encoding)
    monkeypatch.setattr(bench, "DICT_DIR", dict_dir)
    names = bench.write_layout(tmp_path / "data", train=6, dev=2, test=3)
    assert names == ["english-french", "german-italian", "spanish-dutch", "portuguese-swedish"]
    used = set()
    for name, classes in zip(names, bench.TASKS):
        for split, size in (("train", 6), ("dev", 2), ("test", 3)):
            payload = json.loads((tmp_path / "data" / name / f"{split}.json").read_text(encoding="utf-8"))
            assert payload["Definition"] == [bench.INSTRUCTION]
            outputs = [i["output"][0] for i in payload["Instances"]]
            assert sorted(outputs) == sorted([c for c in classes for _ in range(size)])
            inputs = [i["input"] for i in payload["Instances"]]
            assert not used & set(inputs) and not {"shared", "Upper", "abc"} & set(inputs)
            used |= set(inputs)
    again = bench.write_layout(tmp_path / "again", train=6, dev=2, test=3)
    for name in again:
        assert (tmp_path / "again" / name / "test.json").read_bytes() == (
            tmp_path / "data" / name / "test.json"
        ).read_bytes()
    try:
        from hf_magmax.extras.llm_cl import load_cl_task
    except ImportError:  # the LLM recipes' reader (branch llm-recipes) is not in this tree
        return
    task = load_cl_task(str(tmp_path / "data"), "german-italian", "test")
    assert len(task) == 6 and set(task["answer"]) == {"German", "Italian"}


def test_label_tokens_must_be_single_tokens(bench):
    class Tokenizer:
        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [1] if text.strip() != "Swedish" else [1, 2]}

    with pytest.raises(ValueError, match="'Swedish' is 2 tokens"):
        bench.label_token_ids(Tokenizer())
    assert np.array_equal(
        bench.label_token_ids(type("T", (), {"__call__": lambda s, t, **k: {"input_ids": [3]}})()), [3] * 8
    )
