"""The augmentation registry's entries: per-op hyperparameter classes and their checks, and the seeded
per-batch random draws the batched kernels use."""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

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
