"""``cifar-tune schema``: the JSON Schema accepts every shipped spec and rejects what validation rejects."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from cifar_tune.cli import main
from cifar_tune.spec.json_schema import model_file_schema, spec_schema
from cifar_tune.spec.parse import load_yaml, parse_spec

SPACES = Path(__file__).resolve().parents[2] / "search_spaces"
SHIPPED = sorted(p for p in SPACES.rglob("*.yaml") if "models" not in p.parts)
MODELS = sorted((SPACES / "models").glob("*.yaml"))


@pytest.fixture(scope="module")
def validator() -> Draft202012Validator:
    schema = spec_schema()
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def _errors(validator: Draft202012Validator, doc: Any) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def test_the_cli_prints_the_schema(capsys: pytest.CaptureFixture[str]) -> None:
    # a fresh process: the registries are filled by the schema's own imports, not by earlier tests
    fresh = subprocess.run([sys.executable, "-m", "cifar_tune", "schema"], capture_output=True, text=True, check=True)
    assert json.loads(fresh.stdout) == spec_schema()
    assert main(["schema"]) == 0
    assert json.loads(capsys.readouterr().out) == spec_schema()
    assert main(["schema", "--model-file"]) == 0
    assert json.loads(capsys.readouterr().out)["$ref"] == "#/$defs/model_config"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(SPACES)))
def test_every_shipped_spec_validates(path: Path, validator: Draft202012Validator) -> None:
    assert _errors(validator, load_yaml(path.read_text(), str(path))) == []


@pytest.mark.parametrize("path", MODELS, ids=lambda p: p.name)
def test_every_shipped_model_file_validates(path: Path) -> None:
    assert list(Draft202012Validator(model_file_schema()).iter_errors(load_yaml(path.read_text()))) == []


def _smoke() -> dict[str, Any]:
    return load_yaml((SPACES / "smoke.yaml").read_text())


@pytest.mark.parametrize("mutate,where", [
    (lambda d: d["search"].update(num_smaples=3), "search: Additional properties are not allowed ('num_smaples'"),
    (lambda d: d.update(serach={}), ": Additional properties are not allowed ('serach'"),
    (lambda d: d["space"]["optimizer"]["choice"][0].update(name="sgdd"), "space.optimizer: "),
    (lambda d: d["space"].update(optimizer={"name": "lion", "lr": 0.1}), "space.optimizer: "),
    (lambda d: d["space"]["optimizer"]["choice"][1].update(momentum=0.9), "space.optimizer: "),  # adam has none
    (lambda d: d["space"].update(schedule={"name": "cosine", "warmup": 0.1}), "space.schedule: "),
    (lambda d: d["space"]["augment"].update(hflipp=True), "space.augment: "),
    (lambda d: d["space"]["train"].update(batch_size="big"), "space.train: "),
    (lambda d: d["space"]["train"].update(batch_size={"log_uniform": [16, 64]}), "space.train: "),
    (lambda d: d["data"].update(dataset="cifar11"), "data.dataset: 'cifar11' is not one of"),
    (lambda d: d["search"]["scheduler"].update(name="ashaa"), "search.scheduler.name: 'ashaa' is not one of"),
    (lambda d: d["space"]["model"]["choice"][0].update(family="lenett"), "space.model: "),
    (lambda d: d["space"]["model"]["choice"][0].update(chanels=[4, 8]), "space.model: "),
])
def test_what_validation_rejects_the_schema_flags(mutate: Any, where: str, validator: Draft202012Validator) -> None:
    doc = _smoke()
    mutate(doc)
    errors = _errors(validator, doc)
    assert errors and errors[0].startswith(where), errors
    with pytest.raises(Exception):  # noqa: B017, PT011 - and the validator itself refuses it too
        parse_spec(copy.deepcopy(doc), "smoke.yaml")


def test_distributions_and_conditional_sections(validator: Draft202012Validator) -> None:
    doc = _smoke()
    doc["space"]["train"] = {"batch_size": {"choice": [32, 64]}, "label_smoothing": {"uniform": [0.0, 0.2]}}
    doc["space"]["model"] = {"family": "python", "factory": "my_nets:CNN7", "width": {"choice": [8, 16]}}
    assert _errors(validator, doc) == []
    doc["space"]["train"]["label_smoothing"] = {"uniform": [0.0]}  # [low, high]
    assert _errors(validator, doc)
