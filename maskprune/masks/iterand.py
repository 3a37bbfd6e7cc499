"""iterand: a top-k policy whose pruned weights are periodically redrawn (Chijiwa, Yamaguchi, Ida, Umakoshi
& Inoue, "Pruning Randomly Initialized Neural Networks with Iterative Randomization", NeurIPS 2021).

Source read: dchiji-ntt/iterand, models/networks/sparse_modules.py (`SparseModule.rerandomize_` mode
"bernoulli", `SparseLinear.rerandomize`, `GetSubnet`), main.py and config.yaml (`rerand_freq`,
`rerand_freq_unit: "iteration"`, `rerand_lambda`, `rerand_rate`).

Rule. The mask and its gradient are those of the base top-k policy (`base`: "layerwise" edge-popup by
default, or "global", "biprop", "signed"). Every `period` optimizer steps (K, their rerand_freq = 300
iterations), each weight outside the mask is, with probability `prob` (λ, their rerand_lambda = 0.1),
replaced by a fresh draw from its initial distribution: W ← W ⊙ M + (1 - M) ⊙ ((1 - b) ⊙ W + b ⊙ R),
b ~ Bernoulli(λ), R ~ the init. Their `rerand_rate` ρ (default 1) redraws only the weights below the
threshold of density 1 - (1 - density) · ρ (option `rate`). Their GetSubnet takes the percentile of the
raw scores; maskprune's layers default to |S| (edge-popup's key): convert(..., abs_scores=False) gives
theirs exactly.

The draw. b and R come from maskprune.rng's counter-based Philox, keyed by (seed, step) and the layer's
number, on stream 2: the redraw after step s is a pure function of (seed, s, layer), the same on every
device and in a resumed run (state_dict holds only bookkeeping). R uses the layer's weight init and
scale (`weight_init`, `scale_fan`, `density` of the layer, as maskprune.nn.init / rng draw them; option
`init` overrides the kind). A redrawn layer loses its `weight_key` (maskprune.ticket can no longer
regenerate its weights from a seed).

Defaults: period 300, prob 0.1, rate 1.0, seed 0, base "layerwise".
"""
from __future__ import annotations

import math
import struct
from typing import Mapping, Sequence

import torch

from .. import ops, rng
from .base import LayerSetPolicy, MaskPolicy, choice_option, float_option, frozen_weight, int_option

ITERAND_STREAM = 2  # rng stream of the redraws (0: frozen weights, 1: supermask draws)
BASES = ("layerwise", "global", "biprop", "signed")


def redraw_words(n: int, *, seed: int, step: int, layer: int) -> tuple[torch.Tensor, ...]:
    """Three Philox output words per element (int64 holding uint32), keyed by (seed, step, layer)."""
    if not 0 <= step < 2 ** 32:
        raise ValueError(f"step must be in [0, 2^32) for the iterand redraw key, got {step}")
    return rng.random_words(0, n, seed=seed | (step << 32), layer=layer, stream=ITERAND_STREAM, words=3)


def redraw_values(shape, init: str, scale: float, *, seed: int, step: int, layer: int) -> tuple[torch.Tensor, ...]:
    """(u, R) on CPU: u in [0, 1) decides the Bernoulli(λ), R the fresh weight of kind `init` and `scale`."""
    n = math.prod(shape)
    x0, x1, x2 = redraw_words(n, seed=seed, step=step, layer=layer)
    u = (x0 >> 8).to(torch.float32) * 2.0 ** -24
    r = rng._chunk_values(x1, x2, init, torch.tensor(scale, dtype=torch.float32))
    return u.reshape(tuple(shape)), r.reshape(tuple(shape))


class IteRand(LayerSetPolicy):
    """A base top-k policy plus, every `period` steps, Bernoulli(prob) redraws of the pruned weights."""

    name = "iterand"
    OPTIONS = {
        "base": choice_option("layerwise", BASES, "the top-k rule the mask follows"),
        "period": int_option(300, 1, None, "optimizer steps between two redraws (K)"),
        "prob": float_option(0.1, 0.0, 1.0, "probability λ that a pruned weight is redrawn"),
        "rate": float_option(1.0, 0.0, 1.0, "ρ: redraw only below the threshold of density 1 - (1 - density) ρ"),
        "seed": int_option(0, 0, 2 ** 32, "key of the redraws"),
        "init": choice_option(None, (None, *rng.WEIGHT_INITS), "kind of the redrawn weights (None: the layer's)"),
    }

    def __init__(self, layers: Sequence, density: float, **options) -> None:
        super().__init__(layers, density, **options)
        o = self.options
        self.period, self.prob, self.rate, self.seed = o["period"], o["prob"], o["rate"], o["seed"]
        from .factory import make_policy  # late import: the factory imports this module
        self.base: MaskPolicy = make_policy(o["base"], self.layers, self.density)
        self._inits = []
        for i, layer in enumerate(self.layers):
            weight = frozen_weight(layer)
            kind = o["init"] or getattr(layer, "weight_init", None)
            if kind is None:
                raise ValueError(f"mask policy 'iterand': layer {i} has pretrained weights (weight_init=None), so there "
                                 f"is no initial distribution to redraw from; give option init (one of "
                                 f"{', '.join(rng.WEIGHT_INITS)})")
            key = getattr(layer, "weight_key", None)
            if key is not None and key.init == kind:
                scale = key.scale
            else:
                std = rng._relu_std(tuple(weight.shape), getattr(layer, "density", self.density),
                                    bool(getattr(layer, "scale_fan", False)))
                scale = math.sqrt(3.0) * std if kind == "kaiming_uniform" else std
            # rounded to float32 in plain Python: a model built under torch.device("meta") makes no real tensor
            self._inits.append((kind, struct.unpack("f", struct.pack("f", scale))[0]))
        self.redraws = 0
        self.last_redraw_step = 0

    # the mask and the forward are the base policy's
    def threshold(self, layer) -> torch.Tensor:
        return self.base.threshold(layer)

    def mask(self, layer) -> torch.Tensor:
        return self.base.mask(layer)

    def effective_weight(self, layer, weight: torch.Tensor | None = None) -> torch.Tensor:
        return self.base.effective_weight(layer, weight)

    def masked_weight(self, layer, weight: torch.Tensor | None = None) -> torch.Tensor:
        return self.base.masked_weight(layer, weight)

    def linear(self, layer, x: torch.Tensor) -> torch.Tensor:
        return self.base.linear(layer, x)

    def conv2d(self, layer, x: torch.Tensor) -> torch.Tensor:
        return self.base.conv2d(layer, x)

    @torch.no_grad()
    def redraw_mask(self, layer) -> torch.Tensor:
        """Where a redraw may happen: outside the mask (rate 1), or below the threshold of the denser
        density 1 - (1 - density) · rate."""
        keep = self.base.mask(layer) != 0
        if self.rate == 1.0:
            return ~keep
        density = 1.0 - (1.0 - self.density) * self.rate
        key = layer.scores.abs() if layer.abs_scores else layer.scores
        return key < ops.threshold(layer.scores, density, abs_scores=layer.abs_scores, backend=layer.backend)

    @torch.no_grad()
    def redraw(self, layers: Sequence, step: int) -> None:
        """The redraw after optimizer step `step` (a pure function of seed, step and each layer's number)."""
        for layer in layers:
            index = self.layer_index(layer)
            weight = frozen_weight(layer)
            kind, scale = self._inits[index]
            u, fresh = redraw_values(weight.shape, kind, scale, seed=self.seed, step=step, layer=index)
            u, fresh = u.to(weight.device), fresh.to(device=weight.device, dtype=weight.dtype)
            replace = self.redraw_mask(layer) & (u < self.prob)
            weight.copy_(torch.where(replace, fresh, weight))
            layer.__dict__.pop("weight_key", None)
        self.redraws += 1
        self.last_redraw_step = int(step)

    def after_step(self, layers: Sequence, step: int) -> None:
        self.base.after_step(layers, step)
        if step > 0 and step % self.period == 0 and self.prob > 0:
            self.redraw(layers, step)

    def on_epoch_end(self, layers: Sequence, epoch: int) -> None:
        self.base.on_epoch_end(layers, epoch)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "redraws": self.redraws, "last_redraw_step": self.last_redraw_step,
                "base": self.base.state_dict()}

    def load_state_dict(self, state: Mapping) -> None:
        super().load_state_dict(state)
        self.redraws, self.last_redraw_step = int(state["redraws"]), int(state["last_redraw_step"])
        self.base.load_state_dict(state["base"])
