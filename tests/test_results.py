"""The experiment directory: atomic parquet files readable at any moment, flattening, status rules."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from cifar_tune.errors import UserError
from cifar_tune.results import Experiment, Storage, TrialLog, find_experiment, flatten


def _log(tmp_path: Path, max_epochs: int = 3) -> TrialLog:
    exp = Experiment(str(tmp_path), "exp")
    exp.write_text("spec.yaml", "spec: {}\n")
    return TrialLog(exp, metric="val_acc", mode="max", max_epochs=max_epochs, flush_every_s=0)


def test_flatten_keeps_lists_as_values() -> None:
    cfg = {"model": {"family": "vgg", "blocks": [{"channels": [8]}]}, "optimizer": {"lr": 0.1}}
    assert flatten(cfg) == {"config.model.family": "vgg", "config.model.blocks": [{"channels": [8]}], "config.optimizer.lr": 0.1}


def test_trial_lifecycle_and_status_rules(tmp_path: Path) -> None:
    log = _log(tmp_path)
    for i in range(4):
        log.add_pending(f"t{i:04d}", i, {"model": {"family": "mlp", "hidden": [i + 1]}, "optimizer": {"name": "sgd"}}, 10 * i)
    for tid, accs in {"t0000": [0.3, 0.5, 0.4], "t0001": [0.2], "t0002": [0.1]}.items():
        log.trial_started(tid, {})
        for e, acc in enumerate(accs, 1):
            log.trial_result(tid, {"epoch": e, "val_acc": acc, "val_loss": 1 - acc, "val_top5": 1.0, "train_loss": 1.0,
                                   "epoch_time_s": 0.5, "node_id": "n1"})
    log.trial_finished("t0000", {})
    log.trial_finished("t0001", {})
    log.trial_finished("t0002", {"status": "diverged"})
    log.trial_started("t0003", {})
    log.trial_errored("t0003", "RuntimeError: CUDA out of memory")
    trials = pd.read_parquet(tmp_path / "exp" / "trials.parquet").set_index("trial_id")
    assert trials.status.to_dict() == {"t0000": "completed", "t0001": "stopped", "t0002": "diverged", "t0003": "oom"}
    best = trials.loc["t0000"]
    assert (best.best_epoch, best.best_val_acc, best.best_val_loss, best.last_val_acc) == (2, 0.5, 0.5, 0.4)
    assert best.train_time_s == pytest.approx(1.5)
    assert trials.loc["t0001", "config.model.hidden"] == "[2]"  # lists become JSON text in parquet
    assert json.loads(trials.loc["t0002", "config"])["model"]["hidden"] == [3]
    epochs = pd.read_parquet(tmp_path / "exp" / "epochs.parquet")
    assert len(epochs) == 5 and set(epochs.trial_id) == {"t0000", "t0001", "t0002"}
    assert log.best()["trial_id"] == "t0000"


def test_a_retried_trial_starts_over(tmp_path: Path) -> None:
    log = _log(tmp_path)
    log.add_pending("t0000", 0, {"model": {"family": "mlp"}}, 1)
    log.trial_started("t0000", {})
    log.trial_result("t0000", {"epoch": 1, "val_acc": 0.1})
    log.trial_retried("t0000")
    log.trial_started("t0000", {})
    log.trial_result("t0000", {"epoch": 1, "val_acc": 0.2})
    assert [e["val_acc"] for e in log.epochs] == [0.2]
    assert log.rows["t0000"]["attempts"] == 2


def test_storage_accepts_file_uris_and_finds_the_latest_experiment(tmp_path: Path) -> None:
    storage = Storage(f"file://{tmp_path}")
    storage.write_table("a/t.parquet", pd.DataFrame({"x": [1]}))
    assert storage.read_table("a/t.parquet").x.tolist() == [1]
    for name in ("old", "new"):
        Experiment(str(tmp_path), name).write_text("spec.yaml", "spec: {}\n")
    assert find_experiment(str(tmp_path), None).name in ("old", "new")
    assert find_experiment(str(tmp_path), "old").name == "old"
    with pytest.raises(UserError, match="not found"):
        find_experiment(str(tmp_path), "missing")
