"""The fused C folds of the streaming merge (`hf_magmax/merging/_fold.c`) against the torch path, bit for bit.

The torch path is `subtract` -> the method's accumulator -> `apply_merged` (what `_merged_blocks` runs when the C
folds are not there); the C path is `kernels.fused_merge_block` / `kernels.fused_ties_thresholds`. Bits are compared
as integers (`torch.equal` on floats would take -0.0 for +0.0).
"""

import os
import subprocess
import sys

import pytest
import torch
from builders import load_dir, make_family

from hf_magmax import merge_checkpoints
from hf_magmax.checkpoints import _row_blocks
from hf_magmax.merging import MergeSpec, apply_merged, kernels, ties_trim_threshold
from hf_magmax.task_vectors import subtract


BUILT = kernels._library_paths()
needs_c = pytest.mark.skipif(
    not BUILT, reason="the C merge kernels are not built here (`pip install -e .` or `python setup.py build_ext -i`)"
)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
METHODS = ["magmax", "task_arithmetic", "average", "ties"]


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view({4: torch.int32, 2: torch.int16, 1: torch.uint8}[tensor.element_size()])


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    differ = bits(actual) != bits(expected)
    assert not differ.any(), f"{int(differ.sum())} of {differ.numel()} elements differ, first at {differ.nonzero()[0]}"


@pytest.fixture(params=[os.path.basename(p).split(".")[0] for p in BUILT] or ["none"])
def variant(request, monkeypatch):
    """Each build of `_fold.c` this CPU runs (baseline, AVX2, AVX-512), loaded in turn."""
    if request.param == "none":
        pytest.skip("the C merge kernels are not built here")
    path = next(p for p in BUILT if os.path.basename(p).split(".")[0] == request.param)
    lib = kernels._load_library(path)
    assert lib is not None, path
    monkeypatch.delenv(kernels.DISABLE_CKERNELS_ENV, raising=False)
    monkeypatch.setattr(kernels, "_clib_handle", lib)
    return request.param


def torch_block(method, theta_0, tasks, coef, dtype, thresholds=None, track_winners=False):
    """The torch path of one block, as `_merged_blocks` runs it."""
    spec = MergeSpec(method, coef)
    base = theta_0.to(torch.float32)
    accumulator = spec.accumulator("w", stats=thresholds, track_winners=track_winners)
    for task in tasks:
        accumulator.update(subtract(task, base))
    merged = apply_merged(base, accumulator.result(), spec.coef, dtype=dtype)
    return merged, accumulator.winners() if track_winners else None


def thresholds_of(theta_0, tasks, density):
    return [ties_trim_threshold(subtract(task, theta_0.to(torch.float32)), density) for task in tasks]


def make_block(kind: str, dtype: torch.dtype, shape, num_tasks: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    if kind == "random":
        theta_0 = torch.randn(shape, generator=generator)
        tasks = [theta_0 + 0.05 * torch.randn(shape, generator=generator) for _ in range(num_tasks)]
    elif kind == "ties":  # equal magnitudes across tasks, +0.0 and -0.0
        values = torch.tensor([1.0, -1.0, 0.0, -0.0, 0.5, -0.5])
        theta_0 = torch.zeros(shape)
        tasks = [values[torch.randint(0, 6, shape, generator=generator)] for _ in range(num_tasks)]
    elif kind == "subnormal":  # τ and the output in the subnormal range of the input dtype and of fp32
        tiny = {torch.float32: 2.0**-140, torch.bfloat16: 2.0**-130, torch.float16: 2.0**-20}[dtype]
        theta_0 = torch.randint(-3, 4, shape, generator=generator).float() * tiny
        tasks = [torch.randint(-40, 41, shape, generator=generator).float() * tiny for _ in range(num_tasks)]
    else:  # values that round: output casts of non-representable sums
        theta_0 = torch.randn(shape, generator=generator) * 3
        tasks = [theta_0 + torch.randn(shape, generator=generator) for _ in range(num_tasks)]
    return theta_0.to(dtype), [t.to(dtype) for t in tasks]


# ---------------------------------------------------------------------------------------------------------------------
# one block: C = torch, bit for bit
# ---------------------------------------------------------------------------------------------------------------------


@needs_c
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["random", "ties", "subnormal", "rounding"])
def test_fused_block_equals_the_torch_path(variant, method, dtype, kind):
    for shape, num_tasks in [((1,), 1), ((7,), 2), ((33, 5), 3), ((1031,), 5)]:  # odd sizes: vector tails
        theta_0, tasks = make_block(kind, dtype, shape, num_tasks, seed=num_tasks)
        thresholds = thresholds_of(theta_0, tasks, 0.3) if method == "ties" else None
        for coef in (0.3, 1.0):
            got = kernels.fused_merge_block(method, theta_0, tasks, coef, dtype, thresholds=thresholds)
            assert got is not None, "the C path declined finite inputs"
            expected, _ = torch_block(method, theta_0, tasks, coef, dtype, thresholds)
            assert_same_bits(got[0], expected)
            assert got[1] is None


@needs_c
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["random", "ties"])
def test_fused_magmax_winner_map_equals_the_torch_path(variant, dtype, kind):
    theta_0, tasks = make_block(kind, dtype, (65, 3), 6)
    merged, winners = kernels.fused_merge_block("magmax", theta_0, tasks, 0.5, dtype, track_winners=True)
    expected, expected_winners = torch_block("magmax", theta_0, tasks, 0.5, dtype, track_winners=True)
    assert_same_bits(merged, expected)
    assert winners.dtype == expected_winners.dtype == torch.uint8
    assert torch.equal(winners, expected_winners)
    assert len(winners.unique()) > 1


@needs_c
@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("in_dtype", DTYPES, ids=str)
def test_fused_block_casts_like_torch_across_dtypes(variant, in_dtype, out_dtype):
    """`--dtype`: fp32 math, one round-to-nearest-even cast (fp16 subnormals included), as `.to()` does."""
    generator = torch.Generator().manual_seed(3)
    theta_0 = (torch.randn(4099, generator=generator) * torch.logspace(-7, 2, 4099)).to(in_dtype)
    tasks = [(theta_0.float() + 1e-3 * torch.randn(4099, generator=generator)).to(in_dtype) for _ in range(3)]
    for method in ("magmax", "task_arithmetic"):
        got = kernels.fused_merge_block(method, theta_0, tasks, 0.7, out_dtype)
        assert_same_bits(got[0], torch_block(method, theta_0, tasks, 0.7, out_dtype)[0])


@needs_c
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["random", "ties", "subnormal", "all-equal", "zeros"])
@pytest.mark.parametrize("density", [0.2, 0.5, 0.999, 1.0, 1e-9])
def test_fused_ties_thresholds_equal_the_torch_path(variant, dtype, kind, density):
    shape = (37, 29)
    if kind in ("all-equal", "zeros"):
        theta_0 = torch.zeros(shape, dtype=dtype)
        tasks = [torch.full(shape, 0.25 if kind == "all-equal" else 0.0, dtype=dtype) for _ in range(3)]
    else:
        theta_0, tasks = make_block(kind, dtype, shape, 3)
    for chunk in (100, 1 << 20):  # many row blocks, one
        blocks = [(index, offset) for index, offset in _row_blocks_of(shape, chunk)]
        got = kernels.fused_ties_thresholds(theta_0, tasks, blocks, density)
        assert got == thresholds_of(theta_0, tasks, density)


def _row_blocks_of(shape, chunk):
    import hf_magmax.checkpoints

    saved = hf_magmax.checkpoints._CHUNK_ELEMENTS
    hf_magmax.checkpoints._CHUNK_ELEMENTS = chunk
    try:
        return _row_blocks(shape)
    finally:
        hf_magmax.checkpoints._CHUNK_ELEMENTS = saved


# ---------------------------------------------------------------------------------------------------------------------
# what the C path declines: the torch path takes those blocks
# ---------------------------------------------------------------------------------------------------------------------


@needs_c
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["task", "base"])
def test_fused_block_declines_non_finite_inputs(variant, method, bad, where):
    theta_0, tasks = make_block("random", torch.bfloat16, (50,), 3)
    (theta_0 if where == "base" else tasks[1])[17] = bad
    thresholds = [0.0, 0.0, 0.0] if method == "ties" else None
    assert kernels.fused_merge_block(method, theta_0, tasks, 0.5, torch.bfloat16, thresholds=thresholds) is None
    assert kernels.fused_ties_thresholds(theta_0, tasks, [(Ellipsis, 0)], 0.2) is None


@needs_c
def test_fused_block_declines_an_overflowing_output_and_what_it_does_not_take(variant):
    theta_0 = torch.full((10,), 60000.0, dtype=torch.float16)
    tasks = [torch.full((10,), 65000.0, dtype=torch.float16)]
    assert kernels.fused_merge_block("task_arithmetic", theta_0, tasks, 10.0, torch.float16) is None  # inf in fp16
    ok = torch.ones(8, 4)
    assert kernels.fused_merge_block("magmax", ok.t(), [ok.t()], 0.5, torch.float32) is None  # non-contiguous
    assert kernels.fused_merge_block("magmax", ok.double(), [ok.double()], 0.5, torch.float64) is None  # fp64
    assert kernels.fused_merge_block("random_mix", ok, [ok], 0.5, torch.float32) is None  # no C fold
    assert kernels.fused_merge_block("magmax", ok, [ok] * 257, 0.5, torch.float32, track_winners=True) is None
    assert kernels.fused_merge_block("magmax", ok, [ok] * 257, 0.5, torch.float32) is not None


def test_disabled_by_the_environment_variable(monkeypatch):
    monkeypatch.setenv(kernels.DISABLE_CKERNELS_ENV, "1")
    assert kernels.c_kernels() is None
    ok = torch.ones(8)
    assert kernels.fused_merge_block("magmax", ok, [ok], 0.5, torch.float32) is None
    assert kernels.fused_ties_thresholds(ok, [ok], [(Ellipsis, 0)], 0.2) is None


def test_importing_the_merge_core_loads_neither_torch_nor_the_library():
    code = (
        "import sys; import hf_magmax.merging as m; "
        "assert 'torch' not in sys.modules; assert m.kernels._clib_handle is m.kernels._NOT_LOADED; print('ok')"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout == "ok\n"


# ---------------------------------------------------------------------------------------------------------------------
# the streaming merge, with and without the C folds
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["float32", "bfloat16", "float16"])
def family(request, tmp_path_factory):
    dtype = getattr(torch, request.param)
    return make_family(tmp_path_factory.mktemp(f"kernels-{request.param}"), "llama", num_tasks=3, dtype=dtype)


def _merge_both_ways(monkeypatch, tmp_path, base, models, **kwargs):
    outputs = []
    for disabled in ("1", ""):
        monkeypatch.setenv(kernels.DISABLE_CKERNELS_ENV, disabled)
        out = merge_checkpoints(base, models, tmp_path / f"out{disabled}", show_progress=False, **kwargs)
        outputs.append(out)
    return outputs


@needs_c
@pytest.mark.parametrize("method", METHODS)
def test_merge_checkpoints_same_bits_with_and_without_c(family, tmp_path, monkeypatch, method):
    import hf_magmax.checkpoints

    monkeypatch.setattr(hf_magmax.checkpoints, "_CHUNK_ELEMENTS", 1000)  # several row blocks per tensor
    calls = []
    fused = kernels.fused_merge_block
    monkeypatch.setattr(kernels, "fused_merge_block", lambda *a, **k: calls.append(1) or fused(*a, **k))
    base, models = family
    kwargs = {"save_provenance": True} if method == "magmax" else {}
    torch_out, c_out = _merge_both_ways(monkeypatch, tmp_path, base, models, method=method, **kwargs)
    assert calls, "the C path was not tried"
    a, b = load_dir(torch_out), load_dir(c_out)
    assert list(a) == list(b)
    for name in a:
        assert_same_bits(b[name], a[name])
    if method == "magmax":
        assert (torch_out / "magmax_provenance.json").read_text() == (c_out / "magmax_provenance.json").read_text()


@needs_c
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("where", ["base", "task"])
def test_non_finite_inputs_raise_the_same_error_and_merge_the_same_bits(tmp_path, monkeypatch, method, where):
    from safetensors.torch import load_file, save_file

    base, models = make_family(tmp_path / "family", "llama", num_tasks=2, dtype=torch.bfloat16)
    path = os.path.join(base if where == "base" else models[1], "model.safetensors")
    state = load_file(path)
    state["model.layers.0.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(state, path, metadata={"format": "pt"})
    messages = []
    for disabled in ("1", ""):
        monkeypatch.setenv(kernels.DISABLE_CKERNELS_ENV, disabled)
        with pytest.raises(ValueError, match="holds NaN") as error:
            merge_checkpoints(base, models, tmp_path / "out", method=method, show_progress=False)
        messages.append(str(error.value))
    assert messages[0] == messages[1]
    assert "model.layers.0.mlp.up_proj.weight" in messages[1]
    torch_out, c_out = _merge_both_ways(monkeypatch, tmp_path, base, models, method=method, allow_non_finite=True)
    a, b = load_dir(torch_out), load_dir(c_out)
    for name in a:
        assert_same_bits(b[name], a[name])


@needs_c
def test_an_overflowing_merge_raises_the_same_error(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    paths = []
    for name, value in [("base", 60000.0), ("t0", 65000.0), ("t1", 65000.0)]:
        (tmp_path / name).mkdir()
        save_file({"w": torch.full((4, 4), value, dtype=torch.float16)}, tmp_path / name / "model.safetensors")
        paths.append(str(tmp_path / name))
    messages = []
    for disabled in ("1", ""):
        monkeypatch.setenv(kernels.DISABLE_CKERNELS_ENV, disabled)
        with pytest.raises(ValueError, match="is not finite in float16") as error:
            merge_checkpoints(paths[0], paths[1:], tmp_path / "out", method="task_arithmetic", scaling_coef=2.0,
                              show_progress=False)  # fmt: skip
        messages.append(str(error.value))
    assert messages[0] == messages[1]


@needs_c
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_ties_thresholds_equal_kthvalue_on_many_distinct_magnitudes(variant, dtype):
    """Both histogram passes decide: task vectors whose fp32 magnitudes use all their low 16 bits (θ_0 small next to
    τ, so that τ = θ_t − θ_0 keeps its full precision)."""
    generator = torch.Generator().manual_seed(5)
    theta_0 = (torch.randn(300, 77, generator=generator) * 1e-3).to(dtype)
    tasks = [(theta_0.float() + torch.randn(300, 77, generator=generator) * s).to(dtype) for s in (1e-3, 1.0, 30.0)]
    blocks = _row_blocks_of((300, 77), 5000)
    for density in (0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9):
        got = kernels.fused_ties_thresholds(theta_0, tasks, blocks, density)
        for threshold, task in zip(got, tasks):
            magnitudes = subtract(task, theta_0.float()).abs().flatten()
            k = int(density * magnitudes.numel())
            assert threshold == magnitudes.kthvalue(magnitudes.numel() - k + 1).values.item()
