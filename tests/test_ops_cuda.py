"""The CUDA ops of maskprune._C: against the CPU ops (bit for bit), plain PyTorch formulas and
maskprune.reference (masked_linear: the mask pass + cuBLAS).

Every test but one needs a GPU and is skipped elsewhere with the reason "needs a CUDA GPU" (the
CUDA sources are still compiled by the build). test_cuda_kernels_registered_in_build runs anywhere:
when maskprune._C was built with its CUDA part, every op must have a CUDA kernel registered.

Tolerances of the fused masked GEMMs (masked_linear / masked_linear_backward against the reference
run on the same GPU), per dtype, relative to the largest |value| of the expected tensor
(|got - want| <= tol·|want| + tol·max|want|), the same scale-relative rule as tests/test_ops.py:
  float64   1e-12  (the same products, summed in another order: ~sqrt(K)·2^-53 of the scale)
  float32   1e-5   (IEEE float32 FMA in both, no TF32; the score gradient is rounded once more)
  bfloat16  2e-2   (outputs rounded to bf16 in both; the reference also rounds dW = dY^T X and
                   W·dW to bf16 before the float32 score gradient, the kernel keeps float32)
  float16   2e-3   (the same, with float16's 2^-11 unit roundoff)
A comparison uses the loosest tolerance of the dtypes involved (x, weight, scores), because the
reference rounds the score gradient through the weight's dtype.
"""
import math
from pathlib import Path

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")

pytest.importorskip("maskprune._C", reason="maskprune._C is not built (pip install --no-build-isolation -e .)")

import maskprune._C  # noqa: E402  (after the importorskip above)
from maskprune import reference  # noqa: E402

ops = torch.ops.maskprune

FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
SCORE_DTYPES = [torch.float32, torch.float64]
# The fused GEMMs against the reference: see the module docstring.
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}
EXACT = dict(rtol=0, atol=0)
DENSITIES = [1e-9, 0.01, 0.1, 0.5, 0.9, 1.0]
CUDA = "cuda"


def n_keep_for(density: float, n: int) -> int:
    return min(max(int(math.floor(density * n + 0.5)), 1), n)


def key_of(scores: torch.Tensor, abs_scores: bool) -> torch.Tensor:
    return scores.abs() if abs_scores else scores


def kth_largest(scores: torch.Tensor, density: float, abs_scores: bool) -> torch.Tensor:
    key = key_of(scores, abs_scores).flatten()
    n = key.numel()
    return key.kthvalue(n - n_keep_for(density, n) + 1).values


INT_OF = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
          torch.float64: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, so that -0.0 and +0.0 (and NaN payloads) count as different."""
    return t.detach().cpu().view(INT_OF[t.dtype])


def assert_same_bits(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(bits(got), bits(want)), f"{got} != {want}"


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_scores(kind: str, numel: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """CPU scores: normal, distinct magnitudes (tie-free under |.|), heavy ties, or exponents spanning far."""
    g = gen(seed)
    if kind == "normal":
        return torch.randn(numel, generator=g, dtype=dtype)
    if kind == "distinct":
        sign = torch.randint(0, 2, (numel,), generator=g).to(dtype) * 2 - 1
        return (torch.randperm(numel, generator=g) + 1).to(dtype) * sign * 2**-7
    if kind == "ties":  # small integers with both signed zeros
        s = torch.randint(-3, 4, (numel,), generator=g).to(dtype)
        zero_sign = torch.where(torch.rand(numel, generator=g) < 0.5, -1.0, 1.0).to(dtype)
        return torch.where(s == 0, 0.0 * zero_sign, s)
    if kind == "zeros":
        return torch.zeros(numel, dtype=dtype)
    if kind == "wide":  # many exponents, so every 16-bit digit pass matters
        span = 60.0 if dtype == torch.float64 else 20.0
        return torch.randn(numel, generator=g, dtype=dtype) * torch.exp(
            (torch.rand(numel, generator=g, dtype=dtype) * 2 - 1) * span)
    raise ValueError(kind)


ALL_OPS = ("threshold", "global_threshold", "apply_mask", "score_grad", "score_grad_",  # cuda/mask_ops.cu
           "counter_weights_", "seed_apply_mask", "seed_score_grad_",  # cuda/rng_ops.cu
           "policy_mask", "policy_score_grad", "policy_linear_score_grad")  # cuda/policy_ops.cu
# Device-generic on CUDA too (csrc/masked_linear.cpp: the mask pass + cuBLAS, the score-gradient pass).
COMPOSITE_OPS = ("masked_linear", "masked_linear_backward", "masked_linear_topk", "threshold_and_mask",
                 "policy_apply_mask", "policy_masked_linear")


def extension_built_with_cuda() -> tuple[bool, str]:
    """Whether maskprune._C holds its CUDA part, judged from the library itself (it links torch's CUDA libraries)."""
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} has no CUDA, so maskprune._C was built CPU only"
    so = Path(maskprune._C.__file__)
    data = so.read_bytes()
    if b"libc10_cuda.so" not in data and b"libtorch_cuda.so" not in data:
        return False, f"{so.name} does not link torch's CUDA libraries: built CPU only (no nvcc, or MASKPRUNE_NO_CUDA=1)"
    return True, ""


def test_cuda_kernels_registered_in_build():
    """Runs without a GPU: an extension built with CUDA registers a CUDA kernel for every op of ops.cpp."""
    built, why = extension_built_with_cuda()
    if not built:
        print(f"skipped: {why}")
        pytest.skip(why)
    missing = [op for op in ALL_OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(f"maskprune::{op}", "CUDA")]
    assert not missing, f"no CUDA kernel registered for {missing}"
    not_composite = [op for op in COMPOSITE_OPS
                     if not torch._C._dispatch_has_kernel_for_dispatch_key(f"maskprune::{op}",
                                                                           "CompositeExplicitAutograd")]
    assert not not_composite, f"no device-generic kernel registered for {not_composite}"


# ---------------------------------------------------------------------------------------------
# threshold / global_threshold


@needs_cuda
@pytest.mark.parametrize("dtype", SCORE_DTYPES)
@pytest.mark.parametrize("abs_scores", [True, False])
@pytest.mark.parametrize("numel", [1, 2, 37 * 53, 1000, 2**20 + 3])
@pytest.mark.parametrize("density", DENSITIES)
def test_threshold_matches_cpu_and_kthvalue(dtype, abs_scores, numel, density):
    scores = make_scores("normal", numel, dtype, seed=numel)
    t = ops.threshold(scores.to(CUDA), density, abs_scores)
    assert t.device.type == "cuda" and t.dim() == 0 and t.dtype == dtype
    assert_same_bits(t, ops.threshold(scores, density, abs_scores))
    assert t.item() == kth_largest(scores, density, abs_scores).item()


@needs_cuda
@pytest.mark.parametrize("dtype", SCORE_DTYPES)
@pytest.mark.parametrize("abs_scores", [True, False])
@pytest.mark.parametrize("numel", [1, 1000, 2**20 + 3])
@pytest.mark.parametrize("density", DENSITIES)
def test_threshold_keeps_exactly_n_keep_without_ties(dtype, abs_scores, numel, density):
    scores = make_scores("distinct", numel, dtype, seed=1).to(CUDA)
    t = ops.threshold(scores, density, abs_scores)
    assert int((key_of(scores, abs_scores) >= t).sum()) == n_keep_for(density, numel)


@needs_cuda
@pytest.mark.parametrize("dtype", SCORE_DTYPES)
@pytest.mark.parametrize("abs_scores", [True, False])
@pytest.mark.parametrize("kind", ["ties", "zeros", "wide"])
@pytest.mark.parametrize("density", DENSITIES)
def test_threshold_ties_and_wide_exponents(dtype, abs_scores, kind, density):
    scores = make_scores(kind, 4099, dtype, seed=2)
    t = ops.threshold(scores.to(CUDA), density, abs_scores)
    assert_same_bits(t, ops.threshold(scores, density, abs_scores))
    assert t.item() == kth_largest(scores, density, abs_scores).item()


@needs_cuda
@pytest.mark.parametrize("dtype", SCORE_DTYPES)
def test_threshold_non_contiguous_and_misaligned(dtype):
    base = make_scores("normal", 37 * 53 + 1, dtype, seed=3)
    transposed = base[1:].reshape(37, 53).t()  # non-contiguous
    misaligned = base.to(CUDA)[1:]  # contiguous, but its data pointer is not 16-byte aligned
    for density in (0.05, 0.5):
        for abs_scores in (True, False):
            assert_same_bits(ops.threshold(transposed.to(CUDA), density, abs_scores),
                             ops.threshold(transposed, density, abs_scores))
            assert_same_bits(ops.threshold(misaligned, density, abs_scores),
                             ops.threshold(base[1:], density, abs_scores))


@needs_cuda
@pytest.mark.parametrize("dtype", SCORE_DTYPES)
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_threshold_non_finite_gives_nan(dtype, bad):
    # The CPU kernel raises; the CUDA kernel cannot without a host sync, so it flags with t = NaN
    # (maskprune/ops.py checks that t on the device with torch._assert_async, no host sync).
    scores = make_scores("normal", 1001, dtype).to(CUDA)
    scores[17] = bad
    for abs_scores in (True, False):
        assert math.isnan(ops.threshold(scores, 0.5, abs_scores).item())
        assert math.isnan(ops.global_threshold([scores[:5], scores[5:]], 0.5, abs_scores).item())


@needs_cuda
@pytest.mark.parametrize("dtype", SCORE_DTYPES)
@pytest.mark.parametrize("abs_scores", [True, False])
@pytest.mark.parametrize("kind", ["normal", "ties", "wide"])
@pytest.mark.parametrize("density", DENSITIES)
def test_global_threshold(dtype, abs_scores, kind, density):
    sizes = [1, 37 * 53, 1000]
    scores = [make_scores(kind, n, dtype, seed=i).reshape(-1) for i, n in enumerate(sizes)]
    scores[1] = scores[1].reshape(37, 53)
    t = ops.global_threshold([s.to(CUDA) for s in scores], density, abs_scores)
    assert t.device.type == "cuda" and t.dim() == 0 and t.dtype == dtype
    assert_same_bits(t, ops.global_threshold(scores, density, abs_scores))
    assert_same_bits(t, ops.threshold(torch.cat([s.flatten() for s in scores]).to(CUDA), density, abs_scores))
    assert t.item() == kth_largest(torch.cat([s.flatten() for s in scores]), density, abs_scores).item()


@needs_cuda
def test_global_threshold_with_an_empty_tensor():
    scores = [torch.empty(0, device=CUDA), make_scores("normal", 1000, torch.float32).to(CUDA)]
    assert_same_bits(ops.global_threshold(scores, 0.3, True), ops.threshold(scores[1], 0.3, True))


@needs_cuda
def test_threshold_errors():
    scores = torch.randn(100, device=CUDA)
    for density in (0.0, -0.1, 1.5, math.nan):
        with pytest.raises(ValueError):
            ops.threshold(scores, density, True)
    with pytest.raises(ValueError):
        ops.threshold(torch.empty(0, device=CUDA), 0.5, True)
    with pytest.raises(TypeError):
        ops.threshold(scores.half(), 0.5, True)
    with pytest.raises(TypeError):
        ops.global_threshold([scores, scores.double()], 0.5, True)
    with pytest.raises(ValueError):
        ops.global_threshold([scores, scores.cpu()], 0.5, True)


# ---------------------------------------------------------------------------------------------
# apply_mask / score_grad


def masked_reference(weight, scores, t, abs_scores, dtype):
    """W * M in the weight's dtype (so a masked negative weight gives -0.0), then cast."""
    return (weight * (key_of(scores, abs_scores) >= t).to(weight.dtype)).to(dtype)


@needs_cuda
@pytest.mark.parametrize("weight_dtype", FLOATS)
@pytest.mark.parametrize("out_dtype", [None] + FLOATS)
@pytest.mark.parametrize("score_dtype", SCORE_DTYPES)
@pytest.mark.parametrize("abs_scores", [True, False])
def test_apply_mask(weight_dtype, out_dtype, score_dtype, abs_scores):
    for shape in [(37, 53), (1001,), (64, 64)]:
        numel = math.prod(shape)
        weight = torch.randn(shape, generator=gen(4), dtype=torch.float64).to(weight_dtype)
        scores = make_scores("ties" if numel == 1001 else "normal", numel, score_dtype, seed=5).reshape(shape)
        t = ops.threshold(scores, 0.4, abs_scores)
        out = ops.apply_mask(weight.to(CUDA), scores.to(CUDA), t.to(CUDA), abs_scores, out_dtype)
        want_dtype = out_dtype or weight_dtype
        assert out.dtype == want_dtype and out.device.type == "cuda" and out.shape == weight.shape
        assert_same_bits(out, ops.apply_mask(weight, scores, t, abs_scores, out_dtype))
        assert_same_bits(out, masked_reference(weight, scores, t, abs_scores, want_dtype))


@needs_cuda
@pytest.mark.parametrize("score_dtype", SCORE_DTYPES)
def test_apply_mask_non_contiguous_and_misaligned(score_dtype):
    weight = torch.randn(54, 37, generator=gen(6), device="cpu").to(CUDA)
    scores = make_scores("normal", 54 * 37, score_dtype, seed=7).reshape(54, 37).to(CUDA)
    t = ops.threshold(scores, 0.3, True)
    cases = [(weight.t(), scores.t()), (weight.flatten()[1:], scores.flatten()[1:]),
             (weight.flatten()[:-1].bfloat16(), scores.flatten()[1:])]
    for w, s in cases:
        assert_same_bits(ops.apply_mask(w, s, t, True, None), masked_reference(w, s, t, True, w.dtype))
    # t as a view with a storage offset
    ts = torch.stack([t, t]).reshape(2)[1]
    assert_same_bits(ops.apply_mask(weight, scores, ts, True, None),
                     masked_reference(weight, scores, t, True, weight.dtype))


@needs_cuda
def test_apply_mask_empty_and_errors():
    out = ops.apply_mask(torch.empty(0, 3, device=CUDA), torch.empty(0, 3, device=CUDA),
                         torch.tensor(0.5, device=CUDA), True, torch.bfloat16)
    assert out.shape == (0, 3) and out.dtype == torch.bfloat16
    w = torch.randn(4, 5, device=CUDA)
    s = torch.randn(4, 5, device=CUDA)
    t = torch.tensor(0.5, device=CUDA)
    with pytest.raises(ValueError):
        ops.apply_mask(w, s.reshape(5, 4), t, True, None)
    with pytest.raises(ValueError):
        ops.apply_mask(w, s, t.reshape(1), True, None)
    with pytest.raises(TypeError):
        ops.apply_mask(w, s, t.double(), True, None)
    with pytest.raises(ValueError):
        ops.apply_mask(w, s, t.cpu(), True, None)
    with pytest.raises(ValueError):
        ops.apply_mask(w.cpu(), s, t, True, None)


@needs_cuda
@pytest.mark.parametrize("grad_dtype", FLOATS)
@pytest.mark.parametrize("weight_dtype", FLOATS)
@pytest.mark.parametrize("score_dtype", SCORE_DTYPES)
@pytest.mark.parametrize("abs_scores", [True, False])
def test_score_grad(grad_dtype, weight_dtype, score_dtype, abs_scores):
    for shape in [(37, 53), (1001,), (64, 64)]:
        numel = math.prod(shape)
        grad = torch.randn(shape, generator=gen(8), dtype=torch.float64).to(grad_dtype)
        weight = torch.randn(shape, generator=gen(9), dtype=torch.float64).to(weight_dtype)
        scores = make_scores("ties", numel, score_dtype, seed=10).reshape(shape)  # has +0.0 and -0.0
        out = ops.score_grad(grad.to(CUDA), weight.to(CUDA), scores.to(CUDA), abs_scores)
        assert out.dtype == score_dtype and out.device.type == "cuda" and out.shape == scores.shape
        assert_same_bits(out, ops.score_grad(grad, weight, scores, abs_scores))
        want = weight.to(score_dtype) * grad.to(score_dtype)
        if abs_scores:
            want = torch.sign(scores) * want
        torch.testing.assert_close(out.cpu(), want, **EXACT)


@needs_cuda
@pytest.mark.parametrize("weight_dtype", FLOATS)
@pytest.mark.parametrize("score_dtype", SCORE_DTYPES)
@pytest.mark.parametrize("abs_scores", [True, False])
def test_score_grad_inplace(weight_dtype, score_dtype, abs_scores):
    for shape in [(37, 53), (1001,)]:
        grad = torch.randn(shape, generator=gen(12), dtype=score_dtype).to(CUDA)
        weight = torch.randn(shape, generator=gen(13)).to(weight_dtype).to(CUDA)
        scores = make_scores("ties", math.prod(shape), score_dtype, seed=14).reshape(shape).to(CUDA)
        want = ops.score_grad(grad, weight, scores, abs_scores)
        ptr = grad.data_ptr()
        assert ops.score_grad_(grad, weight, scores, abs_scores) is None  # schema: -> ()
        assert grad.data_ptr() == ptr
        assert_same_bits(grad, want)
    misaligned = torch.randn(1002, dtype=score_dtype, device=CUDA)[1:]  # in place over an offset view
    weight = torch.randn(1001, device=CUDA).to(weight_dtype)
    scores = torch.randn(1001, dtype=score_dtype, device=CUDA)
    want = ops.score_grad(misaligned, weight, scores, abs_scores)
    ops.score_grad_(misaligned, weight, scores, abs_scores)
    assert_same_bits(misaligned, want)


@needs_cuda
def test_score_grad_inplace_errors():
    scores = torch.randn(8, 9, device=CUDA)
    weight = torch.randn(8, 9, device=CUDA)
    with pytest.raises(TypeError):
        ops.score_grad_(torch.randn(8, 9, device=CUDA, dtype=torch.float64), weight, scores, True)
    with pytest.raises(ValueError):
        ops.score_grad_(torch.randn(9, 8, device=CUDA).t(), weight, scores, True)


@needs_cuda
def test_score_grad_expanded_and_transposed():
    scores = torch.randn(37, 53, device=CUDA)
    weight = torch.randn(53, 37, device=CUDA).t()
    grad = torch.ones((), device=CUDA).expand(37, 53)  # stride 0, as .sum().backward() gives
    out = ops.score_grad(grad, weight, scores, True)
    torch.testing.assert_close(out, torch.sign(scores) * weight, **EXACT)
    with pytest.raises(ValueError):
        ops.score_grad(grad.cpu(), weight, scores, True)


@needs_cuda
def test_no_host_sync_and_current_stream():
    scores = torch.randn(1000, 37, device=CUDA)
    weight = torch.randn(1000, 37, device=CUDA, dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.stream(stream):
            t = ops.threshold(scores, 0.3, True)
            tg = ops.global_threshold([scores[:10], scores[10:]], 0.3, True)
            masked = ops.apply_mask(weight, scores, t, True, torch.float32)
            grad = ops.score_grad(masked, weight, scores, True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    stream.synchronize()
    assert_same_bits(t, ops.threshold(scores.cpu(), 0.3, True))
    assert_same_bits(tg, t)
    assert_same_bits(masked, masked_reference(weight, scores, t, True, torch.float32))
    torch.testing.assert_close(grad, torch.sign(scores) * (weight.float() * masked), **EXACT)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@needs_cuda
def test_second_device():
    scores = torch.randn(37, 53, device="cuda:1")
    weight = torch.randn(37, 53, device="cuda:1", dtype=torch.float16)
    t = ops.threshold(scores, 0.2, True)
    assert t.device == scores.device
    assert_same_bits(t, ops.threshold(scores.cpu(), 0.2, True))
    out = ops.apply_mask(weight, scores, t, True, None)
    assert out.device == scores.device
    assert_same_bits(out, masked_reference(weight, scores, t, True, torch.float16))


# ---------------------------------------------------------------------------------------------
# masked_linear / masked_linear_backward on CUDA: the mask pass (W ⊙ M once, in x's dtype) + cuBLAS, and
# cuBLAS + the in-place score-gradient pass for dS (csrc/masked_linear.cpp), against maskprune.reference
# (W ⊙ M materialised, autograd STE) on the same GPU


@pytest.fixture(autouse=True)
def ieee_reference_gemms():
    """The reference's cuBLAS GEMMs without TF32 or reduced-precision (fp16/bf16) reductions, as the kernels."""
    matmul = torch.backends.cuda.matmul
    saved = (matmul.allow_tf32, matmul.allow_fp16_reduced_precision_reduction,
             matmul.allow_bf16_reduced_precision_reduction)
    matmul.allow_tf32 = False
    matmul.allow_fp16_reduced_precision_reduction = False
    matmul.allow_bf16_reduced_precision_reduction = False
    yield
    (matmul.allow_tf32, matmul.allow_fp16_reduced_precision_reduction,
     matmul.allow_bf16_reduced_precision_reduction) = saved


def assert_close(got: torch.Tensor, want: torch.Tensor, tol: float, what: str = "") -> None:
    """|got - want| <= tol·|want| + tol·max|want| elementwise (see the module docstring), same shape and dtype."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert got.device == want.device, f"{what}: device {got.device} != {want.device}"
    if want.numel() == 0:
        return
    a, e = got.detach().double(), want.detach().double()
    scale = float(e.abs().max())
    err = (a - e).abs() - tol * e.abs()
    worst = float(err.max())
    assert worst <= tol * scale, (f"{what}: max |got - want| - tol·|want| = {worst:.3g} > tol·max|want| = "
                                  f"{tol * scale:.3g} (tol {tol:g}, {int((err > tol * scale).sum())} of {e.numel()} off)")


def tol_of(*dtypes) -> float:
    return max(TOL[d] for d in dtypes)


def linear_inputs(shape, x_dtype, w_dtype, s_dtype, *, bias, seed=0):
    """x (B, K), weight and scores (N, K), bias (N,) or None, on the GPU; shape = (B, N, K)."""
    B, N, K = shape
    g = gen(seed)
    rand = lambda *size: torch.randn(*size, generator=g, dtype=torch.float64)
    x = rand(B, K).to(x_dtype).to(CUDA)
    weight = (rand(N, K) / math.sqrt(max(K, 1))).to(w_dtype).to(CUDA)
    scores = rand(N, K).to(s_dtype).to(CUDA)
    b = rand(N).to(x_dtype).to(CUDA) if bias else None
    return x, weight, scores, b


def upstream_grad(shape, dtype, kind: str, seed=1) -> torch.Tensor:
    if kind == "sum":  # what y.sum().backward() hands down: ones, expanded, every stride 0
        return torch.ones((), dtype=dtype, device=CUDA).expand(shape)
    return torch.randn(shape, generator=gen(seed), dtype=torch.float64).to(dtype).to(CUDA)


def reference_linear(x, weight, scores, t, bias, abs_scores, grad_out):
    """(y, dX, dS, db) of maskprune.reference.masked_linear, by autograd."""
    x = x.detach().requires_grad_()
    s = scores.detach().requires_grad_()
    b = None if bias is None else bias.detach().requires_grad_()
    y = reference.masked_linear(x, weight, s, t, b, abs_scores)
    grads = torch.autograd.grad(y, [x, s] + ([b] if b is not None else []), grad_out)
    return (y.detach(), grads[0], grads[1], grads[2] if b is not None else None)


def fused_linear(x, weight, scores, t, bias, abs_scores, grad_out):
    """(y, dX, dS) of the raw ops (the CUDA kernels)."""
    y = ops.masked_linear(x, weight, scores, t, bias, abs_scores)
    dx, ds = ops.masked_linear_backward(grad_out, x, weight, scores, t, abs_scores, True, True)
    return y, dx, ds


def check_fused_linear(x, weight, scores, bias, density, abs_scores, upstream, what=""):
    t = reference.threshold(scores, density, abs_scores)
    y_shape = (*x.shape[:-1], weight.shape[0])
    grad_out = upstream_grad(y_shape, x.dtype, upstream)
    got = fused_linear(x, weight, scores, t, bias, abs_scores, grad_out)
    want = reference_linear(x, weight, scores, t, bias, abs_scores, grad_out)
    tol = tol_of(x.dtype, weight.dtype)
    assert_close(got[0], want[0], tol, f"{what} y")
    assert_close(got[1], want[1], tol, f"{what} dX")
    assert_close(got[2], want[2], tol_of(x.dtype, weight.dtype, scores.dtype), f"{what} dS")
    assert got[2].is_contiguous()


# (B, N, K) = (rows of x, out_features, in_features): odd sizes, sizes at and around the 64x64 tiles
# and the 16/32-deep K steps, K or N of 1, and one with several tiles in every direction.
GEMM_SHAPES = [(1, 1, 1), (37, 53, 70), (3, 300, 784), (5, 1, 17), (2, 13, 1), (64, 10, 9), (64, 64, 64),
               (65, 63, 33), (129, 130, 95), (1, 17, 300), (256, 384, 512)]
# (x dtype, weight dtype, scores dtype): each compute path, then mixed weight dtypes (cast on load)
GEMM_DTYPES = [
    pytest.param(torch.float32, torch.float32, torch.float32, id="f32"),
    pytest.param(torch.float64, torch.float64, torch.float64, id="f64"),
    pytest.param(torch.bfloat16, torch.bfloat16, torch.float32, id="bf16"),
    pytest.param(torch.float16, torch.float16, torch.float32, id="f16"),
    pytest.param(torch.bfloat16, torch.float32, torch.float32, id="bf16x-f32w"),
    pytest.param(torch.float16, torch.float32, torch.float32, id="f16x-f32w"),
    pytest.param(torch.float32, torch.bfloat16, torch.float32, id="f32x-bf16w"),
    pytest.param(torch.float32, torch.float64, torch.float64, id="f32x-f64w-f64s"),
    pytest.param(torch.float64, torch.float32, torch.float32, id="f64x-f32w"),
]


@needs_cuda
@pytest.mark.parametrize("shape", GEMM_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("x_dtype,w_dtype,s_dtype", GEMM_DTYPES)
@pytest.mark.parametrize("density", [1e-9, 0.05, 0.5, 1.0])
@pytest.mark.parametrize("abs_scores", [True, False], ids=["abs", "raw"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_fused_linear_matches_reference(shape, x_dtype, w_dtype, s_dtype, density, abs_scores, bias):
    x, weight, scores, b = linear_inputs(shape, x_dtype, w_dtype, s_dtype, bias=bias, seed=sum(shape))
    upstream = "sum" if (GEMM_SHAPES.index(shape) + int(density * 100)) % 2 else "random"
    check_fused_linear(x, weight, scores, b, density, abs_scores, upstream)


def layout_of(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as x (B, K) in another memory layout or leading shape."""
    B, K = x.shape
    if layout == "contiguous":
        return x
    if layout == "transposed":  # a (B, K) view of a (K, B) tensor
        return x.t().contiguous().t()
    if layout == "sliced":  # every other column of a (B, 2K) tensor
        return torch.stack([x, torch.full_like(x, float("nan"))], dim=-1).reshape(B, 2 * K)[:, ::2]
    if layout == "misaligned":  # contiguous, storage offset 1 element
        return torch.cat([x.new_zeros(1), x.flatten()])[1:].reshape(B, K)
    if layout == "batched":  # leading dimensions (B/3, 3)
        return x.reshape(B // 3, 3, K)
    if layout == "batched_permuted":  # (B/3, 3, K) view of a (K, 3, B/3) tensor, not flattenable as a view
        return x.reshape(B // 3, 3, K).permute(2, 1, 0).contiguous().permute(2, 1, 0)
    if layout == "vector":  # a single sample of shape (K,)
        return x[0]
    raise AssertionError(layout)


@needs_cuda
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced", "misaligned", "batched", "batched_permuted",
                                    "vector"])
@pytest.mark.parametrize("x_dtype,w_dtype,s_dtype", GEMM_DTYPES[:4])
@pytest.mark.parametrize("param_layout", ["contiguous", "transposed", "sliced"])
@pytest.mark.parametrize("upstream", ["sum", "random"])
def test_fused_linear_layouts(layout, x_dtype, w_dtype, s_dtype, param_layout, upstream):
    x, weight, scores, b = linear_inputs((69, 37, 53), x_dtype, w_dtype, s_dtype, bias=True, seed=3)
    x = layout_of(x, layout)
    weight, scores = layout_of(weight, param_layout), layout_of(scores, param_layout)
    b = torch.stack([b, b], dim=-1)[:, 0] if param_layout != "contiguous" else b  # bias with stride 2
    for abs_scores in (True, False):
        check_fused_linear(x, weight, scores, b, 0.3, abs_scores, upstream, what=f"{layout}/{param_layout}")


@needs_cuda
@pytest.mark.parametrize("x_dtype", FLOATS)
def test_fused_linear_need_grad_flags(x_dtype):
    s_dtype = torch.float64 if x_dtype == torch.float64 else torch.float32
    x, weight, scores, _ = linear_inputs((9, 70, 33), x_dtype, x_dtype, s_dtype, bias=False)
    t = reference.threshold(scores, 0.4, True)
    grad_out = upstream_grad((9, 70), x_dtype, "random")
    dx_all, ds_all = ops.masked_linear_backward(grad_out, x, weight, scores, t, True, True, True)
    dx, ds = ops.masked_linear_backward(grad_out, x, weight, scores, t, True, True, False)
    assert_same_bits(dx, dx_all)
    assert ds.shape == (0,) and ds.dtype == s_dtype and ds.device == scores.device
    dx, ds = ops.masked_linear_backward(grad_out, x, weight, scores, t, True, False, True)
    assert dx.shape == (0,) and dx.dtype == x_dtype and dx.device == x.device
    assert_same_bits(ds, ds_all)
    dx, ds = ops.masked_linear_backward(grad_out, x, weight, scores, t, True, False, False)
    assert dx.shape == (0,) and ds.shape == (0,)


@needs_cuda
@pytest.mark.parametrize("x_dtype", FLOATS)
def test_fused_linear_grad_out_in_another_dtype(x_dtype):
    # grad_out is rounded to x's dtype on load: the same bits as converting it first (the composite's .to()).
    x, weight, scores, _ = linear_inputs((21, 37, 53), x_dtype, torch.float32, torch.float32, bias=False)
    t = reference.threshold(scores, 0.5, True)
    for g in (upstream_grad((21, 37), torch.float64, "random"), upstream_grad((21, 37), torch.float32, "random"),
              torch.randint(-3, 4, (21, 37), generator=gen(5)).to(CUDA)):
        got = ops.masked_linear_backward(g, x, weight, scores, t, True, True, True)
        want = ops.masked_linear_backward(g.to(x_dtype), x, weight, scores, t, True, True, True)
        assert_same_bits(got[0], want[0])
        assert_same_bits(got[1], want[1])


@needs_cuda
@pytest.mark.parametrize("shape", [(0, 5, 7), (4, 0, 7), (4, 5, 0), (0, 0, 0)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
def test_fused_linear_empty(shape, x_dtype):
    x, weight, scores, b = linear_inputs(shape, x_dtype, x_dtype, torch.float32, bias=True)
    t = torch.tensor(0.0, device=CUDA)  # threshold() needs at least one score; any t will do here
    grad_out = upstream_grad((shape[0], shape[1]), x_dtype, "random")
    got = fused_linear(x, weight, scores, t, b, True, grad_out)
    want = reference_linear(x, weight, scores, t, b, True, grad_out)
    for g, w, what in zip(got, want, ("y", "dX", "dS")):
        assert_close(g, w, 0.0, what)  # empty, or exactly bias / zeros


@needs_cuda
def test_fused_linear_is_deterministic():
    x, weight, scores, b = linear_inputs((300, 257, 129), torch.bfloat16, torch.bfloat16, torch.float32, bias=True)
    t = reference.threshold(scores, 0.5, True)
    grad_out = upstream_grad((300, 257), torch.bfloat16, "random")
    first = fused_linear(x, weight, scores, t, b, True, grad_out)
    second = fused_linear(x, weight, scores, t, b, True, grad_out)
    for a, c in zip(first, second):
        assert_same_bits(a, c)


@needs_cuda
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
def test_fused_linear_materialises_one_masked_weight_in_x_dtype(x_dtype):
    # The mask pass writes W ⊙ M once, in x's dtype (not the float32 weight's): the forward's peak is that
    # and y; the backward's dX the same (its autograd reuses the forward's, see test_..._public_op).
    x, weight, scores, _ = linear_inputs((8, 2048, 2048), x_dtype, torch.float32, torch.float32, bias=False)
    t = reference.threshold(scores, 0.5, True)
    grad_out = upstream_grad((8, 2048), x_dtype, "random")
    torch.cuda.synchronize()
    w_eff_bytes = weight.numel() * torch.empty((), dtype=x_dtype).element_size()
    for step in ("forward", "grad_x"):
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        if step == "forward":
            out = ops.masked_linear(x, weight, scores, t, None, True)
        else:
            out = ops.masked_linear_backward(grad_out, x, weight, scores, t, True, True, False)[0]
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
        assert extra <= w_eff_bytes + 2 * out.numel() * out.element_size() + (4 << 20), (
            f"{step}: {extra} bytes allocated for a {w_eff_bytes}-byte masked weight")
        del out


@needs_cuda
def test_fused_linear_through_the_public_op():
    # autograd of maskprune.masked_linear (backend "cpp") on CUDA: the forward keeps W ⊙ M for dX; bias gradient too.
    import maskprune
    from maskprune import ops as public_ops

    if "cpp" not in public_ops.available_backends("cuda"):
        pytest.skip("the cpp backend is not available on CUDA")
    x, weight, scores, b = linear_inputs((12, 37, 53), torch.bfloat16, torch.bfloat16, torch.float32, bias=True)
    x = x.reshape(3, 4, 53)
    t = reference.threshold(scores, 0.3, True)
    grad_out = upstream_grad((3, 4, 37), torch.bfloat16, "random")
    leaves = [x.detach().requires_grad_(), scores.detach().requires_grad_(), b.detach().requires_grad_()]
    y = maskprune.masked_linear(leaves[0], weight, leaves[1], t, leaves[2], abs_scores=True, backend="cpp")
    y.backward(grad_out)
    want = reference_linear(x, weight, scores, t, b, True, grad_out)
    tol = TOL[torch.bfloat16]
    assert_close(y.detach(), want[0], tol, "y")
    assert_close(leaves[0].grad, want[1], tol, "dX")
    assert_close(leaves[1].grad, want[2], tol, "dS")
    assert_close(leaves[2].grad, want[3], tol, "db")
    assert weight.grad is None


@needs_cuda
def test_fused_linear_no_host_sync_and_current_stream():
    x, weight, scores, b = linear_inputs((100, 37, 53), torch.float16, torch.float32, torch.float32, bias=True)
    t = reference.threshold(scores, 0.3, False)
    grad_out = upstream_grad((100, 37), torch.float16, "random")
    want = fused_linear(x, weight, scores, t, b, False, grad_out)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.stream(stream):
            got = fused_linear(x, weight, scores, t, b, False, grad_out)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    stream.synchronize()
    for g, w in zip(got, want):
        assert_same_bits(g, w)


@needs_cuda
def test_fused_linear_errors():
    x, weight, scores, b = linear_inputs((4, 3, 5), torch.float32, torch.float32, torch.float32, bias=True)
    t = reference.threshold(scores, 0.5, True)
    grad_out = upstream_grad((4, 3), torch.float32, "random")
    bad_calls = [
        (lambda: ops.masked_linear(x.cpu(), weight, scores, t, b, True), ValueError, "same device"),
        (lambda: ops.masked_linear(x, weight, scores, t, b.cpu(), True), ValueError, "same device"),
        (lambda: ops.masked_linear(x, weight, scores, t.cpu(), b, True), ValueError, "same device"),
        (lambda: ops.masked_linear(x[:, :4], weight, scores, t, b, True), ValueError, "x's"),
        (lambda: ops.masked_linear(x.long(), weight, scores, t, b, True), TypeError, "x"),
        (lambda: ops.masked_linear(x, weight, scores, t, b.long(), True), TypeError, "bias"),
        (lambda: ops.masked_linear(x, weight, scores, t, b[:2], True), ValueError, "bias"),
        (lambda: ops.masked_linear(x, weight, scores.t(), t, b, True), ValueError, "scores"),
        (lambda: ops.masked_linear(x, weight, scores.half(), t, b, True), TypeError, "scores"),
        (lambda: ops.masked_linear(x, weight[..., None], scores[..., None], t, b, True), ValueError, "weight"),
        (lambda: ops.masked_linear(x, weight, scores, t.double(), b, True), TypeError, "t must"),
        (lambda: ops.masked_linear_backward(grad_out[:, :2], x, weight, scores, t, True, True, True), ValueError,
         "grad_out"),
        (lambda: ops.masked_linear_backward(grad_out[:2], x, weight, scores, t, True, True, True), ValueError,
         "grad_out"),
        (lambda: ops.masked_linear_backward(grad_out.cpu(), x, weight, scores, t, True, True, True), ValueError,
         "same device"),
    ]
    for call, exc, match in bad_calls:
        with pytest.raises(exc, match=match):
            call()
