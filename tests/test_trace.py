# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
import json
import os

import pytest
import torch
from recipe_utils import make_tiny_llama, make_tokenizer, make_trace_dir, trace_corpus

from hf_magmax.metrics import metric_module_path
from hf_magmax.trace import (
    TRACE_LORA_EPOCHS,
    TRACE_TASK_METRICS,
    TRACE_TASKS,
    TraceDataCollator,
    check_trace_root,
    edit_similarity,
    exact_match,
    first_char_match,
    generate_trace_predictions,
    load_trace,
    resolve_trace_root,
    rouge_l,
    sari,
    score_trace_task,
    trace_summary,
)


# --- metrics against published example values -------------------------------------------------------------------------


def test_sari_matches_the_hugging_face_metric_card_example():
    # evaluate's `sari` metric card / docstring: {'sari': 26.953601953601954}
    sources = ["About 95 species are currently accepted."]
    predictions = ["About 95 you now get in."]
    references = [
        ["About 95 species are currently known.", "About 95 species are now accepted.", "95 species are now accepted."]
    ]
    assert sari(sources, predictions, references) == pytest.approx(26.953601953601954, abs=1e-12)
    # the card's tokenized spelling (" ." separated) normalizes to the same tokens
    spaced = [[r.replace(".", " .") for r in references[0]]]
    assert sari([sources[0].replace(".", " .")], [predictions[0].replace(".", " .")], spaced) == pytest.approx(
        26.953601953601954, abs=1e-12
    )


def test_sari_perfect_copy_of_the_reference_beats_copying_the_source():
    src = ["the cat sat on the mat because it was very tired"]
    ref = ["the cat sat on the mat"]
    assert sari(src, ref, ref) > sari(src, src, ref)
    assert sari(src, ref, [ref]) == sari(src, ref, ref)  # one reference as a string or as a list


def test_rouge_l_matches_the_hugging_face_rouge_card_example():
    # evaluate's `rouge` metric card: predictions ["hello goodbye", "ankh morpork"], references ["goodbye",
    # "ankh morpork"] -> rougeL 0.8333...
    assert rouge_l(["hello goodbye", "ankh morpork"], ["goodbye", "ankh morpork"]) == pytest.approx(83.33333333, 1e-6)
    assert rouge_l(["hello there", "general kenobi"], ["hello there", "general kenobi"]) == pytest.approx(100.0)


def test_edit_similarity_follows_fuzzywuzzy_ratio():
    # fuzzywuzzy README: fuzz.ratio("this is a test", "this is a test!") -> 97 (rapidfuzz README: 96.55...)
    assert edit_similarity(["this is a test"], ["this is a test!"]) == 97.0
    from rapidfuzz import fuzz

    assert fuzz.ratio("this is a test", "this is a test!") == pytest.approx(96.55172413793103)
    # TRACE's Py150 post-processing puts literals back before comparing; an empty prediction scores 0
    assert edit_similarity(["x = <NUM_LIT>", ""], ["x = 0", "y"]) == pytest.approx(50.0)


def test_exact_match_and_answer_letter():
    assert exact_match(["A", " B\n", "", "C"], ["A", "B", "", "D"]) == 50.0
    assert first_char_match(["B. because cats", "Answer: C", "", "A"], ["B", "Answer: C", "A", "B"]) == 50.0
    with pytest.raises(ValueError, match="predictions but 1 references"):
        exact_match(["A", "B"], ["A"])


def test_score_trace_task_dispatches_every_task():
    assert set(TRACE_TASK_METRICS) == set(TRACE_TASKS)
    for task in TRACE_TASKS:
        score = score_trace_task(task, ["A b c"], ["A b c"], sources=["x y z A"])
        assert 0 <= score <= 100
    assert score_trace_task("FOMC", ["A"], ["A"]) == 100.0
    with pytest.raises(ValueError, match="needs `sources`"):
        score_trace_task("20Minuten", ["a"], ["a"])
    with pytest.raises(ValueError, match="unknown TRACE task"):
        score_trace_task("GSM8K", ["a"], ["a"])


def test_evaluate_module_loads_offline_by_path():
    import evaluate

    path = metric_module_path("trace")
    fomc = evaluate.load(path, "FOMC")
    assert fomc.compute(predictions=["A", "B"], references=["A", "C"]) == {"score": 50.0, "exact_match": 50.0}
    minuten = evaluate.load(path, "20Minuten")
    out = minuten.compute(
        sources=["About 95 species are currently accepted."],
        predictions=["About 95 you now get in."],
        references=["About 95 species are now accepted."],
    )
    assert out["sari"] == pytest.approx(
        sari(
            ["About 95 species are currently accepted."],
            ["About 95 you now get in."],
            ["About 95 species are now accepted."],
        )
    )
    py150 = evaluate.load(path, "edit_similarity")
    assert py150.compute(predictions=["this is a test"], references=["this is a test!"])["score"] == 97.0
    with pytest.raises(ValueError, match="unknown config"):
        evaluate.load(path, "nope")


def test_trace_summary_op_and_bwt():
    # rows: after task 1, 2, 3
    matrix = [[60.0, 0.0, 0.0], [50.0, 70.0, 0.0], [40.0, 65.0, 80.0]]
    out = trace_summary(matrix)
    assert out["OP"] == pytest.approx((40 + 65 + 80) / 3)
    assert out["BWT"] == pytest.approx(((40 - 60) + (65 - 70)) / 2)  # denominator T - 1
    # hf_magmax's (T + 1) x T layout with a θ_0 row gives the same
    assert trace_summary([[1.0, 2.0, 3.0], *matrix]) == out
    assert trace_summary([[10.0]]) == {"OP": 10.0, "BWT": 0.0}
    with pytest.raises(ValueError, match="T × T or"):
        trace_summary([[1.0, 2.0]])


def test_lora_epochs_follow_trace():
    assert [TRACE_LORA_EPOCHS[t] for t in TRACE_TASKS] == [5, 3, 7, 5, 3, 5, 5, 7]


# --- data ---------------------------------------------------------------------------------------------------------


def test_load_trace_reads_the_official_layout(tmp_path):
    root = make_trace_dir(str(tmp_path / "TRACE"))
    data = load_trace(root)
    assert list(data) == list(TRACE_TASKS)
    assert set(data["FOMC"]) == {"train", "eval", "test"}
    assert data["FOMC"]["test"].column_names == ["prompt", "answer"]
    assert len(data["Py150"]["train"]) == 4  # sizes come from the files
    small = load_trace(root, tasks=["FOMC", "Py150"], max_samples={"train": 1})
    assert list(small) == ["FOMC", "Py150"] and len(small["FOMC"]["train"]) == 1 and len(small["FOMC"]["test"]) == 4


def test_trace_root_errors_name_what_is_missing(tmp_path):
    root = make_trace_dir(str(tmp_path / "TRACE"))
    os.remove(os.path.join(root, "Py150", "eval.json"))
    with pytest.raises(FileNotFoundError, match=r"Py150/eval\.json"):
        check_trace_root(root)
    import shutil

    shutil.rmtree(os.path.join(root, "20Minuten"))
    with pytest.raises(FileNotFoundError, match="no task folder for 20Minuten"):
        check_trace_root(root)
    with pytest.raises(ValueError, match="`tasks` is empty"):
        check_trace_root(root, tasks=[])
    with pytest.raises(FileNotFoundError, match="not an existing folder"):
        resolve_trace_root(str(tmp_path / "nowhere" / "TRACE"))
    # a repo id while offline: a clear error, no long retries
    with pytest.raises(FileNotFoundError, match="offline or unreachable"):
        resolve_trace_root("someone/TRACE-Benchmark")
    bad = tmp_path / "bad"
    make_trace_dir(str(bad), tasks=["FOMC"])
    (bad / "FOMC" / "train.json").write_text(json.dumps([{"question": "x"}]))
    with pytest.raises(ValueError, match="record 0 .* 'prompt' and 'answer'"):
        load_trace(str(bad), tasks=["FOMC"])


# --- collation and generation -------------------------------------------------------------------------------------


def test_collator_is_bos_prompt_answer_eos_with_prompt_masked_and_left_padding():
    tok = make_tokenizer(trace_corpus())
    collator = TraceDataCollator(tok)
    features = [
        {"prompt": "Double 7? Answer:", "answer": "14"},
        {"prompt": "Text: rates fall. Answer:", "answer": "B"},
    ]
    batch = collator(features)
    for i, f in enumerate(features):
        p = tok(f["prompt"], add_special_tokens=False)["input_ids"]
        a = tok(f["answer"], add_special_tokens=False)["input_ids"]
        seq = [tok.bos_token_id, *p, *a, tok.eos_token_id]
        n = len(seq)
        row = batch["input_ids"][i].tolist()
        assert row[-n:] == seq and all(t == tok.pad_token_id for t in row[:-n])  # left padding
        assert batch["attention_mask"][i].tolist() == [0] * (len(row) - n) + [1] * n
        assert batch["labels"][i].tolist() == [-100] * (len(row) - len(a) - 1) + a + [tok.eos_token_id]
    infer = TraceDataCollator(tok, inference=True)(features)
    assert set(infer) == {"input_ids", "attention_mask"}
    assert infer["input_ids"][0, -1].item() != tok.eos_token_id
    truncated = TraceDataCollator(tok, max_prompt_len=2, max_answer_len=1)(features)
    assert truncated["input_ids"].shape[1] == 1 + 2 + 1 + 1
    with pytest.raises(KeyError, match="remove_unused_columns=False"):
        collator([{"text": "x"}])


def test_generate_and_score_with_a_tiny_llama(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = make_tiny_llama(str(tmp_path / "llama"))
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    prompts = ["Double 7? Answer:", "4 minus 1? Answer:", "Text: rates fall. Answer:"]
    preds = generate_trace_predictions(model, tok, prompts, batch_size=2, max_new_tokens=4)
    assert len(preds) == 3 and all(isinstance(p, str) for p in preds)
    # batched left-padded greedy generation equals one-by-one generation
    single = [generate_trace_predictions(model, tok, [p], batch_size=1, max_new_tokens=4)[0] for p in prompts]
    assert preds == single
    assert 0.0 <= score_trace_task("NumGLUE-ds", preds, ["14", "3", "B"]) <= 100.0
    assert torch.is_grad_enabled()
