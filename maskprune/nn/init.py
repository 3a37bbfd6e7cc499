"""Initialisers of the frozen random weights and of the scores, as in edge-popup (Ramanujan et al. 2020)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

WEIGHT_INITS = ("signed_constant", "kaiming_normal", "kaiming_uniform")
SCORE_INITS = ("kaiming_uniform", "kaiming_normal", "uniform")


def _relu_std(weight: torch.Tensor, density: float, scale_fan: bool) -> float:
    """Kaiming's ReLU std, gain/sqrt(fan_in), with the fan scaled by the density when asked (edge-popup)."""
    fan = nn.init._calculate_correct_fan(weight, "fan_in")
    if scale_fan:
        fan = fan * density
    return nn.init.calculate_gain("relu") / math.sqrt(fan)


@torch.no_grad()
def init_weight(weight: torch.Tensor, kind: str, *, density: float = 1.0, scale_fan: bool = False) -> None:
    """Fills a frozen weight in place: ±std (signed_constant), N(0, std²), or U(±√3·std)."""
    if kind not in WEIGHT_INITS:
        raise ValueError(f"weight_init must be one of {WEIGHT_INITS}, got {kind!r}")
    std = _relu_std(weight, density, scale_fan)
    if kind == "signed_constant":
        weight.copy_((torch.randint_like(weight, 0, 2) * 2 - 1) * std)
    elif kind == "kaiming_normal":
        weight.normal_(0.0, std)
    else:
        bound = math.sqrt(3.0) * std
        weight.uniform_(-bound, bound)


@torch.no_grad()
def init_scores(scores: torch.Tensor, kind: str) -> None:
    """Fills the scores in place; edge-popup's default is kaiming_uniform(a=√5).

    Scores of fewer than 2 dimensions (a norm's gain, when convert is asked to mask it) have no fan-in:
    the Kaiming inits then treat them as one row, fan-in = their number of elements.
    """
    if kind not in SCORE_INITS:
        raise ValueError(f"score_init must be one of {SCORE_INITS}, got {kind!r}")
    if scores.dim() < 2:
        scores = scores.view(1, -1)
    if kind == "kaiming_uniform":
        nn.init.kaiming_uniform_(scores, a=math.sqrt(5))
    elif kind == "kaiming_normal":
        nn.init.kaiming_normal_(scores)
    else:
        scores.uniform_(0.0, 1.0)
