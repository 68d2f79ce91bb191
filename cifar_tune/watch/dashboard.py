"""The trials dashboard: the search mirrored into an Optuna journal, served by optuna-dashboard.

Rather than a page of our own, every trial is written, as it runs, into an Optuna study kept in a
journal file in the experiment directory (``optuna.journal``): its searched parameters with their
ranges (``spec.searched``), the validation metric after every epoch as intermediate values, and its
end state: ``COMPLETE`` (trained to max_epochs; value = best metric), ``PRUNED`` (stopped by the
scheduler; value = last metric, user attr ``stopped_at_epoch``), ``FAIL`` (diverged / error / oom,
with the error as a user attr). User attrs also carry the trial id and name, node, parameter count
and epochs. optuna-dashboard then shows the trial table, learning curves, best-so-far over time,
parameter importance (PED-ANOVA), slices and parallel coordinates, live, on 127.0.0.1.

The driver writes the journal, so a search on a cluster has it wherever the driver runs. An
experiment recorded without it (no Optuna installed, or an older run) is mirrored from its parquet
files by ``cifar-tune dashboard``.
"""

from __future__ import annotations

import json
import math
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from cifar_tune.errors import UserError
from cifar_tune.pareto import objective_values
from cifar_tune.results import Experiment
from cifar_tune.spec.searched import searched_params
from cifar_tune.spec.space import parse_tree

JOURNAL = "optuna.journal"
DEFAULT_PORT = 8080
HOST = "127.0.0.1"  # no authentication in optuna-dashboard: never listen beyond this machine


def journal_path(exp: Experiment) -> Path:
    """In the experiment directory; with remote storage, on the driver's disk (printed by search)."""
    if exp.storage.local:
        return exp.local_dir() / JOURNAL
    return Path.home() / ".cache" / "cifar-tune" / "dashboards" / exp.name / JOURNAL


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def stored_space(exp: Experiment) -> dict[str, Any]:
    """The experiment's space with its distributions, from spec.yaml."""
    import yaml

    from cifar_tune.errors import ErrorList

    raw = yaml.safe_load(exp.read_text("spec.yaml"))["spec"].get("space", {})
    errors = ErrorList()
    return {k: parse_tree(v, f"space.{k}", errors) for k, v in raw.items()}


class OptunaMirror:
    """A search events sink that writes each trial into an Optuna journal study as it runs.

    It reads statuses and metrics from the search's ``TrialLog`` (the sink before it), so the
    journal says what trials.parquet says.
    """

    def __init__(self, path: Path, *, study_name: str, space: dict[str, Any], log: Any, scheduler: dict[str, Any]) -> None:
        optuna = _optuna()
        if optuna is None:
            raise UserError("the trials dashboard needs Optuna: pip install 'cifar-tune[dashboard]'")
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        path.parent.mkdir(parents=True, exist_ok=True)
        self.optuna, self.path, self.space, self.log = optuna, path, space, log
        self.storage = JournalStorage(JournalFileBackend(str(path)))
        # several objectives: a multi-objective study (one direction each), which optuna-dashboard shows
        # with its Pareto-front plot
        objectives = [(o.metric, o.resolved_mode) for o in getattr(log, "objectives", ())] or [(log.metric, log.mode)]
        self.multi = len(objectives) > 1
        directions = ["maximize" if mode == "max" else "minimize" for _, mode in objectives]
        self.study = optuna.create_study(storage=self.storage, study_name=study_name, directions=directions, load_if_exists=True)
        with warnings.catch_warnings():  # "experimental" since Optuna 3.2
            warnings.simplefilter("ignore")
            self.study.set_metric_names([m for m, _ in objectives])
        self.study.set_user_attr("scheduler", scheduler)
        self.study_id = self.study._study_id
        self.numbers: dict[str, int] = {}  # our trial id -> the storage's trial id of its latest attempt
        self.configs: dict[str, dict[str, Any]] = {}  # our trial id -> the config its parameters show
        for t in self.study.get_trials(deepcopy=False):
            tid = t.user_attrs.get("trial_id")
            if t.state == optuna.trial.TrialState.RUNNING:  # a driver that died: this attempt is over
                self._end(t._trial_id, "FAIL", None, {"status": "interrupted"})
            elif tid:
                self.numbers[tid] = t._trial_id

    # -- events --------------------------------------------------------------------------------
    def trial_started(self, trial_id: str, config: dict[str, Any], *, resumed_from_epoch: int = 0) -> None:
        """A new attempt is a new Optuna trial; one restored from a checkpoint carries the epochs it keeps."""
        from cifar_tune.results import trial_label

        old = self.numbers.get(trial_id)
        if old is not None and self.storage.get_trial(old).state == self.optuna.trial.TrialState.RUNNING:
            self._end(old, "FAIL", None, {"status": "retried"})
        sid = self.storage.create_new_trial(self.study_id)
        self.numbers[trial_id] = sid
        self._set_params(sid, trial_id, config)
        row = self.log.rows.get(trial_id, {})
        attrs = {"trial_id": trial_id, "name": trial_label(trial_id, config), "params": row.get("params"),
                 "max_epochs": self.log.max_epochs, "attempt": row.get("attempts"), "config": json.dumps(config)}
        for k, v in attrs.items():
            self.storage.set_trial_user_attr(sid, k, v)
        for e in self.log.epochs:  # what the log kept of earlier attempts (none unless resumed)
            if e["trial_id"] == trial_id:
                self.trial_result(trial_id, e)

    def trial_result(self, trial_id: str, metrics: dict[str, Any]) -> None:
        """What the log (the sink before this one) made of the result: the same epoch, the same config."""
        sid = self.numbers.get(trial_id)
        if sid is None:
            return
        value, epoch = metrics.get(self.log.metric), metrics.get("epoch")
        if epoch is not None and isinstance(value, int | float) and math.isfinite(value):
            self.storage.set_trial_intermediate_value(sid, int(epoch), float(value))
        row = self.log.rows.get(trial_id, {})
        self.storage.set_trial_user_attr(sid, "epochs_run", int(row.get("epochs_run") or 0))
        if row.get("config") and json.loads(row["config"]) != self.configs.get(trial_id):  # a PBT exploit changed it
            self._set_params(sid, trial_id, json.loads(row["config"]))
            self.storage.set_trial_user_attr(sid, "config", row["config"])
        for k in ("node_id", "images_per_s", "device", "gpu_mem_peak_mb"):
            if metrics.get(k) is not None:
                self.storage.set_trial_user_attr(sid, k, metrics[k])

    def trial_finished(self, trial_id: str, last: dict[str, Any]) -> None:
        self._finish(trial_id)

    def trial_errored(self, trial_id: str, message: str) -> None:
        self._finish(trial_id)

    def trial_retried(self, trial_id: str) -> None:
        pass  # the retry's trial_started closes this attempt

    def tick(self) -> None:
        pass

    def close(self) -> None:
        """Trials still running when the search ends (Ctrl-C) are interrupted: FAIL, rerun on --resume."""
        for tid, sid in self.numbers.items():
            if self.storage.get_trial(sid).state == self.optuna.trial.TrialState.RUNNING:
                self._end(sid, "FAIL", None, {"status": self.log.rows.get(tid, {}).get("status", "interrupted")})

    # -- helpers --------------------------------------------------------------------------------
    def _set_params(self, sid: int, trial_id: str, config: dict[str, Any]) -> None:
        """The searched parameters of the config in force (Optuna keeps a parameter once set: one a
        later config lacks stays at its last value; the ``config`` user attr is the whole config)."""
        self.configs[trial_id] = config
        for p in searched_params(self.space, config):
            dist = p.distribution()
            self.storage.set_trial_param(sid, p.name, dist.to_internal_repr(p.value), dist)

    def _finish(self, trial_id: str) -> None:
        sid = self.numbers.get(trial_id)
        row = self.log.rows.get(trial_id)
        if sid is None or row is None:
            return
        m, status = self.log.metric, row["status"]
        attrs: dict[str, Any] = {"status": status, "epochs_run": int(row.get("epochs_run") or 0)}
        if row.get("error"):
            attrs["error"] = str(row["error"])[:500]
        if self.multi and status in ("completed", "stopped"):
            # both are on or behind trials.parquet's front; the dashboard's Pareto plot reads COMPLETE trials only
            if status == "stopped":
                attrs["stopped_at_epoch"] = attrs["epochs_run"]
            self._end(sid, "COMPLETE", objective_values(self.log.rows[trial_id], self.log.objectives), attrs)
        elif status == "completed":
            self._end(sid, "COMPLETE", row.get(f"best_{m}"), attrs)
        elif status == "stopped":  # as Optuna does for a pruned trial: its last intermediate value
            attrs["stopped_at_epoch"] = attrs["epochs_run"]
            self._end(sid, "PRUNED", row.get(f"last_{m}"), attrs)
        else:
            self._end(sid, "FAIL", None, attrs)

    def _end(self, sid: int, state: str, value: Any, attrs: dict[str, Any]) -> None:
        for k, v in attrs.items():
            self.storage.set_trial_user_attr(sid, k, v)
        values = value if isinstance(value, list) else [value]
        ok = value is not None and all(isinstance(v, int | float) and math.isfinite(v) for v in values)
        st = self.optuna.trial.TrialState[state]
        if st == self.optuna.trial.TrialState.COMPLETE and not ok:
            st = self.optuna.trial.TrialState.FAIL
        self.storage.set_trial_state_values(sid, st, [float(v) for v in values] if ok else None)


def mirror_from_tables(exp: Experiment, path: Path) -> int:
    """Write the journal of a recorded experiment from trials.parquet and epochs.parquet; returns trials."""
    from cifar_tune.results import TrialLog
    from cifar_tune.spec.stored import load_stored_spec

    stored = load_stored_spec(exp)
    trials = exp.read_table("trials.parquet")
    epochs = exp.read_table("epochs.parquet") if exp.has("epochs.parquet") else pd.DataFrame(columns=["trial_id", "epoch"])
    log = TrialLog(exp, metric=stored.search.metric, mode=stored.search.resolved_mode,
                   max_epochs=stored.search.scheduler.max_epochs, trials=trials, epochs=epochs,
                   objectives=stored.search.pareto_objectives)
    mirror = OptunaMirror(path, study_name=exp.name, space=stored_space(exp), log=log,
                          scheduler=json.loads(json.dumps(stored.search.scheduler.__dict__)))
    n = 0
    for tid, row in sorted(log.rows.items(), key=lambda kv: kv[1]["sample_index"]):
        if row["status"] == "pending":
            continue
        mirror.trial_started(tid, json.loads(row["config"]))  # replays the trial's epoch rows
        if row["status"] not in ("running",):
            mirror._finish(tid)
        n += 1
    return n


# ------------------------------------------------------------------------------------------ server


def make_server(path: Path, port: int = DEFAULT_PORT) -> Any:
    """optuna-dashboard's WSGI app on 127.0.0.1:``port`` (a free port if that one is taken), threaded
    (the page fetches several things at once) and without a log line per request."""
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer
    from wsgiref.simple_server import make_server as wsgiref_server

    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from optuna_dashboard import wsgi

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True

    class Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    app = wsgi(JournalStorage(JournalFileBackend(str(path))))
    try:
        return wsgiref_server(HOST, port, app, server_class=Server, handler_class=Quiet)
    except OSError:  # taken: any free port
        return wsgiref_server(HOST, 0, app, server_class=Server, handler_class=Quiet)


def dashboard_available() -> bool:
    try:
        import optuna_dashboard  # noqa: F401
    except ImportError:
        return False
    return True


def url(server: Any) -> str:
    return f"http://{HOST}:{server.server_port}/dashboard/"


def start_in_background(path: Path, port: int = DEFAULT_PORT) -> tuple[Any, str]:
    """Serve the journal from a daemon thread of this process (the search's driver)."""
    server = make_server(path, port)
    threading.Thread(target=server.serve_forever, daemon=True, name="trials-dashboard").start()
    return server, url(server)


def ensure_journal(exp: Experiment, out: Any = print) -> Path:
    """The experiment's journal; mirrored from its tables first if the search did not write one."""
    path = journal_path(exp)
    if not path.exists():
        if not exp.has("trials.parquet"):
            raise UserError(f"experiment '{exp.name}' has no trials yet (no {JOURNAL}, no trials.parquet)")
        n = mirror_from_tables(exp, path)
        out(f"wrote {path} from the experiment's tables ({n} trials)")
    return path


def serve(exp: Experiment, port: int = DEFAULT_PORT, out: Any = print) -> None:
    """``cifar-tune dashboard``: serve an experiment's journal until Ctrl-C."""
    if not dashboard_available():
        raise UserError("cifar-tune dashboard needs optuna-dashboard: pip install 'cifar-tune[dashboard]'")
    server = make_server(ensure_journal(exp, out), port)
    out(f"trials dashboard for '{exp.name}': {url(server)}  (Ctrl-C to stop)")
    sys.stdout.flush()  # the URL must show now, also through a pipe: serving blocks
    try:
        server.serve_forever()
    finally:
        server.server_close()
