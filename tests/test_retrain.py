"""retrain / evaluate: ranking rule, an end-to-end refit after a real (tiny) search, and the test-split guard."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from cifar_tune.cli import main
from cifar_tune.engine import data
from cifar_tune.errors import UserError
from cifar_tune.retrain import rank_trials, select_top

SMOKE = Path(__file__).resolve().parents[1] / "search_spaces" / "smoke.yaml"
RETRAIN_EPOCHS = 8


# ------------------------------------------------------------------------------------ ranking rule


def _trial(tid: str, status: str, epochs_run: int, best: float | None, params: int = 100, config: dict | None = None, last: float | None = None) -> dict[str, Any]:
    cfg = config if config is not None else {"model": {"family": "mlp", "hidden": [int(tid[1:]) + 1]}}
    return {"trial_id": tid, "status": status, "epochs_run": epochs_run, "params": params,
            "best_val_acc": best, "last_val_acc": best if last is None else last, "config": json.dumps(cfg)}


def _rank(rows: list[dict[str, Any]], **kw: Any) -> list[str]:
    kw = {"metric": "val_acc", "mode": "max", "rank_by": "best", **kw}
    return list(rank_trials(pd.DataFrame(rows), **kw)["trial_id"])


def test_highest_rung_first_then_metric() -> None:
    rows = [
        _trial("t0000", "stopped", 1, 0.90),  # great early, but stopped at the first rung
        _trial("t0001", "completed", 4, 0.60),
        _trial("t0002", "stopped", 2, 0.80),
        _trial("t0003", "completed", 4, 0.70),
    ]
    assert _rank(rows) == ["t0003", "t0001", "t0002", "t0000"]


def test_completed_before_stopped_at_equal_epochs() -> None:
    rows = [_trial("t0000", "stopped", 4, 0.9), _trial("t0001", "completed", 4, 0.5)]
    assert _rank(rows) == ["t0001", "t0000"]


def test_ties_fewer_params_then_lower_trial_id() -> None:
    rows = [
        _trial("t0003", "completed", 3, 0.7, params=500),
        _trial("t0002", "completed", 3, 0.7, params=100),
        _trial("t0001", "completed", 3, 0.7, params=500),
    ]
    assert _rank(rows) == ["t0002", "t0001", "t0003"]


def test_ineligible_statuses_and_missing_metric_are_excluded() -> None:
    rows = [_trial(f"t000{i}", s, 3, 0.99) for i, s in enumerate(("diverged", "error", "oom", "pending", "running", "interrupted"))]
    rows += [_trial("t0007", "completed", 3, None), _trial("t0008", "completed", 3, float("nan")), _trial("t0009", "stopped", 1, 0.1)]
    assert _rank(rows) == ["t0009"]


def test_duplicate_configs_keep_the_best_ranked() -> None:
    same = {"optimizer": {"name": "sgd", "lr": 0.1}, "model": {"family": "mlp"}}
    same_reordered = {"model": {"family": "mlp"}, "optimizer": {"lr": 0.1, "name": "sgd"}}  # key order is not identity
    rows = [_trial("t0000", "completed", 3, 0.5, config=same), _trial("t0001", "completed", 3, 0.8, config=same_reordered),
            _trial("t0002", "completed", 3, 0.6)]
    ranked = rank_trials(pd.DataFrame(rows), metric="val_acc", mode="max")
    assert list(ranked["trial_id"]) == ["t0001", "t0002"]
    assert list(ranked["rank"]) == [1, 2]


def test_min_mode_and_rank_by_last() -> None:
    rows = [_trial("t0000", "completed", 3, 0.2, last=0.9), _trial("t0001", "completed", 3, 0.4, last=0.3)]
    rows = [{**r, "best_val_loss": r["best_val_acc"], "last_val_loss": r["last_val_acc"]} for r in rows]
    assert _rank(rows, metric="val_loss", mode="min") == ["t0000", "t0001"]
    assert _rank(rows, metric="val_loss", mode="min", rank_by="last") == ["t0001", "t0000"]


def test_an_async_pbt_trial_that_jumped_ahead_ranks_as_completed_by_its_final_lineage(tmp_path: Path) -> None:
    """From the trial log, as a search records it: t0000 trained epochs 1-2 (a lucky 0.9 at epoch 2), copied
    t0001's epoch-4 checkpoint and config, and trained 5-8 (best 0.7); t0001 trained 1-8 (best 0.8). Both
    reached epoch 8: completed, compared by best_val_acc over what the refit config trained."""
    from cifar_tune.results import Experiment, TrialLog

    exp = Experiment(str(tmp_path), "pbt")
    exp.write_text("spec.yaml", "spec: {}\n")
    log = TrialLog(exp, metric="val_acc", mode="max", max_epochs=8, flush_every_s=0)
    cfg = {"model": {"family": "mlp"}, "optimizer": {"name": "sgd", "lr": 0.1}}
    for i in range(2):
        log.add_pending(f"t000{i}", i, {**cfg, "optimizer": {"name": "sgd", "lr": 0.1 * (i + 1)}}, 100)
        log.trial_started(f"t000{i}", cfg)
    accs = {1: 0.3, 2: 0.9, 5: 0.6, 6: 0.7, 7: 0.65, 8: 0.66}
    for e, acc in accs.items():
        extra = {"restored_from": "t0001", "config_json": json.dumps({**cfg, "optimizer": {"name": "sgd", "lr": 0.24}})} if e == 5 else {}
        log.trial_result("t0000", {"epoch": e, "val_acc": acc, **extra})
    for e in range(1, 9):
        log.trial_result("t0001", {"epoch": e, "val_acc": 0.1 * e})
    for tid in ("t0000", "t0001"):
        log.trial_finished(tid, {})
    ranked = rank_trials(exp.read_table("trials.parquet"), metric="val_acc", mode="max")
    assert list(ranked.trial_id) == ["t0001", "t0000"]
    assert list(ranked.status) == ["completed", "completed"] and list(ranked.epochs_run) == [8, 8]
    assert list(ranked.best_val_acc) == [0.8, 0.7] and json.loads(ranked.config[1])["optimizer"]["lr"] == 0.24


def test_top_larger_than_usable_names_both_numbers() -> None:
    rows = [_trial("t0000", "completed", 3, 0.5), _trial("t0001", "error", 0, None)]
    with pytest.raises(UserError, match=r"--top 3 .* the 1 usable"):
        select_top(pd.DataFrame(rows), top=3, metric="val_acc", mode="max", rank_by="best", experiment="x")


# ------------------------------------------------------------------------- end to end (with Ray)


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    import ray

    # address="local": always a private instance, never another process's cluster on this machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def searched(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from cifar_tune.spec.parse import load_spec
    from cifar_tune.tuning.driver import run_search

    root = tmp_path_factory.mktemp("storage")
    loads_before = data.test_loads
    exp = run_search(load_spec(SMOKE), storage=str(root), dashboard=False, num_cpus=2, out=lambda s: None)
    return {"root": str(root), "exp": exp, "loads_before": loads_before, "loads_after_search": data.test_loads}


@pytest.fixture(scope="module")
def retrained(searched: dict[str, Any]) -> dict[str, Any]:
    exp = searched["exp"]
    # the experiment directory as search prints it (the name + --storage form is used below)
    code = main(["retrain", exp.uri(), "--top", "2", "--seeds", "2", "--epochs", str(RETRAIN_EPOCHS)])
    return {**searched, "code": code, "df": exp.read_table("retrain.parquet"), "dir": Path(exp.uri())}


@pytest.mark.ray
def test_search_never_reads_the_test_split_but_retrain_does(retrained: dict[str, Any]) -> None:
    # driver side: the search itself made no load_test call; the trials ran in Ray workers under
    # data.forbid_test() (see the next test), so a load_test there would have failed the trial
    assert retrained["loads_after_search"] == retrained["loads_before"]
    assert data.test_loads > retrained["loads_after_search"]


def test_trials_forbid_the_test_split() -> None:
    from cifar_tune.spec.parse import load_spec
    from cifar_tune.tuning.trial import TrialSetup, run_trial

    spec = load_spec(SMOKE)
    config = {"model": {"family": "mlp", "hidden": [8]}, "optimizer": {"name": "sgd", "lr": 0.05}, "train": {"batch_size": 64}}
    try:
        run_trial(config, TrialSetup(data=spec.data, epochs=1, seed=0), trial_id="t9999", report=lambda m: None)
        with pytest.raises(data.TestSplitForbidden):
            data.load_test(spec.data)
    finally:
        data.allow_test()  # this is the pytest process, not a throwaway worker


@pytest.mark.ray
def test_retrain_writes_one_row_per_trial_and_seed(retrained: dict[str, Any]) -> None:
    df = retrained["df"]
    assert retrained["code"] == 0
    assert len(df) == 4
    assert sorted(zip(df["rank"], df["seed"], strict=True)) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert df["trial_id"].nunique() == 2
    assert (df["status"] == "completed").all()
    assert (df["epochs"] == RETRAIN_EPOCHS).all() and (df["epochs_run"] == RETRAIN_EPOCHS).all()
    # 4 classes: chance is 0.25. The smoke models only learn colour (half of the class signal) in a few
    # epochs, which caps them near 0.5; anything random would sit at 0.25.
    assert (df["test_acc"] > 0.4).all(), df["test_acc"].tolist()
    assert (df["test_top5"] == 1.0).all()  # top-5 of 4 classes
    assert df["torch_seed"].nunique() == 4  # a distinct seed per (trial, seed)
    for per_class, cm in zip(df["per_class_acc"], df["confusion"], strict=True):
        assert len(per_class) == 4
        cm = np.stack(cm)
        assert cm.shape == (4, 4) and cm.sum() == 300
    for col in ("params", "test_loss", "train_time_s", "config", "search_best_val_acc"):
        assert df[col].notna().all(), col


@pytest.mark.ray
def test_retrain_picks_the_ranked_top(retrained: dict[str, Any]) -> None:
    trials = retrained["exp"].read_table("trials.parquet")
    expected = list(rank_trials(trials, metric="val_acc", mode="max")["trial_id"][:2])
    df = retrained["df"].sort_values("rank")
    assert list(dict.fromkeys(df["trial_id"])) == expected


@pytest.mark.ray
def test_leaderboard_and_checkpoints(retrained: dict[str, Any]) -> None:
    board = (retrained["dir"] / "leaderboard.md").read_text()
    assert "±" in board and "Ranking rule" in board
    for tid in retrained["df"]["trial_id"].unique():
        assert f"| {tid} |" in board
    ckpts = sorted((retrained["dir"] / "checkpoints").glob("*.pt"))
    assert len(ckpts) == 4
    for path in ckpts:
        ckpt = torch.load(path, weights_only=True)  # tensors and plain Python only
        assert set(ckpt) >= {"state_dict", "config", "num_classes", "in_channels", "image_size", "mean", "std", "classes", "data"}
        assert ckpt["num_classes"] == 4 and ckpt["data"]["dataset"] == "synthetic"
        assert path.name == f"{ckpt['trial_id']}_seed{ckpt['seed']}.pt"
    # the feature map of the rank-1 config's seed 0, on the test split retrain read (cifar_tune.engine.features)
    points = pd.read_parquet(retrained["dir"] / "tsne.parquet")
    top = retrained["df"].sort_values(["rank", "seed"]).iloc[0]
    assert set(points["trial_id"]) == {top["trial_id"]} and len(points) == top["num_test_images"]
    assert np.isfinite(points[["x", "y"]].to_numpy()).all() and points["label"].nunique() == 4


@pytest.mark.ray
def test_evaluate_reproduces_the_test_accuracy(retrained: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    row = retrained["df"].iloc[0]
    path = retrained["dir"] / row["checkpoint"]
    capsys.readouterr()
    assert main(["evaluate", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"top-1 {row['test_acc']:.4f}" in out
    assert main(["evaluate", str(path), "--split", "trainval"]) == 0
    assert "trainval (1,200 images)" in capsys.readouterr().out
    # an experiment (directory, or name + --storage): every checkpoint of its retrain
    for argv in ([str(retrained["dir"])], [retrained["dir"].name, "--storage", retrained["root"]]):
        assert main(["evaluate", *argv]) == 0
        out = capsys.readouterr().out
        assert out.count("top-1") == len(retrained["df"]) and f"top-1 {row['test_acc']:.4f}" in out


@pytest.mark.ray
def test_evaluate_user_errors(retrained: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = retrained["dir"] / retrained["df"]["checkpoint"].iloc[0]
    cases = [
        [str(tmp_path / "missing.pt")],
        [str(path), "--data", "cifar10"],  # 10 classes of 32x32: not this model's input
        [str(path), "--data", "cifar11"],
    ]
    for argv in cases:
        capsys.readouterr()
        assert main(["evaluate", *argv]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), err


@pytest.mark.ray
def test_top_too_large_and_missing_experiment_exit_2(searched: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["retrain", "--storage", searched["root"], "--top", "99"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--top 99" in err[0] and "4 usable" in err[0]
    for argv in (["retrain", "nope", "--storage", searched["root"]], ["retrain", "--storage", str(tmp_path / "empty")],
                 ["report", "nope", "--storage", searched["root"]]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), err


@pytest.mark.ray
def test_report_after_retrain(retrained: dict[str, Any]) -> None:
    assert main(["report", "--storage", retrained["root"]]) == 0
    text = (retrained["dir"] / "report.md").read_text()
    assert "Retrain leaderboard" in text and "All classes, best first" in text
    for png in ("report_val_curves.png", "report_rung_survival.png", "report_hyperparameters.png",
                "report_optimizers.png", "report_per_class.png", "report_confusion.png"):
        assert (retrained["dir"] / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert f"({png})" in text


@pytest.mark.ray
def test_retrain_no_tsne_one_seed_four_classes(retrained: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    """Runs last (it replaces retrain's files): --no-tsne drops the feature map (and the earlier one,
    which would show a model this run did not train); one seed: no ± in the leaderboard; 4 classes:
    no top-5 (always 1.0) in the leaderboard or the run lines."""
    assert (retrained["dir"] / "tsne.parquet").exists()  # the fixture's retrain wrote one
    capsys.readouterr()
    assert main(["retrain", str(retrained["dir"]), "--top", "1", "--seeds", "1", "--epochs", "1", "--no-tsne",
                 "--no-dashboard"]) == 0
    out = capsys.readouterr().out
    assert not (retrained["dir"] / "tsne.parquet").exists()
    assert "t-SNE feature map: skipped (--no-tsne)" in out
    assert "1 config x 1 seed = 1 run of 1 epoch" in out
    assert "test_acc " in out and "top5" not in out
    board = (retrained["dir"] / "leaderboard.md").read_text()
    assert "±" not in board and "top-5" not in board and "| test acc | seeds | test loss |" in board
