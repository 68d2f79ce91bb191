"""One trial: a sampled config -> data, model, training, per-epoch reports. Never imports Ray.

The search runs this inside Ray workers (``tuning.trainable`` passes ``tune.report`` as ``report``);
``cifar-tune train`` runs it directly for debugging a config.
"""

from __future__ import annotations

import io
import json
import os
import signal
import time
import zlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch

from cifar_tune.engine import data as data_mod
from cifar_tune.engine import devices
from cifar_tune.engine.models import build_model
from cifar_tune.engine.train import FitResult, Trainer
from cifar_tune.engine.transfer import apply as apply_transfer
from cifar_tune.spec.schema import DataSpec


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of a search shares; travels to workers once (not inside each config)."""

    data: DataSpec
    epochs: int
    seed: int
    checkpoint_every: int = 0  # save a checkpoint every N epochs and at the last one; 0: never
    # per-trial costs among the search's objectives to measure once, before training (macs, latency_ms)
    costs: tuple[str, ...] = ()


class Reporter(Protocol):
    """Receives each epoch's metrics, and at checkpoint epochs the checkpoint as bytes."""

    def __call__(self, metrics: dict[str, Any], checkpoint: bytes | None = None) -> Any: ...


# The search checkpoint has every key of retrain's, so ``cifar-tune evaluate`` reads both.
CHECKPOINT_FORMAT = "cifar-tune-checkpoint/1"
CHECKPOINT_FILE = "trial.pt"  # its name inside a Ray Tune checkpoint directory


def checkpoint_to_bytes(ckpt: Mapping[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save(dict(ckpt), buf)
    return buf.getvalue()


def checkpoint_from_bytes(blob: bytes) -> dict[str, Any]:
    """Tensors and plain Python only: never unpickles code."""
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)


def trial_seed(search_seed: int, trial_id: str) -> int:
    """A stable per-trial seed (Python's hash() is salted per process)."""
    return zlib.crc32(f"{search_seed}:{trial_id}".encode()) & 0x7FFFFFFF


FAULTS_ENV = "CIFAR_TUNE_FAULTS"


def _inject_fault(trial_id: str, epoch: int) -> None:
    """Fault drills: ``CIFAR_TUNE_FAULTS="t0001=raise,t0003=exit@2,t0004=oom@3,t0002=hang@3"`` makes trial
    t0001 raise at its first epoch, the worker process of t0003 be SIGKILLed at epoch 2, t0004 run out of
    memory at epoch 3 (as ``torch.OutOfMemoryError``, before that epoch is reported) and t0002 stall for
    60 s after training epoch 3, before reporting it (exit and hang fire once: a marker in
    ``$CIFAR_TUNE_FAULT_DIR`` lets the retry or resumed run go on). The tests use it to prove failures
    are recorded and retried and to kill a driver mid-trial; it does nothing unless the variable is set.
    ``CIFAR_TUNE_FAULTS=@/path/faults.txt`` reads the same list from that file at every epoch, so tests that
    share one Ray instance (whose workers keep the environment they started with) can change it per search.
    """
    spec = os.environ.get(FAULTS_ENV, "")
    if spec.startswith("@"):
        try:
            with open(spec[1:]) as f:
                spec = f.read().strip()
        except FileNotFoundError:
            spec = ""
    for item in filter(None, spec.split(",")):
        tid, _, what = item.partition("=")
        kind, _, at = what.partition("@")
        if tid == trial_id and epoch == int(at or 1):
            if kind == "raise":
                raise RuntimeError(f"injected fault in {trial_id} at epoch {epoch}")
            if kind == "oom":
                raise torch.OutOfMemoryError(f"injected out of memory in {trial_id} at epoch {epoch}")
            marker = os.path.join(os.environ.get("CIFAR_TUNE_FAULT_DIR", "/tmp"), f"{trial_id}.{kind}-fired")
            if kind in ("exit", "hang") and not os.path.exists(marker):
                open(marker, "w").close()
                if kind == "exit":
                    os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(60)


def _measure_costs(trainer: Trainer, wanted: tuple[str, ...], known: dict[str, float], info: Any,
                   device: torch.device) -> dict[str, float]:
    """The costs in ``wanted`` not ``known`` yet: MACs per image (model-info's count) and the median
    latency of an eval batch on this trial's device, measured on the model as it will train."""
    from cifar_tune.engine import costs as cost_mod
    from cifar_tune.engine.train import _autocast

    out: dict[str, float] = {}
    if "macs" in wanted and "macs" not in known:
        out["macs"] = float(cost_mod.macs_per_image(trainer.model, in_channels=info.channels, image_size=info.image_size))
    if "latency_ms" in wanted and "latency_ms" not in known:
        out["latency_ms"] = cost_mod.latency_ms(
            trainer.model, batch_size=trainer.opts.eval_batch_size, in_channels=info.channels, image_size=info.image_size,
            device=device, channels_last=trainer.channels_last, autocast=_autocast(device, trainer.opts.precision))
    return out


def run_trial(
    config: dict[str, Any],
    setup: TrialSetup,
    *,
    trial_id: str,
    report: Reporter,
    device: torch.device | str | None = None,
    memory_fraction: float | None = None,
    forbid_test: bool = True,
    resume: bytes | None = None,
) -> FitResult:
    """Train one config on the train split, reporting validation metrics after every epoch.

    ``device`` is the one the caller was given (in a search: what Ray assigned; see ``engine.devices``), CPU if
    None. ``memory_fraction`` caps this process's share of a GPU that other trials share.

    ``resume``: a checkpoint this trial (or, after a PBT exploit, another trial) saved; training
    continues after its epoch with this ``config``'s hyperparameters. The first epoch after it
    reports ``restored_from`` (the donor's id when it was another trial's checkpoint) and
    ``config_json``, the config in force (the driver records what changed).
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
    trainer = Trainer(model, train, val, config, epochs=setup.epochs, num_classes=info.num_classes,
                      mean=info.mean, std=info.std, seed=seed, device=device)
    lineage: dict[str, Any] = {}
    costs: dict[str, float] = {}
    if resume is not None:
        ckpt = checkpoint_from_bytes(resume)
        if ckpt["trial_id"] == trial_id:  # its own checkpoint: the costs measured at its first start
            costs = dict(ckpt.get("costs") or {})
        trainer.load_state_dict({**ckpt["trainer"], "model": ckpt["state_dict"]})
        lineage = {
            "restored_from": ckpt["trial_id"] if ckpt["trial_id"] != trial_id else None,
            "config_json": json.dumps(config),
        }
    costs.update(_measure_costs(trainer, setup.costs, costs, info, device))  # once per trial
    # data, model and seeds ready: what a trial costs before its first step (``cifar-tune bench`` reads it)
    setup_time_s = time.perf_counter() - t0

    def checkpoint() -> bytes:
        state = trainer.state_dict()
        return checkpoint_to_bytes({
            "format": CHECKPOINT_FORMAT, "state_dict": state.pop("model"), "config": config,
            "num_classes": int(info.num_classes), "in_channels": int(info.channels), "image_size": int(info.image_size),
            "mean": [float(v) for v in info.mean], "std": [float(v) for v in info.std],
            "classes": [str(c) for c in info.classes], "data": asdict(setup.data),
            "trial_id": trial_id, "seed": 0, "torch_seed": seed, "epochs": trainer.epoch, "trainer": state,
            "costs": costs,
        })

    reported: list[int] = []  # epochs reported so far: an OOM later does not undo them

    def send(metrics: dict[str, Any], blob: bytes | None) -> None:
        payload = {**metrics, **lineage, **costs, "trial_id": trial_id, "params": params, "setup_time_s": setup_time_s,
                   "status": metrics.get("status", "running"), "pid": os.getpid(),
                   "worker_data_loads": data_mod.raw_loads, "device": str(device)}
        if blob is None:
            report(payload)  # reporters that never get a checkpoint may take one argument
        else:
            report(payload, blob)
        lineage.clear()  # lineage belongs to the first epoch after a restore only
        reported.append(int(metrics["epoch"]))

    try:
        # restored after its last epoch (a PBT exploit of a finished checkpoint, a resume after the last
        # save): nothing left to train or report; re-reporting the checkpoint's epoch would overwrite
        # this trial's row for it with the copied trial's
        every = setup.checkpoint_every
        while not trainer.done:
            metrics = trainer.run_epoch()
            _inject_fault(trial_id, trainer.epoch)
            due = every > 0 and trainer.status == "completed" and (trainer.epoch % every == 0 or trainer.done)
            send(metrics, checkpoint() if due else None)
        return trainer.result()
    except torch.OutOfMemoryError as e:  # recorded as "oom", not as a crash of the search
        # no "epoch" key: this report ends the trial but is not an epoch (``results`` appends no row)
        # its peak too: the epoch that failed has no row, and the peak shows what stopped it (its cap)
        report({**costs, "trial_id": trial_id, "params": params, "status": "oom", "error": f"out of memory: {str(e)[:300]}",
                "gpu_mem_peak_mb": devices.peak_memory_mb(device)})
        return FitResult(status="oom", epochs_run=max(reported, default=0))
    finally:
        # a reused worker runs the next trial next: drop this one's model, graphs and cached GPU blocks
        del model
        trainer = None  # (the closures hold it too): its weights and optimizer state go now
        devices.end_trial(device, compiled=bool(config.get("train", {}).get("compile")))
