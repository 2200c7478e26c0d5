# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""A continual-learning demo on bundled data: class-incremental digits, sequential fine-tuning vs merges.

`hf-magmax demo` (or [`run_demo`]) runs, offline and in well under a minute on one CPU core (the measured wall
times are in `benchmarks/results/demo_timing.json`):

1. **θ_0.** scikit-learn's `load_digits` (1,797 8×8 images, 10 classes) is shuffled and split into a *pretraining*
   slice (200 images of all classes), a continual-learning training set and a test set. A tiny ViT
   (`ViTConfig`: 8×8 images, 2×2 patches, 2 layers, width 48) is pretrained on the slice. It stands in for a
   pretrained model such as CLIP in the MagMax paper: a decent but imperfect model whose classification head already
   covers every class (CLIP's zero-shot text head).
2. **The task sequence.** The training set is split class-incrementally into 5 tasks of 2 classes (0–1, 2–3, …,
   8–9) with [`~hf_magmax.continual.class_incremental_split`]; the test set is split the same way.
3. **Continual fine-tuning with [`~hf_magmax.MagMaxTrainer`]**, as in the paper: the head is frozen
   (`frozen_modules=["classifier"]`) and the loss is restricted to the current task's classes
   (`restrict_loss_to_task_classes=True`); each task starts from the previous task's weights. The trainer folds every
   task vector into a running MagMax merge and fills the accuracy matrices of the sequential and the merged model.
4. **Baselines from the same run.** The weights after every task are kept, so the average, TIES and OPCM merges of
   the same task vectors are computed with the merge engine ([`~hf_magmax.merge_task_vectors`]) and evaluated the
   same way, without training again (OPCM, a continual merge, after task t merges the first t task vectors).

It prints the accuracy matrices and a comparison table (final average accuracy, average incremental accuracy,
forgetting, backward transfer) and writes `demo_results.json`, `comparison.md`, the trainer's
`continual_results.json` and heatmaps of the sequential and MagMax matrices to the output directory.

Without a pretrained θ_0 and a frozen head (a randomly initialised tiny ViT with a trained head) every method ends near
chance on class-incremental digits: a head trained on one task at a time only predicts that task's classes, and the
merge keeps the last tasks' head rows. The demo uses the paper's setup instead, and reports whatever comes out.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Sequence
from typing import Any


logger = logging.getLogger(__name__)

__all__ = ["DEMO_METHODS", "check_demo_arguments", "format_comparison", "run_demo"]

#: Methods compared by the demo, in table order: (label, merge method or None, scaling_coef).
DEMO_METHODS: tuple[tuple[str, str | None, float | None], ...] = (
    ("sequential fine-tuning", None, None),
    ("average", "average", 1.0),
    ("TIES", "ties", 1.0),
    ("OPCM", "opcm", 1.0),
    ("MagMax", "magmax", 0.5),
)

_TABLE_METRICS = (
    ("final_average_accuracy", "final avg acc"),
    ("average_incremental_accuracy", "avg incremental acc"),
    ("forgetting", "forgetting"),
    ("backward_transfer", "BWT"),
)


def _load_digits():
    """scikit-learn's bundled digits as (images (1797, 64), labels): `load_digits(return_X_y=True)`.

    The CSV file scikit-learn ships is read directly when it is where scikit-learn keeps it: importing scikit-learn
    costs more than the rest of a `--quick` demo's data preparation.
    """
    import importlib.util

    import numpy as np

    spec = importlib.util.find_spec("sklearn")
    if spec is None:
        raise ImportError('the demo needs scikit-learn for its bundled data: `pip install "hf_magmax[demo]"`.')
    path = os.path.join(os.path.dirname(spec.origin or ""), "datasets", "data", "digits.csv.gz")
    if os.path.isfile(path):
        data = np.loadtxt(path, delimiter=",")
        return data[:, :-1], data[:, -1].astype(int)
    from sklearn.datasets import load_digits  # pragma: no cover - another scikit-learn layout

    return load_digits(return_X_y=True)  # pragma: no cover


def _digits(seed: int, pretrain_examples: int, test_fraction: float, max_train_examples: int | None):
    import numpy as np
    from datasets import Array3D, Dataset, Features, Value

    images, labels = _load_digits()
    images = (images / 16.0).astype("float32").reshape(-1, 1, 8, 8)
    order = np.random.RandomState(seed).permutation(len(labels))
    images, labels = images[order], labels[order].astype("int64")
    num_test = int(round(test_fraction * len(labels)))
    if pretrain_examples < 10 or pretrain_examples + num_test >= len(labels):
        raise ValueError(
            f"`pretrain_examples={pretrain_examples}` must be at least 10 and leave training data next to the "
            f"{num_test} test images (there are {len(labels)} digits)."
        )

    # Array3D keeps the images as fixed-shape arrays: the torch format then converts whole batches at once
    features = Features({"pixel_values": Array3D(shape=(1, 8, 8), dtype="float32"), "labels": Value("int64")})

    def make(idx):
        return Dataset.from_dict({"pixel_values": images[idx], "labels": labels[idx]}, features=features).with_format(
            "torch"
        )

    test = np.arange(num_test)
    pretrain = np.arange(num_test, num_test + pretrain_examples)
    train = np.arange(num_test + pretrain_examples, len(labels))
    if max_train_examples is not None:
        train = train[:max_train_examples]
    return make(pretrain), make(train), make(test)


def _build_model(seed: int):
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=8,
        patch_size=2,
        num_channels=1,
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        num_labels=10,
        id2label={i: str(i) for i in range(10)},
        label2id={str(i): i for i in range(10)},
    )
    torch.manual_seed(seed)
    return ViTForImageClassification(config)


def _quiet_args(**kwargs) -> dict[str, Any]:
    return {
        "report_to": "none",
        "save_strategy": "no",
        "eval_strategy": "no",
        "logging_strategy": "no",
        "disable_tqdm": True,
        "use_cpu": True,
        "dataloader_num_workers": 0,
        "per_device_train_batch_size": 32,
        "per_device_eval_batch_size": 256,
        "weight_decay": 0.0,
        **kwargs,
    }


def _accuracies(model, tasks: Sequence[Any]) -> list[float]:
    """Accuracy of `model` on each task's evaluation set (one full batch per task: the digits are tiny)."""
    import torch

    model.eval()
    scores = []
    with torch.no_grad():
        for task in tasks:
            batch = task.dataset[:]
            predictions = model(pixel_values=batch["pixel_values"]).logits.argmax(-1)
            scores.append(float((predictions == batch["labels"]).float().mean()))
    return scores


def format_comparison(metrics: dict[str, dict[str, float]], scaling_coefs: dict[str, float | None]) -> str:
    """The demo's comparison table (markdown): one row per method, the continual metrics in percent.

    Args:
        metrics (`dict[str, dict[str, float]]`):
            Method label → the output of [`~hf_magmax.metrics.compute_continual_metrics`].
        scaling_coefs (`dict[str, float | None]`):
            Method label → λ (`None` for sequential fine-tuning and θ_0).

    Returns:
        `str`: the markdown table.
    """
    header = ["method", "λ", *(label for _, label in _TABLE_METRICS)]
    lines = ["| " + " | ".join(header) + " |", "|---|---:|" + "---:|" * len(_TABLE_METRICS)]
    for method, values in metrics.items():
        coef = scaling_coefs.get(method)
        cells = [method, "–" if coef is None else f"{coef:g}"]
        cells += [f"{100 * values[key]:.1f}" for key, _ in _TABLE_METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def check_demo_arguments(
    num_tasks: int = 5,
    num_train_epochs: float = 5.0,
    learning_rate: float = 3e-4,
    scaling_coef: float = 0.5,
    names: dict[str, str] | None = None,
) -> None:
    """Check the demo's arguments before anything is imported or trained (the CLI calls it before torch).

    Args:
        names (`dict[str, str]`, *optional*):
            How to name each argument in the error (the CLI passes its flags, `{"num_tasks": "--num-tasks", ...}`).

    Raises:
        `ValueError` naming the argument and the values it takes.
    """
    import math

    names = names or {}
    if num_tasks < 1 or 10 % num_tasks:
        name = names.get("num_tasks", "num_tasks")
        raise ValueError(f"`{name}={num_tasks}` must divide the 10 digit classes: use 1, 2, 5 or 10.")
    for key, value in (
        ("num_train_epochs", num_train_epochs),
        ("learning_rate", learning_rate),
        ("scaling_coef", scaling_coef),
    ):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"`{names.get(key, key)}={value}` must be a finite number > 0.")


def run_demo(
    output_dir: str | os.PathLike = "magmax-demo",
    num_tasks: int = 5,
    num_train_epochs: float = 5.0,
    learning_rate: float = 3e-4,
    scaling_coef: float = 0.5,
    pretrain_examples: int = 200,
    pretrain_epochs: float = 30.0,
    max_train_examples: int | None = None,
    seed: int = 0,
    plot: bool = True,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Run the class-incremental digits demo (see the module docstring) and write its outputs to `output_dir`.

    Args:
        output_dir (`str` or `os.PathLike`, *optional*, defaults to `"magmax-demo"`):
            Where the results, the trainer's `continual_results.json` and the plots go.
        num_tasks (`int`, *optional*, defaults to `5`):
            Number of tasks; must divide 10 (the digit classes): 1, 2, 5 or 10.
        num_train_epochs (`float`, *optional*, defaults to `5.0`):
            Epochs per task.
        learning_rate (`float`, *optional*, defaults to `3e-4`):
            Peak learning rate of every task (AdamW, linear decay, restarted per task).
        scaling_coef (`float`, *optional*, defaults to `0.5`):
            MagMax's λ (0.5 as in the paper). Average and TIES use their engine defaults (1.0).
        pretrain_examples (`int`, *optional*, defaults to `200`):
            Size of the slice θ_0 is pretrained on (disjoint from the continual training and test data).
        pretrain_epochs (`float`, *optional*, defaults to `30.0`):
            Epochs of the pretraining of θ_0.
        max_train_examples (`int`, *optional*):
            Cap on the continual training set (for a quick run).
        seed (`int`, *optional*, defaults to `0`):
            Seed of the data shuffle, the model initialisation and training.
        plot (`bool`, *optional*, defaults to `True`):
            Write the heatmaps (needs matplotlib).
        show_progress (`bool`, *optional*, defaults to `True`):
            Show one progress bar on stderr over the stages (θ_0's pretraining, each task, the baseline merges);
            `HF_HUB_DISABLE_PROGRESS_BARS=1` also hides it.

    Returns:
        `dict`: `task_names`, `matrices` and `metrics` (method label → accuracy matrix / metrics, plus `"θ_0"`),
        `scaling_coefs`, `comparison` (the markdown table), `matrix_tables` (markdown), `files` (paths written) and
        `engine_max_abs_diff` (largest difference between the trainer's final merged weights and the merge engine's
        MagMax merge of the weights kept after every task: 0 up to float rounding).

    Example:

    ```python
    >>> from hf_magmax.demo import run_demo
    >>> results = run_demo("magmax-demo")  # doctest: +SKIP
    >>> print(results["comparison"])  # doctest: +SKIP
    ```
    """
    import torch
    from huggingface_hub.utils import tqdm
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    from .continual import class_incremental_split
    from .merging import merge_task_vectors
    from .metrics import accuracy_compute_metrics, compute_continual_metrics, format_matrix, plot_accuracy_matrix
    from .task_vectors import TaskVector
    from .trainer import RESULTS_NAME, MagMaxConfig, MagMaxTrainer

    check_demo_arguments(num_tasks, num_train_epochs, learning_rate, scaling_coef)
    output_dir = os.fspath(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    pretrain, train, test = _digits(seed, pretrain_examples, 0.2, max_train_examples)
    baselines = [method for _, method, _ in DEMO_METHODS if method not in (None, "magmax")]
    progress = tqdm(
        total=1 + num_tasks + len(baselines), desc="pretraining θ_0", unit="stage", disable=not show_progress
    )

    # 1. θ_0: a tiny ViT pretrained on a disjoint slice of all ten classes (the stand-in for a pretrained model)
    model = _build_model(seed)
    logger.info("Pretraining θ_0 on %d digits of all classes", len(pretrain))
    with tempfile.TemporaryDirectory() as scratch_dir:
        pretrain_args = TrainingArguments(
            output_dir=scratch_dir, num_train_epochs=pretrain_epochs, learning_rate=2e-3, seed=seed, **_quiet_args()
        )
        pretrainer = Trainer(model=model, args=pretrain_args, train_dataset=pretrain)
        pretrainer.remove_callback(PrinterCallback)
        pretrainer.train()
    progress.update()

    # 2. the task sequence: 5 tasks × 2 classes, the same split of the test set
    per_task = 10 // num_tasks
    digit_names = [f"digits {t}-{t + per_task - 1}" if per_task > 1 else f"digit {t}" for t in range(0, 10, per_task)]
    train_tasks = class_incremental_split(train, label_column="labels", num_tasks=num_tasks, task_names=digit_names)
    test_tasks = train_tasks.apply_to(test)

    # 3. continual fine-tuning with MagMax; keep the weights after every task for the baselines
    theta_0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    after_task: list[dict[str, torch.Tensor]] = []

    class _KeepWeights(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            task = len(after_task)
            progress.set_description(f"task {task + 1}/{num_tasks} ({digit_names[task]})")

        def on_train_end(self, args, state, control, model=None, **kwargs):  # after each task, before the merge
            after_task.append({k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
            progress.update()

    args = MagMaxConfig(
        output_dir=output_dir,
        scaling_coef=scaling_coef,
        merge_method="magmax",
        frozen_modules=["classifier"],
        restrict_loss_to_task_classes=True,
        num_train_epochs=num_train_epochs,
        learning_rate=learning_rate,
        seed=seed,
        **_quiet_args(),
    )
    trainer = MagMaxTrainer(
        model=model,
        args=args,
        train_datasets=train_tasks,
        eval_datasets=test_tasks.as_dict(),
        compute_metrics=accuracy_compute_metrics,
        callbacks=[_KeepWeights()],
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    results = trainer.continual_results
    task_names = results["task_names"]

    # the trainer's final (merged) weights are the engine's MagMax merge of the task vectors of the kept weights
    task_vectors = [TaskVector.from_state_dicts(theta_0, weights) for weights in after_task]
    engine = merge_task_vectors(task_vectors, method="magmax", scaling_coef=results["scaling_coef"]).apply_to(theta_0)
    final = trainer.model.state_dict()
    engine_max_abs_diff = max(float((engine[k] - final[k].cpu()).abs().max()) for k in engine)
    logger.info("max |trainer merged weights - engine merge of the kept weights| = %g", engine_max_abs_diff)

    # 4. baselines: merge the same task vectors with the engine, evaluate row by row
    matrices: dict[str, list[list[float]]] = {}
    coefs: dict[str, float | None] = {"θ_0 (no training)": None}
    scratch = _build_model(seed)
    for label, method, coef in DEMO_METHODS:
        if method is None:
            matrices[label] = results["sequential"]["matrix"]
        elif method == "magmax":
            matrices[label] = results["merged"]["matrix"]
            coef = results["scaling_coef"]
        else:
            progress.set_description(f"baseline {label}")
            rows = [results["sequential"]["matrix"][0]]
            for t in range(1, len(task_vectors) + 1):
                merged = merge_task_vectors(task_vectors[:t], method=method, scaling_coef=coef)
                scratch.load_state_dict(merged.apply_to(theta_0))
                rows.append(_accuracies(scratch, test_tasks))
            matrices[label] = rows
            progress.update()
        coefs[label] = coef
    progress.close()
    base_row = results["sequential"]["matrix"][0]
    metrics = {"θ_0 (no training)": compute_continual_metrics([base_row] * (len(task_names) + 1))}
    metrics.update({label: compute_continual_metrics(matrix) for label, matrix in matrices.items()})
    comparison = format_comparison(metrics, coefs)
    tables = {label: format_matrix(matrix, task_names) for label, matrix in matrices.items()}

    files = {"trainer_results": os.path.join(output_dir, RESULTS_NAME)}
    if plot:
        for label, key in (("sequential fine-tuning", "sequential"), ("MagMax", "magmax")):
            path = os.path.join(output_dir, f"accuracy_matrix_{key}.png")
            plot_accuracy_matrix(matrices[label], task_names, path, title=f"Class-incremental digits: {label}")
            files[f"plot_{key}"] = path
    summary = {
        "task_names": task_names,
        "task_classes": train_tasks.task_classes,
        "setup": {
            "model": "ViT (ViTConfig: 8x8 images, 2x2 patches, 2 layers, hidden 48), θ_0 pretrained on a disjoint "
            f"slice of {len(pretrain)} digits",
            "frozen_modules": ["classifier"],
            "restrict_loss_to_task_classes": True,
            "num_train_epochs": num_train_epochs,
            "learning_rate": learning_rate,
            "train_examples": len(train),
            "test_examples": len(test),
            "seed": seed,
        },
        "scaling_coefs": coefs,
        "engine_max_abs_diff": engine_max_abs_diff,
        "matrices": matrices,
        "metrics": metrics,
    }
    files["results"] = os.path.join(output_dir, "demo_results.json")
    with open(files["results"], "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, ensure_ascii=False)
    files["comparison"] = os.path.join(output_dir, "comparison.md")
    with open(files["comparison"], "w", encoding="utf-8") as f:
        f.write(comparison + "\n")
    return {**summary, "comparison": comparison, "matrix_tables": tables, "files": files}
