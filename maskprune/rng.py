"""A counter-based generator for the frozen random weights: Philox4x32-10 in torch integer ops.

Why our own generator: a ticket (maskprune.ticket) stores no weights, only how to regenerate them,
and torch's RNG promises the same numbers neither across torch versions nor across devices. Philox
is a pure function of (counter, key), so any backend (this torch reference, C++, CUDA, Triton's
`tl.philox`) computes weight i of a layer on its own, in any order, with the same bits.

The generator (Salmon, Moraes, Dror & Shaw, "Parallel random numbers: as easy as 1, 2, 3", SC 2011;
the constants of Random123, cuRAND and Triton's `tl.randint`):

    one round, on the counter (c0, c1, c2, c3) with the key (k0, k1), all uint32:
        hi0:lo0 = 0xD2511F53 * c0      (the 64-bit product split into its high and low 32 bits)
        hi1:lo1 = 0xCD9E8D57 * c2
        (c0, c1, c2, c3) <- (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)
    Philox4x32-10 = 10 rounds, the key bumped between two rounds by
        k0 += 0x9E3779B9, k1 += 0xBB67AE85   (mod 2^32)
    and the output words (x0, x1, x2, x3) are the counter after the 10th round.

How maskprune keys it, for element `i` (the row-major flat index into the weight, 0 <= i < 2^64) of
the layer with key `layer` (0 <= layer < 2^32; `convert` numbers the masked layers 0, 1, 2, ... in
module order), drawn from the model seed `seed` (0 <= seed < 2^64) and the stream `stream`:

    key     = (seed mod 2^32, seed div 2^32)
    counter = (i mod 2^32, i div 2^32, layer, stream)        stream 0: the frozen weights

With layer = stream = 0 this is exactly Triton's `tl.randint4x(seed, i)`; in general
`tl.philox(seed, i_lo, i_hi, layer, stream)`.

The weights, from the output words of element i (scale = std, or the bound for kaiming_uniform,
rounded to float32 first; every formula below is one IEEE float32 rounding or exact):

    signed_constant   w = +scale if x0 < 2^31 else -scale          (one bit: the top bit of x0)
    kaiming_uniform   m = x0 >> 8 (24 bits);  w = float32(m - 2^23) * (scale * 2^-23)
                      i.e. w = scale * (2u - 1) with u = m * 2^-24 in [0, 1): w in [-scale, scale)
    kaiming_normal    u1 = ((x0 >> 8) + 1/2) * 2^-24 in (0, 1),  u2 = (x1 >> 8) * 2^-24 in [0, 1)
                      z = sqrt(-2 ln u1) * cos(2 pi u2)   (Box-Muller, in float64)
                      w = float32(z) * scale               (|z| <= 5.9)

Backends (argument `backend` of counter_weights, counter_fill, uniform and init_weight_counter):
"reference" is the torch integer-op code of this module, the source of truth; "cpp" the C++ kernels of
maskprune._C (op maskprune::counter_weights_, csrc/philox.h; CPU, and CUDA in a CUDA build); "triton" the
kernel of maskprune.triton_rng (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1); "auto" picks cpp
where it has a kernel for the device, else triton on CUDA, else the reference (computed on CPU and copied).
On one core the reference takes ~100x the C++ kernel's time for the exact inits and ~12x for
kaiming_normal, whose float64 log and cos dominate (scripts/bench_rng.py measures it).

What is guaranteed: signed_constant and kaiming_uniform are bit-identical on every backend that has
32-bit integer arithmetic and IEEE float32 multiplication (the value is an exact integer times a
float32 constant: one rounding, nothing for a compiler to fuse). kaiming_normal goes through log and
cos, which libraries round differently: it is bit-identical run to run on one backend, and across
backends equal except where two float64 results straddle a float32 rounding boundary, then 1 ulp
(measured: torch's float64 log/cos on CPU against Python's `math`, 0 of 2^20 draws differ;
tests/test_rng.py checks 2^15; the C++ kernel (glibc) 0 of 2 x 2^20, the Triton interpreter (numpy)
0 of 2 x 2^18; CUDA's libdevice log/cos not measured yet, tests/test_rng_backends.py allows 1 ulp).
"""
from __future__ import annotations

import math
import struct
from dataclasses import asdict, dataclass
from typing import Sequence

import os

import torch

from . import ops as _ops  # loads maskprune._C (if built): the op maskprune::counter_weights_

__all__ = ["GENERATOR", "WEIGHT_STREAM", "BACKENDS", "DISTRIBUTIONS", "philox4x32", "random_words", "uniform",
           "counter_fill", "counter_weights", "init_weight_counter", "WeightKey", "seed_weights",
           "available_backends"]

GENERATOR = "philox4x32-10"
WEIGHT_STREAM = 0  # counter word c3 of the frozen weights; other streams are free for other uses

_M32 = 0xFFFFFFFF
_MUL_A, _MUL_B = 0xD2511F53, 0xCD9E8D57     # round multipliers
_BUMP_A, _BUMP_B = 0x9E3779B9, 0xBB67AE85   # key schedule (golden ratio, sqrt(3) - 1)
_ROUNDS = 10
_CHUNK = 1 << 20  # elements generated per pass (bounds the int64 temporaries to a few MiB each)
# The same names as maskprune.nn.init.WEIGHT_INITS (kept here: nn.init will import this module).
WEIGHT_INITS = ("signed_constant", "kaiming_normal", "kaiming_uniform")
# What counter_fill draws: the weight inits, and "uniform" (u * scale with u = (x0 >> 8) * 2^-24 in [0, 1)).
DISTRIBUTIONS = WEIGHT_INITS + ("uniform",)
BACKENDS = ("auto", "reference", "cpp", "triton")
OUT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _mulhilo(mul: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit halves of mul * x for uint32 values held in int64, without int64 overflow.

    x is split into 16-bit halves: mul * x = t + u * 2^16 with t = mul * (x & 0xFFFF) and
    u = mul * (x >> 16), both < 2^48.
    """
    t = (x & 0xFFFF) * mul
    u = (x >> 16) * mul
    s = (t & _M32) + ((u & 0xFFFF) << 16)
    return (t >> 32) + (u >> 16) + (s >> 32), s & _M32


def _check_u32(value: int, name: str, bits: int = 32) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < (1 << bits):
        raise ValueError(f"{name} must be an int in [0, 2^{bits}), got {value!r}")
    return value


def philox4x32(counter: Sequence, key: Sequence[int], rounds: int = _ROUNDS) -> tuple[torch.Tensor, ...]:
    """Philox4x32 with `rounds` rounds: four uint32 words (as int64 tensors) per counter.

    `counter` is four ints or int64 tensors (broadcast together, values in [0, 2^32)); `key` two ints.
    """
    k0, k1 = (_check_u32(k, f"key[{j}]") for j, k in enumerate(key))
    c = [torch.as_tensor(w, dtype=torch.int64, device="cpu") for w in counter]
    if len(c) != 4:
        raise ValueError(f"counter must have 4 words, got {len(c)}")
    c0, c1, c2, c3 = torch.broadcast_tensors(*c)
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + _BUMP_A) & _M32, (k1 + _BUMP_B) & _M32
        hi0, lo0 = _mulhilo(_MUL_A, c0)
        hi1, lo1 = _mulhilo(_MUL_B, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def random_words(start: int, count: int, *, seed: int, layer: int, stream: int = WEIGHT_STREAM,
                 words: int = 4) -> tuple[torch.Tensor, ...]:
    """The first `words` output words (int64 tensors holding uint32) of elements start .. start+count-1."""
    _check_u32(seed, "seed", 64)
    _check_u32(layer, "layer")
    _check_u32(stream, "stream")
    index = torch.arange(start, start + count, dtype=torch.int64, device="cpu")
    out = philox4x32((index & _M32, index >> 32, layer, stream), (seed & _M32, seed >> 32))
    return out[:words]


def uniform(shape: Sequence[int], *, seed: int, layer: int, stream: int = WEIGHT_STREAM,
            device: torch.device | str = "cpu", backend: str = "auto") -> torch.Tensor:
    """float32 uniforms u = (x0 >> 8) * 2^-24 in [0, 1), one per element of `shape` (exact: 24 bits), on `device`."""
    return counter_weights(shape, "uniform", 1.0, seed=seed, layer=layer, stream=stream, device=device,
                           backend=backend)


def _chunk_values(x0: torch.Tensor, x1: torch.Tensor | None, init: str, scale32: torch.Tensor) -> torch.Tensor:
    if init == "signed_constant":
        return torch.where(x0 < (1 << 31), scale32, -scale32)
    if init == "kaiming_uniform":
        step = scale32 * 2.0 ** -23  # exact: a power-of-two scaling of a normal float32
        return ((x0 >> 8) - (1 << 23)).to(torch.float32) * step
    if init == "uniform":
        return (x0 >> 8).to(torch.float32) * (scale32 * 2.0 ** -24)
    u1 = ((x0 >> 8).to(torch.float64) + 0.5) * 2.0 ** -24
    u2 = (x1 >> 8).to(torch.float64) * 2.0 ** -24
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)
    return z.to(torch.float32) * scale32


def _reference_fill(out: torch.Tensor, init: str, scale32: torch.Tensor, seed: int, layer: int, stream: int,
                    offset: int) -> None:
    """The torch integer-op generator (the source of truth), computed on CPU in chunks and copied into out."""
    flat = out.view(-1)
    n = flat.numel()
    words = 2 if init == "kaiming_normal" else 1
    for start in range(0, n, _CHUNK):
        count = min(_CHUNK, n - start)
        xs = random_words(offset + start, count, seed=seed, layer=layer, stream=stream, words=words)
        flat[start:start + count] = _chunk_values(xs[0], xs[1] if words == 2 else None, init, scale32)


def _cpp_device_types() -> frozenset[str]:
    """Device types on which maskprune._C has a counter_weights_ kernel (read once; empty without _C)."""
    if not _ops.HAS_CPP or not hasattr(torch.ops.maskprune, "counter_weights_"):
        return frozenset()
    keys = {"cpu": "CPU", "cuda": "CUDA"}
    return frozenset(d for d, key in keys.items()
                     if torch._C._dispatch_has_kernel_for_dispatch_key("maskprune::counter_weights_", key))


CPP_DEVICE_TYPES = _cpp_device_types()
if CPP_DEVICE_TYPES:
    @torch.library.register_fake("maskprune::counter_weights_")
    def _(out, init, scale, seed, layer, stream=0, offset=0):
        return None


def _triton_module():
    """maskprune.triton_rng, or None when triton does not import (or MASKPRUNE_NO_TRITON=1)."""
    if os.environ.get("MASKPRUNE_NO_TRITON") == "1":
        return None
    try:
        from . import triton_rng
    except ImportError:
        return None
    return triton_rng


def _triton_runs_on(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_available() and _triton_module() is not None
    return (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1" and _triton_module() is not None
            and _triton_module().INTERPRET)


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The backends that run on `device`, in the order "auto" tries them ("reference" runs everywhere)."""
    device = torch.device(device)
    names = []
    if device.type in CPP_DEVICE_TYPES:
        names.append("cpp")
    if device.type == "cuda" and _triton_runs_on(device):
        names.append("triton")
    names.append("reference")
    if device.type == "cpu" and _triton_runs_on(device):
        names.append("triton")  # the interpreter: for tests, never picked by "auto" on CPU
    return names


def _resolve_backend(backend: str, device: torch.device) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    available = available_backends(device)
    if backend == "auto":
        return available[0]
    if backend not in available:
        why = {"cpp": "maskprune._C did not load, is an older build without counter_weights_, or has no "
                      f"kernel for {device.type}",
               "triton": "triton does not import, or the tensor is on CPU without TRITON_INTERPRET=1"}[backend]
        raise ValueError(f"backend {backend!r} is not available on {device} ({why}); available there: "
                         f"{', '.join(available)}")
    return backend


def _check_scale(scale: float) -> torch.Tensor:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise ValueError(f"scale must be a finite float32 > 2^-100, got {scale!r}")
    scale32 = torch.tensor(float(scale), dtype=torch.float32, device="cpu")
    if not (math.isfinite(scale) and scale > 0 and float(scale32) >= 2.0 ** -100):
        raise ValueError(f"scale must be a finite float32 > 2^-100, got {scale!r}")
    return scale32


def counter_fill(out: torch.Tensor, init: str, scale: float, *, seed: int, layer: int, stream: int = WEIGHT_STREAM,
                 offset: int = 0, backend: str = "auto") -> torch.Tensor:
    """Writes the `init` values of (seed, layer, stream) into `out` and returns it: out's j-th element (row-major)
    is element offset + j of the sequence (module doc), computed in float32 and cast to out's dtype.

    `init` is one of DISTRIBUTIONS; `scale` is rounded to float32 first. Every backend gives the same bits
    (kaiming_normal: within 1 float32 ulp, module doc). A non-contiguous `out` is filled through a copy.
    """
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if out.dtype not in OUT_DTYPES:
        raise TypeError(f"out must have dtype in ({', '.join(str(d)[6:] for d in OUT_DTYPES)}), "
                        f"got {str(out.dtype)[6:]}")
    if init not in DISTRIBUTIONS:
        raise ValueError(f"init must be one of {DISTRIBUTIONS}, got {init!r}")
    scale32 = _check_scale(scale)
    _check_u32(seed, "seed", 64)
    _check_u32(layer, "layer")
    _check_u32(stream, "stream")
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset <= (1 << 63) - 1 - out.numel():
        raise ValueError(f"offset must be an int in [0, 2^63 - numel], got {offset!r}")
    chosen = _resolve_backend(backend, out.device)
    target = out if out.is_contiguous() else torch.empty(out.shape, dtype=out.dtype, device=out.device)
    if chosen == "cpp":
        signed_seed = seed - (1 << 64) if seed >= (1 << 63) else seed  # the op's int64 carries the seed's bits
        torch.ops.maskprune.counter_weights_(target, init, float(scale32), signed_seed, layer, stream, offset)
    elif chosen == "triton":
        _triton_module().counter_fill(target, init, float(scale32), seed=seed, layer=layer, stream=stream,
                                      offset=offset)
    elif target.device.type == "cpu" and target.dtype == torch.float32:
        _reference_fill(target, init, scale32, seed, layer, stream, offset)
    else:
        values = torch.empty(target.shape, dtype=torch.float32, device="cpu")
        _reference_fill(values, init, scale32, seed, layer, stream, offset)
        target.copy_(values)
    if target is not out:
        out.copy_(target)
    return out


def counter_weights(shape: Sequence[int], init: str, scale: float, *, seed: int, layer: int,
                    stream: int = WEIGHT_STREAM, offset: int = 0, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32, backend: str = "auto") -> torch.Tensor:
    """A tensor of `shape` (float32 on CPU by default) holding the `init` weights of (seed, layer, stream):
    elements offset .. offset + numel - 1 of the sequence (module doc); see counter_fill."""
    if init not in DISTRIBUTIONS:
        raise ValueError(f"init must be one of {DISTRIBUTIONS}, got {init!r}")
    try:
        shape = tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        raise ValueError(f"shape must be a sequence of non-negative ints, got {shape!r}") from None
    if any(d < 0 for d in shape):
        raise ValueError(f"shape must be a sequence of non-negative ints, got {shape!r}")
    if dtype not in OUT_DTYPES:
        raise TypeError(f"dtype must be one of ({', '.join(str(d)[6:] for d in OUT_DTYPES)}), got {dtype!r}")
    out = torch.empty(shape, dtype=dtype, device=device)
    return counter_fill(out, init, scale, seed=seed, layer=layer, stream=stream, offset=offset, backend=backend)


def _relu_std(shape: Sequence[int], density: float, scale_fan: bool) -> float:
    """Kaiming's ReLU std sqrt(2)/sqrt(fan_in) (fan_in = shape[1] * receptive field), the fan scaled by
    the density when `scale_fan` (edge-popup): the same number as maskprune.nn.init's initialisers."""
    if len(shape) < 2:
        raise ValueError(f"a weight needs at least 2 dimensions to have a fan_in, got shape {tuple(shape)}")
    fan = shape[1] * math.prod(shape[2:])
    if scale_fan:
        fan = fan * density
    return math.sqrt(2.0) / math.sqrt(fan)


@dataclass(frozen=True)
class WeightKey:
    """Everything that regenerates a layer's frozen weight: generator, seed, layer key, stream, init, scale.

    `scale` is the float32 std (signed_constant, kaiming_normal) or bound (kaiming_uniform), as a
    Python float; a ticket stores it, so regeneration never depends on how the std was computed.
    """

    init: str
    scale: float
    seed: int
    layer: int
    stream: int = WEIGHT_STREAM
    generator: str = GENERATOR

    def generate(self, shape: Sequence[int], *, device: torch.device | str = "cpu",
                 backend: str = "auto") -> torch.Tensor:
        """The float32 weight of `shape` (on `device`, by `backend`: see counter_fill)."""
        if self.generator != GENERATOR:
            raise ValueError(f"generator must be {GENERATOR!r}, got {self.generator!r}")
        return counter_weights(shape, self.init, self.scale, seed=self.seed, layer=self.layer, stream=self.stream,
                               device=device, backend=backend)

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def init_weight_counter(weight: torch.Tensor, init: str, *, seed: int, layer: int, density: float = 1.0,
                        scale_fan: bool = False, backend: str = "auto") -> WeightKey:
    """Fills `weight` in place from the counter-based generator; a drop-in for nn.init.init_weight.

    Same distributions and scales as maskprune.nn.init.init_weight (std = sqrt(2 / fan_in), fan_in
    times `density` when `scale_fan`; kaiming_uniform's bound sqrt(3) * std), but the numbers are a
    function of (seed, layer, element index) only. Returns the key that regenerates them; a weight of
    another dtype gets the float32 values cast. `backend`: see counter_fill (the weight's device decides
    what "auto" picks).
    """
    if init not in WEIGHT_INITS:
        raise ValueError(f"init must be one of {WEIGHT_INITS}, got {init!r}")
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
        raise ValueError(f"density must be a float in (0, 1], got {density!r}")
    std = _relu_std(weight.shape, float(density), bool(scale_fan))
    scale = math.sqrt(3.0) * std if init == "kaiming_uniform" else std
    scale32 = struct.unpack("<f", struct.pack("<f", scale))[0]  # rounded to float32 (round to nearest even)
    key = WeightKey(init=init, scale=scale32,
                    seed=_check_u32(seed, "seed", 64), layer=_check_u32(layer, "layer"))
    if weight.is_meta:  # on the meta device (shape checks) only the key is made
        _resolve_backend(backend, torch.device("cpu"))  # still reject a bad name
    elif weight.dtype in OUT_DTYPES:
        counter_fill(weight, init, scale32, seed=key.seed, layer=key.layer, stream=key.stream, backend=backend)
    else:
        weight.copy_(key.generate(weight.shape, device=weight.device, backend=backend))
    return key


@torch.no_grad()
def seed_weights(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Re-initialises every masked layer that has a weight_init from the generator, keyed (seed, i) for
    the i-th masked layer in module order, and records the key as `layer.weight_key`; returns the model.

    Layers with weight_init=None (pretrained weights) keep their weights and get no key.
    """
    from .nn import masked_layers  # late import: maskprune.nn imports nothing from here

    _check_u32(seed, "seed", 64)
    for index, (_, layer) in enumerate(masked_layers(model)):
        if getattr(layer, "weight_init", None) is None:
            continue
        layer.weight_key = init_weight_counter(layer.weight, layer.weight_init, seed=seed, layer=index,
                                               density=layer.density, scale_fan=layer.scale_fan)
    return model
