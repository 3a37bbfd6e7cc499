"""The public mask ops: input checks, backend choice, torch.library registration and autograd.

Every op validates its arguments here, once, before any kernel runs, then dispatches to a backend
from ``BACKENDS``. A backend is a row of four functions; adding one (Triton) touches only that table.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from . import reference

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SCORE_DTYPES = (torch.float32, torch.float64)


# --------------------------------------------------------------------------------------------
# Argument checks: each names the argument and what is accepted.
# --------------------------------------------------------------------------------------------

def check_density(density: float, name: str = "density") -> float:
    """A density is the fraction of weights kept: a real number in (0, 1].

    While torch.compile traces, a density may be a symbolic float (after a recompile for another
    value) that cannot be tested in Python; it was checked where the layer was made.
    """
    if torch.compiler.is_compiling():
        return density
    if isinstance(density, bool) or not isinstance(density, (int, float)):
        raise TypeError(f"{name} must be a float in (0, 1], got {type(density).__name__}")
    density = float(density)
    if not (math.isfinite(density) and 0.0 < density <= 1.0):
        raise ValueError(f"{name} must be in (0, 1], got {density}")
    return density


def _check_tensor(value, name: str, dtypes: Sequence[torch.dtype]) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in dtypes:
        accepted = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({accepted}), got {str(value.dtype).replace('torch.', '')}")
    return value


def _check_same_device(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.device != b.device:
        raise ValueError(f"{name_a} and {name_b} must be on the same device, got {a.device} and {b.device}")


def _check_finite(scores: torch.Tensor, name: str) -> None:
    # A data-dependent check: skipped while torch.compile traces (the C++ CPU kernel checks anyway).
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(scores).all()):
        raise ValueError(f"{name} must be finite, found NaN or inf")


def _nonfinite_message(name: str) -> str:
    return f"{name} must be finite, found NaN or inf"


def _check_finite_on_device(value: torch.Tensor, name: str) -> None:
    """The finiteness check of a GPU op without a device-to-host sync: torch._assert_async on the device.

    `value` is the threshold of a backend whose selection returns NaN when a score is NaN or inf (one
    0-d tensor, no extra pass), else the scores themselves (one reduction, still no sync). A failure
    raises RuntimeError at the next synchronisation, with the message of the CPU check.
    """
    ok = torch.isfinite(value) if value.dim() == 0 else torch.isfinite(value).all()
    torch._assert_async(ok, _nonfinite_message(name))


def _finite_threshold(impl, t: torch.Tensor, scores_list, names) -> torch.Tensor:
    """t, checked on the device (no host sync) when the scores live off the CPU; CPU scores were checked before."""
    if scores_list[0].device.type != "cpu":
        if impl.nan_threshold_if_nonfinite:
            _check_finite_on_device(t, names[0] if len(names) == 1 else "scores")
        else:
            for scores, name in zip(scores_list, names):
                _check_finite_on_device(scores, name)
    return t


def _check_finite_before(impl, scores_list, names) -> None:
    """The host-side check, for CPU scores only (there it costs a pass and no sync); kernels that check
    themselves (the C++ CPU ones) skip it. GPU scores are checked by _finite_threshold instead."""
    if scores_list[0].device.type == "cpu" and not impl.checks_finite:
        for scores, name in zip(scores_list, names):
            _check_finite(scores, name)


def _check_scores(scores, name: str = "scores") -> torch.Tensor:
    _check_tensor(scores, name, SCORE_DTYPES)
    if scores.numel() == 0:
        raise ValueError(f"{name} must have at least one element")
    return scores


def _check_weight_and_scores(weight, scores) -> None:
    _check_tensor(weight, "weight", FLOAT_DTYPES)
    _check_scores(scores)
    if weight.shape != scores.shape:
        raise ValueError(f"scores must have the weight's shape {tuple(weight.shape)}, got {tuple(scores.shape)}")
    _check_same_device("weight", weight, "scores", scores)


def _check_mask_args(weight, scores, t) -> torch.Tensor:
    """Checks weight/scores/t and returns t as a 0-d tensor of the scores' dtype and device."""
    _check_weight_and_scores(weight, scores)
    if isinstance(t, (int, float)) and not isinstance(t, bool):
        t = torch.tensor(float(t), dtype=scores.dtype, device=scores.device)
    _check_tensor(t, "t", FLOAT_DTYPES)
    if t.dim() != 0:
        raise ValueError(f"t must be a 0-d tensor (a threshold), got shape {tuple(t.shape)}")
    _check_same_device("t", t, "scores", scores)
    return t.detach().to(scores.dtype)


def _check_linear_args(x, weight: torch.Tensor, bias) -> None:
    """x and bias against a (checked) weight of shape (out_features, in_features)."""
    _check_tensor(x, "x", FLOAT_DTYPES)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x's last dimension must equal in_features={weight.shape[1]}, got shape {tuple(x.shape)}")
    _check_same_device("x", x, "weight", weight)
    if bias is not None:
        _check_tensor(bias, "bias", FLOAT_DTYPES)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},) (out_features), got {tuple(bias.shape)}")
        _check_same_device("bias", bias, "weight", weight)


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Backend:
    """One implementation of the four ops, plus a test of whether it runs on a device."""

    name: str
    is_available: Callable[[torch.device], bool]
    threshold: Callable[[torch.Tensor, float, bool, torch.Tensor | None], torch.Tensor]  # (scores, density, abs, hint)
    global_threshold: Callable[[list, float, bool, torch.Tensor | None], torch.Tensor]
    apply_mask: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], torch.Tensor]
    masked_linear: Callable[..., torch.Tensor]
    checks_finite: bool = False  # True where the kernel itself rejects NaN/inf scores on CPU
    # True where the threshold is NaN when a score is NaN/inf (on GPUs): then t alone is checked, on the device
    nan_threshold_if_nonfinite: bool = False
    # (x, weight, scores, density, bias, abs, hint) -> (Y, t) in one call; None: threshold, then masked_linear
    masked_linear_topk: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None


BACKENDS: dict[str, Backend] = {}
# The order "auto" tries, fastest first, per device type; the reference closes every list.
AUTO_ORDER: dict[str, tuple[str, ...]] = {"cuda": ("triton", "cpp", "torch"), "cpu": ("cpp", "torch")}


def register_backend(backend: Backend) -> None:
    BACKENDS[backend.name] = backend


def _backend_order(device: torch.device) -> list[str]:
    """Every registered backend's name, in the order "auto" tries them on `device`."""
    order = AUTO_ORDER.get(device.type, ("torch",))
    return [n for n in order if n in BACKENDS] + [n for n in BACKENDS if n not in order]


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The backends that run on `device`, in the order "auto" tries them."""
    device = torch.device(device)
    return [n for n in _backend_order(device) if BACKENDS[n].is_available(device)]


def check_backend_name(backend: str) -> str:
    """Rejects a backend name that is neither "auto" nor a registered backend ("cpp" without maskprune._C:
    with the reason it did not load)."""
    if backend == "cpp" and "cpp" not in BACKENDS:
        raise ValueError(f"backend 'cpp' is unavailable: the compiled kernels (maskprune._C) did not load "
                         f"({CPP_UNAVAILABLE_REASON}). To fix: {_extension_fix(CPP_UNAVAILABLE_REASON)}; "
                         f"or use backend='auto' or 'torch'")
    if not isinstance(backend, str) or (backend != "auto" and backend not in BACKENDS):
        accepted = ", ".join(["auto", *BACKENDS])
        raise ValueError(f"backend must be one of ({accepted}), got {backend!r}")
    return backend


def resolve_backend(backend: str, device: torch.device) -> Backend:
    """The Backend for a name ("auto" = the first available in AUTO_ORDER) on a device."""
    check_backend_name(backend)
    if backend == "auto":  # the first available; the ones after it are not asked (this runs on every op call)
        return next(BACKENDS[n] for n in _backend_order(device) if BACKENDS[n].is_available(device))
    chosen = BACKENDS[backend]
    if not chosen.is_available(device):
        why = ""
        if backend == "cpp" and device.type == "cuda":
            why = " (maskprune._C was built without its CUDA part: torch without CUDA, no nvcc, or MASKPRUNE_NO_CUDA=1)"
        raise ValueError(f"backend {backend!r} is not available on {device}{why}; available there: "
                         f"{', '.join(available_backends(device))}")
    return chosen


register_backend(Backend(
    name="torch",
    is_available=lambda device: True,
    threshold=lambda s, d, a, hint: reference.threshold(s, d, a),
    global_threshold=lambda ss, d, a, hint: reference.global_threshold(ss, d, a),
    apply_mask=reference.apply_mask,
    masked_linear=reference.masked_linear,
))


# --------------------------------------------------------------------------------------------
# Autograd formulas of the Triton ops (the C++ ops carry the same in csrc/autograd.cpp)
# --------------------------------------------------------------------------------------------

def register_apply_mask_autograd(op, score_grad_op: Callable) -> None:
    """Autograd of an apply_mask(weight, scores, t, abs_scores, ...) op: dS = score_grad_op(g, W, S).

    For the Triton backend; the C++ op carries the same formula in csrc/autograd.cpp (no Python per step).
    """

    def setup_context(ctx, inputs, output):
        weight, scores, t, abs_scores, *_ = inputs
        ctx.save_for_backward(weight, scores)
        ctx.abs_scores = abs_scores

    def backward(ctx, grad):
        weight, scores = ctx.saved_tensors
        grad_scores = score_grad_op(grad, weight, scores, ctx.abs_scores) if ctx.needs_input_grad[1] else None
        return (None, grad_scores) + (None,) * (len(ctx.needs_input_grad) - 2)

    torch.library.register_autograd(op, backward, setup_context=setup_context)


def register_masked_linear_autograd(op, backward_op: Callable) -> None:
    """Autograd of a masked_linear(x, weight, scores, t, bias, abs_scores) op (the Triton backend's;
    the C++ op's is in csrc/autograd.cpp).

    backward_op(grad, x, weight, scores, t, abs_scores, need_x, need_scores) -> (dX, dS); the bias
    gradient is the sum of grad over the leading dimensions; the weight never gets one.
    """

    def setup_context(ctx, inputs, output):
        x, weight, scores, t, bias, abs_scores = inputs
        ctx.save_for_backward(x, weight, scores, t)
        ctx.abs_scores = abs_scores
        ctx.bias_dtype = None if bias is None else bias.dtype

    def backward(ctx, grad):
        x, weight, scores, t = ctx.saved_tensors
        need_x, _, need_scores, _, need_bias, _ = ctx.needs_input_grad
        grad_x, grad_scores = backward_op(grad, x, weight, scores, t, ctx.abs_scores, need_x, need_scores)
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype) if need_bias else None
        return grad_x if need_x else None, None, grad_scores if need_scores else None, None, grad_bias, None

    torch.library.register_autograd(op, backward, setup_context=setup_context)


# --------------------------------------------------------------------------------------------
# The C++/CUDA extension: fake (meta) kernels for the ops whose schema is in csrc/ops.cpp
# --------------------------------------------------------------------------------------------

def _build_torch_requirement() -> str | None:
    """The torch requirement the installed maskprune was built with (`torch==X.Y.Z`), if installed."""
    try:
        from importlib.metadata import PackageNotFoundError, requires
        return next((r for r in requires("maskprune") or [] if r.replace(" ", "").startswith("torch==")), None)
    except (ImportError, PackageNotFoundError):
        return None


def _extension_fix(reason: str) -> str:
    """What to do about an extension that did not load: the torch it needs, or how to build it."""
    wanted = _build_torch_requirement()
    fix = "rebuild it against this torch: `pip install --no-build-isolation -e .` in a source checkout"
    if wanted is not None and wanted.replace(" ", "") != f"torch=={torch.__version__.split('+')[0]}":
        fix = f"install the torch it was built for (`pip install \"{wanted}\"`), or " + fix
    if "No module named" in reason:
        fix = "build it: `pip install --no-build-isolation -e .` (or `make install`) in the source checkout"
    return fix


def _load_extension() -> tuple[bool, str]:
    """(loaded, why not). A wheel's _C links against the exact torch build it was compiled with: any other
    torch fails here with an undefined symbol or a missing library, and maskprune then runs without it."""
    try:
        from . import _C  # noqa: F401  (registers torch.ops.maskprune.*)
    except (ImportError, OSError) as e:
        return False, f"{type(e).__name__}: {e}"
    return True, ""


HAS_CPP, CPP_UNAVAILABLE_REASON = _load_extension()
if not HAS_CPP:
    # Once per process (the module is imported once): the fallback is slow, and must not be silent.
    _fallback = "triton or the slow 'torch' reference" if torch.cuda.is_available() else "the slow 'torch' reference"
    warnings.warn(f"maskprune: the compiled kernels (maskprune._C) did not load ({CPP_UNAVAILABLE_REASON}); "
                  f"backend 'cpp' is unavailable and 'auto' falls back to {_fallback}. "
                  f"To fix: {_extension_fix(CPP_UNAVAILABLE_REASON)}. torch here: {torch.__version__}.",
                  RuntimeWarning, stacklevel=2)


def cpu_cache_bytes() -> int:
    """Bytes of freed CPU buffers the C++ kernels keep for reuse by the next training step.

    The kernels' CPU outputs of 1 MB or more (W ⊙ M from apply_mask / threshold_and_mask, the weight
    gradient that becomes dS) come from this cache; without it glibc hands that memory back to the OS
    between steps and page-faults it back in. It holds at most MASKPRUNE_CPU_CACHE_MB megabytes (read
    on first use; default 256, 0 turns it off; the oldest buffers are evicted to make room). 0 when the
    extension is not built.
    """
    if not HAS_CPP:
        return 0
    from . import _C
    return _C.cpu_cache_bytes()


def release_cpu_cache() -> None:
    """Frees the buffers counted by cpu_cache_bytes() (e.g. after training, before other work)."""
    if HAS_CPP:
        from . import _C
        _C.release_cpu_cache()


def _cpp_device_types() -> frozenset[str]:
    """Device types with compiled kernels in maskprune._C ("cpu", and "cuda" in a CUDA build).

    Read once at import: torch.compile cannot trace the dispatcher query, but it can a constant set.
    """
    if not HAS_CPP:
        return frozenset()
    keys = {"cpu": "CPU", "cuda": "CUDA"}
    return frozenset(d for d, key in keys.items()
                     if torch._C._dispatch_has_kernel_for_dispatch_key("maskprune::threshold", key))


CPP_DEVICE_TYPES = _cpp_device_types()


def _cpp_available(device: torch.device) -> bool:
    return device.type in CPP_DEVICE_TYPES


if HAS_CPP:
    _lib = "maskprune::"

    @torch.library.register_fake(_lib + "threshold")
    def _(scores, density, abs_scores, hint=None):
        return scores.new_empty(())

    @torch.library.register_fake(_lib + "global_threshold")
    def _(scores, density, abs_scores, hint=None):
        return scores[0].new_empty(())

    @torch.library.register_fake(_lib + "apply_mask")
    def _(weight, scores, t, abs_scores, dtype=None):
        return weight.new_empty(weight.shape, dtype=dtype or weight.dtype)

    @torch.library.register_fake(_lib + "score_grad")
    def _(grad_weight, weight, scores, abs_scores):
        return scores.new_empty(scores.shape)

    @torch.library.register_fake(_lib + "score_grad_")
    def _(grad_weight, weight, scores, abs_scores):
        return None

    @torch.library.register_fake(_lib + "masked_linear")
    def _(x, weight, scores, t, bias, abs_scores):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    @torch.library.register_fake(_lib + "threshold_and_mask")
    def _(weight, scores, density, abs_scores, hint=None, dtype=None):
        return scores.new_empty(()), weight.new_empty(weight.shape, dtype=dtype or weight.dtype)

    @torch.library.register_fake(_lib + "threshold_and_mask_signs")
    def _(weight, scores, density, abs_scores, hint=None, dtype=None):
        signs = scores.new_empty(((scores.numel() + 3) // 4,), dtype=torch.uint8)
        return scores.new_empty(()), weight.new_empty(weight.shape, dtype=dtype or weight.dtype), signs

    @torch.library.register_fake(_lib + "score_grad_signs_")
    def _(grad_weight, weight, signs):
        return None

    @torch.library.register_fake(_lib + "masked_linear_topk")
    def _(x, weight, scores, density, bias, abs_scores, hint=None):
        return x.new_empty((*x.shape[:-1], weight.shape[0])), scores.new_empty(())

    @torch.library.register_fake(_lib + "masked_linear_backward")
    def _(grad_out, x, weight, scores, t, abs_scores, need_grad_x, need_grad_scores, signs=None):
        grad_x = x.new_empty(x.shape) if need_grad_x else x.new_empty((0,))
        grad_scores = scores.new_empty(scores.shape) if need_grad_scores else scores.new_empty((0,))
        return grad_x, grad_scores

    # apply_mask, masked_linear and masked_linear_topk have their autograd in C++ (csrc/autograd.cpp): on
    # CPU the forward keeps W ⊙ M for dX, and dS is written over the backward's own weight-gradient GEMM output.

    register_backend(Backend(
        name="cpp",
        is_available=_cpp_available,
        threshold=lambda s, d, a, hint: torch.ops.maskprune.threshold(s, d, a, hint),
        global_threshold=lambda ss, d, a, hint: torch.ops.maskprune.global_threshold(ss, d, a, hint),
        apply_mask=lambda w, s, t, a: torch.ops.maskprune.apply_mask(w, s, t, a),
        masked_linear=lambda x, w, s, t, b, a: torch.ops.maskprune.masked_linear(x, w, s, t, b, a),
        checks_finite=True,
        nan_threshold_if_nonfinite=True,  # csrc/cuda/mask_ops.cu counts non-finite scores in the first pass
        masked_linear_topk=lambda x, w, s, d, b, a, hint: torch.ops.maskprune.masked_linear_topk(x, w, s, d, b, a,
                                                                                                  hint),
    ))


def _register_triton() -> None:
    """The Triton backend registers itself when triton imports (CUDA, or CPU under TRITON_INTERPRET=1)."""
    if os.environ.get("MASKPRUNE_NO_TRITON") == "1":
        return
    try:
        from . import triton_ops  # noqa: F401
    except ImportError:
        return


_register_triton()


# --------------------------------------------------------------------------------------------
# Public ops
# --------------------------------------------------------------------------------------------

def _check_hint(hint) -> torch.Tensor | None:
    if hint is None:
        return None
    _check_tensor(hint, "hint", FLOAT_DTYPES)
    if hint.dim() != 0:
        raise ValueError(f"hint must be None or a 0-d tensor (a previous threshold), got shape {tuple(hint.shape)}")
    return hint.detach()


def threshold(scores: torch.Tensor, density: float, *, abs_scores: bool = True,
              backend: str = "auto", hint: torch.Tensor | None = None) -> torch.Tensor:
    """A 0-d tensor t such that exactly n_keep = clamp(floor(density·n + 1/2), 1, n) keys are >= t.

    The key is |scores| (or scores when abs_scores=False); ties at t are all kept. t has the
    scores' dtype (float32, or float64 for float64 scores) and carries no gradient. `hint`, a
    previous threshold of the same scores, lets the CPU kernel search near it first (one pass
    instead of a full selection); t never depends on it.
    """
    _check_scores(scores)
    density = check_density(density)
    hint = _check_hint(hint)
    impl = resolve_backend(backend, scores.device)
    _check_finite_before(impl, [scores], ["scores"])
    return _finite_threshold(impl, impl.threshold(scores.detach(), density, bool(abs_scores), hint), [scores],
                             ["scores"])


def global_threshold(scores_list: Sequence[torch.Tensor], density: float, *, abs_scores: bool = True,
                     backend: str = "auto", hint: torch.Tensor | None = None) -> torch.Tensor:
    """One threshold over several score tensors together (global top-k), without concatenating them.

    `hint` is a previous threshold of the same scores, as for threshold().
    """
    if isinstance(scores_list, torch.Tensor) or not isinstance(scores_list, (list, tuple)) or not scores_list:
        raise TypeError("scores_list must be a non-empty list or tuple of score tensors")
    for i, scores in enumerate(scores_list):
        _check_scores(scores, f"scores_list[{i}]")
        _check_same_device(f"scores_list[{i}]", scores, "scores_list[0]", scores_list[0])
        if scores.dtype != scores_list[0].dtype:
            raise TypeError(f"scores_list[{i}] must have the dtype of scores_list[0] ({scores_list[0].dtype}), "
                            f"got {scores.dtype}")
    density = check_density(density)
    hint = _check_hint(hint)
    impl = resolve_backend(backend, scores_list[0].device)
    names = [f"scores_list[{i}]" for i in range(len(scores_list))]
    _check_finite_before(impl, scores_list, names)
    t = impl.global_threshold([s.detach() for s in scores_list], density, bool(abs_scores), hint)
    return _finite_threshold(impl, t, scores_list, names)


def apply_mask(weight: torch.Tensor, scores: torch.Tensor, t: torch.Tensor, *, abs_scores: bool = True,
               backend: str = "auto") -> torch.Tensor:
    """W ⊙ 1[key >= t], with the straight-through gradient dS = sign(S) ⊙ W ⊙ g (W ⊙ g for raw scores)."""
    t = _check_mask_args(weight, scores, t)
    return resolve_backend(backend, weight.device).apply_mask(weight, scores, t, bool(abs_scores))


def masked_linear(x: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor, t: torch.Tensor,
                  bias: torch.Tensor | None = None, *, abs_scores: bool = True,
                  backend: str = "auto") -> torch.Tensor:
    """Y = X (W ⊙ M)^T (+ b) for x of shape (..., in_features), computed in x's dtype.

    Gradients flow to x, scores and bias, never to weight. A weight of another float dtype than x
    (e.g. float32 weights under bf16 autocast) is cast in the mask pass.
    """
    t = _check_mask_args(weight, scores, t)
    _check_linear_args(x, weight, bias)
    impl = resolve_backend(backend, x.device)
    return impl.masked_linear(x, weight, scores, t, bias, bool(abs_scores))


def masked_linear_topk(x: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor, density: float,
                       bias: torch.Tensor | None = None, *, abs_scores: bool = True, backend: str = "auto",
                       hint: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(Y, t): masked_linear with t = threshold(scores, density, hint=hint) found in the same call.

    What a masked layer runs after an optimizer step: the C++ CPU kernel then finds t in the mask pass
    itself (one read of the scores less), when t lies within 0.2% of the hint. Y and t are exactly
    those of threshold() followed by masked_linear(); t carries no gradient.
    """
    _check_weight_and_scores(weight, scores)
    _check_linear_args(x, weight, bias)
    density = check_density(density)
    hint = _check_hint(hint)
    impl = resolve_backend(backend, x.device)
    _check_finite_before(impl, [scores], ["scores"])
    if impl.masked_linear_topk is not None:
        y, t = impl.masked_linear_topk(x, weight, scores, density, bias, bool(abs_scores), hint)
        return y, _finite_threshold(impl, t, [scores], ["scores"])
    t = _finite_threshold(impl, impl.threshold(scores.detach(), density, bool(abs_scores), hint), [scores],
                          ["scores"])
    return impl.masked_linear(x, weight, scores, t, bias, bool(abs_scores)), t


# --------------------------------------------------------------------------------------------
# Mask policies (issue 17): the fused passes of csrc/cpu/policy_ops.cpp and csrc/cuda/policy_ops.cu (and of
# maskprune/kernels/policy.py), one `mode` per rule
# --------------------------------------------------------------------------------------------

POLICY_MODES = ("topk", "raw", "signed", "binary", "sampled")
"""The rules of policy_apply_mask / policy_masked_linear (W_eff and dS; g = ∂L/∂W_eff):
topk    W ⊙ 1[|S| >= t],            dS = sign(S) ⊙ W ⊙ g   (edge-popup)
raw     W ⊙ 1[S >= t],              dS = W ⊙ g             (threshold, gem_miner)
signed  W ⊙ sign(S) ⊙ 1[|S| >= t],  dS = W ⊙ g             (signed supermask)
binary  α sign(W) ⊙ 1[|S| >= t],    dS = sign(S) ⊙ W ⊙ g   (biprop; α = ‖M ⊙ W‖₁ / ‖M‖₀, no gradient)
sampled W ⊙ 1[u < σ(S)],            dS = σ'(S) ⊙ W ⊙ g     (supermask; u given, t unused)"""

if HAS_CPP:
    @torch.library.register_fake(_lib + "policy_mask")
    def _(weight, scores, t, mode, u=None, dtype=None):
        alpha = scores.new_empty((), dtype=torch.promote_types(weight.dtype, torch.float32))
        deriv = scores.new_empty(scores.shape if mode == "sampled" else (0,))
        return weight.new_empty(weight.shape, dtype=dtype or weight.dtype), alpha, deriv

    @torch.library.register_fake(_lib + "policy_apply_mask")
    def _(weight, scores, t, mode, u=None, dtype=None):
        return weight.new_empty(weight.shape, dtype=dtype or weight.dtype)

    @torch.library.register_fake(_lib + "policy_score_grad")
    def _(grad_weight, weight, scores, mode, u=None):
        return scores.new_empty(scores.shape)

    @torch.library.register_fake(_lib + "policy_masked_linear")
    def _(x, weight, scores, t, bias, mode, u=None):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    @torch.library.register_fake(_lib + "policy_linear_score_grad")
    def _(grad_out, x, weight, scores, mode, u=None):
        return scores.new_empty(scores.shape)


def _check_policy_args(weight, scores, t, mode: str, u) -> torch.Tensor:
    """Checks mode, u and the mask arguments; returns t as apply_mask's checks do (sampled: t may be None)."""
    if not isinstance(mode, str) or mode not in POLICY_MODES:
        raise ValueError(f"mode must be one of ({', '.join(POLICY_MODES)}), got {mode!r}")
    if mode == "sampled":
        if u is None:
            raise ValueError("mode 'sampled' needs u (uniform draws in [0, 1) of the scores' shape)")
        _check_tensor(u, "u", SCORE_DTYPES)
        _check_scores(scores)
        if u.shape != scores.shape:
            raise ValueError(f"u must have the scores' shape {tuple(scores.shape)}, got {tuple(u.shape)}")
        _check_same_device("u", u, "scores", scores)
        if t is None:
            t = 0.0
    elif u is not None:
        raise ValueError(f"u is only taken by mode 'sampled', not by {mode!r}")
    return _check_mask_args(weight, scores, t)


def backend_runs(name: str, device: torch.device) -> bool:
    """Whether the backend `name` is registered and runs on `device`."""
    return name in BACKENDS and BACKENDS[name].is_available(device)


def _policy_triton(device: torch.device, backend: str) -> bool:
    """Whether the policy ops run the Triton kernels (maskprune.kernels.policy): backend "triton", or "auto" on
    CUDA, where the Triton backend is available for the device."""
    if not backend_runs("triton", device):
        return False
    return backend == "triton" or (backend == "auto" and device.type == "cuda")


def policy_fused(device: torch.device | str, backend: str = "auto") -> bool:
    """Whether policy_apply_mask / policy_masked_linear run a fused kernel for tensors on `device` with `backend`:
    the Triton passes (CUDA by default; CPU under TRITON_INTERPRET=1 with backend="triton"), or the C++ passes of
    maskprune._C (CPU; CUDA with backend="cpp", or when Triton is missing). With backend "torch" they run the
    torch reference."""
    device = torch.device(device)
    check_backend_name(backend)
    return _policy_triton(device, backend) or _policy_cpp(device, backend)


def _policy_cpp(device: torch.device, backend: str) -> bool:
    """Whether the policy ops run the C++ passes of maskprune._C for this device and backend: its CPU kernels, or
    its CUDA kernels (csrc/cuda/policy_ops.cu) where it was built with them and Triton is not chosen."""
    return "cpp" in BACKENDS and resolve_backend(backend, device).name == "cpp"


def policy_apply_mask(weight: torch.Tensor, scores: torch.Tensor, t: torch.Tensor | float | None, mode: str, *,
                      u: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """W_eff of a policy's `mode` (POLICY_MODES) with its straight-through dS; no gradient to weight, t or u.

    The C++ pass on CPU with backend "auto"/"cpp", the Triton passes on CUDA (and with backend "triton"), the torch
    reference elsewhere (see policy_fused).
    """
    t = _check_policy_args(weight, scores, t, mode, u)
    if _policy_triton(weight.device, backend):
        from . import triton_policy
        return triton_policy.policy_apply_mask(weight, scores, t, mode, u)
    if _policy_cpp(weight.device, backend):
        return torch.ops.maskprune.policy_apply_mask(weight, scores, t, mode, u)
    return reference.policy_apply_mask(weight, scores, t, mode, u)


def policy_masked_linear(x: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor,
                         t: torch.Tensor | float | None, bias: torch.Tensor | None = None, *, mode: str,
                         u: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """Y = X W_effᵀ (+ b) in x's dtype with W_eff of `mode`; gradients to x, scores and bias.

    On CPU one pass writes W_eff / α for the GEMM (α, biprop's gain, found in that pass, scales the GEMM's
    output and dX) and one pass over the weight-gradient GEMM's output gives dS. With Triton (CUDA) the mask pass
    writes α Q in x's dtype for the platform GEMM and one elementwise pass gives dS; elsewhere the torch reference.
    """
    t = _check_policy_args(weight, scores, t, mode, u)
    _check_linear_args(x, weight, bias)
    if _policy_triton(x.device, backend):
        from . import triton_policy
        return triton_policy.policy_masked_linear(x, weight, scores, t, bias, mode, u)
    if _policy_cpp(x.device, backend):
        return torch.ops.maskprune.policy_masked_linear(x, weight, scores, t, bias, mode, u)
    return reference.policy_masked_linear(x, weight, scores, t, bias, mode, u)
