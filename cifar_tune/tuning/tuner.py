"""One search on Ray Tune's ``Tuner``: trial resources, the searcher that asks our ``TrialSource``, the
scheduler's resume points. Ray lives in the tuning layer only, so Ray's changing APIs touch only it."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

from ray import tune
from ray.tune.search import Searcher

from cifar_tune.spec.schema import ResourcesSpec, SchedulerSpec
from cifar_tune.tuning.callbacks import _EventsCallback
from cifar_tune.tuning.cluster import RayInfo, SearchEvents, TrialSource
from cifar_tune.tuning.schedulers import ResumePoint, SchedulerHistory, make_scheduler
from cifar_tune.tuning.trainable import cifar_tune_trial


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


def trial_resources(res: ResourcesSpec, cluster: RayInfo) -> dict[str, float]:
    """Fractional GPUs pack several trials per device; with no GPU in the cluster, CPU only."""
    gpus = res.gpus_per_trial if cluster.gpus > 0 else 0.0
    return {"cpu": res.cpus_per_trial, "gpu": gpus}


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
    objectives: list[tuple[str, str]] | None = None,
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
            scheduler=make_scheduler(scheduler, scheduler_history, resume_points, objectives),
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
