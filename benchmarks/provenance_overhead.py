# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""Benchmark: the cost of `--save-provenance` on the streaming merge (magmax), same inputs, same run.

Builds the checkpoints of `benchmarks/merge_checkpoints.py` (a Llama base + T fine-tunes, bf16 safetensors) and times
`merge_checkpoints` in this process with and without `save_provenance`, alternating, median of `--repeats`.

    python benchmarks/provenance_overhead.py --size small --num-tasks 8 --repeats 5
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from merge_checkpoints import SIZES, build_checkpoints  # noqa: E402

from hf_magmax import merge_checkpoints  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--num-tasks", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--work-dir", type=Path, default=HERE / "_work" / "provenance_overhead")
    args = parser.parse_args()
    base, models, num_parameters = build_checkpoints(args.work_dir, args.size, args.num_tasks)
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.repeats):
        for save in (False, True):
            out = args.work_dir / f"out-{save}"
            start = time.perf_counter()
            merge_checkpoints(base, models, out, save_provenance=save, overwrite=True, show_progress=False)
            times[save].append(time.perf_counter() - start)
            shutil.rmtree(out)
    off, on = statistics.median(times[False]), statistics.median(times[True])
    print(f"| {args.size} ({num_parameters / 1e6:.1f}M params), T={args.num_tasks} | {off:.2f} s | {on:.2f} s | "
          f"{100 * (on / off - 1):+.1f}% |")  # fmt: skip


if __name__ == "__main__":
    main()
