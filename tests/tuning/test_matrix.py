"""Every scheduler under every fault kind, on smoke-sized searches sharing one Ray instance.

Each search (one per scheduler and driver) has one trial per fault kind (divergence, an exception, out of
memory, a worker process killed once with ``max_failures`` 1) and two healthy trials, and runs whole in
this process (``search.run_search``). It checks what a user relies on, whatever the scheduler and the
fault: the search ends by itself, every trial ends with the status and the number of attempts its fault
calls for, there is one epoch row per (trial, epoch) and the summaries derive from them, and every trial
that finished training keeps one checkpoint whose state is its last epoch row (evaluated on the
validation split with the project's own ``evaluate`` code, it reproduces that row's val_acc; its config
is the one trials.parquet and Ray Tune's last result record).

Extending it: a trial fault kind is one more ``FAULTS`` entry (its trial id is a grid position of
``OPTIMIZERS``); a driver-level fault (SIGKILL the driver mid-search, then ``--resume``) is one more
``DRIVERS`` entry, a function that runs the spec to the end its own way (e.g. a subprocess that it kills
and resumes) and leaves the experiment in ``storage/name``; a scheduler is one more ``SCHEDULERS`` entry.
"""

from __future__ import annotations

import _thread
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import assert_summaries_derived

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SEARCH_LIMIT_S = 600.0  # far above a search's seconds, even on a loaded machine: only a search that hangs gets here
MAX_EPOCHS = 4

SCHEDULERS: dict[str, dict[str, Any]] = {
    # grace 2: no trial is stopped before its fault (at epoch 2) fires; hyperband may stop one at epoch 1
    "asha": {"name": "asha", "grace_period": 2, "reduction_factor": 2},
    # (with objectives val_acc, params and latency_ms: see make_spec)
    "mo_asha": {"name": "mo_asha", "grace_period": 2, "reduction_factor": 2},
    "hyperband": {"name": "hyperband", "reduction_factor": 2},
    "median": {"name": "median", "grace_period": 2},
    "fifo": {"name": "fifo"},
    # exploits at epoch 2 (the faults fire while epoch 2 trains, before any exploit could skip it)
    "pbt": {"name": "pbt", "perturbation_interval": 2, "synch": True, "quantile_fraction": 0.5,
            "mutations": {"train": {"label_smoothing": {"choice": [0.0, 0.1]}}}},
    "pbt-async": {"name": "pbt", "perturbation_interval": 2, "synch": False, "quantile_fraction": 0.5,
                  "mutations": {"train": {"label_smoothing": {"choice": [0.0, 0.1]}}}},
}

OK = {"completed", "stopped"}


@dataclass(frozen=True)
class Fault:
    """One trial fault kind: ``faults`` is its CIFAR_TUNE_FAULTS item, ``statuses`` the final statuses it
    may end with and ``attempts`` the starts the trial must have made, once it reaches ``epoch`` (a
    trial the scheduler stopped before that epoch never meets its fault)."""

    faults: str
    statuses: set[str]
    attempts: int
    epoch: int = 2


# Every search has one trial per fault kind, and two healthy ones (PBT needs someone to copy).
FAULTS: dict[str, Fault] = {
    "t0000": Fault("", {"diverged"}, 1, epoch=1),  # its optimizer has lr 1e30: a non-finite loss in its first epoch
    "t0001": Fault("t0001=raise@2", {"error"}, 2),  # raises at epoch 2: retried once (max_failures 1), raises again
    "t0002": Fault("t0002=oom@2", {"oom"}, 1),  # out of memory at epoch 2: not retried (it would recur)
    "t0003": Fault("t0003=exit@2", OK, 2),  # its worker process dies at epoch 2, once: retried from its checkpoint
    "t0004": Fault("", OK, 1, epoch=1),
    "t0005": Fault("", OK, 1, epoch=1),
}
OPTIMIZERS = [{"name": "sgd", "lr": 1.0e30, "momentum": 0.9}, {"name": "sgd", "lr": 0.05, "momentum": 0.9},
              {"name": "adam", "lr": 3.0e-3}, {"name": "sgd", "lr": 0.01}, {"name": "sgd", "lr": 0.1, "momentum": 0.9},
              {"name": "adam", "lr": 1.0e-3}]


def run_in_process(spec_raw: dict[str, Any], storage: Path) -> list[str]:
    """The search as `cifar-tune search` runs it; a watchdog interrupts one that does not end by itself."""
    from cifar_tune.spec.parse import parse_spec
    from cifar_tune.tuning.driver import run_search

    spec = parse_spec(spec_raw, str(storage / f"{spec_raw['name']}.yaml"))
    lines: list[str] = []
    watchdog = threading.Timer(SEARCH_LIMIT_S, _thread.interrupt_main)
    watchdog.start()
    try:
        run_search(spec, storage=str(storage), dashboard=False, progress_every_s=1e9, out=lines.append)
    finally:
        watchdog.cancel()
    return lines


# How the driver runs: (raw spec, storage) -> the search's output lines, leaving a finished experiment in
# storage/name. A driver-level fault (SIGKILL the driver, then --resume) is one more entry here.
DRIVERS: dict[str, Callable[[dict[str, Any], Path], list[str]]] = {"plain": run_in_process}


def make_spec(scheduler: str, name: str) -> dict[str, Any]:
    sched = {**SCHEDULERS[scheduler], "max_epochs": MAX_EPOCHS}
    pbt = sched["name"] == "pbt"
    return {
        "name": name,
        "data": {"dataset": "synthetic", "synthetic": {"num_train": 200, "num_test": 20, "num_classes": 4, "image_size": 8}},
        "search": {
            "num_samples": 1, "seed": 0, "max_failures": 1, "scheduler": sched,
            # PBT's population runs side by side (4 at once); the others two at a time on the 2 CPUs
            "resources": {"cpus_per_trial": 0.5 if pbt else 1},
            **({"objectives": ["val_acc", "params", "latency_ms"]} if sched["name"] == "mo_asha" else {}),
        },
        "space": {
            "model": {"family": "mlp", "hidden": [16]},
            "optimizer": {"grid": OPTIMIZERS},
            "schedule": {"name": "none"},
            "augment": {"hflip": False},
            "train": {"batch_size": 32, "label_smoothing": {"choice": [0.0, 0.1]} if pbt else 0.0},
        },
    }


@pytest.fixture(scope="module")
def ray_instance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One Ray instance for the whole matrix; its workers read the faults from a file the cells rewrite."""
    import ray

    where = tmp_path_factory.mktemp("matrix-faults")
    saved = {k: os.environ.get(k) for k in ("CIFAR_TUNE_FAULTS", "CIFAR_TUNE_FAULT_DIR")}
    os.environ["CIFAR_TUNE_FAULTS"] = f"@{where / 'faults.txt'}"
    os.environ["CIFAR_TUNE_FAULT_DIR"] = str(where)
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    try:
        yield where
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_search(storage: Path, name: str, lines: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    from cifar_tune.engine.data import clear_cache
    from cifar_tune.results import FINISHED
    from cifar_tune.retrain import evaluate_checkpoint, load_checkpoint
    from cifar_tune.spec.stored import data_spec_from_dict

    exp = storage / name
    trials = pd.read_parquet(exp / "trials.parquet")
    epochs = pd.read_parquet(exp / "epochs.parquet")
    log = "\n".join(lines[-40:])
    assert sorted(trials.trial_id) == sorted(FAULTS) and trials.status.isin(FINISHED).all(), \
        f"{trials[['trial_id', 'status', 'error']]}\n{log}"
    for row in trials.itertuples():
        fault = FAULTS[row.trial_id]
        if row.status == "stopped" and row.epochs_run < fault.epoch and row.attempts == 1:
            continue  # stopped by the scheduler before its fault's epoch: an ordinary stopped trial
        assert row.status in fault.statuses, f"{row.trial_id} {row.status} {row.error}\n{log}"
        assert row.attempts == fault.attempts, (row.trial_id, row.attempts)
    dup = epochs[epochs.duplicated(["trial_id", "epoch"], keep=False)]
    assert dup.empty, dup[["trial_id", "epoch", "attempt"]]
    assert_summaries_derived(trials, epochs)
    for row in trials.itertuples():
        assert (row.status == "completed") == (row.epochs_run == MAX_EPOCHS and row.status in OK), row.trial_id
        dirs = sorted(p.relative_to(exp).as_posix() for p in (exp / "ray").glob(f"*/{row.trial_id}-*/checkpoint_*"))
        if row.status not in OK:
            continue
        # one checkpoint kept, the one trials.parquet names, at the trial's last epoch row
        assert dirs == [row.checkpoint], (row.trial_id, dirs, row.checkpoint)
        assert row.checkpoint_epoch == row.epochs_run, row.trial_id
        ckpt = load_checkpoint(str(exp / row.checkpoint))
        assert ckpt["epochs"] == row.epochs_run and ckpt["config"] == json.loads(row.config), row.trial_id
        clear_cache()
        ev = evaluate_checkpoint(ckpt, data_spec_from_dict(ckpt["data"], row.checkpoint), "val", row.checkpoint)
        assert ev.top1 == pytest.approx(row.last_val_acc, abs=1e-9), row.trial_id
        # what Ray Tune last saw of the trial is the config trials.parquet records
        results = [json.loads(ln) for p in (exp / "ray").glob(f"*/{row.trial_id}-*/result.json")
                   for ln in p.read_text().splitlines() if ln.strip()]
        assert results[-1]["config"]["config"] == json.loads(row.config), row.trial_id
    return trials, epochs


@pytest.mark.parametrize("driver", list(DRIVERS))
@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_every_scheduler_under_every_fault(scheduler: str, driver: str, ray_instance: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    name = f"{scheduler}-{driver}"
    for marker in ray_instance.glob("*-fired"):  # exit faults fire once per search
        marker.unlink()
    (ray_instance / "faults.txt").write_text(",".join(f.faults for f in FAULTS.values() if f.faults))
    t0 = time.perf_counter()
    lines = DRIVERS[driver](make_spec(scheduler, name), tmp_path)
    took_s = time.perf_counter() - t0
    trials, epochs = check_search(tmp_path, name, lines)
    with capsys.disabled():
        print(f"\n  {name}: {took_s:.1f} s, {len(epochs)} epoch rows, {dict(trials.status.value_counts())}", flush=True)
