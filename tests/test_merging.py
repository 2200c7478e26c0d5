import pytest
import torch

from hf_magmax import (
    DEFAULT_SCALING_COEFS,
    MERGE_METHODS,
    StateDictMerger,
    TaskVector,
    average,
    magmax,
    make_online_merge,
    merge_task_vectors,
    random_mix,
    task_arithmetic,
    ties,
)


def _tvs(num_tasks=5, shape=(7, 11), dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype) for _ in range(num_tasks)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_magmax_invariants(dtype):
    tvs = _tvs(6, dtype=dtype)
    out = magmax(tvs)
    stacked = torch.stack(tvs)
    assert out.dtype == dtype and out.shape == tvs[0].shape
    # every output element equals one input's element ...
    assert (stacked == out).any(0).all()
    # ... whose magnitude is the maximum
    assert torch.equal(out.abs(), stacked.abs().amax(0))


def test_magmax_ties_go_to_later_task():
    a = torch.tensor([2.0, -2.0, 1.0, 0.0])
    b = torch.tensor([-2.0, 2.0, -1.0, -0.0])
    assert torch.equal(magmax([a, b]), b)
    assert torch.equal(magmax([b, a]), a)
    # sign kept on the larger magnitude
    assert torch.equal(magmax([torch.tensor([-5.0]), torch.tensor([3.0])]), torch.tensor([-5.0]))


def test_magmax_single_task_returns_itself():
    (tv,) = _tvs(1)
    out = magmax([tv])
    assert torch.equal(out, tv) and out is not tv


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", sorted(MERGE_METHODS))
def test_online_equals_batch_bit_for_bit(method, dtype):
    tvs = _tvs(8, dtype=dtype)
    kwargs = {"density": 0.3} if method == "ties" else {"seed": 3} if method == "random_mix" else {}
    acc = make_online_merge(method, **kwargs)
    for tv in tvs:
        acc.update(tv)
    online = acc.result()
    batch = MERGE_METHODS[method](tvs, **kwargs)
    assert online.dtype == dtype and batch.dtype == dtype
    assert torch.equal(online, batch)


def test_online_state_dict_roundtrip_continues_identically():
    tvs = _tvs(6)
    for method, kwargs in [("magmax", {}), ("ties", {"density": 0.5}), ("random_mix", {"seed": 1}), ("average", {})]:
        full = make_online_merge(method, **kwargs)
        for tv in tvs:
            full.update(tv)
        half = make_online_merge(method, **kwargs)
        for tv in tvs[:3]:
            half.update(tv)
        resumed = make_online_merge(method, **kwargs)
        resumed.load_state_dict(half.state_dict())
        for tv in tvs[3:]:
            resumed.update(tv)
        assert torch.equal(resumed.result(), full.result()), method


def test_average_and_task_arithmetic_fp32_math_for_half():
    tvs = _tvs(4, dtype=torch.float16)
    exact = torch.stack([t.float() for t in tvs])
    assert torch.equal(average(tvs), exact.mean(0).half()) or torch.allclose(
        average(tvs).float(), exact.mean(0), atol=1e-3
    )
    assert torch.allclose(task_arithmetic(tvs).float(), exact.sum(0), atol=1e-2)
    assert average(tvs).dtype == torch.float16


def _ties_reference(tvs, density):
    trimmed = []
    for tv in tvs:
        k = int(density * tv.numel())
        thr = tv.abs().flatten().topk(k).values.min()
        trimmed.append(torch.where(tv.abs() >= thr, tv, torch.zeros_like(tv)))
    stacked = torch.stack(trimmed)
    sign = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    total = (stacked * agree).sum(0)
    count = agree.sum(0)
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


@pytest.mark.parametrize("density", [0.1, 0.2, 0.5, 1.0])
def test_ties_matches_reference(density):
    tvs = _tvs(5, shape=(20, 9))
    assert torch.allclose(ties(tvs, density=density), _ties_reference(tvs, density), atol=1e-6)


def test_ties_trim_keeps_density_fraction():
    (tv,) = _tvs(1, shape=(100,))
    out = ties([tv], density=0.2)
    assert int((out != 0).sum()) == 20


@pytest.mark.parametrize("density", [0, -0.1, 1.5, "x", True])
def test_ties_bad_density(density):
    with pytest.raises(ValueError, match="density"):
        ties(_tvs(2), density=density)


def test_random_mix_picks_inputs_uniformly_and_is_seeded():
    tvs = [torch.full((20000,), float(i)) for i in range(4)]
    out = random_mix(tvs, seed=5)
    assert torch.equal(out, random_mix(tvs, seed=5))
    assert not torch.equal(out, random_mix(tvs, seed=6))
    counts = torch.bincount(out.long(), minlength=4).float() / out.numel()
    assert torch.allclose(counts, torch.full((4,), 0.25), atol=0.02)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="empty"):
        magmax([])
    with pytest.raises(ValueError, match="shape"):
        magmax([torch.zeros(2), torch.zeros(3)])
    with pytest.raises(ValueError, match="unknown merge method 'maxmag'"):
        merge_task_vectors(_tvs(2), method="maxmag")
    with pytest.raises(TypeError, match="density"):
        merge_task_vectors(_tvs(2), method="magmax", density=0.3)
    with pytest.raises(ValueError, match="empty"):
        merge_task_vectors([], method="magmax")


def test_merge_task_vectors_defaults_and_scaling():
    base = {"w": torch.zeros(3), "ids": torch.arange(3)}
    fts = [
        {"w": torch.tensor([1.0, -3.0, 0.5]), "ids": torch.arange(3)},
        {"w": torch.tensor([-2.0, 1.0, 0.5]), "ids": torch.arange(3)},
    ]
    tvs = [TaskVector.from_state_dicts(base, ft) for ft in fts]
    merged = merge_task_vectors(tvs)
    assert isinstance(merged, TaskVector)
    assert torch.equal(merged["w"], 0.5 * torch.tensor([-2.0, -3.0, 0.5]))
    assert DEFAULT_SCALING_COEFS["magmax"] == 0.5
    model = merged.apply_to(base)
    assert torch.equal(model["ids"], base["ids"])
    avg = merge_task_vectors(tvs, method="average").apply_to(base)
    assert torch.allclose(avg["w"], (fts[0]["w"] + fts[1]["w"]) / 2)
    assert torch.equal(merge_task_vectors([t["w"] for t in tvs], scaling_coef=1.0), torch.tensor([-2.0, -3.0, 0.5]))


def test_state_dict_merger_equals_merge_task_vectors():
    g = torch.Generator().manual_seed(1)
    tvs = [{"a": torch.randn(4, 3, generator=g), "b": torch.randn(5, generator=g)} for _ in range(4)]
    for method in MERGE_METHODS:
        merger = StateDictMerger(method)
        for tv in tvs:
            merger.update(tv)
        expected = merge_task_vectors(tvs, method=method, scaling_coef=1.0)
        for name, t in merger.result().items():
            assert torch.equal(t, expected[name]), (method, name)
    merger = StateDictMerger("magmax")
    merger.update(tvs[0])
    with pytest.raises(KeyError, match="same tensors"):
        merger.update({"a": tvs[1]["a"]})


@pytest.mark.parametrize("density", [0.05, 0.2, 1.0])
def test_ties_with_precomputed_thresholds_folds_row_blocks_bit_for_bit(density):
    from hf_magmax.merging import TiesMerge, ties_trim_threshold

    tvs = _tvs(4, shape=(12, 9), dtype=torch.bfloat16)
    whole = ties(tvs, density=density)
    thresholds = [ties_trim_threshold(tv, density) for tv in tvs]
    blocks = []
    for rows in (slice(0, 5), slice(5, 6), slice(6, 12)):
        acc = TiesMerge(density, thresholds=thresholds)
        for tv in tvs:
            acc.update(tv[rows])
        blocks.append(acc.result())
    assert torch.equal(torch.cat(blocks), whole)
    acc = TiesMerge(density, thresholds=thresholds[:1])
    acc.update(tvs[0])
    with pytest.raises(ValueError, match="thresholds"):
        acc.update(tvs[1])
