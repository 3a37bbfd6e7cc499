"""The mask policies' modes on the Triton backend (maskprune.kernels.policy): W_eff = α Q from one mask pass and
the mode's straight-through dS from one elementwise pass over the weight gradient. CUDA tensors, or CPU tensors
under TRITON_INTERPRET=1. ops.policy_apply_mask / policy_masked_linear call these where Triton runs."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .kernels import policy as kernels


class _TritonPolicyMask(torch.autograd.Function):
    """W_eff = α Q forward; dS = f ⊙ W ⊙ g backward (no gradient through α, W, t or u)."""

    @staticmethod
    def forward(ctx, weight, scores, t, mode, u, out_dtype):
        q, alpha = kernels.policy_mask(weight.detach(), scores.detach(), t, mode, u, out_dtype=out_dtype)
        ctx.save_for_backward(weight, scores)
        ctx.mode = mode
        if mode == "binary":
            return (q.to(alpha.dtype) * alpha).to(q.dtype)
        return q

    @staticmethod
    def backward(ctx, grad):
        weight, scores = ctx.saved_tensors
        grad_scores = None
        if ctx.needs_input_grad[1]:
            grad_scores = kernels.policy_score_grad(grad, weight.detach(), scores.detach(), ctx.mode)
        return None, grad_scores, None, None, None, None


def policy_apply_mask(weight, scores, t, mode, u=None, out_dtype=None) -> torch.Tensor:
    """W_eff of `mode` in out_dtype (default the weight's) with the mode's straight-through dS."""
    return _TritonPolicyMask.apply(weight, scores, t, mode, u, out_dtype)


def policy_masked_linear(x, weight, scores, t, bias=None, mode="topk", u=None) -> torch.Tensor:
    """X W_effᵀ (+ b) in x's dtype: W_eff from the Triton mask pass in x's dtype, then the platform GEMM."""
    w_eff = policy_apply_mask(weight, scores, t, mode, u, out_dtype=x.dtype)
    return F.linear(x, w_eff, None if bias is None else bias.to(x.dtype))
