"""Triton kernels of maskprune (installed as maskprune.kernels): the mask prepass and plain GEMMs of a masked
linear layer, the dS GEMM with its fused epilogue, radix-select threshold, and the elementwise mask passes.
CUDA tensors, or CPU tensors under TRITON_INTERPRET=1."""
from .elementwise import apply_mask, score_grad
from .masked_matmul import (linear, masked_linear_forward, masked_linear_grad_input, masked_linear_grad_scores,
                            matmul)
from .threshold import global_threshold, threshold

__all__ = [
    "apply_mask",
    "global_threshold",
    "linear",
    "masked_linear_forward",
    "masked_linear_grad_input",
    "masked_linear_grad_scores",
    "matmul",
    "score_grad",
    "threshold",
]
