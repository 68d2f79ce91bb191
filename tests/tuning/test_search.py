"""`cifar-tune search` end to end on Ray: ASHA, failures, divergence, resume, parquet files."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from conftest import assert_summaries_derived

from cifar_tune.cli import main
from cifar_tune.spec.parse import parse_spec

pytestmark = pytest.mark.ray

SPEC: dict[str, Any] = {
    "name": "e2e",
    "data": {"dataset": "synthetic", "synthetic": {"num_train": 600, "num_test": 100, "num_classes": 4, "image_size": 16}},
    "search": {
        "num_samples": 2, "max_concurrent": 2, "algorithm": "random", "seed": 1,
        "scheduler": {"name": "asha", "max_epochs": 4, "grace_period": 1, "reduction_factor": 2},
        "resources": {"cpus_per_trial": 1},
    },
    "space": {
        "model": {"family": "lenet", "channels": [4, 8], "padding": 2, "hidden": [16]},
        # t0000 and t0004 diverge (lr 1e30 overflows to a non-finite loss); the others learn at different speeds
        "optimizer": {"grid": [
            {"name": "sgd", "lr": 1.0e30, "momentum": 0.9},
            {"name": "sgd", "lr": 0.05, "momentum": 0.9},
            {"name": "adam", "lr": 3.0e-3},
            {"name": "sgd", "lr": 0.001},
        ]},
        "schedule": {"name": "none"},
        "augment": {"hflip": True},
        "train": {"batch_size": 32},
    },
}


def _run(spec: dict[str, Any], storage: Path, *extra: str, env: dict[str, str] | None = None,
         timeout_s: float = 240) -> subprocess.CompletedProcess[str]:
    path = storage / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    cmd = [sys.executable, "-m", "cifar_tune", "search", str(path), "--storage", str(storage), "--no-dashboard",
           "--num-cpus", "2", "--progress-every", "1", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env={**os.environ, **(env or {})})


def _show(capsys: pytest.CaptureFixture[str], line: str) -> None:
    """Fault tests show their trial counts in the CI log, not only on failure."""
    with capsys.disabled():
        print(f"\n  {line}")


def _frames(storage: Path, name: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    return pd.read_parquet(storage / name / "trials.parquet"), pd.read_parquet(storage / name / "epochs.parquet")


def _results_json(storage: Path, name: str, trial_id: str) -> list[dict[str, Any]]:
    """What Ray Tune recorded of a trial's reports, over every run of the search (for resume)."""
    rows = []
    for path in sorted((storage / name / "ray").glob(f"*/{trial_id}-*/result.json")):
        rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows


def _one_row_per_epoch(epochs: pd.DataFrame) -> None:
    """Every trial of every search: exactly one epochs row per (trial_id, epoch)."""
    dup = epochs[epochs.duplicated(["trial_id", "epoch"], keep=False)]
    assert dup.empty, dup[["trial_id", "epoch", "pid"]].to_string()


def _check_consistent(trials: pd.DataFrame, epochs: pd.DataFrame) -> None:
    """epochs.parquet and trials.parquet tell the same story, for every trial whatever its fate."""
    assert trials["trial_id"].is_unique
    assert_summaries_derived(trials, epochs)
    _one_row_per_epoch(epochs)
    for row in trials.itertuples():
        ep = epochs[epochs.trial_id == row.trial_id]
        assert len(ep) == row.epochs_run, row.trial_id
        assert list(ep.epoch) == list(range(1, row.epochs_run + 1))
        if row.status in ("completed", "stopped"):
            assert ep.val_acc.max() == pytest.approx(row.best_val_acc)
            assert ep.val_acc.iloc[-1] == pytest.approx(row.last_val_acc)


def test_search_end_to_end_with_failures(tmp_path: Path) -> None:
    spec = json.loads(json.dumps(SPEC))
    spec["search"]["max_failures"] = 1
    # t0001 raises at epoch 1 (recorded as error, search goes on); t0002 runs out of memory in its
    # first epoch; t0003's worker process dies at epoch 1 once (retried, then completes normally)
    env = {"CIFAR_TUNE_FAULTS": "t0001=raise@1,t0002=oom@1,t0003=exit@1", "CIFAR_TUNE_FAULT_DIR": str(tmp_path)}
    proc = _run(spec, tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials, epochs = _frames(tmp_path, "e2e")
    status = dict(zip(trials.trial_id, trials.status, strict=True))
    assert len(trials) == 8  # grid of 4 optimizers x num_samples 2
    assert status["t0000"] == status["t0004"] == "diverged"
    assert status["t0001"] == "error"
    assert status["t0002"] == "oom" and "injected out of memory" in trials.set_index("trial_id").loc["t0002", "error"]
    assert "injected fault in t0001" in trials.set_index("trial_id").loc["t0001", "error"]
    assert status["t0003"] in ("completed", "stopped")
    assert trials.set_index("trial_id").loc["t0003", "attempts"] == 2
    # it died before its first checkpoint, so the retry started over: every row is the new worker's
    assert epochs[epochs.trial_id == "t0003"].pid.nunique() == 1
    _one_row_per_epoch(epochs)
    assert "stopped" in status.values()  # ASHA stopped at least one trial early
    assert "completed" in status.values()
    assert not set(status.values()) - {"completed", "stopped", "diverged", "error", "oom"}
    _check_consistent(trials, epochs)  # diverged, failed, retried and OOM trials included
    ok = trials[trials.status.isin(["completed", "stopped"])]
    assert (ok.best_val_acc > 0.25).any()  # something learned above 4-class chance
    assert (trials[trials.status == "completed"].epochs_run == 4).all()
    assert (trials[trials.status == "stopped"].epochs_run < 4).all()
    # the resolved spec with versions and the flattened config columns
    stored = yaml.safe_load((tmp_path / "e2e" / "spec.yaml").read_text())
    assert stored["meta"]["ray"] and stored["meta"]["torch"]
    assert parse_spec(stored["spec"]).search.num_samples == 2
    assert set(trials["config.optimizer.name"]) == {"sgd", "adam"}
    assert f"top {len(ok)} by best val_acc" in proc.stdout  # the final leaderboard
    # workers are reused and get the data set from the driver through the object store: no worker
    # reads or generates it (the per-process load counter stays 0), let alone once per trial
    assert (epochs.worker_data_loads == 0).all()
    assert epochs.pid.nunique() < len(trials)
    # TensorBoard event files from Ray Tune's logger
    assert list((tmp_path / "e2e" / "ray").rglob("events.out.tfevents*"))


def test_second_search_with_same_name_refuses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "e2e").mkdir()
    (tmp_path / "e2e" / "spec.yaml").write_text("spec: {}\n")
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(SPEC))
    assert main(["search", str(path), "--storage", str(tmp_path), "--no-dashboard"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["search", str(path), "--storage", str(tmp_path), "--name", "other", "--resume"]) == 2
    assert "no experiment 'other'" in capsys.readouterr().err


def test_resume_after_killing_the_driver(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Checkpoints every epoch. t0000's worker dies at epoch 2: it is retried from its epoch-1
    checkpoint. The driver is SIGKILLed while a trial is between epochs: --resume keeps the finished
    trials and continues that one after its last checkpointed epoch (no epoch trained twice)."""
    spec = json.loads(json.dumps(SPEC))
    spec["name"] = "killed"
    spec["search"].update(num_samples=3, max_concurrent=1, max_failures=1, scheduler={"name": "fifo", "max_epochs": 4})
    spec["space"]["optimizer"] = {"name": "sgd", "lr": {"loguniform": [0.01, 0.1]}, "momentum": 0.9}
    path = tmp_path / "killed.yaml"
    path.write_text(yaml.safe_dump(spec))
    cmd = [sys.executable, "-m", "cifar_tune", "search", str(path), "--storage", str(tmp_path), "--no-dashboard", "--num-cpus", "2"]
    # t0000's worker dies at epoch 2 (after checkpointing epoch 1); t0001 runs out of memory in epoch 2
    # (after reporting epoch 1); t0002 stalls after training epoch 3: the driver is killed while it
    # waits (its last checkpoint: epoch 2)
    env = {**os.environ, "CIFAR_TUNE_FAULTS": "t0000=exit@2,t0001=oom@2,t0002=hang@3", "CIFAR_TUNE_FAULT_DIR": str(tmp_path)}
    log = open(tmp_path / "driver.log", "w")  # noqa: SIM115 - the driver writes to it until killed
    driver = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    trials_path = tmp_path / "killed" / "trials.parquet"
    deadline = time.monotonic() + 180
    victim = None
    while time.monotonic() < deadline and victim is None and driver.poll() is None:
        time.sleep(0.5)
        if trials_path.exists():
            t = pd.read_parquet(io.BytesIO(trials_path.read_bytes()))  # one read: the driver replaces the file
            if "checkpoint_epoch" in t and (t.status == "completed").sum() >= 1:
                mid = t[(t.trial_id == "t0002") & (t.status == "running") & (t.checkpoint_epoch == 2)]
                victim = mid.iloc[0] if len(mid) else None
    assert victim is not None, "t0002 was not caught between epochs 2 and 3:\n" + (tmp_path / "driver.log").read_text()[-3000:]
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray instance it started
    driver.wait(timeout=30)
    before = pd.read_parquet(trials_path)  # what was on disk when the driver died
    epochs_before = pd.read_parquet(tmp_path / "killed" / "epochs.parquet")
    finished_before = before[before.status.isin(["completed", "oom"])].set_index("trial_id")
    vid = victim.trial_id
    k = int(before.set_index("trial_id").loc[vid, "checkpoint_epoch"])
    _show(capsys, f"resume test, before SIGKILL of the driver: {len(finished_before)} finished of {len(before)} trials, "
                  f"{vid} checkpointed at epoch {k}")

    proc = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{len(finished_before)} finished trials kept, 1 unfinished continue from their last checkpoint" in proc.stdout
    stored = yaml.safe_load((tmp_path / "killed" / "spec.yaml").read_text())
    assert len(stored["resumes"]) == 1 and stored["resumes"][0]["num_samples"] == 3  # the resume is on record
    after, epochs = _frames(tmp_path, "killed")
    _show(capsys, f"resume test, after --resume: {after.status.isin(['completed', 'oom']).sum()} finished of {len(after)} "
                  f"trials ({ {k: int(v) for k, v in after.status.value_counts().items()} })")
    assert len(after) == 3 and after.trial_id.is_unique
    status = after.set_index("trial_id").status
    assert status["t0001"] == "oom" and after.set_index("trial_id").epochs_run["t0001"] == 1
    assert (status.drop("t0001") == "completed").all()
    kept = after.set_index("trial_id").loc[finished_before.index]
    # finished trials were neither lost nor repeated: same results, same single attempt
    assert (kept.best_val_acc == finished_before.best_val_acc).all()
    assert (kept.started_at == finished_before.started_at).all()
    _check_consistent(after, epochs)  # epochs 1..4 of every trial, exactly once
    # the victim's epochs 1..k are the rows trained before the kill; the resumed run trained k+1.. only
    mine, old = epochs[epochs.trial_id == vid].set_index("epoch"), epochs_before[epochs_before.trial_id == vid].set_index("epoch")
    assert list(mine.index) == [1, 2, 3, 4]
    for e in range(1, k + 1):
        assert mine.loc[e, "pid"] == old.loc[e, "pid"] and mine.loc[e, "val_acc"] == old.loc[e, "val_acc"]
    resumed = [r["epoch"] for r in _results_json(tmp_path, "killed", vid) if r.get("epoch")]
    assert resumed == sorted(resumed) and len(resumed) == len(set(resumed)) == 4  # Tune saw no epoch twice
    # t0000's worker died at epoch 2: the retry continued from the epoch-1 checkpoint in a new process
    t0 = epochs[epochs.trial_id == "t0000"].set_index("epoch")
    assert after.set_index("trial_id").loc["t0000", "attempts"] == 2
    assert t0.loc[1, "pid"] != t0.loc[2, "pid"] == t0.loc[4, "pid"]
    # a finished trial keeps exactly one checkpoint, its last, and it is where trials.parquet says
    for row in after.itertuples():
        dirs = list((tmp_path / "killed" / "ray").glob(f"*/{row.trial_id}-*/checkpoint_*"))
        assert [str(d.relative_to(tmp_path / "killed")) for d in dirs] == [row.checkpoint], row.trial_id
        assert row.checkpoint_epoch == row.epochs_run


@pytest.mark.slow
@pytest.mark.parametrize("algorithm,scheduler", [("optuna", "hyperband"), ("grid", "median")])
def test_other_algorithms_and_schedulers(algorithm: str, scheduler: str, tmp_path: Path) -> None:
    spec = json.loads(json.dumps(SPEC))
    spec["name"] = f"{algorithm}-{scheduler}"
    # hyperband: 6 trials over 4 epochs make a bracket that halves at epoch 2, pausing its trials there;
    # no max_concurrent (Tune counts paused trials against it: the bracket would never fill)
    hb = scheduler == "hyperband"
    spec["search"].update(algorithm=algorithm, num_samples=6 if hb else 4 if algorithm == "optuna" else 1,
                          scheduler={"name": scheduler, "max_epochs": 4 if hb else 3, "grace_period": 1})
    if hb:
        del spec["search"]["max_concurrent"]
    # a conditional space: each optimizer with its own range (Optuna suggests define-by-run)
    spec["space"]["optimizer"] = {"choice": [
        {"name": "sgd", "lr": {"loguniform": [0.01, 0.1]} if algorithm == "optuna" else {"grid": [0.01, 0.1]}, "momentum": 0.9},
        {"name": "adam", "lr": {"loguniform": [1e-3, 1e-2]} if algorithm == "optuna" else 3e-3},
    ]}
    if algorithm == "grid":
        spec["search"]["algorithm"] = "grid"
    proc = _run(spec, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials, epochs = _frames(tmp_path, spec["name"])
    assert len(trials) == (6 if hb else 4 if algorithm == "optuna" else 3)  # grid: sgd x 2 lrs + adam
    assert trials.status.isin(["completed", "stopped"]).all()
    _check_consistent(trials, epochs)
    opt = trials["config.optimizer.name"]
    if algorithm == "grid":
        assert sorted(zip(opt, trials["config.optimizer.lr"], strict=True)) == [("adam", 3e-3), ("sgd", 0.01), ("sgd", 0.1)]
    for row in trials.itertuples():
        cfg = json.loads(row.config)
        keys = set(cfg["optimizer"])
        assert keys == ({"name", "lr", "momentum"} if cfg["optimizer"]["name"] == "sgd" else {"name", "lr"})
    if scheduler == "hyperband":
        # hyperband pauses trials at its milestones and continues them from their checkpoints: the same
        # attempt, and Tune saw each epoch once (a trial rerun from epoch 1 would report epoch 1 again)
        assert (trials.attempts == 1).all()
        continued = 0
        for tid in trials.trial_id:
            seen = [r for r in _results_json(tmp_path, spec["name"], tid) if r.get("epoch")]
            assert [r["epoch"] for r in seen] == sorted({r["epoch"] for r in seen}), tid
            continued += any(r["iterations_since_restore"] == 1 and r["epoch"] > 1 for r in seen)
        assert continued >= 1, "no trial was paused and continued from its checkpoint"
        assert (trials.status == "stopped").any()  # and the brackets halved


@pytest.mark.slow
@pytest.mark.parametrize("synch", [True, False], ids=["synch", "async"])
def test_pbt_smoke_search_exploits_and_records_lineage(tmp_path: Path, synch: bool,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """search_spaces/smoke_pbt.yaml as shipped (and with asynchronous PBT): trials copy better trials'
    checkpoints, the epochs table says from whom and what changed, the new hyperparameters are the ones
    that trained, and every trial completes and keeps one checkpoint that evaluates on the validation
    split to the val_acc of its last epoch."""
    shipped = yaml.safe_load((Path(__file__).parents[2] / "search_spaces" / "smoke_pbt.yaml").read_text())
    shipped["search"]["scheduler"]["synch"] = synch
    proc = _run(shipped, tmp_path, timeout_s=900)  # ~1 min alone; 7 min seen with the 2 cores oversubscribed
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials, epochs = _frames(tmp_path, "smoke_pbt")
    assert len(trials) == 4 and (trials.status == "completed").all() and (trials.attempts == 1).all()
    _one_row_per_epoch(epochs)
    assert (epochs.groupby("trial_id").epoch.max() == 6).all()
    exploits = epochs[epochs.restored_from.notna()]
    # synchronous PBT ranks the whole population at each interval, so its bottom trial exploits; the
    # asynchronous one ranks whoever has reported when a trial reaches an interval, which depends on the
    # order the trials arrive in (on a loaded machine, possibly never the bottom one): its exploits, if
    # any, are checked below, and its records under a forced exploit in test_results/test_retrain
    if synch:
        assert len(exploits) >= 1, proc.stdout[-3000:]
    bounds = {"optimizer.lr": (1e-3, 0.3), "optimizer.momentum": (0.5, 0.99)}
    for row in exploits.itertuples():
        assert row.restored_from in set(trials.trial_id) - {row.trial_id}
        assert f"{row.trial_id} continues from {row.restored_from}'s checkpoint at epoch {row.epoch}" in proc.stdout
        changes = json.loads(row.config_changes)
        for key, (low, high) in bounds.items():
            if key in changes:
                assert low <= changes[key] <= high  # perturbed (x0.8/x1.2) values are clipped to the range
        if "optimizer.lr" in changes:  # schedule none: the lr that trained this epoch is the new one
            assert row.lr == pytest.approx(changes["optimizer.lr"])
            assert f"optimizer.lr={changes['optimizer.lr']:.4g}" in proc.stdout  # the search's line says so
    for tid, ep in epochs.groupby("trial_id"):
        final = json.loads(trials.set_index("trial_id").loc[tid, "config"])
        assert ep.sort_values("epoch").lr.iloc[-1] == pytest.approx(final["optimizer"]["lr"])  # the config in force
    # every trial keeps one checkpoint, of its last epoch; `cifar-tune evaluate --split val` reproduces
    # that epoch's val_acc (in this process: one torch import instead of one per trial)
    for row in trials.itertuples():
        assert row.checkpoint_epoch == 6, row.trial_id
        assert len(list((tmp_path / "smoke_pbt" / row.checkpoint).parent.glob("checkpoint_*"))) == 1, row.trial_id
        capsys.readouterr()
        assert main(["evaluate", str(tmp_path / "smoke_pbt" / row.checkpoint), "--split", "val"]) == 0
        assert f"top-1 {row.last_val_acc:.4f}" in capsys.readouterr().out, row.trial_id


def test_pbt_scheduler_keeps_the_trial_id_and_clips_to_the_ranges() -> None:
    """Ray's explore step on our config shape (no Ray instance needed): the copier keeps its own id,
    only mutated keys change, and every perturbed value stays inside the YAML's range."""
    import random
    from types import SimpleNamespace

    from ray.tune.schedulers import PopulationBasedTraining

    from cifar_tune.spec.schema import SchedulerSpec
    from cifar_tune.tuning.schedulers import make_scheduler

    mutations = {"optimizer": {"lr": {"loguniform": [1e-3, 0.3]}, "momentum": {"uniform": [0.5, 0.99]}},
                 "train": {"label_smoothing": {"choice": [0.0, 0.05, 0.1]}}}
    pbt = make_scheduler(SchedulerSpec(name="pbt", max_epochs=6, mutations=mutations, resample_probability=0.0))
    assert isinstance(pbt, PopulationBasedTraining)
    donor_cfg = {"model": {"family": "lenet"}, "optimizer": {"name": "sgd", "lr": 0.29, "momentum": 0.98},
                 "train": {"batch_size": 32, "label_smoothing": 0.1}}
    donor = SimpleNamespace(config={"trial_id": "t0001", "config": donor_cfg})
    me = SimpleNamespace(config={"trial_id": "t0003", "config": {**donor_cfg, "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.6}}})
    random.seed(0)
    seen_lr = set()
    for _ in range(40):
        new, _ops = pbt._get_new_config(me, donor)
        assert new["trial_id"] == "t0003"
        cfg = new["config"]
        assert cfg["model"] == donor_cfg["model"] and cfg["train"]["batch_size"] == 32
        assert 1e-3 <= cfg["optimizer"]["lr"] <= 0.3 and 0.5 <= cfg["optimizer"]["momentum"] <= 0.99
        assert cfg["train"]["label_smoothing"] in (0.05, 0.1)  # a neighbour of 0.1 (or 0.1 at the end of the list)
        seen_lr.add(round(cfg["optimizer"]["lr"], 6))
    assert seen_lr == {round(0.29 * 0.8, 6), 0.3}  # x0.8, or x1.2 clipped to the top of the range


def test_pbt_never_exploits_at_the_last_epoch() -> None:
    """No Ray instance: a trial in the bottom quantile reports its last epoch while a better trial has a
    checkpoint to copy. Ray's PBT would exploit it (pause it, swap in the donor's checkpoint and config,
    then train nothing under them); ours lets it complete with its own last epoch and touches nothing.
    One epoch earlier the same trial is exploited."""
    from types import SimpleNamespace

    from ray.tune.schedulers.pbt import _PBTTrialState

    from cifar_tune.spec.schema import SchedulerSpec
    from cifar_tune.tuning.schedulers import make_scheduler

    pbt = make_scheduler(SchedulerSpec(name="pbt", max_epochs=4, perturbation_interval=1, resample_probability=0.0,
                                       mutations={"optimizer": {"lr": {"loguniform": [1e-3, 0.3]}}}))
    pbt.set_search_properties("val_acc", "max")

    class Trial(SimpleNamespace):
        __hash__ = object.__hash__  # PBT keys its state by trial

        def is_finished(self) -> bool:
            return False

    def trial(tid: str) -> Trial:
        return Trial(config={"trial_id": tid, "config": {"optimizer": {"name": "sgd", "lr": 0.01}}},
                     experiment_tag=tid, status="RUNNING", trial_id=tid)

    weak, strong = trial("t0000"), trial("t0001")
    for t, score in ((weak, 0.1), (strong, 0.9)):
        pbt._trial_state[t] = _PBTTrialState(t)
        pbt._trial_state[t].last_score, pbt._trial_state[t].last_train_time = score, 3
    pbt._trial_state[strong].last_checkpoint = "the donor's checkpoint"
    calls: list[str] = []

    class Controller:
        def __getattr__(self, name: str) -> Any:
            calls.append(name)
            raise AssertionError(f"PBT called tune_controller.{name}")

    assert pbt.on_trial_result(Controller(), weak, {"epoch": 4, "val_acc": 0.1}) == "CONTINUE"
    assert calls == [] and weak.config["config"]["optimizer"]["lr"] == 0.01
    with pytest.raises(AssertionError, match="tune_controller"):  # epoch 3 of 4: an exploit is still worth it
        pbt.on_trial_result(Controller(), weak, {"epoch": 3, "val_acc": 0.1})


def test_synchronous_pbt_goes_on_when_a_straggler_leaves() -> None:
    """No Ray instance: t0000 and t0001 wait (paused) at the epoch-2 interval for t0002, which fails in
    epoch 2 instead of reporting it. Ray's PBT would wait for it for good; ours perturbs the two that are
    left (the failed trial is no longer ranked) and lets them go on to the next interval."""
    from types import SimpleNamespace

    from ray.tune.experiment import Trial as RayTrial
    from ray.tune.schedulers.pbt import _PBTTrialState

    from cifar_tune.spec.schema import SchedulerSpec
    from cifar_tune.tuning.schedulers import make_scheduler

    pbt = make_scheduler(SchedulerSpec(name="pbt", max_epochs=6, perturbation_interval=2, synch=True, quantile_fraction=0.5,
                                       mutations={"optimizer": {"lr": {"loguniform": [1e-3, 0.3]}}}))
    pbt.set_search_properties("val_acc", "max")

    class Trial(SimpleNamespace):
        __hash__ = object.__hash__

        def is_finished(self) -> bool:
            return False

    waiting = [Trial(trial_id=f"t000{i}", experiment_tag="", status=RayTrial.PAUSED) for i in range(2)]
    straggler = Trial(trial_id="t0002", experiment_tag="", status=RayTrial.RUNNING)
    for t, (score, epoch) in zip([*waiting, straggler], [(0.2, 2), (0.8, 2), (0.9, 0)], strict=True):
        pbt._trial_state[t] = _PBTTrialState(t)
        pbt._trial_state[t].last_score, pbt._trial_state[t].last_train_time = score, epoch
    pbt._next_perturbation_sync = 2
    perturbed: list[tuple[str, list[str], list[str]]] = []
    pbt._checkpoint_or_exploit = lambda t, c, upper, lower: perturbed.append(
        (t.trial_id, [u.trial_id for u in upper], [lo.trial_id for lo in lower]))
    controller = SimpleNamespace(get_live_trials=lambda: [*waiting, straggler])
    pbt.on_trial_error(controller, straggler)
    assert sorted(perturbed) == [("t0000", ["t0001"], ["t0000"]), ("t0001", ["t0001"], ["t0000"])]
    assert pbt._next_perturbation_sync == 4  # the next interval: choose_trial_to_run picks them again
    assert pbt.choose_trial_to_run(SimpleNamespace(get_trials=lambda: [*waiting, straggler])) in waiting


def test_synchronous_pbt_runs_again_when_every_live_trial_waits_at_the_sync_point() -> None:
    """No Ray instance: nothing runs, two trials wait (paused) at the epoch-2 sync point and a third, back
    from a dead worker by another path, is pending there too: no report is left to perturb them. Ray's
    PBT would choose none of them, for good; ours perturbs the paused two, lets all three past the sync
    point, and chooses one to run."""
    from types import SimpleNamespace

    from ray.tune.experiment import Trial as RayTrial
    from ray.tune.schedulers.pbt import _PBTTrialState

    from cifar_tune.spec.schema import SchedulerSpec
    from cifar_tune.tuning.schedulers import make_scheduler

    pbt = make_scheduler(SchedulerSpec(name="pbt", max_epochs=6, perturbation_interval=2, synch=True, quantile_fraction=0.5,
                                       mutations={"optimizer": {"lr": {"loguniform": [1e-3, 0.3]}}}))
    pbt.set_search_properties("val_acc", "max")

    class Trial(SimpleNamespace):
        __hash__ = object.__hash__

        def is_finished(self) -> bool:
            return False

    paused = [Trial(trial_id=f"t000{i}", experiment_tag="", status=RayTrial.PAUSED) for i in range(2)]
    pending = Trial(trial_id="t0002", experiment_tag="", status=RayTrial.PENDING)
    everyone = [*paused, pending]
    for t, score in zip(everyone, [0.2, 0.8, 0.5], strict=True):
        pbt._trial_state[t] = _PBTTrialState(t)
        pbt._trial_state[t].last_score, pbt._trial_state[t].last_train_time = score, 2
    pbt._next_perturbation_sync = 2
    perturbed: list[str] = []
    pbt._checkpoint_or_exploit = lambda t, c, upper, lower: perturbed.append(t.trial_id)
    controller = SimpleNamespace(get_live_trials=lambda: everyone, get_trials=lambda: everyone)
    assert pbt.choose_trial_to_run(controller) in everyone
    assert sorted(perturbed) == ["t0000", "t0001"] and pbt._next_perturbation_sync == 4
    pending.status = RayTrial.RUNNING  # while one runs, the others wait for its report as Ray's PBT does
    pbt._next_perturbation_sync = 2
    assert pbt.choose_trial_to_run(controller) is None and pbt._next_perturbation_sync == 2


@pytest.mark.parametrize("cpus,gpus,cpu,gpu,expected", [
    (1, 0, 0.1, 0, 10),  # 1 // 0.1 == 9.0 in floats
    (0.9, 0, 0.3, 0, 3),  # 0.9 // 0.3 == 2.0
    (2, 0, 0.7, 0, 2),
    (16, 1, 1, 0.1, 10),  # 1 // 0.1 GPUs
    (16, 2, 1, 0.3, 6),
    (1, 0, 2, 0, 1),  # at least one
])
def test_concurrent_slots_count_like_ray(cpus: float, gpus: float, cpu: float, gpu: float, expected: int) -> None:
    """No Ray started: the count uses Ray's fixed-point resource units, as its scheduler does."""
    from cifar_tune.tuning.driver import concurrent_slots

    assert concurrent_slots(cpus, gpus, {"cpu": cpu, "gpu": gpu}) == expected


def test_optuna_is_told_metrics_at_a_comparable_fidelity(tmp_path: Path) -> None:
    """No Ray: a trial ASHA stopped after 1 epoch is PRUNED with its per-epoch values, not COMPLETE with a
    1-epoch score next to full runs; a full run is COMPLETE with its best value; a diverged one FAIL."""
    import optuna

    from cifar_tune.results import Experiment, TrialLog
    from cifar_tune.tuning.sources import OptunaSource

    raw = json.loads(json.dumps(SPEC))
    raw["search"].update(algorithm="optuna", num_samples=3)
    raw["space"]["optimizer"] = {"name": "sgd", "lr": {"loguniform": [0.01, 0.1]}}
    spec = parse_spec(raw)
    log = TrialLog(Experiment(str(tmp_path), "opt"), metric="val_acc", mode="max", max_epochs=4, flush_every_s=1e9)
    source = OptunaSource(spec, log, [], 0, 3)
    runs = {"stopped": [0.9], "full": [0.3, 0.5, 0.45, 0.4], "diverged": [0.2]}
    ids = {}
    for kind, accs in runs.items():
        tid, _ = source.next_trial()
        ids[kind] = tid
        log.trial_started(tid, {})
        for e, acc in enumerate(accs, 1):
            log.trial_result(tid, {"epoch": e, "val_acc": acc})
        last = {"status": "diverged"} if kind == "diverged" else {"val_acc": accs[-1]}
        log.trial_finished(tid, last)
        source.trial_finished(tid, last, error=False)
    trials = {t.number: t for t in source.study.trials}
    stopped, full, diverged = (trials[int(ids[k][1:])] for k in ("stopped", "full", "diverged"))
    assert stopped.state == optuna.trial.TrialState.PRUNED and stopped.intermediate_values == {1: 0.9}
    assert full.state == optuna.trial.TrialState.COMPLETE and full.value == 0.5
    assert full.intermediate_values == {1: 0.3, 2: 0.5, 3: 0.45, 4: 0.4}
    assert diverged.state == optuna.trial.TrialState.FAIL
    assert source.study.best_trial.number == full.number  # the 1-epoch 0.9 does not win
