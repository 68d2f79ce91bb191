"""What a search will cost: ASHA rungs and epochs, computed before anything runs."""

from __future__ import annotations

import math
from dataclasses import dataclass

from cifar_tune.spec import SchedulerSpec


@dataclass(frozen=True)
class Rung:
    epoch: int  # the epoch at which trials are compared
    trials: int  # trials expected to reach it


@dataclass(frozen=True)
class Budget:
    trials: int
    rungs: tuple[Rung, ...]
    epochs_with_stopping: int  # expected total epochs if every rung keeps 1/reduction_factor
    epochs_without_stopping: int  # trials * max_epochs

    @property
    def saving(self) -> float:
        return 1 - self.epochs_with_stopping / self.epochs_without_stopping


def rung_epochs(sched: SchedulerSpec) -> list[int]:
    """Milestones grace * rf^k below max_epochs, as Ray's ASHA places them (then max_epochs itself)."""
    if sched.name not in ("asha", "hyperband"):
        return []
    out, k = [], 0
    while (t := int(round(sched.grace_period * sched.reduction_factor**k))) < sched.max_epochs:
        if not out or t > out[-1]:
            out.append(t)
        k += 1
    return out


def search_budget(trials: int, sched: SchedulerSpec) -> Budget:
    """Successive-halving arithmetic for one bracket.

    Asynchronous promotion can let a few more trials through early in a search, so the
    with-stopping figure is what the schedule aims at, not a hard cap. ``median`` and ``fifo``
    stop nothing by rule, so both figures are the full cost.
    """
    full = trials * sched.max_epochs
    milestones = rung_epochs(sched)
    if not milestones:
        return Budget(trials, (Rung(sched.max_epochs, trials),), full, full)
    rungs, alive, total, prev = [], float(trials), 0.0, 0
    for m in [*milestones, sched.max_epochs]:
        total += alive * (m - prev)
        rungs.append(Rung(m, max(1, math.ceil(alive - 1e-9))))
        alive /= sched.reduction_factor
        prev = m
    return Budget(trials, tuple(rungs), int(round(total)), full)
