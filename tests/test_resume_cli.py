"""Starting, refusing and continuing a search from the command line: nothing is written or downloaded
before the checks that can refuse, a wrong address fails in seconds, Ctrl-C exits 130 with a command
that continues the search from its stored spec."""

from __future__ import annotations

import io
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from trackers import (
    mlflow_search_runs,
    mlflow_steps,
    run_in_own_session,
    tensorboard_scalars,
    wandb_runs_by_id,
)

from cifar_tune.cli import main
from cifar_tune.engine import data
from cifar_tune.results import trial_label
from cifar_tune.spec.schema import DataSpec

SPEC: dict[str, Any] = {
    "name": "cli",
    "data": {"dataset": "synthetic", "synthetic": {"num_train": 400, "num_test": 50, "num_classes": 4, "image_size": 16}},
    "search": {
        "num_samples": 1, "max_concurrent": 1, "seed": 2,
        "scheduler": {"name": "fifo", "max_epochs": 3},
        "resources": {"cpus_per_trial": 1},
    },
    "space": {
        "model": {"family": "mlp", "hidden": [16]},
        "optimizer": {"name": "sgd", "lr": {"loguniform": [0.01, 0.1]}, "momentum": 0.9},
        "schedule": {"name": "none"},
        "train": {"batch_size": 32},
    },
}


def _write(tmp_path: Path, spec: dict[str, Any]) -> Path:
    path = tmp_path / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_a_bad_address_fails_in_seconds_and_writes_nothing(tmp_path: Path) -> None:
    """Nothing listens on port 9 (discard): one line, exit 2, and no experiment left behind, so the
    corrected command is not refused with "already exists"."""
    path = _write(tmp_path, SPEC)
    cmd = [sys.executable, "-m", "cifar_tune", "search", str(path), "--storage", str(tmp_path / "exp"),
           "--address", "127.0.0.1:9", "--no-dashboard"]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=190)
    took_s = time.monotonic() - t0
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "127.0.0.1:9" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    # Ray's own retries took over 200 s; the check answers in under 10 s plus the start-up of a Python
    # process importing torch and Ray (tens of seconds on a loaded machine)
    assert took_s < 150
    assert not (tmp_path / "exp" / "cli").exists()


def test_resume_refuses_before_the_data_is_prepared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A resume of a missing experiment, or a new search over an existing one, is refused before the
    data set is downloaded (for CIFAR, minutes of download for nothing)."""
    prepared: list[Any] = []
    monkeypatch.setattr(data, "prepare", prepared.append)
    path = _write(tmp_path, SPEC)
    storage = str(tmp_path / "exp")
    assert main(["search", str(path), "--storage", storage, "--resume", "--no-dashboard"]) == 2
    assert "no experiment 'cli'" in capsys.readouterr().err
    assert main(["search", "--resume", "cli", "--storage", storage]) == 2
    assert "no experiment 'cli'" in capsys.readouterr().err
    (tmp_path / "exp" / "cli").mkdir(parents=True)
    (tmp_path / "exp" / "cli" / "spec.yaml").write_text(yaml.safe_dump({"spec": SPEC}))
    assert main(["search", str(path), "--storage", storage, "--no-dashboard"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert prepared == []


def test_search_needs_a_spec_or_a_name_to_resume(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["search"]) == 2
    assert "--resume NAME" in capsys.readouterr().err
    assert main(["search", "--resume", "a", "--name", "b"]) == 2
    assert "different experiments" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["parent missing", "download off"])
def test_a_missing_data_root_is_refused_not_created(case: str, tmp_path: Path) -> None:
    """A mistyped ``data.root`` is an error naming it, not a new directory with a ``.lock`` in it."""
    root = tmp_path / "typo" / "cifar" if case == "parent missing" else tmp_path / "cifra"
    spec = DataSpec(dataset="cifar10", root=str(root), download=case != "download off")
    with pytest.raises(data.DataError, match=r"data\.root .* does not exist") as err:
        data.prepare(spec)
    assert "\n" not in str(err.value)
    assert not root.exists() and not root.parent.joinpath(".lock").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_new_root_is_created_for_the_download_in_an_existing_directory(tmp_path: Path, fake_cifar: Any) -> None:
    fake_cifar("cifar10", per_file=4)
    root = tmp_path / "new-root"
    data.prepare(DataSpec(dataset="cifar10", root=str(root), download=True))
    assert (root / data.CIFAR_SOURCES["cifar10"].folder).is_dir()


@pytest.mark.ray
@pytest.mark.slow
def test_ctrl_c_exits_130_and_the_printed_command_continues_the_search(tmp_path: Path) -> None:
    """Started with --set overrides; Ctrl-C while t0000 stalls after its epoch-2 training: exit 130 and
    a command that, run as printed, finishes the search with the same overrides (exit 0). The trackers
    continue each trial's run at its epochs: t0000's epoch 2, trained after the resume, is step 2 of
    the run that has its epoch 1 (Ray's training_iteration restarts at 1)."""
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    spec = {**SPEC, "search": {**SPEC["search"], "checkpoint": {"every_epochs": 1}},
            "tracking": {"mlflow": {"uri": str(tmp_path / "mlruns")},
                         "wandb": {"project": "cifar-tune-tests", "mode": "offline", "dir": str(tmp_path / "wb")}}}
    path = _write(tmp_path, spec)
    storage = tmp_path / "exp"
    machine = ["--no-dashboard", "--num-cpus", "2", "--progress-every", "1"]  # this machine, not the search
    env = {**os.environ, "CIFAR_TUNE_FAULTS": "t0000=hang@2", "CIFAR_TUNE_FAULT_DIR": str(tmp_path)}
    cmd = [sys.executable, "-m", "cifar_tune", "search", str(path), "--storage", str(storage),
           "--set", "search.num_samples=2", "--set", "search.scheduler.max_epochs=2", *machine]
    log = open(tmp_path / "driver.log", "w")  # noqa: SIM115 - the driver writes to it while it runs
    driver = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        trials_path = storage / "cli" / "trials.parquet"
        deadline, caught = time.monotonic() + 180, False
        while time.monotonic() < deadline and not caught and driver.poll() is None:
            time.sleep(0.5)
            if trials_path.exists():
                t = pd.read_parquet(io.BytesIO(trials_path.read_bytes()))  # one read: the driver replaces the file
                caught = "checkpoint_epoch" in t and bool(((t.trial_id == "t0000") & (t.status == "running") & (t.checkpoint_epoch == 1)).any())
        assert caught, (tmp_path / "driver.log").read_text()[-3000:]
        driver.send_signal(signal.SIGINT)  # Ctrl-C reaches the driver only (its Ray instance stops with it)
        assert driver.wait(timeout=120) == 130, (tmp_path / "driver.log").read_text()[-3000:]
    finally:
        if driver.poll() is None:  # a failed test leaves no driver or Ray instance behind
            os.killpg(driver.pid, signal.SIGKILL)
    out = (tmp_path / "driver.log").read_text()
    hint = [ln.split("continue with: ", 1)[1] for ln in out.splitlines() if "continue with: " in ln]
    assert hint == [f"cifar-tune search --resume cli --storage {storage}"], out[-3000:]
    resumed = run_in_own_session([sys.executable, "-m", "cifar_tune", *shlex.split(hint[0])[1:], *machine], env=env, timeout_s=240)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert "0 finished trials kept, 1 unfinished continue from their last checkpoint" in resumed.stdout
    trials = pd.read_parquet(trials_path)
    assert sorted(trials.trial_id) == ["t0000", "t0001"]  # num_samples=2 came from the stored spec
    assert (trials.status == "completed").all() and (trials.epochs_run == 2).all()  # and max_epochs=2
    epochs = pd.read_parquet(storage / "cli" / "epochs.parquet")
    client, runs = mlflow_search_runs(tmp_path / "mlruns", "cli")
    assert sorted(r.data.params["trial_id"] for r in runs) == ["t0000", "t0001"]  # one run per trial
    wb = wandb_runs_by_id(tmp_path / "wb")
    assert len(wb) == 2 and max(r["files"] for r in wb.values()) == 2  # t0000's run, continued in a second file
    for run in runs:
        tid = run.data.params["trial_id"]
        assert run.info.status == "FINISHED" and run.data.tags["cifar_tune.status"] == "completed"
        ep = epochs[epochs.trial_id == tid].sort_values("epoch")
        expected = [(int(e), pytest.approx(v)) for e, v in zip(ep.epoch, ep.val_acc, strict=True)]
        assert mlflow_steps(client, run.info.run_id, "val_acc") == expected, tid
        name = trial_label(tid, json.loads(trials.set_index("trial_id").config[tid]))
        assert tensorboard_scalars(storage / "cli" / "ray", name, "ray/tune/val_acc") == expected, tid
        (w,) = [r for r in wb.values() if name in r["names"]]
        assert sorted((s, it["val_acc"]) for s, it in w["steps"]) == expected, tid
