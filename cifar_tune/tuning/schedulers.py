"""Trial schedulers (FIFO, ASHA, HyperBand, median stopping, PBT): each files a trial's ending report,
and each can be rebuilt from the recorded epochs on resume."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ray import tune
from ray.tune.schedulers import (
    AsyncHyperBandScheduler,
    FIFOScheduler,
    HyperBandScheduler,
    MedianStoppingRule,
    PopulationBasedTraining,
    TrialScheduler,
)

from cifar_tune.spec.schema import SchedulerSpec
from cifar_tune.tuning.mo_asha import MOAsyncSuccessiveHalving

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


class _MOASHA(_EndingReports, _Rebuilt, MOAsyncSuccessiveHalving):
    """MO-ASHA (``cifar_tune.tuning.mo_asha``) with the project's ending reports and ``--resume`` rebuilding."""

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
    from cifar_tune.spec.space import clip

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
                   resume_points: dict[str, ResumePoint] | None = None,
                   objectives: list[tuple[str, str]] | None = None) -> TrialScheduler:
    """One report per epoch, so ``epoch`` is the time attribute of every scheduler.

    ``history``: an earlier run's results (``--resume``), which ASHA's rungs and median stopping's
    per-trial history are rebuilt from (see :class:`_Rebuilt`); the other schedulers keep no state
    across results that a resume could lose, except hyperband's brackets and asynchronous PBT's
    population, which start afresh (its scores are re-read from the next results). ``resume_points``:
    where each trial of a resumed PBT population goes on from, which synchronous PBT's sync point and
    per-trial times are rebuilt from (see :meth:`_PBT.resume_at`). ``objectives``: ``(metric, mode)``
    pairs for mo_asha (None: Tune's one metric and mode); the others use that one metric.
    """
    if sched.name == "pbt":
        from cifar_tune.spec.checks import parse_mutations

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
    if sched.name == "mo_asha":
        mo = _MOASHA(time_attr="epoch", objectives=objectives, max_t=sched.max_epochs, grace_period=sched.grace_period,
                     reduction_factor=sched.reduction_factor, brackets=sched.brackets)
        mo._history = history
        return mo
    if sched.name == "hyperband":
        return _HyperBand(time_attr="epoch", max_t=sched.max_epochs, reduction_factor=sched.reduction_factor)
    if sched.name == "median":
        median = _Median(time_attr="epoch", grace_period=sched.grace_period, min_samples_required=3)
        median._history = history
        return median
    return _FIFO()
