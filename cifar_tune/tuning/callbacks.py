"""Ray Tune callbacks: trial events into the results store, and tracking to TensorBoard, MLflow and W&B."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Protocol

from ray import tune

from cifar_tune.tuning.cluster import SearchEvents


def _error_message(trial: Any) -> str:
    """The last line of the trial's traceback ("ValueError: ..."), not the whole thing."""
    path = getattr(trial, "error_file", None)
    text = ""
    if path and os.path.exists(path):
        text = Path(path).read_text(errors="replace")
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ":" in ln and not ln.startswith(("File ", "^", "~")):
            return ln[:500]
    return lines[-1][:500] if lines else "trial failed (no error file)"


class _EventsCallback(tune.Callback):
    def __init__(self, events: SearchEvents) -> None:
        self.events = events
        self.started: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its run config (tuner.pkl) for its own restore, which cifar-tune does not use; the
        # events sink (the results store, the printer) stays in the driver. Pickling it could fail: a
        # patched builtins.print (Ray's tqdm patch) "is not the same object as builtins.print".
        return {"started": self.started}

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        tid = trial.config["trial_id"]
        if tid in self.started:  # a paused (hyperband) or exploiting (pbt) trial going on: not a new attempt
            self.events.trial_resumed(tid)
        else:
            self.started.add(tid)
            self.events.trial_started(tid, trial.config["config"])

    def on_checkpoint(self, iteration: int, trials: list[Any], trial: Any, checkpoint: Any, **info: Any) -> None:
        self.events.trial_checkpoint(trial.config["trial_id"], checkpoint.path, int((trial.last_result or {}).get("epoch") or 0))

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any) -> None:
        self.events.trial_result(trial.config["trial_id"], result)

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.events.trial_finished(trial.config["trial_id"], dict(trial.last_result or {}))

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.events.trial_errored(trial.config["trial_id"], _error_message(trial))

    def on_trial_recover(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.started.discard(trial.config["trial_id"])  # its next start is a new attempt
        self.events.trial_retried(trial.config["trial_id"])

    def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
        self.events.tick()


# -------------------------------------------------------------------------------------- trackers


def _tracked_result(result: dict[str, Any]) -> dict[str, Any]:
    """Tune copies the whole config into every result: it is logged once as parameters, not per epoch."""
    return {k: v for k, v in result.items() if k != "config"}


class TrialFacts(Protocol):
    """What the driver knows about a trial that Ray does not: its status by our rules, its searched
    parameters (every knob, list elements and branches included) and its summary metrics."""

    def status(self, trial_id: str) -> str | None: ...
    def hparams(self, trial_id: str) -> dict[str, Any]: ...
    def summary(self, trial_id: str) -> dict[str, float]: ...


def _epoch_step(result: dict[str, Any], last: dict[Any, int], key: Any) -> int:
    """The step a tracker logs a result at: the trial's epoch. Ray's ``training_iteration`` counts
    reports since the trial's actor started, so it restarts at 1 after ``--resume`` and jumps with a
    PBT exploit. A report without an epoch (a failure's last words) stays at the last epoch seen."""
    if result.get("epoch") is not None:
        last[key] = int(result["epoch"])
    return last.get(key, 0)


def tensorboard_callback(facts: TrialFacts) -> Any:
    """Ray's TensorBoard logger, with HParams that carry every searched knob (Ray's drops list values
    and conditional names) and the summary metrics (best and last validation metric, epochs run), not
    the last result. Runs are named by the trial directories: ``t0007-vgg-sgd``; scalars are at
    step = epoch."""
    from ray.tune.logger import TBXLoggerCallback
    from ray.tune.result import TRAINING_ITERATION

    class _TensorBoard(TBXLoggerCallback):
        _epochs: dict[Any, int]

        def log_trial_result(self, iteration: int, trial: Any, result: dict[str, Any]) -> None:
            # Ray's logger steps on training_iteration (and leaves it out of the scalars): give it the epoch
            epochs = self.__dict__.setdefault("_epochs", {})
            super().log_trial_result(iteration, trial, {**result, TRAINING_ITERATION: _epoch_step(result, epochs, trial)})

        def _try_log_hparams(self, trial: Any, result: dict[str, Any]) -> None:
            from tensorboardX.summary import hparams

            tid = trial.config["trial_id"]
            params = {k: v if isinstance(v, str | bool | int | float) else json.dumps(v) for k, v in facts.hparams(tid).items()}
            params["trial"] = str(trial)
            metrics = {k: float(v) for k, v in facts.summary(tid).items() if isinstance(v, int | float) and math.isfinite(v)}
            writer = self._trial_writer[trial]
            for summary in hparams(hparam_dict=params, metric_dict=metrics):
                writer.file_writer.add_summary(summary)
            for k, v in metrics.items():  # the HParams tab reads each metric's value from a scalar of its name
                writer.add_scalar(k, v, global_step=int(metrics.get("epochs_run", 0)))

    return _TensorBoard()


def tracking_run_key(experiment_uri: str, trial_id: str) -> str:
    """A trial's run across every driver run of its search (``--resume`` continues it): the trial id
    and the experiment's storage location (two experiments of one name in two storages differ)."""
    import hashlib

    return f"{hashlib.sha1(experiment_uri.encode()).hexdigest()[:10]}-{trial_id}"


def tracking_callbacks(
    *, mlflow: dict[str, Any] | None, wandb: dict[str, Any] | None, facts: TrialFacts, experiment_uri: str = "",
) -> list[Any]:
    """Ray Tune's MLflow / W&B logger callbacks: one run per trial (named like the trial), its config
    flattened as parameters, every epoch's metrics at step = epoch, and our final status
    (completed / stopped / diverged / error / oom) as a tag (MLflow) or config value (W&B).

    A trial keeps one run however often Tune restarts it (a PBT exploit, a hyperband pause, a retry)
    and across ``--resume``: the run is found again by its key (:func:`tracking_run_key`). MLflow
    parameters cannot change, so they stay the config the trial started with; a restart with another
    config (PBT) sets ``config_now/...`` tags to the values in force. W&B's run config follows it.

    ``mlflow``: keyword arguments of ``MLflowLoggerCallback`` (tracking_uri, experiment_name);
    ``wandb``: of ``WandbLoggerCallback`` (project, group, mode, dir, entity).
    """
    status_of = facts.status
    out: list[Any] = []

    def key_of(trial: Any) -> str:
        return tracking_run_key(experiment_uri, trial.config["trial_id"])

    if mlflow:
        from ray._private.dict import flatten_dict
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        class _MLflow(MLflowLoggerCallback):
            _epochs: dict[Any, int]

            def _find_run(self, key: str) -> str | None:
                runs = self.mlflow_util._get_client().search_runs(
                    [self.mlflow_util.experiment_id], filter_string=f"tags.`cifar_tune.run_key` = '{key}'", max_results=1)
                return runs[0].info.run_id if runs else None

            def log_trial_start(self, trial: Any) -> None:
                client = self.mlflow_util._get_client()
                if trial not in self._trial_runs:
                    run_id = self._find_run(key_of(trial))
                    if run_id is None:
                        tags = {**(self.tags or {}), "trial_name": str(trial), "cifar_tune.run_key": key_of(trial),
                                "cifar_tune.trial_id": trial.config["trial_id"]}
                        run_id = self.mlflow_util.start_run(tags=tags, run_name=str(trial)).info.run_id
                    else:  # the same trial in a resumed search: its run goes on
                        client.update_run(run_id, status="RUNNING")
                    self._trial_runs[trial] = run_id
                run_id = self._trial_runs[trial]
                # Ray's callback logs the params at every (re)start; MLflow refuses a changed value
                run = client.get_run(run_id).data
                params = flatten_dict(trial.config, delimiter="/")
                fresh = {k: v for k, v in params.items() if k not in run.params}
                if fresh:
                    self.mlflow_util.log_params(run_id=run_id, params_to_log=fresh)
                for k, v in params.items():
                    if k in run.params and (run.params[k] != str(v) or f"config_now/{k}" in run.tags):
                        client.set_tag(run_id, f"config_now/{k}", str(v))

            def log_trial_result(self, iteration: int, trial: Any, result: dict[str, Any]) -> None:
                epochs = self.__dict__.setdefault("_epochs", {})
                step = _epoch_step(result, epochs, trial)
                self.mlflow_util.log_metrics(run_id=self._trial_runs[trial], metrics_to_log=_tracked_result(result), step=step)

            def log_trial_end(self, trial: Any, failed: bool = False) -> None:
                run_id = self._trial_runs.get(trial)
                status = status_of(trial.config["trial_id"])
                if run_id and status:
                    self.mlflow_util._get_client().set_tag(run_id, "cifar_tune.status", status)
                self.__dict__.setdefault("_ended", set()).add(trial)
                super().log_trial_end(trial, failed=failed or status in ("diverged", "error", "oom"))

            def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
                # trials an interrupted search leaves unfinished: KILLED until --resume continues their runs
                ended = self.__dict__.setdefault("_ended", set())
                for trial, run_id in self._trial_runs.items():
                    if trial not in ended:
                        self.mlflow_util.end_run(run_id=run_id, status="KILLED")

        out.append(_MLflow(**mlflow))
    if wandb:
        from ray.air.integrations.wandb import WandbLoggerCallback, _QueueItem, _WandbLoggingActor

        class _FlushingActor(_WandbLoggingActor):
            def run(self) -> None:
                real, last = self._wandb, {}

                class _EpochSteps:  # the module, except that log() steps on the epoch (see _epoch_step)
                    def __getattr__(self, name: str) -> Any:
                        return getattr(real, name)

                    def log(self, data: dict[str, Any], step: int | None = None, **kw: Any) -> Any:
                        return real.log(data, step=_epoch_step(data, last, None), **kw)

                self._wandb = _EpochSteps()
                super().run()
                # W&B's service writes the run file after finish() returns; the callback kills this actor
                # right away, which could leave an offline run empty. teardown() waits for the write.
                real.teardown()

        class _Wandb(WandbLoggerCallback):
            _logger_actor_cls = _FlushingActor

            def _start_logging_actor(self, trial: Any, exclude_results: list[str], **init: Any) -> None:
                if trial in self._trial_logging_futures:  # a restart (PBT: maybe another config)
                    self._trial_queues[trial].put((_QueueItem.RESULT, {"config": {"config": trial.config["config"]}}))
                    return
                # one run per trial across --resume: W&B continues a run given its id again
                super()._start_logging_actor(trial, exclude_results, **{**init, "id": key_of(trial), "resume": "allow"})

            def log_trial_result(self, iteration: int, trial: Any, result: dict[str, Any]) -> None:
                super().log_trial_result(iteration, trial, _tracked_result(result))

            def log_trial_end(self, trial: Any, failed: bool = False) -> None:
                status = status_of(trial.config["trial_id"])
                if status and trial in self._trial_queues:  # a config value: W&B's table shows it per run
                    self._trial_queues[trial].put((_QueueItem.RESULT, {"config": {"status": status}}))
                self.__dict__.setdefault("_ended", set()).add(trial)
                super().log_trial_end(trial, failed=failed)

            def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
                # an interrupted search ends with trials that never ended: their logging actors would wait
                # for more results, and Ray's callback for them, up to its 30-minute upload timeout
                ended = self.__dict__.setdefault("_ended", set())
                for trial in list(self._trial_queues):
                    if trial not in ended:
                        self._signal_logging_actor_stop(trial)
                        ended.add(trial)
                super().on_experiment_end(trials, **info)

        out.append(_Wandb(**wandb))
    return out
