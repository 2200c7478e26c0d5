# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""The LLM recipes' documented launch commands, end to end on CPU: 2 processes, a tiny Llama from a config.

TRACE (the tiny TRACE fixture, each run writing `trace_results.json`):

- full fine-tuning: `accelerate launch --config_file recipes/accelerate_configs/deepspeed_zero3.yaml` (DeepSpeed
  ZeRO-3, `zero3_init_flag: true`: `from_pretrained` loads the model partitioned, so θ_0 and the merge state are each
  rank's partitions from the start; `zero3_save_16bit_model: true`: the merged model is consolidated once, by
  `save_model`);
- LoRA: `accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml` (DDP over gloo on CPU).

Standard CL (`recipes/llm_continual.py`, order 1 of the tiny O-LoRA fixture: its 4 tasks, 2 examples each):

- full fine-tuning: `accelerate launch --config_file recipes/accelerate_configs/deepspeed_zero3.yaml`, as above;
- `recipes/accelerate_configs/fsdp.yaml` cannot run on CPU: Accelerate switches to FSDP only from a multi-accelerator
  state (`AcceleratorState.__init__`: MULTI_GPU, MULTI_XPU, ...); on CPU it keeps MULTI_CPU and would silently train
  DDP with the whole model on every rank. The recipes refuse that launch before reading any data
  (`recipe_common.check_launch`); FSDP2 itself is tested on CPU by tests/test_trainer_fsdp.py, which switches the
  Trainer's Accelerate state after the fact.

On CPU the configs' `num_processes: 8` and `mixed_precision: bf16` are overridden on the command line
(`--num_processes 2 --mixed_precision no`); everything else is the documented command.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from recipe_utils import llm_cl_corpus, make_olora_benchmark, make_tiny_llama, make_trace_dir
from safetensors.torch import load_file


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = os.path.join(ROOT, "recipes")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("launch_assets")
    return {"trace": make_trace_dir(str(root / "TRACE")), "llama": make_tiny_llama(str(root / "llama"))}


@pytest.fixture(scope="module")
def cl_assets(tmp_path_factory):
    """O-LoRA's `CL_Benchmark` layout with the tasks of Standard CL order 1, and a tiny Llama for its prompts."""
    from hf_magmax.extras.llm_cl import TASK_ORDERS

    root = tmp_path_factory.mktemp("cl_launch_assets")
    return {
        "data": make_olora_benchmark(str(root / "CL_Benchmark"), TASK_ORDERS[1]),
        "llama": make_tiny_llama(str(root / "llama"), llm_cl_corpus()),
    }


def _accelerate_launch(accelerate_config, recipe, *args):
    """`accelerate launch --config_file recipes/accelerate_configs/<config> recipes/<recipe> ARGS` on 2 processes."""
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    cmd += [os.path.join(RECIPES, "accelerate_configs", accelerate_config), "--num_processes", "2"]
    cmd += ["--mixed_precision", "no", "--main_process_port", port, os.path.join(RECIPES, recipe), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": os.path.join(ROOT, "src")}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=420)


def _launch(accelerate_config, out, assets, *extra):
    args = ["--config", os.path.join(RECIPES, "configs", "tiny_trace.yaml"), "--model_name_or_path", assets["llama"]]
    args += ["--data_path", assets["trace"], "--tasks", "C-STANCE", "Py150", "--max_test_samples", "3"]
    proc = _accelerate_launch(accelerate_config, "trace.py", *args, "--output_dir", str(out), *extra)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    with open(out / "results.json", encoding="utf-8") as f:
        results = json.load(f)
    with open(out / "trace_results.json", encoding="utf-8") as f:
        trace = json.load(f)
    assert results["world_size"] == 2 and trace["tasks"] == ["C-STANCE", "Py150"]
    for label in ("SeqFT", "MagMax"):
        matrix = trace["scores"][label]["matrix"]
        assert len(matrix) == 3 and all(len(row) == 2 and all(0 <= v <= 100 for v in row) for row in matrix)
    return results


def test_trace_recipe_full_fine_tuning_deepspeed_zero3_two_processes_and_resume(assets, tmp_path):
    pytest.importorskip("deepspeed")
    out = tmp_path / "zero3"
    results = _launch("deepspeed_zero3.yaml", out, assets, "--save_strategy", "steps", "--save_steps", "1")
    assert results["distributed_type"] == "DEEPSPEED" and results["zero_stage"] == 3
    # the merged model, consolidated once: every weight whole (a partition would have another shape)
    saved = load_file(out / "model.safetensors")
    base = load_file(os.path.join(assets["llama"], "model.safetensors"))
    assert saved.keys() == base.keys()
    assert all(saved[name].shape == base[name].shape for name in base)
    assert any(not saved[name].equal(base[name]) for name in base)  # trained and merged, not θ_0
    assert results["continual_results"]["method"] == "magmax"
    # loaded partitioned (zero.Init): θ_0 is each rank's partitions, written once per run, one file per rank
    parts = [load_file(out / "magmax_base" / f"model-rank{rank}.safetensors") for rank in (0, 1)]
    assert sum(t.numel() for part in parts for t in part.values()) == sum(t.numel() for t in base.values())
    # resume from the last checkpoint of task 2 (one merge-state file per rank): the same merged model, bit for bit
    checkpoint = sorted((out / "task-01-Py150").glob("checkpoint-*"))[-1]
    state = json.loads((checkpoint / "magmax_state.json").read_text())
    assert state["merge_state_ranks"] == 2 and len(state["base"]["sha256"]) == 2
    again = tmp_path / "zero3-resumed"
    shutil.copytree(out, again)
    os.remove(again / "model.safetensors")
    _launch(
        "deepspeed_zero3.yaml", again, assets, "--resume_from_checkpoint", str(again / checkpoint.relative_to(out))
    )
    resumed = load_file(again / "model.safetensors")
    assert all(resumed[name].equal(saved[name]) for name in saved)


def test_trace_recipe_lora_multi_gpu_config_two_processes(assets, tmp_path):
    pytest.importorskip("peft")
    out = tmp_path / "lora"
    results = _launch("multi_gpu.yaml", out, assets, "--use_peft", "true", "--learning_rate", "1e-3")
    assert results["distributed_type"] == "MULTI_CPU" and results["zero_stage"] is None  # DDP over gloo
    assert results["continual_results"]["lora"]["output"] == "merged"
    saved = load_file(out / "model.safetensors")  # the base with the merged ΔW folded in: a plain model
    assert not any("lora" in name for name in saved)


def _standard_cl_args(cl_assets, out):
    args = ["--config", os.path.join(RECIPES, "configs", "tiny_standard_cl.yaml"), "--seeds", "0"]
    args += ["--model_name_or_path", cl_assets["llama"], "--data_path", cl_assets["data"], "--output_dir", str(out)]
    return args


def test_llm_continual_recipe_full_fine_tuning_deepspeed_zero3_two_processes(cl_assets, tmp_path):
    pytest.importorskip("deepspeed")
    out = tmp_path / "zero3"
    args = [*_standard_cl_args(cl_assets, out), "--save_final_models", "true", "--eval_merged_every_task", "false"]
    proc = _accelerate_launch("deepspeed_zero3.yaml", "llm_continual.py", *args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = json.loads((out / "llm_cl_results.json").read_text())
    assert results["world_size"] == 2 and results["benchmark"] == "standard_cl" and len(results["runs"]) == 1
    run = results["runs"][0]
    assert run["tasks"] == ["dbpedia", "amazon", "yahoo", "agnews"] and run["method"] == "magmax"
    for kind in ("sequential", "merged"):  # row 0: the base model; the merged model scored after the last task
        matrix = run[kind]["matrix"]
        assert len(matrix) == 5 and all(0 <= v <= 100 for v in matrix[0] + matrix[-1])
    assert "MagMax (ours)" in (out / "results.md").read_text()
    # loaded partitioned (zero.Init, `zero3_init_flag: true`): θ_0 is each rank's partition, one file per rank, and
    # the two partitions are the checkpoint's weights, bit for bit
    base = load_file(os.path.join(cl_assets["llama"], "model.safetensors"))
    parts = [load_file(out / "order1_seed0" / "magmax_base" / f"model-rank{rank}.safetensors") for rank in (0, 1)]
    assert parts[0].keys() == parts[1].keys() == base.keys()
    for name, tensor in base.items():
        assert torch.equal(torch.cat([parts[0][name].reshape(-1), parts[1][name].reshape(-1)]), tensor.reshape(-1))
    # the merged model, consolidated once by `save_model`: every weight whole, trained and merged (not θ_0)
    saved = load_file(out / "order1_seed0" / "model.safetensors")
    assert saved.keys() == base.keys() and all(saved[name].shape == base[name].shape for name in base)
    assert any(not saved[name].equal(base[name]) for name in base)
    assert "magmax" in (out / "order1_seed0" / "README.md").read_text()


def test_llm_continual_recipe_fsdp_config_on_cpu_refuses_before_training(cl_assets, tmp_path):
    """On CPU Accelerate would run `fsdp.yaml` as DDP (see the module docstring): the recipe stops with one line that
    says so, before any data is read or anything written."""
    out = tmp_path / "fsdp"
    proc = _accelerate_launch("fsdp.yaml", "llm_continual.py", *_standard_cl_args(cl_assets, out))
    assert proc.returncode != 0
    assert "RuntimeError: the accelerate config asks for FSDP, but Accelerate runs FSDP on GPUs" in proc.stderr
    assert "deepspeed_zero3.yaml" in proc.stderr
    assert not out.exists()
