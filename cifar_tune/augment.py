"""Batched, seeded data augmentation on the data's device: uint8 [B,C,H,W] -> normalised float32.

A config maps augmentation names to hyperparameters (``{hflip: true, crop: {padding: 4}}``). Whatever
the key order, ops run in a fixed order of stages::

    geometric (hflip, vflip, crop, translate, rotation)   a gather, then torchvision's rotation, on uint8
    policy    (autoaugment, randaugment, trivialaugment)  per-image random op sequences on uint8
                                                          (``cifar_tune.policies``)
    colour    (color_jitter)                              brightness, contrast, saturation, hue in a random
                                                          order per image (torchvision's kernels)
    normalize ((x / 255 - mean) / std)
    erasing, cutout                                       on the normalised batch, filled with 0 (= mean)
    mixup / cutmix                                        soft targets [B, num_classes]

Why it is fast (measured by ``cifar-tune bench``, figures in the README's Performance section):
every random draw is one tensor per batch (per-image values, no Python loop over images, no host sync);
flip/crop/translate are one integer ``gather`` on uint8 (exact pixels); rotation is one ``grid_sample``
of a pixel-number plane on torchvision's grid and a gather (nearest) or one bilinear ``grid_sample``; colour ops are per-image
blends and an HSV hue shift on the whole batch.

Randomness comes only from the ``torch.Generator`` passed in, so a batch is reproducible from its seed.
Without a policy, ``BatchAugment.draw`` makes all of a batch's geometric and colour draws before any pixel
work and ``BatchAugment.dense`` is a pure function of the batch and those draws: the part that
``torch.compile`` fuses and a CUDA graph replays (``train.fast_path``).
"""

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from cifar_tune.registry import Registry

AUGMENTS = Registry("augmentation")

STAGES = ("geometric", "policy", "colour", "erase", "mix")  # normalize runs between colour and erase
# The order of application, whatever the config's key order (README, logs, tests).
APPLIED_ORDER = ("hflip", "vflip", "crop", "translate", "rotation", "autoaugment", "randaugment",
                 "trivialaugment", "color_jitter", "normalize",
                 "erasing", "cutout", "mixup", "cutmix")
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale (ITU-R 601 luma, as it rounds it)


# ----------------------------------------------------------------------------------------------------
# eager hyperparameter checks: messages start with the key, as the spec validator reports them


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{key}: must be a finite number, got {value!r}")
    return float(value)


def _integer(key: str, value: Any, lo: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key}: must be an integer, got {value!r}")
    if value < lo:
        raise ValueError(f"{key}: must be >= {lo}, got {value}")
    return value


def _in_range(key: str, value: Any, lo: float, hi: float) -> float:
    v = _number(key, value)
    if not lo <= v <= hi:
        raise ValueError(f"{key}: must be in [{lo:g}, {hi:g}], got {value}")
    return v


def _at_least(key: str, value: Any, lo: float, strict: bool = False) -> float:
    v = _number(key, value)
    if v < lo or (strict and v == lo):
        raise ValueError(f"{key}: must be {'>' if strict else '>='} {lo:g}, got {value}")
    return v


def _interval(key: str, value: Any, lo: float, hi: float) -> tuple[float, float]:
    if isinstance(value, str) or not isinstance(value, Sequence) or len(value) != 2:
        raise ValueError(f"{key}: must be a pair [min, max], got {value!r}")
    a, b = (_number(key, v) for v in value)
    if not lo <= a <= b <= hi:
        raise ValueError(f"{key}: must satisfy {lo:g} <= min <= max <= {hi:g}, got {list(value)}")
    return a, b


def _choice(key: str, value: Any, options: tuple[str, ...]) -> str:
    if value not in options:
        raise ValueError(f"{key}: must be one of {', '.join(options)}; got {value!r}")
    return value


# ----------------------------------------------------------------------------------------------------
# ops: what the builders return (validated hyperparameters plus the stage they run in)


@dataclass(frozen=True)
class Flip:
    stage: ClassVar[str] = "geometric"
    p: float
    vertical: bool


@dataclass(frozen=True)
class Shift:
    """Integer translation by up to ``max_px`` per axis; ``border`` None defers to other ops (zeros)."""

    stage: ClassVar[str] = "geometric"
    max_px: int
    border: str | None  # "reflect" | "zeros" | None


@dataclass(frozen=True)
class Rotate:
    stage: ClassVar[str] = "geometric"
    degrees: float
    interpolation: str = "nearest"  # "nearest" | "bilinear"
    fill: str = "zero"  # "zero" | "reflect": what the corners rotated in from outside the image show


@dataclass(frozen=True)
class ColorJitter:
    stage: ClassVar[str] = "colour"
    brightness: float
    contrast: float
    saturation: float
    hue: float
    random_order: bool = True  # per image, as torchvision's ColorJitter


@dataclass(frozen=True)
class Erase:
    stage: ClassVar[str] = "erase"
    p: float
    scale: tuple[float, float]  # erased area as a fraction of the image
    ratio: tuple[float, float]  # aspect ratio h/w, sampled log-uniformly


@dataclass(frozen=True)
class Cutout:
    stage: ClassVar[str] = "erase"
    size: int
    p: float


@dataclass(frozen=True)
class Mix:
    stage: ClassVar[str] = "mix"
    kind: str  # "mixup" | "cutmix"
    alpha: float
    p: float


Op = Flip | Shift | Rotate | ColorJitter | Erase | Cutout | Mix


# ----------------------------------------------------------------------------------------------------
# registry


@AUGMENTS.register("hflip")
def hflip(*, p: float = 0.5) -> Flip:
    """Mirror left-right with probability ``p``."""
    return Flip(_in_range("p", p, 0, 1), vertical=False)


@AUGMENTS.register("vflip")
def vflip(*, p: float = 0.5) -> Flip:
    """Mirror top-bottom with probability ``p``."""
    return Flip(_in_range("p", p, 0, 1), vertical=True)


@AUGMENTS.register("crop")
def crop(*, padding: int = 4, padding_mode: str = "reflect") -> Shift:
    """Random crop of the image padded by ``padding`` px per side (``reflect`` or ``zeros`` padding)."""
    return Shift(_integer("padding", padding), _choice("padding_mode", padding_mode, ("reflect", "zeros")))


@AUGMENTS.register("translate")
def translate(*, max_px: int = 4) -> Shift:
    """Random integer shift of up to ``max_px`` per axis; uncovered pixels are black (crop's mode if on)."""
    return Shift(_integer("max_px", max_px), border=None)


ROTATION_INTERPOLATIONS = ("nearest", "bilinear")
ROTATION_FILLS = ("zero", "reflect")


@AUGMENTS.register("rotation")
def rotation(*, degrees: float = 15.0, interpolation: str = "nearest", fill: str = "zero") -> Rotate:
    """Rotation by an angle uniform in [-degrees, degrees] about the image centre. The defaults are
    torchvision's ``RandomRotation(degrees)``: nearest neighbour, corners filled with black (0);
    ``interpolation: bilinear`` and ``fill: reflect`` (the image mirrored at its border) are options."""
    return Rotate(_in_range("degrees", degrees, 0, 180),
                  _choice("interpolation", interpolation, ROTATION_INTERPOLATIONS),
                  _choice("fill", fill, ROTATION_FILLS))


@AUGMENTS.register("color_jitter")
def color_jitter(*, brightness: float = 0.2, contrast: float = 0.2, saturation: float = 0.2,
                 hue: float = 0.1, random_order: bool = True) -> ColorJitter:
    """torchvision ColorJitter: factors uniform in [max(0, 1-v), 1+v]; hue shift uniform in [-hue, hue];
    the ops in a random order per image (``random_order: false``: brightness, contrast, saturation, hue)."""
    if not isinstance(random_order, bool):
        raise ValueError(f"random_order: must be true or false; got {random_order!r}")
    return ColorJitter(_at_least("brightness", brightness, 0), _at_least("contrast", contrast, 0),
                       _at_least("saturation", saturation, 0), _in_range("hue", hue, 0, 0.5), random_order)


@AUGMENTS.register("erasing")
def erasing(*, p: float = 0.5, scale: tuple[float, float] = (0.02, 0.33),
            ratio: tuple[float, float] = (0.3, 3.3)) -> Erase:
    """torchvision RandomErasing (value 0 after normalisation, i.e. the mean colour)."""
    lo, hi = _interval("ratio", ratio, 0, math.inf)
    if lo <= 0:
        raise ValueError(f"ratio: must be > 0, got {list(ratio)}")
    return Erase(_in_range("p", p, 0, 1), _interval("scale", scale, 0, 1), (lo, hi))


@AUGMENTS.register("cutout")
def cutout(*, size: int = 8, p: float = 1.0) -> Cutout:
    """Zero a ``size`` x ``size`` square at a uniform centre (clipped at the border), DeVries & Taylor 2017."""
    return Cutout(_integer("size", size, lo=1), _in_range("p", p, 0, 1))


@AUGMENTS.register("mixup")
def mixup(*, alpha: float = 1.0, p: float = 1.0) -> Mix:
    """Blend each image with a partner, lambda ~ Beta(alpha, alpha) per image; soft targets."""
    return Mix("mixup", _at_least("alpha", alpha, 0, strict=True), _in_range("p", p, 0, 1))


@AUGMENTS.register("cutmix")
def cutmix(*, alpha: float = 1.0, p: float = 1.0) -> Mix:
    """Paste a box of a partner image, area fraction 1 - lambda, lambda ~ Beta(alpha, alpha) per image."""
    return Mix("cutmix", _at_least("alpha", alpha, 0, strict=True), _in_range("p", p, 0, 1))


# ----------------------------------------------------------------------------------------------------
# random draws: on the generator's device, moved to the data's (no host sync either way)


def _rand(g: torch.Generator, n: int, device: torch.device, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    u = torch.rand(n, generator=g, device=g.device)
    if lo != 0.0 or hi != 1.0:
        u = u.mul_(hi - lo).add_(lo)
    return u.to(device, non_blocking=True)


def _randint(g: torch.Generator, n: int, lo: int, hi: int, device: torch.device) -> torch.Tensor:
    """Integers uniform in [lo, hi] (inclusive)."""
    return torch.randint(lo, hi + 1, (n,), generator=g, device=g.device).to(device, non_blocking=True)


def _bernoulli(g: torch.Generator, n: int, p: float, device: torch.device) -> torch.Tensor:
    return _rand(g, n, device) < p


def _gamma(g: torch.Generator, n: int, alpha: float, device: torch.device, tries: int = 16) -> torch.Tensor:
    """Gamma(alpha) by Marsaglia-Tsang, vectorised over ``tries`` candidates (torch's gamma has no generator).

    Acceptance is >= 95% per candidate for alpha >= 1, so 16 candidates all fail with p < 1e-20; alpha < 1
    uses Gamma(alpha) = Gamma(alpha + 1) * U ** (1 / alpha).
    """
    a = alpha if alpha >= 1 else alpha + 1
    d = a - 1 / 3
    c = 1 / math.sqrt(9 * d)
    z = torch.randn(n, tries, generator=g, device=g.device)
    u = torch.rand(n, tries, generator=g, device=g.device)
    v = (1 + c * z) ** 3
    ok = (v > 0) & (torch.log(u) < 0.5 * z * z + d - d * v + d * torch.log(v.clamp_min(1e-12)))
    first = ok.to(torch.uint8).argmax(dim=1, keepdim=True)  # first accepted candidate (0 if none)
    out = d * v.gather(1, first).squeeze(1).clamp_min(1e-12)
    if alpha < 1:
        out = out * torch.rand(n, generator=g, device=g.device).clamp_min(1e-12) ** (1 / alpha)
    return out.to(device, non_blocking=True)


def _beta(g: torch.Generator, n: int, alpha: float, device: torch.device) -> torch.Tensor:
    a, b = _gamma(g, n, alpha, device), _gamma(g, n, alpha, device)
    return a / (a + b).clamp_min(1e-12)


def _boxes(lo_y: torch.Tensor, hi_y: torch.Tensor, lo_x: torch.Tensor, hi_x: torch.Tensor,
           h: int, w: int) -> torch.Tensor:
    """Bool masks [B, 1, H, W] of the per-image boxes [lo_y, hi_y) x [lo_x, hi_x)."""
    rows = torch.arange(h, device=lo_y.device)[None, :, None]
    cols = torch.arange(w, device=lo_y.device)[None, None, :]
    inside = ((rows >= lo_y[:, None, None]) & (rows < hi_y[:, None, None])
              & (cols >= lo_x[:, None, None]) & (cols < hi_x[:, None, None]))
    return inside[:, None]


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


# ----------------------------------------------------------------------------------------------------
# public API


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host constant on ``device`` without a host sync: a blocking host-to-device copy synchronises the
    stream (and fails the step loop's ``strict_sync`` check); a non-blocking one from a fresh tensor does not."""
    return t.to(device, non_blocking=True)


def _channel_params(mean: Sequence[float], std: Sequence[float], device: torch.device,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) with (x / scale - mean) / std == x * a + b, each [1, C, 1, 1]."""
    m = torch.tensor(mean, dtype=torch.float64)
    s = torch.tensor(std, dtype=torch.float64)
    a, b = 1 / (scale * s), -m / s
    return to_device(a.float().view(1, -1, 1, 1), device), to_device(b.float().view(1, -1, 1, 1), device)


def normalize(x_uint8: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(x / 255 - mean) / std as float32 [B, C, H, W]; the evaluation transform."""
    if len(mean) != x_uint8.shape[1] or len(std) != x_uint8.shape[1]:
        raise ValueError(f"mean/std have {len(mean)}/{len(std)} values for {x_uint8.shape[1]} channels")
    a, b = _channel_params(mean, std, x_uint8.device, 255.0)
    return x_uint8.to(torch.float32).mul_(a).add_(b)


def normalizer(mean: Sequence[float], std: Sequence[float], device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """:func:`normalize` with its constants made on ``device`` once: per batch, no host tensor and no copy."""
    a, b = _channel_params(mean, std, device, 255.0)

    def norm(x_uint8: torch.Tensor) -> torch.Tensor:
        if a.shape[1] != x_uint8.shape[1]:
            raise ValueError(f"mean/std have {a.shape[1]} values for {x_uint8.shape[1]} channels")
        return x_uint8.to(torch.float32).mul_(a).add_(b)

    return norm


class BatchAugment:
    """The training transform: ``(x_uint8 [B,C,H,W], y [B], generator) -> (float32 x, targets)``.

    Targets are ``y`` unchanged unless mixup/cutmix is configured; then float soft targets
    [B, num_classes] (``F.cross_entropy`` accepts either).
    """

    def __init__(self, ops: Sequence[Op], *, mean: Sequence[float], std: Sequence[float], num_classes: int) -> None:
        if len(mean) != len(std) or not all(s > 0 for s in std):
            raise ValueError(f"std: need one positive std per mean, got mean={list(mean)} std={list(std)}")
        self.ops = tuple(ops)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.num_classes = num_classes
        self._geometry = _Geometry.from_ops(self.ops)
        # uint8 -> uint8 stages registered by cifar_tune.policies (AutoAugment, RandAugment, TrivialAugment)
        self._policies = [op for op in self.ops if op.stage == "policy"]
        self._jitter = next((op for op in self.ops if isinstance(op, ColorJitter)), None)
        if self._jitter is not None and not any((self._jitter.brightness, self._jitter.contrast,
                                                 self._jitter.saturation, self._jitter.hue)):
            self._jitter = None  # all-zero jitter is the identity: skip its passes over the batch
        self._erasers: list[Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = [
            *(lambda x, g, op=op: _erase(op, x, g) for op in self.ops if isinstance(op, Erase)),
            *(lambda x, g, op=op: _cutout(op, x, g) for op in self.ops if isinstance(op, Cutout)),
        ]
        mixes = {op.kind: op for op in self.ops if isinstance(op, Mix)}
        self._mixer = _Mixer(mixes.get("mixup"), mixes.get("cutmix"), num_classes) if mixes else None
        self._params: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __repr__(self) -> str:
        return f"BatchAugment({', '.join(map(repr, self.ops)) or 'identity'})"

    def _norm_params(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = str(device)  # cached: building them would be a host->device copy per batch
        if key not in self._params:
            self._params[key] = _channel_params(self.mean, self.std, device, 255.0)
        return self._params[key]

    @property
    def split(self) -> bool:
        """Whether every random draw can happen before the pixel work (:meth:`draw`, then :meth:`dense`, a
        pure function of the batch and the draws that ``torch.compile`` or a CUDA graph can take whole).
        Not with a policy: its per-image op draws sit between the geometric and colour stages."""
        return not self._policies

    def draw(self, g: torch.Generator, batch: int, channels: int, device: torch.device) -> dict[str, Any]:
        """The geometric and colour draws of one batch (tensors on ``device``), in the order ``__call__``
        makes them, so the split path gives the same batch from the same generator state."""
        out: dict[str, Any] = self._geometry.draw(g, batch, device) if self._geometry is not None else {}
        if self._jitter is not None and (drawn := _jitter_draw(self._jitter, batch, channels, g, device)) is not None:
            out["jitter_factors"], out["jitter_order"] = drawn
        return out

    def dense(self, x_uint8: torch.Tensor, draws: Mapping[str, Any]) -> torch.Tensor:
        """Geometry, colour jitter and normalisation of a uint8 batch with the given draws; no randomness."""
        x = x_uint8
        if self._geometry is not None:
            x = self._geometry.apply(x, draws)
        x = x.to(torch.float32)  # a copy for uint8 input, so in-place ops below never touch the caller's batch
        if "jitter_order" in draws:
            assert self._jitter is not None
            x = apply_jitter(x, jitter_names(self._jitter, x.shape[1]), draws["jitter_factors"], draws["jitter_order"],
                             random_order=self._jitter.random_order)
        a, b = self._norm_params(x.device)
        return x.mul_(a).add_(b)

    def __call__(self, x_uint8: torch.Tensor, y: torch.Tensor, generator: torch.Generator,
                 dense: Callable[[torch.Tensor, Mapping[str, Any]], torch.Tensor] | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """``dense``: a stand-in for :meth:`dense` (its compiled version); used where :attr:`split`."""
        if x_uint8.dtype != torch.uint8 or x_uint8.dim() != 4 or x_uint8.shape[1] != len(self.mean):
            raise ValueError(f"expected uint8 [B, {len(self.mean)}, H, W], got {x_uint8.dtype} {tuple(x_uint8.shape)}")
        if self.split:
            x = (dense or self.dense)(x_uint8, self.draw(generator, x_uint8.shape[0], x_uint8.shape[1], x_uint8.device))
            return self._tail(x, y, generator)
        x = self._geometry(x_uint8, generator) if self._geometry is not None else x_uint8
        if self._policies:
            if x.dtype != torch.uint8:  # rotated: the policies work on uint8, as torchvision's do
                x = x.round_().clamp_(0, 255).to(torch.uint8)
            for policy in self._policies:
                x = policy(x, generator)
        a, b = self._norm_params(x.device)
        x = x.to(torch.float32)  # a copy for uint8 input, so in-place ops below never touch the caller's batch
        if self._jitter is not None:
            x = _color_jitter(self._jitter, x, generator)
        return self._tail(x.mul_(a).add_(b), y, generator)

    def _tail(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Erasing and mixing on the normalised batch (their draws come after the dense stages' draws)."""
        for erase in self._erasers:
            x = erase(x, generator)
        if self._mixer is not None:
            return self._mixer(x, y, generator)
        return x, y


def _hyperparameters(name: str, value: Mapping[str, Any] | bool | None) -> dict[str, Any] | None:
    """None when the augmentation is off, else the keyword arguments for its builder."""
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{name}: expected true, false, null or a mapping of hyperparameters, got {value!r}")
    known = AUGMENTS.hyperparameters(name)
    for key in value:
        if key not in known:
            raise ValueError(f"{key}: not a hyperparameter of augmentation '{name}'; "
                             f"available: {', '.join(known) or 'none'}")
    return dict(value)


def build_augment(cfg: Mapping[str, Mapping[str, Any] | bool | None], *, mean: Sequence[float],
                  std: Sequence[float], num_classes: int) -> BatchAugment:
    """Build the training transform; the order of ``cfg`` keys does not matter (see module docstring)."""
    named: list[tuple[str, Op]] = []
    for name, value in cfg.items():
        builder = AUGMENTS.get_builder(name)  # UnknownNameError lists the available names
        kwargs = _hyperparameters(name, value)
        if kwargs is not None:
            named.append((name, builder(**kwargs)))

    def rank(item: tuple[str, Op]) -> tuple[int, int]:
        name, op = item
        return STAGES.index(op.stage), APPLIED_ORDER.index(name) if name in APPLIED_ORDER else len(APPLIED_ORDER)

    ops = [op for _, op in sorted(named, key=rank)]  # the documented order, never the key order
    return BatchAugment(ops, mean=mean, std=std, num_classes=num_classes)


# The policies register themselves into AUGMENTS; imported last because they build on this module.
from cifar_tune import policies as _policies  # noqa: E402, F401
