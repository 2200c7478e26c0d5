"""Inputs that are refused in one line before any work (issue #18, item 8): YAML aliases (an alias bomb) and keys
given twice, a CONFIG that is a directory, FIFO or device (never read), `output:` beside `output_dir:`, a
non-boolean `save_provenance` in the Python API, and `magmax_provenance.json` written in one order whatever order
the winners come in (a resumed run writes the same bytes)."""

import json
import os
import threading
import time

import pytest
import torch
from builders import leftovers, make_synthetic_family

from hf_magmax.checkpoints import merge_checkpoints
from hf_magmax.cli import main
from hf_magmax.config import MergeConfig
from hf_magmax.metrics import provenance_summary


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return make_synthetic_family(tmp_path_factory.mktemp("refusals"), num_tensors=2, shape=(4, 4))


def _run(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err
    return code, err


ALIAS_BOMB = """\
a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g, *g]
base: b
models: *h
output_dir: out
"""


def test_yaml_alias_bomb_is_refused_at_once(tmp_path, capsys):
    config = tmp_path / "bomb.yaml"
    config.write_text(ALIAS_BOMB)
    start = time.monotonic()
    code, err = _run(["merge", str(config)], capsys)
    assert time.monotonic() - start < 5
    assert code == 2 and err.count("\n") == 1
    assert "line 2 uses the YAML alias *a" in err and str(config) in err
    assert len(err) < 500  # nothing expanded into the message


def test_an_anchor_without_alias_is_fine(family, tmp_path):
    base, models = family
    config = tmp_path / "anchor.yaml"
    config.write_text(f"base: &b {base}\nmodels: {json.dumps(models)}\noutput_dir: {tmp_path / 'out'}\n")
    assert MergeConfig.from_yaml(config).base == base


def test_a_key_given_twice_is_refused_naming_both_lines(tmp_path, capsys):
    config = tmp_path / "twice.yaml"
    config.write_text("base: a\nmodels: [b]\nbase: c\noutput_dir: out\n")
    code, err = _run(["merge", str(config)], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "the key 'base' is given twice (lines 1 and 3)" in err


@pytest.mark.parametrize("legacy, message", [("out2", "`output` (the older name of `output_dir`) and `output_dir`")])
def test_output_beside_output_dir_is_refused(tmp_path, capsys, legacy, message):
    config = tmp_path / "both.yaml"
    config.write_text(f"base: a\nmodels: [b]\noutput: {legacy}\noutput_dir: out\n")
    code, err = _run(["merge", str(config)], capsys)
    assert code == 2 and message in err and "keep `output_dir` only" in err


def test_output_beside_lora_output_is_refused(tmp_path):
    config = tmp_path / "both.yaml"
    config.write_text("base: a\nadapters: [b]\noutput: adapter\nlora_output: merged\noutput_dir: out\n")
    with pytest.raises(ValueError, match="`output` .* and `lora_output` are both set|older name of `lora_output`"):
        MergeConfig.from_yaml(config)


def test_a_directory_as_config_is_named(tmp_path, capsys):
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "magmax_config.yaml").write_text("base: a\n")
    code, err = _run(["merge", str(tmp_path / "merged")], capsys)
    assert code == 2 and "is a directory" in err and "magmax_config.yaml: pass that" in err
    assert "does not exist" not in err


def test_a_device_as_config_is_not_read(capsys):
    code, err = _run(["merge", "/dev/zero"], capsys)
    assert code == 2 and "/dev/zero is a character device, not a regular file (not read)" in err


def test_a_fifo_as_config_is_never_opened_for_reading(tmp_path, capsys):
    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)
    result = {}
    worker = threading.Thread(target=lambda: result.update(zip(("code", "err"), _run(["merge", str(fifo)], capsys))))
    worker.start()
    worker.join(timeout=10)
    if worker.is_alive():  # blocked in open(): unblock it by opening the write end, then fail
        with open(fifo, "w"):
            pass
        worker.join()
        pytest.fail("the FIFO was opened for reading (the merge blocked waiting for a writer)")
    assert result["code"] == 2 and "is a FIFO (named pipe), not a regular file (not read)" in result["err"]


def test_a_huge_config_file_is_refused(tmp_path, capsys):
    config = tmp_path / "huge.yaml"
    config.write_text("# padding\n" * 200_000)
    code, err = _run(["merge", str(config)], capsys)
    assert code == 2 and "larger than 1 MiB" in err


@pytest.mark.parametrize("value", ["yes", 1, "false"])
def test_save_provenance_must_be_a_bool_in_the_python_api(family, tmp_path, value):
    base, models = family
    output = tmp_path / "out"
    with pytest.raises(ValueError, match="`save_provenance` must be true or false"):
        merge_checkpoints(base, models, output, save_provenance=value, show_progress=False)
    assert leftovers(output) == [] and not output.exists()


def test_provenance_json_has_one_order_whatever_order_the_winners_come_in():
    names = ["model.layers.10.w", "model.layers.2.w", "model.layers.1.w", "head.w"]
    winners = {name: torch.tensor([i % 2, 1, 0], dtype=torch.uint8) for i, name in enumerate(names)}
    fresh = provenance_summary(winners, ["a", "b"])
    resumed = provenance_summary(dict(sorted(winners.items())), ["a", "b"])  # as read back from a checkpoint
    assert json.dumps(fresh, indent=2) == json.dumps(resumed, indent=2)
    assert list(fresh["tensors"]) == ["head.w", "model.layers.1.w", "model.layers.2.w", "model.layers.10.w"]
    assert list(fresh["layers"]) == ["head", "model.layers.1", "model.layers.2", "model.layers.10"]


# ---------------------------------------------------------------------------------------------------------------------
# one line instead of a traceback (issue #18, item 7); LoRA and Trainer cases: test_peft_faults, test_trainer_faults
# ---------------------------------------------------------------------------------------------------------------------


def test_opcm_with_nan_in_the_first_task_and_allow_non_finite_is_one_line(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    base, models = make_synthetic_family(tmp_path / "family", num_tensors=2, shape=(4, 4))
    first = os.path.join(models[0], "model.safetensors")
    tensors = load_file(first)
    tensors["layer000.weight"][1, 1] = float("nan")
    save_file(tensors, first, metadata={"format": "pt"})
    output = tmp_path / "out"
    argv = ["merge", "--base", base, "--models", *models, "--method", "opcm", "--output-dir", str(output)]
    code, err = _run([*argv, "--allow-non-finite", "--no-progress"], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "opcm cannot project task vector 2 of tensor 'layer000.weight'" in err and "NaN or Inf" in err
    assert leftovers(output) == [] and not output.exists()
