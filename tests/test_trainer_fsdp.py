"""MagMaxTrainer under Accelerate's FSDP2, two CPU processes (torchrun, gloo), against one process.

Accelerate chooses FSDP only on accelerators (on CPU it silently keeps DDP); the worker (`scripts/trainer_fsdp.py`)
switches its state to FSDP2 after the Trainer built it, and Accelerate's own `fsdp2_prepare_model` shards the model
with `fully_shard` when training starts, as on GPUs. θ_0 is taken whole before that (and written once, memory-mapped);
each rank then keeps only its rows of it and folds its DTensor shards: no gather until `save_model`.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
from safetensors.torch import load_file


SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "trainer_fsdp.py")
METHODS = ("magmax", "ties")
#: Largest |Δ| allowed between the FSDP2 and the one-process final weights: the training differs by float rounding
#: only (gradients reduced in another order; measured 8.1e-7 for magmax, 9.2e-7 for ties). The merge itself is
#: checked bit for bit against a whole-tensor merge of the same run's θ_t.
TOLERANCE = 2e-6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed"),
]


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    out = tmp_path_factory.mktemp("trainer_fsdp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run(
        ["torchrun", "--nproc_per_node", "2", "--master_port", str(_free_port()), SCRIPT, "--output_dir", str(out),
         "--per_device_train_batch_size", "2"],
        check=True, env=env, timeout=600, capture_output=True,
    )  # fmt: skip
    subprocess.run(
        [sys.executable, SCRIPT, "--output_dir", str(out / "single"), "--per_device_train_batch_size", "4"],
        check=True, env=env, timeout=300, capture_output=True,
    )  # fmt: skip
    return out


def _results(out, method):
    return [json.loads((out / f"result-{method}-rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.parametrize("method", METHODS)
def test_fsdp_trainer_folds_shards_and_merges_exactly(out, method):
    for result in _results(out, method):
        assert result["world_size"] == 2 and result["distributed_type"] == "DistributedType.FSDP"
        assert result["param_class"] == "DTensor"  # Accelerate sharded the model
        assert result["sharded"], "the merge state holds whole tensors, not this rank's shards"
        assert result["merged_equal_reference"], "the merged weights differ from a whole-tensor merge of the θ_t"


@pytest.mark.parametrize("method", METHODS)
def test_fsdp_trainer_matches_one_process(out, method):
    fsdp = load_file(out / f"final-{method}-fsdp.safetensors")
    single = load_file(out / "single" / f"final-{method}-single.safetensors")
    assert fsdp.keys() == single.keys()
    for name, value in fsdp.items():
        assert (value - single[name]).abs().max().item() <= TOLERANCE, name
    assert _results(out, method)[0]["saved_equal_gathered"], "save_model wrote other weights than the model holds"


@pytest.mark.parametrize("method", METHODS)
def test_fsdp_trainer_each_rank_holds_half_the_state(out, method):
    ranks = _results(out, method)
    one = ranks[0]["one_process_merge_bytes"]
    for result in ranks:
        assert 0.4 <= result["rank_merge_bytes"] / one <= 0.6, result
        assert result["rank_base_private_bytes"] == 0  # θ_0: this rank's rows of the run's memory-mapped file
    assert sum(r["rank_merge_bytes"] for r in ranks) == one
    if method == "magmax":  # θ_best in the model's dtype (fp32): 4 B/param, split over the ranks
        assert one == 4 * ranks[0]["params"]


@pytest.mark.parametrize("method", METHODS)
def test_fsdp_trainer_checkpoints_one_merge_state_per_rank_and_resume(out, method):
    for result in _results(out, method):
        first, last = result["checkpoint_files"]
        assert "magmax_merge_state.pt" in first  # task 1, before any fold: nothing sharded yet, the main process
        assert {"magmax_merge_state-rank0.pt", "magmax_merge_state-rank1.pt"} <= set(last)
        assert "magmax_merge_state.pt" not in last and "magmax_base.safetensors" not in last  # θ_0: once per run
        assert result["resumed_task"] == 1
        assert result["resume_equal"], "a rank's restored merge state folds to another merge than the run's"
        # `train(resume_from_checkpoint=)` from the end of task 1 and of task 2: the same final weights, bit for bit
        assert result["trainer_resume_equal"] == [True, True], "a resumed run ends with other weights"
    record = json.loads(next((out / "magmax").glob("task-01-*/checkpoint-*/magmax_state.json")).read_text())
    assert record["merge_state_ranks"] == 2 and record["base"]["file"].endswith("magmax_base/model.safetensors")


def test_fsdp_trainer_resume_refuses_another_world_size(out):
    from hf_magmax import MagMaxConfig
    from hf_magmax.trainer.run import ContinualRun

    checkpoint = next((out / "magmax").glob("task-01-*/checkpoint-*"))
    names = json.loads((checkpoint / "magmax_state.json").read_text())["task_names"]
    run = ContinualRun(MagMaxConfig(output_dir=str(out / "x"), use_cpu=True, report_to="none"), names, [], None)
    with pytest.raises(ValueError, match="sharded over 2 processes, but this run has 1"):
        run.load(str(checkpoint))
