"""maskprune: find accurate subnetworks inside frozen random networks by learning scores."""
__version__ = "0.1.0"

from . import ops
from .nn import MaskedConv2d, MaskedLinear, convert, mask_stats, to_dense
from .ops import apply_mask, global_threshold, masked_linear, threshold

__all__ = ["ops", "threshold", "global_threshold", "apply_mask", "masked_linear", "MaskedLinear", "MaskedConv2d",
           "convert", "mask_stats", "to_dense", "__version__"]
