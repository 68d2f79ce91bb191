"""The spec: every shipped file validates; every broken spec names its key path, exits 2."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from cifar_tune.cli import main
from cifar_tune.errors import SpecError, UserError
from cifar_tune.spec.parse import apply_overrides, load_yaml, parse_spec
from cifar_tune.spec.space import Dist

ROOT = Path(__file__).resolve().parents[2]
SPACES = sorted((ROOT / "search_spaces").glob("*.yaml"))

BASE: dict[str, Any] = {
    "name": "t",
    "data": {"dataset": "synthetic", "synthetic": {"num_train": 200, "num_test": 50, "num_classes": 4, "image_size": 16}},
    "search": {"num_samples": 2, "scheduler": {"name": "asha", "max_epochs": 2}},
    "space": {
        "model": {"family": "mlp", "hidden": [16]},
        "optimizer": {"choice": [
            {"name": "sgd", "lr": {"loguniform": [1e-3, 1e-1]}, "momentum": 0.9},
            {"name": "adam", "lr": 1e-3},
            {"name": "adagrad", "lr": {"loguniform": [1e-3, 1e-1]}},
        ]},
        "augment": {"hflip": True},
        "train": {"batch_size": 32},
    },
}


def test_base_spec_is_valid() -> None:
    spec = parse_spec(copy.deepcopy(BASE))
    assert spec.name == "t"
    assert isinstance(spec.space["optimizer"], Dist)


@pytest.mark.parametrize("path", SPACES, ids=[p.name for p in SPACES])
def test_shipped_spaces_validate(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if path.name == "seed001_transfer_stl10.yaml":  # needs step 1's checkpoint: that is its only error
        assert main(["validate", str(path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "space.model.init.checkpoint: no such file: " in err[0], err
        return
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "valid spec" in out


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(d: dict[str, Any]) -> None:
        node = d
        keys = path.split("/")
        for k in keys[:-1]:
            node = node[int(k)] if isinstance(node, list) else node.setdefault(k, {})
        if isinstance(node, list):
            node[int(keys[-1])] = value
        else:
            node[keys[-1]] = value

    return mutate


def _del(path: str) -> Callable[[dict[str, Any]], None]:
    def mutate(d: dict[str, Any]) -> None:
        node = d
        keys = path.split("/")
        for k in keys[:-1]:
            node = node[k]
        del node[keys[-1]]

    return mutate


OPT1 = "space/optimizer/choice/1"
SGD_ONLY = {"name": "sgd", "lr": 0.1, "momentum": 0.9}


def _pbt(mutations: Any, space_optimizer: Any = None, **sched: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(d: dict[str, Any]) -> None:
        d["search"]["scheduler"] = {"name": "pbt", "max_epochs": 4, **sched, **({"mutations": mutations} if mutations else {})}
        if space_optimizer is not None:
            d["space"]["optimizer"] = space_optimizer

    return mutate


PBT_BROKEN: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("pbt-without-mutations", _pbt(None), "search.scheduler.mutations: pbt needs the keys it may change"),
    ("mutation-key-missing-in-an-option", _pbt({"optimizer": {"momentum": {"uniform": [0.5, 0.9]}}}),
     "search.scheduler.mutations.optimizer.momentum: the sampled config has no optimizer.momentum in space.optimizer.choice[1]"),
    ("mutation-of-the-model", _pbt({"model": {"hidden": {"choice": [[8], [16]]}}}),
     "search.scheduler.mutations.model.hidden: the model cannot change during a trial"),
    ("mutation-of-batch-size", _pbt({"train": {"batch_size": {"choice": [16, 32]}}}),
     "search.scheduler.mutations.train.batch_size: train.batch_size cannot change during a trial"),
    ("mutation-of-a-name", _pbt({"optimizer": {"name": {"choice": ["sgd", "adam"]}}}, SGD_ONLY),
     "search.scheduler.mutations.optimizer.name: must name one hyperparameter"),
    ("mutation-range-invalid", _pbt({"optimizer": {"momentum": {"uniform": [0.5, 1.5]}}}, SGD_ONLY),
     "search.scheduler.mutations.optimizer.momentum: a value it can produce is invalid in space.optimizer: momentum: must be in [0, 1)"),
    ("mutation-type", _pbt({"optimizer": {"nesterov": {"uniform": [0, 1]}}}, {**SGD_ONLY, "nesterov": True}),
     "search.scheduler.mutations.optimizer.nesterov.uniform: uniform produces numbers, but the value must be true or false"),
    ("mutation-constant", _pbt({"optimizer": {"lr": 0.1}}, SGD_ONLY),
     "search.scheduler.mutations.optimizer.lr: must be a distribution"),
    ("mutation-augment-missing", _pbt({"augment": {"crop": {"padding": {"randint": [0, 4]}}}}, SGD_ONLY),
     "search.scheduler.mutations.augment.crop.padding: the sampled config has no augment.crop.padding in space.augment"),
    ("mutations-without-pbt", _set("search/scheduler", {"name": "asha", "mutations": {"optimizer": {"lr": {"uniform": [0.1, 0.2]}}}}),
     "search.scheduler.mutations: only used by scheduler 'pbt', not 'asha'"),
    ("pbt-interval-not-a-multiple", _pbt({"optimizer": {"lr": {"loguniform": [1e-3, 0.1]}}}, SGD_ONLY, perturbation_interval=3),
     "search.checkpoint.every_epochs: pbt copies checkpoints every perturbation_interval (3) epochs: must divide it, got 2"),
    ("pbt-with-optuna", _pbt({"optimizer": {"lr": {"loguniform": [1e-3, 0.1]}}}, SGD_ONLY),
     "search.algorithm: pbt evolves its own population"),
    ("hyperband-needs-every-epoch", _set("search/scheduler", {"name": "hyperband", "max_epochs": 4}),
     "search.checkpoint.every_epochs: hyperband pauses trials at any epoch and continues them from a checkpoint: must be 1, got 2"),
    ("checkpoint-keep-zero", _set("search/checkpoint", {"keep": 0}), "search.checkpoint.keep: must be >= 1, got 0"),
]
BROKEN: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("log-low-zero", _set("space/optimizer/choice/0/lr", {"loguniform": [0, 0.1]}),
     "space.optimizer.choice[0].lr.loguniform: low must be > 0, got 0"),
    ("range-unordered", _set("space/optimizer/choice/0/momentum", {"uniform": [0.9, 0.1]}),
     "space.optimizer.choice[0].momentum.uniform: low must be < high, got low=0.9, high=0.1"),
    ("q-zero", _set("space/train/batch_size", {"quniform": [16, 64, 0]}),
     "space.train.batch_size.quniform: q must be > 0, got 0"),
    ("qlog-low", _set("space/optimizer/choice/0/lr", {"qloguniform": [-1, 1, 0.1]}),
     "space.optimizer.choice[0].lr.qloguniform: low must be > 0, got -1"),
    ("empty-choice", _set("space/optimizer", {"choice": []}),
     "space.optimizer.choice: must have at least one option, got []"),
    ("choice-not-list", _set("space/optimizer", {"choice": "sgd"}),
     "space.optimizer.choice: must be a non-empty list of options, got 'sgd'"),
    ("dist-arity", _set("space/optimizer/choice/0/lr", {"uniform": [0.1]}),
     "space.optimizer.choice[0].lr.uniform: must be [low, high], got 1 values"),
    ("dist-non-number", _set("space/optimizer/choice/0/lr", {"uniform": ["a", 1]}),
     "space.optimizer.choice[0].lr.uniform: values must be numbers, got 'a' at [0]"),
    ("randint-float", _set("space/train/batch_size", {"randint": [16.5, 64]}),
     "space.train.batch_size.randint: low and high must be integers, got [16.5, 64]"),
    ("normal-sd", _set("space/optimizer/choice/0/momentum", {"normal": [0.5, 0]}),
     "space.optimizer.choice[0].momentum.normal: sd must be > 0, got 0"),
    ("unknown-top", _set("serach", {}), "serach: unknown top-level key (did you mean 'search'?); allowed: name, data, search, space, constraints, retrain"),
    ("unknown-search-key", _set("search/num_sample", 3),
     "search.num_sample: unknown key (did you mean 'num_samples'?); allowed: metric, mode, num_samples, max_concurrent, algorithm, seed, max_failures, scheduler, resources"),
    ("unknown-space-key", _set("space/optimiser", {}),
     "space.optimiser: unknown key (did you mean 'optimizer'?); allowed: model, optimizer, schedule, augment, train"),
    ("wrong-type", _set("search/num_samples", "many"), "search.num_samples: must be an integer, got 'many'"),
    ("nonpositive", _set("search/num_samples", 0), "search.num_samples: must be >= 1, got 0"),
    ("bad-literal", _set("search/scheduler/name", "bohb"),
     "search.scheduler.name: must be one of 'asha' | 'mo_asha' | 'fifo' | 'median' | 'hyperband' | 'pbt', got 'bohb'"),
    ("grace>max", _set("search/scheduler/grace_period", 5), "search.scheduler.grace_period: must be <= max_epochs (2), got 5"),
    ("val-fraction", _set("data/val_fraction", 1.5), "data.val_fraction: must be in (0, 1), got 1.5"),
    ("unknown-dataset", _set("data/dataset", "cifar1000"),
     "data.dataset: unknown dataset 'cifar1000' (did you mean 'cifar100'?); available: cifar10, cifar100, imagefolder, npz, stl10, synthetic"),
    ("unknown-optimizer", _set(f"{OPT1}/name", "adamm"),
     "space.optimizer.choice[1].name: unknown optimizer 'adamm' (did you mean 'adam'?); available: adagrad, adam, adamw, rmsprop, sgd"),
    ("foreign-hparam", _set(f"{OPT1}/momentum", 0.9),
     "space.optimizer.choice[1].momentum: not a hyperparameter of optimizer 'adam'; accepted: lr, beta1, beta2, eps, weight_decay, amsgrad"),
    ("hparam-typo", _set("space/optimizer/choice/2/lr_decy", 0.1),
     "space.optimizer.choice[2].lr_decy: not a hyperparameter of optimizer 'adagrad' (did you mean 'lr_decay'?); accepted: lr, lr_decay, initial_accumulator_value, eps, weight_decay"),
    ("hparam-type", _set(f"{OPT1}/amsgrad", "yes"), "space.optimizer.choice[1].amsgrad: must be true or false, got 'yes'"),
    ("dist-for-bool", _set(f"{OPT1}/amsgrad", {"uniform": [0, 1]}),
     "space.optimizer.choice[1].amsgrad.uniform: uniform produces numbers, but the value must be true or false"),
    ("unknown-family", _set("space/model", {"family": "vit"}),
     "space.model.family: unknown model family 'vit'; available: lenet, mlp, python, resnet, torchvision, vgg"),
    ("missing-family", _set("space/model", {"hidden": [8]}),
     "space.model: missing 'family' (one of lenet, mlp, python, resnet, torchvision, vgg)"),
    ("family-dist", _set("space/model", {"family": {"choice": ["mlp", "lenet"]}}),
     "space.model.family: must be a constant; to choose among model familys use a choice of mappings, each with its own 'family'"),
    ("missing-model", _del("space/model"), "space: missing 'model' (a mapping with 'family', or a choice of them)"),
    ("unknown-augment", _set("space/augment/hflp", True),
     "space.augment.hflp: unknown augmentation 'hflp' (did you mean 'hflip'?)"),
    ("augment-value", _set("space/augment/randaugment", {"magnitude": 40}),  # anchored at the augmentation
     "space.augment.randaugment.magnitude: must be < num_magnitude_bins (31), got 40"),
    ("unknown-schedule", _set("space/schedule", {"name": "cosin"}),
     "space.schedule.name: unknown lr schedule 'cosin' (did you mean 'cosine'?)"),
    ("train-key", _set("space/train/batchsize", 3), "space.train.batchsize: unknown key (did you mean 'batch_size'?)"),
    ("train-limit", _set("space/train/label_smoothing", 1.5), "space.train.label_smoothing: must be in [0, 1), got 1.5"),
    ("bad-name", _set("name", "../escape"), "name: must be 1-100 characters"),
    ("dist-outside-space", _set("search/num_samples", {"choice": [1, 2]}), "search.num_samples: distributions are only allowed under 'space'"),
    ("grid-continuous", _set("search/algorithm", "grid"),
     "space.optimizer.choice[0].lr.loguniform: search.algorithm 'grid' can only enumerate choice/grid values"),
    ("impossible-arch", _set("space/model", {"family": "vgg", "blocks": [{"channels": [4]}] * 5, "head": [8]}),
     "space.model.blocks"),
    ("budget", _set("constraints", {"max_params": 10}), "constraints.max_params: no model fits 10 parameters (smallest of 200 samples: "),
    ("nesterov-needs-momentum", _set("space/optimizer/choice/0", {"name": "sgd", "lr": 0.1, "nesterov": True}),
     "space.optimizer.choice[0]"),
]


def _and(*mutations: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    def mutate(d: dict[str, Any]) -> None:
        for m in mutations:
            m(d)

    return mutate


# (the every_epochs cases set every_epochs 2; the optuna case sets the algorithm)
PBT_BROKEN = [
    (c, _and(m, _set("search/checkpoint", {"every_epochs": 2})) if "every_epochs" in e else
     _and(m, _set("search/algorithm", "optuna")) if "optuna" in c else m, e)
    for c, m, e in PBT_BROKEN
]
BROKEN += PBT_BROKEN
_SYNCH_PBT = _pbt({"optimizer": {"lr": {"loguniform": [1e-3, 0.1]}}}, SGD_ONLY, synch=True)
BROKEN += [
    ("hyperband-with-max-concurrent", _and(_set("search/scheduler", {"name": "hyperband", "max_epochs": 4}),
                                           _set("search/max_concurrent", 8)),
     "search.max_concurrent: hyperband pauses each trial at a milestone until the rest of its bracket gets there"),
    ("synch-pbt-with-fewer-slots-than-trials", _and(_SYNCH_PBT, _set("search/max_concurrent", 1)),
     "search.max_concurrent: synchronous pbt pauses every trial at each interval until all 2 have reached it, "
     "and a paused trial keeps its slot: must be at least 2 (or unset), got 1"),
]


@pytest.mark.parametrize("scheduler,synch,max_concurrent,expected", [
    ("hyperband", False, None, None),  # the resources alone: a paused trial would hold a slot
    ("pbt", True, None, None), ("pbt", True, 2, 2), ("pbt", False, 1, 1),  # async pbt does not wait: any limit works
    ("asha", False, None, 3), ("asha", False, 1, 1), ("median", False, None, 3), ("fifo", False, 5, 5),
])
def test_concurrency_limits_that_validation_accepts_run(scheduler: str, synch: bool, max_concurrent: int | None,
                                                        expected: int | None) -> None:
    """What search passes to Ray Tune as max_concurrent_trials (3 slots in the cluster), for specs that validate."""
    from cifar_tune.tuning.driver import tune_concurrency

    raw = copy.deepcopy(BASE)
    if scheduler == "pbt":
        _pbt({"optimizer": {"lr": {"loguniform": [1e-3, 0.1]}}}, SGD_ONLY, synch=synch)(raw)
    else:
        raw["search"]["scheduler"] = {"name": scheduler, "max_epochs": 4}
    if max_concurrent is not None:
        raw["search"]["max_concurrent"] = max_concurrent
    assert tune_concurrency(parse_spec(raw), slots=3) == expected


@pytest.mark.parametrize("case,mutate,expected", BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_spec(case: str, mutate: Callable[[dict[str, Any]], None], expected: str, tmp_path: Path,
                     capsys: pytest.CaptureFixture[str]) -> None:
    raw = copy.deepcopy(BASE)
    mutate(raw)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    code = main(["validate", str(path)])
    captured = capsys.readouterr()
    assert code == 2
    lines = [ln.removeprefix("error: ") for ln in captured.err.splitlines()]
    assert any(ln.startswith(expected) for ln in lines), lines
    assert "Traceback" not in captured.err
    assert captured.out == ""


def test_all_errors_reported_at_once() -> None:
    raw = copy.deepcopy(BASE)
    raw["search"]["num_samples"] = 0
    raw["data"]["val_fraction"] = 2
    raw["space"]["optimizer"]["choice"][0]["lr"] = {"loguniform": [0, 1]}
    with pytest.raises(SpecError) as e:
        parse_spec(raw)
    assert len(e.value.lines) == 3


def test_scientific_notation_without_dot_is_a_number() -> None:
    doc = load_yaml("lr: 1e-4\nwd: 5E-4\nname: 1e3x\n")
    assert doc == {"lr": 1e-4, "wd": 5e-4, "name": "1e3x"}


def test_unsafe_yaml_tag_rejected_with_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "evil.yaml"
    path.write_text("name: x\nspace: !!python/object/apply:os.system ['echo pwned']\n")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:2:" in err and "unsafe or unknown YAML tag" in err


def test_yaml_syntax_error_names_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nsearch:\n  num_samples: [1, 2\n")
    assert main(["validate", str(path)]) == 2
    assert f"{path}:" in capsys.readouterr().err


def test_overrides() -> None:
    raw = apply_overrides(BASE, ["search.num_samples=7", "space.optimizer.choice[1].lr=1e-2", "data.subset=100"])
    assert raw["search"]["num_samples"] == 7
    assert raw["space"]["optimizer"]["choice"][1]["lr"] == 1e-2
    assert BASE["search"]["num_samples"] == 2  # the input is not modified
    with pytest.raises(UserError, match="expected key.path=value"):
        apply_overrides(BASE, ["search.num_samples"])
    with pytest.raises(UserError, match="has no item"):
        apply_overrides(BASE, ["space.optimizer.choice[9].lr=1"])


def test_bad_override_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(ROOT / "search_spaces/smoke.yaml"), "--set", "search.num_samples=-1"]) == 2
    assert "search.num_samples: must be >= 1, got -1" in capsys.readouterr().err


def test_seed000_expresses_the_report_exactly() -> None:
    from cifar_tune.spec.parse import load_spec

    spec = load_spec(ROOT / "search_spaces/seed000_cifar100_asha.yaml")
    opts = {o["name"]: o for o in spec.space["optimizer"].options}
    assert set(opts) == {"adam", "rmsprop", "adagrad", "sgd"}
    assert opts["sgd"]["lr"] == Dist("loguniform", (1e-5, 0.1))
    assert opts["sgd"]["momentum"] == Dist("uniform", (0.0, 0.4))
    assert opts["sgd"]["dampening"] == Dist("uniform", (0.0, 0.4))
    assert opts["adagrad"]["lr"] == Dist("loguniform", (1e-3, 1e-1))
    assert opts["rmsprop"]["momentum"] == Dist("uniform", (0.0, 0.5))
    assert opts["adam"]["beta2"] == Dist("uniform", (0.8, 0.99999999))
    assert len(spec.space["model"].options) == 8
    assert spec.data.val_fraction == 0.2 and spec.data.dataset == "cifar100"
    s = spec.search
    assert (s.num_samples, s.max_concurrent, s.scheduler.max_epochs, s.scheduler.reduction_factor) == (60, 16, 30, 2)
    assert (spec.retrain.top, spec.retrain.epochs) == (3, 100)
