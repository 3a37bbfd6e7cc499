"""maskprune.rng's backends against its torch reference: the C++ kernel (CPU, and CUDA when there is a GPU),
the Triton kernel (CUDA, or CPU tensors under TRITON_INTERPRET=1, which tests/conftest.py sets without a GPU),
the supermask draw on top of them, the op maskprune::counter_weights_ under opcheck, and bad input.

signed_constant, kaiming_uniform and uniform must agree to the bit. kaiming_normal goes through float64 log
and cos, which torch (SLEEF), glibc, numpy and CUDA round differently: at most 1 float32 ulp apart, and
rarely (measured on CPU: see KN_MAX_DIFFERING).
"""
import math
import os

import pytest
import torch

from maskprune import rng
from maskprune.masks import make_policy
from maskprune.masks.supermask import SUPERMASK_STREAM, uniform_draw

EXACT = ("signed_constant", "kaiming_uniform", "uniform")
# kaiming_normal: differing elements allowed per 2^16 (measured against torch's float64 log/cos on CPU: 0 of
# 2 x 2^20 draws for C++/glibc, 0 of 2 x 2^18 for the Triton interpreter (numpy); CUDA's libdevice unmeasured).
KN_MAX_DIFFERING = 2


def _cases():
    """(backend, device) pairs to test, each with the reason it is skipped (None: runs)."""
    cases = []
    cpp = "cpp" in rng.available_backends("cpu")
    cases.append(pytest.param("cpp", "cpu", marks=pytest.mark.skipif(
        not cpp, reason="maskprune._C has no counter_weights_ CPU kernel (not built, or an older build)")))
    triton_ok = "triton" in rng.available_backends("cpu")
    cases.append(pytest.param("triton", "cpu", marks=pytest.mark.skipif(
        not triton_ok, reason="triton does not import, or TRITON_INTERPRET is not 1 (tests/conftest.py sets it "
                              "when there is no GPU)")))
    cuda = torch.cuda.is_available()
    for backend in ("cpp", "triton"):
        runs = cuda and backend in rng.available_backends("cuda")
        cases.append(pytest.param(backend, "cuda", marks=pytest.mark.skipif(
            not runs, reason="no CUDA GPU here" if not cuda else f"backend {backend} has no CUDA kernel here")))
    return cases


CASES = _cases()


def _reference(shape, init, scale, dtype=torch.float32, **key):
    return rng.counter_weights(shape, init, scale, backend="reference", dtype=dtype, **key)


def _assert_same(got: torch.Tensor, ref: torch.Tensor, init: str) -> None:
    got = got.cpu().contiguous()
    assert got.shape == ref.shape and got.dtype == ref.dtype
    if init != "kaiming_normal":
        assert torch.equal(got.view(-1).view(torch.uint8), ref.view(-1).view(torch.uint8)), \
            f"{init}: {int((got != ref).sum())} of {ref.numel()} differ"
        return
    bits = torch.int32 if ref.dtype == torch.float32 else torch.int64 if ref.dtype == torch.float64 else torch.int16
    ulps = (got.view(bits).long() - ref.view(bits).long()).abs().view(-1)
    differing = int((ulps != 0).sum())
    assert int(ulps.max()) <= 1 and differing <= KN_MAX_DIFFERING * max(1, ref.numel() >> 16), \
        f"kaiming_normal: {differing} differ, max {int(ulps.max())} ulp"


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("init", rng.DISTRIBUTIONS)
@pytest.mark.parametrize("shape", [(1,), (7,), (1023,), (1 << 16) + 3, (300, 37), (2, 3, 5, 7)],
                         ids=lambda s: "x".join(map(str, s)) if isinstance(s, tuple) else str(s))
def test_backend_equals_reference(backend, device, init, shape):
    shape = shape if isinstance(shape, tuple) else (shape,)
    key = dict(seed=0x0123456789ABCDEF, layer=5, stream=0)
    got = rng.counter_weights(shape, init, 0.0625 if init != "uniform" else 1.0, device=device, backend=backend,
                              **key)
    _assert_same(got, _reference(shape, init, 0.0625 if init != "uniform" else 1.0, **key), init)


@pytest.mark.parametrize("backend,device", CASES)
def test_random_shapes_keys_and_scales(backend, device):
    g = torch.Generator().manual_seed(18)
    for trial in range(6):
        ndim = int(torch.randint(1, 4, (1,), generator=g))
        shape = tuple(int(d) for d in torch.randint(1, 40, (ndim,), generator=g))
        init = rng.DISTRIBUTIONS[trial % 4]
        key = dict(seed=int(torch.randint(0, 2 ** 62, (1,), generator=g)) * 3 + trial,
                   layer=int(torch.randint(0, 2 ** 31, (1,), generator=g)) * 2 + 1,
                   stream=int(torch.randint(0, 2 ** 31, (1,), generator=g)))
        scale = float(torch.rand((), generator=g)) * 10 + 1e-3  # not a float32: rounded first by every backend
        got = rng.counter_weights(shape, init, scale, device=device, backend=backend, **key)
        _assert_same(got, _reference(shape, init, scale, **key), init)


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("offset", [(1 << 32) - 5, (1 << 32) + 1, (1 << 40) + 3, (1 << 62) + 11])
def test_large_element_offsets(backend, device, offset):
    """Element indices at and past 2^32 (the counter's high word), and extreme keys."""
    for init in rng.DISTRIBUTIONS:
        key = dict(seed=2 ** 64 - 1, layer=2 ** 32 - 1, stream=2 ** 32 - 1, offset=offset)
        got = rng.counter_weights((257,), init, 0.5, device=device, backend=backend, **key)
        _assert_same(got, _reference((257,), init, 0.5, **key), init)


def test_offset_is_a_slice_of_the_sequence():
    """offset = k gives elements k.. of the whole weight (the reference against itself, then the C++ kernel)."""
    whole = _reference((1000,), "kaiming_uniform", 0.3, seed=9, layer=1)
    part = _reference((300,), "kaiming_uniform", 0.3, seed=9, layer=1, offset=600)
    assert torch.equal(whole[600:900], part)
    if "cpp" in rng.available_backends("cpu"):
        assert torch.equal(rng.counter_weights((300,), "kaiming_uniform", 0.3, seed=9, layer=1, offset=600,
                                               backend="cpp"), part)


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_dtypes_are_the_float32_values_cast(backend, device, dtype):
    for init in rng.DISTRIBUTIONS:
        got = rng.counter_weights((1029,), init, 0.1, seed=4, layer=3, device=device, dtype=dtype, backend=backend)
        ref = _reference((1029,), init, 0.1, seed=4, layer=3).to(dtype)
        _assert_same(got, ref, init)


def test_cpp_is_thread_count_invariant():
    if "cpp" not in rng.available_backends("cpu"):
        pytest.skip("maskprune._C has no counter_weights_ CPU kernel")
    shape = (5, (1 << 16) + 1)  # several parallel_for tasks
    torch.set_num_threads(1)
    one = rng.counter_weights(shape, "kaiming_normal", 0.2, seed=1, layer=0, backend="cpp")
    torch.set_num_threads(2)
    two = rng.counter_weights(shape, "kaiming_normal", 0.2, seed=1, layer=0, backend="cpp")
    assert torch.equal(one.view(torch.int32), two.view(torch.int32))


@pytest.mark.parametrize("backend,device", CASES)
def test_init_weight_counter_backends(backend, device):
    """In place into the weight (a transposed view and a bf16 weight too), the key regenerating it."""
    for shape, dtype, transpose in (((300, 784), torch.float32, False), ((64, 3, 3, 3), torch.float32, False),
                                    ((40, 30), torch.float32, True), ((30, 20), torch.bfloat16, False)):
        for init in rng.WEIGHT_INITS:
            weight = torch.empty(shape[::-1] if transpose else shape, dtype=dtype, device=device)
            weight = weight.t() if transpose else weight
            key = rng.init_weight_counter(weight, init, seed=77, layer=2, backend=backend)
            ref = torch.empty(shape, dtype=dtype)
            ref_key = rng.init_weight_counter(ref, init, seed=77, layer=2, backend="reference")
            assert key == ref_key
            _assert_same(weight, ref, init)


@pytest.mark.parametrize("backend,device", CASES)
def test_supermask_philox_draw(backend, device):
    """uniform_draw("philox") by any backend: the reference's u bits, keyed (seed, step) into one 64-bit seed."""
    for step, draw in ((0, 0), (5, 1), (2 ** 32 - 1, 0)):
        got = uniform_draw((300, 17), torch.device(device), generator="philox", seed=3, step=step, layer=2,
                           draw=draw, backend=backend)
        ref = uniform_draw((300, 17), torch.device("cpu"), generator="philox", seed=3, step=step, layer=2,
                           draw=draw, backend="reference")
        _assert_same(got, ref, "uniform")
    # the key layout of the draw, written out against the generator's words
    x0, = rng.random_words(0, 300 * 17, seed=3 | (5 << 32), layer=2, stream=SUPERMASK_STREAM + 1, words=1)
    u = uniform_draw((300, 17), torch.device(device), generator="philox", seed=3, step=5, layer=2, draw=1,
                     backend=backend)
    assert torch.equal(u.cpu().view(-1), (x0 >> 8).to(torch.float32) * 2.0 ** -24)


def test_supermask_policy_masks_equal_across_backends(monkeypatch):
    """A supermask policy with generator="philox" draws the same training masks whatever backend "auto" picks."""
    from maskprune.masks import supermask

    def masks_with(backend):
        torch.manual_seed(0)  # the same frozen weights for every backend
        layer = torch.nn.Linear(30, 20)
        from maskprune.nn import convert
        model = torch.nn.Sequential(layer)
        convert(model, 0.5, policy="supermask", generator="philox", seed=11)
        masked = model[0]
        monkeypatch.setattr(supermask, "uniform_draw", lambda *a, **k: original(*a, **k, backend=backend))
        policy = masked.mask_policy
        out = []
        for step in range(3):
            policy.after_step(None, step)
            out.append(policy.effective_weight(masked).detach().clone())
        return out

    original = supermask.uniform_draw
    backends = [b for b in rng.available_backends("cpu") if b != "triton"]
    results = {b: masks_with(b) for b in backends}
    for b in backends:
        for got, ref in zip(results[b], results["reference"]):
            assert torch.equal(got, ref)
    assert not torch.equal(results["reference"][0], results["reference"][1])  # a new mask every step


# ------------------------------------------------------------------------------------------------
# opcheck and the raw op's checks
# ------------------------------------------------------------------------------------------------

needs_cpp_op = pytest.mark.skipif("cpp" not in rng.available_backends("cpu"),
                                  reason="maskprune._C has no counter_weights_ CPU kernel")


@needs_cpp_op
@pytest.mark.parametrize("args,kwargs", [
    ((torch.empty(5, 7), "signed_constant", 0.5, 3, 1), {}),
    ((torch.empty(300, 41, dtype=torch.float64), "kaiming_normal", 0.05, -2, 7), {"stream": 3}),
    ((torch.empty(1023), "kaiming_uniform", 0.1, 2 ** 40, 2 ** 32 - 1), {"stream": 2 ** 32 - 1, "offset": 2 ** 33}),
    ((torch.empty(2, 3, 4, dtype=torch.bfloat16), "uniform", 1.0, 0, 0), {"offset": 5}),
    ((torch.empty(0), "uniform", 1.0, 0, 0), {}),
])
def test_opcheck(args, kwargs):
    torch.library.opcheck(torch.ops.maskprune.counter_weights_.default, args, kwargs)


@needs_cpp_op
@pytest.mark.parametrize("args,exc,match", [
    ((torch.empty(3, dtype=torch.int32), "uniform", 1.0, 0, 0, 0, 0), TypeError, "out must be a floating tensor"),
    ((torch.empty(4, 3).t(), "uniform", 1.0, 0, 0, 0, 0), ValueError, "out must be contiguous"),
    ((torch.empty(3), "xavier", 1.0, 0, 0, 0, 0), ValueError,
     r"init must be one of \(signed_constant, kaiming_normal, kaiming_uniform, uniform\), got 'xavier'"),
    ((torch.empty(3), "uniform", float("nan"), 0, 0, 0, 0), ValueError, "scale must be a finite float32"),
    ((torch.empty(3), "uniform", 0.0, 0, 0, 0, 0), ValueError, "scale must be a finite float32"),
    ((torch.empty(3), "uniform", 1e-40, 0, 0, 0, 0), ValueError, r"scale must be a finite float32 >= 2\^-100"),
    ((torch.empty(3), "uniform", 1.0, 0, -1, 0, 0), ValueError, r"layer must be in \[0, 2\^32\), got -1"),
    ((torch.empty(3), "uniform", 1.0, 0, 2 ** 32, 0, 0), ValueError, r"layer must be in \[0, 2\^32\)"),
    ((torch.empty(3), "uniform", 1.0, 0, 0, 2 ** 32, 0), ValueError, r"stream must be in \[0, 2\^32\)"),
    ((torch.empty(3), "uniform", 1.0, 0, 0, 0, -1), ValueError, r"offset must be in \[0, 2\^63 - numel\]"),
    ((torch.empty(3), "uniform", 1.0, 0, 0, 0, 2 ** 63 - 2), ValueError, "offset must be in"),
])
def test_raw_op_bad_input(args, exc, match):
    with pytest.raises(exc, match=match):
        torch.ops.maskprune.counter_weights_(*args)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(backend="numpy"), ValueError, r"backend must be one of \('auto', 'reference', 'cpp', 'triton'\), "
                                        r"got 'numpy'"),
    (dict(backend="cpp", device="meta"), ValueError, "backend 'cpp' is not available on meta"),
    (dict(init="xavier"), ValueError, r"init must be one of \('signed_constant', 'kaiming_normal', "
                                      r"'kaiming_uniform', 'uniform'\)"),
    (dict(scale=float("inf")), ValueError, "scale must be a finite float32"),
    (dict(seed=-1), ValueError, r"seed must be an int in \[0, 2\^64\)"),
    (dict(layer=2 ** 32), ValueError, r"layer must be an int in \[0, 2\^32\)"),
    (dict(stream=-3), ValueError, r"stream must be an int in \[0, 2\^32\)"),
    (dict(offset=-1), ValueError, r"offset must be an int in \[0, 2\^63 - numel\]"),
    (dict(dtype=torch.int32), TypeError, r"dtype must be one of \(float32, float64, float16, bfloat16\)"),
    (dict(shape=(3, -1)), ValueError, "shape must be a sequence of non-negative ints"),
])
def test_counter_weights_bad_arguments(kwargs, exc, match):
    args = dict(shape=(3, 4), init="uniform", scale=1.0, seed=0, layer=0)
    args.update(kwargs)
    shape, init, scale = args.pop("shape"), args.pop("init"), args.pop("scale")
    with pytest.raises(exc, match=match):
        rng.counter_weights(shape, init, scale, **args)


def test_init_weight_counter_bad_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        rng.init_weight_counter(torch.empty(3, 4), "signed_constant", seed=0, layer=0, backend="gpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        rng.init_weight_counter(torch.empty(3, 4, device="meta"), "signed_constant", seed=0, layer=0, backend="x")
    with pytest.raises(ValueError, match="backend must be one of"):
        uniform_draw((3,), torch.device("cpu"), generator="philox", seed=0, step=0, layer=0, draw=0, backend="x")


def test_triton_launcher_bad_input():
    if "triton" not in rng.available_backends("cpu") and not torch.cuda.is_available():
        pytest.skip("triton does not run here (no GPU, and no TRITON_INTERPRET=1)")
    from maskprune import triton_rng
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = torch.empty(8, device=device)
    with pytest.raises(TypeError, match="out must have dtype in"):
        triton_rng.counter_fill(torch.empty(8, dtype=torch.int64, device=device), "uniform", 1.0, seed=0, layer=0)
    with pytest.raises(ValueError, match="out must be contiguous"):
        triton_rng.counter_fill(torch.empty(4, 4, device=device).t(), "uniform", 1.0, seed=0, layer=0)
    with pytest.raises(ValueError, match="init must be one of"):
        triton_rng.counter_fill(out, "normal", 1.0, seed=0, layer=0)
    with pytest.raises(ValueError, match="scale must be a finite float32"):
        triton_rng.counter_fill(out, "uniform", -1.0, seed=0, layer=0)
    with pytest.raises(ValueError, match=r"layer must be an int in \[0, 2\^32\)"):
        triton_rng.counter_fill(out, "uniform", 1.0, seed=0, layer=-1)
    with pytest.raises(ValueError, match=r"offset must be an int"):
        triton_rng.counter_fill(out, "uniform", 1.0, seed=0, layer=0, offset=2 ** 63)


def test_kaiming_normal_backends_agree_over_2_20():
    """The measurement behind KN_MAX_DIFFERING for the C++ kernel: 2^20 draws against the reference."""
    if "cpp" not in rng.available_backends("cpu"):
        pytest.skip("maskprune._C has no counter_weights_ CPU kernel")
    n = 1 << 20
    got = rng.counter_weights((n,), "kaiming_normal", 1.0, seed=5, layer=9, backend="cpp")
    ref = _reference((n,), "kaiming_normal", 1.0, seed=5, layer=9)
    ulps = (got.view(torch.int32).long() - ref.view(torch.int32).long()).abs()
    assert int(ulps.max()) <= 1 and int((ulps != 0).sum()) <= KN_MAX_DIFFERING * 16
    assert math.isclose(float(got.std()), 1.0, abs_tol=5e-3)


def test_auto_picks_cpp_on_cpu_when_built():
    names = rng.available_backends("cpu")
    assert names[-1] in ("reference", "triton") and "reference" in names
    assert rng._resolve_backend("auto", torch.device("cpu")) == ("cpp" if "cpp" in names else "reference")
    if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter is never "auto"'s choice on CPU
        assert rng._resolve_backend("auto", torch.device("cpu")) != "triton"


@pytest.mark.skipif(not __import__("maskprune.masks.supermask", fromlist=["_FUSED_OP"])._FUSED_OP,
                    reason="maskprune._C has no supermask_philox_mask CPU kernel")
@pytest.mark.parametrize("shape", [(20, 30), (7, 3, 3, 3), (300, 257)])
def test_supermask_fused_draw_equals_unfused(shape, monkeypatch):
    """The fused C++ training draw (FusedPhiloxMask) against the unfused path: same W_eff and dS bits."""
    from maskprune.masks import supermask
    from maskprune.nn import convert

    def run(fused: bool):
        torch.manual_seed(0)
        conv = len(shape) == 4
        model = torch.nn.Sequential(torch.nn.Conv2d(shape[1], shape[0], 3) if conv else torch.nn.Linear(shape[1], shape[0]))
        convert(model, 0.3, policy="supermask", generator="philox", seed=2 ** 32 - 1)
        layer = model[0]
        with torch.no_grad():
            layer.scores.copy_(torch.randn(layer.scores.shape))
        policy = layer.mask_policy
        monkeypatch.setattr(supermask, "_FUSED_OP", fused)
        if not fused:  # the unfused path is the torch one (BernoulliSTE), not the "sampled" policy op
            monkeypatch.setattr(supermask.ops, "policy_fused", lambda *args, **kwargs: False)
        x = torch.randn(4, shape[1], 5, 5) if conv else torch.randn(4, shape[1])
        out = []
        for step in (3, 2 ** 31 + 1):  # a step past 2^31: the key's top bit set
            policy.after_step(None, step)
            w_eff = policy.effective_weight(layer)
            model(x).square().sum().backward()
            out.append((w_eff.detach().clone(), layer.scores.grad.clone()))
            layer.scores.grad = None
        return out

    for (w_f, g_f), (w_u, g_u) in zip(run(True), run(False)):
        assert torch.equal(w_f.view(-1).view(torch.int32), w_u.view(-1).view(torch.int32))
        assert torch.equal(g_f.view(-1).view(torch.int32), g_u.view(-1).view(torch.int32))
        assert 0.1 < float((w_f != 0).float().mean()) < 0.9


@pytest.mark.skipif(not __import__("maskprune.masks.supermask", fromlist=["_FUSED_OP"])._FUSED_OP,
                    reason="maskprune._C has no supermask_philox_mask CPU kernel")
def test_supermask_fused_op_opcheck_and_bad_input():
    w, p = torch.randn(30, 17), torch.rand(30, 17)
    torch.library.opcheck(torch.ops.maskprune.supermask_philox_mask.default, (w, p, -5, 3, 2))
    torch.library.opcheck(torch.ops.maskprune.supermask_philox_mask.default, (w.t(), p.t(), 7, 0, 1))
    with pytest.raises(TypeError, match="weight must be float32"):
        torch.ops.maskprune.supermask_philox_mask(w.double(), p, 0, 0, 1)
    with pytest.raises(TypeError, match="probs must be float32"):
        torch.ops.maskprune.supermask_philox_mask(w, p.double(), 0, 0, 1)
    with pytest.raises(ValueError, match="probs must have the weight's shape"):
        torch.ops.maskprune.supermask_philox_mask(w, p[:3], 0, 0, 1)
    with pytest.raises(ValueError, match=r"stream must be in \[0, 2\^32\)"):
        torch.ops.maskprune.supermask_philox_mask(w, p, 0, 0, -1)


@needs_cpp_op
@pytest.mark.parametrize("path, env_var", [("scalar", "MASKPRUNE_PHILOX_AVX2=0"), ("avx2", "MASKPRUNE_NO_AVX512=1")])
def test_cpp_philox_paths_equal_the_reference(path, env_var):
    """Each forced Philox path (read once per process: MASKPRUNE_PHILOX_AVX2=0 the scalar loop,
    MASKPRUNE_NO_AVX512=1 at most AVX2; the default, AVX-512F where the CPU has it, is tested above) gives the
    reference's bits, across the 2^32 carry of the element index."""
    import subprocess
    import sys
    code = ("import torch; from maskprune import rng\n"
            "for init in rng.DISTRIBUTIONS:\n"
            "    k = dict(seed=2**64 - 5, layer=3, stream=9, offset=2**32 - 300)\n"
            "    a = rng.counter_weights((1003,), init, 0.3, backend='cpp', **k)\n"
            "    b = rng.counter_weights((1003,), init, 0.3, backend='reference', **k)\n"
            "    d = (a.view(torch.int32).long() - b.view(torch.int32).long()).abs()\n"
            "    assert int(d.max()) <= (1 if init == 'kaiming_normal' else 0), init\n"
            "print('ok')\n")
    name, value = env_var.split("=")
    env = {**os.environ, name: value}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]
