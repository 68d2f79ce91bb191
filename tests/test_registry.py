"""Registries: decorator fill, duplicates are errors, unknown names list the available ones."""

from __future__ import annotations

import pytest

from cifar_tune.engine.augment import AUGMENTS
from cifar_tune.engine.data import DATASETS
from cifar_tune.engine.models import MODELS
from cifar_tune.engine.optim import OPTIMIZERS, SCHEDULES
from cifar_tune.registry import Registry, UnknownNameError


def test_register_hyperparameters_and_defaults() -> None:
    reg = Registry("widget")

    @reg.register()
    def knob(size: int, *, width: int = 3, name: str = "a") -> tuple[int, int, str]:
        return size, width, name

    assert list(reg) == ["knob"]
    assert list(reg.hyperparameters("knob")) == ["width", "name"]  # keyword-only only
    assert reg.defaults("knob") == {"width": 3, "name": "a"}
    assert reg.build("knob", 1, width=5) == (1, 5, "a")


def test_duplicate_name_is_an_error() -> None:
    reg = Registry("widget")
    reg.register("x")(lambda: 1)
    with pytest.raises(ValueError, match="duplicate widget 'x'"):
        reg.register("x")(lambda: 2)


def test_unknown_name_lists_available_and_suggests() -> None:
    with pytest.raises(UnknownNameError) as e:
        OPTIMIZERS.get_builder("adamm")
    assert str(e.value) == "unknown optimizer 'adamm' (did you mean 'adam'?); available: adagrad, adam, adamw, rmsprop, sgd"


@pytest.mark.parametrize("registry", [MODELS, OPTIMIZERS, SCHEDULES, AUGMENTS, DATASETS], ids=lambda r: r.kind)
def test_every_entry_documents_its_hyperparameters(registry: Registry) -> None:
    assert len(registry) >= 4
    for name in registry:
        for hp, param in registry.hyperparameters(name).items():
            assert param.default is not param.empty, f"{registry.kind} {name}.{hp} has no default"
