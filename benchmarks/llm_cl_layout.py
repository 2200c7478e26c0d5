# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""Read a local copy of an O-LoRA-lineage benchmark through `hf_magmax.extras.llm_cl` and report what it holds.

For every task of the orders asked (default: all of O-LoRA's 15 tasks and SAPT's 15 SuperNI tasks found under
`data_path`) and every split: the number of records, the answers outside the task's `labels.json` (O-LoRA layout),
and the longest prompt in characters. Files that are absent are listed, not fatal, so a partial copy can be checked.
This is how the sizes quoted in `recipes/README.md` were taken (on the stored snapshots of `cmnfriend/O-LoRA` and
`circle-hit/SAPT`; files of 4 MiB and more were absent from them):

    python benchmarks/llm_cl_layout.py path/to/O-LoRA/CL_Benchmark --output benchmarks/results/llm_cl_layout_olora.json
    python benchmarks/llm_cl_layout.py path/to/SAPT/CL_Benchmark --output benchmarks/results/llm_cl_layout_sapt.json
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter

from hf_magmax.extras.llm_cl import OLORA_LABELS, OLORA_TASK_TYPES, SUPERNI_TASKS, find_task_dir, load_cl_task


def describe(data_path: str, tasks: list[str], splits: list[str]) -> dict:
    report = {"data_path": os.path.abspath(data_path), "tasks": {}, "absent": []}
    for task in tasks:
        try:
            folder, layout = find_task_dir(data_path, task)
        except FileNotFoundError:
            report["absent"].append(task)
            continue
        entry = {"layout": layout, "splits": {}}
        for split in splits:
            if not os.path.isfile(os.path.join(folder, f"{split}.json")):
                report["absent"].append(f"{task}/{split}")
                continue
            data = load_cl_task(data_path, task, split)
            outside = Counter(a for a in data["answer"] if layout == "olora" and a not in OLORA_LABELS.get(task, ()))
            entry["splits"][split] = {
                "records": len(data),
                "answers_outside_labels": dict(outside),
                "longest_prompt_chars": max((len(p) for p in data["prompt"]), default=0),
            }
        report["tasks"][task] = entry
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_path")
    parser.add_argument("--tasks", nargs="*", default=None, help="default: every known task found under data_path")
    parser.add_argument("--splits", nargs="*", default=["train", "dev", "test"])
    parser.add_argument("--output", default=None, help="write the report as JSON here")
    args = parser.parse_args()
    tasks = args.tasks or [*OLORA_TASK_TYPES, *SUPERNI_TASKS]
    report = describe(args.data_path, tasks, args.splits)
    for task, entry in report["tasks"].items():
        sizes = ", ".join(f"{s} {v['records']}" for s, v in entry["splits"].items())
        outside = {s: v["answers_outside_labels"] for s, v in entry["splits"].items() if v["answers_outside_labels"]}
        print(f"{task:48s} {entry['layout']:8s} {sizes}" + (f"  outside labels.json: {outside}" if outside else ""))
    if report["absent"]:
        print("absent:", ", ".join(report["absent"]))
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
