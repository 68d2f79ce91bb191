"""cifar-tune: declarative hyperparameter and architecture search for CIFAR-style classification.

``import cifar_tune as ct`` is cheap (no torch, no Ray): the API functions load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_API = ("Experiment", "ProgressPrinter", "list_experiments", "load_spec", "open", "search")
__all__ = ["__version__", *_API]

if TYPE_CHECKING:
    from cifar_tune.api import Experiment, ProgressPrinter, list_experiments, load_spec, open, search  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _API:
        from cifar_tune import api

        return getattr(api, name)
    raise AttributeError(f"module 'cifar_tune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
