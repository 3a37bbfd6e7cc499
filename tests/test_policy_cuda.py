"""The CUDA kernels of the mask policies' passes (csrc/cuda/policy_ops.cu: policy_mask, policy_score_grad,
policy_linear_score_grad; backend="cpp" on a GPU) against the CPU passes (csrc/cpu/policy_ops.cpp) and the torch
reference. Every test needs a CUDA GPU and maskprune._C built with its CUDA part, and is skipped elsewhere with
that reason; the .cu file is still compiled by the build and by scripts/check_ptxas.py.

Tolerances, per mode and dtype:
  topk, raw, signed, binary  Q = W_eff / α, D and dS equal the CPU passes bit for bit (the same products, in the
                             same types); biprop's α is summed in float64 in another order: 1 ulp for a float32
                             α, and 1e-12 relative for a float64 one (the order's error grows with n: 2 ulp at
                             2^20 weights on 132 SMs).
  sampled                    σ(S) from CUDA's expf against the CPU's vectorised exp (each within 2 ulp): the mask
                             bits are equal wherever |u - σ(S)| > 1e-5; D and dS within 16 ulp of the scores' dtype
                             relative, or 1 ulp of the largest |value| absolute (1 - p cancels where p is near 1).
"""
import pytest
import torch

from maskprune import ops
from policy_helpers import assert_masked_linear_matches_reference

pytest.importorskip("maskprune._C", reason="maskprune._C is not built (pip install --no-build-isolation -e .)")


def _cuda_policy_kernels() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "needs a CUDA GPU"
    if not torch._C._dispatch_has_kernel_for_dispatch_key("maskprune::policy_mask", "CUDA"):
        return False, "maskprune._C was built without its CUDA part (no nvcc, or MASKPRUNE_NO_CUDA=1)"
    return True, ""


_RUNS, _WHY = _cuda_policy_kernels()
pytestmark = pytest.mark.skipif(not _RUNS, reason=_WHY or "runs")

C = torch.ops.maskprune
ULP = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10, torch.float64: 2.0 ** -52}
WEIGHT_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SHAPES = [(1,), (37, 53), (7, 3, 3, 3), (1031,), (2 ** 20 + 3,)]


def _inputs(shape, weight_dtype, mode, seed=0):
    """CPU tensors: weight, scores (float64 with a float64 weight, else float32), t, u (sampled only)."""
    g = torch.Generator().manual_seed(seed)
    score_dtype = torch.float64 if weight_dtype == torch.float64 else torch.float32
    weight = torch.randn(shape, generator=g).to(weight_dtype)
    scores = torch.randn(shape, generator=g, dtype=score_dtype)
    t = ops.threshold(scores, 0.3, abs_scores=mode != "raw", backend="torch").to(score_dtype)
    u = torch.rand(shape, generator=g, dtype=score_dtype) if mode == "sampled" else None
    return weight, scores, t, u


def _cuda(*tensors):
    return [None if x is None else x.cuda() for x in tensors]


def _assert_same(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got.cpu(), want)


def _assert_sampled_close(got, want, scores):
    tol = ULP[scores.dtype]
    scale = float(want.abs().max()) if want.numel() else 0.0
    torch.testing.assert_close(got.cpu(), want, rtol=16 * tol, atol=tol * scale)


@pytest.mark.parametrize("mode", ops.POLICY_MODES)
@pytest.mark.parametrize("weight_dtype", WEIGHT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_policy_mask_equals_cpu_pass(mode, weight_dtype, shape):
    weight, scores, t, u = _inputs(shape, weight_dtype, mode, seed=len(shape))
    q_cpu, alpha_cpu, d_cpu = C.policy_mask(weight, scores, t, mode, u)
    q, alpha, d = C.policy_mask(*_cuda(weight, scores, t), mode, *_cuda(u))
    assert q.is_cuda and alpha.is_cuda and alpha.dtype == alpha_cpu.dtype and alpha.dim() == 0
    if mode == "sampled":
        p = torch.sigmoid(scores)
        clear = (u - p).abs() > 1e-5  # away from the σ(S) boundary, the mask bit cannot differ
        assert torch.equal(q.cpu()[clear], q_cpu[clear])
        _assert_sampled_close(d, d_cpu, scores)
    else:
        _assert_same(q, q_cpu)
        assert d.numel() == 0
    if mode == "binary":
        rtol = ULP[torch.float32] if alpha_cpu.dtype == torch.float32 else 1e-12
        torch.testing.assert_close(alpha.cpu(), alpha_cpu, rtol=rtol, atol=0)
        again = C.policy_mask(*_cuda(weight, scores, t), mode, None)[1]
        assert torch.equal(again, alpha), "α must be deterministic (block sums added in block order)"
    else:
        assert float(alpha) == 1.0


@pytest.mark.parametrize("mode", ops.POLICY_MODES)
@pytest.mark.parametrize("weight_dtype", WEIGHT_DTYPES)
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_policy_score_grad_equals_cpu_pass(mode, weight_dtype, grad_dtype):
    weight, scores, _, u = _inputs((37, 53), weight_dtype, mode, seed=5)
    grad = torch.randn((37, 53), generator=torch.Generator().manual_seed(6)).to(grad_dtype)
    want = C.policy_score_grad(grad, weight, scores, mode, u)
    got = C.policy_score_grad(*_cuda(grad, weight, scores), mode, *_cuda(u))
    if mode == "sampled":
        _assert_sampled_close(got, want, scores)
    else:
        _assert_same(got, want)


@pytest.mark.parametrize("mode", ops.POLICY_MODES)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_policy_masked_linear_cpp_on_cuda_equals_reference(mode, x_dtype, monkeypatch):
    """The device-generic composite and its C++ autograd over the CUDA kernels (backend="cpp"), against the
    reference on the same GPU; cuBLAS's GEMMs in both (TF32 off), so the GEMM tolerances of test_ops_cuda."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    weight, scores, t, u = _cuda(*_inputs((37, 53), torch.float32, mode, seed=3))
    assert_masked_linear_matches_reference(weight, scores, t, u, mode, x_dtype, backend="cpp")


@pytest.mark.parametrize("mode", ops.POLICY_MODES)
def test_non_contiguous_inputs(mode):
    weight, scores, t, u = _inputs((40, 30), torch.float32, mode, seed=7)
    weight, scores = weight.t(), scores.t()
    u = u.t() if u is not None else None
    want = C.policy_mask(weight, scores, t, mode, u)[0]
    got = C.policy_mask(*_cuda(weight, scores, t), mode, *_cuda(u))[0]
    if mode == "sampled":
        clear = (u - torch.sigmoid(scores)).abs() > 1e-5
        assert torch.equal(got.cpu()[clear], want[clear])
    else:
        _assert_same(got, want)


@pytest.mark.parametrize("mode", ops.POLICY_MODES)
@pytest.mark.parametrize("weight_dtype,score_dtype,out_dtype", [
    (torch.float32, torch.float64, torch.bfloat16), (torch.float16, torch.float32, torch.float32),
    (torch.bfloat16, torch.float64, torch.float64)])
def test_mixed_dtypes_and_the_out_dtype(mode, weight_dtype, score_dtype, out_dtype):
    weight, scores, t, u = _inputs((37, 53), weight_dtype, mode, seed=11)
    scores, t = scores.to(score_dtype), t.to(score_dtype)
    u = u.to(score_dtype) if u is not None else None
    want = C.policy_mask(weight, scores, t, mode, u, out_dtype)
    got = C.policy_mask(*_cuda(weight, scores, t), mode, *_cuda(u), out_dtype)
    assert got[0].dtype == out_dtype and got[1].dtype == want[1].dtype and got[2].dtype == want[2].dtype
    if mode == "sampled":
        clear = (u - torch.sigmoid(scores)).abs() > 1e-5
        assert torch.equal(got[0].cpu()[clear], want[0][clear])
    else:
        _assert_same(got[0], want[0])


@pytest.mark.parametrize("mode", ops.POLICY_MODES)
def test_empty_tensors(mode):
    weight, scores, t, u = _inputs((0, 4), torch.float32, mode)
    q, alpha, d = C.policy_mask(*_cuda(weight, scores, t), mode, *_cuda(u))
    assert q.shape == (0, 4) and float(alpha) == (0.0 if mode == "binary" else 1.0)
    assert d.numel() == 0


@pytest.mark.parametrize("mode", ops.POLICY_MODES)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float64, torch.float16])
def test_policy_linear_score_grad_equals_cpu(mode, x_dtype):
    """cuBLAS's gᵀX, then the dS pass: in place over the GEMM's output when x has the scores' dtype (float32),
    into a new tensor otherwise; against the CPU op (its GEMM in the same dtype; tolerance of that GEMM)."""
    weight, scores, _, u = _inputs((37, 53), torch.float32, mode, seed=12)
    g = torch.Generator().manual_seed(13)
    x = torch.randn(4, 3, 53, generator=g).to(x_dtype)
    grad_out = torch.randn(4, 3, 37, generator=g).to(x_dtype)
    want = C.policy_linear_score_grad(grad_out.float() if x_dtype == torch.float16 else grad_out,
                                      x.float() if x_dtype == torch.float16 else x, weight, scores, mode, u)
    got = C.policy_linear_score_grad(*_cuda(grad_out, x, weight, scores), mode, *_cuda(u))
    assert got.dtype == scores.dtype and got.shape == scores.shape
    tol = dict(rtol=2e-3, atol=2e-3) if x_dtype == torch.float16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.cpu(), want, **tol)


@pytest.mark.parametrize("mode", ops.POLICY_MODES)
def test_opcheck_on_cuda(mode):
    weight, scores, t, u = _cuda(*_inputs((9, 7), torch.float32, mode, seed=14))
    torch.library.opcheck(C.policy_mask.default, (weight, scores, t, mode, u))
    grad = torch.randn(9, 7, device="cuda")
    torch.library.opcheck(C.policy_score_grad.default, (grad, weight, scores, mode, u))


def test_bad_input_names_the_argument():
    weight, scores, t, u = _cuda(*_inputs((5, 4), torch.float32, "sampled"))
    with pytest.raises(ValueError, match="mode 'sampled' needs u"):
        C.policy_mask(weight, scores, t, "sampled", None)
    with pytest.raises(ValueError, match="u is only taken by mode 'sampled'"):
        C.policy_mask(weight, scores, t, "topk", u)
    with pytest.raises(ValueError, match="mode must be one of"):
        C.policy_mask(weight, scores, t, "popup", None)
    with pytest.raises(ValueError, match="u and scores must be on the same device"):
        C.policy_mask(weight, scores, t, "sampled", u.cpu())
    with pytest.raises(TypeError, match="t must have the scores' dtype"):
        C.policy_mask(weight, scores, t.double(), "topk", None)
