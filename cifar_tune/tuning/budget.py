"""What a search will cost: ASHA rungs and epochs, computed before anything runs."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cifar_tune.spec.schema import SchedulerSpec


@dataclass(frozen=True)
class Rung:
    epoch: int  # the epoch at which trials are compared (the last one: max_epochs, where trials end)
    trials: int  # trials expected to reach it


@dataclass(frozen=True)
class Budget:
    trials: int
    rungs: tuple[Rung, ...]  # of the first bracket (the only one unless scheduler.brackets > 1)
    epochs_with_stopping: int  # expected total epochs if every rung keeps 1/reduction_factor
    epochs_without_stopping: int  # trials * max_epochs
    brackets: tuple[tuple[Rung, ...], ...] = ()  # every bracket's rungs
    bracket_share: tuple[float, ...] = ()  # the expected fraction of trials each bracket gets

    @property
    def saving(self) -> float:
        return 1 - self.epochs_with_stopping / self.epochs_without_stopping


def asha_milestones(sched: SchedulerSpec, bracket: int) -> list[float]:
    """Ray's ``_Bracket`` milestones ``grace * rf**(k + s)``, highest first, with Ray's own float maths."""
    rf, min_t, max_t = sched.reduction_factor, sched.grace_period, sched.max_epochs
    max_rungs = int(np.log(max_t / min_t) / np.log(rf) - bracket + 1)
    return [min_t * rf ** (k + bracket) for k in reversed(range(max_rungs))]


def bracket_rung_epochs(sched: SchedulerSpec, bracket: int) -> list[int]:
    """The epochs at which Ray's ASHA compares a trial that is never stopped, in bracket ``bracket``.

    Ray records a result at the highest milestone <= the epoch that the trial has not been recorded at
    yet, one rung per epoch (``_Bracket.on_result``): a milestone of 1.5 is compared at epoch 2, and of
    two milestones between the same epochs, the lower is compared an epoch later.
    """
    milestones = asha_milestones(sched, bracket)
    recorded: set[int] = set()
    epochs = []
    for epoch in range(1, sched.max_epochs + 1):
        for i, m in enumerate(milestones):
            if epoch < m or i in recorded:
                continue
            recorded.add(i)
            epochs.append(epoch)
            break
    return epochs


def bracket_shares(sched: SchedulerSpec) -> list[float]:
    """How Ray assigns a new trial to a bracket: probability ~ e^(rungs - max rungs)."""
    sizes = np.array([max(0, len(asha_milestones(sched, s))) for s in range(sched.brackets)], dtype=float)
    probs = np.e ** (sizes - sizes.max())
    return list(probs / probs.sum())


def rung_epochs(sched: SchedulerSpec, bracket: int = 0) -> list[int]:
    """Epochs below max_epochs at which trials are compared (ASHA's bracket ``bracket``; hyperband: the
    same geometric milestones grace * rf^k)."""
    if sched.name in ("asha", "mo_asha"):
        return [e for e in bracket_rung_epochs(sched, bracket) if e < sched.max_epochs]
    if sched.name != "hyperband":
        return []
    out, k = [], 0
    while (t := int(round(sched.grace_period * sched.reduction_factor**k))) < sched.max_epochs:
        if not out or t > out[-1]:
            out.append(t)
        k += 1
    return out


def _halving(trials: float, milestones: list[int], sched: SchedulerSpec) -> tuple[tuple[Rung, ...], float]:
    rungs, alive, total, prev = [], float(trials), 0.0, 0
    for m in [*milestones, sched.max_epochs]:
        total += alive * (m - prev)
        rungs.append(Rung(m, max(1, math.floor(alive + 0.5)) if trials else 0))  # expected count, half up
        alive /= sched.reduction_factor
        prev = m
    return tuple(rungs), total


def search_budget(trials: int, sched: SchedulerSpec) -> Budget:
    """Successive-halving arithmetic, per bracket for ASHA.

    Asynchronous promotion can let a few more trials through early in a search, so the
    with-stopping figure is what the schedule aims at, not a hard cap. ``median`` and ``fifo``
    stop nothing by rule, so both figures are the full cost.
    """
    full = trials * sched.max_epochs
    if sched.name not in ("asha", "mo_asha", "hyperband"):
        rung = (Rung(sched.max_epochs, trials),)
        return Budget(trials, rung, full, full, (rung,), (1.0,))
    shares = bracket_shares(sched) if sched.name in ("asha", "mo_asha") else [1.0]
    brackets, total = [], 0.0
    for s, share in enumerate(shares):
        rungs, epochs = _halving(trials * share, rung_epochs(sched, s), sched)
        brackets.append(rungs)
        total += epochs
    return Budget(trials, brackets[0], int(round(total)), full, tuple(brackets), tuple(shares))
