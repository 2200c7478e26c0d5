"""The merge state on DeepSpeed ZeRO-3 partitions: two CPU processes (gloo, `DS_ACCELERATOR=cpu`) against one.

θ_0 is taken whole before `deepspeed.initialize` partitions the model (as the Trainer does); each rank then keeps only
its partition of it and of the running merge (`param.ds_tensor`: the flat elements from `rank · partition size`, the
end padding left out), folds them with no gather and writes the merged partition back; random_mix draws by the global
flat offset, TIES sums the ranks' histograms. The merged weights equal the one-process merge bit for bit and each rank
holds half of the one-process state. Needs DeepSpeed (`DS_BUILD_OPS=0 pip install deepspeed`; CPU only): skipped
without it, except in CI, where tests/conftest.py turns the skip into a failure (`.ci/run` installs it).

This tests `MergeState` on ZeRO-3 partitions directly; `MagMaxTrainer` and `MagMaxCallback` under Accelerate's
DeepSpeed ZeRO-3 are tested in tests/test_trainer_zero3.py.
"""

import json
import os
import socket
import subprocess
import sys

import pytest


pytest.importorskip("deepspeed")

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "zero3_merge_state.py")
METHODS = ("magmax", "random_mix", "average", "ties")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero3")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
         SCRIPT, "--output_dir", str(out)],
        check=True, env=env, timeout=600, capture_output=True,
    )  # fmt: skip
    return [json.loads((out / f"result_rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("method", METHODS)
def test_zero3_partitioned_merge_equals_one_process(results, method, dtype):
    assert [r["world_size"] for r in results] == [2, 2]
    for rank in results:
        result = rank[f"{method}-{dtype}"]
        assert result["sharded"] and result["trained"]
        assert result["equal_parts"], "a rank's merged partition differs from the one-process merge"
        assert result["equal_model"], "the merged weights written into the partitions differ"


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("method", METHODS)
def test_zero3_each_rank_holds_about_half_the_state(results, method, dtype):
    ranks = [r[f"{method}-{dtype}"] for r in results]
    one = ranks[0]["one_process_bytes"]["total"]
    for result in ranks:
        assert 0.4 <= result["rank_bytes"]["total"] / one <= 0.6, result
    assert sum(r["rank_bytes"]["total"] for r in ranks) == one  # the partitions hold the state once, no padding
    if method in ("magmax", "random_mix"):
        assert ranks[0]["one_process_bytes"]["merge"] == ranks[0]["params"] * (2 if dtype == "bf16" else 4)
