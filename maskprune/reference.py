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
