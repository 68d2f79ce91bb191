"""Multi-objective asynchronous successive halving (MO-ASHA, Schmucker et al. 2021), a Ray Tune scheduler.

Like ASHA (Ray's ``AsyncHyperBandScheduler``, whose rungs, brackets and bookkeeping this mirrors), a
trial reaching a rung is compared with the trials recorded at that rung so far and continues only if
it is in the top ``1 / reduction_factor`` of them; nobody waits for a rung to fill. The comparison is
by objective *vectors* instead of one metric:

- the rung's recorded vectors plus the new one are ordered by NSGA-II: non-dominated sorting (front 0
  first), then, within a front, by crowding distance (larger first), see :mod:`cifar_tune.pareto`;
- the trial continues if at most ``m - 1 - floor((m - 1) * (1 - 1/rf))`` of the ``m`` recorded vectors
  come before it (an equal vector never does). That is ASHA's rule "not below the ``1 - 1/rf``
  percentile of the rung" with the percentile taken at an order statistic, since a ranking by fronts has
  no values to interpolate between.

With one objective the rung's cutoff is exactly ASHA's: ``np.nanpercentile`` of the recorded values
(linear interpolation), so this scheduler's decisions are ASHA's, result for result.

The paper also proposes an epsilon-net ordering (EpsNet: greedily pick the point farthest from those
picked, in normalised objective space). NSGA-II ordering is used here: it needs no normalisation of
objectives with different units (crowding normalises each objective by the front's range and the
sorting is invariant to monotone rescaling), it is deterministic for a given set of vectors (EpsNet
breaks its ties at random), it reduces to ASHA's ordering for one objective, and fronts and crowding
can be checked against reference implementations; the paper reports both within noise of each other
on most benchmarks.

Objectives are read from each result: a validation metric by name, the per-trial costs ``params``,
``macs`` and ``latency_ms`` as reported with every epoch, and ``train_time_s`` as the training seconds
summed over the trial's epochs up to this one (a result carries only its own epoch's; an epoch reported
again, by a retry restored from a checkpoint, replaces its time rather than adding to it, and a rung a
trial was recorded at before its restore is not judged again). A result
without the time attribute or a validation objective is not judged (CONTINUE), as in ASHA; a vector
with a missing or non-finite value is recorded but ranked by no one and never stopped (ASHA keeps a NaN
reward the same way: ``nanpercentile`` ignores it and ``NaN < cutoff`` is false).

Ray-free decisions (:meth:`_Bracket.decide`) are separate from Tune's callbacks, so the tests can feed
recorded rung results to both and to a brute-force reference. The project's Tune glue (ending reports,
``--resume`` rebuilding) is mixed in by ``cifar_tune.tuning.schedulers``, as for its ASHA.
"""

from __future__ import annotations

import math
import pickle
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from ray.tune.schedulers.trial_scheduler import FIFOScheduler, TrialScheduler

from cifar_tune.pareto import nsga_order, to_minimise

# the objectives that are not a metric of the result itself (see module docstring)
SUMMED = ("train_time_s",)
VALIDATION = ("val_acc", "val_loss", "val_top5")


def promotion_allowance(recorded: int, reduction_factor: float) -> int:
    """How many of ``recorded`` trials at a rung may come before a trial that still continues."""
    if recorded == 0:
        return 0
    return recorded - 1 - math.floor((recorded - 1) * (1 - 1 / reduction_factor))


def continues(new: np.ndarray, recorded: Sequence[np.ndarray], reduction_factor: float) -> bool:
    """The rung decision for vector ``new`` (minimisation form) given the vectors recorded there."""
    new = np.asarray(new, dtype=float)
    if not recorded:
        return True
    rec = np.asarray(recorded, dtype=float).reshape(len(recorded), -1)
    if rec.shape[1] == 1:  # ASHA's cutoff, on its maximisation-form values
        with warnings.catch_warnings():  # an all-NaN rung warns (ASHA's too); NaN < cutoff is false: continue
            warnings.simplefilter("ignore", RuntimeWarning)
            cutoff = np.nanpercentile(-rec[:, 0], (1 - 1 / reduction_factor) * 100)
        return not (-new[0] < cutoff)
    if not np.isfinite(new).all():
        return True
    rec = rec[np.isfinite(rec).all(axis=1)]
    if not len(rec):
        return True
    points = np.vstack([rec, new[None, :]])
    order = nsga_order(points)
    ahead = order[: order.index(len(rec))]
    better = sum(1 for i in ahead if not np.array_equal(points[i], new))
    return better <= promotion_allowance(len(rec), reduction_factor)


class _Bracket:
    """One bracket's rungs: milestone -> {trial id: objective vector (minimisation form)}; milestones
    as in Ray's ASHA bracket (``grace_period * rf**(k + s)``, highest first)."""

    def __init__(self, min_t: int, max_t: int, reduction_factor: float, s: int) -> None:
        self.rf = reduction_factor
        max_rungs = int(np.log(max_t / min_t) / np.log(self.rf) - s + 1)
        self.rungs: list[tuple[float, dict[str, np.ndarray]]] = [
            (min_t * self.rf ** (k + s), {}) for k in reversed(range(max_rungs))]

    def on_result(self, trial_id: str, cur_iter: float, vector: np.ndarray) -> str:
        """Record the trial at the highest rung it reached and has not been recorded at; decide there."""
        for milestone, recorded in self.rungs:
            if cur_iter < milestone or trial_id in recorded:
                continue
            ok = continues(vector, list(recorded.values()), self.rf)
            recorded[trial_id] = vector
            return TrialScheduler.CONTINUE if ok else TrialScheduler.STOP
        return TrialScheduler.CONTINUE


class MOAsyncSuccessiveHalving(FIFOScheduler):
    """ASHA over several objectives (see the module docstring).

    ``objectives``: ``(metric, mode)`` pairs; None: the one metric and mode Tune sets
    (``TuneConfig(metric=..., mode=...)``), which makes this ASHA exactly. Arguments otherwise as
    ``AsyncHyperBandScheduler`` (``stop_last_trials`` is always on: a trial stops at ``max_t``).
    """

    def __init__(self, *, time_attr: str = "epoch", objectives: Sequence[tuple[str, str]] | None = None,
                 max_t: int = 100, grace_period: int = 1, reduction_factor: float = 4, brackets: int = 1) -> None:
        if not (max_t > 0 and 0 < grace_period <= max_t and reduction_factor > 1 and brackets > 0):
            raise ValueError("need max_t > 0, 0 < grace_period <= max_t, reduction_factor > 1, brackets > 0")
        super().__init__()
        self._time_attr, self._max_t = time_attr, max_t
        self._objectives = list(objectives) if objectives else None
        self._brackets = [_Bracket(grace_period, max_t, reduction_factor, s) for s in range(brackets)]
        self._trial_info: dict[str, _Bracket] = {}
        self._epoch_times: dict[str, dict[float, float]] = {}  # trial -> time attr -> that epoch's train_time_s
        self._num_stopped = 0

    # -- Tune's API ------------------------------------------------------------------------------
    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        if self._objectives is None and metric and mode:
            self._objectives = [(metric, mode)]
        return True

    @property
    def objectives(self) -> list[tuple[str, str]]:
        if not self._objectives:
            raise ValueError("MOAsyncSuccessiveHalving needs objectives, or a metric and mode from tune.TuneConfig")
        return self._objectives

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self.objectives  # noqa: B018 - fail now, as ASHA does, not at the first result
        sizes = np.array([len(b.rungs) for b in self._brackets])
        probs = np.e ** (sizes - sizes.max())
        idx = np.random.choice(len(self._brackets), p=probs / probs.sum())  # (ASHA's draw, same random stream)
        self._trial_info[trial.trial_id] = self._brackets[idx]

    def vector(self, trial_id: str, result: dict[str, Any]) -> np.ndarray | None:
        """The result's objective vector in minimisation form; None when it cannot be judged."""
        if self._time_attr not in result or any(m in VALIDATION and m not in result for m, _ in self.objectives):
            return None
        t = result[self._time_attr]
        if "train_time_s" in result:
            self._epoch_times.setdefault(trial_id, {})[t] = _float(result["train_time_s"])
        values = []
        for metric, _ in self.objectives:
            if metric in SUMMED:
                times = self._epoch_times.get(trial_id, {})
                values.append(sum(v for e, v in times.items() if e <= t) if times else math.nan)
            else:
                values.append(_float(result.get(metric)))
        return to_minimise([values], [m for _, m in self.objectives])[0]

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        vec = self.vector(trial.trial_id, result)
        if vec is None:
            return TrialScheduler.CONTINUE
        if result[self._time_attr] >= self._max_t:
            action = TrialScheduler.STOP
        else:
            action = self._trial_info[trial.trial_id].on_result(trial.trial_id, result[self._time_attr], vec)
        if action == TrialScheduler.STOP:
            self._num_stopped += 1
        return action

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> None:
        vec = self.vector(trial.trial_id, result)
        if vec is None:
            return
        self._trial_info[trial.trial_id].on_result(trial.trial_id, result[self._time_attr], vec)
        del self._trial_info[trial.trial_id]

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        self._trial_info.pop(trial.trial_id, None)

    def debug_string(self) -> str:
        rungs = " | ".join(f"{m:g}: {len(r)}" for b in self._brackets for m, r in b.rungs)
        return f"Using MO-ASHA over {', '.join(m for m, _ in self._objectives or [])}: num_stopped={self._num_stopped} (rung: trials) {rungs}"

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))  # noqa: S301 - our own file, written by save()


def _float(v: Any) -> float:
    try:
        return float(v) if v is not None else math.nan
    except (TypeError, ValueError):
        return math.nan
