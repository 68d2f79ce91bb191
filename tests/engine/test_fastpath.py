"""``train.fast_path``: the cost model, its fallbacks, compiled = eager (Inductor on CPU), ops per step,
and (``gpu``-marked, skipped without CUDA) the CUDA-graph capture of the whole step."""

from __future__ import annotations

import logging
import math
from typing import Any

import pytest
import torch

from cifar_tune.bench import common
from cifar_tune.bench import run as bench
from cifar_tune.engine import fastpath
from cifar_tune.engine.augment import build_augment
from cifar_tune.engine.data import Split
from cifar_tune.engine.models import build_model
from cifar_tune.engine.opcount import OpCounter
from cifar_tune.engine.train import Trainer
from cifar_tune.spec.parse import parse_spec

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
TINY_MODEL = {"family": "lenet", "channels": [4, 8], "padding": 2, "hidden": [16], "dropout": 0.0}
CPU = torch.device("cpu")


def _data(n: int = 64, size: int = 16, device: str = "cpu") -> Split:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    return Split(x.to(device), (torch.arange(n) % 4).to(device))


def _trainer(fast_path: str, *, optimizer: str = "sgd", schedule: str = "none", augment: dict[str, Any] | None = None,
             device: str = "cpu", epochs: int = 1, n: int = 64) -> Trainer:
    config = {"model": TINY_MODEL, "optimizer": {"name": optimizer, "lr": 0.01},
              "schedule": {"name": schedule}, "augment": common.SEED_AUGMENT if augment is None else augment,
              # fp32: modes are compared with each other, bf16 rounding would hide small differences
              "train": {"batch_size": 16, "fast_path": fast_path, "precision": "fp32"}}
    torch.manual_seed(0)  # the same initial weights in every mode
    model = build_model(TINY_MODEL, num_classes=4, image_size=16)
    return Trainer(model, _data(n, device=device), None, config, epochs=epochs, num_classes=4, mean=MEAN, std=STD,
                   seed=0, device=device)


# ------------------------------------------------------------------------------- the cost model


def test_auto_is_eager_on_cpu_whatever_the_length() -> None:
    for steps in (1, 10_000, 10_000_000):
        decision = fastpath.choose("auto", CPU, steps, graph_reason=None)
        assert decision.mode == "eager" and "cpu" in decision.reason


def test_auto_on_cuda_follows_the_cost_model() -> None:
    cuda = torch.device("cuda")
    graphs_from = fastpath.min_steps_to_pay_off("cuda_graphs")
    compiled_from = fastpath.min_steps_to_pay_off("compiled")
    assert 0 < graphs_from < compiled_from  # a capture costs seconds, a compile a minute
    assert fastpath.choose("auto", cuda, graphs_from - 1, None).mode == "eager"  # a short trial: nothing pays off
    assert fastpath.choose("auto", cuda, graphs_from + 1, None).mode == "cuda_graphs"
    # seed 000's longest trial: 30 epochs x 312 steps of 128 images
    assert fastpath.choose("auto", cuda, 30 * 312, None).mode == "cuda_graphs"
    # no capture possible: compiled once it is won back, eager before
    blocked = fastpath.choose("auto", cuda, compiled_from + 1, "Adagrad has no capturable mode")
    assert blocked.mode == "compiled" and "Adagrad" in blocked.reason
    assert fastpath.choose("auto", cuda, compiled_from - 1, "x").mode == "eager"


def test_explicit_modes_and_the_graph_fallback() -> None:
    assert fastpath.choose("eager", torch.device("cuda"), 10**9, None).mode == "eager"
    assert fastpath.choose("compiled", CPU, 1, None).mode == "compiled"
    fallback = fastpath.choose("cuda_graphs", CPU, 10**9, "CUDA graphs need a CUDA device; this trial runs on cpu")
    assert fallback.mode == "eager" and "CUDA device" in fallback.reason


@pytest.mark.parametrize("optimizer,schedule,augment,expected", [
    ("sgd", "none", None, "CUDA device"),  # on CPU: the first blocker
])
def test_graph_blockers_on_cpu(optimizer: str, schedule: str, augment: Any, expected: str) -> None:
    t = _trainer("eager", optimizer=optimizer, schedule=schedule, augment=augment)
    assert expected in (fastpath.graph_blocker(t.device, t.gen, t.optimizer, schedule, t.augment.split) or "")


def test_graph_blockers_name_each_cause() -> None:
    """Every reason a step cannot be captured, with the device check passed (a CUDA device named)."""
    cuda, gpu_gen = torch.device("cuda"), torch.Generator()  # a CPU generator: the data is not on the GPU
    t = _trainer("eager")
    assert "generator is on the CPU" in fastpath.graph_blocker(cuda, gpu_gen, t.optimizer, "none", True)

    class FakeCudaGenerator:  # graph_blocker reads only .device
        device = torch.device("cuda")

    adagrad = _trainer("eager", optimizer="adagrad").optimizer
    assert "Adagrad has no capturable" in fastpath.graph_blocker(cuda, FakeCudaGenerator(), adagrad, "none", True)
    for name in ("sgd", "adam", "rmsprop"):  # capturable (SGD: nothing host-side in its step)
        opt = _trainer("eager", optimizer=name).optimizer
        assert fastpath.graph_blocker(cuda, FakeCudaGenerator(), opt, "none", True) is None, name
    assert "changes the lr" in fastpath.graph_blocker(cuda, FakeCudaGenerator(), t.optimizer, "cosine", True)
    assert "policy" in fastpath.graph_blocker(cuda, FakeCudaGenerator(), t.optimizer, "none", False)


def test_cuda_graphs_on_cpu_falls_back_to_eager_with_its_reason(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="cifar_tune.engine.train"):
        t = _trainer("cuda_graphs")
    assert t.fast_path.mode == "eager" and "CUDA device" in t.fast_path.reason
    assert any(r.levelno == logging.WARNING and "fast path eager" in r.getMessage() and "CUDA device" in r.getMessage()
               for r in caplog.records)
    metrics = t.run_epoch()  # and it trains
    assert math.isfinite(metrics["train_loss"]) and t._graph is None


def test_fast_path_is_validated_in_the_spec() -> None:
    raw = {"name": "x", "data": {"dataset": "synthetic"}, "search": {"metric": "val_acc", "num_samples": 1},
           "space": {"model": TINY_MODEL, "optimizer": {"name": "sgd", "lr": 0.1}, "train": {"fast_path": "cuda_graph"}}}
    with pytest.raises(Exception) as err:
        parse_spec(raw)
    assert "space.train.fast_path" in str(err.value) and "cuda_graphs" in str(err.value)
    raw["space"]["train"]["fast_path"] = {"choice": ["eager", "compiled"]}  # searchable like any train key
    assert parse_spec(raw).space["train"]["fast_path"]


# -------------------------------------------------------------------------------- ops per step


def test_op_counter_sees_forward_backward_and_optimizer() -> None:
    t = _trainer("eager")
    idx = torch.arange(16)
    xb, targets = t.augment_batch(idx)
    with OpCounter() as forward, torch.no_grad():
        t.model(xb)
    with OpCounter() as both:
        t.forward_backward(xb, targets)
    # backward runs at least as many ops as forward (every conv/linear has its *_backward)
    assert both.ops["aten.convolution_backward"] == forward.ops["aten.convolution"] > 0
    assert both.total > 2 * forward.total


def test_op_counter_flags_host_tensors_flowing_to_another_device() -> None:
    """What strict_sync cannot see: a non-blocking host-to-device copy of a host constant. The meta device
    stands in for CUDA here (same dispatch, no GPU)."""
    with OpCounter() as c:
        a = torch.ones(4, device="meta")
        a + torch.tensor(2.0)  # a 0-dim host tensor is a scalar argument, not a copy
        torch.tensor([1.0, 2.0, 3.0, 4.0]).to("meta", non_blocking=True)
    assert dict(c.host_inputs) == {"aten._to_copy": 1}


def test_bench_reports_ops_per_step_and_the_seed_augmentation_is_within_budget() -> None:
    """The seed-000 recipe's augmentation: at most 220 dispatched ops per batch (548 before the colour
    jitter became blend passes and one hue pass)."""
    report = bench.run_bench(common.BenchOptions(model="lenet", batch_size=32, only_ops=True, search=False),
                             out=lambda line: None)
    ops = report["ops_per_step"]
    assert set(ops) == {"augment", "model", "optimizer"}
    assert 0 < ops["augment"] <= 220, ops
    assert ops["model"] > 0 and ops["optimizer"] > 0
    assert "| augment |" in bench.markdown(report)


# --------------------------------------------------------------------- compiled = eager (Inductor, CPU)


@pytest.mark.slow
def test_compiled_augmentation_and_step_equal_eager_on_cpu() -> None:
    """Inductor's C++ backend. Stated tolerances (fused float arithmetic reassociates): the compiled
    augmentation gives the eager batch from the same draws within 1e-4 (normalised units); the compiled
    model's loss within 1e-4 relative and its gradients within 1e-3 relative (+1e-5) on the same weights and
    batch; a compiled epoch's loss within 2% of the eager epoch's (small differences grow over steps)."""
    aug = build_augment(common.SEED_AUGMENT, mean=MEAN, std=STD, num_classes=4)
    x = _data(16, size=16).x
    draws = aug.draw(torch.Generator().manual_seed(3), 16, 3, CPU)
    compiled = torch.compile(aug.dense, dynamic=False)
    diff = (compiled(x, draws) - aug.dense(x, draws)).abs().max().item()
    assert diff <= 1e-4, diff

    eager, comp = _trainer("eager"), _trainer("compiled")
    assert comp.fast_path.mode == "compiled" and comp._dense is not None and comp.step_model is not comp.model
    comp.model.load_state_dict(eager.model.state_dict())
    xb, targets = eager.augment_batch(torch.arange(16))
    losses = [t.forward_backward(xb, targets)[0].item() for t in (eager, comp)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    for (name, p), q in zip(eager.model.named_parameters(), comp.model.parameters(), strict=True):
        assert torch.allclose(q.grad, p.grad, rtol=1e-3, atol=1e-5), name
    e, c = _trainer("eager").run_epoch(), _trainer("compiled").run_epoch()
    assert c["train_loss"] == pytest.approx(e["train_loss"], rel=2e-2)


# --------------------------------------------------------------------------------- CUDA (gpu)



@pytest.mark.parametrize("optimizer", ["sgd", "adam", "rmsprop"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_capture_the_step_and_train_like_eager(optimizer: str) -> None:
    """The step is captured (no fallback), replays without a host sync, and trains as eager does: same
    data, draws and weights, so after two epochs losses and weights agree to float tolerance."""
    eager = _trainer("eager", optimizer=optimizer, device="cuda", epochs=2, n=256)
    graphs = _trainer("cuda_graphs", optimizer=optimizer, device="cuda", epochs=2, n=256)
    graphs.strict_sync = True  # a sync inside the replayed loop raises
    for _ in range(2):
        e, g = eager.run_epoch(), graphs.run_epoch()
        assert graphs.fast_path.mode == "cuda_graphs", graphs.fast_path.reason
        assert g["train_loss"] == pytest.approx(e["train_loss"], rel=2e-2)
    assert graphs._graph is not None
    for (name, p), q in zip(eager.model.named_parameters(), graphs.model.parameters(), strict=True):
        assert torch.allclose(p, q, rtol=1e-2, atol=1e-3), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_fall_back_for_adagrad_and_schedules() -> None:
    for kwargs, why in (({"optimizer": "adagrad"}, "capturable"), ({"schedule": "cosine"}, "lr")):
        t = _trainer("cuda_graphs", device="cuda", **kwargs)
        assert t.fast_path.mode == "eager" and why in t.fast_path.reason
        assert math.isfinite(t.run_epoch()["train_loss"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_recapture_after_loading_a_state() -> None:
    """load_state_dict replaces optimizer state and hyperparameters: the old graph must not be replayed."""
    t = _trainer("cuda_graphs", optimizer="adam", device="cuda", epochs=3, n=256)
    t.run_epoch()
    first = t._graph
    state = t.state_dict()
    t.load_state_dict(state)
    assert t._graph is None
    t.run_epoch()
    assert t._graph is not None and t._graph is not first and t.fast_path.mode == "cuda_graphs"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_step_makes_no_host_to_device_copy_and_counts_as_on_cpu() -> None:
    """The step on CUDA: no host tensor flows into it (what a CUDA graph could not capture and strict_sync
    does not see), and the augmentation dispatches the same ops as on CPU (one code path)."""
    from cifar_tune.engine.opcount import step_ops

    on_gpu, on_cpu = step_ops(_trainer("eager", device="cuda")), step_ops(_trainer("eager"))
    assert on_gpu["host_to_device_per_step"] == {"augment": 0, "model": 0, "optimizer": 0}
    assert on_gpu["ops_per_step"]["augment"] == on_cpu["ops_per_step"]["augment"]
