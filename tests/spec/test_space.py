"""Search-space trees: seeded sampling, conditional choices, grids, budgets."""

from __future__ import annotations

import math

import pytest

from cifar_tune.errors import ErrorList
from cifar_tune.spec.schema import SchedulerSpec
from cifar_tune.spec.space import Dist, InfeasibleSpace, Sampler, iter_dists, parse_tree
from cifar_tune.tuning.budget import rung_epochs, search_budget

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


@pytest.mark.parametrize("rf", [1.5, 2, 2.5, 3, 4])
@pytest.mark.parametrize("brackets", [1, 2, 3])
@pytest.mark.parametrize("grace,max_epochs", [(1, 10), (1, 16), (2, 27), (3, 100)])
def test_asha_rungs_equal_rays_own_brackets(rf: float, brackets: int, grace: int, max_epochs: int) -> None:
    """preview's rungs: the epochs at which Ray's AsyncHyperBandScheduler itself records a trial that is
    never stopped, bracket by bracket (its own _Bracket.on_result, no Ray instance started)."""
    from types import SimpleNamespace

    from ray.tune.schedulers import AsyncHyperBandScheduler

    sched = SchedulerSpec(name="asha", max_epochs=max_epochs, grace_period=grace, reduction_factor=rf, brackets=brackets)
    ray_sched = AsyncHyperBandScheduler(time_attr="epoch", max_t=max_epochs, grace_period=grace,
                                        reduction_factor=rf, brackets=brackets)
    assert len(ray_sched._brackets) == brackets
    budget = search_budget(100, sched)
    for s, bracket in enumerate(ray_sched._brackets):
        trial = SimpleNamespace(trial_id=f"t{s}")
        seen, ray_epochs = 0, []
        for epoch in range(1, max_epochs + 1):
            bracket.on_result(trial, epoch, 1.0)
            now = sum(trial.trial_id in recorded for _, recorded in bracket._rungs)
            if now > seen:
                ray_epochs.append(epoch)
            seen = now
        assert rung_epochs(sched, s) == [e for e in ray_epochs if e < max_epochs], (s, [m for m, _ in bracket._rungs])
        assert [r.epoch for r in budget.brackets[s]] == [*rung_epochs(sched, s), max_epochs]
    sizes = [len(b._rungs) for b in ray_sched._brackets]
    import numpy as np

    probs = np.e ** (np.array(sizes) - max(sizes))
    assert budget.bracket_share == pytest.approx(tuple(probs / probs.sum()))


def test_clip_moves_pbt_perturbations_into_the_distribution() -> None:
    """PBT multiplies by 0.8/1.2; clip keeps the result where the spec allows (Ray would not)."""
    from cifar_tune.spec.space import clip

    assert clip(Dist("uniform", (0.5, 0.99)), 0.99 * 1.2) == 0.99
    assert clip(Dist("loguniform", (1e-3, 0.3)), 1e-3 * 0.8) == 1e-3
    assert clip(Dist("uniform", (0.5, 0.99)), 0.7) == 0.7
    assert clip(Dist("randint", (0, 7)), 7.2) == 6  # high is exclusive
    assert clip(Dist("quniform", (16, 256, 16)), 300) == 256 and clip(Dist("quniform", (16, 256, 16)), 37) == 32
    assert clip(Dist("choice", (0.0, 0.1)), 0.1) == 0.1
