"""make_policy (by name, with checked options), option strings for configs, and the trainer's hooks over a model.

The hooks group a model's masked tensors by the policy they share and call each policy once with its
layers, so a training loop runs any policy with these calls and no knowledge of which one it is:

    loss = loss + policy_penalty(model)          (when it is not None)
    loss.backward(); before_step_hooks(model)    gradient terms (gem_miner's L2), before the step
    optimizer.step(); step_hooks(model, step)
    epoch_hooks(model, epoch)                    after each epoch
    finalize_policies(model)                     when training ends
    policy_state(model) / load_policy_state(model, state)   with the checkpoint
"""
from __future__ import annotations

import ast
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

from .base import LayerSetPolicy, MaskPolicy
from .biprop import Biprop
from .gem_miner import GemMiner
from .iterand import IteRand
from .signed import SignedSupermask
from .supermask import Supermask
from .threshold import FixedThreshold
from .topk import LAYERWISE, GlobalTopK

POLICY_CLASSES: dict[str, type[LayerSetPolicy]] = {
    cls.name: cls for cls in (Supermask, Biprop, SignedSupermask, IteRand, GemMiner, FixedThreshold)}
ALL_POLICIES: tuple[str, ...] = ("layerwise", "global", *POLICY_CLASSES)


def policy_options(name: str) -> dict:
    """{option: Option} of a policy (layerwise and global have none)."""
    _check_name(name)
    cls = POLICY_CLASSES.get(name)
    return dict(cls.OPTIONS) if cls is not None else {}


def _check_name(name) -> str:
    if name not in ALL_POLICIES:
        raise ValueError(f"policy must be one of {', '.join(ALL_POLICIES)}, got {name!r}")
    return name


def make_policy(name: str, layers: Sequence, density: float, **options) -> MaskPolicy:
    """The mask policy `name` for `layers` (MaskedLinear / MaskedConv2d / WeightMask), all sharing it.

    Options are checked before anything changes (ValueError naming the option and its accepted range).
    Some policies initialise the scores (supermask, gem_miner, threshold: see their docstrings). The
    policy is not attached: set `layer.mask_policy = policy` (convert does), or use `attach`.
    "layerwise" returns the shared LAYERWISE policy (it takes each layer's own density).
    """
    _check_name(name)
    layers = list(layers)
    if name in ("layerwise", "global"):
        if options:
            raise ValueError(f"mask policy {name!r} takes no options, got {sorted(options)}")
        if name == "layerwise":
            return LAYERWISE
        if not layers:
            raise ValueError("mask policy 'global' needs at least one masked layer")
        return GlobalTopK(layers, density, abs_scores=layers[0].abs_scores, backend=layers[0].backend)
    return POLICY_CLASSES[name](layers, density, **options)


# ----------------------------------------------------------------------------------------------
# Options as one config string ("period=300,prob=0.1"): a flat TOML value, parsed back exactly
# ----------------------------------------------------------------------------------------------

def parse_options(name: str, text: str) -> dict:
    """{option: value} from "key=value,key=value" (values as Python literals: 0.1, True, None, 'sample' or
    sample); each checked as make_policy checks it."""
    from .base import check_options

    specs = policy_options(name)
    if not isinstance(text, str):
        raise ValueError(f"policy options must be a string 'key=value,...', got {type(text).__name__}")
    out: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or not key:
            raise ValueError(f"policy options: {item!r} is not key=value")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw  # a bare word: a string choice such as sample
        out[key] = value
    check_options(name, specs, out)
    return out


def format_options(options: Mapping[str, Any]) -> str:
    """The inverse of parse_options: "key=value,..." in a stable order."""
    return ",".join(f"{k}={v!r}" for k, v in sorted(options.items()))


# ----------------------------------------------------------------------------------------------
# Hooks over a model
# ----------------------------------------------------------------------------------------------

def policy_groups(model: nn.Module) -> list[tuple[MaskPolicy, list]]:
    """(policy, its layers in module order) for every policy a model's masked tensors use, in order of
    first use."""
    from ..nn.convert import masked_tensors  # late import: maskprune.nn imports this package

    groups: dict[int, tuple[MaskPolicy, list]] = {}
    for t in masked_tensors(model):
        policy = t.masker.mask_policy
        groups.setdefault(id(policy), (policy, []))[1].append(t.masker)
    return list(groups.values())


def before_step_hooks(model: nn.Module) -> None:
    """After backward, before optimizer.step(): every policy's before_step (gradient terms added in place)."""
    for policy, layers in policy_groups(model):
        policy.before_step(layers)


def step_hooks(model: nn.Module, step: int) -> None:
    """After optimizer.step(): every policy's after_step (`step` = optimizer steps done, 1-based)."""
    for policy, layers in policy_groups(model):
        policy.after_step(layers, step)


def epoch_hooks(model: nn.Module, epoch: int) -> None:
    """After an epoch: every policy's on_epoch_end (`epoch` = epochs done, 1-based)."""
    for policy, layers in policy_groups(model):
        policy.on_epoch_end(layers, epoch)


def finalize_policies(model: nn.Module) -> None:
    """When training ends, before the final evaluation."""
    for policy, layers in policy_groups(model):
        policy.finalize(layers)


def policy_penalty(model: nn.Module) -> torch.Tensor | None:
    """The sum of the policies' loss terms, or None when none has one."""
    terms = [t for policy, layers in policy_groups(model) if (t := policy.regularization(layers)) is not None]
    return sum(terms) if terms else None


def policy_state(model: nn.Module) -> list[dict]:
    """Every policy's state_dict, in policy_groups order (for the checkpoint)."""
    return [policy.state_dict() for policy, _ in policy_groups(model)]


def load_policy_state(model: nn.Module, state: Sequence[Mapping]) -> None:
    groups = policy_groups(model)
    if not isinstance(state, (list, tuple)) or len(state) != len(groups):
        raise ValueError(f"policy state holds {len(state) if isinstance(state, (list, tuple)) else 'no list of'} "
                         f"policies, the model uses {len(groups)}")
    for (policy, _), s in zip(groups, state):
        policy.load_state_dict(s)


def attach(model_or_layers, policy: MaskPolicy) -> None:
    """Sets `mask_policy` on every masked tensor of a model (or on the given layers) and routes their forward
    through the policy (policy.linear / conv2d / effective_weight).

    The routing is for layers whose class does not yet delegate to the policy (see the issue-17 integration
    notes): it sets an instance `forward`, which the class's own would do identically once it delegates."""
    from ..nn.layers import MaskedConv2d, MaskedLinear

    if isinstance(model_or_layers, nn.Module):
        from ..nn.convert import masked_tensors
        layers = [t.masker for t in masked_tensors(model_or_layers)]
    else:
        layers = list(model_or_layers)
    for layer in layers:
        layer.mask_policy = policy
        if getattr(type(layer), "delegates_to_policy", False):
            continue
        if isinstance(layer, MaskedLinear):
            layer.forward = _LinearForward(layer)
        elif isinstance(layer, MaskedConv2d):
            layer.forward = _ConvForward(layer)
        else:  # the WeightMask parametrization: forward(weight) -> W_eff
            layer.forward = _WeightForward(layer)


class _Route:
    """An instance forward calling the layer's current policy (a class, so the layer deep-copies)."""

    def __init__(self, layer):
        self.layer = layer

    def __deepcopy__(self, memo):
        from copy import deepcopy
        return type(self)(deepcopy(self.layer, memo))


class _LinearForward(_Route):
    def __call__(self, x):
        layer = self.layer
        if x.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        return layer.mask_policy.linear(layer, x)


class _ConvForward(_Route):
    def __call__(self, x):
        return self.layer.mask_policy.conv2d(self.layer, x)


class _WeightForward(_Route):
    def __call__(self, weight):
        return self.layer.mask_policy.effective_weight(self.layer, weight)
