"""The model registry and what the families share: config checks, activations and pools, conv blocks,
dense stacks, feature-map sizes and the conv classifier head."""

from __future__ import annotations

import numbers
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from cifar_tune.registry import Registry

MODELS = Registry("model family")
# Keys of a model config that are not hyperparameters of the family: how to start training it
# (weights to load, parts to freeze, per-part lr multipliers). See cifar_tune.engine.transfer.
TRANSFER_KEYS = ("init", "freeze", "lr_mult")

Activation = Literal["relu", "leaky_relu", "elu", "gelu", "silu", "tanh"]
Pool = Literal["max", "avg", "none"]
GlobalPool = Literal["none", "avg", "max"]
# Order of the ops that follow each hidden Linear of a dense stack. Keras models put them in any order
# (seed 003 uses both "bn-act-dropout" and "act-dropout-bn"), and the order changes what BN normalises.
LayerOrder = Literal[
    "bn-act-dropout",
    "bn-dropout-act",
    "act-bn-dropout",
    "act-dropout-bn",
    "dropout-bn-act",
    "dropout-act-bn",
]

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": lambda: nn.ReLU(inplace=True),
    "leaky_relu": lambda: nn.LeakyReLU(0.01, inplace=True),
    "elu": lambda: nn.ELU(inplace=True),
    "gelu": nn.GELU,
    "silu": lambda: nn.SiLU(inplace=True),
    "tanh": nn.Tanh,
}
_POOLS = ("max", "avg", "none")
_LAYER_ORDERS: tuple[str, ...] = LayerOrder.__args__  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------------------
# Value checks. Each returns the normalised value or raises ValueError("<key>: ..."). Numbers arrive
# from YAML, Ray Tune samplers (numpy scalars) or Python, so check by numeric ABC, never by exact type.
# --------------------------------------------------------------------------------------------------


def _check_int(key: str, value: Any, *, min_value: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{key}: must be an integer; got {value!r}")
    if value < min_value:
        raise ValueError(f"{key}: must be >= {min_value}; got {value}")
    return int(value)


def _check_prob(key: str, value: Any) -> float:
    """A dropout probability: 1.0 would zero every activation, so it is excluded."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value < 1.0:
        raise ValueError(f"{key}: must be a number in [0, 1); got {value!r}")
    return float(value)


def _check_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{key}: must be true or false; got {value!r}")
    return value


def _check_choice(key: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{key}: must be one of {', '.join(choices)}; got {value!r}")
    return str(value)


def _check_int_list(key: str, value: Any, *, min_len: int = 0, min_value: int = 1) -> list[int]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{key}: must be a list of integers; got {value!r}")
    if len(value) < min_len:
        raise ValueError(f"{key}: needs at least {min_len} entries; got {list(value)!r}")
    return [_check_int(f"{key}[{i}]", v, min_value=min_value) for i, v in enumerate(value)]


def _check_padding(key: str, value: Any) -> int | None:
    """An explicit padding, or None / "same" for padding that keeps the spatial size (Keras 'same')."""
    if value is None or value == "same":
        return None
    return _check_int(key, value, min_value=0)


# --------------------------------------------------------------------------------------------------
# Building blocks shared by the families.
# --------------------------------------------------------------------------------------------------


def _dense_stack(
    in_features: int,
    hidden: list[int],
    num_classes: int,
    *,
    activation: str,
    dropout: float,
    batch_norm: bool,
    order: str,
) -> list[nn.Module]:
    """Linear layers ``in -> hidden... -> num_classes``; each hidden Linear is followed by its ops in ``order``."""
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers.append(nn.Linear(width, h))
        for op in order.split("-"):
            if op == "act":
                layers.append(_ACTIVATIONS[activation]())
            elif op == "bn" and batch_norm:
                layers.append(nn.BatchNorm1d(h))
            elif op == "dropout" and dropout > 0:
                layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, num_classes))
    return layers


@dataclass(frozen=True)
class ConvBlock:
    """A validated plain conv block: ``(conv -> [bn] -> act) x len(channels) -> [pool] -> [dropout]``."""

    key: str  # config path of the block, for error messages ("blocks[2]", "channels[1]")
    kernel_key: str  # config path of its kernel size ("blocks[2].kernel_size", "kernel_size")
    channels: tuple[int, ...]
    kernel_size: int
    padding: int | None  # None = same
    activation: str
    batch_norm: bool
    pool: str
    dropout: float


def _feature_map_sizes(blocks: Sequence[ConvBlock], image_size: int, where: str) -> int:
    """Final spatial size of ``blocks`` on an ``image_size`` input; raise if any stage shrinks it to 0.

    Done arithmetically (not by a trial forward) so that every sampled config is checked for free, and so
    the message names the offending setting rather than a convolution shape.
    """
    size = image_size
    pools_fitted = 0
    for block in blocks:
        for i, _ in enumerate(block.channels):
            if block.padding is None:
                continue
            new = size + 2 * block.padding - block.kernel_size + 1
            if new < 1:
                which = f"conv {i} of {block.key}" if len(block.channels) > 1 else f"the conv of {block.key}"
                raise ValueError(
                    f"{block.kernel_key}: {block.kernel_size}x{block.kernel_size} ({which}, padding "
                    f"{block.padding}) does not fit its {size}x{size} input (from {image_size}x{image_size})"
                )
            size = new
        if block.pool != "none":
            if size // 2 < 1:
                total = sum(b.pool != "none" for b in blocks)
                raise ValueError(
                    f"{where}: {total} pooling stages reduce {image_size}x{image_size} input to 0x0; "
                    f"at most {pools_fitted} fit"
                )
            size //= 2
            pools_fitted += 1
    return size


def _conv_features(blocks: Sequence[ConvBlock], in_channels: int, *, conv_bias: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = in_channels
    for block in blocks:
        for c in block.channels:
            padding: int | str = "same" if block.padding is None else block.padding
            layers.append(nn.Conv2d(width, c, block.kernel_size, padding=padding, bias=conv_bias))
            if block.batch_norm:
                layers.append(nn.BatchNorm2d(c))
            layers.append(_ACTIVATIONS[block.activation]())
            width = c
        if block.pool == "max":
            layers.append(nn.MaxPool2d(2))
        elif block.pool == "avg":
            layers.append(nn.AvgPool2d(2))
        if block.dropout > 0:
            layers.append(nn.Dropout(block.dropout))
    return nn.Sequential(*layers)


def _conv_classifier(
    blocks: Sequence[ConvBlock],
    *,
    in_channels: int,
    image_size: int,
    num_classes: int,
    where: str,
    conv_bias: bool,
    global_pool: str,
    head: list[int],
    activation: str,
    head_dropout: float,
    head_batch_norm: bool,
    head_order: str,
) -> nn.Sequential:
    size = _feature_map_sizes(blocks, image_size, where)
    width = blocks[-1].channels[-1] if blocks else in_channels
    pool: nn.Module = {
        "none": nn.Identity(),  # Keras-style Flatten: the head sees every position
        "avg": nn.AdaptiveAvgPool2d(1),
        "max": nn.AdaptiveMaxPool2d(1),
    }[global_pool]
    features = width * (size * size if global_pool == "none" else 1)
    classifier = _dense_stack(
        features,
        head,
        num_classes,
        activation=activation,
        dropout=head_dropout,
        batch_norm=head_batch_norm,
        order=head_order,
    )
    return nn.Sequential(
        OrderedDict(
            features=_conv_features(blocks, in_channels, conv_bias=conv_bias),
            global_pool=pool,
            flatten=nn.Flatten(),
            classifier=nn.Sequential(*classifier),
        )
    )
