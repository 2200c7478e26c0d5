# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""The recipes end to end on tiny offline models and data in the real formats (recipes/configs/tiny_*.yaml)."""

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
from recipe_utils import (
    llm_cl_corpus,
    make_image_dataset,
    make_olora_benchmark,
    make_superni_benchmark,
    make_text_dataset,
    make_tiny_bert,
    make_tiny_clip,
    make_tiny_llama,
    make_tiny_vit,
    make_trace_dir,
)

from hf_magmax.trace import TRACE_TASKS


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = os.path.join(ROOT, "recipes")
CONFIGS = os.path.join(RECIPES, "configs")


def _load(key: str, path: str):
    spec = importlib.util.spec_from_file_location(key, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module
    spec.loader.exec_module(module)
    return module


def _recipe(name: str):
    """Import recipes/<name>.py under a private module name (recipes/trace.py must not shadow the stdlib `trace`),
    without editing `sys.path`: its sibling `recipe_common` is loaded first under the name the recipes import."""
    if "recipe_common" not in sys.modules:
        _load("recipe_common", os.path.join(RECIPES, "recipe_common.py"))
    key = f"_recipe_{name}"
    if key not in sys.modules:
        _load(key, os.path.join(RECIPES, f"{name}.py"))
    return sys.modules[key]


def _json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe_assets")
    return {
        "trace": make_trace_dir(str(root / "TRACE")),
        "llama": make_tiny_llama(str(root / "llama")),
        "cifar": make_image_dataset(str(root / "cifar")),
        "clip": make_tiny_clip(str(root / "clip")),
        "vit": make_tiny_vit(str(root / "vit")),
        "bert": make_tiny_bert(str(root / "bert")),
        "sentiment": make_text_dataset(str(root / "sentiment"), ["negative", "positive"]),
        "topic": make_text_dataset(str(root / "topic"), ["sports", "business", "positive"]),
        "cl_llama": make_tiny_llama(str(root / "cl_llama"), llm_cl_corpus()),
    }


def _check_matrix(matrix, num_tasks, low, high):
    array = np.asarray(matrix, dtype=float)
    assert array.shape == (num_tasks + 1, num_tasks)
    assert np.all((array >= low) & (array <= high))
    return array


# --- TRACE ------------------------------------------------------------------------------------------------------------


def test_trace_recipe_full_fine_tuning_all_eight_tasks(assets, tmp_path):
    out = tmp_path / "trace"
    scores = _recipe("trace").main(
        ["--config", os.path.join(CONFIGS, "tiny_trace.yaml"), "--model_name_or_path", assets["llama"]]
        + ["--data_path", assets["trace"], "--output_dir", str(out)]
    )
    results = _json(out / "trace_results.json")
    assert results["tasks"] == list(TRACE_TASKS)
    for label in ("SeqFT", "MagMax"):
        matrix = _check_matrix(results["scores"][label]["matrix"], 8, 0.0, 100.0)
        op, bwt = results["scores"][label]["OP"], results["scores"][label]["BWT"]
        assert op == pytest.approx(matrix[-1].mean())
        assert bwt == pytest.approx(np.mean([matrix[-1, i] - matrix[i + 1, i] for i in range(7)]))
        assert scores[label]["OP"] == op
    assert results["published"]["scores"]["SeqFT (full fine-tuning)"] == 48.7  # the 5000-sample release's numbers
    continual = _json(out / "continual_results.json")
    assert continual["metric"] == "score" and continual["task_names"] == list(TRACE_TASKS)
    assert _json(out / "results.json")["recipe"] == "trace"
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()


def test_trace_recipe_lora_with_per_task_epochs(assets, tmp_path):
    out = tmp_path / "trace-lora"
    _recipe("trace").main(
        ["--config", os.path.join(CONFIGS, "tiny_trace.yaml"), "--model_name_or_path", assets["llama"]]
        + ["--data_path", assets["trace"], "--output_dir", str(out), "--tasks", "FOMC", "20Minuten"]
        + ["--use_peft", "true", "--num_train_epochs_per_task", "2", "1", "--learning_rate", "1e-2"]
        + ["--trace_variant", "500"]
    )
    results = _json(out / "trace_results.json")
    assert results["tasks"] == ["FOMC", "20Minuten"]
    # the 500-sample release: its published numbers beside ours
    assert results["published"]["scores"] == {"O-LoRA": 42.78, "MoRAM": 44.54}
    assert "| MagMax (ours), OP |" in results["table"] and "| MoRAM | 44.54 |" in results["table"]
    _check_matrix(results["scores"]["MagMax"]["matrix"], 2, 0.0, 100.0)
    assert results["script_args"]["lora_target_modules"] == ["q_proj", "v_proj"]


# --- Standard CL, Long-15, SuperNI-15 (recipes/llm_continual.py) ----------------------------------------------------


@pytest.fixture(scope="module")
def cl_benchmark(tmp_path_factory):
    """One folder in both layouts: O-LoRA's `CL_Benchmark` (all 15 classification tasks) and SAPT's `SuperNI/`."""
    from hf_magmax.extras.llm_cl import OLORA_TASK_TYPES, SUPERNI_TASKS

    root = str(tmp_path_factory.mktemp("CL_Benchmark"))
    make_olora_benchmark(root, OLORA_TASK_TYPES)
    make_superni_benchmark(root, SUPERNI_TASKS)
    return root


def _run_llm_continual(assets, cl_benchmark, out, config, *extra):
    return _recipe("llm_continual").main(
        ["--config", os.path.join(CONFIGS, config), "--model_name_or_path", assets["cl_llama"]]
        + ["--data_path", cl_benchmark, "--output_dir", str(out), *extra]
    )


def _check_llm_results(out, benchmark, runs, num_tasks, published):
    results = _json(out / "llm_cl_results.json")
    assert results["benchmark"] == benchmark and len(results["runs"]) == runs
    for run in results["runs"]:
        assert (out / f"order{run['order']}_seed{run['seed']}" / "continual_results.json").is_file()
        for kind in ("sequential", "merged"):
            # `eval_merged_every_task: false` (the long15 / superni tiny configs) scores the merged model at the end only
            rows = [row for row in run[kind]["matrix"] if None not in row]
            assert len(run[kind]["matrix"]) == num_tasks + 1 and len(rows) in (2, num_tasks + 1)
            final = np.asarray(rows[-1], dtype=float)
            assert final.shape == (num_tasks,) and np.all((final >= 0.0) & (final <= 100.0))
            assert run[kind]["metrics"]["final_average_accuracy"] == pytest.approx(final.mean())
    for kind in ("sequential", "merged"):
        ap = [r[kind]["metrics"]["final_average_accuracy"] for r in results["runs"]]
        assert results["summary"][kind]["final_average_accuracy"]["mean"] == pytest.approx(np.mean(ap))
    assert results["published"]["scores"] == published
    table = (out / "results.md").read_text()
    assert "MagMax (ours)" in table and "Merge before Forget" in table
    for name, value in published.items():
        assert f"| {name} | {value:.2f} |" in table
    return results


def test_standard_cl_recipe_lora_averages_seeds(assets, cl_benchmark, tmp_path):
    out = tmp_path / "standard_cl"
    _run_llm_continual(assets, cl_benchmark, out, "tiny_standard_cl.yaml", "--use_peft", "true")
    results = _check_llm_results(
        out, "standard_cl", 2, 4, {"MagMax": 80.3, "SeqLoRA": 76.0, "O-LoRA": 77.2, "SLAO": 80.4, "MTL": 80.9}
    )
    assert [(r["order"], r["seed"]) for r in results["runs"]] == [(1, 0), (1, 1)]
    assert results["runs"][0]["tasks"] == ["dbpedia", "amazon", "yahoo", "agnews"]
    assert results["metric"] == "exact_match" and "SeqLoRA (ours)" in results["table"]


def test_standard_cl_recipe_skips_finished_runs(assets, cl_benchmark, tmp_path, monkeypatch):
    """A relaunched sweep with `skip_finished_runs` reuses the complete run and trains only the missing one."""
    out = tmp_path / "sweep"
    first = _run_llm_continual(assets, cl_benchmark, out, "tiny_standard_cl.yaml", "--seeds", "0")
    module = _recipe("llm_continual")
    trained = []
    real_run_one = module.run_one
    monkeypatch.setattr(
        module, "run_one", lambda s, t, order, seed: trained.append(seed) or real_run_one(s, t, order, seed)
    )
    again = _run_llm_continual(
        assets, cl_benchmark, out, "tiny_standard_cl.yaml", "--seeds", "0", "1", "--skip_finished_runs", "true"
    )
    assert trained == [1]
    assert again["runs"][0]["sequential"] == first["runs"][0]["sequential"] and len(again["runs"]) == 2
    assert module.finished_run(str(out / "order1_seed0"), ("dbpedia", "amazon", "agnews", "yahoo")) is None


def test_standard_cl_recipe_every_order(assets, cl_benchmark, tmp_path):
    out = tmp_path / "orders"
    _run_llm_continual(
        assets,
        cl_benchmark,
        out,
        "tiny_standard_cl.yaml",
        "--orders",
        "2",
        "3",
        "--seeds",
        "5",
        "--max_test_samples",
        "1",
    )
    results = _json(out / "llm_cl_results.json")
    assert [r["tasks"] for r in results["runs"]] == [
        ["dbpedia", "amazon", "agnews", "yahoo"],
        ["yahoo", "amazon", "agnews", "dbpedia"],
    ]
    assert "SeqFT (ours)" in results["table"]


def test_long15_recipe_full_fine_tuning(assets, cl_benchmark, tmp_path):
    out = tmp_path / "long15"
    _run_llm_continual(assets, cl_benchmark, out, "tiny_long15.yaml")
    results = _check_llm_results(out, "long15", 1, 15, {"MagMax": 73.4, "SeqLoRA": 68.7, "SLAO": 74.8, "MTL": 78.1})
    assert results["runs"][0]["tasks"][:4] == ["MNLI", "CB", "WiC", "COPA"]


def test_superni_recipe_scores_rouge_l(assets, cl_benchmark, tmp_path):
    out = tmp_path / "superni"
    _run_llm_continual(assets, cl_benchmark, out, "tiny_superni.yaml")
    results = _check_llm_results(out, "superni", 1, 15, {"MagMax": 11.2, "SeqLoRA": 22.6, "SLAO": 37.2, "MTL": 45.2})
    assert results["metric"] == "rouge_l" and results["runs"][0]["tasks"][0] == "task1572_samsum_summary"


def test_llm_continual_bad_arguments_fail_before_training(assets, cl_benchmark, tmp_path):
    with pytest.raises(ValueError, match="`orders` \\[4\\] are not orders of `benchmark` 'standard_cl'"):
        _run_llm_continual(assets, cl_benchmark, tmp_path / "a", "tiny_standard_cl.yaml", "--orders", "4")
    with pytest.raises(FileNotFoundError, match="no folder for task 'dbpedia'"):
        _recipe("llm_continual").main(
            ["--config", os.path.join(CONFIGS, "tiny_standard_cl.yaml"), "--model_name_or_path", assets["cl_llama"]]
            + ["--data_path", str(tmp_path), "--output_dir", str(tmp_path / "b")]
        )
    with pytest.raises(ValueError, match="has no causal-LM head"):
        _run_llm_continual({"cl_llama": assets["vit"]}, cl_benchmark, tmp_path / "c", "tiny_standard_cl.yaml")
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


# --- images -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("config", "model"), [("tiny_image_clip.yaml", "clip"), ("tiny_image_vit.yaml", "vit")])
def test_image_recipe(assets, tmp_path, config, model):
    out = tmp_path / model
    _recipe("continual_image_classification").main(
        ["--config", os.path.join(CONFIGS, config), "--model_name_or_path", assets[model]]
        + ["--dataset_name", assets["cifar"], "--output_dir", str(out)]
    )
    continual = _json(out / "continual_results.json")
    assert continual["metric"] == "accuracy" and continual["task_names"] == ["task_1", "task_2"]
    for kind in ("sequential", "merged"):
        matrix = _check_matrix(continual[kind]["matrix"], 2, 0.0, 1.0)
        assert continual[kind]["metrics"]["final_average_accuracy"] == pytest.approx(matrix[-1].mean())
    results = _json(out / "results.json")
    assert results["label_names"] == ["apple", "bicycle", "castle", "dolphin"]
    assert results["continual_results"]["method"] == "magmax"
    assert (out / "model.safetensors").is_file() and (out / "preprocessor_config.json").is_file()


def test_image_recipe_domain_incremental(assets, tmp_path):
    out = tmp_path / "domains"
    _recipe("continual_image_classification").main(
        ["--config", os.path.join(CONFIGS, "tiny_image_clip.yaml"), "--model_name_or_path", assets["clip"]]
        + ["--dataset_name", assets["cifar"], "--output_dir", str(out), "--scenario", "domain_incremental"]
        + [
            "--domain_column",
            "domain",
            "--domain_order",
            "sketch",
            "photo",
            "--restrict_loss_to_task_classes",
            "false",
        ]
    )
    continual = _json(out / "continual_results.json")
    assert continual["task_names"] == ["sketch", "photo"]
    _check_matrix(continual["merged"]["matrix"], 2, 0.0, 1.0)


def test_image_recipe_domain_order_names_a_class_label_domain_column(assets, tmp_path):
    """A ClassLabel domain column (as wltjr1007/DomainNet's) stores ids: `domain_order` lists its names."""
    from datasets import ClassLabel, load_from_disk

    data = str(tmp_path / "data")
    load_from_disk(assets["cifar"]).cast_column("domain", ClassLabel(names=["photo", "sketch"])).save_to_disk(data)
    out = tmp_path / "domains"
    argv = ["--config", os.path.join(CONFIGS, "tiny_image_clip.yaml"), "--model_name_or_path", assets["clip"]]
    argv += ["--dataset_name", data, "--scenario", "domain_incremental", "--domain_column", "domain"]
    argv += ["--restrict_loss_to_task_classes", "false"]
    image = _recipe("continual_image_classification")
    with pytest.raises(ValueError, match=r"lists \['clipart'\].*photo"):
        image.main(argv + ["--output_dir", str(tmp_path / "bad"), "--domain_order", "sketch", "clipart"])
    image.main(argv + ["--output_dir", str(out), "--domain_order", "sketch", "photo"])
    continual = _json(out / "continual_results.json")
    assert continual["task_names"] == ["sketch", "photo"]


# --- text -------------------------------------------------------------------------------------------------------------


def _text_tasks(assets):
    return json.dumps(
        [
            {"name": "sentiment", "dataset": assets["sentiment"]},
            {"name": "topic", "dataset": assets["topic"], "text_columns": ["text"], "label_column": "label"},
        ]
    )


@pytest.mark.parametrize(("head", "lora"), [("linear", False), ("zero_shot", True)])
def test_text_recipe_shares_label_names_across_tasks(assets, tmp_path, head, lora):
    out = tmp_path / "text"
    _recipe("continual_text_classification").main(
        ["--config", os.path.join(CONFIGS, "tiny_text.yaml"), "--model_name_or_path", assets["bert"]]
        + ["--tasks", _text_tasks(assets), "--output_dir", str(out), "--head", head]
        + (["--use_peft", "true", "--lora_target_modules", "query", "value"] if lora else [])
    )
    results = _json(out / "results.json")
    # "positive" is one class of both tasks: 2 + 3 - 1 classes in all
    assert results["label_names"] == ["negative", "positive", "sports", "business"]
    continual = results["continual_results"]
    assert continual["task_names"] == ["sentiment", "topic"]
    _check_matrix(continual["merged"]["matrix"], 2, 0.0, 1.0)
    if head == "zero_shot":
        return
    config = _json(out / "config.json")
    assert config["id2label"] == {"0": "negative", "1": "positive", "2": "sports", "3": "business"}


@pytest.mark.slow
def test_trace_recipe_runs_as_two_processes(assets, tmp_path):
    """`torchrun --nproc_per_node 2`: two real ranks (gloo) train, split the test prompts between them for generation
    and gather the answers; only rank 0 writes. The base model's row (before any training, so independent of how the
    batches are split) equals the one-process run's: the sharded generation loses and reorders nothing."""
    argv = ["--config", os.path.join(CONFIGS, "tiny_trace.yaml"), "--model_name_or_path", assets["llama"]]
    argv += ["--data_path", assets["trace"], "--tasks", "C-STANCE", "Py150", "20Minuten", "--max_test_samples", "3"]
    single = _recipe("trace").main([*argv, "--output_dir", str(tmp_path / "one")])
    out = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.join(ROOT, "src")}
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    cmd += [os.path.join(RECIPES, "trace.py"), *argv, "--output_dir", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _json(out / "results.json")["world_size"] == 2
    results = _json(out / "trace_results.json")
    for label in ("SeqFT", "MagMax"):
        matrix = _check_matrix(results["scores"][label]["matrix"], 3, 0.0, 100.0)
        assert matrix[0].tolist() == single[label]["matrix"][0]


# --- configs and bad configs --------------------------------------------------------------------------------------


def test_yaml_values_are_defaults_and_the_command_line_overrides(tmp_path):
    module = _recipe("continual_image_classification")
    common = sys.modules["recipe_common"]
    script_args, training_args = common.parse_recipe_args(
        (module.ScriptArguments, module.MagMaxConfig),
        [
            "--config",
            os.path.join(CONFIGS, "cifar100_20tasks.yaml"),
            "--num_tasks",
            "5",
            "--output_dir",
            str(tmp_path),
            "--bf16",
            "false",
            "--use_cpu",
            "true",
        ],
    )
    assert script_args.num_tasks == 5 and script_args.label_column == "fine_label"
    assert len(script_args.templates) == 18 and script_args.templates[0] == "a photo of a {}."
    assert training_args.learning_rate == 1e-5 and training_args.weight_decay == 0.1
    assert training_args.warmup_steps == 500 and training_args.lr_scheduler_type == "cosine"
    assert training_args.max_grad_norm == 1.0 and training_args.per_device_train_batch_size == 128
    assert training_args.scaling_coef == 0.5 and training_args.merge_method == "magmax"
    bad = tmp_path / "bad.yaml"
    bad.write_text("num_taskz: 3\n")
    with pytest.raises(ValueError, match="unknown argument.*num_taskz"):
        common.parse_recipe_args((module.ScriptArguments, module.MagMaxConfig), ["--config", str(bad)])


def _same(parsed, raw) -> bool:
    """Whether a parsed argument holds the YAML value (enums by value, `report_to: none` as a list, floats)."""
    parsed = getattr(parsed, "value", parsed)
    if isinstance(parsed, list) and not isinstance(raw, list):
        return parsed == [raw] or (raw == "none" and parsed in ([], ["none"]))
    if isinstance(raw, list) and isinstance(parsed, list):
        return len(raw) == len(parsed) and all(_same(p, r) for p, r in zip(parsed, raw))
    if isinstance(raw, float) or isinstance(parsed, float):
        return isinstance(parsed, (int, float)) and parsed == pytest.approx(raw)
    return parsed == raw


def test_every_shipped_config_parses(tmp_path):
    """Every shipped config parses, and every scalar value it sets reaches the parsed arguments unchanged."""
    import yaml

    pairs = {
        "trace": ["trace_", "tiny_trace"],
        "continual_text_classification": ["text_", "tiny_text"],
        "llm_continual": ["standard_cl_", "long15_", "superni_", "tiny_standard_cl", "tiny_long15", "tiny_superni"],
    }
    overridden = {"output_dir", "use_cpu", "bf16"}
    checked = 0
    for name in sorted(os.listdir(CONFIGS)):
        recipe = next((r for r, prefixes in pairs.items() if name.startswith(tuple(prefixes))), None)
        recipe = recipe or "continual_image_classification"
        module = _recipe(recipe)
        common = sys.modules["recipe_common"]
        script_args, training_args = common.parse_recipe_args(
            (module.ScriptArguments, module.MagMaxConfig),
            ["--config", os.path.join(CONFIGS, name), "--output_dir", str(tmp_path / name), "--use_cpu", "true"]
            + ["--bf16", "false"],
        )
        with open(os.path.join(CONFIGS, name), encoding="utf-8") as f:
            raw = yaml.safe_load(f)
        assert training_args.seed == raw.get("seed", 42), name
        for key, value in raw.items():
            if key in overridden or isinstance(value, dict) or (isinstance(value, list) and value and
                                                                 isinstance(value[0], dict)):  # fmt: skip
                continue
            holder = training_args if hasattr(training_args, key) else script_args
            assert hasattr(holder, key), f"{name}: {key} reaches no argument"
            assert _same(getattr(holder, key), value), f"{name}: {key} = {getattr(holder, key)!r}, YAML has {value!r}"
            checked += 1
    assert checked > 100


def test_bad_configs_fail_before_training(assets, tmp_path):
    image = _recipe("continual_image_classification")
    base = ["--config", os.path.join(CONFIGS, "tiny_image_clip.yaml"), "--dataset_name", assets["cifar"]]
    with pytest.raises(ValueError, match="`image_column` = 'image' is not a column.*img, fine_label"):
        image.main([*base, "--model_name_or_path", assets["clip"], "--image_column", "image"] + _out(tmp_path, 1))
    with pytest.raises(ValueError, match="without a text tower"):
        image.main([*base, "--model_name_or_path", assets["vit"]] + _out(tmp_path, 2))
    text = _recipe("continual_text_classification")
    with pytest.raises(ValueError, match="`tasks` is empty"):
        text.main(["--config", os.path.join(CONFIGS, "tiny_text.yaml"), "--tasks", "[]"] + _out(tmp_path, 3))
    bad_text = json.dumps([{"name": "s", "dataset": assets["sentiment"], "text_columns": ["sentence"]}])
    with pytest.raises(ValueError, match=r"`tasks\[0\].text_columns` = 'sentence' is not a column"):
        text.main(
            ["--config", os.path.join(CONFIGS, "tiny_text.yaml"), "--model_name_or_path", assets["bert"]]
            + ["--tasks", bad_text]
            + _out(tmp_path, 4)
        )
    trace = _recipe("trace")
    partial = make_trace_dir(str(tmp_path / "partial"), tasks=TRACE_TASKS[:5])
    with pytest.raises(FileNotFoundError, match="no task folder for NumGLUE-cm, NumGLUE-ds, 20Minuten"):
        trace.main(
            ["--config", os.path.join(CONFIGS, "tiny_trace.yaml"), "--model_name_or_path", assets["llama"]]
            + ["--data_path", partial]
            + _out(tmp_path, 5)
        )
    with pytest.raises(ValueError, match="no causal-LM head"):
        trace.main(
            ["--config", os.path.join(CONFIGS, "tiny_trace.yaml"), "--model_name_or_path", assets["vit"]]
            + ["--data_path", assets["trace"]]
            + _out(tmp_path, 6)
        )
    for i in range(1, 7):
        assert not (tmp_path / f"out{i}" / "continual_results.json").exists()


def _out(tmp_path, i):
    return ["--output_dir", str(tmp_path / f"out{i}")]


# --- resume and push ----------------------------------------------------------------------------------------------


def test_image_recipe_resumes_an_interrupted_run(assets, tmp_path):
    out = tmp_path / "resume"
    image = _recipe("continual_image_classification")
    argv = ["--config", os.path.join(CONFIGS, "tiny_image_vit.yaml"), "--model_name_or_path", assets["vit"]]
    argv += ["--dataset_name", assets["cifar"], "--output_dir", str(out), "--save_strategy", "epoch"]
    image.main(argv)
    assert (out / "task-00-task_1").is_dir() and (out / "task-01-task_2").is_dir()
    uninterrupted = _json(out / "continual_results.json")
    # interrupt after task 1: drop what task 2 wrote, then resume from the last checkpoint left
    shutil.rmtree(out / "task-01-task_2")
    os.remove(out / "continual_results.json")
    image.main([*argv, "--resume_from_checkpoint", "true"])
    continual = _json(out / "continual_results.json")
    assert continual["num_tasks_done"] == 2
    for kind in ("sequential", "merged"):
        _check_matrix(continual[kind]["matrix"], 2, 0.0, 1.0)
    assert (out / "task-01-task_2").is_dir()
    # ViT's saved tensor names differ from its in-memory names in transformers v5: the resume must still be exact
    assert continual["sequential"]["matrix"] == uninterrupted["sequential"]["matrix"]
    assert continual["merged"]["matrix"] == uninterrupted["merged"]["matrix"]


def test_text_recipe_pushes_to_the_hub(assets, tmp_path, fake_hub):  # noqa: F811
    out = tmp_path / "push"
    _recipe("continual_text_classification").main(
        ["--config", os.path.join(CONFIGS, "tiny_text.yaml"), "--model_name_or_path", assets["bert"]]
        + ["--tasks", _text_tasks(assets), "--output_dir", str(out)]
        + ["--push_to_hub", "true", "--hub_model_id", "me/tiny-text-magmax"]
    )
    repo = fake_hub.repos["me/tiny-text-magmax"]
    assert "model.safetensors" in repo.files and "config.json" in repo.files
    assert b"magmax" in repo.files["README.md"]
    # no file of any commit names the run's or the inputs' local folders (results.json records them by name)
    local = [str(tmp_path), os.path.dirname(assets["bert"])]
    leaks = [
        (name, path) for c in repo.commits for name, data in c.files.items() for path in local if path.encode() in data
    ]
    assert leaks == []
    results = json.loads(repo.files["results.json"])
    assert results["script_args"]["model_name_or_path"] == os.path.basename(assets["bert"])
    assert results["training_args"]["output_dir"] == "push"
    assert [task["dataset"] for task in results["script_args"]["tasks"]] == ["sentiment", "topic"]


def test_trace_recipe_learns_a_task(assets, tmp_path):
    """The chain collator → training → generation → metric is right: after 15 epochs on FOMC (answers "A"/"B"), the
    fine-tuned model's exact match on FOMC beats the base model's 0."""
    out = tmp_path / "learn"
    scores = _recipe("trace").main(
        ["--config", os.path.join(CONFIGS, "tiny_trace.yaml"), "--model_name_or_path", assets["llama"]]
        + [
            "--data_path",
            assets["trace"],
            "--output_dir",
            str(out),
            "--tasks",
            "FOMC",
            "--num_train_epochs_per_task",
            "15",
        ]
        + ["--max_train_samples", "4", "--max_test_samples", "4", "--learning_rate", "3e-3", "--max_new_tokens", "3"]
    )
    matrix = scores["SeqFT"]["matrix"]
    assert matrix[0][0] == 0.0 and matrix[1][0] >= 50.0
    assert scores["SeqFT"]["OP"] == matrix[1][0] and scores["SeqFT"]["BWT"] == 0.0


def test_accelerate_configs_load():
    from accelerate.commands.config.config_args import ClusterConfig

    expected = {
        "multi_gpu.yaml": ("MULTI_GPU", None),
        "fsdp.yaml": ("FSDP", None),
        "deepspeed_zero2.yaml": ("DEEPSPEED", 2),
        "deepspeed_zero3.yaml": ("DEEPSPEED", 3),
    }
    folder = os.path.join(RECIPES, "accelerate_configs")
    assert sorted(os.listdir(folder)) == sorted(expected)
    for name, (kind, stage) in expected.items():
        config = ClusterConfig.from_yaml_file(os.path.join(folder, name))
        assert config.distributed_type.value == kind, name
        if stage is not None:
            assert config.deepspeed_config["zero_stage"] == stage
    fsdp = ClusterConfig.from_yaml_file(os.path.join(folder, "fsdp.yaml")).fsdp_config
    assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # the merge gathers the full state dict
