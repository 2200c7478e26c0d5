# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""[`HubReleases`]: a continual release on the Hub, one revision per task (`push_every_task=True`).

After task k the run's merged model `θ_0 + λ · merge(τ_1..τ_k)` is written as a `save_pretrained` folder (config,
weights in the model's dtype, tokenizer/processor, the card of the tasks so far) to
`output_dir/magmax_releases/<branch>/` and published with [`~hf_magmax.hub.push_release`]: one commit on `main` (so
`main` always holds the latest model, also while the run goes on) and the branch `hub_revision_pattern.format(k=k)`
(`after-task-<k>`) at that very commit.

What was pushed (task, branch, commit) is recorded in the run state that checkpoints carry (`magmax_state.json`) and
under `hub_revisions` in `continual_results.json`. A resumed run skips the tasks recorded there, and before any push
asks the Hub for the repo's branches (`list_repo_refs`): a branch that already exists is never pushed again (its
commit is recorded instead), so a task is not published twice even when the record was lost. A run killed between a
task's commit on `main` and the creation of its branch is found too: each release commit names its branch in its
description, and when `main`'s head is the missing branch's release, the branch is created there instead of
committing the task again.

A failed push is a warning, not an error: a continual run can take days, and a Hub outage must not lose it. The
folder is kept (named in the warning and in the record, with the command that pushes it later to its branch, leaving
`main` to the latest model), and training goes on.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from typing import Any

from torch import nn

from ..io.output import RELEASES_DIR
from .state import unwrap


logger = logging.getLogger(__name__)

__all__ = ["RELEASES_DIR", "HubReleases"]

#: Record statuses: pushed by this run, found on the Hub (not pushed again), or a failed push.
PUSHED, ON_HUB, FAILED = "pushed", "on_hub", "failed"


class HubReleases:
    """The per-task Hub revisions of one run: the push after each task, and the record of what was pushed.

    Args:
        options ([`MagMaxOptions`]): `push_every_task` and `hub_revision_pattern` are read from it.
        task_names (`list[str]`): the tasks, in order (`{name}` of the pattern).
    """

    def __init__(self, options: Any, task_names: Sequence[str]) -> None:
        self.options = options
        self.task_names = task_names
        #: one entry per task pushed or tried: task (1-based), task_name, branch, status, commit, url, repo_id, ...
        self.records: list[dict[str, Any]] = []

    @property
    def enabled(self) -> bool:
        return bool(getattr(self.options, "push_every_task", False))

    def branch(self, task: int) -> str:
        """The branch of `task` (0-based index) under `hub_revision_pattern`."""
        from ..hub import format_revision

        return format_revision(self.options.hub_revision_pattern, task + 1, self.task_names[task])

    def published(self, task: int) -> dict[str, Any] | None:
        """The record of `task` (0-based) if it is on the Hub already (pushed by this run, or found there)."""
        for record in reversed(self.records):
            if record.get("task") == task + 1 and record.get("status") in (PUSHED, ON_HUB):
                return record
        return None

    # -- the record (checkpoints, continual_results.json) -------------------------------------------------------------

    def to_list(self) -> list[dict[str, Any]]:
        return [dict(record) for record in self.records]

    def load(self, records: Any) -> None:
        """Restore the record of a checkpoint (a list of dicts; anything else is ignored)."""
        self.records = [dict(r) for r in records if isinstance(r, dict)] if isinstance(records, list) else []

    def recover(self, results_path: str) -> None:
        """Add the revisions that `continual_results.json` records and the checkpoint does not (a checkpoint taken
        before a task's push predates its record). Read on resume, before the file is written again."""
        import json

        try:
            with open(results_path, encoding="utf-8") as f:
                results = json.load(f)
        except (OSError, ValueError):
            return
        if not isinstance(results, dict) or results.get("task_names") != list(self.task_names):
            return
        known = {(r.get("task"), r.get("status")) for r in self.records}
        for record in results.get("hub_revisions") or []:
            if isinstance(record, dict) and (record.get("task"), record.get("status")) not in known:
                self.records.append(dict(record))

    # -- the push ---------------------------------------------------------------------------------------------------

    def publish(self, run: Any, trainer: Any, model: nn.Module, task: int) -> dict[str, Any] | None:
        """After `task` (0-based) was folded and evaluated: push the merged model as its revision (main process only).

        Returns the new record, or `None` when nothing was tried (not enabled, not the main process, already
        published).
        """
        if not self.enabled or trainer is None or not trainer.is_world_process_zero():
            return None
        k, name = task + 1, self.task_names[task]
        branch = self.branch(task)
        done = self.published(task)
        if done is not None:
            logger.info("Task %d (%s) is already on the Hub as %s (%s): not pushed again.", k, name, branch, done)
            return None
        from ..hub import HubPushError, create_release_branch, find_release_commit, hub_branches, push_release

        args = trainer.args
        repo_id, token, private = args.hub_model_id, args.hub_token, bool(args.hub_private_repo)
        record: dict[str, Any] = {"task": k, "task_name": name, "branch": branch, "repo_id": repo_id}
        folder = os.path.join(args.output_dir, RELEASES_DIR, branch.replace("/", "--"))
        if run.state.sharded:
            return self._failed(
                record,
                "push_every_task does not support sharded (FSDP) weights yet: no rank holds the whole merged model; "
                "push the final model with `trainer.push_to_hub()`",
                None,
            )
        self.write_folder(run, trainer, model, folder, branch)  # first: a failed push keeps it
        try:
            branches = hub_branches(repo_id, token=token)
            if branches is not None and branch in branches:
                record.update(status=ON_HUB, commit=branches[branch])
                logger.warning(
                    "The branch %r already exists in the Hub repo %r (commit %s): task %d (%s) is not pushed again "
                    "(a resumed run's earlier push). For a new run, choose another `hub_revision_pattern` or delete "
                    "the branch.",
                    branch, repo_id, branches[branch], k, name,
                )  # fmt: skip
                self.records.append(record)
                shutil.rmtree(folder, ignore_errors=True)
                return record
            # killed between its commit on main and its branch: main's head is this task's release; branch it there
            orphan = find_release_commit(repo_id, branch, token=token) if branches is not None else None
            if orphan is not None:
                create_release_branch(repo_id, branch, orphan, token=token)
                record.update(status=ON_HUB, commit=orphan)
                logger.warning(
                    "Task %d (%s) was committed to main of %r (commit %s) by an earlier, interrupted run, but its branch "
                    "%r was missing: created it at that commit (not pushed again).",
                    k, name, repo_id, orphan, branch,
                )  # fmt: skip
                self.records.append(record)
                shutil.rmtree(folder, ignore_errors=True)
                return record
            message = f"{name}: merged model after task {k}/{len(self.task_names)} ({run.spec.method})"
            pushed = push_release(folder, repo_id, branch, private=private, token=token, commit_message=message)
        except HubPushError as err:
            return self._failed(record, str(err), folder)
        record.update(status=PUSHED, commit=pushed["commit"], url=pushed["url"], repo_id=pushed["repo_id"])
        self.records.append(record)
        shutil.rmtree(folder, ignore_errors=True)  # on the Hub now: a full model per task would fill the disk
        logger.info("Task %d (%s): merged model pushed to %s, branch %s and main.", k, name, pushed["url"], branch)
        return record

    def _failed(self, record: dict[str, Any], error: str, folder: str | None) -> dict[str, Any]:
        error = error.rstrip(".")
        if folder is not None and folder not in error:
            error += f"; the local output is kept at {folder}"
        record.update(status=FAILED, error=error, folder=folder)
        if folder is not None:
            # to the branch only: `main` may hold a later task's model by then
            record["retry"] = (
                f'python -c "from hf_magmax.hub import push_to_hub; push_to_hub({folder!r}, '
                f'{record["repo_id"]!r}, revision={record["branch"]!r})"'
            )
        logger.warning(
            "Task %d (%s): the Hub revision %r was not pushed: %s. Training goes on; the failure is recorded under "
            "`hub_revisions` in continual_results.json%s.",
            record["task"], record["task_name"], record["branch"], error,
            f" (push it later with: {record['retry']})" if folder is not None else "",
        )  # fmt: skip
        self.records.append(record)
        return record

    def write_folder(self, run: Any, trainer: Any, model: nn.Module, folder: str, branch: str) -> None:
        """Write the merged model after the tasks so far to `folder`: `save_pretrained` (config, weights in the
        model's dtype), the tokenizer/processor, the card and, with `save_provenance`, the winner maps so far
        (atomically: a `.tmp` folder renamed at the end)."""
        from .trainer import _model_card

        tmp = folder + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        target = unwrap(model)
        with run.merged_weights(model, target.state_dict()) as apply:
            apply(run.current_coef())
            if hasattr(target, "save_pretrained"):
                target.save_pretrained(tmp)
            else:  # a plain nn.Module: its weights only (shared tensors handled by safetensors)
                from safetensors.torch import save_model

                save_model(target, os.path.join(tmp, "model.safetensors"))
        processing = getattr(trainer, "processing_class", None)
        if processing is not None and hasattr(processing, "save_pretrained"):
            processing.save_pretrained(tmp)
        if run.state.track_winners:  # the winner maps of the tasks so far, beside the weights
            from ..metrics import save_provenance

            save_provenance(tmp, run.state.winners, run.task_names[: run.num_tasks_done])
        title = f"{str(trainer.args.hub_model_id).rsplit('/', 1)[-1]} ({branch})"
        with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
            f.write(_model_card(run, model, trainer.args, revision=branch, model_name=title))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
