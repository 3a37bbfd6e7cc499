"""signed: the signed supermask, a ternary mask m ∈ {-1, 0, 1} (Koster, Grothe & Rauber, "Signing the
Supermask: Keep, Hide, Invert", ICLR 2022).

Source read: kosnil/signed_supermasks, custom_layers.py (`MaskedDense.tanh_mask`, `tanh_score_mask`,
`call`).

Rule. m = sign(S) · 1[|S| >= t] and W_eff = W ⊙ m: a weight is kept, hidden or inverted. Their code has
two thresholds: a fixed one (`tanh_th`, "variable" masking: the density floats) and a top-k one taken on
a random sample of 5000 scores with separate positive and negative cut-offs (`tanh_score_mask`). Here,
as the issue states, t is the exact top-`density` threshold of |S| over the layer (ops.threshold, ties
at t kept), so `density` is the fraction of weights that are not hidden.

Gradient. Their mask is `stop_gradient(m) + S - stop_gradient(S)`: the identity straight through the
ternary step, so dS = W ⊙ ∂L/∂W_eff (no sign(S) factor, unlike edge-popup). On CPU this is the fused op's
"signed" mode (ops.policy_masked_linear / policy_apply_mask): one mask pass writes W ⊙ sign(S) ⊙ 1[|S| >= t],
one pass over the weight-gradient GEMM's output writes dS = W ⊙ g. Elsewhere (CUDA, Triton: no kernel of that
mode yet) it rides on the top-k op: ops.masked_linear over W' = W ⊙ sign(S) (detached; one extra pass) with |S|
keys gives W' ⊙ 1[|S| >= t] = W ⊙ m and dS = sign(S) ⊙ W' ⊙ g = W ⊙ g wherever S != 0 (a score of exactly 0
gets 0 there, W ⊙ g in their code and on CPU).

Defaults: their mask variables start at ones (with the fixed threshold); a top-k over all-equal
scores would keep every weight, so the scores keep the layer's own init (kaiming_uniform: random signs).
"""
from __future__ import annotations

import torch

from .. import ops
from .base import LayerSetPolicy, cached_threshold


class SignedSupermask(LayerSetPolicy):
    """W_eff = W ⊙ sign(S) ⊙ 1[|S| >= t]; dS = W ⊙ ∂L/∂W_eff."""

    name = "signed"
    OPTIONS = {}

    def threshold(self, layer) -> torch.Tensor:
        return cached_threshold(layer, self.density, True, "_signed_threshold")

    @torch.no_grad()
    def mask(self, layer) -> torch.Tensor:
        """The ternary mask as int8 in {-1, 0, 1}."""
        keep = layer.scores.abs() >= self.threshold(layer)
        return (torch.sign(layer.scores) * keep).to(torch.int8)

    @staticmethod
    def _signed_weight(layer, weight: torch.Tensor) -> torch.Tensor:
        return weight * torch.sign(layer.scores.detach()).to(weight.dtype)

    def effective_weight(self, layer, weight: torch.Tensor | None = None) -> torch.Tensor:
        weight = self._weight(layer, weight)
        if ops.policy_fused(weight.device, layer.backend):
            return ops.policy_apply_mask(weight, layer.scores, self.threshold(layer), "signed", backend=layer.backend)
        return ops.apply_mask(self._signed_weight(layer, weight), layer.scores, self.threshold(layer), abs_scores=True,
                              backend=layer.backend)

    def linear(self, layer, x: torch.Tensor) -> torch.Tensor:
        if ops.policy_fused(x.device, layer.backend):
            return ops.policy_masked_linear(x, layer.weight, layer.scores, self.threshold(layer), layer.bias,
                                            mode="signed", backend=layer.backend)
        return ops.masked_linear(x, self._signed_weight(layer, layer.weight), layer.scores, self.threshold(layer),
                                 layer.bias, abs_scores=True, backend=layer.backend)
