"""Checks of single spec values (names, types, distributions) and a YAML mapping parsed into a
dataclass, every problem collected with its key path."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import MISSING, fields, is_dataclass
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from cifar_tune.errors import ErrorList
from cifar_tune.registry import did_you_mean
from cifar_tune.spec.space import DIST_ARITY, Dist, iter_dists

# --------------------------------------------------------------------------------------- sections

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
TOP_KEYS = ("name", "data", "search", "space", "constraints", "retrain", "tracking")
SPACE_KEYS = ("model", "optimizer", "schedule", "augment", "train")
SPACE_DEFAULTS: dict[str, Any] = {
    "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": True},
    "schedule": {"name": "cosine"},
    "augment": {"hflip": True, "crop": {"padding": 4}},
    "train": {},
}


def check_name(name: Any, what: str = "name") -> str | None:
    """Experiment names become directories: no separators, no '..', no absolute paths."""
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
        return (
            f"{what}: must be 1-100 characters of letters, digits, '_', '-', '.' starting with a letter "
            f"or digit (it names a directory), got {name!r}"
        )
    return None


def _type_name(ann: Any) -> str:
    origin = get_origin(ann)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(ann))
    if origin in (Union, type(int | None)):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in get_args(ann))
    if origin is list:
        (inner,) = get_args(ann) or (Any,)
        return f"list of {_type_name(inner)}"
    return getattr(ann, "__name__", str(ann))


def type_problem(value: Any, ann: Any) -> str | None:
    """Why a constant does not fit an annotation, or None. Unknown annotations accept anything."""
    origin = get_origin(ann)
    if ann is Any or ann is None:
        return None
    if origin is Literal:
        return None if value in get_args(ann) else f"must be one of {_type_name(ann)}, got {value!r}"
    if origin in (Union, type(int | None)):
        if all(type_problem(value, a) for a in get_args(ann)):
            return f"must be {_type_name(ann)}, got {value!r}"
        return None
    if ann is type(None):
        return None if value is None else "must be null"
    if ann is bool:
        return None if isinstance(value, bool) else f"must be true or false, got {value!r}"
    if ann is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else f"must be an integer, got {value!r}"
    if ann is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return None if ok else f"must be a number, got {value!r}"
    if ann is str:
        return None if isinstance(value, str) else f"must be a string, got {value!r}"
    if origin is list or ann is list:
        if not isinstance(value, list):
            return f"must be a list, got {value!r}"
        inner = (get_args(ann) or (Any,))[0]
        for i, v in enumerate(value):
            if not _contains_dist(v) and (p := type_problem(v, inner)):
                return f"[{i}] {p}"
        return None
    if origin is dict or ann is dict:
        return None if isinstance(value, dict) else f"must be a mapping, got {value!r}"
    return None


def _contains_dist(tree: Any) -> bool:
    return any(True for _ in iter_dists(tree))


def _dist_problem(dist: Dist, ann: Any) -> str | None:
    """Can this distribution produce values of the annotated type?"""
    if dist.kind in ("choice", "grid"):
        return None  # options are checked one by one
    kind_int = dist.kind in ("randint", "lograndint") or (
        dist.kind in ("quniform", "qloguniform") and all(float(a).is_integer() for a in dist.args)
    )
    sample = 1 if kind_int else 0.5
    if type_problem(sample, ann) is None:
        return None
    return f"{dist.kind} produces {'integers' if kind_int else 'numbers'}, but the value {type_problem(sample, ann).split(',')[0]}"


def check_value(value: Any, ann: Any, path: str, errors: ErrorList) -> None:
    """Type-check a constant or every option/draw of a distribution against an annotation."""
    if isinstance(value, Dist):
        if value.kind in ("choice", "grid"):
            for i, opt in enumerate(value.args):
                check_value(opt, ann, f"{path}.{value.kind}[{i}]", errors)
        elif p := _dist_problem(value, ann):
            errors.add(f"{path}.{value.kind}", p)
        return
    if _contains_dist(value):
        return  # nested distributions: left to the build check on samples
    if p := type_problem(value, ann):
        errors.add(path, p)


def parse_dataclass(cls: type, value: Any, path: str, errors: ErrorList) -> Any:
    """A mapping -> a frozen dataclass, reporting unknown keys, wrong types and failed checks."""
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        errors.add(path, f"must be a mapping, got {value!r}")
        return cls()
    hints = get_type_hints(cls)
    flds = {f.name: f for f in fields(cls)}
    for key in value:
        if key not in flds:
            errors.add(f"{path}.{key}", f"unknown key{did_you_mean(str(key), list(flds))}; allowed: {', '.join(flds)}")
    kwargs: dict[str, Any] = {}
    for name, f in flds.items():
        if name not in value:
            continue
        v, ann, p = value[name], hints[name], f"{path}.{name}"
        if (parse := f.metadata.get("parse")) is not None:  # a field with its own parser (a list of dataclasses)
            kwargs[name] = parse(v, p, errors)
            continue
        if is_dataclass(ann):
            kwargs[name] = parse_dataclass(ann, v, p, errors)
            continue
        if isinstance(v, Mapping) and len(v) == 1 and next(iter(v)) in DIST_ARITY:
            errors.add(p, "distributions are only allowed under 'space'")
            continue
        if ann is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if problem := type_problem(v, ann):
            errors.add(p, problem)
            continue
        if v is not None and (chk := f.metadata.get("check")) and not chk[0](v):
            errors.add(p, f"{chk[1]}, got {v}")
            continue
        kwargs[name] = v
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        errors.add(path, str(e))
        return None


def _required(cls: type) -> list[str]:
    return [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
