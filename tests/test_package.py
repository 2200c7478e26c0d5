"""The package surface: a lazy, sorted `__all__` that resolves every name; extras outside the core; packaging files."""

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import hf_magmax


ROOT = Path(hf_magmax.__file__).resolve().parents[2]
CORE = ("merging", "task_vectors", "io", "config", "checkpoints", "peft", "scaling", "trainer", "hub", "cli")


def _fresh(code: str) -> dict:
    """Run `code` in a fresh interpreter that imports this tree; it prints one JSON line."""
    result = subprocess.run(
        [sys.executable, "-c", f"import json, sys\nsys.path.insert(0, {str(ROOT / 'src')!r})\n{code}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_all_is_sorted_and_is_the_import_table():
    names = hf_magmax.__all__
    assert names == sorted(names) and len(set(names)) == len(names)
    assert set(names) == {*hf_magmax._NAME_TO_MODULE, "__version__"}
    assert {"MergeSpec", "MergeConfig", "apply_merged", "MagMaxTrainer", "attach_label_embedding_head"} <= set(names)
    assert set(names) <= set(dir(hf_magmax))


@pytest.mark.parametrize("name", [n for n in hf_magmax.__all__ if n != "__version__"])
def test_every_public_name_resolves_to_its_module_object(name):
    module = importlib.import_module(f"hf_magmax.{hf_magmax._NAME_TO_MODULE[name]}")
    assert getattr(hf_magmax, name) is getattr(module, name)
    namespace = {}
    exec(f"from hf_magmax import {name}", namespace)
    assert namespace[name] is getattr(module, name)


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        hf_magmax.no_such_name  # noqa: B018
    with pytest.raises(ImportError):
        exec("from hf_magmax import no_such_name", {})


def test_import_is_lazy():
    report = _fresh(
        "import hf_magmax, hf_magmax.cli, hf_magmax.merging, hf_magmax.config, hf_magmax.hub\n"
        "from hf_magmax import MergeSpec, MergeConfig, DEFAULT_SCALING_COEFS\n"
        "heavy = [m for m in ('torch', 'numpy', 'transformers', 'safetensors', 'peft', 'yaml') if m in sys.modules]\n"
        "print(json.dumps({'heavy': heavy}))"
    )
    assert report["heavy"] == []


def test_core_never_imports_extras():
    code = "".join(f"import hf_magmax.{name}\n" for name in CORE)
    code += "outside = ('hf_magmax.extras', 'hf_magmax.integrations', 'trl')\n"
    code += "print(json.dumps(sorted(m for m in sys.modules if m.startswith(outside))))"
    assert _fresh(code) == []
    for name in CORE:
        module = ROOT / "src" / "hf_magmax" / name
        files = sorted(module.glob("*.py")) if module.is_dir() else [module.with_suffix(".py")]
        assert files, name
        for file in files:
            source = file.read_text()
            if file.name == "cli.py":  # the console layer: `hf-magmax mergekit-yaml` imports its integration when run
                assert source.count(".integrations") == 1 and "\n    from .integrations.mergekit import" in source
                source = source.replace("\n    from .integrations.mergekit import", "\n")
            for package in ("extras", "integrations"):
                assert f"from .{package}" not in source and f"from ..{package}" not in source, file
                assert f"hf_magmax.{package}" not in source, file


def test_old_paths_of_heads_and_trace_are_the_extras_modules():
    import hf_magmax.extras.heads
    import hf_magmax.extras.trace
    import hf_magmax.heads
    import hf_magmax.trace

    assert hf_magmax.heads is hf_magmax.extras.heads and hf_magmax.trace is hf_magmax.extras.trace
    from hf_magmax.heads import attach_label_embedding_head
    from hf_magmax.trace import TRACE_TASKS

    assert attach_label_embedding_head is hf_magmax.attach_label_embedding_head
    assert TRACE_TASKS[0] == "C-STANCE"


def test_packaging_files():
    assert (ROOT / "src" / "hf_magmax" / "py.typed").is_file()
    setup = (ROOT / "setup.cfg").read_text()
    assert "py.typed" in setup and "license_files = LICENSE" in setup
    license_text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "/magmax-demo/" in (ROOT / ".gitignore").read_text().splitlines()


def test_readme_test_command_is_the_ci_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    # the suite's line (later lines run optional extras' tests after it: FusionBench, the SmolLM2 GGUF)
    (ci_command,) = [line for line in ci.splitlines() if "python -m pytest" in line and '".[test]"' in line]
    (readme_line,) = [line for line in readme.splitlines() if "python -m pytest" in line and '".[test]"' in line]
    readme_command = readme_line.split("#")[0].strip()
    assert ci_command.replace(" -q", "").strip() == readme_command
    assert "not on PyPI" in readme


def test_relative_links_of_the_docs_resolve():
    pages = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", ROOT / "recipes" / "README.md"]
    pages += sorted((ROOT / "docs").glob("*.md"))
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            path = target.split("#")[0]
            if path and not re.match(r"[a-z]+:", path) and not (page.parent / path).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_the_sdist_ships_the_tests_with_their_helpers_and_the_linked_pages(tmp_path):
    result = subprocess.run(
        [sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path), "sdist", "-d", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "deprecat" not in (result.stdout + result.stderr).lower()  # e.g. License classifiers (SPDX `license`)
    import tarfile

    (sdist,) = tmp_path.glob("hf_magmax-*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    shipped = {
        "tests/conftest.py", "tests/builders.py", "tests/tiny_tasks.py", "tests/fake_hub.py", "tests/recipe_utils.py",
        "tests/scripts/ddp_magmax.py", "docs/merge.md", "recipes/README.md", "benchmarks/README.md",
        "benchmarks/merge_checkpoints.py", "src/hf_magmax/merging/_fold.c", "LICENSE", "README.md", "MANIFEST.in",
        ".ci/run", ".ci/sdist_check.sh",
    }  # fmt: skip
    assert shipped <= names, sorted(shipped - names)
    assert {name for name in names if name.startswith(("tests/test_", "docs/"))} >= {
        str(path.relative_to(ROOT)) for path in [*ROOT.glob("tests/test_*.py"), *ROOT.glob("docs/*.md")]
    }
    assert not [name for name in names if "_work" in name or name.endswith((".so", ".pyc"))]
