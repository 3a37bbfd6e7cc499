"""The Triton backend: torch.library custom ops over the kernels in maskprune.kernels.

Registered with custom_op + register_fake + register_autograd (not triton_op), which passes opcheck
and torch.compile under the Triton interpreter too (docs/design.md §5). Runs on CUDA tensors, and on CPU
tensors when TRITON_INTERPRET=1 (how CI tests it).

A masked linear layer builds its mask once per optimizer step (docs/design.md §3): the prepass writes
W_eff = W ⊙ M in the activations' dtype, `MaskCache` keeps it until W, S or t change (the threshold
itself is cached the same way, in maskprune.masks), and forward and dX run the plain GEMM on it; dS
keeps its fused GEMM epilogue.
"""
from __future__ import annotations

import os
import weakref
from dataclasses import dataclass

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


@dataclass
class _Entry:
    refs: tuple  # weak references to the storages of weight, scores and t
    versions: tuple  # their tensors' version counters when W_eff was built
    w_eff: torch.Tensor


class MaskCache:
    """W_eff = W ⊙ 1[key >= t] per (weight, scores, out dtype, abs_scores), valid while weight, scores and t
    are the same storages at the same versions (an optimizer step bumps the scores' version; a new
    threshold is a new tensor). One entry per layer and dtype: a new mask replaces the old one, and an
    entry goes when its scores are freed. Holds weak references only, so it keeps no layer alive.

    Set MASKPRUNE_MASK_CACHE=0 to build the mask on every call (then forward and backward each build it).
    Nothing is cached under torch.inference_mode (inference tensors have no version counter).
    """

    def __init__(self) -> None:
        self._entries: dict = {}
        self.builds = 0  # prepasses run (for tests and benchmarks)

    @staticmethod
    def enabled() -> bool:
        return os.environ.get("MASKPRUNE_MASK_CACHE", "1") != "0"

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, weight: torch.Tensor, scores: torch.Tensor, t: torch.Tensor, abs_scores: bool,
            dtype: torch.dtype) -> torch.Tensor:
        """W_eff in `dtype` (contiguous), from the cache when current, else from one prepass."""
        cacheable = (self.enabled() and not torch.is_inference_mode_enabled()
                     and not any(x.is_inference() for x in (weight, scores, t)))
        if not cacheable:
            self.builds += 1
            return kernels.apply_mask(weight, scores, t, abs_scores=abs_scores, out_dtype=dtype)
        key = (scores.data_ptr(), weight.data_ptr(), tuple(weight.shape), weight.stride(), scores.stride(),
               scores.device, dtype, bool(abs_scores))
        storages = (weight.untyped_storage(), scores.untyped_storage(), t.untyped_storage())
        versions = (weight._version, scores._version, t._version, t.data_ptr())
        entry = self._entries.get(key)
        if (entry is not None and entry.versions == versions
                and all(ref() is storage for ref, storage in zip(entry.refs, storages))):
            return entry.w_eff
        self.builds += 1
        w_eff = kernels.apply_mask(weight, scores, t, abs_scores=abs_scores, out_dtype=dtype)
        entries = self._entries

        def drop(_ref, key=key):  # the scores were freed: so is their mask
            current = entries.get(key)
            if current is not None and current.refs[1] is _ref:
                del entries[key]

        refs = (weakref.ref(storages[0]), weakref.ref(storages[1], drop), weakref.ref(storages[2]))
        entries[key] = _Entry(refs, versions, w_eff)
        return w_eff


MASK_CACHE = MaskCache()


@torch.library.custom_op(_NS + "threshold", mutates_args=())
def _threshold(scores: torch.Tensor, density: float, abs_scores: bool) -> torch.Tensor:
    # NaN when a score is not finite: maskprune.ops checks t on the device, without a host sync.
    return kernels.threshold(scores, _n_keep([scores], density), abs_scores=abs_scores, nan_if_nonfinite=True)


@_threshold.register_fake
def _(scores, density, abs_scores):
    return scores.new_empty(())


@torch.library.custom_op(_NS + "global_threshold", mutates_args=())
def _global_threshold(scores: list[torch.Tensor], density: float, abs_scores: bool) -> torch.Tensor:
    return kernels.global_threshold(scores, _n_keep(scores, density), abs_scores=abs_scores,
                                    nan_if_nonfinite=True)


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
    # W_eff in x's dtype (a float32 weight under bf16 autocast is cast in the prepass), then the plain GEMM.
    x2d = x.reshape(-1, x.shape[-1])
    b = None if bias is None else bias.to(x.dtype)
    w_eff = MASK_CACHE.get(weight, scores, t, abs_scores, x.dtype)
    y = kernels.linear(x2d, w_eff, b)
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
    # dX on the forward's W_eff (from the cache: no second mask pass).
    grad_x = (kernels.matmul(g2d, MASK_CACHE.get(weight, scores, t, abs_scores, x.dtype)).reshape(x.shape)
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
    nan_threshold_if_nonfinite=True,  # kernels.threshold(nan_if_nonfinite=True)
))
