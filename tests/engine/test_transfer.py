"""cifar_tune.engine.transfer: init from a cifar-tune checkpoint or a torchvision weights file, shape misfits
re-initialised and logged, freeze and per-part lr multipliers, and the validation before any trial."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from cifar_tune.engine import transfer
from cifar_tune.engine.models import build_model
from cifar_tune.engine.train import fit
from cifar_tune.errors import SpecError
from cifar_tune.spec.parse import parse_spec

# seed 001's ConvNet shape: conv blocks, Keras-style flatten, a dense layer, then the classes
CONVNET = {"family": "vgg", "blocks": [{"channels": [8]}, {"channels": [16]}], "head": [32], "global_pool": "none"}
SMALL_RESNET = {"family": "resnet", "widths": [8, 16], "blocks": [1, 1]}


def _checkpoint(path: Path, cfg: dict[str, Any], num_classes: int, image_size: int) -> dict[str, torch.Tensor]:
    """A file in retrain's checkpoint format (only the keys transfer reads matter, but all are written)."""
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=num_classes, image_size=image_size)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save({"format": "cifar-tune-checkpoint/1", "state_dict": state, "config": {"model": cfg},
                "num_classes": num_classes, "in_channels": 3, "image_size": image_size, "classes": ["a"] * num_classes},
               path)
    return state


def test_convnet_from_32px_100_classes_to_96px_5_classes(tmp_path: Path) -> None:
    """Seed 001's fine-tune: the flatten head's first dense layer grows with the image (16*8*8 -> 16*24*24
    inputs) and the output layer gets 5 classes; both are re-initialised and logged, the rest loaded."""
    ckpt = tmp_path / "cifar100.pt"
    saved = _checkpoint(ckpt, CONVNET, num_classes=100, image_size=32)
    cfg = {**CONVNET, "init": {"checkpoint": str(ckpt)}}
    torch.manual_seed(1)
    model = build_model(cfg, num_classes=5, image_size=96)
    fresh = copy.deepcopy(model.state_dict())
    lines: list[str] = []
    transfer.apply(model, cfg, log=lines.append)
    state = model.state_dict()
    reinit = {"classifier.0.weight", "classifier.2.weight", "classifier.2.bias"}
    assert any("re-initialised classifier.0.weight: model [32, 9216] vs file [32, 1024]" in line for line in lines)
    assert any("re-initialised classifier.2.weight: model [5, 32] vs file [100, 32]" in line for line in lines)
    assert lines[0].startswith(f"init: {len(state) - 3} of {len(state)} tensors loaded from {ckpt}")
    for k in state:
        if k in reinit:
            assert torch.equal(state[k], fresh[k]), k  # keeps its fresh initialisation
        else:
            assert torch.equal(state[k], saved[k]), k
    assert not torch.equal(state["features.0.weight"], fresh["features.0.weight"])


def test_torchvision_weights_file_with_cifar_stem(tmp_path: Path) -> None:
    """A torchvision resnet18 state dict (the format of its downloadable weights) into the CIFAR-stem
    resnet18 of seed 002: the 7x7 stem conv and the 1000-class fc do not fit, everything else loads."""
    import torchvision

    torch.manual_seed(0)
    weights = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(weights, path)
    cfg = {"family": "torchvision", "name": "resnet18", "small_input": True, "init": {"checkpoint": str(path)}}
    model = build_model(cfg, num_classes=100)
    lines: list[str] = []
    transfer.apply(model, cfg, log=lines.append)
    state = model.state_dict()
    misfit = {k for line in lines if "re-initialised" in line for k in [line.split("re-initialised ")[1].split(":")[0]]}
    assert misfit == {"conv1.weight", "fc.weight", "fc.bias"}
    assert all(torch.equal(state[k], weights[k]) for k in state if k not in misfit)


def test_freeze_and_lr_mult_in_training(tmp_path: Path) -> None:
    cfg = {**SMALL_RESNET, "freeze": ["stem", "layer1"], "lr_mult": {"head": 10.0}}
    torch.manual_seed(0)
    model = transfer.apply(build_model(cfg, num_classes=4, image_size=16), cfg, log=lambda s: None)
    before = copy.deepcopy(model.state_dict())
    frozen = set(transfer.part_params(model, "stem")) | set(transfer.part_params(model, "layer1"))
    assert frozen and all(n.startswith(("stem.", "layer1.")) for n in frozen)
    groups = list(transfer.param_groups(model, cfg))
    opt = torch.optim.SGD(groups, lr=0.1)
    transfer.scale_lrs(opt)
    by_lr = {round(g["lr"], 9): {id(p) for p in g["params"]} for g in opt.param_groups}
    named = dict(model.named_parameters())
    assert set(by_lr) == {0.1, 1.0} and by_lr[1.0] == {id(named["fc.weight"]), id(named["fc.bias"])}
    assert not any(id(named[n]) in ids for n in frozen for ids in by_lr.values())  # frozen: not optimised
    x = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8)
    y = torch.arange(64) % 4
    from cifar_tune.engine.data import Split

    config = {"model": cfg, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}, "train": {"batch_size": 16}}
    fit(model, Split(x, y), None, config, epochs=1, num_classes=4, mean=(0.5,) * 3, std=(0.25,) * 3, device="cpu")
    after = model.state_dict()
    for n in named:
        assert torch.equal(after[n], before[n]) == (n in frozen), n
    assert not torch.equal(after["stem.1.running_mean"], before["stem.1.running_mean"])  # BN stats still adapt


def _spec(model: Any, **data: Any) -> dict[str, Any]:
    return {"name": "t", "data": {"dataset": "synthetic", "synthetic": {"num_train": 40, "num_test": 10,
                                                                       "num_classes": 4, "image_size": 16}, **data},
            "space": {"model": model}}


def _errors(raw: dict[str, Any]) -> str:
    with pytest.raises(SpecError) as err:
        parse_spec(raw)
    return str(err.value)


def test_validation_before_any_trial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = tmp_path / "good.pt"
    _checkpoint(ckpt, CONVNET, num_classes=10, image_size=32)
    monkeypatch.chdir(tmp_path)
    spec = parse_spec(_spec({**CONVNET, "init": {"checkpoint": "good.pt"}, "freeze": ["features"]}))
    assert spec.space["model"]["init"]["checkpoint"] == str(ckpt)  # relative -> absolute for Ray's workers
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")

    class Evil:
        def __reduce__(self) -> Any:
            return (print, ("code ran",))

    evil = tmp_path / "evil.pt"
    torch.save({"format": "cifar-tune-checkpoint/1", "state_dict": Evil()}, evil)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": "none here"}, foreign)
    other = tmp_path / "resnet.pt"
    _checkpoint(other, SMALL_RESNET, num_classes=10, image_size=32)
    cases = {
        "missing.pt": "space.model.init.checkpoint: no such file: " + str(tmp_path / "missing.pt"),
        "garbage.pt": "space.model.init.checkpoint: cannot load " + str(garbage) + " with weights_only=True",
        "evil.pt": "space.model.init.checkpoint: cannot load " + str(evil) + " with weights_only=True",
        "foreign.pt": f"space.model.init.checkpoint: {foreign} is neither a cifar-tune checkpoint nor a state dict",
        "resnet.pt": f"space.model.init.checkpoint: {other} does not fit the 'vgg' model",
    }
    for name, message in cases.items():
        assert message in _errors(_spec({**CONVNET, "init": {"checkpoint": name}})), name
    assert "space.model.freeze: unknown part 'stme' (did you mean 'stem'?)" in _errors(
        _spec({**CONVNET, "freeze": ["stme"]}))
    assert "space.model.lr_mult.features: the part is frozen" in _errors(
        _spec({**CONVNET, "freeze": ["features"], "lr_mult": {"features": 2}}))
    assert "space.model.freeze: ['all_but_head', 'head'] freezes every parameter" in _errors(
        _spec({**CONVNET, "freeze": ["all_but_head", "head"]}))
    assert "space.model.init: must be {checkpoint: PATH}" in _errors(_spec({**CONVNET, "init": {"path": "x"}}))


# ----------------------------------------------------------------------------------------------------
# seed 001 end to end, offline: CIFAR-100-style ConvNet -> checkpoint -> fine-tune on 5 STL-10 classes


ROOT = Path(__file__).resolve().parents[2]
STEP1, STEP2 = ROOT / "search_spaces/seed001_convnet_cifar100.yaml", ROOT / "search_spaces/seed001_transfer_stl10.yaml"
SMALL = ["space.model.blocks=[{channels: [4, 8], pool: avg}]", "space.model.head=[16]"]  # CPU-sized ConvNet
FIVE = ["car", "deer", "horse", "monkey", "truck"]


def test_seed001_two_step_workflow_offline(fake_cifar: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np

    from cifar_tune.cli import main
    from cifar_tune.engine import data
    from cifar_tune.retrain import _checkpoint_bytes, make_checkpoint, retrain_one
    from cifar_tune.spec.parse import load_spec
    from cifar_tune.tuning.sources import make_sampler

    # step 1: the step-1 space on a synthetic stand-in for CIFAR-100 (32x32, 20 classes), refit by
    # retrain's own task function (Ray-free here) and saved as retrain saves it
    spec1 = load_spec(STEP1, [*SMALL, "data={dataset: synthetic, synthetic: {num_train: 200, num_test: 40, "
                                      "num_classes: 20, image_size: 32}}"])
    config = make_sampler(spec1).sample(0).config
    result = retrain_one(trial_id="t0000", seed_index=0, seed=1, config=config, data=spec1.data, epochs=1,
                         test=data.load_test(spec1.data))
    assert result["status"] == "completed", result.get("error")
    ckpt = tmp_path / "t0000_seed0.pt"
    ckpt.write_bytes(_checkpoint_bytes(make_checkpoint(result, config=config, data=spec1.data, epochs=1)))

    # step 2: the shipped fine-tuning space on STL-10 files in the real binary layout (96x96), offline
    fake = fake_cifar("stl10", per_file=40)  # 200 train / 100 test images, 10 classes
    common = [*SMALL, f"space.model.init.checkpoint={ckpt}", "space.train.batch_size=16"]
    stl = [*common, f"data.root={fake.root}", "data.download=false"]
    args = ["train", str(STEP2), "--epochs", "1"]
    data.prepare(data.DataSpec(dataset="stl10", root=str(fake.root)))  # "downloaded" once, like a first run
    assert main([*args, *(a for s in stl for a in ("--set", s))]) == 0
    out = capsys.readouterr().out
    # flatten of 8 x 16 x 16 at 32 px -> 8 x 48 x 48 at 96 px; 20 -> 5 classes: both re-initialised, logged
    assert "re-initialised classifier.0.weight: model [16, 18432] vs file [16, 2048]" in out
    assert "re-initialised classifier.2.weight: model [5, 16] vs file [20, 16]" in out
    assert "tensors loaded from " + str(ckpt) in out and "val_acc" in out

    # ... and on the same images as an .npz file (all ten classes in it; data.classes keeps the five)
    data.allow_test()  # the trial above forbade the test split in this process, as a search trial does
    full = data.DataSpec(dataset="stl10", root=str(fake.root))
    tv, te = data.load_trainval(full), data.load_test(full)
    npz = tmp_path / "stl10.npz"
    np.savez(npz, x_train=tv.x.numpy(), y_train=tv.y.numpy(), x_test=te.x.numpy(), y_test=te.y.numpy(),
             class_names=np.array(data.STL10_CLASSES))
    as_npz = [*common, f"data={{dataset: npz, path: {npz}, classes: [{', '.join(FIVE)}]}}"]
    assert main([*args, *(a for s in as_npz for a in ("--set", s))]) == 0
    out = capsys.readouterr().out
    data.allow_test()
    assert "re-initialised classifier.2.weight: model [5, 16] vs file [20, 16]" in out and "val_acc" in out
