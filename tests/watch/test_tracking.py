"""MLflow and W&B: the watched search's runs read back with MLflow's client and from W&B's offline run
files, against trials.parquet / epochs.parquet; retrain runs against retrain.parquet. No network."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from trackers import read_wandb_records

from cifar_tune.cli import build_parser, main, tracking_overrides
from cifar_tune.results import trial_label
from cifar_tune.spec.parse import load_spec
from cifar_tune.watch import tracking

SMOKE = Path(__file__).parents[2] / "search_spaces" / "smoke.yaml"


def test_mlflow_uri_keeps_uris_and_turns_directories_into_sqlite_stores(tmp_path: Path) -> None:
    assert tracking.mlflow_uri("http://mlflow.internal:5000") == "http://mlflow.internal:5000"
    assert tracking.mlflow_uri("sqlite:///x.db") == "sqlite:///x.db"
    assert tracking.mlflow_uri(str(tmp_path / "runs")) == f"sqlite:///{tmp_path / 'runs'}/mlflow.db"
    assert (tmp_path / "runs").is_dir()


def test_flags_are_shorthands_for_the_tracking_section() -> None:
    args = build_parser().parse_args(["search", str(SMOKE), "--mlflow", "mlruns", "--wandb", "proj", "--wandb-mode", "offline"])
    spec = load_spec(SMOKE, tracking_overrides(args))
    assert spec.tracking.mlflow.uri == "mlruns"
    assert (spec.tracking.wandb.project, spec.tracking.wandb.mode) == ("proj", "offline")
    assert load_spec(SMOKE).tracking.mlflow.uri is None  # off unless asked


# ------------------------------------------------------------------------------------------ MLflow


def _mlflow_runs(root: Path, phase: str) -> tuple[Any, list[Any]]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking.mlflow_uri(str(root / "mlruns")))
    exp = client.get_experiment_by_name("watched")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`cifar_tune.phase` = '{phase}'", max_results=1000)
    return client, runs


@pytest.mark.ray
@pytest.mark.slow
def test_mlflow_has_one_run_per_trial_with_its_epochs(watched_search: dict[str, Any]) -> None:
    pytest.importorskip("mlflow")
    exp = watched_search["exp"]
    trials, epochs = exp.read_table("trials.parquet"), exp.read_table("epochs.parquet")
    client, runs = _mlflow_runs(watched_search["root"], "search")
    by_name = {r.info.run_name: r for r in runs}
    assert len(runs) == len(trials)
    for row in trials.itertuples():
        cfg = json.loads(row.config)
        run = by_name[trial_label(row.trial_id, cfg)]
        assert run.data.tags["cifar_tune.status"] == row.status
        assert run.info.status == ("FINISHED" if row.status in ("completed", "stopped") else "FAILED")
        assert run.data.params["trial_id"] == row.trial_id
        assert float(run.data.params["config/optimizer/lr"]) == pytest.approx(cfg["optimizer"]["lr"])
        assert run.data.params["config/model/family"] == cfg["model"]["family"]
        ep = epochs[epochs.trial_id == row.trial_id]
        for key in ("val_acc", "val_loss", "train_loss"):
            history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
            assert history == [(int(e), pytest.approx(v)) for e, v in zip(ep.epoch, ep[key], strict=True)]
        assert not any(k.startswith("config/") for k in run.data.metrics)  # the config is a parameter, not a metric


# --------------------------------------------------------------------------------------------- W&B


def wandb_runs(directory: Path) -> dict[str, dict[str, Any]]:
    """display name -> {group, job_type, history: {step: {key: value}}, config: {...}, exit_code}."""
    out = {}
    for f in sorted(directory.glob("wandb/offline-run-*/run-*.wandb")):
        run: dict[str, Any] = {"history": {}, "config": {}, "exit_code": None}
        for rec in read_wandb_records(f):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                run.update(name=rec.run.display_name, group=rec.run.run_group, job_type=rec.run.job_type)
                run["config"].update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
            elif kind == "config":
                run["config"].update({i.key: json.loads(i.value_json) for i in rec.config.update})
            elif kind == "history":
                items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in rec.history.item}
                if "training_iteration" in items:
                    run["history"][int(items["training_iteration"])] = items
            elif kind == "summary":
                run.setdefault("summary", {}).update({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in rec.summary.update})
            elif kind == "exit":
                run["exit_code"] = rec.exit.exit_code
        out[run["name"]] = run
    return out


@pytest.mark.ray
@pytest.mark.slow
def test_wandb_offline_has_one_run_per_trial_with_its_epochs(watched_search: dict[str, Any]) -> None:
    pytest.importorskip("wandb")
    exp = watched_search["exp"]
    trials, epochs = exp.read_table("trials.parquet"), exp.read_table("epochs.parquet")
    runs = {n: r for n, r in wandb_runs(watched_search["root"] / "wb").items() if r["job_type"] == "search"}
    assert sorted(runs) == sorted(trial_label(r.trial_id, json.loads(r.config)) for r in trials.itertuples())
    for row in trials.itertuples():
        run = runs[trial_label(row.trial_id, json.loads(row.config))]
        assert run["group"] == "watched" and run["exit_code"] == 0
        assert run["config"]["status"] == row.status
        assert run["config"]["config"] == json.loads(row.config)
        ep = epochs[epochs.trial_id == row.trial_id]
        assert sorted(run["history"]) == list(ep.epoch)
        for e, acc in zip(ep.epoch, ep.val_acc, strict=True):
            assert run["history"][int(e)]["val_acc"] == pytest.approx(acc)


# ----------------------------------------------------------------------------------------- retrain


@pytest.mark.ray
@pytest.mark.slow
def test_retrain_runs_are_logged_with_their_test_metrics(watched_search: dict[str, Any]) -> None:
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    root = watched_search["root"]
    code = main(["retrain", "watched", "--storage", str(root / "exp"), "--top", "1", "--epochs", "1",
                 "--num-cpus", "2", "--no-dashboard"])
    assert code == 0
    df = pd.read_parquet(root / "exp" / "watched" / "retrain.parquet")
    _, runs = _mlflow_runs(root, "retrain")
    by_name = {r.info.run_name: r for r in runs}
    assert sorted(by_name) == sorted(tracking.retrain_run_name(r) for r in df.to_dict("records"))
    wb = {n: r for n, r in wandb_runs(root / "wb").items() if r["job_type"] == "retrain"}
    assert sorted(wb) == sorted(by_name)
    for row in df.to_dict("records"):
        name = tracking.retrain_run_name(row)
        run = by_name[name]
        assert run.data.tags["cifar_tune.status"] == row["status"] == "completed"
        for k in ("test_acc", "test_top5", "test_loss"):
            assert math.isclose(run.data.metrics[k], row[k])
            assert math.isclose(wb[name]["summary"][k], row[k])
        assert run.data.params["trial_id"] == row["trial_id"] and wb[name]["config"]["trial_id"] == row["trial_id"]
