"""MaskedLinear and MaskedConv2d: a frozen random weight, float32 scores, and a top-k mask over them.

The fused masked layers convert() swaps in for nn.Linear / nn.Conv2d; every other weight is masked by the
WeightMask parametrization (parametrize.py), which shares MaskedLayer's settings, scores and mask policy.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .. import masks, ops, seed_ops
from .init import SCORE_INITS, WEIGHT_INITS, init_scores, init_weight


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast would run a linear layer in, or None when autocast is off."""
    device_type = x.device.type
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def check_masking_args(*, density: float, weight_init: str | None, score_init: str, backend: str) -> float:
    """Validates the settings every masked tensor shares; returns the density as a float."""
    density = ops.check_density(density)
    if weight_init is not None and weight_init not in WEIGHT_INITS:
        raise ValueError(f"weight_init must be one of {WEIGHT_INITS} (or None to keep the weights), "
                         f"got {weight_init!r}")
    if score_init not in SCORE_INITS:
        raise ValueError(f"score_init must be one of {SCORE_INITS}, got {score_init!r}")
    ops.check_backend_name(backend)
    return density


class MaskedLayer:
    """What every masked tensor's owner shares (MaskedLinear, MaskedConv2d and the WeightMask
    parametrization): settings, float32 scores, and the mask policy (maskprune.masks) that turns the scores
    into the mask, the forward and the gradient."""

    weight: nn.Parameter
    scores: nn.Parameter
    delegates_to_policy = True  # forward calls self.mask_policy (masks.attach then only sets the policy)

    def _init_mask_state(self, shape: tuple, device, *, density: float, score_init: str, abs_scores: bool,
                         backend: str) -> None:
        """Settings, the layer-wise policy and fresh float32 scores of `shape` (arguments already checked)."""
        self.density = ops.check_density(density)
        self.abs_scores = bool(abs_scores)
        self.backend = backend
        self.score_init = score_init
        self.mask_policy: masks.MaskPolicy = masks.LAYERWISE
        self.scores = nn.Parameter(torch.empty(shape, dtype=torch.float32, device=device))
        init_scores(self.scores, score_init)

    def _setup_masking(self, *, density: float, weight_init: str | None, score_init: str, scale_fan: bool,
                       abs_scores: bool, backend: str) -> None:
        density = check_masking_args(density=density, weight_init=weight_init, score_init=score_init,
                                     backend=backend)
        self.weight_init, self.scale_fan = weight_init, bool(scale_fan)
        self.weight.requires_grad_(False)
        if weight_init is not None:
            init_weight(self.weight, weight_init, density=density, scale_fan=scale_fan)
        self._init_mask_state(tuple(self.weight.shape), self.weight.device, density=density,
                              score_init=score_init, abs_scores=abs_scores, backend=backend)

    def threshold(self) -> torch.Tensor:
        """The current threshold t of a top-k policy (cached until the scores change)."""
        return self.mask_policy.threshold(self)

    @torch.no_grad()
    def mask(self) -> torch.Tensor:
        """The mask the layer computes with: bool keep-mask (1[key >= t] for top-k), int8 {-1, 0, 1} for
        the signed policy."""
        return self.mask_policy.mask(self)

    @torch.no_grad()
    def masked_weight(self) -> torch.Tensor:
        """W_eff of the found subnetwork (W ⊙ M for top-k; the policy's evaluation weight in general)."""
        return self.mask_policy.masked_weight(self)

    def _masking_repr(self) -> str:
        return (f"density={self.density:g}, policy={self.mask_policy.name}, abs_scores={self.abs_scores}, "
                f"backend={self.backend}")


class MaskedLinear(nn.Linear, MaskedLayer):
    """Y = X (W ⊙ M)^T (+ b): W frozen, only the scores (float32) learn which weights to keep.

    Defaults: weight_init="signed_constant" (a layer made from scratch has no weights worth keeping, and
    edge-popup found signed constants best) with scale_fan=False (std = gain/sqrt(fan_in), the plain
    Kaiming scale; scale_fan=True uses fan_in * density, as edge-popup and the CLI do). convert() instead
    keeps a model's current weights (weight_init=None); `maskprune train` uses signed_constant with
    scale_fan=True. bias=False by default: edge-popup's layers have none.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *, density: float = 0.5,
                 weight_init: str | None = "signed_constant", score_init: str = "kaiming_uniform",
                 scale_fan: bool = False, abs_scores: bool = True, backend: str = "auto",
                 device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._setup_masking(density=density, weight_init=weight_init, score_init=score_init,
                            scale_fan=scale_fan, abs_scores=abs_scores, backend=backend)
        if self.bias is not None:
            self.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _autocast_dtype(x)
        if dtype is not None:
            x = x.to(dtype)
        return self.mask_policy.linear(self, x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._masking_repr()}"


class MaskedConv2d(nn.Conv2d, MaskedLayer):
    """conv2d with the effective weight W ⊙ M from one fused mask pass; the convolution stays in cuDNN/ATen.

    Same defaults as MaskedLinear: weight_init="signed_constant", scale_fan=False, bias=False.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = False, padding_mode: str = "zeros", *, density: float = 0.5,
                 weight_init: str | None = "signed_constant", score_init: str = "kaiming_uniform",
                 scale_fan: bool = False, abs_scores: bool = True, backend: str = "auto",
                 device=None, dtype=None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias, padding_mode=padding_mode,
                         device=device, dtype=dtype)
        self._setup_masking(density=density, weight_init=weight_init, score_init=score_init,
                            scale_fan=scale_fan, abs_scores=abs_scores, backend=backend)
        if self.bias is not None:
            self.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mask_policy.conv2d(self, x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._masking_repr()}"


# ---------------------------------------------------------------------------------------------------------
# Seed mode (issue 18 §3): the frozen weight is not stored; it is regenerated from `weight_key` wherever a pass
# needs it (maskprune.seed_ops).
# ---------------------------------------------------------------------------------------------------------

WEIGHT_MODES = ("stored", "seed")


class SeedWeight:
    """What a seed-mode layer adds to MaskedLinear / MaskedConv2d: no `weight` parameter (nothing in state_dict),
    `weight` as a read-only property that regenerates W from `weight_key` (for to_dense, tickets, inspection:
    a fresh tensor per read), and a forward through maskprune.seed_ops, whose mask and dS passes regenerate W
    themselves. Only the top-k policies (seed_ops.SEED_POLICIES) run in seed mode."""

    weight_mode = "seed"
    weight_key: "object"

    @property
    def weight(self) -> torch.Tensor:
        if self.scores.is_meta:  # shape checks on the meta device (runfiles.check_fits): no values
            return torch.empty(self.scores.shape, device="meta")
        return self.weight_key.generate(tuple(self.scores.shape), device=self.scores.device)

    def _seed_threshold(self) -> torch.Tensor:
        if self.mask_policy.name not in seed_ops.SEED_POLICIES:
            raise ValueError(f"mask policy {self.mask_policy.name!r} cannot run on a seed-mode layer (weights='seed'); "
                             f"accepted policies: {seed_ops.SEED_POLICIES}")
        return self.mask_policy.threshold(self)


class SeedMaskedLinear(SeedWeight, MaskedLinear):
    """MaskedLinear whose frozen weight is regenerated, not stored (to_seed_mode makes one)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _autocast_dtype(x)
        if dtype is not None:
            x = x.to(dtype)
        return seed_ops.seed_masked_linear(x, self.scores, self._seed_threshold(), self.weight_key, self.bias,
                                  abs_scores=self.abs_scores, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weights=seed"


class SeedMaskedConv2d(SeedWeight, MaskedConv2d):
    """MaskedConv2d whose frozen weight is regenerated, not stored (to_seed_mode makes one)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w_eff = seed_ops.seed_apply_mask(self.scores, self._seed_threshold(), self.weight_key,
                                         abs_scores=self.abs_scores, backend=self.backend)
        return self._conv_forward(x, w_eff, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weights=seed"


_SEED_TWINS = {MaskedLinear: SeedMaskedLinear, MaskedConv2d: SeedMaskedConv2d}


@torch.no_grad()
def to_seed_mode(layer: MaskedLayer) -> MaskedLayer:
    """Turns a MaskedLinear / MaskedConv2d whose weight came from maskprune.rng (it has `weight_key`) into its
    seed-mode twin in place: the weight parameter is dropped (checked first to equal what the key regenerates)
    and the class swapped, as torch.nn.utils.parametrize swaps a module's class. Returns the layer."""
    twin = _SEED_TWINS.get(type(layer))
    if twin is None:
        raise TypeError(f"layer must be a MaskedLinear or MaskedConv2d, got {type(layer).__name__}")
    key = getattr(layer, "weight_key", None)
    if key is None:
        raise ValueError("layer has no weight_key: only weights drawn by maskprune.rng (convert(..., weight_init=..., "
                         "weight_seed=...)) can be regenerated; pretrained weights must stay stored")
    weight = layer._parameters["weight"]
    if weight.dtype != torch.float32:
        raise ValueError(f"layer.weight must be float32 for seed mode (the generator's dtype), got {weight.dtype}")
    if not weight.is_meta and not torch.equal(key.generate(tuple(weight.shape), device=weight.device), weight):
        raise ValueError("layer.weight no longer equals what its weight_key regenerates (changed after seeding); "
                         "it cannot be dropped")
    del layer._parameters["weight"]
    layer.__class__ = twin
    return layer
