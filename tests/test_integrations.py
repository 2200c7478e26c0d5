"""`hf_magmax.integrations` sits on top of the core: the core never imports it, and without mergekit or FusionBench
its modules fail on import with the extra to install (runs whether or not those packages are installed)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import hf_magmax


SRC = Path(hf_magmax.__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(SRC)}
CORE = ["merging", "task_vectors", "checkpoints", "io", "peft", "trainer", "config", "hub", "scaling", "cli"]


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=ENV)


@pytest.mark.parametrize(
    "module, package, extra",
    [("mergekit", "mergekit", "hf_magmax[mergekit]"), ("fusion_bench", "fusion_bench", "hf_magmax[fusion-bench]")],
)
def test_without_the_tool_the_import_error_names_the_extra(module, package, extra):
    result = _python(f"import sys; sys.modules[{package!r}] = None\nimport hf_magmax.integrations.{module}")
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: hf_magmax.integrations.") and f'pip install "{extra}"' in last, last


def test_the_core_never_imports_the_integrations():
    # imported: the light modules (trainer and peft import transformers: slow); every module's source is read below
    code = "".join(f"import hf_magmax.{name}\n" for name in CORE if name not in ("trainer", "peft"))
    code += "import sys; print(sorted(m for m in sys.modules if m.startswith(('hf_magmax.integrations', 'mergekit', "
    code += "'fusion_bench'))))"
    result = _python(code)
    assert result.stdout.strip() == "[]", result.stderr
    for name in CORE:
        module = SRC / "hf_magmax" / name
        for file in sorted(module.glob("*.py")) if module.is_dir() else [module.with_suffix(".py")]:
            source = file.read_text(encoding="utf-8")
            if file.name == "cli.py":  # the console layer: `hf-magmax mergekit-yaml` imports it in its run function
                assert "\n    from .integrations.mergekit import" in source and "\nfrom .integrations" not in source
                continue
            assert "integrations" not in source, file
