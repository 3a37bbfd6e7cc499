"""convert(model): mask every weight tensor a model's forward uses; masked_tensors, mask_stats, to_dense.

Two mechanisms, one op (ops.apply_mask / ops.masked_linear over the same scores and threshold):

* an nn.Linear or nn.Conv2d (exactly those classes) is swapped for the fused MaskedLinear /
  MaskedConv2d, unless its parent reads the child's `.weight` directly instead of calling it
  (nn.MultiheadAttention's `out_proj`; nn.TransformerEncoderLayer's `linear1`/`linear2`, which its
  fused inference fast path reads): a swapped layer's `.weight` is the raw weight, so such a parent
  would compute with the unmasked network;
* every other weight tensor gets the WeightMask parametrization (maskprune/nn/parametrize.py), so
  every read of it, by whatever code, returns W ⊙ M. That covers Conv1d/Conv3d/ConvTranspose*,
  Embedding, the projections of nn.MultiheadAttention (packed `in_proj_weight` or separate
  `q/k/v_proj_weight`, and `out_proj.weight`), subclasses of nn.Linear/nn.Conv2d whose forward we do
  not know, and any custom module. PyTorch's fused attention fast paths read these weights as
  attributes, so in eval mode they compute the masked network too (tested against train mode).
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Iterable, NamedTuple, Union

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from .. import masks
from ..seed_ops import SEED_POLICIES
from .init import init_weight
from .layers import WEIGHT_MODES, MaskedConv2d, MaskedLayer, MaskedLinear, check_masking_args, to_seed_mode
from .parametrize import WeightMask, weight_masks

log = logging.getLogger("maskprune")

# Modules whose forward (or fused fast path) reads a child Linear's `.weight` itself: those children
# are masked by the parametrization, never swapped for a MaskedLinear.
_WEIGHT_READING_PARENTS: tuple[type, ...] = (nn.MultiheadAttention, nn.TransformerEncoderLayer)
# Normalisation layers: their affine weight is a per-feature gain, left dense unless `include` names it.
_NORM_TYPES: tuple[type, ...] = tuple(t for t in (
    getattr(nn.modules.batchnorm, "_NormBase", None), nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", None),
    nn.LocalResponseNorm) if t is not None)

Entry = Union[str, type]  # a module or parameter name, or an nn.Module subclass


class MaskedTensor(NamedTuple):
    """One masked weight tensor: its qualified name, the module that owns it and the attribute name there,
    what holds its scores and threshold (a MaskedLinear/MaskedConv2d or a WeightMask), and the mechanism."""

    name: str
    module: nn.Module
    attr: str
    masker: MaskedLayer
    mechanism: str

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.masker.scores.shape)

    def effective_weight(self) -> torch.Tensor:
        """W ⊙ M, the weight the forward computes with (carries the straight-through gradient to the scores)."""
        if isinstance(self.masker, (MaskedLinear, MaskedConv2d)):
            return self.masker.mask_policy.effective_weight(self.masker)
        return getattr(self.module, self.attr)


@dataclasses.dataclass
class ConvertSummary:
    """What `convert` did, attached to the model as `model.maskprune_summary`.

    `masked`: (name, shape, mechanism) of each masked tensor, mechanism "MaskedLinear", "MaskedConv2d" (their
    seed-mode twins "SeedMaskedLinear", "SeedMaskedConv2d" under weights="seed") or "WeightMask" (the
    parametrization). `left`: (name, shape, reason) of each parameter left unmasked
    (frozen all the same): biases, normalisation gains, non-weight parameters such as a class token,
    and whatever `skip` / `include` excluded.
    """

    masked: list[tuple[str, tuple[int, ...], str]]
    left: list[tuple[str, tuple[int, ...], str]]

    def line(self) -> str:
        """One line: counts of masked tensors per mechanism and of the tensors left, per reason."""
        n_weights = sum(_numel(shape) for _, shape, _ in self.masked)
        by_mech: dict[str, int] = {}
        for _, _, mech in self.masked:
            by_mech[mech] = by_mech.get(mech, 0) + 1
        by_reason: dict[str, int] = {}
        for _, _, reason in self.left:
            key = reason.split(":")[0]
            by_reason[key] = by_reason.get(key, 0) + 1
        masked = ", ".join(f"{n} {m}" for m, n in by_mech.items())
        left = ", ".join(f"{n} {r}" for r, n in by_reason.items()) or "none"
        return (f"maskprune.convert: masked {len(self.masked)} weight tensors ({n_weights:,} weights: {masked}); "
                f"left unmasked (frozen) {len(self.left)}: {left}")

    def __str__(self) -> str:
        rows = [self.line(), "masked:"]
        rows += [f"  {name:40s} {str(shape):20s} {mech}" for name, shape, mech in self.masked]
        rows.append("left unmasked:")
        rows += [f"  {name:40s} {str(shape):20s} {reason}" for name, shape, reason in self.left]
        return "\n".join(rows)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def masked_tensors(model: nn.Module) -> list[MaskedTensor]:
    """Every masked tensor of a model, in module order: fused layers and WeightMask parametrizations alike."""
    found = []
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(module, (MaskedLinear, MaskedConv2d)):
            found.append(MaskedTensor(prefix + "weight", module, "weight", module, type(module).__name__))
        for attr, mask in weight_masks(module).items():
            found.append(MaskedTensor(prefix + attr, module, attr, mask, "WeightMask"))
    return found


def masked_layers(model: nn.Module) -> list[tuple[str, MaskedLayer]]:
    """(qualified name, layer) for every fused masked layer (MaskedLinear / MaskedConv2d) of a model, in
    module order. The parametrized tensors are not layers: masked_tensors lists everything masked."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (MaskedLinear, MaskedConv2d))]


def _is_weight_name(attr: str) -> bool:
    """PyTorch's naming of weight tensors: `weight`, `*_weight` (in_proj_weight), `weight_*` (RNN's weight_ih_l0)."""
    return attr == "weight" or attr.endswith("_weight") or attr.startswith("weight_")


def _check_entries(entries, arg: str, module_names: set[str], param_names: set[str], types: set[type]) -> list:
    """skip / include as a list of names and module types, each checked against the model."""
    if entries is None:
        return []
    if isinstance(entries, (str, type)):
        entries = [entries]
    try:
        entries = list(entries)
    except TypeError:
        raise TypeError(f"{arg} must be a module name, a parameter name, an nn.Module type or a list of them, "
                        f"got {type(entries).__name__}") from None
    unknown = []
    for e in entries:
        if isinstance(e, type):
            if not issubclass(e, nn.Module):
                raise TypeError(f"{arg} types must be nn.Module subclasses, got {e.__name__}")
            if not any(issubclass(t, e) for t in types):
                unknown.append(e.__name__)
        elif isinstance(e, str):
            if e not in module_names and e not in param_names:
                unknown.append(e)
        else:
            raise TypeError(f"{arg} entries must be str (a name from named_modules / named_parameters) or "
                            f"nn.Module types, got {type(e).__name__}")
    if unknown:
        raise ValueError(f"{arg} names modules, parameters or module types that model does not have: {unknown} "
                         f"(give names as model.named_modules() / model.named_parameters() spell them, "
                         f"or nn.Module classes)")
    return entries


def _match(entries: list, modules: dict[str, nn.Module], mod_name: str, qualified: str) -> tuple[bool, bool]:
    """(direct, inherited): the tensor, its module or the module's type is named; or a module above it is
    (by name or type)."""
    module = modules[mod_name]
    ancestors = [""] + [mod_name[:i] for i, c in enumerate(mod_name) if c == "."] if mod_name else []
    direct = inherited = False
    for e in entries:
        if isinstance(e, type):
            direct |= isinstance(module, e)
            inherited |= any(isinstance(modules[a], e) for a in ancestors)
        else:
            direct |= e == qualified or e == mod_name
            inherited |= e in ancestors
    return direct, inherited


def _default_reason(module: nn.Module, attr: str, param: torch.Tensor) -> str | None:
    """Why a parameter is left unmasked by default, or None when it is a weight convert masks."""
    if not _is_weight_name(attr):
        return "bias" if "bias" in attr else "not a weight: name it in include= to mask it"
    if isinstance(module, _NORM_TYPES):
        return "norm affine weight: a per-feature gain, left dense as in edge-popup; include= masks it"
    return None


def convert(model: nn.Module, density: float, *, policy: str = "layerwise", weight_init: str | None = None,
            weight_seed: int | str | None = "auto", score_init: str | float = "kaiming_uniform", scale_fan: bool = False,
            abs_scores: bool = True, backend: str = "auto", skip: Iterable[Entry] | Entry = (), include: Iterable[Entry] | Entry | None = None,
            fused: bool = True, options: dict | None = None, weights: str = "stored", **policy_options) -> nn.Module:
    """Masks every weight tensor of `model` in place (edge-popup's setting); returns the model.

    What is masked, and how (see the module docstring for why):
      - every parameter named like a weight (`weight`, `*_weight`, `weight_*`) of any module, except the
        affine weights of normalisation layers (LayerNorm, BatchNorm*, GroupNorm, InstanceNorm*,
        RMSNorm): their gain is per-feature (masking one entry silences a whole feature) and edge-popup
        leaves them alone; name them in `include` to mask them;
      - exact nn.Linear / nn.Conv2d become the fused MaskedLinear / MaskedConv2d (fused=False: the
        parametrization for them too); all other weights, including nn.MultiheadAttention's projections
        and nn.TransformerEncoderLayer's feed-forward Linears, get the WeightMask parametrization, whose
        masked weight PyTorch's fused attention fast paths also read.
    Biases and other parameters (a class token, positional embeddings, bias_k/bias_v) are frozen but
    left unmasked; name a parameter in `include` to mask it.

    Defaults: weight_init=None keeps the module's current weights as the frozen random weights (so
    converting a model you built changes nothing but the mask), and scale_fan=False (only used with a
    weight_init). The CLI (`maskprune train`) instead re-initialises them with weight_init=
    "signed_constant", scale_fan=True (edge-popup's best setting), and MaskedLinear/MaskedConv2d made
    directly default to "signed_constant" without fan scaling.

    weight_seed (only with a weight_init): the frozen weights of the fused layers are drawn by maskprune.rng's
    counter-based generator keyed (weight_seed, i) for the i-th masked layer, identical on every backend and
    torch version, and each layer records its `weight_key` (what a ticket stores instead of the weights).
    "auto" draws weight_seed from torch's RNG (so torch.manual_seed still makes convert reproducible); None
    keeps torch's own draw (the behaviour before tickets; such weights cannot be regenerated from a key).
    WeightMask-parametrized tensors keep torch's draw.

    weights="seed" (needs a weight_init, a weight_seed and a top-k policy, "layerwise" or "global"): the fused
    layers keep no weight tensor at all; they become SeedMaskedLinear / SeedMaskedConv2d, whose mask and dS
    passes regenerate W from the layer's key (maskprune.seed_ops), bit for bit the values of the default
    weights="stored". Training memory drops by the weight bytes; `layer.weight` still reads (regenerated).
    WeightMask-parametrized tensors keep their stored weight.

    policy is a name from maskprune.masks.ALL_POLICIES: "layerwise" (each tensor keeps `density` of its
    weights, edge-popup), "global" (one threshold over all masked tensors), "supermask", "biprop", "signed",
    "iterand", "gem_miner" or "threshold" (see each module of maskprune.masks for its rule, gradient and
    defaults); `policy_options` (keywords, or the dict `options`) are that policy's options (masks.policy_options(name)), checked before
    the model changes (a number as score_init is the policy's own `score_init` option, for the policies that
    have one). One policy object is shared by all masked tensors; the trainer calls its hooks
    through masks.step_hooks / epoch_hooks. Afterwards the whole network is frozen: the scores are the only
    parameters with requires_grad.

    skip / include take module names (as in named_modules; a name covers the module's whole subtree),
    parameter names (as in named_parameters, before conversion) or nn.Module types. include=None means
    "everything masked by default"; otherwise only what include names (a module, subtree or type) is
    masked, plus the norm weights and non-weight parameters it names itself. skip wins over include.
    Names the model does not have raise ValueError.

    What was masked and what was left is attached as `model.maskprune_summary` (a ConvertSummary; print
    it for the table) and logged in one line at INFO level on the "maskprune" logger. Converting a
    model that already holds masked tensors raises ValueError naming them (run to_dense first).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if options is not None and not isinstance(options, dict):
        raise TypeError(f"options must be a dict of policy options, got {type(options).__name__}")
    if options:  # the policy options as one dict (a key such as score_init cannot clash with convert's own)
        clash = sorted(set(options) & set(policy_options))
        if clash:
            raise ValueError(f"policy options given twice, in options= and as keywords: {clash}")
        policy_options = {**options, **policy_options}
    if policy in masks.POLICIES and not isinstance(score_init, str) and "score_init" in masks.policy_options(policy):
        # A number is the policy's own constant initial score (supermask, gem_miner, threshold), not a
        # layer initialiser name: route it there instead of refusing it.
        policy_options = {**policy_options, "score_init": score_init}
        score_init = "kaiming_uniform"
    density = check_masking_args(density=density, weight_init=weight_init, score_init=score_init, backend=backend)
    if policy not in masks.POLICIES:
        raise ValueError(f"policy must be one of {masks.POLICIES}, got {policy!r}")
    masks.check_options(policy, masks.policy_options(policy), policy_options)
    if weights not in WEIGHT_MODES:
        raise ValueError(f"weights must be one of {WEIGHT_MODES}, got {weights!r}")
    if weights == "seed":
        if weight_init is None or weight_seed is None:
            raise ValueError("weights='seed' needs weights that can be regenerated: a weight_init (got "
                             f"{weight_init!r}) and a weight_seed ('auto' or an int, got {weight_seed!r})")
        if policy not in SEED_POLICIES:
            raise ValueError(f"weights='seed' runs the policies {SEED_POLICIES}, got policy={policy!r}")
        if not fused:
            raise ValueError("weights='seed' needs fused=True (the parametrization keeps a stored weight)")
    if weight_seed != "auto" and weight_seed is not None and (
            isinstance(weight_seed, bool) or not isinstance(weight_seed, int) or not 0 <= weight_seed < 2 ** 64):
        raise ValueError(f"weight_seed must be 'auto', None or an int in [0, 2^64), got {weight_seed!r}")
    already = masked_tensors(model)
    if already:
        names = [t.name for t in already]
        shown = ", ".join(names[:5]) + (f", ... ({len(names)} in all)" if len(names) > 5 else "")
        raise ValueError(f"model is already converted: it holds masked tensors ({shown}); convert a model once "
                         f"(maskprune.to_dense(model) gives a plain copy to convert again)")

    modules = dict(model.named_modules(remove_duplicate=False))
    params = list(model.named_parameters(remove_duplicate=False))
    module_names, param_names = set(modules), {n for n, _ in params}
    types = {type(m) for m in modules.values()}
    skip = _check_entries(skip, "skip", module_names, param_names, types)
    include_entries = None if include is None else _check_entries(include, "include", module_names, param_names,
                                                                   types)

    # Each parameter tensor once, with every name it has (a tied weight appears under several).
    names_of: dict[int, list[str]] = {}
    for qualified, p in params:
        names_of.setdefault(id(p), []).append(qualified)

    plan, left = [], []
    for qualified, p in params:
        mod_name, _, attr = qualified.rpartition(".")
        module = modules[mod_name]
        shape = tuple(p.shape)
        if names_of[id(p)][0] != qualified:
            continue  # listed under its first name
        reason = _default_reason(module, attr, p)
        if any(_match(skip, modules, mod_name, qualified)):
            left.append((qualified, shape, "skip"))
            continue
        if include_entries is not None:
            i_direct, i_inherited = _match(include_entries, modules, mod_name, qualified)
            if not (i_direct or i_inherited):
                left.append((qualified, shape, "not in include"))
                continue
            if qualified in include_entries or (i_direct and reason is not None and reason.startswith("norm")):
                reason = None  # include names this norm weight / parameter itself
        if reason is not None:
            left.append((qualified, shape, reason))
            continue
        if len(names_of[id(p)]) > 1:
            left.append((qualified, shape, f"tied: the same tensor as {names_of[id(p)][1:]}; tied weights are "
                                           f"not masked"))
            continue
        if not p.is_floating_point() or p.numel() == 0:
            left.append((qualified, shape, "not a float tensor with elements"))
            continue
        if weight_init is not None and p.dim() < 2:
            raise ValueError(f"weight_init={weight_init!r} needs weights of 2 or more dimensions to find the fan-in, "
                             f"but {qualified} has shape {shape}; use weight_init=None or leave it out of include")
        plan.append((qualified, mod_name, module, attr))
    if not plan:
        raise ValueError("nothing to convert: model has no weight tensor to mask "
                         "(outside `skip`, inside `include`); see the convert docstring for what is masked")

    kw = dict(density=density, score_init=score_init, abs_scores=abs_scores, backend=backend)
    maskers, masked = [], []
    for qualified, mod_name, module, attr in plan:
        parent_name, _, child = mod_name.rpartition(".")
        parent = modules[parent_name] if mod_name else None
        swap = (fused and attr == "weight" and type(module) in (nn.Linear, nn.Conv2d) and parent is not None
                and not isinstance(parent, _WEIGHT_READING_PARENTS))
        if swap:
            twin = _masked_twin(module, weight_init=weight_init, scale_fan=scale_fan, **kw)
            setattr(parent, child, twin)
            modules[mod_name] = twin
            maskers.append(twin)
            masked.append((qualified, tuple(twin.weight.shape), type(twin).__name__))
        else:
            weight = getattr(module, attr)
            if weight_init is not None:
                init_weight(weight, weight_init, density=density, scale_fan=scale_fan)
            mask = WeightMask(weight.shape, device=weight.device, **kw)
            parametrize.register_parametrization(module, attr, mask)
            maskers.append(mask)
            masked.append((qualified, tuple(weight.shape), "WeightMask"))

    if weight_init is not None and weight_seed is not None:
        if weight_seed == "auto":
            weight_seed = int(torch.randint(0, 2 ** 63 - 1, ()))
        from .. import rng  # late: rng reaches back into maskprune.nn for seed_weights
        rng.seed_weights(model, weight_seed)  # overwrites torch's draw in the fused layers; sets layer.weight_key
        if weights == "seed":
            for m in maskers:
                if isinstance(m, (MaskedLinear, MaskedConv2d)):
                    to_seed_mode(m)
            masked = [(n, shape, f"Seed{mech}" if mech in ("MaskedLinear", "MaskedConv2d") else mech)
                      for n, shape, mech in masked]
    for p in model.parameters():
        p.requires_grad_(False)
    for m in maskers:
        m.scores.requires_grad_(True)
    if policy != "layerwise":
        shared = masks.make_policy(policy, maskers, density, **policy_options)
        for m in maskers:
            m.mask_policy = shared
    summary = ConvertSummary(masked=masked, left=left)
    model.maskprune_summary = summary
    log.info("%s (print model.maskprune_summary for the list)", summary.line())
    return model


def _masked_twin(module: nn.Module, *, weight_init: str | None, **kw) -> MaskedLayer:
    factory = dict(device=module.weight.device, dtype=module.weight.dtype)
    has_bias = module.bias is not None
    if isinstance(module, nn.Linear):
        twin = MaskedLinear(module.in_features, module.out_features, bias=has_bias, weight_init=weight_init,
                            **kw, **factory)
    else:
        twin = MaskedConv2d(module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
                            padding=module.padding, dilation=module.dilation, groups=module.groups,
                            bias=has_bias, padding_mode=module.padding_mode, weight_init=weight_init,
                            **kw, **factory)
    twin.train(module.training)
    with torch.no_grad():
        if weight_init is None:
            twin.weight.copy_(module.weight)
        if has_bias:
            twin.bias.copy_(module.bias)
    return twin


@torch.no_grad()
def mask_stats(model: nn.Module) -> dict:
    """Kept/total weights per masked tensor and overall.

    One row per masked tensor (fused layers and parametrized tensors alike): "name" (the owning
    module), "tensor" (the tensor's qualified name), "mechanism", "kept", "total", "fraction",
    "density", "policy".
    """
    tensors = masked_tensors(model)
    if not tensors:
        raise ValueError("model has no masked layers (run maskprune.convert first)")
    rows, kept_all, total_all = [], 0, 0
    for t in tensors:
        kept, total = int((t.masker.mask() != 0).sum()), t.masker.scores.numel()
        rows.append({"name": t.name.rpartition(".")[0], "tensor": t.name, "mechanism": t.mechanism,
                     "kept": kept, "total": total, "fraction": kept / total, "density": t.masker.density,
                     "policy": t.masker.mask_policy.name})
        kept_all += kept
        total_all += total
    return {"layers": rows, "kept": kept_all, "total": total_all, "fraction": kept_all / total_all}


@torch.no_grad()
def to_dense(model: nn.Module) -> nn.Module:
    """A copy of the model with plain modules whose weights are W ⊙ M: the same outputs in train and eval mode.

    Fused layers become nn.Linear / nn.Conv2d; each parametrized tensor becomes a plain parameter
    holding its masked value (the model's other parametrizations of that tensor, if any, are folded in too).
    Every parameter stays frozen, as in the converted model (call .requires_grad_() to fine-tune the copy).
    For inference this copy is also the fast one: it runs no mask op at all.
    """
    # An RNN caches the weights of its last forward in _flat_weights: with a parametrized weight these are
    # non-leaf tensors, which deepcopy refuses. They are rebuilt below, so the copy starts without them.
    memo = {id(t): None for m in model.modules() for t in (getattr(m, "_flat_weights", None) or ())
            if isinstance(t, torch.Tensor) and not t.is_leaf}
    dense = copy.deepcopy(model, memo)
    unhooked = set()
    for t in masked_tensors(dense):
        if isinstance(t.masker, (MaskedLinear, MaskedConv2d)):
            continue
        if id(t.module) not in unhooked:
            # A deep copy shares parametrize's generated class (the one holding the `weight` property) with
            # the original; removing the parametrization deletes the property from that class, which would
            # break the original model. Give the copy a class of its own first.
            cls = type(t.module)
            t.module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
            unhooked.add(id(t.module))
        parametrize.remove_parametrizations(t.module, t.attr, leave_parametrized=True)
    for m in dense.modules():
        if isinstance(m, nn.RNNBase) and hasattr(m, "_init_flat_weights"):
            m._init_flat_weights()  # point the RNN's weight cache at its now plain weights
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
        plain.train(layer.training)
        plain.requires_grad_(False)
        parent_name, _, child = name.rpartition(".")
        parent = dense.get_submodule(parent_name) if parent_name else dense
        setattr(parent, child, plain)
    dense.__dict__.pop("maskprune_summary", None)
    return dense
