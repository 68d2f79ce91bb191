"""One trial: a sampled config -> data, model, training, per-epoch reports. Never imports Ray.

The search runs this inside Ray workers (``tuner.py`` passes ``tune.report`` as ``report``);
``cifar-tune train`` runs it directly for debugging a config.
"""

from __future__ import annotations

import os
import signal
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from cifar_tune import data as data_mod
from cifar_tune import devices
from cifar_tune.models import build_model
from cifar_tune.spec import DataSpec
from cifar_tune.train import FitResult, fit
from cifar_tune.transfer import apply as apply_transfer


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of a search shares; travels to workers once (not inside each config)."""

    data: DataSpec
    epochs: int
    seed: int


def trial_seed(search_seed: int, trial_id: str) -> int:
    """A stable per-trial seed (Python's hash() is salted per process)."""
    return zlib.crc32(f"{search_seed}:{trial_id}".encode()) & 0x7FFFFFFF


FAULTS_ENV = "CIFAR_TUNE_FAULTS"


def _inject_fault(trial_id: str, epoch: int) -> None:
    """Fault drills: ``CIFAR_TUNE_FAULTS="t0001=raise,t0003=exit@2,t0004=oom@3"`` makes trial t0001
    raise at its first epoch, the worker process of t0003 be SIGKILLed at epoch 2 (once) and t0004 run
    out of memory at epoch 3 (as ``torch.OutOfMemoryError``, before that epoch is reported). Used by the
    tests to prove failures are recorded and retried; it does nothing unless the variable is set.
    """
    for item in filter(None, os.environ.get(FAULTS_ENV, "").split(",")):
        tid, _, what = item.partition("=")
        kind, _, at = what.partition("@")
        if tid == trial_id and epoch == int(at or 1):
            if kind == "raise":
                raise RuntimeError(f"injected fault in {trial_id} at epoch {epoch}")
            if kind == "oom":
                raise torch.OutOfMemoryError(f"injected out of memory in {trial_id} at epoch {epoch}")
            if kind == "exit":  # once: a marker in $CIFAR_TUNE_FAULT_DIR lets the retry succeed
                marker = os.path.join(os.environ.get("CIFAR_TUNE_FAULT_DIR", "/tmp"), f"{trial_id}.fault-fired")
                if not os.path.exists(marker):
                    open(marker, "w").close()
                    os.kill(os.getpid(), signal.SIGKILL)


def run_trial(
    config: dict[str, Any],
    setup: TrialSetup,
    *,
    trial_id: str,
    report: Callable[[dict[str, Any]], Any],
    device: torch.device | str | None = None,
    memory_fraction: float | None = None,
    forbid_test: bool = True,
) -> FitResult:
    """Train one config on the train split, reporting validation metrics after every epoch.

    ``device`` is the one the caller was given (in a search: what Ray assigned; see devices.py), CPU if
    None. ``memory_fraction`` caps this process's share of a GPU that other trials share.
    """
    t0 = time.perf_counter()
    if forbid_test:
        data_mod.forbid_test()  # a search must never see the test split
    device = torch.device(device) if device is not None else torch.device("cpu")
    devices.begin_trial(device, memory_fraction)
    info = data_mod.dataset_info(setup.data)
    train, val = data_mod.load_splits(setup.data, device)  # cached: a reused worker does not reload
    seed = trial_seed(setup.seed, trial_id)
    torch.manual_seed(seed)
    model = build_model(config["model"], num_classes=info.num_classes, in_channels=info.channels, image_size=info.image_size)
    model = apply_transfer(model, config["model"], log=lambda line: print(f"{trial_id} {line}", flush=True))
    # a plain count: model_info would also run a hooked forward pass just to count MACs
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # data, model and seeds ready: what a trial costs before its first step (``cifar-tune bench`` reads it)
    setup_time_s = time.perf_counter() - t0

    reported: list[int] = []  # epochs reported so far: an OOM later does not undo them

    def on_epoch(metrics: dict[str, Any]) -> None:
        _inject_fault(trial_id, int(metrics["epoch"]))
        reported.append(int(metrics["epoch"]))
        report({**metrics, "trial_id": trial_id, "params": params, "setup_time_s": setup_time_s,
                "status": metrics.get("status", "running"), "pid": os.getpid(), "worker_data_loads": data_mod.raw_loads,
                "device": str(device)})

    try:
        return fit(
            model, train, val, config, epochs=setup.epochs, num_classes=info.num_classes,
            mean=info.mean, std=info.std, seed=seed, device=device, on_epoch=on_epoch,
        )
    except torch.OutOfMemoryError as e:  # recorded as "oom", not as a crash of the search
        # no "epoch" key: this report ends the trial but is not an epoch (results.py appends no row)
        report({"trial_id": trial_id, "params": params, "status": "oom", "error": f"out of memory: {str(e)[:300]}"})
        return FitResult(status="oom", epochs_run=len(reported))
    finally:
        # a reused worker runs the next trial next: drop this one's model, graphs and cached GPU blocks
        del model
        devices.end_trial(device, compiled=bool(config.get("train", {}).get("compile")))
