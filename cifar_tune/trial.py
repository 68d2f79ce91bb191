"""One trial: a sampled config -> data, model, training, per-epoch reports. Never imports Ray.

The search runs this inside Ray workers (``tuner.py`` passes ``tune.report`` as ``report``);
``cifar-tune train`` runs it directly for debugging a config.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from cifar_tune import data as data_mod
from cifar_tune.models import build_model, model_info
from cifar_tune.spec import DataSpec
from cifar_tune.train import FitResult, default_device, fit


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of a search shares; travels to workers once (not inside each config)."""

    data: DataSpec
    epochs: int
    seed: int


def trial_seed(search_seed: int, trial_id: str) -> int:
    """A stable per-trial seed (Python's hash() is salted per process)."""
    return zlib.crc32(f"{search_seed}:{trial_id}".encode()) & 0x7FFFFFFF


def run_trial(
    config: dict[str, Any],
    setup: TrialSetup,
    *,
    trial_id: str,
    report: Callable[[dict[str, Any]], Any],
    device: torch.device | str | None = None,
    forbid_test: bool = True,
) -> FitResult:
    """Train one config on the train split, reporting validation metrics after every epoch."""
    if forbid_test:
        data_mod.forbid_test()  # a search must never see the test split
    device = torch.device(device) if device is not None else default_device()
    info = data_mod.dataset_info(setup.data)
    train, val = data_mod.load_splits(setup.data, device)  # cached: a reused worker does not reload
    seed = trial_seed(setup.seed, trial_id)
    torch.manual_seed(seed)
    model = build_model(config["model"], num_classes=info.num_classes, in_channels=info.channels, image_size=info.image_size)
    params = model_info(model, in_channels=info.channels, image_size=info.image_size)["params"]

    def on_epoch(metrics: dict[str, Any]) -> None:
        report({**metrics, "trial_id": trial_id, "params": params, "status": metrics.get("status", "running")})

    return fit(
        model, train, val, config, epochs=setup.epochs, num_classes=info.num_classes,
        mean=info.mean, std=info.std, seed=seed, device=device, on_epoch=on_epoch,
    )
