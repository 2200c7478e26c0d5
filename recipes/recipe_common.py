# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""Shared plumbing of the recipes: `--config` YAML parsing (TRL's `TrlParser` behaviour), logging, dataset loading.

Not part of the hf_magmax library: the recipes import it from their own folder (`recipes/` is the script's folder, so
it is on `sys.path` under `python`, `torchrun` and `accelerate launch`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import datasets
import transformers
import yaml
from transformers import HfArgumentParser


logger = logging.getLogger(__name__)


class RecipeParser(HfArgumentParser):
    """`HfArgumentParser` with `--config path.yaml`: the YAML values become defaults, the command line overrides them.

    A YAML key that no dataclass field knows is an error (a typo would otherwise be ignored silently). YAML lists of
    mappings and mappings are passed to their field as JSON strings (the recipes' `tasks` fields, and
    `TrainingArguments`' dict-or-JSON fields such as `lr_scheduler_kwargs` or `fsdp_config`).
    """

    def parse_args_and_config(self, args: Sequence[str] | None = None) -> tuple[Any, ...]:
        args = list(sys.argv[1:] if args is None else args)
        config_path = None
        if "--config" in args:
            i = args.index("--config")
            if i + 1 >= len(args):
                raise ValueError("`--config` needs a path to a YAML file.")
            config_path = args[i + 1]
            del args[i : i + 2]
        else:
            for i, a in enumerate(args):
                if a.startswith("--config="):
                    config_path = a.split("=", 1)[1]
                    del args[i]
                    break
        if config_path is not None:
            self._apply_yaml_defaults(config_path)
        return self.parse_args_into_dataclasses(args=args, look_for_args_file=False)

    def _apply_yaml_defaults(self, path: str) -> None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"`--config` file {path!r} does not exist.")
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
        if not isinstance(values, dict):
            raise ValueError(f"`--config` file {path!r} must hold a YAML mapping of argument names to values.")
        known = {action.dest: action for action in self._actions}
        unknown = sorted(k for k in values if k not in known)
        if unknown:
            raise ValueError(
                f"`--config` file {path!r} sets unknown argument(s) {', '.join(unknown)}; run the recipe with "
                "`--help` for the accepted names."
            )
        defaults = {}
        for key, value in values.items():
            if isinstance(value, dict) or (isinstance(value, list) and any(isinstance(v, dict) for v in value)):
                value = json.dumps(value)
            defaults[key] = value
            known[key].required = False
        self.set_defaults(**defaults)


def parse_recipe_args(dataclass_types: Iterable[type], args: Sequence[str] | None = None) -> tuple[Any, ...]:
    """Parse the recipe's dataclasses from `--config` YAML and the command line."""
    return RecipeParser(list(dataclass_types)).parse_args_and_config(args)


def setup_logging(training_args) -> None:
    """Log like the transformers examples: INFO on the main process, warnings elsewhere."""
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    level = training_args.get_process_log_level()
    for name in ("hf_magmax", "__main__", "recipe_common"):
        logging.getLogger(name).setLevel(level)
    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()


def end_launch() -> None:
    """The end of a recipe's process (after `main()`): every rank done, then the process group destroyed, as
    Accelerate's `Accelerator.end_training` does. Left to the interpreter's exit, the gloo group of a CPU launch can
    abort a rank after all its work (`terminate called without an active exception`, exit code -6)."""
    from accelerate import PartialState

    state = PartialState()
    state.wait_for_everyone()
    state.destroy_process_group()


def check_launch(training_args) -> None:
    """Refuse, before any data is read, a launch that would not train the way it was asked to:

    - several processes launched but no process group joining them (each would train alone and all would write the
      same `output_dir`);
    - an FSDP accelerate config (`distributed_type: FSDP`, passed on by `accelerate launch` as `ACCELERATE_USE_FSDP`)
      on CPU: Accelerate switches to FSDP only from a multi-accelerator state (`MULTI_GPU`, `MULTI_XPU`, ...: see
      `AcceleratorState.__init__`); on CPU it keeps `MULTI_CPU`, and the run would silently train DDP, every rank
      holding the whole model.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and training_args.world_size != launched:
        raise RuntimeError(
            f"{launched} processes were launched but the training sees world size {training_args.world_size}: the "
            "processes are not joined. Launch with `torchrun --nproc_per_node N` (DDP over gloo on CPU), or use an "
            "accelerate config that runs on this machine."
        )
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and training_args.device.type == "cpu":
        raise RuntimeError(
            "the accelerate config asks for FSDP, but Accelerate runs FSDP on GPUs (or other accelerators) only: on CPU "
            "it would train DDP instead, every rank holding the whole model. Use GPUs, or on CPU launch with "
            "`--config_file recipes/accelerate_configs/deepspeed_zero3.yaml` (weights partitioned, `DS_ACCELERATOR=cpu`) "
            "or `torchrun --nproc_per_node N` (DDP)."
        )


def resume_argument(training_args) -> str | bool | None:
    """`--resume_from_checkpoint true` resumes from the last checkpoint in `output_dir`; a path resumes from there."""
    value = training_args.resume_from_checkpoint
    if isinstance(value, str) and value.lower() in ("true", "last", "1", "yes"):
        return True
    if isinstance(value, str) and value.lower() in ("false", "0", "no", "none", ""):
        return None
    return value


def parse_json_list(value: Any, name: str) -> list:
    """A YAML/CLI field holding a list (given as a JSON string by the parser)."""
    if value is None:
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(f"`{name}` must be a list (YAML) or a JSON list string, got {value!r}: {err}") from err
    if not isinstance(value, list):
        raise ValueError(f"`{name}` must be a list, got {type(value).__name__}.")
    return value


def _is_saved_dataset(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "dataset_info.json")) or os.path.isfile(
        os.path.join(path, "dataset_dict.json")
    )


def dataset_features(path: str, name: str | None = None, split: str | None = None) -> dict | None:
    """The features of a dataset, read without downloading its data (a Hub dataset: its metadata only).

    Returns `None` when they cannot be known before loading (the check then runs after loading).
    """
    if os.path.exists(path):
        return None  # local: loading is cheap, columns are checked after loading
    try:
        builder = datasets.load_dataset_builder(path, name)
    except Exception as err:  # noqa: BLE001 - re-raised with the argument named
        raise ValueError(
            f"cannot read dataset {path!r} (config {name!r}): {err}. Check the dataset id, or pass a local path."
        ) from err
    return dict(builder.info.features) if builder.info.features is not None else None


def load_split(path: str, split: str, name: str | None = None, cache_dir: str | None = None) -> datasets.Dataset:
    """Load one split from a Hub id, a `save_to_disk` folder, a data folder (e.g. an imagefolder) or a data file."""
    if os.path.isdir(path) and _is_saved_dataset(path):
        loaded = datasets.load_from_disk(path)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"dataset {path!r} has no split {split!r}; its splits are {', '.join(loaded)}.")
            return loaded[split]
        return loaded
    if os.path.isfile(path):
        ext = os.path.splitext(path)[1].lstrip(".")
        builder = {"jsonl": "json", "txt": "text", "tsv": "csv"}.get(ext, ext)
        kwargs = {"delimiter": "\t"} if ext == "tsv" else {}
        return datasets.load_dataset(builder, data_files=path, split="train", cache_dir=cache_dir, **kwargs)
    return datasets.load_dataset(path, name, split=split, cache_dir=cache_dir)


def check_columns(columns: Iterable[str], required: dict[str, str | None], where: str) -> None:
    """Raise a `ValueError` naming the argument when a required column is missing."""
    columns = list(columns)
    for argument, column in required.items():
        if column is not None and column not in columns:
            raise ValueError(
                f"{where}: `{argument}` = {column!r} is not a column of the dataset; its columns are "
                f"{', '.join(columns)}. Set `{argument}` to one of them."
            )


def write_json(path: str, payload: dict) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, ensure_ascii=False, default=str)
    os.replace(tmp, path)


def args_to_dict(*objs) -> dict:
    """Dataclass arguments as a JSON-friendly dict (for the results file). A field given as a JSON list or mapping
    (`tasks`) is recorded parsed, so that a push names its local datasets by folder name only (the Hub rewrites the
    local paths under known keys such as `dataset`, never inside a string)."""
    out = {}
    for obj in objs:
        if hasattr(obj, "to_dict"):
            out.update(obj.to_dict())
        else:
            out.update(dataclasses.asdict(obj))
    for key, value in out.items():
        if isinstance(value, str) and value.lstrip().startswith(("[", "{")):
            try:
                out[key] = json.loads(value)
            except ValueError:
                pass
    return out


def finish_run(trainer, training_args, script_args, label_names, recipe: str) -> dict:
    """Write `results.json` (arguments + the trainer's continual results) and push if asked."""
    results_path = os.path.join(training_args.output_dir, "continual_results.json")
    continual = {}
    if os.path.isfile(results_path):
        with open(results_path, encoding="utf-8") as f:
            continual = json.load(f)
    from hf_magmax.trainer.deepspeed import zero_stage

    payload = {
        "recipe": recipe,
        "world_size": training_args.world_size,
        "distributed_type": str(trainer.accelerator.distributed_type).rsplit(".", 1)[-1],
        "zero_stage": zero_stage(trainer),
        "label_names": label_names,
        "script_args": args_to_dict(script_args),
        "training_args": json.loads(training_args.to_json_string()),
        "continual_results": continual,
    }
    if trainer.is_world_process_zero():
        write_json(os.path.join(training_args.output_dir, "results.json"), payload)
        logger.info("results written to %s", os.path.join(training_args.output_dir, "results.json"))
    if training_args.push_to_hub:
        trainer.push_to_hub()
    return payload
