"""The merge state on FSDP2 shards: two CPU processes (torchrun, gloo, `fully_shard`) against one process.

Each rank holds only the local shards of θ_0 and the running merge (DTensor `to_local()`), folds them and writes the
merged shard back, with no gather; random_mix draws by the shard's global flat offset. The merged weights equal the
one-process merge bit for bit, and each rank holds about half of the one-process state.

Where the line is: this tests `MergeState` on `fully_shard`-ed modules directly. `MagMaxTrainer` under Accelerate's
FSDP still gathers the full state dict for its merge state (tested under DDP in test_trainer_ddp.py).
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest


SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "fsdp_merge_state.py")
METHODS = ("magmax", "random_mix", "average", "task_arithmetic")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run(
        ["torchrun", "--nproc_per_node", "2", "--master_port", str(_free_port()), SCRIPT, "--output_dir", str(out)],
        check=True, env=env, timeout=300, capture_output=True,
    )  # fmt: skip
    return [json.loads((out / f"result_rank{rank}.json").read_text()) for rank in (0, 1)]


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed"),
]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("method", METHODS)
def test_fsdp_sharded_merge_equals_one_process(results, method, dtype):
    assert [r["world_size"] for r in results] == [2, 2]
    for rank in results:
        result = rank[f"{method}-{dtype}"]
        assert result["sharded"]
        assert result["equal_shards"], "a rank's merged shard differs from the one-process merge"
        assert result["equal_model"], "the merged weights written into the sharded model differ"


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("method", METHODS)
def test_fsdp_each_rank_holds_about_half_the_state(results, method, dtype):
    ranks = [r[f"{method}-{dtype}"] for r in results]
    one = ranks[0]["one_process_bytes"]["total"]
    for result in ranks:
        assert 0.4 <= result["rank_bytes"]["total"] / one <= 0.6, result
    # the two shards hold the whole state exactly once
    assert sum(r["rank_bytes"]["total"] for r in ranks) == one
    # selecting methods keep θ_best in the model's dtype: 2 B/param for bf16, 4 for fp32
    if method in ("magmax", "random_mix"):
        assert ranks[0]["one_process_bytes"]["merge"] == ranks[0]["params"] * (2 if dtype == "bf16" else 4)


def test_fsdp_ties_is_refused_on_shards_with_the_reason(results):
    for rank in results:
        assert rank["ties_error"] and "not supported on sharded (FSDP2) weights" in rank["ties_error"]
