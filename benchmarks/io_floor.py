# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""The I/O floor of a checkpoint merge: read every tensor of the base and of T models, write one output of the
base's size with safetensors, and do no arithmetic at all. No merge tool can beat this on the same disk (it keeps
the output in memory until `save_file`, so only its time is a floor, not its memory).

    python benchmarks/io_floor.py --base BASE --models M1 M2 ... --output OUT
"""

import argparse
import json
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file


def weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return sorted({directory / f for f in json.loads(index.read_text())["weight_map"].values()})
    return [directory / "model.safetensors"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True)
    parser.add_argument("--models", nargs="+", required=True)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()

    def handles(directory: str) -> dict:
        table = {}
        for file in weight_files(Path(directory)):
            handle = safe_open(str(file), framework="pt")
            table.update(dict.fromkeys(handle.keys(), handle))
        return table

    base, models = handles(args.base), [handles(m) for m in args.models]
    output = {}
    for name in sorted(base):
        # `get_tensor` may return a view of the memory-mapped file: `clone` really reads every byte
        for model in models:
            model[name].get_tensor(name).clone()  # read and drop
        output[name] = base[name].get_tensor(name).clone()
    Path(args.output).mkdir(parents=True, exist_ok=True)
    save_file(output, str(Path(args.output) / "model.safetensors"), metadata={"format": "pt"})


if __name__ == "__main__":
    main()
