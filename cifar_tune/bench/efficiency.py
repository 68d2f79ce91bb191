"""``cifar-tune bench`` row e: a short real ASHA search on Ray Tune, its efficiency and trial start-up."""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cifar_tune.bench.common import SEED_AUGMENT, BenchOptions, model_config

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
    from cifar_tune.engine import data as data_mod
    from cifar_tune.results import Experiment
    from cifar_tune.spec.parse import parse_spec
    from cifar_tune.tuning import cluster
    from cifar_tune.tuning.driver import run_search

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
            cluster.shutdown()
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
