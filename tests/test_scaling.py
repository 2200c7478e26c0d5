import math

import pytest
import torch
from datasets import Dataset

from hf_magmax.scaling import (
    DEFAULT_SCALING_COEF_GRID,
    ScalingCoefApplier,
    ScalingCoefSearch,
    check_scaling_coef_grid,
    check_validation_fraction,
    plot_scaling_curve,
    search_scaling_coef,
    select_scaling_coef_for_checkpoints,
    split_validation,
)


def test_default_grid_is_exact_decimals():
    assert DEFAULT_SCALING_COEF_GRID == (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


# -- the search -------------------------------------------------------------------------------------------------------


def _linear_problem():
    """θ_0 = 0, τ = 1 on one weight; data y = 0.7·x, so the score peaks at λ = 0.7 by construction."""
    model = torch.nn.Linear(1, 1, bias=False)
    model.weight.data.zero_()
    x = torch.linspace(-1, 1, 21).unsqueeze(1)
    y = 0.7 * x

    def score() -> float:
        with torch.no_grad():
            return -float(((model(x) - y) ** 2).mean())

    return model, {"weight": torch.ones(1, 1)}, score


def test_search_picks_argmax_of_hand_computed_curve():
    model, tau, score = _linear_problem()
    result = search_scaling_coef(ScalingCoefApplier(model, tau), score)
    # hand-computed: mean(x²) over linspace(-1, 1, 21) = 0.37, score(λ) = -(λ - 0.7)² · 0.37
    mean_x2 = float((torch.linspace(-1, 1, 21) ** 2).mean())
    expected = {c: -((c - 0.7) ** 2) * mean_x2 for c in DEFAULT_SCALING_COEF_GRID}
    assert list(result.curve) == list(DEFAULT_SCALING_COEF_GRID)
    for coef, value in expected.items():
        assert result.curve[coef] == pytest.approx(value, abs=1e-6)
    assert result.best == max(expected, key=expected.get) == 0.7
    assert result.best_score == pytest.approx(0.0, abs=1e-6)
    # apply_best leaves the model at the chosen λ
    assert model.weight.item() == pytest.approx(0.7, abs=1e-6)


def test_search_arbitrary_curve_and_ties_go_to_smaller_coef():
    scores = {0.9: 3.0, 0.3: 5.0, 0.6: 5.0, 1.2: 1.0}
    state = {}
    result = search_scaling_coef(lambda c: state.update(c=c), lambda: scores[state["c"]], grid=list(scores))
    assert list(result.curve) == [0.9, 0.3, 0.6, 1.2]  # grid order kept
    assert result.best == 0.3 and result.best_score == 5.0
    assert state["c"] == 0.3
    # a loss: lower is better
    result = search_scaling_coef(
        lambda c: state.update(c=c), lambda: scores[state["c"]], grid=list(scores), greater_is_better=False
    )
    assert result.best == 1.2


def test_search_accepts_tensor_and_numpy_scores():
    import numpy as np

    state = {}
    result = search_scaling_coef(lambda c: state.update(c=c), lambda: torch.tensor(state["c"]), grid=[0.2, 0.4])
    assert result.best == 0.4
    result = search_scaling_coef(lambda c: state.update(c=c), lambda: np.float32(-state["c"]), grid=[0.2, 0.4])
    assert result.best == 0.2


def test_search_result_round_trips_through_dict():
    result = ScalingCoefSearch(best=0.5, best_score=0.9, curve={0.5: 0.9, 1.0: 0.8})
    data = result.to_dict()
    assert data["curve"] == [[0.5, 0.9], [1.0, 0.8]]
    assert ScalingCoefSearch.from_dict(data) == result


@pytest.mark.parametrize("bad", ["0.5", None, [0.5, "x"], {"a": 1}])
def test_score_fn_returning_non_number_is_a_type_error(bad):
    with pytest.raises(TypeError, match="score_fn"):
        search_scaling_coef(lambda c: None, lambda: bad, grid=[0.5])


def test_score_fn_returning_nan_is_a_value_error():
    with pytest.raises(ValueError, match="score_fn.*NaN"):
        search_scaling_coef(lambda c: None, lambda: math.nan, grid=[0.5])


@pytest.mark.parametrize(
    "grid, error",
    [([], ValueError), ([0.5, 0.0], ValueError), ([-0.1], ValueError), ([math.inf], ValueError), (["a"], TypeError)],
)
def test_bad_grid(grid, error):
    with pytest.raises(error, match="scaling_coef_grid"):
        check_scaling_coef_grid(grid)
    with pytest.raises(error, match="scaling_coef_grid"):
        search_scaling_coef(lambda c: None, lambda: 1.0, grid=grid)


def test_grid_is_normalised():
    assert check_scaling_coef_grid([1, 0.5, 0.5]) == (1.0, 0.5)


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5, "0.1", None, True])
def test_bad_validation_fraction(fraction):
    with pytest.raises(ValueError, match="validation_fraction"):
        check_validation_fraction(fraction)


# -- in-place re-application ------------------------------------------------------------------------------------------


def test_applier_matches_fresh_application_and_handles_tied_weights():
    from transformers import BertConfig, BertForMaskedLM

    from hf_magmax import StateDictMerger, TaskVector

    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    base = BertForMaskedLM(config).eval()
    theta0 = {k: v.clone() for k, v in base.state_dict().items()}
    merger = StateDictMerger("magmax")
    for seed in (1, 2):
        torch.manual_seed(seed)
        finetuned = BertForMaskedLM(config)
        merger.update(TaskVector.from_models(base, finetuned))
    merged = merger.result()
    applier = ScalingCoefApplier(base, merged)
    for coef in (0.3, 0.9, 0.5):
        applier(coef)
        expected = TaskVector(merged).apply_to(theta0, scaling_coef=coef)
        for name, tensor in base.state_dict().items():
            torch.testing.assert_close(tensor, expected[name], atol=1e-6, rtol=1e-5)
    # tied embeddings are updated once, not twice
    assert base.cls.predictions.decoder.weight.data_ptr() == base.bert.embeddings.word_embeddings.weight.data_ptr()


def test_applier_rejects_unknown_tensor():
    with pytest.raises(KeyError, match="not a parameter"):
        ScalingCoefApplier(torch.nn.Linear(1, 1), {"nope": torch.zeros(1)})


# -- merges of saved checkpoints --------------------------------------------------------------------------------------


def test_select_scaling_coef_for_checkpoints(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    from hf_magmax import TaskVector, merge_task_vectors

    config = BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, num_labels=2
    )
    base = BertForSequenceClassification(config).eval()
    base.save_pretrained(tmp_path / "base")
    paths, tvs = [], []
    for seed in (1, 2):
        torch.manual_seed(seed)
        finetuned = BertForSequenceClassification(config)
        finetuned.save_pretrained(tmp_path / f"ft{seed}")
        paths.append(tmp_path / f"ft{seed}")
        tvs.append(TaskVector.from_models(base, finetuned))
    merged = merge_task_vectors(tvs, "magmax", scaling_coef=1.0)
    theta0 = base.state_dict()
    # score: minus the distance of the classifier weight to θ_0 + 0.4·τ, so the argmax is λ = 0.4
    target = TaskVector(merged).apply_to(theta0, 0.4)["classifier.weight"]
    seen = []

    def score_fn(model):
        seen.append(type(model).__name__)
        return -float((model.classifier.weight - target).abs().sum())

    result = select_scaling_coef_for_checkpoints(tmp_path / "base", paths, score_fn, method="magmax")
    assert seen[0] == "BertForSequenceClassification" and len(seen) == 10
    assert result.best == 0.4
    assert max(result.curve, key=result.curve.get) == 0.4

    with pytest.raises(TypeError, match="score_fn"):
        select_scaling_coef_for_checkpoints(tmp_path / "base", paths, "not callable")


@pytest.mark.parametrize("method", ["random_mix", "ties"])
def test_select_scaling_coef_scores_the_merge_that_is_written(tmp_path, method):
    """At every λ of the grid the scored model is the engine's merge bit for bit (random_mix draws included)."""
    from transformers import BertConfig, BertForSequenceClassification

    from hf_magmax import TaskVector, merge_task_vectors
    from hf_magmax.merging import MergeSpec

    config = BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, num_labels=2
    )
    torch.manual_seed(0)
    base = BertForSequenceClassification(config).eval()
    base.save_pretrained(tmp_path / "base")
    paths, tvs = [], []
    for seed in (1, 2):
        torch.manual_seed(seed)
        finetuned = BertForSequenceClassification(config)
        finetuned.save_pretrained(tmp_path / f"ft{seed}")
        paths.append(tmp_path / f"ft{seed}")
        tvs.append(TaskVector.from_models(base, finetuned))
    spec = MergeSpec("random_mix", seed=5) if method == "random_mix" else MergeSpec("ties", density=0.4)
    theta0 = base.state_dict()
    grid = [0.3, 0.7]
    scored = []

    def score_fn(model):
        scored.append({k: v.clone() for k, v in model.state_dict().items()})
        return 0.0

    select_scaling_coef_for_checkpoints(tmp_path / "base", paths, score_fn, method=spec, grid=grid)
    assert len(scored) == len(grid)
    for coef, weights in zip(grid, scored):
        expected = merge_task_vectors(tvs, spec.with_scaling_coef(coef)).apply_to(theta0)
        for name, value in expected.items():
            assert torch.equal(weights[name], value), (coef, name)


# -- validation split -------------------------------------------------------------------------------------------------


def test_split_validation_is_disjoint_deterministic_and_stratified():
    ds = Dataset.from_dict({"idx": list(range(100)), "label": [i % 3 for i in range(100)]})
    train, validation = split_validation(ds, 0.2, seed=7)
    assert len(train) + len(validation) == 100
    assert set(train["idx"]).isdisjoint(validation["idx"])
    assert set(train["idx"]) | set(validation["idx"]) == set(range(100))
    # stratified: each class keeps round(0.2 · n_class) for validation
    counts = {c: validation["label"].count(c) for c in range(3)}
    assert counts == {0: 7, 1: 7, 2: 7}
    again = split_validation(ds, 0.2, seed=7)[1]
    assert again["idx"] == validation["idx"]
    other = split_validation(ds, 0.2, seed=8)[1]
    assert other["idx"] != validation["idx"]
    # unstratified draw
    _, plain = split_validation(ds, 0.25, label_column=None)
    assert len(plain) == 25


def test_split_validation_bad_input():
    ds = Dataset.from_dict({"x": [1, 2, 3, 4]})
    with pytest.raises(ValueError, match="validation_fraction"):
        split_validation(ds, 1.0)
    with pytest.raises(KeyError, match="label_column"):
        split_validation(ds, 0.5, label_column="label")
    with pytest.raises(ValueError, match="validation"):
        split_validation(Dataset.from_dict({"x": [1]}), 0.5)


def test_plot_scaling_curve(tmp_path):
    result = ScalingCoefSearch(best=0.5, best_score=0.9, curve={0.25: 0.7, 0.5: 0.9, 1.0: 0.8})
    path = plot_scaling_curve(result, tmp_path / "curve.png", extra_curves={"test": {0.25: 0.6, 0.5: 0.8}})
    assert (tmp_path / "curve.png").stat().st_size > 1000
    assert path.endswith("curve.png")


def test_merge_checkpoints_auto_scaling_coef(tmp_path):
    import json

    import yaml
    from safetensors.torch import load_file
    from transformers import BertConfig, BertForSequenceClassification

    from hf_magmax import TaskVector, merge_task_vectors
    from hf_magmax.checkpoints import merge_checkpoints

    config = BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, num_labels=2
    )
    base = BertForSequenceClassification(config).eval()
    base.save_pretrained(tmp_path / "base")
    paths, tvs = [], []
    for seed in (1, 2):
        torch.manual_seed(seed)
        finetuned = BertForSequenceClassification(config)
        finetuned.save_pretrained(tmp_path / f"ft{seed}")
        paths.append(str(tmp_path / f"ft{seed}"))
        tvs.append(TaskVector.from_models(base, finetuned))
    merged = merge_task_vectors(tvs, "magmax", scaling_coef=1.0)
    theta0 = base.state_dict()
    target = TaskVector(merged).apply_to(theta0, 0.6)["classifier.weight"]

    def score_fn(model):
        return -float((model.classifier.weight - target).abs().sum())

    out = merge_checkpoints(
        tmp_path / "base", paths, tmp_path / "merged", scaling_coef="auto", score_fn=score_fn, show_progress=False
    )
    weights = load_file(out / "model.safetensors")
    expected = TaskVector(merged).apply_to(theta0, 0.6)
    torch.testing.assert_close(weights["classifier.weight"], expected["classifier.weight"])
    assert yaml.safe_load((out / "magmax_config.yaml").read_text())["scaling_coef"] == 0.6
    search = json.loads((out / "scaling_coef_search.json").read_text())
    assert search["best"] == 0.6 and len(search["curve"]) == 10
    card = (out / "README.md").read_text()
    assert "Scaling coefficient chosen on validation data" in card and "| **0.6** |" in card

    with pytest.raises(ValueError, match="score_fn"):
        merge_checkpoints(tmp_path / "base", paths, tmp_path / "merged2", scaling_coef="auto")
    with pytest.raises(ValueError, match="scaling_coef_grid"):
        merge_checkpoints(
            tmp_path / "base", paths, tmp_path / "m3", scaling_coef="auto", score_fn=score_fn, scaling_coef_grid=[0]
        )
