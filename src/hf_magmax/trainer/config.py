# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""The MagMax options of the Trainer and the callback, and [`MagMaxConfig`] (`TrainingArguments` + those options).

[`MagMaxOptions`] is the one place the MagMax fields are declared: [`MagMaxConfig`] inherits them, and
[`~hf_magmax.trainer.MagMaxCallback`] takes either. Every merge fact (the method's default λ, its options, the λ
policy) comes from the one [`~hf_magmax.merging.MergeSpec`] that [`MagMaxOptions.merge_spec`] builds.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from ..merging import MergeSpec, check_merge_method, check_scaling_coef


__all__ = ["MagMaxConfig", "MagMaxOptions", "check_options"]

FINAL_MODELS = ("merged", "sequential")
LORA_OUTPUTS = ("merged", "adapter")


@dataclass
class MagMaxOptions:
    r"""The MagMax options shared by [`MagMaxConfig`] and [`~hf_magmax.trainer.MagMaxCallback`].

    Args:
        scaling_coef (`float` or `"auto"`, *optional*):
            λ: the merged model is `θ_0 + λ · merge(τ_1, …, τ_T)`. Unset (`None`) takes the merge method's default
            (0.5 for `magmax` and `random_mix`, as in the MagMax paper; 1.0 for `average` and `ties`; 0.3 for
            `task_arithmetic`). `"auto"` picks λ from `scaling_coef_grid` by the mean score on *validation* data of the
            tasks seen so far.
        scaling_coef_grid (`list[float]`, *optional*):
            Candidate λ for `scaling_coef="auto"`; defaults to 0.1, 0.2, …, 1.0.
        merge_method (`str`, *optional*, defaults to `"magmax"`):
            `magmax`, or a baseline of the merge engine: `average`, `task_arithmetic`, `ties`, `random_mix`, `opcm`.
        merge_density (`float`, *optional*):
            Fraction of each task vector TIES keeps (`merge_method="ties"` only; defaults to 0.2 there). An error
            for other methods.
        merge_seed (`int`, *optional*):
            Seed of `merge_method="random_mix"` (defaults to 0 there). An error for other methods.
        merge_alpha (`float`, *optional*):
            OPCM's share of singular-value mass each new task vector is projected off, in [0, 1)
            (`merge_method="opcm"` only; defaults to 0.5 there). An error for other methods.
        final_model (`str`, *optional*, defaults to `"merged"`):
            Which weights the model holds after training: `"merged"` or `"sequential"` (the weights after the last
            task). Both are evaluated either way.
        eval_merged_every_task (`bool`, *optional*, defaults to `True`):
            Evaluate the merged model after every task (fills the merged accuracy matrix); otherwise only at the end.
        eval_unseen_tasks (`bool`, *optional*, defaults to `True`):
            After each task t < T, evaluate the sequential and merged models on every task, including those not
            trained yet (the matrices' upper triangle, needed for forward transfer). `False` evaluates only the tasks
            seen so far until the last task (which is evaluated on every task): T(T+1)/2 evaluations per model
            instead of T², final accuracy, forgetting and BWT unchanged, no forward transfer (the unseen cells are
            `None`). θ_0's row is evaluated on every task either way. For costly evaluations, e.g. an LLM.
        merge_device (`str`, *optional*, defaults to `"cpu"`):
            Where θ_0 and the running merge live. The CPU default leaves accelerator memory unchanged.
        frozen_modules (`list[str]`, *optional*):
            Module names (prefixes) or regexes whose parameters are frozen and excluded from the task vectors, e.g. a
            zero-shot label-embedding head.
        max_validation_samples (`int`, *optional*):
            Use at most this many validation examples per task for each λ of the grid (bounds the cost).
        select_scaling_coef_every_task (`bool`, *optional*):
            With `scaling_coef="auto"`: choose λ after every task (on the tasks seen so far) for the merged row of that
            task, not only after the last. Defaults to `eval_merged_every_task`.
        continual_metric (`str`, *optional*):
            The metric of the accuracy matrices, a key of `compute_metrics`' output without the prefix, e.g.
            `"accuracy"`. Defaults to `"accuracy"` when the training labels are class ids (a built-in accuracy is used
            if `compute_metrics` is not given), to `"mean_token_accuracy"` inside TRL's `SFTTrainer` (the token
            accuracy it logs as `eval_mean_token_accuracy`), and to `"neg_loss"` (minus the evaluation loss, so
            higher is better and forgetting is a loss increase) otherwise, e.g. for causal language models.
        save_provenance (`bool`, *optional*, defaults to `False`):
            `magmax` and `random_mix` only (an error for other methods, raised here, before the first step): record
            which task won each merged element (ties go to the later task). The maps are kept in the merge state
            (one `uint8` tensor per merged tensor) and its checkpoints; at the end the run writes
            `magmax_provenance.safetensors`, `magmax_provenance.json` and, with matplotlib, `magmax_provenance.png`
            (layers × tasks) to `output_dir`, the shares per tensor and per layer under `provenance` in
            `continual_results.json`, and a short table in the model card.
        push_every_task (`bool`, *optional*, defaults to `False`):
            A continual release on the Hub: after every task, push the merged model `θ_0 + λ · merge` of the tasks so
            far (in the model's dtype, with its config and tokenizer/processor, as a `save_pretrained` folder, and its
            card: the task order so far, λ, the accuracy rows so far, the provenance shares when recorded) to the repo
            `hub_model_id` of the `TrainingArguments` (`hub_token`, `hub_private_repo`), as a new commit on `main` and
            a branch named by `hub_revision_pattern` at that commit. Only the main process pushes; a failed push is a
            warning (the local folder `output_dir/magmax_releases/<branch>` is kept and named, the failure recorded
            under `hub_revisions` in `continual_results.json`) and training goes on; a resumed run does not push a
            task twice. Full fine-tuning under one process or DDP (not LoRA, not sharded FSDP weights).
        hub_revision_pattern (`str`, *optional*, defaults to `"after-task-{k}"`):
            The branch of each task's revision: `{k}` is the 1-based task index (required), `{name}` the task name;
            e.g. `"v1-task{k:02d}"`. Checked here: it must give a valid git branch name other than `main`.
        lora_output (`str`, *optional*, defaults to `"merged"`):
            LoRA training only: end with the merged deltas folded into the base model (`"merged"`), or re-factored
            into a new LoRA adapter of rank `lora_rank` (`"adapter"`).
        lora_rank (`int`, *optional*):
            Rank of the re-factored adapter for `lora_output="adapter"`, capped per module by the size of its ΔW;
            defaults to the trained adapter's rank times the number of tasks. The re-factor is exact at full rank.

    Example:

    ```python
    >>> from hf_magmax.trainer import MagMaxOptions
    >>> options = MagMaxOptions(merge_method="ties", merge_density=0.3)
    >>> options.merge_spec().method_options, options.scaling_coef
    ({'density': 0.3}, 1.0)
    ```
    """

    # `float | str | None` so that HfArgumentParser parses the command line as a string ("auto" or a number)
    scaling_coef: float | str | None = field(
        default=None,
        metadata={
            "help": 'λ of the merged model θ_0 + λ·merge(τ); unset: the method\'s default (0.5 MagMax), or "auto".'
        },
    )
    scaling_coef_grid: list[float] | None = field(
        default=None,
        metadata={"help": 'Candidate λ for scaling_coef="auto" (default 0.1, 0.2, ..., 1.0).'},
    )
    merge_method: str = field(
        default="magmax",
        metadata={"help": "Merge method: magmax, or a baseline: average, task_arithmetic, ties, random_mix, opcm."},
    )
    merge_density: float | None = field(
        default=None, metadata={"help": "Fraction of each task vector TIES keeps (ties only; default 0.2)."}
    )
    merge_seed: int | None = field(default=None, metadata={"help": "Seed of merge_method=random_mix (default 0)."})
    merge_alpha: float | None = field(
        default=None, metadata={"help": "OPCM's singular-value share projected off (opcm only; default 0.5)."}
    )
    final_model: str = field(
        default="merged",
        metadata={"help": "Weights the model holds after training: merged or sequential.", "choices": FINAL_MODELS},
    )
    eval_merged_every_task: bool = field(
        default=True, metadata={"help": "Evaluate the merged model after every task, not only at the end."}
    )
    eval_unseen_tasks: bool = field(
        default=True,
        metadata={"help": "After each task, evaluate the tasks not trained yet too (False: seen tasks only, no FWT)."},
    )
    merge_device: str = field(
        default="cpu", metadata={"help": "Device of θ_0 and the running merge (cpu keeps accelerator memory)."}
    )
    frozen_modules: list[str] | None = field(
        default=None, metadata={"help": "Module names or regexes to freeze and exclude from the task vectors."}
    )
    max_validation_samples: int | None = field(
        default=None, metadata={"help": "Validation examples per task used for each λ of the grid."}
    )
    select_scaling_coef_every_task: bool | None = field(
        default=None, metadata={"help": 'With scaling_coef="auto": choose λ after every task, not only the last.'}
    )
    continual_metric: str | None = field(
        default=None,
        metadata={"help": "Metric of the accuracy matrices (e.g. accuracy); default accuracy or neg_loss."},
    )
    save_provenance: bool = field(
        default=False,
        metadata={"help": "magmax/random_mix: record which task won each merged element (magmax_provenance.*)."},
    )
    push_every_task: bool = field(
        default=False,
        metadata={"help": "After every task, push the merged model to hub_model_id: main and a branch per task."},
    )
    hub_revision_pattern: str = field(
        default="after-task-{k}",
        metadata={"help": "Branch of each task's revision with push_every_task: {k} = 1-based task, {name} = task."},
    )
    lora_output: str = field(
        default="merged",
        metadata={
            "help": "LoRA training: fold the merge into the base (merged) or re-factor it (adapter).",
            "choices": LORA_OUTPUTS,
        },
    )
    lora_rank: int | None = field(default=None, metadata={"help": "Rank of the re-factored adapter."})

    def __post_init__(self) -> None:
        check_options(self)

    def merge_spec(self) -> MergeSpec:
        """The one [`~hf_magmax.merging.MergeSpec`] of these options (method, λ, density, seed), validated."""
        return MergeSpec(self.merge_method, self.scaling_coef, self.merge_density, self.merge_seed, self.merge_alpha)

    @property
    def is_auto(self) -> bool:
        return self.scaling_coef == "auto"

    def select_every_task(self) -> bool:
        value = self.select_scaling_coef_every_task
        return self.eval_merged_every_task if value is None else bool(value)


def _check_device(value: Any) -> None:
    import torch

    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        raise ValueError(
            f'`merge_device` must name a torch device such as "cpu" or "cuda:0", got {value!r}.'
        ) from None
    if device.type in ("cpu", "meta"):
        return
    backend = getattr(torch, device.type, None)
    available = getattr(backend, "is_available", None)
    if available is not None and not available():
        raise ValueError(
            f"`merge_device` = {value!r}, but this machine has no {device.type} device (torch.{device.type}."
            'is_available() is False): use merge_device="cpu".'
        )
    count = getattr(backend, "device_count", None)
    if device.index is not None and count is not None and device.index >= count():
        raise ValueError(
            f"`merge_device` = {value!r}, but this machine has {count()} {device.type} device(s): use an index below "
            f"{count()}."
        )


def check_push_options(options: Any, task_names: Any = None) -> None:
    """Validate `push_every_task` / `hub_revision_pattern` (and, with `task_names`, every task's branch)."""
    from ..hub import check_revision_pattern, format_revision

    if not isinstance(options.push_every_task, bool):
        raise ValueError(f"`push_every_task` must be True or False, got {options.push_every_task!r}.")
    check_revision_pattern(options.hub_revision_pattern)
    branches = [format_revision(options.hub_revision_pattern, k + 1, n) for k, n in enumerate(task_names or ())]
    if len(set(branches)) != len(branches):
        raise ValueError(
            f"`hub_revision_pattern` = {options.hub_revision_pattern!r} gives the same branch to two tasks: use {{k}}."
        )


def check_options(options: Any) -> None:
    """Validate (and normalize in place) the MagMax options on `options`: a [`MagMaxOptions`] or [`MagMaxConfig`].

    The merge itself (method, λ, density, seed) is validated by [`~hf_magmax.merging.MergeSpec`], with the error
    naming the option as the user spells it here (`merge_density`, `merge_seed`).
    """
    from ..scaling import DEFAULT_SCALING_COEF_GRID, check_scaling_coef_grid, check_validation_fraction

    try:
        check_merge_method(options.merge_method)
    except ValueError as err:
        raise ValueError(f"`merge_method`: {err}") from None
    coef = options.scaling_coef
    if isinstance(coef, str) and coef.strip().lower() == "none":
        coef = None
    if coef is not None:
        coef = check_scaling_coef(coef)  # λ finite and > 0, or "auto": the policy of every door
    try:
        spec = MergeSpec(options.merge_method, coef, options.merge_density, options.merge_seed, options.merge_alpha)
    except ValueError as err:
        message = str(err).replace("`density`", "`merge_density`").replace("`seed`", "`merge_seed`")
        message = message.replace("`alpha`", "`merge_alpha`")
        raise ValueError(message) from None
    if not isinstance(options.eval_unseen_tasks, bool):
        raise ValueError(f"`eval_unseen_tasks` must be True or False, got {options.eval_unseen_tasks!r}.")
    if not isinstance(options.save_provenance, bool):
        raise ValueError(f"`save_provenance` must be True or False, got {options.save_provenance!r}.")
    if options.save_provenance and not spec.merge_class.can_track_winners:
        raise ValueError(
            f"`save_provenance=True` needs a merge method that keeps one task's value per element (magmax, "
            f"random_mix), not `merge_method={options.merge_method!r}`: drop `save_provenance` or change the method."
        )
    check_push_options(options)
    # the value the user reads back: the method's default λ when unset
    options.scaling_coef = spec.scaling_coef if spec.scaling_coef is not None else spec.coef
    options.merge_density, options.merge_seed, options.merge_alpha = spec.density, spec.seed, spec.alpha
    if options.scaling_coef_grid is not None:
        options.scaling_coef_grid = list(check_scaling_coef_grid(options.scaling_coef_grid))
        if not spec.is_auto:
            warnings.warn(
                '`scaling_coef_grid` is only used with `scaling_coef="auto"`; it is ignored for a fixed `scaling_coef`.',
                stacklevel=3,
            )
    elif spec.is_auto:
        options.scaling_coef_grid = list(DEFAULT_SCALING_COEF_GRID)
    if options.final_model not in FINAL_MODELS:
        raise ValueError(f"`final_model` must be one of {', '.join(FINAL_MODELS)}, got {options.final_model!r}.")
    _check_device(options.merge_device)
    frozen = options.frozen_modules
    if frozen is not None:
        frozen = [frozen] if isinstance(frozen, str) else list(frozen)
        for pattern in frozen:
            if not isinstance(pattern, str) or not pattern:
                raise TypeError(f"`frozen_modules` must be a list of module names or regexes, got {pattern!r}.")
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"`frozen_modules` entry {pattern!r} is not a valid regex: {err}.") from None
        options.frozen_modules = frozen
    if getattr(options, "validation_fraction", None) is not None:
        options.validation_fraction = check_validation_fraction(options.validation_fraction)
    limit = options.max_validation_samples
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"`max_validation_samples` must be a positive integer or None, got {limit!r}.")
    if options.lora_output not in LORA_OUTPUTS:
        raise ValueError(f"`lora_output` must be one of {', '.join(LORA_OUTPUTS)}, got {options.lora_output!r}.")
    rank = options.lora_rank
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"`lora_rank` must be a positive integer, got {rank!r}.")
    if options.continual_metric is not None and not isinstance(options.continual_metric, str):
        raise TypeError(
            f"`continual_metric` must be a metric name such as 'accuracy', got {options.continual_metric!r}."
        )


@dataclass
class MagMaxConfig(MagMaxOptions, TrainingArguments):
    r"""Configuration of [`MagMaxTrainer`]: `TrainingArguments` plus the MagMax options.

    Every `TrainingArguments` option applies to each task (the learning-rate schedule, the number of epochs or
    `max_steps`, … restart with every task). The MagMax options are those of [`MagMaxOptions`] (`scaling_coef`,
    `scaling_coef_grid`, `merge_method`, `merge_density`, `merge_seed`, `final_model`, `eval_merged_every_task`,
    `eval_unseen_tasks`, `merge_device`, `frozen_modules`, `max_validation_samples`, `select_scaling_coef_every_task`,
    `continual_metric`, `save_provenance`, `push_every_task`, `hub_revision_pattern`, `lora_output`, `lora_rank`),
    plus these Trainer-only ones.
    With `push_every_task=True`, `hub_model_id` is required (an error here, before training), and `hub_token` and
    `hub_private_repo` apply to the pushes. The Trainer-only options:

    Args:
        num_train_epochs_per_task (`list[float]`, *optional*):
            The number of epochs of each task, one entry per task in task order (e.g. TRACE's 5, 3, 7, 5, 3, 5, 5, 7);
            overrides `num_train_epochs` task by task. Each task keeps its own fresh learning-rate schedule.
        max_steps_per_task (`list[int]`, *optional*):
            The number of optimizer steps of each task, one positive entry per task; overrides `max_steps` (and the
            epochs) task by task. A resumed task runs its own remaining steps.
        restrict_loss_to_task_classes (`bool`, *optional*, defaults to `False`):
            Class-incremental learning with one head over all classes: mask the logits of the classes that are not in
            the current task out of the training loss (evaluation uses every class).
        validation_fraction (`float`, *optional*, defaults to `0.1`):
            With `scaling_coef="auto"` and no `validation_datasets`: the share of each task's training split held out
            (seeded with `seed`) to choose λ. Never the evaluation data of the accuracy matrices.

    Example:

    ```python
    >>> from hf_magmax import MagMaxConfig
    >>> args = MagMaxConfig(output_dir="out", merge_method="average", report_to="none")
    >>> args.scaling_coef  # the method's default λ
    1.0
    ```
    """

    num_train_epochs_per_task: list[float] | None = field(
        default=None, metadata={"help": "Epochs of each task, one per task (overrides num_train_epochs per task)."}
    )
    max_steps_per_task: list[int] | None = field(
        default=None, metadata={"help": "Optimizer steps of each task, one per task (overrides max_steps per task)."}
    )
    restrict_loss_to_task_classes: bool = field(
        default=False, metadata={"help": "Mask logits of classes outside the current task in the training loss."}
    )
    validation_fraction: float | None = field(
        default=0.1, metadata={"help": 'Share of each training split held out to choose λ with scaling_coef="auto".'}
    )

    def __post_init__(self) -> None:
        # the next `__post_init__` after the MagMax options in the MRO: `TrainingArguments`', or that of a TRL config
        # mixed in after this one (`MagMaxSFTConfig(MagMaxConfig, SFTConfig)` runs SFTConfig's, which runs
        # TrainingArguments')
        super(MagMaxOptions, self).__post_init__()
        check_options(self)
        self.num_train_epochs_per_task = _check_per_task(self.num_train_epochs_per_task, "num_train_epochs_per_task")
        self.max_steps_per_task = _check_per_task(self.max_steps_per_task, "max_steps_per_task", integer=True)
        if self.push_every_task and not self.hub_model_id:
            raise ValueError(
                "`push_every_task=True` needs the Hub repo to push to: set `hub_model_id` (e.g. "
                '`hub_model_id="me/my-continual-model"`; `hub_token` and `hub_private_repo` apply too).'
            )
        if self.load_best_model_at_end:
            raise ValueError(
                "`load_best_model_at_end=True` is not supported by MagMaxTrainer: each task is its own run, and "
                "loading a best checkpoint would break the task sequence. Set it to False."
            )


def _check_per_task(values: Any, option: str, integer: bool = False) -> list | None:
    """A per-task schedule option: None, or a non-empty list of positive numbers (integers for steps)."""
    if values is None:
        return None
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(f"`{option}` must be a list with one entry per task, got {values!r}.")
    values = list(values)
    if not values:
        raise ValueError(f"`{option}` is empty: give one entry per task, or leave it unset.")
    out = []
    for i, value in enumerate(values):
        kind = int if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kind) or not value > 0 or value != value:
            what = "a positive integer" if integer else "a positive number"
            raise ValueError(f"`{option}`[{i}] must be {what}, got {value!r}.")
        out.append(int(value) if integer else value)
    return out


def check_per_task_length(args: Any, num_tasks: int) -> None:
    """The per-task schedule lists must have one entry per task (known once the trainer has the tasks)."""
    for option in ("num_train_epochs_per_task", "max_steps_per_task"):
        values = getattr(args, option, None)
        if values is not None and len(values) != num_tasks:
            raise ValueError(
                f"`{option}` has {len(values)} entries but there are {num_tasks} tasks: give one entry per task."
            )
