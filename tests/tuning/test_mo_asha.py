"""MO-ASHA's promote/stop decisions: identical to the project's ASHA with one objective, equal to a
brute-force reference with several, rebuilt exactly on ``--resume``, and safe with ending reports."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from cifar_tune.spec.schema import SchedulerSpec

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


class _Controller:
    def get_live_trials(self) -> list[Any]:
        return []


def _results(seed: int, trials: int, epochs: int, *, ties: bool = False) -> list[tuple[str, dict[str, Any]]]:
    """Per-epoch results of ``trials`` trials arriving two at a time, shuffled within each epoch: a
    learning curve, a parameter count and a per-epoch training time that grow together (bigger models
    learn faster, so the objectives conflict). ``ties``: values rounded so that rungs have equal vectors."""
    rng = random.Random(seed)
    size = {f"t{i:04d}": rng.uniform(0.1, 1.0) for i in range(trials)}
    events = []
    order = list(size)
    for start in range(0, trials, 2):
        pair = order[start:start + 2]
        for e in range(1, epochs + 1):
            rng.shuffle(pair)
            for t in pair:
                acc = min(1.0, 0.2 + 0.08 * size[t] * e + rng.gauss(0, 0.04))
                if ties:
                    acc = round(acc, 1)
                events.append((t, {"epoch": e, "val_acc": acc, "val_loss": 2.0 - acc + rng.gauss(0, 0.05),
                                   "params": int((round(size[t], 1) if ties else size[t]) * 1e6),
                                   "train_time_s": 1.0 + size[t] + rng.uniform(0, 0.1)}))
    return events


def _run(s: Any, events: list[tuple[str, dict[str, Any]]], max_epochs: int, prefix: str = "ray",
         done: set[str] | None = None) -> list[tuple[str, int, str]]:
    """Feed results as Tune would (a stopped trial reports nothing more); (trial, epoch, action)."""
    ctrl, trials, seen, done = _Controller(), {}, [], set() if done is None else done
    for tid, result in events:
        if tid in done:
            continue
        if tid not in trials:
            trials[tid] = SimpleNamespace(trial_id=f"{prefix}-{tid}", config={"trial_id": tid}, status="RUNNING")
            s.on_trial_add(ctrl, trials[tid])
        action = s.on_trial_result(ctrl, trials[tid], result)
        seen.append((tid, result["epoch"], action))
        if action == "STOP" or result["epoch"] == max_epochs:
            s.on_trial_complete(ctrl, trials[tid], result)
            done.add(tid)
    return seen


def _scheduler(sched: SchedulerSpec, objectives: list[tuple[str, str]] | None, metric: str = "val_acc",
               mode: str = "max", history: Any = None) -> Any:
    from cifar_tune.tuning.schedulers import make_scheduler

    s = make_scheduler(sched, history, objectives=objectives)
    s.set_search_properties(metric, mode)
    return s


SCHEDS = [
    SchedulerSpec(name="asha", max_epochs=8, grace_period=1, reduction_factor=2),
    SchedulerSpec(name="asha", max_epochs=9, grace_period=1, reduction_factor=3),
    SchedulerSpec(name="asha", max_epochs=16, grace_period=2, reduction_factor=4),
    SchedulerSpec(name="asha", max_epochs=8, grace_period=1, reduction_factor=2, brackets=2),
]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("sched", SCHEDS, ids=["rf2", "rf3", "rf4-gp2", "rf2-2brackets"])
@pytest.mark.parametrize(("metric", "mode", "ties"), [("val_acc", "max", False), ("val_loss", "min", False), ("val_acc", "max", True)])
def test_one_objective_decides_exactly_like_asha(sched: SchedulerSpec, seed: int, metric: str, mode: str, ties: bool) -> None:
    from dataclasses import replace

    events = _results(seed, trials=12, epochs=sched.max_epochs, ties=ties)
    np.random.seed(seed)  # (brackets are drawn from numpy's global stream, by both)
    asha = _run(_scheduler(sched, None, metric, mode), events, sched.max_epochs)
    np.random.seed(seed)
    mo = _run(_scheduler(replace(sched, name="mo_asha"), [(metric, mode)], metric, mode), events, sched.max_epochs)
    assert mo == asha
    assert any(a == "STOP" and e < sched.max_epochs for _, e, a in asha)  # there were decisions to make


# ----------------------------------------------------------------------- brute-force reference


def _fronts(points: list[tuple[float, ...]]) -> list[int]:
    def dom(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
        return all(x <= y for x, y in zip(a, b, strict=True)) and a != b

    rank, left, f = [0] * len(points), set(range(len(points))), 0
    while left:
        now = {i for i in left if not any(dom(points[j], points[i]) for j in left)}
        for i in now:
            rank[i] = f
        left -= now
        f += 1
    return rank


def _crowd(points: list[tuple[float, ...]], members: list[int], i: int) -> float:
    total = 0.0
    for m in range(len(points[i])):
        vals = [points[j][m] for j in members]
        below = [v for v in vals if v < points[i][m]]
        above = [v for v in vals if v > points[i][m]]
        if max(vals) == min(vals):
            continue
        total += math.inf if not below or not above else (min(above) - max(below)) / (max(vals) - min(vals))
    return total


def _reference(sched: SchedulerSpec, objectives: list[tuple[str, str]], events: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, int, str]]:
    """MO-ASHA written out with loops: one bracket, rungs at grace * rf^k; at a rung, a trial continues
    if at most m-1-floor((m-1)(1-1/rf)) of the m recorded vectors come before it: in a lower front, or in
    its front with a larger crowding distance, or (recorded earlier) with an equal one, unless equal to it."""
    rf, out, done, times = sched.reduction_factor, [], set(), {}
    milestones = []
    k = 0
    while sched.grace_period * rf ** k <= sched.max_epochs + 1e-9:
        milestones.append(sched.grace_period * rf ** k)
        k += 1
    rungs: dict[float, dict[str, tuple[float, ...]]] = {m: {} for m in milestones}

    def vec(tid: str, r: dict[str, Any]) -> tuple[float, ...]:
        times.setdefault(tid, {})[r["epoch"]] = r["train_time_s"]
        v = []
        for metric, mode in objectives:
            x = sum(t for e, t in times[tid].items() if e <= r["epoch"]) if metric == "train_time_s" else float(r[metric])
            v.append(-x if mode == "max" else x)
        return tuple(v)

    def judge(tid: str, r: dict[str, Any]) -> str:
        v = vec(tid, r)
        for m in sorted(milestones, reverse=True):
            if r["epoch"] < m or tid in rungs[m]:
                continue
            rec = list(rungs[m].values())
            rungs[m][tid] = v
            if not rec:
                return "CONTINUE"
            pts = [*rec, v]
            rank = _fronts(pts)
            mine = [j for j in range(len(pts)) if rank[j] == rank[-1]]
            c = {j: _crowd(pts, mine, j) for j in mine}
            better = sum(1 for j in range(len(rec)) if rec[j] != v and (
                rank[j] < rank[-1] or (rank[j] == rank[-1] and c[j] >= c[len(rec)])))
            allowed = len(rec) - 1 - math.floor((len(rec) - 1) * (1 - 1 / rf))
            return "CONTINUE" if better <= allowed else "STOP"
        return "CONTINUE"

    for tid, r in events:
        if tid in done:
            continue
        action = "STOP" if r["epoch"] >= sched.max_epochs else judge(tid, r)
        out.append((tid, r["epoch"], action))
        if action == "STOP" or r["epoch"] == sched.max_epochs:
            if r["epoch"] >= sched.max_epochs:
                judge(tid, r)
            done.add(tid)
    return out


OBJECTIVE_SETS = [
    [("val_acc", "max"), ("params", "min")],
    [("val_acc", "max"), ("train_time_s", "min")],
    [("val_acc", "max"), ("val_loss", "min"), ("params", "min")],
]


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("objectives", OBJECTIVE_SETS, ids=["acc-params", "acc-time", "acc-loss-params"])
@pytest.mark.parametrize("rf", [2, 3])
@pytest.mark.parametrize("ties", [False, True])
def test_several_objectives_decide_like_the_brute_force_reference(seed: int, objectives: list[tuple[str, str]], rf: int, ties: bool) -> None:
    sched = SchedulerSpec(name="mo_asha", max_epochs=9 if rf == 3 else 8, grace_period=1, reduction_factor=rf)
    events = _results(seed, trials=14, epochs=sched.max_epochs, ties=ties)
    got = _run(_scheduler(sched, objectives), events, sched.max_epochs)
    assert got == _reference(sched, objectives, events)
    assert any(a == "STOP" and e < sched.max_epochs for _, e, a in got)


def test_a_small_model_survives_where_asha_would_stop_it() -> None:
    """The point of the front: a trial worse in accuracy but cheaper than everyone at the rung goes on."""
    sched = SchedulerSpec(name="mo_asha", max_epochs=4, grace_period=1, reduction_factor=2)
    big = [(f"t{i}", {"epoch": 1, "val_acc": 0.8 + i / 100, "params": 1_000_000, "train_time_s": 1.0}) for i in range(4)]
    small = [("t9", {"epoch": 1, "val_acc": 0.5, "params": 1_000, "train_time_s": 1.0})]
    mo = _run(_scheduler(sched, [("val_acc", "max"), ("params", "min")]), big + small, 4)
    asha = _run(_scheduler(SchedulerSpec(name="asha", max_epochs=4, grace_period=1, reduction_factor=2), None), big + small, 4)
    assert mo[-1] == ("t9", 1, "CONTINUE") and asha[-1] == ("t9", 1, "STOP")


@pytest.mark.parametrize("k", [5, 12, 17, 24])
def test_rebuilt_from_history_decides_like_the_uninterrupted_one(k: int) -> None:
    """Killed after k results, rebuilt from them (``--resume``): the same decisions for the rest."""
    sched = SchedulerSpec(name="mo_asha", max_epochs=8, grace_period=1, reduction_factor=2)
    objectives = [("val_acc", "max"), ("params", "min"), ("train_time_s", "min")]
    events = _results(3, trials=12, epochs=8)
    full = _run(_scheduler(sched, objectives), events, 8)
    acted = {(t, e): a for t, e, a in full}
    reported = [(t, r) for t, r in events if (t, r["epoch"]) in acted]
    before, after = reported[:k], reported[k:]
    finished = {t for t, r in before if acted[(t, r["epoch"])] == "STOP" or r["epoch"] == 8}
    history = [(t, r, t in finished) for t, r in before]
    rebuilt = _run(_scheduler(sched, objectives, history=history), after, 8, prefix="ray-b")
    assert rebuilt == [x for x in full if (x[0], x[1]) in {(t, r["epoch"]) for t, r in after}]
    fresh = _run(_scheduler(sched, objectives), after, 8, prefix="ray-c")
    assert len(after) > 5
    if k == 17:  # a scheduler started afresh (Tune's restore) judges against empty rungs: it differs
        assert fresh != rebuilt


def test_ending_reports_and_unjudgeable_results() -> None:
    """A diverged or out-of-memory report stops the trial and leaves the scheduler (no KeyError); a result
    without the metric is not judged; a NaN cost is recorded, ranked by no one, and never stopped."""
    sched = SchedulerSpec(name="mo_asha", max_epochs=4, grace_period=1, reduction_factor=2)
    s = _scheduler(sched, [("val_acc", "max"), ("latency_ms", "min")])
    ctrl = _Controller()
    t = [SimpleNamespace(trial_id=f"r{i}", config={"trial_id": f"t{i}"}, status="RUNNING") for i in range(4)]
    for x in t:
        s.on_trial_add(ctrl, x)
    assert s.on_trial_result(ctrl, t[0], {"epoch": 1, "val_acc": 0.9, "latency_ms": 1.0}) == "CONTINUE"
    assert s.on_trial_result(ctrl, t[1], {"status": "oom", "error": "out of memory"}) == "STOP"
    s.on_trial_complete(ctrl, t[1], {"status": "oom"})
    assert s.on_trial_result(ctrl, t[2], {"epoch": 1, "status": "diverged", "train_loss": math.nan}) == "STOP"
    s.on_trial_complete(ctrl, t[2], {"epoch": 1, "status": "diverged"})
    assert s.on_trial_result(ctrl, t[3], {"epoch": 1, "val_acc": 0.1, "latency_ms": math.nan}) == "CONTINUE"
    assert s.on_trial_result(ctrl, t[3], {"epoch": 2, "latency_ms": 1.0}) == "CONTINUE"  # no val_acc: not judged
    assert set(s._trial_info) == {"t0", "t3"}


@pytest.mark.parametrize(("rf", "grace", "max_epochs", "brackets"), [(2, 1, 8, 1), (3, 2, 30, 2), (1.5, 1, 10, 3)])
def test_rungs_are_ashas_as_preview_reports_them(rf: float, grace: int, max_epochs: int, brackets: int) -> None:
    from cifar_tune.tuning.budget import asha_milestones, rung_epochs
    from cifar_tune.tuning.mo_asha import MOAsyncSuccessiveHalving

    sched = SchedulerSpec(name="mo_asha", max_epochs=max_epochs, grace_period=grace, reduction_factor=rf, brackets=brackets)
    s = MOAsyncSuccessiveHalving(max_t=max_epochs, grace_period=grace, reduction_factor=rf, brackets=brackets)
    for b in range(brackets):
        assert [m for m, _ in s._brackets[b].rungs] == asha_milestones(sched, b)
    assert rung_epochs(sched) == rung_epochs(SchedulerSpec(name="asha", max_epochs=max_epochs, grace_period=grace,
                                                           reduction_factor=rf, brackets=brackets))


def test_scheduler_history_carries_every_objective(tmp_path: Any) -> None:
    """What --resume rebuilds MO-ASHA from: each row's validation metrics and training seconds, and the
    trial's measured costs."""
    from cifar_tune.results import Experiment, TrialLog
    from cifar_tune.spec.schema import ObjectiveSpec
    from cifar_tune.tuning.driver import scheduler_history

    objectives = (ObjectiveSpec("val_acc"), ObjectiveSpec("val_loss"), ObjectiveSpec("params"), ObjectiveSpec("latency_ms"),
                  ObjectiveSpec("train_time_s"))
    log = TrialLog(Experiment(str(tmp_path), "h"), metric="val_acc", mode="max", max_epochs=3, flush_every_s=1e9,
                   objectives=objectives)
    log.add_pending("t0000", 0, {"model": {"family": "mlp"}}, 100)
    log.trial_started("t0000", {})
    log.trial_result("t0000", {"epoch": 1, "val_acc": 0.5, "val_loss": 1.5, "params": 100, "latency_ms": 2.5, "train_time_s": 3.0})
    assert scheduler_history(log) == [("t0000", {"epoch": 1, "val_acc": 0.5, "val_loss": 1.5, "params": 100.0,
                                                 "latency_ms": 2.5, "train_time_s": 3.0}, False)]


def test_a_restored_trial_reporting_epochs_again_is_not_double_counted() -> None:
    """A retry restored from its epoch-1 checkpoint reports epoch 2 again: its training seconds replace the
    earlier attempt's, and the rung it was recorded at is not judged again."""
    from cifar_tune.tuning.mo_asha import MOAsyncSuccessiveHalving

    s = MOAsyncSuccessiveHalving(objectives=[("val_acc", "max"), ("train_time_s", "min")], max_t=8, grace_period=2,
                                 reduction_factor=2)
    t = SimpleNamespace(trial_id="t0")
    s.on_trial_add(_Controller(), t)
    for epoch, secs in ((1, 1.0), (2, 5.0), (2, 2.0)):
        s.on_trial_result(_Controller(), t, {"epoch": epoch, "val_acc": 0.5, "train_time_s": secs})
    assert s.vector("t0", {"epoch": 2, "val_acc": 0.5}).tolist() == [-0.5, 3.0]
    assert s._brackets[0].rungs[-1][1]["t0"].tolist() == [-0.5, 6.0]  # recorded once, by the first attempt
