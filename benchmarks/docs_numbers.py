# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""Regenerate (or check) every number the README and the docs quote from a script's output.

A quoted number sits between two HTML comments, invisible once the markdown is rendered:

    about <!-- n:demo-seconds -->13<!-- /n --> s on one CPU core

`KEY` names a source below: the demo's comparison table and printed output (`hf-magmax demo`, run here once, its
`comparison.md` and stdout verbatim) and the differences its prose quotes (a sentence such as "MagMax leads average
by 0.8 points" then needs re-reading after a change), the demo's measured wall times
(`benchmarks/results/demo_timing.json`, written by `--timings`) and benchmark headlines read from
`benchmarks/results/*.md`. Usage:

    python benchmarks/docs_numbers.py            # rewrite README.md, docs/*.md, benchmarks/README.md
    python benchmarks/docs_numbers.py --check    # exit 1 and name every quoted value that differs (tests/test_docs.py)
    python benchmarks/docs_numbers.py --timings  # first re-measure the demo's wall times (~1 min on 2 cores)

`make docs-numbers` runs the first, `make docs-timings` the last. Timings are machine-dependent, so `--check`
compares the docs with the recorded measurement, not with a new one.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import functools
import io
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TIMING_FILE = RESULTS / "demo_timing.json"
DOC_FILES = ("README.md", "docs/*.md", "benchmarks/README.md")
#: `<!-- n:KEY -->VALUE<!-- /n -->`, VALUE possibly over several lines (a fenced table)
QUOTE = re.compile(r"<!-- n:(?P<key>[a-z0-9-]+) -->(?P<value>.*?)<!-- /n -->", re.S)

#: the demo runs timed by `--timings`: name -> (extra CLI flags, environment overrides)
TIMED_RUNS = {
    "demo": ([], {"OMP_NUM_THREADS": None}),
    "demo-omp2": ([], {"OMP_NUM_THREADS": "2"}),
    "quick": (["--quick"], {"OMP_NUM_THREADS": None}),
}


@functools.cache
def _demo(root: Path) -> tuple[str, str, dict]:
    """One full `hf-magmax demo` run: (what it prints, its comparison.md, its demo_results.json)."""
    from hf_magmax.cli import main

    printed = io.StringIO()
    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(printed):
        code = main(["--log-level", "WARNING", "demo", "--no-plot", "--no-progress", "--output-dir", out])
        if code != 0:
            raise RuntimeError(f"`hf-magmax demo` exited with {code}")
        table = Path(out, "comparison.md").read_text(encoding="utf-8").strip()
        results = json.loads(Path(out, "demo_results.json").read_text(encoding="utf-8"))
    return printed.getvalue(), table, results


def demo_comparison(root: Path = ROOT) -> str:
    """The full demo's comparison table, as `hf-magmax demo` writes it (`comparison.md`), in a fence."""
    return f"\n```\n{_demo(root)[1]}\n```\n"


def demo_output(root: Path = ROOT) -> str:
    """What the full demo prints, from its first accuracy matrix to the end of its comparison table, in a fence."""
    printed = _demo(root)[0]
    start = printed.index("Accuracy matrix")
    end = printed.index(_demo(root)[1]) + len(_demo(root)[1])
    return f"\n```\n{printed[start:end]}\n```\n"


def _demo_points(method: str, metric: str, minus: tuple[str, str] | None = None, digits: int = 1):
    """A demo metric in percent as the table shows it (or the difference of two table entries), as text."""

    def value(root: Path) -> str:
        metrics = _demo(root)[2]["metrics"]
        points = round(100 * metrics[method][metric], 1)
        if minus is not None:
            points = round(points - round(100 * metrics[minus[0]][minus[1]], 1), 1)
        return f"{points:.{digits}f}"

    return value


def measure_timings(repeats: int = 1) -> dict:
    """Wall time of `hf-magmax demo` (fresh processes, as a user runs it) for each of `TIMED_RUNS`."""
    runs = {}
    for name, (flags, env_overrides) in TIMED_RUNS.items():
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
        for key, value in env_overrides.items():
            env.pop(key, None) if value is None else env.__setitem__(key, value)
        times = []
        for _ in range(repeats):
            with tempfile.TemporaryDirectory() as out:
                cmd = [sys.executable, "-m", "hf_magmax.cli", "demo", *flags, "--no-plot", "--output-dir", out]
                start = time.perf_counter()
                subprocess.run(cmd, env=env, check=True, capture_output=True)
                times.append(time.perf_counter() - start)
        runs[name] = {"flags": flags, "env": env_overrides, "seconds": round(statistics.median(times), 1)}
    return {
        "runs": runs,
        "repeats": repeats,
        "cpu_count": os.cpu_count(),
        "load_average_1min_after": round(os.getloadavg()[0], 2),
        "python": sys.version.split()[0],
    }


def _timing(name: str) -> Callable[[Path], str]:
    def value(root: Path) -> str:
        record = json.loads((root / "benchmarks" / "results" / "demo_timing.json").read_text(encoding="utf-8"))
        return f"{record['runs'][name]['seconds']:g}"

    return value


def _from_results(file: str, pattern: str, fmt: Callable[[re.Match], str]) -> Callable[[Path], str]:
    def value(root: Path) -> str:
        text = (root / "benchmarks" / "results" / file).read_text(encoding="utf-8")
        match = re.search(pattern, text)
        if match is None:
            raise ValueError(f"benchmarks/results/{file} has no line matching {pattern!r}: update docs_numbers.py")
        return fmt(match)

    return value


def _llm(mode: str, label: str, key: str) -> Callable[[Path], str]:
    """A mean (in %, one decimal) of `benchmarks/results/continual_llm.json` (`benchmarks/continual_llm.py report`)."""

    def value(root: Path) -> str:
        data = json.loads((root / "benchmarks" / "results" / "continual_llm.json").read_text(encoding="utf-8"))
        return f"{100 * data['summary'][mode][label][key][0]:.1f}"

    return value


def _llm_share(mode: str, part: str) -> Callable[[Path], str]:
    """A part's share (%, one decimal) of the `MagMaxTrainer` run's CPU time in `continual_llm.json`."""

    def value(root: Path) -> str:
        data = json.loads((root / "benchmarks" / "results" / "continual_llm.json").read_text(encoding="utf-8"))
        return f"{data['cost'][mode][part]['cpu_share']:.1f}"

    return value


#: the rows of `benchmarks/continual_llm.py` quoted by a short name
_LLM_ROWS = {
    "seq": "sequential fine-tuning",
    "magmax-auto": 'MagMax λ="auto"',
    "magmax": "MagMax λ=0.5",
    "ta": "task arithmetic λ=0.3",
    "average": "average",
    "ties": "TIES λ=1, density 0.2",
    "opcm": "OPCM λ=1, α=0.5",
}
_LLM_METRICS = {"final": "final_average_accuracy", "forgetting": "forgetting", "bwt": "backward_transfer"}

#: KEY -> how to compute the quoted text from its source
SOURCES: dict[str, Callable[[Path], str]] = {
    **{
        f"llm-{mode}-{row}-{metric}": _llm(mode, label, key)
        for mode in ("lora", "full")
        for row, label in _LLM_ROWS.items()
        for metric, key in _LLM_METRICS.items()
    },
    **{
        f"llm-{mode}-{slug}-share": _llm_share(mode, part)
        for mode in ("lora", "full")
        for slug, part in (("own", "magmax_own"), ("merged-eval", "merged_eval"), ("search", "search"))
    },
    "demo-comparison": demo_comparison,
    "demo-output": demo_output,
    "demo-sequential-forgetting": _demo_points("sequential fine-tuning", "forgetting"),
    "demo-sequential-below-base": _demo_points(
        "θ_0 (no training)", "final_average_accuracy", ("sequential fine-tuning", "final_average_accuracy"), 0
    ),
    "demo-magmax-final": _demo_points("MagMax", "final_average_accuracy"),
    "demo-magmax-over-sequential": _demo_points(
        "MagMax", "final_average_accuracy", ("sequential fine-tuning", "final_average_accuracy"), 0
    ),
    "demo-magmax-over-average": _demo_points(
        "MagMax", "final_average_accuracy", ("average", "final_average_accuracy")
    ),
    "demo-magmax-over-ties": _demo_points("MagMax", "final_average_accuracy", ("TIES", "final_average_accuracy")),
    "demo-seconds": _timing("demo"),
    "demo-omp2-seconds": _timing("demo-omp2"),
    "quick-seconds": _timing("quick"),
    "mergekit-ta-speedup": _from_results(
        "merge_checkpoints.md",
        r"faster than mergekit on task_arithmetic: .*?, ([\d.]+)x",
        lambda m: f"{float(m[1]):.1f}",
    ),
    "mergekit-ties-speedup": _from_results(
        "merge_checkpoints.md", r"faster than mergekit on ties: .*?, ([\d.]+)x", lambda m: f"{float(m[1]):.1f}"
    ),
    "magmax-floor-ratio": _from_results(
        "merge_checkpoints.md", r"magmax within 1.3x of the I/O floor: ([\d.]+)x", lambda m: f"{float(m[1]):.1f}"
    ),
    "ties-floor-ratio": _from_results(
        "merge_checkpoints.md",
        r"\| hf_magmax ties \| ties \| \d+ \| [\d.]+ \| ([\d.]+)x \|",
        lambda m: f"{float(m[1]):.1f}",
    ),
    "trainer-overhead": _from_results(
        "trainer_overhead.md", r"(?s).*\| wall time \(s\) \|[^\n]*\| ([+-][\d.]+%) \|", lambda m: m[1]
    ),
    "peft-linear-error": _from_results(
        "lora_merge.md",
        r"PEFT add_weighted_adapter linear \| [^|]+\| [^|]+\| ([\d.]+) \|",
        lambda m: f"{100 * float(m[1]):.0f}",
    ),
    "peft-ties-error": _from_results(
        "lora_merge.md",
        r"PEFT add_weighted_adapter ties \| [^|]+\| [^|]+\| ([\d.]+) \|",
        lambda m: f"{100 * float(m[1]):.0f}",
    ),
}


def doc_paths(root: Path = ROOT) -> list[Path]:
    return sorted({path for pattern in DOC_FILES for path in root.glob(pattern)})


def quoted(root: Path = ROOT) -> dict[Path, list[tuple[str, str]]]:
    """Every quoted (key, value) of every doc, in order."""
    return {path: [(m["key"], m["value"]) for m in QUOTE.finditer(path.read_text(encoding="utf-8"))]
            for path in doc_paths(root)}  # fmt: skip


def compute(root: Path = ROOT, keys: set[str] | None = None) -> dict[str, str]:
    """The current value of each key that the docs quote (or of `keys`)."""
    if keys is None:
        keys = {key for quotes in quoted(root).values() for key, _ in quotes}
    unknown = sorted(keys - set(SOURCES))
    if unknown:
        raise ValueError(f"the docs quote unknown key(s) {unknown}: add them to SOURCES in benchmarks/docs_numbers.py")
    return {key: SOURCES[key](root) for key in sorted(keys)}


def check(root: Path = ROOT, values: dict[str, str] | None = None) -> list[str]:
    """One line per quoted value that differs from its source (empty: the docs are up to date)."""
    values = compute(root) if values is None else values
    problems = []
    for path, quotes in quoted(root).items():
        for key, value in quotes:
            if value == values[key]:
                continue
            where = f"{path.relative_to(root)}: `{key}`"
            if "\n" in value.strip() or "\n" in values[key].strip():  # a table: the lines that differ
                diff = difflib.unified_diff(
                    value.splitlines(), values[key].splitlines(), "quoted", "source", lineterm=""
                )
                problems.append(f"{where} differs from its source (run `make docs-numbers`):\n" + "\n".join(diff))
            else:
                problems.append(
                    f"{where} quotes {value!r}, its source gives {values[key]!r} (run `make docs-numbers`)"
                )
    return problems


def rewrite(root: Path = ROOT, values: dict[str, str] | None = None) -> list[Path]:
    """Write the current values into the docs; returns the files that changed."""
    values = compute(root) if values is None else values
    changed = []
    for path in doc_paths(root):
        text = path.read_text(encoding="utf-8")
        new = QUOTE.sub(lambda m: f"<!-- n:{m['key']} -->{values[m['key']]}<!-- /n -->", text)
        if new != text:
            path.write_text(new, encoding="utf-8")
            changed.append(path)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--check", action="store_true", help="only report the quoted values that differ; exit 1 if any"
    )
    parser.add_argument("--timings", action="store_true", help="re-measure the demo's wall times first")
    parser.add_argument("--repeats", type=int, default=1, help="runs per timing (median; default 1)")
    args = parser.parse_args(argv)
    if args.timings:
        record = measure_timings(args.repeats)
        TIMING_FILE.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        print(json.dumps(record["runs"], indent=2))
    if args.check:
        problems = check()
        print("\n".join(problems) or "every quoted number matches its source")
        return 1 if problems else 0
    for path in rewrite():
        print(f"updated {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
