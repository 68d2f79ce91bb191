"""Optimizers and learning-rate schedules, built from flat configs.

``build_optimizer(params, {"name": "sgd", "lr": 0.05, "momentum": 0.9})`` and
``build_schedule(opt, {"name": "cosine", "warmup_frac": 0.05}, epochs=30, steps_per_epoch=390)``.

Builders are registered in ``OPTIMIZERS`` / ``SCHEDULES``; their keyword-only parameters are the config keys
(read by the spec validator from the signature). Defaults are PyTorch's.

Schedules are defined relative to the run's length (fractions of the total number of optimizer steps), so a
config found in a 30-epoch search means the same thing in a 100-epoch retrain. Every schedule except
``plateau`` is a multiplicative factor of the step index, applied after every batch (smooth curves, no
epoch-sized jumps); ``plateau`` reacts to the validation loss once per epoch.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from cifar_tune.registry import Registry, UnknownNameError, did_you_mean

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "SCHEDULE_COMMON_KEYS",
    "Schedule",
    "build_optimizer",
    "build_schedule",
    "load_optimizer_state",
    "match_state_to_settings",
]

OPTIMIZERS = Registry("optimizer")
SCHEDULES = Registry("lr schedule")

# Keys every schedule config accepts besides its builder's own (handled by ``build_schedule``).
SCHEDULE_COMMON_KEYS: dict[str, type] = {"warmup_frac": float}

Params = Iterable[torch.Tensor] | Iterable[dict[str, Any]]


# --------------------------------------------------------------------------------------------------
# Value checks: raise ValueError("<key>: ...") with the config key. Numbers may be numpy scalars from a
# Ray Tune sampler, so test against the numeric ABCs.
# --------------------------------------------------------------------------------------------------


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise ValueError(f"{key}: must be a number; got {value!r}")
    return float(value)


def _positive(key: str, value: Any) -> float:
    v = _number(key, value)
    if not v > 0:
        raise ValueError(f"{key}: must be > 0; got {value!r}")
    return v


def _non_negative(key: str, value: Any) -> float:
    v = _number(key, value)
    if v < 0:
        raise ValueError(f"{key}: must be >= 0; got {value!r}")
    return v


def _in_range(
    key: str, value: Any, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = True
) -> float:
    v = _number(key, value)
    if (v <= lo if lo_open else v < lo) or (v >= hi if hi_open else v > hi):
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise ValueError(f"{key}: must be in {interval}; got {value!r}")
    return v


def _flag(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{key}: must be true or false; got {value!r}")
    return value


def _check_keys(kind: str, name: str, given: Iterable[str], allowed: Iterable[str]) -> None:
    allowed = list(allowed)
    for key in given:
        if key not in allowed:
            raise ValueError(
                f"{key}: unknown key for {kind} '{name}'{did_you_mean(key, allowed)}; "
                f"allowed: {', '.join(allowed)}"
            )


def _lookup(registry: Registry, cfg: Mapping[str, Any], extra_keys: Iterable[str] = ()) -> tuple[str, dict]:
    """``cfg["name"]`` and the remaining keys, checked against the builder's signature."""
    if "name" not in cfg:
        raise ValueError(f"name: missing; available: {', '.join(sorted(registry))}")
    name = cfg["name"]
    try:
        allowed = list(registry.hyperparameters(name))
    except UnknownNameError as e:
        raise ValueError(f"name: {e}") from None
    hparams = {k: v for k, v in cfg.items() if k != "name"}
    _check_keys(registry.kind, name, hparams, [*allowed, *extra_keys])
    return name, hparams


# --------------------------------------------------------------------------------------------------
# Optimizers. ``foreach=True`` runs each update as a few multi-tensor kernels instead of a Python loop
# over parameters (the default would pick it on CUDA only).
# --------------------------------------------------------------------------------------------------


@OPTIMIZERS.register()
def sgd(
    params: Params,
    *,
    lr: float = 1e-3,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    lr = _positive("lr", lr)
    momentum = _in_range("momentum", momentum, 0.0, 1.0)
    dampening = _in_range("dampening", dampening, 0.0, 1.0)
    if _flag("nesterov", nesterov) and (momentum == 0 or dampening != 0):
        raise ValueError(
            f"nesterov: needs momentum > 0 and dampening 0; got momentum {momentum}, dampening {dampening}"
        )
    return torch.optim.SGD(
        params,
        lr=lr,
        momentum=momentum,
        dampening=dampening,
        nesterov=nesterov,
        weight_decay=_non_negative("weight_decay", weight_decay),
        foreach=True,
    )


def _adam_kwargs(
    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, amsgrad: bool
) -> dict:
    return {
        "lr": _positive("lr", lr),
        "betas": (_in_range("beta1", beta1, 0.0, 1.0), _in_range("beta2", beta2, 0.0, 1.0)),
        "eps": _positive("eps", eps),
        "weight_decay": _non_negative("weight_decay", weight_decay),
        "amsgrad": _flag("amsgrad", amsgrad),
        "foreach": True,
    }


@OPTIMIZERS.register()
def adam(
    params: Params,
    *,
    lr: float = 1e-3,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
) -> torch.optim.Optimizer:
    """Adam; ``weight_decay`` is L2 added to the gradient (coupled), unlike ``adamw``."""
    return torch.optim.Adam(params, **_adam_kwargs(lr, beta1, beta2, eps, weight_decay, amsgrad))


@OPTIMIZERS.register()
def adamw(
    params: Params,
    *,
    lr: float = 1e-3,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    amsgrad: bool = False,
) -> torch.optim.Optimizer:
    """AdamW: decoupled weight decay (``p -= lr * weight_decay * p`` each step)."""
    return torch.optim.AdamW(params, **_adam_kwargs(lr, beta1, beta2, eps, weight_decay, amsgrad))


@OPTIMIZERS.register()
def rmsprop(
    params: Params,
    *,
    lr: float = 1e-2,
    alpha: float = 0.99,
    momentum: float = 0.0,
    eps: float = 1e-8,
    centered: bool = False,
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    # alpha = 1 is excluded: the squared-gradient average would stay 0 and every step be lr * grad / eps.
    return torch.optim.RMSprop(
        params,
        lr=_positive("lr", lr),
        alpha=_in_range("alpha", alpha, 0.0, 1.0),
        momentum=_in_range("momentum", momentum, 0.0, 1.0),
        eps=_positive("eps", eps),
        centered=_flag("centered", centered),
        weight_decay=_non_negative("weight_decay", weight_decay),
        foreach=True,
    )


@OPTIMIZERS.register()
def adagrad(
    params: Params,
    *,
    lr: float = 1e-2,
    lr_decay: float = 0.0,
    initial_accumulator_value: float = 0.0,
    eps: float = 1e-10,
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    return torch.optim.Adagrad(
        params,
        lr=_positive("lr", lr),
        lr_decay=_non_negative("lr_decay", lr_decay),
        initial_accumulator_value=_non_negative("initial_accumulator_value", initial_accumulator_value),
        eps=_positive("eps", eps),
        weight_decay=_non_negative("weight_decay", weight_decay),
        foreach=True,
    )


def build_optimizer(params: Params, cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    """Build ``cfg = {"name": "sgd", **hyperparameters}`` over ``params`` (tensors or param-group dicts)."""
    name, hparams = _lookup(OPTIMIZERS, cfg)
    params = list(params)
    if not params:
        raise ValueError("params: the model has no trainable parameters")
    return OPTIMIZERS[name](params, **hparams)


# Per-parameter state buffers that exist only under some settings: torch creates them at a parameter's
# first step and from then on reads them whenever the setting asks for them. A state saved under other
# settings (a PBT exploit that switched amsgrad, centered or RMSprop's momentum on) lacks them, and the
# next step raised KeyError. ``_ZEROED``: buffer -> "this group's settings use it"; a missing one starts
# at zeros, its value before the first step in torch. ``_DROPPED``: buffers torch creates itself when
# absent (SGD's momentum buffer starts as the gradient) and only needs dropped when unused.
_Uses = Callable[[Mapping[str, Any]], bool]
_ZEROED: dict[type[torch.optim.Optimizer], dict[str, _Uses]] = {
    torch.optim.Adam: {"max_exp_avg_sq": lambda g: bool(g["amsgrad"])},
    torch.optim.AdamW: {"max_exp_avg_sq": lambda g: bool(g["amsgrad"])},
    torch.optim.RMSprop: {"momentum_buffer": lambda g: g["momentum"] > 0, "grad_avg": lambda g: bool(g["centered"])},
}
_DROPPED: dict[type[torch.optim.Optimizer], dict[str, _Uses]] = {
    torch.optim.SGD: {"momentum_buffer": lambda g: g["momentum"] != 0},
}


def match_state_to_settings(optimizer: torch.optim.Optimizer) -> None:
    """Make each parameter's state hold exactly the buffers its group's current settings use: call it
    after ``load_state_dict`` and after changing a group's hyperparameters. Unused buffers are dropped
    so that switching a setting off and on again starts it afresh, as a new run would, instead of
    reviving values from before the switch."""
    zeroed, dropped = _ZEROED.get(type(optimizer), {}), _DROPPED.get(type(optimizer), {})
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state:  # no step yet: torch builds the state from the settings
                continue
            for key, uses in zeroed.items():
                if uses(group) and key not in state:
                    state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
                elif not uses(group):
                    state.pop(key, None)
            for key, uses in dropped.items():
                if not uses(group):
                    state.pop(key, None)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: Mapping[str, Any]) -> None:
    """Load a saved ``optimizer.state_dict()`` keeping this optimizer's hyperparameters (lr, momentum,
    betas, amsgrad, ...): buffers and step counts come from the state, settings from the config this
    optimizer was built from. Identical when continuing; PBT's new values after an exploit, with the
    buffers a changed setting needs (``match_state_to_settings``)."""
    settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, own in zip(optimizer.param_groups, settings, strict=True):
        group.update(own)
    match_state_to_settings(optimizer)


# --------------------------------------------------------------------------------------------------
# Schedules. A builder receives the run's length (``total_steps`` optimizer steps over ``epochs`` epochs)
# and returns the lr factor as a function of the step index: lr(t) = base_lr * factor(t), t = 0 for the
# first batch. ``plateau`` returns a stateful ``PlateauFactor`` instead.
# --------------------------------------------------------------------------------------------------

Factor = Callable[[int], float]


def _fraction_step(frac: float, total_steps: int) -> int:
    """The step at ``frac`` of the run, at least 1 (so a tiny run still has a well-defined milestone)."""
    return max(1, round(frac * total_steps))


@SCHEDULES.register()
def none(total_steps: int, epochs: int) -> Factor:
    """Constant learning rate."""
    return lambda t: 1.0


@SCHEDULES.register()
def step(total_steps: int, epochs: int, *, every_frac: float = 0.3, gamma: float = 0.1) -> Factor:
    """Multiply the lr by ``gamma`` every ``every_frac`` of the run."""
    frac = _in_range("every_frac", every_frac, 0.0, 1.0, lo_open=True, hi_open=False)
    period = _fraction_step(frac, total_steps)
    g = _in_range("gamma", gamma, 0.0, 1.0, lo_open=True, hi_open=False)
    return lambda t: g ** (t // period)


@SCHEDULES.register()
def multistep(
    total_steps: int,
    epochs: int,
    *,
    milestones_frac: list[float] = [0.5, 0.75],  # noqa: B006 - read by the validator, never mutated
    gamma: float = 0.1,
) -> Factor:
    """Multiply the lr by ``gamma`` at each fraction of the run in ``milestones_frac`` (increasing)."""
    if isinstance(milestones_frac, (str, bytes)) or not isinstance(milestones_frac, Iterable):
        raise ValueError(f"milestones_frac: must be a list of fractions in (0, 1); got {milestones_frac!r}")
    fracs = [
        _in_range(f"milestones_frac[{i}]", f, 0.0, 1.0, lo_open=True) for i, f in enumerate(milestones_frac)
    ]
    if fracs != sorted(fracs):
        raise ValueError(f"milestones_frac: must be increasing; got {fracs}")
    milestones = [_fraction_step(f, total_steps) for f in fracs]
    g = _in_range("gamma", gamma, 0.0, 1.0, lo_open=True, hi_open=False)
    return lambda t: g ** sum(t >= m for m in milestones)


@SCHEDULES.register()
def exponential(total_steps: int, epochs: int, *, final_lr_frac: float = 0.01) -> Factor:
    """Smooth exponential decay reaching ``final_lr_frac * lr`` at the end of the run."""
    final = _in_range("final_lr_frac", final_lr_frac, 0.0, 1.0, lo_open=True, hi_open=False)
    return lambda t: final ** min(t / total_steps, 1.0)


@SCHEDULES.register()
def cosine(total_steps: int, epochs: int, *, min_lr_frac: float = 0.0) -> Factor:
    """Half-cosine from ``lr`` to ``min_lr_frac * lr`` over the run (no restarts)."""
    lo = _in_range("min_lr_frac", min_lr_frac, 0.0, 1.0, hi_open=False)
    return lambda t: lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * min(t / total_steps, 1.0)))


@SCHEDULES.register()
def onecycle(
    total_steps: int,
    epochs: int,
    *,
    pct_start: float = 0.3,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
) -> Factor:
    """1cycle (Smith & Topin) with the optimizer's lr as the peak, like ``torch.optim.lr_scheduler.OneCycleLR``
    with cosine annealing: ``lr/div_factor`` -> ``lr`` at ``pct_start`` of the run ->
    ``lr/(div_factor*final_div_factor)`` at the end. Momentum / betas are not cycled.
    """
    pct = _in_range("pct_start", pct_start, 0.0, 1.0, lo_open=True)
    start = 1.0 / _in_range("div_factor", div_factor, 1.0, math.inf, hi_open=True)
    end = start / _in_range("final_div_factor", final_div_factor, 1.0, math.inf, hi_open=True)
    # PyTorch's phase boundaries: the peak is the lr of step pct*T - 1 and the final lr that of the last
    # step, T - 1, that runs (a float peak step, as in OneCycleLR)
    peak_step = float(pct * total_steps) - 1.0
    last_step = float(total_steps - 1)

    def anneal(a: float, b: float, p: float) -> float:  # OneCycleLR._annealing_cos, same operation order
        return b + (a - b) / 2.0 * (math.cos(math.pi * p) + 1.0)

    def progress(t: int, lo: float, hi: float) -> float:
        # a phase of zero length (OneCycleLR divides by zero there) is already at its end value
        return (t - lo) / (hi - lo) if hi != lo else 1.0

    def factor(t: int) -> float:
        if t <= peak_step:
            return anneal(start, 1.0, progress(t, 0.0, peak_step))
        return anneal(1.0, end, min(progress(t, peak_step, last_step), 1.0))  # clamped past the run's end

    return factor


class PlateauFactor:
    """Stateful factor for ``plateau``: multiplied by ``factor`` after ``patience`` epochs without a relative
    improvement of ``threshold`` in the validation loss (``ReduceLROnPlateau`` in "min"/"rel" mode)."""

    def __init__(self, factor: float, patience: int, threshold: float) -> None:
        self.factor, self.patience, self.threshold = factor, patience, threshold
        self.scale = 1.0
        self.best = math.inf
        self.bad_epochs = 0

    def __call__(self, t: int) -> float:
        return self.scale

    def observe(self, val_loss: float) -> None:
        if val_loss < self.best * (1.0 - self.threshold):  # NaN compares False: counts as no improvement
            self.best, self.bad_epochs = val_loss, 0
            return
        self.bad_epochs += 1
        if self.bad_epochs > self.patience:
            self.scale *= self.factor
            self.bad_epochs = 0

    def state_dict(self) -> dict[str, float]:
        return {"scale": self.scale, "best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        self.scale, self.best, self.bad_epochs = state["scale"], state["best"], int(state["bad_epochs"])


@SCHEDULES.register()
def plateau(
    total_steps: int,
    epochs: int,
    *,
    factor: float = 0.1,
    patience_frac: float = 0.1,
    threshold: float = 1e-4,
) -> PlateauFactor:
    """Reduce the lr by ``factor`` when the validation loss stalls for ``max(1, round(patience_frac *
    epochs))`` epochs. Needs a validation loss each epoch; without one (full retrain) the lr stays put."""
    return PlateauFactor(
        factor=_in_range("factor", factor, 0.0, 1.0, lo_open=True),
        patience=max(1, round(_in_range("patience_frac", patience_frac, 0.0, 1.0, hi_open=False) * epochs)),
        threshold=_in_range("threshold", threshold, 0.0, 1.0),
    )


class Schedule:
    """Drives the optimizer's lr: ``base_lr * warmup(t) * factor(t)`` for step ``t``.

    Call ``step_batch()`` after every ``optimizer.step()`` and ``step_epoch(val_loss)`` once per epoch.
    The lr is a Python float computed from the step counter, so stepping never synchronises with the
    device.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, factor: Factor, *, total_steps: int, warmup_steps: int
    ) -> None:
        self.optimizer = optimizer
        self.factor = factor
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        # "initial_lr" survives a rebuilt schedule over an optimizer whose lr this class already changed.
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.base_lrs = [float(g["initial_lr"]) for g in optimizer.param_groups]
        self.t = 0
        self._apply()

    def _warmup(self, t: int) -> float:
        # Linear ramp (t+1)/(W+1): never 0 (a zero-lr first step is wasted), exactly 1 from step W on.
        return min(1.0, (t + 1) / (self.warmup_steps + 1))

    def _apply(self) -> None:
        scale = self._warmup(self.t) * self.factor(self.t)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * scale

    def step_batch(self) -> None:
        self.t += 1
        self._apply()

    def step_epoch(self, val_loss: float | None) -> None:
        if isinstance(self.factor, PlateauFactor) and val_loss is not None:
            self.factor.observe(float(val_loss))
            self._apply()

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"t": self.t}
        if isinstance(self.factor, PlateauFactor):
            state["plateau"] = self.factor.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.t = int(state["t"])
        if isinstance(self.factor, PlateauFactor) and "plateau" in state:
            self.factor.load_state_dict(state["plateau"])
        self._apply()


def build_schedule(
    optimizer: torch.optim.Optimizer, cfg: Mapping[str, Any], *, epochs: int, steps_per_epoch: int
) -> Schedule:
    """Build ``cfg = {"name": "cosine", "warmup_frac": 0.05, **hyperparameters}`` for a run of
    ``epochs * steps_per_epoch`` optimizer steps. ``warmup_frac`` (any schedule) ramps the lr linearly over
    that fraction of the run, multiplying the schedule's own factor (so milestones stay where they are)."""
    for key, value in (("epochs", epochs), ("steps_per_epoch", steps_per_epoch)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{key}: must be an integer >= 1; got {value!r}")
    name, hparams = _lookup(SCHEDULES, cfg, SCHEDULE_COMMON_KEYS)
    warmup_frac = _in_range("warmup_frac", hparams.pop("warmup_frac", 0.0), 0.0, 1.0)
    total_steps = int(epochs) * int(steps_per_epoch)
    factor = SCHEDULES[name](total_steps, int(epochs), **hparams)
    return Schedule(optimizer, factor, total_steps=total_steps, warmup_steps=round(warmup_frac * total_steps))
