# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""LoRA merger: exact deltas vs `merge_and_unload`, merges vs the dense engine, SVD re-factor, errors."""

import copy
import importlib
import json
import subprocess
import sys

import pytest
import torch
from torch import nn
from tqdm.auto import tqdm


peft = pytest.importorskip("peft")

from builders import tiny_llama_classifier as tiny_llama  # noqa: E402
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from hf_magmax import merge_task_vectors  # noqa: E402
from hf_magmax.merging import MergeSpec, StateDictMerger, apply_merged  # noqa: E402
from hf_magmax.peft import (  # noqa: E402
    add_magmax_adapter,
    deltas_to_lora,
    fold_deltas_into_base,
    lora_delta_state_dict,
    lora_task_vectors,
    merge_adapters,
)


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

METHODS = ["magmax", "average", "task_arithmetic", "ties", "random_mix", "opcm"]


# ---------------------------------------------------------------------------------------------------------------------
# tiny models
# ---------------------------------------------------------------------------------------------------------------------


def tiny_gpt2() -> nn.Module:
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    return GPT2LMHeadModel(config).eval()


class ConvEmbedNet(nn.Module):
    """Embedding, 3×3 and 1×1 Conv2d, Conv1d and a Linear with bias: every LoRA layer type outside transformers."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.pointwise = nn.Conv2d(6, 5, 1)
        self.conv1d = nn.Conv1d(4, 6, 3)
        self.lin = nn.Linear(8, 5)
        self.head = nn.Linear(5, 2)

    def forward(self, ids, image):
        return self.head(self.lin(self.emb(ids)).mean(1) + self.pointwise(self.conv(image)).mean((2, 3)))


def make_adapter(base: nn.Module, seed: int = 0, **config_kwargs) -> nn.Module:
    """A PeftModel on a copy of `base` with random (non-zero) LoRA factors and perturbed trainable copies."""
    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **config_kwargs))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "modules_to_save" in name or "lora_magnitude_vector" in name or name.endswith("lora_B.default.bias"):
                param.add_(0.1 * torch.randn_like(param))
    return model


def base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_delta_matches_merge(peft_model: nn.Module, base_sd: dict, atol: float = 1e-5) -> dict:
    deltas = lora_delta_state_dict(peft_model)
    merged = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    assert set(merged) == set(base_sd)
    assert deltas, "the adapter produced no delta"
    for name, base in base_sd.items():
        expected = merged[name].float() - base.float()
        got = deltas.get(name, torch.zeros_like(expected))
        torch.testing.assert_close(got, expected, atol=atol, rtol=0, msg=f"delta of {name}")
        if name not in deltas:
            assert torch.equal(merged[name], base), f"{name} changed but has no delta"
    return deltas


# ---------------------------------------------------------------------------------------------------------------------
# 1. exact deltas
# ---------------------------------------------------------------------------------------------------------------------

LLAMA_CASES = {
    "linear": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "rslora": dict(r=4, lora_alpha=3, use_rslora=True, target_modules=["q_proj", "down_proj"]),
    "rank_alpha_pattern": dict(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "up_proj"],
        rank_pattern={"up_proj": 2},
        alpha_pattern={"q_proj": 5},
    ),
    "embedding_and_modules_to_save": dict(
        r=3, lora_alpha=6, target_modules=["embed_tokens", "o_proj"], modules_to_save=["score"]
    ),
    "dora": dict(r=2, lora_alpha=4, use_dora=True, target_modules=["q_proj", "gate_proj"]),
}


@pytest.mark.parametrize("case", sorted(LLAMA_CASES))
def test_llama_delta_equals_merge_and_unload(case):
    base = tiny_llama()
    deltas = assert_delta_matches_merge(make_adapter(base, **LLAMA_CASES[case]), base_state(base))
    assert all(d.dtype == torch.float32 for d in deltas.values())
    assert all(not k.startswith("base_model") and ".base_layer" not in k for k in deltas)


GPT2_CASES = {
    "fan_in_fan_out": dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
    "lora_bias": dict(r=2, lora_alpha=2, target_modules=["c_fc"], fan_in_fan_out=True, lora_bias=True),
    "dora_conv1d": dict(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True, use_dora=True),
}


@pytest.mark.parametrize("case", sorted(GPT2_CASES))
def test_gpt2_delta_equals_merge_and_unload(case):
    base = tiny_gpt2()
    deltas = assert_delta_matches_merge(make_adapter(base, **GPT2_CASES[case]), base_state(base))
    if case == "lora_bias":
        assert "transformer.h.0.mlp.c_fc.bias" in deltas


CUSTOM_CASES = {
    "conv_embedding_linear": dict(r=2, lora_alpha=4, target_modules=["emb", "conv", "pointwise", "conv1d", "lin"]),
    "conv_lora_bias": dict(r=2, lora_alpha=3, target_modules=["conv", "lin"], lora_bias=True),
    "dora_conv_embedding": dict(r=2, lora_alpha=4, target_modules=["emb", "conv", "lin"], use_dora=True),
    "modules_to_save_with_bias": dict(r=2, lora_alpha=2, target_modules=["lin"], modules_to_save=["head"]),
}


@pytest.mark.parametrize("case", sorted(CUSTOM_CASES))
def test_conv_embedding_delta_equals_merge_and_unload(case):
    base = ConvEmbedNet()
    deltas = assert_delta_matches_merge(make_adapter(base, **CUSTOM_CASES[case]), base_state(base))
    if case == "modules_to_save_with_bias":
        assert {"head.weight", "head.bias"} <= set(deltas)


def test_delta_on_injected_model_and_other_adapter_name():
    base = tiny_llama()
    model = make_adapter(base, r=2, target_modules=["q_proj"])
    model.add_adapter("second", LoraConfig(r=3, target_modules=["k_proj"], init_lora_weights=False))
    assert set(lora_delta_state_dict(model, "second")) == {"model.layers.0.self_attn.k_proj.weight"}
    # a plain model with LoRA layers injected (no PeftModel): same names, same values
    injected = peft.inject_adapter_in_model(LoraConfig(r=2, target_modules=["q_proj"]), copy.deepcopy(base))
    injected.load_state_dict(model.get_base_model().state_dict(), strict=False)
    torch.testing.assert_close(lora_delta_state_dict(injected), lora_delta_state_dict(model, "default"))
    with pytest.raises(KeyError, match="'missing' is not loaded"):
        lora_delta_state_dict(model, "missing")


def test_lora_task_vectors_cover_the_union_with_zeros(llama_adapters):
    base, paths, dense = llama_adapters
    model = PeftModel.from_pretrained(copy.deepcopy(base), paths[0], adapter_name="a")
    for i, path in enumerate(paths[1:]):
        model.load_adapter(path, adapter_name=f"b{i}")
    task_vectors = lora_task_vectors(model, ["a", "b0", "b1"])
    assert [list(tv) for tv in task_vectors] == [list(tv) for tv in dense]
    for got, expected in zip(task_vectors, dense):
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value, atol=0, rtol=0)


def test_fold_deltas_into_base_is_dense_merge_in_base_dtype():
    base = tiny_llama()
    model = make_adapter(base, r=4, target_modules=["q_proj", "embed_tokens"], modules_to_save=["score"])
    deltas = lora_delta_state_dict(model)
    folded = fold_deltas_into_base(copy.deepcopy(base), deltas, scaling_coef=0.5).state_dict()
    for name, value in base_state(base).items():
        torch.testing.assert_close(folded[name], value + 0.5 * deltas.get(name, 0.0), atol=1e-6, rtol=0)
    # bf16: one rounding of the fp32 sum
    half = copy.deepcopy(base).to(torch.bfloat16)
    reference = {k: v.clone() for k, v in half.state_dict().items()}
    fold_deltas_into_base(half, deltas, scaling_coef=0.5)
    name = "model.layers.0.self_attn.q_proj.weight"
    expected = (reference[name].float() + 0.5 * deltas[name]).to(torch.bfloat16)
    assert torch.equal(half.state_dict()[name], expected)
    # on a PEFT-wrapped model the base layers change, not the adapters
    wrapped = copy.deepcopy(model)
    fold_deltas_into_base(wrapped, deltas, scaling_coef=1.0)
    assert torch.allclose(
        wrapped.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight,
        base.model.layers[0].self_attn.q_proj.weight + deltas[name],
        atol=1e-6,
    )
    with pytest.raises(KeyError, match="nope.weight"):
        fold_deltas_into_base(copy.deepcopy(base), {"nope.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="another base model"):
        fold_deltas_into_base(copy.deepcopy(base), {name: torch.zeros(3, 3)})


# ---------------------------------------------------------------------------------------------------------------------
# 2. merging adapters
# ---------------------------------------------------------------------------------------------------------------------

#: Different ranks, alphas, rsLoRA, target-module sets, modules_to_save and DoRA.
ADAPTER_CONFIGS = [
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"], modules_to_save=["score"]),
    dict(r=2, lora_alpha=3, use_rslora=True, target_modules=["v_proj", "q_proj"]),
    dict(r=3, lora_alpha=8, target_modules=["q_proj", "down_proj"], modules_to_save=["score"]),
]


@pytest.fixture(scope="module")
def llama_adapters(tmp_path_factory):
    """A tiny Llama base, three different adapters saved to disk, their dense deltas in the base module order."""
    torch.manual_seed(0)
    base = tiny_llama()
    root = tmp_path_factory.mktemp("adapters")
    paths, task_vectors = [], []
    for i, kwargs in enumerate(ADAPTER_CONFIGS):
        model = make_adapter(base, seed=i, **kwargs)
        model.save_pretrained(root / f"task_{i}")
        paths.append(str(root / f"task_{i}"))
        task_vectors.append(lora_delta_state_dict(model))
    # dense task vectors over the union of keys (ΔW = 0 where an adapter does not touch a module), base order
    order = [k for k in base.state_dict() if any(k in tv for tv in task_vectors)]
    dense = [{k: tv.get(k, torch.zeros_like(base.state_dict()[k])) for k in order} for tv in task_vectors]
    return base, paths, dense


def dense_merge(base, dense, method, **kwargs):
    merged = merge_task_vectors(dense, method=method, **kwargs)
    return {k: v + merged[k] if k in merged else v for k, v in base_state(base).items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", METHODS)
def test_merged_output_equals_dense_engine_bit_for_bit(llama_adapters, method, dtype):
    """The LoRA merger and the dense engine (StateDictMerger + apply_merged) on the same ΔWs: identical bits."""
    base, paths, _ = llama_adapters
    base = copy.deepcopy(base).to(dtype)
    theta_0 = base_state(base)
    holder = PeftModel.from_pretrained(copy.deepcopy(base), paths[0], adapter_name="t0")
    for i, path in enumerate(paths[1:], start=1):
        holder.load_adapter(path, adapter_name=f"t{i}")
    task_vectors = lora_task_vectors(holder, [f"t{i}" for i in range(len(paths))])  # ΔW as the merger sees them
    spec = MergeSpec(method, seed=7 if method == "random_mix" else None)
    engine = StateDictMerger(spec)
    for task_vector in task_vectors:
        engine.update(task_vector)
    merged = engine.result()
    expected = {k: apply_merged(v, merged[k], spec.coef) if k in merged else v for k, v in theta_0.items()}

    result = merge_adapters(copy.deepcopy(base), paths, method=spec)
    assert result.model.__class__ is base.__class__
    assert not any("lora" in k or "modules_to_save" in k for k in result.model.state_dict())
    for name, value in result.model.state_dict().items():
        assert value.dtype == dtype and torch.equal(value, expected[name]), name
    assert sum(not torch.equal(expected[k], theta_0[k]) for k in merged) == len(merged)  # every ΔW was applied
    if method == "random_mix":  # the same merge through the keyword arguments
        again = merge_adapters(copy.deepcopy(base), paths, method=method, seed=7).model.state_dict()
        assert all(torch.equal(again[k], v) for k, v in result.model.state_dict().items())


@pytest.mark.parametrize("lora_output", ["merged", "adapter"])
def test_opcm_folds_every_adapter_once_shows_its_first_pass_and_leaves_no_spill(
    llama_adapters, lora_output, tmp_path, monkeypatch
):
    """opcm's rescale is model-wide: a first pass folds every module's ΔWs (one SVD per projected weight per adapter
    after the first) and keeps the running sums; the merge then rescales them, it does not fold (and SVD) again."""
    import tempfile

    from hf_magmax.merging import opcm_projects

    base, paths, dense = llama_adapters
    projected = [name for name, tensor in dense[0].items() if opcm_projects(name, tensor.shape)]
    svd, svds = torch.linalg.svd, []

    def counting_svd(matrix, *args, **kwargs):
        svds.append(tuple(matrix.shape))
        return svd(matrix, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", counting_svd)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the running sums wait between the passes
    merger, bars = importlib.import_module("hf_magmax.peft.merge"), []

    def recording_tqdm(iterable, desc, disable):  # the bars show on a terminal only: record what they would say
        bars.append((desc, len(svds)))
        return tqdm(iterable, desc=desc, disable=disable)

    monkeypatch.setattr(merger, "tqdm", recording_tqdm)
    rank = 4 if lora_output == "adapter" else None
    merge_adapters(copy.deepcopy(base), paths, method="task_arithmetic", lora_output=lora_output, rank=rank)
    refactor_svds, svds[:], bars[:] = len(svds), [], []  # the adapter's re-factor: one SVD per module, any method
    merge_adapters(copy.deepcopy(base), paths, method="opcm", lora_output=lora_output, rank=rank)
    opcm_svds = (len(paths) - 1) * len(projected)
    assert len(projected) > 0 and (refactor_svds > 0) == (lora_output == "adapter")
    assert len(svds) == opcm_svds + refactor_svds
    # pass 1 (every SVD of opcm) under its own bar, then pass 2 (the re-factor's SVDs only)
    assert bars == [("folding 3 adapters (opcm, pass 1 of 2)", 0), ("merging 3 adapters (opcm, pass 2 of 2: rescale)",
                                                                      opcm_svds)]  # fmt: skip
    assert not list(tmp_path.iterdir())  # the spilled running sums are gone


def test_seed_and_density_policy_and_deprecated_output(llama_adapters):
    base, paths, _ = llama_adapters
    with pytest.raises(ValueError, match="`seed` only applies to `random_mix`"):
        merge_adapters(copy.deepcopy(base), paths, method="magmax", seed=1)
    with pytest.raises(ValueError, match="`density` only applies to `ties`"):
        merge_adapters(copy.deepcopy(base), paths, method="random_mix", density=0.5)
    for coef in (float("nan"), float("inf"), 0.0, -0.5):  # λ as MergeSpec validates it everywhere
        with pytest.raises(ValueError, match="scaling_coef"):
            merge_adapters(copy.deepcopy(base), paths, scaling_coef=coef)
    with pytest.raises(ValueError, match='`scaling_coef="auto"` is not supported'):
        merge_adapters(copy.deepcopy(base), paths, scaling_coef="auto")
    with pytest.raises(ValueError, match="`rank` only applies"):
        merge_adapters(copy.deepcopy(base), paths, lora_output="merged", rank=2)
    # random_mix draws differ with the seed; the randomized SVD has its own seed
    one = merge_adapters(copy.deepcopy(base), paths, method="random_mix", seed=1).model.state_dict()
    two = merge_adapters(copy.deepcopy(base), paths, method="random_mix", seed=2).model.state_dict()
    assert not torch.equal(
        one["model.layers.0.self_attn.q_proj.weight"], two["model.layers.0.self_attn.q_proj.weight"]
    )
    svd = [
        merge_adapters(copy.deepcopy(base), paths, rank=2, svd="randomized", niter=0, svd_seed=s).adapter.state_dict
        for s in (0, 0, 1)
    ]
    key = next(k for k in svd[0] if k.endswith("q_proj.lora_A.weight"))
    assert torch.equal(svd[0][key], svd[1][key]) and not torch.equal(svd[0][key], svd[2][key])
    # `output=` still works, with a FutureWarning
    with pytest.warns(FutureWarning, match="`output=` of `merge_adapters` is deprecated"):
        old = merge_adapters(copy.deepcopy(base), paths, output="merged").model.state_dict()
    new = merge_adapters(copy.deepcopy(base), paths).model.state_dict()  # the default: merged
    assert all(torch.equal(old[k], v) for k, v in new.items())


def test_merge_defaults_scaling_and_method_options(llama_adapters):
    base, paths, dense = llama_adapters
    result = merge_adapters(
        copy.deepcopy(base), paths, method="ties", density=0.5, scaling_coef=0.7, lora_output="merged"
    )
    expected = dense_merge(base, dense, "ties", density=0.5, scaling_coef=0.7)
    for name, value in result.model.state_dict().items():
        torch.testing.assert_close(value, expected[name], atol=1e-6, rtol=0)
    assert merge_adapters(copy.deepcopy(base), paths[:1], lora_output="merged").scaling_coef == 0.5  # magmax default
    assert (
        merge_adapters(copy.deepcopy(base), paths[:1], method="task_arithmetic", lora_output="merged").scaling_coef
        == 0.3
    )


def test_names_loaded_on_a_peft_model_equal_directories(llama_adapters):
    base, paths, _ = llama_adapters
    model = PeftModel.from_pretrained(copy.deepcopy(base), paths[0], adapter_name="a")
    model.load_adapter(paths[1], adapter_name="b")
    mixed = merge_adapters(model, ["a", "b", paths[2]], lora_output="merged").model.state_dict()
    from_dirs = merge_adapters(copy.deepcopy(base), paths, lora_output="merged").model.state_dict()
    for name, value in from_dirs.items():
        torch.testing.assert_close(mixed[name], value, atol=0, rtol=0)


def test_bf16_base_is_merged_in_fp32_and_stays_bf16(llama_adapters):
    base, paths, dense = llama_adapters
    half = copy.deepcopy(base).to(torch.bfloat16)
    reference = {k: v.clone() for k, v in half.state_dict().items()}
    merged = merge_adapters(half, paths, lora_output="merged").model.state_dict()
    selected = merge_task_vectors(dense, method="magmax", scaling_coef=0.5)
    for name, value in merged.items():
        assert value.dtype == torch.bfloat16
        expected = (
            (reference[name].float() + selected[name]).to(torch.bfloat16) if name in selected else reference[name]
        )
        if name == "score.weight":  # modules_to_save copies are loaded in the base dtype: bf16-rounded task vectors
            torch.testing.assert_close(value, expected, atol=2e-2, rtol=0)
        else:  # LoRA factors stay fp32 (PEFT autocasts them): one rounding of the fp32 sum
            assert torch.equal(value, expected), name


def test_magmax_adapter_has_the_per_element_max_of_the_true_deltas(llama_adapters):
    base, paths, dense = llama_adapters
    result = merge_adapters(copy.deepcopy(base), paths, lora_output="merged", scaling_coef=1.0)
    name = "model.layers.0.self_attn.q_proj.weight"
    change = result.model.state_dict()[name] - base.state_dict()[name]
    stacked = torch.stack([tv[name] for tv in dense])
    assert torch.allclose(change.abs(), stacked.abs().amax(0), atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# adapter output: SVD re-factor
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["task_arithmetic", "average"])
def test_sum_of_ranks_reproduces_linear_merge_exactly(llama_adapters, method, tmp_path):
    base, paths, dense = llama_adapters
    result = merge_adapters(copy.deepcopy(base), paths, method=method, lora_output="adapter")
    assert result.overall_error < 1e-5
    assert result.adapter.ranks["model.layers.0.self_attn.q_proj"] == 4 + 2 + 3  # sum of the input ranks
    assert result.adapter.ranks["model.layers.0.mlp.down_proj"] == 3
    result.save_pretrained(tmp_path / "merged_adapter")
    config = json.loads((tmp_path / "merged_adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["modules_to_save"] == ["score"]
    assert config["lora_alpha"] == config["r"] and config["alpha_pattern"] == config["rank_pattern"]
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "merged_adapter").merge_and_unload()
    expected = dense_merge(base, dense, method)
    for name, value in loaded.state_dict().items():
        torch.testing.assert_close(value, expected[name], atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("method", ["magmax", "ties", "random_mix"])
def test_adapter_error_falls_with_rank_and_full_rank_is_exact(llama_adapters, method, tmp_path):
    base, paths, dense = llama_adapters
    errors = [merge_adapters(copy.deepcopy(base), paths, method=method, rank=r).overall_error for r in (1, 4, 8)]
    assert errors[0] > errors[1] > errors[2] > 0
    full = merge_adapters(copy.deepcopy(base), paths, method=method, rank=full_ranks(base))
    assert full.overall_error < 1e-5 and max(full.errors.values()) < 1e-5
    full.save_pretrained(tmp_path / "full")
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "full").merge_and_unload()
    expected = dense_merge(base, dense, method)
    for name, value in loaded.state_dict().items():
        torch.testing.assert_close(value, expected[name], atol=1e-5, rtol=0, msg=name)


def test_reported_errors_are_the_true_relative_errors(llama_adapters):
    base, paths, dense = llama_adapters
    result = merge_adapters(copy.deepcopy(base), paths, rank=2)
    merged = result.model.merge_and_unload().state_dict()  # the PeftModel holding the merged adapter
    expected = dense_merge(base, dense, "magmax")
    num, den = 0.0, 0.0
    for module, error in result.errors.items():
        name = f"{module}.weight"
        target = expected[name] - base.state_dict()[name]
        residual = merged[name] - expected[name]
        assert error == pytest.approx(float(residual.norm() / target.norm()), rel=1e-3, abs=1e-6)
        num, den = num + float(residual.norm() ** 2), den + float(target.norm() ** 2)
    assert result.overall_error == pytest.approx((num / den) ** 0.5, rel=1e-3)


def test_add_magmax_adapter_on_a_peft_model(llama_adapters):
    base, paths, dense = llama_adapters
    model = PeftModel.from_pretrained(copy.deepcopy(base), paths[0], adapter_name="a")
    model.load_adapter(paths[1], adapter_name="b")
    result = add_magmax_adapter(model, ["a", "b", paths[2]], adapter_name="magmax", method="task_arithmetic")
    assert set(model.peft_config) == {"a", "b", "magmax"}  # the directory loaded for the merge is gone again
    model.set_adapter("magmax")
    ids = torch.randint(1, 64, (2, 5))
    reference = copy.deepcopy(base)
    reference.load_state_dict(dense_merge(base, dense, "task_arithmetic"))
    torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-5, rtol=0)
    assert result.overall_error < 1e-5
    with pytest.raises(ValueError, match="already has an adapter named 'magmax'"):
        add_magmax_adapter(model, ["a", "b"], adapter_name="magmax")
    with pytest.raises(TypeError, match="PeftModel"):
        add_magmax_adapter(copy.deepcopy(base), paths)


@pytest.mark.parametrize(
    "make_base, configs",
    [
        (tiny_gpt2, [GPT2_CASES["fan_in_fan_out"], dict(r=2, target_modules=["c_attn"], fan_in_fan_out=True)]),
        (
            tiny_gpt2,
            [GPT2_CASES["lora_bias"], dict(r=3, target_modules=["c_fc"], fan_in_fan_out=True, lora_bias=True)],
        ),
        (ConvEmbedNet, [CUSTOM_CASES["conv_embedding_linear"], CUSTOM_CASES["modules_to_save_with_bias"]]),
        (ConvEmbedNet, [CUSTOM_CASES["conv_lora_bias"], dict(r=1, target_modules=["conv"], lora_bias=True)]),
        (tiny_llama, [LLAMA_CASES["dora"], LLAMA_CASES["linear"]]),
    ],
    ids=["gpt2_conv1d", "gpt2_lora_bias", "conv_embedding", "conv_bias", "dora"],
)
@pytest.mark.parametrize("method", ["magmax", "task_arithmetic"])
def test_adapter_round_trip_per_layer_type(make_base, configs, method, tmp_path):
    torch.manual_seed(0)
    base = make_base()
    models = [make_adapter(base, seed=i, **c) for i, c in enumerate(configs)]
    for i, m in enumerate(models):
        m.save_pretrained(tmp_path / f"a{i}")
    paths = [str(tmp_path / f"a{i}") for i in range(len(models))]
    merged = merge_adapters(copy.deepcopy(base), paths, method=method, lora_output="merged").model.state_dict()
    # full rank: the re-factored adapter reproduces the dense merge
    result = merge_adapters(copy.deepcopy(base), paths, method=method, rank=full_ranks(base), lora_output="adapter")
    result.save_pretrained(tmp_path / "out")
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "out").merge_and_unload().state_dict()
    assert result.overall_error < 1e-5
    for name, value in merged.items():
        torch.testing.assert_close(loaded[name], value, atol=1e-5, rtol=0, msg=name)


def full_ranks(model: nn.Module) -> dict[str, int]:
    """Module name → the largest rank its ΔW allows (the full-rank re-factor is exact)."""
    ranks = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() >= 2 and not isinstance(module, nn.LayerNorm):
            ranks[name] = min(weight.shape[0], weight[0].numel())
    return ranks


def test_deltas_to_lora_standalone():
    torch.manual_seed(0)
    low_rank = torch.randn(12, 3) @ torch.randn(3, 10)
    config, state_dict, errors, overall = deltas_to_lora({"layer.weight": low_rank}, rank=3, scaling_coef=2.0)
    a, b = state_dict["base_model.model.layer.lora_A.weight"], state_dict["base_model.model.layer.lora_B.weight"]
    assert config.r == config.lora_alpha == 3 and config.target_modules == {"layer"}
    torch.testing.assert_close(b @ a, 2.0 * low_rank, atol=1e-4, rtol=0)
    assert overall < 1e-6 and errors["layer"] < 1e-6
    # rank too large for the matrix: the error names the module
    with pytest.raises(ValueError, match="module `layer` allows.*at most 10"):
        deltas_to_lora({"layer.weight": low_rank}, rank=11)
    # randomized SVD: close to the full truncated SVD
    dense = torch.randn(300, 200)
    full = deltas_to_lora({"w.weight": dense}, rank=20).overall_error
    randomized = deltas_to_lora({"w.weight": dense}, rank=20, svd="randomized", niter=6).overall_error
    assert full <= randomized < full * 1.05
    with pytest.raises(ValueError, match="`svd`"):
        deltas_to_lora({"w.weight": dense}, rank=2, svd="qr")
    # a non-LoRA tensor needs the base model to become a modules_to_save entry
    with pytest.raises(ValueError, match="pass `model=`"):
        deltas_to_lora({"norm.weight": torch.ones(4)})


def test_deltas_to_lora_from_a_peft_model_keeps_modules_to_save_in_full(tmp_path):
    """The trainer's path: deltas of a PeftModel (possibly merged) → an adapter that reproduces them."""
    base = tiny_llama()
    model = make_adapter(base, r=2, target_modules=["q_proj", "embed_tokens"], modules_to_save=["score"])
    deltas = lora_delta_state_dict(model)
    factorization = deltas_to_lora(deltas, rank={"model.embed_tokens": 2}, model=model, scaling_coef=0.5)
    assert factorization.peft_config.modules_to_save == ["score"]
    assert factorization.ranks == {"model.embed_tokens": 2, "model.layers.0.self_attn.q_proj": 16}
    factorization.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").merge_and_unload().state_dict()
    expected = fold_deltas_into_base(copy.deepcopy(base), deltas, scaling_coef=0.5).state_dict()
    for name, value in expected.items():  # |ΔW| reaches ~30 here: float32 round-off of the factors
        torch.testing.assert_close(loaded[name], value, atol=1e-4, rtol=1e-5, msg=name)


def test_failed_merge_leaves_the_models_as_given(llama_adapters, tmp_path):
    base, paths, _ = llama_adapters
    other = make_adapter(tiny_llama(hidden_size=32), r=2, target_modules=["q_proj"])
    other.save_pretrained(tmp_path / "other")
    given = copy.deepcopy(base)
    with pytest.raises(ValueError, match="another base model"):
        merge_adapters(given, [paths[0], paths[1], str(tmp_path / "other")], lora_output="merged")
    assert not hasattr(given, "peft_config") and not any("lora" in k for k in given.state_dict())
    for name, value in base.state_dict().items():
        assert torch.equal(given.state_dict()[name], value)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), paths[0], adapter_name="a")
    with pytest.raises(ValueError, match=r"`rank`=17 is larger"):
        merge_adapters(peft_model, ["a", paths[1]], rank=17)
    assert set(peft_model.peft_config) == {"a"}


# ---------------------------------------------------------------------------------------------------------------------
# 6. bad input
# ---------------------------------------------------------------------------------------------------------------------


def test_adapter_for_another_base_names_the_module(llama_adapters, tmp_path):
    base, paths, _ = llama_adapters
    other = make_adapter(tiny_llama(hidden_size=32), r=2, target_modules=["q_proj"])
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match=r"another base model.*module `model.layers.0.self_attn.q_proj` has 16 input"):
        merge_adapters(copy.deepcopy(base), [paths[0], str(tmp_path / "other")])
    gpt = make_adapter(tiny_gpt2(), r=2, target_modules=["c_attn"], fan_in_fan_out=True)
    gpt.save_pretrained(tmp_path / "gpt")
    with pytest.raises(ValueError, match="transformer.h.0.attn.c_attn`, which the base model lacks"):
        merge_adapters(copy.deepcopy(base), [str(tmp_path / "gpt")])


def test_non_lora_adapters_are_refused(llama_adapters, tmp_path):
    base, paths, _ = llama_adapters
    ia3 = get_peft_model(
        copy.deepcopy(base), IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"])
    )
    ia3.save_pretrained(tmp_path / "ia3")
    with pytest.raises(ValueError, match="is a IA3 adapter: only LoRA adapters"):
        merge_adapters(copy.deepcopy(base), [paths[0], str(tmp_path / "ia3")])
    with pytest.raises(ValueError, match="'default' is a IA3 adapter"):
        lora_delta_state_dict(ia3)
    injected = peft.inject_adapter_in_model(
        IA3Config(target_modules=["q_proj"], feedforward_modules=[]), copy.deepcopy(base)
    )
    with pytest.raises(ValueError, match="'default' is a IA3 adapter"):
        lora_delta_state_dict(injected)
    del injected.peft_config  # without a config, the layer itself is recognised
    with pytest.raises(ValueError, match=r"module `model\.layers\.0\.self_attn\.q_proj` holds a Linear adapter layer"):
        lora_delta_state_dict(injected)
    with pytest.raises(FileNotFoundError, match="not-an-adapter"):
        merge_adapters(copy.deepcopy(base), [str(tmp_path / "not-an-adapter")])


def test_bad_arguments(llama_adapters):
    base, paths, _ = llama_adapters
    with pytest.raises(ValueError, match="unknown merge method 'maxmag'"):
        merge_adapters(copy.deepcopy(base), paths, method="maxmag")
    with pytest.raises(ValueError, match="`lora_output` must be"):
        merge_adapters(copy.deepcopy(base), paths, lora_output="both")
    with pytest.raises(ValueError, match="`density` only applies"):
        merge_adapters(copy.deepcopy(base), paths, density=0.5)
    with pytest.raises(ValueError, match="non-empty list"):
        merge_adapters(copy.deepcopy(base), paths[0])
    with pytest.raises(ValueError, match=r"`rank`=17 is larger than module `model\.embed_tokens` allows"):
        merge_adapters(copy.deepcopy(base), paths, rank=17)


class GroupedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, groups=2)

    def forward(self, x):
        return self.conv(x)


def test_unsupported_layers_and_states_name_the_module():
    grouped = make_adapter(GroupedConv(), r=2, target_modules=["conv"])
    with pytest.raises(ValueError, match="module `conv` is a grouped convolution"):
        lora_delta_state_dict(grouped)
    merged = make_adapter(tiny_llama(), r=2, target_modules=["q_proj"])
    merged.merge_adapter()
    with pytest.raises(ValueError, match=r"module `model\.layers\.0\.self_attn\.q_proj` has adapters merged"):
        lora_delta_state_dict(merged)


class Linear4bit(nn.Linear):
    """Looks like bitsandbytes' 4-bit layer (bitsandbytes is not installed here)."""


def test_quantized_base_is_refused(llama_adapters):
    base, paths, _ = llama_adapters
    quantized_config = copy.deepcopy(base)
    quantized_config.config.quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    with pytest.raises(ValueError, match="quantized.*quant_method='bitsandbytes'.*without `quantization_config`"):
        merge_adapters(quantized_config, paths)
    quantized_layer = copy.deepcopy(base)
    quantized_layer.model.layers[0].self_attn.k_proj.__class__ = Linear4bit
    with pytest.raises(
        ValueError, match=r"module `model\.layers\.0\.self_attn\.k_proj` .* is quantized \(Linear4bit\)"
    ):
        merge_adapters(quantized_layer, paths, lora_output="merged")
    peft_model = make_adapter(quantized_layer, r=2, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="is quantized"):
        lora_delta_state_dict(peft_model)


def test_import_hf_magmax_does_not_import_peft():
    code = "import sys, hf_magmax; assert 'peft' not in sys.modules; assert callable(hf_magmax.merge_adapters)"
    subprocess.run([sys.executable, "-c", code], check=True)
