"""Per-trial costs: MACs as model-info counts them, latency measured once per trial and kept across a
restore from the trial's own checkpoint, and nothing measured unless it is an objective."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from cifar_tune.engine import costs
from cifar_tune.engine.models import build_model, model_info
from cifar_tune.spec.parse import load_spec
from cifar_tune.tuning.trial import TrialSetup, run_trial

SMOKE = Path(__file__).resolve().parents[2] / "search_spaces" / "smoke.yaml"
CONFIG = {"model": {"family": "lenet", "channels": [4, 8], "padding": 2, "hidden": [16]},
          "optimizer": {"name": "sgd", "lr": 0.05}, "train": {"batch_size": 64, "eval_batch_size": 32}}


def _run(setup: TrialSetup, resume: bytes | None = None, trial_id: str = "t0001") -> list[tuple[dict[str, Any], bytes | None]]:
    from cifar_tune.engine import data

    reports: list[tuple[dict[str, Any], bytes | None]] = []
    try:
        run_trial(CONFIG, setup, trial_id=trial_id, report=lambda m, c=None: reports.append((m, c)), device="cpu", resume=resume)
    finally:
        data.allow_test()
    return reports


def test_costs_are_measured_once_and_reported_every_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = load_spec(SMOKE)
    calls: list[int] = []
    real = costs.latency_ms

    def counted(*args: Any, **kwargs: Any) -> float:
        calls.append(kwargs["batch_size"])
        return real(*args, **kwargs)

    monkeypatch.setattr(costs, "latency_ms", counted)
    setup = TrialSetup(spec.data, 2, 0, checkpoint_every=1, costs=("macs", "latency_ms"))
    reports = _run(setup)
    model = build_model(CONFIG["model"], num_classes=4, in_channels=3, image_size=16)
    assert [m["macs"] for m, _ in reports] == [model_info(model, in_channels=3, image_size=16)["macs"]] * 2
    assert len({m["latency_ms"] for m, _ in reports}) == 1 and reports[0][0]["latency_ms"] > 0
    assert calls == [32]  # one eval batch of train.eval_batch_size, measured once
    # restored from its own checkpoint after epoch 1: the costs it measured then, not measured again
    again = _run(setup, resume=reports[0][1])
    assert calls == [32] and again[0][0]["epoch"] == 2 and again[0][0]["latency_ms"] == reports[0][0]["latency_ms"]
    # another trial continuing from it (a PBT exploit) measures its own
    _run(setup, resume=reports[0][1], trial_id="t0002")
    assert calls == [32, 32]
    # not objectives: nothing measured, nothing reported
    plain = _run(TrialSetup(spec.data, 1, 0))
    assert "latency_ms" not in plain[0][0] and "macs" not in plain[0][0] and calls == [32, 32]


def test_latency_is_the_median_of_timed_forward_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    ticks = iter([0.0, 0.5, 1.0, 1.5] + [t for i in range(7) for t in (10.0 * i, 10.0 * i + 0.001 * (i + 1))])
    monkeypatch.setattr(costs.time, "perf_counter", lambda: next(ticks))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3, 2))
    model.train()
    ms = costs.latency_ms(model, batch_size=4, in_channels=3, image_size=1, device=torch.device("cpu"))
    assert ms == pytest.approx(4.0)  # the 2 warm-up passes are not timed; the median of 1..7 ms
    assert model.training  # its mode restored
