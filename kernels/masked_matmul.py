"""Masked linear GEMMs (docs/design.md §3): the mask is built once, the GEMMs stay plain.

prepass     W_eff = W ⊙ 1[key >= t]  in the activations' dtype       elementwise.apply_mask (~8 B/weight)
forward     Y  = X W_eff^T (+ bias)                                   _matmul_kernel
grad_input  dX = dY W_eff                                             _matmul_kernel
grad_scores dS = sign(S) ⊙ W ⊙ (dY^T X)  (W ⊙ (dY^T X) with raw scores) _grad_scores_kernel, fused epilogue

Why not mask inside the GEMM main loop (as the first version did): streaming the float32 score tile
(4 B/element) beside the weight tile makes ptxas serialise Hopper's wgmma instructions (warning C7515
in every config) and doubles the shared memory of a stage, which rules out the large tiles. Built once
per optimizer step (maskprune.triton_ops caches W_eff until W, S or t change), the mask costs one
elementwise pass, and forward and dX run the plain pipelined GEMM of Triton's matmul tutorial. dS
keeps its fused epilogue (sign(S) ⊙ W applied in sub-tiles, so that the W and S tiles never sit in
registers beside the whole accumulator), and small layers with many rows split the reduction over
rows (split-M, deterministic: fixed-order partial sums) so that they fill the GPU.

Autotuning: configs whose pipelined tiles would not fit the device's shared memory are pruned before
benchmarking (`prune_configs_by`), and the batch dimension enters the autotune key rounded up to a power
of two, so a new batch size does not re-run the benchmark. Every stride is passed explicitly
(grad_out from `.sum().backward()` has stride 0). scripts/check_ptxas.py compiles every config ahead of
time for sm_80 and sm_90 and checks registers, spills, shared memory and wgmma serialisation.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import (FLOAT_DTYPES, HALF_DTYPES, INTERPRET, SCORE_DTYPES, bucket, check_devices, check_tensor,
                     check_threshold, device_guard, dtype_name, shared_memory_limit, sign_of)
from .elementwise import apply_mask


def _config(r: int, c: int, k: int, stages: int, warps: int, **extra) -> triton.Config:
    return triton.Config({"BLOCK_R": r, "BLOCK_C": c, "BLOCK_K": k, "GROUP_R": 8, **extra},
                         num_stages=stages, num_warps=warps)


def gemm_configs(interpret: bool = INTERPRET) -> list:
    """Tiles of the plain GEMM (BLOCK_R rows of C, BLOCK_C columns, BLOCK_K reduction), tutorial 03's set."""
    if interpret:  # one config: autotune cannot benchmark without a GPU; small tiles keep numpy fast
        return [triton.Config({"BLOCK_R": 32, "BLOCK_C": 64, "BLOCK_K": 32, "GROUP_R": 4}, num_warps=4)]
    return [
        _config(128, 256, 64, 3, 8),
        _config(128, 128, 64, 4, 8),
        _config(64, 256, 32, 4, 4),
        _config(128, 128, 32, 4, 4),
        _config(128, 64, 32, 4, 4),
        _config(64, 128, 32, 4, 4),
        _config(128, 32, 32, 4, 4),
        _config(64, 32, 32, 5, 2),
        _config(32, 64, 32, 5, 4),
    ]


def grad_scores_configs(interpret: bool = INTERPRET) -> list:
    """Tiles of the dS GEMM. EPI_SUB: the epilogue applies sign(S) ⊙ W in that many column slices of
    the tile. 128x256 tiles are left out: their fp32 accumulator alone takes 128 registers per thread,
    and the W and S tiles of the epilogue then spill even when sliced (see the compile table)."""
    if interpret:
        return [triton.Config({"BLOCK_R": 32, "BLOCK_C": 64, "BLOCK_K": 32, "GROUP_R": 4, "EPI_SUB": 2},
                              num_warps=4)]
    return [
        _config(128, 128, 64, 3, 8, EPI_SUB=2),
        _config(128, 128, 32, 4, 8, EPI_SUB=2),
        _config(128, 64, 64, 4, 4, EPI_SUB=2),
        _config(64, 128, 64, 4, 4, EPI_SUB=2),
        _config(128, 64, 32, 4, 4, EPI_SUB=1),
        _config(64, 64, 64, 4, 4, EPI_SUB=1),
        _config(64, 64, 32, 4, 2, EPI_SUB=1),
        _config(64, 32, 64, 4, 2, EPI_SUB=1),
    ]


def shared_memory_estimate(config: triton.Config, left_bytes: int, right_bytes: int) -> int:
    """Bytes of shared memory the pipelined loads of a config need: num_stages buffers of a
    [BLOCK_R, BLOCK_K] left and a [BLOCK_K, BLOCK_C] right tile (an upper bound of what Triton
    allocates; the compile check verifies it against the compiled kernels)."""
    kw = config.kwargs
    per_stage = kw["BLOCK_R"] * kw["BLOCK_K"] * left_bytes + kw["BLOCK_K"] * kw["BLOCK_C"] * right_bytes
    return config.num_stages * per_stage


def spills_with_fp32(config: triton.Config) -> bool:
    """Whether a config spills registers with 4-byte (float32/TF32) operands: at 4 warps, a BLOCK_K x 256
    (or 64 x 128) operand tile does on sm_90 (64x256x32 GEMM: 280 B, 128x64x64 dS: 168 B; compile table)."""
    kw = config.kwargs
    return config.num_warps <= 4 and kw["BLOCK_K"] * max(kw["BLOCK_R"], kw["BLOCK_C"]) >= 8192


def fitting_configs(configs: list, left_bytes: int, right_bytes: int, limit: int) -> list:
    """The configs whose shared-memory estimate fits `limit` bytes (and, with 4-byte operands, that do not
    spill); the smallest config if none does."""
    kept = [c for c in configs if shared_memory_estimate(c, left_bytes, right_bytes) <= limit
            and not (max(left_bytes, right_bytes) >= 4 and spills_with_fp32(c))]
    return kept or [min(configs, key=lambda c: shared_memory_estimate(c, left_bytes, right_bytes))]


def _prune(left: str, right: str):
    """early_config_prune for an autotuned kernel whose GEMM operands are the arguments `left`, `right`."""
    def prune(configs, named_args, **kwargs):
        a, b = named_args[left], named_args[right]
        return fitting_configs(configs, a.element_size(), b.element_size(), shared_memory_limit(a.device))
    return prune


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


@triton.autotune(configs=gemm_configs(), key=["M_BUCKET", "N", "K"],
                 prune_configs_by={"early_config_prune": _prune("a_ptr", "b_ptr")})
@triton.jit(do_not_specialize=["M_BUCKET"])
def _matmul_kernel(
    a_ptr, b_ptr, bias_ptr, c_ptr,
    M, N, K, M_BUCKET,
    stride_am, stride_ak, stride_bk, stride_bn, stride_bias, stride_cm, stride_cn,
    HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_R: tl.constexpr,
):
    """One [BLOCK_R (m), BLOCK_C (n)] tile of C = A B (+ bias[n]); A [M, K], B [K, N], C [M, N]."""
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BLOCK_R, BLOCK_C, GROUP_R)
    offs_m = pid_m * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_n = pid_n * BLOCK_C + tl.arange(0, BLOCK_C)
    # Out-of-range rows/columns wrap (loads stay in bounds, the store drops them); int64 for big tensors.
    rm = (offs_m % M).to(tl.int64)
    rn = (offs_n % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + rn[None, :] * stride_bn

    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC_DTYPE)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        if UPCAST:  # the interpreter computes on raw bf16 bits
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    if HAS_BIAS:
        bias = tl.load(bias_ptr + rn * stride_bias)
        if bias_ptr.dtype.element_ty != tl.float64:
            bias = bias.to(tl.float32)
        acc += bias.to(ACC_DTYPE)[None, :]
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :].to(tl.int64) * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _score_grad_tile(g, offs_n, offs_k, N, K, w_ptr, s_ptr, ds_ptr, stride_wn, stride_wk, stride_sn, stride_sk,
                     stride_dsn, stride_dsk, ABS_SCORES: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """dS = sign(S) ⊙ W ⊙ g (W ⊙ g with raw scores) for one tile (or slice) g of dY^T X, stored in dS's dtype."""
    in_range = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    rn = (offs_n % N).to(tl.int64)
    rk = (offs_k % K).to(tl.int64)
    w = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :] * stride_wk)
    if w_ptr.dtype.element_ty != tl.float64:
        w = w.to(tl.float32)  # bf16 goes through fp32 (the interpreter cannot convert raw bf16 bits)
    grad = g * w.to(ACC_DTYPE)
    if ABS_SCORES:
        s = tl.load(s_ptr + rn[:, None] * stride_sn + rk[None, :] * stride_sk)
        grad = grad * sign_of(s.to(ACC_DTYPE))
    ds_ptrs = ds_ptr + offs_n[:, None].to(tl.int64) * stride_dsn + offs_k[None, :].to(tl.int64) * stride_dsk
    tl.store(ds_ptrs, grad.to(ds_ptr.dtype.element_ty), mask=in_range)


@triton.autotune(configs=grad_scores_configs(), key=["M_BUCKET", "N", "K", "SPLIT_M"],
                 prune_configs_by={"early_config_prune": _prune("g_ptr", "x_ptr")})
@triton.jit(do_not_specialize=["M_BUCKET"])
def _grad_scores_kernel(
    g_ptr, x_ptr, w_ptr, s_ptr, ds_ptr, part_ptr,
    M, N, K, M_BUCKET, SPLIT_M, stride_part,
    stride_gm, stride_gn, stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sk,
    stride_dsn, stride_dsk,
    ABS_SCORES: tl.constexpr, PARTIAL: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_R: tl.constexpr,
    EPI_SUB: tl.constexpr,
):
    """One [BLOCK_R (n), BLOCK_C (k)] tile of dY^T X over the rows of split program_id(1) (BLOCK_K runs
    over M). PARTIAL: store the partial sum into part[split, n, k] (ACC_DTYPE, stride_part = N * K) for
    _grad_scores_reduce_kernel; else multiply by sign(S) ⊙ W in EPI_SUB column slices and store dS."""
    pid_n, pid_k = _tile_ids(tl.program_id(0), N, K, BLOCK_R, BLOCK_C, GROUP_R)
    split = tl.program_id(1)
    offs_n = pid_n * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = pid_k * BLOCK_C + tl.arange(0, BLOCK_C)
    rn = (offs_n % N).to(tl.int64)
    rk = (offs_k % K).to(tl.int64)
    # Rows [m_begin, m_end) of this split, whole BLOCK_K chunks (the last split takes the remainder).
    chunk = tl.cdiv(tl.cdiv(M, SPLIT_M), BLOCK_K) * BLOCK_K
    m_begin = split * chunk
    m_end = min(M, m_begin + chunk)
    offs_m = m_begin + tl.arange(0, BLOCK_K)
    gt_ptrs = g_ptr + rn[:, None] * stride_gn + offs_m[None, :].to(tl.int64) * stride_gm
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + rk[None, :] * stride_xk

    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC_DTYPE)
    for m in range(0, tl.cdiv(m_end - m_begin, BLOCK_K)):
        m_left = m_end - m_begin - m * BLOCK_K
        gt = tl.load(gt_ptrs, mask=tl.arange(0, BLOCK_K)[None, :] < m_left, other=0.0)
        x = tl.load(x_ptrs, mask=tl.arange(0, BLOCK_K)[:, None] < m_left, other=0.0)
        if UPCAST:
            gt = gt.to(tl.float32)
            x = x.to(tl.float32)
        acc = tl.dot(gt, x, acc, input_precision=INPUT_PRECISION)
        gt_ptrs += BLOCK_K * stride_gm
        x_ptrs += BLOCK_K * stride_xm

    if PARTIAL:
        part_ptrs = part_ptr + split * stride_part + offs_n[:, None].to(tl.int64) * K + offs_k[None, :].to(tl.int64)
        tl.store(part_ptrs, acc, mask=(offs_n[:, None] < N) & (offs_k[None, :] < K))
    elif EPI_SUB == 1:
        _score_grad_tile(acc, offs_n, offs_k, N, K, w_ptr, s_ptr, ds_ptr, stride_wn, stride_wk, stride_sn,
                         stride_sk, stride_dsn, stride_dsk, ABS_SCORES, ACC_DTYPE)
    else:
        # Two column halves: the W and S tiles of each half are loaded after the other half is stored,
        # so they never sit in registers beside the whole accumulator (which spilled at 128x128).
        left, right = tl.split(tl.permute(tl.reshape(acc, (BLOCK_R, 2, BLOCK_C // 2)), (0, 2, 1)))
        offs_h = pid_k * BLOCK_C + tl.arange(0, BLOCK_C // 2)
        _score_grad_tile(left, offs_n, offs_h, N, K, w_ptr, s_ptr, ds_ptr, stride_wn, stride_wk, stride_sn,
                         stride_sk, stride_dsn, stride_dsk, ABS_SCORES, ACC_DTYPE)
        _score_grad_tile(right, offs_n, offs_h + BLOCK_C // 2, N, K, w_ptr, s_ptr, ds_ptr, stride_wn,
                         stride_wk, stride_sn, stride_sk, stride_dsn, stride_dsk, ABS_SCORES, ACC_DTYPE)


@triton.jit
def _grad_scores_reduce_kernel(
    part_ptr, w_ptr, s_ptr, ds_ptr, N, K, SPLIT_M, stride_part,
    stride_wn, stride_wk, stride_sn, stride_sk, stride_dsn, stride_dsk,
    ABS_SCORES: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):
    """dS from the SPLIT_M partial sums of split-M _grad_scores_kernel, added in split order (deterministic)."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = idx < N * K
    acc = tl.zeros((BLOCK,), dtype=ACC_DTYPE)
    part_ptrs = part_ptr + idx
    for _ in range(0, SPLIT_M):
        acc += tl.load(part_ptrs, mask=in_range, other=0.0)
        part_ptrs += stride_part
    n = idx // K
    k = idx % K
    w = tl.load(w_ptr + n * stride_wn + k * stride_wk, mask=in_range, other=0.0)
    if w_ptr.dtype.element_ty != tl.float64:
        w = w.to(tl.float32)
    grad = acc * w.to(ACC_DTYPE)
    if ABS_SCORES:
        s = tl.load(s_ptr + n * stride_sn + k * stride_sk, mask=in_range, other=0.0)
        grad = grad * sign_of(s.to(ACC_DTYPE))
    tl.store(ds_ptr + n * stride_dsn + k * stride_dsk, grad.to(ds_ptr.dtype.element_ty), mask=in_range)


def _check_weight_scores(weight, scores) -> None:
    check_tensor("weight", weight, FLOAT_DTYPES, ndim=2)
    check_tensor("scores", scores, SCORE_DTYPES, ndim=2)
    if scores.shape != weight.shape:
        raise ValueError(f"scores must have weight's shape {tuple(weight.shape)}, got {tuple(scores.shape)}")


def _gemm_flags(compute_dtype: torch.dtype, allow_tf32: bool) -> dict:
    """Constexprs shared by the GEMM kernels for operands of `compute_dtype`."""
    return dict(
        INPUT_PRECISION="tf32" if (allow_tf32 and compute_dtype == torch.float32) else "ieee",
        UPCAST=INTERPRET and compute_dtype in HALF_DTYPES,
        ACC_DTYPE=tl.float64 if compute_dtype == torch.float64 else tl.float32,
    )


def _gemm(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, allow_tf32: bool) -> torch.Tensor:
    """C = A B (+ bias) in a's dtype for checked 2-D a [M, K] and b [K, N] (any strides, b in a's dtype)."""
    M, K = a.shape
    N = b.shape[1]
    c = torch.empty((M, N), dtype=a.dtype, device=a.device)
    if c.numel() == 0:
        return c
    if K == 0:
        return c.copy_(bias.expand(M, N)) if bias is not None else c.zero_()
    grid = lambda META: (triton.cdiv(M, META["BLOCK_R"]) * triton.cdiv(N, META["BLOCK_C"]),)  # noqa: E731
    with device_guard(a.device):
        _matmul_kernel[grid](
            a, b, bias if bias is not None else c, c,
            M, N, K, bucket(M),
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), bias.stride(0) if bias is not None else 0,
            c.stride(0), c.stride(1),
            HAS_BIAS=bias is not None, **_gemm_flags(a.dtype, allow_tf32),
        )
    return c


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           allow_tf32: bool = False) -> torch.Tensor:
    """Y = X W^T (+ bias) in x's dtype: the plain GEMM that runs on a prebuilt W_eff = W ⊙ M.

    x [M, K]; weight [N, K] of x's dtype (W_eff as the prepass writes it); bias [N] of any float dtype.
    """
    check_tensor("x", x, FLOAT_DTYPES, ndim=2)
    check_tensor("weight", weight, FLOAT_DTYPES, ndim=2)
    if weight.dtype != x.dtype:
        raise TypeError(f"weight has dtype {dtype_name(weight.dtype)}; accepted: x's dtype ({dtype_name(x.dtype)})")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[1]} features (shape {tuple(x.shape)}) but weight expects "
                         f"{weight.shape[1]} (shape {tuple(weight.shape)})")
    if bias is not None:
        check_tensor("bias", bias, FLOAT_DTYPES, ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    check_devices(x=x, weight=weight, bias=bias)
    return _gemm(x, weight.t(), bias, allow_tf32)


def matmul(a: torch.Tensor, b: torch.Tensor, allow_tf32: bool = False) -> torch.Tensor:
    """C = A B in a's dtype (dX = dY W_eff on a prebuilt W_eff); a [M, K], b [K, N] of a's dtype, any strides."""
    check_tensor("a", a, FLOAT_DTYPES, ndim=2)
    check_tensor("b", b, FLOAT_DTYPES, ndim=2)
    if b.dtype != a.dtype:
        raise TypeError(f"b has dtype {dtype_name(b.dtype)}; accepted: a's dtype ({dtype_name(a.dtype)})")
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"a has {a.shape[1]} columns (shape {tuple(a.shape)}) but b has {b.shape[0]} rows "
                         f"(shape {tuple(b.shape)})")
    check_devices(a=a, b=b)
    return _gemm(a, b, None, allow_tf32)


def masked_linear_forward(x: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor, t: torch.Tensor,
                          bias: torch.Tensor | None = None, abs_scores: bool = True,
                          allow_tf32: bool = False) -> torch.Tensor:
    """Y = X (W ⊙ M)^T (+ bias) in x's dtype, M = 1[key >= t]; x [M, K], weight and scores [N, K].

    The prepass builds W ⊙ M in x's dtype, then the plain GEMM runs; the Triton backend caches that
    W ⊙ M across calls (maskprune.triton_ops), this stateless function builds it every time.
    """
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
    w_eff = apply_mask(weight, scores, t, abs_scores=abs_scores, out_dtype=x.dtype)
    return _gemm(x, w_eff.t(), bias, allow_tf32)


def masked_linear_grad_input(grad_out: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor,
                             t: torch.Tensor, abs_scores: bool = True, allow_tf32: bool = False) -> torch.Tensor:
    """dX = dY (W ⊙ M) in grad_out's dtype; grad_out [M, N], weight and scores [N, K] (prepass + plain GEMM)."""
    check_tensor("grad_out", grad_out, FLOAT_DTYPES, ndim=2)
    _check_weight_scores(weight, scores)
    if grad_out.shape[1] != weight.shape[0]:
        raise ValueError(f"grad_out has {grad_out.shape[1]} columns (shape {tuple(grad_out.shape)}) but "
                         f"weight has {weight.shape[0]} rows (shape {tuple(weight.shape)})")
    check_threshold(t, scores)
    check_devices(grad_out=grad_out, weight=weight, scores=scores, t=t)
    w_eff = apply_mask(weight, scores, t, abs_scores=abs_scores, out_dtype=grad_out.dtype)
    return _gemm(grad_out, w_eff, None, allow_tf32)


_SM_COUNT: dict = {}


def split_m_for(M: int, N: int, K: int, device: torch.device) -> int:
    """How many row splits the dS GEMM uses: 1 when the [N, K] output has enough 128x128 tiles for the
    GPU's SMs, else up to 16 splits of at least 512 rows each (a layer of 300x784 weights with 4096 rows
    gets 21 tiles on 132 SMs unsplit, 126 programs with 6 splits)."""
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    tiles = triton.cdiv(N, 128) * triton.cdiv(K, 128)
    if tiles >= _SM_COUNT[index]:
        return 1
    return max(1, min(_SM_COUNT[index] // tiles, triton.cdiv(M, 512), 16))


def masked_linear_grad_scores(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                              scores: torch.Tensor, abs_scores: bool = True, allow_tf32: bool = False,
                              split_m: int | None = None) -> torch.Tensor:
    """dS = sign(S) ⊙ W ⊙ (dY^T X) (W ⊙ (dY^T X) with raw scores) in scores' dtype: one GEMM, fused epilogue.

    split_m: row splits of the reduction (None: split_m_for's choice; 1 on CPU). With more than one
    split, each writes its partial sum and one elementwise pass adds them in a fixed order.
    """
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
    if split_m is not None and (isinstance(split_m, bool) or not isinstance(split_m, int) or not 1 <= split_m <= 64):
        raise ValueError(f"split_m must be None or an int in [1, 64], got {split_m!r}")
    device = check_devices(grad_out=grad_out, x=x, weight=weight, scores=scores)

    M, K = x.shape
    N = weight.shape[0]
    grad_scores = torch.empty((N, K), dtype=scores.dtype, device=scores.device)
    if grad_scores.numel() == 0:
        return grad_scores
    if M == 0:
        return grad_scores.zero_()
    split = split_m if split_m is not None else split_m_for(M, N, K, device)
    flags = _gemm_flags(x.dtype, allow_tf32)
    partial = None
    if split > 1:
        partial = torch.empty((split, N, K), dtype=torch.float64 if flags["ACC_DTYPE"] == tl.float64
                              else torch.float32, device=device)
    grid = lambda META: (triton.cdiv(N, META["BLOCK_R"]) * triton.cdiv(K, META["BLOCK_C"]), split)  # noqa: E731
    strides = (weight.stride(0), weight.stride(1), scores.stride(0), scores.stride(1),
               grad_scores.stride(0), grad_scores.stride(1))
    with device_guard(device):
        _grad_scores_kernel[grid](
            grad_out, x, weight, scores, grad_scores, partial if partial is not None else grad_scores,
            M, N, K, bucket(M), split, N * K,
            grad_out.stride(0), grad_out.stride(1), x.stride(0), x.stride(1), *strides,
            ABS_SCORES=bool(abs_scores), PARTIAL=partial is not None, **flags,
        )
        if partial is not None:
            block = 1024
            _grad_scores_reduce_kernel[(triton.cdiv(N * K, block),)](
                partial, weight, scores, grad_scores, N, K, split, N * K, *strides,
                ABS_SCORES=bool(abs_scores), ACC_DTYPE=flags["ACC_DTYPE"], BLOCK=block,
                num_warps=1 if INTERPRET else 4,
            )
    return grad_scores
