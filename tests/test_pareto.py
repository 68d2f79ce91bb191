"""Non-dominated sorting, crowding distance and hypervolume against brute-force references and Optuna."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from cifar_tune.pareto import (
    UNRANKED,
    crowding_distance,
    dominates,
    hypervolume,
    non_dominated_rank,
    nsga_order,
    rank_and_crowding,
    to_minimise,
)


def _brute_ranks(pts: list[list[float]]) -> list[int]:
    """Peel fronts one at a time: a front is every remaining point no remaining point dominates."""
    def dom(a: list[float], b: list[float]) -> bool:
        return all(x <= y for x, y in zip(a, b, strict=True)) and any(x < y for x, y in zip(a, b, strict=True))

    ranks = [UNRANKED] * len(pts)
    left = [i for i, p in enumerate(pts) if all(math.isfinite(v) for v in p)]
    front = 0
    while left:
        now = [i for i in left if not any(dom(pts[j], pts[i]) for j in left if j != i)]
        for i in now:
            ranks[i] = front
        left = [i for i in left if i not in now]
        front += 1
    return ranks


def _brute_crowding(pts: list[list[float]]) -> list[float]:
    """Per objective: nearest strictly smaller and strictly larger value in the front, by scanning."""
    out = [0.0] * len(pts)
    for m in range(len(pts[0]) if pts else 0):
        vals = [p[m] for p in pts]
        lo, hi = min(vals), max(vals)
        if lo == hi:
            continue
        for i, v in enumerate(vals):
            below = [w for w in vals if w < v]
            above = [w for w in vals if w > v]
            out[i] += math.inf if not below or not above else (min(above) - max(below)) / (hi - lo)
    return out


def _random_points(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """Integer-valued (many ties and duplicates), some NaN or inf rows like diverged trials."""
    pts = rng.integers(0, 5, size=(n, d)).astype(float)
    for i in rng.choice(n, size=rng.integers(0, max(1, n // 4) + 1), replace=False):
        pts[i, rng.integers(d)] = rng.choice([np.nan, np.inf])
    return pts


@pytest.mark.parametrize("seed", range(40))
def test_ranks_and_crowding_match_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    pts = _random_points(rng, int(rng.integers(1, 14)), int(rng.integers(1, 4)))
    ranks = non_dominated_rank(pts)
    assert ranks.tolist() == _brute_ranks(pts.tolist())
    _, crowd = rank_and_crowding(pts)
    for f in set(ranks.tolist()) - {UNRANKED}:
        members = np.flatnonzero(ranks == f)
        assert crowd[members].tolist() == pytest.approx(_brute_crowding(pts[members].tolist()))
    assert np.isnan(crowd[ranks == UNRANKED]).all()


@pytest.mark.parametrize("seed", range(20))
def test_ranks_match_optunas_non_domination_rank(seed: int) -> None:
    from optuna.study._multi_objective import _fast_non_domination_rank

    rng = np.random.default_rng(100 + seed)
    pts = rng.normal(size=(int(rng.integers(2, 30)), int(rng.integers(2, 4)))).round(1)
    assert non_dominated_rank(pts).tolist() == _fast_non_domination_rank(pts).tolist()


def test_crowding_is_order_independent_and_equal_for_duplicates() -> None:
    pts = np.array([[0.0, 4.0], [1.0, 3.0], [1.0, 3.0], [2.0, 1.0], [4.0, 0.0]])
    d = crowding_distance(pts)
    assert d[1] == d[2] and math.isinf(d[0]) and math.isinf(d[4])
    perm = [3, 0, 4, 2, 1]
    assert crowding_distance(pts[perm]).tolist() == d[perm].tolist()


def test_nsga_order_front_then_crowding_then_index() -> None:
    # front 0: (0,4) (1,3) (2,2) (4,0); (3,3) is dominated by (2,2); (5,5) by everyone; NaN last
    pts = np.array([[2.0, 2.0], [3.0, 3.0], [0.0, 4.0], [np.nan, 0.0], [4.0, 0.0], [1.0, 3.0], [5.0, 5.0]])
    order = nsga_order(pts)
    assert order[:2] == [2, 4]  # the ends of front 0 (infinite crowding), by index
    assert set(order[:4]) == {0, 2, 4, 5} and order[4:] == [1, 6, 3]
    # (2,2): gaps (4-1)/4 + (3-0)/4 = 1.5; (1,3): (2-0)/4 + (4-2)/4 = 1.0
    assert order[2:4] == [0, 5]


def test_to_minimise_and_dominates() -> None:
    m = to_minimise([[0.9, 100.0], [0.8, 50.0]], ["max", "min"])
    assert m.tolist() == [[-0.9, 100.0], [-0.8, 50.0]]
    assert not dominates(m[0], m[1]) and not dominates(m[1], m[0])
    assert dominates(np.array([1.0, 1.0]), np.array([1.0, 2.0])) and not dominates(np.array([1.0, 1.0]), np.array([1.0, 1.0]))


def _brute_hv(pts: np.ndarray, ref: np.ndarray) -> float:
    """Inclusion-exclusion over the boxes [p, ref]: exact in any dimension, for a few points."""
    pts = np.array([p for p in pts if np.isfinite(p).all() and (p < ref).all()])
    total = 0.0
    for k in range(1, len(pts) + 1):
        for subset in itertools.combinations(range(len(pts)), k):
            corner = pts[list(subset)].max(axis=0)
            total += (-1) ** (k + 1) * float(np.prod(ref - corner))
    return total


def _sweep_2d(pts: np.ndarray, ref: np.ndarray) -> float:
    """2-D by sorting on the first objective and adding the strips the staircase leaves."""
    pts = sorted(tuple(p) for p in pts if np.isfinite(p).all() and (p < ref).all())
    area, best_y = 0.0, ref[1]
    for x, y in pts:
        if y < best_y:
            area += (ref[0] - x) * (best_y - y)
            best_y = y
    return area


@pytest.mark.parametrize("seed", range(25))
def test_hypervolume_equals_brute_force_and_optuna(seed: int) -> None:
    from optuna._hypervolume import compute_hypervolume

    rng = np.random.default_rng(200 + seed)
    d = int(rng.integers(2, 5))
    pts = rng.uniform(0, 1, size=(int(rng.integers(1, 9)), d))
    pts[rng.random(len(pts)) < 0.15, 0] = np.nan  # diverged trials add nothing
    ref = np.full(d, 0.9)  # some points lie beyond it in one objective: they add nothing either
    hv = hypervolume(pts, ref)
    assert hv == pytest.approx(_brute_hv(pts, ref), abs=1e-12)
    inside = pts[np.isfinite(pts).all(axis=1) & (pts < ref).all(axis=1)]
    if len(inside):
        assert hv == pytest.approx(compute_hypervolume(inside, ref))
    if d == 2:
        assert hv == pytest.approx(_sweep_2d(pts, ref), abs=1e-12)


def test_hypervolume_of_nothing_is_zero() -> None:
    assert hypervolume(np.empty((0, 2)), [1.0, 1.0]) == 0.0
    assert hypervolume(np.array([[2.0, 0.0]]), [1.0, 1.0]) == 0.0
