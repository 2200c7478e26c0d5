"""The merge state on FSDP2 shards: two CPU processes (torchrun, gloo, `fully_shard`) against one process.

Each rank holds only the local shards of θ_0 and the running merge (DTensor `to_local()`), folds them and writes the
merged shard back, with no gather; random_mix draws by the shard's global flat offset. The merged weights equal the
one-process merge bit for bit, and each rank holds about half of the one-process state.

TIES on shards: each rank's histograms of |τ| are all-reduced, which gives the whole task vector's trim threshold
(checked here also on parts in threads, against the one-process threshold, for edge cases).

Where the line is: this tests `MergeState` on `fully_shard`-ed modules directly. `MagMaxTrainer` under Accelerate's
FSDP still gathers the full state dict for its merge state (tested under DDP in test_trainer_ddp.py).
"""

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import threading

import pytest
import torch

from hf_magmax.merging import ties_trim_threshold


SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "fsdp_merge_state.py")
METHODS = ("magmax", "random_mix", "average", "task_arithmetic", "ties")


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
        if method == "ties":
            assert result["thresholds_equal"], "a trim threshold from the shards differs from the whole tensor's"


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


def test_fsdp_opcm_and_provenance_are_refused_on_shards_with_the_reason(results):
    for rank in results:
        errors = rank["errors"]
        assert errors["opcm"] and "'opcm' is not supported on sharded" in errors["opcm"]
        assert errors["provenance"] and "`save_provenance` is not supported on sharded" in errors["provenance"]


def test_fsdp_base_taken_from_meta_weights_comes_from_the_main_process_file(results):
    # rank 1 took θ_0 from meta weights (FSDP's cpu_ram_efficient_loading); rank 0's base file replaces them
    assert [r["meta_base_equal"] for r in results] == [True, True]
    assert "taken from meta weights on this rank" in results[1]["errors"]["meta_unmapped"]


def _split_thresholds(parts, density):
    """`ties_trim_threshold` of each part, in one thread per part, with `reduce` summing the parts' histograms (what
    an all-reduce over the ranks does)."""
    slots, results = [None] * len(parts), [None] * len(parts)
    barrier = threading.Barrier(len(parts))

    def worker(i):
        def reduce(counts):
            slots[i] = counts.clone()
            barrier.wait()
            total = sum(slots[1:], slots[0].clone())
            barrier.wait()  # nobody overwrites a slot before every part has read them all
            return total

        results[i] = ties_trim_threshold(parts[i], density, reduce=reduce)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(parts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results


def _same(a, b):
    return (a is None and b is None) or (math.isnan(a) and math.isnan(b)) or a == b


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("density", [0.01, 0.2, 0.5, 0.999, 1.0])
@pytest.mark.parametrize(
    "case", ["small", "large", "empty_part", "ties_and_zeros", "inf_nan", "one_element", "nothing_kept"]
)
def test_fsdp_ties_threshold_from_split_histograms_equals_the_whole(case, density, dtype):
    generator = torch.Generator().manual_seed(7)
    whole = torch.randn(40000 if case == "large" else 3000, generator=generator).to(dtype)
    if case == "ties_and_zeros":
        whole = whole.round()  # many equal magnitudes and ±0.0
    if case == "inf_nan":
        whole[::97], whole[1::89], whole[2::101] = float("inf"), float("-inf"), float("nan")
    if case == "one_element":
        whole = whole[:1]
    if case == "nothing_kept":
        whole = whole[:50]  # k = int(density * 50) is 0 for density 0.01
    cuts = [0, 1, len(whole)] if case == "empty_part" else [0, len(whole) // 3, len(whole)]
    parts = [whole[a:b] for a, b in zip(cuts, cuts[1:])] + ([whole[:0]] if case == "empty_part" else [])
    expected = ties_trim_threshold(whole, density)
    results = _split_thresholds(parts, density)
    assert all(_same(r, expected) for r in results), (results, expected)
