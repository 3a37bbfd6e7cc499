"""Tests for maskprune.neuron: the neuron-subnetwork mask (top-k over neuron scores, straight-through)."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from maskprune.neuron import NeuronMask, freeze, neuron_stats, neuron_subnetwork_mlp


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n_threads)


def n_keep(density, n):
    return min(max(math.floor(density * n + 0.5), 1), n)


@pytest.mark.parametrize("n, density", [(1, 0.5), (7, 0.01), (10, 0.9), (37, 0.3), (64, 0.5), (100, 1.0)])
def test_keeps_top_k_neurons_by_abs_score(n, density):
    torch.manual_seed(n)
    layer = NeuronMask(n, density)
    mask = layer.mask()
    assert int(mask.sum()) == n_keep(density, n)
    kept, dropped = layer.scores.abs()[mask], layer.scores.abs()[~mask]
    if len(dropped):
        assert kept.min() >= dropped.max()


def test_forward_is_input_times_mask_for_2d_and_4d():
    torch.manual_seed(0)
    layer = NeuronMask(6, 0.5)
    m = layer.mask().float()
    x = torch.randn(5, 6)
    torch.testing.assert_close(layer(x), x * m)
    x4 = torch.randn(3, 6, 4, 2)
    torch.testing.assert_close(layer(x4), x4 * m.view(1, 6, 1, 1))


@pytest.mark.parametrize("shape", [(9, 11), (4, 11, 3, 5)])
def test_straight_through_gradients(shape):
    torch.manual_seed(1)
    layer = NeuronMask(11, 0.3)
    with torch.no_grad():
        layer.scores[0] = -layer.scores.abs().max() - 1.0  # a kept neuron with a negative score
    x = torch.randn(*shape, requires_grad=True)
    g = torch.randn(*shape)
    (layer(x) * g).sum().backward()
    m = layer.mask().float().view((1, -1) + (1,) * (len(shape) - 2))
    torch.testing.assert_close(x.grad, g * m)
    dims = [0] + list(range(2, len(shape)))
    expected = (g * x.detach()).sum(dims) * torch.sign(layer.scores.detach())
    torch.testing.assert_close(layer.scores.grad, expected)
    assert layer.scores.grad.dtype == torch.float32


def test_scores_are_float32_with_float64_input():
    layer = NeuronMask(4, 0.5)
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    layer(x).sum().backward()
    assert layer.scores.grad.dtype == torch.float32 and x.grad.dtype == torch.float64


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_neurons"):
        NeuronMask(0)
    with pytest.raises(ValueError, match="density"):
        NeuronMask(4, 0.0)
    with pytest.raises(ValueError, match="expected input"):
        NeuronMask(4)(torch.randn(2, 5))


def test_mlp_freezes_every_weight_and_only_scores_learn():
    torch.manual_seed(0)
    model = neuron_subnetwork_mlp(20, 32, 3, density=0.25)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["3.scores"]
    assert neuron_stats(model) == {"kept": 8, "total": 32, "fraction": 0.25}
    frozen = {name: p.clone() for name, p in model.named_parameters() if not p.requires_grad}
    x, y = torch.randn(256, 20), torch.randint(0, 3, (256,))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    first = F.cross_entropy(model(x), y).item()
    for _ in range(60):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first  # choosing neurons alone lowers the training loss
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name])
    assert neuron_stats(model)["kept"] == 8


def test_freeze_on_any_module():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), NeuronMask(8), nn.Linear(8, 2))
    freeze(model)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["2.scores"]
    with pytest.raises(ValueError, match="no NeuronMask"):
        neuron_stats(nn.Linear(2, 2))
