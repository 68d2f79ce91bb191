"""The spec as an experiment directory stores it: the data, search, retrain and tracking sections that
retrain, report and the dashboard read back (the space is not needed: configs are stored)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import yaml

from cifar_tune.errors import ErrorList, UserError
from cifar_tune.spec.schema import DataSpec, RetrainSpec, SearchSpec, TrackingSpec

if TYPE_CHECKING:  # the spec layer reads an experiment but does not depend on the results layer
    from cifar_tune.results import Experiment
from cifar_tune.spec.fields import parse_dataclass

# ------------------------------------------------------------------------------------ stored spec


@dataclass(frozen=True)
class StoredSpec:
    """The parts of an experiment's resolved spec that retrain/report need."""

    name: str
    data: DataSpec
    search: SearchSpec
    retrain: RetrainSpec
    tracking: TrackingSpec = TrackingSpec()


def load_stored_spec(exp: Experiment) -> StoredSpec:
    """Parse ``spec.yaml``'s data/search/retrain sections (the space is not needed: configs are stored)."""
    raw = yaml.safe_load(exp.read_text("spec.yaml"))
    spec = raw.get("spec") if isinstance(raw, dict) else None
    if not isinstance(spec, dict):
        raise UserError(f"{exp.uri('spec.yaml')}: not a cifar-tune experiment spec (no 'spec' mapping)")
    errors = ErrorList()
    data = parse_dataclass(DataSpec, spec.get("data"), "data", errors)
    search = parse_dataclass(SearchSpec, spec.get("search"), "search", errors)
    retrain = parse_dataclass(RetrainSpec, spec.get("retrain"), "retrain", errors)
    tracking = parse_dataclass(TrackingSpec, spec.get("tracking"), "tracking", errors)
    if errors:
        raise UserError(f"{exp.uri('spec.yaml')}: {errors.items[0]}")
    return StoredSpec(name=str(spec.get("name", exp.name)), data=data, search=search, retrain=retrain, tracking=tracking)


def data_spec_from_dict(d: dict[str, Any], where: str) -> DataSpec:
    errors = ErrorList()
    spec = parse_dataclass(DataSpec, d, "data", errors)
    if errors:
        raise UserError(f"{where}: {errors.items[0]}")
    return spec
