"""Model family ``python``: a researcher's own factory, validated, counted, built and transferred."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from cifar_tune.cli import main
from cifar_tune.engine import usermodels
from cifar_tune.engine.models import MODELS, build_model, param_count
from cifar_tune.errors import SpecError
from cifar_tune.spec.parse import parse_spec
from cifar_tune.tuning.sources import make_sampler

MY_NETS = '''
from torch import nn


class CNN7(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, image_size: int, *, width: int = 8, dropout: float = 0.0,
                 blocks: int = 1) -> None:
        super().__init__()
        if blocks < 1:
            raise ValueError("blocks: must be >= 1")
        layers = [nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU()]
        for _ in range(blocks - 1):
            layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout))
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


def flat(num_classes, image_size, hidden=16, **extra):
    """Takes only some runtime arguments, and any keyword (**extra)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * image_size * image_size, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def not_a_model(num_classes):
    return "nope"


def wrong_shape(num_classes, in_channels, image_size):
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size * image_size, num_classes + 1))
'''


def _spec(tmp_path: Path, model: Any, **extra: Any) -> dict[str, Any]:
    return {"name": "mine", "data": {"dataset": "synthetic",
                                     "synthetic": {"num_train": 200, "num_test": 40, "num_classes": 4, "image_size": 16}},
            "search": {"num_samples": 2, "scheduler": {"name": "fifo", "max_epochs": 1}},
            "space": {"model": model, "train": {"batch_size": 32}}, **extra}


@pytest.fixture
def nets(tmp_path: Path) -> Path:
    (tmp_path / "my_nets.py").write_text(MY_NETS)
    return tmp_path


def _load(tmp_path: Path, raw: dict[str, Any]) -> Any:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    return parse_spec(yaml.safe_load(path.read_text()), str(path))


def test_the_family_is_in_the_model_registry() -> None:
    assert MODELS["python"] is usermodels.python_model
    with pytest.raises(ValueError, match="duplicate model family 'python'"):
        MODELS.register("python")(lambda: None)


def test_a_factory_next_to_the_spec_is_found_from_another_directory(nets: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    spec = _load(nets, _spec(nets, {"family": "python", "factory": "my_nets:CNN7", "width": {"choice": [4, 8]},
                                    "dropout": {"uniform": [0.0, 0.5]}}))
    assert spec.space["model"]["factory"] == f"{nets / 'my_nets.py'}:CNN7"
    sampler = make_sampler(spec)
    widths = set()
    for i in range(6):
        s = sampler.sample(i)
        w = s.config["model"]["width"]
        widths.add(w)
        model = build_model(s.config["model"], num_classes=4, in_channels=3, image_size=16)
        assert s.params == sum(p.numel() for p in model.parameters()) == 3 * w * 9 + w + w * 4 + 4
        assert 0 <= model.features[-1].p <= 0.5
        assert model(torch.zeros(2, 3, 16, 16)).shape == (2, 4)
    assert widths == {4, 8}


def test_factory_errors_are_collected_with_their_key_paths(nets: Path) -> None:
    model = {"choice": [
        {"family": "python", "factory": "my_nets:CNN8"},
        {"family": "python", "factory": "no_such_module_here:Net"},
        {"family": "python", "factory": "my_nets:CNN7", "widht": 4, "depth": 2},
        {"family": "python", "factory": "my_nets:CNN7", "width": {"uniform": [2.0, 8.0]}},
        {"family": "python", "factory": "my_nets:CNN7", "blocks": 0},
        {"family": "python", "factory": "my_nets:not_a_model"},
        {"family": "python", "factory": "my_nets:wrong_shape"},
        {"family": "python", "factory": "my_nets"},
    ]}
    with pytest.raises(SpecError) as e:
        _load(nets, _spec(nets, model))
    p = "space.model.choice"
    assert sorted(e.value.lines) == sorted([
        f"{p}[0].factory: {nets / 'my_nets.py'} has no 'CNN8' (did you mean 'CNN7'?)",
        f"{p}[1].factory: cannot import module 'no_such_module_here': ModuleNotFoundError: No module named 'no_such_module_here'",
        f"{p}[2].widht: not a hyperparameter of model family 'python' (did you mean 'width'?); accepted: factory, width, dropout, blocks, init, freeze, lr_mult",
        f"{p}[2].depth: not a hyperparameter of model family 'python' (did you mean 'width'?); accepted: factory, width, dropout, blocks, init, freeze, lr_mult",
        f"{p}[3].width.uniform: uniform produces numbers, but the value must be an integer",
        f"{p}[4].blocks: must be >= 1",
        f"{p}[5].factory: {nets / 'my_nets.py'}:not_a_model returned str, not a torch.nn.Module",
        f"{p}[6].family: the 'python' model returns (2, 5), expected (2, 4)",
        f"{p}[7].factory: must be 'module:attribute' (e.g. my_nets:CNN7), got 'my_nets'",
    ])


def test_a_module_that_fails_to_import_is_one_line(nets: Path) -> None:
    (nets / "broken_net.py").write_text("import torch\nraise RuntimeError('CUDA only')\n")
    with pytest.raises(SpecError) as e:
        _load(nets, _spec(nets, {"family": "python", "factory": "broken_net:Net"}))
    assert e.value.lines == [f"space.model.factory: cannot import {nets / 'broken_net.py'}: RuntimeError: CUDA only"]


def test_var_keyword_factories_and_partial_runtime_arguments(nets: Path) -> None:
    spec = _load(nets, _spec(nets, {"family": "python", "factory": "my_nets:flat", "hidden": {"choice": [8, 16]},
                                    "anything": 3}))
    s = make_sampler(spec).sample(0)
    h = s.config["model"]["hidden"]
    assert s.params == 3 * 16 * 16 * h + h + h * 4 + 4


def test_max_params_is_honoured(nets: Path) -> None:
    model = {"family": "python", "factory": "my_nets:CNN7", "width": {"choice": [4, 64]}}
    spec = _load(nets, _spec(nets, model, constraints={"max_params": 200}))  # width 4: 132, width 64: 2052
    assert {make_sampler(spec).sample(i).config["model"]["width"] for i in range(8)} == {4}
    with pytest.raises(SpecError, match="constraints.max_params: no model fits 100 parameters"):
        _load(nets, _spec(nets, model, constraints={"max_params": 100}))


def test_an_edited_module_is_loaded_again(nets: Path) -> None:
    cfg = {"family": "python", "factory": f"{nets / 'my_nets.py'}:CNN7", "width": 4}
    assert param_count(cfg, num_classes=4, in_channels=3, image_size=16) == 132
    (nets / "my_nets.py").write_text(MY_NETS.replace("self.head = nn.Linear(width, num_classes)",
                                                     "self.head = nn.Linear(width, num_classes, bias=False)"))
    import os

    st = (nets / "my_nets.py").stat()
    os.utime(nets / "my_nets.py", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert param_count(cfg, num_classes=4, in_channels=3, image_size=16) == 128


def test_the_module_is_imported_by_name_where_its_path_does_not_exist(nets: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cluster node without the driver's path: the module shipped with the job (py_modules) is on
    sys.path and found by its name."""
    monkeypatch.syspath_prepend(str(nets))
    monkeypatch.delitem(sys.modules, "my_nets", raising=False)  # another test may have imported the shipped example's
    cfg = {"family": "python", "factory": "/no/such/dir/my_nets.py:CNN7", "width": 4}
    assert param_count(cfg, num_classes=4, in_channels=3, image_size=16) == 132
    assert usermodels.factory_files({"choice": [cfg, {"family": "python", "factory": f"{nets / 'my_nets.py'}:CNN7"}]}) == \
        [str(nets / "my_nets.py")]


def test_connect_ships_the_model_files_to_a_joined_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    from cifar_tune.tuning import cluster as tuner

    seen: dict[str, Any] = {}

    class Stop(Exception):
        pass

    def fake_init(**kwargs: Any) -> None:
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(tuner.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(tuner.ray, "init", fake_init)
    monkeypatch.setattr(tuner, "check_reachable", lambda address: None)
    with pytest.raises(Stop):
        tuner.connect("10.0.0.1:6379", py_modules=["/x/my_nets.py"])
    assert seen["runtime_env"] == {"py_modules": ["/x/my_nets.py"]}


def test_model_info_and_train_with_a_user_model(nets: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (nets / "model.yaml").write_text("family: python\nfactory: my_nets:CNN7\nwidth: 4\n")
    assert main(["model-info", str(nets / "model.yaml"), "--num-classes", "4", "--image-size", "16"]) == 0
    assert re.search(r"trainable parameters +132\n", capsys.readouterr().out)
    (nets / "spec.yaml").write_text(yaml.safe_dump(_spec(nets, {"family": "python", "factory": "my_nets:CNN7", "width": 4})))
    assert main(["train", str(nets / "spec.yaml"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "status: completed after 1 epochs" in out and json.dumps(f"{nets / 'my_nets.py'}:CNN7") in out


def test_transfer_freezes_parts_of_a_user_model(nets: Path, tmp_path: Path) -> None:
    """init/freeze/lr_mult work on a user model's named parts: weights from a file, the features frozen."""
    from cifar_tune.engine.transfer import apply

    cfg = {"family": "python", "factory": f"{nets / 'my_nets.py'}:CNN7", "width": 4}
    donor = build_model(cfg, num_classes=4, in_channels=3, image_size=16)
    torch.save(donor.state_dict(), tmp_path / "donor.pt")
    spec = _load(nets, _spec(nets, {**cfg, "init": {"checkpoint": str(tmp_path / "donor.pt")}, "freeze": ["features"]}))
    model = build_model(spec.space["model"], num_classes=4, in_channels=3, image_size=16)
    apply(model, spec.space["model"], log=lambda line: None)
    torch.testing.assert_close(model.features[0].weight, donor.features[0].weight)
    assert not model.features[0].weight.requires_grad and model.head.weight.requires_grad


def test_the_shipped_example_validates_and_builds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cifar_tune.spec.parse import load_spec

    monkeypatch.chdir(tmp_path)
    example = Path(__file__).resolve().parents[2] / "search_spaces" / "examples" / "user_model.yaml"
    spec = load_spec(example)
    sampler = make_sampler(spec)
    factories = set()
    for i in range(6):
        s = sampler.sample(i)
        factories.add(s.config["model"]["factory"].rpartition(":")[2])
        model = build_model(s.config["model"], num_classes=10, in_channels=3, image_size=32)
        assert s.params == sum(p.numel() for p in model.parameters()) <= 200_000
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert factories == {"CNN7", "mlp_mixer_lite"}
