"""Optimizers and run-length-relative lr schedules."""

from __future__ import annotations

import inspect
import math
import typing
from typing import Any

import pytest
import torch

from cifar_tune.engine.optim import (
    OPTIMIZERS,
    SCHEDULE_COMMON_KEYS,
    SCHEDULES,
    Schedule,
    build_optimizer,
    build_schedule,
)

# An lr at which each optimizer makes quick progress on the quadratic below.
LR = {"sgd": 0.1, "adam": 0.1, "adamw": 0.1, "rmsprop": 0.05, "adagrad": 0.5}


def _quadratic_losses(cfg: dict[str, Any], steps: int = 20) -> list[float]:
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(16))
    target = torch.randn(16)
    opt = build_optimizer([w], cfg)
    losses = []
    for _ in range(steps):
        loss = ((w - target) ** 2).sum()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return losses


def test_every_optimizer_has_a_test_lr() -> None:
    assert set(OPTIMIZERS) == set(LR)


@pytest.mark.parametrize("registry", [OPTIMIZERS, SCHEDULES], ids=["optimizers", "schedules"])
def test_signature_contract(registry: Any) -> None:
    for name, builder in registry.items():
        hints = typing.get_type_hints(builder)
        for key, p in registry.hyperparameters(name).items():
            assert p.default is not inspect.Parameter.empty, (name, key)
            assert key in hints, (name, key)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizer_reduces_quadratic(name: str) -> None:
    losses = _quadratic_losses({"name": name, "lr": LR[name]})
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizer_defaults_and_foreach(name: str) -> None:
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(2))], {"name": name})
    assert opt.defaults["foreach"] is True
    torch_default = inspect.signature(type(opt).__init__).parameters["lr"].default
    assert opt.defaults["lr"] == torch_default


def test_optimizer_accepts_param_groups_and_numpy_scalars() -> None:
    np = pytest.importorskip("numpy")
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = build_optimizer(
        [{"params": [a]}, {"params": [b], "weight_decay": 0.0}],
        {"name": "sgd", "lr": np.float64(0.1), "momentum": np.float32(0.9), "weight_decay": 5e-4},
    )
    assert [g["weight_decay"] for g in opt.param_groups] == [5e-4, 0.0]


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"name": "sgd", "lr": -0.1}, "lr: must be > 0"),
        ({"name": "sgd", "lr": 0}, "lr: must be > 0"),
        ({"name": "sgd", "momentum": 1.0}, "momentum: must be in [0, 1)"),
        ({"name": "sgd", "dampening": -0.1}, "dampening: must be in [0, 1)"),
        ({"name": "sgd", "nesterov": True}, "nesterov: needs momentum > 0 and dampening 0"),
        (
            {"name": "sgd", "nesterov": True, "momentum": 0.9, "dampening": 0.1},
            "nesterov: needs momentum > 0",
        ),
        ({"name": "sgd", "weight_decay": -1e-4}, "weight_decay: must be >= 0"),
        ({"name": "sgd", "lr": "fast"}, "lr: must be a number"),
        (
            {"name": "sgd", "momentun": 0.9},
            "momentun: unknown key for optimizer 'sgd' (did you mean 'momentum'?)",
        ),
        ({"name": "adam", "beta1": 1.0}, "beta1: must be in [0, 1)"),
        ({"name": "adamw", "beta2": -0.5}, "beta2: must be in [0, 1)"),
        ({"name": "adam", "eps": 0.0}, "eps: must be > 0"),
        ({"name": "adam", "amsgrad": "yes"}, "amsgrad: must be true or false"),
        ({"name": "rmsprop", "alpha": 1.0}, "alpha: must be in [0, 1)"),
        ({"name": "rmsprop", "momentum": 1.5}, "momentum: must be in [0, 1)"),
        ({"name": "adagrad", "lr_decay": -0.1}, "lr_decay: must be >= 0"),
        ({"name": "adagrad", "initial_accumulator_value": -1}, "initial_accumulator_value: must be >= 0"),
        ({"name": "adamm"}, "name: unknown optimizer 'adamm' (did you mean 'adam'?); available:"),
        ({"lr": 0.1}, "name: missing; available: adagrad, adam, adamw, rmsprop, sgd"),
    ],
)
def test_bad_optimizer_hyperparameters(cfg: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as err:
        build_optimizer([torch.nn.Parameter(torch.zeros(2))], cfg)
    assert message in str(err.value)


def test_no_parameters() -> None:
    with pytest.raises(ValueError, match="params: the model has no trainable parameters"):
        build_optimizer([], {"name": "sgd"})


# ---------------------------------------------------------------------------------- schedules


def _curve(
    cfg: dict[str, Any], *, epochs: int = 10, steps_per_epoch: int = 10, lr: float = 1.0
) -> list[float]:
    """lr before each step_batch call, plus the lr after the last one (len = total_steps + 1)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = build_schedule(opt, cfg, epochs=epochs, steps_per_epoch=steps_per_epoch)
    lrs = [sched.lr()]
    for _ in range(epochs * steps_per_epoch):
        sched.step_batch()
        lrs.append(sched.lr())
    return lrs


def test_schedule_common_keys() -> None:
    assert {"warmup_frac": float} == SCHEDULE_COMMON_KEYS


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("warmup_frac", [0.0, 0.1])
def test_every_schedule_is_bounded_and_finite(name: str, warmup_frac: float) -> None:
    lrs = _curve({"name": name, "warmup_frac": warmup_frac}, lr=0.5)
    assert all(math.isfinite(x) and 0 <= x <= 0.5 + 1e-12 for x in lrs)
    assert all(x > 0 for x in lrs[:-1])  # only the lr after the last step may be 0 (cosine's default min)


def test_lr_is_a_python_float() -> None:
    """step_batch must not touch the device: the lr stays a plain float computed from a counter."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = build_schedule(opt, {"name": "cosine"}, epochs=2, steps_per_epoch=3)
    sched.step_batch()
    assert type(opt.param_groups[0]["lr"]) is float


def test_none_is_constant() -> None:
    assert set(_curve({"name": "none"}, lr=0.3)) == {0.3}


def test_cosine_ends_at_min() -> None:
    lrs = _curve({"name": "cosine", "min_lr_frac": 0.05}, lr=2.0)
    assert lrs[0] == pytest.approx(2.0)
    assert lrs[-1] == pytest.approx(0.1)
    assert lrs[50] == pytest.approx(2.0 * (0.05 + 0.95 * 0.5))
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


def test_onecycle_peaks_at_pct_start() -> None:
    """As OneCycleLR: the peak is the lr of step pct*T - 1, the final lr that of the last step, T - 1."""
    lrs = _curve({"name": "onecycle", "pct_start": 0.25, "div_factor": 10.0, "final_div_factor": 100.0})
    assert max(range(len(lrs)), key=lrs.__getitem__) == 24
    assert lrs[24] == pytest.approx(1.0)
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[99] == pytest.approx(0.1 / 100.0)  # the last step that runs
    assert lrs[100] == lrs[99]  # after the run: held at the final lr


def test_step_drops_at_fraction() -> None:
    lrs = _curve({"name": "step", "every_frac": 0.3, "gamma": 0.5})
    assert lrs[29] == 1.0 and lrs[30] == 0.5 and lrs[59] == 0.5 and lrs[60] == 0.25 and lrs[90] == 0.125


def test_multistep_drops_at_fractions() -> None:
    lrs = _curve({"name": "multistep", "milestones_frac": [0.5, 0.75], "gamma": 0.1})
    assert lrs[49] == 1.0 and lrs[50] == pytest.approx(0.1)
    assert lrs[74] == pytest.approx(0.1) and lrs[75] == pytest.approx(0.01)


def test_exponential_total_decay() -> None:
    lrs = _curve({"name": "exponential", "final_lr_frac": 0.01})
    assert lrs[50] == pytest.approx(0.1) and lrs[-1] == pytest.approx(0.01)


def test_warmup_ramps_linearly_then_hands_over() -> None:
    lrs = _curve({"name": "none", "warmup_frac": 0.1})  # 10 warmup steps of 100
    assert lrs[0] == pytest.approx(1 / 11)
    assert all(b - a == pytest.approx(1 / 11) for a, b in zip(lrs[:10], lrs[1:11], strict=True))
    assert lrs[10:] == [1.0] * 91
    cos = _curve({"name": "cosine", "warmup_frac": 0.1})
    assert cos[10] == pytest.approx(_curve({"name": "cosine"})[10])  # the schedule is not shifted


@pytest.mark.parametrize(
    "cfg",
    [
        {"name": "cosine", "min_lr_frac": 0.1},
        {"name": "cosine", "min_lr_frac": 0.1, "warmup_frac": 0.1},
        # onecycle is not here: like OneCycleLR its phases end at steps pct*T - 1 and T - 1, not at fractions
        {"name": "step", "every_frac": 0.25},
        {"name": "multistep", "milestones_frac": [0.5, 0.75]},
        {"name": "exponential", "final_lr_frac": 0.05},
    ],
    ids=lambda c: c["name"] + ("+warmup" if "warmup_frac" in c else ""),
)
def test_schedules_rescale_with_run_length(cfg: dict[str, Any]) -> None:
    short = _curve(cfg, epochs=10, steps_per_epoch=4)  # 40 steps
    long = _curve(cfg, epochs=30, steps_per_epoch=4)  # 120 steps
    # warmup's first steps are (t+1)/(W+1), not a pure fraction: compare from its end on
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0) if "warmup_frac" not in cfg else (0.1, 0.25, 0.5, 0.75, 1.0):
        assert short[round(frac * 40)] == pytest.approx(long[round(frac * 120)]), frac


def test_plateau_reduces_after_patience() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_schedule(
        opt, {"name": "plateau", "factor": 0.5, "patience_frac": 0.2}, epochs=10, steps_per_epoch=5
    )
    for _ in range(5):
        sched.step_batch()
    assert sched.lr() == 1.0  # per-batch steps never change a plateau schedule
    sched.step_epoch(1.0)  # best
    sched.step_epoch(1.0)  # 1 bad epoch (patience = round(0.2 * 10) = 2)
    sched.step_epoch(None)  # no validation loss: ignored
    sched.step_epoch(0.99999)  # 2 bad epochs: below the 1e-4 relative threshold
    assert sched.lr() == 1.0
    sched.step_epoch(1.0)  # 3 > patience
    assert sched.lr() == 0.5
    sched.step_epoch(0.5)  # improvement
    assert sched.lr() == 0.5


def test_plateau_patience_scales_with_epochs() -> None:
    def patience(epochs: int) -> int:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = build_schedule(
            opt, {"name": "plateau", "patience_frac": 0.1}, epochs=epochs, steps_per_epoch=1
        )
        return sched.factor.patience  # type: ignore[attr-defined]

    assert [patience(e) for e in (5, 10, 30, 90)] == [1, 1, 3, 9]


def test_state_dict_round_trip() -> None:
    def make() -> tuple[torch.optim.Optimizer, Schedule]:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        return opt, build_schedule(opt, {"name": "cosine", "warmup_frac": 0.1}, epochs=5, steps_per_epoch=10)

    _, a = make()
    for _ in range(17):
        a.step_batch()
    _, b = make()
    b.load_state_dict(a.state_dict())
    assert b.lr() == a.lr()
    a.step_batch()
    b.step_batch()
    assert b.lr() == a.lr()


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"name": "step", "every_frac": 0.0}, "every_frac: must be in (0, 1]"),
        ({"name": "step", "gamma": 1.5}, "gamma: must be in (0, 1]"),
        ({"name": "multistep", "milestones_frac": [0.75, 0.5]}, "milestones_frac: must be increasing"),
        ({"name": "multistep", "milestones_frac": [0.5, 1.2]}, "milestones_frac[1]: must be in (0, 1)"),
        ({"name": "exponential", "final_lr_frac": 0.0}, "final_lr_frac: must be in (0, 1]"),
        ({"name": "cosine", "min_lr_frac": -0.1}, "min_lr_frac: must be in [0, 1]"),
        ({"name": "onecycle", "pct_start": 1.0}, "pct_start: must be in (0, 1)"),
        ({"name": "onecycle", "div_factor": 0.5}, "div_factor: must be in [1, inf)"),
        ({"name": "plateau", "factor": 1.0}, "factor: must be in (0, 1)"),
        ({"name": "cosine", "warmup_frac": 1.0}, "warmup_frac: must be in [0, 1)"),
        (
            {"name": "cosine", "warmup": 0.1},
            "warmup: unknown key for lr schedule 'cosine' (did you mean 'warmup_frac'?)",
        ),
        ({"name": "cosin"}, "name: unknown lr schedule 'cosin' (did you mean 'cosine'?)"),
    ],
)
def test_bad_schedule_hyperparameters(cfg: dict[str, Any], message: str) -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError) as err:
        build_schedule(opt, cfg, epochs=10, steps_per_epoch=10)
    assert message in str(err.value)


def test_bad_run_length() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="steps_per_epoch: must be an integer >= 1"):
        build_schedule(opt, {"name": "cosine"}, epochs=10, steps_per_epoch=0)


# ------------------------------------------------------------- schedules vs torch.optim.lr_scheduler

BASE_LR = 0.4
LRS = torch.optim.lr_scheduler


def _torch_equivalent(cfg: dict[str, Any], opt: torch.optim.Optimizer, total: int) -> LRS.LRScheduler:
    """PyTorch's scheduler for ``cfg`` over ``total`` steps, by the mapping the README documents."""
    name = cfg["name"]
    hp = {k: v for k, v in cfg.items() if k not in ("name", "warmup_frac")}
    defaults = {k: p.default for k, p in SCHEDULES.hyperparameters(name).items()}
    hp = {**defaults, **hp}
    if name == "none":
        main: LRS.LRScheduler = LRS.ConstantLR(opt, factor=1.0, total_iters=0)
    elif name == "onecycle":
        main = LRS.OneCycleLR(opt, max_lr=BASE_LR, total_steps=total, pct_start=hp["pct_start"], anneal_strategy="cos",
                              cycle_momentum=False, div_factor=hp["div_factor"], final_div_factor=hp["final_div_factor"])
    elif name == "cosine":
        main = LRS.CosineAnnealingLR(opt, T_max=total, eta_min=hp["min_lr_frac"] * BASE_LR)
    elif name == "step":
        main = LRS.StepLR(opt, step_size=max(1, round(hp["every_frac"] * total)), gamma=hp["gamma"])
    elif name == "multistep":
        main = LRS.MultiStepLR(opt, milestones=[max(1, round(f * total)) for f in hp["milestones_frac"]], gamma=hp["gamma"])
    elif name == "exponential":
        main = LRS.ExponentialLR(opt, gamma=hp["final_lr_frac"] ** (1 / total))
    else:
        raise AssertionError(f"no PyTorch counterpart listed for {name}")
    warmup = round(cfg.get("warmup_frac", 0.0) * total)
    if not warmup:
        return main
    # our warmup factor (t+1)/(W+1) is LinearLR from 1/(W+1) to 1 over W steps, multiplied in
    return LRS.ChainedScheduler([LRS.LinearLR(opt, start_factor=1 / (warmup + 1), end_factor=1.0, total_iters=warmup), main])


REFERENCE_CASES = [
    {"name": "none"},
    {"name": "onecycle"},
    {"name": "onecycle", "pct_start": 0.25, "div_factor": 10.0, "final_div_factor": 100.0},
    {"name": "onecycle", "pct_start": 0.5},
    {"name": "cosine"},
    {"name": "cosine", "min_lr_frac": 0.05},
    {"name": "cosine", "warmup_frac": 0.2},
    {"name": "step"},
    {"name": "step", "every_frac": 0.25, "gamma": 0.5},
    {"name": "multistep"},
    {"name": "multistep", "milestones_frac": [0.1, 0.35, 0.9], "gamma": 0.3},
    {"name": "exponential"},
    {"name": "exponential", "final_lr_frac": 0.2},
]


def test_every_step_schedule_has_a_reference_case() -> None:
    assert {c["name"] for c in REFERENCE_CASES} == set(SCHEDULES) - {"plateau"}  # plateau: its own test below


@pytest.mark.parametrize("total", [10, 37, 100, 7])
@pytest.mark.parametrize("cfg", REFERENCE_CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_schedule_equals_pytorch_step_by_step(cfg: dict[str, Any], total: int) -> None:
    """The lr each optimizer step uses: ours and torch.optim.lr_scheduler's, to 1e-9 relative."""
    ours_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=BASE_LR)
    ours = build_schedule(ours_opt, cfg, epochs=1, steps_per_epoch=total)
    ref_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=BASE_LR)
    ref = _torch_equivalent(cfg, ref_opt, total)
    for t in range(total):
        a, b = ours.lr(), ref_opt.param_groups[0]["lr"]
        assert math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-300), f"step {t} of {total}: ours {a!r}, PyTorch {b!r}"
        ours_opt.step()
        ref_opt.step()
        ours.step_batch()
        ref.step()


@pytest.mark.parametrize("epochs", [10, 37])
def test_plateau_equals_reduce_lr_on_plateau(epochs: int) -> None:
    factor, patience_frac, threshold = 0.5, 0.1, 1e-3
    ours_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=BASE_LR)
    ours = build_schedule(ours_opt, {"name": "plateau", "factor": factor, "patience_frac": patience_frac, "threshold": threshold},
                          epochs=epochs, steps_per_epoch=3)
    ref_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=BASE_LR)
    ref = LRS.ReduceLROnPlateau(ref_opt, mode="min", factor=factor, patience=max(1, round(patience_frac * epochs)),
                                threshold=threshold, threshold_mode="rel", eps=0.0)
    gen = torch.Generator().manual_seed(epochs)
    losses = (2.0 + torch.rand(epochs, generator=gen) - torch.linspace(0, 1.5, epochs)).tolist()
    losses[epochs // 2] = float("nan")  # a NaN validation loss counts as no improvement in both
    for loss in losses:
        ours.step_epoch(loss)
        ref.step(loss)
        assert ours.lr() == pytest.approx(ref_opt.param_groups[0]["lr"], rel=1e-12)
    assert ours.lr() < BASE_LR  # the sequence did trigger reductions


# ------------------------------------------------------------------ optimizers vs torch.optim by hand

# per optimizer: a config with every key off its default, and torch.optim's constructor called by hand
# with the same values (a swapped beta, a dropped key or a wrong default shows up as different weights)
BY_HAND: dict[str, tuple[dict[str, Any], Any]] = {
    "sgd": ({"lr": 0.07, "momentum": 0.8, "dampening": 0.0, "nesterov": True, "weight_decay": 0.01},
            lambda p: torch.optim.SGD(p, lr=0.07, momentum=0.8, dampening=0.0, nesterov=True, weight_decay=0.01)),
    "adam": ({"lr": 0.02, "beta1": 0.8, "beta2": 0.95, "eps": 1e-6, "weight_decay": 0.03, "amsgrad": True},
             lambda p: torch.optim.Adam(p, lr=0.02, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.03, amsgrad=True)),
    "adamw": ({"lr": 0.02, "beta1": 0.7, "beta2": 0.9, "eps": 1e-7, "weight_decay": 0.2, "amsgrad": True},
              lambda p: torch.optim.AdamW(p, lr=0.02, betas=(0.7, 0.9), eps=1e-7, weight_decay=0.2, amsgrad=True)),
    "rmsprop": ({"lr": 0.005, "alpha": 0.9, "momentum": 0.5, "eps": 1e-6, "centered": True, "weight_decay": 0.01},
                lambda p: torch.optim.RMSprop(p, lr=0.005, alpha=0.9, momentum=0.5, eps=1e-6, centered=True, weight_decay=0.01)),
    "adagrad": ({"lr": 0.05, "lr_decay": 0.01, "initial_accumulator_value": 0.1, "eps": 1e-8, "weight_decay": 0.01},
                lambda p: torch.optim.Adagrad(p, lr=0.05, lr_decay=0.01, initial_accumulator_value=0.1, eps=1e-8, weight_decay=0.01)),
}
TORCH_CLASS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
               "rmsprop": torch.optim.RMSprop, "adagrad": torch.optim.Adagrad}


def _train_20_steps(make_opt: Any) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    opt = make_opt(list(model.parameters()))
    for _ in range(20):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def test_every_optimizer_has_a_by_hand_reference() -> None:
    assert set(BY_HAND) == set(OPTIMIZERS) == set(TORCH_CLASS)
    for name, (cfg, _) in BY_HAND.items():  # every hyperparameter is exercised off its default
        defaults = {k: p.default for k, p in OPTIMIZERS.hyperparameters(name).items()}
        assert set(cfg) == set(defaults), name
        assert [k for k in cfg if cfg[k] == defaults[k] and k != "dampening"] == [], name


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizer_equals_torch_optim_built_by_hand(name: str) -> None:
    cfg, by_hand = BY_HAND[name]
    ours = _train_20_steps(lambda p: build_optimizer(p, {"name": name, **cfg}))
    ref = _train_20_steps(by_hand)
    assert all(torch.equal(a, b) for a, b in zip(ours, ref, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(ours, _train_20_steps(lambda p: TORCH_CLASS[name](p, lr=cfg["lr"])), strict=True))


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizer_defaults_equal_torch_optim_defaults(name: str) -> None:
    ours = _train_20_steps(lambda p: build_optimizer(p, {"name": name}))
    ref = _train_20_steps(lambda p: TORCH_CLASS[name](p))
    assert all(torch.equal(a, b) for a, b in zip(ours, ref, strict=True))


# --------------------------------------------------------------------------------------------------
# PBT mutations: whatever validation accepts must survive an exploit (save, change, load, step)

# Ranges a spec might mutate a numeric hyperparameter over; validation decides which each key takes.
NUMERIC_MUTATIONS: list[dict[str, list[float]]] = [
    {"uniform": [0.0, 0.5]}, {"uniform": [0.5, 1.0]}, {"uniform": [1.0, 2.0]},
    {"loguniform": [1e-8, 1e-2]}, {"quniform": [0.0, 1.0, 0.25]},
]
KNOBS = [(name, key) for name in sorted(OPTIMIZERS) for key in OPTIMIZERS.hyperparameters(name)]


def _steps(model: torch.nn.Module, opt: torch.optim.Optimizer, n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x, y = torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _builds(cfg: dict[str, Any]) -> bool:
    try:
        build_optimizer([torch.nn.Parameter(torch.zeros(2))], cfg)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize(("name", "key"), KNOBS, ids=[f"{n}-{k}" for n, k in KNOBS])
def test_every_mutation_validation_accepts_survives_an_exploit(name: str, key: str) -> None:
    """Each candidate mutation of ``key`` (the space holds its default, so e.g. momentum starts at 0):
    refused by validation only if a value PBT can reach (an end of the range) does not build; accepted,
    then from the default and from each end to each end: build, step, save, rebuild with the new value,
    load as a trial does after an exploit, step. No error, finite weights, and each parameter's state
    has exactly the buffers torch.optim itself creates for the new settings."""
    from cifar_tune.engine.optim import load_optimizer_state
    from cifar_tune.errors import ErrorList
    from cifar_tune.spec.checks import check_mutations
    from cifar_tune.spec.space import Dist, clip_extremes

    default = OPTIMIZERS.defaults(name)[key]
    candidates = [{"choice": [False, True]}] if isinstance(default, bool) else NUMERIC_MUTATIONS
    base = {"name": name, "lr": 0.01} if key != "lr" else {"name": name}
    if key == "nesterov":
        base["momentum"] = 0.9  # nesterov needs momentum: with the default 0 no mutation of it could run
    structure: dict[Any, list[list[str]]] = {}
    accepted = 0
    for mutation in candidates:
        errors = ErrorList()
        check_mutations({"optimizer": {key: mutation}}, {"optimizer": {**base, key: default}}, None, errors)
        (kind, args), = mutation.items()
        ends = clip_extremes(Dist(kind, tuple(args)))
        if errors.items:
            assert len(errors.items) == 1 and errors.items[0].startswith(f"search.scheduler.mutations.optimizer.{key}: ")
            assert not all(_builds({**base, key: v}) for v in ends), (mutation, errors.items)
            continue
        accepted += 1
        for start in [default, *ends]:
            for end in ends:
                torch.manual_seed(0)
                model = torch.nn.Linear(4, 3)
                before = build_optimizer(model.parameters(), {**base, key: start})
                _steps(model, before, 3, seed=1)
                saved = before.state_dict()
                after = build_optimizer(model.parameters(), {**base, key: end})
                load_optimizer_state(after, saved)
                group = after.param_groups[0]  # the mutated value is the one in force
                assert (group["betas"][int(key[-1]) - 1] if key in ("beta1", "beta2") else group[key]) == end
                _steps(model, after, 2, seed=2)
                assert all(torch.isfinite(p).all() for p in model.parameters())
                if end not in structure:  # torch's own structure for the new settings: fresh, stepped once
                    ref_model = torch.nn.Linear(4, 3)
                    ref = build_optimizer(ref_model.parameters(), {**base, key: end})
                    _steps(ref_model, ref, 1, seed=3)
                    structure[end] = [sorted(ref.state[p]) for p in ref_model.parameters()]
                assert [sorted(after.state[p]) for p in model.parameters()] == structure[end], (start, end)
    assert accepted >= 1  # every hyperparameter has some mutation that runs


@pytest.mark.parametrize(("mutations", "space", "message"), [
    # clipped to momentum 1.0, which the sgd builder refuses (momentum 1 never forgets a gradient)
    ({"momentum": {"uniform": [0.5, 1.0]}}, {"name": "sgd", "lr": 0.1, "momentum": 0.9},
     "search.scheduler.mutations.optimizer.momentum: can reach momentum=1.0 (PBT clips perturbed values to "
     "the range's ends), invalid in space.optimizer: momentum: must be in [0, 1); got 1.0"),
    ({"lr": {"normal": [0.1, 0.01]}}, {"name": "sgd", "lr": 0.1},
     "search.scheduler.mutations.optimizer.lr: normal is unbounded"),
    # each alone is fine; together nesterov meets momentum's lower end 0
    ({"momentum": {"uniform": [0.0, 0.9]}, "nesterov": {"choice": [False, True]}},
     {"name": "sgd", "lr": 0.1, "momentum": 0.5, "nesterov": False},
     "search.scheduler.mutations: together, optimizer.momentum=0.0, optimizer.nesterov=True (ends of their "
     "ranges) are invalid in space.optimizer: nesterov: needs momentum > 0 and dampening 0"),
])
def test_validation_refuses_mutations_pbt_would_crash_on(mutations: dict[str, Any], space: dict[str, Any],
                                                         message: str) -> None:
    from cifar_tune.errors import ErrorList
    from cifar_tune.spec.checks import check_mutations

    errors = ErrorList()
    check_mutations({"optimizer": mutations}, {"optimizer": space}, None, errors)
    assert len(errors.items) == 1 and errors.items[0].startswith(message), errors.items
