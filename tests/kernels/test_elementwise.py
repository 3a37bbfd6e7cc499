"""The conv layers' elementwise passes, apply_mask and score_grad, against plain torch."""
import pytest
import torch

try:
    from maskprune.kernels import apply_mask, score_grad
except ImportError:
    from kernels import apply_mask, score_grad

# apply_mask copies or zeroes each weight: exact. score_grad is two products in fp32 (fp64), as torch
# computes them, so it is exact too up to the order of the products.
TOL = {torch.float32: 1e-6, torch.float64: 1e-15, torch.float16: 1e-6, torch.bfloat16: 1e-6}
SHAPES = [(1,), (64, 33), (5, 3, 7, 7), (2, 3, 5, 4, 3)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def key_of(scores, abs_scores):
    return scores.abs() if abs_scores else scores


def ref_apply_mask(weight, scores, t, abs_scores, out_dtype=None):
    return (weight * (key_of(scores, abs_scores) >= t).to(weight.dtype)).to(out_dtype or weight.dtype)


def ref_score_grad(grad_weight, weight, scores, abs_scores):
    compute = torch.float64 if torch.float64 in (grad_weight.dtype, weight.dtype, scores.dtype) else torch.float32
    grad = weight.to(compute) * grad_weight.to(compute)
    if abs_scores:
        grad = torch.sign(scores.to(compute)) * grad
    return grad.to(scores.dtype)


def make(shape, dtype, device):
    scores_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    weight = torch.randn(shape, dtype=dtype, device=device)
    scores = torch.randn(shape, dtype=scores_dtype, device=device)
    scores.view(-1)[::7] = 0.0  # sign(0) = 0
    t = key_of(scores, True).flatten().median()
    return weight, scores, t


@pytest.mark.parametrize("abs_scores", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(shape, dtype, abs_scores, device, require_dtype):
    require_dtype(dtype)
    weight, scores, t = make(shape, dtype, device)
    masked = apply_mask(weight, scores, t, abs_scores)
    assert masked.dtype == dtype and masked.shape == weight.shape
    assert torch.equal(masked, ref_apply_mask(weight, scores, t, abs_scores))

    grad_weight = torch.randn(shape, dtype=dtype, device=device)
    grad_scores = score_grad(grad_weight, weight, scores, abs_scores)
    assert grad_scores.dtype == scores.dtype and grad_scores.shape == scores.shape
    torch.testing.assert_close(grad_scores, ref_score_grad(grad_weight, weight, scores, abs_scores),
                               rtol=TOL[dtype], atol=TOL[dtype])


def test_out_dtype(device):
    weight, scores, t = make((64, 33), torch.float32, device)
    masked = apply_mask(weight, scores, t, out_dtype=torch.float64)
    assert masked.dtype == torch.float64
    assert torch.equal(masked, ref_apply_mask(weight, scores, t, True, torch.float64))


def test_noncontiguous_and_stride_zero(device):
    weight = torch.randn(33, 64, device=device).T
    scores = torch.randn(64, 66, device=device)[:, ::2]
    t = scores.abs().median()
    assert torch.equal(apply_mask(weight, scores, t), ref_apply_mask(weight, scores, t, True))
    grad_weight = torch.ones((), device=device).expand(64, 33)  # as from .sum().backward()
    expected = ref_score_grad(grad_weight, weight, scores, True)
    torch.testing.assert_close(score_grad(grad_weight, weight, scores), expected,
                               rtol=TOL[torch.float32], atol=TOL[torch.float32])


def test_threshold_extremes(device):
    """t above every key keeps nothing; t = 0 on |S| keeps everything; raw negative t keeps negatives."""
    weight, scores, _ = make((5, 3, 7, 7), torch.float32, device)
    assert not apply_mask(weight, scores, torch.tensor(float("inf"), device=device)).any()
    assert torch.equal(apply_mask(weight, scores, torch.tensor(0.0, device=device)), weight)
    t = torch.tensor(-0.5, device=device)
    assert torch.equal(apply_mask(weight, scores, t, abs_scores=False), ref_apply_mask(weight, scores, t, False))


def test_empty(device):
    weight, scores, t = make((0, 3), torch.float32, device)
    assert apply_mask(weight, scores, t.new_tensor(0.0)).shape == (0, 3)
    assert score_grad(weight, weight, scores).shape == (0, 3)


def test_bad_inputs(device):
    weight, scores, t = make((4, 5), torch.float32, device)
    with pytest.raises(ValueError, match=r"scores must have weight's shape \(4, 5\), got \(5, 4\)"):
        apply_mask(weight, scores.T, t)
    with pytest.raises(TypeError, match=r"scores has dtype int32; accepted: float32, float64"):
        apply_mask(weight, scores.int(), t)
    with pytest.raises(TypeError, match=r"weight has dtype bool; accepted: float16, bfloat16, float32, float64"):
        apply_mask(weight.bool(), scores, t)
    with pytest.raises(ValueError, match=r"t must be a 0-d tensor, got shape \(2,\)"):
        apply_mask(weight, scores, t.repeat(2))
    with pytest.raises(TypeError, match=r"t has dtype float64; accepted: the scores' dtype \(float32\)"):
        apply_mask(weight, scores, t.double())
    with pytest.raises(TypeError, match=r"out_dtype is torch.int8; accepted: None or one of float16"):
        apply_mask(weight, scores, t, out_dtype=torch.int8)
    with pytest.raises(ValueError, match=r"devices differ: weight is on .*, t is on meta"):
        apply_mask(weight, scores, t.to("meta"))
    with pytest.raises(ValueError, match=r"grad_weight, weight and scores must have one shape"):
        score_grad(weight[:3], weight, scores)
    with pytest.raises(TypeError, match=r"grad_weight has dtype int64"):
        score_grad(weight.long(), weight, scores)
