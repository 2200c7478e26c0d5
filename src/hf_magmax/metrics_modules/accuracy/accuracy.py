# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""`evaluate` module: classification accuracy (a local copy, since `evaluate.load("accuracy")` needs the Hub).

Load it with `evaluate.load("<path to this file or its folder>")` or `hf_magmax.metrics.load_accuracy_metric()`.
"""

import datasets
import evaluate
import numpy as np


_DESCRIPTION = """\
Accuracy is the proportion of correct predictions among the examples: (TP + TN) / (TP + TN + FP + FN).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted labels.
    references (`list` of `int`): ground-truth labels.
    normalize (`bool`, defaults to `True`): return the fraction of correct predictions; `False` returns their count.
    sample_weight (`list` of `float`, *optional*): per-example weights.
Returns:
    accuracy (`float`): in [0, 1] when `normalize=True`.
Examples:
    >>> metric = evaluate.load("path/to/accuracy")
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'accuracy': 0.6666666666666666}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        predictions = np.asarray(predictions)
        references = np.asarray(references)
        correct = (predictions == references).astype(np.float64)
        if sample_weight is not None:
            weights = np.asarray(sample_weight, dtype=np.float64)
            total = float((correct * weights).sum())
            return {"accuracy": total / float(weights.sum()) if normalize else total}
        return {"accuracy": float(correct.mean()) if normalize else float(correct.sum())}
