"""supermask: a Bernoulli mask drawn afresh at every training forward (Zhou, Lan, Liu & Yosinski,
"Deconstructing Lottery Tickets: Zeros, Signs, and the Supermask", NeurIPS 2019).

Source read: uber-research/deconstructing-lottery-tickets, masked_networks.py (`get_effective_mask`,
`MaskedDense.call`, `MaskedConv2D.call`).

Rule. Each weight has a real score S (their `kernel_mask`); in training every forward draws
M ~ Bernoulli(σ(S)), i.e. M = 1[u < σ(S)] with u ~ U[0, 1) per weight, and computes with W_eff = W ⊙ M.
Their evaluation (`learning_phase` false) also *samples* a mask ("actually, sample them too"); here
evaluation is `eval_mask="sample"` (default: one draw with a fixed key, so that every evaluation of
the same scores sees the same network) or `"expected"` (M = 1[σ(S) > 0.5]).
Dynamic weight rescaling (their `dynamic_scaling`, default off as in their flags): W_eff is multiplied
by n / Σ M (n = weights in the layer), the multiplier computed from the mask in the graph.

Gradient. Their mask is `sample + σ(S) - stop_gradient(σ(S))`: straight through the sample to σ(S), so
dS = σ'(S) ⊙ W ⊙ ∂L/∂W_eff with σ' = σ(1 - σ) (here a torch.autograd.Function, `BernoulliSTE`). With
dynamic scaling their multiplier n / Σ(sample + σ - sg(σ)) also carries a gradient to every score; the
same happens here, because the multiplier is computed from the Function's output (autograd adds
-n/(ΣM)² · Σ(W ⊙ M ⊙ g) · σ'(S) to every dS).
Without dynamic scaling the layer runs the fused op's "sampled" mode (ops.policy_masked_linear /
policy_apply_mask, u an input; C++ on CPU, Triton on CUDA, CUDA C++ with backend="cpp"): one pass writes
W ⊙ 1[u < σ(S)] (σ from a vectorised float32 exp within 2 ulp of torch's, so a weight whose u lies within a few
ulp of σ(S) may fall the other way than under torch.sigmoid), and dS = σ'(S) ⊙ W ⊙ g is one pass over the
weight-gradient GEMM's output; on CPU with "philox" and float32 tensors the draw and the mask are one C++ pass
instead (FusedPhiloxMask, below). With dynamic scaling (or backend="torch") the torch path (`BernoulliSTE`).

Defaults. Their scores start at the constant `sigmoid_bias` (default 0: σ = 0.5, half the weights kept
in expectation). Here the constant is `score_init`, default logit(density), so that the expected
initial density is the `density` asked for (0.5 gives their 0). The density is learned afterwards: it
is not a constraint for this policy (mask_stats reports what the scores give).

The draw. u is keyed by (seed, step, layer, draw): `step` is the optimizer steps done (set by the
after_step hook), `draw` counts this layer's training forwards within the step (usually 0), and the
evaluation mask uses a reserved step key. So a resumed run draws exactly the masks of an uninterrupted
one, and DDP ranks draw the same mask. Two generators (option `generator`):
  - "philox" (default): a counter-based generator, maskprune.rng's Philox4x32-10 (stream 1 + draw, key
    (seed, step), i.e. the 64-bit seed seed + 2^32 step): the same u bits on every device and backend (the
    compare u < σ(S) can still differ where σ rounds differently, i.e. where u is within a float32 ulp of σ(S)). Drawn by rng.uniform's
    "auto" backend: the C++ kernel on CPU (maskprune._C), CUDA or Triton on GPU, else the torch integer
    ops (about 50x slower than "torch" on CPU: 0.18 s for LeNet-300-100's 266k weights on one core).
    A CPU training forward with float32 scores and a frozen float32 weight (no dynamic scaling) draws
    and masks in one C++ pass instead (FusedPhiloxMask, bit-identical): measured on one core, a
    LeNet-300-100 step (batch 128) takes 1.62x a dense step (4.05 ms against 2.50 ms), against 1.99x
    with "torch" and 1.98x with the unfused C++ draw (scripts/bench_rng.py). The draw alone, one
    Philox4x32-10 per weight (~2.5 ns each with AVX2 there; on an Intel Xeon 2.8 ns with AVX-512F, 5.75 ns
    with AVX2), is a quarter of the dense step there.
  - "torch": a torch.Generator on the scores' device seeded from a 63-bit hash of the key (the default until
    2026-12-06; a run saved with it, without the option given, resumes with it). torch's CPU (mt19937) and CUDA
    (Philox) generators give different numbers for the same seed: a CPU and a CUDA run draw different masks with
    the same statistics, so tests on it compare mask statistics (kept fraction against E[σ(S)]), not bits. On
    CPU it is also the slower draw (~7 ns per weight on an Intel Xeon, 2.24x dense against 1.84x for "philox").
"""
from __future__ import annotations

import hashlib
import math
from typing import Mapping, Sequence

import torch

from .. import ops, rng
from .base import (LayerSetPolicy, bool_option, choice_option, fill_scores, float_option, int_option,
                   linear_out)

EVAL_STEP = 0xFFFFFFFF  # the step key of the evaluation draw (training steps stay below it)
SUPERMASK_STREAM = 1    # rng stream of the training draws (stream 0 is the frozen weights)


class BernoulliSTE(torch.autograd.Function):
    """M = 1[u < σ(S)] forward; dS = σ'(S) ⊙ g backward (straight through the sample to σ(S))."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(scores)
        ctx.save_for_backward(p)
        return (u < p).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        p, = ctx.saved_tensors
        return grad * (p * (1 - p)), None


class FusedPhiloxMask(torch.autograd.Function):
    """W_eff = W ⊙ 1[u < σ(S)] with u the "philox" draw, in one C++ pass (op maskprune::supermask_philox_mask),
    for a frozen float32 W and float32 scores on CPU; dS = (g ⊙ W) ⊙ σ(1 - σ). The values and gradients
    equal the unfused path's (uniform_draw, BernoulliSTE, W * M) to the bit: σ is torch.sigmoid, and the
    products are the same ones in the same order; only the passes over memory are fewer."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, weight: torch.Tensor, key: int, layer: int, stream: int) -> torch.Tensor:
        p = torch.sigmoid(scores.detach())
        signed = key - (1 << 64) if key >= (1 << 63) else key  # the op's int64 carries the key's 64 bits
        w_eff, q = torch.ops.maskprune.supermask_philox_mask(weight.detach(), p, signed, layer, stream)
        ctx.save_for_backward(weight, q)
        return w_eff

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, q = ctx.saved_tensors
        return (grad * weight).mul_(q), None, None, None, None


def _fused_op_available() -> bool:
    """maskprune._C has the CPU kernel of supermask_philox_mask (registers its fake kernel once)."""
    if ("cpu" not in rng.CPP_DEVICE_TYPES or not hasattr(torch.ops.maskprune, "supermask_philox_mask")
            or not torch._C._dispatch_has_kernel_for_dispatch_key("maskprune::supermask_philox_mask", "CPU")):
        return False

    @torch.library.register_fake("maskprune::supermask_philox_mask")
    def _(weight, probs, seed, layer, stream):
        return weight.new_empty(weight.shape), probs.new_empty(probs.shape)  # contiguous, as the kernel

    return True


_FUSED_OP = _fused_op_available()


def _key_hash(*key: int) -> int:
    """A 63-bit seed from a key tuple (blake2b: stable across processes, unlike Python's hash)."""
    digest = hashlib.blake2b(repr(tuple(int(k) for k in key)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def uniform_draw(shape: Sequence[int], device: torch.device, *, generator: str, seed: int, step: int, layer: int,
                 draw: int, backend: str = "auto") -> torch.Tensor:
    """float32 u in [0, 1) of `shape`, a pure function of (seed, step, layer, draw) and the generator
    (`backend`, for "philox": one of maskprune.rng.BACKENDS; the bits do not depend on it)."""
    if generator == "philox":  # key (seed mod 2^32, step mod 2^32): one 64-bit rng seed
        key = (seed & 0xFFFFFFFF) | ((step & 0xFFFFFFFF) << 32)
        return rng.uniform(shape, seed=key, layer=layer, stream=SUPERMASK_STREAM + draw, device=device,
                           backend=backend)
    g = torch.Generator(device=device)
    g.manual_seed(_key_hash(seed, step, layer, draw))
    return torch.rand(tuple(shape), generator=g, device=device, dtype=torch.float32)


class Supermask(LayerSetPolicy):
    """M ~ Bernoulli(σ(S)) per training forward; dS = σ'(S) ⊙ W ⊙ ∂L/∂W_eff (module docstring)."""

    name = "supermask"
    OPTIONS = {
        "seed": int_option(0, 0, 2 ** 32, "key of the mask draws"),
        "eval_mask": choice_option("sample", ("sample", "expected"),
                                   "evaluation mask: one fixed-key draw, or 1[σ(S) > 0.5]"),
        "dynamic_scaling": bool_option(False, "multiply W_eff by n / nnz(M) (Zhou et al.'s dynamic scaling)"),
        "score_init": float_option(None, -30.0, 30.0, "constant initial score; None: logit(density)",
                                   allow_none=True),
        "generator": choice_option("philox", ("philox", "torch"),
                                   "philox: counter-based, the same bits on every device; torch: torch.rand, whose "
                                   "CPU and CUDA generators differ"),
    }

    def __init__(self, layers: Sequence, density: float, **options) -> None:
        super().__init__(layers, density, **options)
        o = self.options
        self.seed, self.eval_mask, self.dynamic_scaling = o["seed"], o["eval_mask"], o["dynamic_scaling"]
        self.generator = o["generator"]
        self._generator_given = "generator" in options  # else the default, which a resumed "torch" run overrides
        if o["score_init"] is None:
            d = min(max(self.density, 1e-6), 1 - 1e-6)
            fill_scores(self.layers, math.log(d / (1 - d)))
        else:
            fill_scores(self.layers, o["score_init"])
        self.step = 0
        self._draws: dict[int, int] = {}

    def _training_key(self, layer) -> tuple[int, int, int]:
        """(layer index, step, draw) of this training forward; counts the draw."""
        index = self.layer_index(layer)
        draw = self._draws.get(index, 0)
        if not torch.is_inference_mode_enabled():
            self._draws[index] = draw + 1
        return index, self.step, draw

    def _u(self, layer, training: bool) -> torch.Tensor:
        if training:
            index, step, draw = self._training_key(layer)
        else:
            if self.eval_mask == "expected":
                return torch.full(layer.scores.shape, 0.5, dtype=torch.float32, device=layer.scores.device)
            index, draw, step = self.layer_index(layer), 0, EVAL_STEP
        return uniform_draw(layer.scores.shape, layer.scores.device, generator=self.generator, seed=self.seed,
                            step=step, layer=index, draw=draw)

    def _philox_fused(self, layer, weight: torch.Tensor) -> bool:
        """Whether this training forward can take FusedPhiloxMask (module docstring of that class)."""
        scores = layer.scores
        return (layer.training and self.generator == "philox" and not self.dynamic_scaling and _FUSED_OP
                and scores.device.type == "cpu" and weight.device.type == "cpu" and scores.dtype == torch.float32
                and weight.dtype == torch.float32 and not weight.requires_grad
                and weight.shape == scores.shape and not torch.compiler.is_compiling())

    def _mask_value(self, layer, training: bool) -> torch.Tensor:
        """The mask in the scores' dtype, carrying σ'(S) to the scores."""
        return BernoulliSTE.apply(layer.scores, self._u(layer, training).to(layer.scores.dtype))

    def _fused(self, device: torch.device, layer) -> bool:
        """Whether the layer's forward runs the fused "sampled" op (C++ on CPU, Triton on CUDA; no dynamic scaling)."""
        return not self.dynamic_scaling and ops.policy_fused(device, layer.backend)

    def effective_weight(self, layer, weight: torch.Tensor | None = None) -> torch.Tensor:
        weight = self._weight(layer, weight)
        if self._philox_fused(layer, weight):
            index, step, draw = self._training_key(layer)
            key = (self.seed & 0xFFFFFFFF) | ((step & 0xFFFFFFFF) << 32)
            return FusedPhiloxMask.apply(layer.scores, weight, key, index, SUPERMASK_STREAM + draw)
        if self._fused(weight.device, layer):
            return ops.policy_apply_mask(weight, layer.scores, None, "sampled", u=self._u(layer, layer.training),
                                         backend=layer.backend)
        m = self._mask_value(layer, layer.training)
        w_eff = weight * m.to(weight.dtype)
        if self.dynamic_scaling:
            w_eff = w_eff * (m.numel() / m.sum().clamp_min(1.0)).to(weight.dtype)
        return w_eff

    def linear(self, layer, x: torch.Tensor) -> torch.Tensor:
        if self._philox_fused(layer, layer.weight):  # draw and mask in one pass, then the GEMM
            return linear_out(x, self.effective_weight(layer), layer.bias)
        if self._fused(x.device, layer):
            return ops.policy_masked_linear(x, layer.weight, layer.scores, None, layer.bias, mode="sampled",
                                            u=self._u(layer, layer.training), backend=layer.backend)
        return linear_out(x, self.effective_weight(layer), layer.bias)

    @torch.no_grad()
    def masked_weight(self, layer, weight: torch.Tensor | None = None) -> torch.Tensor:
        """W_eff with the evaluation mask, whatever the layer's mode (draws nothing new)."""
        weight = self._weight(layer, weight)
        m = self._mask_value(layer, training=False)
        w_eff = weight * m.to(weight.dtype)
        if self.dynamic_scaling:
            w_eff = w_eff * (m.numel() / m.sum().clamp_min(1.0)).to(weight.dtype)
        return w_eff

    @torch.no_grad()
    def mask(self, layer) -> torch.Tensor:
        """The evaluation mask (what mask_stats and to_dense report); draws nothing new."""
        u = self._u(layer, training=False)
        return u.to(layer.scores.dtype) < torch.sigmoid(layer.scores)

    def after_step(self, layers: Sequence, step: int) -> None:
        if step != self.step:
            self.step = int(step)
            self._draws.clear()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "step": self.step, "draws": dict(self._draws)}

    def load_state_dict(self, state: Mapping) -> None:
        saved = state.get("options") if isinstance(state, Mapping) else None
        if (isinstance(saved, Mapping) and saved.get("generator") == "torch" and self.generator != "torch"
                and not self._generator_given):  # saved when "torch" was the default: it goes on drawing as it did
            self.generator = "torch"
            self.options = {**self.options, "generator": "torch"}
        super().load_state_dict(state)
        self.step = int(state["step"])
        self._draws = {int(k): int(v) for k, v in state["draws"].items()}
