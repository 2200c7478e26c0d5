import os
import sys

import numpy as np
import pytest
from transformers import EvalPrediction

from hf_magmax.metrics import (
    CONTINUAL_METRIC_NAMES,
    accuracy_compute_metrics,
    compute_continual_metrics,
    format_matrix,
    load_accuracy_metric,
    load_continual_metric,
    metric_module_path,
    plot_accuracy_matrix,
)


# T = 3 tasks. Row 0 = θ_0, row t = after task t, column i = task i.
# θ_0 is *better* than every later row on task 1 (0.99): forgetting must ignore row 0.
# Task 1 *improves* after task 2 (0.90 -> 0.95): forgetting (from the best) and BWT (from R[j][j]) then differ.
R3 = [
    [0.99, 0.20, 0.30],
    [0.90, 0.40, 0.25],
    [0.95, 0.85, 0.60],
    [0.60, 0.75, 0.95],
]
# Worked by hand:
#   final average accuracy       = (0.60 + 0.75 + 0.95) / 3                      = 0.766666...
#   average incremental accuracy = (0.90 + (0.95 + 0.85) / 2 + 2.30 / 3) / 3      = 0.855555...
#   forgetting = ((max(0.90, 0.95) - 0.60) + (max(0.40, 0.85) - 0.75)) / 2 = (0.35 + 0.10) / 2 = 0.225
#   BWT        = ((0.60 - 0.90) + (0.75 - 0.85)) / 2                  = (-0.30 - 0.10) / 2 = -0.20
#   FWT        = ((0.40 - 0.20) + (0.60 - 0.30)) / 2                  = (0.20 + 0.30) / 2  = 0.25
R3_EXPECTED = {
    "final_average_accuracy": 2.30 / 3,
    "average_incremental_accuracy": (0.90 + 0.90 + 2.30 / 3) / 3,
    "forgetting": 0.225,
    "backward_transfer": -0.20,
    "forward_transfer": 0.25,
}


def _assert_metrics(got, expected):
    assert list(got) == list(CONTINUAL_METRIC_NAMES)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
        assert isinstance(got[key], float)


def test_metrics_hand_computed_three_tasks():
    _assert_metrics(compute_continual_metrics(R3), R3_EXPECTED)
    _assert_metrics(compute_continual_metrics(np.array(R3)), R3_EXPECTED)


def test_metrics_keep_the_unit_of_the_scores():
    percent = compute_continual_metrics([[100 * v for v in row] for row in R3])
    _assert_metrics(percent, {k: 100 * v for k, v in R3_EXPECTED.items()})


def test_metrics_two_tasks_and_one_task():
    # T = 2: forgetting = 0.9 - 0.7, BWT = 0.7 - 0.9, FWT = 0.4 - 0.2, AIA = (0.9 + 0.75) / 2
    _assert_metrics(
        compute_continual_metrics([[0.1, 0.2], [0.9, 0.4], [0.7, 0.8]]),
        {
            "final_average_accuracy": 0.75,
            "average_incremental_accuracy": 0.825,
            "forgetting": 0.2,
            "backward_transfer": -0.2,
            "forward_transfer": 0.2,
        },
    )
    # T = 1: the three transfer metrics are defined as 0.0
    _assert_metrics(
        compute_continual_metrics([[0.2], [0.8]]),
        {
            "final_average_accuracy": 0.8,
            "average_incremental_accuracy": 0.8,
            "forgetting": 0.0,
            "backward_transfer": 0.0,
            "forward_transfer": 0.0,
        },
    )


def test_no_forgetting_when_nothing_drops():
    m = compute_continual_metrics([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    assert m["forgetting"] == 0.0 and m["backward_transfer"] == 0.0 and m["final_average_accuracy"] == 1.0


@pytest.mark.parametrize(
    "matrix, match",
    [
        ([[0.1, 0.2], [0.3, 0.4]], r"must be \(T \+ 1\) × T = \(3, 2\)"),
        ([0.1, 0.2], "must be 2-dimensional"),
        ([[0.1, 0.2], [0.3]], "rows of different lengths"),
        ([[0.1], [float("nan")]], "NaN"),
        (np.zeros((1, 0)), "no columns"),
    ],
)
def test_metrics_reject_bad_shapes(matrix, match):
    with pytest.raises(ValueError, match=match):
        compute_continual_metrics(matrix)


def test_format_matrix():
    table = format_matrix([[0.1, 0.2], [0.9, 0.4], [0.7, 0.8]], ["a", "b"])
    assert table.splitlines() == [
        "| after task | a | b | seen avg | all avg |",
        "|---|---:|---:|---:|---:|",
        "| θ_0 | 10.0 | 20.0 |  | 15.0 |",
        "| 1. a | 90.0 | 40.0 | 90.0 | 65.0 |",
        "| 2. b | 70.0 | 80.0 | 75.0 | 75.0 |",
    ]
    plain = format_matrix([[0.5], [1.0]], percent=False, digits=2, average_column=False)
    assert plain.splitlines()[-1] == "| 1. task_1 | 1.00 |"
    with pytest.raises(ValueError, match="`task_names` has 1 name"):
        format_matrix([[0.1, 0.2], [0.9, 0.4], [0.7, 0.8]], ["a"])


def test_evaluate_module_from_local_path():
    import evaluate

    path = metric_module_path("continual_learning")
    assert os.path.isfile(path)
    for where in (path, os.path.dirname(path)):
        metric = evaluate.load(where)
        _assert_metrics(metric.compute(scores=R3), R3_EXPECTED)
    # one row at a time, as a training loop would add them
    metric = load_continual_metric()
    for row in R3:
        metric.add(scores=row)
    _assert_metrics(metric.compute(), R3_EXPECTED)


def test_local_accuracy_module_and_trainer_compute_metrics():
    metric = load_accuracy_metric()
    assert metric.compute(predictions=[0, 1, 1, 2], references=[0, 1, 0, 2]) == {"accuracy": 0.75}
    logits = np.array([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    labels = np.array([0, 1, 0, -100])  # the -100 row is ignored
    assert accuracy_compute_metrics((logits, labels)) == {"accuracy": pytest.approx(2 / 3)}
    assert accuracy_compute_metrics(EvalPrediction(predictions=(logits, np.zeros((4, 5))), label_ids=labels)) == {
        "accuracy": pytest.approx(2 / 3)
    }
    assert accuracy_compute_metrics((np.array([0, 1, 1]), np.array([0, 1, 0]))) == {"accuracy": pytest.approx(2 / 3)}
    with pytest.raises(ValueError, match="3 predictions but 2 labels"):
        accuracy_compute_metrics((np.array([0, 1, 1]), np.array([0, 1])))
    with pytest.raises(FileNotFoundError, match="available: accuracy, continual_learning"):
        metric_module_path("bleu")


def test_heatmap_written(tmp_path):
    path = tmp_path / "plots" / "matrix.png"
    plot_accuracy_matrix(R3, ["a", "b", "c"], path, title="test")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 5000


def test_heatmap_without_matplotlib_names_the_extra(monkeypatch, tmp_path):
    for module in ("matplotlib", "matplotlib.figure"):  # simulates matplotlib not installed
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError, match=r'pip install "hf_magmax\[plot\]"'):
        plot_accuracy_matrix(R3, None, tmp_path / "x.png")
