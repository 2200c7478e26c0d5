# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""hf_magmax.extras.llm_cl and hf_magmax.extras.generation: the O-LoRA-lineage benchmarks' layouts, prompts, orders,
scores, and a generation-scored continual run on a tiny Llama."""

import json
import os

import pytest
from recipe_utils import llm_cl_corpus, make_olora_benchmark, make_superni_benchmark, make_tiny_llama

from hf_magmax.extras.llm_cl import (
    BENCHMARK_ORDERS,
    OLORA_LABELS,
    OLORA_TASK_TYPES,
    SUPERNI_TASKS,
    TASK_ORDERS,
    benchmark_of_order,
    exact_match,
    extract_answer,
    find_task_dir,
    load_cl_benchmark,
    load_cl_task,
    olora_prompt,
    reference_table,
    rouge_l,
    summarize_runs,
)


@pytest.fixture(scope="module")
def benchmark_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("CL_Benchmark"))
    make_olora_benchmark(root, ["dbpedia", "agnews", "COPA"])
    make_superni_benchmark(root, SUPERNI_TASKS[:2])
    return root


# --- orders -------------------------------------------------------------------------------------------------------


def test_orders_are_the_published_sequences():
    assert TASK_ORDERS[1] == ("dbpedia", "amazon", "yahoo", "agnews")
    assert TASK_ORDERS[2] == ("dbpedia", "amazon", "agnews", "yahoo")
    assert TASK_ORDERS[3] == ("yahoo", "amazon", "agnews", "dbpedia")
    assert TASK_ORDERS[6][:3] == ("yelp", "amazon", "MNLI") and TASK_ORDERS[6][-1] == "WiC"  # O-LoRA's long.sh
    for order in BENCHMARK_ORDERS["long15"]:  # 15 distinct tasks, O-LoRA's folders
        assert sorted(TASK_ORDERS[order]) == sorted(OLORA_TASK_TYPES)
    for order in BENCHMARK_ORDERS["superni"]:
        assert sorted(TASK_ORDERS[order]) == sorted(SUPERNI_TASKS) and len(SUPERNI_TASKS) == 15
    assert TASK_ORDERS[7] != TASK_ORDERS[8]
    assert [benchmark_of_order(o) for o in range(1, 9)] == ["standard_cl"] * 3 + ["long15"] * 3 + ["superni"] * 2
    with pytest.raises(ValueError, match="unknown task order 9"):
        benchmark_of_order(9)


# --- prompts and data -----------------------------------------------------------------------------------------------


def test_olora_prompt_is_olora_collator_text():
    """The text O-LoRA's decoder collator feeds after BOS: task/dataset prefix + instruction + options + sentence."""
    sentence = "Title: William V. Brady\nText:  William Vermilye Brady was the 68th Mayor of New York City.\n"
    labels = list(OLORA_LABELS["dbpedia"])
    expected = (
        "Task:TC\nDataset:dbpedia\n"
        "What is the topic of the following paragraph? Choose one from the option.\n"
        "Option: " + ", ".join(labels) + " \n" + sentence + "\nAnswer:"
    )
    assert olora_prompt(sentence, labels, "TC", "dbpedia") == expected
    assert olora_prompt("A or B?", ["A", "B"], "COPA", "COPA") == "Task:COPA\nDataset:COPA\nA or B?\nAnswer:"
    bare = olora_prompt("x", ["Good", "Bad"], "SC", "IMDB", add_task_name=False, add_dataset_name=False)
    assert bare.startswith("What is the sentiment") and bare.endswith("Option: Good, Bad \nx\nAnswer:")
    with pytest.raises(ValueError, match="task type 'POS' has no O-LoRA instruction"):
        olora_prompt("x", ["a"], "POS", "tags")
    assert olora_prompt("x", ["a"], "POS", "tags", instruction="Tag it.\n").endswith("Tag it.\nOption: a \nx\nAnswer:")


def test_load_olora_and_superni_layouts(benchmark_dir):
    assert find_task_dir(benchmark_dir, "agnews") == (os.path.join(benchmark_dir, "TC", "agnews"), "olora")
    superni = SUPERNI_TASKS[0]
    assert find_task_dir(benchmark_dir, superni) == (os.path.join(benchmark_dir, "SuperNI", superni), "superni")

    test = load_cl_task(benchmark_dir, "agnews", "test", max_samples=3)
    assert test.column_names == ["prompt", "answer", "references"] and len(test) == 3
    with open(os.path.join(benchmark_dir, "TC", "agnews", "test.json"), encoding="utf-8") as f:
        records = json.load(f)
    assert test["answer"] == [r["label"] for r in records[:3]] and test["references"][0] == [records[0]["label"]]
    assert test["prompt"][1] == olora_prompt(records[1]["sentence"], OLORA_LABELS["agnews"], "TC", "agnews")

    generated = load_cl_task(benchmark_dir, superni, "train")
    assert generated["prompt"][0].startswith("Definition: In this task you answer the samsum question.\n\n")
    assert generated["prompt"][0].endswith("Input: the samsum text 0\nOutput: ")
    assert generated["answer"][0] == "answer 0" and generated["references"][0] == ["answer 0", "reply 0"]

    tasks = load_cl_benchmark(benchmark_dir, ["COPA", "dbpedia"], max_samples={"train": 2, "test": None})
    assert list(tasks) == ["COPA", "dbpedia"] and len(tasks["COPA"]["train"]) == 2 and len(tasks["COPA"]["test"]) == 4


def test_bad_layouts_fail_with_the_path_named(benchmark_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no folder for task 'yahoo' under .*\(it holds: COPA, SuperNI, TC\)"):
        load_cl_benchmark(benchmark_dir, ["agnews", "yahoo"])
    with pytest.raises(FileNotFoundError, match=r"is missing .*agnews/val\.json"):
        load_cl_benchmark(str(make_olora_benchmark(str(tmp_path / "a"), ["agnews"])), ["agnews"], splits=["val"])
    with pytest.raises(ValueError, match="`tasks` is empty"):
        load_cl_benchmark(benchmark_dir, [])
    root = make_olora_benchmark(str(tmp_path / "b"), ["agnews"])
    with open(os.path.join(root, "TC", "agnews", "train.json"), "w", encoding="utf-8") as f:
        json.dump([{"text": "no sentence"}], f)
    with pytest.raises(ValueError, match=r"record 0 of .*train\.json must have the keys 'sentence' and 'label'"):
        load_cl_task(root, "agnews", "train")
    with pytest.raises(FileNotFoundError, match="is not an existing folder and not a Hub dataset repo id"):
        load_cl_benchmark(str(tmp_path / "nowhere" / "deep"), ["agnews"])


# --- scores ---------------------------------------------------------------------------------------------------------


def test_exact_match_normalizes_as_olora():
    assert exact_match(["  science OR technology. ", "World"], ["Science or Technology", "Sports"]) == 50.0
    assert exact_match(["B"], [["A", "b"]]) == 100.0
    assert exact_match(["Office  Holder"], ["Office Holder"]) == 100.0
    assert exact_match(["Office"], ["Office Holder"]) == 0.0
    assert exact_match([], []) == 0.0
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        exact_match(["a", "b"], ["a"])


def test_rouge_l_stems_and_takes_the_best_reference():
    # Porter stems: cats -> cat, running -> run; LCS "the cat run" = 3 of 4 tokens each side
    assert rouge_l(["the cats were running"], ["the cat was run"]) == pytest.approx(75.0)
    assert rouge_l(["a b c d"], [["x y", "a b c d"]]) == 100.0
    assert rouge_l(["a b"], ["a b c d"]) == pytest.approx(100 * 2 * (1.0 * 0.5) / 1.5)


def test_extract_answer():
    assert extract_answer(" Sports</s>", "") == "Sports</s>"
    assert extract_answer("World\nAnswer: Business ") == "Business"
    assert extract_answer(" the summary", "Output:") == "the summary"


# --- summaries and the published numbers ---------------------------------------------------------------------------------


def test_summarize_runs_and_reference_table():
    runs = [
        {"merged": {"metrics": {"final_average_accuracy": 70.0, "backward_transfer": -2.0, "forgetting": 3.0}}},
        {"merged": {"metrics": {"final_average_accuracy": 80.0, "backward_transfer": -4.0, "forgetting": 5.0}}},
    ]
    summary = summarize_runs(runs, kinds=["merged"])["merged"]
    assert summary["final_average_accuracy"]["mean"] == 75.0
    assert summary["final_average_accuracy"]["std"] == pytest.approx(7.0710678)
    assert summary["final_average_accuracy"]["stderr"] == pytest.approx(5.0)
    assert summary["backward_transfer"]["values"] == [-2.0, -4.0]
    with pytest.raises(ValueError, match="`runs` is empty"):
        summarize_runs([])
    table = reference_table("standard_cl", {"MagMax (ours)": "75.00 ± 7.07"}).splitlines()
    assert table[2] == "| MagMax (ours) | 75.00 ± 7.07 | this run |"
    assert table[3].startswith("| MagMax | 80.30 | Merge before Forget (SLAO), ICLR 2026")
    with pytest.raises(ValueError, match="no published numbers for 'cifar'"):
        reference_table("cifar")


# --- the generation-scored run ------------------------------------------------------------------------------------------


def test_generation_trainer_learns_a_task(tmp_path):
    """The chain prompt → collator → training → generation → answer extraction → exact match is right: after 30
    epochs on two agnews records, the fine-tuned model answers at least one of them (the base model scores 0)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_magmax.extras.generation import run_continual_generation
    from hf_magmax.trainer import MagMaxConfig

    root = make_olora_benchmark(str(tmp_path / "data"), ["agnews"], per_split=2)
    llama = make_tiny_llama(str(tmp_path / "llama"), llm_cl_corpus())
    tasks = load_cl_benchmark(root, ["agnews"])
    args = MagMaxConfig(
        output_dir=str(tmp_path / "out"),
        num_train_epochs=30,
        learning_rate=3e-3,
        per_device_train_batch_size=2,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        eval_merged_every_task=False,
    )
    trainer = run_continual_generation(
        AutoModelForCausalLM.from_pretrained(llama),
        AutoTokenizer.from_pretrained(llama),
        tasks,
        args,
        metric={"agnews": "exact_match"},
        max_prompt_len=48,
        max_answer_len=6,
        generation_kwargs={"max_new_tokens": 8},
    )
    matrix = trainer.continual_results["sequential"]["matrix"]
    assert matrix[0][0] == 0.0 and matrix[1][0] >= 50.0
    assert args.remove_unused_columns is False and trainer.continual_results["metric"] == "score"


def test_generation_trainer_needs_the_raw_text_columns(tmp_path):
    from transformers import AutoModelForCausalLM

    from hf_magmax.extras.generation import GenerationMagMaxTrainer
    from hf_magmax.trainer import MagMaxConfig

    llama = make_tiny_llama(str(tmp_path / "llama"))
    args = MagMaxConfig(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match="`remove_unused_columns` must be False"):
        GenerationMagMaxTrainer(model=AutoModelForCausalLM.from_pretrained(llama), args=args, train_datasets=[[1]])
