"""The two elementwise passes of a masked conv layer (docs/design.md §3): W ⊙ M before cuDNN, dS after it.

apply_mask  W ⊙ 1[key >= t]                            in weight's dtype (or out_dtype)
score_grad  sign(S) ⊙ W ⊙ G (W ⊙ G with raw scores)     computed in fp32 (fp64 if any input is), in S's dtype
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import (FLOAT_DTYPES, INTERPRET, SCORE_DTYPES, check_devices, check_tensor, check_threshold,
                     device_guard, dtype_names, keep_mask, sign_of)

BLOCK = 1024


@triton.jit
def _apply_mask_kernel(w_ptr, s_ptr, t_ptr, out_ptr, n, ABS_SCORES: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < n
    w = tl.load(w_ptr + offs, mask=in_range, other=0.0)
    s = tl.load(s_ptr + offs, mask=in_range, other=0.0)
    if w_ptr.dtype.element_ty != tl.float64:
        w = w.to(tl.float32)  # exact for half types, and the interpreter cannot compute on raw bf16 bits
    w = tl.where(keep_mask(s, tl.load(t_ptr), ABS_SCORES), w, tl.zeros_like(w))
    tl.store(out_ptr + offs, w.to(out_ptr.dtype.element_ty), mask=in_range)


@triton.jit
def _score_grad_kernel(g_ptr, w_ptr, s_ptr, ds_ptr, n, ABS_SCORES: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
                       BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < n
    g = tl.load(g_ptr + offs, mask=in_range, other=0.0)
    w = tl.load(w_ptr + offs, mask=in_range, other=0.0)
    if g_ptr.dtype.element_ty != tl.float64:
        g = g.to(tl.float32)
    if w_ptr.dtype.element_ty != tl.float64:
        w = w.to(tl.float32)
    grad = g.to(COMPUTE_DTYPE) * w.to(COMPUTE_DTYPE)
    if ABS_SCORES:
        s = tl.load(s_ptr + offs, mask=in_range, other=0.0)
        grad = grad * sign_of(s.to(COMPUTE_DTYPE))
    tl.store(ds_ptr + offs, grad.to(ds_ptr.dtype.element_ty), mask=in_range)


def apply_mask(weight: torch.Tensor, scores: torch.Tensor, t: torch.Tensor, abs_scores: bool = True,
               out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """W ⊙ M with M = 1[key >= t], any shape; returned contiguous in out_dtype (default weight's dtype)."""
    check_tensor("weight", weight, FLOAT_DTYPES)
    check_tensor("scores", scores, SCORE_DTYPES)
    if scores.shape != weight.shape:
        raise ValueError(f"scores must have weight's shape {tuple(weight.shape)}, got {tuple(scores.shape)}")
    check_threshold(t, scores)
    if out_dtype is None:
        out_dtype = weight.dtype
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype is {out_dtype}; accepted: None or one of "
                        f"{dtype_names(FLOAT_DTYPES)}")
    device = check_devices(weight=weight, scores=scores, t=t)

    weight, scores = weight.contiguous(), scores.contiguous()
    out = torch.empty(weight.shape, dtype=out_dtype, device=weight.device)
    n = out.numel()
    if n == 0:
        return out
    grid = lambda META: (triton.cdiv(n, META["BLOCK"]),)  # noqa: E731
    with device_guard(device):
        _apply_mask_kernel[grid](weight, scores, t, out, n, ABS_SCORES=bool(abs_scores), BLOCK=BLOCK,
                                 num_warps=1 if INTERPRET else 4)
    return out


def score_grad(grad_weight: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor,
               abs_scores: bool = True) -> torch.Tensor:
    """dS = sign(S) ⊙ W ⊙ G (W ⊙ G with raw scores) for G the gradient of W ⊙ M; contiguous, scores' dtype."""
    check_tensor("grad_weight", grad_weight, FLOAT_DTYPES)
    check_tensor("weight", weight, FLOAT_DTYPES)
    check_tensor("scores", scores, SCORE_DTYPES)
    if scores.shape != weight.shape or grad_weight.shape != weight.shape:
        raise ValueError(f"grad_weight, weight and scores must have one shape, got {tuple(grad_weight.shape)}, "
                         f"{tuple(weight.shape)} and {tuple(scores.shape)}")
    device = check_devices(grad_weight=grad_weight, weight=weight, scores=scores)

    grad_weight, weight, scores = grad_weight.contiguous(), weight.contiguous(), scores.contiguous()
    grad_scores = torch.empty(scores.shape, dtype=scores.dtype, device=scores.device)
    n = grad_scores.numel()
    if n == 0:
        return grad_scores
    fp64 = torch.float64 in (grad_weight.dtype, weight.dtype, scores.dtype)
    grid = lambda META: (triton.cdiv(n, META["BLOCK"]),)  # noqa: E731
    with device_guard(device):
        _score_grad_kernel[grid](grad_weight, weight, scores, grad_scores, n, ABS_SCORES=bool(abs_scores),
                                 COMPUTE_DTYPE=tl.float64 if fp64 else tl.float32, BLOCK=BLOCK,
                                 num_warps=1 if INTERPRET else 4)
    return grad_scores
