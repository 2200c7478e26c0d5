"""Start-up of the `hf-magmax` command line: help and argument errors import no torch, errors are one line, exit 2.

Each case runs in a fresh interpreter (a subprocess), because the test process itself has torch loaded. The
`sys.modules` check happens after `main()` returned, so anything a subcommand imported on the way counts.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import hf_magmax


SRC = Path(hf_magmax.__file__).resolve().parents[1]  # the src/ directory this test run imports hf_magmax from
HEAVY = ("torch", "numpy", "transformers", "safetensors")

# runs main() the way the console script does, then reports the exit code and which heavy modules got imported
WRAPPER = """\
import json, sys
from hf_magmax.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
heavy = [name for name in {heavy!r} if name in sys.modules]
sys.stdout.write("\\n" + json.dumps({{"code": code, "heavy": heavy, "cli": sys.modules["hf_magmax.cli"].__file__}}))
"""


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), *filter(None, [env.get("PYTHONPATH")])])
    env.update(extra)
    return env


def _run_main(*argv: str) -> tuple[dict, str]:
    result = subprocess.run(
        [sys.executable, "-c", WRAPPER.format(heavy=HEAVY), *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
    )
    report = json.loads(result.stdout.rsplit("\n", 1)[-1])
    assert Path(report["cli"]).resolve().is_relative_to(SRC)
    return report, result.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["merge", "--help"],
        ["merge-lora", "--help"],
        ["verify", "--help"],
        ["demo", "--help"],
        ["--version"],
        [],
    ],
    ids=lambda argv: " ".join(argv) or "no-args",
)
def test_help_imports_no_torch(argv):
    report, _ = _run_main(*argv)
    assert report["code"] == 0
    assert report["heavy"] == [], f"`hf-magmax {' '.join(argv)}` imported {report['heavy']}"


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["merge", "--base", "b", "--models", "m", "--output", "o", "--method", "bogus"], ["--method", "bogus"]),
        (["merge", "--models", "m1", "m2", "--output", "o"], ["--base"]),
        (["merge", "--base", "b", "--models", "m", "--output", "o", "--scaling-coef", "big"], ["--scaling-coef"]),
        (["merge", "no/such/magmax_config.yaml"], ["no/such/magmax_config.yaml"]),
        (["merge-lora", "--adapters", "a", "--output", "o"], ["--base"]),
        (["merge-lora", "--base", "b", "--adapters", "a", "--output", "o", "--method", "max"], ["--method", "max"]),
        (["merge-lora", "--base", "b", "--adapters", "a", "--output", "o", "--private"], ["--private", "--push"]),
        (["merge-lora", "--base", "b", "--adapters", "a", "--output", "o", "--merged", "--rank", "4"], ["--rank"]),
        (["demo", "--num-tasks", "3"], ["--num-tasks=3", "1, 2, 5 or 10"]),
        (["demo", "--epochs", "0"], ["--epochs=0"]),
        (["demo", "--learning-rate", "-1"], ["--learning-rate"]),
        (["verify", "no/such/dir"], ["no/such/dir", "does not exist"]),
        (["no-such-command"], ["no-such-command"]),
        (["merg"], ["hf-magmax: error", "did you mean 'merge'?"]),
        (
            ["merge", "--methd", "ties"],
            ["hf-magmax merge: error", "--methd", "did you mean --method?", "merge --help"],
        ),
        (["merge", "--base", "b", "--models", "m", "--output", "o", "--method", "maxmag"], ["did you mean 'magmax'?"]),
        (["merge-lora", "--adaptors", "a"], ["hf-magmax merge-lora: error", "did you mean --adapters?"]),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, list) and value and value[0][0] != "-" else None,
)
def test_argument_errors_are_one_line_exit_2_and_import_no_torch(argv, needles):
    report, stderr = _run_main(*argv)
    assert report["code"] == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("hf-magmax") and "error:" in lines[0]
    for needle in needles:
        assert needle in lines[0]
    assert report["heavy"] == [], f"`hf-magmax {' '.join(argv)}` imported {report['heavy']} before failing"


def test_help_reads_methods_and_defaults_from_the_merge_core(capsys):
    from hf_magmax.cli import main
    from hf_magmax.merging import DEFAULT_SCALING_COEFS, ONLINE_MERGES

    for command in ("merge", "merge-lora"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "{" + ",".join(ONLINE_MERGES) + "}" in text
        for method, coef in DEFAULT_SCALING_COEFS.items():
            assert f"{method} {coef:g}" in text
        density = ONLINE_MERGES["ties"].options["density"]
        assert re.search(rf"--density DENSITY ties only: [^)]*\(default:? {density}\)", text), text


CONSOLE_SCRIPT = shutil.which("hf-magmax")
# imported by `site` at start-up when its folder is on PYTHONPATH: reports, once the console script has exited,
# which cli.py it ran and what it imported
SITECUSTOMIZE = """\
import atexit, json, os, sys

def _report():
    cli = sys.modules.get("hf_magmax.cli")
    heavy = [name for name in {heavy!r} if name in sys.modules]
    with open(os.environ["HF_MAGMAX_TEST_REPORT"], "w") as f:
        json.dump({{"cli": cli and cli.__file__, "heavy": heavy}}, f)

atexit.register(_report)
"""


@pytest.mark.skipif(CONSOLE_SCRIPT is None, reason="the hf-magmax console script is not installed")
@pytest.mark.parametrize("argv", [["--help"], ["merge", "--help"], ["merge", "--method", "bogus"]])
def test_installed_console_script_imports_no_torch(argv, tmp_path):
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE.format(heavy=HEAVY))
    report_path = tmp_path / "report.json"
    env = _env(HF_MAGMAX_TEST_REPORT=str(report_path))
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])  # src/ first: the script runs this tree
    result = subprocess.run([CONSOLE_SCRIPT, *argv], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == (2 if "bogus" in argv else 0), result.stderr
    report = json.loads(report_path.read_text())
    assert report["cli"] and Path(report["cli"]).resolve().is_relative_to(SRC), report
    assert report["heavy"] == [], f"`hf-magmax {' '.join(argv)}` imported {report['heavy']}"


def test_merge_on_local_checkpoints_imports_no_transformers_or_peft(tmp_path):
    """`hf-magmax merge` of local safetensors checkpoints needs torch, not transformers or peft (start-up, issue 10)."""
    from builders import make_family

    base, models = make_family(tmp_path, num_tasks=2)
    heavy = ("transformers", "peft", "torch")
    result = subprocess.run(
        [sys.executable, "-c", WRAPPER.format(heavy=heavy), "--log-level", "WARNING", "merge", "--base", base]
        + ["--models", *models, "--output-dir", str(tmp_path / "merged"), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(HF_HUB_OFFLINE="1"),
    )
    report = json.loads(result.stdout.rsplit("\n", 1)[-1])
    assert report["code"] == 0, result.stderr
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert report["heavy"] == ["torch"], f"`hf-magmax merge` imported {report['heavy']}"


PROBE = """
import logging, sys
from hf_magmax import cli

def add(subparsers):
    subparsers.add_parser("probe")

def run(args):
    from huggingface_hub.utils import tqdm

    with tqdm(total=2, desc="probing") as bar:
        bar.update(1)
        logging.getLogger("hf_magmax.demo").info("a line of ours")
        logging.getLogger("matplotlib.font_manager").info("generated new fontManager")
        logging.getLogger("matplotlib.font_manager").warning("a warning of theirs")
        bar.update(1)
    return 0

cli.SUBCOMMANDS["probe"] = (add, run)
sys.exit(cli.main(sys.argv[1:] + ["probe"]))
"""


@pytest.mark.parametrize("level", ["INFO", "DEBUG"])
def test_log_lines_are_printed_above_the_progress_bar_and_other_libraries_info_stays_out(level):
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    argv = [sys.executable, "-c", PROBE, "--log-level", level]
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    err = result.stderr
    assert "probing" in err  # the bar is shown
    # each log line starts a line of its own: not glued to the end of the bar's `1/2 [...]`
    assert re.search(r"(^|[\r\n])INFO hf_magmax.demo: a line of ours\n", err), err
    assert re.search(r"(^|[\r\n])WARNING matplotlib.font_manager: a warning of theirs\n", err), err
    assert ("fontManager" in err) == (level == "DEBUG")  # other libraries' INFO only when debugging


def test_choices_are_case_insensitive():
    from hf_magmax.cli import build_parser

    args = build_parser().parse_args(["--log-level", "debug", "merge", "--method", "MagMax", "--dtype", "BFloat16"])
    assert (args.log_level, args.method, args.dtype) == ("DEBUG", "magmax", "bfloat16")
    args = build_parser().parse_args(["merge-lora", "--method", "TIES", "--lora-output", "Adapter"])
    assert (args.method, args.lora_output) == ("ties", "adapter")


def test_version_says_whether_the_c_kernels_are_in_use_without_importing_torch():
    report, _ = _run_main("--version")  # the version goes to stdout, before the report line
    assert report["code"] == 0 and report["heavy"] == []
    result = subprocess.run(
        [sys.executable, "-m", "hf_magmax.cli", "--version"], capture_output=True, text=True, env=_env(), timeout=120
    )
    assert result.returncode == 0, result.stderr
    name, kernels = result.stdout.strip().splitlines()
    assert name == f"hf-magmax {hf_magmax.__version__}" and kernels.startswith("C merge kernels: ")
    from hf_magmax.merging.kernels import c_kernels

    assert ("in use" in kernels) == (c_kernels() is not None), kernels
    off = subprocess.run(
        [sys.executable, "-m", "hf_magmax.cli", "--version"],
        capture_output=True,
        text=True,
        env=_env(HF_MAGMAX_DISABLE_CKERNELS="1"),
        timeout=120,
    )
    assert "C merge kernels: off (HF_MAGMAX_DISABLE_CKERNELS=1)" in off.stdout
