"""Masked layers, their initialisers, and conversion of any nn.Module."""
from .convert import convert, mask_stats, masked_layers, to_dense
from .init import SCORE_INITS, WEIGHT_INITS, init_scores, init_weight
from .layers import MaskedConv2d, MaskedLayer, MaskedLinear

__all__ = ["MaskedLinear", "MaskedConv2d", "MaskedLayer", "convert", "mask_stats", "masked_layers", "to_dense",
           "init_weight", "init_scores", "WEIGHT_INITS", "SCORE_INITS"]
