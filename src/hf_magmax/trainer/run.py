# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""The run that drives one task sequence: [`MergeState`] + [`AccuracyMatrices`] + the λ choice, step by step.

[`~hf_magmax.trainer.MagMaxTrainer`] and [`~hf_magmax.trainer.MagMaxCallback`] make the same calls (`begin`,
`begin_task`, `end_task`, `finish`), so both paths give the same weights and metrics.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .config import MagMaxOptions
from .matrices import AccuracyMatrices, resolve_metric, score, write_results
from .release import HubReleases
from .state import (
    BASE_DIR_NAME,
    BASE_HASH_NAME,
    BASE_WEIGHTS_NAME,
    LEGACY_BASE_NAME,
    RANK_BASE_NAME,
    CheckpointError,
    MergeState,
    has_zero3_parameters,
    reshard,
    unwrap,
    zero3_weights,
)


logger = logging.getLogger(__name__)

__all__ = ["STATE_NAME", "ContinualRun"]

#: The checkpoint's run state (task index, matrices); written last, so its presence marks a complete checkpoint.
STATE_NAME = "magmax_state.json"


def log(trainer: Any, logs: dict[str, float]) -> None:
    if trainer is None or not logs:
        return
    trainer.log({k: float(v) for k, v in logs.items() if v is not None})


def has_dtensor_parameters(model: nn.Module) -> bool:
    """Whether the model's parameters are DTensors (FSDP2's `fully_shard`, as Accelerate applies it)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return any(isinstance(p, DTensor) for p in model.parameters())


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _sharded_world(state: MergeState) -> int | None:
    """The number of processes a sharded state is split over (None: the state is whole, as under DDP)."""
    world = _world_size()
    return world if state.sharded and world > 1 else None


def _rank_name(name: str, rank: int | None) -> str:
    """`magmax_base.safetensors` → `magmax_base-rank1.safetensors` for one rank's part."""
    if rank is None:
        return name
    stem, ext = os.path.splitext(name)
    return f"{stem}-rank{rank}{ext}"


class ContinualRun:
    """θ_0, the running merge, the accuracy matrices and the chosen λ of one task sequence.

    Args:
        options ([`MagMaxOptions`]): the MagMax options (a [`MagMaxConfig`] is one).
        task_names (`list[str]`): the tasks, in order.
        eval_datasets (`list`): the tasks' evaluation sets (may be empty: no matrices).
        validation_datasets (`list`, *optional*): per-task validation sets for `scaling_coef="auto"`.
        lora (`bool`, *optional*): the task vectors are a PEFT adapter's ΔW relative to the base.
    """

    def __init__(
        self,
        options: MagMaxOptions,
        task_names: Sequence[str],
        eval_datasets: Sequence[Any],
        validation_datasets: Sequence[Any] | None,
        lora: bool = False,
    ) -> None:
        self.options = options
        self.spec = options.merge_spec()
        self.eval_datasets = list(eval_datasets)
        self.validation_datasets = list(validation_datasets) if validation_datasets else None
        self.state = MergeState(
            self.spec, options.merge_device, options.frozen_modules, track_winners=options.save_provenance
        )
        self.matrices = AccuracyMatrices(task_names, seen_only=not options.eval_unseen_tasks)
        #: the per-task Hub revisions (`push_every_task`) and the record of what was pushed
        self.releases = HubReleases(options, self.task_names)
        self.final_scaling_coef: float | None = None
        self.finished = False
        self.lora = lora
        self.lora_info: dict[str, Any] | None = None
        #: per-module SVD errors of the re-factored adapter (`lora_output="adapter"`), after [`finish_lora`]
        self.lora_reconstruction_errors: dict[str, float] | None = None
        #: the run's one θ_0 file (`output_dir/magmax_base/model.safetensors`) and its sha256, once written
        #: a sharded state's θ_0 is one file per rank: the path holds `{rank}` and the sha256 is a list, one per rank
        self.base_path: str | None = None
        self.base_sha256: str | list[str] | None = None

    @property
    def task_names(self) -> list[str]:
        return self.matrices.task_names

    @property
    def num_tasks_done(self) -> int:
        return self.state.num_tasks

    # -- λ ---------------------------------------------------------------------------------------------------------

    def current_coef(self) -> float:
        """λ of the merged model now: the last one chosen under `"auto"` (the method's default before any), else λ."""
        if self.spec.is_auto:
            if self.matrices.searches:
                return float(self.matrices.searches[-1]["best"])
            return self.spec.merge_class.default_scaling_coef
        return self.spec.coef

    def search(self, trainer: Any, apply: Callable[[float], None]) -> float:
        """Choose λ on the validation data of the tasks seen so far; returns it (the model is left at that λ)."""
        from ..scaling import search_scaling_coef

        seen = self.num_tasks_done
        datasets = (self.validation_datasets or [])[:seen]
        if len(datasets) < seen or any(ds is None for ds in datasets):
            raise ValueError(
                '`scaling_coef="auto"` needs validation data for every task: pass `validation_datasets` or set '
                "`validation_fraction`."
            )
        metric = self.matrices.metric or "neg_loss"

        def score_fn() -> float:
            scores = [score(trainer, ds, f"magmax_validation_{i}", metric) for i, ds in enumerate(datasets)]
            return sum(scores) / len(scores)

        result = search_scaling_coef(apply, score_fn, grid=self.options.scaling_coef_grid)
        self.matrices.searches.append({"after_task": seen, **result.to_dict()})
        logs = {f"continual/scaling_coef/{coef:g}": value for coef, value in result.curve.items()}
        logs["continual/scaling_coef"] = result.best
        log(trainer, logs)
        return result.best

    # -- weights ---------------------------------------------------------------------------------------------------

    def weights(self, trainer: Any, model: nn.Module, initial: bool = False) -> dict[str, Tensor]:
        """The model's weights as this rank holds them, with no gather: under FSDP2 (DTensor parameters) the live
        local shards, under DeepSpeed ZeRO-3 the parameters themselves ([`MergeState`] folds their partitions);
        otherwise the full weights (DDP, ZeRO-1/2: every rank holds them), through Accelerate once training has
        started."""
        unwrapped = unwrap(model)
        if self.lora:
            from ..peft import lora_delta_state_dict

            return lora_delta_state_dict(unwrapped, adapter_name=getattr(unwrapped, "active_adapter", "default"))
        if has_zero3_parameters(unwrapped):
            return zero3_weights(unwrapped)
        if has_dtensor_parameters(unwrapped):
            reshard(unwrapped)  # the shards, not parameters an evaluation left unsharded
        elif trainer is not None and not initial:
            return trainer.accelerator.get_state_dict(trainer.model_wrapped)
        return unwrapped.state_dict()

    def _lora_targets(self, model: nn.Module) -> dict[str, Tensor]:
        from ..peft import base_parameters

        params = base_parameters(unwrap(model))
        missing = [name for name in self.state.base if name not in params]
        if missing:
            raise KeyError(f"the PEFT model has no base weight {missing[0]!r} for the LoRA delta of that name.")
        return {name: params[name] for name in self.state.base}

    @contextlib.contextmanager
    def merged_weights(self, model: nn.Module, state_dict: Mapping[str, Tensor]) -> Iterator[Callable[[float], None]]:
        """Yields `apply(λ)`, which puts `θ_0 + λ · merge` into the model in place; restores θ_t on exit.

        θ_t is kept as one copy on `merge_device` meanwhile (no second model). For LoRA, the adapter is disabled and
        `ΔW_start + λ · merge` is added to the base weights, which are restored on exit.
        """
        state = self.state
        if self.lora:
            targets = self._lora_targets(model)
            saved = {name: t.detach().to(state.device, copy=True) for name, t in targets.items()}

            def apply(coef: float) -> None:
                for name, target in targets.items():
                    # the base weight plus the merged ΔW (a delta on top of a weight, not θ_0 + λ·τ)
                    value = saved[name].float() + state.merged_tensor(name, coef).float()
                    target.copy_(value.to(target.device, target.dtype))

            with unwrap(model).disable_adapter():
                try:
                    yield apply
                finally:
                    for name, target in targets.items():
                        target.copy_(saved[name].to(target.device, target.dtype))
        else:
            saved = {name: t.detach().to(state.device, copy=True) for name, t in state.local(state_dict).items()}
            try:
                yield lambda coef: state.write_into(model, lambda name: state.merged_tensor(name, coef))
            finally:
                state.write_into(model, saved.__getitem__)

    # -- the sequence ----------------------------------------------------------------------------------------------

    def begin(self, trainer: Any, model: nn.Module, train_datasets: Sequence[Any]) -> None:
        """Take θ_0. (θ_0 is evaluated at the end of the first task by swapping it in: evaluating before the first
        `train()` would make Accelerate skip the DDP wrapping of the model.)"""
        initial = trainer is None or trainer.model_wrapped is model
        self.state.snapshot(self.weights(trainer, model, initial=initial))
        self.matrices.metric = resolve_metric(self.options.continual_metric, train_datasets, trainer)

    def write_base(self, trainer: Any) -> None:
        """Write θ_0 once per run to `output_dir/magmax_base/` (the main process, with its sha256), then hold it
        memory-mapped from there on every process. A θ_0 taken from shards or partitions (a model loaded partitioned,
        e.g. under ZeRO-3's `zero.Init`) is written by every rank, its own part, to `model-rank{r}.safetensors`."""
        if self.state.sharded:
            self._write_rank_base(trainer)
            return
        path = os.path.abspath(os.path.join(trainer.args.output_dir, BASE_WEIGHTS_NAME))
        hash_path = os.path.abspath(os.path.join(trainer.args.output_dir, BASE_HASH_NAME))
        if trainer.is_world_process_zero():
            digest = self.state.write_base(path)
            with open(hash_path + ".tmp", "w", encoding="utf-8") as f:
                f.write(f"{digest}  model.safetensors\n")
            os.replace(hash_path + ".tmp", hash_path)
        trainer.accelerator.wait_for_everyone()
        if not os.path.isfile(hash_path):  # another node without a shared file system: keep θ_0 in memory
            logger.info("θ_0's file %s is not visible on this process; θ_0 stays in memory.", path)
            return
        with open(hash_path, encoding="utf-8") as f:
            self.base_sha256 = f.read().split()[0]
        self.base_path = path
        self.state.map_base(path)

    def _write_rank_base(self, trainer: Any) -> None:
        """Every rank writes its part of θ_0 once per run and maps it; the sha256 of every rank's file is gathered so
        that the main process can record them all in the checkpoints. (Meta weights stay in memory.)"""
        if any(t.is_meta for t in self.state.base.values()):
            return
        import torch.distributed as dist

        pattern = os.path.abspath(os.path.join(trainer.args.output_dir, BASE_DIR_NAME, RANK_BASE_NAME))
        path = pattern.replace("{rank}", str(_rank()))
        digests: list[str | None] = [None] * _world_size()
        dist.all_gather_object(digests, self.state.write_base(path))
        self.state.map_base(path)
        self.base_path, self.base_sha256 = pattern, list(digests)

    def begin_task(self, trainer: Any, model: nn.Module, task: int) -> None:
        if not self.lora:
            self.state.check_shapes(self.weights(trainer, model, initial=True), self.task_names[task])

    def evaluate_row(self, trainer: Any, kind: str) -> list[float | None]:
        """The scores of the model as it is now on every task (θ_0's row, and the last row, always on every task);
        with `eval_unseen_tasks=False` only on the tasks trained so far (`None` for the others)."""
        metric = self.matrices.metric or "neg_loss"
        upto = len(self.eval_datasets)
        if kind != "base" and not self.options.eval_unseen_tasks:
            upto = min(upto, self.num_tasks_done)
        return [
            score(trainer, ds, f"magmax_{kind}_{i}", metric) if i < upto else None
            for i, ds in enumerate(self.eval_datasets)
        ]

    @torch.no_grad()
    def end_task(self, trainer: Any, model: nn.Module, task: int) -> None:
        """Fold the task vector of `task`, evaluate the sequential and merged models on every task, log, write."""
        name = self.task_names[task]
        state_dict = self.weights(trainer, model)
        if not self.lora:
            self.state.check_shapes(state_dict, name)
        self.state.fold(state_dict, name)
        matrices, done = self.matrices, self.num_tasks_done
        last = done == len(self.task_names)
        evaluate = bool(self.eval_datasets) and trainer is not None
        want_merged = evaluate and (self.options.eval_merged_every_task or last)
        want_search = self.spec.is_auto and trainer is not None and (last or self.options.select_every_task())
        want_base = evaluate and matrices.seq[0][0] is None
        if evaluate:
            matrices.seq[done] = self.evaluate_row(trainer, "seq")
        if want_merged or want_search or want_base:
            with self.merged_weights(model, state_dict) as apply:
                if want_base:  # row 0: θ_0 = θ_0 + 0 · merge
                    apply(0.0)
                    row = self.evaluate_row(trainer, "base")
                    matrices.seq[0], matrices.merged[0], matrices.merged_coefs[0] = list(row), list(row), 0.0
                    log(trainer, {f"continual/base/{n}": v for n, v in zip(self.task_names, row)})
                if want_search or want_merged:
                    coef = self.search(trainer, apply) if want_search else self.current_coef()
                    apply(coef)
                    if want_search and last:
                        self.final_scaling_coef = coef
                    if want_merged:
                        matrices.merged[done] = self.evaluate_row(trainer, "merged")
                        matrices.merged_coefs[done] = coef
        del state_dict
        if evaluate:
            logs = {"continual/task": float(done)}
            logs.update(
                {f"continual/seq/{n}": v for n, v in zip(self.task_names, matrices.seq[done]) if v is not None}
            )
            if matrices.merged[done][0] is not None:
                row = zip(self.task_names, matrices.merged[done])
                logs.update({f"continual/merged/{n}": v for n, v in row if v is not None})
            log(trainer, logs)
        if trainer is not None:
            self.write_results(trainer)

    def publish(self, trainer: Any, model: nn.Module, task: int) -> None:
        """With `push_every_task`: push the merged model after `task` as its Hub revision ([`HubReleases.publish`];
        the main process only, a failure is a warning), then rewrite `continual_results.json` with the record."""
        self.releases.task_names = self.task_names
        if self.releases.publish(self, trainer, model, task) is not None:
            self.write_results(trainer)

    def finish(self, trainer: Any, model: nn.Module) -> None:
        """After the last task: put the final weights into the model (full fine-tuning) and write the results."""
        if self.num_tasks_done == 0:
            raise ValueError("no task has been trained yet: nothing to merge.")
        if self.final_scaling_coef is None:
            self.final_scaling_coef = self.current_coef()
        if self.options.final_model == "merged" and not self.lora:
            coef = self.final_scaling_coef
            self.state.write_into(model, lambda name: self.state.merged_tensor(name, coef))
        self.finished = True
        if trainer is not None:
            summary = self.summary()
            logs = {}
            for kind in ("sequential", "merged"):
                for key, value in summary[kind]["metrics"].items():
                    logs[f"continual/{kind}/{key}"] = value
            logs["continual/final_scaling_coef"] = self.final_scaling_coef
            log(trainer, logs)
            self.write_results(trainer)
            self.write_provenance(trainer)

    def finish_lora(self, trainer: Any, model: nn.Module) -> nn.Module | None:
        """After [`finish`] of a LoRA run: the model to continue with (None for `final_model="sequential"`: keep the
        PeftModel). `lora_output="merged"`: the base with `ΔW_start + λ · merge(τ)` folded in (a plain transformers
        model); `"adapter"`: that ΔW re-factored by SVD into a new LoRA adapter of rank `lora_rank` (default: the
        trained rank times the number of tasks, capped per module), its errors in `lora_reconstruction_errors`."""
        if self.options.final_model == "sequential":
            return None
        from ..peft import _strip_adapters, deltas_to_lora, fold_deltas_into_base

        peft_model = unwrap(model)
        adapter = getattr(peft_model, "active_adapter", "default")
        # the merged model relative to the *base*: ΔW_start + λ · merge(τ)
        deltas = self.state.merged_state_dict(self.final_scaling_coef)
        # default: the trained adapter's rank times the number of tasks; any rank is capped by what each ΔW allows
        rank = self.options.lora_rank or int(getattr(peft_model.peft_config[adapter], "r", 8)) * len(self.task_names)
        ranks = {name.rpartition(".")[0]: min(rank, min(d.shape)) for name, d in deltas.items() if d.ndim == 2}
        task_type = getattr(peft_model.peft_config[adapter], "task_type", None)
        base_model = _strip_adapters(peft_model)
        self.lora_info = {"output": self.options.lora_output}
        if self.options.lora_output == "merged":
            fold_deltas_into_base(base_model, deltas, 1.0)
            return base_model
        from peft import get_peft_model, set_peft_model_state_dict

        factorization = deltas_to_lora(deltas, ranks, model=base_model, task_type=task_type)
        self.lora_reconstruction_errors = factorization.errors
        self.lora_info.update(ranks=factorization.ranks, reconstruction_error=factorization.overall_error)
        new_model = get_peft_model(base_model, factorization.peft_config)
        set_peft_model_state_dict(new_model, factorization.state_dict)
        return new_model

    # -- results ---------------------------------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        matrices, done = self.matrices, self.num_tasks_done
        evaluated = bool(self.eval_datasets)
        auto = self.spec.is_auto
        return {
            "task_names": self.task_names,
            "num_tasks_done": done,
            "method": self.spec.method,
            "method_kwargs": self.spec.method_options,
            "scaling_coef": self.final_scaling_coef if self.final_scaling_coef is not None else self.current_coef(),
            "scaling_coef_mode": "auto" if auto else "fixed",
            "scaling_coef_grid": self.options.scaling_coef_grid if auto else None,
            "scaling_coef_search": matrices.searches,
            "final_model": self.options.final_model,
            "metric": matrices.metric,
            "sequential": {
                "matrix": matrices.seq,
                "metrics": matrices.metrics(matrices.seq, done) if evaluated else {},
            },
            "merged": {
                "matrix": matrices.merged,
                "scaling_coefs": matrices.merged_coefs,
                "metrics": matrices.metrics(matrices.merged, done) if evaluated else {},
            },
            **({"lora": self.lora_info} if self.lora_info is not None else {}),
            **({"provenance": self.provenance()} if self.state.track_winners and done else {}),
            **({"hub_revisions": self.releases.to_list()} if self.releases.enabled or self.releases.records else {}),
        }

    def provenance(self) -> dict[str, Any]:
        """Which task won where: the shares per tensor, per layer and overall ([`~hf_magmax.metrics.provenance_summary`])."""
        from ..metrics import provenance_summary

        return provenance_summary(self.state.winners, self.task_names[: self.num_tasks_done])

    def write_provenance(self, trainer: Any) -> None:
        """With `save_provenance`: `magmax_provenance.safetensors` / `.json` and, with matplotlib, the layers × tasks
        heatmap `magmax_provenance.png` in `output_dir` (the main process)."""
        if not self.state.track_winners or not trainer.is_world_process_zero():
            return
        from ..metrics import plot_provenance, save_provenance

        output_dir = trainer.args.output_dir
        summary = save_provenance(output_dir, self.state.winners, self.task_names[: self.num_tasks_done])
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            logger.info('matplotlib is not installed: no provenance plot (pip install "hf_magmax[plot]").')
            return
        plot_provenance(summary, os.path.join(output_dir, "magmax_provenance.png"))

    def write_results(self, trainer: Any) -> None:
        if trainer.is_world_process_zero():
            write_results(trainer.args.output_dir, self.summary())

    # -- checkpoints -----------------------------------------------------------------------------------------------

    def save(self, directory: str, task: int, main: bool = True) -> None:
        """The merge state and the run state (`magmax_state.json`, atomically, last), which records θ_0's file (relative
        to `directory`) and sha256; θ_0 itself is written once per run ([`write_base`]).

        A sharded state (FSDP2) is saved by every rank, each its own `magmax_merge_state-rank{r}.pt`; `main` says
        whether this process writes the run state, after every rank's file is written. Otherwise only the main
        process calls it."""
        ranks = _sharded_world(self.state)
        rank = _rank() if ranks else None
        self.state.save(directory, rank=rank)
        if self.base_path is not None:
            base = {"file": os.path.relpath(self.base_path, directory), "sha256": self.base_sha256}
        else:  # no run-level θ_0 file (sharded from the start): this rank's θ_0 in the checkpoint
            self.state.write_base(os.path.join(directory, _rank_name(LEGACY_BASE_NAME, rank)))
            base = None
        if ranks:
            import torch.distributed as dist

            dist.barrier()  # every rank's files are written before the run state marks the checkpoint complete
        if not main:
            return
        record = {
            "task": task,
            "num_tasks_done": self.num_tasks_done,
            "task_names": self.task_names,
            "method": self.spec.method,
            "method_kwargs": self.spec.method_options,
            "base": base,
            "hub_revisions": self.releases.to_list(),
            **({"merge_state_ranks": ranks} if ranks else {}),
            **self.matrices.to_dict(),
        }
        path = os.path.join(directory, STATE_NAME)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)
        os.replace(path + ".tmp", path)

    def load(self, directory: str) -> int:
        """Restore from a checkpoint directory; returns the index of the task the checkpoint was taken in.

        Raises `FileNotFoundError` for a directory that is no MagMaxTrainer checkpoint, [`CheckpointError`] naming
        the file for an incomplete or corrupt one, and `ValueError` for a checkpoint of another sequence or merge.
        Nothing is changed unless every file reads.
        """
        path = os.path.join(directory, STATE_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{directory!r} is not a MagMaxTrainer checkpoint (no {STATE_NAME}): resume from a checkpoint written "
                "by MagMaxTrainer, e.g. output_dir/task-01-<name>/checkpoint-<step>."
            )
        try:
            with open(path, encoding="utf-8") as f:
                record = json.load(f)
            int(record["task"]), record["task_names"], record["method"], record["seq_matrix"]
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{path!r} is truncated or corrupt ({type(err).__name__}: {err}).") from None
        if record["task_names"] != self.task_names:
            raise ValueError(
                f"the checkpoint was written for tasks {record['task_names']}, but `train_datasets` has "
                f"{self.task_names}: resume with the same task sequence."
            )
        if record["method"] != self.spec.method:
            raise ValueError(
                f"the checkpoint merges with `{record['method']}`, but `merge_method` is `{self.spec.method}`: resume "
                "with the same merge method."
            )
        saved_options = record.get("method_kwargs")
        if saved_options is not None and saved_options != self.spec.method_options:
            raise ValueError(
                f"the checkpoint merges with options {saved_options}, but the config has {self.spec.method_options}: "
                "resume with the same `merge_density`/`merge_seed`/`merge_alpha`."
            )
        trainer_state = os.path.join(directory, "trainer_state.json")
        try:
            with open(trainer_state, encoding="utf-8") as f:
                json.load(f)
        except FileNotFoundError:
            raise CheckpointError(f"{trainer_state!r} is missing: the checkpoint is incomplete.") from None
        except ValueError as err:
            raise CheckpointError(f"{trainer_state!r} is truncated or corrupt ({err}).") from None
        ranks = record.get("merge_state_ranks")
        rank = None
        if ranks:  # a sharded state: this rank's file
            rank, world = _rank(), _world_size()
            if int(ranks) != world:
                raise ValueError(
                    f"the checkpoint {directory!r} holds a merge state sharded over {ranks} processes, but this run "
                    f"has {world}: resume with {ranks} processes and the same FSDP layout."
                )
        merge_state = MergeState.read(directory, self.state.device, rank=rank)
        recorded = record.get("base")
        if recorded:
            pattern = os.path.normpath(os.path.join(directory, recorded["file"]))
            sha256 = recorded.get("sha256")
            base_path = pattern.replace("{rank}", str(_rank()))  # one file per rank for a θ_0 taken sharded
            if isinstance(sha256, list):
                if len(sha256) != _world_size():
                    raise ValueError(
                        f"the checkpoint {directory!r} holds θ_0 in {len(sha256)} per-rank files, but this run has "
                        f"{_world_size()} processes: resume with {len(sha256)} processes and the same sharding."
                    )
                sha256 = sha256[_rank()]
            base = MergeState.read_base(base_path, sha256, directory)
        else:  # θ_0 inside the checkpoint (a checkpoint of an older version, or meta weights)
            base_path = os.path.join(directory, _rank_name(LEGACY_BASE_NAME, rank))
            base = MergeState.read_base(base_path, None, directory)
        self.state.restore(base, merge_state, base_file=base_path)
        self.base_path = os.path.abspath(pattern) if recorded else None
        self.base_sha256 = recorded.get("sha256") if recorded else None
        self.matrices.load(record)
        self.releases.load(record.get("hub_revisions"))
        return int(record["task"])
