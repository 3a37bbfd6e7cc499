"""gem_miner: scores in [0, 1] rounded at 1/2, an L2 penalty, and periodic freezing towards the target
density (Sreenivasan et al., "Rare Gems: Finding Lottery Tickets at Initialization", NeurIPS 2022).

Source read: ksreenivasan/pruning_is_enough: utils/conv_type.py (`GetSubnet` for algo "hc"/"hc_iter",
`SubnetConv.forward`), utils/net_utils.py (`prune` with prune_type "BottomK", `get_prune_rate`,
`get_regularization_loss`), configs/hypercube/resnet20/resnet20_target_sparsity_50.yml (defaults).

Rule. Each weight has a score p, kept in [0, 1] by clamping after every optimizer step (`after_step`).
M = 1[p > 1/2] ⊙ flag: `flag` is 0 for frozen weights. Training loss += λ ‖p‖² (their `regularization:
L2`, `lmbda`), applied as its gradient: `before_step` adds 2λp to the scores' gradients after backward (the
same update as the loss term, without its autograd node; the penalty's value is not in the logged loss).
Every `freeze_every` epochs (their `iter_period`; not after the last epoch) the lowest ⌈r · n_active⌉ scores
among the still active weights of all the policy's layers are frozen out, with r = 1 - exp(ln(density) / N),
N = ⌊(epochs - 1) / freeze_every⌋ freezings: after the last one at most `density` of the weights remain active
(their `get_prune_rate`). `finalize` rounds the scores to {0, 1} (their naive rounding).

Gradient. Straight through the rounding: dS = W ⊙ ∂L/∂W_eff (+ 2λp from the penalty, `before_step`). Here the
forward is the fused op with raw keys and t = nextafter(1/2) (S >= t ⇔ S > 1/2). Their flag gates the gradient of
frozen scores to 0; here a frozen score is set to 0 when frozen and reset to 0 after every step instead,
so it never reaches the forward (p = 0 <= 1/2) and the model's scores alone give the mask (best.pt needs
no policy state). The active scores follow exactly their updates.

Defaults: scores U[0, 1] (`score_init` "uniform"; "half" and "keep" also accepted), freeze_every 8 epochs (their
ResNet-20 config), λ = 1e-5. Their code has no single λ: its final configs (configs/final_hc/) set it per target
density, 1.5e-5 at 1.4%, 7e-6 at 5%, 3e-6 at 20%, 0 at 50%, and their ResNet-20 50%-target config 1e-8, which
does nothing at low densities. 1e-5 is the value chosen on validation with the lr on lenet300/MNIST at density
0.1 (97.8% validation accuracy, where 1e-8 reaches 87.7%: README, "Policy results"); λ, more than the target,
sets how many weights end above 1/2, so tune it with the lr. `epochs` (the run's length) sets the freezing schedule;
without it nothing is frozen and the density is whatever the scores learn. The optional fine-tuning of
the found subnetwork's weights is a separate step: `subnetwork_for_finetuning(model)`.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
import torch.nn as nn

from .base import RawThresholdPolicy, choice_option, constant_threshold, fill_scores, float_option, int_option


class GemMiner(RawThresholdPolicy):
    """M = 1[p > 1/2] over clamped scores p ∈ [0, 1]; λ‖p‖²; periodic freezing; final rounding."""

    name = "gem_miner"
    OPTIONS = {
        "epochs": int_option(None, 1, None, "the run's epochs (sets the freezing schedule); None: no freezing",
                             allow_none=True),
        "freeze_every": int_option(8, 1, None, "epochs between two freezings (their iter_period)"),
        "l2": float_option(1e-5, 0.0, 1.0, "λ of the penalty λ‖p‖² (its gradient 2λp added by before_step)"),
        "score_init": choice_option("uniform", ("uniform", "half", "keep"), "initial scores: U[0,1], 0.5, as they are"),
    }

    def __init__(self, layers: Sequence, density: float, **options) -> None:
        super().__init__(layers, density, **options)
        o = self.options
        self.epochs, self.freeze_every, self.l2 = o["epochs"], o["freeze_every"], o["l2"]
        fill_scores(self.layers, o["score_init"])
        with torch.no_grad():
            for layer in self.layers:
                layer.scores.clamp_(0.0, 1.0)
        self.flags = [torch.ones(layer.scores.shape, dtype=torch.bool, device=layer.scores.device)
                      for layer in self.layers]
        self._frozen = [False] * len(self.layers)  # whether a layer's flags hold a 0 (then after_step gates)
        self.freezings = 0

    @property
    def n_freezings(self) -> int:
        """N = ⌊(epochs - 1) / freeze_every⌋ freezings in the run (0 without `epochs`)."""
        return 0 if self.epochs is None else (self.epochs - 1) // self.freeze_every

    @property
    def freeze_rate(self) -> float:
        """r = 1 - exp(ln(density) / N): the fraction of the active weights each freezing removes."""
        n = self.n_freezings
        return 0.0 if n == 0 else 1.0 - math.exp(math.log(self.density) / n)

    def threshold(self, layer) -> torch.Tensor:
        return constant_threshold(layer, 0.5, "_gem_miner_half")

    @torch.no_grad()
    def mask(self, layer) -> torch.Tensor:
        return (layer.scores > 0.5) & self.flags[self.layer_index(layer)]

    @torch.no_grad()
    def before_step(self, layers: Sequence) -> None:
        """Adds the penalty's gradient 2λp to the scores' gradients, in place: one foreach pass, where λ‖p‖² as a
        loss term cost a dot product per layer, an autograd node, a new gradient tensor and autograd's sum."""
        pairs = [(layer.scores.grad, layer.scores) for layer in layers if layer.scores.grad is not None]
        if self.l2 and pairs:
            grads, scores = (list(t) for t in zip(*pairs))
            torch._foreach_add_(grads, scores, alpha=2 * self.l2)

    @torch.no_grad()
    def after_step(self, layers: Sequence, step: int) -> None:
        for layer in layers:
            layer.scores.clamp_(0.0, 1.0)
            index = self.layer_index(layer)
            if self._frozen[index]:  # a pass over the scores only once some of this layer's weights are frozen
                layer.scores.mul_(self.flags[index])

    @torch.no_grad()
    def on_epoch_end(self, layers: Sequence, epoch: int) -> None:
        if self.epochs is None or epoch % self.freeze_every or epoch >= self.epochs:
            return
        self.freeze()

    @torch.no_grad()
    def freeze(self) -> None:
        """Freezes out the lowest ⌈r · n_active⌉ active scores of all the policy's layers (ties at the cut
        all frozen, as their strict `scores > threshold` does)."""
        active = torch.cat([layer.scores.detach()[flag].flatten().double().cpu()
                            for layer, flag in zip(self.layers, self.flags)])
        n_prune = math.ceil(self.freeze_rate * active.numel())
        if n_prune == 0 or active.numel() == 0:
            return
        cut = torch.kthvalue(active.abs(), min(n_prune, active.numel())).values.item()
        for i, (layer, flag) in enumerate(zip(self.layers, self.flags)):
            flag &= layer.scores > cut
            layer.scores.mul_(flag)
            self._frozen[i] = not bool(flag.all())
        self.freezings += 1

    @torch.no_grad()
    def finalize(self, layers: Sequence) -> None:
        """Rounds the scores to {0, 1} (the found subnetwork); the mask does not change."""
        for layer in layers:
            layer.scores.copy_(self.mask(layer).to(layer.scores.dtype))

    def state_dict(self) -> dict:
        return {**super().state_dict(), "flags": [f.cpu().clone() for f in self.flags], "freezings": self.freezings}

    def load_state_dict(self, state: Mapping) -> None:
        super().load_state_dict(state)
        flags = state["flags"]
        if len(flags) != len(self.flags) or any(tuple(a.shape) != tuple(b.shape) for a, b in zip(flags, self.flags)):
            raise ValueError("mask policy 'gem_miner': the saved flags do not fit this policy's layers")
        self.flags = [f.to(device=old.device, dtype=torch.bool) for f, old in zip(flags, self.flags)]
        self._frozen = [not bool(f.all()) for f in self.flags]
        self.freezings = int(state["freezings"])


def subnetwork_for_finetuning(model: nn.Module) -> nn.Module:
    """Gem-Miner's optional last step, kept apart: a plain copy of the found subnetwork (maskprune.to_dense)
    whose kept weights train and whose pruned weights stay 0 (their gradient is zeroed by a hook)."""
    from ..nn import to_dense  # late import: maskprune.nn imports this package

    dense = to_dense(model)
    for module in dense.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            weight = module.weight
            keep = weight.detach() != 0
            weight.requires_grad_(True)
            weight.register_hook(lambda g, keep=keep: g * keep)
    return dense
