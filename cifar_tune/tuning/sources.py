"""Where trial configs come from: seeded samples of the space or an Optuna study, behind one
``TrialSource`` interface."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from cifar_tune.errors import UserError
from cifar_tune.pareto import objective_values
from cifar_tune.results import FINISHED, TrialLog
from cifar_tune.spec.schema import Spec
from cifar_tune.spec.space import Dist, InfeasibleSpace, Sampler

Printer = Callable[[str], None]


def _param_counter(spec: Spec) -> Callable[[dict[str, Any]], int]:
    from cifar_tune.engine.data import dataset_info
    from cifar_tune.engine.models import param_count

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
        # several objectives: TPE's multi-objective variant (MOTPE) is told every objective of a trial
        objectives = spec.search.resolved_objectives
        self.multi = len(objectives) > 1
        self.study = optuna.create_study(
            directions=["maximize" if o.resolved_mode == "max" else "minimize" for o in objectives],
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

    def _outcome(self, trial_id: str, result: dict[str, Any] | None, error: bool) -> tuple[Any, Any, dict[int, float]]:
        """(state, value, intermediate values by epoch) of a finished trial, from its epoch rows; with
        several objectives the value is the list of them (trials.parquet's ``obj_*``)."""
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
            if self.multi:
                values = objective_values(self.log.rows[trial_id], self.log.objectives)
                if all(math.isfinite(v) for v in values):
                    return states.COMPLETE, values, steps
                return states.FAIL, None, steps
            return states.COMPLETE, float(row[f"best_{metric}"]), steps
        return states.PRUNED, None, steps

    def _tell_recorded(self, trial_id: str, result: dict[str, Any] | None, error: bool) -> None:
        """A trial Optuna did not ask for in this process (it ran before ``--resume``, or is rerun):
        added to the study with the parameters its config was drawn with."""
        recovered = optuna_params(self.optuna, self.spec.space, json.loads(self.log.rows[trial_id]["config"]))
        if recovered is None:  # (a config this space cannot draw: nothing to learn from)
            return
        state, value, steps = self._outcome(trial_id, result, error)
        values = {"values": value} if self.multi else {"value": value}
        self.study.add_trial(self.optuna.trial.create_trial(
            params=recovered[0], distributions=recovered[1], state=state, **values,
            intermediate_values={} if self.multi else steps, user_attrs={"trial_id": trial_id}))

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
        for epoch, v in ([] if self.multi else steps.items()):  # (Optuna takes no intermediate values with several)
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
