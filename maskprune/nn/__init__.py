"""Masked layers, their initialisers, and conversion of any nn.Module."""
from .convert import ConvertSummary, MaskedTensor, convert, mask_stats, masked_layers, masked_tensors, to_dense
from .init import SCORE_INITS, WEIGHT_INITS, init_scores, init_weight
from .layers import (WEIGHT_MODES, MaskedConv2d, MaskedLayer, MaskedLinear, SeedMaskedConv2d, SeedMaskedLinear,
                     to_seed_mode)
from .parametrize import WeightMask

__all__ = ["MaskedLinear", "MaskedConv2d", "MaskedLayer", "WeightMask", "convert", "mask_stats", "masked_layers",
           "masked_tensors", "to_dense", "ConvertSummary", "MaskedTensor", "init_weight", "init_scores",
           "WEIGHT_INITS", "SCORE_INITS", "WEIGHT_MODES", "SeedMaskedLinear", "SeedMaskedConv2d", "to_seed_mode"]
