"""Pareto fronts of objective vectors: non-dominated sorting, crowding distance, hypervolume.

Pure functions on arrays, shared by the multi-objective scheduler (``tuning/mo_asha.py``), the results
(``pareto_rank`` and ``crowding`` in ``trials.parquet``, ``hypervolume.parquet``), ``retrain --pareto``
and the report. Every function takes points in *minimisation* form: an ``(n, d)`` array where smaller
is better in every column (:func:`to_minimise` turns ``{metric, mode}`` objectives into it).

Below them, the same applied to an experiment's records: the front columns of ``trials.parquet`` and the
hypervolume timeline of ``hypervolume.parquet``, derived from the trial and epoch rows each time.

A point with a missing or non-finite value (a diverged trial, a cost that was never measured) takes
part in nothing: its rank is :data:`UNRANKED`, its crowding NaN, and it adds no hypervolume.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from cifar_tune.errors import UserError

if TYPE_CHECKING:
    from cifar_tune.spec.schema import ObjectiveSpec

UNRANKED = -1  # the rank of a point with a missing or non-finite value


def to_minimise(values: np.ndarray | Sequence[Sequence[float]], modes: Sequence[str]) -> np.ndarray:
    """``(n, d)`` values with a mode per column -> minimisation form (columns to maximise negated)."""
    arr = np.asarray(values, dtype=float).reshape(-1, len(modes))
    sign = np.array([-1.0 if m == "max" else 1.0 for m in modes])
    return arr * sign


def _ranked(points: np.ndarray) -> np.ndarray:
    return np.isfinite(points).all(axis=1)


def dominates(a: np.ndarray, b: np.ndarray) -> bool:
    """``a`` is no worse than ``b`` in every objective and better in one (minimisation)."""
    return bool(np.all(a <= b) and np.any(a < b))


def non_dominated_rank(points: np.ndarray) -> np.ndarray:
    """The front of each point: 0 for the non-dominated ones, 1 for those dominated only by front 0,
    and so on (NSGA-II's non-dominated sorting); :data:`UNRANKED` for points with a non-finite value.
    Equal points are in the same front (neither dominates the other)."""
    pts = np.asarray(points, dtype=float)
    n = len(pts)
    ranks = np.full(n, UNRANKED, dtype=int)
    idx = np.flatnonzero(_ranked(pts)) if n else np.array([], dtype=int)
    if not len(idx):
        return ranks
    p = pts[idx]
    # dom[i, j]: i dominates j
    le = (p[:, None, :] <= p[None, :, :]).all(axis=2)
    lt = (p[:, None, :] < p[None, :, :]).any(axis=2)
    dom = le & lt
    remaining = np.ones(len(idx), dtype=bool)
    front = 0
    while remaining.any():
        dominated = (dom[remaining][:, remaining]).any(axis=0)  # by a remaining point
        current = np.flatnonzero(remaining)[~dominated]
        ranks[idx[current]] = front
        remaining[current] = False
        front += 1
    return ranks


def crowding_distance(points: np.ndarray) -> np.ndarray:
    """NSGA-II's crowding distance of each point of *one front*: the sum over objectives of the gap
    between its nearest neighbours' values (normalised by the front's range in that objective),
    infinite at either end of any objective.

    Neighbours are the nearest strictly smaller and strictly larger values, so the distance does not
    depend on the order the points come in, and equal points get equal distances (NSGA-II's sort-based
    version would give ties different ones, by position). An objective where the whole front has one
    value adds nothing. Fronts of one or two distinct points: infinite."""
    pts = np.asarray(points, dtype=float)
    n, d = pts.shape if pts.ndim == 2 else (len(pts), 0)
    out = np.zeros(n)
    if n == 0:
        return out
    for m in range(d):
        col = pts[:, m]
        uniq = np.unique(col)
        if len(uniq) == 1:
            continue
        pos = np.searchsorted(uniq, col)
        lower = np.where(pos > 0, uniq[np.maximum(pos - 1, 0)], np.nan)
        upper = np.where(pos < len(uniq) - 1, uniq[np.minimum(pos + 1, len(uniq) - 1)], np.nan)
        gap = (upper - lower) / (uniq[-1] - uniq[0])
        out += np.where(np.isnan(gap), np.inf, gap)
    return out


def rank_and_crowding(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The front of each point and its crowding distance within that front (NaN when unranked)."""
    pts = np.asarray(points, dtype=float)
    ranks = non_dominated_rank(pts)
    crowd = np.full(len(pts), np.nan)
    for f in np.unique(ranks[ranks >= 0]):
        members = np.flatnonzero(ranks == f)
        crowd[members] = crowding_distance(pts[members])
    return ranks, crowd


def nsga_order(points: np.ndarray) -> list[int]:
    """Indices best first: by front, then by crowding distance (larger first: the point with the
    emptier neighbourhood keeps the front spread), then by index; unranked points last, by index."""
    ranks, crowd = rank_and_crowding(points)
    ranked = [i for i in range(len(ranks)) if ranks[i] >= 0]
    ranked.sort(key=lambda i: (ranks[i], -crowd[i], i))
    return ranked + [i for i in range(len(ranks)) if ranks[i] < 0]


def hypervolume(points: np.ndarray, reference: Sequence[float]) -> float:
    """The volume dominated by ``points`` and bounded by ``reference`` (minimisation form), computed by
    Optuna's exact implementation (a sweep in 2-D, a dedicated 3-D algorithm, WFG above). Points with a non-finite value, or not better
    than the reference in every objective, add nothing and are left out (Optuna refuses them)."""
    from optuna._hypervolume import compute_hypervolume

    pts = np.asarray(points, dtype=float).reshape(-1, len(reference))
    ref = np.asarray(reference, dtype=float)
    keep = _ranked(pts) & (pts < ref).all(axis=1)
    if not keep.any():
        return 0.0
    return float(compute_hypervolume(pts[keep], ref))


# ------------------------------------------------------------------------- an experiment's records

RANKED = ("completed", "stopped")  # trials on or behind the front (retrain's eligible statuses)


def objective_column(metric: str) -> str:
    return f"obj_{metric}"


def source_column(metric: str) -> str:
    """Where a trial's objective value is in its row: a validation metric at the trial's best epoch
    (the model retrain takes), a cost as measured, train_time_s summed over its epochs."""
    return f"best_{metric}" if metric in ("val_acc", "val_loss", "val_top5") else metric


def objective_values(row: dict[str, Any], objectives: tuple[ObjectiveSpec, ...]) -> list[float]:
    """A trial row's objective vector as trials.parquet's ``obj_*`` have it (NaN where missing)."""
    values = (_num(row.get(source_column(o.metric))) for o in objectives)
    return [math.nan if v is None else v for v in values]


def pareto_columns(trials: pd.DataFrame, objectives: tuple[ObjectiveSpec, ...]) -> pd.DataFrame:
    """``obj_<metric>`` per objective, ``pareto_rank`` (0: on the front) and ``crowding`` (within the
    trial's front) over the trials that finished training (completed or stopped) with every objective;
    the rest get no rank. Derived from the trial rows (themselves from the epoch rows) every time."""
    df = trials.copy()
    for o in objectives:
        col = source_column(o.metric)
        df[objective_column(o.metric)] = pd.to_numeric(df[col], errors="coerce") if col in df else np.nan
    values = df[[objective_column(o.metric) for o in objectives]].to_numpy(dtype=float)
    eligible = df["status"].isin(RANKED).to_numpy() if "status" in df else np.zeros(len(df), bool)
    values[~eligible] = np.nan
    ranks, crowd = rank_and_crowding(to_minimise(values, [o.resolved_mode for o in objectives]))
    df["pareto_rank"] = pd.array([None if r == UNRANKED else int(r) for r in ranks], dtype="Int64")
    df["crowding"] = crowd
    return df


def reference_point(objectives: tuple[ObjectiveSpec, ...], values: Any) -> list[float]:
    """The hypervolume's reference point, in minimisation form: each objective's ``ref`` if given, else
    0 for an accuracy (``val_acc``, ``val_top5`` maximised), else the worst finite value of any trial
    with a tenth of it added (so the worst trial still adds volume)."""
    mins = to_minimise(np.asarray(values, dtype=float).reshape(-1, len(objectives)), [o.resolved_mode for o in objectives])
    out = []
    for j, o in enumerate(objectives):
        sign = -1.0 if o.resolved_mode == "max" else 1.0
        if o.ref is not None:
            out.append(sign * o.ref)
        elif o.metric in ("val_acc", "val_top5") and o.resolved_mode == "max":
            out.append(0.0)
        else:
            col = mins[:, j][np.isfinite(mins[:, j])]
            worst = float(col.max()) if len(col) else 0.0
            out.append(worst + 0.1 * abs(worst) if worst else 1.0)
    return out


def _ideal_point(objectives: tuple[ObjectiveSpec, ...]) -> list[float]:
    """The best conceivable values, minimisation form: accuracy 1, every loss and cost 0."""
    return [-1.0 if o.metric in ("val_acc", "val_top5") and o.resolved_mode == "max" else 0.0 for o in objectives]


def hypervolume_frame(epochs: pd.DataFrame, trials: pd.DataFrame, objectives: tuple[ObjectiveSpec, ...]) -> pd.DataFrame:
    """The hypervolume of the front so far after every epoch row, in the order the epochs ended.

    A trial's point after its epoch e: its validation objectives at its best epoch so far (by the first
    validation objective, as ``best_*``), its training seconds summed so far, its measured costs. Columns:
    ``epochs_done`` (epochs trained by the whole search, the budget), ``trial_id``, ``epoch``,
    ``ended_at``, ``hypervolume``, ``hypervolume_fraction`` (of the box between the ideal point and the
    reference point), ``front_size``, and ``ref_<metric>`` (the reference point, as the objective)."""
    modes = [o.resolved_mode for o in objectives]
    primary = next(o for o in objectives if not o.is_cost)
    sign = 1.0 if primary.resolved_mode == "max" else -1.0
    costs = {r["trial_id"]: r for r in trials.to_dict("records")} if len(trials) else {}
    rows = epochs.to_dict("records")
    order = sorted(range(len(rows)), key=lambda i: (_num(rows[i].get("ended_at")) or math.inf, i))
    best: dict[str, dict[str, Any]] = {}
    time_so_far: dict[str, float] = {}
    points: dict[str, list[float]] = {}
    timeline = []
    for n, i in enumerate(order, 1):
        r = rows[i]
        tid = r["trial_id"]
        time_so_far[tid] = time_so_far.get(tid, 0.0) + (_num(r.get("train_time_s")) or 0.0)
        v = _num(r.get(primary.metric))
        if v is not None and math.isfinite(v) and (tid not in best or sign * v > sign * best[tid][primary.metric]):
            best[tid] = r
        point = []
        for o in objectives:
            if o.metric == "train_time_s":
                point.append(time_so_far[tid])
            elif not o.is_cost:
                point.append(_num(best[tid].get(o.metric)) if tid in best else None)
            else:
                point.append(_num(costs.get(tid, {}).get(o.metric)))
        points[tid] = [math.nan if x is None else x for x in point]
        timeline.append((n, tid, int(r["epoch"]), _num(r.get("ended_at")), dict(points)))
    final_values = np.array(list(points.values()), dtype=float).reshape(-1, len(objectives))
    if len(trials):  # the trials' own values too (the whole experiment sets the reference point)
        final_values = np.vstack([final_values, trials.reindex(columns=[source_column(o.metric) for o in objectives])
                                  .apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)])
    ref = reference_point(objectives, final_values)
    box = float(np.prod(np.asarray(ref) - np.asarray(_ideal_point(objectives))))
    out = []
    for n, tid, epoch, ended, snap in timeline:
        pts = to_minimise(np.array(list(snap.values()), dtype=float), modes)
        hv = hypervolume(pts, ref)
        front = int((non_dominated_rank(pts) == 0).sum())
        out.append({"epochs_done": n, "trial_id": tid, "epoch": epoch, "ended_at": ended, "hypervolume": hv,
                    "hypervolume_fraction": hv / box if box > 0 else math.nan, "front_size": front,
                    **{f"ref_{o.metric}": 0.0 + (-x if o.resolved_mode == "max" else x) for o, x in zip(objectives, ref, strict=True)}})
    cols = ["epochs_done", "trial_id", "epoch", "ended_at", "hypervolume", "hypervolume_fraction", "front_size",
            *[f"ref_{o.metric}" for o in objectives]]
    return pd.DataFrame(out, columns=cols)


def pareto_rule(objectives: Any, top: int | None) -> str:
    """:func:`select_pareto`'s rule, in words."""
    names = ", ".join(f"{o.metric} ({o.resolved_mode})" for o in objectives)
    which = (f"the {top} best by Pareto rank, then crowding distance (larger first), then lower trial id"
             if top else "every trial on the front (pareto_rank 0)")
    return (f"Pareto front over {names}: trials with status completed or stopped and every objective finite "
            f"(validation metrics at the trial's best epoch, costs as measured); {which}; trials with identical "
            f"configs collapse to the best-ranked one")


def select_pareto(trials: pd.DataFrame, *, objectives: Any, top: int | None, experiment: str) -> pd.DataFrame:
    """The trials on the Pareto front (``top`` None), or the ``top`` first by front then crowding; ranks
    recomputed from the trial rows with :func:`results.pareto_columns`, as trials.parquet derives them."""
    if not objectives:
        raise UserError(f"--pareto: experiment '{experiment}' was searched for one objective (search.objectives lists fewer than two)")
    df = pareto_columns(trials, tuple(objectives))
    df = df[df["pareto_rank"].notna()].assign(_rank=lambda d: d["pareto_rank"].astype(int), _crowd=lambda d: -d["crowding"])
    df = df.sort_values(["_rank", "_crowd", "trial_id"], kind="stable")
    df = df.assign(_key=[json.dumps(json.loads(c), sort_keys=True) for c in df["config"]]).drop_duplicates("_key", keep="first")
    if top is None:
        df = df[df["_rank"] == 0]
    elif top > len(df):
        raise UserError(f"--top {top} is more than the {len(df)} trials with every objective in experiment '{experiment}'")
    else:
        df = df.head(top)
    df = df.drop(columns=["_rank", "_crowd", "_key"]).reset_index(drop=True)
    df.insert(0, "rank", range(1, len(df) + 1))
    return df


def _num(v: Any) -> float | None:
    """A value as a float, or None when missing (NaN read back from parquet counts as missing)."""
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f
