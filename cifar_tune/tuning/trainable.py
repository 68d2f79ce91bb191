"""The Ray Tune trainable: one trial in a Ray worker (placement, data, checkpoints, reports) and the
gauges it exports to Ray's metrics."""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any

import ray
from ray import tune

from cifar_tune.tuning.cluster import assigned_device, prepare_worker

# --------------------------------------------------------------------------------- the trainable


def _read_checkpoint(checkpoint: Any) -> bytes:
    """The trial's bytes from a Tune checkpoint, wherever its storage is (local path or pyarrow URI)."""
    from cifar_tune.tuning.trial import CHECKPOINT_FILE

    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{CHECKPOINT_FILE}") as f:
        return f.read()


def cifar_tune_trial(config: dict[str, Any], setup: Any, shared_data: Any = None, experiment: str = "",
                     resume_from: dict[str, str] | None = None) -> None:
    """Runs in a Ray worker: the plain-PyTorch trial, reporting each epoch to Tune.

    It continues from Tune's checkpoint when Tune restores it (a paused hyperband trial, a PBT
    exploit, a retry after its worker died), else from ``resume_from[trial_id]``: the checkpoint an
    earlier, interrupted run of this search left (``--resume``). Its name is what the Ray dashboard
    shows for the trial actors.
    """
    from cifar_tune.engine import data as data_mod
    from cifar_tune.tuning.trial import CHECKPOINT_FILE, run_trial

    if shared_data is not None:  # the driver's copy of the training set, via the object store
        data_mod.install_training_arrays(setup.data, shared_data)

    # Tune logs every saved and restored checkpoint at INFO level from the worker; our table says enough
    for name in ("ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)
    node_id = ray.get_runtime_context().get_node_id()
    name = tune.get_context().get_trial_name() or config["trial_id"]
    announce_trial(name, experiment)
    gauges = _TrialGauges.get()

    trial_id = config["trial_id"]
    checkpoint = tune.get_checkpoint()
    if checkpoint is None and (resume_from or {}).get(trial_id):
        checkpoint = tune.Checkpoint(resume_from[trial_id])
    resume = _read_checkpoint(checkpoint) if checkpoint is not None else None

    def report(metrics: dict[str, Any], blob: bytes | None = None) -> None:
        gauges.record(experiment, name, metrics)
        if blob is None:
            tune.report({**metrics, "node_id": node_id})
            return
        with tempfile.TemporaryDirectory() as tmp:  # Tune copies it into the experiment's storage
            with open(os.path.join(tmp, CHECKPOINT_FILE), "wb") as f:
                f.write(blob)
            tune.report({**metrics, "node_id": node_id}, checkpoint=tune.Checkpoint.from_directory(tmp))

    prepare_worker()
    device, share = assigned_device()
    run_trial(config["config"], setup, trial_id=trial_id, report=report, device=device, memory_fraction=share, resume=resume)


# ------------------------------------------------------------------------- the dashboard's view


def announce_trial(name: str, experiment: str) -> None:
    """Name the trial in the worker's log (the dashboard's Logs and Actors pages show that file).

    Ray prefixes a worker's forwarded log lines with the actor's repr, fixed when the actor was
    created; with reused actors one actor runs many trials. Ray's log monitor renames the prefix
    when the worker prints its actor-name marker, so each trial start prints it again: the driver's
    (and a job's) log then reads ``(t0007-vgg-sgd pid=...)`` instead of ``(ImplicitFunc pid=...)``.
    """
    from ray._private.ray_constants import LOG_PREFIX_ACTOR_NAME

    print(f"{LOG_PREFIX_ACTOR_NAME}{name}", flush=True)
    print(f"cifar-tune: trial {name} starting (experiment {experiment}, pid {os.getpid()})", flush=True)


class _TrialGauges:
    """Per-trial Prometheus gauges (Ray exports them on each node's metrics port as ``ray_<name>``)."""

    _instance: _TrialGauges | None = None
    VALUES = ("val_acc", "val_loss", "val_top5")

    def __init__(self) -> None:
        from ray.util.metrics import Gauge

        tags = ("experiment", "trial")
        self.epoch = Gauge("cifar_tune_trial_epoch", "epochs finished by the trial", tag_keys=tags)
        self.val = Gauge("cifar_tune_trial_val_metric", "validation metric after the last epoch", tag_keys=(*tags, "metric"))
        self.speed = Gauge("cifar_tune_trial_images_per_s", "training images per second in the last epoch", tag_keys=tags)
        self.gpu = Gauge("cifar_tune_trial_gpu_memory_peak_mb", "peak GPU memory of the trial (MiB, on GPU trials)", tag_keys=tags)

    @classmethod
    def get(cls) -> _TrialGauges:
        if cls._instance is None:  # one set per worker process, reused by every trial it runs
            cls._instance = cls()
        return cls._instance

    def record(self, experiment: str, trial: str, m: dict[str, Any]) -> None:
        tags = {"experiment": experiment, "trial": trial}
        if m.get("epoch") is not None:
            self.epoch.set(float(m["epoch"]), tags=tags)
        for k in self.VALUES:
            if isinstance(m.get(k), int | float):
                self.val.set(float(m[k]), tags={**tags, "metric": k})
        if isinstance(m.get("images_per_s"), int | float):
            self.speed.set(float(m["images_per_s"]), tags=tags)
        if m.get("gpu_mem_peak_mb") is not None:
            self.gpu.set(float(m["gpu_mem_peak_mb"]), tags=tags)


class SearchGauges:
    """Per-search Prometheus gauges, set by the driver: trials by status and the best metric so far."""

    def __init__(self, experiment: str, metric: str, statuses: tuple[str, ...]) -> None:
        from ray.util.metrics import Gauge

        self.experiment, self.metric, self.statuses = experiment, metric, statuses
        self.trials = Gauge("cifar_tune_search_trials", "trials of the search by status", tag_keys=("experiment", "status"))
        self.best = Gauge("cifar_tune_search_best_metric", "best validation metric of the search so far",
                          tag_keys=("experiment", "metric"))

    def update(self, counts: dict[str, int], best: float | None) -> None:
        for s in self.statuses:
            self.trials.set(float(counts.get(s, 0)), tags={"experiment": self.experiment, "status": s})
        if best is not None:
            self.best.set(float(best), tags={"experiment": self.experiment, "metric": self.metric})


def metrics_export_urls() -> list[str]:
    """Where each node serves Ray's Prometheus metrics (what a Prometheus server would scrape)."""
    return [f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics" for n in ray.nodes()
            if n.get("Alive") and n.get("MetricsExportPort")]
