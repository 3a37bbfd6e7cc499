"""The Triton backend of maskprune.rng: one kernel that fills a tensor with the counter-based values.

The values are those of maskprune.rng's module docstring (the torch reference there is the source of
truth): element j of `out` is element offset + j of the Philox4x32-10 sequence keyed (seed, layer,
stream). `tl.philox(seed, c0, c1, c2, c3)` is exactly our keying (key = (seed mod 2^32, seed div 2^32),
counter = (i lo, i hi, layer, stream)); tests/test_rng.py checks its words against the reference.
Runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (how the tests run it).
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

__all__ = ["DISTRIBUTIONS", "OUT_DTYPES", "counter_fill", "counter_value", "dist_step"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# The `init` names, in the order of the kernel's DIST constant (and of csrc/philox.h's Dist).
DISTRIBUTIONS = ("signed_constant", "kaiming_uniform", "kaiming_normal", "uniform")
OUT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_M32 = 0xFFFFFFFF


def _configs() -> list:
    """Elements per program: Philox is arithmetic-bound, so mid-sized blocks with enough warps to hide the
    64-bit multiplies; one small config under the interpreter (no GPU to benchmark, numpy is slow on big blocks)."""
    if INTERPRET:
        return [triton.Config({"BLOCK": 1024}, num_warps=1)]
    return [triton.Config({"BLOCK": b}, num_warps=w) for b, w in ((512, 4), (1024, 4), (2048, 8), (4096, 8))]


@triton.jit
def counter_value(i, seed, layer, stream, step, DIST: tl.constexpr):
    """The float32 value of elements `i` (an int64 block) of (seed, layer, stream): maskprune.rng's formulas.
    `step` is scale, scale * 2^-23 (kaiming_uniform) or scale * 2^-24 (uniform); layer and stream are the
    int32 bits of their uint32 values. Shared by every kernel that regenerates weights (kernels/seed_mask.py)."""
    c0 = (i & 0xFFFFFFFF).to(tl.uint32)
    c1 = (i >> 32).to(tl.uint32)
    zero = tl.zeros(i.shape, dtype=tl.uint32)
    c2 = zero + tl.to_tensor(layer).to(tl.uint32, bitcast=True)
    c3 = zero + tl.to_tensor(stream).to(tl.uint32, bitcast=True)
    x0, x1, _, _ = tl.philox(seed, c0, c1, c2, c3)
    if DIST == 0:  # signed_constant: the top bit of x0 is the sign
        w = tl.where((x0 >> 31) == 0, step, -step)
    elif DIST == 1:  # kaiming_uniform: (x0 >> 8) - 2^23, exact in float32, times scale * 2^-23
        w = ((x0 >> 8).to(tl.int32) - 8388608).to(tl.float32) * step
    elif DIST == 2:  # kaiming_normal: Box-Muller in float64 (float64 constants: a Python float would be float32)
        half = tl.full(i.shape, 0.5, tl.float64)
        ulp24 = tl.full(i.shape, 2.0 ** -24, tl.float64)
        two_pi = tl.full(i.shape, 6.283185307179586, tl.float64)
        u1 = ((x0 >> 8).to(tl.float64) + half) * ulp24
        u2 = (x1 >> 8).to(tl.float64) * ulp24
        z = tl.sqrt(-2.0 * tl.log(u1)) * tl.cos(two_pi * u2)
        w = z.to(tl.float32) * step
    else:  # uniform: (x0 >> 8) * scale * 2^-24
        w = (x0 >> 8).to(tl.float32) * step
    return w


@triton.autotune(configs=_configs(), key=["n", "DIST"])
@triton.jit
def _counter_values_kernel(out_ptr, n, offset, seed, layer, stream, step, DIST: tl.constexpr, BLOCK: tl.constexpr):
    """out[j] = value of element offset + j, for j < n (see counter_value)."""
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    w = counter_value(j + offset, seed, layer, stream, step, DIST)
    tl.store(out_ptr + j, w.to(out_ptr.dtype.element_ty), mask=j < n)  # float32 or float64: exact


def dist_step(init: str, scale32: float) -> float:
    """counter_value's `step` for `init` and a float32 scale (exact in float32: a power-of-two factor)."""
    dist = DISTRIBUTIONS.index(init)
    return scale32 * (2.0 ** -23 if dist == 1 else 2.0 ** -24 if dist == 3 else 1.0)


def as_int32_bits(value: int) -> int:
    """A uint32 as the int32 with its bits (kernel integer arguments are signed)."""
    return value - (1 << 32) if value >= (1 << 31) else value


def counter_fill(out: torch.Tensor, init: str, scale: float, *, seed: int, layer: int, stream: int = 0,
                 offset: int = 0) -> torch.Tensor:
    """Fills the contiguous tensor `out` with elements offset .. offset + numel - 1 of the `init` values of
    (seed, layer, stream) and returns it. `scale` must already be a float32 value (maskprune.rng rounds it)."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if out.dtype not in OUT_DTYPES:
        raise TypeError(f"out must have dtype in ({', '.join(str(d)[6:] for d in OUT_DTYPES)}), "
                        f"got {str(out.dtype)[6:]}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous (element i is its i-th in row-major order)")
    if out.device.type != "cuda" and not (INTERPRET and out.device.type == "cpu"):
        raise ValueError(f"out must be a CUDA tensor (or a CPU tensor with TRITON_INTERPRET=1), got {out.device}")
    if init not in DISTRIBUTIONS:
        raise ValueError(f"init must be one of {DISTRIBUTIONS}, got {init!r}")
    step32 = torch.tensor(scale, dtype=torch.float32)
    if not (bool(torch.isfinite(step32)) and float(step32) >= 2.0 ** -100):
        raise ValueError(f"scale must be a finite float32 >= 2^-100, got {scale!r}")
    for name, value, bits in (("seed", seed, 64), ("layer", layer, 32), ("stream", stream, 32)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < (1 << bits):
            raise ValueError(f"{name} must be an int in [0, 2^{bits}), got {value!r}")
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset <= (1 << 63) - 1 - out.numel():
        raise ValueError(f"offset must be an int in [0, 2^63 - numel], got {offset!r}")
    n = out.numel()
    if n == 0:
        return out
    dist = DISTRIBUTIONS.index(init)
    step = dist_step(init, float(step32))
    # float16/bfloat16 through a float32 buffer and torch's cast (round to nearest even, as the C++ kernel
    # rounds): the interpreter's own float32 -> bfloat16 conversion rounds ties up and drops mantissa carries.
    target = out if out.dtype in (torch.float32, torch.float64) else torch.empty(out.shape, device=out.device)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK"]),)  # noqa: E731
    with torch.cuda.device(out.device) if out.device.type == "cuda" else contextlib.nullcontext():
        _counter_values_kernel[grid](target, n, offset, seed, as_int32_bits(layer), as_int32_bits(stream), step,
                                     DIST=dist)
    if target is not out:
        out.copy_(target)
    return out

