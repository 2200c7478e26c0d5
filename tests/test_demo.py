import json

import pytest

from hf_magmax.cli import main
from hf_magmax.metrics import compute_continual_metrics


@pytest.mark.slow
def test_demo_cli_quick_run_writes_results(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--num-tasks", "2", "--output-dir", str(out)]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "Accuracy matrix, MagMax" in printed and "Comparison" in printed
    # one progress bar over the stages: θ_0's pretraining, each task, each baseline merge (closed at 6/6)
    assert "task 2/2 (digits 5-9)" in captured.err and "6/6" in captured.err

    results = json.loads((out / "demo_results.json").read_text())
    assert results["task_names"] == ["digits 0-4", "digits 5-9"]
    assert results["task_classes"] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    methods = ["sequential fine-tuning", "average", "TIES", "OPCM", "MagMax"]
    assert list(results["matrices"]) == methods
    assert list(results["metrics"]) == ["θ_0 (no training)", *methods]
    for method in methods:
        matrix = results["matrices"][method]
        assert len(matrix) == 3 and all(len(row) == 2 for row in matrix)
        assert all(0.0 <= v <= 1.0 for row in matrix for v in row)
        assert matrix[0] == results["matrices"]["sequential fine-tuning"][0]  # same θ_0 row
        assert results["metrics"][method] == pytest.approx(compute_continual_metrics(matrix))
    assert results["scaling_coefs"]["MagMax"] == 0.5

    # the trainer's json holds the same matrices; its final weights are the engine's merge of the kept weights
    trainer_results = json.loads((out / "continual_results.json").read_text())
    assert trainer_results["method"] == "magmax" and trainer_results["scaling_coef"] == 0.5
    assert trainer_results["sequential"]["matrix"] == results["matrices"]["sequential fine-tuning"]
    assert trainer_results["merged"]["matrix"] == results["matrices"]["MagMax"]
    assert results["engine_max_abs_diff"] < 1e-6

    assert (out / "comparison.md").read_text().startswith("| method | λ | final avg acc |")
    for name in ("accuracy_matrix_sequential.png", "accuracy_matrix_magmax.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


def test_demo_rejects_a_task_count_that_does_not_divide_the_classes(tmp_path, capsys):
    assert main(["demo", "--num-tasks", "3", "--output-dir", str(tmp_path)]) == 2
    assert "`--num-tasks=3` must divide the 10 digit classes" in capsys.readouterr().err


def test_demo_cli_runs_on_its_own_threads_and_passes_no_progress(monkeypatch, capsys):
    import gc

    import torch

    import hf_magmax.demo

    seen = {}

    def fake_run_demo(**kwargs):
        seen.update(kwargs, threads=torch.get_num_threads(), frozen=gc.get_freeze_count())
        return {"matrix_tables": {"sequential fine-tuning": "S", "MagMax": "M"}, "comparison": "C", "files": {}}

    monkeypatch.setattr(hf_magmax.demo, "run_demo", fake_run_demo)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # inherited: no longer makes the demo run on 2 busy threads
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert main(["demo", "--no-progress", "--output-dir", "unused"]) == 0
        assert seen["threads"] == 1 and seen["show_progress"] is False and seen["frozen"] > 0
        assert torch.get_num_threads() == 2 and gc.get_freeze_count() == 0  # restored afterwards
        assert main(["demo", "--num-threads", "2", "--quick", "--output-dir", "unused"]) == 0
        assert seen["threads"] == 2 and seen["show_progress"] is True and seen["max_train_examples"] == 300
    finally:
        torch.set_num_threads(before)
    assert "Comparison (%, test set of every task):\nC" in capsys.readouterr().out
    assert main(["demo", "--num-threads", "0"]) == 2
    assert "`--num-threads=0` must be a positive integer" in capsys.readouterr().err


def test_every_subcommand_takes_no_progress():
    from hf_magmax.cli import SUBCOMMANDS, build_parser

    parser = build_parser()
    positional = {"push": ["out", "--to-hub", "me/x"], "verify": ["out"], "mergekit-yaml": ["cfg.yml", "out"]}
    for name in SUBCOMMANDS:  # one vocabulary: every subcommand hides its bars with --no-progress
        args = parser.parse_args([name, "--no-progress", *positional.get(name, [])])
        assert args.no_progress is True, name
