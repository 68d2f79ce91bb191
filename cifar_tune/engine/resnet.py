"""CIFAR ResNet: 3x3 stem, basic or bottleneck blocks, any number of stages (registered as ``resnet``)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal

import torch
from torch import nn

from cifar_tune.engine.model_base import (
    _ACTIVATIONS,
    MODELS,
    Activation,
    _check_bool,
    _check_choice,
    _check_int_list,
    _check_prob,
)

# --------------------------------------------------------------------------------------------------
# ResNet
# --------------------------------------------------------------------------------------------------


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1) -> list[nn.Module]:
    # No conv bias: the following BN's shift makes it redundant (torchvision / He et al.).
    return [nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout)]


def _shortcut(cin: int, cout: int, stride: int, kind: str) -> nn.Module:
    """Projection for the residual branch when the shape changes.

    ``conv``: strided 1x1 conv + BN (He et al. option B). ``maxpool`` (seed 004): 2x2 max-pool, then a
    stride-1 1x1 conv + BN only if the width changes, so the skip keeps the strongest activation of each
    window instead of sampling one pixel in four. ``ceil_mode`` matches the 3x3/stride-2 main branch on
    odd sizes.
    """
    if stride == 1 and cin == cout:
        return nn.Identity()
    if kind == "conv":
        return nn.Sequential(*_conv_bn(cin, cout, 1, stride))
    layers: list[nn.Module] = []
    if stride != 1:
        layers.append(nn.MaxPool2d(stride, stride, ceil_mode=True))
    if cin != cout:
        layers += _conv_bn(cin, cout, 1)
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int, *, shortcut: str, activation: str) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(cin, width, 3, stride)
        self.act1 = _ACTIVATIONS[activation]()
        self.conv2, self.bn2 = _conv_bn(width, width, 3)
        self.shortcut = _shortcut(cin, width, stride, shortcut)
        self.act2 = _ACTIVATIONS[activation]()

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        return self.act2(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (stride on the 3x3 conv, as in torchvision)."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int, *, shortcut: str, activation: str) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1, self.bn1 = _conv_bn(cin, width, 1)
        self.conv2, self.bn2 = _conv_bn(width, width, 3, stride)
        self.conv3, self.bn3 = _conv_bn(width, cout, 1)
        self.act1, self.act2, self.act3 = (_ACTIVATIONS[activation]() for _ in range(3))
        self.shortcut = _shortcut(cin, cout, stride, shortcut)

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.act3(out + self.shortcut(x))


def _init_resnet(model: nn.Module, *, zero_init_residual: bool) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if zero_init_residual:
        # Each block starts as the identity, which helps large-batch / high-lr starts (Goyal et al.).
        for m in model.modules():
            if isinstance(m, (BasicBlock, Bottleneck)):
                nn.init.zeros_(m.last_bn().weight)


@MODELS.register()
def resnet(
    num_classes: int,
    in_channels: int,
    image_size: int,
    *,
    widths: list[int] = [64, 128, 256, 512],  # noqa: B006
    blocks: list[int] = [2, 2, 2, 2],  # noqa: B006
    block: Literal["basic", "bottleneck"] = "basic",
    shortcut: Literal["conv", "maxpool"] = "conv",
    activation: Activation = "relu",
    dropout: float = 0.0,
    zero_init_residual: bool = False,
) -> nn.Module:
    """CIFAR ResNet: 3x3/stride-1 stem of ``widths[0]`` channels, one stage per width (stride 1 for the
    first stage, 2 after), global average pool, optional dropout, Linear.

    The defaults are ResNet-18 (11,173,962 parameters for 10 classes). ``widths`` are the block widths;
    bottleneck stages output ``4 * width`` channels.
    """
    ws = _check_int_list("widths", widths, min_len=1)
    ns = _check_int_list("blocks", blocks, min_len=1)
    if len(ws) != len(ns):
        raise ValueError(f"blocks: needs one block count per entry of widths ({len(ws)}); got {len(ns)}")
    block_cls = {"basic": BasicBlock, "bottleneck": Bottleneck}[
        _check_choice("block", block, ("basic", "bottleneck"))
    ]
    kind = _check_choice("shortcut", shortcut, ("conv", "maxpool"))
    act = _check_choice("activation", activation, list(_ACTIVATIONS))
    p = _check_prob("dropout", dropout)
    # Strided stages use ceil division, so the map never reaches 0x0: any depth fits any input size.
    layers: OrderedDict[str, nn.Module] = OrderedDict(
        stem=nn.Sequential(*_conv_bn(in_channels, ws[0], 3), _ACTIVATIONS[act]())
    )
    cin = ws[0]
    for i, (w, n) in enumerate(zip(ws, ns, strict=True)):
        stage = []
        for j in range(n):
            stride = 2 if i > 0 and j == 0 else 1
            stage.append(block_cls(cin, w, stride, shortcut=kind, activation=act))
            cin = w * block_cls.expansion
        layers[f"layer{i + 1}"] = nn.Sequential(*stage)
    layers["pool"] = nn.AdaptiveAvgPool2d(1)
    layers["flatten"] = nn.Flatten()
    if p > 0:
        layers["dropout"] = nn.Dropout(p)
    layers["fc"] = nn.Linear(cin, num_classes)
    model = nn.Sequential(layers)
    _init_resnet(model, zero_init_residual=_check_bool("zero_init_residual", zero_init_residual))
    return model
