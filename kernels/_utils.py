"""Shared pieces of the Triton kernels: interpreter detection, input checks, and the mask/sign helpers."""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

# Read once, as Triton does when it decorates the kernels: under the interpreter they run on CPU
# tensors, autotune must get a single config, and bf16 tiles are upcast before any arithmetic.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

HALF_DTYPES = (torch.float16, torch.bfloat16)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SCORE_DTYPES = (torch.float32, torch.float64)


def store_dtype(out_dtype: torch.dtype) -> torch.dtype:
    """The dtype an elementwise kernel stores an `out_dtype` result in: float32 for float16/bfloat16 under the
    interpreter, whose narrowing stores do not round to nearest even (the launcher then casts with torch, which
    does), else `out_dtype` itself (a GPU's conversion rounds to nearest even)."""
    return torch.float32 if INTERPRET and out_dtype in HALF_DTYPES else out_dtype


def dtype_name(dtype: torch.dtype) -> str:
    """torch.float32 -> "float32", as error messages name dtypes."""
    return str(dtype).replace("torch.", "")


def dtype_names(dtypes) -> str:
    """The accepted dtypes, comma-separated, for an error message."""
    return ", ".join(dtype_name(d) for d in dtypes)


def check_tensor(name: str, tensor, dtypes, ndim: int | None = None) -> None:
    """Raise TypeError/ValueError naming `name` unless it is a tensor of one of `dtypes` (and `ndim` dims)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {dtype_name(tensor.dtype)}; "
                        f"accepted: {dtype_names(dtypes)}")
    if ndim is not None and tensor.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(tensor.shape)}")


def check_threshold(t, scores: torch.Tensor) -> None:
    """t: a 0-d tensor of the scores' dtype on the scores' device (read by the kernel, never synced to host)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t must be a 0-d torch.Tensor on the scores' device, got {type(t).__name__}")
    if t.dim() != 0:
        raise ValueError(f"t must be a 0-d tensor, got shape {tuple(t.shape)}")
    if t.dtype != scores.dtype:
        raise TypeError(f"t has dtype {dtype_name(t.dtype)}; accepted: the scores' dtype "
                        f"({dtype_name(scores.dtype)})")


def check_devices(**tensors) -> torch.device:
    """All tensors on one device, and one that Triton can run on (CUDA, or CPU under TRITON_INTERPRET=1)."""
    named = [(name, tensor) for name, tensor in tensors.items() if tensor is not None]
    device = named[0][1].device
    for name, tensor in named[1:]:
        if tensor.device != device:
            raise ValueError(f"devices differ: {named[0][0]} is on {device}, {name} is on {tensor.device}")
    if device.type != "cuda" and not (INTERPRET and device.type == "cpu"):
        raise ValueError(f"Triton kernels need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1); "
                         f"got tensors on {device}")
    return device


def device_guard(device: torch.device):
    """The context every kernel launch runs in: Triton launches on the *current* CUDA device and its
    current stream, so tensors on cuda:1 while cuda:0 is current would get device-1 pointers used on
    GPU 0, unordered against device 1's stream. Entering torch.cuda.device(device) makes the tensors'
    device current (and its current stream the one Triton picks) for the launch. A no-op for CPU tensors
    (the interpreter)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.device(device)


# Shared memory one block may use (the opt-in maximum), per compute capability: what the autotune
# pruning compares a config's estimate with when the device cannot be asked (ahead-of-time checks).
SHARED_MEMORY_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
_DEVICE_SMEM: dict = {}


def shared_memory_limit(device: torch.device) -> int:
    """Bytes of shared memory one block may use on `device` (opt-in maximum); cached per device."""
    if device.type != "cuda":
        return SHARED_MEMORY_LIMIT[90]
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _DEVICE_SMEM:
        props = torch.cuda.get_device_properties(index)
        limit = getattr(props, "shared_memory_per_block_optin", 0)
        if not limit:
            limit = SHARED_MEMORY_LIMIT.get(props.major * 10 + props.minor, 101376)
        _DEVICE_SMEM[index] = int(limit)
    return _DEVICE_SMEM[index]


def bucket(n: int) -> int:
    """n rounded up to a power of two (at least 16): the autotune key of a GEMM's batch dimension, so that
    every new batch size does not re-run the autotuning (9 configs x 3 kernels) on its first call."""
    return max(16, triton.next_power_of_2(max(int(n), 1)))


@triton.jit
def keep_mask(scores, t, ABS_SCORES: tl.constexpr):
    """1[key >= t] with key = |S| or S; NaN scores are never kept (as in the reference)."""
    key = scores  # one return per jit function: Triton's compiler also visits code after a static-if return
    if ABS_SCORES:
        key = tl.abs(scores)
    return key >= t


@triton.jit
def sign_of(x):
    """torch.sign: -1, 0 or 1 in x's dtype, NaN stays NaN."""
    one = tl.full(x.shape, 1, x.dtype)
    zero = tl.zeros(x.shape, x.dtype)
    sign = tl.where(x > 0, one, tl.where(x < 0, -one, zero))
    return tl.where(x == x, sign, x)
