"""`hf-magmax merge`: flags, CONFIG.yaml, one-line errors, push, --help (start-up imports: tests/test_cli.py)."""

import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from builders import expected_merge, leftovers, load_dir, make_family

from hf_magmax.checkpoints import MERGE_CONFIG_NAME
from hf_magmax.cli import main


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("clifamily"), "llama", num_tasks=2)


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("hf-magmax merge: error:")]
    assert len(errors) == 1, err
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert not any("Traceback" in line for line in err)
    return errors[0]


def test_merge_with_flags(family, tmp_path):
    base, models = family
    out = tmp_path / "out"
    argv = ["merge", "--base", base, "--models", *models, "--method", "ties", "--density", "0.5"]
    argv += ["--scaling-coef", "0.9", "--max-shard-size", "10KB", "--dtype", "bfloat16", "--output", str(out)]
    assert main([*argv, "--no-progress"]) == 0
    expected = expected_merge(base, models, "ties", density=0.5, scaling_coef=0.9)
    merged = load_dir(out)
    assert all(torch.equal(merged[n], expected[n].to(torch.bfloat16)) for n in expected)
    assert (out / "model.safetensors.index.json").is_file()
    config = yaml.safe_load((out / MERGE_CONFIG_NAME).read_text())
    assert config["method"] == "ties" and config["density"] == 0.5 and config["dtype"] == "bfloat16"


def test_merge_from_config_yaml_with_overrides(family, tmp_path, capsys):
    base, models = family
    config_file = tmp_path / "merge.yaml"
    config_file.write_text(
        yaml.safe_dump({"base": base, "models": models, "method": "magmax", "output": str(tmp_path / "a")})
    )
    assert main(["merge", str(config_file), "--no-progress"]) == 0
    # re-run the configuration the merge recorded, overriding the output and λ on the command line
    recorded = tmp_path / "a" / MERGE_CONFIG_NAME
    assert (
        main(["merge", str(recorded), "--output", str(tmp_path / "b"), "--scaling-coef", "1.0", "--no-progress"]) == 0
    )
    assert yaml.safe_load((tmp_path / "b" / MERGE_CONFIG_NAME).read_text())["scaling_coef"] == 1.0
    expected = expected_merge(base, models, "magmax", scaling_coef=1.0)
    merged = load_dir(tmp_path / "b")
    assert all(torch.equal(merged[n], expected[n]) for n in expected)
    # the output of the YAML run exists: re-running it is refused, with --overwrite it is replaced
    assert main(["merge", str(config_file), "--no-progress"]) == 2
    _one_line_error(capsys, str(tmp_path / "a"), "not empty", "--overwrite")
    assert main(["merge", str(config_file), "--overwrite", "--no-progress"]) == 0


@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        (["--method", "maxmag"], ["invalid choice: 'maxmag'"]),
        (["--density", "1.5", "--method", "ties"], ["`density` must be a number in (0, 1]"]),
        (["--density", "0", "--method", "ties"], ["`density`"]),
        (["--max-shard-size", "huge"], ["`max_shard_size`"]),
        (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "tpu"], ["`device`"]),
        (["--private"], ["--private only applies with --push-to-hub"]),
    ],
)
def test_user_errors_are_one_line(family, tmp_path, capsys, extra, needles):
    base, models = family
    out = tmp_path / "out"
    code = None
    try:
        code = main(["merge", "--base", base, "--models", *models, "--output", str(out), *extra])
    except SystemExit as exit:  # argparse choices
        code = exit.code
        err = capsys.readouterr().err
        assert all(n in err for n in needles), err
    else:
        _one_line_error(capsys, *needles)
    assert code == 2
    assert leftovers(out) == []


def test_bad_inputs_name_the_culprit(family, tmp_path, capsys):
    base, models = family
    out = str(tmp_path / "out")
    assert main(["merge", "--base", base, "--models", *models, str(tmp_path / "missing"), "--output", out]) == 2
    _one_line_error(capsys, "missing", "does not exist")
    assert main(["merge", "--base", base, "--output", out]) == 2
    _one_line_error(capsys, "missing --models")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text(yaml.safe_dump({"base": base, "models": models, "output": out, "methd": "ties"}))
    assert main(["merge", str(bad_yaml)]) == 2
    _one_line_error(capsys, str(bad_yaml), "unknown key 'methd'")
    assert main(["merge", str(tmp_path / "nope.yaml")]) == 2
    _one_line_error(capsys, "nope.yaml", "does not exist")
    # a corrupt input: one line naming the file, nothing left behind
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(Path(models[0], "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"\xff" * 32)
    assert main(["merge", "--base", base, "--models", models[0], str(broken), "--output", out]) == 2
    _one_line_error(capsys, str(broken / "model.safetensors"), "corrupt")
    assert leftovers(Path(out)) == []


def test_yaml_values_are_type_checked(family, tmp_path, capsys):
    base, models = family
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    config_file = tmp_path / "merge.yaml"
    config_file.write_text(
        f"base: {base}\nmodels: [{', '.join(models)}]\noutput_dir: {out}\noverwrite: 'false'\n"
    )  # a quoted 'false' is a string, which used to count as true and replace the output
    assert main(["merge", str(config_file), "--no-progress"]) == 2
    _one_line_error(capsys, "`overwrite`", str(config_file), "true or false")
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    config_file.write_text(f"base: {base}\nmodels: {models[0]}\noutput_dir: {out}\n")
    assert main(["merge", str(config_file), "--no-progress"]) == 2
    _one_line_error(capsys, "`models`", str(config_file), "use a list")


def test_rerun_with_another_method_takes_that_methods_default(family, tmp_path):
    base, models = family
    first = tmp_path / "first"
    assert main(["merge", "--base", base, "--models", *models, "--output-dir", str(first), "--no-progress"]) == 0
    recorded = yaml.safe_load((first / MERGE_CONFIG_NAME).read_text())
    assert recorded["scaling_coef"] is None and recorded["output_dir"] == str(first)
    second = tmp_path / "second"
    argv = ["merge", str(first / MERGE_CONFIG_NAME), "--method", "ties", "--output-dir", str(second)]
    assert main([*argv, "--no-progress"]) == 0
    config = yaml.safe_load((second / MERGE_CONFIG_NAME).read_text())
    assert config["method"] == "ties" and config["scaling_coef"] is None and config["density"] == 0.2
    expected = expected_merge(base, models, "ties")  # λ = ties' default 1.0, not magmax's 0.5
    merged = load_dir(second)
    assert all(torch.equal(merged[n], expected[n]) for n in expected)


def test_extra_tensors_flag(family, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    base, models = family
    last = tmp_path / "last"
    shutil.copytree(models[-1], last)
    state = load_file(last / "model.safetensors")
    state["score.weight"] = torch.ones(3, 16)
    save_file(state, last / "model.safetensors", metadata={"format": "pt"})
    argv = ["merge", "--base", base, "--models", models[0], str(last), "--no-progress"]
    assert main([*argv, "--output-dir", str(tmp_path / "a")]) == 2
    _one_line_error(capsys, "'score.weight'", "--extra-tensors last")
    assert main([*argv, "--output-dir", str(tmp_path / "b"), "--extra-tensors", "last"]) == 0
    assert torch.equal(load_dir(tmp_path / "b")["score.weight"], torch.ones(3, 16))
    assert yaml.safe_load((tmp_path / "b" / MERGE_CONFIG_NAME).read_text())["extra_tensors"] == "last"


def test_extra_tensors_of_other_shapes_are_dropped_with_a_warning_naming_them(family, tmp_path, caplog):
    import shutil

    from safetensors.torch import load_file, save_file

    base, models = family
    heads = []
    for name, num_labels in (("five", 5), ("three", 3)):
        heads.append(tmp_path / name)
        shutil.copytree(models[0], heads[-1])
        state = load_file(heads[-1] / "model.safetensors")
        state["score.weight"] = torch.full((num_labels, 16), float(num_labels))
        save_file(state, heads[-1] / "model.safetensors", metadata={"format": "pt"})
    argv = ["merge", "--base", base, "--models", *map(str, heads), "--extra-tensors", "last", "--no-progress"]
    with caplog.at_level("INFO", logger="hf_magmax"):
        assert main([*argv, "--output-dir", str(tmp_path / "out")]) == 0
    assert load_dir(tmp_path / "out")["score.weight"].shape == (3, 16)  # the last model's
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "extra tensors" in r.message]
    assert "'score.weight' is [5, 16] in" in warning and "five" in warning and "three" in warning
    caplog.clear()
    same = ["merge", "--base", base, "--models", str(heads[1]), str(heads[1]), "--extra-tensors", "last"]
    with caplog.at_level("INFO", logger="hf_magmax"):
        assert main([*same, "--no-progress", "--output-dir", str(tmp_path / "same")]) == 0
    assert not [r for r in caplog.records if r.levelname == "WARNING" and "extra tensors" in r.getMessage()]
    assert [r for r in caplog.records if "'score.weight' taken from the last model" in r.getMessage()]


def test_push_to_hub_and_failed_push(fake_hub, family, tmp_path, capsys):  # noqa: F811
    base, models = family
    out = tmp_path / "out"
    argv = ["merge", "--base", base, "--models", *models, "--output", str(out), "--no-progress"]
    assert main([*argv, "--push-to-hub", "me/cli-merge", "--private"]) == 0
    repo = fake_hub.repos["me/cli-merge"]
    assert repo.private and set(repo.files) == {p.name for p in out.iterdir()}
    fake_hub.fail_commits = True
    assert main([*argv[:-3], "--output", str(tmp_path / "out2"), "--push-to-hub", "me/cli-merge-2"]) == 1
    _one_line_error(capsys, "me/cli-merge-2", "failed", f"kept at {tmp_path / 'out2'}")
    assert (tmp_path / "out2" / "model.safetensors").is_file()


def test_merge_help_documents_every_option():
    src = str(Path(__file__).resolve().parents[1] / "src")  # this checkout's code, not the installed one
    env = dict(os.environ, COLUMNS="200", PYTHONPATH=src)
    result = subprocess.run(["hf-magmax", "merge", "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    for option in [
        "CONFIG.yaml",
        "--base",
        "--models",
        "--method",
        "--scaling-coef",
        "--density",
        "--seed",
        "--dtype",
        "--device",
        "--max-shard-size",
        "--output-dir",
        "--output",
        "--overwrite",
        "--extra-tensors",
        "--allow-non-finite",
        "--no-strict-config",
        "--push-to-hub",
        "--private",
        "--no-progress",
        "magmax,average,task_arithmetic,ties,random_mix",
    ]:
        assert option in result.stdout, option


def test_top_level_help_lists_merge(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--help"])
    assert exit.value.code == 0
    assert "merge" in capsys.readouterr().out


def test_a_model_that_is_the_base_or_given_twice_merges_with_a_warning(family, tmp_path, caplog):
    base, models = family
    argv = ["merge", "--base", base, "--models", base, models[0], models[0] + "/", "--no-progress"]
    with caplog.at_level("WARNING", logger="hf_magmax"):
        assert main([*argv, "--output-dir", str(tmp_path / "out")]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("model 1 of `models`" in w and "is the base model itself" in w for w in warnings), warnings
    assert any("twice (tasks 2 and 3)" in w for w in warnings), warnings
    caplog.clear()
    with caplog.at_level("WARNING", logger="hf_magmax"):
        assert (
            main(["merge", "--base", base, "--models", *models, "--no-progress", "--output-dir", str(tmp_path / "ok")])
            == 0
        )
    assert not [r for r in caplog.records if "twice" in r.getMessage() or "base model itself" in r.getMessage()]


def test_the_local_config_re_runs_from_any_directory_and_the_card_says_how_inputs_are_named(
    family, tmp_path, monkeypatch
):
    import shutil

    base, models = family
    work = tmp_path / "work"
    shutil.copytree(Path(base).parent, work / "ckpt")
    monkeypatch.chdir(work)
    argv = ["merge", "--base", "ckpt/base", "--models", "ckpt/task0", "ckpt/task1", "--output-dir", "merged"]
    assert main([*argv, "--no-progress"]) == 0
    recorded = yaml.safe_load((work / "merged" / MERGE_CONFIG_NAME).read_text())
    assert recorded["base"] == str(work / "ckpt" / "base")
    assert recorded["models"] == [str(work / "ckpt" / "task0"), str(work / "ckpt" / "task1")]
    assert recorded["output_dir"] == str(work / "merged")
    card = (work / "merged" / "README.md").read_text()
    assert "named by their folder only" in card and str(work) not in card
    assert "merge of 2 fine-tuned model(s) of a local base model `base` made with" in card
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the card's re-run command, from another directory
    assert main(["merge", str(work / "merged" / MERGE_CONFIG_NAME), "--output-dir", "again", "--no-progress"]) == 0
    first, again = load_dir(work / "merged"), load_dir(elsewhere / "again")
    assert all(torch.equal(first[name], again[name]) for name in first)
