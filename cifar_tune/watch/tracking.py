"""Experiment trackers: MLflow and Weights & Biases, from the spec's ``tracking:`` section.

The search logs through Ray Tune's own logger callbacks (built in ``tuning.callbacks.tracking_callbacks`` from
the keyword arguments made here): one run per trial, named like the trial (``t0007-vgg-sgd``), its
config flattened as parameters, per-epoch metrics at step = epoch and the final status. Retrain
runs are logged from the driver here (they are Ray tasks, not Tune trials), one run per
(trial, seed) with the test metrics. Both libraries are optional extras, imported only when used.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cifar_tune.errors import UserError
from cifar_tune.results import Experiment, flatten
from cifar_tune.spec.schema import TrackingSpec

URI_SCHEMES = ("http://", "https://", "sqlite:", "postgresql", "mysql", "mssql", "databricks", "file:")
RETRAIN_METRICS = ("test_acc", "test_top5", "test_loss", "train_time_s", "wall_time_s", "epochs_run")


def mlflow_uri(uri: str) -> str:
    """A tracking URI as given, or a local directory as an SQLite store in it.

    MLflow 3 refuses its old file store by default; the SQLite store is what it recommends locally
    (browse it with ``mlflow ui --backend-store-uri sqlite:///DIR/mlflow.db``).
    """
    if uri.startswith(URI_SCHEMES):
        return uri
    path = Path(uri).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}/mlflow.db"


def check_available(tracking: TrackingSpec) -> None:
    """Fail before the search starts (exit 2) when a configured tracker is not installed."""
    missing = []
    if tracking.mlflow.uri:
        try:
            import mlflow  # noqa: F401
        except ImportError:
            missing.append("tracking.mlflow needs the mlflow extra: pip install 'cifar-tune[mlflow]'")
    if tracking.wandb.project:
        try:
            import wandb  # noqa: F401
        except ImportError:
            missing.append("tracking.wandb needs the wandb extra: pip install 'cifar-tune[wandb]'")
    if missing:
        raise UserError(*missing)


def wandb_dir(tracking: TrackingSpec, exp: Experiment) -> str:
    if tracking.wandb.dir:
        path = Path(tracking.wandb.dir).expanduser().resolve()
    else:
        path = exp.local_dir() if exp.storage.local else Path.cwd()
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def search_callback_args(tracking: TrackingSpec, exp: Experiment) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Keyword arguments for Ray Tune's ``MLflowLoggerCallback`` and ``WandbLoggerCallback`` (None: off)."""
    mlflow = None
    if tracking.mlflow.uri:
        mlflow = {"tracking_uri": mlflow_uri(tracking.mlflow.uri), "experiment_name": tracking.mlflow.experiment or exp.name,
                  "tags": {"cifar_tune.experiment": exp.name, "cifar_tune.phase": "search"}}
    wandb = None
    if tracking.wandb.project:
        if tracking.wandb.mode != "online":  # Ray's callback asks for an API key unless this is set
            os.environ["WANDB_MODE"] = tracking.wandb.mode
        wandb = {"project": tracking.wandb.project, "group": exp.name, "mode": tracking.wandb.mode,
                 "dir": wandb_dir(tracking, exp), "job_type": "search",
                 "settings": {"silent": True}}  # not reinit="create_new": Ray's logging actor uses wandb.log
        if tracking.wandb.entity:
            wandb["entity"] = tracking.wandb.entity
    return mlflow, wandb


def describe(tracking: TrackingSpec, exp: Experiment) -> list[str]:
    """What the search prints about its trackers."""
    lines = []
    if tracking.mlflow.uri:
        uri = mlflow_uri(tracking.mlflow.uri)
        lines.append(f"MLflow: experiment '{tracking.mlflow.experiment or exp.name}' at {uri}"
                     + (f"  (browse: mlflow ui --backend-store-uri {uri})" if uri.startswith("sqlite:") else ""))
    if tracking.wandb.project:
        lines.append(f"W&B: project '{tracking.wandb.project}', group '{exp.name}', mode {tracking.wandb.mode}"
                     + (f", run files in {wandb_dir(tracking, exp)}/wandb" if tracking.wandb.mode == "offline" else ""))
    return lines


# ---------------------------------------------------------------------------------------- retrain


def _retrain_params(row: dict[str, Any]) -> dict[str, Any]:
    import json

    params = {k.removeprefix("config."): v for k, v in flatten(json.loads(row["config"])).items()}
    return {**params, "trial_id": row["trial_id"], "seed": row["seed"], "torch_seed": row["torch_seed"],
            "epochs": row["epochs"], "rank": row["rank"]}


def _retrain_metrics(row: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k in RETRAIN_METRICS:
        v = row.get(k)
        if isinstance(v, int | float) and v == v:  # not None, not NaN
            out[k] = float(v)
    return out


def log_retrain(tracking: TrackingSpec, exp: Experiment, rows: list[dict[str, Any]]) -> list[str]:
    """One run per retrain row (trial x seed) with its config, test metrics and status; returns what was logged."""
    done = []
    if tracking.mlflow.uri:
        done.append(_mlflow_retrain(tracking, exp, rows))
    if tracking.wandb.project:
        done.append(_wandb_retrain(tracking, exp, rows))
    return done


def retrain_run_name(row: dict[str, Any]) -> str:
    return f"retrain-{row['trial_id']}-seed{row['seed']}"


def _mlflow_retrain(tracking: TrackingSpec, exp: Experiment, rows: list[dict[str, Any]]) -> str:
    from mlflow import MlflowClient

    uri = mlflow_uri(tracking.mlflow.uri or "")
    client = MlflowClient(uri)
    name = tracking.mlflow.experiment or exp.name
    found = client.get_experiment_by_name(name)
    exp_id = found.experiment_id if found else client.create_experiment(name)
    for row in rows:
        run = client.create_run(exp_id, run_name=retrain_run_name(row), tags={
            "cifar_tune.experiment": exp.name, "cifar_tune.phase": "retrain", "cifar_tune.status": str(row["status"])})
        rid = run.info.run_id
        for k, v in _retrain_params(row).items():
            client.log_param(rid, k, v)
        for k, v in _retrain_metrics(row).items():
            client.log_metric(rid, k, v)
        client.set_terminated(rid, "FINISHED" if row["status"] == "completed" else "FAILED")
    return f"MLflow: {len(rows)} retrain runs in experiment '{name}' at {uri}"


def _wandb_retrain(tracking: TrackingSpec, exp: Experiment, rows: list[dict[str, Any]]) -> str:
    import wandb

    w = tracking.wandb
    for row in rows:
        run = wandb.init(project=w.project, entity=w.entity, group=exp.name, job_type="retrain", mode=w.mode,
                         dir=wandb_dir(tracking, exp), name=retrain_run_name(row),
                         config={**_retrain_params(row), "status": row["status"]}, reinit="create_new",
                         settings={"silent": True})
        run.log(_retrain_metrics(row))
        run.summary.update(_retrain_metrics(row))
        run.finish(exit_code=0 if row["status"] == "completed" else 1)
    wandb.teardown()  # the service writes run files after finish(): wait for them
    return f"W&B: {len(rows)} retrain runs in project '{w.project}' ({w.mode})"
