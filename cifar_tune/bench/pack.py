"""``cifar-tune bench --pack/--workflow``: packed trials and a seed-000 workflow through the real commands.

Packing: ``k`` trials of the same config share one GPU (``gpus_per_trial: 1/k``) in a real ``cifar-tune
search`` (FIFO, every trial runs every epoch); per-trial images/s are the median of each trial's epochs
after its first (the first pays cuDNN autotuning and start-up), aggregate images/s are the images of those
epochs over the wall-clock window in which they ran (from the epoch rows' ``ended_at - epoch_time_s``).
With ``mps``, the CUDA MPS control daemon runs while the search starts its workers, so their kernels can
run concurrently instead of time-slicing the GPU.

Workflow: a shortened seed-000 run end to end (search with ASHA, then ``retrain``), timed, and the full
seed-000 workflow projected from the measured rates (see :func:`project_workflow`).
On a CPU-only machine the same code runs with ``gpus_per_trial: 0`` (1 CPU per trial): a smoke test.
"""

from __future__ import annotations

import copy
import math
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from cifar_tune.engine.devices import cpus_for_trials, mps_available
from cifar_tune.spec.schema import SchedulerSpec
from cifar_tune.tuning.budget import search_budget

Printer = Callable[[str], None]

SEED000_SPEC = Path(__file__).resolve().parent.parent / "search_spaces" / "seed000_cifar100_asha.yaml"


def cifar100_shaped(num_images: int, num_test: int = 1000) -> dict[str, Any]:
    """``data:`` of a synthetic data set with CIFAR-100's shape: 32x32x3, 100 classes."""
    return {"dataset": "synthetic", "val_fraction": 0.2,
            "synthetic": {"num_train": num_images, "num_test": num_test, "num_classes": 100, "image_size": 32}}


# ---------------------------------------------------------------------------------------- running


def _run(spec_dict: dict[str, Any], storage: str, num_cpus: int | None) -> tuple[pd.DataFrame, pd.DataFrame, float]:
    """A real ``run_search`` on a fresh local Ray instance; its trials and epochs tables and wall time."""
    from cifar_tune.engine import data as data_mod
    from cifar_tune.results import Experiment
    from cifar_tune.spec.parse import parse_spec
    from cifar_tune.tuning import cluster
    from cifar_tune.tuning.driver import run_search

    spec = parse_spec(spec_dict, "<bench>")
    t0 = time.perf_counter()
    try:
        run_search(spec, storage=storage, dashboard=False, num_cpus=num_cpus, progress_every_s=1e9, out=lambda _: None)
    finally:
        cluster.shutdown()
        data_mod.allow_test()
    wall_s = time.perf_counter() - t0
    exp = Experiment(storage, spec.name)
    return exp.read_table("trials.parquet"), exp.read_table("epochs.parquet"), wall_s


def packing_rates(epochs: pd.DataFrame, images_per_epoch: int) -> dict[str, Any]:
    """Per-trial and aggregate images/s from epoch rows, leaving out each trial's first epoch."""
    steady = epochs[epochs["epoch"] > 1].copy()
    if steady.empty:
        steady = epochs.copy()
    steady["started"] = steady["ended_at"].astype(float) - steady["epoch_time_s"].astype(float)
    per_trial = steady.groupby("trial_id")["images_per_s"].median()
    window_s = float(steady["ended_at"].astype(float).max() - steady["started"].min())
    # the images of the measured epochs (train_time_s covers the step loop, epoch_time_s adds validation)
    images = images_per_epoch * len(steady)
    return {
        "trials": int(epochs["trial_id"].nunique()),
        "per_trial_images_per_s": float(per_trial.median()),
        "per_trial_min_images_per_s": float(per_trial.min()),
        "aggregate_images_per_s": images / window_s if window_s > 0 else float("nan"),
        "window_s": window_s,
        "gpu_mem_peak_mb": float(epochs["gpu_mem_peak_mb"].max()) if "gpu_mem_peak_mb" in epochs and
        epochs["gpu_mem_peak_mb"].notna().any() else None,
        "overlap": _all_overlap(steady),
    }


def _all_overlap(steady: pd.DataFrame) -> bool:
    """Did every trial's measured epochs overlap in time with every other trial's (truly concurrent)?"""
    spans = steady.groupby("trial_id").agg(start=("started", "min"), end=("ended_at", "max"))
    return bool(spans["start"].max() < spans["end"].astype(float).min())


def packing_spec(model: dict[str, Any], k: int, *, gpu: bool, num_images: int, epochs: int,
                 batch_size: int, mps: bool = False, cores: int | None = None) -> dict[str, Any]:
    """k trials of ``model`` at once: on a GPU, 1/k of it each and the CPUs a local Ray instance offers
    (:func:`devices.cpus_for_trials`) shared among them (at most 1 each); without one, 1 CPU each."""
    usable = cpus_for_trials(cores or os.cpu_count() or 1)
    cpus = min(1.0, usable / k) if gpu else 1.0
    return {
        "name": f"bench-pack-{k}",
        "data": cifar100_shaped(num_images, num_test=100),
        "search": {"num_samples": k, "max_concurrent": k, "seed": 0,
                   "scheduler": {"name": "fifo", "max_epochs": epochs},
                   "resources": {"cpus_per_trial": cpus, "gpus_per_trial": (1.0 / k) if gpu else 0.0,
                                 "mps": "on" if mps else "off"}},
        "space": {"model": model, "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
                  "schedule": {"name": "none"},
                  "augment": {"hflip": True, "crop": {"padding": 4},
                              "color_jitter": {"brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.1},
                              "rotation": {"degrees": 15}},
                  "train": {"batch_size": batch_size}},
    }


def measure_packing(model: dict[str, Any], levels: list[int], *, gpu: bool, mps: bool, num_images: int,
                    epochs: int, batch_size: int, out: Printer = print) -> list[dict[str, Any]]:
    """One real search per packing level ``k`` (k trials on one GPU, or on k CPUs without a GPU)."""
    rows = []
    for k in levels:
        # the search itself starts MPS (search.resources.mps), as a user's search would; one trial shares
        # nothing, so k = 1 runs without it
        with tempfile.TemporaryDirectory(prefix="cifar-tune-pack-") as storage:
            spec = packing_spec(model, k, gpu=gpu, num_images=num_images, epochs=epochs, batch_size=batch_size,
                                mps=mps and gpu and k > 1)
            trials, ep, wall_s = _run(spec, storage, num_cpus=None if gpu else max(k, 1))
        train_images = int(num_images * 0.8) // batch_size * batch_size
        row = {"k": k, "mps": mps, "wall_s": wall_s, "statuses": trials["status"].value_counts().to_dict(),
               "cpus_per_trial": spec["search"]["resources"]["cpus_per_trial"],
               "devices": sorted(ep["device"].dropna().unique().tolist()), **packing_rates(ep, train_images)}
        rows.append(row)
        out(f"pack k={k:>2} mps={'on ' if mps else 'off'}: per trial {row['per_trial_images_per_s']:,.0f} img/s, "
            f"aggregate {row['aggregate_images_per_s']:,.0f} img/s, overlap {row['overlap']}, "
            f"peak {row['gpu_mem_peak_mb'] or 0:,.0f} MiB/trial, wall {wall_s:.0f} s")
    return rows


# ---------------------------------------------------------------------------------------- workflow


def workflow_spec(num_images: int, *, trials: int, epochs: int, gpu: bool) -> dict[str, Any]:
    """Seed 000's own search space (search_spaces/seed000_cifar100_asha.yaml), shortened, on CIFAR-100-shaped data."""
    from cifar_tune.spec.parse import load_yaml

    spec = copy.deepcopy(load_yaml(SEED000_SPEC.read_text(), str(SEED000_SPEC)))
    spec["name"] = "bench-seed000"
    spec["data"] = cifar100_shaped(num_images)
    spec["search"]["num_samples"] = trials
    spec["search"]["scheduler"]["max_epochs"] = epochs
    spec["search"]["max_concurrent"] = min(trials, spec["search"]["max_concurrent"])
    if not gpu:
        spec["search"]["resources"] = {"cpus_per_trial": 1, "gpus_per_trial": 0}
    return spec


def measure_workflow(num_images: int, *, trials: int, epochs: int, retrain_top: int, gpu: bool, num_cpus: int | None,
                     out: Printer = print) -> dict[str, Any]:
    """``search`` then ``retrain --top K --epochs E``, both the real code paths, timed end to end."""
    from cifar_tune.engine import data as data_mod
    from cifar_tune.results import Experiment
    from cifar_tune.retrain import run_retrain
    from cifar_tune.tuning import cluster

    spec = workflow_spec(num_images, trials=trials, epochs=epochs, gpu=gpu)
    with tempfile.TemporaryDirectory(prefix="cifar-tune-workflow-") as storage:
        t0 = time.perf_counter()
        trials_df, ep, search_s = _run(spec, storage, num_cpus=num_cpus)
        t1 = time.perf_counter()
        try:
            retrained = run_retrain(Experiment(storage, spec["name"]), top=retrain_top, epochs=epochs, seeds=1,
                                    num_cpus=num_cpus, out=lambda _: None)
        finally:
            cluster.shutdown()
            data_mod.allow_test()
        retrain_s = time.perf_counter() - t1
    result = {
        "trials": trials, "max_epochs": epochs, "search_s": search_s, "retrain_s": retrain_s,
        "total_s": time.perf_counter() - t0, "search_epochs_run": int(len(ep)),
        "search_statuses": trials_df["status"].value_counts().to_dict(),
        "search_train_time_s": float(ep["train_time_s"].astype(float).sum()),
        "retrain_top": retrain_top, "retrain_test_acc": [float(v) for v in retrained["test_acc"]],
        "retrain_statuses": retrained["status"].tolist(),
        "retrain_train_time_s": [float(v) for v in retrained["train_time_s"]],
    }
    out(f"workflow: search {trials} trials x <= {epochs} epochs ({result['search_epochs_run']} epochs run) "
        f"{search_s:.0f} s, retrain top {retrain_top} x {epochs} epochs {retrain_s:.0f} s, total {result['total_s']:.0f} s")
    return result


def project_workflow(per_trial_rate: dict[int, float], *, num_samples: int = 60, max_concurrent: int = 16,
                     max_epochs: int = 30, train_images: int = 40_000, retrain_top: int = 3,
                     retrain_epochs: int = 100, retrain_images: int = 50_000, overhead_s: float = 0.0) -> dict[str, Any]:
    """Seed 000's full workflow in seconds, from measured per-trial images/s at each packing level.

    The ASHA search is walked rung by rung (``budget.search_budget``'s expected survivors): between two
    rungs, the trials still alive run at the per-trial rate of their concurrency (at most
    ``max_concurrent``, the packing level rounded up to a measured one, i.e. the slower one), in waves
    when more are alive than run at once. The retrain runs ``retrain_top`` refits at once. Validation
    passes are left out (about 1/8 of an epoch's images each, forward only) and ``overhead_s`` adds
    measured start-up.
    """
    levels = sorted(per_trial_rate)

    def rate(concurrent: int) -> float:
        at = next((k for k in levels if k >= concurrent), levels[-1])
        return per_trial_rate[at]

    budget = search_budget(num_samples, SchedulerSpec(name="asha", max_epochs=max_epochs, grace_period=1,
                                                      reduction_factor=2))
    search_s, prev_epoch = 0.0, 0
    milestones = [(r.epoch, r.trials) for r in budget.rungs]
    for epoch, alive in milestones:
        concurrent = min(max_concurrent, alive)
        waves = math.ceil(alive / concurrent)
        search_s += waves * (epoch - prev_epoch) * train_images / rate(concurrent)
        prev_epoch = epoch
    retrain_s = retrain_epochs * retrain_images / rate(retrain_top)
    return {"search_s": search_s, "retrain_s": retrain_s, "overhead_s": overhead_s,
            "total_s": search_s + retrain_s + overhead_s, "search_epochs": budget.epochs_with_stopping,
            "rungs": milestones}


# ------------------------------------------------------------------------------------------- driver


def run_gpu_benches(args: Any, model_config: Callable[[str], dict[str, Any]], out: Printer = print) -> dict[str, Any]:
    """``--pack`` and ``--workflow`` of ``cifar-tune bench`` (argparse namespace in, report sections out);
    ``model_config`` resolves ``--pack-model`` (``bench.common.model_config``, passed in by the command line)."""
    import torch

    gpu = torch.device(args.device).type == "cuda"
    report: dict[str, Any] = {}
    if args.pack:
        levels = [int(k) for k in args.pack.split(",")]
        modes = [m.strip() == "on" for m in args.mps.split(",")]
        if any(modes) and not mps_available():
            out("MPS: nvidia-cuda-mps-control not found; packing measured without MPS only")
            modes = [m for m in modes if not m] or [False]
        rows: list[dict[str, Any]] = []
        for mps in modes:
            try:
                rows += measure_packing(model_config(args.pack_model), levels, gpu=gpu, mps=mps, num_images=args.images,
                                        epochs=args.pack_epochs, batch_size=args.pack_batch_size, out=out)
            except (RuntimeError, subprocess.SubprocessError) as e:  # MPS could not start: say so, keep the rest
                out(f"packing with mps={mps} failed: {e}")
                report.setdefault("packing_errors", []).append(f"mps={mps}: {e}")
        report["packing"] = {"model": args.pack_model, "epochs": args.pack_epochs, "batch_size": args.pack_batch_size,
                             "images": args.images, "rows": rows}
        base = {r["k"]: r for r in rows if not r["mps"]}
        if 1 in base:
            report["packing"]["aggregate_over_one"] = {
                f"{r['k']}{'+mps' if r['mps'] else ''}": r["aggregate_images_per_s"] / base[1]["aggregate_images_per_s"]
                for r in rows}
    if args.workflow:
        wf = measure_workflow(args.images, trials=args.workflow_trials, epochs=args.workflow_epochs,
                              retrain_top=min(3, args.workflow_trials),
                              gpu=gpu, num_cpus=None if gpu else max(args.workflow_trials, 1), out=out)
        report["workflow"] = wf
        rows = report.get("packing", {}).get("rows", [])
        best_mode = max((r["mps"] for r in rows), default=False, key=lambda m: sum(
            r["aggregate_images_per_s"] for r in rows if r["mps"] == m))
        rates = {r["k"]: r["per_trial_images_per_s"] for r in rows if r["mps"] == best_mode}
        if rates:
            overhead = wf["total_s"] - wf["search_train_time_s"] / min(args.workflow_trials, 16) - max(wf["retrain_train_time_s"])
            report["projection"] = {"mps": best_mode, **project_workflow(rates, overhead_s=max(overhead, 0.0))}
            p = report["projection"]
            out(f"full seed-000 workflow, projected: search {p['search_s'] / 60:.1f} min + retrain {p['retrain_s'] / 60:.1f} min"
                f" + start-up {p['overhead_s'] / 60:.1f} min = {p['total_s'] / 60:.1f} min")
    return report


def markdown(report: dict[str, Any]) -> list[str]:
    """Tables of the packing, workflow and projection sections (empty if absent)."""
    lines: list[str] = []
    if "packing" in report:
        pk = report["packing"]
        lines += ["", f"### packing: `{pk['model']}`, batch {pk['batch_size']}, {pk['images']:,} images (80% trained), "
                      f"{pk['epochs']} epochs per trial, first epoch not measured", "",
                  "| trials per GPU | MPS | per-trial images/s | aggregate images/s | aggregate / 1 trial | all overlapped "
                  "| peak MiB per trial | statuses |", "|---:|---|---:|---:|---:|---|---:|---|"]
        ratio = pk.get("aggregate_over_one", {})
        for r in pk["rows"]:
            key = f"{r['k']}{'+mps' if r['mps'] else ''}"
            lines.append(f"| {r['k']} | {'on' if r['mps'] else 'off'} | {r['per_trial_images_per_s']:,.0f} | "
                         f"{r['aggregate_images_per_s']:,.0f} | {ratio.get(key, float('nan')):.2f} | {r['overlap']} | "
                         f"{r['gpu_mem_peak_mb'] or 0:,.0f} | {r['statuses']} |")
        for err in report.get("packing_errors", []):
            lines.append(f"\npacking error: {err}")
    if "workflow" in report:
        w = report["workflow"]
        lines += ["", f"### shortened seed-000 workflow (measured): {w['trials']} trials, ASHA up to {w['max_epochs']} "
                      f"epochs, then retrain top {w['retrain_top']} for {w['max_epochs']} epochs", "",
                  "| what | value |", "|---|---:|",
                  f"| search wall s | {w['search_s']:.1f} |", f"| search epochs run | {w['search_epochs_run']} |",
                  f"| search statuses | {w['search_statuses']} |", f"| retrain wall s | {w['retrain_s']:.1f} |",
                  f"| retrain test_acc | {', '.join(f'{a:.3f}' for a in w['retrain_test_acc'])} |",
                  f"| total wall s | {w['total_s']:.1f} |"]
    if "projection" in report:
        p = report["projection"]
        lines += ["", "### full seed-000 workflow (projected from the measured per-trial rates)", "",
                  "60 trials, ASHA up to 30 epochs (grace 1, rf 2) on 40,000 images, 16 at a time; then the top 3 for "
                  "100 epochs on 50,000 images, 3 at a time" + (" (MPS on)" if p["mps"] else ""), "",
                  "| part | minutes |", "|---|---:|",
                  f"| search (~{p['search_epochs']} epochs) | {p['search_s'] / 60:.1f} |",
                  f"| retrain | {p['retrain_s'] / 60:.1f} |", f"| start-up (measured) | {p['overhead_s'] / 60:.1f} |",
                  f"| total | {p['total_s'] / 60:.1f} |"]
    return lines
