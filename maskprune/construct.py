"""Malach et al.'s constructive pruning: a masked random network of depth 2l that approximates a ReLU target of depth l.

This is the construction in the proof of Malach, Yehudai, Shalev-Shwartz and Shamir, "Proving the Lottery
Ticket Hypothesis: Pruning is All You Need" (ICML 2020), Theorem 2.1, built explicitly and vectorised:

* Target: a ReLU network ``x -> W_l σ(... σ(W_1 x))`` given as its ``nn.Linear`` layers (no biases, as in the
  paper), ReLU after every layer but the last.
* Random network: depth 2l. Target layer i (``W_i`` of shape ``n x d``) becomes two random layers,
  ``V_i`` of shape ``(k d) x d`` and ``U_i`` of shape ``n x (k d)``, with ReLU after ``V_i``, and after ``U_i``
  wherever the target has one. Weights are i.i.d. uniform on ``[-scale, scale]`` (the paper: U[-1, 1]).
  ``k`` (``width``) is the number of random intermediate neurons per target input unit.
* Mask: the ``k d`` intermediate neurons of pair i are split into d blocks of k; every neuron of block j keeps
  at most one input edge, the one from input coordinate j (``V_i`` is pruned to block-diagonal), so it computes
  ``σ(v x_j)``. A target weight ``w = W_i[o, j]`` is then realised through neurons of block j, via
  ``w x = w σ(x) - w σ(-x)``: a neuron with ``v > 0`` contributes ``u σ(v x) = (u v) σ(x)`` and one with
  ``v < 0`` contributes ``u σ(v x) = (u |v|) σ(-x)``; so keeping the edge ``u = U_i[o, h]`` for a set ``P`` of
  block-j neurons with ``v > 0`` and a set ``N`` of block-j neurons with ``v < 0`` gives
  ``(Σ_P u v) σ(x_j) - (Σ_N u v) σ(-x_j)``, which equals ``w x_j`` when both sums equal ``w``. The
  intermediate neurons are shared by all n outputs (each output chooses its own ``u`` edges); a ``V`` edge is kept
  only when some output uses its neuron.

How the neurons are chosen (``method``):

* ``"single"`` (default; Malach's construction): for each target weight and each sign half, the one neuron of
  the block whose product ``u v`` is closest to ``w``, or none when ``|w|`` is closer to 0 than every product.
  The paper's proof asks for a neuron with ``v ≈ 1`` and ``u ≈ w`` separately (an ε-box in the (u, v) plane,
  probability ∝ ε²); only the product ``u v`` enters the function, so choosing by the product is the same
  construction with a tighter choice (probability ∝ ε), and it never does worse than the proof's choice.
* ``"greedy"``: a subset of the block per sign half, chosen greedily (repeatedly add the unused neuron whose
  product brings the running sum closest to ``w``; stop when no neuron improves it). This is a heuristic for the
  subset-sum version of the construction (Pensia et al., NeurIPS 2020), not an exact subset-sum solver.

The result is a ``nn.Sequential`` of ``MaskedLinear`` layers whose frozen weights are the random weights and
whose fixed masks are the construction (scores are 1 on kept weights and 0 elsewhere, density = kept fraction,
nothing requires grad), plus statistics: random and kept weight counts and the error of every realised weight.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn as nn

from .nn import MaskedLinear

__all__ = ["Construction", "construct_subnetwork", "random_network_weights", "target_layers", "random_weight_count",
           "METHODS"]

METHODS = ("single", "greedy")


@dataclass
class Construction:
    """A masked random network of depth 2l built by `construct_subnetwork`, and its statistics."""

    module: nn.Sequential                      # Flatten, then MaskedLinear/ReLU pairs (fixed masks, frozen)
    masks: list[torch.Tensor]                  # bool keep-mask of each random layer, in order
    width: int                                 # k: random intermediate neurons per target input unit
    method: str
    widths: list[int]                          # layer widths of the random network, input first
    random_weights: int                        # weights of the random network (all of them, kept or not)
    kept_weights: int                          # weights the mask keeps
    target_weights: int                        # weights of the target network
    weight_error: list[dict] = field(default_factory=list)  # per target layer: max/mean |ŵ - w| of each sign half
    _sparse: list[torch.Tensor] | None = field(default=None, repr=False)

    def stats(self) -> dict:
        """The counts and per-layer weight errors as plain numbers (JSON-ready)."""
        return {"width": self.width, "method": self.method, "widths": self.widths,
                "random_weights": self.random_weights, "kept_weights": self.kept_weights,
                "kept_fraction": self.kept_weights / self.random_weights, "target_weights": self.target_weights,
                "weight_error": self.weight_error}

    @torch.no_grad()
    def forward_sparse(self, x: torch.Tensor) -> torch.Tensor:
        """The same function as `module(x)`, computed with sparse (CSR) copies of the kept weights W ⊙ M.

        The masks keep a tiny fraction of the random weights, so this is much faster than the dense masked
        forward at large widths; tests check that both agree.
        """
        if self._sparse is None:
            with warnings.catch_warnings():  # "sparse CSR support is in beta"
                warnings.simplefilter("ignore", UserWarning)
                self._sparse = [layer.masked_weight().to_sparse_csr() for layer in self.module
                                if isinstance(layer, MaskedLinear)]
        h = x.flatten(1).t().contiguous()
        for i, w in enumerate(self._sparse):
            h = w @ h
            if i < len(self._sparse) - 1:
                h = torch.relu(h)
        return h.t()


def target_layers(model: nn.Module) -> list[nn.Linear]:
    """The nn.Linear layers of a plain ReLU MLP (such as maskprune.models.create("mlp", ...)), in order.

    Refuses models with other weight layers (the construction covers fully connected ReLU networks).
    """
    layers = []
    for module in model.modules():
        if isinstance(module, nn.Linear):
            layers.append(module)
        elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)):
            raise ValueError(f"the construction covers ReLU MLPs only; found {type(module).__name__}")
    if not layers:
        raise ValueError("model has no nn.Linear layer")
    return layers


def random_weight_count(dims: Sequence[int], width: int) -> int:
    """Weights of the random depth-2l network for a target with layer sizes `dims` (input first) and width k.

    Each target layer d -> n becomes d -> k d -> n: k d² + n k d weights.
    """
    return sum(width * d * d + n * width * d for d, n in zip(dims[:-1], dims[1:]))


def random_network_weights(dims: Sequence[int], width: int, *, scale: float = 1.0,
                           generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """The random weights of the depth-2l network for target layer sizes `dims`: [V_1, U_1, V_2, U_2, ...].

    V_i is (k d_i) x d_i and U_i is d_{i+1} x (k d_i), i.i.d. U[-scale, scale], float32 on the CPU, drawn in that
    order from `generator`: `construct_subnetwork` draws exactly these, so a seed reproduces the same network for
    the construction and for learned masks.
    """
    out = []
    for d, n in zip(dims[:-1], dims[1:]):
        out.append((torch.rand(width * d, d, generator=generator) * 2 - 1).mul_(scale))
        out.append((torch.rand(n, width * d, generator=generator) * 2 - 1).mul_(scale))
    return out


def _check_layers(layers: Sequence[nn.Linear]) -> list[torch.Tensor]:
    if isinstance(layers, nn.Module):
        layers = target_layers(layers)
    layers = list(layers)
    if not layers or not all(isinstance(l, nn.Linear) for l in layers):
        raise TypeError("layers must be a non-empty sequence of nn.Linear (or a ReLU MLP module)")
    for i, (a, b) in enumerate(zip(layers[:-1], layers[1:])):
        if a.out_features != b.in_features:
            raise ValueError(f"layer {i} has {a.out_features} outputs but layer {i + 1} takes {b.in_features} inputs")
    for i, layer in enumerate(layers):
        if layer.bias is not None and bool(layer.bias.detach().ne(0).any()):
            raise ValueError(f"layer {i} has a non-zero bias; the construction (as the paper) covers bias-free "
                             "targets: train the target with bias=False")
    return [layer.weight.detach().to(torch.float32) for layer in layers]


def _layer_scales(scale, weights: list[torch.Tensor]) -> list[float]:
    """Per target layer, the half-width a of the U[-a, a] random weights of its two random layers."""
    if isinstance(scale, str):
        if scale != "matched":
            raise ValueError(f"scale must be a positive number, a list of them, or 'matched'; got {scale!r}")
        return [math.sqrt(float(w.abs().max())) or 1.0 for w in weights]
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        scale = [float(scale)] * len(weights)
    scale = list(scale)
    if len(scale) != len(weights) or not all(isinstance(a, (int, float)) and math.isfinite(a) and a > 0
                                             for a in scale):
        raise ValueError(f"scale must be a positive number, {len(weights)} of them, or 'matched'; got {scale!r}")
    return [float(a) for a in scale]


def _select_single(prod: torch.Tensor, valid: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per (o, j): the one valid candidate r whose product is closest to w, or none if 0 is closer.

    prod: [n, d, k] products u v; valid: [d, k] (candidates of this sign half); w: [n, d]. Returns bool [n, d, k].
    """
    err = (prod - w.unsqueeze(-1)).abs().masked_fill(~valid, math.inf)
    best_err, best = err.min(dim=-1)
    take = best_err < w.abs()
    chosen = torch.zeros_like(prod, dtype=torch.bool)
    chosen.scatter_(-1, best.unsqueeze(-1), take.unsqueeze(-1))
    return chosen


def _select_greedy(prod: torch.Tensor, valid: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per (o, j): greedily grow a subset of valid candidates whose products sum close to w (see module doc)."""
    chosen = torch.zeros_like(prod, dtype=torch.bool)
    residual = w.clone()
    blocked = (~valid).expand_as(prod).clone()
    for _ in range(prod.shape[-1]):
        err = (residual.unsqueeze(-1) - prod).abs().masked_fill(blocked, math.inf)
        best_err, best = err.min(dim=-1)
        take = best_err < residual.abs()
        if not bool(take.any()):
            break
        step = torch.zeros_like(chosen).scatter_(-1, best.unsqueeze(-1), take.unsqueeze(-1))
        chosen |= step
        blocked |= step
        residual = residual - (prod * step).sum(-1)
    return chosen


def _fixed_masked_linear(weight: torch.Tensor, mask: torch.Tensor) -> MaskedLinear:
    """A MaskedLinear holding `weight` (frozen) whose mask is exactly `mask`, with nothing left to learn."""
    out_f, in_f = weight.shape
    kept = int(mask.sum())
    if kept == 0:  # MaskedLinear keeps at least one weight: keep one zero weight instead (same function)
        mask = mask.clone()
        mask.view(-1)[0] = True
        weight = weight.clone()
        weight.view(-1)[0] = 0.0
        kept = 1
    layer = MaskedLinear(in_f, out_f, bias=False, density=kept / mask.numel(), weight_init=None,
                         backend="auto", device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.scores.copy_(mask.to(torch.float32))
    layer.scores.requires_grad_(False)
    return layer


@torch.no_grad()
def construct_subnetwork(layers: Sequence[nn.Linear] | nn.Module, width: int, *, method: str = "single",
                         scale: float | Sequence[float] | str = 1.0, generator: torch.Generator | None = None,
                         device: str | torch.device | None = None, chunk: int = 64) -> Construction:
    """Builds a random depth-2l network and Malach's mask over it so that it approximates the target `layers`.

    layers: the target's nn.Linear layers (bias-free; ReLU between them), or a ReLU MLP module.
    width: k >= 1, random intermediate neurons per target input unit (layer pair i is d -> k d -> n).
    method: "single" (Malach's one neuron per target weight and sign, chosen by the product u v) or "greedy"
        (a greedily chosen subset per target weight and sign); see the module docstring.
    scale: random weights are i.i.d. U[-a, a] with a = scale (the paper: 1), or one a per target layer (a list),
        or "matched": a_i = sqrt(max |W_i|), so that the products u v of layer pair i span exactly the range of
        the target weights [-max |W_i|, max |W_i|] (the paper normalises the target instead: any fixed scale is
        a constant of the construction, and ReLU is positively homogeneous).
    generator: draws the random weights (the same generator state gives the same random network).
    chunk: target output rows processed at once (bounds memory at chunk * d * k floats).

    Random weights are drawn in layer order (V_1, U_1, V_2, U_2, ...), each on the CPU in float32, so a seed gives
    the same network on every device. Returns a `Construction`.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be an int >= 1, got {width!r}")
    weights = _check_layers(layers)
    scales = _layer_scales(scale, weights)
    device = torch.device(device) if device is not None else weights[0].device
    k = width
    select = _select_single if method == "single" else _select_greedy

    modules: list[nn.Module] = [nn.Flatten()]
    masks, errors = [], []
    dims = [weights[0].shape[1]] + [w.shape[0] for w in weights]
    widths = [dims[0]]
    for i, w_target in enumerate(weights):
        n, d = w_target.shape
        w_target = w_target.to(device)
        v_full, u_full = (t.to(device) for t in random_network_weights([d, n], k, scale=scales[i],
                                                                        generator=generator))
        # neuron h = j k + r sits in block j; its only candidate input edge is V[h, j]
        rows = torch.arange(k * d, device=device)
        v = v_full[rows, rows // k].view(d, k)                      # [d, k]
        halves = (v > 0, v < 0)
        mask_u = torch.zeros(n, k * d, dtype=torch.bool, device=device)
        err_stats = {"pos_max": 0.0, "pos_sum": 0.0, "neg_max": 0.0, "neg_sum": 0.0}
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            u = u_full[start:stop].view(stop - start, d, k)         # [c, d, k]
            prod = u * v.unsqueeze(0)                              # u v of every candidate
            w = w_target[start:stop]
            chosen_all = torch.zeros_like(prod, dtype=torch.bool)
            for name, valid in zip(("pos", "neg"), halves):
                chosen = select(prod, valid, w)
                chosen_all |= chosen
                err = ((prod * chosen).sum(-1) - w).abs()
                err_stats[f"{name}_max"] = max(err_stats[f"{name}_max"], float(err.max()))
                err_stats[f"{name}_sum"] += float(err.sum())
            mask_u[start:stop] = chosen_all.view(stop - start, k * d)
        used = mask_u.any(dim=0)                                   # neurons some output uses
        mask_v = torch.zeros(k * d, d, dtype=torch.bool, device=device)
        mask_v[rows, rows // k] = used
        for name in ("pos", "neg"):
            err_stats[f"{name}_mean"] = err_stats.pop(f"{name}_sum") / (n * d)
        err_stats["target_abs_mean"] = float(w_target.abs().mean())
        err_stats["random_scale"] = scales[i]
        errors.append(err_stats)
        masks += [mask_v, mask_u]
        modules += [_fixed_masked_linear(v_full, mask_v), nn.ReLU(),
                    _fixed_masked_linear(u_full, mask_u)]
        if i < len(weights) - 1:
            modules.append(nn.ReLU())
        widths += [k * d, n]

    module = nn.Sequential(*modules)
    for p in module.parameters():
        p.requires_grad_(False)
    return Construction(module=module, masks=masks, width=k, method=method, widths=widths,
                        random_weights=sum(m.numel() for m in masks), kept_weights=sum(int(m.sum()) for m in masks),
                        target_weights=sum(w.numel() for w in weights), weight_error=errors)
