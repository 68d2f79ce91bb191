"""CLI commands that need no Ray: preview, train, model-info; OOM handling of a trial."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch

from cifar_tune.cli import main
from cifar_tune.spec.parse import load_spec
from cifar_tune.text import summarize_config
from cifar_tune.tuning import trial as trial_mod
from cifar_tune.tuning.trial import TrialSetup, run_trial

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "search_spaces" / "smoke.yaml")
MODELS = sorted((ROOT / "search_spaces" / "models").glob("*.yaml"))


def test_preview_prints_configs_params_and_budget(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["preview", SMOKE, "-n", "3"]) == 0
    out = capsys.readouterr().out
    # each config on one line in the leaderboard's compact form: "lenet channels=[4,8] · sgd lr=0.0123 · ..."
    configs = re.findall(r"^    (\S.*)$", out, flags=re.M)
    assert len(configs) == 3 and all(c.split()[0] in ("lenet", "mlp") and " · " in c for c in configs), configs
    assert "{" not in "".join(c.replace("{padding:", "") for c in configs)  # no JSON
    from cifar_tune.spec.space import Sampler

    first = Sampler(load_spec(SMOKE).space, seed=0).sample(0).config
    assert configs[0] == summarize_config(first)
    assert len(re.findall(r"params=[\d,]+", out)) == 3
    assert "rung at epoch    1: ~4 trials" in out
    assert re.search(r"total epochs: ~\d+ with early stopping vs 12 without", out)


def test_preview_honours_the_parameter_budget(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["preview", str(ROOT / "search_spaces/seed004_resnet_budget_cifar10.yaml"), "-n", "8"]) == 0
    params = [int(p.replace(",", "")) for p in re.findall(r"params=([\d,]+)", capsys.readouterr().out)]
    assert len(params) == 8 and max(params) <= 5_000_000


def test_train_runs_one_config_without_ray(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", SMOKE, "--index", "1", "--epochs", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "sample 1: params=" in out
    assert len(re.findall(r"^epoch +\d+ +train_loss", out, flags=re.M)) == 2
    assert "status: completed after 2 epochs" in out


@pytest.mark.parametrize("path", MODELS, ids=[p.stem for p in MODELS])
def test_model_info_every_shipped_model(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["model-info", str(path), "--num-classes", "100"]) == 0
    out = capsys.readouterr().out
    params = int(re.search(r"trainable parameters +([\d,]+)", out).group(1).replace(",", ""))
    macs = int(re.search(r"MACs per image +([\d,]+)", out).group(1).replace(",", ""))
    assert params > 10_000 and macs > params // 2


def test_model_info_matches_seed_003_count(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["model-info", str(ROOT / "search_spaces/models/seed003_cnn_2p7m.yaml"), "--num-classes", "100"]) == 0
    out = capsys.readouterr().out
    assert "2,759,332" in out  # Keras' 2,762,660 minus its 3,328 BatchNorm moving statistics (buffers here)


def test_out_of_memory_is_recorded_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    def oom(*args: Any, **kwargs: Any) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trial_mod.Trainer, "run_epoch", oom)
    spec = load_spec(SMOKE)
    reports: list[dict[str, Any]] = []
    try:
        result = run_trial({"model": {"family": "mlp", "hidden": [8]}}, TrialSetup(spec.data, 1, 0),
                           trial_id="t0009", report=lambda m, c=None: reports.append(m), device="cpu")
    finally:
        from cifar_tune.engine import data

        data.allow_test()
    assert result.status == "oom"
    assert reports[-1]["status"] == "oom" and "out of memory" in reports[-1]["error"]


def test_preview_says_1_trial_not_1_trials(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["preview", SMOKE, "-n", "1", "--set", "search.num_samples=1"]) == 0
    out = capsys.readouterr().out
    assert "budget for 1 trial, up to 3 epochs each" in out and "rung at epoch    1: ~1 trial\n" in out
    assert not re.search(r"\b1 (trials|epochs|seeds|nodes|CPUs|GPUs)\b", out)


def test_rays_token_warning_is_dropped_and_said_once_by_us() -> None:
    import logging

    from cifar_tune.tuning.cluster import RAY_AUTH_LOGGER, RayInfo, quiet_ray_auth_warning
    from cifar_tune.tuning.driver import print_cluster

    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    log = logging.getLogger(RAY_AUTH_LOGGER)
    handler = Keep()
    log.addHandler(handler)
    try:
        quiet_ray_auth_warning()
        quiet_ray_auth_warning()  # idempotent: one filter
        log.warning("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.")
        log.warning("Token authentication is disabled for this Ray cluster.")  # another warning still shows
    finally:
        log.removeHandler(handler)
    assert seen == ["Token authentication is disabled for this Ray cluster."]
    for url in ("http://127.0.0.1:8265", None):
        lines: list[str] = []
        print_cluster(RayInfo(address="a", dashboard_url=url, started_here=True, cpus=2.0, gpus=0.0, nodes=1,
                              token_auth=True), lines.append)
        assert lines[0] == "local Ray instance: 1 node, 2 CPUs, 0 GPUs"
        assert [line for line in lines if "token authentication" in line.lower()] == [lines[-1]]
        assert ("ray get-auth-token" in lines[-1]) == (url is not None) and "~/.ray/auth_token" in lines[-1]
