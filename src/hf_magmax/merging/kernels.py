# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""CPU kernels of the merge core: the folds on integer bit patterns, the exact TIES threshold by histogram select, the
counter-based hash of random_mix. Private: [`hf_magmax.merging`] is the API; these are its fast paths, each checked
bit for bit against the plain float formulation in `tests/test_merging.py`. Torch is imported when a kernel runs.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING


if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import Tensor


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
