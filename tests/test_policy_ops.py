"""The mask policies' fused ops (issue 17; csrc/cpu/policy_ops.cpp): every mode of policy_apply_mask /
policy_masked_linear against the torch reference (maskprune.reference.policy_*), forward and gradients, over odd
shapes, non-contiguous inputs and the dtypes the existing ops take; opcheck of every new op; bad input.

Tolerances (C++ against the reference, which both compute from the same inputs):
  float64: 1e-12 relative; float32: 1e-5 (binary's α is summed in another order, the GEMM may block
  differently); float16 / bfloat16 activations: 1e-2 / 3e-2.
Mode "sampled" computes σ(S) with a vectorised float32 exp (within 2 ulp of torch's): a weight whose u lies
within 1e-6 of σ(S) may be kept by one and dropped by the other; the tests count mismatches only outside that band.
"""
from __future__ import annotations

import pytest
import torch

import maskprune
from maskprune import ops, reference

needs_cpp = pytest.mark.skipif(not ops.HAS_CPP, reason="maskprune._C not built")
MODES = ops.POLICY_MODES
POLICY_OPS = ("policy_mask", "policy_apply_mask", "policy_score_grad", "policy_masked_linear",
              "policy_linear_score_grad")
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _inputs(shape, mode, weight_dtype, score_dtype, density=0.4, seed=0):
    g = _gen(seed)
    w = torch.randn(shape, generator=g, dtype=torch.float64).to(weight_dtype)
    s = torch.randn(shape, generator=g, dtype=torch.float64).to(score_dtype)
    t = reference.threshold(s, density, mode != "raw")
    u = torch.rand(shape, generator=g, dtype=torch.float32) if mode == "sampled" else None
    if mode == "sampled":  # keep u out of the band where the two σ may round differently
        p = torch.sigmoid(s.double()).float()
        u = torch.where((u - p).abs() < 1e-5, (p + 0.01) % 1.0, u)
    return w, s, t, u


def _close(a, b, dtype):
    tol = TOL[dtype]
    assert a.dtype == b.dtype and a.shape == b.shape
    torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(1.0, float(b.abs().max()) if b.numel() else 1.0))


def _linear_run(backend, x, w, s, t, b, mode, u):
    x = x.detach().clone().requires_grad_(True)
    s = s.detach().clone().requires_grad_(True)
    b = None if b is None else b.detach().clone().requires_grad_(True)
    y = ops.policy_masked_linear(x, w, s, t, b, mode=mode, u=u, backend=backend)
    r = torch.randn(y.shape, generator=_gen(9), dtype=torch.float64).to(y.dtype)
    (y * r).sum().backward()
    return y.detach(), x.grad, s.grad, None if b is None else b.grad


@needs_cpp
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("x_dtype, weight_dtype, score_dtype", [
    (torch.float32, torch.float32, torch.float32), (torch.float64, torch.float64, torch.float64),
    (torch.float64, torch.float32, torch.float64), (torch.float32, torch.float64, torch.float32),
    (torch.bfloat16, torch.float32, torch.float32), (torch.float16, torch.float16, torch.float32)])
@pytest.mark.parametrize("shape, x_lead, bias", [((37, 53), (5,), True), ((1, 1), (2, 3), False),
                                                 ((64, 300), (17,), False), ((301, 129), (4,), True)])
def test_policy_masked_linear_matches_reference(mode, x_dtype, weight_dtype, score_dtype, shape, x_lead, bias):
    w, s, t, u = _inputs(shape, mode, weight_dtype, score_dtype)
    g = _gen(3)
    x = torch.randn(*x_lead, shape[1], generator=g, dtype=torch.float64).to(x_dtype)
    b = torch.randn(shape[0], generator=g, dtype=torch.float64).to(x_dtype) if bias else None
    got = _linear_run("cpp", x, w, s, t, b, mode, u)
    want = _linear_run("torch", x, w, s, t, b, mode, u)
    names = ("y", "dx", "ds", "db")
    for name, a, e in zip(names, got, want):
        if e is None:
            assert a is None
            continue
        # dS is as precise as the least precise of x, W and S (the reference rounds ∂L/∂W_eff to W's dtype)
        # Y and dX as precise as the less precise of x and W (binary's α is the weight dtype's)
        dtype = max((x_dtype, weight_dtype) + ((score_dtype,) if name == "ds" else ()), key=lambda d: TOL[d])
        try:
            _close(a.to(e.dtype), e, dtype)
        except AssertionError as err:
            raise AssertionError(f"{name}: {err}") from None


@needs_cpp
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("weight_dtype, score_dtype", [(torch.float32, torch.float32), (torch.float64, torch.float64),
                                                       (torch.bfloat16, torch.float32), (torch.float16, torch.float64)])
def test_policy_apply_mask_matches_reference(mode, weight_dtype, score_dtype):
    w, s, t, u = _inputs((23, 41), mode, weight_dtype, score_dtype, seed=5)
    outs = []
    for backend in ("cpp", "torch"):
        sg = s.detach().clone().requires_grad_(True)
        out = ops.policy_apply_mask(w, sg, t, mode, u=u, backend=backend)
        (out.double() * torch.randn(out.shape, generator=_gen(2), dtype=torch.float64)).sum().backward()
        outs.append((out.detach(), sg.grad))
    _close(outs[0][0], outs[1][0], weight_dtype)
    _close(outs[0][1], outs[1][1], max((weight_dtype, score_dtype), key=lambda d: TOL[d]))


@needs_cpp
@pytest.mark.parametrize("mode", MODES)
def test_noncontiguous_inputs(mode):
    w, s, t, u = _inputs((40, 30), mode, torch.float32, torch.float32, seed=11)
    wt, st = w.t().contiguous().t(), s.t().contiguous().t()  # same values, column-major
    ut = None if u is None else u.t().contiguous().t()
    x = torch.randn(30, 6, generator=_gen(4)).t()  # (6, 30), non-contiguous
    got = _linear_run("cpp", x, wt, st, t, None, mode, ut)
    want = _linear_run("torch", x.contiguous(), w, s, t, None, mode, u)
    for a, e in zip(got[:3], want[:3]):
        _close(a, e, torch.float32)


@needs_cpp
def test_modes_keep_what_their_rule_says():
    w, s, t, _ = _inputs((50, 60), "topk", torch.float64, torch.float64, density=0.3)
    keep = s.abs() >= t
    q, alpha, d = torch.ops.maskprune.policy_mask(w, s, t, "signed")
    assert torch.equal(q, w * torch.sign(s) * keep) and float(alpha) == 1.0 and d.numel() == 0
    q, alpha, _ = torch.ops.maskprune.policy_mask(w, s, t, "binary")
    assert torch.equal(q, torch.sign(w) * keep)
    torch.testing.assert_close(alpha, (w.abs() * keep).sum() / keep.sum(), rtol=1e-14, atol=0)
    assert int((q != 0).sum()) == reference.n_keep_for(0.3, 3000)
    u = torch.rand(50, 60, dtype=torch.float64, generator=_gen(1))
    q, _, d = torch.ops.maskprune.policy_mask(w, s, t, "sampled", u)
    p = torch.sigmoid(s)
    assert torch.equal(q, w * (u < p))
    torch.testing.assert_close(d, p * (1 - p) * w, rtol=1e-14, atol=0)
    # t is ignored by "sampled"
    assert torch.equal(torch.ops.maskprune.policy_mask(w, s, t * 0 + 7, "sampled", u)[0], q)


@needs_cpp
def test_sampled_float32_sigmoid_is_within_two_ulp_of_torch():
    s = torch.linspace(-90, 90, 200001)
    w, g = torch.ones_like(s), torch.ones_like(s)
    got = torch.ops.maskprune.policy_score_grad(g, w, s, "sampled", torch.zeros_like(s))
    p = torch.sigmoid(s)
    want = p * (1 - p)  # the reference's σ' in float32
    inner = s.abs() < 15  # beyond, 1 - σ(S) is a few ulp of 1 in float32 and both σ' are rounding noise
    rel = (got - want).abs() / want
    assert float(rel[inner].max()) < 1e-5
    assert float((got - want).abs()[~inner].max()) < 1e-6
    # the mask: u < σ(S) exactly where torch says so, but for u within 1e-6 of σ
    u = torch.rand(s.shape, generator=_gen(8))
    q = torch.ops.maskprune.policy_mask(w, s, torch.tensor(0.0), "sampled", u)[0]
    ref = (u < torch.sigmoid(s)).float()
    differ = q != ref
    assert bool(((u - torch.sigmoid(s)).abs()[differ] < 1e-6).all())


@needs_cpp
def test_several_threads_agree_with_one():
    w, s, t, _ = _inputs((700, 300), "binary", torch.float32, torch.float32)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.maskprune.policy_mask(w, s, t, "binary")
        torch.set_num_threads(2)
        two = torch.ops.maskprune.policy_mask(w, s, t, "binary")
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], two[0])
    torch.testing.assert_close(one[1], two[1], rtol=1e-6, atol=0)


def test_reference_runs_where_no_kernel_exists():
    """On a device without the C++ passes (meta here; CUDA and Triton too) the public ops run the reference."""
    assert not ops.policy_fused("meta") and not ops.policy_fused("cpu", "torch")
    w, s = torch.randn(4, 5, device="meta"), torch.randn(4, 5, device="meta")
    out = ops.policy_masked_linear(torch.randn(2, 5, device="meta"), w, s, torch.tensor(0.5, device="meta"),
                                   mode="signed")
    assert out.shape == (2, 4) and out.device.type == "meta"


# ------------------------------------------------------------------------------------------------
# opcheck
# ------------------------------------------------------------------------------------------------

def opcheck_samples():
    g = _gen(7)
    r = lambda *sh, dtype=torch.float32, rg=False: torch.randn(*sh, generator=g, dtype=dtype).requires_grad_(rg)
    w, s = r(5, 7), r(5, 7)
    t = reference.threshold(s, 0.5, True)
    u = torch.rand(5, 7, generator=g)
    w64, s64 = r(4, 6, dtype=torch.float64), r(4, 6, dtype=torch.float64)
    t64 = reference.threshold(s64, 0.3, True)
    samples = []
    for mode in MODES:
        uu = u if mode == "sampled" else None
        samples += [
            ("policy_mask", (w, s, t, mode, uu), {}),
            ("policy_apply_mask", (w, r(5, 7, rg=True), t, mode, uu), {}),
            ("policy_score_grad", (r(5, 7), w, s, mode, uu), {}),
            ("policy_masked_linear", (r(3, 7, rg=True), w, r(5, 7, rg=True), t, r(5, rg=True), mode, uu), {}),
            ("policy_linear_score_grad", (r(2, 3, 5), r(2, 3, 7), w, s, mode, uu), {}),
        ]
    u64 = torch.rand(4, 6, generator=g, dtype=torch.float64)
    samples += [
        ("policy_mask", (w.to(torch.bfloat16), s, t, "binary"), {"dtype": torch.float32}),
        ("policy_mask", (w64, s64, t64, "sampled", u64), {"dtype": torch.float16}),
        ("policy_apply_mask", (w64, r(4, 6, dtype=torch.float64, rg=True), t64, "binary"), {}),
        ("policy_score_grad", (r(5, 7, dtype=torch.bfloat16), w.to(torch.bfloat16), s, "signed"), {}),
        ("policy_masked_linear", (r(7, 3, rg=True).t(), w, s, t, None, "binary"), {}),
        ("policy_masked_linear", (r(3, 6, dtype=torch.float64, rg=True), w64, r(4, 6, dtype=torch.float64, rg=True),
                                  t64, None, "sampled", u64), {}),
        ("policy_masked_linear", (r(3, 7).to(torch.bfloat16), w, s, t, None, "signed"), {}),
    ]
    return samples


OPCHECK_SAMPLES = opcheck_samples() if ops.HAS_CPP else []


@needs_cpp
def test_opcheck_covers_every_policy_op():
    schema_ops = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("maskprune::")}
    assert set(POLICY_OPS) <= schema_ops
    assert set(POLICY_OPS) == {name for name, _, _ in OPCHECK_SAMPLES}


@needs_cpp
@pytest.mark.parametrize("i", range(len(OPCHECK_SAMPLES)),
                         ids=[f"{name}-{i}" for i, (name, _, _) in enumerate(OPCHECK_SAMPLES)])
def test_opcheck(i):
    name, args, kwargs = OPCHECK_SAMPLES[i]
    torch.library.opcheck(getattr(torch.ops.maskprune, name).default, args, kwargs)


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------

def _public_cases():
    w, s = torch.randn(4, 3), torch.randn(4, 3)
    t, x, u = torch.tensor(0.5), torch.randn(2, 3), torch.rand(4, 3)
    pam, pml = ops.policy_apply_mask, ops.policy_masked_linear
    return [
        ("mode", lambda: pam(w, s, t, "ternary"), ValueError, "mode must be one of"),
        ("mode-type", lambda: pml(x, w, s, t, mode=3), ValueError, "mode must be one of"),
        ("u-missing", lambda: pam(w, s, t, "sampled"), ValueError, "needs u"),
        ("u-extra", lambda: pml(x, w, s, t, mode="signed", u=u), ValueError, "u is only taken by mode 'sampled'"),
        ("u-shape", lambda: pam(w, s, t, "sampled", u=torch.rand(3, 4)), ValueError, "u must have the scores' shape"),
        ("u-dtype", lambda: pam(w, s, t, "sampled", u=u.half()), TypeError, "u must have dtype"),
        ("u-device", lambda: pam(w, s, t, "sampled", u=u.to("meta")), ValueError, "u and scores"),
        ("t-shape", lambda: pam(w, s, t.reshape(1), "binary"), ValueError, "t must be a 0-d"),
        ("t-missing", lambda: pam(w, s, None, "binary"), TypeError, "t must"),
        ("weight-int", lambda: pam(w.long(), s, t, "signed"), TypeError, "weight"),
        ("scores-half", lambda: pam(w, s.half(), t, "topk"), TypeError, "scores"),
        ("shape", lambda: pam(w, s.t(), t, "raw"), ValueError, "scores must have the weight's shape"),
        ("x-shape", lambda: pml(torch.randn(2, 4), w, s, t, mode="raw"), ValueError, "x's last dimension"),
        ("bias-shape", lambda: pml(x, w, s, t, torch.randn(3), mode="binary"), ValueError, "bias"),
        ("backend", lambda: pml(x, w, s, t, mode="binary", backend="cuda"), ValueError, "backend must be one of"),
    ]


PUBLIC_CASES = _public_cases()


@pytest.mark.parametrize("i", range(len(PUBLIC_CASES)), ids=[c[0] for c in PUBLIC_CASES])
def test_public_policy_ops_reject_bad_input(i):
    _, call, exc, match = PUBLIC_CASES[i]
    with pytest.raises(exc, match=match):
        call()


def _raw_cases():
    m = lambda name: getattr(torch.ops.maskprune, name)
    w, s = torch.randn(4, 3), torch.randn(4, 3)
    t, x, u = torch.tensor(0.5), torch.randn(2, 3), torch.rand(4, 3)
    return [
        ("mask-mode", lambda: m("policy_mask")(w, s, t, "nope"), ValueError, "mode must be one of"),
        ("mask-u-missing", lambda: m("policy_mask")(w, s, t, "sampled"), ValueError, "needs u"),
        ("mask-u-extra", lambda: m("policy_mask")(w, s, t, "topk", u), ValueError, "only taken by mode 'sampled'"),
        ("mask-u-shape", lambda: m("policy_mask")(w, s, t, "sampled", u.t()), ValueError, "u must have"),
        ("mask-u-int", lambda: m("policy_mask")(w, s, t, "sampled", u.long()), TypeError, "u must be float32"),
        ("mask-t-dtype", lambda: m("policy_mask")(w, s, t.double(), "raw"), TypeError, "t must"),
        ("mask-weight-int", lambda: m("policy_mask")(w.long(), s, t, "raw"), TypeError, "weight"),
        ("mask-shape", lambda: m("policy_mask")(w, s.t(), t, "signed"), ValueError, "shape"),
        ("apply-mode", lambda: m("policy_apply_mask")(w, s, t, ""), ValueError, "mode must be one of"),
        ("grad-shape", lambda: m("policy_score_grad")(torch.randn(3, 4), w, s, "raw"), ValueError, "shape"),
        ("grad-int", lambda: m("policy_score_grad")(w.long(), w, s, "raw"), TypeError, "grad_weight"),
        ("grad-u-missing", lambda: m("policy_score_grad")(w, w, s, "sampled"), ValueError, "needs u"),
        ("linear-x", lambda: m("policy_masked_linear")(torch.randn(2, 4), w, s, t, None, "binary"), ValueError, "x's"),
        ("linear-bias", lambda: m("policy_masked_linear")(x, w, s, t, torch.randn(3), "signed"), ValueError, "bias"),
        ("linear-mode", lambda: m("policy_masked_linear")(x, w, s, t, None, "x"), ValueError, "mode must be one of"),
        ("lgrad-grad-out", lambda: m("policy_linear_score_grad")(torch.randn(2, 3), x, w, s, "topk"), ValueError,
         "grad_out"),
        ("lgrad-x-int", lambda: m("policy_linear_score_grad")(torch.randn(2, 4), x.long(), w, s, "topk"), TypeError,
         "x"),
        ("lgrad-u", lambda: m("policy_linear_score_grad")(torch.randn(2, 4), x, w, s, "sampled"), ValueError,
         "needs u"),
    ]


RAW_CASES = _raw_cases() if ops.HAS_CPP else []


@needs_cpp
@pytest.mark.parametrize("i", range(len(RAW_CASES)), ids=[c[0] for c in RAW_CASES])
def test_raw_policy_ops_reject_bad_input(i):
    _, call, exc, match = RAW_CASES[i]
    with pytest.raises(exc, match=match):
        call()


# ------------------------------------------------------------------------------------------------
# The policies: the fused CPU path against the path they take without it (backend "torch")
# ------------------------------------------------------------------------------------------------

@needs_cpp
@pytest.mark.parametrize("policy, options", [("signed", {}), ("biprop", {}), ("supermask", {"seed": 3}),
                                             ("threshold", {"tau": 0.0}), ("gem_miner", {})])
@pytest.mark.parametrize("kind", ["linear", "effective_weight"])
def test_policy_fused_path_matches_its_torch_path(policy, options, kind):
    from maskprune import masks
    from maskprune.nn import MaskedLinear

    def run(backend):
        torch.manual_seed(0)
        layer = MaskedLinear(29, 13, bias=True, density=0.4, weight_init="kaiming_normal", backend=backend)
        layer.bias.requires_grad_(False)
        pol = masks.make_policy(policy, [layer], 0.4, **options)
        with torch.no_grad():
            layer.scores.copy_(torch.randn(layer.scores.shape, generator=_gen(1)) * 0.5 + 0.5)
        x = torch.randn(6, 29, generator=_gen(2))
        y = pol.linear(layer, x) if kind == "linear" else x @ pol.effective_weight(layer).T + layer.bias
        (y * torch.randn(y.shape, generator=_gen(3))).sum().backward()
        return y.detach(), layer.scores.grad

    assert ops.policy_fused("cpu", "auto") and not ops.policy_fused("cpu", "torch")
    (y, ds), (y_ref, ds_ref) = run("auto"), run("torch")
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ds, ds_ref, rtol=1e-5, atol=1e-6)


SAMPLED_ISA_SCRIPT = r"""
import hashlib, sys, torch, maskprune._C
torch.set_num_threads(int(sys.argv[1]))
C = torch.ops.maskprune
g = torch.Generator().manual_seed(0)
h = hashlib.sha256()
for n in (1, 15, 17, 1000, 300 * 784 + 13):
    w, s, u = torch.randn(n, generator=g), torch.randn(n, generator=g) * 30, torch.rand(n, generator=g)
    grad = torch.randn(n, generator=g)
    q, _, d = C.policy_mask(w, s, torch.tensor(0.0), "sampled", u)
    ds = C.policy_score_grad(grad, w, s, "sampled", u)
    ds_in_place = C.policy_linear_score_grad(grad.view(1, n), torch.ones(1, 1), w.view(n, 1), s.view(n, 1),
                                             "sampled", u.view(n, 1))
    for t in (q, d, ds, ds_in_place):
        h.update(t.numpy().tobytes())
print(h.hexdigest())
"""


def _cpu_flags() -> str:
    try:
        return open("/proc/cpuinfo").read()
    except OSError:
        return ""


@needs_cpp
@pytest.mark.skipif(" avx2" not in _cpu_flags(), reason="needs an x86 CPU with AVX2 (to compare its pass with SSE2's)")
def test_sampled_passes_agree_across_isas():
    """supermask's float32 passes compiled for AVX-512F, AVX2 and the baseline (chosen at run time; forced down with
    MASKPRUNE_NO_AVX512 / MASKPRUNE_NO_AVX2) give the same bytes, on one thread and on two (slices at odd places)."""
    import os
    import subprocess
    import sys

    isas = [("auto", {}), ("avx2", {"MASKPRUNE_NO_AVX512": "1"}),
            ("baseline", {"MASKPRUNE_NO_AVX512": "1", "MASKPRUNE_NO_AVX2": "1"})]
    digests = {}
    for isa, env in isas:
        for threads in ("1", "2"):
            proc = subprocess.run([sys.executable, "-c", SAMPLED_ISA_SCRIPT, threads], capture_output=True,
                                  text=True, env={**os.environ, **env}, timeout=300)
            assert proc.returncode == 0, proc.stderr[-2000:]
            digests[isa, threads] = proc.stdout.strip()
    print("ran:", sorted(digests), "(auto is AVX-512F where the CPU has it)")
    assert len(set(digests.values())) == 1, digests
