"""Edge-popup's top-k rules (Ramanujan et al., CVPR 2020; allenai/hidden-networks): layer-wise and global.

`LayerwiseTopK` keeps the top `density` fraction of each layer; `GlobalTopK` keeps the top fraction of all
its layers' scores together. Rule M = 1[|S| >= t] (or raw S with abs_scores=False), gradient
dS = sign(S) ⊙ W ⊙ ∂L/∂W_eff (straight through the mask), both in the fused ops. Both cache the threshold
against the scores' version counters, so it is computed once per optimizer step, not on every forward
pass, and hand the previous step's threshold to the op as a hint (the CPU kernel then searches near it
first). A layer-wise MaskedLinear gets its new threshold from its forward op itself (`LayerwiseTopK.linear`).
"""
from __future__ import annotations

import warnings
from typing import Sequence

import torch

from .. import ops
from .base import MaskPolicy, _cache_key, _refresh, _store, cached_threshold, topk_linear


class LayerwiseTopK(MaskPolicy):
    """Each layer keeps the top `layer.density` fraction of its own scores."""

    name = "layerwise"

    def threshold(self, layer) -> torch.Tensor:
        return cached_threshold(layer, layer.density, layer.abs_scores, "_threshold_cache")

    def linear(self, layer, x: torch.Tensor) -> torch.Tensor:
        """A MaskedLinear's output. After the scores changed, its new threshold comes from the same call
        (masked_linear_topk: on CPU found in the mask pass itself) instead of a pass of its own."""
        return topk_linear(layer, x, layer.density, layer.abs_scores, "_threshold_cache")


class GlobalTopK(MaskPolicy):
    """All `layers` together keep the top `density` fraction of their scores (one shared threshold)."""

    name = "global"

    def __init__(self, layers: Sequence, density: float, *, abs_scores: bool = True, backend: str = "auto"):
        if not layers:
            raise ValueError("GlobalTopK needs at least one masked layer")
        self.layers = list(layers)
        self.density = ops.check_density(density)
        self.abs_scores = abs_scores
        self.backend = backend
        self._cache = None
        self._checked = False  # whether the first threshold was checked for layers it empties

    def _warn_empty_layers(self, t: torch.Tensor) -> None:
        """Warns, once, where the first global cut keeps no weight of a layer: one threshold over scores of
        different scales (kaiming_uniform scores shrink as 1/sqrt(fan-in)) can empty the widest layer, and a
        layer whose output is 0 passes no gradient back through its ReLU, so the network stays at chance."""
        empty = []
        with torch.no_grad():
            for index, layer in enumerate(self.layers):
                key = layer.scores.abs() if self.abs_scores else layer.scores
                if not bool((key >= t.to(key.dtype)).any()):
                    empty.append(f"layer {index} (scores {tuple(layer.scores.shape)})")
        if empty:
            warnings.warn(f"mask policy 'global' at density {self.density}: the global threshold keeps no weight of "
                          f"{', '.join(empty)}, so no signal passes through it; use scores of one scale across "
                          f"layers (score_init='uniform') or policy='layerwise'", RuntimeWarning, stacklevel=3)

    def threshold(self, layer=None) -> torch.Tensor:
        scores = [l.scores for l in self.layers]
        compute = lambda hint=None: ops.global_threshold(scores, self.density, abs_scores=self.abs_scores,
                                                         backend=self.backend, hint=hint)
        if torch.compiler.is_compiling():
            return compute()
        cached = _refresh(self._cache, _cache_key(scores, self.density, self.abs_scores), compute)
        _store(self.__dict__, "_cache", cached)
        if not self._checked:
            self._checked = True
            self._warn_empty_layers(cached[1])
        return cached[1]


LAYERWISE = LayerwiseTopK()
