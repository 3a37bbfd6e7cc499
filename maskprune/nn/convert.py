"""convert(model): swap every nn.Linear / nn.Conv2d for its masked twin; mask_stats and to_dense."""
from __future__ import annotations

import copy
from typing import Iterable

import torch
import torch.nn as nn

from .. import masks, ops
from .layers import MaskedConv2d, MaskedLayer, MaskedLinear


def masked_layers(model: nn.Module) -> list[tuple[str, MaskedLayer]]:
    """(qualified name, layer) for every masked layer of a model, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MaskedLayer)]


def _masked_twin(module: nn.Module, **kw) -> MaskedLayer:
    factory = dict(device=module.weight.device, dtype=module.weight.dtype)
    has_bias = module.bias is not None
    if isinstance(module, nn.Linear):
        twin = MaskedLinear(module.in_features, module.out_features, bias=has_bias, **kw, **factory)
    else:
        twin = MaskedConv2d(module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
                            padding=module.padding, dilation=module.dilation, groups=module.groups,
                            bias=has_bias, padding_mode=module.padding_mode, **kw, **factory)
    with torch.no_grad():
        if kw["weight_init"] is None:
            twin.weight.copy_(module.weight)
        if has_bias:
            twin.bias.copy_(module.bias)
    return twin


def convert(model: nn.Module, density: float, *, policy: str = "layerwise", weight_init: str | None = None,
            score_init: str = "kaiming_uniform", scale_fan: bool = False, abs_scores: bool = True,
            backend: str = "auto", skip: Iterable[str] = ()) -> nn.Module:
    """Replaces every nn.Linear and nn.Conv2d of `model` in place by a masked layer; returns the model.

    weight_init=None keeps the module's current weights as the frozen random weights. policy is
    "layerwise" (each layer keeps `density` of its weights) or "global" (one threshold for all).
    `skip` names modules (as in named_modules) left dense. Afterwards the whole random network is
    frozen: the scores are the only parameters with requires_grad (biases and BatchNorm affine
    parameters included stay as initialised), as in edge-popup.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    density = ops.check_density(density)
    if policy not in masks.POLICIES:
        raise ValueError(f"policy must be one of {masks.POLICIES}, got {policy!r}")
    ops.check_backend_name(backend)
    skip = {skip} if isinstance(skip, str) else set(skip)
    names = {name for name, _ in model.named_modules()}
    unknown = sorted(skip - names)
    if unknown:
        raise ValueError(f"skip names modules that model does not have: {unknown}")
    kw = dict(density=density, weight_init=weight_init, score_init=score_init, scale_fan=scale_fan,
              abs_scores=abs_scores, backend=backend)

    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, (nn.Linear, nn.Conv2d)) and not isinstance(m, MaskedLayer) and name not in skip]
    if not targets:
        raise ValueError("model has no nn.Linear or nn.Conv2d to convert (outside `skip`)")
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _masked_twin(module, **kw))

    for param_name, param in model.named_parameters():
        if not param_name.endswith("scores"):
            param.requires_grad_(False)
    layers = [m for _, m in masked_layers(model)]
    if policy == "global":
        shared = masks.GlobalTopK(layers, density, abs_scores=abs_scores, backend=backend)
        for layer in layers:
            layer.mask_policy = shared
    return model


@torch.no_grad()
def mask_stats(model: nn.Module) -> dict:
    """Kept/total weights per masked layer and overall."""
    layers = masked_layers(model)
    if not layers:
        raise ValueError("model has no masked layers (run maskprune.convert first)")
    rows, kept_all, total_all = [], 0, 0
    for name, layer in layers:
        kept, total = int(layer.mask().sum()), layer.weight.numel()
        rows.append({"name": name, "kept": kept, "total": total, "fraction": kept / total,
                     "density": layer.density, "policy": layer.mask_policy.name})
        kept_all += kept
        total_all += total
    return {"layers": rows, "kept": kept_all, "total": total_all, "fraction": kept_all / total_all}


@torch.no_grad()
def to_dense(model: nn.Module) -> nn.Module:
    """A copy of the model as plain nn.Linear/nn.Conv2d layers whose weights are W ⊙ M (same outputs)."""
    dense = copy.deepcopy(model)
    for name, layer in masked_layers(dense):
        if isinstance(layer, MaskedLinear):
            plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                              device=layer.weight.device, dtype=layer.weight.dtype)
        else:
            plain = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                              padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
                              bias=layer.bias is not None, padding_mode=layer.padding_mode,
                              device=layer.weight.device, dtype=layer.weight.dtype)
        plain.weight.copy_(layer.masked_weight())
        if layer.bias is not None:
            plain.bias.copy_(layer.bias)
        parent_name, _, child = name.rpartition(".")
        parent = dense.get_submodule(parent_name) if parent_name else dense
        setattr(parent, child, plain)
    return dense
