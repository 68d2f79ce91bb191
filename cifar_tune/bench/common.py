"""What every ``cifar-tune bench`` row shares: the seed-000 augmentation and optimizer, model configs,
options, result rows, synthetic images."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cifar_tune.engine.data import make_synthetic
from cifar_tune.spec.schema import SyntheticSpec

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
    from cifar_tune.spec.parse import load_yaml

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
