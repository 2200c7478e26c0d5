"""`hf_magmax.integrations.mergekit`: MagMax and random_mix in mergekit's registry, through mergekit's own `run_merge`
and `hf-magmax mergekit-yaml`, bit for bit equal to `hf-magmax merge` (fp32 and bf16)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from builders import load_dir, make_family


pytest.importorskip("mergekit", reason="mergekit is not installed (pip install 'hf_magmax[mergekit]')")

import mergekit.merge_methods  # noqa: E402
from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.merge import run_merge  # noqa: E402
from mergekit.options import MergeOptions  # noqa: E402

import hf_magmax  # noqa: E402
from hf_magmax import merge_checkpoints  # noqa: E402
from hf_magmax.cli import main  # noqa: E402
from hf_magmax.integrations import mergekit as integration  # noqa: E402


SRC = Path(hf_magmax.__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(SRC)}
OPTIONS = MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=True)


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def family(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"mk-{request.param}")
    # sharded inputs (as real checkpoints are), three tasks
    base, models = make_family(root, "llama", num_tasks=3, dtype=getattr(torch, request.param), max_shard_size="20KB")
    return base, models, request.param


@pytest.fixture
def small_blocks(monkeypatch):
    """Row blocks of 64 elements: the integration's tensors are merged in many blocks (offsets matter for random_mix)
    while `hf-magmax merge` merges these tiny tensors in one, so equality also checks the blocks."""
    monkeypatch.setattr(integration, "_BLOCK_ELEMENTS", 64)


def _config(base, models, method, parameters=None, **extra):
    config = {"merge_method": method, "base_model": base, "models": [{"model": m} for m in models], **extra}
    if parameters is not None:
        config["parameters"] = parameters
    return config


def _run_mergekit(config, out):
    run_merge(MergeConfiguration.model_validate(config), str(out), options=OPTIONS)
    return load_dir(out)


def _assert_same_tensors(merged, expected):
    assert sorted(merged) == sorted(expected)
    for name, tensor in expected.items():
        assert merged[name].dtype == tensor.dtype, name
        assert torch.equal(merged[name], tensor), f"{name} differs"


@pytest.mark.parametrize(
    "method, parameters, hf_kwargs",
    [
        ("magmax", {"scaling_coef": 0.7}, {"scaling_coef": 0.7}),
        ("magmax", {"lambda": 1.3}, {"scaling_coef": 1.3}),
        ("magmax", None, {}),  # the method's default λ (0.5), from hf_magmax.merging
        ("random_mix", {"scaling_coef": 0.6, "seed": 7}, {"scaling_coef": 0.6, "seed": 7}),
        ("random_mix", None, {}),
    ],
    ids=["magmax", "magmax-lambda", "magmax-default", "random_mix-seed", "random_mix-default"],
)
def test_run_merge_equals_hf_magmax_merge_bit_for_bit(family, tmp_path, small_blocks, method, parameters, hf_kwargs):
    base, models, _ = family
    expected = load_dir(merge_checkpoints(base, models, tmp_path / "hf", method=method, show_progress=False,
                                          **hf_kwargs))  # fmt: skip
    merged = _run_mergekit(_config(base, models, method, parameters), tmp_path / "mk")
    _assert_same_tensors(merged, expected)
    pretty_name = {"magmax": "MagMax (hf_magmax)", "random_mix": "Random mix (hf_magmax)"}[method]
    assert pretty_name in (tmp_path / "mk" / "README.md").read_text()  # mergekit's card names the method


def test_task_order_is_the_order_of_models(family, tmp_path):
    """MagMax gives ties to the later task and random_mix's draws depend on the position: the YAML order counts."""
    base, models, _ = family
    reversed_models = models[::-1]
    expected = load_dir(merge_checkpoints(base, reversed_models, tmp_path / "hf", method="random_mix",
                                          show_progress=False))  # fmt: skip
    merged = _run_mergekit(_config(base, reversed_models, "random_mix"), tmp_path / "mk")
    _assert_same_tensors(merged, expected)
    forward = _run_mergekit(_config(base, models, "random_mix"), tmp_path / "mk-forward")
    assert any(not torch.equal(forward[name], merged[name]) for name in merged)


def test_dtype_and_out_dtype(family, tmp_path):
    """mergekit's `dtype: float32` (exact widening of the inputs) gives `hf-magmax merge --dtype float32`; `out_dtype`
    narrower than the checkpoints gives `--dtype` of that width (one rounding of the fp32 result either way)."""
    base, models, dtype = family
    if dtype == "bfloat16":
        expected = load_dir(merge_checkpoints(base, models, tmp_path / "hf", dtype="float32", show_progress=False))
        merged = _run_mergekit(_config(base, models, "magmax", dtype="float32"), tmp_path / "mk")
    else:
        expected = load_dir(merge_checkpoints(base, models, tmp_path / "hf", dtype="bfloat16", show_progress=False))
        merged = _run_mergekit(_config(base, models, "magmax", out_dtype="bfloat16"), tmp_path / "mk")
    _assert_same_tensors(merged, expected)


def test_tied_embeddings(tmp_path):
    base, models = make_family(tmp_path, "llama", num_tasks=2, tie=True, dtype=torch.bfloat16)
    expected = load_dir(merge_checkpoints(base, models, tmp_path / "hf", show_progress=False))
    _assert_same_tensors(_run_mergekit(_config(base, models, "magmax"), tmp_path / "mk"), expected)


def test_other_per_tensor_methods_through_mergekits_tensor_api():
    """`HfMagMaxMethod` takes any hf_magmax method that merges each tensor on its own (here `average`, which mergekit
    has no name for), also through mergekit's in-memory `merge_tensors` (its own parameter binding)."""
    from hf_magmax.merging import MergeSpec, apply_merged, average
    from hf_magmax.task_vectors import subtract

    generator = torch.Generator().manual_seed(0)
    theta_0 = torch.randn(40, 30, generator=generator).to(torch.bfloat16)
    finetuned = [(theta_0.float() + 0.02 * torch.randn(40, 30, generator=generator)).bfloat16() for _ in range(3)]
    method = integration.HfMagMaxMethod("average", name="hf_magmax_average")
    merged = mergekit.merge_methods.merge_tensors([theta_0, *finetuned], method, base_index=0,
                                                  parameters={"lambda": 0.8}, name="w")  # fmt: skip
    widened = theta_0.float()
    expected = apply_merged(widened, average([subtract(t, widened) for t in finetuned]), 0.8, dtype=torch.bfloat16)
    assert merged.dtype == torch.bfloat16 and torch.equal(merged, expected)
    assert torch.equal(integration.merge_tensor(MergeSpec("average", 0.8), "w", theta_0, finetuned), expected)


def test_registry_holds_hf_magmax_methods_and_registering_again_is_a_no_op():
    for method in integration.METHODS:
        registered = mergekit.merge_methods.get(method)
        assert isinstance(registered, integration.HfMagMaxMethod) and registered.method == method
    before = mergekit.merge_methods.registered_methods()
    assert integration.register_methods() == list(integration.METHODS)
    assert mergekit.merge_methods.registered_methods() == before


def test_methods_that_need_more_than_one_tensor_are_refused():
    for method in ("opcm", "ties"):
        with pytest.raises(ValueError, match=f"`{method}` cannot be a mergekit method.*magmax"):
            integration.HfMagMaxMethod(method)


@pytest.mark.parametrize(
    "parameters, needle",
    [({"scaling_coef": -1.0}, "scaling_coef"), ({"lambda": 0}, "scaling_coef"), ({"seed": -3}, "seed")],
)
def test_bad_parameters_fail_at_planning_before_anything_is_written(family, tmp_path, parameters, needle):
    base, models, _ = family
    method = "random_mix" if "seed" in parameters else "magmax"
    with pytest.raises(ValueError, match=needle):
        _run_mergekit(_config(base, models, method, parameters), tmp_path / "mk")
    assert not (tmp_path / "mk" / "model.safetensors").exists() and not list(tmp_path.glob("mk/*.safetensors"))


def test_scaling_coef_and_a_different_lambda_are_an_error(family, tmp_path):
    base, models, _ = family
    with pytest.raises(ValueError, match="both `scaling_coef: 0.5` and `lambda: 0.7`"):
        _run_mergekit(_config(base, models, "magmax", {"scaling_coef": 0.5, "lambda": 0.7}), tmp_path / "mk")


def test_hf_magmax_mergekit_yaml_command(family, tmp_path):
    base, models, _ = family
    config = tmp_path / "merge.yml"
    config.write_text(yaml.safe_dump(_config(base, models, "magmax", {"scaling_coef": 0.8})))
    out = tmp_path / "out"
    assert main(["--log-level", "WARNING", "mergekit-yaml", str(config), str(out), "--no-copy-tokenizer"]) == 0
    expected = load_dir(merge_checkpoints(base, models, tmp_path / "hf", scaling_coef=0.8, show_progress=False))
    _assert_same_tensors(load_dir(out), expected)
    assert yaml.safe_load((out / "mergekit_config.yml").read_text())["merge_method"] == "magmax"
    # mergekit's own usage errors keep click's exit code
    assert main(["mergekit-yaml", str(config), str(tmp_path / "o2"), "--no-such-option"]) == 2


WRAPPER = """\
import json, sys
from hf_magmax.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
sys.stdout.write("\\n" + json.dumps({"code": code, "torch": "torch" in sys.modules}))
"""


@pytest.mark.parametrize(
    "argv, code", [(["mergekit-yaml", "--help"], 0), (["mergekit-yaml", "no/such.yml", "out"], 2)]
)
def test_mergekit_yaml_help_and_argument_errors_import_no_torch(argv, code):
    result = subprocess.run([sys.executable, "-c", WRAPPER, *argv], capture_output=True, text=True, timeout=120,
                            env=ENV)  # fmt: skip
    report = json.loads(result.stdout.rsplit("\n", 1)[-1])
    assert report == {"code": code, "torch": False}, result.stderr
    if code:
        assert result.stderr.strip() == (
            "hf-magmax mergekit-yaml: error: CONFIG 'no/such.yml' is not a file: pass a mergekit YAML."
        )
