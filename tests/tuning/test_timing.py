"""``preview --time``: the projection's arithmetic on injected rates, and the command on smoke.yaml."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cifar_tune.cli import main
from cifar_tune.spec.parse import load_spec
from cifar_tune.tuning.timing import ConfigRate, duration, local_concurrency, project

SMOKE = Path(__file__).resolve().parents[2] / "search_spaces" / "smoke.yaml"


def test_projection_arithmetic() -> None:
    # config 0: 1000 img/s training, 4000 evaluating -> 960/1000 + 240/4000 = 1.02 s per epoch
    # config 1: 500 img/s, 2000 -> 1.92 + 0.12 = 2.04 s; mean 1.53 s
    rates = [ConfigRate(0, 1000.0, 4000.0), ConfigRate(1, 500.0, 2000.0)]
    p = project(rates, train_images=960, val_images=240, test_images=300, search_epochs=7, trials=4, concurrency=2,
                retrain_runs=3, retrain_epochs=2, startup_s=10.0, trial_overhead_s=1.0)
    assert p.epoch_s == pytest.approx(1.53)
    assert p.concurrency == 2
    assert p.search_s == pytest.approx(10.0 + (7 * 1.53 + 4 * 1.0) / 2)
    assert p.search_training_s == pytest.approx(7 * 1.53 / 2)
    # refits: mean rates 750 / 3000 img/s; 2 epochs of 1200 images + 300 test images + overhead, 2 rounds of 2
    refit = 2 * 1200 / 750 + 300 / 3000 + 1.0
    assert p.retrain_s == pytest.approx(10.0 + 2 * refit)
    assert p.total_s == pytest.approx(p.search_s + p.retrain_s)


def test_concurrency_is_capped_by_trials_and_refits() -> None:
    rates = [ConfigRate(0, 100.0, 100.0)]
    p = project(rates, train_images=100, val_images=0, test_images=0, search_epochs=3, trials=3, concurrency=8,
                retrain_runs=0, retrain_epochs=5, startup_s=0.0, trial_overhead_s=0.0)
    assert p.concurrency == 3 and p.search_s == pytest.approx(1.0) and p.retrain_s == 0.0
    with pytest.raises(ValueError):
        project([], train_images=1, val_images=1, test_images=1, search_epochs=1, trials=1, concurrency=1,
                retrain_runs=1, retrain_epochs=1)


def test_local_concurrency_follows_the_resources_and_the_limit() -> None:
    spec = load_spec(SMOKE)  # max_concurrent 2, 1 CPU per trial
    assert local_concurrency(spec, trials=4, cores=16, gpus=0) == 2
    assert local_concurrency(spec, trials=4, cores=1, gpus=0) == 1
    assert local_concurrency(load_spec(SMOKE, ["search.max_concurrent=null"]), trials=4, cores=16, gpus=0) == 4


@pytest.mark.parametrize("s,text", [(5, "5s"), (95, "1m35s"), (7300, "2h01m")])
def test_duration(s: float, text: str) -> None:
    assert duration(s) == text


def test_preview_time_runs_on_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["preview", str(SMOKE), "-n", "2", "--time", "--time-steps", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "total epochs: ~7 with early stopping" in out
    assert re.search(r"\[0\] [\d,]+ img/s training, [\d,]+ img/s evaluation: [\d.]+ s per epoch", out), out
    assert re.search(r"search: ~7 epochs x [\d.]+ s / \d at a time on this machine = ~\S+ training, \+ ~\S+ start-up "
                     r"and per-trial overhead \(idle machine\) -> ~\S+ wall", out), out
    assert re.search(r"retrain: 2 refits x 3 epochs on train\+val, 2 at a time -> ~\S+; search \+ retrain ~\S+", out), out
