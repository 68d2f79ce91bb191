"""``cifar-tune search``: spec -> trials on Ray Tune -> experiment directory. Ray itself is in tuner.py."""

from __future__ import annotations

import gc
import json
import math
import time
from collections.abc import Callable
from typing import Any

import yaml

from cifar_tune.errors import UserError
from cifar_tune.results import FINISHED, Experiment, TrialLog, run_metadata, trial_label
from cifar_tune.space import Dist, InfeasibleSpace, Sampler
from cifar_tune.spec import Spec

Printer = Callable[[str], None]


def _param_counter(spec: Spec) -> Callable[[dict[str, Any]], int]:
    from cifar_tune.data import dataset_info
    from cifar_tune.models import param_count

    info = dataset_info(spec.data)
    return lambda cfg: param_count(cfg["model"], num_classes=info.num_classes, in_channels=info.channels, image_size=info.image_size)


def make_sampler(spec: Spec) -> Sampler:
    return Sampler(
        spec.space,
        seed=spec.search.seed,
        enumerate_choices=spec.search.algorithm == "grid",
        param_counter=_param_counter(spec),
        max_params=spec.constraints.max_params,
    )


def num_trials(spec: Spec) -> int:
    """num_samples repeats the grid (as in Ray Tune); Optuna draws num_samples trials."""
    if spec.search.algorithm == "optuna":
        return spec.search.num_samples
    return spec.search.num_samples * Sampler(spec.space, seed=0, enumerate_choices=spec.search.algorithm == "grid").grid_size


def trial_id_for(index: int) -> str:
    return f"t{index:04d}"


# ------------------------------------------------------------------------------- trial sources


class SampledSource:
    """Random / grid search: trial ``t{i}`` is sample ``i`` of the seeded sampler, whatever the order."""

    def __init__(self, log: TrialLog, todo: list[tuple[str, dict[str, Any]]]) -> None:
        self.log = log
        self.todo = list(todo)

    def next_trial(self) -> tuple[str, dict[str, Any]] | None:
        return self.todo.pop(0) if self.todo else None

    def trial_finished(self, trial_id: str, result: dict[str, Any] | None, error: bool) -> None:
        pass


class OptunaSource:
    """TPE through Optuna's ask/tell API; conditional spaces become define-by-run suggestions.

    A model over ``constraints.max_params`` is told to Optuna as pruned and never becomes a trial.
    """

    def __init__(self, spec: Spec, log: TrialLog, reruns: list[tuple[str, dict[str, Any]]], next_index: int, total: int) -> None:
        try:
            import optuna
        except ImportError:
            raise UserError("search.algorithm 'optuna' needs the optuna extra: pip install 'cifar-tune[optuna]'") from None
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.optuna = optuna
        self.spec, self.log = spec, log
        self.reruns = list(reruns)
        self.next_index, self.total = next_index, total
        # a resumed search continues the sampler's random stream elsewhere than where it began: seeded
        # as at the start, its first draws would be the first run's configs again
        seed = spec.search.seed if next_index == 0 else spec.search.seed + RESUME_SEED_STRIDE * next_index
        self.study = optuna.create_study(
            direction="maximize" if spec.search.resolved_mode == "max" else "minimize",
            sampler=optuna.samplers.TPESampler(seed=seed),
        )
        self.counter = _param_counter(spec)
        self.asked: dict[str, Any] = {}
        # --resume: TPE learns from the trials that finished before, as if it had asked for them
        for tid, row in sorted(log.rows.items(), key=lambda kv: kv[1]["sample_index"]):
            if row["status"] in FINISHED:
                self._tell_recorded(tid, {"status": row["status"]}, error=row["status"] == "error")

    def next_trial(self) -> tuple[str, dict[str, Any]] | None:
        if self.reruns:
            return self.reruns.pop(0)
        if self.next_index >= self.total:
            return None
        for _ in range(2000):
            ot = self.study.ask()
            config = suggest_tree(self.spec.space, ot, "")
            params = self.counter(config)
            if self.spec.constraints.max_params is None or params <= self.spec.constraints.max_params:
                break
            self.study.tell(ot, state=self.optuna.trial.TrialState.PRUNED)
        else:
            raise InfeasibleSpace("constraints.max_params: Optuna found no model within the budget in 2000 draws")
        tid = trial_id_for(self.next_index)
        self.log.add_pending(tid, self.next_index, config, params)
        self.next_index += 1
        ot.set_user_attr("trial_id", tid)
        self.asked[tid] = ot
        return tid, config

    def _outcome(self, trial_id: str, result: dict[str, Any] | None, error: bool) -> tuple[Any, float | None, dict[int, float]]:
        """(state, value, intermediate values by epoch) of a finished trial, from its epoch rows."""
        states = self.optuna.trial.TrialState
        metric = self.spec.search.metric
        values = [(int(r["epoch"]), r.get(metric)) for r in self.log.trial_epochs(trial_id)]
        steps = {e: float(v) for e, v in values if v is not None and math.isfinite(v)}
        status = (result or {}).get("status")
        if error or status in ("diverged", "oom", "error") or not steps:
            return states.FAIL, None, steps
        # the epoch reached (an async PBT trial that copied a faster one has fewer rows than that) and
        # the best since its last exploit: the summary retrain ranks by (Ray tells the searcher before
        # the callbacks, so the row's status is not final yet; its summary is)
        row = self.log.rows[trial_id]
        if (row.get("epochs_run") or 0) >= self.spec.search.scheduler.max_epochs and row.get(f"best_{metric}") is not None:
            return states.COMPLETE, float(row[f"best_{metric}"]), steps
        return states.PRUNED, None, steps

    def _tell_recorded(self, trial_id: str, result: dict[str, Any] | None, error: bool) -> None:
        """A trial Optuna did not ask for in this process (it ran before ``--resume``, or is rerun):
        added to the study with the parameters its config was drawn with."""
        recovered = optuna_params(self.optuna, self.spec.space, json.loads(self.log.rows[trial_id]["config"]))
        if recovered is None:  # (a config this space cannot draw: nothing to learn from)
            return
        state, value, steps = self._outcome(trial_id, result, error)
        self.study.add_trial(self.optuna.trial.create_trial(
            params=recovered[0], distributions=recovered[1], state=state, value=value,
            intermediate_values=steps, user_attrs={"trial_id": trial_id}))

    def trial_finished(self, trial_id: str, result: dict[str, Any] | None, error: bool) -> None:
        """Tell Optuna at a comparable fidelity: every epoch's metric is reported as an intermediate value
        (step = epoch); a trial that ran all epochs is COMPLETE with its best value over the run (what the
        leaderboard ranks on); one the scheduler stopped early is PRUNED (TPE ranks pruned trials by how
        far they got, then by their last value), never a COMPLETE whose 1-epoch score competes with full
        runs; errors, OOM and divergence are FAIL."""
        ot = self.asked.pop(trial_id, None)
        if ot is None:
            if trial_id in self.log.rows:  # a trial of the earlier run, rerun after --resume
                self._tell_recorded(trial_id, result, error)
            return
        state, value, steps = self._outcome(trial_id, result, error)
        for epoch, v in steps.items():
            ot.report(v, step=epoch)
        if state == self.optuna.trial.TrialState.COMPLETE:
            self.study.tell(ot, value)
        else:
            self.study.tell(ot, state=state)


RESUME_SEED_STRIDE = 7919  # a prime: the resumed sampler's seed, seed + stride * trials drawn, repeats no earlier one


def optuna_params(optuna: Any, tree: Any, config: Any) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The Optuna parameters and distributions that :func:`suggest_tree` turns into ``config``
    (None: the config is not one of this space's): how a finished trial is told to a new study."""
    params: dict[str, Any] = {}
    dists: dict[str, Any] = {}
    return (params, dists) if _match(optuna.distributions, tree, config, "", params, dists) else None


def _match(od: Any, tree: Any, value: Any, path: str, params: dict[str, Any], dists: dict[str, Any]) -> bool:
    """suggest_tree backwards: fill ``params``/``dists`` so that the suggestions give ``value``."""
    if isinstance(tree, Dist):
        k, a, name = tree.kind, tree.args, path or "value"
        if k in ("choice", "grid"):
            for i, option in enumerate(a):  # the first option the value fits (suggest_tree's own order)
                p: dict[str, Any] = {}
                d: dict[str, Any] = {}
                if _match(od, option, value, f"{name}[{i}]", p, d):
                    params.update(p, **{name: i})
                    dists.update(d, **{name: od.CategoricalDistribution(list(range(len(a))))})
                    return True
            return False
        if not isinstance(value, int | float) or isinstance(value, bool):
            return False
        if k in ("randint", "lograndint"):
            dist: Any = od.IntDistribution(a[0], a[1] - 1, log=k == "lograndint")
            lo, hi = a[0], a[1] - 1
        elif k == "normal":
            lo, hi = a[0] - 3 * a[1], a[0] + 3 * a[1]
            dist = od.FloatDistribution(lo, hi)
        else:  # (q)(log)uniform: a quantised value was drawn in range and rounded, so clip it back
            lo, hi = a[0], a[1]
            dist = od.FloatDistribution(lo, hi, log=k in ("loguniform", "qloguniform"))
        params[name] = min(max(value, lo), hi) if isinstance(dist, od.FloatDistribution) else int(value)
        if isinstance(dist, od.FloatDistribution):
            params[name] = float(params[name])
        dists[name] = dist
        return True
    if isinstance(tree, dict):
        return isinstance(value, dict) and set(value) == set(tree) and all(
            _match(od, t, value[key], f"{path}.{key}" if path else key, params, dists) for key, t in tree.items())
    if isinstance(tree, list):
        return isinstance(value, list) and len(value) == len(tree) and all(
            _match(od, t, v, f"{path}[{i}]", params, dists) for i, (t, v) in enumerate(zip(tree, value, strict=True)))
    return bool(tree == value)


def suggest_tree(tree: Any, trial: Any, path: str) -> Any:
    """Define-by-run: each distribution becomes one Optuna suggestion named by its key path."""
    if isinstance(tree, Dist):
        k, a, name = tree.kind, tree.args, path or "value"
        if k in ("choice", "grid"):
            i = trial.suggest_categorical(name, list(range(len(a))))
            return suggest_tree(a[i], trial, f"{name}[{i}]")
        if k in ("uniform", "loguniform"):
            return trial.suggest_float(name, a[0], a[1], log=k == "loguniform")
        if k in ("quniform", "qloguniform"):
            v = trial.suggest_float(name, a[0], a[1], log=k == "qloguniform")
            return int(round(v / a[2]) * a[2]) if float(a[2]).is_integer() else round(round(v / a[2]) * a[2], 12)
        if k in ("randint", "lograndint"):  # high exclusive, as everywhere in cifar-tune
            return trial.suggest_int(name, a[0], a[1] - 1, log=k == "lograndint")
        if k == "normal":  # TPE needs bounds: +-3 sd covers 99.7% of the mass
            return trial.suggest_float(name, a[0] - 3 * a[1], a[0] + 3 * a[1])
        raise AssertionError(k)
    if isinstance(tree, dict):
        return {k: suggest_tree(v, trial, f"{path}.{k}" if path else k) for k, v in tree.items()}
    if isinstance(tree, list):
        return [suggest_tree(v, trial, f"{path}[{i}]") for i, v in enumerate(tree)]
    return tree


# ------------------------------------------------------------------------------------- progress


class LiveTable:
    """The events sink: records to the TrialLog and prints a compact status table now and then."""

    def __init__(self, log: TrialLog, total: int, out: Printer, every_s: float) -> None:
        self.log, self.total, self.out, self.every_s = log, total, out, every_s
        self.t0 = time.monotonic()
        self._last_print = 0.0

    def trial_started(self, trial_id: str, config: dict[str, Any]) -> None:
        self.log.trial_started(trial_id, config)

    def trial_resumed(self, trial_id: str) -> None:
        self.log.trial_resumed(trial_id)

    def trial_result(self, trial_id: str, metrics: dict[str, Any]) -> None:
        self.log.trial_result(trial_id, metrics)
        if metrics.get("restored_from"):  # what changed: the log's epoch row has it (the trial sends the config)
            rows = self.log.trial_epochs(trial_id)
            recorded = rows[-1].get("config_changes") if rows else None
            changes = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in json.loads(recorded or "{}").items())
            self.out(f"  {trial_id} continues from {metrics['restored_from']}'s checkpoint at epoch {metrics.get('epoch')}" + (f" with {changes}" if changes else ""))

    def trial_checkpoint(self, trial_id: str, path: str, epoch: int) -> None:
        self.log.trial_checkpoint(trial_id, path, epoch)

    def trial_finished(self, trial_id: str, last: dict[str, Any]) -> None:
        self.log.trial_finished(trial_id, last)
        self._one_line(trial_id)

    def trial_errored(self, trial_id: str, message: str) -> None:
        self.log.trial_errored(trial_id, message)
        self._one_line(trial_id)

    def trial_retried(self, trial_id: str) -> None:
        self.log.trial_retried(trial_id)
        self.out(f"  {trial_id} failed; retrying")

    def tick(self) -> None:
        self.log.flush(idle=True)  # a checkpoint or result the throttle held back reaches the disk
        if time.monotonic() - self._last_print >= self.every_s:
            self.print_table()

    def _one_line(self, trial_id: str) -> None:
        r = self.log.rows[trial_id]
        m = self.log.metric
        score = r.get(f"best_{m}")
        detail = f"best {m} {score:.4f} at epoch {r.get('best_epoch')}" if score is not None else (r.get("error") or "")
        self.out(f"  {trial_label(trial_id, json.loads(r['config'])):<28} {r['status']:<9} after {r.get('epochs_run', 0):>3} epochs  {detail}")

    def print_table(self) -> None:
        self._last_print = time.monotonic()
        c = self.log.counts()
        done = sum(c.get(s, 0) for s in FINISHED)
        best = self.log.best()
        m = self.log.metric
        best_txt = f"best {m} {best[f'best_{m}']:.4f} ({best['trial_id']})" if best else "no results yet"
        parts = ", ".join(f"{c[s]} {s}" for s in FINISHED if c.get(s))
        elapsed = time.monotonic() - self.t0
        self.out(f"[{elapsed:6.0f}s] {c.get('running', 0)} running | {done}/{self.total} finished ({parts or 'none'}) | {best_txt}")
        for r in self.log.rows.values():
            if r["status"] == "running":
                val = r.get(f"last_{m}")
                val_txt = f"{m} {val:.4f}" if val is not None else ""
                self.out(f"    {trial_label(r['trial_id'], json.loads(r['config'])):<28} epoch {r.get('epochs_run', 0):>3}/{r['max_epochs']}  {val_txt}")


# ------------------------------------------------------------------------------------ checkpoints

# optimizer state per parameter, in parameter-sized tensors (Adam: two moments; SGD: momentum buffer)
OPTIMIZER_SLOTS = {"sgd": 1, "adam": 2, "adamw": 2, "rmsprop": 2, "adagrad": 1}


def checkpoint_bytes(params: int, optimizer: str) -> int:
    """About what one trial checkpoint takes: fp32 weights plus optimizer state (buffers, RNGs and
    history are small next to them)."""
    return 4 * params * (1 + OPTIMIZER_SLOTS.get(optimizer, 2)) + 64 * 1024


def checkpoint_disk(spec: Spec, trials: list[dict[str, Any]], concurrent: int) -> tuple[float, float, float]:
    """(MB per checkpoint on average, MB at the end: one per trial, MB at most while running)."""
    sizes = [checkpoint_bytes(int(t.get("params") or 0), json.loads(t["config"]).get("optimizer", {}).get("name", "sgd")) for t in trials]
    if not sizes:
        return 0.0, 0.0, 0.0
    keep = spec.search.checkpoint.resolved_keep(spec.search.scheduler.name)
    avg = sum(sizes) / len(sizes)
    largest = sorted(sizes, reverse=True)[: max(1, concurrent)]
    peak = sum(sizes) + (keep - 1) * sum(largest)  # running trials hold up to `keep` each
    return avg / 1e6, sum(sizes) / 1e6, peak / 1e6


def checkpoint_disk_line(spec: Spec, trials: list[dict[str, Any]], concurrent: int) -> str | None:
    ck = spec.search.checkpoint
    if ck.every_epochs == 0 or not trials:
        return None
    avg, end, peak = checkpoint_disk(spec, trials, concurrent)
    return (f"checkpoints every {ck.every_epochs} epoch(s), keep {ck.resolved_keep(spec.search.scheduler.name)} per running trial: "
            f"~{avg:.1f} MB each, ~{end:.0f} MB on disk at the end (one per trial), up to ~{peak:.0f} MB while running")


class Fanout:
    """The events sink Ray sees: the live table first (it records the statuses the others read)."""

    def __init__(self, *sinks: Any) -> None:
        self.sinks = [s for s in sinks if s is not None]

    def __getattr__(self, event: str) -> Callable[..., None]:
        def call(*args: Any, **kwargs: Any) -> None:
            for s in self.sinks:  # a sink implements the events it cares about (checkpoints: the log only)
                if (handler := getattr(s, event, None)) is not None:
                    handler(*args, **kwargs)

        return call


class GaugeSink:
    """Keeps the search's Prometheus gauges (trials by status, best metric) in step with the log."""

    STATUSES = ("pending", "running", *FINISHED, "interrupted")

    def __init__(self, log: TrialLog, gauges: Any) -> None:
        self.log, self.gauges = log, gauges

    def _update(self, *_: Any, **__: Any) -> None:
        best = self.log.best()
        self.gauges.update(self.log.counts(), best[f"best_{self.log.metric}"] if best else None)

    trial_started = trial_result = trial_finished = trial_errored = trial_retried = _update

    def tick(self) -> None:
        pass


class Facts:
    """``tuner.TrialFacts`` from the trial log: what the trackers and TensorBoard record per trial."""

    def __init__(self, log: TrialLog, space: dict[str, Any]) -> None:
        self.log, self.space = log, space

    def status(self, trial_id: str) -> str | None:
        return self.log.rows[trial_id]["status"]

    def hparams(self, trial_id: str) -> dict[str, Any]:
        from cifar_tune.searched import searched_params

        return {p.name: p.value for p in searched_params(self.space, json.loads(self.log.rows[trial_id]["config"]))}

    def summary(self, trial_id: str) -> dict[str, float]:
        r, m = self.log.rows[trial_id], self.log.metric
        return {f"best_{m}": r.get(f"best_{m}"), f"last_{m}": r.get(f"last_{m}"), "epochs_run": r.get("epochs_run")}


def leaderboard_lines(log: TrialLog, k: int = 10) -> list[str]:
    m = log.metric
    sign = -1 if log.mode == "max" else 1
    scored = sorted(
        (r for r in log.rows.values() if r.get(f"best_{m}") is not None),
        key=lambda r: (sign * r[f"best_{m}"], r["sample_index"]),
    )[:k]
    lines = [f"top {len(scored)} by best {m}:", f"  {'rank':<5}{'trial':<10}{m:>9}{'epoch':>7}{'params':>12}  status     config"]
    for i, r in enumerate(scored, 1):
        cfg = json.loads(r["config"])
        lines.append(
            f"  {i:<5}{r['trial_id']:<10}{r[f'best_{m}']:>9.4f}{r.get('best_epoch') or 0:>7}{int(r.get('params') or 0):>12,}  "
            f"{r['status']:<10} {json.dumps(cfg, separators=(',', ':'))[:160]}"
        )
    return lines


# ---------------------------------------------------------------------------------------- driver


def _comparable(d: dict[str, Any]) -> dict[str, Any]:
    """What must not change between a search and its resume (num_samples may grow: extend a run)."""
    d = json.loads(json.dumps(d, default=str))
    for key in ("num_samples", "max_concurrent"):
        d.get("search", {}).pop(key, None)
    d.pop("retrain", None)
    d.pop("tracking", None)  # trackers may be added or changed on resume
    return d


def check_experiment(spec: Spec, exp: Experiment, resume: bool) -> None:
    """Refuse a new search over an existing experiment, or a resume of a missing or different one.
    Reads only: it runs before anything is downloaded, connected or written."""
    if exp.exists() and not resume:
        raise UserError(f"experiment '{exp.name}' already exists at {exp.uri()}; pass --resume to continue it or --name NEW")
    if resume and not exp.exists():
        raise UserError(f"--resume: no experiment '{exp.name}' at {exp.uri()}")
    if resume:
        stored = yaml.safe_load(exp.read_text("spec.yaml"))["spec"]
        if _comparable(stored) != _comparable(spec.to_dict()):
            raise UserError(f"--resume: the spec differs from the one '{exp.name}' was started with ({exp.uri('spec.yaml')}); only search.num_samples/max_concurrent may change")


def stored_spec(storage: str, name: str, overrides: list[str] | None = None) -> Spec:
    """The spec an experiment was run with (its ``spec.yaml``, ``--set`` overrides included), with
    ``overrides`` on top: what ``search --resume NAME`` continues, so no resume command can drift."""
    from cifar_tune.spec import apply_overrides, parse_spec

    exp = Experiment(storage, name)
    if not exp.exists():
        raise UserError(f"--resume: no experiment '{name}' at {exp.uri()}")
    raw = yaml.safe_load(exp.read_text("spec.yaml"))["spec"]
    return parse_spec(apply_overrides(raw, overrides or []), exp.uri("spec.yaml"))


def resume_command(exp: Experiment, address: str | None) -> str:
    """The command that continues ``exp``: everything else comes from its stored spec."""
    return f"cifar-tune search --resume {exp.name} --storage {exp.storage.uri()}" + (f" --address {address}" if address else "")


def _plan(spec: Spec, exp: Experiment, resume: bool, out: Printer) -> tuple[TrialLog, list[tuple[str, dict[str, Any]]], int]:
    """The trial log (restored when resuming) and the trials still to run."""
    sched = spec.search.scheduler
    kw = {"metric": spec.search.metric, "mode": spec.search.resolved_mode, "max_epochs": sched.max_epochs}
    check_experiment(spec, exp, resume)
    total = num_trials(spec)
    if resume:
        trials = exp.read_table("trials.parquet") if exp.has("trials.parquet") else None
        epochs = exp.read_table("epochs.parquet") if exp.has("epochs.parquet") else None
        log = TrialLog(exp, trials=trials, epochs=epochs, **kw)
        for tid, r in log.rows.items():
            if r["status"] not in FINISHED:
                log.check_checkpoint(tid)  # it continues from a checkpoint that is on disk
        # an unfinished trial continues from its last checkpoint: keep its epochs up to it, forget the rest
        def kept(e: dict[str, Any]) -> bool:
            r = log.rows[e["trial_id"]]
            return r["status"] in FINISHED or (bool(r.get("checkpoint")) and (e["epoch"] or 0) <= (r.get("checkpoint_epoch") or 0))
        log.epochs = [e for e in log.epochs if kept(e)]  # (summaries follow the kept rows)
    else:
        log = TrialLog(exp, **kw)
    finished = {tid for tid, r in log.rows.items() if r["status"] in FINISHED}
    todo: list[tuple[str, dict[str, Any]]] = []
    for tid, r in sorted(log.rows.items()):
        if tid not in finished:
            todo.append((tid, json.loads(r["config"])))
    if resume:
        cont = [t for t, _ in todo if log.rows[t].get("checkpoint")]
        out(f"resuming '{exp.name}': {len(finished)} finished trials kept, {len(cont)} unfinished continue from their "
            f"last checkpoint, {len(todo) - len(cont)} rerun")
    next_index = max((r["sample_index"] for r in log.rows.values()), default=-1) + 1
    if spec.search.algorithm != "optuna":
        sampler = make_sampler(spec)
        for i in range(next_index, total):
            s = sampler.sample(i)
            log.add_pending(trial_id_for(i), i, s.config, s.params)
            todo.append((trial_id_for(i), s.config))
    return log, todo, next_index


def scheduler_history(log: TrialLog) -> list[tuple[str, dict[str, Any], bool]]:
    """What the scheduler of a resumed search is rebuilt from: every kept epoch row with a finite
    metric, in the order the results arrived, and whether its trial had finished (see
    ``tuner.make_scheduler``). Rows without the metric (a diverged epoch) were never judged."""
    m = log.metric
    out = []
    for e in log.epochs:
        v = e.get(m)
        if e.get("epoch") is None or v is None or not math.isfinite(float(v)):
            continue
        out.append((e["trial_id"], {"epoch": int(e["epoch"]), m: float(v)}, log.rows[e["trial_id"]]["status"] in FINISHED))
    return out


RAY_RESOURCE_UNIT = 10_000  # Ray counts resources in 1/10000ths: 0.1 CPU is 1000 units, exactly


def concurrent_slots(cpus: float, gpus: float, resources: dict[str, float]) -> int:
    """How many trials fit at once, as Ray schedules them: in Ray's fixed-point units, not float
    floor division (``1 // 0.1 == 9.0`` and ``0.9 // 0.3 == 2.0``; Ray fits 10 and 3)."""
    def units(v: float) -> int:
        return round(v * RAY_RESOURCE_UNIT)

    slots = max(1, units(cpus) // units(resources["cpu"]))
    if resources["gpu"]:
        slots = min(slots, units(gpus) // units(resources["gpu"]))
    return max(1, slots)


def tune_concurrency(spec: Spec, slots: int) -> int | None:
    """Ray Tune's ``max_concurrent_trials``. A paused trial holds one of its slots, so schedulers that
    pause trials get no limit but the resources (validation refuses hyperband with ``max_concurrent``,
    and synchronous pbt with fewer than its population); PBT's population is created up front, so it
    gets the user's limit only. The others get the user's limit or what fits in the cluster: the
    search algorithm then suggests a trial only when one can start (Optuna learns from more results)."""
    sched = spec.search.scheduler
    if sched.name == "hyperband":
        return None
    if sched.name == "pbt":
        return spec.search.max_concurrent
    return spec.search.max_concurrent or slots


def record_run(exp: Experiment, spec: Spec, resume: bool) -> None:
    """``spec.yaml``: the spec as now run, ``meta`` of the first run, and one ``resumes`` entry per
    ``--resume`` (its time, versions, code revision, and num_samples/max_concurrent, which may change)."""
    meta = run_metadata()
    doc: dict[str, Any] = {"spec": spec.to_dict(), "meta": meta}
    if resume:
        stored = yaml.safe_load(exp.read_text("spec.yaml"))
        entry = {**meta, "num_samples": spec.search.num_samples, "max_concurrent": spec.search.max_concurrent}
        doc = {"spec": spec.to_dict(), "meta": stored.get("meta", {}), "resumes": [*stored.get("resumes", []), entry]}
    exp.write_text("spec.yaml", yaml.safe_dump(doc, sort_keys=False))


def run_search(
    spec: Spec,
    *,
    storage: str,
    name: str | None = None,
    address: str | None = None,
    resume: bool = False,
    dashboard: bool = True,
    num_cpus: int | None = None,
    progress_every_s: float = 15.0,
    dashboard_port: int = 8080,
    out: Printer = print,
) -> Experiment:
    from cifar_tune import data as data_mod
    from cifar_tune import tracking, tuner

    exp = Experiment(storage, name or spec.name)
    tracking.check_available(spec.tracking)
    # the order matters: refusals that only read come first, then the data (downloaded once, in the
    # driver, and checked, so bad data is one line without Ray's start-up around it), then the cluster (a
    # wrong --address fails in seconds); the experiment is written last, so a failed start leaves nothing
    # that a second attempt would call "already exists"
    check_experiment(spec, exp, resume)
    data_mod.prepare(spec.data)
    data_mod.check_split(spec.data)  # a subset larger than the data set fails here, not in every trial
    mps, mps_why = search_mps(spec.search.resources, joins=tuner.joins_cluster(address))
    cluster = tuner.connect(address, dashboard=dashboard, num_cpus=num_cpus, mps=mps,
                            mps_required=spec.search.resources.mps == "on", out=out)
    try:
        return _search_on(cluster, spec, exp, resume=resume, address=address, mps=(mps, mps_why), dashboard=dashboard,
                          dashboard_port=dashboard_port, progress_every_s=progress_every_s, out=out)
    finally:
        if cluster.started_here:  # a Ray instance started for this search ends with it (called from Python too)
            tuner.shutdown()


def _search_on(cluster: Any, spec: Spec, exp: Experiment, *, resume: bool, address: str | None,
               mps: tuple[bool, str], dashboard: bool, dashboard_port: int, progress_every_s: float,
               out: Printer) -> Experiment:
    """The search once connected: data, plan, trials on Ray Tune, records."""
    from cifar_tune import data as data_mod
    from cifar_tune import tracking, tuner
    from cifar_tune.trial import TrialSetup

    mps_on, mps_why = mps
    log, todo, next_index = _plan(spec, exp, resume, out)
    log.trim_at_end = spec.search.scheduler.name == "pbt"  # exploits may still copy a finished trial's checkpoints
    total = num_trials(spec)
    record_run(exp, spec, resume)
    log.flush(force=True)
    print_cluster(cluster, out)
    if spec.search.resources.gpus_per_trial > 0:
        out(f"CUDA MPS {'on' if mps_on else 'off'}: {mps_why}")
    mirror = _trials_dashboard(spec, exp, log, serve=dashboard, port=dashboard_port, out=out)
    for line in tracking.describe(spec.tracking, exp):
        out(line)
    resources = tuner.trial_resources(spec.search.resources, cluster)
    slots = concurrent_slots(cluster.cpus, cluster.gpus, resources)
    max_concurrent = spec.search.max_concurrent or slots
    if spec.search.algorithm == "optuna":
        source: Any = OptunaSource(spec, log, todo, next_index, total)
        remaining = len(todo) + max(0, total - next_index)
    else:
        source = SampledSource(log, todo)
        remaining = len(todo)
    for line in gpu_warnings(cluster.gpus, spec.search.resources.gpus_per_trial, min(max_concurrent, slots)):
        out(line)
    out(
        f"search '{exp.name}': {remaining} trials to run of {total}, {min(max_concurrent, slots)} at a time "
        f"({resources['cpu']:g} CPU" + (f", {resources['gpu']:g} GPU" if resources["gpu"] else "") + " each), "
        f"{spec.search.scheduler.name} up to {spec.search.scheduler.max_epochs} epochs; results in {exp.uri()}"
    )
    if (disk := checkpoint_disk_line(spec, [log.rows[t] for t, _ in todo], max_concurrent)) is not None:
        out(disk)
    if remaining == 0:
        out("nothing to run: every trial has finished")
    live = LiveTable(log, total, out, progress_every_s)
    events = Fanout(live, mirror, GaugeSink(log, tuner.SearchGauges(exp.name, spec.search.metric, GaugeSink.STATUSES)))
    mlflow_args, wandb_args = tracking.search_callback_args(spec.tracking, exp)
    facts = Facts(log, spec.space)
    callbacks = [tuner.tensorboard_callback(facts),
                 *tuner.tracking_callbacks(mlflow=mlflow_args, wandb=wandb_args, facts=facts, experiment_uri=exp.uri())]
    setup = TrialSetup(data=spec.data, epochs=spec.search.scheduler.max_epochs, seed=spec.search.seed,
                       checkpoint_every=spec.search.checkpoint.every_epochs)
    resume_from = {tid: exp.uri(log.rows[tid]["checkpoint"]) for tid, _ in todo if log.rows[tid].get("checkpoint")}
    run_name = f"search-{time.strftime('%Y%m%d-%H%M%S')}"  # TensorBoard's runs: search-.../t0007-vgg-sgd
    interrupted = False
    try:
        if remaining:
            tuner.run_search(
                setup=setup, source=source, events=events, scheduler=spec.search.scheduler,
                metric=spec.search.metric, mode=spec.search.resolved_mode, resources=resources,
                num_trials=remaining, max_failures=spec.search.max_failures,
                max_concurrent=tune_concurrency(spec, slots),
                storage_path=exp.uri("ray"), run_name=run_name,
                trial_names=lambda c: trial_label(c["trial_id"], c["config"]),
                # loaded once here and shared zero-copy: workers skip reading/generating it
                shared_data=data_mod.training_arrays(spec.data),
                experiment=exp.name, callbacks=callbacks,
                keep_checkpoints=spec.search.checkpoint.resolved_keep(spec.search.scheduler.name),
                resume_from=resume_from,
                resume_epochs={tid: int(log.rows[tid].get("checkpoint_epoch") or 0) for tid in resume_from},
                scheduler_history=scheduler_history(log) if resume else None,
                population=list(todo) if spec.search.scheduler.name == "pbt" else None,
            )
    except KeyboardInterrupt:
        interrupted = True
    finally:
        for r in log.rows.values():
            if r["status"] == "running":  # stopped by Ctrl-C: rerun on --resume
                r["status"] = "interrupted"
        log.trim_checkpoints()
        log.flush(force=True)
        if mirror is not None:
            mirror.close()
        # W&B's callback cleans up in __del__, which fails at interpreter exit: collect it while Ray is up
        callbacks.clear()
        gc.collect()
    unfinished = [r for r in log.rows.values() if r["status"] not in FINISHED]
    live.print_table()
    for line in leaderboard_lines(log):
        out(line)
    out(f"trials: {exp.uri('trials.parquet')}  epochs: {exp.uri('epochs.parquet')}  TensorBoard: tensorboard --logdir {exp.uri('ray')}")
    if interrupted or unfinished:
        out(f"{len(unfinished) + max(0, total - len(log.rows))} trials unfinished; continue with: {resume_command(exp, address)}")
    return exp


def search_mps(res: Any, *, joins: bool) -> tuple[bool, str]:
    """``search.resources.mps`` resolved for this run: (start the daemon?, why). A cluster that is
    joined runs its own daemons (README, GPUs); a local instance gets one when trials share its GPU."""
    from cifar_tune import devices

    if joins:
        if res.mps == "on":
            raise UserError("search.resources.mps: on starts MPS for a local Ray instance only; on a cluster, "
                            "start nvidia-cuda-mps-control -d on each GPU node before Ray (README, GPUs)")
        return False, "joined a cluster (its nodes run MPS or not)"
    try:
        return devices.mps_wanted(res.mps, gpus_per_trial=res.gpus_per_trial, gpu_here=devices.gpu_memory_mb() is not None,
                                  available=devices.mps_available())
    except ValueError as e:
        raise UserError(str(e)) from None


def gpu_warnings(cluster_gpus: float, gpus_per_trial: float, concurrent: int) -> list[str]:
    """Say so when GPUs in the cluster would sit idle, or when GPU trials will run on the CPU."""
    if cluster_gpus > 0 and gpus_per_trial == 0:
        return [f"warning: the cluster has {cluster_gpus:g} GPU(s) but search.resources.gpus_per_trial is 0: trials "
                f"train on the CPU and the GPUs sit idle (e.g. gpus_per_trial: 0.25 packs 4 trials per GPU)"]
    if cluster_gpus == 0 and gpus_per_trial > 0:
        return [f"warning: search.resources.gpus_per_trial is {gpus_per_trial:g} but the cluster has no GPU: "
                "trials train on the CPU"]
    used = concurrent * gpus_per_trial
    if gpus_per_trial > 0 and used < cluster_gpus - 1e-9:
        return [f"warning: {concurrent} trials at a time x {gpus_per_trial:g} GPU use {used:g} of the cluster's "
                f"{cluster_gpus:g} GPUs; the rest sit idle (raise search.max_concurrent, or the CPUs per trial "
                "allow no more)"]
    return []


def _trials_dashboard(spec: Spec, exp: Experiment, log: TrialLog, *, serve: bool, port: int, out: Printer) -> Any:
    """Mirror the search into the Optuna journal and (unless --no-dashboard) serve it from this driver."""
    from cifar_tune import dashboard

    try:
        mirror = dashboard.OptunaMirror(
            dashboard.journal_path(exp), study_name=exp.name, space=spec.space, log=log,
            scheduler=json.loads(json.dumps(spec.to_dict()["search"]["scheduler"])),
        )
    except UserError as e:
        out(f"trials dashboard: off ({e.lines[0]})")
        return None
    if not serve:
        out(f"trials journal: {mirror.path}  (serve it: cifar-tune dashboard {exp.name})")
    elif dashboard.dashboard_available():
        out(f"trials dashboard: {dashboard.start_in_background(mirror.path, port)[1]}  (served by this driver while it runs; "
            f"afterwards: cifar-tune dashboard {exp.name})")
    else:
        out(f"trials journal: {mirror.path}  (for the dashboard: pip install 'cifar-tune[dashboard]')")
    return mirror


def print_cluster(c: Any, out: Printer) -> None:
    where = "local Ray instance" if c.started_here else f"Ray cluster at {c.address}"
    out(f"{where}: {c.nodes} node(s), {c.cpus:g} CPUs, {c.gpus:g} GPUs")
    if c.dashboard_url:
        out(f"Ray dashboard: {c.dashboard_url}")
        if c.token_auth:
            out("  token authentication is on: log in with the token from `ray get-auth-token` (stored in ~/.ray/auth_token)")

