"""maskprune.nn: masked layers, the threshold cache, convert / mask_stats / to_dense, torch.compile."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import maskprune
from maskprune import masks, ops, reference
from maskprune.nn import MaskedConv2d, MaskedLinear, convert, mask_stats, masked_layers, to_dense


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, bias=False), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 7 * 7, 32), nn.ReLU(), nn.Linear(32, 5),
    )


def n_keep(density: float, n: int) -> int:
    return min(max(math.floor(density * n + 0.5), 1), n)


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("density", [0.01, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("backend", ops.available_backends("cpu"))
def test_masked_linear_matches_reference_and_keeps_n_keep(density, backend):
    torch.manual_seed(1)
    layer = MaskedLinear(37, 23, density=density, backend=backend)
    x = torch.randn(5, 3, 37)
    t = reference.threshold(layer.scores.detach(), density, True)
    expected = F.linear(x, layer.weight * (layer.scores.abs() >= t))
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert int(layer.mask().sum()) == n_keep(density, 37 * 23)


def test_only_scores_learn():
    layer = MaskedLinear(6, 4, bias=True, density=0.5)
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.scores.requires_grad and layer.scores.dtype == torch.float32
    layer(torch.randn(2, 6)).sum().backward()
    assert layer.weight.grad is None and layer.bias.grad is None
    assert layer.scores.grad is not None and layer.scores.grad.abs().sum() > 0


def test_float64_layer_keeps_float32_scores():
    layer = MaskedLinear(5, 3, density=0.5, dtype=torch.float64)
    assert layer.weight.dtype == torch.float64 and layer.scores.dtype == torch.float32
    assert layer(torch.randn(2, 5, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize("init", ["signed_constant", "kaiming_normal", "kaiming_uniform"])
def test_weight_inits_have_kaiming_scale(init):
    torch.manual_seed(0)
    layer = MaskedLinear(400, 300, density=0.5, weight_init=init)
    std = math.sqrt(2.0 / 400)
    assert abs(float(layer.weight.std()) - std) < 0.05 * std
    if init == "signed_constant":
        assert torch.allclose(layer.weight.abs(), torch.full_like(layer.weight, std))
    scaled = MaskedLinear(400, 300, density=0.25, weight_init=init, scale_fan=True)
    assert abs(float(scaled.weight.std()) - 2 * std) < 0.1 * std  # fan scaled by the density


def test_repr_names_density_and_policy():
    text = repr(MaskedConv2d(3, 4, 3, density=0.3))
    assert "density=0.3" in text and "policy=layerwise" in text


def test_state_dict_round_trip():
    torch.manual_seed(0)
    a = MaskedLinear(9, 7, density=0.4)
    with torch.no_grad():
        a.scores.normal_()
    b = MaskedLinear(9, 7, density=0.4)
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 9)
    assert set(a.state_dict()) == {"weight", "scores"}
    assert torch.equal(a(x), b(x)) and torch.equal(a.mask(), b.mask())


def _record_threshold_calls(monkeypatch) -> list:
    """The hint of every threshold computation: ops.threshold, or masked_linear_topk (a layer-wise
    MaskedLinear's forward after its scores changed, which finds t in the same call)."""
    hints = []
    for name in ("threshold", "masked_linear_topk"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _real=real, **k: hints.append(k.get("hint")) or _real(*a, **k))
    return hints


def test_threshold_is_cached_until_scores_change(monkeypatch):
    layer = MaskedLinear(20, 10, density=0.5)
    calls = _record_threshold_calls(monkeypatch)
    opt = torch.optim.SGD([layer.scores], lr=0.1)
    x = torch.randn(3, 20)
    for _ in range(3):  # several forwards between steps: one threshold per step
        layer(x).sum().backward()
        layer(x)
        opt.step()
        opt.zero_grad()
    assert len(calls) == 3
    with torch.no_grad():
        layer.scores.mul_(-1)  # any in-place change of the scores invalidates the cache
    layer(x)
    assert len(calls) == 4


def test_recomputed_threshold_gets_the_previous_one_as_hint(monkeypatch):
    layer = MaskedLinear(20, 10, density=0.5)
    hints = _record_threshold_calls(monkeypatch)
    x = torch.randn(3, 20)
    layer(x)
    first = layer.threshold()
    with torch.no_grad():
        layer.scores.mul_(1.001)
    layer(x)
    assert hints[0] is None and hints[1] is first  # same tensor, same settings: the old t is the hint
    torch.testing.assert_close(layer.threshold(), reference.threshold(layer.scores.detach(), 0.5, True))
    layer.scores = torch.nn.Parameter(torch.randn(10, 20))  # other scores: no hint
    layer(x)
    assert hints[2] is None
    layer.density = 0.3  # other settings: no hint
    layer(x)
    assert hints[3] is None


def test_conv_matches_reference():
    torch.manual_seed(2)
    conv = MaskedConv2d(3, 5, 3, stride=2, padding=1, density=0.3)
    x = torch.randn(2, 3, 9, 11)
    t = reference.threshold(conv.scores.detach(), 0.3, True)
    expected = F.conv2d(x, conv.weight * (conv.scores.abs() >= t), stride=2, padding=1)
    torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-5)
    conv(x).square().sum().backward()
    w_eff = (conv.weight * (conv.scores.abs() >= t)).requires_grad_()
    F.conv2d(x, w_eff, stride=2, padding=1).square().sum().backward()
    torch.testing.assert_close(conv.scores.grad, torch.sign(conv.scores.detach()) * conv.weight * w_eff.grad,
                               rtol=1e-5, atol=1e-6)


def test_autocast_bf16_on_cpu_runs_in_bf16():
    layer = MaskedLinear(16, 8, density=0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(torch.randn(4, 16))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.scores.grad.dtype == torch.float32


@pytest.mark.parametrize("kwargs,match", [
    (dict(density=0.0), "density"), (dict(density=1.5), "density"), (dict(density=float("nan")), "density"),
    (dict(weight_init="xavier"), "weight_init"), (dict(score_init="zeros"), "score_init"),
    (dict(backend="cuda"), "backend"),
])
def test_bad_layer_arguments_raise(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        MaskedLinear(4, 3, **{"density": 0.5, **kwargs})


def test_bad_input_shape_names_in_features():
    with pytest.raises(ValueError, match="in_features=4"):
        MaskedLinear(4, 3)(torch.randn(2, 5))


# --------------------------------------------------------------------------------------------
# convert / mask_stats / to_dense
# --------------------------------------------------------------------------------------------

def test_convert_keeps_weights_and_freezes_everything_but_scores():
    model = small_cnn()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out_dense = model(torch.ones(1, 3, 16, 16))
    convert(model, 1.0)  # density 1 keeps every weight: the same function as before
    assert len(masked_layers(model)) == 4
    torch.testing.assert_close(model(torch.ones(1, 3, 16, 16)), out_dense)
    for name, p in model.named_parameters():
        assert p.requires_grad == name.endswith("scores"), name
        if name in before:
            assert torch.equal(p, before[name]), name


@pytest.mark.parametrize("policy", ["layerwise", "global"])
def test_convert_to_dense_same_outputs(policy):
    model = convert(small_cnn(), 0.3, policy=policy, weight_init="signed_constant")
    x = torch.randn(3, 3, 16, 16)
    dense = to_dense(model)
    assert not any(isinstance(m, maskprune.nn.MaskedLayer) for m in dense.modules())
    torch.testing.assert_close(dense(x), model(x), rtol=1e-5, atol=1e-6)
    stats = mask_stats(model)
    total = sum(m.weight.numel() for _, m in masked_layers(model))
    assert stats["total"] == total
    if policy == "layerwise":
        for row in stats["layers"]:
            assert row["kept"] == n_keep(0.3, row["total"]), row
    else:
        assert stats["kept"] == n_keep(0.3, total)
        assert {row["policy"] for row in stats["layers"]} == {"global"}


def test_convert_skip_leaves_a_layer_dense():
    model = convert(small_cnn(), 0.5, skip=["7"])
    assert type(model[7]) is nn.Linear and isinstance(model[0], MaskedConv2d)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: convert(small_cnn(), 0.0), ValueError, "density"),
    (lambda: convert(small_cnn(), 0.5, policy="random"), ValueError, "policy"),
    (lambda: convert(small_cnn(), 0.5, skip=["nope"]), ValueError, "skip"),
    (lambda: convert(nn.Sequential(nn.ReLU()), 0.5), ValueError, "nothing to convert|no nn.Linear"),
    (lambda: convert("model", 0.5), TypeError, "model"),
    (lambda: mask_stats(small_cnn()), ValueError, "masked layers"),
])
def test_convert_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_global_policy_shares_one_threshold_and_caches():
    model = convert(small_cnn(), 0.2, policy="global", weight_init="kaiming_normal")
    policies = {id(m.mask_policy) for _, m in masked_layers(model)}
    assert len(policies) == 1
    policy = masked_layers(model)[0][1].mask_policy
    assert isinstance(policy, masks.GlobalTopK)
    assert policy.threshold() is policy.threshold()


# --------------------------------------------------------------------------------------------
# torch.compile: a model of masked layers traces with no graph break
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["auto"] + [b for b in ops.available_backends("cpu") if b != "triton"])
def test_compile_fullgraph(backend):
    torch.manual_seed(0)
    model = nn.Sequential(MaskedLinear(12, 16, density=0.5, backend=backend), nn.ReLU(),
                          MaskedLinear(16, 4, density=0.5, backend=backend))
    x = torch.randn(5, 12)
    expected = model(x)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert all(m.scores.grad is not None for m in model if isinstance(m, MaskedLinear))


def test_compile_fullgraph_after_recompiles_for_other_densities():
    # A recompile for another density makes dynamo trace the density as a symbolic float; the
    # Python-side checks must not break the graph then.
    torch._dynamo.reset()
    x = torch.randn(3, 12)
    for density in (0.5, 0.3, 0.7):
        layer = MaskedLinear(12, 4, density=density)
        out = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
        torch.testing.assert_close(out, layer(x))


@pytest.mark.parametrize("backend", ops.available_backends("cpu"))
def test_training_with_threshold_found_in_the_forward_matches_the_two_ops(backend):
    """A layer-wise MaskedLinear finds its new threshold in its forward (masked_linear_topk); the training
    run is bit for bit the one of threshold() then masked_linear() at every step."""
    torch.manual_seed(3)
    layer = MaskedLinear(131, 150, bias=True, density=0.3, backend=backend)  # 19650 scores: the fused CPU pass
    layer.bias.requires_grad_(True)
    scores, bias = layer.scores.detach().clone().requires_grad_(), layer.bias.detach().clone().requires_grad_()
    opt_layer = torch.optim.SGD([layer.scores, layer.bias], lr=0.5, momentum=0.9)
    opt_ops = torch.optim.SGD([scores, bias], lr=0.5, momentum=0.9)
    for step in range(6):
        x = torch.randn(16, 131)
        layer(x).square().mean().backward()
        t = ops.threshold(scores, 0.3, backend=backend)
        ops.masked_linear(x, layer.weight, scores, t, bias, backend=backend).square().mean().backward()
        assert torch.equal(layer.threshold(), t), step
        assert torch.equal(layer.scores.grad, scores.grad) and torch.equal(layer.bias.grad, bias.grad), step
        opt_layer.step()
        opt_ops.step()
        opt_layer.zero_grad()
        opt_ops.zero_grad()
    assert torch.equal(layer.scores, scores)


def test_threshold_made_under_inference_mode_is_not_cached():
    """An inference tensor cannot be saved for backward: a training step after an inference_mode forward works."""
    layer = MaskedLinear(131, 150, density=0.3)
    x = torch.randn(4, 131)
    with torch.inference_mode():
        y_inference = layer(x)
    y = layer(x)
    y.sum().backward()
    assert torch.equal(y.detach(), y_inference) and layer.scores.grad is not None
    opt = torch.optim.SGD([layer.scores], lr=0.1)
    opt.step()
    with torch.inference_mode():
        layer(x)  # a new threshold (the scores changed), not cached
    layer(x).sum().backward()
