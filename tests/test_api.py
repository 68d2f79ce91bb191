"""The Python API (``import cifar_tune as ct``): specs, searches in one process, experiments, Ctrl-C."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

import cifar_tune as ct
from cifar_tune.errors import SpecError, UserError

ROOT = Path(__file__).resolve().parents[1]

SPEC: dict[str, Any] = {
    "name": "api",
    "data": {"dataset": "synthetic", "synthetic": {"num_train": 400, "num_test": 100, "num_classes": 4, "image_size": 16}},
    "search": {
        "num_samples": 3, "max_concurrent": 2, "seed": 2,
        "scheduler": {"name": "asha", "max_epochs": 2, "grace_period": 1, "reduction_factor": 2},
        "resources": {"cpus_per_trial": 1},
    },
    "space": {
        "model": {"family": "lenet", "channels": [{"choice": [4, 8]}, 8], "padding": 2, "hidden": [16]},
        "optimizer": {"name": "sgd", "lr": {"loguniform": [1e-2, 1e-1]}, "momentum": 0.9},
        "schedule": {"name": "none"},
        "augment": {"hflip": True},
        "train": {"batch_size": 32},
    },
    "retrain": {"top": 1, "epochs": 1},
}

MY_NETS = '''
from torch import nn


class CNN7(nn.Module):
    """A researcher's model: the factory receives the runtime arguments and its own hyperparameters."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int, *, width: int = 8, dropout: float = 0.0) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout))
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(self.features(x))
'''


def _copy(d: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d))


# ------------------------------------------------------------------------------------ no Ray


def test_importing_cifar_tune_loads_neither_torch_nor_ray() -> None:
    code = ("import sys, cifar_tune as ct; f = ct.load_spec; "
            "print(sorted(m for m in ('torch', 'ray', 'pandas') if m in sys.modules), callable(f))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] True"
    with pytest.raises(AttributeError):
        _ = ct.no_such_function


def test_load_spec_with_overrides_as_list_or_mapping(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(SPEC))
    as_list = ct.load_spec(path, ["search.num_samples=5", "space.train.batch_size=16"])
    as_dict = ct.load_spec(str(path), {"search.num_samples": 5, "space.train.batch_size": 16})
    from_mapping = ct.load_spec(_copy(SPEC), {"search.num_samples": 5, "space.train.batch_size": 16})
    assert as_list.search.num_samples == as_dict.search.num_samples == from_mapping.search.num_samples == 5
    assert as_list.space["train"] == as_dict.space["train"] == {"batch_size": 16}
    assert as_list.to_dict() == as_dict.to_dict() == from_mapping.to_dict()
    # a Spec passes through, or takes overrides on top
    assert ct.load_spec(as_list) is as_list
    assert ct.load_spec(as_list, {"search.seed": 9}).search.seed == 9
    # a list value (YAML flow) through a mapping override
    assert ct.load_spec(_copy(SPEC), {"space.model.hidden": [32]}).space["model"]["hidden"] == [32]


def test_load_spec_collects_every_error_with_its_key_path() -> None:
    raw = _copy(SPEC)
    raw["search"]["num_smaples"] = 3
    raw["space"]["optimizer"]["lr"] = {"log_uniform": [1e-3, 1e-1]}
    raw["space"]["model"]["channels"] = [{"choise": [4, 8]}, 8]
    with pytest.raises(SpecError) as e:
        ct.load_spec(raw, {"search.scheduler.max_epochs": 0})
    lines = e.value.lines
    assert any(ln.startswith("search.num_smaples: unknown key (did you mean 'num_samples'?)") for ln in lines), lines
    assert any(ln.startswith("search.scheduler.max_epochs: must be >= 1") for ln in lines), lines
    assert any(ln.startswith("space.optimizer.lr.log_uniform: unknown distribution (did you mean 'loguniform'?)") for ln in lines), lines
    assert any(ln.startswith("space.model.channels[0].choise: unknown distribution (did you mean 'choice'?)") for ln in lines), lines
    with pytest.raises(UserError, match="expected key.path=value"):
        ct.load_spec(_copy(SPEC), ["search.num_samples"])
    with pytest.raises(UserError, match="no such spec file"):
        ct.load_spec("/no/such/spec.yaml")


@pytest.mark.parametrize("typo,meant", [("unifrom", "uniform"), ("choise", "choice"), ("log_uniform", "loguniform"),
                                        ("LogUniform", "loguniform"), ("randit", "randint")])
def test_misspelled_distributions_get_a_suggestion(typo: str, meant: str) -> None:
    raw = _copy(SPEC)
    raw["space"]["optimizer"]["momentum"] = {typo: [0.8, 0.9]}
    with pytest.raises(SpecError) as e:
        ct.load_spec(raw)
    assert e.value.lines == [f"space.optimizer.momentum.{typo}: unknown distribution (did you mean '{meant}'?); "
                             "distributions: choice, grid, uniform, loguniform, quniform, qloguniform, randint, lograndint, normal"]


def test_one_key_mappings_that_are_not_distributions_are_left_alone() -> None:
    raw = _copy(SPEC)
    raw["space"]["augment"] = {"crop": {"padding": 4}, "hflip": True}  # a mapping, not a near-miss dist
    assert ct.load_spec(raw).space["augment"]["crop"] == {"padding": 4}


def test_progress_printer_rewrites_one_line_or_prints_rarely(monkeypatch: pytest.MonkeyPatch) -> None:
    from cifar_tune import api

    clock = [100.0]
    monkeypatch.setattr(api.time, "monotonic", lambda: clock[0])
    out = io.StringIO()
    p = ct.ProgressPrinter(every_s=10, stream=out, rewrite=False)
    for i in range(30):  # a tick every second for 30 s: three lines, not thirty
        p.status(f"status {i}")
        clock[0] += 1
    p("trial done")
    assert out.getvalue().splitlines() == ["status 0", "status 10", "status 20", "trial done"]

    out = io.StringIO()
    p = ct.ProgressPrinter(every_s=10, stream=out, rewrite=True)
    p.status("a long status line")
    clock[0] += 1
    p.status("short")
    p("trial done")  # an ordinary line ends the status line first
    clock[0] += 1
    p.status("again")
    p.close()
    assert out.getvalue() == "\ra long status line\rshort" + " " * 13 + "\ntrial done\n\ragain\n"


@pytest.mark.parametrize("interrupted", [False, True])
def test_search_puts_back_the_sigint_handler(interrupted: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray Tune installs its own SIGINT handler for a search and leaves it after a normal end; the
    handler from before the call is back either way (a notebook's next interrupt works)."""
    import importlib

    search_mod = importlib.import_module("cifar_tune.tuning.driver")  # (ct.search is the API function)

    def fake_run_search(spec: Any, **kwargs: Any) -> str:
        signal.signal(signal.SIGINT, lambda *a: None)  # as Tune's fit() does
        if interrupted:
            raise KeyboardInterrupt
        return "record"

    monkeypatch.setattr(search_mod, "run_search", fake_run_search)
    before = signal.getsignal(signal.SIGINT)
    if interrupted:
        with pytest.raises(KeyboardInterrupt):
            ct.search(_copy(SPEC), out=lambda line: None)
    else:
        assert ct.search(_copy(SPEC), out=lambda line: None).record == "record"
    assert signal.getsignal(signal.SIGINT) is before


def test_open_and_list_refuse_unknown_names_with_a_suggestion(tmp_path: Path) -> None:
    (tmp_path / "cifar_sweep" / "spec.yaml").parent.mkdir()
    (tmp_path / "cifar_sweep" / "spec.yaml").write_text(yaml.safe_dump({"spec": _copy(SPEC)}))
    with pytest.raises(UserError, match="experiment 'cifar_swep' not found .* \\(did you mean 'cifar_sweep'\\?\\)"):
        ct.open("cifar_swep", storage=str(tmp_path))
    assert ct.open("cifar_sweep", storage=str(tmp_path)).name == "cifar_sweep"
    assert ct.open(str(tmp_path / "cifar_sweep")).name == "cifar_sweep"  # by its directory
    listed = ct.list_experiments(str(tmp_path))
    assert list(listed["name"]) == ["cifar_sweep"] and "trials" not in listed  # no trials.parquet yet
    assert ct.list_experiments(str(tmp_path / "nothing_here")).empty


def test_cli_names_the_closest_experiment(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cifar_tune.cli import main

    (tmp_path / "quickstart" / "spec.yaml").parent.mkdir()
    (tmp_path / "quickstart" / "spec.yaml").write_text(yaml.safe_dump({"spec": _copy(SPEC)}))
    for cmd in (["report", "quikstart"], ["retrain", "quikstart"], ["dashboard", "quikstart"], ["evaluate", "quikstart"],
                ["search", "--resume", "quikstart"]):
        assert main([*cmd, "--storage", str(tmp_path)]) == 2, cmd
        assert "(did you mean 'quickstart'?)" in capsys.readouterr().err, cmd


# ---------------------------------------------------------------------------------- on Ray


@pytest.fixture(scope="module")
def first_search(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One small search through ct.search, with its output and progress lines captured."""
    root = tmp_path_factory.mktemp("api")
    lines: list[str] = []
    status: list[str] = []
    before = signal.getsignal(signal.SIGINT)
    exp = ct.search(_copy(SPEC), storage=str(root), num_cpus=2, dashboard=False, out=lines.append, progress=status.append)
    return {"root": root, "exp": exp, "lines": lines, "status": status, "before": before,
            "after": signal.getsignal(signal.SIGINT)}


@pytest.mark.ray
@pytest.mark.slow
def test_search_tables_best_and_list(first_search: dict[str, Any]) -> None:
    exp, root = first_search["exp"], first_search["root"]
    assert first_search["after"] is first_search["before"]  # Ray Tune's SIGINT handler does not stay behind
    assert exp.finished and exp.total_trials == 3
    trials = exp.trials
    pd.testing.assert_frame_equal(trials, pd.read_parquet(root / "api" / "trials.parquet"))
    pd.testing.assert_frame_equal(exp.epochs, pd.read_parquet(root / "api" / "epochs.parquet"))
    assert set(trials.status) <= {"completed", "stopped"} and len(exp.epochs) == trials.epochs_run.sum()
    best = exp.best(2)
    assert list(best["rank"]) == [1, 2]
    done = trials[trials.status == "completed"]  # ranked first: the longest-trained, then by best val_acc
    assert best["trial_id"].iloc[0] == done.sort_values("best_val_acc", ascending=False).trial_id.iloc[0]
    # the same lines as the CLI prints; the periodic table went to the status sink as single lines
    assert any(ln.startswith("search 'api': 3 trials to run of 3") for ln in first_search["lines"])
    assert first_search["status"] and all("\n" not in s and "finished" in s for s in first_search["status"])
    assert not any(ln.startswith("    t0") and "epoch" in ln and "/2" in ln for ln in first_search["lines"][:-10])
    listed = ct.list_experiments(str(root)).set_index("name")
    assert listed.loc["api", "trials"] == 3
    assert listed.loc["api", "completed"] + listed.loc["api", "stopped"] == 3
    assert listed.loc["api", "best_val_acc"] == pytest.approx(best["best_val_acc"].iloc[0])
    reopened = ct.open("api", storage=str(root))
    pd.testing.assert_frame_equal(reopened.best(1), exp.best(1))


@pytest.mark.ray
@pytest.mark.slow
def test_second_search_in_the_same_process_with_a_user_model(first_search: dict[str, Any], tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A second ct.search after the first (Ray started afresh), with the family ``python``: the model
    module sits next to the spec, the search runs from another directory; retrain and evaluate rebuild it."""
    (tmp_path / "specs").mkdir()
    (tmp_path / "specs" / "my_nets.py").write_text(MY_NETS)
    raw = _copy(SPEC)
    raw["name"] = "mine"
    raw["space"]["model"] = {"family": "python", "factory": "my_nets:CNN7", "width": {"choice": [4, 8]},
                             "dropout": {"uniform": [0.0, 0.2]}}
    (tmp_path / "specs" / "mine.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)  # not the spec's directory: my_nets is not importable by name here
    lines: list[str] = []
    exp = ct.search("specs/mine.yaml", storage=str(tmp_path / "runs"), num_cpus=2, dashboard=False, out=lines.append,
                    progress=False)
    trials = exp.trials
    assert exp.finished and set(trials.status) <= {"completed", "stopped"}, trials[["status", "error"]]
    assert set(trials["config.model.factory"]) == {f"{tmp_path / 'specs' / 'my_nets.py'}:CNN7"}
    # parameters as the model has them: conv (3*w*9 + w) + head (w*4 + 4)
    for row in trials.itertuples():
        w = int(trials.loc[row.Index, "config.model.width"])
        assert row.params == 3 * w * 9 + w + w * 4 + 4
    assert (trials.best_val_acc > 0).all()
    df = exp.retrain(top=1, epochs=1, num_cpus=2, out=lines.append)
    assert list(df.status) == ["completed"]
    (result,) = exp.evaluate(device="cpu", out=lines.append)
    assert result.num_images == 100 and result.top1 == pytest.approx(float(df.test_acc.iloc[0]))


@pytest.mark.ray
@pytest.mark.slow
def test_ctrl_c_stops_the_search_cleanly_and_resume_finishes_it(first_search: dict[str, Any], tmp_path: Path) -> None:
    """SIGINT (a notebook's interrupt) while trials run: the search returns a consistent, unfinished
    experiment, the SIGINT handler from before is back, and exp.resume() completes it."""
    raw = _copy(SPEC)
    raw["name"] = "interrupted"
    raw["search"].update(num_samples=4, max_concurrent=1)
    raw["search"]["scheduler"] = {"name": "fifo", "max_epochs": 2}
    sent: list[str] = []

    def progress(line: str) -> None:
        if "1/4 finished" in line and not sent:  # one trial done, others to go: Ctrl-C
            sent.append(line)
            os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)
    lines: list[str] = []
    exp = ct.search(raw, storage=str(tmp_path), num_cpus=2, dashboard=False, out=lines.append, progress=progress)
    assert sent, "\n".join(lines)
    assert signal.getsignal(signal.SIGINT) is before
    assert not exp.finished
    trials = exp.trials
    assert len(trials) == 4 and (trials.status == "completed").sum() >= 1
    assert set(trials.status) <= {"completed", "interrupted", "pending"}, trials.status
    assert any("continue with: cifar-tune search --resume interrupted" in ln for ln in lines)
    # the records agree: every epoch row belongs to a trial, and completed trials have all their epochs
    ep = exp.epochs
    assert set(ep.trial_id) <= set(trials.trial_id)
    for row in trials[trials.status == "completed"].itertuples():
        assert sorted(ep[ep.trial_id == row.trial_id].epoch) == [1, 2]
    done_before = set(trials[trials.status == "completed"].trial_id)
    resumed = exp.resume(num_cpus=2, dashboard=False, out=lines.append, progress=False)
    after = resumed.trials.set_index("trial_id")
    assert resumed.finished and (after.status == "completed").all()
    assert all(after.loc[t, "started_at"] == trials.set_index("trial_id").loc[t, "started_at"] for t in done_before)


@pytest.mark.slow
def test_api_tour_example_runs(tmp_path: Path) -> None:
    """docs/examples/api_tour.py, the notebook-style tour, end to end as a script."""
    env = {**os.environ, "CIFAR_TUNE_TOUR_STORAGE": str(tmp_path), "CIFAR_TUNE_TOUR_CPUS": "2"}
    proc = subprocess.run([sys.executable, str(ROOT / "docs" / "examples" / "api_tour.py")], capture_output=True,
                          text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "tour finished" in proc.stdout
