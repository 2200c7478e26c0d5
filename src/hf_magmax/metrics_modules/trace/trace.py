# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""`evaluate` module: TRACE's per-task metrics (exact match, ScienceQA answer letter, ROUGE-L, edit similarity, SARI).

The config name is the TRACE task (`"C-STANCE"`, `"FOMC"`, `"MeetingBank"`, `"Py150"`, `"ScienceQA"`, `"NumGLUE-cm"`,
`"NumGLUE-ds"`, `"20Minuten"`) or a metric name (`"exact_match"`, `"first_char_match"`, `"rouge_l"`,
`"edit_similarity"`, `"sari"`). Runs offline: load it by path, e.g.
`evaluate.load(hf_magmax.metrics.metric_module_path("trace"), "Py150")`.
"""

import datasets
import evaluate

from hf_magmax.trace import TRACE_TASK_METRICS, score_trace_task


_DESCRIPTION = """\
TRACE (Wang et al., 2023) scores each of its eight continual-learning tasks with its own metric: exact match for
C-STANCE, FOMC, NumGLUE-cm and NumGLUE-ds; the answer letter for ScienceQA; ROUGE-L F1 for MeetingBank; edit
similarity (fuzzy ratio) for Py150; SARI for 20Minuten. Every score is in [0, 100].
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): generated answers.
    references (`list` of `str`): reference answers.
    sources (`list` of `str`): the prompts; only for SARI (config `20Minuten` or `sari`).
Returns:
    score (`float`): the task's score in [0, 100], under the key `score` and under the metric's own name.
Examples:
    >>> metric = evaluate.load("path/to/trace", "FOMC")
    >>> metric.compute(predictions=["A", "B"], references=["A", "C"])
    {'score': 50.0, 'exact_match': 50.0}
"""

_CITATION = """\
@article{wang2023trace,
  title={TRACE: A Comprehensive Benchmark for Continual Learning in Large Language Models},
  author={Wang, Xiao and Zhang, Yuansen and Chen, Tianze and Gao, Songyang and Jin, Senjie and Yang, Xianjun and
          Xi, Zhiheng and Zheng, Rui and Zou, Yicheng and Gui, Tao and Zhang, Qi and Huang, Xuanjing},
  journal={arXiv preprint arXiv:2310.06762},
  year={2023}
}
"""

_METRICS = ("exact_match", "first_char_match", "rouge_l", "edit_similarity", "sari")


def _metric_of(config_name):
    if config_name in TRACE_TASK_METRICS:
        return TRACE_TASK_METRICS[config_name]
    if config_name in _METRICS:
        return config_name
    raise ValueError(
        f"unknown config {config_name!r} for the trace module: use a TRACE task ({', '.join(TRACE_TASK_METRICS)}) "
        f"or a metric ({', '.join(_METRICS)})."
    )


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Trace(evaluate.Metric):
    def _info(self):
        metric = _metric_of(self.config_name)
        features = {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
        if metric == "sari":
            features = {"sources": datasets.Value("string"), **features}
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(features),
        )

    def _compute(self, predictions, references, sources=None):
        metric = _metric_of(self.config_name)
        score = score_trace_task(self.config_name, predictions, references, sources=sources, metric=metric)
        return {"score": score, metric: score}
