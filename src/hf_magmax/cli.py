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
import logging
import os
import sys
from collections.abc import Callable, Sequence


logger = logging.getLogger(__name__)

#: Exceptions that mean "the user asked for something wrong": reported in one line, exit code 2.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    KeyError,
    TypeError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    ImportError,
)


def _version() -> str:
    from . import __version__

    return __version__


# ---------------------------------------------------------------------------------------------------------------------
# subcommands (each: `_add_<name>_parser` + `_run_<name>`)
# ---------------------------------------------------------------------------------------------------------------------


# (subcommand functions are added below by each feature; keep one pair per subcommand)


#: name -> (add_parser, run)
SUBCOMMANDS: dict[str, tuple[Callable[[argparse._SubParsersAction], None], Callable[[argparse.Namespace], int]]] = {}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-magmax",
        description=(
            "MagMax (max-magnitude model merging for continual learning, Marczak et al., ECCV 2024) for the Hugging "
            "Face ecosystem: merge fine-tuned checkpoints or LoRA adapters, and run continual-learning demos."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument(
        "--debug", action="store_true", help="show full tracebacks for errors (also: HF_MAGMAX_DEBUG=1)"
    )
    parser.add_argument(
        "--log-level",
        default=os.environ.get("HF_MAGMAX_LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging level (default: INFO)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add_parser, _ in SUBCOMMANDS.values():
        add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    debug = args.debug or os.environ.get("HF_MAGMAX_DEBUG", "") not in ("", "0")
    logging.basicConfig(
        level=logging.DEBUG if debug else getattr(logging, args.log_level),
        format="%(levelname)s %(name)s: %(message)s",
    )
    _, run = SUBCOMMANDS[args.command]
    try:
        return int(run(args) or 0)
    except KeyboardInterrupt:
        sys.stderr.write("hf-magmax: interrupted; nothing partial was left at the output path.\n")
        return 130
    except USER_ERRORS as err:
        if debug:
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        sys.stderr.write(f"hf-magmax {args.command}: error: {message}\n")
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
