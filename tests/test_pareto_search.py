"""Several objectives end to end on synthetic data with Ray: the front in trials.parquet is the front of
the epoch rows and measured costs, the hypervolume is Optuna's, the trials dashboard holds a
multi-objective study, and ``retrain --pareto`` refits exactly the front. Plus the same derivations
on hand-made records, without Ray."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from cifar_tune.errors import UserError
from cifar_tune.pareto import hypervolume, hypervolume_frame, select_pareto, to_minimise
from cifar_tune.results import Experiment, TrialLog
from cifar_tune.spec.schema import ObjectiveSpec

OBJECTIVES = (ObjectiveSpec("val_acc"), ObjectiveSpec("params"), ObjectiveSpec("latency_ms"))


def _brute_front(points: dict[str, tuple[float, ...]], modes: list[str]) -> set[str]:
    sign = [-1 if m == "max" else 1 for m in modes]
    p = {t: tuple(s * v for s, v in zip(sign, x, strict=True)) for t, x in points.items() if all(math.isfinite(v) for v in x)}
    return {t for t, a in p.items() if not any(all(y <= x for x, y in zip(a, b, strict=True)) and b != a for b in p.values())}


def _log(tmp_path: Path) -> TrialLog:
    """Five trials by hand: one diverged (no metric), one still running; costs as a trial reports them."""
    log = TrialLog(Experiment(str(tmp_path), "x"), metric="val_acc", mode="max", max_epochs=3, flush_every_s=0,
                   objectives=OBJECTIVES)
    curves = {"t0000": [0.3, 0.5, 0.6], "t0001": [0.4, 0.7, 0.8], "t0002": [0.2, 0.3], "t0003": [math.nan], "t0004": [0.9]}
    size = {"t0000": 1000, "t0001": 5000, "t0002": 500, "t0003": 10, "t0004": 10}
    t = 0.0
    for i, (tid, accs) in enumerate(curves.items()):
        log.add_pending(tid, i, {"model": {"family": "mlp", "hidden": [i + 1]}}, size[tid])
        log.trial_started(tid, {})
        for e, acc in enumerate(accs, 1):
            t += 1
            status = "diverged" if math.isnan(acc) else "running"
            log.trial_result(tid, {"epoch": e, "val_acc": None if math.isnan(acc) else acc, "params": size[tid],
                                   "latency_ms": size[tid] / 100, "macs": 2 * size[tid], "train_time_s": 1.0,
                                   "ended_at": t, "status": status})
        if tid != "t0004":
            log.trial_finished(tid, {"status": "diverged"} if tid == "t0003" else {})
    return log


def test_front_columns_are_derived_from_the_records(tmp_path: Path) -> None:
    log = _log(tmp_path)
    trials = log.trials_frame()
    assert list(trials.obj_val_acc[:3]) == [0.6, 0.8, 0.3] and list(trials.obj_latency_ms[:3]) == [10.0, 50.0, 5.0]
    # t0003 diverged and t0004 still runs: no rank; of the rest, t0000 (0.6, 1000) is not dominated by
    # t0001 (0.8, 5000) nor t0002 (0.3, 500): all three are on the front
    assert trials.pareto_rank.tolist()[:3] == [0, 0, 0] and trials.pareto_rank.isna().tolist()[3:] == [True, True]
    stored = Experiment(str(tmp_path), "x").read_table("trials.parquet")
    pd.testing.assert_frame_equal(stored[["pareto_rank", "crowding"]], trials[["pareto_rank", "crowding"]], check_dtype=False)
    # a trial that makes t0000 dominated: recomputed, not carried over
    log.add_pending("t0005", 5, {"model": {"family": "mlp", "hidden": [9]}}, 900)
    log.trial_started("t0005", {})
    for e in (1, 2, 3):
        log.trial_result("t0005", {"epoch": e, "val_acc": 0.7, "params": 900, "latency_ms": 9.0, "ended_at": 10.0 + e})
    log.trial_finished("t0005", {})
    trials = log.trials_frame()
    assert trials.set_index("trial_id").pareto_rank["t0000"] == 1


def test_hypervolume_frame_against_a_recomputation(tmp_path: Path) -> None:
    log = _log(tmp_path)
    hv = hypervolume_frame(log.epochs_frame(), log.trials_frame(), OBJECTIVES)
    assert hv.epochs_done.tolist() == list(range(1, 11))
    ref = [0.0, 1.1 * 5000, 1.1 * 50]  # accuracy 0; costs 1.1 x the worst trial's
    assert [hv[f"ref_{o.metric}"].iloc[0] for o in OBJECTIVES] == pytest.approx(ref)
    # after the last row: every trial at its best epoch so far (the diverged one adds nothing)
    points = [[0.6, 1000, 10], [0.8, 5000, 50], [0.3, 500, 5], [0.9, 10, 0.1]]
    expected = hypervolume(to_minimise(points, ["max", "min", "min"]), [-0.0, ref[1], ref[2]])
    assert hv.hypervolume.iloc[-1] == pytest.approx(expected)
    assert hv.hypervolume_fraction.iloc[-1] == pytest.approx(expected / (1.0 * ref[1] * ref[2]))
    assert (np.diff(hv.hypervolume) >= -1e-12).all()  # the front so far only grows
    # after row 3 (t0000 at epoch 3 alone): the box of one point
    assert hv.hypervolume.iloc[2] == pytest.approx(0.6 * (ref[1] - 1000) * (ref[2] - 10))


def test_select_pareto(tmp_path: Path) -> None:
    trials = _log(tmp_path).trials_frame()
    assert set(select_pareto(trials, objectives=OBJECTIVES, top=None, experiment="x").trial_id) == {"t0000", "t0001", "t0002"}
    top2 = select_pareto(trials, objectives=OBJECTIVES, top=2, experiment="x")
    assert top2["rank"].tolist() == [1, 2] and len(set(top2.trial_id) - {"t0000", "t0001", "t0002"}) == 0
    with pytest.raises(UserError, match="one objective"):
        select_pareto(trials, objectives=(), top=None, experiment="x")
    with pytest.raises(UserError, match="--top 9"):
        select_pareto(trials, objectives=OBJECTIVES, top=9, experiment="x")


# ------------------------------------------------------------------------------------ with Ray


@pytest.fixture(scope="module")
def pareto_search(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    import ray

    from cifar_tune.spec.parse import load_spec
    from cifar_tune.tuning.driver import run_search

    root = tmp_path_factory.mktemp("pareto")
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    try:
        spec = load_spec("search_spaces/smoke_pareto.yaml", ["search.num_samples=6", "search.scheduler.max_epochs=3",
                                                               "search.algorithm=optuna"])
        exp = run_search(spec, storage=str(root), dashboard=False, num_cpus=2, out=lambda s: None)
        yield {"exp": exp, "root": root}
    finally:
        ray.shutdown()


@pytest.mark.ray
@pytest.mark.slow
def test_search_front_and_retrain_pareto(pareto_search: dict[str, Any]) -> None:
    from cifar_tune.cli import main
    from cifar_tune.report import build_report

    exp = pareto_search["exp"]
    trials, epochs = exp.read_table("trials.parquet"), exp.read_table("epochs.parquet")
    assert trials.status.isin(["completed", "stopped"]).all() and (trials.latency_ms > 0).all()
    # the front recomputed from the epoch rows (best val_acc) and the measured costs
    points = {}
    for t in trials.to_dict("records"):
        rows = epochs[epochs.trial_id == t["trial_id"]]
        points[t["trial_id"]] = (float(rows.val_acc.max()), float(t["params"]), float(t["latency_ms"]))
    front = _brute_front(points, ["max", "min", "min"])
    assert set(trials.trial_id[trials.pareto_rank == 0]) == front
    # the hypervolume after the last epoch is that of every trial's point
    hv = exp.read_table("hypervolume.parquet")
    ref = [-0.0, hv.ref_params.iloc[-1], hv.ref_latency_ms.iloc[-1]]
    assert hv.hypervolume.iloc[-1] == pytest.approx(hypervolume(to_minimise(list(points.values()), ["max", "min", "min"]), ref))
    # the trials dashboard's study has the three objectives; its Pareto front is ours
    import optuna

    study = optuna.load_study(study_name=exp.name, storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(Path(exp.uri()) / "optuna.journal"))))
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE", "MINIMIZE"]
    assert {t.user_attrs["trial_id"] for t in study.best_trials} == front
    # retrain --pareto refits exactly that set
    assert main(["retrain", exp.uri(), "--pareto", "--epochs", "1", "--seeds", "1", "--num-cpus", "2"]) == 0
    rt = exp.read_table("retrain.parquet")
    assert set(rt.trial_id) == front and (rt.pareto_rank == 0).all() and rt.latency_ms.notna().all()
    board = exp.read_text("leaderboard.md")
    assert "| MACs | latency (ms) | Pareto rank |" in board
    text = build_report(exp, out=lambda s: None)
    assert "## Pareto front" in text and "report_pareto_test.png" in text and "report_hypervolume.png" in text
    assert json.loads(trials.config.iloc[0])  # (configs stay JSON)


def test_trials_dashboard_records_a_multi_objective_study(tmp_path: Path) -> None:
    """The journal mirror of a search with several objectives: one direction per objective, the objective
    vectors of finished trials, and optuna's own Pareto front equal to trials.parquet's."""
    import optuna

    from cifar_tune.watch.dashboard import OptunaMirror

    log = _log(tmp_path)
    path = tmp_path / "optuna.journal"
    mirror = OptunaMirror(path, study_name="x", space={}, log=log, scheduler={"name": "mo_asha"})
    for tid, row in log.rows.items():
        mirror.trial_started(tid, json.loads(row["config"]))
        if row["status"] != "running":
            mirror._finish(tid)
    study = optuna.load_study(study_name="x", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(path))))
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE", "MINIMIZE"]
    assert study.metric_names == ["val_acc", "params", "latency_ms"]
    done = {t.user_attrs["trial_id"]: t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE}
    assert done["t0000"].values == [0.6, 1000.0, 10.0] and done["t0002"].user_attrs["stopped_at_epoch"] == 2
    trials = log.trials_frame()
    assert {t.user_attrs["trial_id"] for t in study.best_trials} == set(trials.trial_id[trials.pareto_rank == 0])


def test_optuna_is_told_every_objective(tmp_path: Path) -> None:
    """With several objectives the study has a direction per objective (TPE's multi-objective variant):
    a full run is COMPLETE with trials.parquet's objective vector, a stopped one PRUNED, and a resumed
    search's study learns the earlier trials with their vectors too."""
    import optuna

    from cifar_tune.spec.parse import parse_spec, read_spec_file
    from cifar_tune.tuning.sources import OptunaSource

    raw = read_spec_file("search_spaces/smoke_pareto.yaml")
    raw["search"].update(algorithm="optuna", num_samples=3, objectives=["val_acc", "params"])
    raw["search"]["scheduler"]["max_epochs"] = 2
    spec = parse_spec(raw)
    log = TrialLog(Experiment(str(tmp_path), "opt"), metric="val_acc", mode="max", max_epochs=2, flush_every_s=1e9,
                   objectives=spec.search.pareto_objectives)
    source = OptunaSource(spec, log, [], 0, 3)
    assert isinstance(source.study.sampler, optuna.samplers.TPESampler) and len(source.study.directions) == 2
    for accs in ([0.4, 0.6], [0.5]):
        tid, _ = source.next_trial()
        log.trial_started(tid, {})
        for e, acc in enumerate(accs, 1):
            log.trial_result(tid, {"epoch": e, "val_acc": acc, "params": log.rows[tid]["params"]})
        log.trial_finished(tid, {})
        source.trial_finished(tid, {}, error=False)
    full, stopped = source.study.trials
    assert full.state == optuna.trial.TrialState.COMPLETE and full.values == [0.6, float(log.rows["t0000"]["params"])]
    assert stopped.state == optuna.trial.TrialState.PRUNED
    again = OptunaSource(spec, log, [], 2, 3)  # --resume
    recorded = {t.user_attrs["trial_id"]: t for t in again.study.trials}
    assert recorded["t0000"].values == full.values and recorded["t0001"].state == optuna.trial.TrialState.PRUNED
