"""threshold: a fixed threshold on real-valued scores, for masks over pretrained weights (Piggyback:
Mallya, Davis & Lazebnik, ECCV 2018; Zhao, Lin, Jiang, Schütze & Schütze, "Masking as an Efficient
Alternative to Finetuning for Pretrained Language Models", EMNLP 2020).

From the papers and the issue; original code (arunmallya/piggyback) not read.

Rule. M = 1[S > τ] on the raw scores, W_eff = W ⊙ M. Meant for `convert(model, density,
weight_init=None)`: the pretrained weights stay frozen and a new task learns only a 1-bit-per-weight
mask, so one backbone serves several tasks with one mask each.

Gradient. Straight through the step: dS = W ⊙ ∂L/∂W_eff. This is the fused op with raw keys
(abs_scores=False) and the threshold t = nextafter(τ, +inf), since S >= nextafter(τ) ⇔ S > τ (made once per
layer and dtype, not per forward).

Defaults (Piggyback's): τ = 5e-3 and every score starts at 1e-2 (`score_init`), so training starts from
the full pretrained network. `density` is not a constraint here: the kept fraction is learned (mask_stats
reports it).
"""
from __future__ import annotations

import torch

from .base import RawThresholdPolicy, constant_threshold, fill_scores, float_option


class FixedThreshold(RawThresholdPolicy):
    """M = 1[S > τ] on raw scores; dS = W ⊙ ∂L/∂W_eff (the fused op with abs_scores=False)."""

    name = "threshold"
    OPTIONS = {
        "tau": float_option(5e-3, -1e3, 1e3, "the threshold τ on the raw scores"),
        "score_init": float_option(1e-2, -1e3, 1e3, "constant initial score (above τ: start from the full network)",
                                   allow_none=True),
    }

    def __init__(self, layers, density: float, **options) -> None:
        super().__init__(layers, density, **options)
        self.tau = self.options["tau"]
        if self.options["score_init"] is not None:
            fill_scores(self.layers, self.options["score_init"])

    def threshold(self, layer) -> torch.Tensor:
        return constant_threshold(layer, self.tau, "_threshold_tau")

    @torch.no_grad()
    def mask(self, layer) -> torch.Tensor:
        return layer.scores > self.tau
