"""Masked linear GEMMs (DESIGN §3): the mask 1[key >= t] is formed from W and S tiles in registers.

forward     Y^T  = (W ⊙ M) X^T          tiles over (N, M), reduction over K
grad_input  dX^T = (W ⊙ M)^T dY^T       tiles over (K, M), reduction over N
grad_scores dS   = sign(S) ⊙ W ⊙ (dY^T X)  tiles over (N, K), reduction over M; sign(S) ⊙ W in the epilogue

The masked weight is always the left operand: Hopper's wgmma reads only the left operand from
registers, so the masked tile goes straight from registers to the tensor cores and W ⊙ M is never
written to memory. Every stride is passed explicitly (grad_out from `.sum().backward()` has stride 0).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import (FLOAT_DTYPES, HALF_DTYPES, INTERPRET, SCORE_DTYPES, check_devices, check_tensor,
                     check_threshold, dtype_name, keep_mask, sign_of)


def _gemm_configs():
    """Tiles (BLOCK_R rows of the left operand, BLOCK_C columns of the right one, BLOCK_K reduction)."""
    if INTERPRET:  # one config: autotune cannot benchmark without a GPU; small tiles keep numpy fast
        return [triton.Config({"BLOCK_R": 64, "BLOCK_C": 32, "BLOCK_K": 64, "GROUP_R": 4}, num_warps=4)]
    return [
        triton.Config({"BLOCK_R": 128, "BLOCK_C": 256, "BLOCK_K": 64, "GROUP_R": 8}, num_stages=3, num_warps=8),
        triton.Config({"BLOCK_R": 128, "BLOCK_C": 128, "BLOCK_K": 64, "GROUP_R": 8}, num_stages=4, num_warps=8),
        triton.Config({"BLOCK_R": 128, "BLOCK_C": 128, "BLOCK_K": 32, "GROUP_R": 8}, num_stages=4, num_warps=4),
        triton.Config({"BLOCK_R": 128, "BLOCK_C": 64, "BLOCK_K": 64, "GROUP_R": 8}, num_stages=4, num_warps=4),
        triton.Config({"BLOCK_R": 64, "BLOCK_C": 128, "BLOCK_K": 64, "GROUP_R": 8}, num_stages=4, num_warps=4),
        triton.Config({"BLOCK_R": 128, "BLOCK_C": 32, "BLOCK_K": 64, "GROUP_R": 8}, num_stages=4, num_warps=4),
        triton.Config({"BLOCK_R": 64, "BLOCK_C": 64, "BLOCK_K": 64, "GROUP_R": 8}, num_stages=3, num_warps=4),
        triton.Config({"BLOCK_R": 64, "BLOCK_C": 32, "BLOCK_K": 32, "GROUP_R": 8}, num_stages=4, num_warps=4),
        triton.Config({"BLOCK_R": 64, "BLOCK_C": 16, "BLOCK_K": 64, "GROUP_R": 8}, num_stages=4, num_warps=4),
    ]


@triton.jit
def _tile_ids(pid, rows, cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, GROUP_R: tl.constexpr):
    """Grouped tile order (as tutorial 03) so that neighbouring programs share left-operand rows in L2."""
    num_r = tl.cdiv(rows, BLOCK_R)
    num_c = tl.cdiv(cols, BLOCK_C)
    in_group = GROUP_R * num_c
    first_r = (pid // in_group) * GROUP_R
    group_r = min(num_r - first_r, GROUP_R)
    pid_r = first_r + ((pid % in_group) % group_r)
    pid_c = (pid % in_group) // group_r
    return pid_r, pid_c


@triton.autotune(configs=_gemm_configs(), key=["M", "N", "K"])
@triton.jit
def _masked_linear_fwd_kernel(
    x_ptr, w_ptr, s_ptr, t_ptr, b_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sk, stride_b, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, ABS_SCORES: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_R: tl.constexpr,
):
    """One [BLOCK_R (n), BLOCK_C (m)] tile of Y^T = (W ⊙ M) X^T (+ b), stored transposed into Y."""
    pid_n, pid_m = _tile_ids(tl.program_id(0), N, M, BLOCK_R, BLOCK_C, GROUP_R)
    offs_n = pid_n * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_m = pid_m * BLOCK_C + tl.arange(0, BLOCK_C)
    # Out-of-range rows/columns wrap (loads stay in bounds, the store drops them); int64 for big tensors.
    rn = (offs_n % N).to(tl.int64)
    rm = (offs_m % M).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rn[:, None] * stride_wn + offs_k[None, :] * stride_wk
    s_ptrs = s_ptr + rn[:, None] * stride_sn + offs_k[None, :] * stride_sk
    xt_ptrs = x_ptr + offs_k[:, None] * stride_xk + rm[None, :] * stride_xm
    t = tl.load(t_ptr)

    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC_DTYPE)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        w = tl.load(w_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        s = tl.load(s_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        xt = tl.load(xt_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        w = w.to(x_ptr.dtype.element_ty)  # the reference rounds W ⊙ M to x's dtype too
        if UPCAST:  # the interpreter computes on raw bf16 bits
            w = w.to(tl.float32)
            xt = xt.to(tl.float32)
        w = tl.where(keep_mask(s, t, ABS_SCORES), w, tl.zeros_like(w))
        acc = tl.dot(w, xt, acc, input_precision=INPUT_PRECISION)
        w_ptrs += BLOCK_K * stride_wk
        s_ptrs += BLOCK_K * stride_sk
        xt_ptrs += BLOCK_K * stride_xk

    if HAS_BIAS:
        bias = tl.load(b_ptr + rn * stride_b).to(ACC_DTYPE)
        acc += bias[:, None]
    y_ptrs = y_ptr + offs_m[None, :].to(tl.int64) * stride_ym + offs_n[:, None].to(tl.int64) * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(offs_n[:, None] < N) & (offs_m[None, :] < M))


@triton.autotune(configs=_gemm_configs(), key=["M", "N", "K"])
@triton.jit
def _masked_linear_grad_input_kernel(
    g_ptr, w_ptr, s_ptr, t_ptr, dx_ptr,
    M, N, K,
    stride_gm, stride_gn, stride_wn, stride_wk, stride_sn, stride_sk, stride_dxm, stride_dxk,
    ABS_SCORES: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_R: tl.constexpr,
):
    """One [BLOCK_R (k), BLOCK_C (m)] tile of dX^T = (W ⊙ M)^T dY^T; BLOCK_K runs over N."""
    pid_k, pid_m = _tile_ids(tl.program_id(0), K, M, BLOCK_R, BLOCK_C, GROUP_R)
    offs_k = pid_k * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_m = pid_m * BLOCK_C + tl.arange(0, BLOCK_C)
    rk = (offs_k % K).to(tl.int64)
    rm = (offs_m % M).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_K)
    wt_ptrs = w_ptr + rk[:, None] * stride_wk + offs_n[None, :] * stride_wn
    st_ptrs = s_ptr + rk[:, None] * stride_sk + offs_n[None, :] * stride_sn
    gt_ptrs = g_ptr + offs_n[:, None] * stride_gn + rm[None, :] * stride_gm
    t = tl.load(t_ptr)

    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC_DTYPE)
    for n in range(0, tl.cdiv(N, BLOCK_K)):
        n_left = N - n * BLOCK_K
        wt = tl.load(wt_ptrs, mask=offs_n[None, :] < n_left, other=0.0)
        st = tl.load(st_ptrs, mask=offs_n[None, :] < n_left, other=0.0)
        gt = tl.load(gt_ptrs, mask=offs_n[:, None] < n_left, other=0.0)
        wt = wt.to(g_ptr.dtype.element_ty)
        if UPCAST:
            wt = wt.to(tl.float32)
            gt = gt.to(tl.float32)
        wt = tl.where(keep_mask(st, t, ABS_SCORES), wt, tl.zeros_like(wt))
        acc = tl.dot(wt, gt, acc, input_precision=INPUT_PRECISION)
        wt_ptrs += BLOCK_K * stride_wn
        st_ptrs += BLOCK_K * stride_sn
        gt_ptrs += BLOCK_K * stride_gn

    dx_ptrs = dx_ptr + offs_m[None, :].to(tl.int64) * stride_dxm + offs_k[:, None].to(tl.int64) * stride_dxk
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=(offs_k[:, None] < K) & (offs_m[None, :] < M))


@triton.autotune(configs=_gemm_configs(), key=["M", "N", "K"])
@triton.jit
def _masked_linear_grad_scores_kernel(
    g_ptr, x_ptr, w_ptr, s_ptr, ds_ptr,
    M, N, K,
    stride_gm, stride_gn, stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sk,
    stride_dsn, stride_dsk,
    ABS_SCORES: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_R: tl.constexpr,
):
    """One [BLOCK_R (n), BLOCK_C (k)] tile of dY^T X (BLOCK_K runs over M), times sign(S) ⊙ W, into dS."""
    pid_n, pid_k = _tile_ids(tl.program_id(0), N, K, BLOCK_R, BLOCK_C, GROUP_R)
    offs_n = pid_n * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = pid_k * BLOCK_C + tl.arange(0, BLOCK_C)
    rn = (offs_n % N).to(tl.int64)
    rk = (offs_k % K).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_K)
    gt_ptrs = g_ptr + rn[:, None] * stride_gn + offs_m[None, :] * stride_gm
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + rk[None, :] * stride_xk

    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC_DTYPE)
    for m in range(0, tl.cdiv(M, BLOCK_K)):
        m_left = M - m * BLOCK_K
        gt = tl.load(gt_ptrs, mask=offs_m[None, :] < m_left, other=0.0)
        x = tl.load(x_ptrs, mask=offs_m[:, None] < m_left, other=0.0)
        if UPCAST:
            gt = gt.to(tl.float32)
            x = x.to(tl.float32)
        acc = tl.dot(gt, x, acc, input_precision=INPUT_PRECISION)
        gt_ptrs += BLOCK_K * stride_gm
        x_ptrs += BLOCK_K * stride_xm

    # Epilogue: the straight-through gradient reaches S through |S| (sign) and W ⊙ M (times W).
    in_range = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    w = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :] * stride_wk)
    if w_ptr.dtype.element_ty != tl.float64:
        w = w.to(tl.float32)  # bf16 goes through fp32 (the interpreter cannot convert raw bf16 bits)
    grad = acc * w.to(ACC_DTYPE)
    if ABS_SCORES:
        s = tl.load(s_ptr + rn[:, None] * stride_sn + rk[None, :] * stride_sk)
        grad = grad * sign_of(s.to(ACC_DTYPE))
    ds_ptrs = ds_ptr + offs_n[:, None].to(tl.int64) * stride_dsn + offs_k[None, :].to(tl.int64) * stride_dsk
    tl.store(ds_ptrs, grad.to(ds_ptr.dtype.element_ty), mask=in_range)


def _check_weight_scores(weight, scores) -> None:
    check_tensor("weight", weight, FLOAT_DTYPES, ndim=2)
    check_tensor("scores", scores, SCORE_DTYPES, ndim=2)
    if scores.shape != weight.shape:
        raise ValueError(f"scores must have weight's shape {tuple(weight.shape)}, got {tuple(scores.shape)}")


def _gemm_flags(compute_dtype: torch.dtype, allow_tf32: bool) -> dict:
    """Constexprs shared by the three kernels for operands of `compute_dtype`."""
    return dict(
        INPUT_PRECISION="tf32" if (allow_tf32 and compute_dtype == torch.float32) else "ieee",
        UPCAST=INTERPRET and compute_dtype in HALF_DTYPES,
        ACC_DTYPE=tl.float64 if compute_dtype == torch.float64 else tl.float32,
    )


def _grid(rows: int, cols: int):
    return lambda META: (triton.cdiv(rows, META["BLOCK_R"]) * triton.cdiv(cols, META["BLOCK_C"]),)


def masked_linear_forward(x: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor, t: torch.Tensor,
                          bias: torch.Tensor | None = None, abs_scores: bool = True,
                          allow_tf32: bool = False) -> torch.Tensor:
    """Y = X (W ⊙ M)^T (+ bias) in x's dtype, M = 1[key >= t]; x [M, K], weight and scores [N, K]."""
    check_tensor("x", x, FLOAT_DTYPES, ndim=2)
    _check_weight_scores(weight, scores)
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[1]} features (shape {tuple(x.shape)}) but weight expects "
                         f"{weight.shape[1]} (shape {tuple(weight.shape)})")
    check_threshold(t, scores)
    if bias is not None:
        check_tensor("bias", bias, FLOAT_DTYPES, ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    check_devices(x=x, weight=weight, scores=scores, t=t, bias=bias)

    M, K = x.shape
    N = weight.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    _masked_linear_fwd_kernel[_grid(N, M)](
        x, weight, scores, t, bias if bias is not None else y, y,
        M, N, K,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), scores.stride(0), scores.stride(1),
        bias.stride(0) if bias is not None else 0, y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, ABS_SCORES=bool(abs_scores), **_gemm_flags(x.dtype, allow_tf32),
    )
    return y


def masked_linear_grad_input(grad_out: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor,
                             t: torch.Tensor, abs_scores: bool = True, allow_tf32: bool = False) -> torch.Tensor:
    """dX = dY (W ⊙ M) in grad_out's dtype; grad_out [M, N], weight and scores [N, K]."""
    check_tensor("grad_out", grad_out, FLOAT_DTYPES, ndim=2)
    _check_weight_scores(weight, scores)
    if grad_out.shape[1] != weight.shape[0]:
        raise ValueError(f"grad_out has {grad_out.shape[1]} columns (shape {tuple(grad_out.shape)}) but "
                         f"weight has {weight.shape[0]} rows (shape {tuple(weight.shape)})")
    check_threshold(t, scores)
    check_devices(grad_out=grad_out, weight=weight, scores=scores, t=t)

    M, N = grad_out.shape
    K = weight.shape[1]
    grad_x = torch.empty((M, K), dtype=grad_out.dtype, device=grad_out.device)
    if grad_x.numel() == 0:
        return grad_x
    _masked_linear_grad_input_kernel[_grid(K, M)](
        grad_out, weight, scores, t, grad_x,
        M, N, K,
        grad_out.stride(0), grad_out.stride(1), weight.stride(0), weight.stride(1),
        scores.stride(0), scores.stride(1), grad_x.stride(0), grad_x.stride(1),
        ABS_SCORES=bool(abs_scores), **_gemm_flags(grad_out.dtype, allow_tf32),
    )
    return grad_x


def masked_linear_grad_scores(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                              scores: torch.Tensor, abs_scores: bool = True,
                              allow_tf32: bool = False) -> torch.Tensor:
    """dS = sign(S) ⊙ W ⊙ (dY^T X) (W ⊙ (dY^T X) with raw scores) in scores' dtype: one GEMM, fused epilogue."""
    check_tensor("grad_out", grad_out, FLOAT_DTYPES, ndim=2)
    check_tensor("x", x, FLOAT_DTYPES, ndim=2)
    _check_weight_scores(weight, scores)
    if grad_out.dtype != x.dtype:
        raise TypeError(f"grad_out has dtype {dtype_name(grad_out.dtype)}; accepted: x's dtype "
                        f"({dtype_name(x.dtype)})")
    if grad_out.shape[0] != x.shape[0]:
        raise ValueError(f"grad_out and x must have the same number of rows, got {tuple(grad_out.shape)} "
                         f"and {tuple(x.shape)}")
    if (grad_out.shape[1], x.shape[1]) != tuple(weight.shape):
        raise ValueError(f"grad_out [M, N] and x [M, K] must match weight [N, K] = {tuple(weight.shape)}, "
                         f"got grad_out {tuple(grad_out.shape)} and x {tuple(x.shape)}")
    check_devices(grad_out=grad_out, x=x, weight=weight, scores=scores)

    M, K = x.shape
    N = weight.shape[0]
    grad_scores = torch.empty((N, K), dtype=scores.dtype, device=scores.device)
    if grad_scores.numel() == 0:
        return grad_scores
    if M == 0:
        return grad_scores.zero_()
    _masked_linear_grad_scores_kernel[_grid(N, K)](
        grad_out, x, weight, scores, grad_scores,
        M, N, K,
        grad_out.stride(0), grad_out.stride(1), x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
        scores.stride(0), scores.stride(1), grad_scores.stride(0), grad_scores.stride(1),
        ABS_SCORES=bool(abs_scores), **_gemm_flags(x.dtype, allow_tf32),
    )
    return grad_scores
