"""Mask policies: the rule that turns a masked layer's scores into its mask, its forward and its gradient.

One module per policy (each docstring states the rule, the gradient, the defaults and the source code read):

    topk        layerwise, global   edge-popup top-k (Ramanujan et al. 2020)
    supermask   supermask           M ~ Bernoulli(σ(S)) per forward (Zhou et al. 2019)
    biprop      biprop              α · sign(W) ⊙ top-k mask (Diffenderfer & Kailkhura 2021)
    signed      signed              ternary sign(S) · top-k mask (Koster et al. 2022)
    iterand     iterand             a top-k policy + periodic redraws of pruned weights (Chijiwa et al. 2021)
    gem_miner   gem_miner           p ∈ [0,1] rounded at 1/2, L2, freezing (Sreenivasan et al. 2022)
    threshold   threshold           M = 1[S > τ] over pretrained weights (Mallya et al. 2018, Zhao et al. 2020)

base.py holds the interface (MaskPolicy) the layers and the trainer call; factory.py make_policy and the
hooks over a model. `ALL_POLICIES` (alias `POLICIES`) lists every name convert(), `maskprune train --policy`
and make_policy accept.
"""
from .base import LayerSetPolicy, MaskPolicy, Option, check_options
from .biprop import Biprop
from .factory import (ALL_POLICIES, POLICY_CLASSES, attach, before_step_hooks, epoch_hooks, finalize_policies,
                      format_options, load_policy_state, make_policy, parse_options, policy_groups, policy_options,
                      policy_penalty, policy_state, step_hooks)
from .gem_miner import GemMiner, subnetwork_for_finetuning
from .iterand import IteRand
from .signed import SignedSupermask
from .supermask import BernoulliSTE, Supermask
from .threshold import FixedThreshold
from .topk import LAYERWISE, GlobalTopK, LayerwiseTopK

# The names convert() and the CLI accept.
POLICIES = ALL_POLICIES

__all__ = ["MaskPolicy", "LayerSetPolicy", "Option", "check_options", "LayerwiseTopK", "GlobalTopK", "LAYERWISE",
           "Supermask", "BernoulliSTE", "Biprop", "SignedSupermask", "IteRand", "GemMiner", "FixedThreshold",
           "subnetwork_for_finetuning", "POLICIES", "ALL_POLICIES", "POLICY_CLASSES", "make_policy",
           "policy_options", "parse_options", "format_options", "policy_groups", "before_step_hooks", "step_hooks",
           "epoch_hooks", "finalize_policies", "policy_penalty", "policy_state", "load_policy_state", "attach"]
