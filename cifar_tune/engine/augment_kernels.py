"""Batched augmentation kernels on a whole batch: geometric gather and rotation, colour jitter on
torchvision's kernels, erasing/cutout and mixup/cutmix."""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from cifar_tune.engine.augment_ops import (
    GRAY_WEIGHTS,
    ColorJitter,
    Cutout,
    Erase,
    Flip,
    Mix,
    Op,
    Rotate,
    Shift,
    _bernoulli,
    _beta,
    _boxes,
    _rand,
    _randint,
)

# ----------------------------------------------------------------------------------------------------
# stages


def _reflect(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Mirror out-of-range indices about the edge pixels (``F.pad(mode='reflect')``), any distance."""
    if n == 1:
        return torch.zeros_like(idx)
    period = 2 * (n - 1)
    idx = torch.remainder(idx, period)
    return torch.where(idx >= n, period - idx, idx)


@dataclass(frozen=True)
class _Geometry:
    """Flips and shifts as one integer gather (source = shift + flip(output pixel)), then the rotation of
    that result, as torchvision's pipeline applies them (RandomCrop's padding, then RandomRotation's fill)."""

    hflip_p: float
    vflip_p: float
    max_shift_px: int
    border: str  # "reflect" | "zeros"
    rotate: Rotate

    @classmethod
    def from_ops(cls, ops: Sequence[Op]) -> "_Geometry | None":
        flips = {op.vertical: op.p for op in ops if isinstance(op, Flip)}
        shifts = [op for op in ops if isinstance(op, Shift)]
        rotate = next((op for op in ops if isinstance(op, Rotate)), Rotate(0.0))
        borders = [op.border for op in shifts if op.border is not None]
        geo = cls(flips.get(False, 0.0), flips.get(True, 0.0), sum(op.max_px for op in shifts),
                  borders[0] if borders else "zeros", rotate)
        active = geo.hflip_p > 0 or geo.vflip_p > 0 or geo.max_shift_px > 0 or geo.degrees > 0
        return geo if active else None

    @property
    def degrees(self) -> float:
        return self.rotate.degrees

    def draw(self, g: torch.Generator, b: int, device: torch.device) -> dict[str, torch.Tensor]:
        # Draws happen in a fixed order and only for enabled parts, so seeds are stable per config.
        out = {"hflip": _bernoulli(g, b, self.hflip_p, device) if self.hflip_p > 0 else None,
               "vflip": _bernoulli(g, b, self.vflip_p, device) if self.vflip_p > 0 else None}
        if self.max_shift_px > 0:
            out["dx"] = _randint(g, b, -self.max_shift_px, self.max_shift_px, device)
            out["dy"] = _randint(g, b, -self.max_shift_px, self.max_shift_px, device)
        if self.degrees > 0:
            out["angle"] = _rand(g, b, device, -self.degrees, self.degrees)  # degrees, as torchvision's
        return out

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """uint8 in; uint8 out (exact pixels) except for bilinear rotation: float32 in 0..255."""
        return self.apply(x, self.draw(g, x.shape[0], x.device))

    def apply(self, x: torch.Tensor, r: Mapping[str, Any]) -> torch.Tensor:
        """The stage with the draws ``r`` of :meth:`draw`: no randomness (a compiled region may hold it)."""
        if r.get("hflip") is not None or r.get("vflip") is not None or "dx" in r:
            x = self._gather(x, r)
        return self._rotate(x, r["angle"]) if "angle" in r else x

    def _source_index(self, n: int, flip: torch.Tensor | None, shift: torch.Tensor | None,
                      b: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-image source indices [B, n] along one axis and, for zero borders, their validity: the
        flip first, then the crop of the padded image (torchvision's order: output i <- flip(pad(i + s)))."""
        idx = torch.arange(n, device=device).expand(b, n)
        valid = None
        if shift is not None:
            idx = idx + shift[:, None]
            if self.border == "reflect":
                idx = _reflect(idx, n)
            else:
                valid = (idx >= 0) & (idx < n)
                idx = idx.clamp(0, n - 1)
        if flip is not None:  # a flip maps [0, n) onto itself: validity is unchanged
            idx = torch.where(flip[:, None], n - 1 - idx, idx)
        return idx, valid

    def _gather(self, x: torch.Tensor, r: Mapping[str, Any]) -> torch.Tensor:
        b, c, h, w = x.shape
        rows, row_ok = self._source_index(h, r["vflip"], r.get("dy"), b, x.device)
        cols, col_ok = self._source_index(w, r["hflip"], r.get("dx"), b, x.device)
        flat = (rows[:, :, None] * w + cols[:, None, :]).view(b, 1, h * w)
        out = x.reshape(b, c, h * w).gather(2, flat.expand(b, c, h * w)).view(b, c, h, w)
        if row_ok is not None and col_ok is not None:
            out.mul_((row_ok[:, :, None] & col_ok[:, None, :])[:, None].to(out.dtype))
        return out

    def _rotate(self, x: torch.Tensor, angle_deg: torch.Tensor) -> torch.Tensor:
        """Rotate image i by ``angle_deg[i]`` (counter-clockwise) about its centre on torchvision's
        sampling grid (``rotate_image``: the same float32 grid, so nearest picks the same pixels)."""
        b, c, h, w = x.shape
        grid = _rotation_grid(angle_deg, h, w)
        padding = "zeros" if self.rotate.fill == "zero" else "reflection"
        if self.rotate.interpolation == "bilinear":
            return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode=padding, align_corners=False)
        # Nearest: sample an image of pixel numbers (1-based, 0 outside) and gather the uint8 pixels they
        # name: exact values, and one channel through grid_sample instead of c channels in float.
        numbers = torch.arange(1, h * w + 1, device=x.device, dtype=torch.float32).view(1, 1, h, w)
        picked = F.grid_sample(numbers.expand(b, 1, h, w), grid, mode="nearest", padding_mode=padding,
                               align_corners=False).view(b, 1, h * w).long()
        out = x.reshape(b, c, h * w).gather(2, (picked - 1).clamp_(min=0).expand(b, c, h * w)).view(b, c, h, w)
        if self.rotate.fill == "zero":
            out.mul_((picked > 0).view(b, 1, h, w).to(out.dtype))
        return out


# (h, w, device) -> torchvision's pixel-centred base grid [1, h*w, 3] and its rescaling [0.5 w, 0.5 h]:
# built once, so a batch makes no host-to-device copy
_GRID_BASES: dict[tuple[int, int, str], tuple[torch.Tensor, torch.Tensor]] = {}


def _rotation_grid(angle_deg: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """torchvision's ``rotate_image`` grid for each angle [B] -> [B, h, w, 2] (align_corners=False).

    Computed as torchvision computes it, so that nearest-neighbour sampling rounds the same way: the
    inverse matrix in float64 (``_get_inverse_affine_matrix`` with the angle taken mod 360 and negated),
    then float32 for the rescaled matrix and the product with the pixel-centred base grid."""
    dev = angle_deg.device
    key = (h, w, str(dev))
    if key not in _GRID_BASES:
        base = torch.empty(1, h, w, 3, device=dev)
        base[..., 0].copy_(torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w, device=dev))
        base[..., 1].copy_(torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h, device=dev).unsqueeze_(-1))
        base[..., 2].fill_(1)
        _GRID_BASES[key] = base.view(1, h * w, 3), torch.tensor([0.5 * w, 0.5 * h], device=dev)
    base, scale = _GRID_BASES[key]
    rad = torch.remainder(angle_deg.double(), 360.0).neg_().mul_(math.pi / 180.0)
    cos, sin = torch.cos(rad).float(), torch.sin(rad).float()
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, sin, zero], 1), torch.stack([-sin, cos, zero], 1)], 1)  # [B, 2, 3]
    rescaled = theta.transpose(1, 2).div_(scale)  # [B, 3, 2]
    return base.expand(angle_deg.shape[0], h * w, 3).bmm(rescaled).view(-1, h, w, 2)


def _factors(g: torch.Generator, b: int, amount: float, device: torch.device) -> torch.Tensor:
    """torchvision's jitter factors: uniform in [max(0, 1 - amount), 1 + amount], shape [B, 1, 1, 1]."""
    return _rand(g, b, device, max(0.0, 1 - amount), 1 + amount).view(b, 1, 1, 1)


def gray(x: torch.Tensor) -> torch.Tensor:
    """torchvision's ``rgb_to_grayscale`` of a float batch [B, 3, H, W] -> [B, 1, H, W]."""
    r, g, b = x.unbind(1)
    return (r * GRAY_WEIGHTS[0] + g * GRAY_WEIGHTS[1] + b * GRAY_WEIGHTS[2]).unsqueeze(1)


_CONSTANTS: dict[tuple[str, str], torch.Tensor] = {}


def _constant(name: str, values: Sequence[float], device: torch.device) -> torch.Tensor:
    """A small constant [1, C, 1, 1] kept per device: built once, so a batch makes no host-to-device copy
    (a copy per batch would be a pageable transfer, and could not be captured in a CUDA graph)."""
    key = (name, str(device))
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1).to(device)
    return _CONSTANTS[key]


def hue_shift(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """torchvision's ``adjust_hue`` per image: RGB -> HSV, hue + ``turns`` [B] (mod 1), -> RGB.

    Works on any non-negative scale (0..1 or 0..255): HSV's hue and saturation are scale-free and V is
    the channel maximum. Written as few whole-batch ops (each op is a kernel launch and ~5-8 us of host
    time on a GPU): with ``k`` the channel holding the maximum V, the hue in sextants is
    ``2 k + (x[k+1] - x[k+2]) / chroma`` (channels mod 3; at ties the candidates agree), and HSV -> RGB
    is the closed form ``channel = V - chroma * clamp(min(m, 4 - m), 0, 1)``, ``m = (n + 6 H) mod 6``
    with n = 5, 3, 1 for R, G, B, which equals torchvision's sextant table.
    """
    maxc, k = x.max(dim=1, keepdim=True)
    chroma = maxc - x.amin(dim=1, keepdim=True)
    # (x[k+1] - x[k+2]) at the max channel k; a gray pixel has chroma 0 and difference 0 (any finite divisor)
    h6 = (x.roll(-1, 1) - x.roll(-2, 1)).gather(1, k).div_(chroma + 1e-30)
    h6 = h6.add_(k, alpha=2).add_(turns.view(-1, 1, 1, 1), alpha=6.0)
    m = torch.remainder(h6 + _constant("hue_offsets", (5.0, 3.0, 1.0), x.device), 6.0)
    return torch.addcmul(maxc, torch.minimum(m, 4.0 - m).clamp_(0.0, 1.0), chroma, value=-1.0)


JITTER_OPS = ("brightness", "contrast", "saturation", "hue")


def jitter_names(op: ColorJitter, channels: int) -> list[str]:
    """The jitter ops that act: nonzero, and for 1-channel images only brightness and contrast
    (saturation and hue do nothing to gray images, as in torchvision)."""
    return [k for k in JITTER_OPS if getattr(op, k) > 0 and (channels == 3 or k in ("brightness", "contrast"))]


def _jitter_draw(op: ColorJitter, n: int, channels: int, g: torch.Generator,
                 device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor] | None:
    """Per-image factors ([n] per op, torchvision's ranges) and op orders [n, ops]; None if nothing acts.

    Each image's order is a uniform random permutation, drawn independently per image as torchvision's
    ``ColorJitter`` does (``random_order: false``: brightness, contrast, saturation, hue for every image).
    """
    names = jitter_names(op, channels)
    if not names:
        return None
    factors = {k: (_rand(g, n, device, -op.hue, op.hue) if k == "hue" else _factors(g, n, getattr(op, k), device).view(n))
               for k in names}
    if op.random_order:
        order = torch.rand(n, len(names), generator=g, device=g.device).argsort(1).to(device, non_blocking=True)
    else:
        order = torch.arange(len(names), device=device).expand(n, len(names))
    return factors, order


def _color_jitter(op: ColorJitter, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """torchvision's ColorJitter on a float batch in 0..255 (modified in place where possible): each image
    draws its own factors and op order (:func:`_jitter_draw`), then :func:`apply_jitter`."""
    drawn = _jitter_draw(op, x.shape[0], x.shape[1], g, x.device)
    if drawn is None:
        return x
    factors, order = drawn
    return apply_jitter(x, jitter_names(op, x.shape[1]), factors, order, random_order=op.random_order)


def apply_jitter(x: torch.Tensor, names: Sequence[str], factors: Mapping[str, torch.Tensor], order: torch.Tensor,
                 *, random_order: bool = True) -> torch.Tensor:
    """Image ``i`` applies ``names[order[i, 0]]``, then ``names[order[i, 1]]``, ... with its factor
    ``factors[name][i]``, clamping to [0, 255] after each op, as torchvision's kernels
    (``adjust_brightness/contrast/saturation/hue``) do. ``x``: float [B, C, H, W] in 0..255.
    ``random_order: false`` promises ``order`` is ``names``' order for every image (fewer passes).

    Few, whole-batch ops (no Python loop over images, no host sync, no per-batch host constants):

    * brightness, contrast and saturation are each ``f x + (1 - f) target`` with target 0, the image's
      mean gray, the pixel's gray. So one *blend pass* ``a x + b gray(x) + c mean(gray(x))`` with
      per-image coefficients (a, b, c) applies any of them, or the identity (1, 0, 0, exact), to every
      image at once; the coefficients of every pass come from one gather out of a per-image table.
    * hue runs once, on the whole batch: images are aligned at their hue op. Image ``i`` with hue at
      position ``k_i`` does its ``k_i`` earlier ops in the ``k_i`` blend passes just before the hue pass
      and the rest in the passes just after (identity elsewhere): with 4 ops, 3 + hue + 3 passes instead
      of 4 blend passes plus a hue pass per position.
    """
    n, c = x.shape[:2]
    dev = x.device
    ops = len(names)
    hue = names.index("hue") if "hue" in names else None
    ones = torch.ones(n, device=dev)
    zeros = torch.zeros(n, device=dev)
    # table [n, ops + 1, 3]: (a, b, c) of each op per image; the extra last row is the identity
    a = [ones if k == "hue" else factors[k] for k in names] + [ones]
    rest = {k: 1 - factors[k] for k in names if k in ("contrast", "saturation")}
    b = [rest["saturation"] if k == "saturation" else zeros for k in names] + [zeros]
    cc = [rest["contrast"] if k == "contrast" else zeros for k in names] + [zeros]
    table = torch.stack([torch.stack(a, 1), torch.stack(b, 1), torch.stack(cc, 1)], 2)
    if hue is None:
        before, after, slot_op = ops, 0, order  # one blend pass per position
    else:
        k = (order == hue).to(torch.uint8).argmax(1)  # each image's hue position
        before = ops - 1  # passes before the hue pass: enough for an image whose hue is last
        after = ops - 1 - names.index("hue") if not random_order else ops - 1  # fixed order: hue is last
        # pass s (s < before: before hue; s >= before: after it) applies the op at position s - before + k_i
        # (after the hue pass: s + 1 - before + k_i); outside 0..ops-1 it is the identity
        shift = torch.cat([torch.arange(before, device=dev) - before, torch.arange(after, device=dev) + 1])
        pos = shift[None, :] + k[:, None]
        inside = (pos >= 0) & (pos < ops)
        slot_op = torch.where(inside, order.gather(1, pos.clamp(0, ops - 1)), ops)
    coeffs = table.gather(1, slot_op[:, :, None].expand(n, slot_op.shape[1], 3))  # [n, passes, 3]
    passes = coeffs.permute(1, 2, 0).reshape(-1, 3, n, 1, 1, 1).unbind(0)
    need_gray = "saturation" in names or "contrast" in names
    for s, (fa, fb, fc) in enumerate(p.unbind(0) for p in passes):
        if hue is not None and s == before:
            x = hue_shift(x, factors["hue"])
        if need_gray:
            gx = (x * _constant("gray", GRAY_WEIGHTS, dev)).sum(1, keepdim=True) if c == 3 else x
            # torchvision's _blend: ratio * x + (1 - ratio) * target, clamped
            target = gx * fb if "contrast" not in names else torch.addcmul(gx.mean(dim=(2, 3), keepdim=True) * fc, gx, fb)
            x = torch.addcmul(target, x, fa).clamp_(0, 255)
        else:
            x = x.mul_(fa).clamp_(0, 255)
    if hue is not None and before == len(passes):  # hue is the last op of every image
        x = hue_shift(x, factors["hue"])
    return x


def _erase(op: Erase, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random erasing; a box that would not fit is clipped to the image (torchvision retries instead)."""
    b, _, h, w = x.shape
    dev = x.device
    apply = _bernoulli(g, b, op.p, dev)
    area = _rand(g, b, dev, *op.scale) * (h * w)
    aspect = torch.exp(_rand(g, b, dev, math.log(op.ratio[0]), math.log(op.ratio[1])))
    eh = torch.sqrt(area * aspect).round().clamp(1, h)
    ew = torch.sqrt(area / aspect).round().clamp(1, w)
    top = (_rand(g, b, dev) * (h - eh + 1)).floor()
    left = (_rand(g, b, dev) * (w - ew + 1)).floor()
    mask = _boxes(top, top + eh, left, left + ew, h, w) & apply[:, None, None, None]
    return x.masked_fill_(mask, 0.0)


def _cutout(op: Cutout, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    b, _, h, w = x.shape
    dev = x.device
    apply = _bernoulli(g, b, op.p, dev)
    cy, cx = _randint(g, b, 0, h - 1, dev), _randint(g, b, 0, w - 1, dev)
    y0, x0 = cy - op.size // 2, cx - op.size // 2
    mask = _boxes(y0, y0 + op.size, x0, x0 + op.size, h, w) & apply[:, None, None, None]
    return x.masked_fill_(mask, 0.0)


@dataclass(frozen=True)
class _Mixer:
    """mixup and/or cutmix with the batch reversed as partners; with both, one of them per batch."""

    mixup: Mix | None
    cutmix: Mix | None
    num_classes: int

    def __call__(self, x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        b, _, h, w = x.shape
        dev = x.device
        if self.mixup is not None and self.cutmix is not None:
            use_cut = _bernoulli(g, 1, 0.5, dev)  # shape [1]: one choice for the batch, like timm
        else:
            use_cut = torch.full((1,), self.cutmix is not None, device=dev)
        keep = torch.ones(b, device=dev)  # fraction of each image that stays its own
        weight = torch.zeros(b, 1, h, w, device=dev)  # partner weight per pixel
        if self.mixup is not None:
            lam = _beta(g, b, self.mixup.alpha, dev)
            lam = torch.where(_bernoulli(g, b, self.mixup.p, dev), lam, 1.0)
            keep = torch.where(use_cut, keep, lam)
            weight = torch.where(use_cut[:, None, None, None], weight, (1 - lam).view(b, 1, 1, 1))
        if self.cutmix is not None:
            box, lam_box = self._cutmix_boxes(self.cutmix, g, b, h, w, dev)
            keep = torch.where(use_cut, lam_box, keep)
            weight = torch.where(use_cut[:, None, None, None], box.float(), weight)
        x = torch.lerp(x, x.flip(0), weight)
        one_hot = F.one_hot(y, self.num_classes).float()
        keep = keep[:, None]
        return x, keep * one_hot + (1 - keep) * one_hot.flip(0)

    @staticmethod
    def _cutmix_boxes(op: Mix, g: torch.Generator, b: int, h: int, w: int,
                      dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image boxes of area ~(1 - lambda) at uniform centres (timm's rand_bbox), and the true lambda."""
        lam = _beta(g, b, op.alpha, dev)
        apply = _bernoulli(g, b, op.p, dev)
        cut = torch.sqrt(1 - lam)
        bh, bw = (cut * h).floor(), (cut * w).floor()
        cy, cx = _randint(g, b, 0, h - 1, dev).float(), _randint(g, b, 0, w - 1, dev).float()
        y0, y1 = (cy - (bh / 2).floor()).clamp(0, h), (cy + (bh / 2).floor()).clamp(0, h)
        x0, x1 = (cx - (bw / 2).floor()).clamp(0, w), (cx + (bw / 2).floor()).clamp(0, w)
        box = _boxes(y0, y1, x0, x1, h, w) & apply[:, None, None, None]
        lam_box = 1 - box.sum(dim=(1, 2, 3)).float() / (h * w)  # clipping at the border shrinks the box
        return box, lam_box
