"""Watching a search: the Optuna journal behind the trials dashboard, the page in a real browser,
Ray's Prometheus metrics and the trial names in the workers' logs (one search: ``watched_search``)."""

from __future__ import annotations

import json
import math
import shutil
import struct
import threading
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from cifar_tune.results import Experiment, trial_label
from cifar_tune.spec.searched import searched_params
from cifar_tune.watch import dashboard

optuna = pytest.importorskip("optuna")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _study(path: Path, name: str) -> Any:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(path))))


def _tables(exp: Experiment) -> tuple[pd.DataFrame, pd.DataFrame]:
    return exp.read_table("trials.parquet"), exp.read_table("epochs.parquet")


STATE = {"completed": "COMPLETE", "stopped": "PRUNED", "diverged": "FAIL", "error": "FAIL", "oom": "FAIL"}


def check_journal_matches_tables(study: Any, trials: pd.DataFrame, epochs: pd.DataFrame, space: dict[str, Any]) -> None:
    by_id = {t.user_attrs["trial_id"]: t for t in study.trials}
    assert sorted(by_id) == sorted(trials.trial_id)
    for row in trials.itertuples():
        t = by_id[row.trial_id]
        cfg = json.loads(row.config)
        assert t.state.name == STATE[row.status], row.trial_id
        assert t.user_attrs["status"] == row.status and t.user_attrs["name"] == trial_label(row.trial_id, cfg)
        ep = epochs[epochs.trial_id == row.trial_id].dropna(subset=["val_acc"])
        assert t.intermediate_values == dict(zip(ep.epoch.astype(int), ep.val_acc, strict=True))
        assert t.params == {p.name: p.value for p in searched_params(space, cfg)}
        if row.status == "completed":
            assert t.value == pytest.approx(row.best_val_acc)
        if row.status == "stopped":
            assert t.user_attrs["stopped_at_epoch"] == row.epochs_run
            assert t.value == pytest.approx(ep.val_acc.iloc[-1])


@pytest.mark.ray
@pytest.mark.slow
def test_search_writes_the_journal_as_the_tables_say(watched_search: dict[str, Any]) -> None:
    exp, spec = watched_search["exp"], watched_search["spec"]
    trials, epochs = _tables(exp)
    study = _study(dashboard.journal_path(exp), exp.name)
    check_journal_matches_tables(study, trials, epochs, spec.space)
    assert set(trials.status) >= {"completed", "stopped"}  # ASHA stopped some: PRUNED is exercised
    # the search prints where the journal is (no server with --no-dashboard)
    assert any(ln.startswith("trials journal: ") and "cifar-tune dashboard watched" in ln for ln in watched_search["out"])


@pytest.mark.ray
@pytest.mark.slow
def test_dashboard_command_rebuilds_a_journal_from_the_tables(watched_search: dict[str, Any], tmp_path: Path) -> None:
    """An experiment without a journal (e.g. run without Optuna) gets one from its parquet files, equal to the live one."""
    src = Path(watched_search["exp"].uri())
    copy = tmp_path / "watched"
    shutil.copytree(src, copy, ignore=shutil.ignore_patterns("optuna.journal", "ray", "wandb"))
    exp = Experiment(str(tmp_path), "watched")
    path = dashboard.ensure_journal(exp, out=lambda s: None)
    trials, epochs = _tables(exp)
    check_journal_matches_tables(_study(path, "watched"), trials, epochs, watched_search["spec"].space)


@pytest.mark.ray
@pytest.mark.slow
def test_trials_dashboard_in_a_real_browser(watched_search: dict[str, Any], tmp_path: Path) -> None:
    if CHROMIUM is None:
        pytest.skip("no chromium on this machine (.ci/run installs it)")
    playwright = pytest.importorskip("playwright.sync_api")
    exp = watched_search["exp"]
    n_trials = len(exp.read_table("trials.parquet"))
    server = dashboard.make_server(dashboard.journal_path(exp), 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    problems: list[str] = []
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("console", lambda m: problems.append(f"{m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(f"pageerror: {e}"))
            page.goto(dashboard.url(server), wait_until="networkidle")
            page.get_by_text("watched").first.wait_for(timeout=30_000)  # the study list names the experiment
            page.goto(dashboard.url(server) + "studies/0", wait_until="networkidle")
            curves = page.locator(".js-plotly-plot", has_text="Step")  # the learning curves: x axis "Step"
            curves.first.wait_for(timeout=30_000)
            legend = curves.first.locator(".legendtext").all_text_contents()  # SVG text
            # one curve per trial (every trial reported at least one epoch), each a line of its epochs
            assert sorted(t.strip() for t in legend) == sorted(f"trial #{i}" for i in range(n_trials))
            assert curves.first.locator(".scatterlayer .trace").count() == n_trials
            page.screenshot(path=str(tmp_path / "trials_dashboard.png"), full_page=True)
            browser.close()
    finally:
        server.shutdown()
        server.server_close()
    assert problems == []
    assert (tmp_path / "trials_dashboard.png").stat().st_size > 10_000


def _samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """Prometheus text lines of ``name`` -> (labels, value)."""
    out = []
    for ln in text.splitlines():
        if ln.startswith(name + "{"):
            labels_txt, value = ln[len(name) + 1:].rsplit("} ", 1)
            labels = dict(kv.split("=", 1) for kv in labels_txt.split('",') if "=" in kv)
            out.append(({k: v.strip('"') for k, v in labels.items()}, float(value)))
    return out


@pytest.mark.ray
@pytest.mark.slow
def test_trials_and_search_export_prometheus_metrics(watched_search: dict[str, Any]) -> None:
    exp = watched_search["exp"]
    trials, epochs = _tables(exp)
    text = "\n".join(watched_search["metrics"])
    names = {trial_label(r.trial_id, json.loads(r.config)): r for r in trials.itertuples()}
    # per trial, tagged with its name: the epochs and validation metrics it reported. A worker's last
    # values can die with it before Ray's next export (Tune ends the actors at the end), so a trial's
    # gauge may stop one epoch short, but it never shows an epoch or a value the trial did not report.
    seen: dict[str, set[float]] = {}
    for labels, v in _samples(text, "ray_cifar_tune_trial_epoch"):
        assert labels["experiment"] == "watched"
        seen.setdefault(labels["trial"], set()).add(v)
    assert set(seen) == set(names)
    for name, epochs_seen in seen.items():
        assert epochs_seen <= set(range(1, names[name].epochs_run + 1)), name
    for lab, v in _samples(text, "ray_cifar_tune_trial_val_metric"):
        if lab["metric"] == "val_acc":
            reported = epochs[epochs.trial_id == names[lab["trial"]].trial_id].val_acc
            assert any(math.isclose(v, a) for a in reported), lab["trial"]
    assert {lab["trial"] for lab, _ in _samples(text, "ray_cifar_tune_trial_images_per_s")} == set(names)
    # per search: the last scrape has the final counts by status and the best metric
    final = watched_search["metrics"][-1]
    counts = {lab["status"]: v for lab, v in _samples(final, "ray_cifar_tune_search_trials")}
    assert counts == {s: float((trials.status == s).sum()) for s in counts}
    assert counts["completed"] + counts["stopped"] == len(trials)
    (best,) = [v for lab, v in _samples(final, "ray_cifar_tune_search_best_metric")]
    assert best == pytest.approx(trials.best_val_acc.max())


@pytest.mark.ray
@pytest.mark.slow
def test_worker_logs_name_each_trial(watched_search: dict[str, Any]) -> None:
    trials = watched_search["exp"].read_table("trials.parquet")
    logs = watched_search["worker_logs"]
    for r in trials.itertuples():
        name = trial_label(r.trial_id, json.loads(r.config))
        assert f"cifar-tune: trial {name} starting (experiment watched" in logs
        assert f":actor_name:{name}" in logs  # Ray's log monitor prefixes the following lines with it




def read_hparams(events: Path) -> tuple[dict[str, Any], dict[str, float]]:
    """The HParams session of one TensorBoard events file (TFRecord of Event protos): (hparams, metrics)."""
    from tensorboardX.proto import event_pb2, plugin_hparams_pb2

    data, pos = events.read_bytes(), 0
    hparams: dict[str, Any] = {}
    metrics: dict[str, float] = {}
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
        pos += 12 + length + 4  # length, its crc, the record, its crc
        for v in event.summary.value:
            if v.metadata.plugin_data.plugin_name == "hparams":
                plugin = plugin_hparams_pb2.HParamsPluginData.FromString(v.metadata.plugin_data.content)
                if plugin.HasField("session_start_info"):
                    for k, val in plugin.session_start_info.hparams.items():
                        hparams[k] = val.string_value if val.HasField("string_value") else (
                            val.bool_value if val.HasField("bool_value") else val.number_value)
            elif v.HasField("simple_value") or v.HasField("tensor"):
                metrics[v.tag] = v.simple_value
    return hparams, metrics


@pytest.mark.ray
@pytest.mark.slow
def test_tensorboard_runs_carry_trial_names_every_knob_and_the_best_metric(watched_search: dict[str, Any]) -> None:
    exp, spec = watched_search["exp"], watched_search["spec"]
    trials = exp.read_table("trials.parquet")
    runs = {}
    for events in Path(exp.uri("ray")).rglob("events.out.tfevents*"):
        hp, metrics = read_hparams(events)
        if hp:
            runs[events.parent.name] = (hp, metrics)
    names = {trial_label(r.trial_id, json.loads(r.config)): r for r in trials.itertuples()}
    assert sorted(runs) == sorted(names)  # one run per trial, named by the trial
    for name, (hp, metrics) in runs.items():
        row = names[name]
        expected = {p.name: p.value for p in searched_params(spec.space, json.loads(row.config))}
        assert hp == {**{k: v if isinstance(v, str) else pytest.approx(v) for k, v in expected.items()}, "trial": name}
        assert any("[" in k for k in hp)  # list elements and branch knobs are there
        assert metrics["best_val_acc"] == pytest.approx(row.best_val_acc)
        assert metrics["epochs_run"] == row.epochs_run


@pytest.mark.ray
@pytest.mark.slow
def test_dashboard_command_serves_an_experiment(watched_search: dict[str, Any]) -> None:
    import signal
    import subprocess
    import sys
    import urllib.request

    storage = Path(watched_search["exp"].uri()).parent
    proc = subprocess.Popen([sys.executable, "-m", "cifar_tune", "dashboard", "watched", "--storage", str(storage),
                             "--port", "0"], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # "trials dashboard for 'watched': http://127.0.0.1:PORT/dashboard/  (Ctrl-C ...)"
        url = line.split(": ", 1)[1].split()[0]
        assert url.startswith("http://127.0.0.1:")
        studies = json.loads(urllib.request.urlopen(url.replace("/dashboard/", "/api/studies"), timeout=30).read())
        assert [s["study_name"] for s in studies["study_summaries"]] == ["watched"]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)


def test_the_journal_follows_a_pbt_trial_through_an_exploit(tmp_path: Path) -> None:
    """No Ray: the events an async PBT trial produces (own epochs 1-2, then a copy of another trial's
    epoch-4 checkpoint with a perturbed config, epochs 5-8). The journal says what trials.parquet says
    at every step: epochs_run is the epoch reached, the parameters are those of the config in force."""
    from cifar_tune.errors import ErrorList
    from cifar_tune.results import TrialLog
    from cifar_tune.spec.space import parse_tree
    from cifar_tune.tuning.progress import Fanout

    raw = {"optimizer": {"name": "sgd", "lr": {"loguniform": [1e-3, 0.3]}},
           "train": {"label_smoothing": {"choice": [0.0, 0.1]}}}
    errors = ErrorList()
    space = {k: parse_tree(v, f"space.{k}", errors) for k, v in raw.items()}
    exp = Experiment(str(tmp_path), "pbt")
    exp.write_text("spec.yaml", "spec: {}\n")
    log = TrialLog(exp, metric="val_acc", mode="max", max_epochs=8, flush_every_s=0)
    mirror = dashboard.OptunaMirror(tmp_path / "j.journal", study_name="pbt", space=space, log=log, scheduler={})
    events = Fanout(log, mirror)  # as in a search: the log first, the mirror reads it
    mine = {"optimizer": {"name": "sgd", "lr": 0.2}, "train": {"label_smoothing": 0.0}}
    copied = {"optimizer": {"name": "sgd", "lr": 0.012}, "train": {"label_smoothing": 0.1}}
    log.add_pending("t0000", 0, mine, 5)

    def metrics(e: int, acc: float, **extra: Any) -> dict[str, Any]:
        return {"epoch": e, "val_acc": acc, "val_loss": 1 - acc, "train_loss": 1.0, "train_time_s": 0.1, "epoch_time_s": 0.2, **extra}

    def check() -> None:
        trials, epochs = _tables(exp)
        row = trials.set_index("trial_id").loc["t0000"]
        t = _study(tmp_path / "j.journal", "pbt").trials[0]
        assert t.user_attrs["epochs_run"] == row.epochs_run
        assert t.params == {p.name: p.value for p in searched_params(space, json.loads(row.config))}
        assert t.intermediate_values == dict(zip(epochs.epoch.astype(int), epochs.val_acc, strict=True))

    events.trial_started("t0000", mine)
    for e, acc in ((1, 0.3), (2, 0.5)):
        events.trial_result("t0000", metrics(e, acc))
        check()
    events.trial_resumed("t0000")
    events.trial_result("t0000", metrics(5, 0.4, restored_from="t0001", config_json=json.dumps(copied)))
    check()
    assert _study(tmp_path / "j.journal", "pbt").trials[0].params["optimizer.lr"] == 0.012
    for e, acc in ((6, 0.45), (7, 0.47), (8, 0.46)):
        events.trial_result("t0000", metrics(e, acc))
        check()
    events.trial_finished("t0000", {})
    trials, epochs = _tables(exp)
    check_journal_matches_tables(_study(tmp_path / "j.journal", "pbt"), trials, epochs, space)
    assert trials.status.iloc[0] == "completed" and trials.best_val_acc.iloc[0] == 0.47
