"""PBT with every observer on: MLflow, W&B offline, TensorBoard and the trials dashboard's journal.
A PBT exploit restarts the trial in Tune with another config; each tracker keeps one run per trial,
with one value per epoch at step = epoch, and says which config is in force."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from trackers import mlflow_search_runs, mlflow_steps, tensorboard_scalars, wandb_runs_by_id

from cifar_tune.results import trial_label
from cifar_tune.spec.parse import parse_spec

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SPEC: dict[str, Any] = {
    "name": "pbt_tracked",
    "data": {"dataset": "synthetic", "synthetic": {"num_train": 300, "num_test": 50, "num_classes": 4, "image_size": 16}},
    "search": {
        "algorithm": "grid", "num_samples": 1, "seed": 0,
        # one exploit round, at epoch 3 (not at the last epoch, whose restore is another matter)
        "scheduler": {"name": "pbt", "max_epochs": 4, "perturbation_interval": 3, "quantile_fraction": 0.25,
                      "resample_probability": 0.0, "synch": True,
                      "mutations": {"optimizer": {"lr": {"loguniform": [1.0e-4, 0.3]}}}},
        "checkpoint": {"every_epochs": 1},
        "resources": {"cpus_per_trial": 0.5},
    },
    "space": {
        "model": {"family": "mlp", "hidden": [16]},
        # two that barely learn, two that do: every interval the worst copies the best
        "optimizer": {"name": "sgd", "lr": {"grid": [1.0e-4, 2.0e-4, 0.05, 0.1]}, "momentum": 0.9},
        "schedule": {"name": "none"},
        "train": {"batch_size": 32},
    },
}


@pytest.fixture(scope="module")
def pbt_search(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    import ray

    from cifar_tune.tuning.driver import run_search

    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    root = tmp_path_factory.mktemp("pbt_tracked")
    raw = {**SPEC, "tracking": {"mlflow": {"uri": str(root / "mlruns")},
                                "wandb": {"project": "cifar-tune-tests", "mode": "offline", "dir": str(root / "wb")}}}
    spec = parse_spec(raw, str(root / "pbt_tracked.yaml"))
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    lines: list[str] = []
    try:
        exp = run_search(spec, storage=str(root / "exp"), dashboard=False, out=lines.append)
    finally:
        ray.shutdown()
    yield {"root": root, "exp": exp, "out": lines, "trials": exp.read_table("trials.parquet"),
           "epochs": exp.read_table("epochs.parquet")}


def test_the_pbt_search_ends_with_exploits(pbt_search: dict[str, Any]) -> None:
    trials, epochs = pbt_search["trials"], pbt_search["epochs"]
    assert len(trials) == 4 and (trials.status == "completed").all(), "\n".join(pbt_search["out"][-30:])
    assert epochs.restored_from.notna().any()  # what the trackers must survive
    assert not epochs.duplicated(["trial_id", "epoch"]).any()


def test_mlflow_keeps_one_run_per_pbt_trial(pbt_search: dict[str, Any]) -> None:
    """Params are the config a trial started with (MLflow refuses changed values); ``config_now/`` tags
    the config in force after its exploits; metrics once per epoch at step = epoch."""
    trials, epochs = pbt_search["trials"], pbt_search["epochs"]
    client, runs = mlflow_search_runs(pbt_search["root"] / "mlruns", "pbt_tracked")
    by_trial = {}
    for run in runs:
        by_trial.setdefault(run.data.params["trial_id"], []).append(run)
    assert sorted(by_trial) == sorted(trials.trial_id) and all(len(r) == 1 for r in by_trial.values())
    exploited = 0
    for row in trials.itertuples():
        run = by_trial[row.trial_id][0]
        assert run.info.status == "FINISHED" and run.data.tags["cifar_tune.status"] == "completed"
        ep = epochs[epochs.trial_id == row.trial_id].sort_values("epoch")
        assert mlflow_steps(client, run.info.run_id, "val_acc") == [(int(e), pytest.approx(v)) for e, v in zip(ep.epoch, ep.val_acc, strict=True)]
        started_lr, final_lr = float(ep.lr.iloc[0]), json.loads(row.config)["optimizer"]["lr"]  # schedule none
        assert float(run.data.params["config/optimizer/lr"]) == pytest.approx(started_lr)
        if final_lr != pytest.approx(started_lr):
            exploited += 1
            assert float(run.data.tags["config_now/config/optimizer/lr"]) == pytest.approx(final_lr)
    assert exploited >= 1


def test_wandb_keeps_one_run_per_pbt_trial(pbt_search: dict[str, Any]) -> None:
    trials, epochs = pbt_search["trials"], pbt_search["epochs"]
    runs = wandb_runs_by_id(pbt_search["root"] / "wb")
    assert len(runs) == len(trials)
    by_name = {next(iter(r["names"])): r for r in runs.values()}
    for row in trials.itertuples():
        run = by_name[trial_label(row.trial_id, json.loads(row.config))]
        assert run["config"]["status"] == "completed"
        assert run["config"]["config"] == json.loads(row.config)  # the config in force at the end
        ep = epochs[epochs.trial_id == row.trial_id].sort_values("epoch")
        assert [s for s, _ in run["steps"]] == list(ep.epoch)
        assert [it["val_acc"] for _, it in run["steps"]] == pytest.approx(list(ep.val_acc))


def test_tensorboard_has_one_value_per_epoch_for_pbt_trials(pbt_search: dict[str, Any]) -> None:
    trials, epochs = pbt_search["trials"], pbt_search["epochs"]
    for row in trials.itertuples():
        ep = epochs[epochs.trial_id == row.trial_id].sort_values("epoch")
        seen = tensorboard_scalars(Path(pbt_search["exp"].uri("ray")), trial_label(row.trial_id, json.loads(row.config)), "ray/tune/val_acc")
        assert seen == [(int(e), pytest.approx(v)) for e, v in zip(ep.epoch, ep.val_acc, strict=True)], row.trial_id


def test_the_trials_dashboard_journal_has_every_pbt_trial(pbt_search: dict[str, Any]) -> None:
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from cifar_tune.watch.dashboard import journal_path

    trials, epochs = pbt_search["trials"], pbt_search["epochs"]
    study = optuna.load_study(study_name="pbt_tracked", storage=JournalStorage(JournalFileBackend(str(journal_path(pbt_search["exp"])))))
    by_trial = {t.user_attrs["trial_id"]: t for t in study.trials}
    assert sorted(by_trial) == sorted(trials.trial_id) and len(study.trials) == len(trials)
    for row in trials.itertuples():
        t = by_trial[row.trial_id]
        assert t.state == optuna.trial.TrialState.COMPLETE
        ep = epochs[epochs.trial_id == row.trial_id]
        assert t.intermediate_values == {int(e): pytest.approx(v) for e, v in zip(ep.epoch, ep.val_acc, strict=True)}
