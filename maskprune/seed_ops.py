"""Seed mode (docs/design.md §1, issue 18 §3): masked ops whose frozen weight W is regenerated from its key.

A seed-mode layer stores no W. Its key (maskprune.rng.WeightKey: init, scale, seed, layer) is enough: the
mask pass writes W_eff = W ⊙ 1[key >= t] with each W[i] computed from Philox4x32-10 where it would have
been read, and the dS pass dS = sign(S) ⊙ W ⊙ ∂L/∂W_eff regenerates it again. What training keeps per
layer is then the scores, their gradient and the W_eff the GEMM needs for dX (the stored-weight mode keeps
W as well), and every value equals the stored-weight mode's bit for bit (the same float32 products).

Backends, as for the other ops: "cpp" (maskprune._C: seed_apply_mask, seed_score_grad_ and seed_linear_score_grad;
on CPU W is regenerated 256 weights at a time into an L1 buffer by the AVX2 Philox, on CUDA in registers), "triton"
(maskprune.kernels: tl.philox in the elementwise mask and dS passes, and for a linear layer's dS in the epilogue of
the dYᵀX GEMM, one Philox per weight; CUDA tensors, or CPU tensors under TRITON_INTERPRET=1) and "torch" (the
reference: W from maskprune.rng's integer-op generator, then the reference mask rule). "auto" picks cpp where it
runs on the device, else triton on CUDA, else torch.

Forward and dX read W_eff, which the GEMMs need anyway (as in the stored mode, docs/design.md §3); regenerating W
inside the forward GEMM's tile loads instead would run Philox once per weight per row block of X (ceil(M /
BLOCK_M) times) and save no memory, because dX needs W_eff too.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from . import ops, reference, rng

__all__ = ["SEED_POLICIES", "seed_apply_mask", "seed_score_grad", "seed_masked_linear", "seed_masked_weight"]

# The mask policies a seed-mode layer can run: the top-k rules, whose W is fixed for the whole run. (IteRand
# redraws W and the threshold policy masks pretrained weights; the other rules have their own fused passes,
# not yet with a regenerated W.)
SEED_POLICIES = ("layerwise", "global")


def _cpp_has_seed_ops() -> bool:
    """Whether maskprune._C was built with the seed-mode ops (an older build lacks them)."""
    return ops.HAS_CPP and hasattr(torch.ops.maskprune, "seed_linear_score_grad")


if _cpp_has_seed_ops():
    @torch.library.register_fake("maskprune::seed_apply_mask")
    def _(scores, t, abs_scores, init, scale, seed, layer, dtype=None):
        return scores.new_empty(scores.shape, dtype=torch.float32 if dtype is None else dtype)

    @torch.library.register_fake("maskprune::seed_score_grad_")
    def _(grad_weight, scores, abs_scores, init, scale, seed, layer):
        return None

    @torch.library.register_fake("maskprune::seed_linear_score_grad")
    def _(grad_out, x, scores, abs_scores, init, scale, seed, layer):
        return scores.new_empty(scores.shape, dtype=torch.float32)


def _check_key(key) -> rng.WeightKey:
    if not isinstance(key, rng.WeightKey):
        raise TypeError(f"key must be a maskprune.rng.WeightKey, got {type(key).__name__}")
    if key.init not in rng.WEIGHT_INITS:
        raise ValueError(f"key.init must be one of {rng.WEIGHT_INITS}, got {key.init!r}")
    if key.stream != rng.WEIGHT_STREAM or key.generator != rng.GENERATOR:
        raise ValueError(f"key must be a weight key (stream {rng.WEIGHT_STREAM}, generator {rng.GENERATOR!r}), "
                         f"got stream {key.stream}, generator {key.generator!r}")
    return key


def _check_scores_and_t(scores, t) -> torch.Tensor:
    ops._check_tensor(scores, "scores", (torch.float32,))
    if scores.numel() == 0:
        raise ValueError("scores must have at least one element")
    if isinstance(t, (int, float)) and not isinstance(t, bool):
        t = torch.tensor(float(t), dtype=torch.float32, device=scores.device)
    ops._check_tensor(t, "t", ops.FLOAT_DTYPES)
    if t.dim() != 0:
        raise ValueError(f"t must be a 0-d tensor (a threshold), got shape {tuple(t.shape)}")
    ops._check_same_device("t", t, "scores", scores)
    return t.detach().to(torch.float32)


def _backend_for(backend: str, device: torch.device) -> str:
    """The backend that runs: "cpp", "triton" or "torch" (see the module docstring)."""
    ops.check_backend_name(backend)
    cpp = _cpp_has_seed_ops() and ops.backend_runs("cpp", device)
    if backend == "auto":
        if cpp:
            return "cpp"
        return "triton" if device.type == "cuda" and ops.backend_runs("triton", device) else "torch"
    if backend == "cpp" and not cpp:
        why = "" if _cpp_has_seed_ops() else (" (maskprune._C lacks the seed-mode ops: rebuild it with "
                                               "`pip install --no-build-isolation -e .`)")
        raise ValueError(f"backend 'cpp' is not available on {device} for seed mode{why}; use backend='auto', "
                         f"'torch' or 'triton'")
    if backend == "triton" and not ops.backend_runs("triton", device):
        raise ValueError(f"backend 'triton' is not available on {device} (CUDA tensors, or CPU tensors with "
                         f"TRITON_INTERPRET=1)")
    return backend


# ---------------------------------------------------------------------------------------------------------
# The two passes, without autograd
# ---------------------------------------------------------------------------------------------------------

def _mask_pass(scores: torch.Tensor, t: torch.Tensor, key: rng.WeightKey, abs_scores: bool, dtype: torch.dtype,
               backend: str) -> torch.Tensor:
    if backend == "cpp":
        return torch.ops.maskprune.seed_apply_mask(scores, t, abs_scores, key.init, key.scale, key.seed, key.layer,
                                                   dtype)
    if backend == "triton":
        from .kernels import seed_mask
        return seed_mask.seed_apply_mask(scores, t, key, abs_scores, dtype)
    w = key.generate(scores.shape, device=scores.device, backend="reference")
    return reference.apply_mask(w, scores, t, abs_scores).to(dtype)


def _grad_pass_(grad: torch.Tensor, scores: torch.Tensor, key: rng.WeightKey, abs_scores: bool,
                backend: str) -> torch.Tensor:
    """dS written over `grad` (float32, contiguous, the scores' shape); returns it."""
    if backend == "cpp":
        torch.ops.maskprune.seed_score_grad_(grad, scores, abs_scores, key.init, key.scale, key.seed, key.layer)
        return grad
    if backend == "triton":
        from .kernels import seed_mask
        return seed_mask.seed_score_grad_(grad, scores, key, abs_scores)
    w = key.generate(scores.shape, device=scores.device, backend="reference")
    if abs_scores:
        return grad.copy_(torch.sign(scores) * (w * grad))
    return grad.mul_(w)


def seed_masked_weight(scores: torch.Tensor, t: torch.Tensor | float, key: rng.WeightKey, *, abs_scores: bool = True,
                       dtype: torch.dtype = torch.float32, backend: str = "auto") -> torch.Tensor:
    """W ⊙ 1[key >= t] with W regenerated from `key`, without gradient (to_dense, evaluation)."""
    t = _check_scores_and_t(scores, t)
    key = _check_key(key)
    if dtype not in ops.FLOAT_DTYPES:
        raise TypeError(f"dtype must be one of {ops.FLOAT_DTYPES}, got {dtype!r}")
    with torch.no_grad():
        return _mask_pass(scores.detach(), t, key, bool(abs_scores), dtype, _backend_for(backend, scores.device))


def seed_score_grad(grad_weight: torch.Tensor, scores: torch.Tensor, key: rng.WeightKey, *, abs_scores: bool = True,
                    backend: str = "auto") -> torch.Tensor:
    """dS = sign(S) ⊙ W ⊙ grad_weight (W ⊙ grad_weight for raw scores), W regenerated; float32, a new tensor
    unless grad_weight already is a float32 contiguous tensor nobody else holds (then written over it)."""
    ops._check_tensor(grad_weight, "grad_weight", ops.FLOAT_DTYPES)
    ops._check_tensor(scores, "scores", (torch.float32,))
    if grad_weight.shape != scores.shape:
        raise ValueError(f"grad_weight must have the scores' shape {tuple(scores.shape)}, "
                         f"got {tuple(grad_weight.shape)}")
    ops._check_same_device("grad_weight", grad_weight, "scores", scores)
    key = _check_key(key)
    grad = grad_weight.detach().to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    return _grad_pass_(grad, scores.detach().contiguous(), key, bool(abs_scores), _backend_for(backend, scores.device))


# ---------------------------------------------------------------------------------------------------------
# Autograd: W_eff with the straight-through dS (conv), and the whole linear layer
# ---------------------------------------------------------------------------------------------------------

def _grad_in_place(grad_weight: torch.Tensor) -> torch.Tensor:
    """A float32 contiguous buffer holding grad_weight: itself when it already is one (a fresh GEMM output)."""
    if grad_weight.dtype == torch.float32 and grad_weight.is_contiguous():
        return grad_weight
    return grad_weight.to(torch.float32, memory_format=torch.contiguous_format)


class _SeedApplyMask(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, t, key, abs_scores, dtype, backend):
        ctx.save_for_backward(scores)
        ctx.key, ctx.abs_scores, ctx.backend = key, abs_scores, backend
        return _mask_pass(scores.detach(), t, key, abs_scores, dtype, backend)

    @staticmethod
    def backward(ctx, grad):
        (scores,) = ctx.saved_tensors
        grad_scores = None
        if ctx.needs_input_grad[0]:
            # a float32 copy: autograd may hand the same gradient to others, so it is never written over
            g = grad.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
            grad_scores = _grad_pass_(g, scores.detach().contiguous(), ctx.key, ctx.abs_scores, ctx.backend)
        return grad_scores, None, None, None, None, None


class _SeedMaskedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scores, t, bias, key, abs_scores, backend):
        w_eff = _mask_pass(scores.detach(), t, key, abs_scores, x.dtype, backend)
        b = None if bias is None else bias.to(x.dtype)
        ctx.save_for_backward(x, scores, w_eff)
        ctx.key, ctx.abs_scores, ctx.backend = key, abs_scores, backend
        ctx.bias_dtype = None if bias is None else bias.dtype
        return F.linear(x, w_eff, b)

    @staticmethod
    def backward(ctx, grad):
        x, scores, w_eff = ctx.saved_tensors
        need_x, need_scores, _, need_bias = ctx.needs_input_grad[:4]
        g = grad.to(x.dtype)
        grad_x = torch.matmul(g, w_eff) if need_x else None
        grad_scores = None
        if need_scores and ctx.backend == "cpp":  # one op: the weight-gradient GEMM into the CPU buffer cache, dS
            key = ctx.key
            grad_scores = torch.ops.maskprune.seed_linear_score_grad(g, x, scores.detach(), ctx.abs_scores, key.init,
                                                                    key.scale, key.seed, key.layer)
        elif need_scores and ctx.backend == "triton":  # one GEMM whose epilogue regenerates W
            from .kernels import masked_matmul
            out_features, in_features = w_eff.shape
            grad_scores = masked_matmul.seed_linear_grad_scores(g.reshape(-1, out_features),
                                                                x.reshape(-1, in_features), scores.detach(),
                                                                ctx.key, ctx.abs_scores)
        elif need_scores:
            out_features, in_features = w_eff.shape
            grad_weight = g.reshape(-1, out_features).t().mm(x.reshape(-1, in_features))  # a fresh buffer
            grad_scores = _grad_pass_(_grad_in_place(grad_weight), scores.detach().contiguous(), ctx.key,
                                      ctx.abs_scores, ctx.backend)
        grad_bias = g.reshape(-1, g.shape[-1]).sum(0).to(ctx.bias_dtype) if need_bias else None
        return grad_x, grad_scores, None, grad_bias, None, None, None


def seed_apply_mask(scores: torch.Tensor, t: torch.Tensor | float, key: rng.WeightKey, *, abs_scores: bool = True,
                    dtype: torch.dtype = torch.float32, backend: str = "auto") -> torch.Tensor:
    """W_eff = W ⊙ 1[key >= t] in `dtype`, W regenerated from `key`; dS = sign(S) ⊙ W ⊙ g flows to the scores
    (W ⊙ g for raw scores). What ops.apply_mask(W, scores, t) gives over the stored weight W = key.generate()."""
    t = _check_scores_and_t(scores, t)
    key = _check_key(key)
    if dtype not in ops.FLOAT_DTYPES:
        raise TypeError(f"dtype must be one of {ops.FLOAT_DTYPES}, got {dtype!r}")
    return _SeedApplyMask.apply(scores, t, key, bool(abs_scores), dtype, _backend_for(backend, scores.device))


def seed_masked_linear(x: torch.Tensor, scores: torch.Tensor, t: torch.Tensor | float, key: rng.WeightKey,
                       bias: torch.Tensor | None = None, *, abs_scores: bool = True,
                       backend: str = "auto") -> torch.Tensor:
    """Y = X (W ⊙ M)^T (+ b) in x's dtype with W regenerated from `key` (scores of shape (out, in)); gradients
    to x, scores and bias. ops.masked_linear(x, key.generate(), scores, t, bias) bit for bit on CPU."""
    t = _check_scores_and_t(scores, t)
    key = _check_key(key)
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D (out_features, in_features), got shape {tuple(scores.shape)}")
    ops._check_linear_args(x, scores, bias)
    return _SeedMaskedLinear.apply(x, scores, t, bias, key, bool(abs_scores), _backend_for(backend, x.device))
