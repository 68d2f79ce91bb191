"""``--resume`` that is exact: the scheduler's state rebuilt from the recorded epochs (its decisions
equal an uninterrupted run's, fed the same results), Optuna told the finished trials again (no
repeated configs), and every scheduler's search killed mid-run (driver SIGKILL) and resumed to the end."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pytest
import yaml
from conftest import assert_summaries_derived
from trackers import run_in_own_session

from cifar_tune.results import FINISHED
from cifar_tune.spec.schema import SchedulerSpec

# ------------------------------------------------------------------ scheduler state, without Ray trials


class _Controller:
    """What a scheduler asks of Tune's controller: no trial is waiting (median stopping would yield)."""

    def get_live_trials(self) -> list[Any]:
        return []


def _results(seed: int, trials: int, epochs: int) -> list[tuple[str, int, float]]:
    """Per-epoch val_acc of ``trials`` trials, interleaved as a search with 2 slots would report them:
    each trial learns at its own rate, with noise; arrival order is shuffled within each epoch."""
    rng = random.Random(seed)
    rate = {f"t{i:04d}": rng.uniform(0.02, 0.2) for i in range(trials)}
    curves = {t: [min(1.0, 0.25 + r * e + rng.gauss(0, 0.03)) for e in range(1, epochs + 1)] for t, r in rate.items()}
    events = []
    order = list(rate)
    for start in range(0, trials, 2):  # two at a time, epoch by epoch, in a random order
        pair = order[start:start + 2]
        for e in range(1, epochs + 1):
            rng.shuffle(pair)
            events += [(t, e, curves[t][e - 1]) for t in pair]
    return events


def _uninterrupted(sched: SchedulerSpec, events: list[tuple[str, int, float]]) -> list[tuple[str, int, float, str]]:
    """Feed every result to one scheduler as Tune would; a stopped trial reports nothing more."""
    from cifar_tune.tuning.schedulers import make_scheduler

    s = make_scheduler(sched)
    s.set_search_properties("val_acc", "max")
    ctrl, trials, done, seen = _Controller(), {}, set(), []
    for tid, epoch, acc in events:
        if tid in done:
            continue
        if tid not in trials:
            trials[tid] = SimpleNamespace(trial_id=f"ray-a-{tid}", config={"trial_id": tid}, status="RUNNING")
            s.on_trial_add(ctrl, trials[tid])
        result = {"epoch": epoch, "val_acc": acc}
        action = s.on_trial_result(ctrl, trials[tid], result)
        seen.append((tid, epoch, acc, action))
        if action == "STOP" or epoch == sched.max_epochs:
            s.on_trial_complete(ctrl, trials[tid], result)
            done.add(tid)
    return seen


def _resumed(sched: SchedulerSpec, seen: list[tuple[str, int, float, str]], k: int, rebuild: bool) -> list[str]:
    """The driver dies after the k-th result; a new one (new Ray trial ids) takes the rest."""
    from cifar_tune.tuning.schedulers import make_scheduler

    before = seen[:k]
    finished = {t for t, e, _, a in before if a == "STOP" or e == sched.max_epochs}
    history = [(t, {"epoch": e, "val_acc": acc}, t in finished) for t, e, acc, _ in before]
    s = make_scheduler(sched, history if rebuild else None)
    s.set_search_properties("val_acc", "max")
    ctrl, trials, actions, done = _Controller(), {}, [], set()
    for tid, epoch, acc, _ in seen[k:]:
        if tid in done:  # this scheduler stopped it earlier than the uninterrupted one did
            actions.append("(never reported)")
            continue
        if tid not in trials:
            trials[tid] = SimpleNamespace(trial_id=f"ray-b-{tid}", config={"trial_id": tid}, status="RUNNING")
            s.on_trial_add(ctrl, trials[tid])
        result = {"epoch": epoch, "val_acc": acc}
        action = s.on_trial_result(ctrl, trials[tid], result)
        actions.append(action)
        if action == "STOP" or epoch == sched.max_epochs:
            s.on_trial_complete(ctrl, trials[tid], result)
            done.add(tid)
    return actions


@pytest.mark.parametrize("sched", [
    SchedulerSpec(name="asha", max_epochs=8, grace_period=1, reduction_factor=2),
    SchedulerSpec(name="asha", max_epochs=9, grace_period=1, reduction_factor=3, brackets=1),
    SchedulerSpec(name="median", max_epochs=6, grace_period=1),
    SchedulerSpec(name="mo_asha", max_epochs=8, grace_period=1, reduction_factor=2),
], ids=["asha-rf2", "asha-rf3", "median", "mo_asha"])
def test_a_rebuilt_scheduler_decides_like_an_uninterrupted_one(sched: SchedulerSpec) -> None:
    """Ray's own schedulers, fed recorded results: killed after any result and rebuilt from the
    results so far, the scheduler stops and continues exactly the trials the uninterrupted one did.
    A scheduler that starts afresh (what Tune's restore gives) decides differently."""
    diverged_at = []
    for seed in range(3):
        seen = _uninterrupted(sched, _results(seed, trials=10, epochs=sched.max_epochs))
        assert any(a == "STOP" and e < sched.max_epochs for _, e, _, a in seen)  # the scheduler does stop trials
        for k in range(1, len(seen)):
            expected = [a for *_, a in seen[k:]]
            assert _resumed(sched, seen, k, rebuild=True) == expected, f"seed {seed}, killed after result {k}"
            if _resumed(sched, seen, k, rebuild=False) != expected:
                diverged_at.append((seed, k))
    assert len(diverged_at) > 10  # the test can tell: afresh, the resumed search decides otherwise


@pytest.mark.parametrize("sched", [
    SchedulerSpec(name="asha", max_epochs=4, grace_period=1, reduction_factor=2),
    SchedulerSpec(name="mo_asha", max_epochs=4, grace_period=1, reduction_factor=2),
    SchedulerSpec(name="hyperband", max_epochs=4, reduction_factor=2),
    SchedulerSpec(name="median", max_epochs=4, grace_period=1),
    SchedulerSpec(name="fifo", max_epochs=4),
], ids=lambda s: s.name)
def test_a_resumed_trial_with_nothing_left_to_train_completes_quietly(sched: SchedulerSpec) -> None:
    """A trial resumed from the checkpoint of its last epoch trains nothing and reports nothing: Tune
    completes it with an empty result. The scheduler, rebuilt from the earlier run, must go on judging
    the other trials (median stopping kept the empty result as the trial's latest: ``KeyError: 'epoch'``
    at the next result of any other trial)."""
    from cifar_tune.tuning.schedulers import make_scheduler

    history = [(t, {"epoch": e, "val_acc": 0.1 * e + (0.05 if t == "t0002" else 0)}, False)
               for e in range(1, 5) for t in ("t0000", "t0001", "t0002") if t == "t0002" or e < 2]
    s = make_scheduler(sched, history)
    s.set_search_properties("val_acc", "max")
    ctrl = _Controller()
    class Trial(SimpleNamespace):
        __hash__ = object.__hash__  # (hyperband files trials in dicts)

    trials = {t: Trial(trial_id=f"ray-{t}", config={"trial_id": t}, status="RUNNING") for t in ("t0000", "t0001", "t0002")}
    for t in trials.values():
        s.on_trial_add(ctrl, t)
    s.on_trial_complete(ctrl, trials["t0002"], {})  # its checkpoint was its last epoch: nothing reported
    actions = []
    for e in range(2, 5):
        for t in ("t0000", "t0001"):
            if "STOP" not in [a for tid, a in actions if tid == t]:
                actions.append((t, s.on_trial_result(ctrl, trials[t], {"epoch": e, "val_acc": 0.1 * e})))
    assert actions and all(a in ("CONTINUE", "STOP", "PAUSE") for _, a in actions)


class _PBTTrial:
    """What PBT touches of a Ray trial: status, config, tag, and the checkpoint Tune restores it from."""

    def __init__(self, tid: str, lr: float, path: str) -> None:
        self.trial_id, self.experiment_tag, self.status = f"ray-{tid}", tid, "PENDING"
        self.local_experiment_path = self.local_dir = path  # (PBT writes its policy log there)
        self.config = {"trial_id": tid, "config": {"optimizer": {"lr": lr}}}
        self.run_metadata = SimpleNamespace(checkpoint_manager=SimpleNamespace(
            checkpoint_config=SimpleNamespace(num_to_keep=None), _latest_checkpoint_result=None))
        self.temporary_state = SimpleNamespace(saving_to=None)
        self.epoch, self.last_result = 0, {}

    @property
    def checkpoint(self) -> Any:
        latest = self.run_metadata.checkpoint_manager._latest_checkpoint_result
        return latest.checkpoint if latest else None

    def is_finished(self) -> bool:
        return self.status == "TERMINATED"

    def set_status(self, status: str) -> None:
        self.status = status

    def set_config(self, config: dict[str, Any]) -> None:
        self.config = config

    def set_experiment_tag(self, tag: str) -> None:
        self.experiment_tag = tag


class _PBTController:
    search_alg = None

    def __init__(self, trials: list[_PBTTrial]) -> None:
        self.trials = trials

    def get_trials(self) -> list[_PBTTrial]:
        return self.trials

    def get_live_trials(self) -> list[_PBTTrial]:
        return [t for t in self.trials if not t.is_finished()]

    def pause_trial(self, trial: _PBTTrial, should_checkpoint: bool = True) -> None:
        trial.status = "PAUSED"

    def _schedule_trial_save(self, trial: _PBTTrial, result: dict[str, Any]) -> Any:
        return ("checkpoint", trial.config["trial_id"], trial.epoch)


LRS = {"t0000": 0.02, "t0001": 0.01, "t0002": 0.03, "t0003": 0.04}  # t0001: the lowest score, exploits


def _run_synch_pbt(points: dict[str, tuple[int, str | None, float | None]], rebuild: bool, path: Path,
                   lrs: dict[str, float] = LRS, max_epochs: int = 4) -> tuple[dict[str, list[int]], int]:
    """Tune's loop over a synchronous PBT population resumed from ``points``, without Ray: start every
    trial the scheduler chooses (from the checkpoint Tune holds for it, else from where ``--resume``
    put it), train each running one an epoch (val_acc = lr * epoch), act on the decision. Returns
    each trial's epochs reported and how many exploits ran."""
    import random as random_mod

    from ray.train._internal.session import _TrainingResult

    from cifar_tune.tuning.schedulers import make_scheduler

    random_mod.seed(0)  # (PBT draws its donors and perturbations from the random module)
    sched = SchedulerSpec(name="pbt", max_epochs=max_epochs, perturbation_interval=1, synch=True,
                          mutations={"optimizer": {"lr": {"loguniform": [0.003, 0.3]}}})
    s = make_scheduler(sched, resume_points=points if rebuild else None)
    s.set_search_properties("val_acc", "max")
    trials = [_PBTTrial(tid, lrs[tid], str(path)) for tid in points]
    ctrl, reported = _PBTController(trials), {tid: [] for tid in points}
    for t in trials:
        s.on_trial_add(ctrl, t)
        t.epoch = points[t.config["trial_id"]][0]  # the trainable goes on from its --resume checkpoint
    for _ in range(100):
        while (chosen := s.choose_trial_to_run(ctrl)) is not None:
            latest = chosen.run_metadata.checkpoint_manager._latest_checkpoint_result
            if latest is not None:  # Tune restores it: its own pause, or an exploit's donor
                chosen.epoch = latest.metrics["epoch"]
            chosen.status = "RUNNING"
        running = [t for t in trials if t.status == "RUNNING"]
        if not running:
            break
        for t in running:
            if t.status != "RUNNING":  # paused by another trial's exploit of it
                continue
            t.epoch += 1
            result = {"epoch": t.epoch, "val_acc": t.config["config"]["optimizer"]["lr"] * t.epoch}
            reported[t.config["trial_id"]].append(t.epoch)
            t.last_result = result
            action = s.on_trial_result(ctrl, t, result)
            if t.epoch == sched.max_epochs:
                s.on_trial_complete(ctrl, t, result)
                t.status = "TERMINATED"
            elif action == "PAUSE":
                t.status = "PAUSED"
                t.run_metadata.checkpoint_manager._latest_checkpoint_result = _TrainingResult(
                    checkpoint=("checkpoint", t.config["trial_id"], t.epoch), metrics=result)
    return reported, s._num_perturbations


def test_a_resumed_synchronous_pbt_goes_on_from_its_checkpoints(tmp_path: Path) -> None:
    """Killed while three trials waited at epoch 2 for the fourth (its checkpoint at epoch 1): the
    rebuilt scheduler runs the fourth to the sync point, perturbs the population there (the waiting
    trials ranked by their recorded scores, donors from their checkpoints) and every sync point after,
    and the search ends. Started afresh, every trial's time is 0: the three report epoch 3 and wait, the
    fourth reports 2, is ranked against their epoch 3, is the worst and copies an epoch-3 checkpoint
    (skipping epoch 3), and Ray's next sync point becomes that time, 3: no paused trial is behind it
    and none is chosen to run again (Ray's PBT would wait for good; ours perturbs the waiting
    population when nothing runs, so it ends, with the skipped epoch)."""
    uri = str(tmp_path)
    points = {"t0000": (2, uri, 0.04), "t0001": (1, uri, 0.01), "t0002": (2, uri, 0.06), "t0003": (2, uri, 0.08)}
    reported, exploits = _run_synch_pbt(points, rebuild=True, path=tmp_path)
    # every trial trains to the end, one report per epoch from its checkpoint (no epoch skipped by a
    # waiting trial: synchronous exploits copy a checkpoint of the same epoch)
    assert reported == {"t0000": [3, 4], "t0001": [2, 3, 4], "t0002": [3, 4], "t0003": [3, 4]}
    assert exploits == 2  # one lower-quantile trial at each of the sync points 2 and 3
    afresh, _ = _run_synch_pbt(points, rebuild=False, path=tmp_path)
    assert afresh["t0001"] == [2, 4], afresh  # epoch 3 never trained: it copied a checkpoint ahead of it


def test_the_history_is_the_kept_epoch_rows(tmp_path: Path) -> None:
    """What run_search rebuilds the scheduler from: each kept row with a finite metric, its trial's
    fate, in the order recorded."""
    from cifar_tune.results import Experiment, TrialLog
    from cifar_tune.tuning.driver import scheduler_history

    log = TrialLog(Experiment(str(tmp_path), "h"), metric="val_acc", mode="max", max_epochs=3, flush_every_s=1e9)
    for tid in ("t0000", "t0001"):
        log.add_pending(tid, int(tid[1:]), {}, 0)
        log.trial_started(tid, {})
    log.trial_result("t0000", {"epoch": 1, "val_acc": 0.5})
    log.trial_result("t0001", {"epoch": 1, "val_acc": 0.4})
    log.trial_result("t0000", {"epoch": 2, "val_acc": float("nan")})
    log.trial_finished("t0000", {"status": "diverged"})
    assert scheduler_history(log) == [("t0000", {"epoch": 1, "val_acc": 0.5}, True), ("t0001", {"epoch": 1, "val_acc": 0.4}, False)]


# ----------------------------------------------------------------------------------- Optuna on resume


def test_a_resumed_optuna_search_does_not_repeat_configs(tmp_path: Path) -> None:
    """No Ray: 3 trials asked and told, the driver gone; the next source is told them again, so its
    4th config is TPE's next draw, not the fresh sampler's first (a byte-identical t0000)."""
    from cifar_tune.results import Experiment, TrialLog
    from cifar_tune.spec.parse import parse_spec
    from cifar_tune.tuning.sources import OptunaSource

    raw = {
        "name": "opt", "data": {"dataset": "synthetic", "synthetic": {"num_train": 200, "num_test": 20, "num_classes": 4, "image_size": 16}},
        "search": {"algorithm": "optuna", "num_samples": 6, "seed": 5, "scheduler": {"name": "fifo", "max_epochs": 2}},
        "space": {"model": {"choice": [{"family": "mlp", "hidden": [{"choice": [8, 16]}]},
                                       {"family": "lenet", "channels": [4, 8], "padding": 2, "hidden": [16]}]},
                  "optimizer": {"name": "sgd", "lr": {"loguniform": [1e-3, 0.3]}, "momentum": {"uniform": [0.5, 0.95]}},
                  "train": {"batch_size": {"choice": [16, 32]}}},
    }
    spec = parse_spec(raw)
    kw = {"metric": "val_acc", "mode": "max", "max_epochs": 2, "flush_every_s": 1e9}
    log = TrialLog(Experiment(str(tmp_path), "opt"), **kw)
    first = OptunaSource(spec, log, [], 0, 6)
    configs = {}
    for i in range(3):
        tid, cfg = first.next_trial()
        configs[tid] = cfg
        log.trial_started(tid, cfg)
        log.trial_result(tid, {"epoch": 1, "val_acc": 0.3 + 0.1 * i})
        if i < 2:
            log.trial_result(tid, {"epoch": 2, "val_acc": 0.35 + 0.1 * i})
            log.trial_finished(tid, {"val_acc": 0.35 + 0.1 * i})
            first.trial_finished(tid, {"val_acc": 0.35 + 0.1 * i}, error=False)
    # the driver dies with t0002 running; --resume: t0002 is rerun, t0003.. are new draws
    log.rows["t0002"]["status"] = "interrupted"
    log.epochs = [e for e in log.epochs if e["trial_id"] != "t0002"]
    reference = OptunaSource(spec, TrialLog(Experiment(str(tmp_path), "ref"), **kw), [], 0, 6)
    fresh_draws = [reference.next_trial()[1] for _ in range(3)]
    assert fresh_draws == list(configs.values())  # a fresh sampler redraws exactly the first run's configs
    second = OptunaSource(spec, log, [("t0002", configs["t0002"])], 3, 6)
    assert second.next_trial() == ("t0002", configs["t0002"])
    tid, cfg = second.next_trial()
    assert tid == "t0003" and cfg not in configs.values()
    states = {t.user_attrs.get("trial_id"): t.state.name for t in second.study.trials}
    assert states["t0000"] == states["t0001"] == "COMPLETE"  # told again, with their values
    assert sorted(t.value for t in second.study.trials if t.state.name == "COMPLETE") == pytest.approx([0.35, 0.45])
    told = {t.user_attrs["trial_id"]: t.params for t in second.study.trials if "trial_id" in t.user_attrs}
    for tid in ("t0000", "t0001"):  # the parameters told are those the first study drew the config with
        assert told[tid] == pytest.approx(first.study.trials[int(tid[1:])].params)
    # the rerun is told when it ends, as any trial
    log.trial_started("t0002", configs["t0002"])
    log.trial_result("t0002", {"epoch": 1, "val_acc": 0.2})
    log.trial_finished("t0002", {"val_acc": 0.2})
    second.trial_finished("t0002", {"val_acc": 0.2}, error=False)
    assert {t.user_attrs.get("trial_id"): t.state.name for t in second.study.trials}["t0002"] == "PRUNED"


# ------------------------------------------------------------------- driver SIGKILL + --resume (Ray)

SPEC: dict[str, Any] = {
    "name": "matrix",
    "data": {"dataset": "synthetic", "synthetic": {"num_train": 300, "num_test": 50, "num_classes": 4, "image_size": 16}},
    "search": {
        "num_samples": 4, "seed": 4, "max_failures": 1,
        "checkpoint": {"every_epochs": 1},
        "resources": {"cpus_per_trial": 1},
    },
    "space": {
        "model": {"family": "mlp", "hidden": [16]},
        "optimizer": {"name": "sgd", "lr": {"loguniform": [0.003, 0.3]}, "momentum": 0.9},
        "schedule": {"name": "none"},
        "train": {"batch_size": 32},
    },
}

SCHEDULERS: dict[str, dict[str, Any]] = {
    "fifo": {"name": "fifo", "max_epochs": 3},
    "asha": {"name": "asha", "max_epochs": 4, "grace_period": 1, "reduction_factor": 2},
    "mo_asha": {"name": "mo_asha", "max_epochs": 4, "grace_period": 1, "reduction_factor": 2},
    "median": {"name": "median", "max_epochs": 3, "grace_period": 1},
    "hyperband": {"name": "hyperband", "max_epochs": 4, "reduction_factor": 2},
    "pbt": {"name": "pbt", "max_epochs": 4, "perturbation_interval": 1, "synch": False,
            "mutations": {"optimizer": {"lr": {"loguniform": [0.003, 0.3]}}}},
    "pbt-synch": {"name": "pbt", "max_epochs": 4, "perturbation_interval": 1, "synch": True,
                  "mutations": {"optimizer": {"lr": {"loguniform": [0.003, 0.3]}}}},
}


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_driver_sigkill_then_resume_ends_the_search(scheduler: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The driver (and the Ray instance it started) is SIGKILLed while t0001 stalls after training its
    second epoch; ``search --resume NAME`` ends the search: every trial has a final status, one row
    per (trial, epoch), and every finished trial keeps the checkpoint of its last row."""
    spec = json.loads(json.dumps(SPEC))
    spec["name"] = f"kill-{scheduler}"
    spec["search"]["scheduler"] = SCHEDULERS[scheduler]
    if scheduler == "mo_asha":
        spec["search"]["objectives"] = ["val_acc", "params", "train_time_s"]
    if scheduler.startswith("pbt"):  # PBT's population runs together; the others one trial per CPU
        spec["search"]["resources"]["cpus_per_trial"] = 0.5
    elif scheduler != "hyperband":  # (validation refuses max_concurrent with hyperband: paused trials hold slots)
        spec["search"]["max_concurrent"] = 2
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    storage = tmp_path / "exp"
    machine = ["--no-dashboard", "--num-cpus", "2", "--progress-every", "1"]
    env = {**os.environ, "CIFAR_TUNE_FAULTS": "t0001=hang@2", "CIFAR_TUNE_FAULT_DIR": str(tmp_path)}
    log = open(tmp_path / "driver.log", "w")  # noqa: SIM115 - the driver writes to it until killed
    driver = subprocess.Popen([sys.executable, "-m", "cifar_tune", "search", str(path), "--storage", str(storage), *machine],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    trials_path = storage / spec["name"] / "trials.parquet"
    try:
        deadline, caught = time.monotonic() + 240, False
        while time.monotonic() < deadline and not caught and driver.poll() is None:
            time.sleep(0.5)
            if trials_path.exists():
                t = pd.read_parquet(io.BytesIO(trials_path.read_bytes()))  # one read: the driver replaces the file
                caught = "checkpoint_epoch" in t and bool(((t.trial_id == "t0001") & (t.status == "running") & (t.epochs_run == 1)).any())
        assert caught, (tmp_path / "driver.log").read_text()[-3000:]
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray instance it started
        driver.wait(timeout=30)
    proc = run_in_own_session([sys.executable, "-m", "cifar_tune", "search", "--resume", spec["name"], "--storage", str(storage), *machine],
                              env=env, timeout_s=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    trials = pd.read_parquet(trials_path)
    epochs = pd.read_parquet(storage / spec["name"] / "epochs.parquet")
    with capsys.disabled():
        print(f"\n  {scheduler}: killed and resumed: {dict(trials.status.value_counts())}")
    assert sorted(trials.trial_id) == [f"t{i:04d}" for i in range(4)]
    assert trials.status.isin(FINISHED).all() and trials.status.isin(["completed", "stopped"]).all()
    assert not epochs.duplicated(["trial_id", "epoch"]).any()
    if scheduler != "pbt":  # (an async PBT exploit may skip epochs: rows follow the copied checkpoint)
        assert_summaries_derived(trials, epochs)
    for row in trials.itertuples():
        assert row.checkpoint_epoch == epochs[epochs.trial_id == row.trial_id].epoch.max(), row.trial_id
        assert (storage / spec["name"] / row.checkpoint / "trial.pt").is_file(), row.trial_id
    # the finished trial with the latest checkpoint reproduces its last row's val_acc
    row = trials.sort_values("checkpoint_epoch").iloc[-1]
    out = subprocess.run([sys.executable, "-m", "cifar_tune", "evaluate", str(storage / spec["name"] / row.checkpoint),
                          "--split", "val", "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"top-1 {row.last_val_acc:.4f}" in out.stdout

