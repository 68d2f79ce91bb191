"""``cifar-tune schema``: a JSON Schema (draft 2020-12) of the search spec, for editors.

Generated from what validation itself reads: the spec's dataclasses (sections, keys, types, defaults,
literal choices), the registries (datasets, model families, optimizers, schedules, augmentations) and
their builders' signatures (hyperparameters, types, defaults), and the distributions of
``cifar_tune.spec.space``. VS Code's YAML extension then completes keys and flags unknown ones::

    # yaml-language-server: $schema=cifar-tune.schema.json

The schema checks shape only (keys, types, names); ranges, architectures that do not fit the input,
weights files and everything else that needs a build stay with ``cifar-tune validate``.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

DRAFT = "https://json-schema.org/draft/2020-12/schema"
DIST = {"$ref": "#/$defs/distribution"}


def _annotation_schema(ann: Any) -> dict[str, Any]:
    """A constant of this annotation (as the validator's ``type_problem`` accepts it)."""
    origin = get_origin(ann)
    if ann is Any or ann is inspect.Parameter.empty or ann is None:
        return {}
    if origin is Literal:
        return {"enum": list(get_args(ann))}
    if origin in (Union, types.UnionType):
        parts = [_annotation_schema(a) for a in get_args(ann)]
        return {} if any(p == {} for p in parts) else {"anyOf": parts}
    if ann is type(None):
        return {"type": "null"}
    if ann is bool:
        return {"type": "boolean"}
    if ann is int:
        return {"type": "integer"}
    if ann is float:
        return {"type": "number"}
    if ann is str:
        return {"type": "string"}
    if origin is list or ann is list:
        inner = (get_args(ann) or (Any,))[0]
        return {"type": "array", "items": _searchable(_annotation_schema(inner))}
    if origin is dict or ann is dict:
        return {"type": "object"}
    if dataclasses.is_dataclass(ann):
        return _dataclass_schema(ann, searchable=False)
    return {}


def _searchable(schema: dict[str, Any]) -> dict[str, Any]:
    """A value under ``space``: a constant or a distribution of them."""
    return {"anyOf": [schema, DIST]} if schema else {}


def _with_default(schema: dict[str, Any], default: Any) -> dict[str, Any]:
    if default is inspect.Parameter.empty or default is dataclasses.MISSING:
        return schema
    if isinstance(default, str | int | float | bool | type(None)) or (
            isinstance(default, list | dict) and len(repr(default)) < 200):
        return {**schema, "default": default}
    return schema


def _dataclass_schema(cls: type, *, searchable: bool) -> dict[str, Any]:
    hints = get_type_hints(cls)
    props: dict[str, Any] = {}
    required = []
    for f in dataclasses.fields(cls):
        ann = hints[f.name]
        schema = _annotation_schema(ann)
        if searchable:
            schema = _searchable(schema)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)  # type: ignore[misc]
        if dataclasses.is_dataclass(default):
            default = dataclasses.MISSING
        props[f.name] = _with_default(schema, default)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            required.append(f.name)
    out: dict[str, Any] = {"type": "object", "properties": props, "additionalProperties": False}
    if cls.__doc__ and not cls.__doc__.startswith(f"{cls.__name__}("):
        out["description"] = " ".join(cls.__doc__.split())
    if required:
        out["required"] = required
    return out


def _distribution_schema() -> dict[str, Any]:
    from cifar_tune.spec.space import DIST_ARITY

    options = []
    for kind, arity in DIST_ARITY.items():
        if arity is None:
            args: dict[str, Any] = {"type": "array", "minItems": 1}
        else:
            args = {"type": "array", "items": {"type": "number"}, "minItems": arity, "maxItems": arity}
        options.append({"type": "object", "properties": {kind: args}, "required": [kind], "additionalProperties": False})
    return {"description": "a searched value: {choice: [...]}, {uniform: [low, high]}, {loguniform: [low, high]}, ...",
            "oneOf": options}


def _builder_schema(registry: Any, name: str, key: str, extra: dict[str, Any], *, open_keys: bool = False) -> dict[str, Any]:
    hints = get_type_hints(registry[name])
    props: dict[str, Any] = {key: {"const": name}}
    for k, p in registry.hyperparameters(name).items():
        props[k] = _with_default(_searchable(_annotation_schema(hints.get(k, Any))), p.default)
    for k, ann in extra.items():
        props.setdefault(k, _searchable(_annotation_schema(ann)))
    doc = inspect.getdoc(registry[name])
    out: dict[str, Any] = {"type": "object", "properties": props, "required": [key],
                           "additionalProperties": open_keys}
    if doc:
        out["description"] = doc.split("\n\n")[0].replace("\n", " ")
    return out


def _section(defs: dict[str, Any], name: str, options: list[dict[str, Any]]) -> dict[str, Any]:
    """``name``: one of ``options``, or a choice/grid of them (a conditional space)."""
    defs[f"{name}_config"] = {"anyOf": options} if len(options) > 1 else options[0]
    ref = {"$ref": f"#/$defs/{name}_config"}
    nested = {"type": "array", "minItems": 1, "items": {"$ref": f"#/$defs/{name}"}}
    return {"anyOf": [ref, *({"type": "object", "properties": {k: nested}, "required": [k], "additionalProperties": False}
                             for k in ("choice", "grid"))]}


def spec_schema() -> dict[str, Any]:
    """The JSON Schema of a search spec file."""
    # the modules that fill the registries (not only the ones that define them)
    from cifar_tune.engine.augment import AUGMENTS
    from cifar_tune.engine.data import DATASETS
    from cifar_tune.engine.models import MODELS
    from cifar_tune.engine.optim import OPTIMIZERS, SCHEDULE_COMMON_KEYS, SCHEDULES
    from cifar_tune.engine.train import TrainOptions
    from cifar_tune.engine.transfer import TRANSFER_HINTS
    from cifar_tune.spec import fields as spec_fields
    from cifar_tune.spec import schema as spec_schema_mod

    defs: dict[str, Any] = {"distribution": _distribution_schema()}
    models = [_builder_schema(MODELS, n, "family", TRANSFER_HINTS, open_keys=n == "python") for n in sorted(MODELS)]
    defs["model"] = _section(defs, "model", models)
    defs["optimizer"] = _section(defs, "optimizer", [_builder_schema(OPTIMIZERS, n, "name", {}) for n in sorted(OPTIMIZERS)])
    defs["schedule"] = _section(defs, "schedule",
                                [_builder_schema(SCHEDULES, n, "name", SCHEDULE_COMMON_KEYS) for n in sorted(SCHEDULES)])
    augment_props = {}
    for n in sorted(AUGMENTS):
        settings = _builder_schema(AUGMENTS, n, "_", {})
        settings["properties"].pop("_")
        settings.pop("required")
        augment_props[n] = {"anyOf": [{"type": ["boolean", "null"]}, settings, {"$ref": "#/$defs/distribution"}]}
    defs["augment"] = _section(defs, "augment", [{"type": "object", "properties": augment_props, "additionalProperties": False}])
    defs["train"] = _section(defs, "train", [_dataclass_schema(TrainOptions, searchable=True)])

    data = _dataclass_schema(spec_schema_mod.DataSpec, searchable=False)
    data["properties"]["dataset"] = {"enum": sorted(DATASETS), "default": "cifar10"}
    sections = {
        "name": {"type": "string", "pattern": spec_fields.NAME_RE.pattern, "description": "experiment name (a directory)"},
        "data": data,
        "search": _dataclass_schema(spec_schema_mod.SearchSpec, searchable=False),
        "space": {"type": "object", "additionalProperties": False, "required": ["model"],
                  "properties": {k: {"$ref": f"#/$defs/{k}"} for k in spec_fields.SPACE_KEYS}},
        "constraints": _dataclass_schema(spec_schema_mod.ConstraintsSpec, searchable=False),
        "retrain": _dataclass_schema(spec_schema_mod.RetrainSpec, searchable=False),
        "tracking": _dataclass_schema(spec_schema_mod.TrackingSpec, searchable=False),
    }
    assert tuple(sections) == spec_fields.TOP_KEYS, "a top-level section of the spec is missing from the schema"
    return {
        "$schema": DRAFT,
        "$id": "https://cifar-tune/spec.schema.json",
        "title": "cifar-tune search spec",
        "type": "object",
        "properties": sections,
        "required": ["space"],
        "additionalProperties": False,
        "$defs": defs,
    }


def model_file_schema() -> dict[str, Any]:
    """A model YAML (``cifar-tune model-info``): one model config, no distributions needed."""
    full = spec_schema()
    return {"$schema": DRAFT, "$defs": full["$defs"], "$ref": "#/$defs/model_config"}
