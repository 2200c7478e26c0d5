# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""`evaluate` module: continual-learning metrics from an accuracy matrix (local copy, no Hub needed).

Load it with `evaluate.load("<path to this file or its folder>")` or `hf_magmax.metrics.load_continual_metric()`.
"""

import datasets
import evaluate

from hf_magmax.metrics import compute_continual_metrics


_CITATION = """\
@inproceedings{marczak2024magmax,
  title={MagMax: Leveraging Model Merging for Seamless Continual Learning},
  author={Marczak, Daniel and Twardowski, Bart{\\l}omiej and Trzci{\\'n}ski, Tomasz and Cygert, Sebastian},
  booktitle={ECCV},
  year={2024}
}
@inproceedings{chaudhry2018riemannian,
  title={Riemannian Walk for Incremental Learning: Understanding Forgetting and Intransigence},
  author={Chaudhry, Arslan and Dokania, Puneet K. and Ajanthan, Thalaiyasingam and Torr, Philip H. S.},
  booktitle={ECCV},
  year={2018}
}
"""

_DESCRIPTION = """\
Continual-learning metrics computed from an accuracy matrix R with T + 1 rows and T columns: row 0 holds the scores
of the base model θ_0 before any training, row t the scores after training on task t, column i the score on task i
(tasks 1-based in the formulas). Returns final average accuracy, average incremental accuracy, forgetting (Chaudhry
et al.: mean over j < T of max_{l=1..T-1} R[l][j] - R[T][j]), backward transfer (mean over j < T of R[T][j] - R[j][j],
denominator T - 1 as TRACE and Mammoth) and forward transfer (mean over i = 2..T of R[i-1][i] - R[0][i]).
The last three are 0.0 for a single task.
"""

_KWARGS_DESCRIPTION = """
Args:
    scores (`list` of `list` of `float`): the accuracy matrix, one row per example (row 0 = θ_0, then one row per
        trained task); add rows one at a time with `add(scores=row)` or all at once with `compute(scores=matrix)`.
Returns:
    final_average_accuracy (`float`), average_incremental_accuracy (`float`), forgetting (`float`),
    backward_transfer (`float`), forward_transfer (`float`), in the unit of the scores.
Examples:
    >>> metric = evaluate.load("path/to/continual_learning")
    >>> round(metric.compute(scores=[[0.1, 0.2], [0.9, 0.4], [0.7, 0.8]])["forgetting"], 4)
    0.2
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ContinualLearning(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"scores": datasets.Sequence(datasets.Value("float64"))}),
            reference_urls=["https://arxiv.org/abs/2407.06322"],
        )

    def _compute(self, scores):
        return compute_continual_metrics([list(row) for row in scores])
