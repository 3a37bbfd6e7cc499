"""The Triton backend: torch.library custom ops over the kernels in maskprune.kernels.

Registered with custom_op + register_fake + register_autograd (not triton_op), which passes opcheck
and torch.compile under the Triton interpreter too (DESIGN §5). Runs on CUDA tensors, and on CPU
tensors when TRITON_INTERPRET=1 (how CI tests it).
"""
from __future__ import annotations

import os

import torch

import triton  # noqa: F401  (ImportError here means: no triton backend)

from . import kernels, ops, reference

_NS = "maskprune_triton::"


def _available(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def _n_keep(scores_list, density: float) -> int:
    return reference.n_keep_for(density, sum(s.numel() for s in scores_list))


@torch.library.custom_op(_NS + "threshold", mutates_args=())
def _threshold(scores: torch.Tensor, density: float, abs_scores: bool) -> torch.Tensor:
    return kernels.threshold(scores, _n_keep([scores], density), abs_scores=abs_scores)


@_threshold.register_fake
def _(scores, density, abs_scores):
    return scores.new_empty(())


@torch.library.custom_op(_NS + "global_threshold", mutates_args=())
def _global_threshold(scores: list[torch.Tensor], density: float, abs_scores: bool) -> torch.Tensor:
    return kernels.global_threshold(scores, _n_keep(scores, density), abs_scores=abs_scores)


@_global_threshold.register_fake
def _(scores, density, abs_scores):
    return scores[0].new_empty(())


@torch.library.custom_op(_NS + "apply_mask", mutates_args=())
def _apply_mask(weight: torch.Tensor, scores: torch.Tensor, t: torch.Tensor, abs_scores: bool) -> torch.Tensor:
    return kernels.apply_mask(weight, scores, t, abs_scores=abs_scores)


@_apply_mask.register_fake
def _(weight, scores, t, abs_scores):
    return weight.new_empty(weight.shape)  # contiguous, as the kernel writes it (empty_like keeps strides)


@torch.library.custom_op(_NS + "score_grad", mutates_args=())
def _score_grad(grad_weight: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor,
                abs_scores: bool) -> torch.Tensor:
    return kernels.score_grad(grad_weight, weight, scores, abs_scores=abs_scores)


@_score_grad.register_fake
def _(grad_weight, weight, scores, abs_scores):
    return scores.new_empty(scores.shape)


ops.register_apply_mask_autograd(_apply_mask, _score_grad)


@torch.library.custom_op(_NS + "masked_linear", mutates_args=())
def _masked_linear(x: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor, t: torch.Tensor,
                   bias: torch.Tensor | None, abs_scores: bool) -> torch.Tensor:
    # A weight of another dtype (fp32 under bf16 autocast) is cast tile by tile inside the kernels.
    x2d = x.reshape(-1, x.shape[-1])
    b = None if bias is None else bias.to(x.dtype)
    y = kernels.masked_linear_forward(x2d, weight, scores, t, b, abs_scores=abs_scores)
    return y.reshape(*x.shape[:-1], weight.shape[0])


@_masked_linear.register_fake
def _(x, weight, scores, t, bias, abs_scores):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op(_NS + "masked_linear_backward", mutates_args=())
def _masked_linear_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor,
                            t: torch.Tensor, abs_scores: bool, need_grad_x: bool,
                            need_grad_scores: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g2d = grad_out.reshape(-1, grad_out.shape[-1]).to(x.dtype)
    x2d = x.reshape(-1, x.shape[-1])
    grad_x = (kernels.masked_linear_grad_input(g2d, weight, scores, t, abs_scores=abs_scores).reshape(x.shape)
              if need_grad_x else x.new_empty((0,)))
    # dS multiplies by W in the weight's own precision, as the reference's autograd does.
    grad_scores = (kernels.masked_linear_grad_scores(g2d, x2d, weight, scores, abs_scores=abs_scores)
                   if need_grad_scores else scores.new_empty((0,)))
    return grad_x, grad_scores


@_masked_linear_backward.register_fake
def _(grad_out, x, weight, scores, t, abs_scores, need_grad_x, need_grad_scores):
    grad_x = x.new_empty(x.shape) if need_grad_x else x.new_empty((0,))
    grad_scores = scores.new_empty(scores.shape) if need_grad_scores else scores.new_empty((0,))
    return grad_x, grad_scores


ops.register_masked_linear_autograd(_masked_linear, _masked_linear_backward)


ops.register_backend(ops.Backend(
    name="triton",
    is_available=_available,
    threshold=lambda s, d, a, hint: _threshold(s, d, a),  # the GPU selection needs no hint
    global_threshold=lambda ss, d, a, hint: _global_threshold(ss, d, a),
    apply_mask=_apply_mask,
    masked_linear=_masked_linear,
))
