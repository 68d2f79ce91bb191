"""AutoAugment, RandAugment and TrivialAugmentWide, batched on the data's device with per-image randomness.

torchvision applies these policies to one image at a time (a Python loop, a host-side random draw per op).
Here every image of a batch draws its own ops, magnitudes and signs as tensors, and one *slot* (one op
per image) is applied to the whole batch at once:

    geometric  ShearX/Y, TranslateX/Y, Rotate             one per-image inverse affine map, nearest
                                                           sampling as an integer gather on uint8
                                                           (torchvision's grid and grid_sample's rounding)
    pixel      Color, Sharpness                            x * f + (gray | blur) * (1 - f), per-image f
    lookup     Brightness, Contrast, Posterize, Solarize,  a [C, 256] value table per image from its
               Invert, AutoContrast, Equalize              statistics (mean gray, min/max, histogram); one
                                                           gather for the batch

An image whose op belongs to another stage gets that stage's identity parameters, so no stage needs the
image indices (a ``nonzero`` would be a host sync). Stages whose ops a policy never draws are skipped.

Op lists, magnitude bins and signs are torchvision's (``transforms.v2._auto_augment``, copied below as
data and compared with torchvision's in the tests), as are the kernels' arithmetic (float32 blends
truncated to uint8, PIL's equalize LUT, ``_get_inverse_affine_matrix``), so each op matches
``torchvision.transforms.v2.functional`` on uint8 images (tests/engine/test_policies.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal

import torch

from cifar_tune.engine.augment_kernels import gray
from cifar_tune.engine.augment_ops import AUGMENTS, _integer

OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
       "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize", "Invert")
CODE = {name: i for i, name in enumerate(OPS)}
GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
PIXEL = ("Color", "Sharpness")  # need each pixel's neighbourhood or colour: per-pixel kernels
LOOKUP = ("Brightness", "Contrast", "Posterize", "Solarize", "Invert", "AutoContrast", "Equalize")  # value -> value

# name -> (magnitudes(num_bins, height, width) or None, signed): torchvision's augmentation spaces.
Magnitudes = Callable[[int, int, int], "torch.Tensor | None"]


def _lin(lo: float, hi: float) -> Magnitudes:
    return lambda n, h, w: torch.linspace(lo, hi, n)


def _posterize_bits(span: int) -> Magnitudes:
    """8 bits at bin 0 down to 8 - span at the last bin, rounded (torchvision)."""
    return lambda n, h, w: (8 - (torch.arange(n) / ((n - 1) / span))).round().int()


_NONE: Magnitudes = lambda n, h, w: None  # noqa: E731

RAND_SPACE: dict[str, tuple[Magnitudes, bool]] = {
    "Identity": (_NONE, False),
    "ShearX": (_lin(0.0, 0.3), True),
    "ShearY": (_lin(0.0, 0.3), True),
    "TranslateX": (lambda n, h, w: torch.linspace(0.0, 150.0 / 331.0 * w, n), True),
    "TranslateY": (lambda n, h, w: torch.linspace(0.0, 150.0 / 331.0 * h, n), True),
    "Rotate": (_lin(0.0, 30.0), True),
    "Brightness": (_lin(0.0, 0.9), True),
    "Color": (_lin(0.0, 0.9), True),
    "Contrast": (_lin(0.0, 0.9), True),
    "Sharpness": (_lin(0.0, 0.9), True),
    "Posterize": (_posterize_bits(4), False),
    "Solarize": (_lin(1.0, 0.0), False),
    "AutoContrast": (_NONE, False),
    "Equalize": (_NONE, False),
}
# AutoAugment: RandAugment's space without Identity, plus Invert; always 10 bins.
AUTO_SPACE: dict[str, tuple[Magnitudes, bool]] = {
    **{k: v for k, v in RAND_SPACE.items() if k != "Identity"}, "Invert": (_NONE, False)}
WIDE_SPACE: dict[str, tuple[Magnitudes, bool]] = {
    "Identity": (_NONE, False),
    "ShearX": (_lin(0.0, 0.99), True),
    "ShearY": (_lin(0.0, 0.99), True),
    "TranslateX": (_lin(0.0, 32.0), True),
    "TranslateY": (_lin(0.0, 32.0), True),
    "Rotate": (_lin(0.0, 135.0), True),
    "Brightness": (_lin(0.0, 0.99), True),
    "Color": (_lin(0.0, 0.99), True),
    "Contrast": (_lin(0.0, 0.99), True),
    "Sharpness": (_lin(0.0, 0.99), True),
    "Posterize": (_posterize_bits(6), False),
    "Solarize": (_lin(1.0, 0.0), False),
    "AutoContrast": (_NONE, False),
    "Equalize": (_NONE, False),
}
AUTO_BINS = 10

SubPolicy = tuple[tuple[str, float, "int | None"], tuple[str, float, "int | None"]]
# AutoAugment's learned policies (Cubuk et al. 2019), as torchvision defines them: 25 sub-policies of
# two (op, probability, magnitude bin) each.
AUTO_POLICIES: dict[str, tuple[SubPolicy, ...]] = {
    "imagenet": (
        (("Posterize", 0.4, 8), ("Rotate", 0.6, 9)), (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
        (("Equalize", 0.8, None), ("Equalize", 0.6, None)), (("Posterize", 0.6, 7), ("Posterize", 0.6, 6)),
        (("Equalize", 0.4, None), ("Solarize", 0.2, 4)), (("Equalize", 0.4, None), ("Rotate", 0.8, 8)),
        (("Solarize", 0.6, 3), ("Equalize", 0.6, None)), (("Posterize", 0.8, 5), ("Equalize", 1.0, None)),
        (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)), (("Equalize", 0.6, None), ("Posterize", 0.4, 6)),
        (("Rotate", 0.8, 8), ("Color", 0.4, 0)), (("Rotate", 0.4, 9), ("Equalize", 0.6, None)),
        (("Equalize", 0.0, None), ("Equalize", 0.8, None)), (("Invert", 0.6, None), ("Equalize", 1.0, None)),
        (("Color", 0.6, 4), ("Contrast", 1.0, 8)), (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
        (("Color", 0.8, 8), ("Solarize", 0.8, 7)), (("Sharpness", 0.4, 7), ("Invert", 0.6, None)),
        (("ShearX", 0.6, 5), ("Equalize", 1.0, None)), (("Color", 0.4, 0), ("Equalize", 0.6, None)),
        (("Equalize", 0.4, None), ("Solarize", 0.2, 4)), (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
        (("Invert", 0.6, None), ("Equalize", 1.0, None)), (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
        (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
    ),
    "cifar10": (
        (("Invert", 0.1, None), ("Contrast", 0.2, 6)), (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
        (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)), (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
        (("AutoContrast", 0.5, None), ("Equalize", 0.9, None)), (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
        (("Color", 0.4, 3), ("Brightness", 0.6, 7)), (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
        (("Equalize", 0.6, None), ("Equalize", 0.5, None)), (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
        (("Color", 0.7, 7), ("TranslateX", 0.5, 8)), (("Equalize", 0.3, None), ("AutoContrast", 0.4, None)),
        (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)), (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
        (("Solarize", 0.5, 2), ("Invert", 0.0, None)), (("Equalize", 0.2, None), ("AutoContrast", 0.6, None)),
        (("Equalize", 0.2, None), ("Equalize", 0.6, None)), (("Color", 0.9, 9), ("Equalize", 0.6, None)),
        (("AutoContrast", 0.8, None), ("Solarize", 0.2, 8)), (("Brightness", 0.1, 3), ("Color", 0.7, 0)),
        (("Solarize", 0.4, 5), ("AutoContrast", 0.9, None)), (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
        (("AutoContrast", 0.9, None), ("Solarize", 0.8, 3)), (("Equalize", 0.8, None), ("Invert", 0.1, None)),
        (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, None)),
    ),
    "svhn": (
        (("ShearX", 0.9, 4), ("Invert", 0.2, None)), (("ShearY", 0.9, 8), ("Invert", 0.7, None)),
        (("Equalize", 0.6, None), ("Solarize", 0.6, 6)), (("Invert", 0.9, None), ("Equalize", 0.6, None)),
        (("Equalize", 0.6, None), ("Rotate", 0.9, 3)), (("ShearX", 0.9, 4), ("AutoContrast", 0.8, None)),
        (("ShearY", 0.9, 8), ("Invert", 0.4, None)), (("ShearY", 0.9, 5), ("Solarize", 0.2, 6)),
        (("Invert", 0.9, None), ("AutoContrast", 0.8, None)), (("Equalize", 0.6, None), ("Rotate", 0.9, 3)),
        (("ShearX", 0.9, 4), ("Solarize", 0.3, 3)), (("ShearY", 0.8, 8), ("Invert", 0.7, None)),
        (("Equalize", 0.9, None), ("TranslateY", 0.6, 6)), (("Invert", 0.9, None), ("Equalize", 0.6, None)),
        (("Contrast", 0.3, 3), ("Rotate", 0.8, 4)), (("Invert", 0.8, None), ("TranslateY", 0.0, 2)),
        (("ShearY", 0.7, 6), ("Solarize", 0.4, 8)), (("Invert", 0.6, None), ("Rotate", 0.8, 4)),
        (("ShearY", 0.3, 7), ("TranslateX", 0.9, 3)), (("ShearX", 0.1, 6), ("Invert", 0.6, None)),
        (("Solarize", 0.7, 2), ("TranslateY", 0.6, 7)), (("ShearY", 0.8, 4), ("Invert", 0.8, None)),
        (("ShearX", 0.7, 9), ("TranslateY", 0.8, 3)), (("ShearY", 0.8, 5), ("AutoContrast", 0.7, None)),
        (("ShearX", 0.7, 2), ("Invert", 0.1, None)),
    ),
}


# ----------------------------------------------------------------------------------------------------
# per-(op, magnitude) parameters, computed once per policy: applying a slot then indexes them per image


def _inverse_affine(code: torch.Tensor, mag: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """torchvision's ``_get_inverse_affine_matrix`` per entry, [N, 2, 3] float64 (identity for others)."""
    zero = torch.zeros_like(mag)

    def where(name: str, value: torch.Tensor | float) -> torch.Tensor:
        return torch.where(code == CODE[name], value, zero)

    shear_deg = torch.rad2deg(torch.atan(mag))
    sx, sy = torch.deg2rad(where("ShearX", shear_deg)), torch.deg2rad(where("ShearY", shear_deg))
    tx, ty = where("TranslateX", torch.trunc(mag)), where("TranslateY", torch.trunc(mag))  # int(magnitude)
    rot = torch.deg2rad(where("Rotate", -mag))  # F.rotate passes -angle to the matrix
    shear = (code == CODE["ShearX"]) | (code == CODE["ShearY"])
    # shears are about the top-left corner (center=[0, 0]), in coordinates centred on the image
    cx, cy = torch.where(shear, -w * 0.5, zero), torch.where(shear, -h * 0.5, zero)
    a = torch.cos(rot - sy) / torch.cos(sy)
    b = -torch.cos(rot - sy) * torch.tan(sx) / torch.cos(sy) - torch.sin(rot)
    c = torch.sin(rot - sy) / torch.cos(sy)
    d = -torch.sin(rot - sy) * torch.tan(sx) / torch.cos(sy) + torch.cos(rot)
    m0, m1, m3, m4 = d, -b, -c, a
    m2 = m0 * (-cx - tx) + m1 * (-cy - ty) + cx
    m5 = m3 * (-cx - tx) + m4 * (-cy - ty) + cy
    return torch.stack([torch.stack([m0, m1, m2], 1), torch.stack([m3, m4, m5], 1)], 1)


def _value_table(code: torch.Tensor, mag: torch.Tensor) -> torch.Tensor:
    """The value -> value table [N, 256] uint8 of Brightness, Posterize, Solarize and Invert, with
    torchvision's float32 arithmetic on each of the 256 values (the identity for other ops)."""
    v = torch.arange(256, dtype=torch.float32, device=code.device).expand(len(code), 256)
    col = mag.view(-1, 1)
    bright = (v * (1.0 + col).float()).clamp(0, 255)  # x * f, clamped, truncated
    bits = torch.where(code == CODE["Posterize"], mag, 8.0).to(torch.int64).view(-1, 1)
    poster = torch.arange(256, device=code.device) & ((255 << (8 - bits)) & 255)  # keep the top ``bits`` bits
    solar = torch.where(v >= (255.0 * col).float(), 255.0 - v, v)  # invert values >= 255 * magnitude
    table = v
    for name, t in (("Brightness", bright), ("Posterize", poster), ("Solarize", solar), ("Invert", 255.0 - v)):
        table = torch.where((code == CODE[name]).view(-1, 1), t.float(), table)
    return table.to(torch.uint8)


@dataclass(frozen=True)
class OpParams:
    """Everything per (op, signed magnitude) entry that does not depend on the image, [N, ...] each.

    Entries are either the images of one batch (:func:`apply_ops`) or every (op, bin, sign) a policy can
    draw, built once and indexed per image and slot (:class:`Policy`): on CPU, computing them per batch
    was half the time of a slot (~40 small tensor ops for the affine matrices alone).
    """

    code: torch.Tensor  # long, index into OPS
    mag: torch.Tensor  # float64, signed magnitude
    theta: torch.Tensor  # float32 [N, 2, 3]: inverse affine map on the [-1, 1] grid (identity for others)
    table: torch.Tensor  # uint8 [N, 256]: Brightness/Posterize/Solarize/Invert value table (identity for others)
    ratio: torch.Tensor  # float32: Color/Contrast/Sharpness blend factor 1 + magnitude (1 for others)
    rest: torch.Tensor  # float32: 1 - factor, computed in float64 as torchvision's python floats are

    def to(self, device: torch.device) -> OpParams:
        # non-blocking: a blocking host->device copy is a host sync in the step loop
        return OpParams(*(getattr(self, f.name).to(device, non_blocking=True) for f in fields(self)))


def op_params(code: torch.Tensor, mag: torch.Tensor, h: int, w: int) -> OpParams:
    """:class:`OpParams` of ``OPS[code[i]]`` with signed magnitude ``mag[i]`` on h x w images."""
    mag = mag.double()
    theta = _inverse_affine(code, mag, h, w).float()
    theta = theta.div_(torch.tensor([[0.5 * w], [0.5 * h]]).to(code.device, non_blocking=True))
    blends = (code == CODE["Color"]) | (code == CODE["Contrast"]) | (code == CODE["Sharpness"])
    f64 = torch.where(blends, 1.0 + mag, 1.0)  # python-float factors, as torchvision passes them
    return OpParams(code, mag, theta, _value_table(code, mag), f64.float(), (1.0 - f64).float())


# ----------------------------------------------------------------------------------------------------
# the batched kernels: x uint8 [B, C, H, W], p: OpParams of its B images


def _geometric(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Per-image affine maps with torchvision's grid (``_affine_grid``) and nearest sampling, zero fill.

    The grid is torchvision's base grid times the per-image matrix rescaled to [-1, 1], written as
    broadcast products (a [B, HW, 3] x [B, 3, 2] ``bmm`` of tiny matrices is slower on CPU), one
    contiguous [B, H, W] plane per coordinate: an interleaved [B, H, W, 2] grid makes every later
    elementwise pass strided, ~5x slower on CPU.
    """
    b, c, h, w = x.shape
    t = theta  # [B, 2 (x, y), 3]
    xs = torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w, device=x.device).view(1, 1, w)
    ys = torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h, device=x.device).view(1, h, 1)

    def pixel(k: int, size: int) -> torch.Tensor:
        """Coordinate k of every output pixel's source, in pixels: grid_sample(mode="nearest",
        align_corners=False)'s CPU unnormalisation (g + 1) * size / 2 - 0.5 in float32, rounded half to even."""
        g = (xs * t[:, k, 0].view(b, 1, 1) + ys * t[:, k, 1].view(b, 1, 1)).add_(t[:, k, 2].view(b, 1, 1))
        return g.add_(1).mul_(size / 2).sub_(0.5).round_()

    ix, iy = pixel(0, w), pixel(1, h)
    ix_in, iy_in = ix.clamp(0, w - 1), iy.clamp(0, h - 1)
    # zero fill: a source outside the image reads pixel h * w, a zero appended to each image. Whether it
    # is outside is |clamped - unclamped| > 0, kept in float arithmetic (exact on these small integers):
    # a comparison to a bool mask costs ~6 arithmetic passes on CPU.
    outside = ix.sub_(ix_in).abs_().add_(iy.sub_(iy_in).abs_()).clamp_(max=1)  # 0 inside, 1 outside
    src = iy_in.mul_(w).add_(ix_in)
    src = src.add_(outside.mul_(h * w - src)).long().view(b, 1, h * w)
    padded = torch.cat([x.reshape(b, c, h * w), x.new_zeros(b, c, 1)], dim=2)
    return padded.gather(2, src.expand(b, c, h * w)).view(b, c, h, w)


def _gray(xf: torch.Tensor) -> torch.Tensor:
    """floor of torchvision's grayscale (``augment.gray``, shared with color_jitter), as its uint8 kernels
    take it, [B, 1, H, W]; the image itself if 1-channel."""
    return xf if xf.shape[1] == 1 else gray(xf).floor_()


def _blend(x: torch.Tensor, code: torch.Tensor, ratio: torch.Tensor, rest: torch.Tensor,
           present: frozenset[str]) -> torch.Tensor:
    """Color and Sharpness as torchvision computes them on uint8: float32 blends with the floored gray or
    the rounded blur, truncated back to uint8 (color_jitter's ``apply_jitter`` is the float-image version
    of the same blends, without flooring and truncation, so only ``gray`` is shared)."""
    b, c, h, w = x.shape
    view = (b, 1, 1, 1)
    ratio, rest = ratio.view(view), rest.view(view)
    if "Contrast" in present:  # the contrast factor is for the lookup stage, not a blend here
        is_contrast = (code == CODE["Contrast"]).view(view)
        ratio, rest = torch.where(is_contrast, 1.0, ratio), torch.where(is_contrast, 0.0, rest)
    xf = x.float()
    out = xf
    if "Color" in present and c > 1:  # saturation is a no-op on 1-channel images
        out = xf * ratio + _gray(xf) * rest
    if "Sharpness" in present and h > 2 and w > 2:
        sharp = xf.clone()
        inner = sharp[..., 1:-1, 1:-1]
        # torchvision's 3x3 kernel (1s around, 5 in the middle, / 13) as integer box sums: the exact value
        # k / 13 is never within 1/26 of a .5 tie, so rounding it gives what the float conv rounds to
        rows = xf[..., :-2, :] + xf[..., 1:-1, :] + xf[..., 2:, :]
        box = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]
        blurred = box.add_(inner, alpha=4.0).div_(13.0).round_()
        inner.add_(blurred.sub_(inner).mul_(rest))  # torchvision: view.add_(blurred - view, alpha=1 - f)
        # Color images got a blend factor too: keep the sharpened pixels of Sharpness images only
        out = torch.where((code == CODE["Sharpness"]).view(view), sharp, out) if "Color" in present else sharp
    return out.clamp_(0, 255).to(torch.uint8)


def _lookup(x: torch.Tensor, code: torch.Tensor, value_table: torch.Tensor, ratio: torch.Tensor,
            rest: torch.Tensor, present: frozenset[str]) -> torch.Tensor:
    """The ops whose output pixel depends only on its input value and per-image (per-channel) statistics,
    as one lookup table per image (per channel) and one gather: Brightness, Posterize, Solarize, Invert
    (``OpParams.table``), Contrast (blend with the mean gray), AutoContrast (per-channel min/max) and
    Equalize (per-channel histogram). Each entry is torchvision's float32 arithmetic on that value, so
    the result is the same as computing every pixel; images with other ops get the identity table. The
    tables are [B, 1, 256], one for all channels, unless a per-channel op (AutoContrast, Equalize) can
    occur: [B, C, 256]."""
    b, c, h, w = x.shape
    k = c if present & {"AutoContrast", "Equalize"} else 1  # tables per image, or per image and channel
    v = torch.arange(256, device=x.device, dtype=torch.float32).view(1, 1, 256)  # every possible input value
    lut = value_table.view(b, 1, 256).expand(b, k, 256)

    def where(name: str, table: torch.Tensor) -> torch.Tensor:
        return torch.where((code == CODE[name]).view(b, 1, 1), table, lut)

    channels = x.reshape(b, c, h * w)
    if "Contrast" in present:  # blend with the image's mean (floored) gray
        mean = _gray(x.float()).mean(dim=(1, 2, 3)).view(b, 1, 1)
        table = v * ratio.view(b, 1, 1) + mean * rest.view(b, 1, 1)
        lut = where("Contrast", table.clamp_(0, 255).to(torch.uint8))
    if "AutoContrast" in present:  # stretch each channel's [min, max] to [0, 255]
        lo = channels.amin(dim=2, keepdim=True).float()
        hi = channels.amax(dim=2, keepdim=True).float()
        flat_channel = hi == lo
        inv_scale = torch.where(flat_channel, 1.0, (hi - lo).mul_(1.0 / 255))
        lo = torch.where(flat_channel, 0.0, lo)
        lut = where("AutoContrast", (v - lo).div_(inv_scale).clamp_(0, 255).to(torch.uint8))
    index = x.reshape(b, k, -1).long()
    if "Equalize" in present:
        lut = where("Equalize", _equalize_lut(channels, index))
    return lut.gather(2, index).view(b, c, h, w)


def _equalize_lut(channels: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """torchvision's (PIL's) histogram-equalisation table per image and channel, [B, C, 256] uint8
    (the identity where a channel has a single value above the rest's total: step 0).

    ``channels``: the images, uint8 [B, C, N]; ``index``: the same as int64 (the caller's gather index).
    """
    b, c, n = channels.shape
    hist = torch.zeros(b, c, 256, dtype=torch.int32, device=channels.device)
    hist.scatter_add_(2, index, torch.ones(1, dtype=torch.int32, device=channels.device).expand(b, c, n))
    cum = hist.cumsum(dim=2)
    top = hist.gather(2, channels.amax(dim=2, keepdim=True).long())  # count of the channel's top value
    step = (n - top).div(255, rounding_mode="floor")
    # floor((cum + step // 2) / step) in float64: exact for these integers (< 2**24), and ~3x faster on
    # CPU than an integer floor division
    table = (cum[..., :-1] + step // 2).double().div_(step.clamp(min=1).double()).floor_().clamp_(0, 255)
    table = torch.cat([torch.zeros_like(table[..., :1]), table], dim=2)
    identity = torch.arange(256, device=channels.device, dtype=torch.float64)
    return torch.where(step.ne(0), table, identity).to(torch.uint8)


VALUE_OPS = frozenset(("Brightness", "Posterize", "Solarize", "Invert"))  # all in OpParams.table


def _apply(x: torch.Tensor, p: OpParams, present: frozenset[str], rows: torch.Tensor | None = None) -> torch.Tensor:
    """Apply entry ``rows[i]`` of ``p`` to image i (entry i where ``rows`` is None); each stage reads only
    the fields it needs, so only those are gathered."""

    def pick(t: torch.Tensor) -> torch.Tensor:
        return t if rows is None else t.index_select(0, rows)

    if present & set(GEOMETRIC):
        x = _geometric(x, pick(p.theta))
    if present - set(GEOMETRIC):
        code, ratio, rest = pick(p.code), pick(p.ratio), pick(p.rest)
        if present & set(PIXEL):
            x = _blend(x, code, ratio, rest, present)
        if present & set(LOOKUP):
            x = _lookup(x, code, pick(p.table), ratio, rest, present)
    return x


def apply_ops(x: torch.Tensor, code: torch.Tensor, mag: torch.Tensor,
              present: frozenset[str] = frozenset(OPS)) -> torch.Tensor:
    """Apply op ``OPS[code[i]]`` with signed magnitude ``mag[i]`` to image i, for the whole batch.

    ``present``: the ops that can occur (others are assumed absent and their stages skipped).
    """
    return _apply(x, op_params(code, mag, x.shape[2], x.shape[3]), present)


# the stages of apply_ops (0: Identity, nothing to do) and, per op code, the stage it belongs to
# (the lookup ops that need image statistics get their own groups, so each group computes only its own)
STAGE_OPS = (frozenset(("Identity",)), frozenset(GEOMETRIC), frozenset(("Color",)), frozenset(("Sharpness",)),
             VALUE_OPS, frozenset(("Contrast",)), frozenset(("AutoContrast",)), frozenset(("Equalize",)))
STAGE_OF = torch.tensor([next(i for i, ops in enumerate(STAGE_OPS) if op in ops) for op in OPS])
GROUP_ON_CPU = True  # False: the accelerator path everywhere (tests use it to prove it never syncs)


def _apply_grouped(x: torch.Tensor, p: OpParams, rows: torch.Tensor | None = None) -> torch.Tensor:
    stage = STAGE_OF[p.code if rows is None else p.code.index_select(0, rows)]
    counts = torch.bincount(stage, minlength=len(STAGE_OPS)).tolist()
    order = torch.argsort(stage, stable=True)
    # index_select, not x[order]: advanced indexing of a uint8 batch is ~10x slower on CPU
    xs = x.index_select(0, order)  # images sorted by stage, and their entries
    sorted_rows = order if rows is None else rows.index_select(0, order)
    parts = [xs[: counts[0]]]  # Identity
    start = counts[0]
    for ops, n in zip(STAGE_OPS[1:], counts[1:], strict=True):
        if n:
            parts.append(_apply(xs[start : start + n], p, ops, sorted_rows[start : start + n]))
        start += n
    return torch.cat(parts).index_select(0, torch.argsort(order))  # back to the batch order


def apply_grouped(x: torch.Tensor, code: torch.Tensor, mag: torch.Tensor) -> torch.Tensor:
    """:func:`apply_ops` with each stage run only on the images whose op belongs to it (same result).

    Grouping needs the group sizes on the host, so it is used where the draws already live there (CPU);
    on an accelerator :func:`apply_ops` runs every stage on the whole batch instead, with no sync.
    """
    return _apply_grouped(x, op_params(code, mag, x.shape[2], x.shape[3]))


# ----------------------------------------------------------------------------------------------------
# policies: per-image draws of (op, signed magnitude) per slot


def _variants(space: dict[str, tuple[Magnitudes, bool]], bins: int, h: int,
              w: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Every (op, bin, sign) of a space, in the order ``variant = (op * bins + bin) * 2 + flip``: (op
    names, codes [V], signed magnitudes [V] float64). Identity is appended where the space lacks it
    (AutoAugment's sub-policies skip an op with probability 1 - p)."""
    names = list(space) + ([] if "Identity" in space else ["Identity"])
    mags = torch.zeros(len(names), bins, 2, dtype=torch.float64)
    for i, name in enumerate(names):
        m = space.get(name, (_NONE, False))[0](bins, h, w)
        if m is not None:
            mags[i, :, 0] = m.double()
            mags[i, :, 1] = -m.double() if space[name][1] else m.double()  # flip: only signed ops
    codes = torch.tensor([CODE[n] for n in names]).repeat_interleave(bins * 2)
    return names, codes, mags.view(-1)


@dataclass(frozen=True)
class Policy:
    """A configured policy; ``__call__(x_uint8, generator) -> x_uint8`` (the augment pipeline's policy stage)."""

    stage: ClassVar[str] = "policy"
    kind: Literal["autoaugment", "randaugment", "trivialaugment"]
    num_ops: int = 1  # slots applied one after the other (AutoAugment: 2, one sub-policy)
    magnitude: int | None = None  # RandAugment's fixed bin; None: uniform over the bins (TrivialAugment)
    num_bins: int = 31
    policy: str | None = None  # AutoAugment's policy name
    _tables: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def space(self) -> dict[str, tuple[Magnitudes, bool]]:
        return {"autoaugment": AUTO_SPACE, "randaugment": RAND_SPACE, "trivialaugment": WIDE_SPACE}[self.kind]

    @property
    def present(self) -> frozenset[str]:
        """The ops this policy can apply."""
        if self.kind == "autoaugment":
            return frozenset(op for sub in AUTO_POLICIES[self.policy] for op, p, _ in sub if p > 0)
        return frozenset(self.space)

    def _table(self, h: int, w: int, device: torch.device) -> dict[str, Any]:
        """The draw tables and every variant's :class:`OpParams`, built on the host once per image size and
        device and copied without blocking (a table built per batch would cost a host->device copy each)."""
        key = (h, w, str(device))
        if key not in self._tables:
            names, codes, mags = _variants(self.space, self.num_bins, h, w)
            t: dict[str, Any] = {"ops": len(self.space), "params": op_params(codes, mags, h, w).to(device)}
            if self.kind == "autoaugment":
                subs = AUTO_POLICIES[self.policy]
                t["sub_ops"] = torch.tensor([[names.index(op) for op, _, _ in sub] for sub in subs])
                t["sub_p"] = torch.tensor([[p for _, p, _ in sub] for sub in subs], dtype=torch.float32)
                t["sub_bins"] = torch.tensor([[m or 0 for _, _, m in sub] for sub in subs])
                t["identity"] = names.index("Identity")
            self._tables[key] = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                                 for k, v in t.items()}
        return self._tables[key]

    def draw_variants(self, g: torch.Generator, b: int, h: int, w: int) -> torch.Tensor:
        """Per-image (op, bin, sign) of each slot: variant indices [slots, B] on the generator's device."""
        gd = g.device
        t = self._table(h, w, gd)
        if self.kind == "autoaugment":
            sub = torch.randint(0, t["sub_ops"].shape[0], (b,), generator=g, device=gd)
            apply = torch.rand(2, b, generator=g, device=gd) < t["sub_p"][sub].T
            op = torch.where(apply, t["sub_ops"][sub].T, t["identity"])
            bins = t["sub_bins"][sub].T
        else:
            op = torch.randint(0, t["ops"], (self.num_ops, b), generator=g, device=gd)
            if self.magnitude is None:
                bins = torch.randint(0, self.num_bins, (self.num_ops, b), generator=g, device=gd)
            else:
                bins = torch.full((self.num_ops, b), self.magnitude, device=gd)
        flip = torch.rand(op.shape, generator=g, device=gd) < 0.5  # a no-op for unsigned ops (equal variants)
        return (op * self.num_bins + bins) * 2 + flip

    def draw(self, g: torch.Generator, b: int, h: int, w: int,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image ops and signed magnitudes: (codes [slots, B] long, magnitudes [slots, B] float64)."""
        p = self._table(h, w, g.device)["params"]
        var = self.draw_variants(g, b, h, w)
        return p.code[var].to(device, non_blocking=True), p.mag[var].to(device, non_blocking=True)

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        b, _, h, w = x.shape
        var = self.draw_variants(g, b, h, w).to(x.device, non_blocking=True)
        params: OpParams = self._table(h, w, x.device)["params"]
        grouped = GROUP_ON_CPU and var.device.type == "cpu"  # draws in host memory: grouping costs no sync
        for s in range(var.shape[0]):
            x = _apply_grouped(x, params, var[s]) if grouped else _apply(x, params, self.present, var[s])
        return x


# ----------------------------------------------------------------------------------------------------
# registry entries


@AUGMENTS.register("autoaugment")
def autoaugment(*, policy: Literal["cifar10", "imagenet", "svhn"] = "cifar10") -> Policy:
    """AutoAugment (Cubuk et al. 2019): per image, one of the policy's 25 sub-policies of two ops."""
    if policy not in AUTO_POLICIES:
        raise ValueError(f"policy: must be one of {', '.join(AUTO_POLICIES)}; got {policy!r}")
    return Policy("autoaugment", num_ops=2, num_bins=AUTO_BINS, policy=policy)


@AUGMENTS.register("randaugment")
def randaugment(*, num_ops: int = 2, magnitude: int = 9, num_magnitude_bins: int = 31) -> Policy:
    """RandAugment (Cubuk et al. 2020): ``num_ops`` uniform draws of 14 ops at bin ``magnitude``, random sign."""
    bins = _integer("num_magnitude_bins", num_magnitude_bins, lo=2)
    m = _integer("magnitude", magnitude)
    if m >= bins:
        raise ValueError(f"magnitude: must be < num_magnitude_bins ({bins}), got {m}")
    return Policy("randaugment", num_ops=_integer("num_ops", num_ops), magnitude=m, num_bins=bins)


@AUGMENTS.register("trivialaugment")
def trivialaugment(*, num_magnitude_bins: int = 31) -> Policy:
    """TrivialAugmentWide (Mueller & Hutter 2021): one uniform op at a uniform bin, random sign."""
    return Policy("trivialaugment", num_ops=1, num_bins=_integer("num_magnitude_bins", num_magnitude_bins, lo=2))


POLICY_NAMES: Sequence[str] = ("autoaugment", "randaugment", "trivialaugment")
