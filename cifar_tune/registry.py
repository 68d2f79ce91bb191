"""Name -> builder registries (models, optimizers, schedules, augmentations, datasets).

A registry is a plain dict filled by a decorator. A builder's *hyperparameters* are its keyword-only
parameters (everything after ``*``); positional parameters are supplied by the engine at build time
(``params`` for an optimizer, ``num_classes`` for a model, ...). The spec validator reads the
hyperparameters, their defaults and their annotations from the signature, so a builder documents and
validates itself: there is no second list of accepted keys to keep in sync.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, get_type_hints

F = TypeVar("F", bound=Callable[..., Any])


class UnknownNameError(KeyError):
    """An unknown registry name; the message lists what is available."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


def did_you_mean(name: str, options: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(str(name), list(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


class Registry(dict[str, Callable[..., Any]]):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def register(self, name: str | None = None) -> Callable[[F], F]:
        def deco(fn: F) -> F:
            key = name or fn.__name__
            if key in self:
                raise ValueError(f"duplicate {self.kind} '{key}': already registered by {self[key].__module__}")
            self[key] = fn
            return fn

        return deco

    def get_builder(self, name: str) -> Callable[..., Any]:
        if name not in self:
            raise UnknownNameError(self.unknown_message(name))
        return self[name]

    def unknown_message(self, name: object) -> str:
        available = ", ".join(sorted(self))
        return f"unknown {self.kind} '{name}'{did_you_mean(str(name), sorted(self))}; available: {available}"

    def hyperparameters(self, name: str, config: Mapping[str, Any] | None = None) -> dict[str, inspect.Parameter]:
        """Keyword-only parameters of the builder: the keys a config for ``name`` may set. A builder whose
        keys depend on the config (a user's model factory) has ``config_hyperparameters(config)``."""
        builder = self.get_builder(name)
        dynamic = getattr(builder, "config_hyperparameters", None)
        if dynamic is not None and config is not None:
            return dict(dynamic(config))
        sig = inspect.signature(builder)
        return {p.name: p for p in sig.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY}

    def type_hints(self, name: str, config: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The hyperparameters' annotations (``config_type_hints(config)`` where the builder has it)."""
        builder = self.get_builder(name)
        dynamic = getattr(builder, "config_type_hints", None)
        if dynamic is not None and config is not None:
            return dict(dynamic(config))
        return get_type_hints(builder)

    def defaults(self, name: str) -> dict[str, Any]:
        return {
            k: p.default
            for k, p in self.hyperparameters(name).items()
            if p.default is not inspect.Parameter.empty
        }

    def build(self, name: str, *args: Any, **hparams: Any) -> Any:
        return self.get_builder(name)(*args, **hparams)
