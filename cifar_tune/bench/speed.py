"""Throughput rows of ``cifar-tune bench``: the step limit, ``train.fit``, a PIL DataLoader, and the
augmentations and augmentation policies alone, interleaved round by round."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cifar_tune.bench.common import (
    NUM_CLASSES,
    OPTIMIZER,
    SEED_AUGMENT,
    BenchOptions,
    Row,
    _channel_stats,
    _sync,
    model_config,
    synthetic_images,
)
from cifar_tune.engine.augment import BatchAugment, build_augment
from cifar_tune.engine.data import Split
from cifar_tune.engine.models import build_model
from cifar_tune.engine.optim import build_optimizer
from cifar_tune.engine.train import TrainOptions, _autocast, fit, prepare_model

# ------------------------------------------------------------------------------------- a: the limit


class LimitStep:
    """Forward + backward + step on pre-normalised batches resident on the device: nothing else."""

    def __init__(self, model: nn.Module, x_norm: torch.Tensor, y: torch.Tensor, batch_size: int,
                 device: torch.device) -> None:
        self.opts = TrainOptions(batch_size=batch_size)
        self.model = model
        self.channels_last = device.type == "cuda"  # as fit's default
        if self.channels_last:
            x_norm = x_norm.contiguous(memory_format=torch.channels_last)
        self.x, self.y, self.device = x_norm, y, device
        self.optimizer = build_optimizer(model.parameters(), OPTIMIZER)

    def step(self, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        with _autocast(self.device, self.opts.precision):
            loss = F.cross_entropy(self.model(xb).float(), yb)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss

    def epoch_images_per_s(self) -> float:
        b = self.opts.batch_size
        steps = len(self.x) // b
        self.model.train()
        _sync(self.device)
        t0 = time.perf_counter()
        for i in range(steps):
            self.step(self.x[i * b : (i + 1) * b], self.y[i * b : (i + 1) * b])
        _sync(self.device)
        return steps * b / (time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------ b: ours


def fit_images_per_s(model: nn.Module, train: Split, config: dict[str, Any], mean: tuple[float, ...],
                     std: tuple[float, ...], device: torch.device, seed: int) -> float:
    """One epoch of the real training loop, timed by fit's own clock (excludes its one-off setup)."""
    # strict_sync on CUDA: the timed loop raises if it ever synchronises with the host
    result = fit(model, train, None, config, epochs=1, num_classes=NUM_CLASSES, mean=mean, std=std,
                 seed=seed, device=device, strict_sync=device.type == "cuda")
    return float(result.history[-1]["images_per_s"])


def compile_cost(cfg: dict[str, Any], train: Split, config: dict[str, Any], mean: tuple[float, ...],
                 std: tuple[float, ...], device: torch.device, epochs: int = 3) -> dict[str, float]:
    """fit with ``train.fast_path: compiled`` (augmentation and model): the first epoch pays the
    compilation; later ones show its gain."""
    model = build_model(cfg, num_classes=NUM_CLASSES)
    compiled = {**config, "train": {**config["train"], "fast_path": "compiled"}}
    result = fit(model, train, None, compiled, epochs=epochs, num_classes=NUM_CLASSES, mean=mean, std=std,
                 seed=0, device=device)
    first, rest = result.history[0], result.history[1:]
    return {"first_epoch_s": float(first["train_time_s"]),
            "steady_images_per_s": statistics.median(float(h["images_per_s"]) for h in rest)}


# ------------------------------------------------------------------------------------ c: seed-style


def pil_transform(mean: tuple[float, ...], std: tuple[float, ...]) -> Callable[[Any], torch.Tensor]:
    """The seeds' torchvision pipeline, per image on PIL images."""
    from torchvision import transforms as T

    return T.Compose([
        T.RandomHorizontalFlip(),
        T.RandomCrop(32, padding=4),
        T.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.1),
        T.RandomRotation(15),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


class _PilDataset(torch.utils.data.Dataset):
    """Like torchvision's CIFAR100: HWC uint8 arrays in memory, a PIL image per __getitem__."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform: Callable[[Any], torch.Tensor]) -> None:
        self.x_hwc = np.ascontiguousarray(x.permute(0, 2, 3, 1).numpy())
        self.y = y.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.x_hwc[i])), self.y[i]


def make_loader(x: torch.Tensor, y: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...],
                batch_size: int, num_workers: int, device: torch.device) -> torch.utils.data.DataLoader:
    # persistent workers: the kindest setting for the baseline (no worker start-up per epoch)
    return torch.utils.data.DataLoader(
        _PilDataset(x, y, pil_transform(mean, std)), batch_size=batch_size, shuffle=True, drop_last=True,
        num_workers=num_workers, persistent_workers=num_workers > 0, pin_memory=device.type == "cuda",
    )


def loader_images_per_s(loader: torch.utils.data.DataLoader, limit: LimitStep) -> float:
    limit.model.train()
    _sync(limit.device)
    t0 = time.perf_counter()
    seen = 0
    for xb, yb in loader:
        xb, yb = xb.to(limit.device, non_blocking=True), yb.to(limit.device, non_blocking=True)
        if limit.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        limit.step(xb, yb)
        seen += len(yb)
    _sync(limit.device)
    return seen / (time.perf_counter() - t0)


# ---------------------------------------------------------------------------------- d: augmentation


def batched_augment_images_per_s(augment: BatchAugment, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                                  generator: torch.Generator) -> float:
    _sync(x.device)
    t0 = time.perf_counter()
    for start in range(0, len(x) - batch_size + 1, batch_size):
        augment(x[start : start + batch_size], y[start : start + batch_size], generator)
    _sync(x.device)
    return (len(x) // batch_size) * batch_size / (time.perf_counter() - t0)


def per_image_augment_images_per_s(x_hwc: np.ndarray, transform: Callable[[Any], torch.Tensor]) -> float:
    from PIL import Image

    t0 = time.perf_counter()
    torch.stack([transform(Image.fromarray(img)) for img in x_hwc])
    return len(x_hwc) / (time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------- rows a-d


def _interleave(variants: dict[str, Callable[[], float]], rows: dict[str, Row], rounds: int) -> None:
    """One warm-up call each, then ``rounds`` rounds of one call per variant, in turn."""
    for fn in variants.values():
        fn()
    for _ in range(rounds):
        for key, fn in variants.items():
            rows[key].samples.append(fn())


def _round_ratios(num: Row, den: Row) -> list[float]:
    return [a / b for a, b in zip(num.samples, den.samples, strict=True)]


def measure_throughput(opts: BenchOptions, out: Callable[[str], None] = print) -> dict[str, Any]:
    """Rows a-d and their ratios, interleaved in one process with one thread setting."""
    threads = opts.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    device = torch.device(opts.device)
    seed = 0
    torch.manual_seed(seed)
    cfg = model_config(opts.model)
    n = max(opts.epoch_images, opts.augment_images, opts.batch_size)
    x_cpu, y_cpu = synthetic_images(n, seed)
    mean, std = _channel_stats(x_cpu)
    augment = build_augment(SEED_AUGMENT, mean=mean, std=std, num_classes=NUM_CLASSES)
    train_config = {"model": cfg, "optimizer": OPTIMIZER, "schedule": {"name": "none"}, "augment": SEED_AUGMENT,
                    "train": {"batch_size": opts.batch_size}}

    # a and b share a model so the same weights' kernels run; c gets its own (same architecture)
    epoch_x, epoch_y = x_cpu[: opts.epoch_images].to(device), y_cpu[: opts.epoch_images].to(device)
    x_norm, _ = build_augment({}, mean=mean, std=std, num_classes=NUM_CLASSES)(epoch_x, epoch_y, torch.Generator())
    model = prepare_model(build_model(cfg, num_classes=NUM_CLASSES), device, TrainOptions(batch_size=opts.batch_size))
    limit = LimitStep(model, x_norm, epoch_y, opts.batch_size, device)
    resident = Split(epoch_x, epoch_y)
    seed_model = prepare_model(build_model(cfg, num_classes=NUM_CLASSES), device, TrainOptions())
    seed_limit = LimitStep(seed_model, x_norm[: opts.batch_size], epoch_y[: opts.batch_size], opts.batch_size, device)
    loaders = [make_loader(x_cpu[: opts.epoch_images], y_cpu[: opts.epoch_images], mean, std, opts.batch_size,
                         opts.num_workers, device)]

    aug_x, aug_y = x_cpu[: opts.augment_images].to(device), y_cpu[: opts.augment_images].to(device)
    aug_hwc = np.ascontiguousarray(x_cpu[: opts.augment_images].permute(0, 2, 3, 1).numpy())
    transform = pil_transform(mean, std)
    gen = torch.Generator(device=device).manual_seed(seed)

    def one_thread(fn: Callable[[], float]) -> Callable[[], float]:
        def run() -> float:
            torch.set_num_threads(1)
            try:
                return fn()
            finally:
                torch.set_num_threads(threads)
        return run

    rows = {
        "a": Row("a", "limit: forward+backward+step on resident normalised batches"),
        "b": Row("b", "ours: train.fit epoch (shuffle, gather uint8, batched augmentation, step)"),
        "c": Row("c", f"seed-style: PIL transforms, DataLoader num_workers={opts.num_workers}, same step"),
        "d_batched": Row("d_batched", "augmentation alone, batched (ours)"),
        "d_batched_1t": Row("d_batched_1t", "augmentation alone, batched, 1 thread"),
        "d_per_image": Row("d_per_image", "augmentation alone, per-image PIL loop (1 core)"),
    }
    fit_round = {"i": 0}

    def run_fit() -> float:
        fit_round["i"] += 1  # a new shuffle per round, like successive epochs
        return fit_images_per_s(model, resident, train_config, mean, std, device, seed + fit_round["i"])

    variants: dict[str, Callable[[], float]] = {
        "a": limit.epoch_images_per_s,
        "b": run_fit,
        "c": lambda: loader_images_per_s(loaders[0], seed_limit),
        "d_batched": lambda: batched_augment_images_per_s(augment, aug_x, aug_y, opts.batch_size, gen),
        "d_batched_1t": one_thread(lambda: batched_augment_images_per_s(augment, aug_x, aug_y, opts.batch_size, gen)),
        "d_per_image": lambda: per_image_augment_images_per_s(aug_hwc, transform),
    }
    out(f"bench: model {opts.model}, {device}, batch {opts.batch_size}, {threads} torch threads, "
        f"{opts.epoch_images} images per epoch, {opts.rounds} interleaved rounds")
    _interleave(variants, rows, opts.rounds)
    loaders.clear()  # stops its persistent workers before the search starts

    compiled = None
    if opts.compile:
        cc = compile_cost(cfg, resident, train_config, mean, std, device)
        eager_s = opts.epoch_images / rows["b"].images_per_s
        steady_s = opts.epoch_images / cc["steady_images_per_s"]
        gain_s = eager_s - steady_s  # per epoch, once compiled
        overhead_s = cc["first_epoch_s"] - steady_s
        compiled = {**cc, "eager_images_per_s": rows["b"].images_per_s, "compile_overhead_s": overhead_s,
                    "break_even_epochs": overhead_s / gain_s if gain_s > 0 else None}
        # in images, so it transfers to other epoch sizes (a CIFAR trial's epoch is 40,000 images)
        compiled["break_even_images"] = (compiled["break_even_epochs"] * opts.epoch_images
                                         if compiled["break_even_epochs"] is not None else None)
        out(f"torch.compile: first epoch {cc['first_epoch_s']:.1f} s, then {cc['steady_images_per_s']:,.0f} img/s "
            f"(eager {rows['b'].images_per_s:,.0f}); pays off after "
            + (f"{compiled['break_even_epochs']:.1f} epochs" if compiled["break_even_epochs"] else "never"))

    ratios = {
        "b_over_a": statistics.median(_round_ratios(rows["b"], rows["a"])),
        "b_over_c": statistics.median(_round_ratios(rows["b"], rows["c"])),
        "d_batched_over_per_image": statistics.median(_round_ratios(rows["d_batched"], rows["d_per_image"])),
        "d_batched_1t_over_per_image": statistics.median(_round_ratios(rows["d_batched_1t"], rows["d_per_image"])),
    }
    report = {"threads": threads, "rows": {k: {"what": r.what, "images_per_s": r.images_per_s, "samples": r.samples}
                                           for k, r in rows.items()}, "ratios": ratios}
    if compiled:
        report["compile"] = compiled
    return report


# ------------------------------------------------------------------------------------------ f: policies

POLICIES: dict[str, tuple[dict[str, Any], str]] = {  # name -> (our config, torchvision v2 constructor call)
    "randaugment": ({"num_ops": 2, "magnitude": 9}, "RandAugment(num_ops=2, magnitude=9)"),
    "autoaugment": ({"policy": "cifar10"}, "AutoAugment(AutoAugmentPolicy.CIFAR10)"),
    "trivialaugment": ({}, "TrivialAugmentWide()"),
}


def _torchvision_policy(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    from torchvision.transforms import v2

    return {"randaugment": lambda: v2.RandAugment(num_ops=2, magnitude=9),
            "autoaugment": lambda: v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10),
            "trivialaugment": v2.TrivialAugmentWide}[name]()


def batched_policy_images_per_s(policy: Callable[[torch.Tensor, torch.Generator], torch.Tensor], x: torch.Tensor,
                                batch_size: int, generator: torch.Generator) -> float:
    _sync(x.device)
    t0 = time.perf_counter()
    for start in range(0, len(x) - batch_size + 1, batch_size):
        policy(x[start : start + batch_size], generator)
    _sync(x.device)
    return (len(x) // batch_size) * batch_size / (time.perf_counter() - t0)


def per_image_policy_images_per_s(transform: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> float:
    t0 = time.perf_counter()
    torch.stack([transform(img) for img in x])
    return len(x) / (time.perf_counter() - t0)


def measure_policies(opts: BenchOptions, out: Callable[[str], None] = print) -> dict[str, Any]:
    """Row f: each policy batched (all threads and 1 thread) vs torchvision per image, interleaved rounds."""
    from cifar_tune.engine.augment import AUGMENTS

    threads = opts.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    device = torch.device(opts.device)
    n = max(opts.augment_images, opts.batch_size)
    x_cpu, _ = synthetic_images(n, seed=0)
    x = x_cpu.to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    torch.manual_seed(0)  # torchvision's policies draw from the global generator
    rows: dict[str, Row] = {}
    variants: dict[str, Callable[[], float]] = {}
    for name, (cfg, tv_call) in POLICIES.items():
        ours, theirs = AUGMENTS.build(name, **cfg), _torchvision_policy(name)
        rows[f"f_{name}_batched"] = Row(f"f_{name}_batched", f"{name} {cfg}: batched, per-image draws (ours)")
        rows[f"f_{name}_batched_1t"] = Row(f"f_{name}_batched_1t", f"{name}: batched, 1 thread")
        rows[f"f_{name}_per_image"] = Row(f"f_{name}_per_image", f"torchvision v2.{tv_call}, image by image")

        def batched(p: Any = ours) -> float:
            return batched_policy_images_per_s(p, x, opts.batch_size, gen)

        def one_thread(p: Any = ours) -> float:
            torch.set_num_threads(1)
            try:
                return batched_policy_images_per_s(p, x, opts.batch_size, gen)
            finally:
                torch.set_num_threads(threads)

        variants[f"f_{name}_batched"] = batched
        variants[f"f_{name}_batched_1t"] = one_thread
        variants[f"f_{name}_per_image"] = lambda t=theirs: per_image_policy_images_per_s(t, x_cpu[: opts.augment_images])
    out(f"bench f: policies on {n} uint8 32x32 images, batch {opts.batch_size}, {threads} torch threads, "
        f"{opts.rounds} interleaved rounds")
    _interleave(variants, rows, opts.rounds)
    ratios = {}
    for name in POLICIES:
        per_image = rows[f"f_{name}_per_image"]
        ratios[f"f_{name}_batched_over_per_image"] = statistics.median(_round_ratios(rows[f"f_{name}_batched"], per_image))
        ratios[f"f_{name}_batched_1t_over_per_image"] = statistics.median(
            _round_ratios(rows[f"f_{name}_batched_1t"], per_image))
    return {"threads": threads, "rows": {k: {"what": r.what, "images_per_s": r.images_per_s, "samples": r.samples}
                                         for k, r in rows.items()}, "ratios": ratios}
