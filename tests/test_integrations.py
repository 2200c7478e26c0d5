"""Without mergekit or FusionBench, `hf_magmax.integrations`' modules fail on import with the extra to install (runs
whether or not those packages are installed; that the core never imports the integrations: tests/test_package.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import hf_magmax


SRC = Path(hf_magmax.__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(SRC)}


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
