"""A researcher's own models for ``family: python`` (see user_model.yaml and docs/spec.md).

A factory is any callable returning an ``nn.Module``: it receives ``num_classes``, ``in_channels`` and
``image_size`` (each only if it has a parameter of that name) plus the spec's keyword arguments, which
are its hyperparameters: their names, type hints and defaults are what the spec validator checks.
"""

from __future__ import annotations

from torch import nn


class CNN7(nn.Module):
    """Seven conv layers in three stages (widths w, 2w, 4w), global average pooling, a linear head."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int, *, width: int = 32,
                 dropout: float = 0.0, batch_norm: bool = True) -> None:
        super().__init__()
        if width < 1:
            raise ValueError("width: must be >= 1")
        if image_size < 8:
            raise ValueError(f"image_size: CNN7 pools twice and needs at least 8x8 inputs, got {image_size}")

        def conv(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=not batch_norm),
                    *([nn.BatchNorm2d(cout)] if batch_norm else []), nn.ReLU(inplace=True)]

        w = width
        self.features = nn.Sequential(
            *conv(in_channels, w), *conv(w, w), nn.MaxPool2d(2),
            *conv(w, 2 * w), *conv(2 * w, 2 * w), nn.MaxPool2d(2),
            *conv(2 * w, 4 * w), *conv(4 * w, 4 * w), *conv(4 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(4 * w, num_classes))

    def forward(self, x):  # noqa: ANN001, ANN201 - as nn.Module's
        return self.head(self.features(x))


def mlp_mixer_lite(num_classes: int, in_channels: int, image_size: int, *, patch: int = 4, dim: int = 64,
                   depth: int = 2) -> nn.Module:
    """A function works as well as a class: a small patch-MLP (token mixing by a linear over patches)."""
    if image_size % patch:
        raise ValueError(f"patch: must divide image_size {image_size}, got {patch}")
    tokens = (image_size // patch) ** 2

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.tokens = nn.Linear(tokens, tokens)
            self.channels = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

        def forward(self, x):  # noqa: ANN001, ANN201
            x = x + self.tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2)
            return x + self.channels(self.norm2(x))

    class Mixer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(in_channels, dim, patch, stride=patch)
            self.blocks = nn.Sequential(*[Block() for _ in range(depth)])
            self.head = nn.Linear(dim, num_classes)

        def forward(self, x):  # noqa: ANN001, ANN201
            x = self.stem(x).flatten(2).transpose(1, 2)
            return self.head(self.blocks(x).mean(1))

    return Mixer()
