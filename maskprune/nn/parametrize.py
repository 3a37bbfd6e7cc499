"""WeightMask: the general masking mechanism, a torch.nn.utils.parametrize parametrization.

`convert` masks nn.Linear and nn.Conv2d through the fused MaskedLinear / MaskedConv2d. Every other
weight tensor (Conv1d/Conv3d/ConvTranspose*, Embedding, the projections of nn.MultiheadAttention,
the feed-forward Linears of nn.TransformerEncoderLayer, any custom module's `weight`) is masked by
registering a WeightMask on it:

    torch.nn.utils.parametrize.register_parametrization(module, "weight", WeightMask(...))

Why a parametrization rather than masked subclasses of each module: after registration, *every*
read of `module.weight` returns W ⊙ M, computed by the same op as the fused layers (ops.apply_mask,
whose straight-through gradient reaches the scores). So the module's own forward, any parent that
reads the weight directly (nn.MultiheadAttention reads `out_proj.weight`), and PyTorch's fused
inference fast paths (MultiheadAttention's `_native_multi_head_attention`, TransformerEncoderLayer's
`_transformer_encoder_layer_fwd`, which read `in_proj_weight`, `out_proj.weight`, `linear1.weight`,
... as attributes) all compute with the masked weight, in train and eval mode, with no copy of any
module's forward code and no dependence on how those fast paths decide to run. One class covers any
module, present or future; what it costs is one extra elementwise pass per read of the weight (the
fused MaskedLinear folds the mask into its matmul instead).

A WeightMask quacks like a MaskedLayer (scores, density, abs_scores, backend, mask_policy,
threshold(), mask()), so the mask policies (layer-wise and global top-k), mask_stats and to_dense
treat it exactly like the fused layers.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .layers import MaskedLayer, check_masking_args


class WeightMask(nn.Module, MaskedLayer):
    """Parametrization W -> W ⊙ 1[key(S) >= t]: float32 scores S of the weight's shape, t from the mask policy.

    `shape`, `device` describe the weight it is registered on. density, score_init, abs_scores and
    backend mean what they mean for MaskedLinear. The weight itself stays where parametrize keeps it
    (`module.parametrizations.<name>.original`), frozen; this module holds only the scores.
    """

    def __init__(self, shape: torch.Size | tuple, *, density: float = 0.5, score_init: str = "kaiming_uniform",
                 abs_scores: bool = True, backend: str = "auto", device=None) -> None:
        super().__init__()
        check_masking_args(density=density, weight_init=None, score_init=score_init, backend=backend)
        self._init_mask_state(tuple(shape), device, density=density, score_init=score_init,
                              abs_scores=abs_scores, backend=backend)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.mask_policy.effective_weight(self, weight)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.scores.shape)}, {self._masking_repr()}"


def weight_masks(module: nn.Module) -> dict[str, WeightMask]:
    """{tensor name: its WeightMask} for the tensors of `module` itself (not its children) that carry one."""
    found = {}
    parametrizations = getattr(module, "parametrizations", None)
    if isinstance(parametrizations, nn.ModuleDict):
        for tensor_name, plist in parametrizations.items():
            for p in plist:
                if isinstance(p, WeightMask):
                    found[tensor_name] = p
    return found
