"""Threshold t = the n_keep-th largest key (|S| or S) by radix select over the float bits, not a sort.

Each float maps to an unsigned integer key that orders like the float (|S|: clear the sign bit; S:
flip the sign bit of positives, invert negatives). The key is then found 11 bits at a time, top
down: a histogram pass counts, among the keys that match the bits chosen so far, how many fall in
each of the 2048 values of the next digit; a one-program select kernel scans that histogram for the
bin holding the n_keep-th largest and records the extended prefix and the remaining rank on the
device. float32 takes three passes (11 + 11 + 10 bits), float64 six. Nothing is synced to the host.
With nan_if_nonfinite, the first pass also counts NaN/inf scores and t comes out NaN when there is
one: the caller can then check finiteness on the device (torch._assert_async) without a host sync.
"""
from __future__ import annotations

import operator

import torch
import triton
import triton.language as tl

from ._utils import INTERPRET, SCORE_DTYPES, check_devices, check_tensor, device_guard, dtype_name

DIGIT_BITS = 11
NUM_BINS = 1 << DIGIT_BITS
MAX_NUMEL = 2**31 - 1  # histogram counts are int32


@triton.jit
def _ordered_key(scores, ABS_SCORES: tl.constexpr, KEY_BITS: tl.constexpr):
    """Unsigned integer with the same order as the key |S| (or S); -0.0 sorts just below +0.0."""
    if KEY_BITS == 32:
        bits = scores.to(tl.uint32, bitcast=True)
    else:
        bits = scores.to(tl.uint64, bitcast=True)
    sign = tl.full(bits.shape, 1, bits.dtype) << (KEY_BITS - 1)
    low = sign - 1  # all bits but the sign; ~ is avoided, the interpreter fails on unsigned ~
    if ABS_SCORES:
        key = bits & low
    else:
        key = tl.where((bits & sign) != 0, bits ^ (sign | low), bits | sign)
    return key


@triton.jit
def _float_of_key(key, ABS_SCORES: tl.constexpr, KEY_BITS: tl.constexpr):
    """Inverse of _ordered_key."""
    sign = tl.full(key.shape, 1, key.dtype) << (KEY_BITS - 1)
    if not ABS_SCORES:
        key = tl.where((key & sign) != 0, key ^ sign, key ^ (sign | (sign - 1)))
    if KEY_BITS == 32:
        value = key.to(tl.float32, bitcast=True)
    else:
        value = key.to(tl.float64, bitcast=True)
    return value


@triton.jit
def _radix_histogram_kernel(
    s_ptr, n, stride, state_ptr, hist_ptr,
    ABS_SCORES: tl.constexpr, KEY_BITS: tl.constexpr, FIRST: tl.constexpr, COUNT_NONFINITE: tl.constexpr,
    SHIFT: tl.constexpr, PREFIX_SHIFT: tl.constexpr, NUM_BINS: tl.constexpr, BLOCK: tl.constexpr,
):
    """Adds to hist the count of each digit (key >> SHIFT) & (NUM_BINS - 1) among keys whose bits above
    PREFIX_SHIFT equal the prefix chosen so far (state[0]); all keys on the first pass, which with
    COUNT_NONFINITE also adds the number of NaN/inf scores to state[2]."""
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    offs = tl.arange(0, BLOCK)
    if not FIRST:
        prefix = tl.load(state_ptr)
    counts = tl.zeros((NUM_BINS,), dtype=tl.int32)
    nonfinite = tl.zeros((BLOCK,), dtype=tl.int32)
    # Each program sums the histograms of many tiles in registers, then adds them once to global
    # memory: the top digits of floats crowd into a few bins, so per-element atomics would contend.
    for tile in range(pid, tl.cdiv(n, BLOCK), num_programs):
        idx = offs.to(tl.int64) + tile * BLOCK  # tile * BLOCK < n fits int32; the sum may not
        valid = idx < n
        value = tl.load(s_ptr + idx * stride, mask=valid, other=0.0)
        if COUNT_NONFINITE:
            nonfinite += (valid & ((value != value) | (tl.abs(value) == float("inf")))).to(tl.int32)
        key = _ordered_key(value, ABS_SCORES, KEY_BITS)
        digit = ((key >> SHIFT) & (NUM_BINS - 1)).to(tl.int32)
        if not FIRST:
            valid = valid & ((key >> PREFIX_SHIFT) == prefix.to(key.dtype))
        counts += tl.histogram(digit, NUM_BINS, mask=valid)
    bins = tl.arange(0, NUM_BINS)
    tl.atomic_add(hist_ptr + bins, counts, mask=counts > 0)
    if COUNT_NONFINITE:
        bad = tl.sum(nonfinite, 0).to(tl.int64)
        tl.atomic_add(state_ptr + 2, bad, mask=bad > 0)


@triton.jit(do_not_specialize=["n_keep"])
def _radix_select_kernel(
    hist_ptr, state_ptr, t_ptr, n_keep,
    ABS_SCORES: tl.constexpr, KEY_BITS: tl.constexpr, FIRST: tl.constexpr, LAST: tl.constexpr,
    NAN_IF_NONFINITE: tl.constexpr, WIDTH: tl.constexpr, NUM_BINS: tl.constexpr,
):
    """Picks the bin holding the rank-th largest key; stores (prefix, rank) for the next pass, or t on the
    last (NaN there when NAN_IF_NONFINITE and the first pass counted a NaN/inf score)."""
    bins = tl.arange(0, NUM_BINS)
    hist = tl.load(hist_ptr + bins)
    if FIRST:
        prefix = tl.zeros((), dtype=tl.int64)
        rank = tl.full((), n_keep, dtype=tl.int64)
    else:
        prefix = tl.load(state_ptr)
        rank = tl.load(state_ptr + 1)
    at_or_above = tl.cumsum(hist, 0, reverse=True).to(tl.int64)  # keys in bins >= b
    chosen = tl.sum((at_or_above >= rank).to(tl.int32), 0) - 1  # the highest bin with enough keys above
    above = tl.sum(tl.where(bins > chosen, hist, 0).to(tl.int64), 0)
    prefix = (prefix << WIDTH) | chosen.to(tl.int64)
    if LAST:
        if KEY_BITS == 32:
            key = prefix.to(tl.uint32)
        else:
            key = prefix.to(tl.uint64, bitcast=True)
        value = _float_of_key(key, ABS_SCORES, KEY_BITS)
        if NAN_IF_NONFINITE:
            nan = tl.full((), float("nan"), value.dtype)
            value = tl.where(tl.load(state_ptr + 2) > 0, nan, value)
        tl.store(t_ptr, value)
    else:
        tl.store(state_ptr, prefix)
        tl.store(state_ptr + 1, rank - above)


def _digit_passes(key_bits: int):
    """(shift, width) of each digit, top down: 11 + 11 + 10 bits for 32-bit keys, 5 x 11 + 9 for 64-bit."""
    passes, top = [], key_bits
    while top > 0:
        shift = max(top - DIGIT_BITS, 0)
        passes.append((shift, top - shift))
        top = shift
    return passes


_SM_COUNT: dict = {}


def _histogram_grid(n: int, block: int, device: torch.device) -> tuple:
    tiles = triton.cdiv(n, block)
    if INTERPRET:
        return (min(tiles, 2),)
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return (min(tiles, 4 * _SM_COUNT[index]),)


def _select(flat_scores: list, n_keep: int, abs_scores: bool, nan_if_nonfinite: bool) -> torch.Tensor:
    """Radix select over the concatenation of the 1-D tensors in flat_scores (never built)."""
    first = flat_scores[0]
    key_bits = 32 if first.dtype == torch.float32 else 64
    block = 1024 if INTERPRET else 4096
    passes = _digit_passes(key_bits)
    hist = torch.zeros((len(passes), NUM_BINS), dtype=torch.int32, device=first.device)
    state = torch.zeros(3, dtype=torch.int64, device=first.device)  # (prefix, remaining rank, non-finite count)
    t = torch.empty((), dtype=first.dtype, device=first.device)
    with device_guard(first.device):
        for level, (shift, width) in enumerate(passes):
            for scores in flat_scores:
                if scores.numel() == 0:
                    continue
                _radix_histogram_kernel[_histogram_grid(scores.numel(), block, scores.device)](
                    scores, scores.numel(), scores.stride(0), state, hist[level],
                    ABS_SCORES=abs_scores, KEY_BITS=key_bits, FIRST=level == 0,
                    COUNT_NONFINITE=nan_if_nonfinite and level == 0, SHIFT=shift, PREFIX_SHIFT=shift + width,
                    NUM_BINS=NUM_BINS, BLOCK=block, num_warps=1 if INTERPRET else 8,
                )
            _radix_select_kernel[(1,)](
                hist[level], state, t, n_keep,
                ABS_SCORES=abs_scores, KEY_BITS=key_bits, FIRST=level == 0, LAST=level == len(passes) - 1,
                NAN_IF_NONFINITE=nan_if_nonfinite, WIDTH=width, NUM_BINS=NUM_BINS, num_warps=4,
            )
    return t


def _check_n_keep(n_keep, n: int) -> int:
    if isinstance(n_keep, bool) or not isinstance(n_keep, int):
        try:
            n_keep = operator.index(n_keep)
        except TypeError:
            raise TypeError(f"n_keep must be an int, got {type(n_keep).__name__}") from None
    if not 1 <= n_keep <= n:
        raise ValueError(f"n_keep must be in [1, {n}] (the number of scores), got {n_keep}")
    return n_keep


def threshold(scores: torch.Tensor, n_keep: int, abs_scores: bool = True,
              nan_if_nonfinite: bool = False) -> torch.Tensor:
    """The n_keep-th largest of |scores| (scores if not abs_scores) as a 0-d tensor of scores' dtype.

    nan_if_nonfinite: return NaN when any score is NaN or ±inf (counted in the first pass, no host sync).
    """
    return global_threshold([scores], n_keep, abs_scores, nan_if_nonfinite)


def global_threshold(scores_list, n_keep: int, abs_scores: bool = True,
                     nan_if_nonfinite: bool = False) -> torch.Tensor:
    """The n_keep-th largest key over all tensors together, one histogram pass per tensor (no concatenation);
    NaN with nan_if_nonfinite when any score is NaN or ±inf."""
    if isinstance(scores_list, torch.Tensor) or not isinstance(scores_list, (list, tuple)) or not scores_list:
        raise TypeError("scores_list must be a non-empty list or tuple of tensors")
    for i, scores in enumerate(scores_list):
        check_tensor(f"scores_list[{i}]" if len(scores_list) > 1 else "scores", scores, SCORE_DTYPES)
        if scores.dtype != scores_list[0].dtype:
            raise TypeError(f"scores_list[{i}] has dtype {dtype_name(scores.dtype)}; "
                            f"accepted: the dtype of scores_list[0] ({dtype_name(scores_list[0].dtype)})")
    check_devices(**{f"scores_list[{i}]": s for i, s in enumerate(scores_list)})
    n = sum(s.numel() for s in scores_list)
    if n > MAX_NUMEL:
        raise ValueError(f"at most {MAX_NUMEL} scores are supported (int32 counts), got {n}")
    n_keep = _check_n_keep(n_keep, n)
    flat = [s.detach().reshape(-1) for s in scores_list]  # 1-D, a strided view where possible, else a copy
    return _select(flat, n_keep, bool(abs_scores), bool(nan_if_nonfinite))
