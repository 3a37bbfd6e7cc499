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

What is guaranteed: signed_constant and kaiming_uniform are bit-identical on every backend that has
32-bit integer arithmetic and IEEE float32 multiplication (the value is an exact integer times a
float32 constant: one rounding, nothing for a compiler to fuse). kaiming_normal goes through log and
cos, which libraries round differently: it is bit-identical run to run on one backend, and across
backends equal except where two float64 results straddle a float32 rounding boundary, then 1 ulp
(measured: torch's float64 log/cos on CPU against Python's `math`, 0 of 2^20 draws differ;
tests/test_rng.py checks 2^15).
"""
from __future__ import annotations

import math
import struct
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

__all__ = ["GENERATOR", "WEIGHT_STREAM", "philox4x32", "random_words", "uniform", "counter_weights",
           "init_weight_counter", "WeightKey", "seed_weights"]

GENERATOR = "philox4x32-10"
WEIGHT_STREAM = 0  # counter word c3 of the frozen weights; other streams are free for other uses

_M32 = 0xFFFFFFFF
_MUL_A, _MUL_B = 0xD2511F53, 0xCD9E8D57     # round multipliers
_BUMP_A, _BUMP_B = 0x9E3779B9, 0xBB67AE85   # key schedule (golden ratio, sqrt(3) - 1)
_ROUNDS = 10
_CHUNK = 1 << 20  # elements generated per pass (bounds the int64 temporaries to a few MiB each)
# The same names as maskprune.nn.init.WEIGHT_INITS (kept here: nn.init will import this module).
WEIGHT_INITS = ("signed_constant", "kaiming_normal", "kaiming_uniform")


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


def uniform(shape: Sequence[int], *, seed: int, layer: int, stream: int = WEIGHT_STREAM) -> torch.Tensor:
    """float32 uniforms u = (x0 >> 8) * 2^-24 in [0, 1), one per element of `shape` (exact: 24 bits)."""
    n = math.prod(shape)
    x0, = random_words(0, n, seed=seed, layer=layer, stream=stream, words=1)
    return ((x0 >> 8).to(torch.float32) * 2.0 ** -24).reshape(tuple(shape))


def _chunk_values(x0: torch.Tensor, x1: torch.Tensor | None, init: str, scale32: torch.Tensor) -> torch.Tensor:
    if init == "signed_constant":
        return torch.where(x0 < (1 << 31), scale32, -scale32)
    if init == "kaiming_uniform":
        step = scale32 * 2.0 ** -23  # exact: a power-of-two scaling of a normal float32
        return ((x0 >> 8) - (1 << 23)).to(torch.float32) * step
    u1 = ((x0 >> 8).to(torch.float64) + 0.5) * 2.0 ** -24
    u2 = (x1 >> 8).to(torch.float64) * 2.0 ** -24
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)
    return z.to(torch.float32) * scale32


def counter_weights(shape: Sequence[int], init: str, scale: float, *, seed: int, layer: int,
                    stream: int = WEIGHT_STREAM) -> torch.Tensor:
    """A float32 CPU tensor of `shape` holding the `init` weights of (seed, layer, stream) (module doc)."""
    if init not in WEIGHT_INITS:
        raise ValueError(f"init must be one of {WEIGHT_INITS}, got {init!r}")
    scale32 = torch.tensor(scale, dtype=torch.float32, device="cpu")
    if not (math.isfinite(scale) and scale > 0 and float(scale32) >= 2.0 ** -100):
        raise ValueError(f"scale must be a finite float32 > 2^-100, got {scale!r}")
    shape = tuple(int(d) for d in shape)
    n = math.prod(shape)
    out = torch.empty(n, dtype=torch.float32, device="cpu")
    words = 2 if init == "kaiming_normal" else 1
    for start in range(0, n, _CHUNK):
        count = min(_CHUNK, n - start)
        xs = random_words(start, count, seed=seed, layer=layer, stream=stream, words=words)
        out[start:start + count] = _chunk_values(xs[0], xs[1] if words == 2 else None, init, scale32)
    return out.reshape(shape)


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

    def generate(self, shape: Sequence[int]) -> torch.Tensor:
        """The float32 weight of `shape` (on CPU)."""
        if self.generator != GENERATOR:
            raise ValueError(f"generator must be {GENERATOR!r}, got {self.generator!r}")
        return counter_weights(shape, self.init, self.scale, seed=self.seed, layer=self.layer, stream=self.stream)

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def init_weight_counter(weight: torch.Tensor, init: str, *, seed: int, layer: int, density: float = 1.0,
                        scale_fan: bool = False) -> WeightKey:
    """Fills `weight` in place from the counter-based generator; a drop-in for nn.init.init_weight.

    Same distributions and scales as maskprune.nn.init.init_weight (std = sqrt(2 / fan_in), fan_in
    times `density` when `scale_fan`; kaiming_uniform's bound sqrt(3) * std), but the numbers are a
    function of (seed, layer, element index) only. Returns the key that regenerates them; a weight of
    another dtype gets the float32 values cast.
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
    if not weight.is_meta:  # on the meta device (shape checks) only the key is made
        weight.copy_(key.generate(weight.shape))
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
