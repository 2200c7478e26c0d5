"""`hf_magmax.integrations.fusion_bench.HfMagMaxAlgorithm`: built from a FusionBench config `_target_`, run on
FusionBench's own model pools and program; bit for bit `hf-magmax merge` (fp32, bf16) and FusionBench's own MagMax
(fp32); FusionBench's own general OPCM to rounding (fp32, fp64)."""

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import torch
from builders import load_dir, make_family, tiny_model


pytest.importorskip("fusion_bench", reason="FusionBench is not installed (pip install fusion-bench)")

from fusion_bench.method.magmax import MagMaxAlgorithm  # noqa: E402
from fusion_bench.modelpool import BaseModelPool, CausalLMPool  # noqa: E402
from fusion_bench.utils import instantiate  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from hf_magmax import merge_checkpoints  # noqa: E402
from hf_magmax.integrations.fusion_bench import HfMagMaxAlgorithm  # noqa: E402


TARGET = "hf_magmax.integrations.fusion_bench.HfMagMaxAlgorithm"


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def family(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"fb-{request.param}")
    base, models = make_family(root, "llama", num_tasks=3, dtype=getattr(torch, request.param))
    return base, models, request.param


def _pool(base, models, dtype):
    models = {"_pretrained_": base, **{f"task{t}": path for t, path in enumerate(models)}}
    return CausalLMPool(models, tokenizer=None, model_kwargs={"torch_dtype": dtype})


def _assert_equal_state(state, expected):
    assert sorted(state) == sorted(expected)
    for name, tensor in expected.items():
        assert state[name].dtype == tensor.dtype, name
        assert torch.equal(state[name], tensor), f"{name} differs"


@pytest.mark.parametrize(
    "options",
    [
        {"method": "magmax"},
        {"method": "magmax", "scaling_factor": 0.8},  # FusionBench's name for λ
        {"method": "opcm", "alpha": 0.4},
        {"method": "random_mix", "seed": 3, "scaling_coef": 0.6},
        {"method": "ties", "density": 0.3},
    ],
    ids=lambda options: "-".join(f"{k}={v}" for k, v in options.items()),
)
def test_config_target_equals_hf_magmax_merge_bit_for_bit(family, tmp_path, options):
    base, models, dtype = family
    algorithm = instantiate(OmegaConf.create({"_target_": TARGET, **options}))
    assert isinstance(algorithm, HfMagMaxAlgorithm)
    merged = algorithm.run(_pool(base, models, dtype))
    hf_options = {("scaling_coef" if k == "scaling_factor" else k): v for k, v in options.items()}
    expected = load_dir(merge_checkpoints(base, models, tmp_path / "hf", show_progress=False, **hf_options))
    _assert_equal_state(merged.state_dict(), expected)


def test_magmax_equals_fusion_benchs_own_magmax_in_fp32(tmp_path):
    """Same definition in fp32 (in bf16 FusionBench computes τ and θ_0 + λ·τ in bf16: benchmarks/README.md)."""
    base, models = make_family(tmp_path, "llama", num_tasks=3)
    ours = HfMagMaxAlgorithm(method="magmax", scaling_coef=0.5).run(_pool(base, models, "float32")).state_dict()
    theirs = MagMaxAlgorithm(scaling_factor=0.5).run(_pool(base, models, "float32")).state_dict()
    _assert_equal_state(ours, theirs)


def _fusion_bench_opcm():
    """FusionBench's general OPCM (`fusion_bench/method/opcm/opcm_general.py`, config `method/opcm/opcm_general`),
    unchanged, through the loader that `benchmarks/opcm_merge.py` runs it with (`load_fusion_bench_opcm`: its
    package `__init__` imports the CLIP variants, which import a name transformers 5 removed)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "_fusionbench_opcm.py"
    spec = importlib.util.spec_from_file_location("_fusionbench_opcm", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.load_fusion_bench_opcm()


def _any_pool(kind, base, models, dtype):
    if kind == "llama":
        return _pool(base, models, dtype)
    from transformers import AutoModelForSequenceClassification

    paths = {"_pretrained_": base, **{f"task{t}": path for t, path in enumerate(models)}}
    load = AutoModelForSequenceClassification.from_pretrained
    return BaseModelPool({name: load(path, dtype=getattr(torch, dtype)) for name, path in paths.items()})


@pytest.mark.parametrize(
    "kind, dtype, tolerance",
    [("llama", "float32", 1e-4), ("llama", "float64", 1e-12), ("bert", "float32", 1e-4), ("bert", "float64", 1e-12)],
)
def test_opcm_equals_fusion_benchs_own_general_opcm(tmp_path, kind, dtype, tolerance):
    """hf_magmax's OPCM (`merge_checkpoints`, and the FusionBench algorithm, bit for bit the same) is FusionBench's own
    general `OPCM` (tasks in order: `shuffle_order=False`; no saving, no evaluation) up to rounding, on a Llama
    (untied `lm_head`, projected as FusionBench projects every `nn.Linear`) and a BERT classifier (embeddings,
    LayerNorms, biases added unprojected; the pooler and the 3 × 16 classifier projected), 4 tasks, α = 0.5.

    Tolerance, per tensor, on `max |θ_fb − θ_ours| / max |θ_fb − θ_0|` (the difference relative to the merged task
    vector). Measured: fp32, 1.2e-5 (Llama) and 6.1e-6 (BERT), the largest in the projected weights; fp64, 1.5e-14 and
    1.6e-14, so the two compute the same matrix and the fp32 gap is rounding: FusionBench takes a full SVD of the
    rescaled merged task vector and forms `U P′ Vᵀ`, hf_magmax a thin SVD of the running sum and subtracts the removed
    entries (`opcm_project`), and the singular vectors of these small random matrices (close singular values) move
    by about eps / gap. Bounds: 1e-4 (fp32) and 1e-12 (fp64). A change of definition is far above them: the
    diagonal left in or a split one direction off moves the weights by 1e-2 to 1e-1 of the task vector."""
    OPCM = _fusion_bench_opcm()
    base, models = make_family(tmp_path, kind, num_tasks=4, dtype=getattr(torch, dtype))
    options = {"shuffle_order": False, "save_on_every_step": False, "evaluate_on_every_step": False}
    theirs = OPCM(alpha=0.5, **options).run(_any_pool(kind, base, models, dtype)).state_dict()
    ours = load_dir(merge_checkpoints(base, models, tmp_path / "hf", method="opcm", alpha=0.5, show_progress=False))
    integration = HfMagMaxAlgorithm(method="opcm", alpha=0.5).run(_any_pool(kind, base, models, dtype)).state_dict()
    _assert_equal_state({name: integration[name] for name in ours}, ours)
    assert sorted(ours) == sorted(theirs)
    theta_0 = load_dir(base)
    for name, tensor in ours.items():
        assert theirs[name].dtype == tensor.dtype, name
        difference = float((theirs[name] - tensor).abs().max())
        task_vector = float((theirs[name] - theta_0[name]).abs().max())
        assert difference <= tolerance * task_vector, f"{name}: {difference:.3g} vs task vector {task_vector:.3g}"


@pytest.mark.parametrize("method", ["opcm", "magmax"])
def test_tied_embeddings_are_merged_once(tmp_path, method):
    """A tied embedding is one tensor: folded once (OPCM's model-wide norm counts it once), written once."""
    base, models = make_family(tmp_path, "llama", num_tasks=2, tie=True, dtype=torch.bfloat16)
    merged = HfMagMaxAlgorithm(method=method).run(_pool(base, models, "bfloat16"))
    expected = load_dir(merge_checkpoints(base, models, tmp_path / "hf", method=method, show_progress=False))
    state = merged.state_dict()
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()
    _assert_equal_state({name: state[name] for name in expected}, expected)


def test_fusion_bench_program_runs_the_algorithm_from_its_config(tmp_path):
    """FusionBench's own program (`FabricModelFusionProgram`: instantiate the pool and the method from the config,
    run, save the merged model) with `method._target_` pointing here."""
    from fusion_bench.programs import FabricModelFusionProgram

    base, models = make_family(tmp_path, "llama", num_tasks=2)
    config = OmegaConf.create(
        {
            "method": {"_target_": TARGET, "method": "opcm", "alpha": 0.5},
            "modelpool": {
                "_target_": "fusion_bench.modelpool.CausalLMPool",
                "models": {"_pretrained_": base, "a": models[0], "b": models[1]},
                "tokenizer": None,
            },
        }
    )
    program = FabricModelFusionProgram(
        method=config.method, modelpool=config.modelpool, merged_model_save_path=str(tmp_path / "fb"),
        print_config=False,
    )  # fmt: skip
    program.run()
    expected = load_dir(merge_checkpoints(base, models, tmp_path / "hf", method="opcm", show_progress=False))
    _assert_equal_state(load_dir(tmp_path / "fb"), expected)


def test_pre_instantiated_models_and_inplace():
    torch.manual_seed(0)
    base = tiny_model("llama")
    tasks = []
    for _ in range(2):
        model = tiny_model("llama")
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        tasks.append(model)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    pool = {"_pretrained_": base, "a": tasks[0], "b": tasks[1]}
    copy = HfMagMaxAlgorithm(inplace=False).run(pool)
    assert copy is not base and all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
    merged = HfMagMaxAlgorithm().run(BaseModelPool(pool))
    assert merged is base  # in place, as FusionBench's MagMaxAlgorithm
    _assert_equal_state(merged.state_dict(), copy.state_dict())
    assert not torch.equal(merged.model.norm.weight, before["model.norm.weight"])


@pytest.mark.parametrize(
    "kwargs, error, needle",
    [
        ({"scaling_coef": -1.0}, ValueError, "scaling_coef"),
        ({"scaling_coef": 0.5, "scaling_factor": 0.7}, ValueError, "scaling_factor=0.7"),
        ({"method": "magmax", "density": 0.2}, ValueError, "`density` only applies to `ties`"),
        ({"method": "bogus"}, ValueError, "unknown merge method 'bogus'"),
    ],
)
def test_bad_options_fail_when_the_algorithm_is_built(kwargs, error, needle):
    with pytest.raises(error, match=needle):
        instantiate(OmegaConf.create({"_target_": TARGET, **kwargs}))


def test_a_pool_without_base_or_fine_tunes_is_an_error():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="no `_pretrained_` model"):
        HfMagMaxAlgorithm().run({"a": model})
    with pytest.raises(ValueError, match="no fine-tuned models"):
        HfMagMaxAlgorithm().run({"_pretrained_": model})


DOC = Path(__file__).resolve().parent.parent / "docs" / "integrations.md"


def _doc_blocks(path):
    """(marker, language, code) of docs/integrations.md's blocks that FusionBench needs: the marked (`test: run`)
    ones before its mergekit section (the checkpoints and `hf-magmax merge`), then the `test: fusion-bench` ones
    (tests/test_docs.py runs the marked ones in an environment without FusionBench, and skips these)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, before_mergekit = [], True
    for i, line in enumerate(lines):
        if line.startswith("## mergekit"):
            before_mergekit = False
        marker = re.fullmatch(r"<!-- test: (run|fusion-bench) -->", line.strip())
        if marker is None or (marker.group(1) == "run" and not before_mergekit):
            continue
        end = next(j for j in range(i + 2, len(lines)) if lines[j].startswith("```"))
        blocks.append((marker.group(1), lines[i + 1].strip("`"), "\n".join(lines[i + 2 : end]) + "\n"))
    return blocks


def test_the_docs_fusion_bench_snippets_run(tmp_path, monkeypatch):
    from hf_magmax.cli import main

    blocks = _doc_blocks(DOC)
    assert [marker for marker, _, _ in blocks] == ["run", "run", "fusion-bench"]
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__main__"}
    for _, language, code in blocks:
        if language == "python":
            exec(compile(code, str(DOC), "exec"), namespace)
        else:
            for command in (shlex.split(line) for line in code.splitlines() if line.strip()):
                assert command[0] == "hf-magmax" and main(command[1:]) == 0, command
    assert namespace["merged"].model.norm.weight.dtype == torch.bfloat16
