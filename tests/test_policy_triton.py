"""The mask policies' modes on the Triton backend (kernels/policy.py, maskprune/triton_policy.py) against the torch
reference (maskprune.reference.policy_apply_mask), under TRITON_INTERPRET=1 without a GPU (tests/conftest.py).

Tolerances, per mode and dtype: W_eff is exact in every mode except binary, whose gain α is a sum taken in another
order (the kernel adds per-block partial sums in block order): 1 ulp of α's dtype. dS is exact except sampled,
whose σ'(S) = p(1 - p) takes Triton's sigmoid (and 1 - p cancels where p is near 1): within 16 ulp of the scores'
dtype relative, or 1 ulp of the largest |dS| absolute.
"""
import os

import pytest
import torch

from maskprune import ops, reference
from maskprune.nn import convert, masked_layers
from policy_helpers import assert_masked_linear_matches_reference

TRITON = os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not TRITON or "triton" not in ops.BACKENDS,
                                reason="needs Triton: a CUDA GPU, or TRITON_INTERPRET=1 (tests/conftest.py sets it)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ULP = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10, torch.float64: 2.0 ** -52}


def _inputs(shape, weight_dtype, mode, seed=0):
    g = torch.Generator().manual_seed(seed)
    score_dtype = torch.float64 if weight_dtype == torch.float64 else torch.float32
    weight = torch.randn(shape, generator=g).to(weight_dtype).to(DEVICE)
    scores = torch.randn(shape, generator=g, dtype=score_dtype).to(DEVICE)
    t = ops.threshold(scores, 0.3, abs_scores=mode != "raw", backend="torch")
    u = torch.rand(shape, generator=g, dtype=score_dtype).to(DEVICE) if mode == "sampled" else None
    return weight, scores, (None if mode == "sampled" else t), u


def _close(got, want, ulps, dtype):
    torch.testing.assert_close(got, want, rtol=ulps * ULP[dtype], atol=0)


@pytest.mark.parametrize("mode", ops.POLICY_MODES)
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", [(1,), (37, 53), (7, 3, 3, 3), (1031,)])
def test_policy_apply_mask_equals_reference(mode, weight_dtype, shape):
    weight, scores, t, u = _inputs(shape, weight_dtype, mode, seed=len(shape))
    s_ref, s_tri = scores.clone().requires_grad_(), scores.clone().requires_grad_()
    t_ref = t if t is not None else torch.zeros((), dtype=scores.dtype, device=DEVICE)
    want = reference.policy_apply_mask(weight, s_ref, t_ref, mode, u)
    got = ops.policy_apply_mask(weight, s_tri, t, mode, u=u, backend="triton")
    assert got.dtype == want.dtype and got.shape == want.shape
    if mode == "binary":
        _close(got, want, 1, torch.promote_types(weight_dtype, torch.float32) if weight_dtype != torch.float64
               else torch.float64)
    else:
        assert torch.equal(got, want)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(9)).to(weight_dtype).to(DEVICE)
    want.backward(grad)
    got.backward(grad)
    if mode == "sampled":  # Triton's sigmoid, and 1 - p cancels where p is near 1
        torch.testing.assert_close(s_tri.grad, s_ref.grad, rtol=16 * ULP[scores.dtype],
                                   atol=ULP[scores.dtype] * float(s_ref.grad.abs().max()))
    else:
        assert torch.equal(s_tri.grad, s_ref.grad)


@pytest.mark.parametrize("mode", ops.POLICY_MODES)
def test_non_contiguous_inputs(mode):
    weight, scores, t, u = _inputs((40, 30), torch.float32, mode)
    weight, scores = weight.t(), scores.t()
    u = u.t() if u is not None else None
    t_ref = t if t is not None else torch.zeros((), device=DEVICE)
    want = reference.policy_apply_mask(weight, scores, t_ref, mode, u)
    got = ops.policy_apply_mask(weight, scores, t, mode, u=u, backend="triton")
    _close(got, want, 1, torch.float32)


@pytest.mark.parametrize("mode", ops.POLICY_MODES)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_policy_masked_linear_equals_reference(mode, x_dtype):
    weight, scores, t, u = _inputs((37, 53), torch.float32, mode, seed=3)
    assert_masked_linear_matches_reference(weight, scores, t, u, mode, x_dtype, backend="triton")


@pytest.mark.parametrize("policy,options", [("signed", {}), ("biprop", {}), ("supermask", {"generator": "philox"}),
                                            ("threshold", {}), ("gem_miner", {})])
def test_policies_through_triton_equal_torch_backend(policy, options):
    """A converted model's forward and score gradients with backend="triton" (the fused Triton passes) against
    backend="torch" (the reference)."""
    def model(backend):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(20, 16, bias=False), torch.nn.ReLU(), torch.nn.Linear(16, 5))
        return convert(net.to(DEVICE), 0.4, policy=policy, weight_init="signed_constant", weight_seed=1,
                       backend=backend, **options)

    ref, tri = model("torch"), model("triton")
    assert ops.policy_fused(DEVICE, "triton")
    x = torch.randn(8, 20, device=DEVICE)
    out_ref, out_tri = ref(x), tri(x)
    torch.testing.assert_close(out_tri, out_ref, rtol=1e-5, atol=1e-6)
    out_ref.square().sum().backward()
    out_tri.square().sum().backward()
    for (_, a), (_, b) in zip(masked_layers(ref), masked_layers(tri)):
        torch.testing.assert_close(b.scores.grad, a.scores.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("call,exc,match", [
    (lambda k: k.policy_mask(torch.randn(3), torch.randn(3), torch.tensor(0.0), "ternary"), ValueError,
     "mode must be one of"),
    (lambda k: k.policy_mask(torch.randn(3), torch.randn(4), torch.tensor(0.0), "topk"), ValueError,
     "scores must have weight's shape"),
    (lambda k: k.policy_mask(torch.randn(3), torch.randn(3), None, "sampled"), ValueError, "needs u"),
    (lambda k: k.policy_mask(torch.randn(3), torch.randn(3), torch.tensor(0.0), "topk", u=torch.rand(3)), ValueError,
     "u is only taken by mode 'sampled'"),
    (lambda k: k.policy_mask(torch.randn(3), torch.randn(3), torch.zeros(2), "topk"), ValueError, "t must be a 0-d"),
    (lambda k: k.policy_mask(torch.randn(3), torch.randn(3, dtype=torch.float16), torch.tensor(0.0), "topk"),
     TypeError, "scores has dtype float16"),
    (lambda k: k.policy_score_grad(torch.randn(3), torch.randn(3), torch.randn(4), "raw"), ValueError,
     "must share one shape"),
])
def test_kernel_launchers_bad_input(call, exc, match):
    from maskprune.kernels import policy as kernels

    with pytest.raises(exc, match=match):
        call(kernels)
