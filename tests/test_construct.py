"""maskprune.construct: Malach et al.'s constructive pruning of a random depth-2l network."""
import math

import pytest
import torch
import torch.nn as nn

from maskprune import MaskedLinear, construct


def small_target(dims=(12, 9, 4), seed=0, scale=0.3):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(dims[:-1], dims[1:]):
        lin = nn.Linear(a, b, bias=False)
        with torch.no_grad():
            lin.weight.uniform_(-scale, scale)
        layers += [lin, nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def build(target, k, seed=0, **kw):
    return construct.construct_subnetwork(construct.target_layers(target), k,
                                          generator=torch.Generator().manual_seed(seed), **kw)


def mean_error(target, k, method, seeds=(0, 1, 2), scale=1.0):
    x = torch.randn(300, target[0].in_features, generator=torch.Generator().manual_seed(123))
    ref = target(x)
    errs = [(build(target, k, s, method=method, scale=scale).module(x) - ref).abs().mean().item() for s in seeds]
    return sum(errs) / len(errs)


@pytest.mark.parametrize("method", construct.METHODS)
def test_structure_masks_binary_weights_frozen_and_unchanged(method):
    target = small_target()
    k = 5
    c = build(target, k, seed=7, method=method)
    dims = [12, 9, 4]
    assert c.widths == [12, 12 * k, 9, 9 * k, 4]
    random = construct.random_network_weights(dims, k, generator=torch.Generator().manual_seed(7))
    masked = [m for m in c.module if isinstance(m, MaskedLinear)]
    assert len(masked) == 4 == len(c.masks) == len(random)
    for layer, mask, w in zip(masked, c.masks, random):
        assert mask.dtype == torch.bool and mask.shape == w.shape
        assert torch.equal(layer.weight, w)                       # the random weights, untouched
        assert torch.equal(layer.mask(), mask)                    # the layer's own top-k mask is the construction
        assert torch.equal(layer.masked_weight(), w * mask)
        assert not layer.weight.requires_grad and not layer.scores.requires_grad
    assert not any(p.requires_grad for p in c.module.parameters())
    assert c.random_weights == sum(w.numel() for w in random) == construct.random_weight_count(dims, k)
    assert c.kept_weights == sum(int(m.sum()) for m in c.masks) < c.random_weights
    assert c.target_weights == 12 * 9 + 9 * 4
    # V is block-diagonal: neuron h keeps at most its edge from input h // k; U only uses neurons that have it
    for v_mask, u_mask in ((c.masks[0], c.masks[1]), (c.masks[2], c.masks[3])):
        rows = torch.arange(v_mask.shape[0])
        allowed = torch.zeros_like(v_mask)
        allowed[rows, rows // k] = True
        assert not (v_mask & ~allowed).any()
        assert torch.equal(v_mask.any(1), u_mask.any(0))
    stats = c.stats()
    assert stats["kept_fraction"] == pytest.approx(c.kept_weights / c.random_weights)
    assert len(stats["weight_error"]) == 2


def test_sign_split_realises_each_weight_exactly():
    """One linear target layer (l = 1): f_sub(x) = Ŵ+ σ(x) − Ŵ− σ(−x), Ŵ± the chosen products, for every x."""
    torch.manual_seed(0)
    target = nn.Linear(7, 3, bias=False)
    k = 6
    c = construct.construct_subnetwork([target], k, method="greedy", generator=torch.Generator().manual_seed(3))
    v_mask, u_mask = c.masks
    v_w, u_w = [m.weight for m in c.module if isinstance(m, MaskedLinear)]
    rows = torch.arange(7 * k)
    v = v_w[rows, rows // k].view(7, k)
    prod = (u_w * u_mask).view(3, 7, k) * v
    w_pos = (prod * (v > 0)).sum(-1)
    w_neg = (prod * (v < 0)).sum(-1)
    x = torch.randn(50, 7)
    expected = torch.relu(x) @ w_pos.t() - torch.relu(-x) @ w_neg.t()
    assert torch.allclose(c.module(x), expected, atol=1e-5)
    errs = c.weight_error[0]
    assert errs["pos_max"] == pytest.approx(float((w_pos - target.weight.detach()).abs().max()), abs=1e-6)
    assert errs["neg_max"] == pytest.approx(float((w_neg - target.weight.detach()).abs().max()), abs=1e-6)


@pytest.mark.parametrize("method", construct.METHODS)
def test_error_shrinks_as_width_grows(method):
    target = small_target()
    errs = [mean_error(target, k, method) for k in (2, 16, 128)]
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 0.2 * errs[0]


def test_greedy_never_worse_per_weight_than_single():
    target = small_target(dims=(10, 8, 3))
    for k in (3, 20):
        single = build(target, k, seed=5, method="single").weight_error
        greedy = build(target, k, seed=5, method="greedy").weight_error
        for s, g in zip(single, greedy):
            for key in ("pos_max", "pos_mean", "neg_max", "neg_mean"):
                assert g[key] <= s[key] + 1e-7


def test_single_error_at_most_weight_magnitude_and_zero_weights_cost_nothing():
    torch.manual_seed(1)
    target = nn.Linear(6, 4, bias=False)
    with torch.no_grad():
        target.weight[0] = 0.0
    c = construct.construct_subnetwork([target], 4, method="single", generator=torch.Generator().manual_seed(0))
    u_mask = c.masks[1].view(4, 6, 4)
    assert not u_mask[0].any()                      # a zero weight keeps no random weight
    assert c.weight_error[0]["pos_max"] <= float(target.weight.detach().abs().max()) + 1e-7


def test_matched_scale_spans_the_target_weights():
    target = small_target(scale=0.05)
    c = build(target, 4, method="single", scale="matched")
    for i, layer in enumerate(construct.target_layers(target)):
        a = math.sqrt(float(layer.weight.detach().abs().max()))
        assert c.weight_error[i]["random_scale"] == pytest.approx(a)
        assert float(c.masks[2 * i].float().sum()) > 0
        v = [m for m in c.module if isinstance(m, MaskedLinear)][2 * i].weight
        assert float(v.abs().max()) <= a
    # matched scale approximates small target weights better than U[-1, 1] at the same width
    assert mean_error(target, 16, "single", scale="matched") < mean_error(target, 16, "single", scale=1.0)


def test_sparse_forward_matches_module():
    target = small_target()
    c = build(target, 8, method="greedy")
    x = torch.randn(40, 12)
    assert torch.allclose(c.forward_sparse(x), c.module(x), atol=1e-5)


def test_same_seed_same_network():
    target = small_target()
    a, b = build(target, 3, seed=11), build(target, 3, seed=11)
    for ma, mb in zip(a.masks, b.masks):
        assert torch.equal(ma, mb)


def test_accepts_mlp_from_models_and_rejects_bad_input():
    from maskprune import models
    mlp = models.create("mlp", num_classes=3, in_shape=(1, 2, 3), widths=[5], bias=False)
    c = construct.construct_subnetwork(mlp, 2, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(c.module(torch.zeros(2, 1, 2, 3)), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="bias"):
        construct.construct_subnetwork([nn.Linear(3, 2)], 2)
    with pytest.raises(ValueError, match="method"):
        construct.construct_subnetwork(small_target(), 2, method="nope")
    with pytest.raises(ValueError, match="width"):
        construct.construct_subnetwork(small_target(), 0)
    with pytest.raises(ValueError, match="scale"):
        construct.construct_subnetwork(small_target(), 2, scale=-1.0)
    with pytest.raises(ValueError, match="inputs"):
        construct.construct_subnetwork([nn.Linear(3, 2, bias=False), nn.Linear(4, 2, bias=False)], 2)
    with pytest.raises(ValueError, match="MLP"):
        construct.target_layers(nn.Sequential(nn.Conv2d(1, 2, 3)))
