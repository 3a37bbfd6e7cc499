"""Triton kernels of maskprune (installed as maskprune.kernels): fused masked GEMMs, radix-select threshold,
and the elementwise mask passes of conv layers. CUDA tensors, or CPU tensors under TRITON_INTERPRET=1."""
from .elementwise import apply_mask, score_grad
from .masked_matmul import masked_linear_forward, masked_linear_grad_input, masked_linear_grad_scores
from .threshold import global_threshold, threshold

__all__ = [
    "apply_mask",
    "global_threshold",
    "masked_linear_forward",
    "masked_linear_grad_input",
    "masked_linear_grad_scores",
    "score_grad",
    "threshold",
]
