"""The searched hyperparameters of one trial: names, values and ranges, read off the space and the config.

A trial's config is a plain nested dict; which of its values were drawn, and from what, is in the
space. Walking both together gives one :class:`Param` per distribution the trial actually drew
from. A parameter that lives inside one option of a ``choice`` is named with that option's label,
so each branch of a conditional space has its own parameters: ``optimizer`` (sgd | adam),
``optimizer[sgd].lr``, ``optimizer[adam].lr``, ``model[lenet].channels[0]``. List-valued knobs are
kept (an element drawn from a distribution is its own parameter; a list chosen whole is a
categorical value). The trials dashboard and the report's importance use these names.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Literal

from cifar_tune.spec.space import Dist, iter_dists

OPTUNA_SCALARS = (str, int, float, bool)


@dataclass(frozen=True)
class Param:
    name: str
    kind: Literal["float", "int", "categorical"]
    value: Any  # a number, or (categorical) one of ``choices``
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    choices: tuple[Any, ...] = ()

    def distribution(self) -> Any:
        """The Optuna distribution of this parameter."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.kind == "categorical":
            return CategoricalDistribution(list(self.choices))
        if self.kind == "int":
            return IntDistribution(int(self.low), int(self.high), log=self.log)
        return FloatDistribution(float(self.low), float(self.high), log=self.log)


def option_label(option: Any, index: int) -> Any:
    """How an option of a choice is shown: its value, its ``name``/``family``, or JSON."""
    if isinstance(option, OPTUNA_SCALARS) or option is None:
        return option
    if isinstance(option, dict):
        for key in ("name", "family"):
            if isinstance(option.get(key), str):
                return option[key]
        return f"option{index}"
    return json.dumps(to_plain(option))


def to_plain(tree: Any) -> Any:
    if isinstance(tree, Dist):
        return tree.to_yaml()
    if isinstance(tree, dict):
        return {k: to_plain(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [to_plain(v) for v in tree]
    return tree


def matches(tree: Any, value: Any) -> bool:
    """Could ``tree`` (a space fragment) have produced ``value``?"""
    if isinstance(tree, Dist):
        if tree.kind in ("choice", "grid"):
            return any(matches(o, value) for o in tree.args)
        return isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(tree, dict):
        return isinstance(value, dict) and set(tree) == set(value) and all(matches(v, value[k]) for k, v in tree.items())
    if isinstance(tree, list):
        return isinstance(value, list) and len(tree) == len(value) and all(matches(t, v) for t, v in zip(tree, value, strict=True))
    return type(tree) is type(value) and tree == value or (_number(tree) and _number(value) and tree == value)


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _numeric_param(dist: Dist, value: Any, name: str) -> Param:
    a = dist.args
    k = dist.kind
    if k == "normal":  # unbounded: +-3 sd, as the Optuna sampler does
        low, high = a[0] - 3 * a[1], a[0] + 3 * a[1]
    elif k in ("randint", "lograndint"):
        low, high = a[0], a[1] - 1  # high is exclusive in the spec, inclusive in Optuna
    else:
        low, high = a[0], a[1]
    is_int = isinstance(value, int) and k in ("randint", "lograndint", "quniform", "qloguniform")
    # a quantized or normal draw can fall just outside the nominal range: widen to hold it
    low, high = min(low, value), max(high, value)
    log = k in ("loguniform", "qloguniform", "lograndint") and low > 0
    if is_int:
        return Param(name, "int", int(value), math.floor(low), math.ceil(high), log and low >= 1)
    return Param(name, "float", float(value), float(low), float(high), log)


def searched_params(space: dict[str, Any], config: dict[str, Any]) -> list[Param]:
    """Every parameter ``config`` drew from ``space``, in the order of the space."""
    out: list[Param] = []
    _walk(space, config, "", out)
    return out


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _walk(tree: Any, value: Any, path: str, out: list[Param]) -> None:
    if isinstance(tree, Dist):
        if tree.kind not in ("choice", "grid"):
            if _number(value):
                out.append(_numeric_param(tree, value, path or "value"))
            return
        index = next((i for i, o in enumerate(tree.args) if matches(o, value)), None)
        if index is None:
            return  # a config from another space (edited spec): nothing to say
        labels = [option_label(o, i) for i, o in enumerate(tree.args)]
        if len(set(map(json.dumps, labels))) < len(labels):  # duplicate labels: fall back to indices
            labels = [f"option{i}" for i in range(len(labels))]
        option = tree.args[index]
        if len(labels) > 1:
            out.append(Param(path or "value", "categorical", labels[index], choices=tuple(labels)))
        branch = f"{path}[{labels[index]}]" if len(labels) > 1 and any(True for _ in iter_dists(option)) else path
        _walk(option, value, branch, out)
    elif isinstance(tree, dict) and isinstance(value, dict):
        for k, sub in tree.items():
            if k in value:
                _walk(sub, value[k], _join(path, k), out)
    elif isinstance(tree, list) and isinstance(value, list) and len(tree) == len(value):
        for i, (sub, v) in enumerate(zip(tree, value, strict=True)):
            _walk(sub, v, f"{path}[{i}]", out)


def branch_of(name: str) -> tuple[str, str] | None:
    """``optimizer[sgd].lr`` -> (``optimizer``, ``sgd``): the choice and option a parameter belongs to."""
    if "[" not in name:
        return None
    head, _, rest = name.partition("[")
    label = rest.split("]", 1)[0]
    if label.isdigit():  # a list index, not a branch
        return None
    return head, label
