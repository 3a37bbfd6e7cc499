"""Mask policies (maskprune.masks, issue 17): each policy's forward and gradient against a reference written
from the original code's rule (float64, small shapes), option checks, hooks, resumability, and a short MNIST
run per policy that must learn."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import maskprune
from maskprune import data, masks, models, reference, rng
from maskprune.masks.supermask import EVAL_STEP, SUPERMASK_STREAM, uniform_draw
from maskprune.nn import MaskedConv2d, MaskedLinear, WeightMask, masked_layers

torch.set_default_dtype(torch.float32)


def _layer(out_f=5, in_f=7, density=0.4, weight_init="kaiming_normal", seed=0, bias=False) -> MaskedLinear:
    """A float64 MaskedLinear with float64 scores (the ops accept float64 scores)."""
    torch.manual_seed(seed)
    layer = MaskedLinear(in_f, out_f, bias=bias, density=density, weight_init=weight_init, dtype=torch.float64)
    layer.scores = nn.Parameter(layer.scores.detach().double())
    if bias:
        layer.bias.requires_grad_(False)
    return layer


def _conv(density=0.4, weight_init="kaiming_normal", seed=0) -> MaskedConv2d:
    torch.manual_seed(seed)
    layer = MaskedConv2d(3, 4, 3, padding=1, density=density, weight_init=weight_init, dtype=torch.float64)
    layer.scores = nn.Parameter(layer.scores.detach().double())
    return layer


def _x(*shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _grads(fn, layer, x):
    """(y, dS, dX) of y = fn(x) with loss sum(y * r) for a fixed random r."""
    x = x.clone().requires_grad_(True)
    layer.scores.grad = None
    y = fn(x)
    r = _x(*y.shape, seed=7)
    (y * r).sum().backward()
    return y.detach(), layer.scores.grad.clone(), x.grad.clone()


def _manual_linear_grads(w_eff, x, y_shape):
    """dL/dW_eff = dYᵀ X for the loss sum(y * r) used by _grads."""
    r = _x(*y_shape, seed=7)
    return r.reshape(-1, y_shape[-1]).T @ x.reshape(-1, x.shape[-1])


# ------------------------------------------------------------------------------------------------
# supermask
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("generator", ["philox", "torch"])
def test_supermask_forward_and_gradient_match_the_rule(generator):
    layer = _layer()
    policy = masks.make_policy("supermask", [layer], 0.4, seed=3, generator=generator)
    with torch.no_grad():  # scores init is a constant logit(0.4); spread them so σ differs per weight
        layer.scores.copy_(_x(*layer.scores.shape, seed=2))
    policy.after_step([layer], 5)
    x = _x(6, 7)
    y, ds, dx = _grads(lambda x: policy.linear(layer, x), layer, x)
    # reference (Zhou et al.: M = 1[u < σ(S)], dS = σ'(S) ⊙ W ⊙ dL/dW_eff), u drawn with the same key
    u = uniform_draw(layer.scores.shape, layer.scores.device, generator=generator, seed=3, step=5, layer=0, draw=0)
    s = layer.scores.detach()
    p = torch.sigmoid(s)
    m = (u.double() < p).double()
    w = layer.weight.detach()
    assert torch.allclose(y, x @ (w * m).T)
    g_eff = _manual_linear_grads(w * m, x, y.shape)
    assert torch.allclose(ds, p * (1 - p) * w * g_eff)
    assert torch.allclose(dx, _x(6, 5, seed=7) @ (w * m))
    # a second training forward in the same step draws anew (draw 1), the next step again
    m1 = policy.effective_weight(layer).detach() != 0
    assert not torch.equal(m1, (w * m) != 0)


@pytest.mark.parametrize("generator", ["philox", "torch"])
def test_supermask_dynamic_scaling_gradient_as_their_graph(generator):
    layer = _layer(density=0.5)
    policy = masks.make_policy("supermask", [layer], 0.5, dynamic_scaling=True, generator=generator)
    with torch.no_grad():
        layer.scores.copy_(_x(*layer.scores.shape, seed=4))
    x = _x(3, 7)
    y, ds, _ = _grads(lambda x: policy.linear(layer, x), layer, x)
    # their TF graph: mask = sample + σ(S) - sg(σ(S)); multiplier = n / sum(mask); W_eff = multiplier·W·mask
    s = layer.scores.detach().clone().requires_grad_(True)
    u = uniform_draw(s.shape, s.device, generator=generator, seed=0, step=0, layer=0, draw=0).double()
    sig = torch.sigmoid(s)
    mask = (u < sig).double() + sig - sig.detach()
    w_eff = (s.numel() / mask.sum()) * layer.weight * mask
    y_ref = x @ w_eff.T
    (y_ref * _x(*y_ref.shape, seed=7)).sum().backward()
    assert torch.allclose(y, y_ref.detach()) and torch.allclose(ds, s.grad)


def test_supermask_draws_are_keyed_and_philox_is_rng():
    shape = (300, 11)
    a = uniform_draw(shape, torch.device("cpu"), generator="torch", seed=1, step=2, layer=3, draw=0)
    assert torch.equal(a, uniform_draw(shape, torch.device("cpu"), generator="torch", seed=1, step=2, layer=3, draw=0))
    for other in ({"seed": 2}, {"step": 3}, {"layer": 4}, {"draw": 1}):
        key = {"seed": 1, "step": 2, "layer": 3, "draw": 0, **other}
        assert not torch.equal(a, uniform_draw(shape, torch.device("cpu"), generator="torch", **key))
    # philox: exactly maskprune.rng's Philox words (key (seed, step), counter (i, layer, stream 1 + draw)), which
    # every device computes bit for bit; torch's generator differs between CPU and CUDA, so across devices the
    # tests compare statistics (below), not bits
    p = uniform_draw(shape, torch.device("cpu"), generator="philox", seed=1, step=2, layer=3, draw=1)
    x0, = rng.random_words(0, math.prod(shape), seed=1 | (2 << 32), layer=3, stream=SUPERMASK_STREAM + 1, words=1)
    assert torch.equal(p, ((x0 >> 8).to(torch.float32) * 2.0 ** -24).reshape(shape))


def test_supermask_default_generator_is_philox_and_old_torch_runs_resume_with_torch():
    """"philox" is the default; a state saved with "torch" (the default until 2026-12-06) turns a policy made
    without the option back to "torch", so the resumed run draws as it did; an explicit option must match."""
    layer = _layer()
    policy = masks.make_policy("supermask", [layer], 0.4, seed=3)
    assert policy.generator == "philox" and policy.options["generator"] == "philox"
    old = masks.make_policy("supermask", [_layer()], 0.4, seed=3, generator="torch")
    old.after_step(old.layers, 7)
    policy.load_state_dict(old.state_dict())
    assert policy.generator == "torch" and policy.step == 7
    policy.after_step([layer], 8)
    torch_u = uniform_draw(layer.scores.shape, layer.scores.device, generator="torch", seed=3, step=8, layer=0, draw=0)
    w = layer.weight.detach()
    expected = w * (torch_u.to(layer.scores.dtype) < torch.sigmoid(layer.scores.detach())).to(w.dtype)
    assert torch.equal(policy.effective_weight(layer).detach(), expected)
    explicit = masks.make_policy("supermask", [_layer()], 0.4, seed=3, generator="philox")
    with pytest.raises(ValueError, match="options="):
        explicit.load_state_dict(old.state_dict())
    again = masks.make_policy("supermask", [_layer()], 0.4, seed=3)  # a philox state resumes as philox
    again.load_state_dict(masks.make_policy("supermask", [_layer()], 0.4, seed=3).state_dict())
    assert again.generator == "philox"


@pytest.mark.parametrize("generator", ["torch", "philox"])
def test_supermask_mask_statistics(generator):
    layer = _layer(out_f=200, in_f=100)
    policy = masks.make_policy("supermask", [layer], 0.3, generator=generator)
    assert torch.allclose(layer.scores.detach(), torch.full_like(layer.scores, math.log(0.3 / 0.7)))
    with torch.no_grad():
        layer.scores.copy_(_x(200, 100, seed=5) * 2)
    expected = torch.sigmoid(layer.scores.detach()).mean().item()
    fractions = []
    for step in range(1, 6):
        policy.after_step([layer], step)
        fractions.append((policy.effective_weight(layer).detach() != 0).double().mean().item())
    assert abs(sum(fractions) / 5 - expected) < 0.01  # 100k Bernoulli draws: sd 0.0007
    assert len(set(fractions)) == 5  # a new mask every step
    # evaluation: the fixed-key sample (the same every time) or the expected mask 1[σ(S) > 0.5]
    layer.eval()
    m1, m2 = policy.mask(layer), (policy.effective_weight(layer).detach() != 0)
    assert torch.equal(m1, m2) and torch.equal(m1, policy.mask(layer))
    u = uniform_draw(layer.scores.shape, layer.scores.device, generator=generator, seed=0, step=EVAL_STEP, layer=0,
                     draw=0)
    assert torch.equal(m1, u.double() < torch.sigmoid(layer.scores.detach()))
    expected_policy = masks.make_policy("supermask", [layer], 0.3, eval_mask="expected", score_init=0.0)
    with torch.no_grad():
        layer.scores.copy_(_x(200, 100, seed=5))
    assert torch.equal(expected_policy.mask(layer), torch.sigmoid(layer.scores.detach()) > 0.5)


# ------------------------------------------------------------------------------------------------
# biprop
# ------------------------------------------------------------------------------------------------

class _TheirQuantnet(torch.autograd.Function):
    """chrundle/biprop GetQuantnet_binary, with maskprune's threshold (ties kept) and α over the kept count."""

    @staticmethod
    def forward(ctx, clamped_scores, weights, t):
        out = (clamped_scores >= t).double()
        abs_wgt = weights.abs()
        alpha = (abs_wgt * out).sum() / out.sum()
        ctx.save_for_backward(abs_wgt)
        return alpha * out

    @staticmethod
    def backward(ctx, g):
        abs_wgt, = ctx.saved_tensors
        return g * abs_wgt, None, None


def _biprop_reference(layer, x, conv=False):
    s = layer.scores.detach().clone().requires_grad_(True)
    t = reference.threshold(s, 0.4, True)
    quantnet = _TheirQuantnet.apply(s.abs(), layer.weight.detach(), t)
    w = torch.sign(layer.weight.detach()) * quantnet
    y = F.conv2d(x, w, None, 1, 1) if conv else x @ w.T
    (y * _x(*y.shape, seed=7)).sum().backward()
    return y.detach(), s.grad


@pytest.mark.parametrize("weight_init", ["kaiming_normal", "signed_constant"])
def test_biprop_linear_matches_their_function(weight_init):
    layer = _layer(weight_init=weight_init)
    policy = masks.make_policy("biprop", [layer], 0.4)
    x = _x(6, 7)
    y, ds, _ = _grads(lambda x: policy.linear(layer, x), layer, x)
    y_ref, ds_ref = _biprop_reference(layer, x)
    assert torch.allclose(y, y_ref) and torch.allclose(ds, ds_ref)
    # effective_weight is α sign(W) ⊙ M with the same gradient
    y2, ds2, _ = _grads(lambda x: x @ policy.effective_weight(layer).T, layer, x)
    assert torch.allclose(y2, y_ref) and torch.allclose(ds2, ds_ref)


def test_biprop_conv_matches_their_function():
    layer = _conv()
    policy = masks.make_policy("biprop", [layer], 0.4)
    x = _x(2, 3, 6, 6)
    y, ds, _ = _grads(lambda x: policy.conv2d(layer, x), layer, x)
    y_ref, ds_ref = _biprop_reference(layer, x, conv=True)
    assert torch.allclose(y, y_ref) and torch.allclose(ds, ds_ref)


# ------------------------------------------------------------------------------------------------
# signed
# ------------------------------------------------------------------------------------------------

def test_signed_matches_their_ternary_ste():
    layer = _layer(bias=True)
    policy = masks.make_policy("signed", [layer], 0.4)
    x = _x(6, 7)
    y, ds, dx = _grads(lambda x: policy.linear(layer, x), layer, x)
    # kosnil/signed_supermasks: mask = sg(ternary) + S - sg(S), W_eff = W ⊙ mask
    s = layer.scores.detach().clone().requires_grad_(True)
    t = reference.threshold(s, 0.4, True)
    ternary = torch.sign(s.detach()) * (s.detach().abs() >= t)
    mask = ternary + s - s.detach()
    y_ref = x @ (layer.weight * mask).T + layer.bias
    (y_ref * _x(*y_ref.shape, seed=7)).sum().backward()
    assert torch.allclose(y, y_ref.detach()) and torch.allclose(ds, s.grad)
    m = policy.mask(layer)
    assert m.dtype == torch.int8 and set(m.unique().tolist()) <= {-1, 0, 1}
    assert int((m != 0).sum()) == reference.n_keep_for(0.4, 35) and (m == -1).any()
    y2, ds2, _ = _grads(lambda x: x @ policy.effective_weight(layer).T + layer.bias, layer, x)
    assert torch.allclose(y2, y_ref.detach()) and torch.allclose(ds2, s.grad)


# ------------------------------------------------------------------------------------------------
# threshold (Piggyback) and gem_miner
# ------------------------------------------------------------------------------------------------

def _ste_identity_reference(layer, x, keep_fn):
    """M = keep_fn(S) forward, dS = W ⊙ dL/dW_eff (their straight-through identity)."""
    s = layer.scores.detach().clone().requires_grad_(True)
    m = keep_fn(s.detach()).double() + s - s.detach()
    y = x @ (layer.weight * m).T
    (y * _x(*y.shape, seed=7)).sum().backward()
    return y.detach(), s.grad


def test_threshold_policy_is_strict_and_straight_through():
    layer = _layer()
    policy = masks.make_policy("threshold", [layer], 0.4, tau=0.05)
    assert torch.all(layer.scores == 0.01)  # Piggyback's init
    with torch.no_grad():
        layer.scores.copy_(_x(5, 7, seed=3) * 0.1)
        layer.scores[0, 0] = 0.05  # exactly τ: not kept (M = 1[S > τ])
    x = _x(6, 7)
    y, ds, _ = _grads(lambda x: policy.linear(layer, x), layer, x)
    y_ref, ds_ref = _ste_identity_reference(layer, x, lambda s: s > 0.05)
    assert torch.allclose(y, y_ref) and torch.allclose(ds, ds_ref)
    assert not policy.mask(layer)[0, 0] and torch.equal(policy.mask(layer), layer.scores.detach() > 0.05)


def test_gem_miner_l2_gradient_equals_the_loss_term():
    """before_step adds 2λp to every layer's score gradient in place: the gradient of the loss term λ Σ‖p‖², so
    the optimizer step equals the one with the penalty in the loss."""
    layers = [_layer(seed=0), _layer(out_f=9, in_f=5, seed=1)]
    policy = masks.make_policy("gem_miner", layers, 0.25, l2=1e-3)
    x0, x1 = _x(6, 7), _x(6, 5)

    def data_loss():
        return policy.linear(layers[0], x0).square().sum() + policy.linear(layers[1], x1).square().sum()

    data_loss().backward()
    grads = [l.scores.grad.clone() for l in layers]
    storage = [l.scores.grad.data_ptr() for l in layers]
    policy.before_step(layers)
    for layer, g, ptr in zip(layers, grads, storage):
        assert layer.scores.grad.data_ptr() == ptr  # in place
        assert torch.allclose(layer.scores.grad, g + 2e-3 * layer.scores.detach(), rtol=1e-6, atol=0)
    for layer in layers:  # the same gradient from the loss term, through autograd
        layer.scores.grad = None
    (data_loss() + 1e-3 * sum((l.scores ** 2).sum() for l in layers)).backward()
    reference = [l.scores.grad for l in layers]
    for layer in layers:
        layer.scores.grad = None
    data_loss().backward()
    masks.before_step_hooks(nn.Sequential())  # a model without masked layers: nothing to do
    policy.before_step(layers)
    for layer, ref in zip(layers, reference):
        assert torch.allclose(layer.scores.grad, ref, rtol=1e-5, atol=1e-7)
    layers[0].scores.grad = None  # a layer without a gradient is skipped, the others still get the term
    before = layers[1].scores.grad.clone()
    policy.before_step(layers)
    assert layers[0].scores.grad is None and torch.allclose(layers[1].scores.grad, before + 2e-3 * layers[1].scores)
    assert policy.regularization(layers) is None  # no loss term: the L2 is a gradient hook
    off = masks.make_policy("gem_miner", [_layer(seed=2)], 0.25, l2=0.0)
    data_loss_off = off.linear(off.layers[0], x0).sum()
    data_loss_off.backward()
    g = off.layers[0].scores.grad.clone()
    off.before_step(off.layers)
    assert torch.equal(off.layers[0].scores.grad, g)


def test_gem_miner_rule_hooks_and_freezing():
    layers = [_layer(seed=0), _layer(out_f=9, in_f=5, seed=1)]
    policy = masks.make_policy("gem_miner", layers, 0.25, epochs=9, freeze_every=2, l2=1e-3)
    for layer in layers:  # U[0, 1] init
        assert 0 <= float(layer.scores.detach().min()) and float(layer.scores.detach().max()) <= 1
    x = _x(6, 7)
    y, ds, _ = _grads(lambda x: policy.linear(layers[0], x), layers[0], x)
    y_ref, ds_ref = _ste_identity_reference(layers[0], x, lambda s: s > 0.5)
    assert torch.allclose(y, y_ref) and torch.allclose(ds, ds_ref)
    with torch.no_grad():
        layers[0].scores[0, 0], layers[0].scores[0, 1] = 1.7, -0.3
    policy.after_step(layers, 1)
    assert layers[0].scores[0, 0].item() == 1.0 and layers[0].scores[0, 1].item() == 0.0
    # N = floor((9 - 1) / 2) = 4 freezings, after epochs 2, 4, 6, 8 (none after the last epoch)
    assert policy.n_freezings == 4 and math.isclose((1 - policy.freeze_rate) ** 4, 0.25)
    total = sum(l.scores.numel() for l in layers)
    active = total
    for epoch in range(1, 10):
        policy.on_epoch_end(layers, epoch)
        if epoch % 2 == 0 and epoch < 9:
            active -= math.ceil(policy.freeze_rate * active)
        assert sum(int(f.sum()) for f in policy.flags) == active, epoch
    assert policy.freezings == 4 and active <= 0.25 * total + 1
    for layer, flag in zip(layers, policy.flags):  # frozen scores are 0, so the scores alone give the mask
        assert torch.all(layer.scores[~flag] == 0)
        assert torch.equal(policy.mask(layer), layer.scores.detach() > 0.5)
    masks_before = [policy.mask(l).clone() for l in layers]
    policy.finalize(layers)
    for layer, m in zip(layers, masks_before):
        assert torch.equal(layer.scores.detach(), m.double()) and torch.equal(policy.mask(layer), m)


def test_gem_miner_finetuning_step_keeps_the_subnetwork():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = models.create("lenet300", num_classes=10, in_shape=(1, 28, 28), bias=False)
    maskprune.convert(model, 0.5, weight_init="signed_constant")
    layers = [l for _, l in masked_layers(model)]
    masks.attach(model, masks.make_policy("gem_miner", layers, 0.5))
    dense = masks.subnetwork_for_finetuning(model)
    zero = [m.weight.detach() == 0 for m in dense.modules() if isinstance(m, nn.Linear)]
    opt = torch.optim.SGD([p for p in dense.parameters() if p.requires_grad], lr=0.1)
    F.cross_entropy(dense(_x(4, 1, 28, 28).float()), torch.tensor([1, 2, 3, 4])).backward()
    opt.step()
    for m, z in zip([m for m in dense.modules() if isinstance(m, nn.Linear)], zero):
        assert torch.all(m.weight[z] == 0) and m.weight.requires_grad


# ------------------------------------------------------------------------------------------------
# iterand
# ------------------------------------------------------------------------------------------------

def test_iterand_redraw_follows_their_bernoulli_rule():
    layer = _layer(out_f=40, in_f=30, density=0.3, weight_init="kaiming_uniform")
    policy = masks.make_policy("iterand", [layer], 0.3, period=4, prob=0.5, seed=9)
    w0 = layer.weight.detach().clone()
    keep = policy.mask(layer).clone()
    for step in (1, 2, 3):
        policy.after_step([layer], step)
    assert torch.equal(layer.weight, w0)
    policy.after_step([layer], 4)
    # dchiji-ntt/iterand rerandomize_(mode="bernoulli"): t1 + t2 + t3 with b ~ Bernoulli(λ), rnd a fresh init
    u, rnd = masks.iterand.redraw_values(w0.shape, "kaiming_uniform", policy._inits[0][1], seed=9, step=4, layer=0)
    b = (u < 0.5).double()
    mask = keep.double()
    expected = w0 * mask + w0 * (1 - mask) * (1 - b) + rnd.double() * (1 - mask) * b
    assert torch.equal(layer.weight.detach(), expected)
    changed = (layer.weight != w0).double()
    assert changed[keep].sum() == 0 and 0.4 < changed[~keep].mean() < 0.6
    bound = math.sqrt(3) * math.sqrt(2 / 30)  # kaiming_uniform bound of the layer (no fan scaling)
    assert math.isclose(policy._inits[0][1], bound, rel_tol=1e-6) and float(rnd.abs().max()) <= bound
    assert policy.redraws == 1 and policy.last_redraw_step == 4


def _iterand_run(steps: int, resume_at: int | None):
    """Mask training with IteRand on random data; with resume_at, the model, optimizer and policy state are
    saved after that many steps and loaded into a freshly built model, which continues."""
    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(12, 16, bias=False), nn.ReLU(), nn.Linear(16, 3, bias=False))
        maskprune.convert(model, 0.5, weight_init="signed_constant")
        layers = [l for _, l in masked_layers(model)]
        masks.attach(model, masks.make_policy("iterand", layers, 0.5, period=3, prob=0.3, seed=4))
        opt = torch.optim.SGD([l.scores for l in layers], lr=0.5, momentum=0.9)
        return model, opt

    model, opt = build()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 12, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(steps)]
    for step in range(1, steps + 1):
        x, y = data[step - 1]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        masks.step_hooks(model, step)
        if step == resume_at:
            saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(),
                                   "policy": masks.policy_state(model)})
            model, opt = build()
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["opt"])
            masks.load_policy_state(model, saved["policy"])
    return model, masks.policy_state(model)


def test_iterand_resume_redraws_as_uninterrupted():
    full, state_full = _iterand_run(10, None)
    resumed, state_resumed = _iterand_run(10, 4)
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    assert state_full == state_resumed and state_full[0]["redraws"] == 3
    fresh, _ = _iterand_run(0, None)  # the redraws did change weights
    assert not torch.equal(fresh.state_dict()["1.weight"], full.state_dict()["1.weight"])


def test_iterand_needs_an_init_for_pretrained_weights():
    layer = MaskedLinear(4, 3, weight_init=None)
    with pytest.raises(ValueError, match="option init"):
        masks.make_policy("iterand", [layer], 0.5)
    policy = masks.make_policy("iterand", [layer], 0.5, init="kaiming_normal", base="signed")
    assert policy.base.name == "signed"


# ------------------------------------------------------------------------------------------------
# make_policy, options, hooks, attach
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, options, message", [
    ("supermask", {"seed": -1}, r"option seed must be an int in \[0, 4294967296\), got -1"),
    ("supermask", {"eval_mask": "mean"}, "option eval_mask must be one of sample, expected, got 'mean'"),
    ("supermask", {"dynamic_scaling": 1}, "option dynamic_scaling must be True or False, got 1"),
    ("supermask", {"generator": "numpy"}, "option generator must be one of philox, torch"),
    ("supermask", {"score_init": float("nan")}, r"option score_init must be a number in \[-30, 30\] or None"),
    ("iterand", {"period": 0}, "option period must be an int >= 1, got 0"),
    ("iterand", {"prob": 1.5}, r"option prob must be a number in \[0, 1\], got 1.5"),
    ("iterand", {"base": "supermask"}, "option base must be one of layerwise, global, biprop, signed"),
    ("iterand", {"rate": "all"}, r"option rate must be a number in \[0, 1\]"),
    ("gem_miner", {"freeze_every": 2.5}, "option freeze_every must be an int >= 1, got 2.5"),
    ("gem_miner", {"epochs": 0}, "option epochs must be an int >= 1 or None, got 0"),
    ("gem_miner", {"l2": -1e-3}, r"option l2 must be a number in \[0, 1\]"),
    ("gem_miner", {"score_init": "normal"}, "option score_init must be one of uniform, half, keep"),
    ("threshold", {"tau": float("inf")}, r"option tau must be a number in \[-1000, 1000\]"),
    ("biprop", {"alpha": 1.0}, r"unknown option\(s\) \['alpha'\]; its options: none"),
    ("signed", {"k": 0.5}, r"unknown option\(s\) \['k'\]"),
    ("layerwise", {"seed": 1}, "takes no options"),
])
def test_bad_options_name_the_option_and_range(name, options, message):
    layer = _layer()
    with pytest.raises(ValueError, match=message):
        masks.make_policy(name, [layer], 0.5, **options)


def test_bad_name_and_density():
    with pytest.raises(ValueError, match="policy must be one of layerwise, global, supermask, biprop, signed, "
                                         "iterand, gem_miner, threshold, got 'popup'"):
        masks.make_policy("popup", [_layer()], 0.5)
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\], got 1.5"):
        masks.make_policy("biprop", [_layer()], 1.5)
    with pytest.raises(ValueError, match="needs at least one masked layer"):
        masks.make_policy("signed", [], 0.5)
    policy = masks.make_policy("gem_miner", [_layer()], 0.5)
    with pytest.raises(ValueError, match="was not made for this layer"):
        policy.mask(_layer(seed=3))
    policy = masks.make_policy("signed", [_layer()], 0.5)
    with pytest.raises(ValueError, match="state holds the state of mask policy 'signed', not of 'biprop'"):
        masks.make_policy("biprop", [_layer()], 0.5).load_state_dict(policy.state_dict())


def test_option_strings_round_trip_and_check():
    opts = masks.parse_options("supermask", "seed=3, eval_mask=expected,dynamic_scaling=True,score_init=None")
    assert opts == {"seed": 3, "eval_mask": "expected", "dynamic_scaling": True, "score_init": None}
    assert masks.parse_options("supermask", masks.format_options(opts)) == opts
    assert masks.parse_options("iterand", "") == {}
    with pytest.raises(ValueError, match="option prob must be"):
        masks.parse_options("iterand", "prob=2")
    with pytest.raises(ValueError, match="'period' is not key=value"):
        masks.parse_options("iterand", "period")


def test_layerwise_and_global_are_the_existing_policies():
    layers = [_layer(), _layer(seed=1)]
    assert masks.make_policy("layerwise", layers, 0.4) is masks.LAYERWISE
    g = masks.make_policy("global", layers, 0.4)
    assert isinstance(g, masks.GlobalTopK) and g.density == 0.4
    # what convert() accepts: layerwise and global now, every policy once its integration (issue 17) lands
    assert masks.POLICIES in (("layerwise", "global"), masks.ALL_POLICIES)
    x = _x(3, 7)
    assert torch.allclose(masks.LAYERWISE.linear(layers[0], x),
                          x @ masks.LAYERWISE.effective_weight(layers[0]).T)


def test_attach_routes_fused_and_parametrized_tensors_and_hooks_reach_them():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 3, bias=False),
                          nn.Conv1d(1, 1, 2))
    model = nn.ModuleDict({"body": nn.Sequential(*list(model)[:3]), "extra": list(model)[3]})
    maskprune.convert(model, 0.5, weight_init="signed_constant")
    tensors = maskprune.nn.masked_tensors(model)
    policy = masks.make_policy("signed", [t.masker for t in tensors], 0.5)
    masks.attach(model, policy)
    x = torch.randn(2, 1, 6, 6)
    conv, lin = model["body"][0], model["body"][2]
    h = F.conv2d(x, policy.effective_weight(conv), conv.bias)
    expected = F.linear(h.flatten(1), policy.effective_weight(lin))
    assert torch.allclose(model["body"](x), expected, atol=1e-6)
    extra = model["extra"]
    wm = next(t.masker for t in tensors if isinstance(t.masker, WeightMask))
    assert torch.equal(extra.weight, policy.effective_weight(wm, extra.parametrizations.weight.original))
    assert [len(layers) for _, layers in masks.policy_groups(model)] == [3]
    dense = maskprune.to_dense(model)  # the routed layers deep-copy
    assert isinstance(dense["body"][2], nn.Linear)


# ------------------------------------------------------------------------------------------------
# A short MNIST run per policy: lenet300, 2000 training images, 2 epochs, batch 64, one thread
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mnist():
    try:
        splits = data.load("mnist", download=False).normalize()
    except data.DatasetUnavailable as err:
        pytest.skip(str(err))
    return splits.train_x[:2000], splits.train_y[:2000], splits.val_x[:2000], splits.val_y[:2000]


# (policy, options, optimizer, lr, floor). Accuracy reached on the 2000 validation images (CPU, 2026-12-05):
# layerwise 0.858, supermask 0.857, biprop 0.858, signed 0.868, iterand 0.868, gem_miner 0.874, threshold 0.724;
# chance is 0.10. Floors leave room for other thread counts and kernels.
RUNS = [
    ("layerwise", {}, "sgd", 0.1, 0.75),
    ("supermask", {}, "sgd", 100.0, 0.70),  # Zhou et al. train masks with SGD at lr 100
    ("biprop", {}, "sgd", 0.1, 0.75),
    ("signed", {}, "sgd", 0.1, 0.75),
    ("iterand", {"period": 10}, "sgd", 0.1, 0.75),
    ("gem_miner", {"epochs": 2, "freeze_every": 1}, "adam", 0.01, 0.75),
    ("threshold", {}, "adam", 1e-3, 0.55),
]


@pytest.mark.parametrize("name, options, optimizer, lr, floor", RUNS, ids=[r[0] for r in RUNS])
def test_short_mnist_run_learns(mnist, name, options, optimizer, lr, floor):
    torch.set_num_threads(1)
    xtr, ytr, xva, yva = mnist
    torch.manual_seed(0)
    model = models.create("lenet300", num_classes=10, in_shape=(1, 28, 28), bias=False)
    maskprune.convert(model, 0.5, weight_init="signed_constant", scale_fan=True)
    layers = [l for _, l in masked_layers(model)]
    policy = masks.make_policy(name, layers, 0.5, **options)
    masks.attach(model, policy)
    params = [l.scores for l in layers]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9) if optimizer == "sgd" else torch.optim.Adam(params, lr=lr)
    step = 0
    for epoch in range(2):
        order = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(epoch))
        for start in range(0, len(xtr), 64):
            idx = order[start:start + 64]
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            penalty = masks.policy_penalty(model)
            if penalty is not None:
                loss = loss + penalty
            opt.zero_grad()
            loss.backward()
            masks.before_step_hooks(model)
            opt.step()
            step += 1
            masks.step_hooks(model, step)
        masks.epoch_hooks(model, epoch + 1)
    masks.finalize_policies(model)
    model.eval()
    with torch.no_grad():
        acc = (model(xva).argmax(1) == yva).float().mean().item()
    assert acc > floor, f"{name}: accuracy {acc:.3f} <= floor {floor}"
    if name in ("layerwise", "biprop", "signed", "iterand"):  # top-k: exactly the density
        kept = sum(int((policy.mask(l) != 0).sum()) for l in layers)
        assert kept == sum(reference.n_keep_for(0.5, l.scores.numel()) for l in layers)
    if name == "iterand":
        assert policy.redraws == step // 10
    if name == "gem_miner":
        assert sum(int(policy.mask(l).sum()) for l in layers) <= 0.5 * sum(l.scores.numel() for l in layers) + 1


@pytest.mark.parametrize("name", ["layerwise", "global", "supermask", "biprop", "signed", "iterand", "gem_miner",
                                  "threshold"])
def test_linear_and_conv2d_agree_with_effective_weight(name):
    """policy.linear / policy.conv2d (what the fused layers run) equal F.linear / F.conv2d over
    policy.effective_weight (what parametrized tensors and to_dense use), forward and dS."""
    lin, conv = _layer(bias=True), _conv()
    for layer in (lin, conv):
        policy = masks.make_policy(name, [layer], 0.4)
        if name == "supermask":
            with torch.no_grad():
                layer.scores.copy_(_x(*layer.scores.shape, seed=8))
            layer.eval()  # one fixed mask per call (training draws a new one per forward)
        if name == "threshold":
            with torch.no_grad():
                layer.scores.copy_(_x(*layer.scores.shape, seed=8) * 0.01)
        if layer is lin:
            x = _x(4, 7)
            fused = lambda x: policy.linear(layer, x)
            plain = lambda x: F.linear(x, policy.effective_weight(layer), layer.bias)
        else:
            x = _x(2, 3, 5, 5)
            fused = lambda x: policy.conv2d(layer, x)
            plain = lambda x: F.conv2d(x, policy.effective_weight(layer), layer.bias, padding=1)
        y1, ds1, dx1 = _grads(fused, layer, x)
        y2, ds2, dx2 = _grads(plain, layer, x)
        assert torch.allclose(y1, y2) and torch.allclose(ds1, ds2) and torch.allclose(dx1, dx2), (name, type(layer))
        assert ds1.abs().sum() > 0


def test_masked_weight_is_the_evaluation_weight_and_draws_nothing():
    layer = _layer(out_f=20, in_f=10)
    policy = masks.make_policy("supermask", [layer], 0.5, dynamic_scaling=True)
    with torch.no_grad():
        layer.scores.copy_(_x(20, 10, seed=9))
    w1 = policy.masked_weight(layer)  # in training mode too: the fixed-key evaluation mask
    assert policy._draws == {} and not w1.requires_grad
    layer.eval()
    assert torch.equal(w1, policy.effective_weight(layer).detach())
    m = policy.mask(layer)
    assert torch.allclose(w1, layer.weight * m * (m.numel() / m.sum()))
    for name in ("biprop", "signed", "gem_miner", "threshold", "iterand"):
        other = _layer(out_f=20, in_f=10)
        p = masks.make_policy(name, [other], 0.5)
        assert torch.equal(p.masked_weight(other), p.effective_weight(other).detach())


@pytest.mark.parametrize("name", ["supermask", "gem_miner", "iterand"])
def test_a_deep_copy_keeps_its_own_layer_keys(name):
    """copy.deepcopy (to_dense) copies the policy with its layers: the copy's layers keep their numbers."""
    layers = [_layer(seed=0), _layer(out_f=9, in_f=5, seed=1)]
    policy = masks.make_policy(name, layers, 0.5)
    twin_policy, twin_layers = copy.deepcopy((policy, layers))
    assert [twin_policy.layer_index(l) for l in twin_layers] == [0, 1]
    assert torch.equal(twin_policy.mask(twin_layers[1]), policy.mask(layers[1]))
    with pytest.raises(ValueError, match="was not made for this layer"):
        twin_policy.layer_index(layers[0])


def test_global_warns_once_when_its_first_cut_empties_a_layer():
    """conv4 with kaiming_uniform scores at density 0.1: one threshold over all layers keeps none of the
    6272-fan-in classifier layer (its scores are the smallest), which leaves the network at chance; the
    policy says so once, naming the layer, and stays silent with scores of one scale (score_init="uniform")."""
    import warnings
    torch.manual_seed(0)
    model = models.create("conv4", num_classes=10, in_shape=(1, 28, 28), bias=False)
    maskprune.convert(model, 0.1, policy="global", weight_init="signed_constant", scale_fan=True)
    x = torch.randn(2, 1, 28, 28)
    with pytest.warns(RuntimeWarning, match=r"keeps no weight of layer 4 \(scores \(256, 6272\)\)"):
        model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x)  # once
        uniform = models.create("conv4", num_classes=10, in_shape=(1, 28, 28), bias=False)
        maskprune.convert(uniform, 0.1, policy="global", weight_init="signed_constant", scale_fan=True,
                          score_init="uniform")
        uniform(x)
