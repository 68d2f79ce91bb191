"""Batched, seeded data augmentation on the data's device: uint8 [B,C,H,W] -> normalised float32.

A config maps augmentation names to hyperparameters (``{hflip: true, crop: {padding: 4}}``). Whatever
the key order, ops run in a fixed order of stages::

    geometric (hflip, vflip, crop, translate, rotation)   one fused resampling of the uint8 batch
    policy    (autoaugment, randaugment, trivialaugment)  per-image random op sequences on uint8
                                                          (``cifar_tune.policies``)
    colour    (color_jitter)                              brightness -> contrast -> saturation -> hue
    normalize ((x / 255 - mean) / std)
    erasing, cutout                                       on the normalised batch, filled with 0 (= mean)
    mixup / cutmix                                        soft targets [B, num_classes]

Why it is fast (a 2-core CPU does the CIFAR "flip + crop + jitter + rotation" recipe at ~80k images/s):
every random draw is one tensor per batch (per-image values, no Python loop over images, no host sync);
flip/crop/translate without rotation is one integer ``gather`` on uint8 (exact pixels); with rotation,
all geometric ops compose into one affine map and one ``grid_sample`` call; colour ops are per-image
scalars or 3x3 matrices broadcast over the batch.

Randomness comes only from the ``torch.Generator`` passed in, so a batch is reproducible from its seed.
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
GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale


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


@dataclass(frozen=True)
class ColorJitter:
    stage: ClassVar[str] = "colour"
    brightness: float
    contrast: float
    saturation: float
    hue: float


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


@AUGMENTS.register("rotation")
def rotation(*, degrees: float = 15.0) -> Rotate:
    """Rotation by an angle uniform in [-degrees, degrees] about the image centre (bilinear)."""
    return Rotate(_in_range("degrees", degrees, 0, 180))


@AUGMENTS.register("color_jitter")
def color_jitter(*, brightness: float = 0.2, contrast: float = 0.2, saturation: float = 0.2,
                 hue: float = 0.1) -> ColorJitter:
    """torchvision ColorJitter: factors uniform in [max(0, 1-v), 1+v]; hue shift uniform in [-hue, hue]."""
    return ColorJitter(_at_least("brightness", brightness, 0), _at_least("contrast", contrast, 0),
                       _at_least("saturation", saturation, 0), _in_range("hue", hue, 0, 0.5))


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
    """Flips, shifts and rotation composed into one map: source = shift + rotate(flip(output pixel))."""

    hflip_p: float
    vflip_p: float
    max_shift_px: int
    border: str  # "reflect" | "zeros"
    degrees: float

    @classmethod
    def from_ops(cls, ops: Sequence[Op]) -> "_Geometry | None":
        flips = {op.vertical: op.p for op in ops if isinstance(op, Flip)}
        shifts = [op for op in ops if isinstance(op, Shift)]
        degrees = sum(op.degrees for op in ops if isinstance(op, Rotate))
        borders = [op.border for op in shifts if op.border is not None]
        geo = cls(flips.get(False, 0.0), flips.get(True, 0.0), sum(op.max_px for op in shifts),
                  borders[0] if borders else "zeros", degrees)
        active = geo.hflip_p > 0 or geo.vflip_p > 0 or geo.max_shift_px > 0 or geo.degrees > 0
        return geo if active else None

    def draw(self, g: torch.Generator, b: int, device: torch.device) -> dict[str, torch.Tensor]:
        # Draws happen in a fixed order and only for enabled parts, so seeds are stable per config.
        out = {"hflip": _bernoulli(g, b, self.hflip_p, device) if self.hflip_p > 0 else None,
               "vflip": _bernoulli(g, b, self.vflip_p, device) if self.vflip_p > 0 else None}
        if self.max_shift_px > 0:
            out["dx"] = _randint(g, b, -self.max_shift_px, self.max_shift_px, device)
            out["dy"] = _randint(g, b, -self.max_shift_px, self.max_shift_px, device)
        if self.degrees > 0:
            out["angle"] = _rand(g, b, device, -self.degrees, self.degrees) * (math.pi / 180)
        return out

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """uint8 in; uint8 out for flips/shifts (exact), float32 in 0..255 when rotating."""
        r = self.draw(g, x.shape[0], x.device)
        return self._rotate(x, r) if "angle" in r else self._gather(x, r)

    def _source_index(self, n: int, flip: torch.Tensor | None, shift: torch.Tensor | None,
                      b: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-image source indices [B, n] along one axis and, for zero borders, their validity."""
        idx = torch.arange(n, device=device).expand(b, n)
        if flip is not None:
            idx = torch.where(flip[:, None], n - 1 - idx, idx)
        if shift is not None:
            idx = idx + shift[:, None]
        if self.border == "reflect" or shift is None:
            return _reflect(idx, n), None
        valid = (idx >= 0) & (idx < n)
        return idx.clamp(0, n - 1), valid

    def _gather(self, x: torch.Tensor, r: dict[str, torch.Tensor]) -> torch.Tensor:
        b, c, h, w = x.shape
        rows, row_ok = self._source_index(h, r["vflip"], r.get("dy"), b, x.device)
        cols, col_ok = self._source_index(w, r["hflip"], r.get("dx"), b, x.device)
        flat = (rows[:, :, None] * w + cols[:, None, :]).view(b, 1, h * w)
        out = x.reshape(b, c, h * w).gather(2, flat.expand(b, c, h * w)).view(b, c, h, w)
        if row_ok is not None and col_ok is not None:
            out.mul_((row_ok[:, :, None] & col_ok[:, None, :])[:, None].to(out.dtype))
        return out

    def _rotate(self, x: torch.Tensor, r: dict[str, torch.Tensor]) -> torch.Tensor:
        b, c, h, w = x.shape
        dev = x.device
        ones = torch.ones(b, device=dev)
        fx = 1 - 2 * r["hflip"].float() if r["hflip"] is not None else ones
        fy = 1 - 2 * r["vflip"].float() if r["vflip"] is not None else ones
        cos, sin = torch.cos(r["angle"]), torch.sin(r["angle"])
        dx = r["dx"].float() if "dx" in r else torch.zeros(b, device=dev)
        dy = r["dy"].float() if "dy" in r else torch.zeros(b, device=dev)
        # pixel-centred output coords -> source coords, then to [-1, 1] for align_corners=True
        sx, sy = 2 / max(w - 1, 1), 2 / max(h - 1, 1)
        u = (torch.arange(w, device=dev, dtype=torch.float32) - (w - 1) / 2)[None, None, :]
        v = (torch.arange(h, device=dev, dtype=torch.float32) - (h - 1) / 2)[None, :, None]
        grid = torch.empty(b, h, w, 2, device=dev)
        col = lambda t: t[:, None, None]  # noqa: E731  [B] -> [B, 1, 1]
        grid[..., 0] = (col(cos * fx * sx) * u - col(sin * fy * sx) * v).add_(col(dx * sx))
        grid[..., 1] = (col(sin * fx * sy) * u + col(cos * fy * sy) * v).add_(col(dy * sy))
        # align_corners=True + "reflection" mirrors about edge-pixel centres, as _reflect / F.pad do.
        mode = "reflection" if self.border == "reflect" else "zeros"
        return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode=mode, align_corners=True)


def _yiq_hue_basis() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """P0, P1, P2 with hue rotation by t = P0 + cos(t) P1 + sin(t) P2 (all 3x3, RGB -> RGB).

    Rotating the chroma plane (I, Q) of YIQ keeps luma and saturation and turns the hue: the standard
    fast stand-in for an HSV hue shift (exact for grays, close elsewhere), without per-pixel branching.
    """
    t = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                     dtype=torch.float64)
    t_inv = torch.linalg.inv(t)
    keep_y = torch.diag(torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    keep_iq = torch.diag(torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64))
    turn = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    return tuple((t_inv @ m @ t).float() for m in (keep_y, keep_iq, turn))  # type: ignore[return-value]


_HUE_BASIS = _yiq_hue_basis()


def _factors(g: torch.Generator, b: int, amount: float, device: torch.device) -> torch.Tensor:
    """torchvision's jitter factors: uniform in [max(0, 1 - amount), 1 + amount], shape [B, 1, 1, 1]."""
    return _rand(g, b, device, max(0.0, 1 - amount), 1 + amount).view(b, 1, 1, 1)


def _colour_affine(op: ColorJitter, x: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Contrast, saturation and hue of an RGB batch as one per-image map x -> m x + offset.

    Each is affine in the RGB vector, so they compose into a 3x3 matrix [B, 3, 3] and an offset
    [B, 3, 1] that cost one ``bmm`` for all three.
    """
    b, dev = x.shape[0], x.device
    # 3x3 products as broadcast sums: 256 tiny bmm GEMMs cost more than the whole batch's colour pass
    mm = lambda p, q: (p[:, :, :, None] * q[:, None, :, :]).sum(2)  # noqa: E731
    luma = torch.tensor(GRAY_WEIGHTS, device=dev)
    eye = torch.eye(3, device=dev).expand(b, 3, 3)
    m, offset = eye, torch.zeros(b, 3, 1, device=dev)
    if op.contrast > 0:  # blend with the image's mean luma: x -> f x + (1 - f) mean
        f = _factors(g, b, op.contrast, dev).view(b, 1, 1)
        m = f * eye
        offset = ((1 - f) * (x.mean(dim=(2, 3)) @ luma).view(b, 1, 1)).expand(b, 3, 1)
    if op.saturation > 0:  # blend with the pixel's luma: x -> f x + (1 - f) 1 luma^T x
        f = _factors(g, b, op.saturation, dev).view(b, 1, 1)
        sat = f * eye + (1 - f) * luma.view(1, 1, 3)
        m, offset = mm(sat, m), mm(sat, offset)
    if op.hue > 0:
        turn = _rand(g, b, dev, -op.hue, op.hue) * (2 * math.pi)
        p0, p1, p2 = (t.to(dev) for t in _HUE_BASIS)
        rot = p0 + torch.cos(turn).view(b, 1, 1) * p1 + torch.sin(turn).view(b, 1, 1) * p2
        m, offset = mm(rot, m), mm(rot, offset)
    return m, offset


def _color_jitter(op: ColorJitter, x: torch.Tensor, g: torch.Generator, a: torch.Tensor, b: torch.Tensor,
                  bounds: Sequence[tuple[float, float]]) -> torch.Tensor:
    """torchvision's ColorJitter on float ``x`` in 0..255 (modified in place), returned as ``x * a + b``.

    Brightness scales each image and clamps. Contrast, saturation and hue run as one per-image affine
    map (:func:`_colour_affine`) with the normalisation folded in, clamped once to the normalised image
    of [0, 255]; torchvision clamps after each op, which differs only where contrast or saturation > 1
    pushed a pixel out of range. The order is fixed (brightness, contrast, saturation, hue) where
    torchvision permutes it per image: a per-image order cannot be batched, the factor distributions
    are unchanged.
    """
    n, c = x.shape[:2]
    if op.brightness > 0:
        x.mul_(_factors(g, n, op.brightness, x.device)).clamp_(0, 255)
    if c == 1:  # saturation and hue are no-ops on 1-channel images, as in torchvision
        if op.contrast > 0:
            f = _factors(g, n, op.contrast, x.device)
            x.mul_(f).add_((1 - f) * x.mean(dim=(1, 2, 3), keepdim=True)).clamp_(0, 255)
        return x.mul_(a).add_(b)
    if not (op.contrast > 0 or op.saturation > 0 or op.hue > 0):
        return x.mul_(a).add_(b)
    m, offset = _colour_affine(op, x, g)
    m, offset = a.view(1, 3, 1) * m, a.view(1, 3, 1) * offset + b.view(1, 3, 1)
    # bmm + add_ rather than baddbmm: baddbmm first materialises the broadcast offset (slow on CPU)
    out = torch.bmm(m, x.view(n, 3, -1)).add_(offset).view_as(x)
    for ch, (lo, hi) in enumerate(bounds):  # a > 0: clamping after normalising == clamping before
        out[:, ch].clamp_(lo, hi)  # scalar bounds per channel: a tensor-bound clamp is ~5x slower
    return out


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


def _channel_params(mean: Sequence[float], std: Sequence[float], device: torch.device,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) with (x / scale - mean) / std == x * a + b, each [1, C, 1, 1]."""
    m = torch.tensor(mean, dtype=torch.float64)
    s = torch.tensor(std, dtype=torch.float64)
    a, b = 1 / (scale * s), -m / s
    return a.float().view(1, -1, 1, 1).to(device), b.float().view(1, -1, 1, 1).to(device)


def normalize(x_uint8: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(x / 255 - mean) / std as float32 [B, C, H, W]; the evaluation transform."""
    if len(mean) != x_uint8.shape[1] or len(std) != x_uint8.shape[1]:
        raise ValueError(f"mean/std have {len(mean)}/{len(std)} values for {x_uint8.shape[1]} channels")
    a, b = _channel_params(mean, std, x_uint8.device, 255.0)
    return x_uint8.to(torch.float32).mul_(a).add_(b)


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
        # normalised images of 0 and 255 per channel, as host floats (no device read in the hot path)
        self._bounds = tuple(((0 - m) / s, (1 - m) / s) for m, s in zip(self.mean, self.std, strict=True))

    def __repr__(self) -> str:
        return f"BatchAugment({', '.join(map(repr, self.ops)) or 'identity'})"

    def _norm_params(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = str(device)  # cached: building them would be a host->device copy per batch
        if key not in self._params:
            self._params[key] = _channel_params(self.mean, self.std, device, 255.0)
        return self._params[key]

    def __call__(self, x_uint8: torch.Tensor, y: torch.Tensor,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if x_uint8.dtype != torch.uint8 or x_uint8.dim() != 4 or x_uint8.shape[1] != len(self.mean):
            raise ValueError(f"expected uint8 [B, {len(self.mean)}, H, W], got {x_uint8.dtype} {tuple(x_uint8.shape)}")
        x = self._geometry(x_uint8, generator) if self._geometry is not None else x_uint8
        if self._policies:
            if x.dtype != torch.uint8:  # rotated: the policies work on uint8, as torchvision's do
                x = x.round_().clamp_(0, 255).to(torch.uint8)
            for policy in self._policies:
                x = policy(x, generator)
        a, b = self._norm_params(x.device)
        x = x.to(torch.float32)  # a copy for uint8 input, so in-place ops below never touch the caller's batch
        if self._jitter is None:
            x = x.mul_(a).add_(b)
        else:
            x = _color_jitter(self._jitter, x, generator, a, b, self._bounds)
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
