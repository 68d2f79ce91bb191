"""The experiment directory: atomic parquet files readable at any moment, flattening, status rules."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import assert_summaries_derived

from cifar_tune.errors import UserError
from cifar_tune.results import Experiment, Storage, TrialLog, find_experiment, flatten


def _log(tmp_path: Path, max_epochs: int = 3) -> TrialLog:
    exp = Experiment(str(tmp_path), "exp")
    exp.write_text("spec.yaml", "spec: {}\n")
    return TrialLog(exp, metric="val_acc", mode="max", max_epochs=max_epochs, flush_every_s=0)


def test_flatten_keeps_lists_as_values() -> None:
    cfg = {"model": {"family": "vgg", "blocks": [{"channels": [8]}]}, "optimizer": {"lr": 0.1}}
    assert flatten(cfg) == {"config.model.family": "vgg", "config.model.blocks": [{"channels": [8]}], "config.optimizer.lr": 0.1}


def test_trial_lifecycle_and_status_rules(tmp_path: Path) -> None:
    log = _log(tmp_path)
    for i in range(4):
        log.add_pending(f"t{i:04d}", i, {"model": {"family": "mlp", "hidden": [i + 1]}, "optimizer": {"name": "sgd"}}, 10 * i)
    for tid, accs in {"t0000": [0.3, 0.5, 0.4], "t0001": [0.2], "t0002": [0.1]}.items():
        log.trial_started(tid, {})
        for e, acc in enumerate(accs, 1):
            log.trial_result(tid, {"epoch": e, "val_acc": acc, "val_loss": 1 - acc, "val_top5": 1.0, "train_loss": 1.0,
                                   "epoch_time_s": 0.5, "node_id": "n1"})
    log.trial_finished("t0000", {})
    log.trial_finished("t0001", {})
    log.trial_finished("t0002", {"status": "diverged"})
    log.trial_started("t0003", {})
    log.trial_errored("t0003", "RuntimeError: CUDA out of memory")
    trials = pd.read_parquet(tmp_path / "exp" / "trials.parquet").set_index("trial_id")
    assert trials.status.to_dict() == {"t0000": "completed", "t0001": "stopped", "t0002": "diverged", "t0003": "oom"}
    best = trials.loc["t0000"]
    assert (best.best_epoch, best.best_val_acc, best.best_val_loss, best.last_val_acc) == (2, 0.5, 0.5, 0.4)
    assert best.epoch_time_s == pytest.approx(1.5)  # training + validation; train_time_s: training only
    assert trials.loc["t0001", "config.model.hidden"] == "[2]"  # lists become JSON text in parquet
    assert json.loads(trials.loc["t0002", "config"])["model"]["hidden"] == [3]
    epochs = pd.read_parquet(tmp_path / "exp" / "epochs.parquet")
    assert len(epochs) == 5 and set(epochs.trial_id) == {"t0000", "t0001", "t0002"}
    assert log.best()["trial_id"] == "t0000"


def test_a_retried_trial_starts_over(tmp_path: Path) -> None:
    log = _log(tmp_path)
    log.add_pending("t0000", 0, {"model": {"family": "mlp"}}, 1)
    log.trial_started("t0000", {})
    log.trial_result("t0000", {"epoch": 1, "val_acc": 0.1})
    log.trial_retried("t0000")
    log.trial_started("t0000", {})
    log.trial_result("t0000", {"epoch": 1, "val_acc": 0.2})
    assert [e["val_acc"] for e in log.epochs] == [0.2]
    assert log.rows["t0000"]["attempts"] == 2


def test_storage_accepts_file_uris_and_finds_the_latest_experiment(tmp_path: Path) -> None:
    storage = Storage(f"file://{tmp_path}")
    storage.write_table("a/t.parquet", pd.DataFrame({"x": [1]}))
    assert storage.read_table("a/t.parquet").x.tolist() == [1]
    for name in ("old", "new"):
        Experiment(str(tmp_path), name).write_text("spec.yaml", "spec: {}\n")
    assert find_experiment(str(tmp_path), None).name in ("old", "new")
    assert find_experiment(str(tmp_path), "old").name == "old"
    with pytest.raises(UserError, match="not found"):
        find_experiment(str(tmp_path), "missing")


def _epoch(e: int, acc: float, **extra: float) -> dict:
    return {"epoch": e, "val_acc": acc, "val_loss": 1 - acc, "val_top5": 1.0, "train_loss": 1.0, "train_acc": 0.5,
            "train_time_s": 0.25, "epoch_time_s": 0.5, **extra}


def _frames_of(tmp_path: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    return pd.read_parquet(tmp_path / "exp" / "trials.parquet"), pd.read_parquet(tmp_path / "exp" / "epochs.parquet")


def test_a_dead_attempts_better_results_do_not_survive_a_retry(tmp_path: Path) -> None:
    log = _log(tmp_path)
    log.add_pending("t0000", 0, {"model": {"family": "mlp"}}, 1)
    log.trial_started("t0000", {})
    log.trial_result("t0000", _epoch(1, 0.9))  # the first attempt got lucky, then its worker died
    log.trial_errored("t0000", "worker died")
    log.trial_retried("t0000")
    log.trial_started("t0000", {})
    row = log.rows["t0000"]
    assert (row["best_val_acc"], row["best_epoch"], row["epochs_run"], row["train_time_s"], row["error"]) == (None, None, 0, 0.0, None)
    for e, acc in enumerate([0.3, 0.4, 0.35], 1):
        log.trial_result("t0000", _epoch(e, acc))
    log.trial_finished("t0000", {})
    trials, epochs = _frames_of(tmp_path)
    t = trials.set_index("trial_id").loc["t0000"]
    assert (t.best_val_acc, t.best_epoch, t.epochs_run, t.status, t.attempts) == (0.4, 2, 3, "completed", 2)
    assert t.train_time_s == pytest.approx(0.75) and t.epoch_time_s == pytest.approx(1.5)
    assert_summaries_derived(trials, epochs)
    assert log.best() is not None and log.best()["best_val_acc"] == 0.4


def test_an_oom_report_adds_no_epoch_row_and_keeps_epochs_run(tmp_path: Path) -> None:
    log = _log(tmp_path)
    log.add_pending("t0000", 0, {"model": {"family": "mlp"}}, 1)
    log.trial_started("t0000", {})
    log.trial_result("t0000", _epoch(1, 0.3))
    log.trial_result("t0000", _epoch(2, 0.4))
    oom = {"trial_id": "t0000", "params": 7, "status": "oom", "error": "out of memory: CUDA"}
    log.trial_result("t0000", oom)  # what tuning/trial.py reports when epoch 3 runs out of memory
    log.trial_finished("t0000", oom)
    trials, epochs = _frames_of(tmp_path)
    t = trials.set_index("trial_id").loc["t0000"]
    assert (t.status, t.epochs_run, t.best_val_acc, t.params) == ("oom", 2, 0.4, 7)
    assert t.error == "out of memory: CUDA"
    assert len(epochs) == 2
    assert_summaries_derived(trials, epochs)


def test_resume_forgets_an_unfinished_trials_summary(tmp_path: Path) -> None:
    """What _plan does on --resume: unfinished trials lose their epochs, and with them their summary."""
    log = _log(tmp_path)
    for i in range(2):
        log.add_pending(f"t{i:04d}", i, {"model": {"family": "mlp"}}, 1)
        log.trial_started(f"t{i:04d}", {})
        log.trial_result(f"t{i:04d}", _epoch(1, 0.5 + i / 10))
    log.trial_finished("t0000", {})
    trials, epochs = _frames_of(tmp_path)  # t0001 still "running" when the driver died
    resumed = TrialLog(log.exp, metric="val_acc", mode="max", max_epochs=3, flush_every_s=0, trials=trials, epochs=epochs)
    resumed.epochs = [e for e in resumed.epochs if resumed.rows[e["trial_id"]]["status"] == "stopped"]
    assert resumed.rows["t0001"]["best_val_acc"] is None and resumed.rows["t0001"]["epochs_run"] == 0
    assert resumed.rows["t0000"]["best_val_acc"] == 0.5
    assert resumed.best()["trial_id"] == "t0000"


def test_summaries_are_recomputed_from_stored_epochs(tmp_path: Path) -> None:
    """A trials.parquet written by an older version (stale best_*) is corrected on load."""
    log = _log(tmp_path)
    log.add_pending("t0000", 0, {"model": {"family": "mlp"}}, 1)
    log.trial_started("t0000", {})
    log.trial_result("t0000", _epoch(1, 0.2))
    trials, epochs = _frames_of(tmp_path)
    trials["best_val_acc"] = 0.99
    epochs = pd.concat([epochs, pd.DataFrame([{"trial_id": "t0000", "epoch": None, "val_acc": None}])])  # old OOM row
    loaded = TrialLog(log.exp, metric="val_acc", mode="max", max_epochs=3, trials=trials, epochs=epochs)
    assert loaded.rows["t0000"]["best_val_acc"] == 0.2
    assert len(loaded.epochs) == 1


def test_a_reported_epoch_again_replaces_the_earlier_attempts_rows(tmp_path: Path) -> None:
    """A restored attempt (from a checkpoint at epoch 1) reports epoch 2 again: its rows replace the old ones."""
    log = _log(tmp_path)
    log.add_pending("t0000", 0, {"model": {"family": "mlp"}}, 1)
    log.trial_started("t0000", {})
    for e, acc in enumerate([0.3, 0.9, 0.8], 1):
        log.trial_result("t0000", _epoch(e, acc))
    log.trial_started("t0000", {}, resumed_from_epoch=1)
    assert [e["epoch"] for e in log.epochs] == [1]
    log.trial_result("t0000", _epoch(2, 0.5))
    assert (log.rows["t0000"]["best_val_acc"], log.rows["t0000"]["epochs_run"]) == (0.5, 2)


@pytest.mark.parametrize("mode,metric,expected_epoch", [("max", "val_acc", 2), ("min", "val_loss", 2)])
def test_best_epoch_by_metric_and_mode(tmp_path: Path, mode: str, metric: str, expected_epoch: int) -> None:
    exp = Experiment(str(tmp_path), "exp")
    log = TrialLog(exp, metric=metric, mode=mode, max_epochs=3, flush_every_s=0)
    log.add_pending("t0000", 0, {}, 1)
    log.trial_started("t0000", {})
    for e, acc in enumerate([0.3, 0.6, 0.6], 1):  # ties go to the earlier epoch
        log.trial_result("t0000", _epoch(e, acc))
    assert log.rows["t0000"]["best_epoch"] == expected_epoch


def test_spec_yaml_records_every_resume(tmp_path: Path) -> None:
    """spec.yaml does not go stale: the spec as last run, the first run's meta, one entry per --resume."""
    import yaml

    from cifar_tune.spec.parse import load_yaml, parse_spec
    from cifar_tune.tuning.driver import record_run

    smoke = load_yaml((Path(__file__).resolve().parents[1] / "search_spaces" / "smoke.yaml").read_text())
    exp = Experiment(str(tmp_path), "exp")
    record_run(exp, parse_spec(smoke), resume=False)
    first = yaml.safe_load(exp.read_text("spec.yaml"))
    for n in (6, 9):
        smoke["search"]["num_samples"] = n
        record_run(exp, parse_spec(smoke), resume=True)
    doc = yaml.safe_load(exp.read_text("spec.yaml"))
    assert doc["meta"] == first["meta"]
    assert doc["spec"]["search"]["num_samples"] == 9
    assert [r["num_samples"] for r in doc["resumes"]] == [6, 9]
    for r in doc["resumes"]:
        assert {"created", "code_revision", "torch", "ray", "cifar_tune", "host"} <= set(r)


def test_find_experiment_accepts_the_directory_search_prints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs = tmp_path / "data" / "runs"
    Experiment(str(runs), "quickstart").write_text("spec.yaml", "spec: {}\n")
    for arg in (str(runs / "quickstart"), str(runs / "quickstart") + "/", f"file://{runs}/quickstart"):
        exp = find_experiment("experiments", arg)  # --storage left at its default
        assert (exp.name, Path(exp.uri())) == ("quickstart", runs / "quickstart"), arg
    monkeypatch.chdir(runs)
    assert Path(find_experiment("elsewhere", "quickstart").uri()) == runs / "quickstart"  # a directory here
    assert Path(find_experiment("elsewhere", "./quickstart").uri()) == runs / "quickstart"
    assert Path(find_experiment(str(runs), "quickstart").uri()) == runs / "quickstart"  # name + --storage
    (runs / "not-one").mkdir()
    with pytest.raises(UserError, match="not-one: not an experiment directory"):
        find_experiment("experiments", str(runs / "not-one"))


def test_an_oom_trial_keeps_the_peak_its_failed_epoch_reached(tmp_path: Path) -> None:
    """The epoch that ran out of memory has no row; its report's peak is kept on the trial's row, so a
    packed search shows every trial's peak against its cap. Trials that did not run out have none."""
    import torch

    from cifar_tune.spec.schema import DataSpec, SyntheticSpec
    from cifar_tune.tuning.trial import TrialSetup, run_trial

    reports: list[dict] = []
    data = DataSpec(dataset="synthetic", synthetic=SyntheticSpec(num_train=64, num_test=8, num_classes=2, image_size=8))
    mp = pytest.MonkeyPatch()
    mp.setenv("CIFAR_TUNE_FAULTS", "t0000=oom@1")
    try:
        run_trial({"model": {"family": "mlp", "hidden": [4]}, "train": {"batch_size": 16}}, TrialSetup(data=data, epochs=2, seed=0),
                  trial_id="t0000", report=lambda m, c=None: reports.append(m), device=torch.device("cpu"))
    finally:
        mp.undo()
        from cifar_tune.engine import data as data_mod

        data_mod.allow_test()
    assert reports[-1]["status"] == "oom" and "gpu_mem_peak_mb" in reports[-1]  # None on the CPU
    log = _log(tmp_path)
    for i in range(2):
        log.add_pending(f"t{i:04d}", i, {"model": {"family": "mlp"}}, 10)
        log.trial_started(f"t{i:04d}", {})
    log.trial_finished("t0000", {**reports[-1], "gpu_mem_peak_mb": 1234.5})  # as a GPU trial's report has it
    log.trial_finished("t0001", {"status": "completed", "gpu_mem_peak_mb": 99.0})
    trials = log.exp.read_table("trials.parquet").set_index("trial_id")
    assert trials.loc["t0000", "status"] == "oom" and trials.loc["t0000", "oom_gpu_mem_peak_mb"] == 1234.5
    assert pd.isna(trials.loc["t0001", "oom_gpu_mem_peak_mb"])


def _exploited(tmp_path: Path, *, mode: str = "max", metric: str = "val_acc") -> tuple[TrialLog, dict, dict]:
    """An async PBT trial: its own epochs 1, 2 (a VGG config), then it copies t0001's epoch-4 checkpoint
    and a LeNet config, and trains epochs 5..8 itself."""
    exp = Experiment(str(tmp_path), "exp")
    exp.write_text("spec.yaml", "spec: {}\n")
    log = TrialLog(exp, metric=metric, mode=mode, max_epochs=8, flush_every_s=0)
    mine = {"model": {"family": "vgg", "blocks": [[8]], "dropout": 0.1}, "optimizer": {"name": "sgd", "lr": 0.1}}
    donor = {"model": {"family": "lenet", "channels": [4, 8]}, "optimizer": {"name": "sgd", "lr": 0.02}}
    log.add_pending("t0000", 0, mine, 1)
    log.trial_started("t0000", mine)
    log.trial_result("t0000", _epoch(1, 0.5))
    log.trial_result("t0000", _epoch(2, 0.9))  # a lucky epoch of the model it then throws away
    log.trial_resumed("t0000")  # Tune restarts it from the donor's checkpoint: the same attempt
    log.trial_result("t0000", {**_epoch(5, 0.6), "restored_from": "t0001", "config_json": json.dumps(donor)})
    for e, acc in ((6, 0.7), (7, 0.65), (8, 0.66)):
        log.trial_result("t0000", _epoch(e, acc))
    log.trial_finished("t0000", {})
    return log, mine, donor


def test_an_exploited_pbt_trial_reaches_its_last_epoch_and_ranks_by_its_final_lineage(tmp_path: Path) -> None:
    """Rows 1, 2, 5..8: the trial reached epoch 8, so it is completed (not stopped by a row count), the
    jump is on record (restored_from on epoch 5), and best_* come from epochs 5..8 only: epoch 2's 0.9
    was another model under another config, which retrain would not refit."""
    log, _, _ = _exploited(tmp_path)
    trials, epochs = _frames_of(tmp_path)
    t = trials.set_index("trial_id").loc["t0000"]
    assert list(epochs.epoch) == [1, 2, 5, 6, 7, 8]
    assert (t.status, t.epochs_run, t.best_epoch, t.best_val_acc, t.last_val_acc) == ("completed", 8, 6, 0.7, 0.66)
    assert epochs.set_index("epoch").restored_from[5] == "t0001"
    assert t.train_time_s == pytest.approx(6 * 0.25)  # what this trial trained, not the donor's epochs
    assert_summaries_derived(trials, epochs)
    assert log.best()["best_val_acc"] == 0.7


def test_an_exploit_records_removed_config_keys_and_drops_their_columns(tmp_path: Path) -> None:
    _, mine, donor = _exploited(tmp_path)
    trials, epochs = _frames_of(tmp_path)
    t = trials.set_index("trial_id").loc["t0000"]
    changes = json.loads(epochs.set_index("epoch").config_changes[5])
    assert changes == {"model.family": "lenet", "model.channels": [4, 8], "optimizer.lr": 0.02,
                       "model.blocks": None, "model.dropout": None}
    assert json.loads(t.config) == donor
    # the columns are the config in force, none left over from the VGG config it started with
    assert {c for c in trials.columns if c.startswith("config.")} == set(flatten(donor))
    assert set(flatten(mine)) - set(flatten(donor)) == {"config.model.blocks", "config.model.dropout"}


def test_every_checkpoint_is_on_disk_in_trials_parquet_at_once(tmp_path: Path) -> None:
    """Throttled flushes skip results, never checkpoints: Tune deletes older checkpoints as new ones
    come, so the one trials.parquet names must be the newest Tune reported, and its epoch rows too."""
    exp = Experiment(str(tmp_path), "exp")
    exp.write_text("spec.yaml", "spec: {}\n")
    log = TrialLog(exp, metric="val_acc", mode="max", max_epochs=30, flush_every_s=3600)
    log.add_pending("t0000", 0, {"model": {"family": "mlp"}}, 1)
    log.trial_started("t0000", {})
    for e in range(1, 21):
        log.trial_result("t0000", _epoch(e, 0.5))
        path = str(tmp_path / "exp" / "ray" / "search-1" / "t0000-mlp-sgd" / f"checkpoint_{e - 1:06d}")
        log.trial_checkpoint("t0000", path, e)
        trials, epochs = _frames_of(tmp_path)
        assert trials.checkpoint_epoch.iloc[0] == e and trials.checkpoint.iloc[0].endswith(f"checkpoint_{e - 1:06d}")
        assert epochs.epoch.max() == e


def test_a_trial_without_epoch_rows_satisfies_the_invariant(tmp_path: Path) -> None:
    """Out of memory in its first epoch: no rows, epochs_run 0, no best."""
    log = _log(tmp_path)
    log.add_pending("t0000", 0, {"model": {"family": "mlp"}}, 1)
    log.trial_started("t0000", {})
    log.trial_result("t0000", {"trial_id": "t0000", "status": "oom", "error": "out of memory"})
    log.trial_finished("t0000", {"status": "oom"})
    trials, epochs = _frames_of(tmp_path)
    assert (trials.status.iloc[0], trials.epochs_run.iloc[0]) == ("oom", 0)
    assert_summaries_derived(trials, epochs)


def test_resume_continues_from_a_checkpoint_that_is_on_disk(tmp_path: Path) -> None:
    """trials.parquet names checkpoint_000004 (epoch 5), which Tune has deleted; 000002 (epoch 3) and
    000003 (epoch 4) are on disk, but only epochs 1-3 have rows: the trial continues from epoch 3."""
    import io

    import torch

    log = _log(tmp_path, max_epochs=8)
    log.add_pending("t0000", 0, {"model": {"family": "mlp"}}, 1)
    log.trial_started("t0000", {})
    for e in (1, 2, 3):
        log.trial_result("t0000", _epoch(e, 0.1 * e))
    trial_dir = "ray/search-1/t0000-mlp-sgd"
    for index, epoch in ((2, 3), (3, 4)):
        buf = io.BytesIO()
        torch.save({"epochs": epoch}, buf)
        log.exp.write_bytes(f"{trial_dir}/checkpoint_{index:06d}/trial.pt", buf.getvalue())
    log.rows["t0000"].update(checkpoint=f"{trial_dir}/checkpoint_000004", checkpoint_epoch=5)
    log.check_checkpoint("t0000")
    assert (log.rows["t0000"]["checkpoint"], log.rows["t0000"]["checkpoint_epoch"]) == (f"{trial_dir}/checkpoint_000002", 3)
    log.rows["t0000"].update(checkpoint=f"{trial_dir}/checkpoint_000002", checkpoint_epoch=3)
    log.check_checkpoint("t0000")  # on disk: kept as it is
    assert log.rows["t0000"]["checkpoint"] == f"{trial_dir}/checkpoint_000002"
    log.exp.delete_dir(f"{trial_dir}/checkpoint_000002")
    log.exp.delete_dir(f"{trial_dir}/checkpoint_000003")
    log.check_checkpoint("t0000")  # none left: it starts over
    assert log.rows["t0000"]["checkpoint"] is None and log.rows["t0000"]["checkpoint_epoch"] is None
