"""``search.objectives``: parsed into frozen ObjectiveSpecs, every problem reported with its key path."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from cifar_tune.errors import SpecError
from cifar_tune.spec.parse import parse_spec, read_spec_file
from cifar_tune.spec.schema import ObjectiveSpec


def _spec(search: dict[str, Any]) -> Any:
    raw = read_spec_file("search_spaces/smoke.yaml")
    base = {k: v for k, v in raw.get("search", {}).items() if k not in ("metric", "mode")}
    return parse_spec({**raw, "search": {**base, **search}}, "smoke.yaml")


def _errors(search: dict[str, Any]) -> list[str]:
    with pytest.raises(SpecError) as e:
        _spec(search)
    return str(e.value).splitlines()


def test_no_objectives_is_the_one_metric() -> None:
    s = _spec({"metric": "val_loss"}).search
    assert s.objectives == () and s.resolved_objectives == (ObjectiveSpec("val_loss", "min"),)
    assert [o.resolved_mode for o in s.resolved_objectives] == ["min"] and s.costs == ()


def test_objectives_parse_with_default_modes_and_set_the_metric() -> None:
    s = _spec({"objectives": ["val_top5", {"metric": "params"}, {"metric": "latency_ms", "ref": 50}]}).search
    assert [(o.metric, o.resolved_mode) for o in s.objectives] == [("val_top5", "max"), ("params", "min"), ("latency_ms", "min")]
    assert s.objectives[2].ref == 50.0 and s.costs == ("params", "latency_ms")
    assert (s.metric, s.resolved_mode) == ("val_top5", "max")  # what single-objective parts use
    with pytest.raises(AttributeError):  # frozen
        s.objectives[0].metric = "val_acc"  # type: ignore[misc]


def test_the_resolved_spec_round_trips_through_yaml() -> None:
    spec = _spec({"objectives": [{"metric": "val_acc"}, {"metric": "macs"}], "scheduler": {"name": "mo_asha", "max_epochs": 2}})
    again = parse_spec(yaml.safe_load(yaml.safe_dump(spec.to_dict())), "again.yaml")
    assert again.search == spec.search


def test_every_problem_with_its_key_path_and_did_you_mean() -> None:
    errs = _errors({"objectives": [{"metric": "val_ac"}, {"metric": "parms"}, {"metric": "params", "mode": "up"},
                                   {"metrc": "macs"}]})
    assert any(e.startswith("search.objectives[0].metric:") and "did you mean 'val_acc'" in e for e in errs)
    assert any(e.startswith("search.objectives[1].metric:") and "did you mean 'params'" in e for e in errs)
    assert any(e.startswith("search.objectives[2].mode:") for e in errs)
    assert any(e.startswith("search.objectives[3]:") and "missing 'metric'" in e for e in errs)


@pytest.mark.parametrize(("search", "where", "says"), [
    ({"objectives": [{"metric": "params"}, {"metric": "macs"}]}, "search.objectives:", "needs a validation metric"),
    ({"objectives": ["val_acc", "val_acc"]}, "search.objectives[1].metric:", "listed twice"),
    ({"objectives": []}, "search.objectives:", "non-empty list"),
    ({"objectives": [{"metric": "val_loss"}, {"metric": "params"}], "metric": "val_acc"}, "search.metric:", "first validation objective"),
    ({"objectives": [{"metric": "val_acc", "mode": "min"}], "mode": "max"}, "search.mode:", "first validation objective"),
    ({"objectives": [{"metric": "val_acc", "weight": 2}]}, "search.objectives[0].weight:", "unknown key"),
])
def test_refused(search: dict[str, Any], where: str, says: str) -> None:
    errs = _errors(search)
    assert any(e.startswith(where) and says in e for e in errs), errs


def test_mo_asha_is_a_scheduler() -> None:
    assert _spec({"scheduler": {"name": "mo_asha", "max_epochs": 2}}).search.scheduler.name == "mo_asha"


def test_one_listed_objective_is_the_single_objective_search() -> None:
    s = _spec({"objectives": [{"metric": "val_loss"}]}).search
    assert (s.metric, s.resolved_mode) == ("val_loss", "min") and s.pareto_objectives == () and s.costs == ()
    assert len(_spec({"objectives": ["val_acc", "params"]}).search.pareto_objectives) == 2
