"""The training loop: learns, reports, diverges cleanly, evaluates, reproducible; fast paths on CPU."""

from __future__ import annotations

import json
import math
import traceback
from typing import Any

import pytest
import torch

from cifar_tune.engine import data as data_mod
from cifar_tune.engine.models import build_model
from cifar_tune.engine.optim import OPTIMIZERS, SCHEDULES
from cifar_tune.engine.train import Trainer, evaluate, fit
from cifar_tune.spec.schema import DataSpec, SyntheticSpec
from cifar_tune.tuning.trial import TrialSetup, checkpoint_from_bytes, checkpoint_to_bytes, run_trial

DATA = DataSpec(dataset="synthetic", synthetic=SyntheticSpec(num_train=1500, num_test=300, num_classes=4, image_size=16))
CNN = {"family": "vgg", "blocks": [{"channels": [16]}, {"channels": [32]}, {"channels": [64]}], "head": [], "global_pool": "avg"}
CONFIG: dict[str, Any] = {
    "optimizer": {"name": "adam", "lr": 3e-3},
    "schedule": {"name": "cosine"},
    "augment": {"hflip": True, "crop": {"padding": 2}},
    "train": {"batch_size": 64},
}


def _run(config: dict[str, Any], epochs: int = 3, seed: int = 0, **kw: Any) -> tuple[Any, list[dict[str, float]]]:
    info = data_mod.dataset_info(DATA)
    train, val = data_mod.load_splits(DATA)
    torch.manual_seed(seed)
    model = build_model(CNN, num_classes=info.num_classes, in_channels=info.channels, image_size=info.image_size)
    seen: list[dict[str, float]] = []
    result = fit(model, train, val, config, epochs=epochs, num_classes=info.num_classes, mean=info.mean, std=info.std,
                 seed=seed, device="cpu", on_epoch=seen.append, **kw)
    return result, seen


def test_small_cnn_learns_synthetic_data_well_above_chance() -> None:
    result, seen = _run(CONFIG, epochs=4)
    assert result.status == "completed" and result.epochs_run == 4
    assert [m["epoch"] for m in seen] == [1, 2, 3, 4]
    for m in seen:
        assert set(m) >= {"train_loss", "train_acc", "val_loss", "val_acc", "val_top5", "lr", "epoch_time_s", "images_per_s"}
        assert m["images_per_s"] > 0 and m["epoch_time_s"] > 0
    assert seen[-1]["val_acc"] > 0.5  # chance is 0.25 for 4 classes
    assert seen[-1]["train_loss"] < seen[0]["train_loss"]
    assert seen[-1]["lr"] < seen[0]["lr"]  # the cosine schedule decays


def test_non_finite_loss_stops_with_status_diverged() -> None:
    config = {**CONFIG, "optimizer": {"name": "sgd", "lr": 1e30, "momentum": 0.9}}
    result, seen = _run(config, epochs=5)
    assert result.status == "diverged"
    assert result.epochs_run < 5 and seen[-1]["status"] == "diverged"
    assert not math.isfinite(seen[-1]["train_loss"])


def test_training_is_reproducible_on_cpu() -> None:
    _, a = _run(CONFIG, epochs=2, seed=7)
    _, b = _run(CONFIG, epochs=2, seed=7)
    _, c = _run(CONFIG, epochs=2, seed=8)
    assert [m["train_loss"] for m in a] == [m["train_loss"] for m in b]
    assert [m["val_acc"] for m in a] == [m["val_acc"] for m in b]
    assert [m["train_loss"] for m in a] != [m["train_loss"] for m in c]


@pytest.mark.parametrize("train_opts", [
    {"precision": "bf16"},
    {"channels_last": True},
    {"grad_clip_norm": 0.5, "label_smoothing": 0.1},
], ids=["bf16-autocast", "channels-last", "clip+smoothing"])
def test_fast_paths_work_on_cpu(train_opts: dict[str, Any]) -> None:
    result, seen = _run({**CONFIG, "train": {"batch_size": 64, **train_opts}}, epochs=2)
    assert result.status == "completed"
    assert seen[-1]["val_acc"] > 0.35 and math.isfinite(seen[-1]["train_loss"])


def test_mixup_soft_targets_train() -> None:
    result, seen = _run({**CONFIG, "augment": {"hflip": True, "mixup": {"alpha": 0.4}}}, epochs=2)
    assert result.status == "completed" and math.isfinite(seen[-1]["train_loss"])


def test_no_host_sync_per_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading a value back to Python happens a few times per epoch, never once per batch."""
    calls = {"item": 0}
    real_item = torch.Tensor.item

    def counting_item(self: torch.Tensor) -> Any:
        # only our code counts: torch.optim's Adam reads its step counter, a host-side CPU scalar
        # even on CUDA (not a device sync), with .item()
        caller = traceback.extract_stack(limit=2)[0].filename
        if "cifar_tune" in caller:
            calls["item"] += 1
        return real_item(self)

    monkeypatch.setattr(torch.Tensor, "item", counting_item)
    result, _ = _run({**CONFIG, "train": {"batch_size": 16}}, epochs=2)  # 75 steps per epoch
    assert result.status == "completed"
    assert calls["item"] <= 2 * 8, calls


def test_evaluate_returns_per_class_accuracy_and_confusion() -> None:
    info = data_mod.dataset_info(DATA)
    _, val = data_mod.load_splits(DATA)
    model = build_model(CNN, num_classes=4, in_channels=3, image_size=16)
    ev = evaluate(model, val, mean=info.mean, std=info.std, num_classes=4, device="cpu", batch_size=100)
    cm = torch.tensor(ev.confusion)
    assert cm.shape == (4, 4) and int(cm.sum()) == len(val) == ev.num_images
    assert ev.top1 == pytest.approx(float(cm.diag().sum()) / len(val))
    per_class = cm.diag().double() / cm.sum(1).double()
    assert ev.per_class_acc == pytest.approx(per_class.tolist())
    assert ev.top1 <= ev.top5 <= 1.0 and ev.loss > 0


def test_trial_reports_every_epoch_and_forbids_the_test_split() -> None:
    reports: list[dict[str, Any]] = []
    setup = TrialSetup(data=DATA, epochs=2, seed=0)
    try:
        result = run_trial({"model": CNN, **CONFIG}, setup, trial_id="t0042", report=lambda m, c=None: reports.append(m),
                           device="cpu")
        assert result.status == "completed"
        assert [r["epoch"] for r in reports] == [1, 2]
        assert all(r["trial_id"] == "t0042" and r["params"] > 0 for r in reports)
        with pytest.raises(data_mod.TestSplitForbidden):
            data_mod.load_test(DATA)
    finally:
        data_mod.allow_test()


# ------------------------------------------------------------------------- exact continuation

TINY = DataSpec(dataset="synthetic", synthetic=SyntheticSpec(num_train=320, num_test=40, num_classes=4, image_size=8, seed=3))
# BatchNorm buffers, dropout (the global torch RNG), every random augmentation (the batch generator)
TINY_CNN = {"family": "vgg", "blocks": [{"channels": [8], "batch_norm": True, "dropout": 0.2}, {"channels": [16]}],
            "head": [16], "head_dropout": 0.3, "global_pool": "avg"}
TINY_AUG = {"hflip": True, "crop": {"padding": 2}, "rotation": {"degrees": 10}, "color_jitter": True,
            "erasing": {"p": 0.5}, "cutout": {"size": 2, "p": 0.5}, "mixup": {"alpha": 0.4, "p": 0.5}}
# every optimizer and every schedule at least once (stateful ones: momentum, Adam moments, plateau)
OPT_SCHED = [(o, s) for o, s in zip(list(OPTIMIZERS) * 2, list(SCHEDULES), strict=False)]


def _trainer(config: dict[str, Any], model_seed: int, epochs: int = 4) -> Trainer:
    info = data_mod.dataset_info(TINY)
    train, val = data_mod.load_splits(TINY)
    torch.manual_seed(model_seed)
    model = build_model(TINY_CNN, num_classes=4, in_channels=3, image_size=8)
    return Trainer(model, train, val, config, epochs=epochs, num_classes=4, mean=info.mean, std=info.std, seed=11, device="cpu")


@pytest.fixture
def one_thread() -> Any:
    """Tiny models: one torch thread is faster, and on a loaded 2-core machine 20x faster than two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


NUMBERS = ("train_loss", "train_acc", "val_loss", "val_acc", "val_top5", "lr")


@pytest.mark.parametrize("opt,sched", OPT_SCHED, ids=[f"{o}-{s}" for o, s in OPT_SCHED])
def test_interrupted_and_continued_equals_uninterrupted(opt: str, sched: str, one_thread: None) -> None:
    """Stop after epoch 2, save, build a fresh trainer (other initial weights, RNGs moved on), load,
    continue: epochs 3-4 equal the uninterrupted run's to 1e-6. Proves the state is complete."""
    config = {"optimizer": {"name": opt, "lr": 0.02}, "schedule": {"name": sched, "warmup_frac": 0.1},
              "augment": TINY_AUG, "train": {"batch_size": 32, "label_smoothing": 0.05}}
    whole = _trainer(config, model_seed=0)
    while not whole.done:
        whole.run_epoch()
    first = _trainer(config, model_seed=0)
    first.run_epoch()
    first.run_epoch()
    blob = checkpoint_to_bytes(first.state_dict())  # through bytes, as a search stores it
    torch.manual_seed(12345)  # the process's RNGs moved on, as in a new worker
    torch.rand(100)
    second = _trainer(config, model_seed=99)
    second.load_state_dict(checkpoint_from_bytes(blob))
    assert second.epoch == 2 and len(second.history) == 2
    while not second.done:
        second.run_epoch()
    assert second.epoch == 4
    for a, b in zip(whole.history, second.history, strict=True):
        for k in NUMBERS:
            assert b[k] == pytest.approx(a[k], abs=1e-6, rel=0), (a["epoch"], k)
    for k, v in whole.model.state_dict().items():
        assert torch.allclose(v.float(), second.model.state_dict()[k].float(), atol=1e-6, rtol=0), k


SWITCHES = [("adam", "amsgrad", False, True), ("adamw", "amsgrad", False, True), ("rmsprop", "centered", False, True),
            ("rmsprop", "momentum", 0.0, 0.9), ("sgd", "momentum", 0.0, 0.9)]


@pytest.mark.parametrize(("opt", "key", "off", "on"), SWITCHES, ids=[f"{o}-{k}" for o, k, _, _ in SWITCHES])
def test_exploit_that_switches_an_optimizer_buffer_on_and_off_trains_on(opt: str, key: str, off: Any, on: Any,
                                                                         one_thread: None) -> None:
    """A PBT exploit as the trial runs it: a trainer loads a checkpoint saved under another value of a
    setting that decides the optimizer state's buffers (a KeyError at the first step before), trains
    an epoch, and its checkpoint loads back under the first value."""
    def config(value: Any) -> dict[str, Any]:
        return {"optimizer": {"name": opt, "lr": 0.01, key: value}, "schedule": {"name": "none"},
                "augment": {"hflip": True}, "train": {"batch_size": 32}}

    first = _trainer(config(off), model_seed=0, epochs=3)
    first.run_epoch()
    switched = _trainer(config(on), model_seed=1, epochs=3)
    switched.load_state_dict(checkpoint_from_bytes(checkpoint_to_bytes(first.state_dict())))
    assert math.isfinite(switched.run_epoch()["train_loss"]) and switched.epoch == 2
    back = _trainer(config(off), model_seed=2, epochs=3)
    back.load_state_dict(checkpoint_from_bytes(checkpoint_to_bytes(switched.state_dict())))
    assert math.isfinite(back.run_epoch()["train_loss"]) and back.epoch == 3


def test_trial_resumed_from_its_checkpoint_continues_exactly(one_thread: None) -> None:
    """The trial layer end to end: checkpoints as bytes every epoch; continuing from epoch 1's
    reports epochs 2-3 as the uninterrupted trial did, with no lineage (its own checkpoint)."""
    config = {"model": TINY_CNN, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
              "schedule": {"name": "cosine"}, "augment": TINY_AUG, "train": {"batch_size": 32}}
    setup = TrialSetup(data=TINY, epochs=3, seed=0, checkpoint_every=1)
    whole: list[tuple[dict[str, Any], bytes | None]] = []
    try:
        run_trial(config, setup, trial_id="t0001", report=lambda m, c=None: whole.append((m, c)), device="cpu")
        assert all(c is not None for _, c in whole)
        saved = checkpoint_from_bytes(whole[0][1])
        assert saved["epochs"] == 1 and saved["trial_id"] == "t0001" and saved["config"] == config
        rest: list[dict[str, Any]] = []
        run_trial(config, setup, trial_id="t0001", report=lambda m, c=None: rest.append(m), device="cpu",
                  resume=whole[0][1])
        assert [m["epoch"] for m in rest] == [2, 3]
        assert rest[0]["restored_from"] is None and json.loads(rest[0]["config_json"]) == config
        assert "restored_from" not in rest[1]  # lineage is on the first epoch after the restore only
        for a, (b, _) in zip(rest, whole[1:], strict=True):
            for k in NUMBERS:
                assert a[k] == pytest.approx(b[k], abs=1e-6, rel=0), (a["epoch"], k)
        # another trial continuing from t0001's checkpoint with a new lr (a PBT exploit) records both
        exploit: list[dict[str, Any]] = []
        new = {**config, "optimizer": {**config["optimizer"], "lr": 0.02}}
        run_trial(new, setup, trial_id="t0002", report=lambda m, c=None: exploit.append(m), device="cpu",
                  resume=whole[1][1])
        assert [m["epoch"] for m in exploit] == [3]
        assert exploit[0]["restored_from"] == "t0001"
        assert json.loads(exploit[0]["config_json"]) == new
    finally:
        data_mod.allow_test()


def test_ray_lives_in_the_tuning_layer() -> None:
    """The spec, the engine, watching, and every command but search/retrain run without importing Ray."""
    import subprocess
    import sys

    code = (
        "import importlib, pkgutil, sys\n"
        "import cifar_tune\n"
        "for sub in ('spec', 'engine', 'watch'):\n"
        "    pkg = importlib.import_module('cifar_tune.' + sub)\n"
        "    for m in pkgutil.iter_modules(pkg.__path__):\n"
        "        importlib.import_module(f'cifar_tune.{sub}.{m.name}')\n"
        "import cifar_tune.tuning.trial, cifar_tune.tuning.driver, cifar_tune.tuning.budget, cifar_tune.results, "
        "cifar_tune.retrain, cifar_tune.report, cifar_tune.cli\n"
        "from cifar_tune.results import run_metadata; run_metadata()\n"
        "assert 'ray' not in sys.modules, sorted(m for m in sys.modules if m.startswith('ray'))[:5]\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_train_acc_counts_mixed_targets() -> None:
    """Hard labels: plain accuracy. Mixup/cutmix soft targets: the target mass on the predicted class."""
    from cifar_tune.engine.train import correct_count

    logits = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 5.0]])  # predicts 0, 1, 2
    assert correct_count(logits, torch.tensor([0, 1, 0])).item() == 2
    eye = torch.eye(3)
    lam = torch.tensor([0.7, 0.4, 1.0])[:, None]
    own, partner = eye[[0, 2, 1]], eye[[1, 1, 2]]  # image 0: own 0 (predicted), image 1: partner 1 (predicted)
    soft = lam * own + (1 - lam) * partner
    assert correct_count(logits, soft).item() == pytest.approx(0.7 + 0.6 + 0.0)
    assert correct_count(logits, eye[[0, 1, 0]]).item() == 2  # one-hot soft targets: plain accuracy


# ------------------------------------------------------------------------- the GPU path's plumbing, on CPU


def test_fit_passes_strict_sync_to_the_step_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """fit(strict_sync=...) reaches the guard around the step loop (on CUDA it turns syncs into errors)."""
    import cifar_tune.engine.train as train_mod

    seen: list[bool] = []
    real = train_mod._no_host_sync

    def spy(device: torch.device, strict: bool) -> Any:
        seen.append(strict)
        return real(device, strict)

    monkeypatch.setattr(train_mod, "_no_host_sync", spy)
    for strict in (True, False):
        _run({**CONFIG, "train": {"batch_size": 256}}, epochs=1, strict_sync=strict)
    assert seen == [True, False]


@pytest.mark.parametrize("precision,tf32", [("fp32", False), ("bf16", True), ("auto", True)])
def test_precision_sets_tf32_in_the_loop_and_restores_it(precision: str, tf32: bool) -> None:
    """fp32 means IEEE fp32 matmuls/convs (no TF32) while training and evaluating; the flags come back after."""
    seen: list[tuple[bool, bool]] = []
    info = data_mod.dataset_info(DATA)
    train, val = data_mod.load_splits(DATA)
    model = build_model(CNN, num_classes=4, in_channels=3, image_size=16)
    model.register_forward_pre_hook(lambda *_: seen.append((torch.backends.cuda.matmul.allow_tf32,
                                                            torch.backends.cudnn.allow_tf32)))
    before = (not tf32, tf32)  # a mix, so both "set" and "restored" are visible
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    try:
        fit(model, train, val, {**CONFIG, "train": {"batch_size": 256, "precision": precision}}, epochs=1,
            num_classes=4, mean=info.mean, std=info.std, device="cpu")
        after = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    assert seen and set(seen) == {(tf32, tf32)}, set(seen)  # every training and evaluation forward
    assert after == before


SEED_RECIPE = {"hflip": True, "crop": {"padding": 4}, "rotation": {"degrees": 15},
               "color_jitter": {"brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.1}}


def _host_tensors_in_epoch(num_train: int) -> int:
    """Tensors made from host data (``torch.tensor(...)``: ``aten.lift_fresh``) during a trainer's
    second epoch (training with the seed-000 augmentation, then evaluation). On CUDA each is a pageable
    host-to-device copy: a hidden sync, and a step no CUDA graph can capture."""
    from torch.utils._python_dispatch import TorchDispatchMode

    spec = DataSpec(dataset="synthetic", synthetic=SyntheticSpec(num_train=num_train, num_test=10, num_classes=4,
                                                                 image_size=8))
    info = data_mod.dataset_info(spec)
    train, val = data_mod.load_splits(spec)
    model = build_model(TINY_CNN, num_classes=4, in_channels=3, image_size=8)
    config = {"optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9}, "schedule": {"name": "cosine"},
              "augment": SEED_RECIPE, "train": {"batch_size": 16, "eval_batch_size": 16}}
    trainer = Trainer(model, train, val, config, epochs=2, num_classes=4, mean=info.mean, std=info.std, device="cpu")
    trainer.run_epoch()  # the first epoch may build per-run constants
    made = 0

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            nonlocal made
            made += func in (torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default)
            return func(*args, **(kwargs or {}))

    with Count():
        trainer.run_epoch()
    return made


def test_no_host_tensor_is_made_per_batch(one_thread: None) -> None:
    """Twice the batches (training and evaluation) make no more host tensors: none is made per batch."""
    small, large = _host_tensors_in_epoch(160), _host_tensors_in_epoch(320)  # val: 32 and 64 images
    assert large == small, (small, large)


def test_evaluate_confusion_matches_a_reference_count() -> None:
    """The sync-free confusion count equals a plain count of (label, top-1 prediction) pairs."""
    info = data_mod.dataset_info(DATA)
    _, val = data_mod.load_splits(DATA)
    torch.manual_seed(3)
    model = build_model(CNN, num_classes=4, in_channels=3, image_size=16).eval()
    ev = evaluate(model, val, mean=info.mean, std=info.std, num_classes=4, device="cpu", batch_size=64)
    from cifar_tune.engine.augment import normalize

    with torch.no_grad():
        pred = model(normalize(val.x, info.mean, info.std)).argmax(1)
    expected = [[0] * 4 for _ in range(4)]
    for t, p in zip(val.y.tolist(), pred.tolist(), strict=True):
        expected[t][p] += 1
    assert ev.confusion == expected


@pytest.mark.parametrize("saved_on", ["cuda", "cpu-unlabelled"])
def test_checkpoint_from_another_device_kind_resumes(saved_on: str, one_thread: None) -> None:
    """A GPU trial's checkpoint (a CUDA generator's Philox state: seed and offset, 16 bytes) resumed by a
    CPU trainer: no crash, and deterministic (the same checkpoint twice gives the same epochs). An older
    checkpoint without the generator's kind is read by its state's size."""
    import struct

    config = {"optimizer": {"name": "sgd", "lr": 0.02}, "schedule": {"name": "none"}, "augment": TINY_AUG,
              "train": {"batch_size": 32}}
    first = _trainer(config, model_seed=0, epochs=2)
    first.run_epoch()
    state = first.state_dict()
    if saved_on == "cuda":
        state["rng"]["generator"] = torch.tensor(list(struct.pack("<QQ", 1234, 4 * 65536)), dtype=torch.uint8)
        state["rng"]["generator_device"] = "cuda"
        state["rng"]["cuda"] = state["rng"]["generator"].clone()
    else:
        del state["rng"]["generator_device"]
    blob = checkpoint_to_bytes(state)
    runs = []
    for _ in range(2):
        t = _trainer(config, model_seed=5, epochs=2)
        t.load_state_dict(checkpoint_from_bytes(blob))
        runs.append(t.run_epoch())
    assert runs[0]["epoch"] == 2 and all(math.isfinite(r["train_loss"]) for r in runs)
    assert runs[0]["train_loss"] == runs[1]["train_loss"] and runs[0]["val_acc"] == runs[1]["val_acc"]
    if saved_on == "cpu-unlabelled":  # same kind: the exact stream, as the uninterrupted run
        whole = _trainer(config, model_seed=0, epochs=2)
        whole.run_epoch()
        assert whole.run_epoch()["train_loss"] == pytest.approx(runs[0]["train_loss"], abs=1e-6, rel=0)
