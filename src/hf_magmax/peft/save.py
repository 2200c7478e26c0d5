# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""Writing a LoRA merge: the atomic output directory, its `magmax_config.yaml` (the one schema,
[`hf_magmax.config.MergeConfig`]) and its model card; [`run_lora_merge`] runs a whole merge from a config.

peft is imported inside the functions.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from .deltas import _base_model
from .loading import check_output_not_input
from .merge import LoraMergeResult, merge_adapters


if TYPE_CHECKING:
    from ..config import MergeConfig
    from ..io import PinnedFiles

logger = logging.getLogger(__name__)

__all__ = ["lora_merge_config", "run_lora_merge", "save_lora_merge"]

#: The merge configuration written next to the output (and, as YAML, into its model card).
LORA_MERGE_CONFIG_NAME = "magmax_config.yaml"

_BASE_FILES_SKIPPED = ("config.json", "generation_config.json", "README.md", LORA_MERGE_CONFIG_NAME)


def _recorded_path(source: str | None) -> str | None:
    """A local path as an absolute path (so the config re-runs from anywhere); a Hub id or a name as given."""
    if source is None:
        return None
    local = os.path.expanduser(source)
    return os.path.abspath(local) if os.path.exists(local) else source


def _hub_id(source: str | None) -> str | None:
    """`source` if it is a Hub repo id (what a card's `base_model` may hold), never a local path."""
    from ..io import is_hub_id

    if not source or os.path.exists(os.path.expanduser(source)) or not is_hub_id(source):
        return None
    return source


def lora_merge_config(
    result: LoraMergeResult, base: str | os.PathLike | None = None, output_dir: str | os.PathLike | None = None
) -> MergeConfig:
    """The [`~hf_magmax.config.MergeConfig`] of a LoRA merge: what `hf-magmax merge-lora CONFIG.yaml` re-runs."""
    from ..config import MergeConfig

    spec = result.spec
    return MergeConfig(
        base=_recorded_path(os.fspath(base) if base is not None else result.base_model_name_or_path),
        adapters=[_recorded_path(a) for a in result.adapters],
        method=result.method,
        scaling_coef=None if spec is None or spec.scaling_coef_is_default else result.scaling_coef,
        density=result.method_kwargs.get("density"),
        seed=result.method_kwargs.get("seed"),
        output_dir=None if output_dir is None else os.path.abspath(os.path.expanduser(os.fspath(output_dir))),
        lora_output=result.lora_output,
        rank=result.rank,
        svd=result.svd,
        svd_seed=result.svd_seed,
        dtype=result.dtype,
        allow_non_finite=result.allow_non_finite,
        save_provenance=result.save_provenance,
    )


def _model_card(result: LoraMergeResult, config: MergeConfig, provenance: dict | None = None):
    """The card of a LoRA merge, through the one card builder ([`hf_magmax.hub.build_model_card`]); local paths are
    shown by their folder names only (a card is published)."""
    from ..hub import build_model_card
    from ..io import public_name

    base = config.base
    model_class = "AutoModel" if result.model is None else type(_base_model(result.model)).__name__
    adapter_output = result.lora_output == "adapter"
    hub_base = _hub_id(base)
    base_name = hub_base or (Path(base).name if base else "the base model")
    adapters = "\n".join(f"| {i + 1} | `{public_name(a)}` |" for i, a in enumerate(result.adapters))
    sections = {}
    if adapter_output:
        ranks = sorted(set(result.adapter.ranks.values())) or [0]
        worst = sorted(result.errors.items(), key=lambda kv: -kv[1])[:10]
        rows = "\n".join(f"| `{m}` | {result.adapter.ranks[m]} | {e:.3g} |" for m, e in worst)
        what = (
            f"A LoRA adapter for `{base_name}`: the merge `λ·ΔW_sel` of the adapters below, computed on their dense "
            "weight deltas ΔW = scaling·B@A (per element, with the merge engine of hf_magmax) and re-factored by "
            f"truncated SVD into rank {ranks[0] if len(ranks) == 1 else f'{ranks[0]}–{ranks[-1]}'} "
            "(`lora_alpha = r`, λ folded into the factors)."
        )
        usage = (
            f"```python\nfrom peft import PeftModel\nfrom transformers import {model_class}\n\n"
            f'base = {model_class}.from_pretrained("{hub_base or "<the base model>"}")\n'
            'model = PeftModel.from_pretrained(base, "<this repo or directory>")\n```'
        )
        sections["Reconstruction error"] = (
            f"Overall relative error ‖λΔW_sel − BA‖_F / ‖λΔW_sel‖_F: **{result.overall_error:.4g}** over "
            f"{len(result.errors)} module(s) ({len(result.adapter.peft_config.modules_to_save or [])} module(s) saved "
            f"in full as `modules_to_save`).\n\n| module (largest errors first) | rank | relative error |\n"
            f"|---|---|---|\n{rows}"
        )
    else:
        what = (
            f"`{base_name}` with the merge of the LoRA adapters below folded into its weights, θ_0 + λ·ΔW_sel, where "
            "ΔW_sel merges the adapters' dense weight deltas ΔW = scaling·B@A per element (merge engine of "
            "hf_magmax). A normal transformers model: no PEFT needed to load it."
        )
        usage = (
            f"```python\nfrom transformers import {model_class}\n\n"
            f'model = {model_class}.from_pretrained("<this repo or directory>")\n```'
        )
    describe = result.spec.describe() if result.spec is not None else result.method
    rank_note = ""
    if adapter_output:
        rank_note = f" (rank: {result.rank if result.rank is not None else 'per module, the sum of the input ranks'})"
    details = (
        f"- **method:** `{result.method}` ({describe})\n- **scaling coefficient λ:** {result.scaling_coef:g}\n"
        f"- **output:** {result.lora_output}{rank_note}\n\n| task | adapter |\n|---|---|\n{adapters}"
    )
    if provenance is not None:
        from ..metrics import PROVENANCE_FILE, PROVENANCE_SUMMARY_FILE, provenance_table

        sections["Provenance"] = (
            "Which adapter won each element of the merged ΔW (ties go to the later adapter): the winner maps are in "
            f"`{PROVENANCE_FILE}`, the shares per tensor and per layer in `{PROVENANCE_SUMMARY_FILE}`.\n\n"
            + provenance_table(provenance)
        )
    return build_model_card(
        "MagMax LoRA merge",
        what,
        {"Merge details": details, **sections, "Usage": usage},
        base_model=hub_base,
        base_model_relation="adapter" if adapter_output else "merge",
        library_name="peft" if adapter_output else "transformers",
        method=result.method,
        lora=True,
        merge_config=config.to_yaml(public=True),  # a card is for others: no local path in it
        config_file=LORA_MERGE_CONFIG_NAME,
        rerun_command=f"hf-magmax merge-lora {LORA_MERGE_CONFIG_NAME}",
    )


def _check_output_dir(output_dir: str | os.PathLike, overwrite: bool) -> None:
    """Fail early if `output_dir` is a file, or a non-empty directory without `overwrite`."""
    from ..io import check_output_dir

    check_output_dir(Path(os.path.expanduser(os.fspath(output_dir))).absolute(), overwrite)


def _inputs(base: str | None, adapters: list[str]) -> list[tuple[str, str]]:
    return ([("base model", base)] if base else []) + [("adapter", a) for a in adapters]


def save_lora_merge(
    result: LoraMergeResult,
    output_dir: str | os.PathLike,
    overwrite: bool = False,
    base: str | os.PathLike | None = None,
    pins: PinnedFiles | None = None,
) -> str:
    """Write a LoRA merge atomically: the adapter (or merged model), a model card and `magmax_config.yaml`.

    Everything is written into a temporary directory beside `output_dir` and renamed into place at the end: after an
    error nothing is left at `output_dir`. An `output_dir` that is, contains or lies inside the base or an input
    adapter is refused. A merged model also gets the base directory's tokenizer and other non-weight files (when
    `base` is a local directory).

    Args:
        result ([`LoraMergeResult`]):
            What [`merge_adapters`] returned.
        output_dir (`str` or `os.PathLike`):
            The output directory; must be empty or absent unless `overwrite`.
        overwrite (`bool`, *optional*, defaults to `False`):
            Replace a non-empty `output_dir` (the old one is removed only once the new one is in place).
        base (`str` or `os.PathLike`, *optional*):
            The base model as the user named it (for the card and the config); defaults to its `name_or_path`.
        pins ([`~hf_magmax.io.PinnedFiles`], *optional*):
            The input files as they were when the merge read them: checked before the commit (a base or adapter
            file changed meanwhile is an error naming it, and nothing is written).

    Returns:
        `str`: the output directory.
    """
    from ..hub import write_model_card
    from ..io import check_output_dir, copy_non_weight_files, non_weight_files, public_name, staged_output_dir

    output = Path(os.path.expanduser(os.fspath(output_dir))).absolute()
    config = lora_merge_config(result, base, output)
    check_output_not_input(output, _inputs(config.base, config.adapters))
    check_output_dir(output, overwrite)
    base_dir = Path(config.base) if config.base else None
    copies_base_files = result.lora_output == "merged" and base_dir is not None and base_dir.is_dir()
    if copies_base_files:
        non_weight_files(base_dir, _BASE_FILES_SKIPPED)  # a link out of the base is refused before anything is written
    with staged_output_dir(output, overwrite) as staging:
        result.save_pretrained(staging)
        if copies_base_files:
            written = [path.name for path in staging.iterdir()]  # what save_pretrained wrote stays as it is
            copy_non_weight_files(base_dir, staging, skip_names=(*_BASE_FILES_SKIPPED, *written))
        (staging / LORA_MERGE_CONFIG_NAME).write_text(config.to_yaml(), encoding="utf-8")
        provenance = None
        if result.winners is not None:
            from ..metrics import save_provenance

            names = [f"{i + 1}. {public_name(a)}" for i, a in enumerate(result.adapters)]  # published: no path
            provenance = save_provenance(staging, result.winners, names)
        write_model_card(staging, _model_card(result, config, provenance))
        if pins is not None:
            pins.check()  # the base's side files were copied just now, its weights and the adapters read before
    logger.info("LoRA merge (%s, %s) written to %s", result.method, result.lora_output, output)
    return str(output)


@contextlib.contextmanager
def _progress_bars(show: bool) -> Iterator[None]:
    """Hide transformers' loading bars too when `show` is false (restored afterwards)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    if not show and enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if not show and enabled:
            hf_logging.enable_progress_bar()


def run_lora_merge(config: MergeConfig, show_progress: bool = True, source: str | None = None) -> str:
    """Run a whole LoRA merge from a [`~hf_magmax.config.MergeConfig`] (what `hf-magmax merge-lora` does).

    Validates the config and checks the output path (not an input, not a file, empty unless `overwrite`) before
    anything is loaded, merges with [`merge_adapters`], writes with [`save_lora_merge`] and, with `push_to_hub`,
    uploads the result (a failed upload raises [`hf_magmax.hub.HubPushError`] and keeps the local output).

    Args:
        config ([`~hf_magmax.config.MergeConfig`]):
            A config with `adapters` (kind `"lora"`).
        show_progress (`bool`, *optional*, defaults to `True`):
            Show progress bars.
        source (`str`, *optional*):
            Where the config came from (a YAML path), named in errors.

    Returns:
        `str`: the output directory.
    """
    config.validate(source)
    if config.kind != "lora":
        raise ValueError("`adapters` is missing: a LoRA merge needs `adapters` (use `hf-magmax merge` for `models`).")
    check_output_not_input(config.output_dir, _inputs(config.base, list(config.adapters)))
    _check_output_dir(config.output_dir, config.overwrite)
    from ..io import PinnedFiles, non_weight_files, pin_checkpoint

    base_dir = Path(os.path.expanduser(config.base)) if config.base else None
    side_files: list[str] = []
    if config.lora_output == "merged" and base_dir is not None and base_dir.is_dir():
        side_files = non_weight_files(base_dir, _BASE_FILES_SKIPPED)  # a link out of the base: refused before any work
    pins = PinnedFiles()  # every local input as it is now, checked before the commit
    if base_dir is not None:
        pin_checkpoint(pins, base_dir, side_files)
    for adapter in config.adapters:
        pin_checkpoint(pins, os.path.expanduser(adapter))
    with _progress_bars(show_progress):
        result = merge_adapters(
            config.base,
            config.adapters,
            method=config.spec,
            lora_output=config.lora_output,
            rank=config.rank,
            svd=config.svd,
            svd_seed=config.svd_seed,
            dtype=config.dtype,
            device=config.device,
            allow_non_finite=config.allow_non_finite,
            show_progress=show_progress,
            save_provenance=config.save_provenance,
        )
        path = save_lora_merge(result, config.output_dir, overwrite=config.overwrite, base=config.base, pins=pins)
    if result.lora_output == "adapter":
        logger.info("overall relative reconstruction error of the adapter: %.4g", result.overall_error)
    if config.push_to_hub is not None:
        from ..hub import interrupted_push, push_to_hub

        with interrupted_push(path, config.push_to_hub):
            push_to_hub(path, config.push_to_hub, private=config.private, commit_message="Upload MagMax LoRA merge")
    return path
