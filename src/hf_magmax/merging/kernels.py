# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""CPU kernels of the merge core: the folds on integer bit patterns, the exact TIES threshold by histogram select, the
counter-based hash of random_mix, and the fused single-pass folds of the streaming merge in C (`_fold.c`, built at
install time when a compiler is there, loaded with `ctypes` on first use). Private: [`hf_magmax.merging`] is the API;
these are its fast paths, each checked bit for bit against the plain float formulation in `tests/test_merging.py` and
`tests/test_kernels.py`. Torch is imported when a kernel runs.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING


if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import Tensor


logger = logging.getLogger(__name__)

#: Elements per piece when a CPU fold goes through a tensor: the few passes over one piece stay in the L2/L3 cache
#: instead of streaming the whole tensor through memory once per pass (measured in `benchmarks/merge_core.py`).
_FOLD_CHUNK = 1 << 18


def _bit_layout(dtype: torch.dtype) -> tuple[torch.dtype, int, int] | None:
    """(integer dtype of the same width, mask of the magnitude bits, bit pattern of +inf) of an IEEE float dtype.

    Non-negative IEEE floats order like their bit patterns read as integers, and `bits & mask` is the bit pattern of
    `|x|`: the folds compare magnitudes and select values with integer operations, which PyTorch vectorizes on CPU
    (its `torch.where` is not). NaN magnitudes are the patterns above +inf's; the folds check for them.
    """
    import torch

    layouts = {
        torch.float32: (torch.int32, 0x7FFFFFFF, 0x7F800000),
        torch.float16: (torch.int16, 0x7FFF, 0x7C00),
        torch.bfloat16: (torch.int16, 0x7FFF, 0x7F80),
        torch.float64: (torch.int64, 0x7FFFFFFFFFFFFFFF, 0x7FF0000000000000),
    }
    return layouts.get(dtype)


def _bitwise_fold_ok(*tensors: Tensor) -> bool:
    """Whether the CPU integer formulation applies: contiguous CPU tensors of one IEEE dtype."""
    first = tensors[0]
    return (
        first.device.type == "cpu"
        and _bit_layout(first.dtype) is not None
        and all(t.dtype == first.dtype and t.device == first.device and t.is_contiguous() for t in tensors)
    )


def _pieces(numel: int):
    """`(start, stop)` of the cache-sized pieces of a flat tensor of `numel` elements."""
    for start in range(0, numel, _FOLD_CHUNK):
        yield start, min(numel, start + _FOLD_CHUNK)


def add_widened(total: Tensor, task_vector: Tensor) -> None:
    """`total += task_vector` in `total`'s dtype (fp32 sums of half task vectors), in place, the same bits as
    `total.add_(task_vector.to(total.dtype))`."""
    import torch

    if task_vector.dtype == total.dtype:
        total.add_(task_vector)
    elif (
        total.device.type == "cpu"
        and total.numel() > 4 * _FOLD_CHUNK  # smaller ones: one converted copy is faster (cache-hot)
        and total.is_contiguous()
        and torch.promote_types(task_vector.dtype, total.dtype) == total.dtype
    ):
        # a widening (bf16/fp16 -> fp32, fp32 -> fp64) is exact: convert piece by piece into one cache-sized
        # buffer and add, instead of a converted copy of the whole tensor (the same bits)
        total, flat = total.view(-1), task_vector.reshape(-1)
        buffer = torch.empty(min(flat.numel(), _FOLD_CHUNK), dtype=total.dtype)
        for start, stop in _pieces(flat.numel()):
            total[start:stop].add_(buffer[: stop - start].copy_(flat[start:stop]))
    else:
        total.add_(task_vector.to(total.dtype))


def fold_magmax_bits(selected_tensor: Tensor, task_vector: Tensor, winners: Tensor | None, task: int) -> None:
    """The selection on the integer bit patterns, piece by piece, in place (CPU, contiguous, IEEE dtypes).

    With `a = |new|` and `b = |selected|` as integers (both in [0, 2**(n-1))), `(a - b) >> (n-1)` is -1 where the
    running selection stays and 0 where the new task wins (`a >= b`, ties included); the selection is then
    `new ^ ((new ^ selected) & keep)`. A piece holding a NaN in the new task vector takes the float path, whose
    comparisons are false on NaN (a NaN never wins, a NaN selected stays), so both paths agree bit for bit.
    """
    import torch

    int_dtype, magnitude_mask, inf_bits = _bit_layout(selected_tensor.dtype)
    shift = torch.iinfo(int_dtype).bits - 1
    selected = selected_tensor.view(-1).view(int_dtype)
    new = task_vector.reshape(-1).view(int_dtype)
    size = min(new.numel(), _FOLD_CHUNK)
    a = torch.empty(size, dtype=int_dtype)
    b = torch.empty(size, dtype=int_dtype)
    flat_winners = keep = None
    if winners is not None:
        flat_winners, keep = winners.view(-1), torch.empty(size, dtype=winners.dtype)
    for start, stop in _pieces(new.numel()):
        x, y, ka, kb = new[start:stop], selected[start:stop], a[: stop - start], b[: stop - start]
        torch.bitwise_and(x, magnitude_mask, out=ka)  # |new|
        if int(ka.max()) > inf_bits:  # a NaN: compare as floats here
            xf, yf = x.view(selected_tensor.dtype), y.view(selected_tensor.dtype)
            take = xf.abs() >= yf.abs()
            yf.copy_(torch.where(take, xf, yf))
            if flat_winners is not None:
                flat_winners[start:stop].masked_fill_(take, task)
            continue
        torch.bitwise_and(y, magnitude_mask, out=kb)  # |selected|
        torch.sub(ka, kb, out=kb)
        kb.bitwise_right_shift_(shift)  # keep: -1 where the selection stays, 0 where the new task wins
        torch.bitwise_xor(x, y, out=ka)
        ka.bitwise_and_(kb)
        torch.bitwise_xor(x, ka, out=y)
        if flat_winners is not None:  # winners = keep ? winners : task, as ((winners ^ task) & keep) ^ task
            keep_w, w = keep[: stop - start], flat_winners[start:stop]
            keep_w.copy_(kb)  # all ones where the selection stays, in the winners' dtype
            w.bitwise_xor_(task).bitwise_and_(keep_w).bitwise_xor_(task)


def _trim_bits(x: Tensor, out: Tensor, threshold_bits: int, int_dtype: torch.dtype, mask: int, inf_bits: int) -> bool:
    """`out = x if |x| >= threshold else +0.0` on the bit patterns (TIES' trim); False, nothing written, on a NaN."""
    import torch

    bits, work = x.view(int_dtype), out.view(int_dtype)
    torch.bitwise_and(bits, mask, out=work)  # |x|
    if int(work.max()) > inf_bits:
        return False
    work.sub_(threshold_bits).bitwise_right_shift_(torch.iinfo(int_dtype).bits - 1)  # -1 where |x| < threshold
    work.bitwise_and_(bits)
    torch.bitwise_xor(bits, work, out=work)  # x where kept, +0.0 where trimmed away
    return True


def fold_ties_pieces(sums: Sequence[Tensor], task_vector: Tensor, threshold: float | None) -> None:
    """The fold on CPU, in cache-sized pieces, without full-size temporaries; the same bits as the float path.

    The trim is done on the bit patterns (`|x| >= threshold` as integers, `x & keep`), the sums add
    `clamp(trimmed, min=0)` / `clamp(trimmed, max=0)` (a `-0.0` there adds nothing: the sums are never `-0.0`)
    and the counts add their signs. A piece with a NaN, or an unusual threshold, takes the float formulation.
    """
    import torch

    compute = sums[0].dtype
    int_dtype, magnitude_mask, inf_bits = _bit_layout(compute)
    threshold_bits = 0  # density 1: keep every element (NaN aside: nothing compares with it)
    if threshold is not None:
        value = torch.tensor(threshold, dtype=compute)  # the comparison rounds the threshold to `compute`
        threshold_bits = int(value.abs().view(int_dtype)) if value >= 0 else None  # NaN, < 0: float path
    flat = task_vector.reshape(-1)
    sums = [t.view(-1) for t in sums]  # pos_sum, neg_sum, pos_count, neg_count
    size = min(flat.numel(), _FOLD_CHUNK)
    converted = torch.empty(size, dtype=compute) if flat.dtype != compute else None
    trimmed_buffer = torch.empty(size, dtype=compute)
    part = torch.empty(size, dtype=compute)
    for start, stop in _pieces(flat.numel()):
        n = stop - start
        x = flat[start:stop]
        if converted is not None:
            x = converted[:n].copy_(x)  # fp32 for half inputs (exact)
        trimmed = trimmed_buffer[:n]
        if threshold_bits is None or not _trim_bits(x, trimmed, threshold_bits, int_dtype, magnitude_mask, inf_bits):
            # the float formulation: a NaN is neither kept by the trim nor counted by the sums below
            kept = ~x.isnan() if threshold is None else x.abs() >= threshold
            trimmed.copy_(torch.where(kept, x, 0.0))
        pos_sum, neg_sum, pos_count, neg_count = (t[start:stop] for t in sums)
        p = part[:n]
        torch.clamp_min(trimmed, 0, out=p)
        pos_sum.add_(p)
        pos_count.add_(p.sign_())
        torch.clamp_max(trimmed, 0, out=p)
        neg_sum.add_(p)
        neg_count.sub_(p.sign_())


_MASK32 = 0xFFFFFFFF
# multipliers below 2**31, so that `x * m` of a 32-bit `x` never leaves int64 (no overflow to rely on)
_MIX_1, _MIX_2 = 0x7FEB352D, 0x2C1B3C6D


def _mix32(x):
    """A 32-bit integer hash (xorshift-multiply), on Python ints and on int64 tensors holding 32-bit values alike."""
    x = x ^ (x >> 16)
    x = (x * _MIX_1) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _MIX_2) & _MASK32
    return x ^ (x >> 16)


#: Below this many elements `kthvalue` is faster than the two-pass histogram select (measured, 2 CPU cores).
_RADIX_MIN_NUMEL = 1 << 14


def _select_bucket(
    keys: Tensor, rank: int, num_buckets: int, reduce: Callable[[Tensor], Tensor] | None = None
) -> tuple[int, int]:
    """The bucket holding the element of 0-based ascending `rank` among integer `keys` in [0, num_buckets), and the
    element's rank inside that bucket. With `reduce`, the histogram is first summed over the other parts of the
    tensor (e.g. an all-reduce over the ranks holding its shards): `keys` is then this part's keys and `rank` a rank
    in the whole tensor."""
    import torch

    histogram = torch.bincount(keys, minlength=num_buckets)
    if reduce is not None:
        histogram = reduce(histogram)
    cumulative = histogram.cumsum_(0)
    bucket = int(torch.searchsorted(cumulative, rank, right=True))  # the first bucket with more than `rank` below it
    below = int(cumulative[bucket - 1]) if bucket else 0
    return bucket, rank - below


def _kth_largest_magnitude(
    task_vector: Tensor, k: int, reduce: Callable[[Tensor], Tensor] | None = None, numel: int | None = None
) -> float:
    """The k-th largest `|x|` of an fp32, fp16 or bf16 tensor (1 ≤ k ≤ numel), as a Python float, without sorting.

    Non-negative floats order like their bit patterns, so the k-th largest magnitude is found by counting: fp32 takes a
    histogram of the high 16 bits of `|x|` (sign bit cleared), which names the one bucket holding the answer, then a
    histogram of the low 16 bits of the elements in that bucket; fp16/bf16 need only the first histogram (the fp32
    magnitudes of half values order like the half ones: conversion is exact). Bit for bit what `kthvalue` returns on
    the fp32 magnitudes, signed zeros, subnormals, infinities and NaN (above +inf, as `kthvalue` orders it) included.

    With `reduce` (a sum of an integer tensor over the parts of a tensor split across processes, e.g. an all-reduce
    over the ranks holding its shards), `task_vector` is this process's part and `numel` the whole tensor's: every
    histogram is summed over the parts, so each process gets the whole tensor's k-th largest magnitude, bit for bit
    (every process must call it, with the same `k`, `numel` and dtype: the histograms are collective).
    """
    import torch

    flat = task_vector.reshape(-1)
    if not flat.is_contiguous():  # pragma: no cover - reshape(-1) returns a contiguous tensor or a contiguous copy
        flat = flat.contiguous()
    rank = (flat.numel() if numel is None else numel) - k  # 0-based ascending rank of the k-th largest
    if flat.dtype == torch.float32:
        words = flat.view(torch.int16)  # two 16-bit words per element, in memory order
        high_words = words[1::2] if sys.byteorder == "little" else words[0::2]
        high = high_words & 0x7FFF  # |x|'s high 16 bits (sign cleared), in [0, 2**15)
        bucket, rank = _select_bucket(high, rank, 1 << 15, reduce)
        low = flat.view(torch.int32)[high == bucket] & 0xFFFF  # the low 16 bits of the elements in that bucket
        fine, _ = _select_bucket(low, rank, 1 << 16, reduce)
        bits = torch.tensor((bucket << 16) | fine, dtype=torch.int32)
        return bits.view(torch.float32).item()
    keys = flat.view(torch.int16) & 0x7FFF  # fp16 / bf16: |x|'s 15 bits
    bucket, _ = _select_bucket(keys, rank, 1 << 15, reduce)
    return torch.tensor(bucket, dtype=torch.int16).view(flat.dtype).float().item()


# ---------------------------------------------------------------------------------------------------------------------
# The fused C folds of the streaming merge (`_fold.c`)
# ---------------------------------------------------------------------------------------------------------------------

#: Set to `1` to force the torch path of the streaming merge (the C folds are never loaded); the bits are the same.
DISABLE_CKERNELS_ENV = "HF_MAGMAX_DISABLE_CKERNELS"
_ABI_VERSION = 1  # `hfm_abi_version()` of the `_fold.c` this module calls; a stale build is not used
_NOT_LOADED = object()
_clib_handle: object = _NOT_LOADED
_DTYPE_CODES: dict[str, int] = {"float32": 0, "bfloat16": 1, "float16": 2}  # `_fold.c`'s dtype codes
#: The merge methods that have a fused C fold.
FUSED_METHODS = ("magmax", "task_arithmetic", "average", "ties")


#: The builds of `_fold.c` (setup.py), best first, and the prefixes of torch's CPU capabilities that run each.
_VARIANTS = (("_fold_avx512", ("AVX512",)), ("_fold_avx2", ("AVX512", "AVX2")), ("_fold", None))


def _cpu_capability() -> str:
    import torch

    try:
        return str(torch.backends.cpu.get_cpu_capability()).upper()
    except Exception:  # pragma: no cover - older torch: the baseline build only
        return "DEFAULT"


def _library_paths() -> list[str]:
    """The paths of the built `_fold` libraries next to this file that this CPU runs, best first."""
    import importlib.machinery

    here = os.path.dirname(os.path.abspath(__file__))
    capability = None
    paths = []
    for stem, capabilities in _VARIANTS:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = os.path.join(here, stem + suffix)
            if not os.path.isfile(path):
                continue
            if capabilities is not None:
                capability = capability or _cpu_capability()
                if not capability.startswith(capabilities):
                    break
            paths.append(path)
            break
    return paths


def _load_library(path: str | None = None):
    """Load the best `_fold` build (or `path`) with its function signatures; None (and a debug log saying why) when
    none can be used."""
    import ctypes

    if sys.byteorder != "little":
        logger.debug("C merge kernels not used: big-endian platform")
        return None
    paths = [path] if path is not None else _library_paths()
    if not paths:
        logger.debug("C merge kernels not built (no compiler at install time?): the torch path runs")
        return None
    lib = None
    for candidate in paths:  # the best build that loads
        try:
            lib = ctypes.CDLL(candidate)
            lib.hfm_abi_version.restype = ctypes.c_int
            version = lib.hfm_abi_version()
        except (OSError, AttributeError) as err:
            logger.debug("C merge kernels at %s cannot be loaded (%s)", candidate, err)
            lib = None
            continue
        if version == _ABI_VERSION:
            break
        logger.debug("C merge kernels at %s are a stale build (ABI %d): reinstall hf_magmax", candidate, version)
        lib = None
    if lib is None:
        return None
    p, i, i64, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
    signatures = {
        "hfm_widen": (i, [p, i, p, i64]),
        "hfm_magmax_fold": (i, [p, i, p, p, p, i, i, i64]),
        "hfm_sum_fold": (i, [p, i, p, p, i, i64]),
        "hfm_ties_fold": (i, [p, i, p, f, p, p, p, p, i64]),
        "hfm_diff_hist_high": (i, [p, i, p, p, i64]),
        "hfm_diff_hist_low": (None, [p, i, p, i, p, i64]),
        "hfm_apply": (i, [p, p, f, p, i, i64]),
        "hfm_ties_apply": (i, [p, p, p, p, p, f, p, i, i64]),
    }
    for name, (restype, argtypes) in signatures.items():
        function = getattr(lib, name)
        function.restype, function.argtypes = restype, argtypes
    return lib


def c_kernels():
    """The loaded C library of the fused folds, or None: not built, disabled by `HF_MAGMAX_DISABLE_CKERNELS=1`, or not
    loadable here. Loaded once, on first use (a few milliseconds: no compiler ever runs)."""
    global _clib_handle
    if os.environ.get(DISABLE_CKERNELS_ENV, "").strip().lower() not in ("", "0", "false", "no"):
        return None
    if _clib_handle is _NOT_LOADED:
        _clib_handle = _load_library()
    return _clib_handle


def c_kernels_status() -> str:
    """One line for `hf-magmax --version`: whether the fused C folds run here, without importing torch. The builds
    found are listed; the best one the CPU runs (torch's CPU capability) is picked at the first merge, and a merge
    checks that the baseline build loads with this module's ABI."""
    if os.environ.get(DISABLE_CKERNELS_ENV, "").strip().lower() not in ("", "0", "false", "no"):
        return f"C merge kernels: off ({DISABLE_CKERNELS_ENV}=1); the torch path runs (same results, slower)"
    import importlib.machinery

    here = os.path.dirname(os.path.abspath(__file__))
    built = {
        stem: os.path.join(here, stem + suffix)
        for stem, _ in _VARIANTS
        for suffix in importlib.machinery.EXTENSION_SUFFIXES
        if os.path.isfile(os.path.join(here, stem + suffix))
    }
    slow = "the torch path runs (same results, slower)"
    if "_fold" not in built:
        return f"C merge kernels: not built (no C compiler at install time?); {slow}"
    if _load_library(built["_fold"]) is None:  # the baseline build: no instruction this CPU may lack
        return f"C merge kernels: built but not loadable (a stale build? reinstall hf_magmax); {slow}"
    return (
        f"C merge kernels: in use for {', '.join(FUSED_METHODS)} (builds: {', '.join(built)}; the best one this CPU "
        "runs is picked)"
    )


def _code(tensor: Tensor) -> int | None:
    """`_fold.c`'s dtype code of a contiguous CPU tensor, None if the C folds do not take it."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        return None
    return _DTYPE_CODES.get(str(tensor.dtype).removeprefix("torch."))


def _widened_f32(lib, theta_0: Tensor, code: int) -> Tensor:
    """θ_0 as a flat fp32 tensor (itself when it is one). Its finiteness is not checked here: a non-finite θ_0 makes
    every τ non-finite, which the folds report."""
    import torch

    if code == 0:
        return theta_0.view(-1)
    out = torch.empty(theta_0.numel(), dtype=torch.float32)
    lib.hfm_widen(theta_0.data_ptr(), code, out.data_ptr(), out.numel())
    return out


def fused_merge_block(
    method: str,
    theta_0: Tensor,
    tasks: Sequence[Tensor],
    scaling_coef: float,
    dtype: torch.dtype,
    *,
    thresholds: Sequence[float | None] | None = None,
    track_winners: bool = False,
) -> tuple[Tensor, Tensor | None] | None:
    """One block of the streaming merge in the C folds: `θ_0 + λ · merge(θ_t − θ_0 for θ_t in tasks)` in `dtype`,
    and the winner map (`uint8`, magmax with `track_winners`).

    One pass per task over the block (τ in fp32, never stored; the fold; a "saw a non-finite value" flag) and one
    for the output (`θ_0 + λ · merged` cast to `dtype`, round to nearest even), the same bits as the torch path:
    `subtract`, the method's accumulator, `apply_merged`. Returns None, and the caller takes the torch path, when the
    C folds are not there (or disabled), do not take these inputs (dtypes other than fp32/bf16/fp16, non-CPU or
    non-contiguous tensors, more than 256 tracked tasks, another method), or a value is not finite: the torch path
    then raises the usual error naming the tensor and the checkpoint, or (`allow_non_finite`) computes the same bits.

    Args:
        method (`str`): `magmax`, `task_arithmetic`, `average` or `ties`.
        theta_0 (`torch.Tensor`): the base's block (fp32, bf16 or fp16).
        tasks (`list[torch.Tensor]`): the fine-tunes' blocks, same shape, in task order.
        scaling_coef (`float`): λ.
        dtype (`torch.dtype`): the output dtype.
        thresholds (`list[float | None]`, *optional*): ties only, each whole task vector's trim threshold.
        track_winners (`bool`, *optional*, defaults to `False`): magmax only, also return the winner map.
    """
    import torch

    lib = c_kernels()
    if lib is None or method not in FUSED_METHODS or not tasks or (track_winners and method != "magmax"):
        return None
    base_code, codes = _code(theta_0), [_code(task) for task in tasks]
    out_code = _DTYPE_CODES.get(str(dtype).removeprefix("torch."))
    n = theta_0.numel()
    if base_code is None or out_code is None or None in codes or n == 0 or (track_winners and len(tasks) > 256):
        return None
    if any(task.shape != theta_0.shape for task in tasks):
        return None
    base = _widened_f32(lib, theta_0, base_code)
    out = torch.empty(theta_0.shape, dtype=dtype)
    winners = None
    if method == "ties":
        if thresholds is None or len(thresholds) != len(tasks):
            return None
        state = torch.zeros(4, n, dtype=torch.float32)  # pos_sum, neg_sum, pos_count, neg_count
        pointers = [row.data_ptr() for row in state]
        for task, code, threshold in zip(tasks, codes, thresholds):
            threshold = 0.0 if threshold is None else threshold  # density 1: |τ| >= 0 keeps every finite τ
            if lib.hfm_ties_fold(task.data_ptr(), code, base.data_ptr(), threshold, *pointers, n):
                return None
        if lib.hfm_ties_apply(base.data_ptr(), *pointers, scaling_coef, out.data_ptr(), out_code, n):
            return None
        return out, None
    merged = torch.empty(n, dtype=torch.float32)
    if method == "magmax":
        if track_winners:
            winners = torch.zeros(theta_0.shape, dtype=torch.uint8)
        w = winners.data_ptr() if winners is not None else None
        for t, (task, code) in enumerate(zip(tasks, codes)):
            if lib.hfm_magmax_fold(task.data_ptr(), code, base.data_ptr(), merged.data_ptr(), w, t, t == 0, n):
                return None
    else:
        for t, (task, code) in enumerate(zip(tasks, codes)):
            if lib.hfm_sum_fold(task.data_ptr(), code, base.data_ptr(), merged.data_ptr(), t == 0, n):
                return None
        if method == "average":
            merged = merged / len(tasks)  # AverageMerge's result, by torch (the same division)
    if lib.hfm_apply(base.data_ptr(), merged.data_ptr(), scaling_coef, out.data_ptr(), out_code, n):
        return None
    return out, winners


def fused_ties_thresholds(base_view, views: Sequence, blocks: Sequence, density: float) -> list[float | None] | None:
    """TIES' trim threshold of every whole task vector `view[...] − base_view[...]`, as
    [`~hf_magmax.merging.ties_trim_threshold`] gives it on the fp32 task vector, found by the C folds in two sweeps over
    the row `blocks` (a histogram of the high 16 bits of `|τ|`, then of the low 16 bits in the bucket that holds the
    k-th largest), τ never stored. None (the caller computes them on the torch path) when the C folds do not apply or
    a value is not finite.
    """
    import math

    import torch

    lib = c_kernels()
    if lib is None or not views:
        return None
    if density >= 1.0:
        return [None] * len(views)
    histograms = torch.zeros(len(views), 1 << 15, dtype=torch.int64)
    numel = 0

    def sweep(fold) -> bool:
        for block, _ in blocks:
            theta_0 = base_view[block]
            tasks = [view[block] for view in views]
            base_code, codes = _code(theta_0), [_code(task) for task in tasks]
            if base_code is None or None in codes or any(task.shape != theta_0.shape for task in tasks):
                return False
            base = _widened_f32(lib, theta_0, base_code)
            for t, (task, code) in enumerate(zip(tasks, codes)):
                if not fold(t, task, code, base):
                    return False
        return True

    def high(t, task, code, base) -> bool:
        nonlocal numel
        numel += base.numel() if t == 0 else 0
        return not lib.hfm_diff_hist_high(
            task.data_ptr(), code, base.data_ptr(), histograms[t].data_ptr(), base.numel()
        )

    if not sweep(high) or numel == 0:
        return None
    k = int(density * numel)
    if k == 0:
        return [math.inf] * len(views)
    rank = numel - k  # 0-based ascending rank of the k-th largest
    cumulative = histograms.cumsum_(1)
    buckets = [int(torch.searchsorted(cumulative[t], rank, right=True)) for t in range(len(views))]
    ranks = [rank - (int(cumulative[t, b - 1]) if b else 0) for t, b in enumerate(buckets)]
    fine = torch.zeros(len(views), 1 << 16, dtype=torch.int64)

    def low(t, task, code, base) -> bool:
        lib.hfm_diff_hist_low(task.data_ptr(), code, base.data_ptr(), buckets[t], fine[t].data_ptr(), base.numel())
        return True

    sweep(low)
    cumulative = fine.cumsum_(1)
    thresholds = []
    for t in range(len(views)):
        bits = (buckets[t] << 16) | int(torch.searchsorted(cumulative[t], ranks[t], right=True))
        thresholds.append(torch.tensor(bits, dtype=torch.int32).view(torch.float32).item())
    return thresholds
