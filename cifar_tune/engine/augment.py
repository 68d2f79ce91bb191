"""Batched, seeded data augmentation on the data's device: uint8 [B,C,H,W] -> normalised float32.

A config maps augmentation names to hyperparameters (``{hflip: true, crop: {padding: 4}}``). Whatever
the key order, ops run in a fixed order of stages::

    geometric (hflip, vflip, crop, translate, rotation)   a gather, then torchvision's rotation, on uint8
    policy    (autoaugment, randaugment, trivialaugment)  per-image random op sequences on uint8
                                                          (``cifar_tune.engine.policies``)
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

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from cifar_tune.engine import policies as _policies  # noqa: F401  registers the policies into AUGMENTS
from cifar_tune.engine.augment_kernels import (
    _color_jitter,
    _cutout,
    _erase,
    _Geometry,
    _jitter_draw,
    _Mixer,
    apply_jitter,
    jitter_names,
)
from cifar_tune.engine.augment_ops import APPLIED_ORDER, AUGMENTS, STAGES, ColorJitter, Cutout, Erase, Mix, Op

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
        # uint8 -> uint8 stages registered by cifar_tune.engine.policies (AutoAugment, RandAugment, TrivialAugment)
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
