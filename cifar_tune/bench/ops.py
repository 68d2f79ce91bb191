"""``cifar-tune bench``: ATen ops of one training step, and compiled against eager training."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from cifar_tune.bench.common import (
    NUM_CLASSES,
    OPTIMIZER,
    REUSED_START_TARGET_S,
    SEED_AUGMENT,
    TARGETS,
    BenchOptions,
    _channel_stats,
    _sync,
    model_config,
    synthetic_images,
)
from cifar_tune.engine.augment import build_augment
from cifar_tune.engine.data import Split
from cifar_tune.engine.models import build_model
from cifar_tune.engine.train import Trainer

# ----------------------------------------------------------- targets, ops per step, compile vs eager


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
    """ATen ops of one eager training step (cifar_tune.engine.opcount): seed 000's augmentation, this run's
    model and batch size, SGD with momentum, on this run's device."""
    from cifar_tune.engine.opcount import step_ops

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
