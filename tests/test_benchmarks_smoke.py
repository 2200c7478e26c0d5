"""Smoke tests of the benchmark scripts: `benchmarks/long_sequences.py` runs end to end with tiny settings.

The run is a subprocess (the script fixes torch's thread count and glibc's mmap threshold for its memory numbers:
process-wide settings the test session must not inherit). Its helpers are checked in-process.
"""

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch


ROOT = Path(__file__).resolve().parent.parent
LONG_SEQUENCES = ROOT / "benchmarks" / "long_sequences.py"

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def long_sequences():
    return runpy.run_path(str(LONG_SEQUENCES), run_name="long_sequences")


def test_long_sequences_quick_run_writes_its_results(tmp_path):
    pytest.importorskip("matplotlib")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run(
        [sys.executable, str(LONG_SEQUENCES), "--quick", "--output-dir", str(tmp_path), "--name", "smoke"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert {p.name for p in tmp_path.iterdir()} == {"smoke.json", "smoke.md", "smoke.png"}
    results = json.loads((tmp_path / "smoke.json").read_text(encoding="utf-8"))
    assert results["tasks"] == [2, 3] and results["seeds"] == [0]
    assert set(results["sequences"]) == {"64", "16", "16-independent"}
    for key, sequence in results["sequences"].items():
        labels = set(sequence["summary"])
        last = "θ_T, the last expert" if key.endswith("independent") else "sequential fine-tuning"
        assert {"θ_0 (no training)", last, "MagMax (λ=0.5)", "MagMax (λ on val)"} <= labels
        assert "average (λ=1)" in labels
        assert ("OPCM (λ=1)" in labels) == ("opcm" in results["methods"])
        for label, by_t in sequence["summary"].items():
            for num_tasks in ("2", "3"):
                assert 0.0 <= by_t[num_tasks]["mean"] <= 1.0, label
            per_task = sequence["per_seed"]["0"]["3"][label]["per_task"]  # kept for the longest sequence
            assert len(per_task) == 3, label
            assert by_t["3"]["mean"] == pytest.approx(sum(per_task) / len(per_task), abs=1e-4)
    # the online engine (StateDictMerger) and merge_task_vectors give the same merged weights
    assert results["engine_max_abs_diff"] == 0.0
    for method in results["methods"]:
        for num_tasks in ("2", "3"):
            cost = results["merge_cost"][method][num_tasks]
            assert cost["seconds"] > 0 and cost["state_mib"] > 0
    assert results["merge_cost"]["magmax"]["2"]["state_mib"] == results["merge_cost"]["magmax"]["3"]["state_mib"]
    table = (tmp_path / "smoke.md").read_text(encoding="utf-8")
    assert "| MagMax (λ=0.5) |" in table and "| MagMax state (MiB) |" in table
    assert "python benchmarks/long_sequences.py --quick" in table


def test_long_sequences_task_accuracies_equal_a_per_task_loop(long_sequences):
    model = torch.nn.Linear(64, 10)  # predictions that move with the pixel order
    x = torch.randn(7, 64)
    perms = long_sequences["task_permutations"](1, 40)  # more tasks than one forward pass takes (32)
    with torch.no_grad():
        y = model(x[:, perms[0]]).argmax(-1)  # task 1 is answered perfectly, the others are not
        expected = [float((model(x[:, p]).argmax(-1) == y).float().mean()) for p in perms]
    assert expected[0] == 1.0 and min(expected) < 0.5
    assert long_sequences["task_accuracies"](model, x, y, perms) == pytest.approx(expected, abs=1e-6)


def test_long_sequences_shorter_sequences_are_prefixes(long_sequences):
    perms = long_sequences["task_permutations"]
    short, long = perms(3, 5), perms(3, 50)
    assert all(torch.equal(a, b) for a, b in zip(short, long[:5]))
    assert all(sorted(p.tolist()) == list(range(64)) for p in long)
    assert len({tuple(p.tolist()) for p in long}) == 50


def test_opcm_merge_quick_run_reports_opcm_beside_ties_and_its_svd_floor(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    env["OMP_NUM_THREADS"] = "1"
    output = tmp_path / "opcm.md"
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "opcm_merge.py"), "--num-tasks", "2", "--size", "tiny",
         "--work-dir", str(tmp_path / "work"), "--output", str(output)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    report = output.read_text(encoding="utf-8")
    for row in (
        "| hf_magmax ties | ties |",
        "| hf_magmax opcm | opcm |",
        "| SVDs of one OPCM merge alone",
        "FusionBench",
    ):
        assert row in report, row
    assert "- OPCM within 3x of TIES: " in report and "SVDs alone take" in report
    assert "15 SVDs for T=2" in report  # the tiny Llama: 2 layers x 7 linear weights + lm_head, one task projected
