"""Everything that touches Ray lives here, so Ray's changing APIs touch one file.

The rest of the package talks to this module through plain Python objects: a ``TrialSource`` that
hands out (trial id, config) pairs and hears about results, and a ``SearchEvents`` sink that the
results store implements.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

# The legacy reporter honours verbose=0; we print our own live table instead of Ray's.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
# Diverged and out-of-memory trials report a last result without validation metrics.
os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
# A reused actor waits for the previous trial's thread to stop (at its next report, i.e. up to one epoch)
# before the next trial; Ray gives up after 2 s and fails the *next* trial ("Trainable runner reuse
# requires reset_config() ...", seen under load when the scheduler stops a trial mid-epoch). Read by
# the worker at reset time; this module is imported there to unpickle the trainable.
os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", "600")

import ray  # noqa: E402
from ray import tune  # noqa: E402
from ray.tune.schedulers import (  # noqa: E402
    AsyncHyperBandScheduler,
    FIFOScheduler,
    HyperBandScheduler,
    MedianStoppingRule,
    PopulationBasedTraining,
    TrialScheduler,
)
from ray.tune.search import Searcher  # noqa: E402

from cifar_tune import devices  # noqa: E402
from cifar_tune.errors import UserError  # noqa: E402
from cifar_tune.spec import ResourcesSpec, SchedulerSpec  # noqa: E402

TOKEN_PATH = Path.home() / ".ray" / "auth_token"


class TrialSource(Protocol):
    def next_trial(self) -> tuple[str, dict[str, Any]] | None: ...
    def trial_finished(self, trial_id: str, result: dict[str, Any] | None, error: bool) -> None: ...


class SearchEvents(Protocol):
    def trial_started(self, trial_id: str, config: dict[str, Any]) -> None: ...
    def trial_resumed(self, trial_id: str) -> None: ...
    def trial_result(self, trial_id: str, metrics: dict[str, Any]) -> None: ...
    def trial_checkpoint(self, trial_id: str, path: str, epoch: int) -> None: ...
    def trial_finished(self, trial_id: str, last: dict[str, Any]) -> None: ...
    def trial_errored(self, trial_id: str, message: str) -> None: ...
    def trial_retried(self, trial_id: str) -> None: ...
    def tick(self) -> None: ...


@dataclass(frozen=True)
class RayInfo:
    address: str
    dashboard_url: str | None
    started_here: bool
    cpus: float
    gpus: float
    nodes: int
    token_auth: bool


# ------------------------------------------------------------------------------------- the cluster


_local_services = contextlib.ExitStack()  # what a local instance started here needs stopped with it (MPS)


CONNECT_TIMEOUT_S = 10.0  # a reachable head answers a TCP connect in milliseconds, even under load


def check_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Fail in ``timeout_s`` with one line when nothing listens at a ``HOST:PORT`` address.

    ``ray.init`` retries an unreachable GCS for minutes before it gives up, so a mistyped address would
    look like a hang. ``auto`` (Ray finds the local cluster itself, or says at once that there is none)
    and client addresses (``ray://``, with their own timeout) are left to Ray.
    """
    import socket

    if address == "auto" or "://" in address:
        return
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise UserError(f"--address {address}: expected HOST:PORT (e.g. 10.0.0.1:6379) or auto")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        reason = "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e))
        raise UserError(f"--address {address}: no Ray cluster answers there ({reason} after at most "
                        f"{timeout_s:g} s); start one with `ray start --head` or check the address") from None



def joins_cluster(address: str | None) -> bool:
    """Would :func:`connect` join a running cluster rather than start a local instance?"""
    return bool(address or os.environ.get("RAY_ADDRESS"))


def connect(address: str | None = None, *, dashboard: bool = True, num_cpus: int | None = None,
            mps: bool = False, mps_required: bool = False, out: Callable[[str], None] = print) -> RayInfo:
    """Start a local Ray instance, or join ``address`` (e.g. ``auto`` or ``10.0.0.1:6379``).

    A local instance offers trials ``num_cpus`` CPUs (default: :func:`devices.cpus_for_trials` of the
    machine's cores, the rest left to Ray's own processes). ``mps``: run the CUDA MPS daemon for the
    local instance's workers, started before them and stopped by :func:`shutdown`; if it does not start,
    an error with ``mps_required``, else a line through ``out`` and the search goes on without it.
    """
    started_here = False
    # a driver started by `ray job submit` finds its cluster in RAY_ADDRESS, as ray.init() would
    address = address or os.environ.get("RAY_ADDRESS") or None
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
        if address:
            check_reachable(address)
            try:
                ctx = ray.init(address=address, **kwargs)
            except ConnectionError as e:  # e.g. `auto` with no cluster on this machine
                raise UserError(f"--address {address}: {' '.join(str(e).split())[:300]}") from None
        else:
            if mps:  # before ray.init: the workers find the daemon through the variables it exports
                try:
                    _local_services.enter_context(devices.mps_daemon(True))
                except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                    if mps_required:
                        raise RuntimeError(f"CUDA MPS did not start: {e}") from e
                    out(f"CUDA MPS did not start ({e}); trials share the GPU by time slices")
            ctx = ray.init(
                address="local",  # a new instance, even if another Ray runs on this machine
                num_cpus=num_cpus if num_cpus is not None else devices.cpus_for_trials(os.cpu_count() or 1),
                include_dashboard=dashboard,
                dashboard_host="127.0.0.1",  # never expose the dashboard beyond this machine by default
                **kwargs,
            )
            started_here = True
        url = getattr(ctx, "dashboard_url", None)
    else:
        url = None  # joined an instance this process already started (tests)
    res = ray.cluster_resources()
    return RayInfo(
        address=ray.get_runtime_context().gcs_address,
        dashboard_url=f"http://{url}" if url and not url.startswith("http") else url,
        started_here=started_here,
        cpus=res.get("CPU", 0.0),
        gpus=res.get("GPU", 0.0),
        nodes=len([n for n in ray.nodes() if n.get("Alive")]),
        token_auth=_token_auth_enabled(),
    )


def _token_auth_enabled() -> bool:
    """What Ray decided (it reads RAY_AUTH_MODE case-insensitively, defaults differ by version and by
    whether a token exists), not our guess from the environment. Private API: checked by the tests."""
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    return bool(is_token_auth_enabled())


def shutdown() -> None:
    if ray.is_initialized():
        ray.shutdown()
    _local_services.close()  # after the workers are gone: MPS outlives its clients


# ------------------------------------------------------------------------------------- placement


def ray_assignment() -> tuple[list[Any], str | None, float]:
    """What Ray gave this worker: its GPU ids, the CUDA_VISIBLE_DEVICES it set, and the GPU amount."""
    share = ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0)
    return list(ray.get_gpu_ids()), os.environ.get("CUDA_VISIBLE_DEVICES"), share


def assigned_device() -> tuple[Any, float | None]:
    """The device Ray assigned this worker (CPU if none) and its share of that GPU (None: all of it).
    """
    return devices.placement(*ray_assignment())


def prepare_worker() -> None:
    """Before a trial or refit builds anything in a worker: Inductor's compile workers sized to the CPUs
    Ray gave it (:func:`devices.limit_compile_threads`), not to the machine's cores."""
    devices.limit_compile_threads(ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0))


# ---------------------------------------------------------------------------------------- search


def _read_checkpoint(checkpoint: Any) -> bytes:
    """The trial's bytes from a Tune checkpoint, wherever its storage is (local path or pyarrow URI)."""
    from cifar_tune.trial import CHECKPOINT_FILE

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
    from cifar_tune import data as data_mod
    from cifar_tune.trial import CHECKPOINT_FILE, run_trial

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


class _SourceSearcher(Searcher):
    """Adapts a ``TrialSource`` (our seeded sampler, grid or Optuna) to Tune's Searcher API."""

    def __init__(self, source: TrialSource, metric: str, mode: str) -> None:
        super().__init__(metric=metric, mode=mode)
        self.source = source
        self.ids: dict[str, str] = {}  # Ray's trial id -> ours

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        nxt = self.source.next_trial()
        if nxt is None:
            return Searcher.FINISHED
        self.ids[trial_id] = nxt[0]
        return {"trial_id": nxt[0], "config": nxt[1]}

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        if trial_id in self.ids:
            self.source.trial_finished(self.ids[trial_id], result, error)

    # Resume is ours (the results store), not Tune's experiment checkpoint.
    def save(self, checkpoint_path: str) -> None:
        pass

    def restore(self, checkpoint_path: str) -> None:
        pass


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


# A trial that diverged or ran out of memory ends with a report no scheduler can rank: no validation
# metric (and, out of memory, no epoch either: that epoch never finished).
ENDING_STATUSES = ("diverged", "oom")


def _ends_trial(result: dict[str, Any]) -> bool:
    return result.get("status") in ENDING_STATUSES


def _unranked(result: dict[str, Any]) -> bool:
    """A trial's last result that no scheduler can file: an ending report, or none of the trial's own.
    A trial resumed from the checkpoint of its last epoch trains and reports nothing, and Tune completes
    it with an empty result (median stopping would keep it as the trial's latest, without an epoch)."""
    return _ends_trial(result) or "epoch" not in result


class _EndingReports:
    """Mixed into every scheduler: a trial's ending report (diverged, out of memory) stops the trial
    without reaching the scheduler, which then hears that the trial was removed.

    Ray's schedulers read ``result[time_attr]`` and ``result[metric]`` from every result they get, in
    ``on_trial_result`` and again in ``on_trial_complete`` (with the trial's last result): an ending report
    raised ``KeyError: 'epoch'`` (hyperband, median, ASHA), "Cannot find metric" (PBT), or was paused at a
    milestone it could never pass (hyperband's bracket then waited for it for good). ``on_trial_remove`` is
    the path every scheduler already takes for a trial stopped from outside (hyperband halves without it,
    ASHA forgets it, PBT no longer counts it in its population), so the trial leaves each one cleanly.
    """

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        if _ends_trial(result):
            return TrialScheduler.STOP
        return super().on_trial_result(tune_controller, trial, result)  # type: ignore[misc]

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> None:
        if _unranked(result):
            self.on_trial_remove(tune_controller, trial)  # type: ignore[attr-defined]
            return
        super().on_trial_complete(tune_controller, trial, result)  # type: ignore[misc]


class _HyperBand(_EndingReports, HyperBandScheduler):
    pass


class _FIFO(_EndingReports, FIFOScheduler):
    pass


# (trial id, result with the time attribute and the metric, whether the trial had finished)
SchedulerHistory = list[tuple[str, dict[str, Any], bool]]
# (the epoch a resumed trial's checkpoint holds, the checkpoint's URI, the metric at that epoch)
ResumePoint = tuple[int, str | None, float | None]


class _PBT(_EndingReports, PopulationBasedTraining):
    """Ray's PBT, except that a trial keeps its own id when it copies another trial's config, and that
    nothing is copied at or after the last epoch.

    An exploit at a trial's last epoch would train nothing under the new config: the trial would only
    swap its final model for the donor's, with no epoch row for it, its own final checkpoint replaced,
    and a config in Ray that the records never see. So a result at ``max_epochs`` neither exploits nor
    serves as a donor (a trial restored from a finished checkpoint would have nothing left to train).
    """

    def __init__(self, *, max_epochs: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_epochs = max_epochs

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        if not _ends_trial(result) and (result.get(self._time_attr) or 0) >= self.max_epochs:
            return TrialScheduler.CONTINUE  # the trial completes with its own last epoch
        return super().on_trial_result(tune_controller, trial, result)

    # Synchronous PBT pauses each trial at the interval until every live trial has reached it, and
    # perturbs when the last one reports. A trial that leaves instead (an error, divergence, out of
    # memory) never reports: Ray's PBT would keep the others paused for good. So a leaving trial is
    # dropped from the ranking, and if everyone left is waiting, the interval's perturbation runs now.

    def on_trial_error(self, tune_controller: Any, trial: Any) -> None:
        super().on_trial_error(tune_controller, trial)
        self._leave(tune_controller, trial)

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        super().on_trial_remove(tune_controller, trial)
        self._leave(tune_controller, trial)

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> None:
        super().on_trial_complete(tune_controller, trial, result)  # (an unranked result: on_trial_remove left)
        if not _unranked(result):
            self._leave(tune_controller, trial)

    def _leave(self, tune_controller: Any, trial: Any) -> None:
        from ray.tune.experiment import Trial

        if trial in self._trial_state:
            self._trial_state[trial].last_score = None  # never a donor, never ranked again
        if not self._synch:
            return
        waiting = [t for t in tune_controller.get_live_trials() if t is not trial and t in self._trial_state]
        if not waiting or not all(t.status == Trial.PAUSED and self._trial_state[t].last_train_time >= self._next_perturbation_sync
                                  for t in waiting):
            return
        self._sync_now(tune_controller, waiting)

    def choose_trial_to_run(self, tune_controller: Any) -> Any:
        """Ray's choice (the trial furthest behind the next sync point), and, synchronously, a way out
        when there is none while nothing runs: every live trial is then waiting at the sync point, and
        the one whose report would have perturbed them left or came back by another path (a worker
        that died, restored from an earlier checkpoint). Without a perturbation nothing runs again."""
        from ray.tune.experiment import Trial

        chosen = super().choose_trial_to_run(tune_controller)
        if chosen is not None or not self._synch:
            return chosen
        live = [t for t in tune_controller.get_live_trials() if t in self._trial_state]
        if not live or any(t.status == Trial.RUNNING for t in live):
            return None  # (a running trial still reports at the sync point and perturbs)
        # (a pending one has no actor to save from: it is not perturbed, only let past the sync point)
        self._sync_now(tune_controller, [t for t in live if t.status == Trial.PAUSED], live)
        return super().choose_trial_to_run(tune_controller)

    def _sync_now(self, tune_controller: Any, waiting: list[Any], population: list[Any] | None = None) -> None:
        """What PopulationBasedTraining.on_trial_result does when the last trial reaches the interval:
        the ``waiting`` (paused) trials are perturbed, and the next sync point is past ``population``."""
        lower, upper = self._quantiles()
        if waiting:
            time = max(self._trial_state[t].last_train_time for t in waiting)
            middle = [t for t in waiting if t not in upper and t not in lower]
            for t in [t for t in upper + middle + lower if t in waiting]:  # donors saved before exploits
                self._trial_state[t].last_perturbation_time = time
                self._checkpoint_or_exploit(t, tune_controller, upper, lower)
        self._next_perturbation_sync = max(self._next_perturbation_sync + self._perturbation_interval,
                                           max(self._trial_state[t].last_train_time for t in population or waiting))

    # Resumed (``--resume``): Ray's PBT starts with every trial at time 0 and the next sync at one
    # interval, while the trials go on from their checkpoints. Synchronously, a trial that had been
    # waiting at the sync point is then never behind it, and one exploit copying its time moves the
    # sync point past every paused trial: nothing is chosen to run again, for good. So each trial starts
    # where its checkpoint is, as the uninterrupted search had it at the kill: the last sync point the
    # whole population passed, the next one an interval on, and a trial that had reached that one
    # waiting there, paused, with its score and its checkpoint (a donor, or exploited, when the last
    # trial arrives), exactly as a trial Ray paused itself.

    _resume: dict[str, ResumePoint] | None = None

    def resume_at(self, points: dict[str, ResumePoint]) -> None:
        """``points``: every trial of the population, by our trial id -> (the epoch its checkpoint
        holds, that checkpoint's URI, the metric at that epoch); (0, None, None) for one run afresh."""
        self._resume = points
        if self._synch and points:
            passed = min(epoch for epoch, _, _ in points.values())
            self._next_perturbation_sync = passed - passed % self._perturbation_interval + self._perturbation_interval

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        super().on_trial_add(tune_controller, trial)
        epoch, uri, score = (self._resume or {}).get(trial.config["trial_id"], (0, None, None))
        if not self._synch or not epoch:
            return
        from ray.train._internal.session import _TrainingResult
        from ray.tune.experiment import Trial

        state = self._trial_state[trial]
        passed = self._next_perturbation_sync - self._perturbation_interval
        state.last_perturbation_time = passed
        # (one with no score to rank it by runs on to the next sync point rather than wait unranked)
        waiting = epoch >= self._next_perturbation_sync and score is not None and uri is not None
        state.last_train_time = epoch if waiting or epoch < self._next_perturbation_sync else passed
        if waiting:
            result = {self._time_attr: epoch, self._metric: score}
            state.last_score, state.last_result = self._metric_op * score, result
            # Tune restores a paused trial from its checkpoint (the trial's own, not an exploit's)
            trial.run_metadata.checkpoint_manager._latest_checkpoint_result = _TrainingResult(
                checkpoint=tune.Checkpoint(uri), metrics=result)
            trial.set_status(Trial.PAUSED)  # (before Tune files the trial under its status)

    def _exploit(self, tune_controller: Any, trial: Any, trial_to_clone: Any) -> None:
        if self._trial_state[trial_to_clone].last_train_time >= self.max_epochs:
            return  # (not reached through on_trial_result above; kept so no path copies a finished model)
        super()._exploit(tune_controller, trial, trial_to_clone)

    def _get_new_config(self, trial: Any, trial_to_clone: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        config, operations = super()._get_new_config(trial, trial_to_clone)
        return {**config, "trial_id": trial.config["trial_id"]}, operations


class _Keyed:
    """A trial as a scheduler sees it: known by our trial id, which a trial keeps across ``--resume``
    (Ray's id is new in every driver run), and comparable by it (median stopping keys its history by
    trial). A replayed trial of an earlier run has no Ray trial behind it."""

    def __init__(self, trial: Any, trial_id: str) -> None:
        self._trial, self.trial_id = trial, trial_id

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "_trial":  # (unpickling looks up hooks before __init__ ran)
            raise AttributeError(name)
        if self._trial is None:
            raise AttributeError(f"{name}: trial {self.trial_id} ran in an earlier run of the search")
        return getattr(self._trial, name)

    def __hash__(self) -> int:
        return hash(self.trial_id)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Keyed) and other.trial_id == self.trial_id

    def __str__(self) -> str:
        return str(self._trial) if self._trial is not None else self.trial_id


class _NoLiveTrials:
    """The controller a replayed result sees: the earlier run's trials are gone (nothing to yield to)."""

    def get_live_trials(self) -> list[Any]:
        return []


class _Rebuilt:
    """A scheduler whose state starts as an earlier run's results left it: Ray Tune restores none of
    it, so a resumed ASHA search would judge its next results against empty rungs (and a continuing
    trial would be recorded again, at a later epoch). The results are replayed (their decisions were
    made before) when Tune first adds a trial, once the metric and mode are set."""

    _history: SchedulerHistory | None = None

    def _replay(self) -> None:
        history, self._history = self._history, None
        if not history:
            return
        ctrl, last, done = _NoLiveTrials(), {}, set()
        for tid, result, finished in history:
            key = _Keyed(None, tid)
            if tid not in last:
                super().on_trial_add(ctrl, key)  # type: ignore[misc]
            super().on_trial_result(ctrl, key, result)  # type: ignore[misc]
            last[tid] = result
            if finished:
                done.add(tid)
        for tid in done:
            super().on_trial_complete(ctrl, _Keyed(None, tid), last[tid])  # type: ignore[misc]

    def _known(self, trial_id: str) -> bool:
        return False

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self._replay()
        if not self._known(trial.config["trial_id"]):  # a continuing trial keeps its bracket
            super().on_trial_add(tune_controller, _Keyed(trial, trial.config["trial_id"]))  # type: ignore[misc]

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        return super().on_trial_result(tune_controller, _Keyed(trial, trial.config["trial_id"]), result)  # type: ignore[misc]

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> None:
        super().on_trial_complete(tune_controller, _Keyed(trial, trial.config["trial_id"]), result)  # type: ignore[misc]

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        super().on_trial_remove(tune_controller, _Keyed(trial, trial.config["trial_id"]))  # type: ignore[misc]

    def on_trial_error(self, tune_controller: Any, trial: Any) -> None:
        super().on_trial_error(tune_controller, _Keyed(trial, trial.config["trial_id"]))  # type: ignore[misc]


class _ASHA(_EndingReports, _Rebuilt, AsyncHyperBandScheduler):
    def _known(self, trial_id: str) -> bool:
        return trial_id in self._trial_info


class _Median(_EndingReports, _Rebuilt, MedianStoppingRule):
    """Ray's median stopping rule without its pauses: with fewer than ``min_samples_required`` trials to
    compare, Ray pauses a trial to let pending ones run; a paused trial holds a ``max_concurrent`` slot
    and resumes from its last checkpoint (epochs since then trained again, or all of them without
    checkpoints). Here it simply goes on: the rule only ever stops trials."""

    def _on_insufficient_samples(self, tune_controller: Any, trial: Any, time: float) -> str:
        return TrialScheduler.CONTINUE


_DOMAINS: dict[str, Callable[..., Any]] = {
    "uniform": tune.uniform, "loguniform": tune.loguniform, "quniform": tune.quniform,
    "qloguniform": tune.qloguniform, "randint": tune.randint, "lograndint": tune.lograndint, "normal": tune.randn,
}


def pbt_mutations(mutations: dict[str, Any]) -> dict[str, Any]:
    """``{"optimizer.lr": Dist}`` -> Ray's nested ``hyperparam_mutations`` over the trial config;
    a choice becomes a list (PBT perturbs it to a neighbouring option)."""
    tree: dict[str, Any] = {}
    for path, dist in mutations.items():
        node = tree.setdefault("config", {})
        *parents, leaf = path.split(".")
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = list(dist.args) if dist.kind == "choice" else _DOMAINS[dist.kind](*dist.args)
    return tree


def _clip_mutations(mutations: dict[str, Any]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    from cifar_tune.space import clip

    def explore(config: dict[str, Any]) -> dict[str, Any]:
        for path, dist in mutations.items():
            *parents, leaf = path.split(".")
            node = config["config"]
            for k in parents:
                node = node[k]
            node[leaf] = clip(dist, node[leaf])
        return config

    return explore


def make_scheduler(sched: SchedulerSpec, history: SchedulerHistory | None = None,
                   resume_points: dict[str, ResumePoint] | None = None) -> TrialScheduler:
    """One report per epoch, so ``epoch`` is the time attribute of every scheduler.

    ``history``: an earlier run's results (``--resume``), which ASHA's rungs and median stopping's
    per-trial history are rebuilt from (see :class:`_Rebuilt`); the other schedulers keep no state
    across results that a resume could lose, except hyperband's brackets and asynchronous PBT's
    population, which start afresh (its scores are re-read from the next results). ``resume_points``:
    where each trial of a resumed PBT population goes on from, which synchronous PBT's sync point and
    per-trial times are rebuilt from (see :meth:`_PBT.resume_at`).
    """
    if sched.name == "pbt":
        from cifar_tune.spec import parse_mutations

        mutations = parse_mutations(sched.mutations)
        pbt = _PBT(
            max_epochs=sched.max_epochs, time_attr="epoch", perturbation_interval=sched.perturbation_interval,
            hyperparam_mutations=pbt_mutations(mutations), quantile_fraction=sched.quantile_fraction,
            resample_probability=sched.resample_probability, custom_explore_fn=_clip_mutations(mutations),
            synch=sched.synch,
        )
        if resume_points:
            pbt.resume_at(resume_points)
        return pbt
    if sched.name == "asha":
        asha = _ASHA(
            time_attr="epoch", max_t=sched.max_epochs, grace_period=sched.grace_period,
            reduction_factor=sched.reduction_factor, brackets=sched.brackets,
        )
        asha._history = history
        return asha
    if sched.name == "hyperband":
        return _HyperBand(time_attr="epoch", max_t=sched.max_epochs, reduction_factor=sched.reduction_factor)
    if sched.name == "median":
        median = _Median(time_attr="epoch", grace_period=sched.grace_period, min_samples_required=3)
        median._history = history
        return median
    return _FIFO()


def trial_resources(res: ResourcesSpec, cluster: RayInfo) -> dict[str, float]:
    """Fractional GPUs pack several trials per device; with no GPU in the cluster, CPU only."""
    gpus = res.gpus_per_trial if cluster.gpus > 0 else 0.0
    return {"cpu": res.cpus_per_trial, "gpu": gpus}


def _on_assigned_device(fn: Callable[..., Any], place: Callable[[], tuple[Any, float | None]]) -> Callable[..., Any]:
    """A task body that receives ``device=`` and ``memory_fraction=`` from ``place()`` (Ray's assignment)."""

    def run(**kwargs: Any) -> Any:
        prepare_worker()
        device, share = place()
        return fn(**kwargs, device=device, memory_fraction=share)

    run.__name__ = run.__qualname__ = fn.__name__  # what the dashboard's Tasks page shows
    return run


def _resume_point(trial_id: str, epoch: int, uri: str | None, history: SchedulerHistory, metric: str) -> ResumePoint:
    """Where a resumed trial goes on from: its checkpoint's epoch and URI, and the metric recorded at
    that epoch (the trial's last row there)."""
    if uri is None:
        return 0, None, None
    scores = [r[metric] for tid, r, _ in history if tid == trial_id and r.get("epoch") == epoch and metric in r]
    return epoch, uri, (scores[-1] if scores else None)


def run_search(
    *,
    setup: Any,
    source: TrialSource,
    events: SearchEvents,
    scheduler: SchedulerSpec,
    metric: str,
    mode: str,
    resources: dict[str, float],
    num_trials: int,
    max_concurrent: int | None,
    max_failures: int,
    storage_path: str,
    run_name: str,
    trial_names: Callable[[dict[str, Any]], str],
    shared_data: Any = None,
    keep_checkpoints: int = 2,
    resume_from: dict[str, str] | None = None,
    population: list[tuple[str, dict[str, Any]]] | None = None,
    experiment: str = "",
    callbacks: list[Any] | None = None,
    scheduler_history: SchedulerHistory | None = None,
    resume_epochs: dict[str, int] | None = None,
) -> None:
    """Run the trials to completion; every outcome arrives through ``events``.

    ``resume_from``: trial id -> checkpoint URI of an earlier run, to continue from. ``population``:
    PBT's trials, all given up front (Ray Tune allows PBT no search algorithm, so they become a grid
    over trial ids rather than ``source`` suggestions). ``callbacks`` (e.g. from
    :func:`tracking_callbacks`) run after the events sink, so they see each trial's final status
    already recorded. ``resume_epochs``: trial id -> the epoch its ``resume_from`` checkpoint holds.
    """
    logging.getLogger("ray.tune").setLevel(logging.CRITICAL)  # our events print one line per failure
    param_space: dict[str, Any] = {}
    search_alg: Any = _SourceSearcher(source, metric, mode)
    configs: dict[str, dict[str, Any]] = {}
    if population is not None:
        configs = dict(population)
        param_space = {"trial_id": tune.grid_search(list(configs)),
                       "config": tune.sample_from(lambda spec: copy.deepcopy(configs[spec["trial_id"]]))}
        search_alg, num_trials = None, 1
    resume_points = None
    if population is not None and resume_from:
        resume_points = {tid: _resume_point(tid, (resume_epochs or {}).get(tid, 0), resume_from.get(tid), scheduler_history or [], metric)
                         for tid in configs}
    trainable = tune.with_parameters(cifar_tune_trial, setup=setup, shared_data=shared_data, experiment=experiment,
                                     resume_from=resume_from or {})
    tuner = tune.Tuner(
        tune.with_resources(trainable, resources),
        param_space=param_space,
        tune_config=tune.TuneConfig(
            search_alg=search_alg,
            scheduler=make_scheduler(scheduler, scheduler_history, resume_points),
            metric=metric,
            mode=mode,
            num_samples=num_trials,
            max_concurrent_trials=max_concurrent,
            reuse_actors=True,  # a reused worker keeps its cached data set: no per-trial reload
            # (a PBT trial is named before Ray resolves its config: the name comes from the population)
            trial_name_creator=lambda t: trial_names({"trial_id": t.config["trial_id"], "config": configs.get(t.config["trial_id"], t.config["config"])}),
            trial_dirname_creator=lambda t: trial_names({"trial_id": t.config["trial_id"], "config": configs.get(t.config["trial_id"], t.config["config"])}),
        ),
        run_config=tune.RunConfig(
            name=run_name,
            storage_path=storage_path,
            callbacks=[_EventsCallback(events), *(callbacks or [])],
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=max_failures),
            # older checkpoints are deleted as the trial goes (the driver trims finished trials to one)
            checkpoint_config=tune.CheckpointConfig(num_to_keep=keep_checkpoints),
        ),
    )
    tuner.fit()


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


# ----------------------------------------------------------------------------------------- tasks


class _QueueReporter:
    """A picklable ``report(item)`` for tasks: puts the item on a Ray queue the driver drains."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue

    def __call__(self, item: Any) -> None:
        self.queue.put(item)


def _drain(queue: Any, on_progress: Callable[[Any], None]) -> None:
    while not queue.empty():
        for item in queue.get_nowait_batch(queue.qsize()):
            on_progress(item)


def put(obj: Any) -> Any:
    """Store ``obj`` once in the object store; pass the ref as a task argument to share it."""
    return ray.put(obj)


def task_options(cpus: float, gpus: float) -> dict[str, Any]:
    """Ray options of :func:`run_tasks`' tasks. ``max_calls=0``: a worker runs any number of them (Ray
    makes it 1 for GPU tasks unless told, so that frameworks that never free GPU memory release it by
    exiting; our tasks free theirs, and a reused worker keeps its CUDA context and cached data)."""
    return {"num_cpus": cpus, "num_gpus": gpus, "max_retries": 1, "max_calls": 0}


def run_tasks(
    fn: Callable[..., Any],
    calls: list[dict[str, Any]],
    *,
    cpus: float,
    gpus: float,
    on_progress: Callable[[Any], None] | None = None,
    poll_s: float = 0.5,
    place: Callable[[], tuple[Any, float | None]] = assigned_device,
) -> Iterator[tuple[int, Any]]:
    """Run ``fn(**kwargs)`` for each call as Ray tasks; yield ``(index, result)`` as each finishes.

    ``fn`` also receives ``device=`` and ``memory_fraction=``: the accelerator Ray gave the task and its
    share of it (``place``, default :func:`assigned_device`). ``fn`` must free what it used on the
    device when it returns (``devices.end_trial``): workers are reused, GPU tasks included (Ray's
    default for GPU tasks is a fresh process per task: a CUDA context and a data load per refit).

    With ``on_progress``, each call also gets ``report=``: items it reports reach ``on_progress`` in
    the driver (through a Ray queue polled every ``poll_s``), before that call's result is yielded.
    """
    queue = None
    if on_progress is not None:
        from ray.util.queue import Queue

        queue = Queue(actor_options={"num_cpus": 0})  # a bookkeeping actor must not take a task's CPU
        calls = [{**kw, "report": _QueueReporter(queue)} for kw in calls]
    remote = ray.remote(**task_options(cpus, gpus))(_on_assigned_device(fn, place))
    pending = {remote.remote(**kw): i for i, kw in enumerate(calls)}
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=poll_s if queue is not None else None)
            if queue is not None and on_progress is not None:
                _drain(queue, on_progress)
            for ref in done:
                i = pending.pop(ref)
                yield i, ray.get(ref)
    finally:
        for ref in pending:  # the caller stopped early (Ctrl-C, an error): do not leave work running
            ray.cancel(ref, force=True)
        if queue is not None:
            queue.shutdown()

