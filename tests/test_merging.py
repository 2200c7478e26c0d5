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


def test_average_and_task_arithmetic_fp32_math_for_half(small_pieces):
    # fp16 math would lose these: 2048 + 1 rounds back to 2048 in fp16 (spacing 2 there), and 60000 + 60000 overflows
    # fp16's 65504; in fp32 the sum is 2052 / 120000 and the mean 410.4 / 60000, each one rounding away from fp16
    tvs = [torch.tensor([2048.0, 60000.0], dtype=torch.float16)]
    tvs += [torch.tensor([1.0, 60000.0 if i == 0 else 0.0], dtype=torch.float16) for i in range(4)]
    exact = torch.stack([t.double() for t in tvs])
    assert torch.equal(task_arithmetic(tvs[:1] + tvs[2:]), exact[[0, 2, 3, 4]].sum(0).half())  # [2051 -> 2052, 60000]
    assert task_arithmetic(tvs[:1] + tvs[2:])[0] == 2052
    assert torch.equal(average(tvs), exact.mean(0).half())  # [410.4 -> 410.5, 24000]
    assert average(tvs)[0] == 410.5 and average(tvs)[1] == 24000
    assert average(tvs).dtype == torch.float16 and task_arithmetic(tvs).dtype == torch.float16
    # in-kernel widening (fp16 into the fp32 total) equals converting first, for many random values too
    rnd = _tvs(6, shape=(300, 301), dtype=torch.float16)  # > 4 pieces of 4096: converted piece by piece
    assert torch.equal(task_arithmetic(rnd), torch.stack([t.float() for t in rnd]).sum(0).half())


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


# -- the exact TIES threshold without sorting ----------------------------------------------------------------------


def _kthvalue_rule(tv, k):
    """Today's rule: the k-th largest of the fp32 magnitudes, by `kthvalue`."""
    magnitudes = tv.float().abs().flatten()
    return magnitudes.kthvalue(magnitudes.numel() - k + 1).values.item()


def _hard_cases(dtype):
    g = torch.Generator().manual_seed(7)
    tiny = torch.finfo(dtype).tiny  # smallest normal; below it, the subnormals
    cases = {
        "random": torch.randn(1000, generator=g),
        "random 3d": torch.randn(3, 40, 50, generator=g),
        "wide range": torch.randn(4000, generator=g) * torch.logspace(-30, 30, 4000),
        "ties": torch.randint(-3, 4, (999,), generator=g).float(),
        "zeros": torch.zeros(64),
        "signed zeros": torch.tensor([0.0, -0.0] * 20 + [1.0, -1.0]),
        "subnormals": torch.tensor([tiny / 2, -tiny / 4, tiny / 8, 0.0, -0.0, tiny, -tiny / 2, tiny / 1024]),
        "all equal": torch.full((77,), -2.5),
        "infinities": torch.tensor([float("inf"), -float("inf"), 1.0, -2.0, 0.0]),
        "nan": torch.tensor([float("nan"), 1.0, -2.0, float("nan"), 0.5]),
        "one element": torch.tensor([-3.0]),
    }
    return {name: t.to(dtype) for name, t in cases.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_histogram_select_equals_kthvalue_bit_for_bit(dtype):
    import math

    from hf_magmax.merging import _kth_largest_magnitude

    for name, tv in _hard_cases(dtype).items():
        n = tv.numel()
        for k in sorted({1, min(2, n), n // 3, n // 2, n - 1, n} - {0}):
            got, expected = _kth_largest_magnitude(tv, k), _kthvalue_rule(tv, k)
            assert got == expected or (math.isnan(got) and math.isnan(expected)), (name, k, got, expected)
            assert math.copysign(1.0, got) == math.copysign(1.0, expected), (name, k)  # +0.0, never -0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(129, 131), (300, 257), (70001,)])
def test_ties_trim_threshold_equals_kthvalue_rule(dtype, shape):
    from hf_magmax.merging import _RADIX_MIN_NUMEL, ties_trim_threshold

    g = torch.Generator().manual_seed(shape[0])
    tv = (torch.randn(shape, generator=g) * 1e-3).to(dtype)
    tv.view(-1)[::5] = 0.0  # many equal magnitudes, at the threshold too
    flat = tv.view(-1)
    flat[7::7] = -flat[: flat[7::7].numel()]  # equal magnitudes of opposite sign
    assert tv.numel() >= _RADIX_MIN_NUMEL  # the histogram path, not the small-tensor kthvalue
    for density in (1 / tv.numel(), 0.2, 0.5, 0.8, 1 - 1 / tv.numel()):
        k = int(density * tv.numel())
        expected = tv.double().abs().flatten().kthvalue(tv.numel() - k + 1).values.item()
        if dtype != torch.float64:
            expected = _kthvalue_rule(tv, k)
        assert ties_trim_threshold(tv, density) == expected, density
    assert ties_trim_threshold(tv, 1.0) is None
    assert ties_trim_threshold(tv, 0.1 / tv.numel()) == float("inf")  # k = 0: nothing kept


# -- the integer folds agree with the float formulation bit for bit -------------------------------------------------


@pytest.fixture
def small_pieces(monkeypatch):
    """CPU folds go through tensors in pieces of 4096 elements: small tensors then cover several pieces."""
    from hf_magmax.merging import kernels as _merge_kernels

    monkeypatch.setattr(_merge_kernels, "_FOLD_CHUNK", 4096)
    return 4096


def _bits(t):
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _nasty_tvs(dtype, numel=20_001, num_tasks=6, nan=True):
    """Task vectors over several fold pieces, with ties, ±0, ±inf, subnormals, huge values and (optionally) NaN."""
    g = torch.Generator().manual_seed(3)
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-45, -1e-45, 1.0, -1.0, 3e38, -3e38])
    if nan:
        special = torch.cat([special, torch.tensor([float("nan")])])
    tvs = []
    for i in range(num_tasks):
        x = torch.randn(numel, generator=g)
        if i == 2:
            x = x.round()  # exact ties with other tasks
        where = torch.randint(0, numel, (numel // 8,), generator=g)
        x[where] = special[torch.randint(0, len(special), (numel // 8,), generator=g)]
        tvs.append(x.to(dtype))
    return tvs


@pytest.mark.parametrize("nan", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_magmax_integer_fold_equals_float_select(dtype, nan, small_pieces):
    from hf_magmax.merging import MagMaxMerge

    tvs = _nasty_tvs(dtype, nan=nan)
    assert tvs[0].numel() > 2 * small_pieces  # several pieces, the last one short
    selected, winners = tvs[0].clone(), torch.zeros(tvs[0].shape, dtype=torch.uint8)
    for t, tv in enumerate(tvs[1:], start=1):  # the float definition: ties (>=) to the later task, NaN never wins
        take = tv.abs() >= selected.abs()
        selected, winners = torch.where(take, tv, selected), torch.where(take, t, winners).to(torch.uint8)
    acc = MagMaxMerge(track_winners=True)
    for tv in tvs:
        acc.update(tv)
    assert torch.equal(_bits(acc.result()), _bits(selected))
    assert torch.equal(_bits(magmax(tvs)), _bits(selected))
    assert torch.equal(acc.winners(), winners)


def _ties_float_state(tvs, thresholds):
    """The float formulation of TIES' online state (the four sums), the definition the pieces must match."""
    state = None
    for tv, threshold in zip(tvs, thresholds):
        tv = tv.to(torch.float64 if tv.dtype == torch.float64 else torch.float32)
        trimmed = tv if threshold is None else torch.where(tv.abs() >= threshold, tv, torch.zeros_like(tv))
        positive, negative = trimmed > 0, trimmed < 0
        parts = [torch.where(positive, trimmed, 0.0), torch.where(negative, trimmed, 0.0)]
        parts += [positive.to(tv.dtype), negative.to(tv.dtype)]
        state = parts if state is None else [s + p for s, p in zip(state, parts)]
    return state


@pytest.mark.parametrize("nan", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_ties_piecewise_fold_equals_float_formulation(dtype, nan, small_pieces):
    from hf_magmax.merging import TiesMerge, ties_trim_threshold

    tvs = _nasty_tvs(dtype, num_tasks=5, nan=nan)
    tvs[4] = torch.zeros_like(tvs[4])
    tvs[4].view(-1)[::3] = -0.0
    for density in (0.05, 0.3, 1.0):
        computed = [ties_trim_threshold(tv, density) for tv in tvs]
        odd = [-1.0, float("nan"), -0.0, 0.0, 2.0]  # thresholds a caller may pass: all must follow the definition
        for thresholds in (computed, odd):
            acc = TiesMerge(density, thresholds=thresholds)
            for tv in tvs:
                acc.update(tv)
            expected = _ties_float_state(tvs, thresholds)
            got = [acc.pos_sum, acc.neg_sum, acc.pos_count, acc.neg_count]
            for name, a, b in zip(("pos_sum", "neg_sum", "pos_count", "neg_count"), got, expected):
                assert torch.equal(_bits(a), _bits(b)), (density, thresholds, name)


# -- provenance: which task won, element by element ----------------------------------------------------------------


def test_magmax_winners_known_by_hand(small_pieces):
    from hf_magmax.merging import MagMaxMerge, MergeSpec

    a = torch.tensor([1.0, -3.0, 2.0, 0.0, 5.0, -1.0])
    b = torch.tensor([-2.0, 3.0, -2.0, -0.0, 1.0, 0.5])
    c = torch.tensor([0.5, 1.0, 2.0, 0.0, -5.0, 0.25])
    # |.|: b wins 0; a/b tie at 3 -> b; all tie at 2 -> c; ±0 ties -> c; a/c tie at 5 -> c; a alone wins 5
    expected = torch.tensor([1, 1, 2, 2, 2, 0], dtype=torch.uint8)
    # one piece, several pieces (the integer path), and non-contiguous inputs (the float path)
    for reps, contiguous in ((1, True), (2 * small_pieces // 6 + 5, True), (3, False)):
        acc = MergeSpec("magmax").accumulator("w", track_winners=True)
        assert isinstance(acc, MagMaxMerge)
        for tv in (a, b, c):
            tv = tv.repeat(reps)
            acc.update(tv if contiguous else torch.stack([tv, tv], 1)[:, 0])
        winners = acc.winners()
        assert winners.dtype == torch.uint8 and torch.equal(winners, expected.repeat(reps))
        stacked = torch.stack([a, b, c]).repeat(1, reps)
        assert torch.equal(acc.result(), stacked.gather(0, winners.long()[None])[0])  # the winner's value
    acc = MagMaxMerge()
    acc.update(a)
    with pytest.raises(ValueError, match="track_winners=True"):
        acc.winners()


def test_winners_state_dict_roundtrip_and_widening():
    from hf_magmax.merging import MergeSpec

    tvs = _tvs(6, shape=(50, 30))
    for spec in (MergeSpec("magmax"), MergeSpec("random_mix", seed=2)):
        full = spec.accumulator("w", track_winners=True)
        for tv in tvs:
            full.update(tv)
        half = spec.accumulator("w", track_winners=True)
        for tv in tvs[:3]:
            half.update(tv)
        state = half.state_dict()
        assert state["winners"].dtype == torch.uint8
        resumed = spec.accumulator("w", track_winners=True)
        resumed.load_state_dict(state)
        for tv in tvs[3:]:
            resumed.update(tv)
        assert torch.equal(resumed.winners(), full.winners()) and torch.equal(resumed.result(), full.result())
        plain = spec.accumulator("w")
        plain.update(tvs[0])
        with pytest.raises(ValueError, match="without winners"):
            spec.accumulator("w", track_winners=True).load_state_dict(plain.state_dict())
    # more than 256 tasks: int16; the last task holding the largest magnitude wins everywhere
    acc = MergeSpec("magmax").accumulator(track_winners=True)
    for t in range(300):
        acc.update(torch.full((70_000,), float(t % 50)))
    assert acc.winners().dtype == torch.int16 and bool((acc.winners() == 299).all())


def test_random_mix_winners_name_the_drawn_task():
    from hf_magmax.merging import MergeSpec

    tvs = [torch.full((5000,), float(t)) for t in range(5)]
    acc = MergeSpec("random_mix", seed=4).accumulator("layer.weight", track_winners=True)
    for tv in tvs:
        acc.update(tv)
    assert torch.equal(acc.winners().float(), acc.result())
    assert torch.equal(acc.result(), random_mix(tvs, seed=4, name="layer.weight"))  # tracking changes no draw


@pytest.mark.parametrize("method", ["ties", "average", "task_arithmetic"])
def test_track_winners_only_for_selecting_methods(method):
    from hf_magmax.merging import MergeSpec

    with pytest.raises(ValueError, match="`track_winners` only applies to `magmax`, `random_mix`"):
        MergeSpec(method).accumulator("w", track_winners=True)


# -- provenance at the state-dict level: which task won where -------------------------------------------------------


def _provenance_tvs():
    return [
        {"a": torch.tensor([3.0, 0.0, -1.0, 2.0]), "b": torch.tensor([[1.0, -5.0]])},
        {"a": torch.tensor([-1.0, 0.0, 2.0, -2.0]), "b": torch.tensor([[-2.0, 5.0]])},
        {"a": torch.tensor([0.5, 0.0, -2.0, 1.0]), "b": torch.tensor([[2.0, 1.0]])},
    ]


def test_state_dict_merger_and_merge_task_vectors_record_the_winners():
    from hf_magmax.merging import winner_shares

    tvs = _provenance_tvs()
    # by hand: the largest |τ| wins, ties (the zeros, |-1|/|2|/|-2|, |2|/|-2|, |2|/|2|, |5|/|5|) to the later task
    expected = {"a": torch.tensor([0, 2, 2, 1]), "b": torch.tensor([[2, 1]])}
    merger = StateDictMerger("magmax", track_winners=True)
    for tv in tvs:
        merger.update(tv)
    winners = merger.winners()
    merged, winners_too = merge_task_vectors(tvs, "magmax", scaling_coef=1.0, return_winners=True)
    for name, want in expected.items():
        assert winners[name].dtype == torch.uint8 and torch.equal(winners[name].long(), want), name
        assert torch.equal(winners_too[name], winners[name]), name
        chosen = torch.stack([tv[name] for tv in tvs]).gather(0, want.unsqueeze(0)).squeeze(0)
        assert torch.equal(merged[name], chosen), name  # the merged value is the winner's value
    shares = winner_shares(winners, num_tasks=3)
    assert shares["a"] == [0.25, 0.25, 0.5] and shares["b"] == [0.0, 0.5, 0.5]
    assert shares["*"] == pytest.approx([1 / 6, 2 / 6, 3 / 6])
    # resumable: the winners survive a state-dict round trip mid-way
    half = StateDictMerger("magmax", track_winners=True)
    for tv in tvs[:2]:
        half.update(tv)
    resumed = StateDictMerger("magmax", track_winners=True)
    resumed.load_state_dict(half.state_dict())
    resumed.update(tvs[2])
    assert all(torch.equal(resumed.winners()[n], winners[n]) for n in winners)


def test_winners_only_for_methods_that_keep_one_tasks_value():
    with pytest.raises(ValueError, match="track_winners"):
        StateDictMerger("ties", track_winners=True)
    with pytest.raises(ValueError, match="track_winners"):
        StateDictMerger("magmax").winners()
    (tensor_merge, tensor_winners) = merge_task_vectors([torch.tensor([1.0, -4.0]), torch.tensor([-2.0, 3.0])],
                                                         "magmax", return_winners=True)  # fmt: skip
    assert torch.equal(tensor_winners.long(), torch.tensor([1, 0])) and torch.equal(
        tensor_merge, torch.tensor([-1.0, -2.0])
    )
