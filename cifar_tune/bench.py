"""``cifar-tune bench``: how close a trial's training epoch runs to the hardware limit, in one process.

Rows (same model, batch size, thread count and seed-000 augmentations for every row):

    a  limit        forward + backward + optimizer step on pre-normalised float batches already on the device
    b  ours         ``train.fit`` epochs (val=None): shuffle, gather from resident uint8 data, batched
                    augmentation, step; the real code path, timed by fit's own per-epoch clock
    c  seed-style   torchvision per-image PIL transforms through a DataLoader (num_workers=2, as the
                    seeds do) feeding the same step
    d  augmentation alone: our batched transform vs the PIL transforms in a Python loop (no DataLoader)
    e  a short real ASHA search on Ray Tune: efficiency and trial start-up on a reused worker
    f  augmentation policies alone (RandAugment 2 ops / magnitude 9, AutoAugment CIFAR-10, TrivialAugmentWide):
       our batched per-image-random ``cifar_tune.policies`` vs torchvision's ``transforms.v2`` policy applied
       image by image to uint8 tensors

The machine is shared and noisy, so variants are interleaved round by round (a, b, c, a, b, c, ...)
and the report gives medians; ratios are medians of the per-round ratios, so slow spells cancel out.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cifar_tune.augment import BatchAugment, build_augment
from cifar_tune.data import Split, make_synthetic
from cifar_tune.devices import keep_host_memory
from cifar_tune.models import build_model
from cifar_tune.optim import build_optimizer
from cifar_tune.spec import SyntheticSpec
from cifar_tune.train import Trainer, TrainOptions, _autocast, fit, prepare_model

# seed 000's recipe: flip, crop pad 4, colour jitter incl. hue, rotation 15 degrees
SEED_AUGMENT: dict[str, Any] = {
    "hflip": True,
    "crop": {"padding": 4},
    "color_jitter": {"brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.1},
    "rotation": {"degrees": 15},
}
OPTIMIZER: dict[str, Any] = {"name": "sgd", "lr": 0.01, "momentum": 0.9}
NUM_CLASSES = 100  # the seeds train on CIFAR-100

MODELS: dict[str, dict[str, Any]] = {
    # the largest CNN of search_spaces/quickstart.yaml's space (widths 32/64/64, head 128)
    "quickstart": {"family": "vgg", "blocks": [{"channels": [32]}, {"channels": [64]}, {"channels": [64]}],
                   "head": [128], "dropout": 0.1, "global_pool": "avg"},
    # seed 000's CNN6 (search_spaces/seed000_cifar100_asha.yaml): three 3x3 stages, 2.5M params at 100 classes
    "seed000": {"family": "vgg", "blocks": [{"channels": [64, 64]}, {"channels": [128, 128]}, {"channels": [256, 256]}],
                "dropout": 0.2, "head": [256]},
    # search_spaces/models/resnet18.yaml: CIFAR ResNet-18 (seed 004's baseline)
    "resnet18": {"family": "resnet", "widths": [64, 128, 256, 512], "blocks": [2, 2, 2, 2], "block": "basic",
                 "shortcut": "conv"},
    # search_spaces/models/seed001_lenet5.yaml
    "lenet": {"family": "lenet", "channels": [6, 16], "kernel_size": 5, "padding": 0, "activation": "relu",
              "pool": "avg", "batch_norm": False, "hidden": [120, 84], "dropout": 0.0},
}

TARGETS = {  # (ratio key, model the target applies to or None for all, minimum)
    "b_over_a": {"quickstart": 0.90, "lenet": 0.70, "seed000": 0.80, "resnet18": 0.80},
    "b_over_c": {"lenet": 2.0, "seed000": 5.0},
    "d_batched_over_per_image": {None: 10.0},
    "tune_efficiency": {None: 0.75},
    "f_randaugment_batched_over_per_image": {None: 10.0},
}
REUSED_START_TARGET_S = 1.0


@dataclass(frozen=True)
class BenchOptions:
    model: str = "quickstart"  # quickstart | lenet | path to a model YAML
    device: str = "cpu"
    batch_size: int = 256
    threads: int | None = None  # torch intra-op threads for rows a-d; None: all cores
    epoch_images: int = 8192  # images per measured epoch of a, b and c
    rounds: int = 5  # interleaved measurements per variant (after one warm-up round)
    augment_images: int = 1024  # images per round of row d
    num_workers: int = 2  # DataLoader workers of row c (the seeds' setting)
    search: bool = True
    policies: bool = True  # row f
    only_policies: bool = False  # row f alone (no model rows a-d, no search)
    search_trials: int = 16
    search_concurrent: int = 2
    search_epochs: int = 4  # ASHA max_epochs (grace 1, reduction factor 2)
    search_epoch_s: float = 1.0  # size the search's data set so an epoch takes about this long
    search_images: int | None = None  # override: training images of the search (None: from search_epoch_s)
    compile: bool = False  # also time fit with fast_path compiled: compile time and steady-state speed
    only_ops: bool = False  # ATen ops per step only (no timing rows, no search)


@dataclass
class Row:
    key: str
    what: str
    samples: list[float] = field(default_factory=list)  # images/s, one per round

    @property
    def images_per_s(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")


# ---------------------------------------------------------------------------------------------- setup


def model_config(name: str) -> dict[str, Any]:
    if name in MODELS:
        return dict(MODELS[name])
    from cifar_tune.spec import load_yaml

    path = Path(name)
    cfg = load_yaml(path.read_text(), str(path)) if path.is_file() else None
    if not isinstance(cfg, dict) or "family" not in cfg:
        raise ValueError(f"--model: '{name}' is neither {' nor '.join(MODELS)} nor a model YAML with 'family'")
    return cfg


def _channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    xf = x.float().div_(255)
    return tuple(xf.mean(dim=(0, 2, 3)).tolist()), tuple(xf.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist())


def synthetic_images(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [n, 3, 32, 32] and labels: the offline stand-in for CIFAR-100 (same shapes and classes)."""
    arrays = make_synthetic(SyntheticSpec(num_train=n, num_test=1, num_classes=NUM_CLASSES, image_size=32,
                                          seed=seed), train=True)
    return torch.from_numpy(arrays.x), torch.from_numpy(arrays.y)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    from cifar_tune.augment import AUGMENTS

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


# ------------------------------------------------------------------------------------------ e: search


def search_spec(opts: BenchOptions, num_train: int) -> dict[str, Any]:
    """16 ASHA trials of the bench model on synthetic 32x32x3 data, 1 CPU each, seed-000 augmentations."""
    return {
        "name": "bench-search",
        "data": {"dataset": "synthetic", "val_fraction": 0.2,
                 "synthetic": {"num_train": int(num_train / 0.8), "num_test": 100, "num_classes": 10, "image_size": 32}},
        "search": {
            "num_samples": opts.search_trials, "max_concurrent": opts.search_concurrent, "algorithm": "random",
            "seed": 0, "resources": {"cpus_per_trial": 1},
            "scheduler": {"name": "asha", "max_epochs": opts.search_epochs, "grace_period": 1, "reduction_factor": 2},
        },
        "space": {
            "model": model_config(opts.model),
            "optimizer": {"name": "sgd", "lr": {"loguniform": [1e-3, 1e-1]}, "momentum": 0.9},
            "schedule": {"name": "none"},
            "augment": SEED_AUGMENT,
            "train": {"batch_size": opts.batch_size},
        },
    }


def _ray_results(exp_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """Every result Ray recorded per trial (result.json keeps keys our parquet files drop, e.g. pid)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for path in exp_dir.glob("ray/*/*/result.json"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if rows:  # Ray's "trial_id" overrides ours in the result; ours is in the config
            out[rows[0]["config"]["trial_id"]] = rows
    return out


def search_efficiency(trials: Any, epochs: Any, ray_results: dict[str, list[dict[str, Any]]],
                      slots: int) -> dict[str, Any]:
    """Tune efficiency and per-trial overheads from trials.parquet, epochs.parquet and Ray's result.json."""
    started, ended = trials["started_at"].astype(float), trials["ended_at"].astype(float)
    wall_s = float(ended.max() - started.min())
    train_s = float(trials["epoch_time_s"].astype(float).sum())  # training + validation of every epoch
    order = trials.assign(pid=[ray_results.get(t, [{}])[0].get("pid") for t in trials["trial_id"]])
    order = order.sort_values("started_at")
    reused, fresh = [], []
    seen_pids: dict[Any, float] = {}  # pid -> when its previous trial ended
    for row in order.itertuples():
        first = ray_results.get(row.trial_id, [{}])[0]
        # worker side: from the trial's (re)start on the actor to its first report, minus epoch 1 itself
        worker_s = float(first.get("time_this_iter_s", float("nan"))) - float(first.get("epoch_time_s", float("nan")))
        # driver side: idle gap since the worker's previous trial + everything in the trial that is not an epoch
        overhead_s = float(row.ended_at - row.started_at - row.epoch_time_s)
        item = {"trial_id": row.trial_id, "pid": row.pid, "worker_start_s": worker_s, "overhead_s": overhead_s,
                "setup_s": float(first.get("setup_time_s", float("nan")))}
        if row.pid in seen_pids:
            item["gap_s"] = float(row.started_at - seen_pids[row.pid])
            reused.append(item)
        else:
            fresh.append(item)
        seen_pids[row.pid] = float(row.ended_at)

    def med(items: list[dict[str, Any]], key: str) -> float | None:
        vals = [i[key] for i in items if key in i and np.isfinite(i[key])]
        return float(statistics.median(vals)) if vals else None

    return {
        "trials": int(len(trials)), "slots": slots, "epochs_run": int(len(epochs)),
        "median_epoch_s": float(epochs["epoch_time_s"].astype(float).median()),
        "wall_s": wall_s, "trial_time_s": train_s, "efficiency": train_s / (wall_s * slots),
        "fresh_workers": len(fresh), "reused_starts": len(reused),
        "fresh_worker_start_s": med(fresh, "worker_start_s"),
        "reused_worker_start_s": med(reused, "worker_start_s"),
        "reused_setup_s": med(reused, "setup_s"),
        "reused_gap_s": med(reused, "gap_s"),
        "reused_overhead_s": med(reused, "overhead_s"),
        "reused_start_max_s": max((i["gap_s"] + i["overhead_s"] for i in reused), default=None),
    }


def measure_search(opts: BenchOptions, b_images_per_s_1t: float, out: Callable[[str], None] = print) -> dict[str, Any]:
    """A real ``search.run_search`` (the CLI's code path) on a local Ray instance, then its records."""
    from cifar_tune import data as data_mod
    from cifar_tune import tuner
    from cifar_tune.results import Experiment
    from cifar_tune.search import run_search
    from cifar_tune.spec import parse_spec

    num_train = opts.search_images or max(4 * opts.batch_size, int(b_images_per_s_1t * opts.search_epoch_s))
    num_train = num_train // opts.batch_size * opts.batch_size
    spec = parse_spec(search_spec(opts, num_train), "<bench>")
    slots = opts.search_concurrent
    with tempfile.TemporaryDirectory(prefix="cifar-tune-bench-") as storage:
        t0 = time.perf_counter()
        try:
            run_search(spec, storage=storage, dashboard=False, num_cpus=slots * 1, progress_every_s=1e9,
                       out=lambda line: None)
        finally:
            tuner.shutdown()
            data_mod.allow_test()
        total_s = time.perf_counter() - t0
        exp = Experiment(storage, spec.name)
        trials, epochs = exp.read_table("trials.parquet"), exp.read_table("epochs.parquet")
        result = search_efficiency(trials, epochs, _ray_results(Path(exp.uri())), slots)
    result.update(train_images=num_train, run_search_s=total_s,
                  efficiency_incl_ray_start=result["trial_time_s"] / (total_s * slots))
    out(f"search: {result['trials']} trials, {result['epochs_run']} epochs of ~{result['median_epoch_s']:.2f} s, "
        f"wall {result['wall_s']:.1f} s, efficiency {result['efficiency']:.2f}")
    return result


# -------------------------------------------------------------------------------------------- report


def _target_checks(model: str, ratios: dict[str, float], search: dict[str, Any] | None) -> list[dict[str, Any]]:
    values = dict(ratios)
    if search:
        values["tune_efficiency"] = search["efficiency"]
    checks = []
    for key, per_model in TARGETS.items():
        minimum = per_model.get(model, per_model.get(None))
        if minimum is not None and key in values:
            checks.append({"metric": key, "value": values[key], "target": f">= {minimum:g}", "met": values[key] >= minimum})
    if search and search.get("reused_start_max_s") is not None:
        v = search["reused_start_max_s"]
        checks.append({"metric": "reused_worker_start_s (max)", "value": v, "target": f"< {REUSED_START_TARGET_S:g}",
                       "met": v < REUSED_START_TARGET_S})
    return checks


def measure_ops(opts: BenchOptions, out: Callable[[str], None] = print) -> dict[str, Any]:
    """ATen ops of one eager training step (cifar_tune.opcount): seed 000's augmentation, this run's
    model and batch size, SGD with momentum, on this run's device."""
    from cifar_tune.opcount import step_ops

    device = torch.device(opts.device)
    cfg = model_config(opts.model)
    x, y = synthetic_images(2 * opts.batch_size)
    mean, std = _channel_stats(x)
    config = {"model": cfg, "optimizer": OPTIMIZER, "schedule": {"name": "none"}, "augment": SEED_AUGMENT,
              "train": {"batch_size": opts.batch_size, "fast_path": "eager"}}
    trainer = Trainer(build_model(cfg, num_classes=NUM_CLASSES), Split(x.to(device), y.to(device)), None, config,
                      epochs=1, num_classes=NUM_CLASSES, mean=mean, std=std, device=device)
    counted = step_ops(trainer)
    ops = counted["ops_per_step"]
    out(f"ops per step ({opts.model}, batch {opts.batch_size}, seed-000 augmentation, {device}): "
        + ", ".join(f"{k} {v}" for k, v in ops.items()))
    return {**counted, "model": opts.model, "batch_size": opts.batch_size, "augment": SEED_AUGMENT,
            "optimizer": OPTIMIZER, "device": str(device)}


def compile_vs_eager(opts: BenchOptions, epochs: int = 4, out: Callable[[str], None] = print) -> dict[str, Any]:
    """Each ``fast_path`` mode that can run here (eager, compiled; cuda_graphs on CUDA) on the same data
    and seed, epochs interleaved round by round (mode A epoch 1, mode B epoch 1, A epoch 2, ...: a shared
    machine's slow spells hit all modes): epoch times (epoch 1 includes the compilation or the capture),
    the one-off cost and per-epoch saving against eager, the break-even point; and the augmentation's
    pixel work alone (``BatchAugment.dense`` on fixed draws), eager vs compiled, per batch."""
    device = torch.device(opts.device)
    torch.set_num_threads(opts.threads or torch.get_num_threads())
    cfg = model_config(opts.model)
    x, y = synthetic_images(opts.epoch_images)
    mean, std = _channel_stats(x)
    train = Split(x.to(device), y.to(device))
    modes = ("eager", "compiled", "cuda_graphs") if device.type == "cuda" else ("eager", "compiled")
    trainers = {}
    for mode in modes:
        config = {"model": cfg, "optimizer": OPTIMIZER, "schedule": {"name": "none"}, "augment": SEED_AUGMENT,
                  "train": {"batch_size": opts.batch_size, "fast_path": mode}}
        trainers[mode] = Trainer(build_model(cfg, num_classes=NUM_CLASSES), train, None, config, epochs=epochs,
                                 num_classes=NUM_CLASSES, mean=mean, std=std, seed=0, device=device)
    epoch_s: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(epochs):
        for mode, trainer in trainers.items():
            epoch_s[mode].append(float(trainer.run_epoch()["train_time_s"]))
    used = {mode: f"{t.fast_path.mode} ({t.fast_path.reason})" for mode, t in trainers.items()}
    steady = {m: statistics.median(v[1:]) for m, v in epoch_s.items()}
    per_mode: dict[str, dict[str, Any]] = {}
    for mode in modes:
        gain_s = steady["eager"] - steady[mode]  # per epoch, once set up
        overhead_s = epoch_s[mode][0] - epoch_s["eager"][0]  # compilation or warm-up + capture, beyond eager's
        per_mode[mode] = {"ran_as": used[mode], "epoch_s": epoch_s[mode], "steady_epoch_s": steady[mode],
                          "steady_speedup": steady["eager"] / steady[mode], "setup_overhead_s": overhead_s,
                          "break_even_epochs": overhead_s / gain_s if gain_s > 0 and mode != "eager" else None}
        be = per_mode[mode]["break_even_epochs"]
        per_mode[mode]["break_even_images"] = be * opts.epoch_images if be is not None else None

    augment = build_augment(SEED_AUGMENT, mean=mean, std=std, num_classes=NUM_CLASSES)
    xb = train.x[: opts.batch_size]
    draws = augment.draw(torch.Generator(device=device).manual_seed(0), len(xb), xb.shape[1], device)
    dense = torch.compile(augment.dense, dynamic=False)  # already compiled by the compiled run: no compile time here
    def per_batch_ms(fn: Callable[[torch.Tensor, Any], torch.Tensor], reps: int = 20) -> float:
        fn(xb, draws)
        _sync(device)
        t = time.perf_counter()
        for _ in range(reps):
            fn(xb, draws)
        _sync(device)
        return (time.perf_counter() - t) / reps * 1e3

    aug_ms: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(opts.rounds):  # interleaved: the machine may be shared
        aug_ms["eager"].append(per_batch_ms(augment.dense))
        aug_ms["compiled"].append(per_batch_ms(dense))
    report = {"epoch_images": opts.epoch_images, "epochs": epochs, "modes": per_mode,
              "augment_dense_ms": {k: statistics.median(v) for k, v in aug_ms.items()}}
    out(f"fast paths ({opts.model}, {opts.epoch_images} images per epoch): "
        + "; ".join(f"{m} epochs {', '.join(f'{v:.2f}' for v in r['epoch_s'])} s" for m, r in per_mode.items())
        + f"; augmentation {report['augment_dense_ms']['eager']:.1f} -> {report['augment_dense_ms']['compiled']:.1f} ms/batch")
    return report


def run_bench(opts: BenchOptions, out: Callable[[str], None] = print) -> dict[str, Any]:
    keep_host_memory()  # as every training process does (Trainer): all rows run under the same allocator
    report: dict[str, Any] = {"options": asdict(opts), "env": environment(opts.device)}
    report["ops"] = measure_ops(opts, out)
    report["ops_per_step"] = report["ops"]["ops_per_step"]
    if opts.only_ops:
        report.update(threads=opts.threads or torch.get_num_threads(), rows={}, ratios={}, targets=[])
        if opts.compile:
            report["compile_vs_eager"] = compile_vs_eager(opts, out=out)
        return report
    if opts.only_policies:
        report.update(threads=opts.threads or torch.get_num_threads(), rows={}, ratios={})
    else:
        report.update(measure_throughput(opts, out))
    if opts.policies or opts.only_policies:
        report["policies"] = measure_policies(opts, out)
    if opts.search and not opts.only_policies:
        # a trial gets 1 CPU (OMP_NUM_THREADS=1): size its data by one thread's share of row b
        b_1t = report["rows"]["b"]["images_per_s"] / report["threads"]
        report["search"] = measure_search(opts, b_1t, out)
    ratios = {**report["ratios"], **report.get("policies", {}).get("ratios", {})}
    report["targets"] = _target_checks(opts.model, ratios, report.get("search"))
    return report


def environment(device: str) -> dict[str, Any]:
    env: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                           "host_memory_kept": keep_host_memory(),
                           "machine": platform.machine(), "cores": os.cpu_count(),
                           "load_avg_1m": round(os.getloadavg()[0], 1)}  # the machine may be shared
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(torch.device(device))
        env.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(), driver=_nvidia_driver())
    return env


def _nvidia_driver() -> str | None:
    import subprocess

    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_benches(opts: list[BenchOptions], out: Callable[[str], None] = print) -> dict[str, Any]:
    """One report per model, run one after the other in this process."""
    return {"runs": [run_bench(o, out) for o in opts]}


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    return f"{v:,.{digits}f}" if isinstance(v, float) else str(v)


def markdown(report: dict[str, Any], command: str | None = None) -> str:
    """The tables of one model's report, or of each run of ``run_benches``."""
    if "runs" in report:
        from cifar_tune.bench_pack import markdown as pack_markdown

        head = [f"command: `{command}`", ""] if command else []
        return "\n".join(head + [f"### {r['options']['model']}\n\n{markdown(r)}" for r in report["runs"]]
                         + pack_markdown(report)) + "\n"
    o = report["options"]
    env = report["env"]
    gpu = f", {env['gpu']} (driver {env.get('driver')}, CUDA {env.get('cuda')})" if "gpu" in env else ""
    lines = [f"model `{o['model']}`, device {o['device']}{gpu}, batch {o['batch_size']}, {report['threads']} torch threads "
             f"for {'the fast-path runs' if o.get('only_ops') else 'rows a-d'}, {o['epoch_images']} images per epoch, median of {o['rounds']} interleaved rounds; "
             f"torch {env['torch']}, {env['cores']} cores", ""]
    if "ops" in report:
        ops = report["ops"]
        lines += [f"ATen ops per training step (one eager step, batch {ops['batch_size']}, seed-000 augmentation, "
                  f"{ops['optimizer']['name']}, dispatched ops counted by a TorchDispatchMode):", "",
                  "| part | ops | of which views | most frequent |", "|---|---:|---:|---|"]
        lines += [f"| {k} | {v} | {ops['views_per_step'][k]} | "
                  + ", ".join(f"{name} {n}" for name, n in list(ops["top_ops"][k].items())[:5]) + " |"
                  for k, v in ops["ops_per_step"].items()]
        lines += [f"| total | {sum(ops['ops_per_step'].values())} | {sum(ops['views_per_step'].values())} | |", ""]
    if "compile_vs_eager" in report:
        c = report["compile_vs_eager"]
        lines += [f"`train.fast_path` modes, epochs of {c['epoch_images']} images (epoch 1 includes the compilation "
                  "or the capture); one-off cost = epoch 1 minus eager's epoch 1:", "",
                  "| mode | ran as | epoch times (s) | steady speedup | one-off cost (s) | break-even (epochs) "
                  "| break-even (images) |", "|---|---|---|---:|---:|---:|---:|"]
        lines += [f"| {m} | {r['ran_as']} | {', '.join(f'{v:.2f}' for v in r['epoch_s'])} | {_fmt(r['steady_speedup'])} "
                  f"| {_fmt(r['setup_overhead_s'])} | {_fmt(r['break_even_epochs'])} | {_fmt(r['break_even_images'], 0)} |"
                  for m, r in c["modes"].items()]
        lines += ["", f"augmentation alone (dense stages, batch {o['batch_size']}): eager "
                  f"{c['augment_dense_ms']['eager']:.2f} ms, compiled {c['augment_dense_ms']['compiled']:.2f} ms per "
                  f"batch, median of {o['rounds']} interleaved rounds of 20 batches", ""]
    if o.get("only_ops"):
        return "\n".join(lines) + "\n"
    if o.get("only_policies"):  # rows a-d did not run: describe row f's setting instead
        lines = [f"row f only: device {o['device']}{gpu}, batch {o['batch_size']}, {o['augment_images']} images per "
                 f"round, median of {o['rounds']} interleaved rounds; torch {env['torch']}, {env['cores']} cores, "
                 f"1-minute load average {env.get('load_avg_1m', '?')} at the start", ""]
    if command:
        lines += [f"command: `{command}`", ""]
    if report["rows"]:  # absent with --only-policies
        lines += ["| row | what | images/s |", "|---|---|---:|"]
        for key, row in report["rows"].items():
            lines.append(f"| {key} | {row['what']} | {row['images_per_s']:,.0f} |")
        lines += ["", "| ratio | value |", "|---|---:|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in report["ratios"].items()]
    if "policies" in report:
        pol = report["policies"]
        lines += ["", f"row f, policies ({pol['threads']} torch threads for `batched`):", "",
                  "| row | what | images/s |", "|---|---|---:|"]
        lines += [f"| {k} | {r['what']} | {r['images_per_s']:,.0f} |" for k, r in pol["rows"].items()]
        lines += ["", "| ratio | value |", "|---|---:|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in pol["ratios"].items()]
    if "search" in report:
        s = report["search"]
        lines += ["", "| search (e) | value |", "|---|---:|"]
        for key in ("trials", "slots", "epochs_run", "median_epoch_s", "wall_s", "trial_time_s", "efficiency",
                    "run_search_s", "efficiency_incl_ray_start", "fresh_worker_start_s", "reused_starts",
                    "reused_worker_start_s", "reused_setup_s", "reused_gap_s", "reused_overhead_s", "reused_start_max_s"):
            lines.append(f"| {key} | {_fmt(s.get(key))} |")
    if "compile" in report:
        c = report["compile"]
        lines += ["", "| torch.compile (fit, default mode) | value |", "|---|---:|"]
        for key in ("eager_images_per_s", "steady_images_per_s", "first_epoch_s", "compile_overhead_s", "break_even_epochs",
                    "break_even_images"):
            lines.append(f"| {key} | {_fmt(c.get(key))} |")
    lines += ["", "| target | value | wanted | met |", "|---|---:|---|---|"]
    lines += [f"| {t['metric']} | {_fmt(t['value'])} | {t['target']} | {'yes' if t['met'] else 'NO'} |"
              for t in report["targets"]]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], json_path: str | Path, command: str | None = None) -> Path:
    """``OUT.json`` and, next to it, ``OUT.md`` with the tables."""
    path = Path(json_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**report, "command": command}, indent=2, default=str) + "\n")
    md = path.with_suffix(".md")
    md.write_text(markdown(report, command))
    return md
