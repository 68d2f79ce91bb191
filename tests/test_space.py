"""Search-space trees: seeded sampling, conditional choices, grids, budgets."""

from __future__ import annotations

import math

import pytest

from cifar_tune.budget import rung_epochs, search_budget
from cifar_tune.errors import ErrorList
from cifar_tune.space import Dist, InfeasibleSpace, Sampler, iter_dists, parse_tree
from cifar_tune.spec import SchedulerSpec

RAW = {
    "optimizer": {"choice": [
        {"name": "sgd", "lr": {"loguniform": [1e-4, 1e-1]}, "momentum": {"uniform": [0, 0.5]}},
        {"name": "adam", "lr": {"loguniform": [1e-4, 1e-2]}, "beta1": {"quniform": [0.8, 0.99, 0.01]}},
    ]},
    "train": {"batch_size": {"grid": [32, 64]}, "width": {"randint": [8, 12]}, "depth": {"lograndint": [1, 100]}},
    "noise": {"normal": [0.0, 1.0]},
}


def tree() -> dict:
    errors = ErrorList()
    t = {k: parse_tree(v, k, errors) for k, v in RAW.items()}
    assert not errors
    return t


def test_samples_are_plain_nested_dicts_in_range() -> None:
    sampler = Sampler(tree(), seed=1)
    assert sampler.grid_size == 2
    for i in range(200):
        cfg = sampler.sample(i).config
        assert not list(iter_dists(cfg))
        opt = cfg["optimizer"]
        if opt["name"] == "sgd":
            assert set(opt) == {"name", "lr", "momentum"}
            assert 1e-4 <= opt["lr"] <= 1e-1 and 0 <= opt["momentum"] <= 0.5
        else:
            assert set(opt) == {"name", "lr", "beta1"}
            assert 0.8 <= opt["beta1"] <= 0.99 and math.isclose(opt["beta1"] * 100, round(opt["beta1"] * 100))
        assert cfg["train"]["batch_size"] == (32, 64)[i % 2]  # grid points cycle
        assert 8 <= cfg["train"]["width"] < 12 and isinstance(cfg["train"]["width"], int)
        assert 1 <= cfg["train"]["depth"] < 100


def test_both_branches_and_all_randint_values_occur() -> None:
    sampler = Sampler(tree(), seed=1)
    cfgs = [sampler.sample(i).config for i in range(200)]
    assert {c["optimizer"]["name"] for c in cfgs} == {"sgd", "adam"}
    assert {c["train"]["width"] for c in cfgs} == {8, 9, 10, 11}  # high is exclusive


def test_sampling_is_seeded_and_order_independent() -> None:
    a, b = Sampler(tree(), seed=3), Sampler(tree(), seed=3)
    forward = [a.sample(i).config for i in range(10)]
    backward = [b.sample(i).config for i in reversed(range(10))][::-1]
    assert forward == backward
    assert Sampler(tree(), seed=4).sample(0).config != forward[0]


def test_grid_mode_enumerates_choices() -> None:
    errors = ErrorList()
    t = parse_tree({"a": {"choice": [1, 2, 3]}, "b": {"grid": ["x", "y"]}}, "s", errors)
    sampler = Sampler(t, seed=0, enumerate_choices=True)
    assert sampler.grid_size == 6
    assert sorted((c["a"], c["b"]) for c in (sampler.sample(i).config for i in range(6))) == [
        (a, b) for a in (1, 2, 3) for b in ("x", "y")
    ]


def test_budget_rejects_infeasible_samples() -> None:
    errors = ErrorList()
    t = parse_tree({"width": {"randint": [1, 100]}}, "s", errors)
    sampler = Sampler(t, seed=0, param_counter=lambda c: c["width"] * 1000, max_params=20_000)
    samples = [sampler.sample(i) for i in range(50)]
    assert all(s.params <= 20_000 for s in samples)
    assert any(s.rejected for s in samples)
    with pytest.raises(InfeasibleSpace, match="constraints.max_params"):
        Sampler(t, seed=0, param_counter=lambda c: 10**9, max_params=1, max_attempts=20).sample(0)


def test_dist_nodes_round_trip() -> None:
    errors = ErrorList()
    assert parse_tree({"loguniform": [1e-3, 1e-1]}, "x", errors) == Dist("loguniform", (1e-3, 1e-1))
    assert Dist("choice", (1, 2)).to_yaml() == {"choice": [1, 2]}


def test_asha_budget_arithmetic() -> None:
    sched = SchedulerSpec(name="asha", max_epochs=30, grace_period=1, reduction_factor=2)
    assert rung_epochs(sched) == [1, 2, 4, 8, 16]
    b = search_budget(60, sched)
    assert [r.trials for r in b.rungs] == [60, 30, 15, 8, 4, 2]
    # 60*1 + 30*1 + 15*2 + 7.5*4 + 3.75*8 + 1.875*14 = 206.25
    assert b.epochs_with_stopping == 206
    assert b.epochs_without_stopping == 1800
    fifo = search_budget(10, SchedulerSpec(name="fifo", max_epochs=5))
    assert fifo.epochs_with_stopping == fifo.epochs_without_stopping == 50
