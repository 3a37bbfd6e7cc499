"""The triton backend through the public ops: opcheck on every maskprune_triton op, and torch.compile.

On a machine without a GPU these run on CPU tensors through Triton's interpreter (conftest.py sets
TRITON_INTERPRET=1 before anything imports triton), with the same code paths as on CUDA.
"""
import pytest
import torch
import torch.nn as nn

import maskprune
from maskprune import ops, reference

pytestmark = pytest.mark.skipif("triton" not in ops.BACKENDS,
                                reason="the triton backend did not register (is triton installed?)")

# float32 runs the GEMMs with input_precision="ieee": the backends differ only in summation order
# over K <= 16 terms, far below 1e-5 of the largest entry. float64: 1e-12 likewise.
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
TRITON_OPS = ("threshold", "global_threshold", "apply_mask", "score_grad", "masked_linear",
              "masked_linear_backward")


def opcheck_samples(device):
    """(op name, args) samples, with requires_grad variants for the differentiable ops."""
    g = torch.Generator().manual_seed(7)

    def r(*shape, dtype=torch.float32, rg=False):
        return torch.randn(*shape, generator=g, dtype=dtype).to(device).requires_grad_(rg)

    w, s = r(5, 7), r(5, 7)
    t, t_raw = reference.threshold(s, 0.5, True), reference.threshold(s, 0.5, False)
    x, x3 = r(3, 7), r(2, 3, 7)
    w64, s64 = r(4, 6, dtype=torch.float64), r(4, 6, dtype=torch.float64)
    t64 = reference.threshold(s64, 0.3, True)
    return [
        ("threshold", (r(5, 7), 0.5, True)),
        ("threshold", (r(100, dtype=torch.float64), 1e-9, False)),
        ("threshold", (r(11, 13).t(), 1.0, True)),
        ("global_threshold", ([r(5, 7), r(3), r(2, 2, 2)], 0.4, True)),
        ("global_threshold", ([r(9, dtype=torch.float64)], 0.9, False)),
        ("apply_mask", (w, s, t, True)),
        ("apply_mask", (w, r(5, 7, rg=True), t_raw, False)),
        ("apply_mask", (w64, r(4, 6, dtype=torch.float64, rg=True), t64, True)),
        ("apply_mask", (w.t().contiguous().t(), s, t, True)),
        ("score_grad", (r(5, 7), w, s, True)),
        ("score_grad", (r(5, 7).t().contiguous().t(), w, s, False)),
        ("masked_linear", (x, w, s, t, None, True)),
        ("masked_linear", (r(3, 7, rg=True), w, r(5, 7, rg=True), t, r(5, rg=True), True)),
        ("masked_linear", (r(2, 3, 7, rg=True), w, r(5, 7, rg=True), t_raw, None, False)),
        ("masked_linear", (r(7, 3, rg=True).t(), w, s, t, r(5), True)),
        ("masked_linear", (r(3, 6, dtype=torch.float64, rg=True), w64, r(4, 6, dtype=torch.float64, rg=True),
                           t64, r(4, dtype=torch.float64, rg=True), True)),
        ("masked_linear_backward", (r(3, 5), x, w, s, t, True, True, True)),
        ("masked_linear_backward", (r(2, 3, 5), x3, w, s, t_raw, False, True, False)),
        ("masked_linear_backward", (r(2, 3, 5), x3, w, s, t, True, False, True)),
        ("masked_linear_backward", (r(3, 5), x, w, s, t, True, False, False)),
    ]


SAMPLE_NAMES = [name for name, _ in opcheck_samples("cpu")]


def test_samples_cover_every_op():
    assert set(SAMPLE_NAMES) == set(TRITON_OPS)
    for name in TRITON_OPS:
        assert hasattr(torch.ops.maskprune_triton, name)


@pytest.mark.parametrize("i", range(len(SAMPLE_NAMES)), ids=[f"{n}-{i}" for i, n in enumerate(SAMPLE_NAMES)])
def test_opcheck(i, device):
    name, args = opcheck_samples(device)[i]
    torch.library.opcheck(getattr(torch.ops.maskprune_triton, name).default, args)


def test_backend_is_available(device):
    assert "triton" in ops.available_backends(device)
    assert ops.resolve_backend("triton", torch.device(device)).name == "triton"


@pytest.mark.parametrize("abs_scores", [True, False])
def test_public_ops_match_reference(abs_scores, device):
    """Each public op with backend="triton" against backend="torch", forward and backward."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 9, 37, generator=g).to(device).requires_grad_()
    weight = torch.randn(29, 37, generator=g).to(device)
    scores = torch.randn(29, 37, generator=g).to(device).requires_grad_()
    bias = torch.randn(29, generator=g).to(device).requires_grad_()
    grad_out = torch.randn(2, 9, 29, generator=g).to(device)
    results = {}
    for backend in ("triton", "torch"):
        t = maskprune.threshold(scores, 0.3, abs_scores=abs_scores, backend=backend)
        t_global = maskprune.global_threshold([scores, weight], 0.3, abs_scores=abs_scores, backend=backend)
        y = maskprune.masked_linear(x, weight, scores, t, bias, abs_scores=abs_scores, backend=backend)
        masked = maskprune.apply_mask(weight, scores, t, abs_scores=abs_scores, backend=backend)
        grads = torch.autograd.grad((y * grad_out).sum() + masked.square().sum(), (x, scores, bias))
        results[backend] = (t, t_global, y, masked, *grads)
    names = ("t", "global t", "y", "W*M", "dX", "dS", "db")
    for name, actual, expected in zip(names, results["triton"], results["torch"]):
        scale = max(expected.abs().max().item(), 1.0)
        torch.testing.assert_close(actual, expected, rtol=0, atol=TOL[torch.float32] * scale, msg=name)


def compile_backend(device: str) -> str:
    """Inductor on CUDA. On CPU, aot_eager: it traces the same single graph through the fake kernels and
    the registered autograd (what this test is about), where Inductor would spend ~80 s of a cold
    start compiling C++ for the ReLU around the ops."""
    return "inductor" if device == "cuda" else "aot_eager"


@pytest.mark.parametrize("abs_scores", [True, False])
def test_compile_fullgraph(abs_scores, device):
    """A tiny MaskedLinear model compiles into one graph around the triton ops; forward and score
    gradients match eager mode."""
    torch.manual_seed(0)
    model = nn.Sequential(
        maskprune.nn.MaskedLinear(13, 11, density=0.4, abs_scores=abs_scores, backend="triton"),
        nn.ReLU(),
        maskprune.nn.MaskedLinear(11, 5, bias=True, density=1.0, abs_scores=abs_scores, backend="triton"),
    ).to(device)
    x = torch.randn(6, 13, device=device)

    def step(module):
        module.zero_grad(set_to_none=True)
        y = module(x)
        y.square().sum().backward()
        return y.detach(), [layer.scores.grad.clone() for layer in (model[0], model[2])]

    y_eager, grads_eager = step(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=compile_backend(device))
    y_compiled, grads_compiled = step(compiled)
    torch.testing.assert_close(y_compiled, y_eager, rtol=TOL[torch.float32], atol=TOL[torch.float32])
    for actual, expected in zip(grads_compiled, grads_eager):
        torch.testing.assert_close(actual, expected, rtol=TOL[torch.float32], atol=TOL[torch.float32])


def test_mask_built_once_per_step_and_never_stale(device):
    """The Triton masked_linear builds W ⊙ M once for forward and dX, reuses it until the scores (or t, or
    the weight) change, and never serves a stale mask (docs/design.md §3: the mask once per step)."""
    from maskprune.triton_ops import MASK_CACHE
    MASK_CACHE.clear()
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(29, 37, generator=g).to(device)
    scores = torch.randn(29, 37, generator=g).to(device).requires_grad_()
    x = torch.randn(11, 37, generator=g).to(device).requires_grad_()

    def step():
        t = maskprune.threshold(scores, 0.3, backend="triton")
        y = maskprune.masked_linear(x, weight, scores, t, backend="triton")
        grad_x, grad_scores = torch.autograd.grad(y.square().sum(), (x, scores))
        y_ref = maskprune.masked_linear(x, weight, scores, t, backend="torch")
        ref = torch.autograd.grad(y_ref.square().sum(), (x, scores))
        for got, want in zip((y, grad_x, grad_scores), (y_ref, *ref)):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * max(want.abs().max().item(), 1.0))
        return t

    before = MASK_CACHE.builds
    t = step()
    assert MASK_CACHE.builds == before + 1  # forward and dX share one prepass
    y = maskprune.masked_linear(x, weight, scores, t, backend="triton")  # same step: cached
    y.sum().backward()
    assert MASK_CACHE.builds == before + 1
    with torch.no_grad():
        scores.mul_(-1.5).add_(0.1)  # an optimizer step: new version, new threshold
    step()
    assert MASK_CACHE.builds == before + 2
    with torch.no_grad():
        weight[0, 0] = 100.0  # a weight changed in place is seen too
    t = maskprune.threshold(scores, 0.3, backend="triton")
    maskprune.masked_linear(x, weight, scores, t, backend="triton")
    assert MASK_CACHE.builds == before + 3
    step()  # a new t tensor of the same value: rebuilt (t is matched by identity, not value)
    assert MASK_CACHE.builds == before + 4 and len(MASK_CACHE) == 1
    with torch.inference_mode():  # nothing cached under inference mode
        maskprune.masked_linear(x, weight, scores.detach(), t, backend="triton")
    assert MASK_CACHE.builds == before + 5 and len(MASK_CACHE) == 1
    del scores, step, y  # the mask goes with its scores (y.grad_fn held them)
    import gc
    gc.collect()
    assert len(MASK_CACHE) == 0


def test_mask_cache_off(device, monkeypatch):
    from maskprune.triton_ops import MASK_CACHE
    monkeypatch.setenv("MASKPRUNE_MASK_CACHE", "0")
    weight, scores, x = (torch.randn(5, 7).to(device), torch.randn(5, 7).to(device).requires_grad_(),
                         torch.randn(3, 7).to(device).requires_grad_())
    t = maskprune.threshold(scores, 0.5, backend="triton")
    before = MASK_CACHE.builds
    maskprune.masked_linear(x, weight, scores, t, backend="triton").sum().backward()
    assert MASK_CACHE.builds == before + 2 and len(MASK_CACHE) == 0
