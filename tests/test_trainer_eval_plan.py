"""The evaluation plan: `eval_unseen_tasks=False` evaluates the tasks seen so far only (fewer evaluations, same metrics)."""

import pytest
from tiny_tasks import classification_task, tiny_bert, tiny_config

from hf_magmax import compute_continual_metrics, format_matrix
from hf_magmax.trainer import MagMaxCallback, MagMaxConfig, MagMaxTrainer
from hf_magmax.trainer import matrices as matrices_module


FULL = [
    [0.25, 0.10, 0.05],  # θ_0
    [0.90, 0.02, 0.01],  # after task 1 (tasks 2, 3 not trained yet)
    [0.60, 0.85, 0.03],  # after task 2
    [0.40, 0.70, 0.95],  # after task 3
]
SEEN = [[0.25, 0.10, 0.05], [0.90, None, None], [0.60, 0.85, None], [0.40, 0.70, 0.95]]


def test_seen_only_metrics_equal_the_full_matrix_ones_without_forward_transfer():
    full = compute_continual_metrics(FULL)
    seen = compute_continual_metrics(SEEN, seen_only=True)
    assert set(seen) == set(full) - {"forward_transfer"}
    for key, value in seen.items():
        assert value == pytest.approx(full[key]), key
    assert seen["forgetting"] == pytest.approx(((0.90 - 0.40) + (0.85 - 0.70)) / 2)
    table = format_matrix(SEEN, ["a", "b", "c"], seen_only=True)
    assert "| 1. a | 90.0 | – | – | 90.0 | – |" in table.splitlines()


@pytest.mark.parametrize(
    "matrix, seen_only",
    [
        (SEEN, False),  # missing cells without seen_only
        ([[0.25, 0.10, 0.05], [None, None, None], [0.60, 0.85, None], [0.40, 0.70, 0.95]], True),  # task 1 after 1
        ([[0.25, 0.10, 0.05], [0.90, None, None], [0.60, 0.85, None], [0.40, 0.70, None]], True),  # the last row
        ([[0.25, None, 0.05], [0.90, None, None], [0.60, 0.85, None], [0.40, 0.70, 0.95]], True),  # θ_0's row
    ],
)
def test_seen_only_still_rejects_the_cells_it_needs(matrix, seen_only):
    with pytest.raises(ValueError, match="NaN or infinite"):
        compute_continual_metrics(matrix, seen_only=seen_only)


def three_tasks():
    train = {
        "a": classification_task([0, 1], 16, seed=1, offset=0),
        "b": classification_task([2], 16, seed=2, offset=1000),
        "c": classification_task([3], 16, seed=3, offset=2000),
    }
    evaluation = {
        "a": classification_task([0, 1], 8, seed=11, offset=5000),
        "b": classification_task([2], 8, seed=12, offset=6000),
        "c": classification_task([3], 8, seed=13, offset=7000),
    }
    return train, evaluation


def run(tmp_path, monkeypatch, **options):
    calls = []
    score = matrices_module.score

    def counting_score(trainer, dataset, prefix, metric):
        calls.append(prefix)
        return score(trainer, dataset, prefix, metric)

    monkeypatch.setattr("hf_magmax.trainer.run.score", counting_score)
    train, evaluation = three_tasks()
    args = tiny_config(tmp_path / str(len(options)), save_strategy="no", **options)
    trainer = MagMaxTrainer(tiny_bert(), args, train_datasets=train, eval_datasets=evaluation)
    trainer.train()
    return trainer, calls


def test_trainer_evaluates_seen_tasks_only_and_keeps_the_metrics(tmp_path, monkeypatch):
    full, full_calls = run(tmp_path, monkeypatch)
    seen, seen_calls = run(tmp_path, monkeypatch, eval_unseen_tasks=False)
    # sequential and merged: T² = 9 evaluations each before, T(T+1)/2 = 6 now; θ_0's row (3) either way
    assert len(full_calls) == 9 + 9 + 3 and len(seen_calls) == 6 + 6 + 3
    a, b = full.continual_results, seen.continual_results
    for kind in ("sequential", "merged"):
        for t, (full_row, seen_row) in enumerate(zip(a[kind]["matrix"], b[kind]["matrix"])):
            for i, (x, y) in enumerate(zip(full_row, seen_row)):
                if 0 < t < 3 and i >= t:
                    assert y is None, (kind, t, i)
                else:
                    assert y == pytest.approx(x), (kind, t, i)
        assert set(a[kind]["metrics"]) - set(b[kind]["metrics"]) == {"forward_transfer"}
        assert b[kind]["metrics"]["final_average_accuracy"] == pytest.approx(
            a[kind]["metrics"]["final_average_accuracy"]
        )
        assert b[kind]["metrics"]["backward_transfer"] == pytest.approx(a[kind]["metrics"]["backward_transfer"])
    seen.create_model_card()
    card = (tmp_path / "1" / "README.md").read_text(encoding="utf-8")
    assert "| 1. a |" in card and " – |" in card  # the matrices, with the unseen cells as –


def test_eval_unseen_tasks_is_checked(tmp_path):
    with pytest.raises(ValueError, match="`eval_unseen_tasks` must be True or False"):
        MagMaxConfig(output_dir=str(tmp_path), report_to="none", eval_unseen_tasks="no")
    with pytest.raises(ValueError, match="`eval_unseen_tasks` must be True or False"):
        MagMaxCallback(eval_unseen_tasks=1, eval_datasets={"a": classification_task([0], 4)})
