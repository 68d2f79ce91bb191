"""report: plots and report.md from a hand-built experiment (no Ray, no training), with and without retrain."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from cifar_tune.cli import main
from cifar_tune.plots import hyperparameter_figure, hyperparameter_panels, per_class_figure, tick_label
from cifar_tune.report import build_report, is_log_scale, survival_counts, varying_config_columns
from cifar_tune.results import Experiment, TrialLog, flatten
from cifar_tune.retrain import leaderboard_markdown, ranking_rule, retrain_frame, write_retrain_table
from cifar_tune.spec.parse import load_spec
from cifar_tune.text import plural

SMOKE = Path(__file__).resolve().parents[1] / "search_spaces" / "smoke.yaml"
PNG = b"\x89PNG\r\n\x1a\n"
SEARCH_PLOTS = ("report_val_curves.png", "report_rung_survival.png", "report_hyperparameters.png", "report_optimizers.png")
RETRAIN_PLOTS = ("report_per_class.png", "report_confusion.png")


def _config(i: int) -> dict:
    opt = {"name": "sgd", "lr": 0.01 * (i + 1), "momentum": 0.9} if i % 2 else {"name": "adam", "lr": 0.001 * (i + 1)}
    model = {"family": "lenet", "channels": [4 * (i % 2 + 1), 8]} if i % 3 else {"family": "mlp", "hidden": [32]}
    return {"model": model, "optimizer": opt, "schedule": {"name": "cosine"}, "augment": {"hflip": True}, "train": {"batch_size": 64}}


def make_experiment(root: Path, name: str = "hand") -> Experiment:
    """Six trials through the real TrialLog: ASHA-like stops at epochs 1 and 2, one diverged, one error."""
    spec = load_spec(SMOKE)
    exp = Experiment(str(root), name)
    exp.write_text("spec.yaml", yaml.safe_dump({"spec": spec.to_dict(), "meta": {}}, sort_keys=False))
    log = TrialLog(exp, metric="val_acc", mode="max", max_epochs=3, flush_every_s=1e9)
    plan = {0: (3, None), 1: (1, None), 2: (2, None), 3: (3, None), 4: (1, "diverged"), 5: (0, "error")}
    for i, (epochs, fate) in plan.items():
        tid = f"t{i:04d}"
        log.add_pending(tid, i, _config(i), 1000 + i)
        log.trial_started(tid, _config(i))
        for e in range(1, epochs + 1):
            log.trial_result(tid, {"epoch": e, "train_loss": 1.0 / e, "train_acc": 0.3 + 0.1 * e, "val_loss": 1.2 / e,
                                   "val_acc": 0.3 + 0.05 * e + 0.01 * i, "val_top5": 1.0, "epoch_time_s": 0.1})
        if fate == "error":
            log.trial_errored(tid, "ValueError: boom")
        else:
            log.trial_finished(tid, {"status": fate} if fate else {})
    log.flush(force=True)
    return exp


def add_retrain(exp: Experiment) -> pd.DataFrame:
    rows = []
    for rank, tid in ((1, "t0003"), (2, "t0000")):
        for seed in (0, 1):
            cm = np.diag([70, 60, 50, 40 + seed]) + 5
            rows.append({"trial_id": tid, "rank": rank, "seed": seed, "torch_seed": 10 * rank + seed, "epochs": 5, "epochs_run": 5,
                         "params": 1000, "test_acc": 0.7 - 0.1 * rank + 0.01 * seed, "test_top5": 1.0, "test_loss": 0.5,
                         "per_class_acc": list((cm.diagonal() / cm.sum(1)).astype(float)), "confusion": cm.tolist(),
                         "num_test_images": int(cm.sum()), "train_time_s": 1.0, "wall_time_s": 1.5, "status": "completed",
                         "checkpoint": None, "config": json.dumps(_config(int(tid[1:]))), "rank_by": "best",
                         "search_status": "completed", "search_epochs_run": 3, "search_best_val_acc": 0.5, "search_last_val_acc": 0.5})
    df = retrain_frame(rows, "val_acc")
    write_retrain_table(exp, df)
    exp.write_text("leaderboard.md", leaderboard_markdown(df, experiment=exp.name, metric="val_acc",
                                                          rule=ranking_rule("val_acc", "max", "best"), epochs=5))
    return df


def test_report_without_retrain(tmp_path: Path) -> None:
    exp = make_experiment(tmp_path)
    text = build_report(exp, out=lambda s: None)
    assert "Retrain has not run yet" in text
    assert "| 1 | t0003 |" in text  # top of the search leaderboard by the ranking rule
    for png in SEARCH_PLOTS:
        assert (tmp_path / "hand" / png).read_bytes()[:8] == PNG, png
        assert f"({png})" in text
    for png in RETRAIN_PLOTS:
        assert not (tmp_path / "hand" / png).exists()


def test_report_with_retrain(tmp_path: Path) -> None:
    exp = make_experiment(tmp_path)
    add_retrain(exp)
    text = build_report(exp, out=lambda s: None)
    assert "Retrain has not run" not in text
    assert "Retrain leaderboard" in text and "0.6050 ± 0.0071" in text  # t0003: 0.60 and 0.61
    assert "Per-class test accuracy of the top config (t0003, mean over 2 seeds)" in text
    assert "All classes, best first: class_0" in text  # synthetic class names come from the data set
    for png in SEARCH_PLOTS + RETRAIN_PLOTS:
        assert (tmp_path / "hand" / png).read_bytes()[:8] == PNG, png
    assert (tmp_path / "hand" / "report.md").read_text() == text
    assert "Feature map (t-SNE)" not in text  # retrain wrote no tsne.parquet


def test_report_shows_retrains_feature_map(tmp_path: Path) -> None:
    exp = make_experiment(tmp_path)
    add_retrain(exp)
    rng = np.random.default_rng(0)
    exp.write_table("tsne.parquet", pd.DataFrame({"x": rng.normal(size=40), "y": rng.normal(size=40),
                                                  "label": np.arange(40) % 4, "class": [f"class_{k % 4}" for k in range(40)],
                                                  "trial_id": "t0003"}))
    text = build_report(exp, out=lambda s: None)
    assert "### Feature map (t-SNE)" in text and "of t0003, retrained, on a stratified sample of 40 test images" in text
    assert "![t-SNE feature map](report_tsne.png)" in text
    assert (tmp_path / "hand" / "report_tsne.png").read_bytes()[:8] == PNG


def test_retrain_parquet_keeps_nested_lists(tmp_path: Path) -> None:
    exp = make_experiment(tmp_path)
    add_retrain(exp)
    df = pd.read_parquet(tmp_path / "hand" / "retrain.parquet")
    assert len(df["per_class_acc"].iloc[0]) == 4
    assert np.stack(df["confusion"].iloc[0]).shape == (4, 4)


def test_report_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_experiment(tmp_path)
    assert main(["report", "--storage", str(tmp_path)]) == 0  # the most recent experiment
    assert "report.md" in capsys.readouterr().out
    exp_dir = tmp_path / "hand"
    (exp_dir / "report.md").unlink()
    assert main(["report", str(exp_dir)]) == 0  # the directory search prints, no --storage
    assert (exp_dir / "report.md").is_file()
    assert main(["report", "missing", "--storage", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing" in err[0]


def test_varying_columns_survival_and_log_scale(tmp_path: Path) -> None:
    trials = make_experiment(tmp_path).read_table("trials.parquet")
    cols = varying_config_columns(trials)
    assert "config.optimizer.lr" in cols and "config.model.family" in cols and "config.optimizer.name" in cols
    assert "config.schedule.name" not in cols and "config.train.batch_size" not in cols  # constants
    assert survival_counts(trials, 3) == [5, 3, 2]  # the errored trial never finished an epoch
    assert is_log_scale("config.optimizer.lr", pd.Series([0.001, 0.002]))
    assert is_log_scale("config.optimizer.weight_decay", pd.Series([1e-5, 1e-3]))
    assert is_log_scale("config.x", pd.Series([1.0, 1000.0]))
    assert not is_log_scale("config.train.batch_size", pd.Series([32.0, 128.0]))


def test_report_draws_pbt_lineage(tmp_path: Path) -> None:
    """t0001 copies t0000's checkpoint after epoch 2 with a new lr: the TrialLog records the change,
    the report lists the copy and draws the lineage; a search without exploits has no such section."""
    exp = make_experiment(tmp_path)
    assert "PBT lineage" not in build_report(exp, out=lambda s: None)
    log = TrialLog(exp, metric="val_acc", mode="max", max_epochs=4, flush_every_s=1e9,
                   trials=exp.read_table("trials.parquet"), epochs=exp.read_table("epochs.parquet"))
    for tid in ("t0000", "t0001"):
        log.rows[tid]["status"] = "running"
    donor = json.loads(log.rows["t0000"]["config"])
    new = {**donor, "optimizer": {**donor["optimizer"], "lr": 0.0123}}
    log.trial_result("t0001", {"epoch": 3, "val_acc": 0.6, "lr": 0.0123, "epoch_time_s": 0.1,
                               "restored_from": "t0000", "config_json": json.dumps(new)})
    log.flush(force=True)
    epochs = exp.read_table("epochs.parquet")
    row = epochs[(epochs.trial_id == "t0001") & (epochs.epoch == 3)].iloc[0]
    changes = json.loads(row.config_changes)  # t0001 took t0000's config (another model and optimizer), new lr
    assert row.restored_from == "t0000"
    assert changes["optimizer.lr"] == 0.0123 and changes["model.family"] == "mlp" and changes["optimizer.name"] == "adam"
    assert json.loads(exp.read_table("trials.parquet").set_index("trial_id").loc["t0001", "config"]) == new
    text = build_report(exp, out=lambda s: None)
    assert "## PBT lineage" in text and "1 exploits" in text
    assert "| 3 | t0001 | t0000 | " in text and "optimizer.lr=0.0123" in text
    assert (tmp_path / "hand" / "report_pbt_lineage.png").read_bytes()[:8] == PNG


# -------------------------------------------------------------------------------------- importance


def _importance_tables(n: int = 120) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    """Trials whose epoch-2 metric depends on the optimizer and on sgd's lr only; batch size is noise."""
    from cifar_tune.spec.parse import parse_spec
    from cifar_tune.tuning.sources import make_sampler

    raw = yaml.safe_load(SMOKE.read_text())
    raw["space"]["optimizer"] = {"choice": [
        {"name": "sgd", "lr": {"loguniform": [1e-4, 1.0]}, "momentum": 0.9},
        {"name": "adam", "lr": {"loguniform": [1e-4, 1e-2]}},
    ]}
    raw["space"]["train"] = {"batch_size": {"choice": [32, 64, 128]}}
    spec = parse_spec(raw)
    sampler = make_sampler(spec)
    rng = np.random.default_rng(0)
    trials, epochs = [], []
    for i in range(n):
        cfg = sampler.sample(i).config
        opt = cfg["optimizer"]
        score = 0.7 if opt["name"] == "adam" else 0.95 - 0.1 * abs(np.log10(opt["lr"]) + 2)  # sgd best, at lr 1e-2
        trials.append({"trial_id": f"t{i:04d}", "config": json.dumps(cfg)})
        reached = 3 if i % 4 == 0 else 2 if i % 2 == 0 else 1  # ASHA-like: 120 at epoch 1, 60 at 2, 30 at 3
        for e in range(1, reached + 1):
            epochs.append({"trial_id": f"t{i:04d}", "epoch": e, "val_acc": score - 0.2 / e + rng.normal(0, 1e-3)})
    return spec.space, pd.DataFrame(trials), pd.DataFrame(epochs)


def test_importance_epoch_is_the_last_one_half_the_trials_reached() -> None:
    from cifar_tune.report import importance_epoch

    _, _, epochs = _importance_tables()
    assert importance_epoch(epochs, "val_acc") == (2, 60, 120)
    assert importance_epoch(epochs[epochs.trial_id < "t0004"], "val_acc") is None  # 4 trials: too few


def test_importance_ranks_what_the_metric_depends_on_per_branch() -> None:
    pytest.importorskip("optuna")
    from cifar_tune.report import hyperparameter_importance

    space, trials, epochs = _importance_tables()
    sections = {s.title: s for s in hyperparameter_importance(space, trials, epochs, "val_acc", "max", epoch=2)}
    overall = sections["all trials"]
    # lr exists per branch only; the smoke space also chooses the model (irrelevant to this metric)
    assert overall.trials == 60 and set(overall.values) == {"model", "optimizer", "train.batch_size"}
    assert max(overall.values, key=overall.values.get) == "optimizer"
    sgd = sections["optimizer = sgd"]
    assert set(sgd.values) == {"model", "optimizer[sgd].lr", "train.batch_size"}
    assert max(sgd.values, key=sgd.values.get) == "optimizer[sgd].lr"
    assert sum(sgd.values.values()) == pytest.approx(1.0)
    assert sections["optimizer = adam"].trials + sgd.trials == overall.trials


def test_report_has_an_importance_section(tmp_path: Path) -> None:
    pytest.importorskip("optuna")
    exp = make_experiment(tmp_path)
    text = build_report(exp, out=lambda s: None)
    assert "## Hyperparameter importance" in text
    from cifar_tune.report import importance_epoch

    epoch, _, total = importance_epoch(exp.read_table("epochs.parquet"), "val_acc")
    assert f"of val_acc at epoch {epoch}: the last epoch that at least half of the {total} trials" in text
    assert "| `optimizer` |" in text  # the only parameter every trial of the hand-made search has that varies


# ------------------------------------------------------------------------------------ readable figures


def _drawn_ticks(axis: Any) -> list[Any]:
    """Tick labels matplotlib draws: those inside the view (it also keeps labels for ticks beyond it)."""
    lo, hi = sorted(axis.get_view_interval())
    return [t for t, loc in zip(axis.get_ticklabels(), axis.get_ticklocs(), strict=True) if lo <= loc <= hi]


def _texts_overlap(fig: Any) -> list[tuple[str, str]]:
    """Pairs of visible texts (tick labels, titles, axis labels) whose drawn boxes intersect, where the
    two belong to different axes or are neighbouring tick labels of one axis."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = []
    for ax in fig.axes:
        texts = [(t, "xtick") for t in _drawn_ticks(ax.xaxis)] + [(t, "ytick") for t in _drawn_ticks(ax.yaxis)]
        texts += [(ax.title, "title"), (ax.xaxis.label, "label"), (ax.yaxis.label, "label")]
        for t, kind in texts:
            if t.get_visible() and t.get_text():
                boxes.append((ax, kind, t.get_text(), t.get_window_extent(renderer)))
    clashes = []
    for i, (ax1, k1, s1, b1) in enumerate(boxes):
        for ax2, k2, s2, b2 in boxes[i + 1:]:
            if (ax1 is not ax2 or (k1 == k2 and k1.endswith("tick"))) and b1.overlaps(b2):
                clashes.append((s1, s2))
    return clashes


def _vgg_trials(n: int = 18) -> pd.DataFrame:
    """A searched VGG (list-valued blocks and head) with SGD vs AdamW: lr in both, momentum only in SGD."""
    rows = []
    for i in range(n):
        sgd = i % 2 == 0
        opt = {"name": "sgd", "lr": 0.01 * (1 + i), "momentum": 0.8 + 0.01 * i} if sgd else \
            {"name": "adamw", "lr": 1e-4 * (1 + i), "weight_decay": 0.01}
        cfg = {"model": {"family": "vgg", "blocks": [{"channels": [16 * (1 + i % 3)]}, {"channels": [32, 32 * (1 + i % 2)]}],
                         "head": [64 * (1 + i % 2)]}, "optimizer": opt}
        rows.append({"trial_id": f"t{i:04d}", "best_val_acc": 0.5 + 0.01 * i, "epochs_run": 1 + i % 3,
                     "config": json.dumps(cfg), **flatten(cfg)})
    df = pd.DataFrame(rows)
    for col in df.columns:  # as results writes them: list values of a config column as JSON text
        if df[col].map(lambda v: isinstance(v, list)).any():
            df[col] = df[col].map(json.dumps)
    return df


def test_hyperparameter_panels_split_an_optimizers_own_knobs_by_branch() -> None:
    trials = _vgg_trials()
    titles = [p.title for p in hyperparameter_panels(trials, varying_config_columns(trials))]
    # lr is searched in both branches (over different ranges): one panel each; momentum only varies in
    # SGD; weight_decay is a constant of AdamW's branch (no panel)
    assert "optimizer sgd: lr" in titles and "optimizer adamw: lr" in titles and "optimizer sgd: momentum" in titles
    assert not any("weight_decay" in t for t in titles) and "optimizer.lr" not in titles
    assert "model.blocks" in titles and "model.head" in titles  # one model family: no split


def test_hyperparameter_figure_has_short_tick_labels_and_no_overlaps() -> None:
    trials = _vgg_trials()
    fig = hyperparameter_figure(trials, varying_config_columns(trials), "best_val_acc")
    by_title = {ax.get_title(): ax for ax in fig.axes}
    blocks = [t.get_text() for t in by_title["model.blocks"].get_xticklabels()]
    assert blocks == ["[16,[32,32]]", "[16,[32,64]]", "[32,[32,32]]", "[32,[32,64]]", "[48,[32,32]]", "[48,[32,64]]"]
    assert [t.get_text() for t in by_title["model.head"].get_xticklabels()] == ["64", "128"]
    sgd_lr = by_title["optimizer sgd: lr"].collections[0].get_offsets()
    assert len(sgd_lr) == 9  # only the SGD trials
    assert _texts_overlap(fig) == []


def test_tick_label_is_compact() -> None:
    assert tick_label('[{"channels": [64, 64]}, {"channels": [128]}]') == "[[64,64],128]"
    assert tick_label('[{"channels": [64, 64]}, {"channels": [128, 128]}]') == "[[64,64],[128…"  # 14 characters
    assert tick_label("adam") == "adam" and tick_label(True) == "true"


def test_per_class_figure_explains_its_marks() -> None:
    acc = np.array([0.9, 0.5, 0.7, 0.3])
    fig = per_class_figure(acc, ["a", "b", "c", "d"], "t0000")
    ax = fig.axes[0]
    assert {tuple(p.get_facecolor()) for p in ax.patches} == {tuple(ax.patches[0].get_facecolor())}  # one colour
    legend = ax.get_legend()
    assert legend is not None and [t.get_text() for t in legend.get_texts()] == ["mean over all classes 0.600"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["d", "b", "c", "a"]  # worst at the bottom


def _board_rows(seeds: int, classes: int) -> pd.DataFrame:
    rows = []
    for rank, tid in ((1, "t0003"), (2, "t0000")):
        for seed in range(seeds):
            rows.append({"trial_id": tid, "rank": rank, "seed": seed, "epochs": 5, "epochs_run": 5, "params": 1000,
                         "test_acc": 0.7 - 0.1 * rank + 0.01 * seed, "test_top5": 0.95, "test_loss": 0.5,
                         "per_class_acc": [0.5] * classes, "train_time_s": 1.0, "status": "completed",
                         "config": json.dumps(_config(int(tid[1:]))), "search_best_val_acc": 0.5})
    return retrain_frame(rows, "val_acc")


@pytest.mark.parametrize(("seeds", "classes"), [(1, 4), (1, 10), (2, 4), (2, 100)])
def test_leaderboard_shows_spread_only_over_seeds_and_top5_only_above_5_classes(seeds: int, classes: int) -> None:
    text = leaderboard_markdown(_board_rows(seeds, classes), experiment="x", metric="val_acc",
                                rule="r", epochs=1)
    header = next(line for line in text.splitlines() if line.startswith("| rank"))
    assert ("±" in text) == (seeds > 1)
    assert ("test acc (mean ± std)" in header) == (seeds > 1)
    assert ("test top-5" in header) == (classes > 5)
    assert ("0.9500" in text) == (classes > 5)
    assert "for 1 epoch per seed" in text
    row = next(line for line in text.splitlines() if line.startswith("| 1 |"))
    assert row.count("|") == header.count("|")
    assert "| mlp hidden=32 · sgd lr=0.04 momentum=0.9 · cosine · hflip · batch_size=64 |" in row  # t0003, compact


def test_plural() -> None:
    assert plural(1, "trial") == "1 trial" and plural(0, "trial") == "0 trials" and plural(2, "seed") == "2 seeds"
    assert plural(1.0, "CPU") == "1 CPU" and plural(0.5, "GPU") == "0.5 GPUs" and plural(1200, "epoch") == "1,200 epochs"
    assert plural(2, "child", "children") == "2 children"
