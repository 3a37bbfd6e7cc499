"""biprop: a top-k mask over binarised weights with a per-layer gain (Diffenderfer & Kailkhura,
"Multi-Prize Lottery Ticket Hypothesis", ICLR 2021).

Source read: chrundle/biprop, utils/conv_type.py (`GetQuantnet_binary`, `SubnetConv.forward`).

Rule. M = 1[|S| >= t], t the top-`density` threshold of |S| (their `clamped_scores` is |S|; here
ops.threshold, ties at t all kept). The weights are binarised: W_eff = α · sign(W) ⊙ M with the
per-layer gain α = ‖M ⊙ W‖₁ / ‖M‖₀, recomputed with the mask at every forward. Their code divides by
int(density · n) instead of the count of kept weights; the two agree whenever no scores tie at t.

Gradient. Their Function returns α·M and passes back g ⊙ |W| (to |S|, hence sign(S) to S), with no
gradient through α. Written out: dS = sign(S) ⊙ W ⊙ ∂L/∂W_eff, the edge-popup gradient with the real
weight W, not its sign. Here α rides on the GEMM output, not in a pass over W:
Y = α · X (sign(W) ⊙ M)ᵀ + b (and the same for conv2d), and `SignMaskSTE` carries
dS = sign(S) ⊙ W ⊙ g_Q / α for g_Q = ∂L/∂(sign(W) ⊙ M) = α ∂L/∂W_eff.
Where |W| is one constant c (signed-constant weights, maskprune's default), α = c and
W_eff = W ⊙ M exactly: the layer then runs the fused edge-popup op itself.

Defaults: no options beyond the density; scores as the layer initialised them (their kaiming_uniform).
"""
from __future__ import annotations

import torch

from .. import ops
from .base import LayerSetPolicy, cached_threshold, linear_out, topk_linear


class SignMaskSTE(torch.autograd.Function):
    """Q = sign(W) ⊙ 1[|S| >= t] forward; dS = sign(S) ⊙ W ⊙ g / α backward; no gradient to W, t, α."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, weight: torch.Tensor, t: torch.Tensor, alpha: torch.Tensor):
        ctx.save_for_backward(scores, weight, alpha)
        keep = scores.abs() >= t
        return torch.where(keep, torch.sign(weight), torch.zeros((), dtype=weight.dtype, device=weight.device))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        scores, weight, alpha = ctx.saved_tensors
        grad_scores = torch.sign(scores) * (weight.to(scores.dtype) * grad.to(scores.dtype)) / alpha.to(scores.dtype)
        return grad_scores, None, None, None


class Biprop(LayerSetPolicy):
    """W_eff = α sign(W) ⊙ 1[|S| >= t], α = ‖M ⊙ W‖₁ / ‖M‖₀ (no gradient); dS = sign(S) ⊙ W ⊙ ∂L/∂W_eff."""

    name = "biprop"
    OPTIONS = {}

    def threshold(self, layer) -> torch.Tensor:
        return cached_threshold(layer, self.density, True, "_biprop_threshold")

    @torch.no_grad()
    def mask(self, layer) -> torch.Tensor:
        return layer.scores.abs() >= self.threshold(layer)

    @torch.no_grad()
    def alpha(self, layer, weight: torch.Tensor | None = None) -> torch.Tensor:
        """α = ‖M ⊙ W‖₁ / ‖M‖₀ of the current mask (0-d, the weight's dtype promoted to >= float32)."""
        weight = self._weight(layer, weight)
        keep = self.mask(layer)
        dtype = torch.promote_types(weight.dtype, torch.float32)
        return (weight.to(dtype).abs() * keep).sum() / keep.sum().clamp_min(1)

    @staticmethod
    def _constant_magnitude(layer, weight: torch.Tensor) -> bool:
        """Whether every |W| is one value (then α sign(W) ⊙ M = W ⊙ M); cached per weight version."""
        key = (weight.data_ptr(), weight._version, tuple(weight.shape))
        cached = layer.__dict__.get("_biprop_constant")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                magnitude = weight.abs()
                cached = (key, bool(magnitude.amax() == magnitude.amin()))
            layer.__dict__["_biprop_constant"] = cached
        return cached[1]

    def _q(self, layer, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha = self.alpha(layer, weight)
        return SignMaskSTE.apply(layer.scores, weight, self.threshold(layer), alpha), alpha

    def effective_weight(self, layer, weight: torch.Tensor | None = None) -> torch.Tensor:
        weight = self._weight(layer, weight)
        if self._constant_magnitude(layer, weight):
            return ops.apply_mask(weight, layer.scores, self.threshold(layer), abs_scores=True, backend=layer.backend)
        if ops.policy_fused(weight.device, layer.backend):
            return ops.policy_apply_mask(weight, layer.scores, self.threshold(layer), "binary", backend=layer.backend)
        q, alpha = self._q(layer, weight)
        return q * alpha.to(q.dtype)

    def linear(self, layer, x: torch.Tensor) -> torch.Tensor:
        if self._constant_magnitude(layer, layer.weight):
            return topk_linear(layer, x, self.density, True, "_biprop_threshold")
        if ops.policy_fused(x.device, layer.backend):
            return ops.policy_masked_linear(x, layer.weight, layer.scores, self.threshold(layer), layer.bias,
                                            mode="binary", backend=layer.backend)
        q, alpha = self._q(layer, layer.weight)
        y = linear_out(x, q, None) * alpha.to(x.dtype)
        return y if layer.bias is None else y + layer.bias.to(x.dtype)

    def conv2d(self, layer, x: torch.Tensor) -> torch.Tensor:
        if self._constant_magnitude(layer, layer.weight) or ops.policy_fused(x.device, layer.backend):
            return layer._conv_forward(x, self.effective_weight(layer), layer.bias)
        q, alpha = self._q(layer, layer.weight)
        y = layer._conv_forward(x, q.to(x.dtype), None) * alpha.to(x.dtype)
        return y if layer.bias is None else y + layer.bias.to(x.dtype).view(1, -1, 1, 1)
