"""Model registry: every architecture is a builder registered by name and built with `create`.

Builders are registered with the `@register(name)` decorator and reached only through
`create(name, num_classes=..., in_shape=...)`, so the CLI, config files and scripts build every model
the same way (timm-style). Models are plain torch.nn modules whose only weight layers are nn.Linear
and nn.Conv2d, left at PyTorch's default init: `maskprune.convert(model, density)` later swaps them
for masked layers and chooses the frozen random weights.

Shapes follow edge-popup (Ramanujan et al., CVPR 2020): LeNet-300-100, the VGG-like Conv2/4/6/8, the
CIFAR ResNet-18 and the ResNet-20 of He et al. with non-affine BatchNorm, plus MLPs of any depth.
`width` scales every hidden width and channel count (rounded half up, at least 1); input channels and
the `num_classes` outputs never scale.
"""
from __future__ import annotations

import inspect
import math
import numbers
import operator
from typing import Callable, Sequence

import torch
import torch.nn as nn

__all__ = ["register", "create", "available"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
# Arguments `create` validates and passes to every builder; anything else is builder-specific.
_COMMON_ARGS = ("num_classes", "in_shape", "width", "bias")


def register(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator that registers a model builder under `name` (which must be new)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")

    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"name {name!r} is already registered (by {_REGISTRY[name].__qualname__})")
        _REGISTRY[name] = builder
        return builder

    return decorator


def available() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_REGISTRY)


def create(name: str, *, num_classes: int, in_shape: tuple[int, int, int], width: float = 1.0,
           bias: bool = True, **kwargs) -> nn.Module:
    """Builds the registered model `name` for inputs of shape (C, H, W) = `in_shape`.

    `width` scales hidden widths and channels; `bias` toggles the biases of Linear/Conv layers
    (edge-popup's masked networks use bias=False); `kwargs` are the builder's own options
    (e.g. `widths` for "mlp", `bn_affine` for the ResNets).
    """
    if name not in _REGISTRY:
        raise ValueError(f"name {name!r} is not a registered model; available: {', '.join(available())}")
    builder = _REGISTRY[name]
    extra = [p for p in inspect.signature(builder).parameters if p not in _COMMON_ARGS]
    unknown = sorted(set(kwargs) - set(extra))
    if unknown:
        accepted = ", ".join(extra) if extra else "none"
        raise TypeError(f"model {name!r} got unexpected keyword argument(s) {unknown}; its own options: {accepted}")
    model = builder(num_classes=_check_num_classes(num_classes), in_shape=_check_in_shape(in_shape),
                    width=_check_width(width), bias=_check_bias(bias), **kwargs)
    # What rebuilds this network (maskprune.ticket writes it into a ticket): the JSON-able arguments of create.
    model.maskprune_arch = {"name": name, "num_classes": int(num_classes), "in_shape": list(in_shape),
                            "width": float(width), "bias": bias, **kwargs}
    return model


# ---------------------------------------------------------------------------------------------
# argument checks and helpers


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_num_classes(num_classes) -> int:
    if not _is_int(num_classes) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    return int(num_classes)


def _check_in_shape(in_shape) -> tuple[int, int, int]:
    if (not isinstance(in_shape, (tuple, list, torch.Size)) or len(in_shape) != 3
            or not all(_is_int(d) and d >= 1 for d in in_shape)):
        raise ValueError(f"in_shape must be (C, H, W), three ints >= 1, got {in_shape!r}")
    return tuple(int(d) for d in in_shape)


def _check_width(width) -> float:
    if (not isinstance(width, numbers.Real) or isinstance(width, bool)
            or not math.isfinite(width) or width <= 0):
        raise ValueError(f"width must be a finite number > 0, got {width!r}")
    return float(width)


def _check_bias(bias) -> bool:
    if not isinstance(bias, bool):
        raise ValueError(f"bias must be True or False, got {bias!r}")
    return bias


def _check_min_size(name: str, in_shape: tuple[int, int, int], min_hw: int, why: str) -> None:
    _, h, w = in_shape
    if h < min_hw or w < min_hw:
        raise ValueError(f"in_shape {in_shape} is too small for {name}: it needs H and W >= {min_hw} ({why})")


def _scaled(n: int, width: float) -> int:
    """Hidden size `n` scaled by `width`, rounded half up (not to even) and at least 1."""
    return max(1, math.floor(n * width + 0.5))


def _parse_widths(widths) -> tuple[int, ...]:
    """Hidden widths from a sequence of ints or a comma string such as "1000,1000"."""
    raw = widths
    if isinstance(widths, str):
        try:
            widths = [int(part) for part in widths.split(",")]
        except ValueError:
            raise ValueError(f"widths must be comma-separated ints such as '1000,1000', got {raw!r}") from None
    if not isinstance(widths, Sequence) or len(widths) == 0:
        raise ValueError(f"widths must be a non-empty list/tuple of ints >= 1 or a string like '1000,1000', "
                         f"got {raw!r}")
    if not all(_is_int(n) and n >= 1 for n in widths):
        raise ValueError(f"widths must hold ints >= 1, got {raw!r}")
    return tuple(operator.index(n) for n in widths)


# ---------------------------------------------------------------------------------------------
# architectures


class MLP(nn.Module):
    """Flatten, then Linear+ReLU per hidden width, then a Linear classifier."""

    def __init__(self, in_features: int, hidden: Sequence[int], num_classes: int, bias: bool = True):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        for n_in, n_out in zip((in_features, *hidden), hidden):
            layers += [nn.Linear(n_in, n_out, bias=bias), nn.ReLU(inplace=True)]
        layers.append(nn.Linear(hidden[-1] if hidden else in_features, num_classes, bias=bias))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ConvNet(nn.Module):
    """edge-popup's VGG-like ConvN: pairs of 3x3 convs each followed by a 2x2 max-pool, then an MLP head."""

    def __init__(self, in_shape: tuple[int, int, int], stages: Sequence[int], head: Sequence[int],
                 num_classes: int, bias: bool = True):
        super().__init__()
        c, h, w = in_shape
        layers: list[nn.Module] = []
        for channels in stages:
            layers += [nn.Conv2d(c, channels, 3, padding=1, bias=bias), nn.ReLU(inplace=True),
                       nn.Conv2d(channels, channels, 3, padding=1, bias=bias), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            c, h, w = channels, h // 2, w // 2  # max-pool floors odd sizes (28 -> 14 -> 7 -> 3 -> 1)
        self.features = nn.Sequential(*layers)
        # edge-popup writes the head as 1x1 convs on the flattened features; nn.Linear is the same map.
        self.classifier = MLP(c * h * w, head, num_classes, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity or 1x1 conv-BN (option B) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int, bn_affine: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out, affine=bn_affine)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out, affine=bn_affine)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(c_out, affine=bn_affine))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stem (no max-pool), BasicBlock stages, global average pool, Linear."""

    def __init__(self, in_channels: int, stage_channels: Sequence[int], blocks: Sequence[int], num_classes: int,
                 bias: bool = True, bn_affine: bool = False):
        super().__init__()
        # Convs carry no bias: every one feeds a BatchNorm, which would cancel it.
        self.conv1 = nn.Conv2d(in_channels, stage_channels[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stage_channels[0], affine=bn_affine)
        stages, c_in = [], stage_channels[0]
        for i, (c_out, n_blocks) in enumerate(zip(stage_channels, blocks)):
            stride = 1 if i == 0 else 2
            stage = [BasicBlock(c_in, c_out, stride, bn_affine)]
            stage += [BasicBlock(c_out, c_out, 1, bn_affine) for _ in range(n_blocks - 1)]
            stages.append(nn.Sequential(*stage))
            c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stages(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(out), 1))


# ---------------------------------------------------------------------------------------------
# registered builders


@register("lenet300")
def lenet300(*, num_classes: int, in_shape: tuple[int, int, int], width: float, bias: bool) -> nn.Module:
    """LeNet-300-100: flattened input -> 300 -> 100 -> num_classes with ReLU (784-300-100-10 on MNIST)."""
    return MLP(math.prod(in_shape), [_scaled(n, width) for n in (300, 100)], num_classes, bias=bias)


@register("mlp")
def mlp(*, num_classes: int, in_shape: tuple[int, int, int], width: float, bias: bool,
        widths: Sequence[int] | str = (1000, 1000)) -> nn.Module:
    """MLP with ReLU over the flattened input; `widths` are the hidden sizes (ints or "1000,1000")."""
    return MLP(math.prod(in_shape), [_scaled(n, width) for n in _parse_widths(widths)], num_classes, bias=bias)


def _conv_net(name: str, stages: Sequence[int], num_classes: int, in_shape: tuple[int, int, int], width: float,
              bias: bool) -> nn.Module:
    n_pools = len(stages)
    _check_min_size(name, in_shape, 2 ** n_pools, f"{n_pools} max-pool(s) of 2")
    return ConvNet(in_shape, [_scaled(c, width) for c in stages], [_scaled(n, width) for n in (256, 256)],
                   num_classes, bias=bias)


@register("conv2")
def conv2(*, num_classes: int, in_shape: tuple[int, int, int], width: float, bias: bool) -> nn.Module:
    """Conv2 of edge-popup: 64,64,pool, then 256,256,num_classes; needs H,W >= 2."""
    return _conv_net("conv2", (64,), num_classes, in_shape, width, bias)


@register("conv4")
def conv4(*, num_classes: int, in_shape: tuple[int, int, int], width: float, bias: bool) -> nn.Module:
    """Conv4 of edge-popup: 64,64,pool,128,128,pool, then 256,256,num_classes; needs H,W >= 4."""
    return _conv_net("conv4", (64, 128), num_classes, in_shape, width, bias)


@register("conv6")
def conv6(*, num_classes: int, in_shape: tuple[int, int, int], width: float, bias: bool) -> nn.Module:
    """Conv6 of edge-popup: Conv4 plus 256,256,pool, then 256,256,num_classes; needs H,W >= 8."""
    return _conv_net("conv6", (64, 128, 256), num_classes, in_shape, width, bias)


@register("conv8")
def conv8(*, num_classes: int, in_shape: tuple[int, int, int], width: float, bias: bool) -> nn.Module:
    """Conv8 of edge-popup: Conv6 plus 512,512,pool, then 256,256,num_classes; needs H,W >= 16."""
    return _conv_net("conv8", (64, 128, 256, 512), num_classes, in_shape, width, bias)


def _resnet(name: str, stage_channels: Sequence[int], blocks: Sequence[int], num_classes: int,
            in_shape: tuple[int, int, int], width: float, bias: bool, bn_affine: bool) -> nn.Module:
    if not isinstance(bn_affine, bool):
        raise ValueError(f"bn_affine must be True or False, got {bn_affine!r}")
    n_down = len(stage_channels) - 1
    _check_min_size(name, in_shape, 2 ** n_down, f"{n_down} stride-2 stages")
    return ResNet(in_shape[0], [_scaled(c, width) for c in stage_channels], blocks, num_classes,
                  bias=bias, bn_affine=bn_affine)


@register("resnet18")
def resnet18(*, num_classes: int, in_shape: tuple[int, int, int], width: float, bias: bool,
             bn_affine: bool = False) -> nn.Module:
    """CIFAR ResNet-18: 3x3 stem, BasicBlocks [2,2,2,2] at 64/128/256/512; `bias` applies to the fc only."""
    return _resnet("resnet18", (64, 128, 256, 512), (2, 2, 2, 2), num_classes, in_shape, width, bias, bn_affine)


@register("resnet20")
def resnet20(*, num_classes: int, in_shape: tuple[int, int, int], width: float, bias: bool,
             bn_affine: bool = False) -> nn.Module:
    """ResNet-20 of He et al.: 3 BasicBlocks per stage at 16/32/64, 1x1 conv shortcuts; `bias` is the fc's only."""
    return _resnet("resnet20", (16, 32, 64), (3, 3, 3), num_classes, in_shape, width, bias, bn_affine)
