"""Loading a spec: the YAML file with ``--set`` overrides -> one validated, frozen ``Spec``."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from cifar_tune.errors import ErrorList, SpecError, UserError
from cifar_tune.registry import did_you_mean
from cifar_tune.spec.checks import (
    _check_budget,
    _check_checkpointing,
    _check_concurrency,
    _dataset_info,
    check_mutations,
    check_space,
)
from cifar_tune.spec.fields import SPACE_DEFAULTS, SPACE_KEYS, TOP_KEYS, check_name, parse_dataclass
from cifar_tune.spec.schema import ConstraintsSpec, DataSpec, RetrainSpec, SearchSpec, Spec, TrackingSpec
from cifar_tune.spec.space import parse_tree

# ------------------------------------------------------------------------------------------ loading


class _Loader(yaml.SafeLoader):
    """``yaml.safe_load`` plus YAML 1.2 floats: PyYAML reads ``1e-4`` (no dot) as a string."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_yaml(text: str, source: str = "<string>") -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = e.problem or str(e)
        if "could not determine a constructor" in problem:
            problem = f"unsafe or unknown YAML tag rejected ({problem.split('tag ')[-1]})"
        raise UserError(f"{where}: YAML error: {problem}") from None
    except yaml.YAMLError as e:
        raise UserError(f"{source}: YAML error: {e}") from None


def read_spec_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: no such spec file")
    raw = load_yaml(p.read_text(), str(p))
    if not isinstance(raw, dict):
        raise UserError(f"{p}: a spec must be a YAML mapping with keys name, data, search, space, ...")
    return raw


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``--set key.path=value`` (value parsed as YAML; ``a.b[1].c`` indexes lists)."""
    import copy

    out = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {item!r}: expected key.path=value")
        value = load_yaml(text, f"--set {key}")
        parts = re.findall(r"[^.\[\]]+|\[\d+\]", key.strip())
        node: Any = out
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if part.startswith("["):
                idx = int(part[1:-1])
                if not isinstance(node, list) or idx >= len(node):
                    raise UserError(f"--set {key}: {''.join(parts[:i]) or 'value'} has no item {part}")
                if last:
                    node[idx] = value
                else:
                    node = node[idx]
            else:
                if not isinstance(node, dict):
                    raise UserError(f"--set {key}: cannot set '{part}' inside a non-mapping value")
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
    return out


# ------------------------------------------------------------------------------------------ parsing


def parse_spec(raw: Any, source: str = "<spec>", *, check_budget: bool = True) -> Spec:
    """Validate a loaded YAML document and build the Spec; raises SpecError listing every problem."""
    errors = ErrorList()
    if not isinstance(raw, Mapping):
        raise SpecError(f"{source}: a spec must be a mapping with keys {', '.join(TOP_KEYS)}")
    for key in raw:
        if key not in TOP_KEYS:
            errors.add(str(key), f"unknown top-level key{did_you_mean(str(key), list(TOP_KEYS))}; allowed: {', '.join(TOP_KEYS)}")
    name = raw.get("name", Path(source).stem if source != "<spec>" else None)
    if problem := check_name(name):
        errors.add("", problem)
    data = parse_dataclass(DataSpec, raw.get("data"), "data", errors)
    if data is not None:  # Ray runs trials in other working directories: make paths absolute now
        data = replace(
            data,
            root=str(Path(data.root).expanduser().resolve()) if data.root else None,
            path=str(Path(data.path).expanduser().resolve()) if data.path else None,
        )
    search = parse_dataclass(SearchSpec, raw.get("search"), "search", errors)
    if search is not None and search.objectives:
        search = _objectives_metric(search, raw.get("search") or {}, errors)
    constraints = parse_dataclass(ConstraintsSpec, raw.get("constraints"), "constraints", errors)
    retrain = parse_dataclass(RetrainSpec, raw.get("retrain"), "retrain", errors)
    tracking = parse_dataclass(TrackingSpec, raw.get("tracking"), "tracking", errors)
    sched = search.scheduler
    if sched.grace_period > sched.max_epochs:
        errors.add("search.scheduler.grace_period", f"must be <= max_epochs ({sched.max_epochs}), got {sched.grace_period}")
    _check_checkpointing(search, errors)
    res = search.resources
    if res.mps == "on" and not 0 < res.gpus_per_trial < 1:
        errors.add("search.resources.mps", f"on needs trials that share a GPU (0 < gpus_per_trial < 1), "
                   f"got gpus_per_trial {res.gpus_per_trial:g}")

    info = _dataset_info(data, errors)
    if info is not None and data.subset is not None:  # counts alone (no labels read): see data.check_split
        from cifar_tune.engine.data import split_problem

        if problem := split_problem(data, data.subset, None, None, info.classes):
            key, _, message = problem.partition(": ")
            errors.add(key, message)
    space_raw = raw.get("space")
    if not isinstance(space_raw, Mapping):
        errors.add("space", f"must be a mapping with keys {', '.join(SPACE_KEYS)}, got {space_raw!r}")
        space_raw = {}
    if "model" in space_raw:  # trials run in other working directories: weight files become absolute
        from cifar_tune.engine.transfer import absolute_checkpoints

        space_raw = {**space_raw, "model": absolute_checkpoints(space_raw["model"])}  # like data.root: vs cwd
        from cifar_tune.engine.usermodels import absolute_factories

        # a user's model module next to the spec file is found from anywhere (vs the spec's directory)
        spec_dir = Path(source).parent if source != "<spec>" and Path(source).is_file() else Path.cwd()
        space_raw = {**space_raw, "model": absolute_factories(space_raw["model"], spec_dir)}
    space = {k: parse_tree(v, f"space.{k}", errors) for k, v in space_raw.items()}
    if not errors:
        check_space(space, info, search.algorithm, search.seed, errors)
    if not errors and sched.mutations:
        check_mutations(sched.mutations, space, info, errors)
    if not errors:
        _check_concurrency(search, space, errors)
    merged = {**SPACE_DEFAULTS, **space}
    full_space = {k: merged[k] for k in SPACE_KEYS if k in merged}  # always in the documented order
    spec = Spec(
        name=str(name), data=data, search=search, space=full_space,
        constraints=constraints, retrain=retrain, source=source, tracking=tracking,
    )
    if not errors and check_budget and constraints.max_params is not None and info is not None:
        _check_budget(spec, info, errors)
    errors.raise_if_any()
    return spec


def _objectives_metric(search: SearchSpec, raw: Mapping[str, Any], errors: ErrorList) -> SearchSpec:
    """With ``objectives``, ``metric``/``mode`` are their first validation metric: stated, they must agree."""
    first = next((o for o in search.objectives if not o.is_cost), None)
    if first is None:  # (reported by _parse_objectives)
        return search
    for key, want in (("metric", first.metric), ("mode", first.resolved_mode)):
        if key in raw and raw[key] is not None and raw[key] != want:
            errors.add(f"search.{key}", f"with search.objectives, {key} is the first validation objective's ({want}); "
                       f"got {raw[key]!r}: drop it or list its objective first")
    return replace(search, metric=first.metric, mode=first.resolved_mode)


def load_spec(path: str | Path, overrides: list[str] | None = None) -> Spec:
    raw = read_spec_file(path)
    if overrides:
        raw = apply_overrides(raw, overrides)
    return parse_spec(raw, str(path))
