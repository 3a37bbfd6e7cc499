"""The pure-PyTorch reference of docs/design.md §1: materialise W ⊙ M, straight-through gradient by autograd.

This is the oracle every other backend is tested against; it favours plainness over speed.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def n_keep_for(density: float, n: int) -> int:
    """Kept entries for density k of n: clamp(floor(k·n + 1/2), 1, n), so float error never flips one."""
    return min(max(int(math.floor(density * n + 0.5)), 1), n)


def _key(scores: torch.Tensor, abs_scores: bool) -> torch.Tensor:
    return scores.abs() if abs_scores else scores


def threshold(scores: torch.Tensor, density: float, abs_scores: bool = True) -> torch.Tensor:
    """The n_keep-th largest key, found with kthvalue (the (n - n_keep + 1)-th smallest)."""
    key = _key(scores.detach(), abs_scores).flatten()
    n = key.numel()
    return torch.kthvalue(key, n - n_keep_for(density, n) + 1).values


def global_threshold(scores_list: list[torch.Tensor], density: float, abs_scores: bool = True) -> torch.Tensor:
    """One threshold over all tensors together (the reference simply concatenates)."""
    return threshold(torch.cat([s.detach().flatten() for s in scores_list]), density, abs_scores)


class _StraightThrough(torch.autograd.Function):
    """1[key >= t] forward; the gradient passes through unchanged to the key (edge-popup's GetSubnet)."""

    @staticmethod
    def forward(ctx, key: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (key >= t).to(key.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def apply_mask(weight: torch.Tensor, scores: torch.Tensor, t: torch.Tensor, abs_scores: bool = True) -> torch.Tensor:
    """W ⊙ M; autograd gives dS = sign(S) ⊙ W ⊙ g through |S| (W ⊙ g for raw scores)."""
    mask = _StraightThrough.apply(_key(scores, abs_scores), t)
    return weight * mask.to(weight.dtype)


def masked_linear(x: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor, t: torch.Tensor,
                  bias: torch.Tensor | None = None, abs_scores: bool = True) -> torch.Tensor:
    """X (W ⊙ M)^T (+ b) in x's dtype."""
    w_eff = apply_mask(weight, scores, t, abs_scores).to(x.dtype)
    return F.linear(x, w_eff, None if bias is None else bias.to(x.dtype))


# ----------------------------------------------------------------------------------------------
# The mask policies' rules (maskprune.ops.POLICY_MODES): the oracle of csrc/cpu/policy_ops.cpp
# ----------------------------------------------------------------------------------------------

def policy_keep(scores: torch.Tensor, t: torch.Tensor, mode: str, u: torch.Tensor | None = None) -> torch.Tensor:
    """The bool mask M of a mode: |S| >= t (topk, signed, binary), S >= t (raw), u < σ(S) (sampled)."""
    s = scores.detach()
    if mode == "raw":
        return s >= t
    if mode == "sampled":
        return u.to(s.dtype) < torch.sigmoid(s)
    return s.abs() >= t


def policy_score_factor(scores: torch.Tensor, mode: str) -> torch.Tensor | None:
    """f in dS = f ⊙ W ⊙ g: sign(S) (topk, binary), σ'(S) (sampled), None for 1 (raw, signed)."""
    s = scores.detach()
    if mode in ("topk", "binary"):
        return torch.sign(s)
    if mode == "sampled":
        p = torch.sigmoid(s)
        return p * (1 - p)
    return None


class _PolicyMask(torch.autograd.Function):
    """W_eff of a mode forward; dS = f(S) ⊙ W ⊙ g backward; nothing to W, t, u."""

    @staticmethod
    def forward(ctx, weight, scores, t, mode, u):
        keep = policy_keep(scores, t, mode, u)
        ctx.save_for_backward(weight, scores)
        ctx.mode = mode
        if mode == "signed":
            return weight * (torch.sign(scores.detach()) * keep).to(weight.dtype)
        if mode == "binary":
            dtype = torch.promote_types(weight.dtype, torch.float32)
            alpha = (weight.to(dtype).abs() * keep).sum() / keep.sum().clamp_min(1)
            return (alpha * torch.sign(weight.to(dtype)) * keep).to(weight.dtype)
        return weight * keep.to(weight.dtype)

    @staticmethod
    def backward(ctx, grad):
        weight, scores = ctx.saved_tensors
        grad_scores = None
        if ctx.needs_input_grad[1]:
            grad_scores = weight.to(scores.dtype) * grad.to(scores.dtype)
            factor = policy_score_factor(scores, ctx.mode)
            if factor is not None:
                grad_scores = factor * grad_scores
        return None, grad_scores, None, None, None


def policy_apply_mask(weight: torch.Tensor, scores: torch.Tensor, t: torch.Tensor, mode: str,
                      u: torch.Tensor | None = None) -> torch.Tensor:
    """W_eff of `mode` (maskprune.ops.POLICY_MODES) with the mode's straight-through dS."""
    return _PolicyMask.apply(weight, scores, t, mode, u)


def policy_masked_linear(x: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor, t: torch.Tensor,
                         bias: torch.Tensor | None = None, mode: str = "topk",
                         u: torch.Tensor | None = None) -> torch.Tensor:
    """X W_effᵀ (+ b) in x's dtype, W_eff = policy_apply_mask(...)."""
    w_eff = policy_apply_mask(weight, scores, t, mode, u).to(x.dtype)
    return F.linear(x, w_eff, None if bias is None else bias.to(x.dtype))
