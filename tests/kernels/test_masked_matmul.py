"""The fused masked-linear GEMMs against a few-line reference that materialises W ⊙ M."""
import pytest
import torch

try:
    from maskprune.kernels import masked_linear_forward, masked_linear_grad_input, masked_linear_grad_scores
except ImportError:
    from kernels import masked_linear_forward, masked_linear_grad_input, masked_linear_grad_scores

# Largest error allowed, relative to the largest entry of the float64 reference (fp32 is run with
# input_precision="ieee"; fp16/bf16 outputs are rounded to their own precision).
TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

# (M, N, K): x is [M, K], weight and scores are [N, K]. Odd sizes cover every boundary tile.
SHAPES = [(1, 1, 1), (37, 53, 70), (65, 129, 33), (3, 300, 784)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def key_of(scores, abs_scores):
    return scores.abs() if abs_scores else scores


def nth_largest(scores, n_keep, abs_scores):
    return key_of(scores, abs_scores).flatten().sort(descending=True).values[n_keep - 1]


def reference(x, weight, scores, t, grad_out, bias=None, abs_scores=True):
    """Y, dX, dS of docs/design.md §1 in float64, from W ⊙ M rounded to x's dtype as a torch layer would."""
    w_eff = (weight * (key_of(scores, abs_scores) >= t).to(weight.dtype)).to(x.dtype).double()
    y = x.double() @ w_eff.T + (0 if bias is None else bias.double())
    grad_x = grad_out.double() @ w_eff
    grad_w = grad_out.double().T @ x.double()
    sign = torch.sign(scores.double()) if abs_scores else 1.0
    return y, grad_x, sign * weight.double() * grad_w


def assert_close(actual, expected, dtype):
    scale = max(expected.abs().max().item(), 1.0) if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected, rtol=0, atol=TOL[dtype] * scale)


def make(M, N, K, dtype, device, scores_dtype=torch.float32):
    x = torch.randn(M, K, dtype=dtype, device=device)
    weight = torch.randn(N, K, dtype=dtype, device=device)
    scores = torch.randn(N, K, dtype=scores_dtype, device=device)
    grad_out = torch.randn(M, N, dtype=dtype, device=device)
    return x, weight, scores, grad_out


def run_all(x, weight, scores, t, grad_out, bias=None, abs_scores=True):
    y = masked_linear_forward(x, weight, scores, t, bias, abs_scores=abs_scores)
    grad_x = masked_linear_grad_input(grad_out, weight, scores, t, abs_scores=abs_scores)
    grad_scores = masked_linear_grad_scores(grad_out, x, weight, scores, abs_scores=abs_scores)
    return y, grad_x, grad_scores


def check_all(x, weight, scores, t, grad_out, bias=None, abs_scores=True, dtype=None):
    dtype = dtype or x.dtype
    y, grad_x, grad_scores = run_all(x, weight, scores, t, grad_out, bias, abs_scores)
    y_ref, grad_x_ref, grad_scores_ref = reference(x, weight, scores, t, grad_out, bias, abs_scores)
    assert y.dtype == x.dtype and y.shape == y_ref.shape
    assert grad_x.dtype == grad_out.dtype and grad_x.shape == x.shape
    assert grad_scores.dtype == scores.dtype and grad_scores.shape == scores.shape
    assert_close(y, y_ref, dtype)
    assert_close(grad_x, grad_x_ref, dtype)
    # dS accumulates in fp32 (fp64) from exact inputs and is written in the scores' dtype.
    assert_close(grad_scores, grad_scores_ref, torch.float64 if dtype == scores.dtype == torch.float64
                 else torch.float32)


CASES = [(shape, dtype) for shape in SHAPES for dtype in DTYPES
         if shape != (3, 300, 784) or dtype == torch.float32]  # the big shape once: the interpreter is slow


@pytest.mark.parametrize("abs_scores", [True, False])
@pytest.mark.parametrize("shape,dtype", CASES, ids=[f"{m}x{n}x{k}-{str(d)[6:]}" for (m, n, k), d in CASES])
def test_matches_reference(shape, dtype, abs_scores, device, require_dtype):
    require_dtype(dtype)
    M, N, K = shape
    scores_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    x, weight, scores, grad_out = make(M, N, K, dtype, device, scores_dtype)
    t = nth_largest(scores, max(1, scores.numel() // 2), abs_scores)
    bias = torch.randn(N, dtype=dtype, device=device)
    check_all(x, weight, scores, t, grad_out, None, abs_scores)
    y = masked_linear_forward(x, weight, scores, t, bias, abs_scores=abs_scores)
    assert_close(y, reference(x, weight, scores, t, grad_out, bias, abs_scores)[0], dtype)


@pytest.mark.parametrize("abs_scores", [True, False])
def test_densities_from_one_kept_to_all(abs_scores, device):
    M, N, K = 37, 53, 70
    x, weight, scores, grad_out = make(M, N, K, torch.float32, device)
    bias = torch.randn(N, device=device)
    n = scores.numel()
    for n_keep in (1, 2, n // 10, n - 1, n):
        t = nth_largest(scores, n_keep, abs_scores)
        check_all(x, weight, scores, t, grad_out, bias, abs_scores)
    # Nothing kept (t above every key): Y is the bias alone, dX is zero.
    t = key_of(scores, abs_scores).max() + 1
    y, grad_x, _ = run_all(x, weight, scores, t, grad_out, bias, abs_scores)
    assert torch.equal(y, bias.expand(M, N)) and not grad_x.any()


def test_negative_scores_raw_keys(device):
    """abs_scores=False ranks the signed scores: a negative t keeps some negative scores."""
    x, weight, scores, grad_out = make(37, 53, 70, torch.float32, device)
    scores = -scores.abs()
    scores[0, :5] = 0.5
    t = nth_largest(scores, 200, abs_scores=False)
    assert t < 0
    check_all(x, weight, scores, t, grad_out, abs_scores=False)


def test_noncontiguous_operands(device):
    M, N, K = 37, 53, 70
    x = torch.randn(K, M, device=device).T  # transposed view
    weight = torch.randn(N, 2 * K, device=device)[:, ::2]  # sliced view
    scores = torch.randn(K, N, device=device).T
    grad_out = torch.randn(N, M, device=device).T
    bias = torch.randn(2 * N, device=device)[::2]
    assert not (x.is_contiguous() or weight.is_contiguous() or scores.is_contiguous() or bias.is_contiguous())
    t = nth_largest(scores, 900, True)
    check_all(x, weight, scores, t, grad_out, bias)


def test_stride_zero_grad_out(device):
    """grad_out of y.sum().backward() is a stride-0 expansion of one value."""
    M, N, K = 37, 53, 70
    x, weight, scores, _ = make(M, N, K, torch.float32, device)
    captured = {}
    y = torch.zeros(M, N, device=device, requires_grad=True)
    y.register_hook(lambda g: captured.setdefault("grad", g))
    y.sum().backward()
    grad_out = captured["grad"]
    assert grad_out.stride() == (0, 0)
    check_all(x, weight, scores, nth_largest(scores, 1000, True), grad_out)


def test_mixed_weight_dtype_and_float64_scores(device):
    """A weight of another dtype than x is cast tile by tile (rounded like the reference); float64
    scores go with any weight."""
    x, weight, scores, grad_out = make(37, 53, 70, torch.float64, device, torch.float64)
    t = nth_largest(scores, 1000, True)
    check_all(x, weight, scores, t, grad_out)
    weight32 = weight.float()
    y = masked_linear_forward(x, weight32, scores.float(), t.float())
    assert_close(y, reference(x, weight32, scores.float(), t.float(), grad_out)[0], torch.float64)
    # float32 activations, float64 weight and scores: fp32 GEMMs, dS written in float64.
    check_all(x.float(), weight, scores, t, grad_out.float(), dtype=torch.float32)
    # float32 activations and weight, float64 scores.
    check_all(x.float(), weight32, scores, t, grad_out.float(), dtype=torch.float32)


def test_allow_tf32(device):
    x, weight, scores, grad_out = make(37, 53, 70, torch.float32, device)
    t = nth_largest(scores, 1000, True)
    y = masked_linear_forward(x, weight, scores, t, allow_tf32=True)
    assert_close(y, reference(x, weight, scores, t, grad_out)[0], torch.bfloat16)  # tf32: 10-bit mantissa


def test_empty_batch(device):
    x, weight, scores, grad_out = make(0, 5, 7, torch.float32, device)
    t = nth_largest(scores, 10, True)
    y, grad_x, grad_scores = run_all(x, weight, scores, t, grad_out)
    assert y.shape == (0, 5) and grad_x.shape == (0, 7)
    assert grad_scores.shape == (5, 7) and not grad_scores.any()


def test_bad_inputs(device):
    x, weight, scores, grad_out = make(4, 5, 6, torch.float32, device)
    t = nth_largest(scores, 10, True)
    with pytest.raises(ValueError, match=r"x has 7 features .* weight expects 6"):
        masked_linear_forward(torch.randn(4, 7, device=device), weight, scores, t)
    with pytest.raises(ValueError, match=r"x must be 2-D"):
        masked_linear_forward(x[None], weight, scores, t)
    with pytest.raises(ValueError, match=r"scores must have weight's shape \(5, 6\)"):
        masked_linear_forward(x, weight, scores[:, :5], t)
    with pytest.raises(TypeError, match=r"x has dtype int64; accepted: float16, bfloat16, float32, float64"):
        masked_linear_forward(x.long(), weight, scores, t)
    with pytest.raises(TypeError, match=r"scores has dtype float16; accepted: float32, float64"):
        masked_linear_forward(x, weight, scores.half(), t.half())
    with pytest.raises(ValueError, match=r"t must be a 0-d tensor, got shape \(1,\)"):
        masked_linear_forward(x, weight, scores, t.reshape(1))
    with pytest.raises(TypeError, match=r"t must be a 0-d torch.Tensor"):
        masked_linear_forward(x, weight, scores, 0.5)
    with pytest.raises(TypeError, match=r"t has dtype float64; accepted: the scores' dtype \(float32\)"):
        masked_linear_forward(x, weight, scores, t.double())
    with pytest.raises(ValueError, match=r"bias must have shape \(5,\)"):
        masked_linear_forward(x, weight, scores, t, torch.randn(6, device=device))
    with pytest.raises(ValueError, match=r"devices differ: x is on .*, t is on meta"):
        masked_linear_forward(x, weight, scores, t.to("meta"))
    with pytest.raises(ValueError, match=r"need CUDA tensors"):
        masked_linear_forward(x.to("meta"), weight.to("meta"), scores.to("meta"), t.to("meta"))
    with pytest.raises(ValueError, match=r"grad_out has 4 columns .* weight has 5 rows"):
        masked_linear_grad_input(grad_out[:, :4], weight, scores, t)
    with pytest.raises(TypeError, match=r"grad_out has dtype float64; accepted: x's dtype \(float32\)"):
        masked_linear_grad_scores(grad_out.double(), x, weight, scores)
    with pytest.raises(ValueError, match=r"grad_out and x must have the same number of rows"):
        masked_linear_grad_scores(grad_out[:3], x, weight, scores)
    with pytest.raises(ValueError, match=r"must match weight \[N, K\] = \(5, 5\)"):
        masked_linear_grad_scores(grad_out, x, weight[:, :5], scores[:, :5])


def test_autotune_pruning_and_batch_bucketing():
    """Configs whose pipelined tiles exceed the device's shared memory (or that spill with fp32 operands)
    are pruned before autotuning; the batch size enters the key as a power of two."""
    import importlib

    import triton
    mm = importlib.import_module(masked_linear_forward.__module__)
    utils = importlib.import_module(mm.__name__.rsplit(".", 1)[0] + "._utils")
    configs = mm.gemm_configs(interpret=False)
    big = configs[0]  # 128x256x64 at 3 stages: 144 KB in bf16, 288 KB in fp32
    assert mm.shared_memory_estimate(big, 2, 2) == 3 * (128 * 64 + 64 * 256) * 2
    h100, a100, ada = (utils.SHARED_MEMORY_LIMIT[cc] for cc in (90, 80, 89))
    assert any(c is big for c in mm.fitting_configs(configs, 2, 2, h100))
    assert any(c is big for c in mm.fitting_configs(configs, 2, 2, a100))  # 144 KB <= 163 KB
    assert not any(c is big for c in mm.fitting_configs(configs, 2, 2, ada))  # > 99 KB
    assert not any(c is big for c in mm.fitting_configs(configs, 4, 4, h100))
    kept = mm.fitting_configs(configs, 2, 2, ada)
    assert kept and all(mm.shared_memory_estimate(c, 2, 2) <= ada for c in kept)
    fp32 = mm.fitting_configs(configs, 4, 4, h100)
    assert not any(mm.spills_with_fp32(c) for c in fp32) and any(mm.spills_with_fp32(c) for c in configs)
    tiny = [triton.Config({"BLOCK_R": 256, "BLOCK_C": 256, "BLOCK_K": 128, "GROUP_R": 8}, num_stages=8)]
    assert mm.fitting_configs(tiny, 4, 4, 1000) == tiny  # never empty: the smallest config stays
    assert [utils.bucket(m) for m in (1, 16, 17, 100, 128, 129, 4096, 5000)] == [16, 16, 32, 128, 128, 256, 4096,
                                                                                8192]


def test_split_m_partial_sums(device):
    """dS with the rows split in 1..5 parts (fixed-order partial sums) equals the unsplit result."""
    x, weight, scores, grad_out = make(70, 37, 53, torch.float32, device)
    expected = masked_linear_grad_scores(grad_out, x, weight, scores, split_m=1)
    ref = reference(x, weight, scores, scores.abs().median(), grad_out)[2]
    assert_close(expected, ref, torch.float32)
    for split in (2, 3, 5):
        got = masked_linear_grad_scores(grad_out, x, weight, scores, split_m=split)
        assert_close(got, ref, torch.float32)
        assert_close(masked_linear_grad_scores(grad_out, x, weight, scores, abs_scores=False, split_m=split),
                     reference(x, weight, scores, scores.abs().median(), grad_out, abs_scores=False)[2],
                     torch.float32)
    with pytest.raises(ValueError, match=r"split_m must be None or an int in \[1, 64\], got 0"):
        masked_linear_grad_scores(grad_out, x, weight, scores, split_m=0)
