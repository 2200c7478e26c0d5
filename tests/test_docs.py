"""The docs are tested: marked snippets of README.md and docs/*.md run, and every quoted number matches its source.

A fenced block runs when the line before its opening fence is

    <!-- test: run -->             (a ```python or ```bash block)
    <!-- test: write FILENAME -->  (any block: its text is written to FILENAME, e.g. a YAML config used next)

The blocks of one file run in order, in one fresh directory (as a reader would, starting with a README.md of the
reader's own); no block may change or remove a file it did not create (checked after every block); python blocks share one namespace (as in a notebook);
bash blocks made only of `hf-magmax` commands run through `hf_magmax.cli.main` in this process (each must exit 0),
other bash blocks in bash with `hf-magmax` bound to this checkout's CLI. `SETUP` gives a file the fixtures its text
assumes (docs/merge.md: `ckpt/base`, `ckpt/task1..3`; docs/trainer.md: a tiny plain `Trainer` and its tasks).

Unmarked on purpose (they need real models, a Hub account, `pip install` or the reader's own data): the install
commands, docs/continual.md's label-embedding heads on real encoders, docs/trainer.md's `MagMaxTrainer`, resume and
LoRA snippets and docs/scaling_coef.md (they continue the reader's `model` and datasets; the README's quick start 1
is their runnable form), docs/merge.md's `push_to_hub` example, docs/lora.md's command lines on placeholders and Hub
ids, and docs/demo.md's `hf-magmax demo` (its output is checked verbatim by the numbers tests below).

The numbers: `benchmarks/docs_numbers.py` (`make docs-numbers`) computes every `<!-- n:KEY -->VALUE<!-- /n -->` from
its source (a fresh run of the demo, `benchmarks/results/`); the test fails when a quoted value differs.
"""

import os
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from builders import make_family

from hf_magmax.cli import main


ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"^<!-- test: (run|write (\S+)) -->$")
FENCE = re.compile(r"^```(\w*)\s*$")


def marked_blocks(path: Path) -> list[tuple[int, str, str | None, str]]:
    """(line number, language, file to write or None, code) of each marked block of `path`."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks = []
    for i, line in enumerate(lines):
        marker = MARKER.match(line.strip())
        if marker is None:
            continue
        fence = FENCE.match(lines[i + 1]) if i + 1 < len(lines) else None
        if fence is None:
            raise AssertionError(f"{path.name}:{i + 1}: `{line.strip()}` must be followed by an opening ``` fence")
        end = next(j for j in range(i + 2, len(lines)) if lines[j].startswith("```"))
        language, target = fence.group(1), marker.group(2)
        if target is None and language not in ("python", "bash"):
            raise AssertionError(f"{path.name}:{i + 2}: only ```python and ```bash blocks can be marked `test: run`")
        blocks.append((i + 2, language, target, "\n".join(lines[i + 2 : end]) + "\n"))
    return blocks


def _checkpoints(directory: Path) -> None:
    """`ckpt/base` and `ckpt/task1`..`ckpt/task3`: the checkpoints docs/merge.md merges."""
    make_family(directory / "ckpt", num_tasks=4)


def _plain_trainer(directory: Path) -> dict:
    """The `trainer`, `train_tasks` and `test_tasks` docs/trainer.md's `MagMaxCallback` snippet starts from."""
    from tiny_tasks import classification_task, tiny_bert
    from transformers import Trainer, TrainingArguments

    from hf_magmax import class_incremental_split

    train_tasks = class_incremental_split(
        classification_task([0, 1, 2, 3], 32, seed=1), num_tasks=2, label_column="labels"
    )
    test_tasks = train_tasks.apply_to(classification_task([0, 1, 2, 3], 16, seed=2))
    args = TrainingArguments(
        output_dir=str(directory / "out"), max_steps=2, save_steps=2, report_to="none", use_cpu=True, disable_tqdm=True
    )
    trainer = Trainer(tiny_bert(), args, train_dataset=train_tasks.datasets[0])
    return {"trainer": trainer, "train_tasks": train_tasks, "test_tasks": test_tasks}


#: files whose snippets continue from something the reader already has: setup(directory) -> python namespace
SETUP = {"merge.md": _checkpoints, "trainer.md": _plain_trainer}
MARKED = [path for path in DOCS if marked_blocks(path)]


def run_blocks(path: Path, directory: Path, namespace: dict | None = None) -> dict:
    namespace = {"__name__": "__main__", **(namespace or {})}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    env.setdefault("OMP_NUM_THREADS", "1")
    cli = f'hf-magmax() {{ "{sys.executable}" -m hf_magmax.cli "$@"; }}\n'
    for line, language, target, code in marked_blocks(path):
        where = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name}:{line}"
        before = _snapshot(directory)
        _run_block(where, language, target, code, directory, namespace, env, cli)
        changed = sorted(name for name, stamp in before.items() if _snapshot_of(directory / name) != stamp)
        assert not changed, (
            f"the block at {where} changed or removed files it did not create (a reader's own files, or the output of "
            f"an earlier block): {changed[:5]}; write to a new path of its own"
        )
    return namespace


def _snapshot_of(file: Path) -> tuple[int, int] | None:
    try:
        stat = file.stat()
    except FileNotFoundError:
        return None
    return stat.st_size, stat.st_mtime_ns


def _snapshot(directory: Path) -> dict[str, tuple[int, int] | None]:
    """Size and modification time of every file under `directory` (the scratch directory a reader works in)."""
    return {str(f.relative_to(directory)): _snapshot_of(f) for f in directory.rglob("*") if f.is_file()}


def _run_block(where, language, target, code, directory, namespace, env, cli) -> None:
    """Run one marked block in `directory` (python blocks in `namespace`, bash blocks through the CLI or bash)."""
    if target is not None:
        (directory / target).write_text(code, encoding="utf-8")
    elif language == "python":
        try:
            exec(compile(code, where, "exec"), namespace)
        except Exception as err:
            raise AssertionError(f"the python block at {where} failed: {type(err).__name__}: {err}") from err
    elif all(command[:1] == ["hf-magmax"] for command in _commands(code)):
        for command in _commands(code):  # in this process: no torch import per command
            assert _cli(command[1:]) == 0, f"`{' '.join(command)}` at {where} failed (see the captured stderr)"
    else:
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", cli + code], cwd=directory, env=env, capture_output=True, text=True
        )
        assert result.returncode == 0, f"the bash block at {where} failed:\n{result.stderr[-3000:]}"


def _commands(code: str) -> list[list[str]]:
    """The commands of a bash block (continuation lines joined, comments dropped)."""
    return [shlex.split(line, comments=True) for line in code.replace("\\\n", " ").splitlines() if line.strip()]


def _cli(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit:  # --help
        return int(exit.code or 0)


#: a README.md that the reader already has in the directory where they try the docs
READER_README = "# my project\n\nThe reader's own README: the docs' snippets must leave it alone.\n"


@pytest.mark.parametrize("path", MARKED, ids=[p.name for p in MARKED])
def test_marked_snippets_run(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "README.md").write_text(READER_README)  # the reader's own files: no block may touch them
    namespace = SETUP[path.name](tmp_path) if path.name in SETUP else None
    namespace = run_blocks(path, tmp_path, namespace)
    assert (tmp_path / "README.md").read_text() == READER_README
    if path.name == "trainer.md":  # the callback's files, as the text under the snippet says
        for task in ("task-00-task_1", "task-01-task_2"):
            assert (tmp_path / "out" / task / "checkpoint-2").is_dir()
        assert (tmp_path / "out" / "continual_results.json").is_file()


def test_the_readme_and_every_quick_start_are_marked():
    langs = [language for _, language, _, _ in marked_blocks(ROOT / "README.md")]
    assert langs.count("python") >= 4 and langs.count("bash") >= 2  # quick starts 1-3 and the engine
    assert {p.name for p in MARKED} >= {"README.md", "engine.md", "lora.md", "merge.md", "continual.md"}


def test_a_snippet_that_overwrites_a_file_it_did_not_create_fails(tmp_path, monkeypatch):
    doc = tmp_path / "doc.md"
    doc.write_text(
        "<!-- test: run -->\n```python\nopen('notes.txt', 'w').write('mine')\n```\n\n"
        "<!-- test: run -->\n```python\nopen('README.md', 'w').write('a card')\n```\n"
    )
    (tmp_path / "README.md").write_text(READER_README)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AssertionError, match=r"doc.md:7 changed or removed files it did not create .*README.md"):
        run_blocks(doc, tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"  # a block's own new file is fine


def test_a_broken_snippet_fails(tmp_path, monkeypatch):
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- test: run -->\n```python\nfrom hf_magmax import MergeSpec\nMergeSpec('maxmag')\n```\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AssertionError, match=r"doc.md:2 failed: ValueError: .*maxmag"):
        run_blocks(doc, tmp_path)


# -- the numbers quoted by the docs ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def docs_numbers():
    return runpy.run_path(str(ROOT / "benchmarks" / "docs_numbers.py"), run_name="docs_numbers")


@pytest.fixture(scope="module")
def current_values(docs_numbers):
    return docs_numbers["compute"](ROOT)  # runs the full demo once (~10 s on one thread)


@pytest.mark.slow
def test_quoted_numbers_match_their_sources(docs_numbers, current_values):
    assert "demo-comparison" in current_values and "| MagMax | 0.5 |" in current_values["demo-comparison"]
    problems = docs_numbers["check"](ROOT, current_values)
    assert not problems, "\n".join(problems)


@pytest.mark.slow
def test_a_changed_number_fails_and_make_docs_numbers_fixes_it(docs_numbers, current_values, tmp_path):
    for name in ("README.md", "benchmarks/README.md", "benchmarks/results"):
        source = ROOT / name
        target = tmp_path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            target.mkdir()
            for file in source.iterdir():
                (target / file.name).write_bytes(file.read_bytes())
        else:
            target.write_bytes(source.read_bytes())
    readme = tmp_path / "README.md"
    text = readme.read_text(encoding="utf-8")
    stale = re.sub(r"(\| TIES \| 1 \| [\d.]+ \| )[\d.]+", r"\g<1>81.2", text, count=1)
    assert stale != text
    readme.write_text(stale, encoding="utf-8")
    problems = docs_numbers["check"](tmp_path, current_values)
    assert len(problems) == 1 and problems[0].startswith("README.md: `demo-comparison` differs from its source")
    assert "\n-| TIES | 1 | 76.6 | 81.2 |" in problems[0]
    assert docs_numbers["rewrite"](tmp_path, current_values) == [readme]
    assert readme.read_text(encoding="utf-8") == text
    assert docs_numbers["check"](tmp_path, current_values) == []


def test_the_merge_option_table_lists_every_flag_of_hf_magmax_merge():
    from hf_magmax.cli import build_parser

    parser = build_parser()
    (subparsers,) = [a for a in parser._actions if a.dest == "command"]
    merge = subparsers.choices["merge"]
    flags = {a.option_strings[0] for a in merge._actions if a.option_strings and a.dest != "help"}
    table = (ROOT / "docs" / "merge.md").read_text(encoding="utf-8")
    first_cells = re.findall(r"^\| `([^`|]*)` \|", table, flags=re.MULTILINE)  # `--a X [--b] [--c Y]`
    documented = {flag for cell in first_cells for flag in re.findall(r"--[a-z-]+", cell)}
    assert flags - documented == set(), "docs/merge.md's option table lacks these `hf-magmax merge` flags"
