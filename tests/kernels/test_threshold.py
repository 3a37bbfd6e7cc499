"""Radix-select threshold: exactly the n_keep-th largest key, checked against a sort."""
import math

import pytest
import torch

try:
    from maskprune.kernels import global_threshold, threshold
except ImportError:
    from kernels import global_threshold, threshold

# A selection returns one of its inputs: no tolerance, t must equal the sorted value exactly.
TOL = {torch.float32: 0.0, torch.float64: 0.0}
DTYPES = [torch.float32, torch.float64]
DTYPE_IDS = ["float32", "float64"]
SIZES = [1, 2, 37 * 53, 5000]


def key_of(scores, abs_scores):
    return scores.abs() if abs_scores else scores


def nth_largest(scores, n_keep, abs_scores):
    return key_of(scores, abs_scores).flatten().sort(descending=True).values[n_keep - 1]


def distinct_scores(n, dtype, device):
    """Random signs and order, no two keys equal (neither as values nor as absolute values)."""
    magnitudes = (torch.randperm(n, dtype=torch.float64) + 1) / n * 3.0
    signs = torch.randint(0, 2, (n,)).double() * 2 - 1
    return (magnitudes * signs).to(dtype).to(device)


def n_keeps(n):
    return sorted({1, 2, max(1, n // 3), max(1, n - 1), n} & set(range(1, n + 1)))


@pytest.mark.parametrize("abs_scores", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n", SIZES)
def test_exact_without_ties(n, dtype, abs_scores, device):
    scores = distinct_scores(n, dtype, device)
    key = key_of(scores, abs_scores)
    for n_keep in n_keeps(n):
        t = threshold(scores, n_keep, abs_scores)
        assert t.shape == () and t.dtype == dtype and t.device == scores.device
        torch.testing.assert_close(t, nth_largest(scores, n_keep, abs_scores), rtol=TOL[dtype], atol=TOL[dtype])
        assert (key >= t).sum().item() == n_keep


@pytest.mark.parametrize("abs_scores", [True, False])
def test_ties_are_kept(abs_scores, device):
    scores = (torch.randint(-6, 7, (40, 50)).float() / 4).to(device)  # 13 values, many ties
    key = key_of(scores, abs_scores)
    for n_keep in (1, 7, 300, 1000, 1999, 2000):
        t = threshold(scores, n_keep, abs_scores)
        assert t == nth_largest(scores, n_keep, abs_scores)
        assert (key >= t).sum().item() >= n_keep
        assert (key > t).sum().item() < n_keep
    constant = torch.full((7, 9), -0.25, device=device)
    for n_keep in (1, 30, 63):
        t = threshold(constant, n_keep, abs_scores)
        assert t == (0.25 if abs_scores else -0.25)


@pytest.mark.parametrize("abs_scores", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_special_values(dtype, abs_scores, device):
    """Signed zeros, infinities, subnormals and extreme exponents all order as floats do."""
    info = torch.finfo(dtype)
    values = [0.0, -0.0, math.inf, -math.inf, info.tiny / 4, -info.tiny / 4, info.tiny, info.max, -info.max,
              1.0, -1.0, 1.0, 1.5, -2.5, info.eps, -info.eps]
    scores = torch.tensor(values, dtype=dtype, device=device)
    for n_keep in range(1, len(values) + 1):
        t = threshold(scores, n_keep, abs_scores)
        assert t == nth_largest(scores, n_keep, abs_scores)


@pytest.mark.parametrize("abs_scores", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, -math.nan], ids=["nan", "inf", "-inf", "-nan"])
def test_nan_if_nonfinite(bad, dtype, abs_scores, device):
    """With nan_if_nonfinite a NaN or ±inf anywhere (any tensor of a global threshold) gives t = NaN, so the
    caller can check finiteness on the device; without it, infinities order as floats do."""
    scores = distinct_scores(3000, dtype, device)
    other = distinct_scores(50, dtype, device)
    assert torch.isfinite(threshold(scores, 100, abs_scores, nan_if_nonfinite=True))
    assert torch.isfinite(global_threshold([scores, other], 100, abs_scores, nan_if_nonfinite=True))
    for where in (0, 2999):
        broken = scores.clone()
        broken[where] = bad
        for n_keep in (1, 3000):
            assert torch.isnan(threshold(broken, n_keep, abs_scores, nan_if_nonfinite=True))
        assert torch.isnan(global_threshold([other, broken], 100, abs_scores, nan_if_nonfinite=True))
    if not math.isnan(bad):
        broken = scores.clone()
        broken[5] = bad
        assert threshold(broken, 100, abs_scores) == nth_largest(broken, 100, abs_scores)


def test_negative_scores_raw_keys(device):
    scores = -distinct_scores(1000, torch.float32, device).abs()
    t = threshold(scores, 10, abs_scores=False)
    assert t < 0 and (scores >= t).sum().item() == 10
    assert t == nth_largest(scores, 10, abs_scores=False)


def test_noncontiguous_scores(device):
    base = distinct_scores(60 * 70, torch.float32, device).reshape(60, 70)
    # base[:, ::7] flattens to a stride-7 view; the other two need a copy.
    for scores in (base.T[::2], base[:, ::7], base.T):
        assert not scores.is_contiguous()
        for n_keep in (1, 200, scores.numel()):
            assert threshold(scores, n_keep) == nth_largest(scores, n_keep, True)


@pytest.mark.parametrize("abs_scores", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_global_threshold_over_tensors(dtype, abs_scores, device):
    scores = distinct_scores(3 * 5 + 100 + 40 * 40 + 1 + 300, dtype, device)
    parts = list(torch.split(scores, [3 * 5, 100, 40 * 40, 1, 300]))
    parts = [parts[0].reshape(3, 5), parts[1], parts[2].reshape(40, 40).T, parts[3],
             scores.new_empty(0), parts[4].reshape(10, 30)]
    key = key_of(scores, abs_scores)
    for n_keep in n_keeps(scores.numel()) + [1000]:
        t = global_threshold(parts, n_keep, abs_scores)
        assert t.shape == () and t.dtype == dtype
        assert t == nth_largest(scores, n_keep, abs_scores)
        assert (key >= t).sum().item() == n_keep
        assert sum((key_of(p, abs_scores) >= t).sum().item() for p in parts) == n_keep


def test_bad_inputs(device):
    scores = torch.randn(4, 5, device=device)
    with pytest.raises(ValueError, match=r"n_keep must be in \[1, 20\] \(the number of scores\), got 0"):
        threshold(scores, 0)
    with pytest.raises(ValueError, match=r"n_keep must be in \[1, 20\] \(the number of scores\), got 21"):
        threshold(scores, 21)
    with pytest.raises(ValueError, match=r"n_keep must be in \[1, 0\]"):
        threshold(scores[:0], 1)
    with pytest.raises(TypeError, match=r"n_keep must be an int, got float"):
        threshold(scores, 2.0)
    with pytest.raises(TypeError, match=r"scores has dtype float16; accepted: float32, float64"):
        threshold(scores.half(), 3)
    with pytest.raises(TypeError, match=r"scores has dtype int64; accepted: float32, float64"):
        threshold(scores.long(), 3)
    with pytest.raises(TypeError, match=r"scores_list must be a non-empty list or tuple of tensors"):
        global_threshold([], 1)
    with pytest.raises(TypeError, match=r"scores_list must be a non-empty list or tuple of tensors"):
        global_threshold(scores, 1)
    with pytest.raises(TypeError, match=r"scores_list\[1\] has dtype float64; accepted: the dtype of scores_list\[0\]"):
        global_threshold([scores, scores.double()], 3)
    with pytest.raises(ValueError, match=r"devices differ: scores_list\[0\] is on .*, scores_list\[1\] is on meta"):
        global_threshold([scores, scores.to("meta")], 3)
    with pytest.raises(ValueError, match=r"need CUDA tensors"):
        threshold(scores.to("meta"), 3)
