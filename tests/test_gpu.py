"""The CUDA path on a real GPU: placement from Ray, packed trials, memory caps, no host sync, bf16.

Every test here is marked ``gpu`` and skipped without CUDA (CI has none); run them on a GPU machine with
``python -m pytest -m gpu tests/test_gpu.py``. What runs on a CPU is in test_devices.py.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from cifar_tune.engine import data as data_mod
from cifar_tune.engine import devices
from cifar_tune.engine.augment import AUGMENTS
from cifar_tune.engine.data import load_splits
from cifar_tune.engine.models import build_model
from cifar_tune.engine.optim import OPTIMIZERS, SCHEDULES
from cifar_tune.engine.train import fit
from cifar_tune.spec.schema import DataSpec, SyntheticSpec
from cifar_tune.tuning.trial import TrialSetup, run_trial

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CUDA = torch.device("cuda:0")
DATA = DataSpec(dataset="synthetic", synthetic=SyntheticSpec(num_train=2400, num_test=200, num_classes=4, image_size=16))
SMALL = {"family": "lenet", "channels": [8, 16], "padding": 2, "hidden": [32]}
# ~40 GiB of activations at batch 4096 on 32x32 images: over a quarter of any GPU's memory
HUGE = {"family": "resnet", "widths": [1024, 1024], "blocks": [4, 4], "block": "basic", "shortcut": "conv"}


def _config(model: dict[str, Any] = SMALL, **train: Any) -> dict[str, Any]:
    return {"model": model, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}, "schedule": {"name": "cosine"},
            "augment": {"hflip": True, "crop": {"padding": 2}}, "train": {"batch_size": 64, **train}}


def _search(tmp_path: Path, spec: dict[str, Any], *extra: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    cmd = [sys.executable, "-m", "cifar_tune", "search", str(path), "--storage", str(tmp_path), "--no-dashboard",
           "--num-cpus", "4", "--progress-every", "5", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=420)


def _spec(name: str, models: list[dict[str, Any]], gpus_per_trial: float, *, epochs: int, batch_size: int,
          image_size: int = 16, num_train: int = 2400) -> dict[str, Any]:
    return {
        "name": name,
        "data": {"dataset": "synthetic", "synthetic": {"num_train": num_train, "num_test": 200, "num_classes": 4,
                                                       "image_size": image_size}},
        "search": {"num_samples": 1, "algorithm": "grid", "max_concurrent": len(models),
                   "scheduler": {"name": "fifo", "max_epochs": epochs},
                   "resources": {"cpus_per_trial": 1, "gpus_per_trial": gpus_per_trial}},
        "space": {"model": {"grid": models}, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
                  "schedule": {"name": "none"}, "augment": {"hflip": True}, "train": {"batch_size": batch_size}},
    }


# --------------------------------------------------------------------------------- through Ray


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """4 trials on one GPU (0.25 each): three small ones and one that outgrows its quarter."""
    tmp = tmp_path_factory.mktemp("packed")
    spec = _spec("packed", [SMALL, SMALL, SMALL, HUGE], 0.25, epochs=4, batch_size=4096, image_size=32, num_train=20_000)
    proc = _search(tmp, spec)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from cifar_tune.results import Experiment

    exp = Experiment(str(tmp), "packed")
    return {"tmp": tmp, "out": proc.stdout, "trials": exp.read_table("trials.parquet"),
            "epochs": exp.read_table("epochs.parquet")}


def test_packed_trials_train_on_the_assigned_gpu_concurrently(tmp_path: Path) -> None:
    """4 small trials at 0.25 GPU each, long enough to overlap whatever Ray's start-up stagger: 600 steps
    per epoch (48,000 images, 80% trained, batch 64), so a trial runs for seconds, not a few steps."""
    spec = _spec("concurrent", [SMALL] * 4, 0.25, epochs=3, batch_size=64, num_train=48_000)
    spec["space"]["model"] = {"grid": [{**SMALL, "hidden": [32 + i]} for i in range(4)]}  # 4 distinct grid points
    proc = _search(tmp_path, spec)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from cifar_tune.results import Experiment

    exp = Experiment(str(tmp_path), "concurrent")
    trials, epochs = exp.read_table("trials.parquet"), exp.read_table("epochs.parquet")
    assert (trials["status"] == "completed").all() and len(trials) == 4, trials[["trial_id", "status", "error"]]
    assert set(epochs["device"]) == {"cuda:0"}
    assert epochs["pid"].nunique() == 4  # four processes, not one after another in a reused worker
    # every trial's training overlaps every other's: they ran at the same time, not one after another
    ep = epochs.copy()
    ep["started"] = ep["ended_at"] - ep["epoch_time_s"]
    spans = ep.groupby("trial_id").agg(start=("started", "min"), end=("ended_at", "max"))
    assert spans["start"].max() < spans["end"].min(), spans
    assert (ep["gpu_mem_peak_mb"] > 0).all()


def test_a_trial_over_its_memory_share_fails_alone_as_oom(packed: dict[str, Any]) -> None:
    trials = packed["trials"]
    huge = trials[trials["config.model.family"] == "resnet"].iloc[0]
    small = trials[trials["config.model.family"] == "lenet"]
    assert huge["status"] == "oom", huge.to_dict()
    assert "out of memory" in str(huge["error"]).lower()
    assert (small["status"] == "completed").all(), small[["trial_id", "status", "error"]]
    # its share was a quarter of the GPU, context included: the cap, not the whole card, stopped it. Every
    # trial's peak, the failed one's (reported with its OOM: its last epoch has no row) first of all
    total_mb = torch.cuda.get_device_properties(0).total_memory / 2**20
    cap_mb = devices.allocator_fraction(0.25, total_mb) * total_mb
    assert huge["oom_gpu_mem_peak_mb"] > 0, huge.to_dict()
    peaks = [huge["oom_gpu_mem_peak_mb"], *packed["epochs"]["gpu_mem_peak_mb"]]
    assert max(peaks) <= cap_mb, (peaks, cap_mb)


def test_retrain_runs_on_the_assigned_gpu(packed: dict[str, Any]) -> None:
    from cifar_tune.cli import main

    tmp = packed["tmp"]
    # no dashboard: the GPU image lacks its packages (and a test needs none)
    assert main(["retrain", "packed", "--storage", str(tmp), "--top", "1", "--epochs", "1", "--num-cpus", "2",
                 "--no-dashboard"]) == 0
    import pandas as pd

    df = pd.read_parquet(tmp / "packed" / "retrain.parquet")
    assert list(df["device"]) == ["cuda:0"] and df["gpu_mem_peak_mb"].iloc[0] > 0


def test_cpu_trials_stay_off_the_gpu_on_a_gpu_host(tmp_path: Path) -> None:
    """gpus_per_trial 0 on a GPU host: Ray sees the GPU (the warning), its workers leave
    CUDA_VISIBLE_DEVICES alone for 0-GPU trials, and the trials still train on the CPU, in Ray workers."""
    spec = _spec("cpu-only", [SMALL], 0.0, epochs=1, batch_size=64)
    path = tmp_path / "cpu-only.yaml"
    path.write_text(yaml.safe_dump(spec))
    cmd = [sys.executable, "-m", "cifar_tune", "search", str(path), "--storage", str(tmp_path), "--no-dashboard",
           "--num-cpus", "2", "--progress-every", "5"]
    driver = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = driver.communicate(timeout=420)
    assert driver.returncode == 0, stderr[-3000:]
    assert "GPUs sit idle" in stdout  # Ray's cluster has the GPU
    import pandas as pd

    epochs = pd.read_parquet(tmp_path / "cpu-only" / "epochs.parquet")
    assert set(epochs["device"]) == {"cpu"}
    assert driver.pid not in set(epochs["pid"])  # trained in a Ray worker, not in the driver
    assert epochs["gpu_mem_peak_mb"].isna().all()


# ------------------------------------------------------------------------------- in one process


@pytest.fixture
def fresh_cuda() -> Iterator[None]:
    data_mod.clear_cache()
    torch.cuda.empty_cache()
    yield
    torch.cuda.set_per_process_memory_fraction(1.0, CUDA)
    data_mod.clear_cache()
    torch.cuda.empty_cache()


def _train_steps(config: dict[str, Any], epochs: int = 1, seed: int = 0) -> Any:
    train, val = load_splits(DATA, CUDA)
    model = build_model(config["model"], num_classes=4, image_size=16)
    info = data_mod.dataset_info(DATA)
    return fit(model, train, val, config, epochs=epochs, num_classes=4, mean=info.mean, std=info.std, seed=seed,
               device=CUDA, strict_sync=True)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_no_host_sync_in_the_step_loop_for_every_optimizer(name: str, fresh_cuda: None) -> None:
    lr = {"adagrad": 0.01, "sgd": 0.05}.get(name, 1e-3)
    config = {**_config(grad_clip_norm=1.0, label_smoothing=0.1), "optimizer": {"name": name, "lr": lr}}
    result = _train_steps(config)  # raises on the first synchronising call inside the step loop
    assert result.epochs_run == 1


@pytest.mark.parametrize("name", sorted(AUGMENTS))
def test_no_host_sync_in_the_step_loop_for_every_augmentation(name: str, fresh_cuda: None) -> None:
    config = {**_config(), "augment": {name: True}}
    assert _train_steps(config).epochs_run == 1


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_no_host_sync_in_the_step_loop_for_every_schedule(name: str, fresh_cuda: None) -> None:
    config = {**_config(), "schedule": {"name": name}}
    assert _train_steps(config, epochs=2).epochs_run == 2


def test_strict_sync_canary_raises_through_fit(fresh_cuda: None) -> None:
    """The guard reaches the step loop through fit(): a model that reads a value back each step fails.
    Without it every "no host sync" test here would pass without checking anything."""

    class Syncing(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = build_model(SMALL, num_classes=4, image_size=16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x.sum().item()  # a host sync per step
            return self.inner(x)

    train, val = load_splits(DATA, CUDA)
    info = data_mod.dataset_info(DATA)
    with pytest.raises(RuntimeError, match="synchroniz"):
        fit(Syncing(), train, val, _config(), epochs=1, num_classes=4, mean=info.mean, std=info.std, device=CUDA,
            strict_sync=True)
    # and without strict_sync the same loop runs
    assert fit(Syncing(), train, None, _config(), epochs=1, num_classes=4, mean=info.mean, std=info.std,
               device=CUDA).epochs_run == 1


@pytest.mark.parametrize("where", ["cuda", "host"])
def test_evaluate_syncs_a_fixed_number_of_times_not_per_batch(where: str, fresh_cuda: None) -> None:
    """Under sync-debug "warn", evaluating in 15 batches syncs as often as in 2: no bincount sync and no
    pageable copy per batch, also for a split on the host (retrain's test split comes from the driver)."""
    import warnings

    from cifar_tune.engine.train import evaluate

    train, val = load_splits(DATA, CUDA if where == "cuda" else torch.device("cpu"))
    info = data_mod.dataset_info(DATA)
    model = build_model(SMALL, num_classes=4, image_size=16).to(CUDA)
    counts = []
    for batch in (32, 256):  # 480 images: 15 batches, then 2
        evaluate(model, val, mean=info.mean, std=info.std, num_classes=4, device=CUDA, batch_size=batch)
        prev = torch.cuda.get_sync_debug_mode()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                evaluate(model, val, mean=info.mean, std=info.std, num_classes=4, device=CUDA, batch_size=batch)
            finally:
                torch.cuda.set_sync_debug_mode(prev)
        counts.append(sum("synchroniz" in str(w.message) for w in caught))
    assert counts[0] == counts[1], counts


def test_strict_sync_does_catch_a_sync(fresh_cuda: None) -> None:
    """The guard is real: an ``.item()`` inside it raises."""
    from cifar_tune.engine.train import _no_host_sync

    x = torch.ones(3, device=CUDA)
    with pytest.raises(RuntimeError, match="synchroniz"), _no_host_sync(CUDA, strict=True):
        x.sum().item()


def test_reused_worker_frees_the_previous_trial(fresh_cuda: None) -> None:
    setup = TrialSetup(data=DATA, epochs=1, seed=0)
    reports: list[dict[str, Any]] = []
    run_trial(_config({"family": "vgg", "blocks": [{"channels": [256, 256]}, {"channels": [512]}], "head": [256]},
                      batch_size=512),
              setup, trial_id="t0000", report=reports.append, device=CUDA, memory_fraction=0.5, forbid_test=False)
    after_first = torch.cuda.memory_allocated(CUDA)
    resident = sum(t.numel() * t.element_size() for s in load_splits(DATA, CUDA) for t in (s.x, s.y))
    # only the cached data set stays: end_trial also frees cuBLAS's workspace (32 MiB per stream on
    # Hopper, in the allocator and untouched by empty_cache())
    assert after_first <= resident + 2**20, (after_first, resident)
    assert torch.cuda.memory_reserved(CUDA) <= resident + 8 * 2**20  # cached blocks were given back
    run_trial(_config(), setup, trial_id="t0001", report=reports.append, device=CUDA, memory_fraction=0.5,
              forbid_test=False)
    big, small = reports[0]["gpu_mem_peak_mb"], reports[1]["gpu_mem_peak_mb"]
    assert small < big  # the peak was reset for the second trial


def test_memory_estimate_is_within_2x_of_the_measured_peak(fresh_cuda: None) -> None:
    for model, batch in ((SMALL, 64), ({"family": "vgg", "blocks": [{"channels": [64, 64]}, {"channels": [128, 128]}],
                                        "head": [256]}, 512)):
        config = _config(model, batch_size=batch)
        torch.cuda.reset_peak_memory_stats(CUDA)
        result = _train_steps(config)
        measured = result.history[-1]["gpu_mem_peak_mb"]
        est = devices.estimate_config_memory_mb(config, num_classes=4, in_channels=3, image_size=16, data_images=2400)
        # the allocator's part includes cuBLAS's workspace (32 MiB on Hopper): more than the small model's
        # weights, activations and batch together, and part of what the process reserves
        allocator_part = est["total_mb"] - est["context_mb"]
        logging.getLogger(__name__).warning("estimate %.1f MiB vs measured %.1f MiB", allocator_part, measured)
        assert 0.5 * measured <= allocator_part <= 2 * measured + 8, (allocator_part, measured)


def test_bf16_reaches_the_accuracy_of_fp32(fresh_cuda: None) -> None:
    model = {"family": "vgg", "blocks": [{"channels": [16]}, {"channels": [32]}], "head": [64]}
    acc = {p: [_train_steps(_config(model, precision=p), epochs=6, seed=s).history[-1]["val_acc"] for s in (0, 1)]
           for p in ("fp32", "bf16")}
    mean = {p: sum(v) / len(v) for p, v in acc.items()}
    spread = max(max(v) - min(v) for v in acc.values())
    assert min(mean.values()) > 0.5, acc  # both learn (chance is 0.25)
    assert abs(mean["bf16"] - mean["fp32"]) <= max(0.05, 2 * spread), acc


def test_cuda_visible_devices_narrowed_by_ray_is_respected() -> None:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    assert devices.device_for_gpus([ids[-1]], visible_devices=",".join(ids)) == torch.device(f"cuda:{len(ids) - 1}")
