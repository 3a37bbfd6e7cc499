"""maskprune.ops against the pure-torch reference (docs/design.md §1), for every backend on every device.

Backends come from `maskprune.ops.available_backends(device)`: cpp and torch on CPU; triton joins
when it runs there (CUDA, or CPU under TRITON_INTERPRET=1, where shapes are kept small). CUDA
cases are skipped with "needs a CUDA GPU" on machines without one.
"""
from __future__ import annotations

import dataclasses
import math
import zlib

import pytest
import torch

import maskprune
from maskprune import ops, reference

# --------------------------------------------------------------------------------------------
# Tolerances, per dtype of the compared tensor, relative to the largest |value| of the expected
# tensor (atol = tol * max|expected|, rtol = tol); one scale keeps cancellation in a GEMM from
# turning a tiny absolute difference into a huge relative one.
#
# - float64: the backends run the same GEMM on the same masked weight; the only difference is
#   summation order over K <= 784 terms, ~sqrt(K)·2^-53 ≈ 3e-15 of the scale. 1e-12 leaves room.
# - float32: the same argument gives ~sqrt(784)·6e-8 ≈ 2e-6; the STE score gradient rounds
#   W·(dY^T X) once more in float32 (the reference rounds in the weight's dtype, the kernels in the
#   scores'). 1e-5. (A TF32 GEMM on a GPU would miss this by 100x: fp32 must stay IEEE.)
# - bfloat16 (8 significant bits, unit roundoff 2^-9 ≈ 2e-3): outputs and gradients are rounded
#   to bf16 once or twice, in different places per backend (the reference rounds W·G in bf16
#   before the float32 score gradient, the kernels do not); GPU GEMMs accumulate in another order.
#   A couple of bf16 ulps of the scale: 2e-2.
# - float16 (11 significant bits, unit roundoff 2^-12 ≈ 2.4e-4): the same, a couple of ulps: 2e-3.
# Score gradients are float32 (the master copy) but computed from activations of the activation
# dtype, so they get the looser of the two tolerances.
# --------------------------------------------------------------------------------------------
TOL = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.bfloat16: 2e-2,
    torch.float16: 2e-3,
}

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
needs_cpp = pytest.mark.skipif(not ops.HAS_CPP, reason="needs the C++ extension maskprune._C")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a busy 2-core host, OpenMP regions stall for milliseconds per op.

    test_cpu_kernels_with_several_threads covers the C++ kernels' multi-threaded paths.
    """
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield n_threads
    torch.set_num_threads(n_threads)


def device_backends() -> list:
    """(device, backend) pairs: every available backend on CPU, and on CUDA when there is a GPU."""
    params = [pytest.param("cpu", b, id=f"cpu-{b}") for b in ops.available_backends("cpu")]
    if CUDA:
        params += [pytest.param("cuda", b, id=f"cuda-{b}") for b in ops.available_backends("cuda")]
    else:
        params.append(pytest.param("cuda", "none", id="cuda", marks=needs_cuda))
    return params


DEVICE_BACKENDS = device_backends()


def interpreted(device: str, backend: str) -> bool:
    """The Triton backend on CPU runs in Triton's numpy interpreter: keep its shapes small."""
    return backend == "triton" and device == "cpu"


def seed_of(*key) -> int:
    return zlib.crc32(repr(key).encode())


def gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(seed_of(*key))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "") -> None:
    """|actual - expected| <= tol·max|expected| + tol·|expected| elementwise, and the same shape and dtype."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    if expected.numel() == 0:
        return
    a, e = actual.detach().double(), expected.detach().double()
    scale = float(e.abs().max())
    err = (a - e).abs() - tol * e.abs()
    worst = float(err.max())
    assert worst <= tol * scale, (f"{what}: max |actual - expected| - tol·|expected| = {worst:.3g} > tol·max|expected| = "
                                  f"{tol * scale:.3g} (tol {tol:g}, {int((err > tol * scale).sum())} of {e.numel()} "
                                  f"elements off)")


def n_keep_expected(density: float, n: int) -> int:
    """docs/design.md §1, written out again here rather than imported: clamp(floor(k·n + 1/2), 1, n)."""
    return min(max(math.floor(density * n + 0.5), 1), n)


def key_of(scores: torch.Tensor, abs_scores: bool) -> torch.Tensor:
    return scores.abs() if abs_scores else scores


def tie_free_scores(shape, dtype, abs_scores: bool, g: torch.Generator) -> torch.Tensor:
    """Random scores over many binades whose keys (|S| or S) are pairwise distinct in `dtype`."""
    n = math.prod(shape)
    v = (torch.randn(2 * n + 16, generator=g, dtype=torch.float64)
         * torch.exp(2.0 * torch.randn(2 * n + 16, generator=g, dtype=torch.float64))).to(dtype)
    key = key_of(v, abs_scores)
    uniq, inverse = torch.unique(key, return_inverse=True)
    first = torch.full((uniq.numel(),), v.numel(), dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(v.numel()), reduce="amin")
    v = v[first[torch.randperm(first.numel(), generator=g)]]
    assert v.numel() >= n
    return v[:n].reshape(shape).contiguous()


# ============================================================================================
# Backend table
# ============================================================================================

def test_backend_table():
    assert "torch" in ops.BACKENDS
    for device in ["cpu", "meta"] + (["cuda"] if CUDA else []):
        names = ops.available_backends(device)
        assert "torch" in names, names
        assert all(n in ops.BACKENDS for n in names)
        # "auto" is the first available one, and never fails where the reference would run.
        assert ops.resolve_backend("auto", torch.device(device)).name == names[0]
    assert ops.available_backends("meta") == ["torch"]
    if ops.HAS_CPP:
        assert ops.available_backends("cpu")[0] == "cpp"
    for name in ops.available_backends("cpu"):
        assert ops.resolve_backend(name, torch.device("cpu")).name == name


def test_auto_asks_no_backend_after_the_first_available(monkeypatch):
    """resolve_backend runs on every op call: "auto" stops at the first available backend (on CPU, cpp or
    torch) instead of asking every registered one (triton's check reads the environment)."""
    asked = []
    for name, backend in list(ops.BACKENDS.items()):
        def is_available(device, name=name, inner=backend.is_available):
            asked.append(name)
            return inner(device)
        monkeypatch.setitem(ops.BACKENDS, name, dataclasses.replace(backend, is_available=is_available))
    first = ops.available_backends("cpu")[0]
    asked.clear()
    assert ops.resolve_backend("auto", torch.device("cpu")).name == first
    assert asked == [first]


@pytest.mark.parametrize("bad", ["nope", "", "Torch", None, 3])
def test_unknown_backend_raises(bad):
    s = torch.randn(5)
    with pytest.raises(ValueError, match="backend"):
        ops.check_backend_name(bad)
    with pytest.raises(ValueError, match="backend"):
        maskprune.threshold(s, 0.5, backend=bad)
    with pytest.raises(ValueError, match="backend"):
        maskprune.global_threshold([s], 0.5, backend=bad)
    with pytest.raises(ValueError, match="backend"):
        maskprune.apply_mask(torch.randn(5), s, torch.tensor(0.0), backend=bad)
    with pytest.raises(ValueError, match="backend"):
        maskprune.masked_linear(torch.randn(2, 5), torch.randn(3, 5), torch.randn(3, 5), torch.tensor(0.0),
                                backend=bad)


@needs_cpp
def test_backend_not_available_on_device_raises():
    # The C++ extension has no kernels for the meta device: naming it there is an error, "auto" is not.
    with pytest.raises(ValueError, match="backend 'cpp' is not available on meta"):
        ops.resolve_backend("cpp", torch.device("meta"))
    assert ops.resolve_backend("auto", torch.device("meta")).name == "torch"


# ============================================================================================
# threshold / global_threshold
# ============================================================================================

THRESHOLD_SIZES = [(1,), (2,), (3,), (10,), (7, 13), (1000,), (4, 3, 5, 7), (65_537,)]
THRESHOLD_DENSITIES = [1e-9, 1e-3, 0.1, 0.3, 0.5, 0.7, 0.9, 0.999, 1.0]


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("abs_scores", [True, False], ids=["abs", "raw"])
@pytest.mark.parametrize("shape", THRESHOLD_SIZES, ids=lambda s: "x".join(map(str, s)))
def test_threshold_keeps_exactly_n_keep(device, backend, dtype, abs_scores, shape):
    scores = tie_free_scores(shape, dtype, abs_scores, gen("thr", shape, dtype, abs_scores)).to(device)
    key = key_of(scores, abs_scores)
    n = scores.numel()
    for density in THRESHOLD_DENSITIES:
        t = maskprune.threshold(scores, density, abs_scores=abs_scores, backend=backend)
        assert t.dim() == 0 and t.dtype == dtype and t.device == scores.device and not t.requires_grad
        kept = int((key >= t).sum())
        assert kept == n_keep_expected(density, n), (density, n, kept)
        assert float(t) == float(reference.threshold(scores, density, abs_scores)), density
        assert bool((key == t).any()), "t must be one of the keys"


@pytest.mark.parametrize("density,n,kept", [(0.9, 10, 9), (0.3, 10, 3), (0.7, 10, 7), (0.1, 10, 1), (0.05, 10, 1),
                                            (0.15, 10, 2), (0.25, 10, 3), (1e-9, 10, 1), (1.0, 10, 10),
                                            (0.5, 1, 1), (0.49, 1, 1), (0.999, 1000, 999), (1 / 3, 3, 1)])
def test_n_keep_rounding(density, n, kept):
    # floor(k·n + 1/2): 0.3·10 = 3.0000000000000004 and 0.7·10 = 7.000000000000001 still keep 3 and 7;
    # 0.15·10 = 1.5 rounds up to 2; 0.25·10 = 2.5 to 3 (round half up, not banker's rounding).
    assert reference.n_keep_for(density, n) == kept == n_keep_expected(density, n)
    for backend in ops.available_backends("cpu"):
        s = tie_free_scores((n,), torch.float32, True, gen("nk", n))
        t = maskprune.threshold(s, density, backend=backend)
        assert int((s.abs() >= t).sum()) == kept, backend


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("abs_scores", [True, False], ids=["abs", "raw"])
def test_threshold_with_ties_keeps_every_tie(device, backend, dtype, abs_scores):
    g = gen("ties", dtype, abs_scores)
    levels = torch.tensor([0.25, 0.5, 1.0, 2.0, -0.5, -1.0, 0.0], dtype=dtype)
    scores = levels[torch.randint(0, levels.numel(), (23, 31), generator=g)].to(device)
    key = key_of(scores, abs_scores)
    for density in [1e-9, 0.1, 0.2, 0.37, 0.5, 0.63, 0.8, 0.95, 1.0]:
        n_keep = n_keep_expected(density, scores.numel())
        t = maskprune.threshold(scores, density, abs_scores=abs_scores, backend=backend)
        assert float(t) == float(reference.threshold(scores, density, abs_scores))
        assert int((key > t).sum()) < n_keep <= int((key >= t).sum())
        # every score tied at t is kept by apply_mask
        w = torch.randn(scores.shape, generator=g, dtype=torch.float64).to(device=device)
        w_eff = maskprune.apply_mask(w, scores, t, abs_scores=abs_scores, backend=backend)
        assert torch.equal(w_eff != 0, key >= t)
    # all scores equal: every density keeps everything
    same = torch.full((5, 7), -0.75, dtype=dtype, device=device)
    for density in [1e-9, 0.5, 1.0]:
        t = maskprune.threshold(same, density, abs_scores=abs_scores, backend=backend)
        assert float(t) == (0.75 if abs_scores else -0.75)
        assert bool((key_of(same, abs_scores) >= t).all())


def special_values(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Inputs that stress a radix select: one shared bit prefix, zeros of both signs, subnormals, extremes."""
    info = torch.finfo(dtype)
    g = gen("special", dtype)
    one_prefix = 1.0 + torch.arange(300, dtype=torch.float64) * 2.0 ** -40  # same top 16 key bits
    return {
        "one_prefix": one_prefix[torch.randperm(300, generator=g)].to(dtype),
        "one_prefix_signed": (one_prefix * torch.where(torch.rand(300, generator=g) < 0.5, -1.0, 1.0)).to(dtype),
        "zeros": torch.tensor([0.0, -0.0, 0.0, -0.0, 1.0, -2.0, 0.0], dtype=dtype),
        "subnormal": torch.tensor([info.tiny / 4, -info.tiny / 2, info.tiny, 0.0, -info.tiny / 8], dtype=dtype),
        "extremes": torch.tensor([info.max, -info.max, info.tiny, -info.tiny, 1.0, -1.0, 0.0], dtype=dtype),
        "negative": -torch.rand(101, generator=g, dtype=torch.float64).to(dtype) - 0.5,
        "mixed": torch.randn(257, generator=g, dtype=torch.float64).to(dtype) * 1e-3,
        # Large enough for the histogram path of the C++ select (more than 2^14 scores):
        "one_prefix_large": (1.0 + torch.arange(20_000, dtype=torch.float64) * 2.0 ** -40).to(dtype),
        "ties_large": torch.tensor([0.0, -0.0, 0.5, -0.5, 2.0, -1.0], dtype=dtype).repeat(4_000),
        "mixed_large": torch.randn(70_001, generator=g, dtype=torch.float64).to(dtype) * 1e-3,
    }


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("abs_scores", [True, False], ids=["abs", "raw"])
def test_threshold_special_values(device, backend, dtype, abs_scores):
    for name, scores in special_values(dtype).items():
        if interpreted(device, backend) and scores.numel() > 1000:
            continue  # the Triton interpreter would take minutes; tests/kernels covers its large cases
        scores = scores.to(device)
        key = key_of(scores, abs_scores)
        for density in [1e-9, 0.2, 0.5, 0.8, 1.0]:
            t = maskprune.threshold(scores, density, abs_scores=abs_scores, backend=backend)
            t_ref = reference.threshold(scores, density, abs_scores)
            assert float(t) == float(t_ref), (name, density, float(t), float(t_ref))
            n_keep = n_keep_expected(density, scores.numel())
            assert int((key > t).sum()) < n_keep <= int((key >= t).sum()), (name, density)


@pytest.mark.parametrize("backend", ops.available_backends("cpu"))
def test_cpu_kernels_with_several_threads(backend, one_thread):
    # Sizes above the C++ kernels' parallel grain (2^15), so that every thread takes a share of the
    # histogram, the gather and the mask/score-gradient passes.
    torch.set_num_threads(max(2, one_thread))
    try:
        g = gen("threads")
        for n, abs_scores in [(100_003, True), (65_536 + 17, False)]:
            scores = tie_free_scores((n,), torch.float32, abs_scores, g)
            for density in [1e-9, 0.01, 0.5, 0.99, 1.0]:
                t = maskprune.threshold(scores, density, abs_scores=abs_scores, backend=backend)
                assert float(t) == float(reference.threshold(scores, density, abs_scores))
                assert int((key_of(scores, abs_scores) >= t).sum()) == n_keep_expected(density, n)
                for hint in [t, t * 1.001, t * 1.02]:  # the windowed pass, split over the threads
                    assert float(maskprune.threshold(scores, density, abs_scores=abs_scores, backend=backend,
                                                     hint=hint)) == float(t)
            parts = [scores[:40_000], scores[40_000:40_001], scores[40_001:]]
            t = maskprune.global_threshold(parts, 0.3, abs_scores=abs_scores, backend=backend)
            assert float(t) == float(reference.threshold(scores, 0.3, abs_scores))
        weight = torch.randn(300, 400, generator=g)
        scores = torch.randn(300, 400, generator=g)
        t = reference.threshold(scores, 0.4, True)
        s_got, s_ref = scores.clone().requires_grad_(), scores.clone().requires_grad_()
        x = torch.randn(8, 400, generator=g)
        y = maskprune.masked_linear(x, weight, s_got, t, backend=backend)
        y_ref = reference.masked_linear(x, weight, s_ref, t)
        assert_close(y, y_ref, TOL[torch.float32], "y")
        y.sum().backward()
        y_ref.sum().backward()
        assert_close(s_got.grad, s_ref.grad, TOL[torch.float32], "grad scores")
        assert torch.equal(maskprune.apply_mask(weight, scores, t, backend=backend), reference.apply_mask(weight, scores, t))
        y_two_ops = maskprune.masked_linear(x, weight, scores, t, backend=backend)
        for hint in [None, t, t * 1.0001, t * 1.02]:  # the fused pass (or its fall-back), split over the threads
            y_topk, t_topk = maskprune.ops.masked_linear_topk(x, weight, scores, 0.4, backend=backend, hint=hint)
            assert float(t_topk) == float(t) and torch.equal(y_topk, y_two_ops)
    finally:
        torch.set_num_threads(1)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_threshold_of_noncontiguous_scores(device, backend):
    base = tie_free_scores((40, 30), torch.float32, True, gen("nc-thr")).to(device)
    for view in [base.t(), base[:, ::3], base[::2].t()]:
        for density in [0.1, 0.5, 0.9]:
            t = maskprune.threshold(view, density, backend=backend)
            assert float(t) == float(maskprune.threshold(view.contiguous(), density, backend=backend))
            assert int((view.abs() >= t).sum()) == n_keep_expected(density, view.numel())


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_threshold_output_carries_no_grad(device, backend, dtype):
    scores = torch.randn(6, 9, dtype=dtype, device=device, requires_grad=True)
    t = maskprune.threshold(scores, 0.4, backend=backend)
    assert t.shape == () and t.dtype == dtype and not t.requires_grad and t.grad_fn is None
    t = maskprune.global_threshold([scores, scores[:2].detach().clone().requires_grad_()], 0.4, backend=backend)
    assert t.shape == () and t.dtype == dtype and not t.requires_grad and t.grad_fn is None


GLOBAL_SHAPES = [[(3,), (17, 5), (2, 3, 4, 5), (1,)], [(1,)], [(1,), (1,)], [(64, 33), (7,), (8, 4, 3, 3)]]


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("abs_scores", [True, False], ids=["abs", "raw"])
@pytest.mark.parametrize("shapes", GLOBAL_SHAPES, ids=lambda s: "-".join("x".join(map(str, x)) for x in s))
def test_global_threshold_equals_reference_on_concatenation(device, backend, dtype, abs_scores, shapes):
    n = sum(math.prod(s) for s in shapes)
    flat = tie_free_scores((n,), dtype, abs_scores, gen("glob", shapes, dtype, abs_scores)).to(device)
    parts = list(torch.split(flat, [math.prod(s) for s in shapes]))
    scores_list = [p.reshape(s) for p, s in zip(parts, shapes)]
    if scores_list[0].dim() == 2:  # a non-contiguous member
        scores_list[0] = scores_list[0].t().contiguous().t()
    for density in [1e-9, 0.05, 0.3, 0.5, 0.77, 1.0]:
        t = maskprune.global_threshold(scores_list, density, abs_scores=abs_scores, backend=backend)
        t_ref = reference.threshold(torch.cat([s.flatten() for s in scores_list]), density, abs_scores)
        assert t.dim() == 0 and t.dtype == dtype and not t.requires_grad
        assert float(t) == float(t_ref), density
        kept = sum(int((key_of(s, abs_scores) >= t).sum()) for s in scores_list)
        assert kept == n_keep_expected(density, n)
    # a list of one tensor is threshold() of that tensor; a tuple works as well as a list
    single = maskprune.global_threshold((scores_list[0],), 0.5, abs_scores=abs_scores, backend=backend)
    assert float(single) == float(maskprune.threshold(scores_list[0], 0.5, abs_scores=abs_scores, backend=backend))


def hints_for(t: float, dtype: torch.dtype) -> list[float]:
    """Previous thresholds a caller might pass: exact, inside the narrow and the wide search window,
    outside both, and meaningless ones. None of them may change the result."""
    info = torch.finfo(dtype)
    return [t, t * (1 + 1e-4), t * (1 - 1e-3), t * 1.02, t * 0.97, t * 1.5, -t, 0.0, 1.0, info.max, -info.max,
            info.tiny, float("inf"), float("-inf"), float("nan")]


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("abs_scores", [True, False], ids=["abs", "raw"])
def test_threshold_hint_never_changes_the_result(device, backend, dtype, abs_scores):
    g = gen("hint", dtype, abs_scores)
    cases = dict(special_values(dtype))
    cases["tie_free_small"] = tie_free_scores((97,), dtype, abs_scores, g)
    cases["tie_free_large"] = tie_free_scores((300, 101), dtype, abs_scores, g)  # several window blocks + a tail
    cases["uniform_large"] = torch.rand(235_211, generator=g, dtype=torch.float64).to(dtype) * 0.1 - 0.05
    for name, scores in cases.items():
        if interpreted(device, backend) and scores.numel() > 1000:
            continue  # the Triton interpreter would take minutes (and Triton ignores hints)
        scores = scores.to(device)
        key = key_of(scores, abs_scores)
        for density in [1e-9, 0.05, 0.5, 0.95, 1.0]:
            t_ref = float(reference.threshold(scores, density, abs_scores))
            hints = hints_for(t_ref, dtype)[:3] if interpreted(device, backend) else hints_for(t_ref, dtype)
            for h in hints:
                hint = torch.tensor(h, dtype=dtype, device=device)
                t = maskprune.threshold(scores, density, abs_scores=abs_scores, backend=backend, hint=hint)
                assert float(t) == t_ref or (t_ref == 0 and float(t) == 0), (name, density, h, float(t), t_ref)
                n_keep = n_keep_expected(density, scores.numel())
                assert int((key > t).sum()) < n_keep <= int((key >= t).sum()), (name, density, h)
            # a hint of another float dtype is read as a number
            other = torch.tensor(t_ref, dtype=torch.float32 if dtype == torch.float64 else torch.float64, device=device)
            assert float(maskprune.threshold(scores, density, abs_scores=abs_scores, backend=backend,
                                             hint=other)) == t_ref
            beyond = torch.tensor(1e300, dtype=torch.float64, device=device)  # inf once read as float32
            assert float(maskprune.threshold(scores, density, abs_scores=abs_scores, backend=backend,
                                             hint=beyond)) == t_ref
        parts = [scores.flatten()[: scores.numel() // 3], scores.flatten()[scores.numel() // 3:]]
        t_ref = float(reference.threshold(scores, 0.3, abs_scores))
        for h in hints_for(t_ref, dtype)[:4]:
            hint = torch.tensor(h, dtype=dtype, device=device)
            t = maskprune.global_threshold(parts, 0.3, abs_scores=abs_scores, backend=backend, hint=hint)
            assert float(t) == t_ref or (t_ref == 0 and float(t) == 0), (name, h)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_threshold_hint_with_nonfinite_scores_still_raises(device, backend, bad):
    if device != "cpu":
        pytest.skip("GPU scores are checked on the device: test_nonfinite_scores_checked_on_device_without_sync")
    s = torch.randn(300, 101, device=device)
    t = maskprune.threshold(s, 0.5, backend=backend)
    s[7, 7] = bad
    for hint in [t, t * 1.001, -t]:
        with pytest.raises(ValueError, match="scores.* finite"):
            maskprune.threshold(s, 0.5, backend=backend, hint=hint)
        with pytest.raises(ValueError, match="scores.* finite"):
            maskprune.global_threshold([s[:100], s[100:]], 0.5, backend=backend, hint=hint)


@pytest.mark.parametrize("bad,exc,match", [
    (0.5, TypeError, "hint must be a torch.Tensor"),
    (torch.tensor(1), TypeError, "hint must have dtype"),
    (torch.zeros(2), ValueError, "hint must be None or a 0-d tensor"),
])
def test_bad_hint_raises(bad, exc, match):
    s = torch.randn(5, 7)
    for backend in ops.available_backends("cpu"):
        with pytest.raises(exc, match=match):
            maskprune.threshold(s, 0.5, backend=backend, hint=bad)
        with pytest.raises(exc, match=match):
            maskprune.global_threshold([s], 0.5, backend=backend, hint=bad)


# ============================================================================================
# apply_mask and masked_linear against the reference
# ============================================================================================

# (activation/weight dtype, scores dtype)
DTYPE_CASES = [
    pytest.param(torch.float32, torch.float32, id="f32"),
    pytest.param(torch.float64, torch.float64, id="f64"),
    pytest.param(torch.bfloat16, torch.float32, id="bf16"),
    pytest.param(torch.float16, torch.float32, id="f16"),
]
# (batch, out_features, in_features)
LINEAR_SHAPES = [(1, 1, 1), (37, 53, 70), (3, 300, 784), (5, 1, 17), (2, 13, 1), (64, 10, 9)]  # BIG: sampled
LINEAR_DENSITIES = [1e-9, 0.05, 0.5, 0.9, 1.0]


def small_enough(device, backend, shape) -> bool:
    return not interpreted(device, backend) or math.prod(shape) <= 150_000


BIG = (3, 300, 784)


def linear_cases():
    """(device, backend, shape, density, abs_scores, bias): the full grid on small shapes, a sample on BIG."""
    out = []
    for p in DEVICE_BACKENDS:
        dev, be = p.values
        for shape in LINEAR_SHAPES:
            if not small_enough(dev, be, shape):
                continue
            for density in LINEAR_DENSITIES:
                for abs_scores in (True, False):
                    for bias in (False, True):
                        if shape == BIG and (density not in (1e-9, 0.5) or abs_scores != bias):
                            continue
                        ids = (f"{dev}-{be}-{'x'.join(map(str, shape))}-d{density:g}-{'abs' if abs_scores else 'raw'}-"
                               f"{'bias' if bias else 'nobias'}")
                        out.append(pytest.param(dev, be, shape, density, abs_scores, bias, marks=p.marks, id=ids))
    return out


def make_linear(shape, act_dtype, score_dtype, device, *, bias: bool, layout: str = "contiguous", seed=0):
    """Inputs of masked_linear: (x_leaf, view_fn, weight, scores, bias); x = view_fn(x_leaf)."""
    B, N, K = shape
    g = gen("linear", shape, act_dtype, score_dtype, bias, layout, seed)
    rand = lambda *size: torch.randn(*size, generator=g, dtype=torch.float64)
    weight = (rand(N, K) / math.sqrt(K)).to(act_dtype)
    scores = rand(N, K).to(score_dtype)
    b = rand(N).to(act_dtype) if bias else None
    if layout == "contiguous":
        x_leaf, view = rand(B, K), (lambda x: x)
    elif layout == "transposed":  # (B, K) view of a (K, B) tensor
        x_leaf, view = rand(K, B), (lambda x: x.t())
    elif layout == "sliced":  # every other column of a (B, 2K) tensor
        x_leaf, view = rand(B, 2 * K), (lambda x: x[:, ::2])
    elif layout == "batched":  # leading batch dimensions (2, 3)
        x_leaf, view = rand(2, 3, K), (lambda x: x)
    elif layout == "batched_permuted":  # (2, 3, K) view of a (K, 3, 2) tensor
        x_leaf, view = rand(K, 3, 2), (lambda x: x.permute(2, 1, 0))
    elif layout == "vector":  # a single sample of shape (K,)
        x_leaf, view = rand(K), (lambda x: x)
    else:
        raise AssertionError(layout)
    x_leaf = x_leaf.to(act_dtype)
    return [x_leaf.to(device), view, weight.to(device), scores.to(device), None if b is None else b.to(device)]


def run_linear(fn, x_leaf, view, weight, scores, bias, t, upstream: str):
    """Forward and backward of fn(x, weight, scores, t, bias); returns y and the grads of x_leaf, scores, bias."""
    x_leaf = x_leaf.detach().clone().requires_grad_()
    scores = scores.detach().clone().requires_grad_()
    bias = None if bias is None else bias.detach().clone().requires_grad_()
    y = fn(view(x_leaf), weight, scores, t, bias)
    if upstream == "sum":  # the upstream gradient is an expanded, stride-0 tensor
        y.sum().backward()
    else:
        g = torch.randn(y.shape, generator=gen("upstream", tuple(y.shape)), dtype=torch.float64)
        (y * g.to(device=y.device, dtype=y.dtype)).sum().backward()
    assert weight.grad is None
    return y.detach(), x_leaf.grad, scores.grad, None if bias is None else bias.grad


def check_against_reference(backend, inputs, act_dtype, score_dtype, density, abs_scores, upstream):
    x_leaf, view, weight, scores, bias = inputs
    t = reference.threshold(scores, density, abs_scores)
    fn = lambda x, w, s, t_, b: maskprune.masked_linear(x, w, s, t_, b, abs_scores=abs_scores, backend=backend)
    ref = lambda x, w, s, t_, b: reference.masked_linear(x, w, s, t_, b, abs_scores)
    got = run_linear(fn, x_leaf, view, weight, scores, bias, t, upstream)
    want = run_linear(ref, x_leaf, view, weight, scores, bias, t, upstream)
    tol, tol_s = TOL[act_dtype], max(TOL[act_dtype], TOL[score_dtype])
    assert_close(got[0], want[0], tol, "y")
    assert_close(got[1], want[1], tol, "grad x")
    assert_close(got[2], want[2], tol_s, "grad scores")
    if bias is not None:
        assert_close(got[3], want[3], tol, "grad bias")


@pytest.mark.parametrize("device,backend,shape,density,abs_scores,bias", linear_cases())
@pytest.mark.parametrize("act_dtype,score_dtype", DTYPE_CASES)
def test_masked_linear_matches_reference(device, backend, shape, act_dtype, score_dtype, density, abs_scores, bias):
    inputs = make_linear(shape, act_dtype, score_dtype, device, bias=bias)
    upstream = "sum" if (LINEAR_SHAPES.index(shape) + LINEAR_DENSITIES.index(density)) % 2 else "random"
    check_against_reference(backend, inputs, act_dtype, score_dtype, density, abs_scores, upstream)


LAYOUTS = ["contiguous", "transposed", "sliced", "batched", "batched_permuted", "vector"]


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("act_dtype,score_dtype", DTYPE_CASES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("upstream", ["sum", "random"])
def test_masked_linear_layouts_match_reference(device, backend, act_dtype, score_dtype, layout, bias, upstream):
    inputs = make_linear((7, 11, 19), act_dtype, score_dtype, device, bias=bias, layout=layout)
    for density, abs_scores in [(0.3, True), (0.6, False)]:
        check_against_reference(backend, inputs, act_dtype, score_dtype, density, abs_scores, upstream)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("shape", [(1, 1, 1), (37, 53, 70), (4, 300, 784)], ids=lambda s: "x".join(map(str, s)))
def test_float64_weights_with_float32_scores(device, backend, shape):
    # What MaskedLinear(dtype=torch.float64) and convert() of a float64 model hold: float32 master
    # scores next to float64 weights. The kept weights must pass through unrounded (W ⊙ M is exact).
    if not small_enough(device, backend, shape):
        pytest.skip("too large for the Triton interpreter")
    inputs = make_linear(shape, torch.float64, torch.float32, device, bias=True)
    for density, abs_scores in [(0.5, True), (1.0, False)]:
        check_against_reference(backend, inputs, torch.float64, torch.float32, density, abs_scores, "random")
    _, _, weight, scores, _ = inputs
    t = reference.threshold(scores, 1.0, True)
    w_eff = maskprune.apply_mask(weight, scores, t, backend=backend)
    assert torch.equal(w_eff, weight), "density 1 keeps every float64 weight bit for bit"


APPLY_DTYPES = [
    pytest.param(torch.float32, torch.float32, id="f32"),
    pytest.param(torch.float64, torch.float64, id="f64"),
    pytest.param(torch.float64, torch.float32, id="f64w-f32s"),
    pytest.param(torch.bfloat16, torch.float32, id="bf16"),
    pytest.param(torch.float16, torch.float32, id="f16"),
]


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("weight_dtype,score_dtype", APPLY_DTYPES)
@pytest.mark.parametrize("shape", [(1,), (1, 1), (53, 70), (8, 3, 3, 3), (123, 457)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("abs_scores", [True, False], ids=["abs", "raw"])
def test_apply_mask_matches_reference(device, backend, weight_dtype, score_dtype, shape, abs_scores):
    if interpreted(device, backend) and math.prod(shape) > 20_000:
        pytest.skip("too large for the Triton interpreter")
    g = gen("apply", shape, weight_dtype, score_dtype, abs_scores)
    weight = torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=weight_dtype)
    scores0 = tie_free_scores(shape, score_dtype, abs_scores, g).to(device)
    upstream = torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=weight_dtype)
    for density in [1e-9, 0.3, 1.0]:
        t = reference.threshold(scores0, density, abs_scores)
        s_got, s_ref = scores0.clone().requires_grad_(), scores0.clone().requires_grad_()
        got = maskprune.apply_mask(weight, s_got, t, abs_scores=abs_scores, backend=backend)
        want = reference.apply_mask(weight, s_ref, t, abs_scores)
        assert got.dtype == weight_dtype and got.shape == weight.shape
        assert torch.equal(got, want), "W ⊙ M has no rounding: every backend must match bit for bit"
        assert int((got != 0).sum()) == n_keep_expected(density, weight.numel())  # randn weights: no zeros
        (got * upstream).sum().backward()
        (want * upstream).sum().backward()
        assert_close(s_got.grad, s_ref.grad, max(TOL[weight_dtype], TOL[score_dtype]), "grad scores")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_apply_mask_noncontiguous_and_stride0_grad(device, backend):
    g = gen("apply-nc")
    w_base = torch.randn(30, 20, generator=g).to(device)
    s_base = torch.randn(20, 30, generator=g).to(device)
    weight, scores0 = w_base.t()[:, ::2], s_base[:, ::2]  # both (20, 15), non-contiguous, differently strided
    t = reference.threshold(scores0, 0.4, True)
    s_got, s_ref = scores0.clone().requires_grad_(), scores0.clone().requires_grad_()
    got = maskprune.apply_mask(weight, s_got, t, backend=backend)
    assert torch.equal(got, reference.apply_mask(weight, s_ref, t))
    got.sum().backward()  # stride-0 upstream gradient
    reference.apply_mask(weight, s_ref, t).sum().backward()
    assert_close(s_got.grad, s_ref.grad, TOL[torch.float32], "grad scores")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_gradients_never_overwrite_tensors_the_caller_holds(device, backend):
    """The C++ autograd writes dS in place only over a GEMM output of its own: a caller's upstream
    gradient, a hook's view of a gradient and retained graphs stay intact."""
    g = gen("no-overwrite")
    weight = torch.randn(6, 9, generator=g).to(device)
    scores = torch.randn(6, 9, generator=g).to(device).requires_grad_()
    t = reference.threshold(scores.detach(), 0.5, True)
    # apply_mask with the caller's own upstream gradient
    upstream = torch.randn(6, 9, generator=g).to(device)
    kept = upstream.clone()
    maskprune.apply_mask(weight, scores, t, backend=backend).backward(upstream)
    assert torch.equal(upstream, kept)
    assert_close(scores.grad, torch.sign(scores.detach()) * weight * upstream, TOL[torch.float32], "dS")
    # masked_linear: a hook that keeps the output gradient, a retained graph run twice, torch.autograd.grad
    x = torch.randn(4, 9, generator=g).to(device).requires_grad_()
    seen = []
    y = maskprune.masked_linear(x, weight, scores, t, backend=backend)
    y.register_hook(lambda grad: seen.append(grad))
    grad_y = torch.randn(4, 6, generator=g).to(device)
    grad_y_kept = grad_y.clone()
    first = torch.autograd.grad(y, [x, scores], grad_y, retain_graph=True)
    second = torch.autograd.grad(y, [x, scores], grad_y)
    assert torch.equal(grad_y, grad_y_kept) and all(torch.equal(s_, grad_y_kept) for s_ in seen)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    w_eff = reference.apply_mask(weight, scores.detach(), t)
    assert_close(first[0], grad_y @ w_eff, TOL[torch.float32], "dX")
    assert_close(first[1], torch.sign(scores.detach()) * weight * (grad_y.t() @ x.detach()), TOL[torch.float32], "dS")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_masked_linear_gradient_accumulates_over_two_forwards(device, backend):
    g = gen("two-forwards")
    weight = torch.randn(5, 8, generator=g).to(device)
    scores = torch.randn(5, 8, generator=g).to(device).requires_grad_()
    t = reference.threshold(scores.detach(), 0.5, True)
    x1, x2 = torch.randn(3, 8, generator=g).to(device), torch.randn(2, 8, generator=g).to(device)
    loss = maskprune.masked_linear(x1, weight, scores, t, backend=backend).sum() \
        + maskprune.masked_linear(x2, weight, scores, t, backend=backend).square().sum()
    loss.backward()
    s_ref = scores.detach().clone().requires_grad_()
    (reference.masked_linear(x1, weight, s_ref, t).sum() + reference.masked_linear(x2, weight, s_ref, t).square().sum()).backward()
    assert_close(scores.grad, s_ref.grad, TOL[torch.float32], "dS over two uses")


# ============================================================================================
# Gradients: gradcheck where the function is smooth, the STE formula where it is not
# ============================================================================================

@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("abs_scores", [True, False], ids=["abs", "raw"])
@pytest.mark.parametrize("x_shape", [(5, 7), (2, 3, 7), (7,)], ids=["2d", "3d", "1d"])
def test_gradcheck_masked_linear_x_and_bias(device, backend, abs_scores, x_shape):
    # With scores fixed, y = X (W ⊙ M)^T + b is linear in x and b: gradcheck is exact there.
    g = gen("gradcheck", x_shape, abs_scores)
    opts = dict(dtype=torch.float64, device=device)
    weight = torch.randn(4, 7, generator=g, dtype=torch.float64).to(device)
    scores = torch.randn(4, 7, generator=g, dtype=torch.float64).to(device)
    t = reference.threshold(scores, 0.5, abs_scores)
    x = torch.randn(x_shape, generator=g, dtype=torch.float64).to(**opts).requires_grad_()
    b = torch.randn(4, generator=g, dtype=torch.float64).to(**opts).requires_grad_()
    fn = lambda x, b: maskprune.masked_linear(x, weight, scores, t, b, abs_scores=abs_scores, backend=backend)
    assert torch.autograd.gradcheck(fn, (x, b), eps=1e-6, atol=1e-8)
    fn_x = lambda x: maskprune.masked_linear(x, weight, scores, t, abs_scores=abs_scores, backend=backend)
    assert torch.autograd.gradcheck(fn_x, (x,), eps=1e-6, atol=1e-8)
    # scores that require grad must not change the x/bias gradients
    s = scores.clone().requires_grad_()
    fn_s = lambda x, b: maskprune.masked_linear(x, weight, s, t, b, abs_scores=abs_scores, backend=backend)
    assert torch.autograd.gradcheck(fn_s, (x, b), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("abs_scores", [True, False], ids=["abs", "raw"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("x_shape", [(6, 9), (2, 3, 9)], ids=["2d", "3d"])
def test_score_gradient_is_the_straight_through_formula(device, backend, abs_scores, dtype, x_shape):
    # The mask is piecewise constant in S, so the numerical derivative is 0 (or a jump): the STE
    # gradient is checked against docs/design.md §1 directly: dS = sign(S) ⊙ W ⊙ (dY^T X), or W ⊙ (dY^T X).
    g = gen("ste", abs_scores, dtype, x_shape)
    rand = lambda *size: torch.randn(*size, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    weight, x = rand(5, 9), rand(*x_shape)
    scores = rand(5, 9)
    scores[0, 0] = 0.0  # sign(0) = 0: no gradient through |S| at S = 0
    scores.requires_grad_()
    t = reference.threshold(scores, 0.4, abs_scores)
    y = maskprune.masked_linear(x, weight, scores, t, abs_scores=abs_scores, backend=backend)
    dy = rand(*y.shape)
    (y * dy).sum().backward()
    dw_eff = dy.reshape(-1, 5).double().t() @ x.reshape(-1, 9).double()
    expected = weight.double() * dw_eff
    if abs_scores:
        expected = torch.sign(scores.detach().double()) * expected
    assert_close(scores.grad, expected.to(dtype), TOL[dtype] * 10, "dS (masked_linear)")
    mask = key_of(scores.detach(), abs_scores) >= t
    assert bool((scores.grad[~mask] != 0).any()), "pruned weights' scores get a gradient too (STE)"

    # apply_mask: dS = sign(S) ⊙ W ⊙ G
    s2 = scores.detach().clone().requires_grad_()
    w_eff = maskprune.apply_mask(weight, s2, t, abs_scores=abs_scores, backend=backend)
    G = rand(5, 9)
    (w_eff * G).sum().backward()
    expected = weight.double() * G.double() * (torch.sign(scores.detach().double()) if abs_scores else 1.0)
    assert_close(s2.grad, expected.to(dtype), TOL[dtype], "dS (apply_mask)")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_no_weight_gradient_and_partial_needs(device, backend):
    g = gen("partial")
    weight = torch.randn(4, 6, generator=g).to(device)
    scores = torch.randn(4, 6, generator=g).to(device)
    t = reference.threshold(scores, 0.5, True)
    x = torch.randn(3, 6, generator=g).to(device)
    # only scores need a gradient (the usual mask-training case: the input is data)
    s = scores.clone().requires_grad_()
    maskprune.masked_linear(x, weight, s, t, backend=backend).sum().backward()
    s_ref = scores.clone().requires_grad_()
    reference.masked_linear(x, weight, s_ref, t).sum().backward()
    assert_close(s.grad, s_ref.grad, TOL[torch.float32], "grad scores")
    # only x needs one
    xg = x.clone().requires_grad_()
    maskprune.masked_linear(xg, weight, scores, t, backend=backend).sum().backward()
    xr = x.clone().requires_grad_()
    reference.masked_linear(xr, weight, scores, t).sum().backward()
    assert_close(xg.grad, xr.grad, TOL[torch.float32], "grad x")
    # nothing needs one: the output is a plain tensor
    with torch.no_grad():
        y = maskprune.masked_linear(x, weight, s, t, backend=backend)
    assert not y.requires_grad


# ============================================================================================
# The threshold found in the forward: threshold_and_mask and masked_linear_topk
# ============================================================================================

def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, so that equality also tells -0.0 from 0.0."""
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


# (weight dtype, scores dtype, output dtype or None for the weight's)
TOPK_DTYPES = [
    pytest.param(torch.float32, torch.float32, None, id="f32"),
    pytest.param(torch.float64, torch.float64, None, id="f64"),
    pytest.param(torch.float32, torch.float32, torch.bfloat16, id="f32-to-bf16"),
    pytest.param(torch.float16, torch.float32, None, id="f16"),
    pytest.param(torch.float64, torch.float32, torch.float32, id="f64-f32-scores"),
]


@needs_cpp
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
@pytest.mark.parametrize("weight_dtype,score_dtype,out_dtype", TOPK_DTYPES)
@pytest.mark.parametrize("abs_scores", [True, False], ids=["abs", "raw"])
def test_threshold_and_mask_is_threshold_then_apply_mask(device, weight_dtype, score_dtype, out_dtype, abs_scores):
    """Bit for bit, whatever the hint: the fused pass where t lies near it, the two ops elsewhere."""
    g = gen("threshold_and_mask", weight_dtype, score_dtype, out_dtype, abs_scores)
    cases = {name: v for name, v in special_values(score_dtype).items() if torch.isfinite(v).all()}
    cases["tie_free"] = tie_free_scores((300, 101), score_dtype, abs_scores, g)  # above the small-select size
    cases["uniform"] = (torch.rand(613, 397, generator=g, dtype=torch.float64) * 0.1 - 0.05).to(score_dtype)
    cases["ties"] = torch.randint(-3, 4, (250, 131), generator=g).to(score_dtype)  # crowds of equal keys
    for name, scores in cases.items():
        scores = scores.to(device)
        weight = torch.randn(scores.shape, generator=g, dtype=torch.float64).to(weight_dtype).to(device)
        weight.view(-1)[::7] *= -1  # negative weights: dropped ones are -0.0 in the mask pass
        for density in [1e-9, 0.05, 0.5, 0.95, 1.0]:
            t_ref = maskprune.threshold(scores, density, abs_scores=abs_scores, backend="cpp")
            w_ref = torch.ops.maskprune.apply_mask(weight, scores, t_ref, abs_scores, out_dtype)
            for h in [None, *hints_for(float(t_ref), score_dtype)]:
                hint = None if h is None else torch.tensor(h, dtype=score_dtype, device=device)
                t, w = torch.ops.maskprune.threshold_and_mask(weight, scores, density, abs_scores, hint, out_dtype)
                assert t.dtype == score_dtype and t.shape == () and w.dtype == (out_dtype or weight_dtype)
                assert torch.equal(bits(t), bits(t_ref)), (name, density, h, float(t), float(t_ref))
                assert torch.equal(bits(w), bits(w_ref)), (name, density, h)
    # non-contiguous inputs
    scores, weight = torch.randn(101, 300, generator=g).t(), torch.randn(101, 300, generator=g).t()
    t_ref = maskprune.threshold(scores, 0.3, backend="cpp")
    t, w = torch.ops.maskprune.threshold_and_mask(weight.to(device), scores.to(device), 0.3, True, t_ref * 1.0001)
    assert float(t) == float(t_ref) and torch.equal(w.cpu(), reference.apply_mask(weight, scores, t_ref))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("act_dtype,score_dtype", DTYPE_CASES)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "batched_permuted", "vector"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_masked_linear_topk_is_threshold_then_masked_linear(device, backend, act_dtype, score_dtype, layout, bias):
    """(Y, t) and every gradient equal those of threshold() then masked_linear(), for any hint."""
    shape = (4, 9, 13) if interpreted(device, backend) else (5, 150, 129)  # 19350 scores: the fused CPU pass
    x_leaf, view, weight, scores, b = make_linear(shape, act_dtype, score_dtype, device, bias=bias, layout=layout)
    for density, abs_scores in [(0.5, True), (0.1, False), (1e-9, True), (1.0, False)]:
        t_ref = maskprune.threshold(scores, density, abs_scores=abs_scores, backend=backend)
        hints = [None, t_ref, t_ref * 1.001, -t_ref] if not interpreted(device, backend) else [None, t_ref]
        want = run_linear(lambda x, w, s, t_, b_: maskprune.masked_linear(x, w, s, t_, b_, abs_scores=abs_scores,
                                                                          backend=backend),
                          x_leaf, view, weight, scores, b, t_ref, "random")
        for hint in hints:
            seen = []

            def topk(x, w, s, t_, b_):
                y, t = maskprune.ops.masked_linear_topk(x, w, s, density, b_, abs_scores=abs_scores, backend=backend,
                                                        hint=hint)
                seen.append(t)
                return y

            got = run_linear(topk, x_leaf, view, weight, scores, b, None, "random")
            t = seen[0]
            assert float(t) == float(t_ref) and not t.requires_grad, (density, hint)
            for what, a, e in zip(("y", "grad x", "grad scores", "grad bias"), got, want):
                if e is not None:
                    assert torch.equal(a, e), (what, density, abs_scores, hint)


def window_misses(fn) -> int:
    """How often fn() made threshold_and_mask fall back to the separate threshold (the profiler's count)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "maskprune::threshold_and_mask.window_missed")


@needs_cpp
def test_threshold_and_mask_finds_t_in_its_own_pass_near_the_hint():
    """The fused pass must succeed when t moved little (else the results above would all come from the
    fall-back), and fall back once when t left the window."""
    g = gen("fused-hit")
    scores, weight = torch.randn(300, 101, generator=g), torch.randn(300, 101, generator=g)
    t = maskprune.threshold(scores, 0.5, backend="cpp")
    call = lambda hint: torch.ops.maskprune.threshold_and_mask(weight, scores, 0.5, True, hint)
    assert window_misses(lambda: call(t * 1.0001)) == 0
    assert window_misses(lambda: call(t)) == 0
    assert window_misses(lambda: call(t * 1.01)) == 1  # outside the narrow window: the separate threshold
    assert window_misses(lambda: call(None)) == 0  # no window searched at all
    x = torch.randn(4, 101, generator=g)
    assert window_misses(lambda: maskprune.ops.masked_linear_topk(x, weight, scores, 0.5, hint=t * 0.9999)) == 0
    with torch.inference_mode():  # below autograd the CPU composite uses the fused pass too
        assert window_misses(lambda: maskprune.ops.masked_linear_topk(x, weight, scores, 0.5, hint=t * 0.9999)) == 0
        y, t2 = maskprune.ops.masked_linear_topk(x, weight, scores, 0.5, hint=t * 0.9999)
    assert torch.equal(t2, t) and torch.equal(y, maskprune.masked_linear(x, weight, scores, t))


@needs_cpp
@pytest.mark.parametrize("abs_scores,density", [(False, 0.5), (True, 0.99)], ids=["raw-0.5", "abs-0.99"])
def test_threshold_window_is_wide_enough_when_t_is_near_zero(abs_scores, density):
    """Where t lies near 0 (raw scores at density 0.5, |S| at density 0.99) the window scales with the scores'
    magnitude, not with |hint|: a threshold that moved by 1e-4 of the scores' spread is still found in the
    fused pass (a window of |hint| * 2^-9 missed it on every training step)."""
    g = gen("window-near-zero")
    scores, weight = torch.randn(300, 101, generator=g), torch.randn(300, 101, generator=g)
    t = maskprune.threshold(scores, density, abs_scores=abs_scores, backend="cpp")
    hint = t + 1e-4
    assert abs(float(t)) < 0.05
    call = lambda: torch.ops.maskprune.threshold_and_mask(weight, scores, density, abs_scores, hint)
    assert window_misses(call) == 0
    t2, w = call()
    assert torch.equal(t2, t) and torch.equal(w, reference.apply_mask(weight, scores, t, abs_scores=abs_scores))
    assert torch.equal(maskprune.threshold(scores, density, abs_scores=abs_scores, backend="cpp", hint=hint), t)


# ============================================================================================
# The scores' sign bytes: threshold_and_mask_signs packs them in the mask pass, score_grad_signs_ reads them
# ============================================================================================

def decode_signs(signs: torch.Tensor, n: int) -> torch.Tensor:
    """sign(S) from the packed bytes: per byte, negative bits in the low nibble, nonzero bits in the high one."""
    b = signs.to(torch.int64)[:, None]
    lanes = torch.arange(4)
    negative, nonzero = (b >> lanes) & 1, (b >> (lanes + 4)) & 1
    return (nonzero * (1 - 2 * negative)).flatten()[:n]


def scores_with_zeros(n: int, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    s = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
    s[::7] = 0.0
    s[3::11] = -0.0
    return s


# sizes around the quads (4 scores per sign byte), the 16-score vectors and thread slices, and the fused
# pass's minimum (more than 2^14 scores)
SIGN_SIZES = [1, 3, 4, 5, 15, 17, 63, 16_391, 16_400, 70_001]


@needs_cpp
@pytest.mark.parametrize("weight_dtype,score_dtype,out_dtype", TOPK_DTYPES)
@pytest.mark.parametrize("abs_scores", [True, False], ids=["abs", "raw"])
def test_threshold_and_mask_signs_is_threshold_and_mask_plus_signs(weight_dtype, score_dtype, out_dtype, abs_scores):
    """(t, W ⊙ M) bit for bit those of threshold_and_mask, and the bytes decode to sign(S) (0 for ±0.0), with
    no hint, a hint near t (the fused pass packs the signs) and one far from it (a pass of their own)."""
    g = gen("signs", weight_dtype, score_dtype, out_dtype, abs_scores)
    for n in SIGN_SIZES:
        scores = scores_with_zeros(n, score_dtype, g)
        weight = torch.randn(n, generator=g, dtype=torch.float64).to(weight_dtype)
        for density in [1e-9, 0.3, 1.0]:
            t_ref, w_ref = torch.ops.maskprune.threshold_and_mask(weight, scores, density, abs_scores, None, out_dtype)
            for h in [None, float(t_ref) * 1.0001 + 1e-6, float(t_ref) + 1e-4, abs(float(t_ref)) * 3 + 1]:
                hint = None if h is None else torch.tensor(h, dtype=score_dtype)
                t, w, signs = torch.ops.maskprune.threshold_and_mask_signs(weight, scores, density, abs_scores, hint,
                                                                           out_dtype)
                assert torch.equal(bits(t), bits(t_ref)) and torch.equal(bits(w), bits(w_ref)), (n, density, h)
                assert signs.dtype == torch.uint8 and signs.shape == ((n + 3) // 4,)
                assert torch.equal(decode_signs(signs, n), torch.sign(scores).to(torch.int64)), (n, density, h)
    # non-contiguous scores and weight
    scores, weight = torch.randn(101, 300, generator=g).t(), torch.randn(101, 300, generator=g).t()
    t_ref = maskprune.threshold(scores, 0.3, backend="cpp")
    t, w, signs = torch.ops.maskprune.threshold_and_mask_signs(weight, scores, 0.3, True, t_ref * 1.0001)
    assert torch.equal(t, t_ref) and torch.equal(w, reference.apply_mask(weight, scores, t_ref))
    assert torch.equal(decode_signs(signs, scores.numel()), torch.sign(scores.contiguous().flatten()).long())


@needs_cpp
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16],
                         ids=["f32", "f64", "f16", "bf16"])
def test_score_grad_signs_is_score_grad_bit_for_bit(weight_dtype):
    """dS from the sign bytes equals dS from the scores (score_grad_, |S| keys) bit for bit, zeros included."""
    g = gen("score-grad-signs", weight_dtype)
    for n in SIGN_SIZES:
        scores = scores_with_zeros(n, torch.float32, g)
        weight = torch.randn(n, generator=g, dtype=torch.float64).to(weight_dtype)
        _, _, signs = torch.ops.maskprune.threshold_and_mask_signs(weight, scores, 0.5, True)
        grad = torch.randn(n, generator=g)
        want, got = grad.clone(), grad.clone()
        torch.ops.maskprune.score_grad_(want, weight, scores, True)
        torch.ops.maskprune.score_grad_signs_(got, weight, signs)
        assert torch.equal(bits(got), bits(want)), n


SIGNS_ISA_SCRIPT = """
import hashlib, sys, torch, maskprune
torch.set_num_threads(int(sys.argv[1]))
ops, h, g = torch.ops.maskprune, hashlib.sha256(), torch.Generator().manual_seed(0)
for n in (16_391, 70_001, 300 * 101):
    s = torch.randn(n, generator=g); s[::7] = 0.0; s[3::11] = -0.0
    w = torch.randn(n, generator=g)
    for abs_scores in (True, False):
        for density in (0.01, 0.5, 0.97):
            t0 = maskprune.threshold(s, density, abs_scores=abs_scores, backend="cpp")
            t, wm, signs = ops.threshold_and_mask_signs(w, s, density, abs_scores, t0 + 1e-5)
            ds = torch.randn(n, generator=g)
            ops.score_grad_signs_(ds, w, signs)
            for x in (t, wm, signs, ds):
                h.update(x.numpy().tobytes())
            # the threshold's own window pass (AVX-512 count-and-compress, or the portable loop), over keys
            # with many ties too, in one tensor and over two; equal to the full select whatever the hint
            ties = (s * 8).round() / 8
            for keys in ([s], [ties], [s, ties[: n // 3]]):
                full = ops.global_threshold(keys, density, abs_scores)
                for hint in (full + 1e-5, full * 1.01, full - 1e-3):
                    near = ops.global_threshold(keys, density, abs_scores, hint)
                    assert torch.equal(near, full), (n, abs_scores, density, float(hint), float(near), float(full))
                    h.update(near.numpy().tobytes())
                one = ops.threshold(keys[0], density, abs_scores, full + 1e-5)
                assert torch.equal(one, ops.threshold(keys[0], density, abs_scores)), (n, abs_scores, density)
print(h.hexdigest())
"""


def cpu_has_avx512() -> bool:
    try:
        return "avx512f" in open("/proc/cpuinfo").read()
    except OSError:
        return False


@needs_cpp
@pytest.mark.skipif(not cpu_has_avx512(), reason="needs a CPU with AVX-512 (to compare its pass with SSE2's)")
def test_avx512_and_sse2_passes_agree():
    """The AVX-512 passes (chosen at run time: the fused mask pass and the threshold's window pass) and the SSE2 /
    portable ones (MASKPRUNE_NO_AVX512=1) give the same bytes, on one thread and on two (thread slices at odd
    places), and a hinted threshold equals the full select on each."""
    import os
    import subprocess
    import sys

    digests = {}
    for isa, env in [("avx512", {}), ("sse2", {"MASKPRUNE_NO_AVX512": "1"})]:
        for threads in ("1", "2"):
            proc = subprocess.run([sys.executable, "-c", SIGNS_ISA_SCRIPT, threads], capture_output=True, text=True,
                                  env={**os.environ, **env}, timeout=300)
            assert proc.returncode == 0, proc.stderr[-2000:]
            digests[isa, threads] = proc.stdout.strip()
    assert len(set(digests.values())) == 1, digests


@needs_cpp
@pytest.mark.parametrize("abs_scores,dtype,want", [(True, torch.float32, "maskprune::score_grad_signs_"),
                                                   (False, torch.float32, "maskprune::score_grad_"),
                                                   (True, torch.float64, "maskprune::score_grad_")],
                         ids=["abs-f32", "raw-f32", "abs-f64"])
def test_cpu_training_step_reads_signs_where_it_can(abs_scores, dtype, want):
    """A CPU training step of a masked layer takes dS from the sign bytes (float32, |S| keys), and from the
    scores elsewhere; both give the two-op path's gradients (test_masked_linear_topk_is_threshold_then_...)."""
    layer = maskprune.MaskedLinear(300, 200, abs_scores=abs_scores, backend="cpp").to(dtype)
    x = torch.randn(8, 300, dtype=dtype)
    layer(x).sum().backward()  # the first step: no hint yet
    with torch.no_grad():
        layer.scores.mul_(1.001)  # as an optimizer step: the next forward finds its threshold anew
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        layer(x).sum().backward()
    names = {e.key for e in prof.key_averages()}
    assert want in names and not ({"maskprune::score_grad_signs_", "maskprune::score_grad_"} - {want}) & names
    with torch.no_grad():  # no backward to come: no sign bytes packed
        layer.scores.mul_(1.001)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            layer(x)
    names = {e.key for e in prof.key_averages()}
    assert "maskprune::threshold_and_mask" in names and "maskprune::threshold_and_mask_signs" not in names


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_masked_linear_topk_partial_needs(device, backend):
    """Only some of x, scores and bias asking for a gradient: each gets the two-op path's, the others none."""
    g = gen("topk-partial")
    n, k = (6, 9) if interpreted(device, backend) else (150, 131)
    x = torch.randn(5, k, generator=g).to(device)
    w, s, b = (torch.randn(n, k, generator=g).to(device), torch.randn(n, k, generator=g).to(device),
               torch.randn(n, generator=g).to(device))
    t = maskprune.threshold(s, 0.3, backend=backend)
    for need in ["x", "scores", "bias", "x+bias"]:
        leaves = {name: v.clone().requires_grad_(name in need.split("+")) for name, v in (("x", x), ("scores", s),
                                                                                           ("bias", b))}
        twins = {name: v.clone().requires_grad_(name in need.split("+")) for name, v in (("x", x), ("scores", s),
                                                                                          ("bias", b))}
        y, _ = maskprune.ops.masked_linear_topk(leaves["x"], w, leaves["scores"], 0.3, leaves["bias"],
                                                backend=backend, hint=t * 1.0001)
        y.square().sum().backward()
        maskprune.masked_linear(twins["x"], w, twins["scores"], t, twins["bias"], backend=backend).square().sum().backward()
        for name in leaves:
            got, want = leaves[name].grad, twins[name].grad
            assert (got is None) == (want is None) == (name not in need.split("+")), (need, name)
            if got is not None:
                assert torch.equal(got, want), (need, name)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_masked_linear_topk_gradcheck_x_and_bias(device, backend):
    g = gen("topk-gradcheck")
    x = torch.randn(3, 2, 7, generator=g, dtype=torch.float64).to(device).requires_grad_()
    w = torch.randn(5, 7, generator=g, dtype=torch.float64).to(device)
    s = torch.randn(5, 7, generator=g, dtype=torch.float64).to(device)
    b = torch.randn(5, generator=g, dtype=torch.float64).to(device).requires_grad_()
    fn = lambda x_, b_: maskprune.ops.masked_linear_topk(x_, w, s, 0.4, b_, backend=backend)[0]
    assert torch.autograd.gradcheck(fn, (x, b))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_masked_linear_topk_bad_input_raises(device, backend):
    kw = dict(device=device)
    w, s, x = torch.randn(3, 4, **kw), torch.randn(3, 4, **kw), torch.randn(2, 4, **kw)
    topk = lambda *a, **k: maskprune.ops.masked_linear_topk(*a, backend=backend, **k)
    for density, exc in [(0.0, ValueError), (1.5, ValueError), (float("nan"), ValueError), (True, TypeError)]:
        with pytest.raises(exc, match="density"):
            topk(x, w, s, density)
    with pytest.raises(ValueError, match="scores must have the weight's shape"):
        topk(x, w, s.t(), 0.5)
    with pytest.raises(ValueError, match="x's last dimension"):
        topk(torch.randn(2, 3, **kw), w, s, 0.5)
    with pytest.raises(ValueError, match="bias"):
        topk(x, w, s, 0.5, torch.randn(4, **kw))
    with pytest.raises(TypeError, match="scores"):
        topk(x, w, s.to(torch.int64), 0.5)
    with pytest.raises(ValueError, match="hint must be None or a 0-d"):
        topk(x, w, s, 0.5, hint=torch.zeros(2, **kw))
    if device != "cpu":
        return  # non-finite GPU scores: test_nonfinite_scores_checked_on_device_without_sync
    bad = s.clone()
    bad[1, 1] = float("nan")
    for hint in [None, torch.tensor(0.5, **kw)]:
        with pytest.raises(ValueError, match="scores.* finite"):
            topk(x, w, bad, 0.5, hint=hint)
    big = torch.randn(300, 101, **kw)
    t = maskprune.threshold(big, 0.5, backend=backend)
    big[3, 3] = float("inf")
    with pytest.raises(ValueError, match="scores.* finite"):  # the fused CPU pass checks too
        topk(torch.randn(2, 101, **kw), torch.randn(300, 101, **kw), big, 0.5, hint=t)


# ============================================================================================
# torch.library.opcheck on every torch.ops.maskprune op
# ============================================================================================

def opcheck_samples():
    """(op name, args, kwargs) samples; requires_grad variants for the differentiable ops."""
    g = torch.Generator().manual_seed(7)
    r = lambda *s, dtype=torch.float32, rg=False: torch.randn(*s, generator=g, dtype=dtype).requires_grad_(rg)
    w, s = r(5, 7), r(5, 7)
    t = reference.threshold(s, 0.5, True)
    t_raw = reference.threshold(s, 0.5, False)
    x, x3 = r(3, 7), r(2, 3, 7)
    w64, s64 = r(4, 6, dtype=torch.float64), r(4, 6, dtype=torch.float64)
    t64 = reference.threshold(s64, 0.3, True)
    return [
        ("threshold", (r(5, 7), 0.5, True), {}),
        ("threshold", (r(100, dtype=torch.float64), 1e-9, False), {}),
        ("threshold", (r(11, 13).t(), 1.0, True), {}),
        ("threshold", (r(300, 101), 0.3, True), {"hint": torch.tensor(0.5)}),
        ("threshold", (r(40, 30, dtype=torch.float64), 0.7, False), {"hint": torch.tensor(-0.5, dtype=torch.float64)}),
        ("global_threshold", ([r(5, 7), r(3), r(2, 2, 2)], 0.4, True), {}),
        ("global_threshold", ([r(9, dtype=torch.float64)], 0.9, False), {}),
        ("global_threshold", ([r(200, 100), r(7)], 0.5, True), {"hint": torch.tensor(0.7)}),
        ("apply_mask", (w, s, t, True), {}),
        ("apply_mask", (w, r(5, 7, rg=True), t, True), {}),
        ("apply_mask", (w.to(torch.bfloat16), r(5, 7, rg=True), t_raw, False), {"dtype": torch.float32}),
        ("apply_mask", (w64, r(4, 6, dtype=torch.float64, rg=True), t64, True), {}),
        ("apply_mask", (w.t().contiguous().t(), s, t, True), {"dtype": torch.float16}),
        ("score_grad", (r(5, 7), w, s, True), {}),
        ("score_grad", (r(5, 7, dtype=torch.bfloat16), w.to(torch.bfloat16), s, False), {}),
        ("score_grad_", (r(5, 7), w, s, True), {}),
        ("masked_linear", (x, w, s, t, None, True), {}),
        ("masked_linear", (r(3, 7, rg=True), w, r(5, 7, rg=True), t, r(5, rg=True), True), {}),
        ("masked_linear", (r(2, 3, 7, rg=True), w, r(5, 7, rg=True), t_raw, None, False), {}),
        ("masked_linear", (r(7, 3, rg=True).t(), w, s, t, r(5), True), {}),
        ("masked_linear", (r(3, 6, dtype=torch.float64, rg=True), w64, r(4, 6, dtype=torch.float64, rg=True),
                           t64, r(4, dtype=torch.float64, rg=True), True), {}),
        ("masked_linear", (r(3, 7).to(torch.bfloat16), w.to(torch.bfloat16), s, t, None, True), {}),
        ("threshold_and_mask", (w, s, 0.5, True), {}),
        ("threshold_and_mask", (r(300, 101), r(300, 101), 0.3, True), {"hint": torch.tensor(0.4)}),
        ("threshold_and_mask", (w64, s64, 0.7, False), {"hint": torch.tensor(0.1, dtype=torch.float64),
                                                         "dtype": torch.float32}),
        ("threshold_and_mask", (r(200, 90).to(torch.bfloat16), r(200, 90), 1e-9, True), {"hint": torch.tensor(3.0)}),
        ("threshold_and_mask_signs", (w, s, 0.5, True), {}),
        ("threshold_and_mask_signs", (r(300, 101), r(300, 101), 0.3, True), {"hint": torch.tensor(0.4)}),
        ("threshold_and_mask_signs", (w64, s64, 0.7, False), {"hint": torch.tensor(0.1, dtype=torch.float64),
                                                               "dtype": torch.float32}),
        ("score_grad_signs_", (r(5, 7), w, torch.ops.maskprune.threshold_and_mask_signs(w, s, 0.5, True)[2]), {}),
        ("score_grad_signs_", (r(300, 101), r(300, 101).to(torch.bfloat16),
                               torch.ops.maskprune.threshold_and_mask_signs(r(300, 101), r(300, 101), 0.3, True)[2]),
         {}),
        ("masked_linear_topk", (x, w, s, 0.5, None, True), {}),
        ("masked_linear_topk", (r(3, 7, rg=True), w, r(5, 7, rg=True), 0.3, r(5, rg=True), False),
         {"hint": torch.tensor(0.2)}),
        ("masked_linear_topk", (r(2, 3, 101, rg=True), r(300, 101), r(300, 101, rg=True), 0.5, None, True),
         {"hint": torch.tensor(0.67)}),
        ("masked_linear_topk", (r(3, 6, dtype=torch.float64, rg=True), w64, r(4, 6, dtype=torch.float64, rg=True),
                                0.9, r(4, dtype=torch.float64, rg=True), True), {}),
        ("masked_linear_backward", (r(3, 5), x, w, s, t, True, True, True), {}),
        ("masked_linear_backward", (r(2, 3, 5), x3, w, s, t_raw, False, True, False), {}),
        ("masked_linear_backward", (r(2, 3, 5), x3, w, s, t, True, False, True), {}),
        ("masked_linear_backward", (r(3, 5), x, w, s, t, True, False, False), {}),
        ("masked_linear_backward", (r(3, 5), x, w, s, t, True, True, True),
         {"signs": torch.ops.maskprune.threshold_and_mask_signs(w, s, 0.5, True)[2]}),
        ("counter_weights_", (r(5, 7), "kaiming_uniform", 0.1, 3, 1), {"stream": 2, "offset": 5}),  # rng (more: test_rng_backends)
        ("supermask_philox_mask", (w, torch.sigmoid(s), 3, 1, 2), {}),
        # seed mode (more: tests/test_seed_mode.py)
        ("seed_apply_mask", (r(5, 7), t, True, "signed_constant", 0.5, 3, 1), {"dtype": torch.bfloat16}),
        ("seed_score_grad_", (r(5, 7), r(5, 7), False, "kaiming_uniform", 0.5, 3, 1), {}),
        ("seed_linear_score_grad", (r(3, 5), x, r(5, 7), True, "kaiming_normal", 0.5, 2 ** 40, 2), {}),
    ]


OPCHECK_SAMPLES = opcheck_samples() if ops.HAS_CPP else []


@needs_cpp
def test_opcheck_covers_every_op():
    schema_ops = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("maskprune::")}
    assert {"threshold", "global_threshold", "apply_mask", "score_grad", "score_grad_", "threshold_and_mask",
            "threshold_and_mask_signs", "score_grad_signs_", "masked_linear", "masked_linear_topk",
            "masked_linear_backward"} <= schema_ops
    policy_ops = {n for n in schema_ops if n.startswith("policy_")}  # opchecked in tests/test_policy_ops.py
    assert schema_ops - policy_ops <= {name for name, _, _ in OPCHECK_SAMPLES}


@needs_cpp
@pytest.mark.parametrize("i", range(len(OPCHECK_SAMPLES)),
                         ids=[f"{name}-{i}" for i, (name, _, _) in enumerate(OPCHECK_SAMPLES)])
def test_opcheck(i):
    name, args, kwargs = OPCHECK_SAMPLES[i]
    torch.library.opcheck(getattr(torch.ops.maskprune, name).default, args, kwargs)


# ============================================================================================
# Bad input: a ValueError/TypeError naming the argument, from the public ops and the raw ops
# ============================================================================================

BAD_DENSITIES = [
    pytest.param(0, ValueError, id="0"), pytest.param(0.0, ValueError, id="0.0"),
    pytest.param(-0.1, ValueError, id="-0.1"), pytest.param(1.5, ValueError, id="1.5"),
    pytest.param(1.0000001, ValueError, id="1+eps"), pytest.param(float("nan"), ValueError, id="nan"),
    pytest.param(float("inf"), ValueError, id="inf"), pytest.param(True, TypeError, id="True"),
    pytest.param(False, TypeError, id="False"), pytest.param("0.5", TypeError, id="str"),
    pytest.param(None, TypeError, id="None"), pytest.param(torch.tensor(0.5), TypeError, id="tensor"),
]


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("density,exc", BAD_DENSITIES)
def test_bad_density_raises(device, backend, density, exc):
    s = torch.randn(4, 5, device=device)
    with pytest.raises(exc, match="density"):
        maskprune.threshold(s, density, backend=backend)
    with pytest.raises(exc, match="density"):
        maskprune.global_threshold([s, s], density, backend=backend)
    with pytest.raises(exc, match="density"):
        ops.check_density(density)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("abs_scores", [True, False], ids=["abs", "raw"])
@pytest.mark.parametrize("shape", [(6, 7), (200, 101)], ids=["small", "large"])  # both CPU select paths
def test_nonfinite_scores_raise(device, backend, bad, dtype, abs_scores, shape):
    if interpreted(device, backend) and shape[0] > 6:
        pytest.skip("too large for the Triton interpreter")
    if device != "cpu":
        pytest.skip("GPU scores are checked on the device: test_nonfinite_scores_checked_on_device_without_sync")
    s = torch.randn(shape, dtype=dtype, device=device)
    s[3, 4] = bad
    with pytest.raises(ValueError, match="scores.* finite"):
        maskprune.threshold(s, 0.5, abs_scores=abs_scores, backend=backend)
    with pytest.raises(ValueError, match="scores.* finite"):
        maskprune.global_threshold([torch.randn(3, dtype=dtype, device=device), s], 0.5, abs_scores=abs_scores,
                                   backend=backend)


def test_device_finiteness_check():
    """The GPU check is torch._assert_async with the CPU check's message (on CPU it raises at once)."""
    ops._check_finite_on_device(torch.tensor(1.5), "scores")
    ops._check_finite_on_device(torch.randn(4, 5), "scores")
    for bad in (float("nan"), float("inf")):
        with pytest.raises(RuntimeError, match=r"scores must be finite, found NaN or inf"):
            ops._check_finite_on_device(torch.tensor(bad), "scores")
        scores = torch.randn(4, 5)
        scores[1, 2] = bad
        with pytest.raises(RuntimeError, match=r"scores_list\[1\] must be finite"):
            ops._check_finite_on_device(scores, "scores_list[1]")


_DEVICE_CHECK_SCRIPT = """
import sys, torch, maskprune
backend, bad = sys.argv[1], float(sys.argv[2])
s = torch.randn(300, 200, device="cuda")
torch.cuda.synchronize()
torch.cuda.set_sync_debug_mode("error")  # any device-to-host sync raises
t = maskprune.threshold(s, 0.5, backend=backend)
t = maskprune.global_threshold([s, s[:3]], 0.5, backend=backend)
s[7, 9] = bad
t = maskprune.threshold(s, 0.5, backend=backend)  # no sync, no error yet
torch.cuda.set_sync_debug_mode(0)
print("queued", flush=True)
torch.cuda.synchronize()
print("not raised")
"""


@needs_cuda
@pytest.mark.parametrize("backend", ["cpp", "triton", "torch"])
def test_nonfinite_scores_checked_on_device_without_sync(backend):
    """On a GPU the threshold ops check finiteness without a host sync (torch._assert_async on NaN t, or on
    the scores for the reference backend); a NaN then fails the next synchronisation. In a subprocess: a
    device-side assert leaves the CUDA context unusable."""
    import subprocess
    import sys
    if backend not in ops.available_backends("cuda"):
        pytest.skip(f"backend {backend} not available on CUDA")
    run = subprocess.run([sys.executable, "-c", _DEVICE_CHECK_SCRIPT, backend, "nan"], capture_output=True,
                         text=True, timeout=300)
    assert "queued" in run.stdout and "not raised" not in run.stdout, run.stdout + run.stderr
    assert run.returncode != 0


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_bad_tensor_arguments_raise(device, backend):
    kw = dict(device=device)
    w, s, t, x, b = (torch.randn(3, 4, **kw), torch.randn(3, 4, **kw), torch.tensor(0.5, **kw),
                     torch.randn(2, 4, **kw), torch.randn(3, **kw))
    ml = lambda *a, **k: maskprune.masked_linear(*a, backend=backend, **k)
    am = lambda *a, **k: maskprune.apply_mask(*a, backend=backend, **k)
    # shapes
    with pytest.raises(ValueError, match="scores"):
        am(w, torch.randn(4, 3, **kw), t)
    with pytest.raises(ValueError, match="scores"):
        ml(x, w, torch.randn(3, 5, **kw), t)
    with pytest.raises(ValueError, match="x's last dimension"):
        ml(torch.randn(2, 5, **kw), w, s, t)
    with pytest.raises(ValueError, match="x's last dimension"):
        ml(torch.tensor(1.0, **kw), w, s, t)
    with pytest.raises(ValueError, match="weight"):
        ml(x, torch.randn(3, 4, 1, **kw), torch.randn(3, 4, 1, **kw), t)
    with pytest.raises(ValueError, match="bias"):
        ml(x, w, s, t, torch.randn(4, **kw))
    with pytest.raises(ValueError, match="bias"):
        ml(x, w, s, t, torch.randn(1, 3, **kw))
    with pytest.raises(ValueError, match="t must be a 0-d"):
        am(w, s, torch.tensor([0.5], **kw))
    with pytest.raises(ValueError, match="scores must have at least one element"):
        maskprune.threshold(torch.zeros(0, **kw), 0.5, backend=backend)
    with pytest.raises(ValueError, match=r"scores_list\[1\] must have at least one element"):
        maskprune.global_threshold([s, torch.zeros(0, 3, **kw)], 0.5, backend=backend)
    # dtypes: integer, bool, and (for scores) half precision are refused
    for bad in (torch.int64, torch.int32, torch.uint8, torch.bool):
        bad_t = torch.ones(3, 4, dtype=bad, device=device)
        with pytest.raises(TypeError, match="scores"):
            maskprune.threshold(bad_t, 0.5, backend=backend)
        with pytest.raises(TypeError, match=r"scores_list\[1\]"):
            maskprune.global_threshold([s, bad_t], 0.5, backend=backend)
        with pytest.raises(TypeError, match="weight"):
            am(bad_t, s, t)
        with pytest.raises(TypeError, match="scores"):
            am(w, bad_t, t)
        with pytest.raises(TypeError, match="weight"):
            ml(x, bad_t, s, t)
        with pytest.raises(TypeError, match="scores"):
            ml(x, w, bad_t, t)
        with pytest.raises(TypeError, match="x must"):
            ml(torch.ones(2, 4, dtype=bad, device=device), w, s, t)
        with pytest.raises(TypeError, match="bias must"):
            ml(x, w, s, t, torch.ones(3, dtype=bad, device=device))
        with pytest.raises(TypeError, match="t must"):
            am(w, s, torch.tensor(1, device=device).to(bad))
    for half in (torch.float16, torch.bfloat16):
        with pytest.raises(TypeError, match="scores"):
            maskprune.threshold(s.to(half), 0.5, backend=backend)
        with pytest.raises(TypeError, match="scores"):
            am(w, s.to(half), t)
    with pytest.raises(TypeError, match=r"scores_list\[1\] must have the dtype"):
        maskprune.global_threshold([s, s.double()], 0.5, backend=backend)
    # not tensors at all
    with pytest.raises(TypeError, match="scores"):
        maskprune.threshold([0.1, 0.2], 0.5, backend=backend)
    with pytest.raises(TypeError, match="x must"):
        ml([[1.0] * 4], w, s, t)
    with pytest.raises(TypeError, match="scores_list"):
        maskprune.global_threshold(s, 0.5, backend=backend)
    with pytest.raises(TypeError, match="scores_list"):
        maskprune.global_threshold([], 0.5, backend=backend)


def test_tensors_on_different_devices_raise_meta():
    # The meta device stands in for a second device on machines without a GPU.
    w, s, t, x = torch.randn(3, 4), torch.randn(3, 4), torch.tensor(0.5), torch.randn(2, 4)
    meta = lambda v: v.to("meta")
    with pytest.raises(ValueError, match="weight and scores must be on the same device"):
        maskprune.apply_mask(meta(w), s, t)
    with pytest.raises(ValueError, match="t and scores must be on the same device"):
        maskprune.apply_mask(w, s, meta(t))
    with pytest.raises(ValueError, match="x and weight must be on the same device"):
        maskprune.masked_linear(meta(x), w, s, t)
    with pytest.raises(ValueError, match="bias and weight must be on the same device"):
        maskprune.masked_linear(x, w, s, t, meta(torch.randn(3)))
    with pytest.raises(ValueError, match=r"scores_list\[1\] and scores_list\[0\] must be on the same device"):
        maskprune.global_threshold([s, meta(s)], 0.5)


@needs_cuda
def test_tensors_on_different_devices_raise_cuda():
    w, s, t, x = torch.randn(3, 4), torch.randn(3, 4), torch.tensor(0.5), torch.randn(2, 4)
    cuda = lambda v: v.to("cuda")
    with pytest.raises(ValueError, match="weight and scores"):
        maskprune.apply_mask(cuda(w), s, t)
    with pytest.raises(ValueError, match="t and scores"):
        maskprune.apply_mask(cuda(w), cuda(s), t)
    with pytest.raises(ValueError, match="x and weight"):
        maskprune.masked_linear(cuda(x), w, s, t)
    with pytest.raises(ValueError, match="bias and weight"):
        maskprune.masked_linear(x, w, s, t, cuda(torch.randn(3)))
    with pytest.raises(ValueError, match=r"scores_list\[1\]"):
        maskprune.global_threshold([s, cuda(s)], 0.5)
    if ops.HAS_CPP and "cpp" in ops.available_backends("cuda"):
        with pytest.raises(ValueError, match="same device"):
            torch.ops.maskprune.apply_mask(cuda(w), cuda(s), t, True)
        with pytest.raises(ValueError, match="same device"):
            torch.ops.maskprune.masked_linear(x, cuda(w), cuda(s), cuda(t), None, True)


def raw_op_cases():
    """Bad calls straight to torch.ops.maskprune.*: each must raise ValueError/TypeError, never crash."""
    w, s, t, x = torch.randn(3, 4), torch.randn(3, 4), torch.tensor(0.5), torch.randn(2, 4)
    i64 = lambda v: v.to(torch.int64)
    nan = s.clone()
    nan[1, 2] = float("nan")
    m = lambda name: getattr(torch.ops.maskprune, name)
    return [
        ("threshold-empty", lambda: m("threshold")(torch.zeros(0), 0.5, True), ValueError, "at least one element"),
        ("threshold-density2", lambda: m("threshold")(s, 2.0, True), ValueError, "density"),
        ("threshold-density0", lambda: m("threshold")(s, 0.0, True), ValueError, "density"),
        ("threshold-density-nan", lambda: m("threshold")(s, float("nan"), True), ValueError, "density"),
        ("threshold-int", lambda: m("threshold")(i64(s), 0.5, True), TypeError, "scores"),
        ("threshold-half", lambda: m("threshold")(s.half(), 0.5, True), TypeError, "scores"),
        ("threshold-nan", lambda: m("threshold")(nan, 0.5, True), ValueError, "finite"),
        ("threshold-nan-hint", lambda: m("threshold")(nan, 0.5, True, t), ValueError, "finite"),
        ("threshold-int-hint", lambda: m("threshold")(s, 0.5, True, i64(t)), TypeError, "hint"),
        ("threshold-1d-hint", lambda: m("threshold")(s, 0.5, True, t.reshape(1)), ValueError, "hint"),
        ("global-int-hint", lambda: m("global_threshold")([s], 0.5, True, i64(t)), TypeError, "hint"),
        # no tensor to dispatch on: the dispatcher itself refuses (the public op raises TypeError first)
        ("global-empty-list", lambda: m("global_threshold")([], 0.5, True), (ValueError, NotImplementedError),
         "at least one|no tensor arguments"),
        ("global-mixed-dtype", lambda: m("global_threshold")([s, s.double()], 0.5, True), TypeError, "dtype"),
        ("global-int", lambda: m("global_threshold")([s, i64(s)], 0.5, True), TypeError, "scores"),
        ("global-empty-tensors", lambda: m("global_threshold")([torch.zeros(0)], 0.5, True), ValueError,
         "at least one element"),
        ("global-density", lambda: m("global_threshold")([s], -1.0, True), ValueError, "density"),
        ("apply-shape", lambda: m("apply_mask")(w, torch.randn(4, 3), t, True), ValueError, "shape"),
        ("apply-int-weight", lambda: m("apply_mask")(i64(w), s, t, True), TypeError, "weight"),
        ("apply-int-scores", lambda: m("apply_mask")(w, i64(s), t, True), TypeError, "scores"),
        ("apply-t-dtype", lambda: m("apply_mask")(w, s, t.double(), True), TypeError, "t must"),
        ("apply-t-shape", lambda: m("apply_mask")(w, s, t.reshape(1), True), ValueError, "t must"),
        ("score-grad-shape", lambda: m("score_grad")(torch.randn(4, 3), w, s, True), ValueError, "shape"),
        ("score-grad-int", lambda: m("score_grad")(i64(w), w, s, True), TypeError, "grad_weight"),
        ("score-grad_-dtype", lambda: m("score_grad_")(w.double(), w, s, True), TypeError, "grad_weight"),
        ("score-grad_-noncontig", lambda: m("score_grad_")(torch.randn(4, 3).t(), w, s, True), ValueError,
         "contiguous"),
        ("linear-x-shape", lambda: m("masked_linear")(torch.randn(2, 5), w, s, t, None, True), ValueError, "x's"),
        ("linear-x-0d", lambda: m("masked_linear")(torch.tensor(1.0), w, s, t, None, True), ValueError, "x's"),
        ("linear-x-int", lambda: m("masked_linear")(i64(x), w, s, t, None, True), TypeError, "x"),
        ("linear-weight-3d", lambda: m("masked_linear")(x, w[..., None], s[..., None], t, None, True), ValueError,
         "weight"),
        ("linear-bias-shape", lambda: m("masked_linear")(x, w, s, t, torch.randn(4), True), ValueError, "bias"),
        ("linear-bias-int", lambda: m("masked_linear")(x, w, s, t, torch.ones(3, dtype=torch.int64), True),
         TypeError, "bias"),
        ("linear-scores-shape", lambda: m("masked_linear")(x, w, s.t(), t, None, True), ValueError, "scores"),
        ("topk-mask-shape", lambda: m("threshold_and_mask")(w, s.t(), 0.5, True), ValueError, "shape"),
        ("topk-mask-density", lambda: m("threshold_and_mask")(w, s, 1.5, True), ValueError, "density"),
        ("topk-mask-int-weight", lambda: m("threshold_and_mask")(i64(w), s, 0.5, True), TypeError, "weight"),
        ("topk-mask-half-scores", lambda: m("threshold_and_mask")(w, s.half(), 0.5, True), TypeError, "scores"),
        ("topk-mask-nan", lambda: m("threshold_and_mask")(w, nan, 0.5, True, t), ValueError, "finite"),
        ("topk-mask-int-hint", lambda: m("threshold_and_mask")(w, s, 0.5, True, i64(t)), TypeError, "hint"),
        ("signs-mask-shape", lambda: m("threshold_and_mask_signs")(w, s.t(), 0.5, True), ValueError, "shape"),
        ("signs-mask-density", lambda: m("threshold_and_mask_signs")(w, s, 0.0, True), ValueError, "density"),
        ("signs-mask-int-scores", lambda: m("threshold_and_mask_signs")(w, i64(s), 0.5, True), TypeError, "scores"),
        ("signs-grad-signs-dtype", lambda: m("score_grad_signs_")(w.clone(), w, torch.zeros(3)), TypeError,
         "signs must be uint8"),
        ("signs-grad-signs-size", lambda: m("score_grad_signs_")(w.clone(), w, torch.zeros(2, dtype=torch.uint8)),
         ValueError, "signs must be a contiguous 1-d tensor of"),
        ("signs-grad-dtype", lambda: m("score_grad_signs_")(w.double(), w, torch.zeros(3, dtype=torch.uint8)),
         TypeError, "grad_weight must be float32"),
        ("signs-grad-noncontig", lambda: m("score_grad_signs_")(torch.randn(4, 3).t(), w,
                                                                 torch.zeros(3, dtype=torch.uint8)),
         ValueError, "contiguous"),
        ("signs-grad-weight-shape", lambda: m("score_grad_signs_")(w.clone(), torch.randn(4, 3),
                                                                    torch.zeros(3, dtype=torch.uint8)),
         ValueError, "weight must have grad_weight's shape"),
        ("signs-grad-int-weight", lambda: m("score_grad_signs_")(w.clone(), i64(w), torch.zeros(3, dtype=torch.uint8)),
         TypeError, "weight"),
        ("topk-linear-x-shape", lambda: m("masked_linear_topk")(torch.randn(2, 5), w, s, 0.5, None, True), ValueError,
         "x's"),
        ("topk-linear-density", lambda: m("masked_linear_topk")(x, w, s, 0.0, None, True), ValueError, "density"),
        ("topk-linear-bias", lambda: m("masked_linear_topk")(x, w, s, 0.5, torch.randn(4), True), ValueError, "bias"),
        ("topk-linear-scores", lambda: m("masked_linear_topk")(x, w, s.t(), 0.5, None, True), ValueError, "scores"),
        ("topk-linear-hint", lambda: m("masked_linear_topk")(x, w, s, 0.5, None, True, t.reshape(1)), ValueError,
         "hint"),
        ("backward-grad-shape", lambda: m("masked_linear_backward")(torch.randn(2, 4), x, w, s, t, True, True, True),
         ValueError, "grad_out"),
        ("backward-x-int", lambda: m("masked_linear_backward")(torch.randn(2, 3), i64(x), w, s, t, True, True, True),
         TypeError, "x"),
    ]


RAW_OP_CASES = raw_op_cases() if ops.HAS_CPP else []


@needs_cpp
@pytest.mark.parametrize("i", range(len(RAW_OP_CASES)), ids=[c[0] for c in RAW_OP_CASES])
def test_raw_ops_reject_bad_input(i):
    _, call, exc, match = RAW_OP_CASES[i]
    with pytest.raises(exc, match=match):
        call()


_NO_EXTENSION_SCRIPT = r"""
import sys, warnings
sys.modules["maskprune._C"] = None  # as if the .so failed to load (e.g. a wheel for another torch build)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import maskprune
    import importlib; importlib.import_module("maskprune.ops")  # a second import: no second warning
messages = [str(w.message) for w in caught if "maskprune._C" in str(w.message)]
assert len(messages) == 1, messages
print("WARNING:", messages[0])
import torch
from maskprune import ops
for call in (lambda: ops.resolve_backend("cpp", torch.device("cpu")),
             lambda: maskprune.nn.MaskedLinear(3, 2, backend="cpp"),
             lambda: maskprune.threshold(torch.randn(5), 0.5, backend="cpp")):
    try:
        call()
    except ValueError as e:
        print("ERROR:", e)
    else:
        raise AssertionError("no error")
print("auto:", ops.resolve_backend("auto", torch.device("cpu")).name)
"""


def test_missing_extension_warns_once_and_cpp_says_why():
    """Without maskprune._C: one RuntimeWarning at import naming the reason and the fix, and backend="cpp"
    raises a ValueError saying why it is unavailable, while "auto" runs on the reference."""
    import subprocess
    import sys
    run = subprocess.run([sys.executable, "-c", _NO_EXTENSION_SCRIPT], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "MASKPRUNE_NO_TRITON": "1"})
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    warning = next(line for line in lines if line.startswith("WARNING:"))
    assert "did not load (ModuleNotFoundError: import of maskprune._C halted" in warning and "To fix:" in warning and "torch here:" in warning
    errors = [line for line in lines if line.startswith("ERROR:")]
    assert len(errors) == 3
    for error in errors:
        assert "backend 'cpp' is unavailable: the compiled kernels (maskprune._C) did not load" in error
        assert "To fix:" in error
    assert "auto: torch" in lines
