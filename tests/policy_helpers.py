"""A check shared by the policy backends' test files (test_policy_triton.py, test_policy_cuda.py)."""
import torch

from maskprune import ops, reference


def assert_masked_linear_matches_reference(weight, scores, t, u, mode: str, x_dtype: torch.dtype, backend: str):
    """ops.policy_masked_linear with `backend` against the reference on the same device: output, dX and dS, for
    a (4, 3, in) input of `x_dtype` with a bias (tolerance 2e-2 for bf16 inputs, else 1e-5). t may be None for
    "sampled" (the reference then takes a 0 it does not use)."""
    device = weight.device
    x1 = torch.randn(4, 3, weight.shape[1], device=device).to(x_dtype).requires_grad_()
    x2 = x1.detach().clone().requires_grad_()
    s1, s2 = scores.clone().requires_grad_(), scores.clone().requires_grad_()
    bias = torch.randn(weight.shape[0], device=device)
    t_ref = t if t is not None else torch.zeros((), dtype=scores.dtype, device=device)
    want = reference.policy_masked_linear(x1, weight, s1, t_ref, bias, mode, u)
    got = ops.policy_masked_linear(x2, weight, s2, t, bias, mode=mode, u=u, backend=backend)
    tol = dict(rtol=2e-2, atol=2e-2) if x_dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, want, **tol)
    g = torch.randn_like(want)
    want.backward(g)
    got.backward(g)
    torch.testing.assert_close(x2.grad, x1.grad, **tol)
    torch.testing.assert_close(s2.grad, s1.grad, **tol)
