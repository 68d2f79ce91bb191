"""``cifar-tune preview --time``: measure each sampled config here, project the search's wall time.

Measuring needs no Ray: each config's trainer runs a few warm-up steps, then ``steps`` training steps
timed one by one (their median) and three timed evaluation batches (their median), on this machine's device with the threads a trial would get
(``cpus_per_trial``). The projection is arithmetic on those rates (:func:`project`):

    epoch_s     = train images / training rate + val images / evaluation rate   (mean over the configs)
    search_s    = startup + (budget epochs x epoch_s + trials x per-trial overhead) / concurrency
    retrain_s   = ceil(refits / concurrency) x (retrain epochs x train+val images / training rate + test)

where the budget is the scheduler's (ASHA's epochs with early stopping) and the concurrency what Ray
would run at once here (``search.max_concurrent`` and the CPUs/GPUs per trial). The start-up and
per-trial overheads (the command's imports and validation, Ray's start, worker processes, result
handling) are rough constants for an idle machine, printed apart from the training time: on a busy
machine they dominate a small search (experiments/results/preview_time.md compares a projection with a
real run). The projection is for planning, not a promise.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

STARTUP_S = 12.0  # ray.init, the driver's data share, Tune's start and end
TRIAL_OVERHEAD_S = 1.5  # per trial: actor start or reuse, config, first report, checkpoint, bookkeeping


@dataclass(frozen=True)
class ConfigRate:
    """Images per second of one sampled config on this device."""

    index: int
    train_images_per_s: float
    eval_images_per_s: float


@dataclass(frozen=True)
class Projection:
    epoch_s: float  # mean seconds per search epoch (train + validation)
    search_epochs: int  # the scheduler's budget
    trials: int
    concurrency: int
    search_s: float
    retrain_runs: int
    retrain_concurrency: int
    retrain_s: float

    startup_s: float = STARTUP_S
    trial_overhead_s: float = TRIAL_OVERHEAD_S

    @property
    def total_s(self) -> float:
        return self.search_s + self.retrain_s

    @property
    def search_training_s(self) -> float:
        """The search's training and validation alone (no start-up or per-trial overhead)."""
        return self.search_epochs * self.epoch_s / self.concurrency


def epoch_seconds(rate: ConfigRate, train_images: int, val_images: int) -> float:
    return train_images / rate.train_images_per_s + val_images / rate.eval_images_per_s


def project(
    rates: Sequence[ConfigRate],
    *,
    train_images: int,
    val_images: int,
    test_images: int,
    search_epochs: int,
    trials: int,
    concurrency: int,
    retrain_runs: int,
    retrain_epochs: int,
    startup_s: float = STARTUP_S,
    trial_overhead_s: float = TRIAL_OVERHEAD_S,
) -> Projection:
    """The search's and the retrain's wall time from measured rates (see the module docstring)."""
    if not rates:
        raise ValueError("no measured configs")
    conc = max(1, min(concurrency, trials))
    epoch_s = sum(epoch_seconds(r, train_images, val_images) for r in rates) / len(rates)
    search_s = startup_s + (search_epochs * epoch_s + trials * trial_overhead_s) / conc
    train_rate = sum(r.train_images_per_s for r in rates) / len(rates)
    eval_rate = sum(r.eval_images_per_s for r in rates) / len(rates)
    retrain_conc = max(1, min(concurrency, retrain_runs))
    refit_s = retrain_epochs * (train_images + val_images) / train_rate + test_images / eval_rate + trial_overhead_s
    retrain_s = startup_s + math.ceil(retrain_runs / retrain_conc) * refit_s if retrain_runs else 0.0
    return Projection(epoch_s=epoch_s, search_epochs=search_epochs, trials=trials, concurrency=conc,
                      search_s=search_s, retrain_runs=retrain_runs, retrain_concurrency=retrain_conc,
                      retrain_s=retrain_s, startup_s=startup_s, trial_overhead_s=trial_overhead_s)


def duration(seconds: float) -> str:
    """``95`` -> ``1m35s``; ``7300`` -> ``2h01m``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def local_concurrency(spec: Any, trials: int, cores: int | None = None, gpus: int | None = None) -> int:
    """How many trials a local Ray instance on this machine would run at once."""
    import torch

    from cifar_tune.engine.devices import cpus_for_trials
    from cifar_tune.tuning.driver import concurrent_slots

    res = spec.search.resources
    cpus = cpus_for_trials(cores if cores is not None else os.cpu_count() or 1)
    gpus = gpus if gpus is not None else torch.cuda.device_count()
    slots = concurrent_slots(cpus, gpus, {"cpu": res.cpus_per_trial, "gpu": res.gpus_per_trial if gpus else 0.0})
    return max(1, min(spec.search.max_concurrent or slots, slots, trials))


def measure_config(config: dict[str, Any], spec: Any, index: int, *, device: Any, steps: int = 5,
                   warmup: int = 2) -> ConfigRate:
    """Training and evaluation throughput of one sampled config (eager steps, after ``warmup``)."""
    import torch

    from cifar_tune.engine import data as data_mod
    from cifar_tune.engine.models import build_model
    from cifar_tune.engine.train import Trainer, evaluate

    info = data_mod.dataset_info(spec.data)
    train, val = data_mod.load_splits(spec.data, device)
    cfg = {**config, "train": {**config.get("train", {}), "fast_path": "eager"}}
    model = build_model(cfg["model"], num_classes=info.num_classes, in_channels=info.channels, image_size=info.image_size)
    trainer = Trainer(model, train, None, cfg, epochs=1, num_classes=info.num_classes, mean=info.mean, std=info.std,
                      seed=index, device=device)
    batch = min(trainer.opts.batch_size, len(train))
    gen = torch.Generator(device=train.x.device).manual_seed(index)

    def sync() -> None:
        if trainer.device.type == "cuda":
            torch.cuda.synchronize(trainer.device)

    def step() -> None:
        idx = torch.randint(0, len(train), (batch,), generator=gen, device=train.x.device).to(trainer.device)
        trainer._step(idx)  # noqa: SLF001 - the trainer's own step, as an epoch runs it

    trainer.model.train()
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(steps):  # each step timed alone: the median ignores a step another process delayed
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    train_rate = batch / statistics.median(times)
    part = val if val is not None and len(val) else train
    n_eval = min(len(part), trainer.opts.eval_batch_size)
    sub = data_mod.Split(part.x[:n_eval], part.y[:n_eval])
    kw = {"mean": info.mean, "std": info.std, "num_classes": info.num_classes, "device": trainer.device,
          "batch_size": trainer.opts.eval_batch_size}
    evaluate(trainer.model, sub, **kw)  # warm-up
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        evaluate(trainer.model, sub, **kw)
        sync()
        times.append(time.perf_counter() - t0)
    eval_rate = n_eval / statistics.median(times)
    return ConfigRate(index, train_rate, eval_rate)


def measure(spec: Any, configs: Sequence[tuple[int, dict[str, Any]]], *, device: Any, steps: int = 5,
            warmup: int = 2, threads: int | None = None) -> list[ConfigRate]:
    """Each (sample index, config) measured with the threads a trial gets (``cpus_per_trial``)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads or max(1, int(spec.search.resources.cpus_per_trial)))
    try:
        return [measure_config(c, spec, i, device=device, steps=steps, warmup=warmup) for i, c in configs]
    finally:
        torch.set_num_threads(before)
