"""Tests for maskprune.models: every registered model builds, runs and scales; bad arguments raise clearly."""
import math

import pytest
import torch
import torch.nn as nn

from maskprune import models

MNIST = (1, 28, 28)
CIFAR = (3, 32, 32)
ALL = ["conv2", "conv4", "conv6", "conv8", "lenet300", "mlp", "resnet18", "resnet20"]

# Parameter counts (bias=True, width=1, 10 classes); the CIFAR ones match edge-popup's tables
# (Conv2 4.3M, Conv4 2.4M, Conv6 2.3M, Conv8 5.3M, ResNet-18 11.2M).
PARAM_COUNTS = {
    ("lenet300", MNIST): 266_610, ("lenet300", CIFAR): 953_010,
    ("mlp", MNIST): 1_796_010, ("mlp", CIFAR): 4_084_010,
    ("conv2", MNIST): 3_317_450, ("conv2", CIFAR): 4_301_642,
    ("conv4", MNIST): 1_933_258, ("conv4", CIFAR): 2_425_930,
    ("conv6", MNIST): 1_802_698, ("conv6", CIFAR): 2_262_602,
    ("conv8", MNIST): 4_883_914, ("conv8", CIFAR): 5_278_282,
    ("resnet18", MNIST): 11_163_210, ("resnet18", CIFAR): 11_164_362,
    ("resnet20", MNIST): 270_618, ("resnet20", CIFAR): 270_906,
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are small; one intra-op thread avoids OpenMP oversubscription stalls on busy CI hosts."""
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n_threads)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def linear_sizes(model: nn.Module) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]


def conv_channels(model: nn.Module) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


def test_available_lists_every_model_sorted():
    assert models.available() == ALL


@pytest.mark.parametrize("in_shape", [MNIST, CIFAR], ids=["mnist", "cifar"])
@pytest.mark.parametrize("name", ALL)
def test_builds_and_runs(name, in_shape):
    torch.manual_seed(0)
    model = models.create(name, num_classes=10, in_shape=in_shape)
    out = model(torch.randn(2, *in_shape))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()
    assert n_params(model) == PARAM_COUNTS[name, in_shape]
    # only Linear/Conv2d carry weights, so convert() reaches every one of them
    weighted = {type(m) for m in model.modules() if isinstance(getattr(m, "weight", None), nn.Parameter)}
    assert weighted <= {nn.Linear, nn.Conv2d}


@pytest.mark.parametrize("name", ALL)
def test_num_classes_sets_the_output(name):
    model = models.create(name, num_classes=3, in_shape=(2, 16, 16))
    assert model(torch.randn(2, 2, 16, 16)).shape == (2, 3)


@pytest.mark.parametrize("name", ALL)
def test_bias_false_leaves_no_bias(name):
    model = models.create(name, num_classes=10, in_shape=CIFAR, bias=False)
    assert not [n for n, _ in model.named_parameters() if n.endswith("bias")]
    assert model(torch.randn(2, *CIFAR)).shape == (2, 10)


@pytest.mark.parametrize("name", ["conv2", "conv4", "conv6", "conv8", "lenet300", "mlp"])
def test_bias_true_on_every_weight_layer(name):
    model = models.create(name, num_classes=10, in_shape=MNIST)
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert layers and all(m.bias is not None for m in layers)


def test_lenet300_shape_and_width():
    model = models.create("lenet300", num_classes=10, in_shape=MNIST)
    assert linear_sizes(model) == [(784, 300), (300, 100), (100, 10)]
    wide = models.create("lenet300", num_classes=10, in_shape=MNIST, width=2)
    assert linear_sizes(wide) == [(784, 600), (600, 200), (200, 10)]
    assert n_params(wide) == 784 * 600 + 600 + 600 * 200 + 200 + 200 * 10 + 10
    # any in_shape is flattened
    odd = models.create("lenet300", num_classes=4, in_shape=(2, 5, 7))
    assert linear_sizes(odd)[0] == (70, 300)
    assert odd(torch.randn(3, 2, 5, 7)).shape == (3, 4)


def test_width_rounds_half_up_and_keeps_at_least_one():
    assert [o for _, o in linear_sizes(models.create("lenet300", num_classes=10, in_shape=MNIST, width=0.125))] \
        == [38, 13, 10]  # 37.5 -> 38, 12.5 -> 13
    tiny = models.create("lenet300", num_classes=10, in_shape=MNIST, width=1e-6)
    assert linear_sizes(tiny) == [(784, 1), (1, 1), (1, 10)]


def test_mlp_widths():
    assert linear_sizes(models.create("mlp", num_classes=10, in_shape=MNIST)) == [(784, 1000), (1000, 1000), (1000, 10)]
    for widths in ([50, 40, 30], (50, 40, 30), "50,40,30", " 50, 40 ,30 "):
        model = models.create("mlp", num_classes=5, in_shape=MNIST, widths=widths)
        assert linear_sizes(model) == [(784, 50), (50, 40), (40, 30), (30, 5)]
    half = models.create("mlp", num_classes=5, in_shape=MNIST, widths="50,41", width=0.5)
    assert linear_sizes(half) == [(784, 25), (25, 21), (21, 5)]
    assert half(torch.randn(2, *MNIST)).shape == (2, 5)


@pytest.mark.parametrize("name,stages", [("conv2", [64]), ("conv4", [64, 128]), ("conv6", [64, 128, 256]),
                                         ("conv8", [64, 128, 256, 512])])
def test_conv_net_shapes_and_width(name, stages):
    for in_shape, side in ((MNIST, 28), (CIFAR, 32)):
        model = models.create(name, num_classes=10, in_shape=in_shape)
        assert conv_channels(model) == [c for c in stages for _ in range(2)]
        flat = stages[-1] * (side // 2 ** len(stages)) ** 2
        assert linear_sizes(model) == [(flat, 256), (256, 256), (256, 10)]
    half = models.create(name, num_classes=10, in_shape=CIFAR, width=0.5)
    assert conv_channels(half) == [c // 2 for c in stages for _ in range(2)]
    assert [o for _, o in linear_sizes(half)] == [128, 128, 10]
    assert n_params(half) < n_params(models.create(name, num_classes=10, in_shape=CIFAR))
    assert half(torch.randn(2, *CIFAR)).shape == (2, 10)


def test_conv8_on_mnist_pools_to_one_pixel():
    model = models.create("conv8", num_classes=10, in_shape=MNIST)
    assert model.features(torch.randn(1, *MNIST)).shape == (1, 512, 1, 1)


@pytest.mark.parametrize("name,channels,n_convs", [("resnet18", [64, 128, 256, 512], 1 + 16 + 3),
                                                   ("resnet20", [16, 32, 64], 1 + 18 + 2)])
def test_resnet_structure_and_width(name, channels, n_convs):
    model = models.create(name, num_classes=10, in_shape=CIFAR)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == n_convs
    assert all(m.bias is None for m in convs)
    assert sorted(set(conv_channels(model))) == channels
    assert linear_sizes(model) == [(channels[-1], 10)]
    double = models.create(name, num_classes=10, in_shape=CIFAR, width=2)
    assert sorted(set(conv_channels(double))) == [2 * c for c in channels]
    # conv parameters grow with the square of the width
    conv_params = lambda m: sum(p.numel() for c in m.modules() if isinstance(c, nn.Conv2d) for p in c.parameters())
    ratio = conv_params(double) / conv_params(model)
    assert 3.9 < ratio < 4.0  # the stem's input channels do not scale


@pytest.mark.parametrize("name", ["resnet18", "resnet20"])
def test_resnet_batchnorm_non_affine_by_default(name):
    model = models.create(name, num_classes=10, in_shape=CIFAR)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(not m.affine and m.weight is None and m.bias is None for m in bns)
    assert not [n for n, _ in model.named_parameters() if "bn" in n or "shortcut.1" in n]
    affine = models.create(name, num_classes=10, in_shape=CIFAR, bn_affine=True)
    assert all(m.affine for m in affine.modules() if isinstance(m, nn.BatchNorm2d))
    n_bn = sum(m.num_features for m in bns)
    assert n_params(affine) == n_params(model) + 2 * n_bn


def test_resnet_eval_mode_runs_on_one_image():
    model = models.create("resnet20", num_classes=10, in_shape=CIFAR).eval()
    assert model(torch.randn(1, *CIFAR)).shape == (1, 10)


def test_every_builder_has_a_docstring():
    assert models.__doc__ and "register" in models.__doc__
    for name in models.available():
        doc = models._REGISTRY[name].__doc__
        assert doc and len(doc.strip().splitlines()) == 1, name


def test_register_adds_a_buildable_model():
    @models.register("_tiny_test_model")
    def tiny(*, num_classes, in_shape, width, bias, depth: int = 1):
        """A test model."""
        return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(in_shape), num_classes, bias=bias))

    try:
        assert "_tiny_test_model" in models.available()
        model = models.create("_tiny_test_model", num_classes=2, in_shape=(1, 2, 2), depth=2)
        assert model(torch.randn(1, 1, 2, 2)).shape == (1, 2)
        with pytest.raises(ValueError, match="name '_tiny_test_model' is already registered"):
            models.register("_tiny_test_model")(tiny)
    finally:
        del models._REGISTRY["_tiny_test_model"]


# ---------------------------------------------------------------------------------------------
# bad arguments


def test_unknown_name_lists_available():
    with pytest.raises(ValueError, match=r"name 'lenet5' is not a registered model; available: conv2, .*lenet300"):
        models.create("lenet5", num_classes=10, in_shape=MNIST)


@pytest.mark.parametrize("width", [0, -1, 0.0, float("nan"), float("inf"), "2", None, True])
def test_bad_width(width):
    with pytest.raises(ValueError, match="width must be a finite number > 0"):
        models.create("lenet300", num_classes=10, in_shape=MNIST, width=width)


@pytest.mark.parametrize("num_classes", [0, -3, 2.0, None, True])
def test_bad_num_classes(num_classes):
    with pytest.raises(ValueError, match="num_classes must be an int >= 1"):
        models.create("lenet300", num_classes=num_classes, in_shape=MNIST)


@pytest.mark.parametrize("in_shape", [(28, 28), (1, 28, 28, 1), (0, 28, 28), (1, -1, 28), (1, 28.0, 28),
                                      "1x28x28", 784])
def test_bad_in_shape(in_shape):
    with pytest.raises(ValueError, match=r"in_shape must be \(C, H, W\), three ints >= 1"):
        models.create("lenet300", num_classes=10, in_shape=in_shape)


def test_in_shape_as_list_or_size_is_accepted():
    for in_shape in ([1, 28, 28], torch.Size(MNIST)):
        assert models.create("conv2", num_classes=10, in_shape=in_shape)(torch.randn(2, *MNIST)).shape == (2, 10)


@pytest.mark.parametrize("name,min_hw,bad", [("conv2", 2, (3, 1, 8)), ("conv4", 4, (3, 3, 32)),
                                             ("conv6", 8, (3, 32, 7)), ("conv8", 16, (1, 8, 8)),
                                             ("resnet18", 8, (3, 4, 4)), ("resnet20", 4, (3, 32, 2))])
def test_in_shape_too_small(name, min_hw, bad):
    match = rf"in_shape \({bad[0]}, {bad[1]}, {bad[2]}\) is too small for {name}: it needs H and W >= {min_hw}"
    with pytest.raises(ValueError, match=match):
        models.create(name, num_classes=10, in_shape=bad)
    # the smallest accepted size builds and runs
    ok = (bad[0], min_hw, min_hw)
    assert models.create(name, num_classes=10, in_shape=ok)(torch.randn(2, *ok)).shape == (2, 10)


@pytest.mark.parametrize("widths,match", [
    ([], "widths must be a non-empty"), ((), "widths must be a non-empty"), (None, "widths must be a non-empty"),
    ([100, 0], "widths must hold ints >= 1"), ([100.0], "widths must hold ints >= 1"),
    ([True], "widths must hold ints >= 1"), ("100,-5", "widths must hold ints >= 1"),
    ("", "widths must be comma-separated ints"), ("100,,100", "widths must be comma-separated ints"),
    ("100x100", "widths must be comma-separated ints"),
])
def test_bad_mlp_widths(widths, match):
    with pytest.raises(ValueError, match=match):
        models.create("mlp", num_classes=10, in_shape=MNIST, widths=widths)


def test_bad_bias_and_bn_affine():
    with pytest.raises(ValueError, match="bias must be True or False"):
        models.create("conv2", num_classes=10, in_shape=MNIST, bias=0)
    with pytest.raises(ValueError, match="bn_affine must be True or False"):
        models.create("resnet20", num_classes=10, in_shape=CIFAR, bn_affine="yes")


def test_unknown_kwarg_names_the_builders_options():
    with pytest.raises(TypeError, match=r"model 'lenet300' got unexpected keyword argument\(s\) \['widths'\]; "
                                        r"its own options: none"):
        models.create("lenet300", num_classes=10, in_shape=MNIST, widths=(10,))
    with pytest.raises(TypeError, match=r"\['bn_afine'\]; its own options: bn_affine"):
        models.create("resnet18", num_classes=10, in_shape=CIFAR, bn_afine=True)
