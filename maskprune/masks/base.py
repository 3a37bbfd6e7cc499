"""The mask-policy interface every masked layer calls, and the option checks every policy shares.

A masked layer (MaskedLinear, MaskedConv2d, the WeightMask parametrization) holds a frozen weight W and
float32 scores S; its `mask_policy` decides everything else, through five calls the layers and the
trainer make without knowing which policy runs:

    policy.linear(layer, x)             the layer's output for a MaskedLinear (bias included)
    policy.conv2d(layer, x)             the same for a MaskedConv2d
    policy.effective_weight(layer, W)   W_eff, carrying the policy's gradient to layer.scores
                                        (parametrized weights, to_dense, tests)
    policy.mask(layer)                  the current mask, no gradient: bool, or int8 {-1, 0, 1} (signed)
    policy.masked_weight(layer, W)      W_eff of the found subnetwork, no gradient (to_dense)
    policy.before_step(layers)          after backward, before the optimizer step: gradient terms added to
                                        the scores' .grad in place (gem_miner's L2)
    policy.after_step(layers, step) / on_epoch_end(layers, epoch) / finalize(layers)
                                        the trainer's hooks: after every optimizer step (`step` = optimizer
                                        steps done so far, 1-based), after every epoch (`epoch` = epochs
                                        done), once at the end of training
    policy.regularization(layers)       a term the trainer adds to the loss, or None
    policy.state_dict() / load_state_dict(state)
                                        what a resumed run needs beyond the model's parameters

The defaults below are the edge-popup rule (top-k of |S| through the fused ops), so a policy that only
changes how the threshold is found overrides `threshold` and nothing else.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from .. import ops


class MaskPolicy:
    """Maps a masked layer to its mask and its output. Subclasses override what their rule changes."""

    name = "base"

    # -- the mask and the forward ---------------------------------------------------------------
    def threshold(self, layer) -> torch.Tensor:
        """The current threshold t of a top-k policy (0-d tensor, no gradient)."""
        raise NotImplementedError(f"mask policy {self.name!r} has no single threshold per layer; "
                                  f"use policy.mask(layer) or policy.effective_weight(layer)")

    def _weight(self, layer, weight: torch.Tensor | None) -> torch.Tensor:
        return layer.weight if weight is None else weight

    @torch.no_grad()
    def mask(self, layer) -> torch.Tensor:
        """The keep-mask M (bool) the layer computes with now."""
        key = layer.scores.abs() if layer.abs_scores else layer.scores
        return key >= self.threshold(layer)

    def effective_weight(self, layer, weight: torch.Tensor | None = None) -> torch.Tensor:
        """W ⊙ M with edge-popup's straight-through gradient dS = sign(S) ⊙ W ⊙ g (the fused op)."""
        return ops.apply_mask(self._weight(layer, weight), layer.scores, self.threshold(layer),
                              abs_scores=layer.abs_scores, backend=layer.backend)

    @torch.no_grad()
    def masked_weight(self, layer, weight: torch.Tensor | None = None) -> torch.Tensor:
        """W_eff of the found subnetwork, without gradient (to_dense, tickets): the evaluation-mode weight."""
        return self.effective_weight(layer, weight).detach()

    def linear(self, layer, x: torch.Tensor) -> torch.Tensor:
        """A MaskedLinear's output X W_effᵀ (+ b)."""
        return ops.masked_linear(x, layer.weight, layer.scores, self.threshold(layer), layer.bias,
                                 abs_scores=layer.abs_scores, backend=layer.backend)

    def conv2d(self, layer, x: torch.Tensor) -> torch.Tensor:
        """A MaskedConv2d's output: conv2d with W_eff from one mask pass (the convolution stays in ATen)."""
        return layer._conv_forward(x, self.effective_weight(layer), layer.bias)

    # -- the trainer's hooks --------------------------------------------------------------------
    def regularization(self, layers: Sequence) -> torch.Tensor | None:
        """A term to add to the training loss (None: none; no built-in policy has one, see before_step)."""
        return None

    def before_step(self, layers: Sequence) -> None:
        """Called after backward, before the optimizer step (after a GradScaler's unscale_): adds the policy's
        gradient terms to its scores' .grad in place, which costs less than a loss term's autograd node."""

    def after_step(self, layers: Sequence, step: int) -> None:
        """Called after every optimizer step; `step` counts the steps done (1-based)."""

    def on_epoch_end(self, layers: Sequence, epoch: int) -> None:
        """Called after every epoch; `epoch` counts the epochs done (1-based)."""

    def finalize(self, layers: Sequence) -> None:
        """Called once when training ends, before the final evaluation."""

    def state_dict(self) -> dict:
        """What a resumed run needs beyond the model's parameters (tensors and plain Python values)."""
        return {"name": self.name}

    def load_state_dict(self, state: Mapping) -> None:
        if not isinstance(state, Mapping) or state.get("name") != self.name:
            got = state.get("name") if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"state holds the state of mask policy {got!r}, not of {self.name!r}")


def _cache_key(scores_list: Sequence[torch.Tensor], density: float, abs_scores: bool) -> tuple:
    """(which scores and settings, their versions): a threshold is current while both match."""
    return ((density, abs_scores, tuple((s.data_ptr(), s.device) for s in scores_list)),
            tuple(s._version for s in scores_list))


def _hint(cached: tuple | None, key: tuple) -> torch.Tensor | None:
    """The cached threshold when only the versions changed (an optimizer step): a hint for the new one."""
    return cached[1] if cached is not None and cached[0][0] == key[0] else None


def _refresh(cached: tuple | None, key: tuple, compute) -> tuple:
    """The (key, threshold) cache entry for `key`: the cached one while current, else a new one."""
    if cached is not None and cached[0] == key:
        return cached
    return key, compute(_hint(cached, key))


def _store(where: dict, name: str, entry: tuple) -> None:
    """Caches a threshold, except one made under torch.inference_mode: an inference tensor could not be
    saved for backward by a later training step."""
    if not torch.is_inference_mode_enabled():
        where[name] = entry


def cached_threshold(layer, density: float, abs_scores: bool, slot: str) -> torch.Tensor:
    """ops.threshold(layer.scores, density), computed once per optimizer step (cached in layer.__dict__[slot]
    against the scores' version counter; the previous threshold is the CPU kernel's search hint)."""
    compute = lambda hint=None: ops.threshold(layer.scores, density, abs_scores=abs_scores, backend=layer.backend,
                                              hint=hint)
    if torch.compiler.is_compiling():
        return compute()
    key = _cache_key([layer.scores], density, abs_scores)
    cached = _refresh(layer.__dict__.get(slot), key, compute)
    _store(layer.__dict__, slot, cached)
    return cached[1]


def topk_linear(layer, x: torch.Tensor, density: float, abs_scores: bool, slot: str) -> torch.Tensor:
    """A MaskedLinear's top-k output W ⊙ 1[key >= t] with t cached in layer.__dict__[slot] (as cached_threshold):
    after the scores changed, the new t comes from the forward op itself (masked_linear_topk: on CPU found in
    the mask pass) instead of a threshold pass of its own."""
    key = None if torch.compiler.is_compiling() else _cache_key([layer.scores], density, abs_scores)
    cached = layer.__dict__.get(slot)
    if key is None or (cached is not None and cached[0] == key):
        t = cached_threshold(layer, density, abs_scores, slot) if key is None else cached[1]
        return ops.masked_linear(x, layer.weight, layer.scores, t, layer.bias, abs_scores=abs_scores,
                                 backend=layer.backend)
    y, t = ops.masked_linear_topk(x, layer.weight, layer.scores, density, layer.bias, abs_scores=abs_scores,
                                  backend=layer.backend, hint=_hint(cached, key))
    _store(layer.__dict__, slot, (key, t))
    return y


def constant_threshold(layer, value: float, slot: str) -> torch.Tensor:
    """nextafter(value, +inf) as a 0-d tensor of the scores' dtype and device (S >= it ⇔ S > value), made once
    per (value, dtype, device) and kept in layer.__dict__[slot]: a policy with a fixed threshold then makes no
    tensor per forward."""
    scores = layer.scores
    key = (value, scores.dtype, scores.device)
    cached = None if torch.compiler.is_compiling() else layer.__dict__.get(slot)
    if cached is not None and cached[0] == key:
        return cached[1]
    v = torch.tensor(value, dtype=scores.dtype, device=scores.device)
    t = torch.nextafter(v, torch.tensor(float("inf"), dtype=v.dtype, device=v.device))
    if not torch.compiler.is_compiling():
        _store(layer.__dict__, slot, (key, t))
    return t


def linear_out(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear in x's dtype (a float32 weight under bf16 autocast is cast, as the fused op does)."""
    return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


# ----------------------------------------------------------------------------------------------
# Options: every policy declares its options once; make_policy checks them all before anything runs.
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Option:
    """One policy option: its default, a test of a value, the accepted range in words, and what it does."""

    default: Any
    accepted: str
    check: Callable[[Any], bool]
    help: str
    convert: Callable[[Any], Any] = lambda v: v


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def int_option(default: int | None, lo: int, hi: int | None, help: str, *, allow_none: bool = False) -> Option:
    accepted = f"an int in [{lo}, {hi})" if hi is not None else f"an int >= {lo}"
    if allow_none:
        accepted += " or None"
    check = lambda v: (allow_none and v is None) or (_is_int(v) and v >= lo and (hi is None or v < hi))
    return Option(default, accepted, check, help)


def float_option(default: float | None, lo: float, hi: float, help: str, *, lo_open: bool = False,
                 hi_open: bool = False, allow_none: bool = False) -> Option:
    accepted = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if allow_none:
        accepted += " or None"

    def check(v) -> bool:
        if allow_none and v is None:
            return True
        if not _is_real(v):
            return False
        return (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)

    return Option(default, accepted, check, help, convert=lambda v: v if v is None else float(v))


def choice_option(default, choices: Sequence, help: str) -> Option:
    shown = ", ".join("None" if c is None else str(c) for c in choices)
    return Option(default, f"one of {shown}", lambda v: v in choices and not isinstance(v, bool), help)


def bool_option(default: bool, help: str) -> Option:
    return Option(default, "True or False", lambda v: isinstance(v, bool), help)


def check_options(policy: str, specs: Mapping[str, Option], given: Mapping[str, Any]) -> dict:
    """The options with defaults filled in; a ValueError names an unknown option, or the option, its accepted
    range and the value given."""
    unknown = sorted(set(given) - set(specs))
    if unknown:
        accepted = ", ".join(specs) if specs else "none"
        raise ValueError(f"mask policy {policy!r} got unknown option(s) {unknown}; its options: {accepted}")
    out = {}
    for key, spec in specs.items():
        value = given.get(key, spec.default)
        if key in given and not spec.check(value):
            raise ValueError(f"mask policy {policy!r}: option {key} must be {spec.accepted}, got {value!r}")
        out[key] = spec.convert(value)
    return out


class LayerSetPolicy(MaskPolicy):
    """A policy made by make_policy for a fixed list of layers (all sharing it): holds them, the target
    density and the checked options, and numbers the layers 0, 1, ... in that order (the key of every
    random draw a policy makes)."""

    OPTIONS: dict[str, Option] = {}

    def __init__(self, layers: Sequence, density: float, **options) -> None:
        self.layers = list(layers)
        if not self.layers:
            raise ValueError(f"mask policy {self.name!r} needs at least one masked layer")
        self.density = ops.check_density(density)
        self.options = check_options(self.name, self.OPTIONS, options)
        self._index = {id(layer): i for i, layer in enumerate(self.layers)}

    def layer_index(self, layer) -> int:
        """The layer's number in this policy (its key in random draws)."""
        index = self._index.get(id(layer))
        if index is None or self.layers[index] is not layer:
            # a deep copy of the model (to_dense, copy.deepcopy) copies this policy and its layer list, but
            # not the ids this table is keyed by: rebuild it from the list
            self._index = {id(l): i for i, l in enumerate(self.layers)}
            index = self._index.get(id(layer))
        if index is None:
            raise ValueError(f"mask policy {self.name!r} was not made for this layer "
                             f"({type(layer).__name__} with scores {tuple(layer.scores.shape)})")
        return index

    def state_dict(self) -> dict:
        return {"name": self.name, "options": dict(self.options), "density": self.density}

    def load_state_dict(self, state: Mapping) -> None:
        super().load_state_dict(state)
        if state.get("options") != self.options or state.get("density") != self.density:
            raise ValueError(f"mask policy {self.name!r}: the state was saved with density={state.get('density')!r}, "
                             f"options={state.get('options')!r}; this policy has density={self.density!r}, "
                             f"options={self.options!r}")


def frozen_weight(layer) -> torch.Tensor:
    """The frozen weight a policy may rewrite (IteRand): a fused layer's `.weight`."""
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"{type(layer).__name__} holds no weight of its own (a parametrized tensor's weight lives "
                         f"in its module): this policy needs the fused MaskedLinear / MaskedConv2d layers")
    return weight


@torch.no_grad()
def fill_scores(layers: Sequence, value) -> None:
    """Sets every layer's scores: a float (constant), "uniform" (U[0, 1]), "half" (0.5) or "keep"."""
    if value == "keep":
        return
    for layer in layers:
        if value == "uniform":
            layer.scores.uniform_(0.0, 1.0)
        else:
            layer.scores.fill_(0.5 if value == "half" else float(value))


class RawThresholdPolicy(LayerSetPolicy):
    """A policy whose mask is 1[S >= threshold(layer)] on raw scores: it runs the fused apply_mask /
    masked_linear ops with abs_scores=False, so dS = W ⊙ dW_eff. Subclasses define threshold()."""

    def effective_weight(self, layer, weight: torch.Tensor | None = None) -> torch.Tensor:
        return ops.apply_mask(self._weight(layer, weight), layer.scores, self.threshold(layer), abs_scores=False,
                              backend=layer.backend)

    def linear(self, layer, x: torch.Tensor) -> torch.Tensor:
        return ops.masked_linear(x, layer.weight, layer.scores, self.threshold(layer), layer.bias, abs_scores=False,
                                 backend=layer.backend)
