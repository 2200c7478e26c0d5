import os
import re


# Offline everywhere: a single Hub lookup otherwise burns ~48 s in retries.
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_var] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import signal  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


# Ctrl-C as a user's terminal delivers it, however the suite is launched: a shell starts background jobs
# (`pytest ... &`, nohup) with SIGINT ignored, and hf_magmax keeps an ignored SIGINT ignored (`terminate_as_interrupt`),
# so the Ctrl-C tests, in this process and in the merges it starts (a caught signal is reset to its default at exec),
# would test that instead.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# The loopback fake Hub, as a fixture for every test module (see tests/fake_hub.py).
from fake_hub import fake_hub  # noqa: E402, F401


# In CI no ZeRO / DeepSpeed / TRL test may be skipped: `.ci/run` installs DeepSpeed for the CPU and TRL (the `test`
# extra) and sets CI=true, so a skip there means a broken install, which must fail the run instead of hiding the tests.
MUST_RUN_IN_CI = ("zero3", "deepspeed", "sft", "trl")


_MUST_RUN = re.compile(rf"(?:^|[^a-z0-9])(?:{'|'.join(MUST_RUN_IN_CI)})(?:[^a-z0-9]|$)")  # words: not `ctrl`


def _must_run(nodeid: str) -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes") and _MUST_RUN.search(nodeid.lower()) is not None


def _fail_skip(report) -> None:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = (
        f"{report.nodeid} was skipped in CI ({reason}): it must run; install the `test` and `deepspeed` extras "
        "(DS_BUILD_OPS=0, DS_ACCELERATOR=cpu)."
    )


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    report = yield
    if report.skipped and _must_run(report.nodeid):  # a module-level `importorskip`
        _fail_skip(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.skipped and _must_run(report.nodeid):
        _fail_skip(report)
    return report
