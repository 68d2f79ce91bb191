"""Searched parameters of a trial, read off the space and its config (names per branch, list elements)."""

from __future__ import annotations

import pytest

from cifar_tune.spec.parse import parse_spec
from cifar_tune.spec.searched import branch_of, searched_params
from cifar_tune.tuning.sources import make_sampler
from tests.conftest import WATCHED_SPEC


def test_params_follow_the_branch_each_config_took() -> None:
    spec = parse_spec(WATCHED_SPEC)
    sampler = make_sampler(spec)
    seen = set()
    for i in range(40):
        cfg = sampler.sample(i).config
        params = {p.name: p for p in searched_params(spec.space, cfg)}
        fam, opt = cfg["model"]["family"], cfg["optimizer"]["name"]
        expected = {"model", "optimizer", f"optimizer[{opt}].lr",
                    "model[lenet].channels[0]" if fam == "lenet" else "model[mlp].hidden[0]"}
        assert set(params) == expected
        assert params["model"].value == fam and params["model"].choices == ("lenet", "mlp")
        lr = params[f"optimizer[{opt}].lr"]
        assert lr.value == cfg["optimizer"]["lr"] and lr.log and lr.kind == "float"
        assert (lr.low, lr.high) == ((1e-2, 2e-1) if opt == "sgd" else (1e-3, 1e-2))
        element = params.get("model[lenet].channels[0]") or params["model[mlp].hidden[0]"]
        assert element.value == (cfg["model"].get("channels") or cfg["model"]["hidden"])[0]  # a list element
        for p in params.values():  # every value lies in its Optuna distribution
            dist = p.distribution()
            assert dist._contains(dist.to_internal_repr(p.value))
        seen.add((fam, opt))
    assert len(seen) == 4  # every branch combination was checked


def test_integer_and_quantized_draws_become_int_distributions() -> None:
    spec = parse_spec({**WATCHED_SPEC, "space": {**WATCHED_SPEC["space"], "train": {
        "batch_size": {"qloguniform": [16, 64, 16]}, "grad_clip_norm": {"normal": [1.0, 0.1]}}}})
    sampler = make_sampler(spec)
    for i in range(20):
        cfg = sampler.sample(i).config
        params = {p.name: p for p in searched_params(spec.space, cfg)}
        bs, clip = params["train.batch_size"], params["train.grad_clip_norm"]
        assert bs.kind == "int" and bs.value == cfg["train"]["batch_size"] and bs.low <= bs.value <= bs.high
        assert clip.kind == "float" and clip.low <= clip.value <= clip.high


@pytest.mark.parametrize(("name", "branch"), [
    ("optimizer[sgd].lr", ("optimizer", "sgd")), ("model[lenet].channels[0]", ("model", "lenet")),
    ("train.blocks[0]", None), ("optimizer", None),
])
def test_branch_of(name: str, branch: tuple[str, str] | None) -> None:
    assert branch_of(name) == branch
