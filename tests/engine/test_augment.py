"""cifar_tune.engine.augment: every registry entry, exact semantics of the simple ops, validation messages."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from cifar_tune.engine import augment as A
from cifar_tune.engine import augment_kernels, augment_ops
from cifar_tune.engine.augment import AUGMENTS, build_augment, normalize
from cifar_tune.registry import UnknownNameError

MEAN, STD, K = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3), 7


def _batch(b: int = 16, c: int = 3, s: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (b, c, s, s), generator=g, dtype=torch.uint8)
    return x, torch.randint(0, K, (b,), generator=g)


def _run(cfg: dict[str, Any], x: torch.Tensor, y: torch.Tensor, seed: int = 0,
         mean: tuple[float, ...] = MEAN, std: tuple[float, ...] = STD) -> tuple[torch.Tensor, torch.Tensor]:
    aug = build_augment(cfg, mean=mean, std=std, num_classes=K)
    return aug(x, y, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(AUGMENTS))
def test_every_entry_shape_determinism_per_image(name: str) -> None:
    x, y = _batch()
    out, target = _run({name: True}, x, y)
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    again, target_again = _run({name: True}, x, y)
    assert torch.equal(out, again) and torch.equal(target, target_again)
    if name in ("mixup", "cutmix"):
        assert target.shape == (16, K) and target.dtype == torch.float32
        assert torch.allclose(target.sum(1), torch.ones(16))
        assert len(set(target.max(1).values.tolist())) > 1  # a lambda per image
    else:
        assert target is y
        same = x[:1].expand(32, -1, -1, -1).contiguous()  # one image, 32 copies: the draws must differ
        out_same, _ = _run({name: True}, same, y[:1].expand(32))
        assert len({bytes(o.numpy()) for o in out_same}) > 1
    other, other_target = _run({name: True}, x, y, seed=1)
    assert not (torch.equal(out, other) and torch.equal(target, other_target))  # the seed matters


def test_normalize_matches_formula() -> None:
    x, _ = _batch()
    expected = (x.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    assert torch.allclose(normalize(x, MEAN, STD), expected, atol=1e-5)
    out, _ = _run({}, x, _batch()[1])
    assert torch.allclose(out, expected, atol=1e-5)
    with pytest.raises(ValueError, match="3 channels"):
        normalize(x, (0.5,), (0.2,))


@pytest.mark.parametrize("name, dim", [("hflip", -1), ("vflip", -2)])
def test_flip_is_exact_mirror(name: str, dim: int) -> None:
    x, y = _batch()
    out, _ = _run({name: {"p": 1.0}}, x, y)
    assert torch.equal(out, normalize(x.flip(dim), MEAN, STD))
    out, _ = _run({name: {"p": 0.0}}, x, y)
    assert torch.equal(out, normalize(x, MEAN, STD))


def _windows(padded: torch.Tensor, s: int) -> list[torch.Tensor]:
    n = padded.shape[-1] - s
    return [padded[..., i:i + s, j:j + s] for i in range(n + 1) for j in range(n + 1)]


@pytest.mark.parametrize("mode, pad_mode", [("reflect", "reflect"), ("zeros", "constant")])
def test_crop_is_exact_window_of_padded_image(mode: str, pad_mode: str) -> None:
    x, y = _batch(b=24)
    out, _ = _run({"crop": {"padding": 3, "padding_mode": mode}}, x, y)
    padded = F.pad(x, (3, 3, 3, 3), mode=pad_mode)
    offsets = set()
    for i in range(len(x)):
        matches = [k for k, w in enumerate(_windows(padded[i], 12)) if torch.equal(out[i], normalize(w[None], MEAN, STD)[0])]
        assert matches, f"image {i} is not a window of the padded image"
        offsets.add(matches[0])
    assert len(offsets) > 5  # per-image offsets


def test_crop_and_flip_compose_exactly() -> None:
    x, y = _batch()
    out, _ = _run({"crop": {"padding": 2}, "hflip": {"p": 1.0}}, x, y)
    padded = F.pad(x, (2, 2, 2, 2), mode="reflect")
    for i in range(len(x)):
        assert any(torch.equal(out[i], normalize(w.flip(-1)[None], MEAN, STD)[0]) for w in _windows(padded[i], 12))


def test_translate_shifts_in_zeros() -> None:
    x, y = _batch()
    out, _ = _run({"translate": {"max_px": 2}}, x, y)
    padded = F.pad(x, (2, 2, 2, 2))
    for i in range(len(x)):
        assert any(torch.equal(out[i], normalize(w[None], MEAN, STD)[0]) for w in _windows(padded[i], 12))


def test_rotation_geometry() -> None:
    """Tiny angles must reproduce the input: catches swapped axes, wrong scale or centre."""
    x, y = _batch()
    ref = normalize(x, MEAN, STD)
    out, _ = _run({"rotation": {"degrees": 1e-3}}, x, y)
    assert torch.equal(out, ref)  # nearest neighbour: the same pixels
    out, _ = _run({"rotation": {"degrees": 1e-3, "interpolation": "bilinear"}, "hflip": {"p": 1.0}}, x, y)
    assert (out - normalize(x.flip(-1), MEAN, STD)).abs().max() < 0.05
    big, _ = _run({"rotation": {"degrees": 30}}, x, y)
    assert (big - ref).abs().mean() > 0.1
    flat = torch.full((4, 3, 12, 12), 200, dtype=torch.uint8)
    for interpolation in ("nearest", "bilinear"):
        # a constant image stays constant under reflect-filled rotation (no black corners) ...
        rot = {"degrees": 40, "interpolation": interpolation}
        out, _ = _run({"rotation": {**rot, "fill": "reflect"}, "crop": {"padding": 4}}, flat, y[:4])
        assert torch.allclose(out, normalize(flat, MEAN, STD), atol=1e-4)
        # ... and gets black corners under the default zero fill, whatever crop's padding mode
        out, _ = _run({"rotation": rot, "crop": {"padding": 4}}, flat, y[:4])
        black = normalize(torch.zeros(1, 3, 1, 1, dtype=torch.uint8), MEAN, STD)[0, :, 0, 0]
        corners = out[:, :, [0, 0, -1, -1], [0, -1, 0, -1]]  # [B, C, 4]
        assert ((corners - black.view(1, 3, 1)).abs().amax(1) < 1e-4).sum() >= 4  # most images lose a corner


def test_rotation_defaults_are_torchvisions_random_rotation() -> None:
    """What the seed recipes used: v2.RandomRotation(degrees) is nearest neighbour with a 0 fill."""
    from torchvision.transforms import v2

    tv = v2.RandomRotation(15)
    rot = AUGMENTS["rotation"]()
    assert v2.InterpolationMode(tv.interpolation) == v2.InterpolationMode.NEAREST and rot.interpolation == "nearest"
    fills = tv.fill.values() if isinstance(tv.fill, dict) else [tv.fill]
    assert set(fills) == {0} and rot.fill == "zero"


@pytest.mark.parametrize("padding_mode", ["reflect", "zeros"])
@pytest.mark.parametrize("size", [(32, 32), (15, 22)])
def test_geometric_stage_equals_torchvisions_pipeline(padding_mode: str, size: tuple[int, int]) -> None:
    """hflip + crop + rotation (defaults) against torchvision's RandomHorizontalFlip, RandomCrop(padding,
    padding_mode) and RandomRotation applied image by image with the same draws: bitwise equal."""
    from torchvision.transforms.v2 import functional as TF

    g = torch.Generator().manual_seed(5)
    x = torch.randint(0, 256, (64, 3, *size), generator=g, dtype=torch.uint8)
    cfg = {"hflip": True, "crop": {"padding": 4, "padding_mode": padding_mode}, "rotation": {"degrees": 45}}
    aug = build_augment(cfg, mean=MEAN, std=STD, num_classes=K)
    out, _ = aug(x, torch.zeros(64, dtype=torch.int64), torch.Generator().manual_seed(7))
    r = aug._geometry.draw(torch.Generator().manual_seed(7), 64, x.device)  # the geometric stage draws first
    ref = []
    for i in range(64):
        img = TF.horizontal_flip(x[i]) if r["hflip"][i] else x[i]
        img = TF.pad(img, [4], padding_mode="reflect" if padding_mode == "reflect" else "constant")
        img = TF.crop(img, 4 + int(r["dy"][i]), 4 + int(r["dx"][i]), *size)
        ref.append(TF.rotate(img, float(r["angle"][i]), interpolation=TF.InterpolationMode.NEAREST))
    assert torch.equal(out, normalize(torch.stack(ref), MEAN, STD))


def test_bilinear_rotation_is_torchvisions_before_its_rounding() -> None:
    """``interpolation: bilinear`` keeps float pixels; rounded, they are torchvision's bilinear rotate."""
    from torchvision.transforms.v2 import functional as TF

    x, _ = _batch(b=64, s=20, seed=2)
    geo = A._Geometry.from_ops([AUGMENTS["rotation"](degrees=90, interpolation="bilinear")])
    angles = torch.linspace(-90, 90, 64)
    out = geo._rotate(x, angles)
    ref = torch.stack([TF.rotate(x[i], float(angles[i]), interpolation=TF.InterpolationMode.BILINEAR)
                       for i in range(64)])
    assert out.dtype == torch.float32 and torch.equal(out.round().to(torch.uint8), ref)


def test_zero_color_jitter_is_identity() -> None:
    x, y = _batch()
    cfg = {"color_jitter": {"brightness": 0, "contrast": 0, "saturation": 0, "hue": 0}}
    assert torch.equal(_run(cfg, x, y)[0], normalize(x, MEAN, STD))


def test_saturation_and_hue_keep_grays() -> None:
    gray = torch.randint(0, 256, (8, 1, 12, 12), dtype=torch.uint8).expand(8, 3, 12, 12).contiguous()
    cfg = {"color_jitter": {"brightness": 0, "contrast": 0, "saturation": 0.9, "hue": 0.5}}
    out, _ = _run(cfg, gray, torch.zeros(8, dtype=torch.int64))
    assert torch.allclose(out, normalize(gray, MEAN, STD), atol=1e-3)


def test_color_jitter_ranges() -> None:
    x, y = _batch(b=64)
    x = (x // 2 + 64).to(torch.uint8)  # stay away from clamping
    out, _ = _run({"color_jitter": {"brightness": 0.3, "contrast": 0, "saturation": 0, "hue": 0}}, x, y, mean=(0, 0, 0), std=(1, 1, 1))
    ratio = (out * 255 / x.float()).flatten(1)
    assert torch.allclose(ratio.min(1).values, ratio.max(1).values, atol=1e-4)  # one factor per image
    assert ratio.min() >= 0.7 - 1e-4 and ratio.max() <= 1.3 + 1e-4 and ratio[:, 0].std() > 0.05
    hue_out, _ = _run({"color_jitter": {"brightness": 0, "contrast": 0, "saturation": 0, "hue": 0.2}}, x, y)
    back = (hue_out * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)) * 255
    # an HSV hue shift keeps every pixel's max and min channel (HSV value and chroma)
    assert torch.allclose(back.amax(1), x.float().amax(1), atol=1e-3)
    assert torch.allclose(back.amin(1), x.float().amin(1), atol=1e-3)
    assert (back - x.float()).abs().amax() > 20  # and does turn the hue


def test_grayscale_images() -> None:
    x, y = _batch(c=1)
    cfg = {"hflip": True, "crop": True, "rotation": True, "color_jitter": True, "erasing": True}
    out, _ = _run(cfg, x, y, mean=(0.5,), std=(0.2,))
    assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("cfg", [{"erasing": {"p": 1.0}}, {"cutout": {"size": 5, "p": 1.0}}])
def test_erasing_writes_a_rectangle(cfg: dict[str, Any]) -> None:
    x, y = _batch()
    x = x.clamp(1, 254)  # no pixel normalises to exactly 0 by chance
    out, _ = _run(cfg, x, y, mean=(0, 0, 0), std=(1, 1, 1))
    changed = out != normalize(x, (0, 0, 0), (1, 1, 1))
    for i in range(len(x)):
        mask = changed[i].all(0)
        assert (changed[i].any(0) == mask).all() and mask.any()  # every channel, same pixels
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        box = torch.zeros_like(mask)
        box[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
        assert torch.equal(mask, box) and (out[i][:, mask] == 0).all()
        if "cutout" in cfg:
            assert len(rows) <= 5 and len(cols) <= 5


def test_erasing_p_zero_is_identity() -> None:
    x, y = _batch()
    assert torch.equal(_run({"erasing": {"p": 0.0}, "cutout": {"p": 0.0}}, x, y)[0], normalize(x, MEAN, STD))


def test_mixup_blends_with_reversed_batch() -> None:
    x, _ = _batch()
    y = torch.arange(16) % K
    out, target = _run({"mixup": {"alpha": 0.4}}, x, y)
    assert torch.allclose(target.sum(1), torch.ones(16)) and (target >= 0).all()
    ref = normalize(x, MEAN, STD)
    for i in range(16):
        if y[i] == y.flip(0)[i]:
            continue
        lam = target[i, y[i]]
        assert torch.allclose(out[i], lam * ref[i] + (1 - lam) * ref.flip(0)[i], atol=1e-4)


def test_cutmix_targets_match_pasted_area() -> None:
    x, _ = _batch()
    y = torch.arange(16) % K
    out, target = _run({"cutmix": {"alpha": 1.0}}, x, y)
    ref = normalize(x, MEAN, STD)
    for i in range(16):
        if y[i] == y.flip(0)[i]:
            continue
        own = (out[i] == ref[i]).all(0).float().mean()
        assert torch.isclose(target[i, y[i]], own, atol=1e-6)


def test_mixup_and_cutmix_choose_one_per_batch() -> None:
    x, y = _batch()
    cfg = {"mixup": True, "cutmix": True}
    ref = normalize(x, MEAN, STD)
    kinds = set()
    for seed in range(8):
        out, target = _run(cfg, x, y, seed=seed)
        assert torch.allclose(target.sum(1), torch.ones(16))
        exact = (out == ref).all(1).flatten(1).float().mean(1)  # pixels untouched, per image
        kinds.add("cutmix" if (exact > 0.01).all() else "mixup")
    assert kinds == {"mixup", "cutmix"}


def test_beta_sampler_moments() -> None:
    g = torch.Generator().manual_seed(0)
    for alpha in (0.4, 1.0, 3.0):
        lam = augment_ops._beta(g, 20000, alpha, torch.device("cpu"))
        assert lam.min() >= 0 and lam.max() <= 1
        assert abs(lam.mean() - 0.5) < 0.02
        assert abs(lam.var() - 1 / (4 * (2 * alpha + 1))) < 0.01


def test_order_is_fixed_whatever_the_key_order() -> None:
    x, y = _batch()
    cfg = {"color_jitter": True, "erasing": True, "rotation": True, "hflip": True, "crop": True, "mixup": True}
    forward, _ = _run(cfg, x, y)
    backward, _ = _run(dict(reversed(list(cfg.items()))), x, y)
    assert torch.equal(forward, backward)
    aug = build_augment(cfg, mean=MEAN, std=STD, num_classes=K)
    assert [type(op).__name__ for op in aug.ops] == ["Flip", "Shift", "Rotate", "ColorJitter", "Erase", "Mix"]


def test_off_values_and_defaults() -> None:
    x, y = _batch()
    assert torch.equal(_run({"hflip": False, "rotation": None}, x, y)[0], normalize(x, MEAN, STD))
    assert AUGMENTS.defaults("crop") == {"padding": 4, "padding_mode": "reflect"}
    assert set(AUGMENTS.hyperparameters("color_jitter")) == {"brightness", "contrast", "saturation", "hue", "random_order"}


def test_unknown_name_lists_available() -> None:
    with pytest.raises(UnknownNameError) as err:
        build_augment({"hflp": True}, mean=MEAN, std=STD, num_classes=K)
    msg = str(err.value)
    assert "unknown augmentation 'hflp'" in msg and "did you mean 'hflip'" in msg
    assert "available: " + ", ".join(sorted(AUGMENTS)) in msg


@pytest.mark.parametrize("cfg, message", [
    ({"rotation": {"degrees": -3}}, "degrees: must be in [0, 180], got -3"),
    ({"rotation": {"interpolation": "bicubic"}}, "interpolation: must be one of nearest, bilinear; got 'bicubic'"),
    ({"rotation": {"fill": "black"}}, "fill: must be one of zero, reflect; got 'black'"),
    ({"hflip": {"p": 1.5}}, "p: must be in [0, 1], got 1.5"),
    ({"crop": {"padding": -1}}, "padding: must be >= 0, got -1"),
    ({"crop": {"padding": 2.5}}, "padding: must be an integer"),
    ({"crop": {"padding_mode": "wrap"}}, "padding_mode: must be one of reflect, zeros"),
    ({"color_jitter": {"hue": 0.7}}, "hue: must be in [0, 0.5]"),
    ({"color_jitter": {"brightness": "lots"}}, "brightness: must be a finite number"),
    ({"erasing": {"scale": [0.5, 0.1]}}, "scale: must satisfy 0 <= min <= max <= 1"),
    ({"erasing": {"ratio": 2}}, "ratio: must be a pair"),
    ({"cutout": {"size": 0}}, "size: must be >= 1"),
    ({"mixup": {"alpha": 0}}, "alpha: must be > 0"),
    ({"translate": {"max_px": True}}, "max_px: must be an integer"),
    ({"crop": {"pad": 4}}, "pad: not a hyperparameter of augmentation 'crop'; available: padding, padding_mode"),
    ({"hflip": 3}, "hflip: expected true, false, null or a mapping"),
])
def test_bad_hyperparameters_name_the_key(cfg: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as err:
        build_augment(cfg, mean=MEAN, std=STD, num_classes=K)
    assert message in str(err.value)


def test_input_checks() -> None:
    aug = build_augment({"hflip": True}, mean=MEAN, std=STD, num_classes=K)
    with pytest.raises(ValueError, match="expected uint8"):
        aug(torch.zeros(2, 3, 8, 8), torch.zeros(2, dtype=torch.int64), torch.Generator())
    with pytest.raises(ValueError, match="std"):
        build_augment({}, mean=MEAN, std=(0.1, 0.0, 0.1), num_classes=K)


@pytest.mark.parametrize("cfg", [
    {"hflip": True, "crop": {"padding": 4}, "color_jitter": True, "rotation": {"degrees": 15}},
    {"hflip": True, "crop": {"padding": 4}, "randaugment": True, "cutout": {"size": 8}},
    {"vflip": True, "translate": {"max_px": 3}, "color_jitter": {"hue": 0.2}, "mixup": {"alpha": 0.2}},
], ids=["jitter-rotation", "randaugment-cutout", "hue-mixup"])
def test_a_batch_is_augmented_by_whole_batch_ops(cfg: dict) -> None:
    """The speed of the augmentation rests on its ops working on the whole batch, never image by image:
    the number of ATen ops dispatched for a batch of 2048 is the number for a batch of 256 (a policy
    runs one group of ops per op variant it drew, at most its op table's size, which 256 images reach).
    Counted, not timed (a wall-clock floor fails on a loaded machine and passes a per-image loop on a
    fast one); the speed itself is `cifar-tune bench`'s."""
    from cifar_tune.engine.opcount import OpCounter

    aug = build_augment(cfg, mean=MEAN, std=STD, num_classes=K)

    def ops(batch: int) -> int:
        x = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8)
        y = torch.randint(0, K, (batch,))
        aug(x, y, torch.Generator().manual_seed(0))  # first call: cached constants and grids
        counter = OpCounter()
        with counter:
            aug(x, y, torch.Generator().manual_seed(1))
        return counter.total

    small, large = ops(256), ops(2048)
    assert small == large, f"{small} ops for 256 images, {large} for 2048: some stage loops over images"


# ----------------------------------------------------------- colour jitter vs torchvision.transforms.v2

TV_OPS = {"brightness": "adjust_brightness", "contrast": "adjust_contrast", "saturation": "adjust_saturation",
          "hue": "adjust_hue"}


def _tv_jitter(x01: torch.Tensor, names: list[str], factors: dict[str, torch.Tensor], order: torch.Tensor) -> torch.Tensor:
    """torchvision's tensor kernels, one image at a time, in each image's order: the reference."""
    TF = pytest.importorskip("torchvision.transforms.v2.functional")
    out = []
    for i, img in enumerate(x01):
        for j in order[i].tolist():
            img = getattr(TF, TV_OPS[names[j]])(img, float(factors[names[j]][i]))
        out.append(img)
    return torch.stack(out)


def _ours(x01: torch.Tensor, names: list[str], factors: dict[str, torch.Tensor], order: torch.Tensor) -> torch.Tensor:
    return A.apply_jitter(x01 * 255, names, factors, order) / 255


@pytest.mark.parametrize("name,values", [
    ("brightness", [0.0, 0.4, 0.8, 1.0, 1.3, 1.9]),
    ("contrast", [0.0, 0.5, 0.9, 1.0, 1.4, 2.0]),
    ("saturation", [0.0, 0.3, 0.8, 1.0, 1.6, 2.5]),
    ("hue", [-0.5, -0.3, -0.1, 0.0, 0.05, 0.2, 0.45, 0.5]),
])
def test_each_colour_op_equals_torchvision(name: str, values: list[float]) -> None:
    """Per-image factors (one image per value) on random images: within 2/255 of torchvision per pixel."""
    g = torch.Generator().manual_seed(1)
    x01 = torch.randint(0, 256, (len(values), 3, 16, 16), generator=g).float() / 255
    factors = {name: torch.tensor(values)}
    order = torch.zeros(len(values), 1, dtype=torch.long)
    diff = (_ours(x01, [name], factors, order) - _tv_jitter(x01, [name], factors, order)).abs()
    assert diff.max() <= 2 / 255, f"max {diff.max() * 255:.2f}/255, mean {diff.mean() * 255:.3f}/255"


def test_jitter_in_per_image_orders_equals_torchvision() -> None:
    """All four ops, every image in its own order (all 24 permutations), factors drawn per image."""
    import itertools

    names = list(augment_kernels.JITTER_OPS)
    perms = torch.tensor(list(itertools.permutations(range(4))))
    n = len(perms)
    g = torch.Generator().manual_seed(2)
    x01 = torch.randint(0, 256, (n, 3, 16, 16), generator=g).float() / 255
    factors = {k: torch.rand(n, generator=g) * 1.2 + 0.4 for k in names[:3]}
    factors["hue"] = torch.rand(n, generator=g) - 0.5
    diff = (_ours(x01, names, factors, perms) - _tv_jitter(x01, names, factors, perms)).abs()
    assert diff.max() <= 2 / 255, f"max {diff.max() * 255:.2f}/255"


def test_jitter_draws_are_per_image_and_orders_are_random() -> None:
    """Each image gets its own factors and its own op order; every op appears at every position."""
    op = augment_ops.color_jitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1)
    g = torch.Generator().manual_seed(3)
    factors, order = A._jitter_draw(op, 400, 3, g, torch.device("cpu"))
    assert (order.sort(1).values == torch.arange(4)).all()  # a permutation per image
    counts = torch.stack([torch.bincount(order[:, p], minlength=4) for p in range(4)])
    assert (counts > 60).all(), counts  # ~100 each: every op at every position
    assert len({tuple(r) for r in order.tolist()}) == 24
    for name, lo, hi in (("brightness", 0.6, 1.4), ("hue", -0.1, 0.1)):
        assert lo <= factors[name].min() < factors[name].max() <= hi  # per image, in torchvision's range
    # the whole op on a batch of one repeated image: outputs differ per image
    x = torch.randint(0, 256, (1, 3, 8, 8), dtype=torch.uint8).expand(32, 3, 8, 8).contiguous()
    out = A._color_jitter(op, x.float(), torch.Generator().manual_seed(4))
    assert len({tuple(o.flatten()[:16].tolist()) for o in out}) == 32
    fixed = A._color_jitter(augment_ops.color_jitter(random_order=False), x.float(), torch.Generator().manual_seed(4))
    assert fixed.shape == x.shape


@pytest.mark.parametrize("names", [["brightness", "contrast", "saturation", "hue"], ["hue"], ["contrast", "hue"],
                                   ["brightness", "saturation"]])
def test_jitter_in_fixed_order_equals_torchvision(names: list[str]) -> None:
    """``random_order: false`` takes fewer blend passes (hue is last for every image): still torchvision's
    result, for every subset of ops."""
    g = torch.Generator().manual_seed(5)
    n = 12
    x01 = torch.randint(0, 256, (n, 3, 16, 16), generator=g).float() / 255
    factors = {k: torch.rand(n, generator=g) - 0.5 if k == "hue" else torch.rand(n, generator=g) * 1.2 + 0.4
               for k in names}
    order = torch.arange(len(names)).expand(n, len(names))
    ours = A.apply_jitter(x01 * 255, names, factors, order, random_order=False) / 255
    diff = (ours - _tv_jitter(x01, names, factors, order)).abs()
    assert diff.max() <= 2 / 255, f"max {diff.max() * 255:.2f}/255"
