# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""The `hf-magmax` command line.

Start-up time matters: this module imports only the standard library at import time. Each subcommand imports what it
needs (torch, transformers, peft, ...) inside its `run` function.

Each subcommand is a pair of functions, `_add_<name>_parser(subparsers)` and `_run_<name>(args) -> int`, registered
in `SUBCOMMANDS`. User mistakes (`ValueError`, `KeyError`, `FileNotFoundError`, `TypeError`, ...) end with exit code
2 and one line on stderr; `--debug` (or `HF_MAGMAX_DEBUG=1`) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn


logger = logging.getLogger(__name__)

#: Exceptions that mean "the user asked for something wrong": reported in one line, exit code 2.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    KeyError,
    TypeError,
    OSError,  # missing, unreadable or unwritable files, and transformers' "can't load this model" errors
    ImportError,
)


def _version() -> str:
    from . import __version__

    return __version__


class _ArgumentParser(argparse.ArgumentParser):
    """An `ArgumentParser` whose errors are one line on stderr naming the argument and the fix, exit code 2.

    argparse prints the whole usage block before its error; a user error here is one line, with the fix (the
    `--help` of the subcommand that was run) at its end. Subparsers inherit this class.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}{_did_you_mean(message)} (see `{self.prog} --help`)\n")

    def parse_known_args(self, args=None, namespace=None):
        """As argparse's, but arguments that no parser knows are reported by the subcommand they were given to, with
        the closest option it has (`hf-magmax merge --methd`: `did you mean --method?`)."""
        namespace, extras = super().parse_known_args(args, namespace)
        command = getattr(namespace, "command", None)
        subparsers = [a for a in self._actions if isinstance(a, argparse._SubParsersAction)]
        if extras and command is not None and subparsers and command in subparsers[0].choices:
            parser = subparsers[0].choices[command]
            options = [option for action in parser._actions for option in action.option_strings]
            flags = [extra.split("=")[0] for extra in extras if extra.startswith("--")]
            hints = [close for flag in flags for close in difflib.get_close_matches(flag, options, n=1)]
            hint = f"; did you mean {' '.join(hints)}?" if hints else ""
            parser.error(f"unrecognized arguments: {' '.join(extras)}{hint}")
        return namespace, extras


def _did_you_mean(message: str) -> str:
    """`; did you mean 'magmax'?` for argparse's `invalid choice: 'maxmag' (choose from ...)`, else ``."""
    found = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)$", message)
    if found is None:
        return ""
    choices = [choice.strip(" '\"") for choice in found.group(2).split(",")]
    lowered = {choice.lower(): choice for choice in choices}
    close = difflib.get_close_matches(found.group(1).lower(), list(lowered), n=1, cutoff=0.5)
    return f"; did you mean '{lowered[close[0]]}'?" if close else ""


class _VersionAction(argparse.Action):
    """`--version`: the version, and whether the fast C merge kernels are in use (looked up only when asked, so that
    `--help` still imports no torch)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None) -> NoReturn:
        from .merging.kernels import c_kernels_status

        sys.stdout.write(f"{parser.prog} {_version()}\n{c_kernels_status()}\n")  # stdout, as argparse's version
        parser.exit(0)


def _method_choices() -> list[str]:
    """The merge methods, read from the merge core (`hf_magmax.merging` does not import torch)."""
    from .merging import ONLINE_MERGES

    return list(ONLINE_MERGES)


def _default_scaling_coefs_text() -> str:
    """'the method's: magmax 0.5, ...', read from `hf_magmax.merging.DEFAULT_SCALING_COEFS`."""
    from .merging import DEFAULT_SCALING_COEFS

    return "the method's: " + ", ".join(f"{name} {coef:g}" for name, coef in DEFAULT_SCALING_COEFS.items())


def _method_option_default(method: str, option: str) -> Any:
    """The default of one method option (`ties` `density`, `random_mix` `seed`, `opcm` `alpha`), from the core."""
    from .merging import ONLINE_MERGES

    return ONLINE_MERGES[method].options[option]


# ---------------------------------------------------------------------------------------------------------------------
# subcommands (each: `_add_<name>_parser` + `_run_<name>`)
# ---------------------------------------------------------------------------------------------------------------------


# (subcommand functions are added below by each feature; keep one pair per subcommand)


# -- merge ----------------------------------------------------------------------------------------------------------

_MERGE_EPILOG = """\
examples:
  hf-magmax merge --base ckpt/base --models ckpt/task1 ckpt/task2 ckpt/task3 --output-dir merged
  hf-magmax merge --base ckpt/base --models ckpt/t1 ckpt/t2 --method ties --density 0.2 --output-dir merged-ties
  hf-magmax merge --base ckpt/base --models ckpt/t1 ckpt/t2 --method opcm --alpha 0.5 --output-dir merged-opcm
  hf-magmax merge merged/magmax_config.yaml --output-dir merged-again      # re-run a merge from its config
  hf-magmax merge merged/magmax_config.yaml --method ties --output-dir m2  # λ null there: ties' default
  hf-magmax merge --base bert-base --models ft1 ft2 --extra-tensors last --output-dir m3  # new heads: the last's
  hf-magmax merge CONFIG.yaml --push-to-hub me/my-merge --private
  hf-magmax merge CONFIG.yaml --push-to-hub me/my-merge --revision after-task-3  # to a branch; main left as it is
  hf-magmax push merged --to-hub me/my-merge                        # push an existing output (e.g. after a failed push)

CONFIG.yaml takes the same fields as the flags (base, models, method, scaling_coef, density, seed, alpha, dtype, device,
max_shard_size, output_dir, overwrite, allow_non_finite, strict_config, extra_tensors, push_to_hub, revision,
private); flags given on the command line override it. Values are type-checked (`overwrite: "false"` is an error).
Every merge saves its configuration as OUTPUT_DIR/magmax_config.yaml and in its model card.
"""


def _add_output_dir_arguments(parser: argparse.ArgumentParser) -> None:
    """`--output-dir` (alias `--output`) and `--overwrite`: one name, help and default on every merge command."""
    parser.add_argument(
        "--output-dir",
        "--output",
        dest="output_dir",
        metavar="DIR",
        help="output directory (required, here or in CONFIG.yaml; --output is an alias)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", default=None, help="replace a non-empty output directory (atomically)"
    )


def _add_publish_arguments(parser: argparse.ArgumentParser) -> None:
    """`--push-to-hub`, `--private` and `--no-progress`: the same flags, help and defaults on every merge command."""
    parser.add_argument(
        "--push-to-hub",
        metavar="REPO_ID",
        help="after writing, upload the output and its card to this Hub repo (a failed upload keeps the local output)",
    )
    parser.add_argument(
        "--private", action="store_true", default=None, help="with --push-to-hub: create a private repo"
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="hide the progress bar (also: HF_HUB_DISABLE_PROGRESS_BARS=1)"
    )


def _add_merge_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "merge",
        help="merge fine-tuned checkpoints of one base model (MagMax and baselines), streaming tensor by tensor",
        description=(
            "Merge T fine-tuned checkpoints θ_1..θ_T of one base model θ_0 into θ_0 + λ·merge(θ_1−θ_0, …, θ_T−θ_0), "
            "reading the memory-mapped inputs one block of rows at a time (memory does not grow with T or the model "
            "size). Inputs are local directories or Hub repo ids (safetensors, sharded or not, or .bin), or local GGUF "
            "files (dequantised as transformers reads them; the output is safetensors, not re-quantised). Everything "
            "is validated before weights are read; the output (sharded safetensors + index, the base's config and "
            "tokenizer files, a model card and magmax_config.yaml) appears atomically, and Ctrl-C, SIGTERM or SIGHUP "
            "leave nothing behind."
        ),
        epilog=_MERGE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "config",
        nargs="?",
        metavar="CONFIG.yaml",
        help="a merge configuration YAML (e.g. a previous merge's magmax_config.yaml); flags override its fields",
    )
    parser.add_argument(
        "--base", help="the base (pretrained) model θ_0: a local directory, a .gguf file or a Hub repo id"
    )
    parser.add_argument(
        "--models",
        nargs="+",
        metavar="MODEL",
        help="the fine-tuned models θ_1..θ_T, in task order (directories, .gguf files or "
        "Hub repo ids); for magmax, ties go to the later task",
    )
    parser.add_argument(
        "--method",
        choices=_method_choices(),
        type=str.lower,
        help="merge method (default: magmax)",
    )
    parser.add_argument(
        "--scaling-coef",
        type=float,
        metavar="λ",
        help=f"scaling coefficient λ > 0 of the merged task vector (default: {_default_scaling_coefs_text()})",
    )
    parser.add_argument(
        "--density",
        type=float,
        help="ties only: fraction of each task vector kept by magnitude, in (0, 1] "
        f"(default: {_method_option_default('ties', 'density')})",
    )
    parser.add_argument(
        "--seed",
        type=int,
        help=f"random_mix only: random seed (default: {_method_option_default('random_mix', 'seed')})",
    )
    parser.add_argument(
        "--alpha",
        type=float,
        help="opcm only: share of the merged task vector's singular-value mass whose directions each new task "
        f"vector is projected off, in [0, 1) (default: {_method_option_default('opcm', 'alpha')})",
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        type=str.lower,
        help="dtype of the merged floating tensors "
        "(default: each tensor's dtype in the base); the math runs in float32 either way",
    )
    parser.add_argument("--device", help="where the math runs: cpu or cuda[:N] (default: cpu)")
    parser.add_argument(
        "--max-shard-size",
        metavar="SIZE",
        help='largest output shard, e.g. "5GB", "500MB", "2GiB" or bytes (default: 5GB)',
    )
    _add_output_dir_arguments(parser)
    parser.add_argument(
        "--allow-non-finite",
        action="store_true",
        default=None,
        help="merge even if an input holds NaN/Inf (default: such inputs are an error naming the tensor and file)",
    )
    parser.add_argument(
        "--no-strict-config",
        dest="strict_config",
        action="store_false",
        default=None,
        help="merge models whose config differs from the base's in a field of the architecture (hidden sizes, "
        "layer counts, norm eps, activation, ...; other differences are only a warning; a different model_type is "
        "always refused)",
    )
    parser.add_argument(
        "--save-provenance",
        action="store_true",
        default=None,
        help="magmax/random_mix: also write which task won where (magmax_provenance.safetensors, per element the task "
        "index; shares per task and layer in magmax_provenance.json and the card)",
    )
    parser.add_argument(
        "--extra-tensors",
        choices=["error", "last"],
        type=str.lower,
        help="tensors only the fine-tuned models have (a new head): an error (default), or taken from the last model",
    )
    _add_publish_arguments(parser)
    parser.add_argument(
        "--revision",
        metavar="BRANCH",
        help="with --push-to-hub: push to this branch, e.g. after-task-3 (if missing, created at the new commit after "
        "the upload; main is left as it is)",
    )


def _run_merge(args: argparse.Namespace) -> int:
    from .checkpoints import MERGE_CONFIG_FIELDS, merge_checkpoints, merge_checkpoints_kwargs
    from .config import MergeConfig
    from .hub import HubPushError

    config = MergeConfig.from_yaml(args.config) if args.config else MergeConfig()
    if config.adapters:
        raise ValueError(f"{args.config} merges LoRA `adapters`: run it with `hf-magmax merge-lora`.")
    if args.method is not None and args.method != config.method:  # the options of the file's method do not carry over
        config.density = config.seed = config.alpha = None
    config = config.replace(**{key: getattr(args, key) for key in MERGE_CONFIG_FIELDS})  # flags override the file
    where = f" (or in {args.config})" if args.config else ""
    for key, flag in (("base", "--base"), ("models", "--models"), ("output_dir", "--output-dir")):
        if getattr(config, key) in (None, "", []):
            raise ValueError(f"missing {flag}{where}: `hf-magmax merge` needs --base, --models and --output-dir.")
    if config.private and not config.push_to_hub:
        raise ValueError("--private only applies with --push-to-hub REPO_ID.")
    if config.revision and not config.push_to_hub:
        raise ValueError("--revision only applies with --push-to-hub REPO_ID.")
    config.validate(source=args.config)
    try:
        path = merge_checkpoints(show_progress=not args.no_progress, **merge_checkpoints_kwargs(config))
    except HubPushError as err:
        sys.stderr.write(f"hf-magmax merge: error: {err}\n")
        return 1
    logger.info("merged model written to %s", path)
    return 0


# -- merge-lora -----------------------------------------------------------------------------------------------------

_MERGE_LORA_EPILOG = """\
examples:
  hf-magmax merge-lora --base ckpt/base --adapters lora/task1 lora/task2 lora/task3 --output-dir merged-model
  hf-magmax merge-lora --base ckpt/base --adapters lora/task1 lora/task2 --rank 32 --output-dir magmax-lora
  hf-magmax merge-lora --base meta-llama/Llama-3.2-1B --adapters me/lora-a me/lora-b --method ties --density 0.2 \\
      --lora-output adapter --output-dir ties-lora --push-to-hub me/ties-lora --private
  hf-magmax merge-lora magmax-lora/magmax_config.yaml --output-dir again     # re-run a merge from its config

The output is a full model with the merge folded in (--lora-output merged, the default; --merged says the same) or a
LoRA adapter (--lora-output adapter; --rank R implies it) whose rank, per module, is R or by default the sum of the
input adapters' ranks (exact for average / task_arithmetic; MagMax, TIES and random_mix report their reconstruction
error in the card).

CONFIG.yaml takes the fields of magmax_config.yaml (base, adapters, method, scaling_coef, density, seed, alpha,
lora_output, rank, svd, svd_seed, dtype, device, output_dir, overwrite, allow_non_finite, push_to_hub, private); flags given on the
command line override it. Every merge saves its configuration as OUTPUT_DIR/magmax_config.yaml and in its card.
"""


def _add_merge_lora_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "merge-lora",
        help="merge LoRA adapters on their true weight deltas (MagMax and baselines) into a model or an adapter",
        description=(
            "Merge T LoRA adapters of one base model on their dense weight deltas ΔW = scaling·B@A, one module at a "
            "time, then either fold θ_0 + λ·ΔW_sel into the base (a normal transformers model) or re-factor "
            "λ·ΔW_sel by truncated SVD into a LoRA adapter (an ordinary PEFT adapter directory). Every adapter is "
            "checked before the base is loaded; the output (with a model card and magmax_config.yaml) appears "
            "atomically."
        ),
        epilog=_MERGE_LORA_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "config",
        nargs="?",
        metavar="CONFIG.yaml",
        help="a merge configuration YAML (e.g. a previous merge's magmax_config.yaml); flags override its fields",
    )
    parser.add_argument("--base", help="the base model θ_0: a local directory or a Hub repo id")
    parser.add_argument(
        "--adapters",
        nargs="+",
        metavar="ADAPTER",
        help="the LoRA adapters, in task order (directories or Hub repo ids); for magmax, ties go to the later one",
    )
    parser.add_argument("--method", choices=_method_choices(), type=str.lower, help="merge method (default: magmax)")
    parser.add_argument(
        "--scaling-coef",
        type=float,
        metavar="λ",
        help=f"scaling coefficient λ > 0 (default: {_default_scaling_coefs_text()})",
    )
    parser.add_argument(
        "--density",
        type=float,
        help=f"ties only: fraction of each ΔW kept by magnitude (default {_method_option_default('ties', 'density')})",
    )
    parser.add_argument(
        "--seed",
        type=int,
        help=f"random_mix only: random seed (default {_method_option_default('random_mix', 'seed')})",
    )
    parser.add_argument(
        "--alpha",
        type=float,
        help="opcm only: share of the merge's singular-value mass each new ΔW is projected off, in [0, 1) "
        f"(default {_method_option_default('opcm', 'alpha')})",
    )
    parser.add_argument(
        "--lora-output",
        choices=["merged", "adapter"],
        type=str.lower,
        help="merged: a full model with the merge folded in (default); adapter: a re-factored LoRA adapter",
    )
    parser.add_argument("--merged", action="store_true", help="the same as --lora-output merged")
    parser.add_argument(
        "--rank", type=int, metavar="R", help="rank of the output LoRA adapter (implies --lora-output adapter)"
    )
    parser.add_argument(
        "--svd",
        choices=["full", "randomized"],
        type=str.lower,
        help="SVD of the adapter re-factor: full (exact truncation) or randomized (torch.svd_lowrank, for large "
        "matrices) (default: full)",
    )
    parser.add_argument("--svd-seed", type=int, help="seed of the randomized SVD (default 0)")
    parser.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        type=str.lower,
        help="dtype of the merged floating tensors (default: the base's); the math runs in float32 either way",
    )
    parser.add_argument("--device", help="where the base is loaded and the math runs: cpu or cuda[:N] (default: cpu)")
    _add_output_dir_arguments(parser)
    parser.add_argument(
        "--allow-non-finite",
        action="store_true",
        default=None,
        help="merge even if an adapter holds NaN/Inf or the result overflows (default: an error naming the tensor)",
    )
    parser.add_argument(
        "--save-provenance",
        action="store_true",
        default=None,
        help="magmax/random_mix: also write which adapter won each ΔW element (magmax_provenance.safetensors, "
        "shares in magmax_provenance.json and the model card)",
    )
    _add_publish_arguments(parser)


#: `merge-lora` flags that set a `MergeConfig` field of the same name.
_MERGE_LORA_FIELDS = (
    "base", "adapters", "method", "scaling_coef", "density", "seed", "alpha", "rank", "svd", "svd_seed", "dtype",
    "device", "output_dir", "overwrite", "allow_non_finite", "push_to_hub", "private", "save_provenance",
)  # fmt: skip


def _run_merge_lora(args: argparse.Namespace) -> int:
    from .config import MergeConfig
    from .hub import HubPushError

    config = MergeConfig.from_yaml(args.config) if args.config else MergeConfig()
    where = f" (or in {args.config})" if args.config else ""
    if args.merged and args.lora_output == "adapter":
        raise ValueError("--merged and --lora-output adapter contradict each other: pass one.")
    lora_output = args.lora_output or ("merged" if args.merged else None)
    if args.rank is not None and lora_output is None:
        lora_output = "adapter"  # --rank R implies an adapter output
    if args.rank is not None and lora_output == "merged":
        raise ValueError("--rank only applies to an adapter output (--lora-output adapter), not to --merged.")
    config = config.replace(lora_output=lora_output, **{key: getattr(args, key) for key in _MERGE_LORA_FIELDS})
    for key, flag in (("base", "--base"), ("adapters", "--adapters"), ("output_dir", "--output-dir")):
        if getattr(config, key) in (None, "", []):
            raise ValueError(
                f"missing {flag}{where}: `hf-magmax merge-lora` needs --base, --adapters and --output-dir."
            )
    if config.models:
        raise ValueError(f"`models`{where} is a checkpoint merge: run `hf-magmax merge`, or give `adapters` only.")
    if config.private and not config.push_to_hub:
        raise ValueError("--private only applies with --push-to-hub REPO_ID.")
    if config.revision:
        raise ValueError(f"`revision`{where} is not supported by `hf-magmax merge-lora` yet: drop it (push to main).")
    config.validate(args.config)  # every field checked before torch or peft is imported
    from .peft import run_lora_merge

    try:
        path = run_lora_merge(config, show_progress=not args.no_progress, source=args.config)
    except HubPushError as err:
        sys.stderr.write(f"hf-magmax merge-lora: error: {err}\n")
        return 1
    logger.info("LoRA merge written to %s", path)
    return 0


# -- verify ---------------------------------------------------------------------------------------------------------

_VERIFY_EPILOG = """\
examples:
  hf-magmax verify merged                                  # re-compute from merged/magmax_config.yaml and compare
  hf-magmax verify merged --base ckpt/base --models ckpt/t1 ckpt/t2   # inputs that moved since the merge
  hf-magmax verify merged-lora                             # an `hf-magmax merge-lora --merged` output
  hf-magmax verify me/my-merge                             # a merge pushed to the Hub (downloaded, then checked)

Exit status: 0 when every tensor matches bit for bit (none missing, none extra), 1 at the first difference (named on
stdout: tensor, index, both values), 2 when the directory or its inputs cannot be read.
"""


def _add_verify_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "verify",
        help="re-compute a merge from its magmax_config.yaml and check every tensor of the output bit for bit",
        description=(
            "Re-compute the merge recorded in DIR/magmax_config.yaml (inputs as recorded: local directories, GGUF "
            "files or Hub repo ids) and compare every tensor of DIR with it, bit for bit. Checkpoint merges are "
            "re-computed by the streaming merge itself and compared block by block (nothing is written, memory does "
            "not grow with the number of models); `merge-lora --merged` outputs are re-computed in memory."
        ),
        epilog=_VERIFY_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "output_dir",
        metavar="DIR",
        help="a merged model directory holding magmax_config.yaml, or a Hub repo id of one",
    )
    parser.add_argument("--base", help="use this base model instead of the recorded one")
    parser.add_argument("--models", nargs="+", metavar="MODEL", help="use these fine-tuned models (checkpoint merges)")
    parser.add_argument(
        "--adapters", nargs="+", metavar="ADAPTER", help="use these LoRA adapters (merge-lora outputs)"
    )
    parser.add_argument("--device", help="where the math runs: cpu or cuda[:N] (default: the recorded device)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _run_verify(args: argparse.Namespace) -> int:
    from .verify import verify_merge

    result = verify_merge(args.output_dir, base=args.base, models=args.models, adapters=args.adapters,
                          device=args.device, show_progress=not args.no_progress)  # fmt: skip
    sys.stdout.write(f"{'OK' if result else 'MISMATCH'}: {result}\n")
    return 0 if result else 1


# --- demo (class-incremental digits: sequential fine-tuning vs average / TIES / MagMax) ------------------------------


def _add_demo_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="continual-learning demo on bundled data: class-incremental digits, sequential vs merges (CPU, <1 min)",
        description=(
            "Class-incremental learning on scikit-learn's bundled digits (5 tasks x 2 classes) with a tiny ViT built "
            "from a config: θ_0 is pretrained on a disjoint slice, then MagMaxTrainer fine-tunes it task after task "
            "(frozen head, loss restricted to the current task's classes). Prints the accuracy matrices and a "
            "comparison of sequential fine-tuning, average, TIES and MagMax; writes results and plots. Offline."
        ),
    )
    parser.add_argument(
        "--output-dir", default="magmax-demo", help="where results and plots go (default: %(default)s)"
    )
    parser.add_argument("--num-tasks", type=int, default=5, help="tasks, dividing the 10 classes (default: 5)")
    parser.add_argument("--epochs", type=float, default=5.0, help="epochs per task (default: 5)")
    parser.add_argument("--learning-rate", type=float, default=3e-4, help="learning rate per task (default: 3e-4)")
    parser.add_argument("--scaling-coef", type=float, default=0.5, help="MagMax λ (default: 0.5, as in the paper)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, initialisation and training (default: 0)")
    parser.add_argument("--no-plot", action="store_true", help="do not write the heatmaps (no matplotlib needed)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run of a few seconds (fewer epochs and examples; numbers not meaningful)",
    )
    parser.add_argument(
        "--num-threads",
        type=int,
        default=1,
        metavar="N",
        help="torch CPU threads (default: 1, the fastest for the demo's tiny ViT; an inherited OMP_NUM_THREADS is "
        "not used, since 2 threads on a busy machine can make the demo several times slower)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar (per stage and task)")


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import check_demo_arguments

    flags = {"num_tasks": "--num-tasks", "num_train_epochs": "--epochs", "learning_rate": "--learning-rate"}
    flags["scaling_coef"] = "--scaling-coef"
    check_demo_arguments(
        args.num_tasks, args.epochs, args.learning_rate, args.scaling_coef, names=flags
    )  # no torch yet
    if args.num_threads < 1:
        raise ValueError(f"`--num-threads={args.num_threads}` must be a positive integer.")
    import gc

    import torch

    from .demo import run_demo

    # the demo's tiny ViT runs several times faster on one thread than on two busy ones, whatever OMP_NUM_THREADS says
    threads = torch.get_num_threads()
    torch.set_num_threads(args.num_threads)
    if os.environ.get("OMP_NUM_THREADS") not in (None, str(args.num_threads)):
        logger.info("demo: %d torch thread(s) (--num-threads), not OMP_NUM_THREADS=%s", args.num_threads,
                    os.environ["OMP_NUM_THREADS"])  # fmt: skip
    # Trainer.train() ends in gc.collect() (accelerate's free_memory); with torch and transformers loaded each one
    # takes ~0.25 s, 6+ times per run: freezing the objects that exist now makes them cheap.
    gc.freeze()
    quick = {"num_train_epochs": 1.0, "pretrain_epochs": 3.0, "max_train_examples": 300} if args.quick else {}
    try:
        results = run_demo(
            output_dir=args.output_dir,
            num_tasks=args.num_tasks,
            num_train_epochs=quick.get("num_train_epochs", args.epochs),
            learning_rate=args.learning_rate,
            scaling_coef=args.scaling_coef,
            pretrain_epochs=quick.get("pretrain_epochs", 30.0),
            max_train_examples=quick.get("max_train_examples"),
            seed=args.seed,
            plot=not args.no_plot,
            show_progress=not args.no_progress,
        )
    finally:
        gc.unfreeze()
        torch.set_num_threads(threads)
    out = sys.stdout
    for label in ("sequential fine-tuning", "MagMax"):
        out.write(f"\nAccuracy matrix, {label} (row t: after task t; %):\n{results['matrix_tables'][label]}\n")
    out.write(f"\nComparison (%, test set of every task):\n{results['comparison']}\n\n")
    for name, path in results["files"].items():
        out.write(f"{name}: {path}\n")
    return 0


# -- push -------------------------------------------------------------------------------------------------------------

_PUSH_EPILOG = """\
examples:
  hf-magmax push merged --to-hub me/my-merge
  hf-magmax push merged --to-hub me/my-merge --revision after-task-3   # to a branch; main left as it is
  hf-magmax push merged --to-hub me/my-merge --private

What is uploaded is what `merge --push-to-hub` uploads: every file of DIR, with local paths in the configs and card
replaced by folder names; a symbolic link out of DIR or a text file holding a local path refuses the push. The
output_dir of a continual run (MagMaxTrainer) is pushed as `trainer.push_to_hub()` pushes it: without its task-*/,
magmax_base/ and magmax_releases/ folders.
"""


def _add_push_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "push",
        help="upload an existing output directory (a merge, e.g. after an interrupted --push-to-hub) to the Hub",
        description=(
            "Upload an output directory written by `hf-magmax merge` / `merge-lora` to a Hub repo, as their "
            "--push-to-hub does (one commit; a missing --revision branch is created only after the upload, at the "
            "new commit), without merging again."
        ),
        epilog=_PUSH_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("dir", metavar="DIR", help="the output directory to upload")
    parser.add_argument("--to-hub", required=True, metavar="REPO_ID", help="the Hub repo to upload to (created)")
    parser.add_argument(
        "--revision", metavar="BRANCH", help="push to this branch (created at the new commit if missing)"
    )
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument(
        "--commit-message", metavar="TEXT", help='the commit message (default: "Upload with hf_magmax")'
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the upload's progress bars")


def _run_push(args: argparse.Namespace) -> int:
    from .hub import HubPushError, check_branch_name, check_repo_id, interrupted_push, push_to_hub

    check_repo_id(args.to_hub, "--to-hub")
    if args.revision is not None:
        check_branch_name(args.revision, "--revision")
    if not os.path.isdir(args.dir):
        raise FileNotFoundError(f"{args.dir} is not a directory: pass the output directory of a merge.")
    if args.no_progress:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    try:
        with interrupted_push(args.dir, args.to_hub, args.revision):
            url = push_to_hub(args.dir, args.to_hub, private=args.private, revision=args.revision,
                              commit_message=args.commit_message)  # fmt: skip
    except HubPushError as err:
        sys.stderr.write(f"hf-magmax push: error: {err}\n")
        return 1
    sys.stdout.write(f"{url}\n")
    return 0


# -- mergekit-yaml (mergekit's command line with hf_magmax's methods registered) ------------------------------------

_MERGEKIT_YAML_EPILOG = """\
example CONFIG.yml (mergekit's format; `lambda` is an alias of `scaling_coef`):
  merge_method: magmax          # or random_mix (parameters: scaling_coef, seed)
  base_model: ckpt/base
  models:
    - model: ckpt/task1
    - model: ckpt/task2
  parameters:
    scaling_coef: 0.5

  hf-magmax mergekit-yaml CONFIG.yml merged/
  hf-magmax mergekit-yaml CONFIG.yml merged/ --cuda --lazy-unpickle   # any mergekit-yaml option
  hf-magmax mergekit-yaml CONFIG.yml merged/ --help                   # mergekit's own options

The output equals `hf-magmax merge` on the same checkpoints bit for bit (leave mergekit's `dtype:` unset; `out_dtype:`
sets the output dtype). Needs mergekit (LGPL-3.0, optional): pip install "hf_magmax[mergekit]".
"""


def _add_mergekit_yaml_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "mergekit-yaml",
        help="mergekit's `mergekit-yaml` with hf_magmax's magmax and random_mix registered (needs mergekit)",
        description=(
            "Run a mergekit YAML through mergekit's own `mergekit-yaml` after registering hf_magmax's `magmax` and "
            "`random_mix` in mergekit's method registry (what importing hf_magmax's mergekit integration does). "
            "Everything after CONFIG goes to mergekit unchanged (docs/integrations.md)."
        ),
        epilog=_MERGEKIT_YAML_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", metavar="CONFIG", help="a mergekit YAML (merge_method: magmax, random_mix, ...)")
    parser.add_argument(
        "mergekit_args", nargs=argparse.REMAINDER, metavar="OUT [OPTIONS]", help="output directory, mergekit options"
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="before CONFIG: hide progress bars (mergekit's --quiet)"
    )


def _run_mergekit_yaml(args: argparse.Namespace) -> int:
    if not args.mergekit_args:
        raise ValueError("`mergekit-yaml` needs CONFIG and OUT: hf-magmax mergekit-yaml CONFIG.yml OUTPUT_DIR.")
    if "--help" not in args.mergekit_args and not os.path.isfile(args.config):  # before importing mergekit, torch
        raise FileNotFoundError(f"CONFIG {args.config!r} is not a file: pass a mergekit YAML.")
    from .integrations.mergekit import main as mergekit_yaml

    quiet = ["--quiet"] if args.no_progress and "--quiet" not in args.mergekit_args else []
    return mergekit_yaml([args.config, *args.mergekit_args, *quiet])


#: name -> (add_parser, run)
SUBCOMMANDS: dict[str, tuple[Callable[[argparse._SubParsersAction], None], Callable[[argparse.Namespace], int]]] = {
    "merge": (_add_merge_parser, _run_merge),
    "merge-lora": (_add_merge_lora_parser, _run_merge_lora),
    "push": (_add_push_parser, _run_push),
    "verify": (_add_verify_parser, _run_verify),
    "demo": (_add_demo_parser, _run_demo),
    "mergekit-yaml": (_add_mergekit_yaml_parser, _run_mergekit_yaml),
}


def _configure_logging(level: int) -> None:
    """Log lines on stderr: hf_magmax's at `level`, other libraries' (matplotlib's font cache, ...) from WARNING up,
    except with DEBUG. A logging setup that exists already (an application's, pytest's) is left as it is."""
    if logging.root.handlers:
        return
    logging.basicConfig(level=level if level <= logging.DEBUG else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")  # fmt: skip
    for name in ("hf_magmax", logger.name):  # `python -m hf_magmax.cli`: this module's logger is `__main__`
        logging.getLogger(name).setLevel(level)


def _logging_beside_progress_bars():
    """While a command runs, log lines go through `tqdm.write`: printed above the progress bars, not into them."""
    import contextlib

    console = [
        handler
        for handler in logging.root.handlers
        if isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stderr, sys.stdout)
    ]
    if not console:  # no log lines on the terminal (an application's own handlers, pytest's): nothing to redirect
        return contextlib.nullcontext()
    try:
        from tqdm.contrib.logging import logging_redirect_tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return contextlib.nullcontext()
    return logging_redirect_tqdm()


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog="hf-magmax",
        description=(
            "MagMax (max-magnitude model merging for continual learning, Marczak et al., ECCV 2024) for the Hugging "
            "Face ecosystem: merge fine-tuned checkpoints or LoRA adapters, and run continual-learning demos."
        ),
    )
    parser.add_argument(
        "--version", action=_VersionAction, help="show the version and whether the fast C merge kernels are in use"
    )
    parser.add_argument(
        "--debug", action="store_true", help="show full tracebacks for errors (also: HF_MAGMAX_DEBUG=1)"
    )
    parser.add_argument(
        "--log-level",
        default=os.environ.get("HF_MAGMAX_LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        type=str.upper,
        help="logging level (default: INFO)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add_parser, _ in SUBCOMMANDS.values():
        add_parser(subparsers)
    return parser


def _ignore_signals() -> None:
    """Ignore Ctrl-C, SIGTERM and SIGHUP from now on (the process is exiting after an interruption)."""
    import signal

    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    debug = args.debug or os.environ.get("HF_MAGMAX_DEBUG", "") not in ("", "0")
    _configure_logging(logging.DEBUG if debug else getattr(logging, args.log_level))
    _, run = SUBCOMMANDS[args.command]
    try:
        with _logging_beside_progress_bars():
            return int(run(args) or 0)
    except KeyboardInterrupt as err:  # Ctrl-C, and SIGTERM/SIGHUP while an output is staged (hf_magmax.io.Terminated)
        if argv is None:  # the console script: the cleanup is done, a further Ctrl-C must not print a traceback
            _ignore_signals()  # from the interpreter's exit handlers (a caller of main(argv) keeps its handlers)
        # what the interruption left, as the library knows it (`Terminated.outcome`: e.g. "the new output is in
        # place", or "complete at PATH but not pushed"); by default nothing, since staging is removed on the way out
        outcome = getattr(err, "outcome", None) or "nothing partial was left at the output path"
        sys.stderr.write(f"hf-magmax: interrupted; {outcome}.\n")
        return 128 + getattr(err, "signum", 2)
    except USER_ERRORS as err:
        if debug:
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        message = " ".join(str(message).split())  # one line, whatever the library's message looks like
        sys.stderr.write(f"hf-magmax {args.command}: error: {message}\n")
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
