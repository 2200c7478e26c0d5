# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""The TRACE recipe's two documented launch commands, end to end on CPU: 2 processes, a tiny Llama, the tiny TRACE
fixture, each writing `trace_results.json`.

- full fine-tuning: `accelerate launch --config_file recipes/accelerate_configs/deepspeed_zero3.yaml` (DeepSpeed
  ZeRO-3, `zero3_init_flag: true`: `from_pretrained` loads the model partitioned, so θ_0 and the merge state are each
  rank's partitions from the start; `zero3_save_16bit_model: true`: the merged model is consolidated once, by
  `save_model`);
- LoRA: `accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml` (DDP over gloo on CPU).

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
from recipe_utils import make_tiny_llama, make_trace_dir
from safetensors.torch import load_file


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = os.path.join(ROOT, "recipes")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("launch_assets")
    return {"trace": make_trace_dir(str(root / "TRACE")), "llama": make_tiny_llama(str(root / "llama"))}


def _launch(accelerate_config, out, assets, *extra):
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    cmd += [os.path.join(RECIPES, "accelerate_configs", accelerate_config), "--num_processes", "2"]
    cmd += ["--mixed_precision", "no", "--main_process_port", port, os.path.join(RECIPES, "trace.py")]
    cmd += ["--config", os.path.join(RECIPES, "configs", "tiny_trace.yaml"), "--model_name_or_path", assets["llama"]]
    cmd += ["--data_path", assets["trace"], "--tasks", "C-STANCE", "Py150", "--max_test_samples", "3"]
    cmd += ["--output_dir", str(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": os.path.join(ROOT, "src")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=420)
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
