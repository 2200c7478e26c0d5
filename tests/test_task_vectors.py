import pytest
import torch
from builders import tiny_model

from hf_magmax import TaskVector, merge_task_vectors


def _tiny_llama(tie=True):
    return tiny_model("llama", tie=tie)


def test_from_models_skips_integer_buffers_and_roundtrips():
    torch.manual_seed(0)
    base = _tiny_llama()
    ft = _tiny_llama()
    ft.load_state_dict(base.state_dict())
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    tv = TaskVector.from_models(base, ft)
    assert all(t.is_floating_point() for t in tv.values())
    merged = tv.apply_to(base.state_dict(), scaling_coef=1.0)
    for name, t in ft.state_dict().items():
        assert torch.allclose(merged[name], t, atol=1e-6), name


def test_tied_parameters_handled_once():
    base = _tiny_llama(tie=True)
    sd = base.state_dict()
    if "lm_head.weight" not in sd:
        pytest.skip("this transformers version does not list tied weights in state_dict")
    ft_sd = {k: v.clone() for k, v in sd.items()}
    ft_sd["model.embed_tokens.weight"] += 1.0
    ft_sd["lm_head.weight"] = ft_sd["model.embed_tokens.weight"]
    tv = TaskVector.from_state_dicts(sd, ft_sd)
    assert tv["lm_head.weight"] is tv["model.embed_tokens.weight"]
    model = _tiny_llama(tie=True)
    model.load_state_dict(sd)
    tv.apply_to_model(model, scaling_coef=0.5)
    assert torch.allclose(model.model.embed_tokens.weight, sd["model.embed_tokens.weight"] + 0.5)


def test_integer_buffers_come_from_base():
    base = {"w": torch.ones(2), "pos": torch.tensor([0, 1]), "flag": torch.tensor([True])}
    ft = {"w": torch.zeros(2), "pos": torch.tensor([5, 6]), "flag": torch.tensor([False])}
    tv = TaskVector.from_state_dicts(base, ft)
    assert set(tv) == {"w"}
    out = merge_task_vectors([tv, tv]).apply_to(base)
    assert torch.equal(out["pos"], base["pos"]) and torch.equal(out["flag"], base["flag"])
    assert torch.equal(out["w"], torch.full((2,), 0.5))


def test_half_precision_apply_in_fp32():
    base = {"w": torch.full((3,), 1000.0, dtype=torch.float16)}
    ft = {"w": torch.full((3,), 1001.0, dtype=torch.float16)}
    out = TaskVector.from_state_dicts(base, ft).apply_to(base, scaling_coef=0.5)
    assert out["w"].dtype == torch.float16
    assert torch.allclose(out["w"].float(), torch.full((3,), 1000.5), atol=0.5)


def test_errors_name_the_tensor():
    with pytest.raises(KeyError, match="'b'"):
        TaskVector.from_state_dicts({"a": torch.zeros(1), "b": torch.zeros(1)}, {"a": torch.zeros(1)})
    with pytest.raises(KeyError, match="'c'"):
        TaskVector.from_state_dicts({"a": torch.zeros(1)}, {"a": torch.zeros(1), "c": torch.zeros(1)})
    with pytest.raises(ValueError, match="'a'.*shape"):
        TaskVector.from_state_dicts({"a": torch.zeros(1)}, {"a": torch.zeros(2)})


def test_arithmetic():
    a = TaskVector({"w": torch.tensor([1.0, 2.0])})
    b = TaskVector({"w": torch.tensor([3.0, -1.0])})
    assert torch.equal((a + b)["w"], torch.tensor([4.0, 1.0]))
    assert torch.equal((a - b)["w"], torch.tensor([-2.0, 3.0]))
    assert torch.equal((2 * a)["w"], torch.tensor([2.0, 4.0]))
    assert torch.equal((-a)["w"], torch.tensor([-1.0, -2.0]))
