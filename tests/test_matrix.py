"""Every scheduler under every fault kind, on smoke-sized searches sharing one Ray instance.

Each cell runs a whole search in this process (``search.run_search``) and checks what a user relies on,
whatever the scheduler and the fault: the search ends by itself, every trial ends with the status its
fault calls for, there is one epoch row per (trial, epoch) and the summaries derive from them, and
every trial that finished training keeps one checkpoint whose state is its last epoch row (evaluated
on the validation split with the project's own ``evaluate`` code, it reproduces that row's val_acc).

To add a fault kind (e.g. a driver SIGKILL then ``--resume``), add a ``Fault`` to ``FAULTS``: ``faults``
is the ``CIFAR_TUNE_FAULTS`` list, ``expect`` the status rules; a fault that needs its own way of
running the search (a subprocess to kill) sets ``run``, which must leave the experiment's parquet
files in ``storage/name`` as a finished search would. A scheduler is one more entry in ``SCHEDULERS``.
"""

from __future__ import annotations

import _thread
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import assert_summaries_derived

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SEARCH_LIMIT_S = 150.0  # far above a cell's few seconds: only a search that hangs gets here
MAX_EPOCHS = 4

SCHEDULERS: dict[str, dict[str, Any]] = {
    "asha": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
    "hyperband": {"name": "hyperband", "reduction_factor": 2},
    "median": {"name": "median", "grace_period": 1},
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
    faults: str = ""  # CIFAR_TUNE_FAULTS for the search's trials
    diverge: bool = False  # t0000's optimizer has lr 1e30: a non-finite loss in its first epoch
    expect: dict[str, set[str]] = field(default_factory=dict)  # trial id -> allowed final statuses (others: OK)
    attempts: dict[str, int] = field(default_factory=dict)  # trial id -> attempts it must have made
    run: Callable[..., Any] | None = None  # (spec, storage) -> None: run the search some other way


FAULTS: dict[str, Fault] = {
    "raise": Fault("t0001=raise@2", expect={"t0001": {"error"}}, attempts={"t0001": 2}),  # retried once, fails again
    "oom": Fault("t0001=oom@2", expect={"t0001": {"oom"}}, attempts={"t0001": 1}),  # not retried: it would recur
    "exit": Fault("t0001=exit@2", expect={"t0001": OK}, attempts={"t0001": 2}),  # the worker dies once: retried
    "diverge": Fault(diverge=True, expect={"t0000": {"diverged"}}, attempts={"t0000": 1}),
}


def make_spec(scheduler: str, fault: Fault, name: str) -> dict[str, Any]:
    first = {"name": "sgd", "lr": 1.0e30, "momentum": 0.9} if fault.diverge else {"name": "sgd", "lr": 0.1, "momentum": 0.9}
    sched = {**SCHEDULERS[scheduler], "max_epochs": MAX_EPOCHS}
    pbt = sched["name"] == "pbt"
    return {
        "name": name,
        "data": {"dataset": "synthetic", "synthetic": {"num_train": 200, "num_test": 20, "num_classes": 4, "image_size": 8}},
        "search": {
            "num_samples": 1, "seed": 0, "max_failures": 1, "scheduler": sched,
            # PBT's population runs at once; the others two at a time on the 2 CPUs
            "resources": {"cpus_per_trial": 0.5 if pbt else 1},
        },
        "space": {
            "model": {"family": "mlp", "hidden": [16]},
            "optimizer": {"grid": [first, {"name": "sgd", "lr": 0.05, "momentum": 0.9},
                                   {"name": "adam", "lr": 3.0e-3}, {"name": "sgd", "lr": 0.01}]},
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


def run_in_process(spec_raw: dict[str, Any], storage: Path) -> list[str]:
    """The search as `cifar-tune search` runs it; a watchdog interrupts one that does not end by itself."""
    from cifar_tune.search import run_search
    from cifar_tune.spec import parse_spec

    spec = parse_spec(spec_raw, str(storage / f"{spec_raw['name']}.yaml"))
    lines: list[str] = []
    watchdog = threading.Timer(SEARCH_LIMIT_S, _thread.interrupt_main)
    watchdog.start()
    try:
        run_search(spec, storage=str(storage), dashboard=False, progress_every_s=1e9, out=lines.append)
    finally:
        watchdog.cancel()
    return lines


def check_search(storage: Path, name: str, fault: Fault, lines: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    from cifar_tune.data import clear_cache
    from cifar_tune.results import FINISHED
    from cifar_tune.retrain import data_spec_from_dict, evaluate_checkpoint, load_checkpoint

    exp = storage / name
    trials = pd.read_parquet(exp / "trials.parquet")
    epochs = pd.read_parquet(exp / "epochs.parquet")
    log = "\n".join(lines[-40:])
    assert len(trials) == 4 and trials.status.isin(FINISHED).all(), f"{trials[['trial_id', 'status', 'error']]}\n{log}"
    for row in trials.itertuples():
        assert row.status in fault.expect.get(row.trial_id, OK), f"{row.trial_id} {row.status} {row.error}\n{log}"
        if row.trial_id in fault.attempts:
            assert row.attempts == fault.attempts[row.trial_id], row.trial_id
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


@pytest.mark.parametrize("fault", list(FAULTS))
@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_every_scheduler_under_every_fault(scheduler: str, fault: str, ray_instance: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    case = FAULTS[fault]
    name = f"{scheduler}-{fault}"
    for marker in ray_instance.glob("*-fired"):  # exit faults fire once per search
        marker.unlink()
    (ray_instance / "faults.txt").write_text(case.faults)
    raw = make_spec(scheduler, case, name)
    t0 = time.perf_counter()
    lines = (case.run or run_in_process)(raw, tmp_path)
    took_s = time.perf_counter() - t0
    trials, _ = check_search(tmp_path, name, case, lines)
    with capsys.disabled():
        print(f"\n  {name}: {took_s:.1f} s, {dict(trials.status.value_counts())}")
