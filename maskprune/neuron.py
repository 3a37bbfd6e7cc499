"""Neuron subnetworks: prune whole hidden neurons of a frozen random network, not single weights.

Malach et al. (ICML 2020, "Proving the Lottery Ticket Hypothesis: Pruning is All You Need") contrast
two ways of finding a subnetwork in a random network: removing *weights* (edge-popup, `MaskedLinear`)
and removing *neurons*. Pruning neurons of a one-hidden-layer network only chooses which random
features the frozen output layer sums, so it is no stronger than random features (training the
output layer on the same features); pruning weights is as strong as the target network.

`NeuronMask` is the neuron counterpart of the edge-popup mask, placed after a hidden activation:

- one float32 score `s_j` per neuron j (channel j for [N, C, ...] inputs);
- keep count `n_keep = clamp(floor(k·n + 1/2), 1, n)` for density k, threshold `t` the n_keep-th
  largest `|s|` (the same rule and op as the weight masks: `maskprune.ops.threshold`);
  `m_j = 1[|s_j| >= t]` (ties kept);
- forward `y = x ⊙ m` broadcast over every dimension but the neuron one (dim 1);
- backward, straight-through as in edge-popup: `dx = dy ⊙ m`,
  `ds_j = sign(s_j) · Σ_{batch, spatial} dy ⊙ x` — the gradient the mask would get if it were the
  identity, routed to the scores.

All weights of the surrounding network stay frozen (`freeze`); only the scores learn.
`neuron_subnetwork_mlp` builds the one-hidden-layer network used by scripts/width_sweep.py.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from . import ops
from .nn.init import init_weight

__all__ = ["NeuronMask", "neuron_subnetwork_mlp", "freeze", "neuron_stats"]


class _NeuronMaskFn(torch.autograd.Function):
    """y = x ⊙ m (m from |s| >= t); straight-through gradient to the scores."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scores: torch.Tensor, t: torch.Tensor):
        mask = (scores.abs() >= t).to(x.dtype)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mask = mask.view(shape)
        ctx.save_for_backward(x, scores, mask)
        return x * mask

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, scores, mask = ctx.saved_tensors
        grad_x = grad_out * mask if ctx.needs_input_grad[0] else None
        grad_s = None
        if ctx.needs_input_grad[1]:
            dims = [0] + list(range(2, x.dim()))
            grad_s = (grad_out * x).sum(dim=dims).to(scores.dtype) * torch.sign(scores)
        return grad_x, grad_s, None


class NeuronMask(nn.Module):
    """Keeps the top `density` fraction of `num_neurons` neurons (dim 1 of the input) by learned |score|.

    Scores are initialised uniformly in [-1/sqrt(n), 1/sqrt(n)] (the range edge-popup's
    kaiming_uniform(a=sqrt(5)) gives a fan-in of n), so the initial mask is a random subset.
    """

    def __init__(self, num_neurons: int, density: float = 0.5, *, device=None) -> None:
        super().__init__()
        if isinstance(num_neurons, bool) or not isinstance(num_neurons, int) or num_neurons < 1:
            raise ValueError(f"num_neurons must be an int >= 1, got {num_neurons!r}")
        self.num_neurons = num_neurons
        self.density = ops.check_density(density)
        bound = 1.0 / math.sqrt(num_neurons)
        self.scores = nn.Parameter(torch.empty(num_neurons, dtype=torch.float32, device=device).uniform_(-bound, bound))

    def threshold(self) -> torch.Tensor:
        """t such that exactly n_keep neurons have |score| >= t (ties aside)."""
        return ops.threshold(self.scores, self.density, backend="torch")

    @torch.no_grad()
    def mask(self) -> torch.Tensor:
        """Boolean keep-mask over the neurons."""
        return self.scores.abs() >= self.threshold()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_neurons:
            raise ValueError(f"expected input of shape [N, {self.num_neurons}, ...], got {tuple(x.shape)}")
        return _NeuronMaskFn.apply(x, self.scores, self.threshold())

    def extra_repr(self) -> str:
        return f"num_neurons={self.num_neurons}, density={self.density:g}"


def freeze(model: nn.Module) -> nn.Module:
    """Sets requires_grad=False on every parameter except the NeuronMask scores; returns the model."""
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            param.requires_grad_(isinstance(module, NeuronMask) and name == "scores")
    return model


@torch.no_grad()
def neuron_stats(model: nn.Module) -> dict:
    """Kept/total neurons over every NeuronMask of the model."""
    masks = [m for m in model.modules() if isinstance(m, NeuronMask)]
    if not masks:
        raise ValueError("model has no NeuronMask")
    kept = sum(int(m.mask().sum()) for m in masks)
    total = sum(m.num_neurons for m in masks)
    return {"kept": kept, "total": total, "fraction": kept / total}


def neuron_subnetwork_mlp(in_features: int, width: int, out_features: int, *, density: float = 0.5,
                          weight_init: str = "signed_constant", bias: bool = False) -> nn.Sequential:
    """Flatten -> Linear(in, width) -> ReLU -> NeuronMask(width) -> Linear(width, out), weights frozen.

    The frozen weights are drawn with `maskprune.nn.init_weight(weight_init)` (as the weight-masked
    networks' are); only the neuron scores are trainable.
    """
    hidden = nn.Linear(in_features, width, bias=bias)
    output = nn.Linear(width, out_features, bias=bias)
    for layer in (hidden, output):
        init_weight(layer.weight, weight_init)
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)
    return freeze(nn.Sequential(nn.Flatten(), hidden, nn.ReLU(), NeuronMask(width, density), output))
