"""The mask policies' two elementwise passes on Triton (maskprune.ops.POLICY_MODES; the C++ CPU passes are
csrc/cpu/policy_ops.cpp, the oracle maskprune.reference.policy_apply_mask):

policy_mask        Q = W ⊙ 1[|S| >= t] (topk), W ⊙ 1[S >= t] (raw), W ⊙ sign(S) ⊙ 1[|S| >= t] (signed),
                   sign(W) ⊙ 1[|S| >= t] (binary), W ⊙ 1[u < σ(S)] (sampled); and for binary the gain
                   α = ‖M ⊙ W‖₁ / ‖M‖₀ from per-program partial sums written in the same pass and added in
                   program order (deterministic), so W_eff = α Q.
policy_score_grad  dS = f ⊙ W ⊙ G with f = sign(S) (topk, binary), 1 (raw, signed), σ'(S) = p(1 - p) (sampled),
                   computed in float32 (float64 if an input is), stored in the scores' dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import (FLOAT_DTYPES, INTERPRET, SCORE_DTYPES, check_devices, check_tensor, device_guard, sign_of,
                     store_dtype)

MODES = ("topk", "raw", "signed", "binary", "sampled")  # the kernels' MODE constexpr is the index
BLOCK = 1024


@triton.jit
def _policy_mask_kernel(w_ptr, s_ptr, t_ptr, u_ptr, q_ptr, part_ptr, n, MODE: tl.constexpr,
                        COMPUTE_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < n
    w = tl.load(w_ptr + offs, mask=in_range, other=0.0).to(COMPUTE_DTYPE)  # exact: bf16/fp16 -> fp32
    s = tl.load(s_ptr + offs, mask=in_range, other=0.0)
    if MODE == 4:  # sampled: keep where u < sigmoid(S)
        u = tl.load(u_ptr + offs, mask=in_range, other=1.0)
        keep = u.to(s.dtype) < tl.sigmoid(s)
    elif MODE == 1:  # raw
        keep = s >= tl.load(t_ptr)
    else:
        keep = tl.abs(s) >= tl.load(t_ptr)
    keep = keep & in_range
    one = tl.full(w.shape, 1.0, COMPUTE_DTYPE)
    zero = tl.zeros(w.shape, COMPUTE_DTYPE)
    kept = tl.where(keep, one, zero)
    if MODE == 2:  # signed: W ⊙ sign(S) ⊙ M
        q = w * (sign_of(s.to(COMPUTE_DTYPE)) * kept)
    elif MODE == 3:  # binary: sign(W) ⊙ M, and this block's share of ‖M ⊙ W‖₁ and ‖M‖₀
        q = sign_of(w) * kept
        tl.store(part_ptr + 2 * pid, tl.sum(tl.abs(w) * kept, axis=0))
        tl.store(part_ptr + 2 * pid + 1, tl.sum(kept, axis=0))
    else:
        q = w * kept
    tl.store(q_ptr + offs, q.to(q_ptr.dtype.element_ty), mask=in_range)


@triton.jit
def _policy_score_grad_kernel(g_ptr, w_ptr, s_ptr, ds_ptr, n, MODE: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
                              BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < n
    g = tl.load(g_ptr + offs, mask=in_range, other=0.0).to(COMPUTE_DTYPE)
    w = tl.load(w_ptr + offs, mask=in_range, other=0.0).to(COMPUTE_DTYPE)
    grad = w * g
    if MODE == 0 or MODE == 3:  # topk, binary: sign(S)
        s = tl.load(s_ptr + offs, mask=in_range, other=0.0).to(COMPUTE_DTYPE)
        grad = sign_of(s) * grad
    elif MODE == 4:  # sampled: σ'(S) = p (1 - p)
        s = tl.load(s_ptr + offs, mask=in_range, other=0.0).to(COMPUTE_DTYPE)
        p = tl.sigmoid(s)
        grad = (p * (1.0 - p)) * grad
    tl.store(ds_ptr + offs, grad.to(ds_ptr.dtype.element_ty), mask=in_range)


def _compute_dtype(*tensors) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _check_mode(mode: str) -> int:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return MODES.index(mode)


def policy_mask(weight: torch.Tensor, scores: torch.Tensor, t: torch.Tensor | None, mode: str,
                u: torch.Tensor | None = None, out_dtype: torch.dtype | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, α) of `mode`, W_eff = α Q: Q contiguous in out_dtype (default the weight's), α a 0-d tensor of the
    weight's dtype promoted to >= float32 (1 except for binary). `t`: a 0-d tensor of the scores' dtype (unused,
    may be None, for sampled); `u`: uniform draws of the scores' shape, exactly for sampled."""
    code = _check_mode(mode)
    check_tensor("weight", weight, FLOAT_DTYPES)
    check_tensor("scores", scores, SCORE_DTYPES)
    if scores.shape != weight.shape:
        raise ValueError(f"scores must have weight's shape {tuple(weight.shape)}, got {tuple(scores.shape)}")
    if mode == "sampled":
        if u is None:
            raise ValueError("mode 'sampled' needs u (uniform draws in [0, 1) of the scores' shape)")
        check_tensor("u", u, SCORE_DTYPES)
        if u.shape != scores.shape:
            raise ValueError(f"u must have the scores' shape {tuple(scores.shape)}, got {tuple(u.shape)}")
        t = torch.zeros((), dtype=scores.dtype, device=scores.device)
    elif u is not None:
        raise ValueError(f"u is only taken by mode 'sampled', not by {mode!r}")
    elif not isinstance(t, torch.Tensor) or t.dim() != 0:
        raise ValueError(f"t must be a 0-d tensor (a threshold) for mode {mode!r}")
    out_dtype = weight.dtype if out_dtype is None else out_dtype
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be one of {FLOAT_DTYPES}, got {out_dtype!r}")
    device = check_devices(weight=weight, scores=scores, t=t, u=u)
    compute = _compute_dtype(weight, scores)
    alpha_dtype = torch.promote_types(weight.dtype, torch.float32)
    weight, scores = weight.contiguous(), scores.contiguous()
    u = u.contiguous() if u is not None else scores
    q = torch.empty(weight.shape, dtype=store_dtype(out_dtype), device=weight.device)
    n = q.numel()
    programs = max(1, triton.cdiv(n, BLOCK))
    parts = torch.zeros((programs, 2), dtype=compute, device=weight.device)
    if n:
        with device_guard(device):
            _policy_mask_kernel[(programs,)](weight, scores, t.to(scores.dtype), u, q, parts, n, MODE=code,
                                             COMPUTE_DTYPE=_tl_dtype(compute), BLOCK=BLOCK,
                                             num_warps=1 if INTERPRET else 4)
    q = q.to(out_dtype)  # a no-op unless store_dtype staged it in float32
    if mode == "binary":
        total = parts.sum(0)  # program order: deterministic
        alpha = (total[0] / total[1].clamp_min(1)).to(alpha_dtype)
    else:
        alpha = torch.ones((), dtype=alpha_dtype, device=weight.device)
    return q, alpha


def policy_score_grad(grad_weight: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor,
                      mode: str) -> torch.Tensor:
    """dS = f ⊙ W ⊙ grad_weight of `mode` (see the module docstring), contiguous, in the scores' dtype."""
    code = _check_mode(mode)
    check_tensor("grad_weight", grad_weight, FLOAT_DTYPES)
    check_tensor("weight", weight, FLOAT_DTYPES)
    check_tensor("scores", scores, SCORE_DTYPES)
    if not grad_weight.shape == weight.shape == scores.shape:
        raise ValueError(f"grad_weight, weight and scores must share one shape, got {tuple(grad_weight.shape)}, "
                         f"{tuple(weight.shape)} and {tuple(scores.shape)}")
    device = check_devices(grad_weight=grad_weight, weight=weight, scores=scores)
    compute = _compute_dtype(grad_weight, weight, scores)
    ds = torch.empty(scores.shape, dtype=scores.dtype, device=scores.device)
    n = ds.numel()
    if n:
        with device_guard(device):
            _policy_score_grad_kernel[(triton.cdiv(n, BLOCK),)](
                grad_weight.contiguous(), weight.contiguous(), scores.contiguous(), ds, n, MODE=code,
                COMPUTE_DTYPE=_tl_dtype(compute), BLOCK=BLOCK, num_warps=1 if INTERPRET else 4)
    return ds
