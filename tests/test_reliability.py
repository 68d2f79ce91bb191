"""Bad input, faults and security: one-line errors with exit 2 and nothing written; Ctrl-C and resume;
atomic result files; paths that cannot escape the storage root; safe YAML, no eval, localhost dashboard."""

from __future__ import annotations

import copy
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from cifar_tune.cli import main
from cifar_tune.errors import UserError
from cifar_tune.results import Experiment, Storage, TrialLog
from cifar_tune.spec.parse import load_yaml

ROOT = Path(__file__).resolve().parents[1]
SMOKE = load_yaml((ROOT / "search_spaces" / "smoke.yaml").read_text())


def _spec(**changes: Any) -> dict[str, Any]:
    spec = copy.deepcopy(SMOKE)
    for path, value in changes.items():
        node = spec
        keys = path.split("__")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return spec


def _npz(tmp: Path, name: str, **arrays: Any) -> str:
    base = {"x_train": np.zeros((8, 8, 8, 3), np.uint8), "y_train": np.arange(8) % 2}
    base.update(arrays)
    path = tmp / f"{name}.npz"
    np.savez(path, **{k: v for k, v in base.items() if v is not None})
    return str(path)


def _npz_spec(tmp: Path, name: str, **arrays: Any) -> dict[str, Any]:
    return _spec(data={"dataset": "npz", "path": _npz(tmp, name, **arrays)})


def _corrupt_cifar(tmp: Path) -> dict[str, Any]:
    root = tmp / "cifar-root"
    root.mkdir()
    (root / "cifar-10-python.tar.gz").write_bytes(b"definitely not the CIFAR-10 archive")
    return _spec(data={"dataset": "cifar10", "root": str(root), "download": False})


def _experiment_with_one_usable_trial(tmp: Path) -> str:
    from cifar_tune.spec.parse import parse_spec

    exp = Experiment(str(tmp / "experiments"), "done")
    exp.write_text("spec.yaml", yaml.safe_dump({"spec": parse_spec(copy.deepcopy(SMOKE)).to_dict(), "meta": {}}))
    log = TrialLog(exp, metric="val_acc", mode="max", max_epochs=3)
    for i, status in enumerate(["completed", "diverged", "error"]):
        log.add_pending(f"t{i:04d}", i, {"model": {"family": "mlp", "hidden": [8]}}, 100)
        log.rows[f"t{i:04d}"].update(status=status, epochs_run=3, best_val_acc=0.5 if status == "completed" else None)
    log.flush(force=True)
    return str(tmp / "experiments")


# (id, spec-or-None, argv after the spec path (or the whole argv when spec is None), expected error text)
Case = tuple[str, Callable[[Path], Any], list[str], str]
CASES: list[Case] = [
    ("yaml-syntax", lambda t: "name: x\nsearch: {num_samples: [1, 2\n", ["validate"], r"\.yaml:3:1: YAML error"),
    ("yaml-tab", lambda t: "name: x\n\tsearch: 1\n", ["validate"], r"\.yaml:2:1: YAML error"),
    ("unsafe-tag", lambda t: "name: !!python/object/apply:os.getcwd []\n", ["validate"], "unsafe or unknown YAML tag"),
    ("not-a-mapping", lambda t: "- 1\n- 2\n", ["validate"], "a spec must be a YAML mapping"),
    ("missing-file", None, ["validate", "nope.yaml"], r"nope\.yaml: no such spec file"),
    ("misspelt-top", lambda t: _spec(serach={}), ["validate"], r"serach: unknown top-level key \(did you mean 'search'\?\)"),
    ("misspelt-nested", lambda t: _spec(search__schedular={}), ["validate"], r"search.schedular: unknown key \(did you mean 'scheduler'\?\)"),
    ("wrong-type", lambda t: _spec(search__num_samples="ten"), ["validate"], "search.num_samples: must be an integer, got 'ten'"),
    ("unordered-range", lambda t: _spec(space__optimizer={"name": "sgd", "lr": {"uniform": [0.5, 0.1]}}), ["validate"],
     r"space.optimizer.lr.uniform: low must be < high, got low=0.5, high=0.1"),
    ("nonpositive-log", lambda t: _spec(space__optimizer={"name": "sgd", "lr": {"loguniform": [-1, 0.1]}}), ["validate"],
     r"space.optimizer.lr.loguniform: low must be > 0, got -1"),
    ("empty-choice", lambda t: _spec(space__model={"choice": []}), ["validate"], r"space.model.choice: must have at least one option"),
    ("unknown-optimizer", lambda t: _spec(space__optimizer={"name": "lamb"}), ["validate"], r"space.optimizer.name: unknown optimizer 'lamb'"),
    ("unknown-family", lambda t: _spec(space__model={"family": "vgg16"}), ["validate"], r"space.model.family: unknown model family 'vgg16'"),
    ("unknown-augmentation", lambda t: _spec(space__augment={"augmix": True}), ["validate"], r"space.augment.augmix: unknown augmentation"),
    ("unknown-schedule", lambda t: _spec(space__schedule={"name": "cyclic"}), ["validate"], r"space.schedule.name: unknown lr schedule 'cyclic'"),
    ("unknown-dataset", lambda t: _spec(data={"dataset": "imagenet"}), ["validate"], r"data.dataset: unknown dataset 'imagenet'"),
    ("foreign-hyperparameter", lambda t: _spec(space__optimizer={"name": "adagrad", "momentum": 0.9}), ["validate"],
     r"space.optimizer.momentum: not a hyperparameter of optimizer 'adagrad'"),
    ("too-many-pools", lambda t: _spec(space__model={"family": "vgg", "blocks": [{"channels": [8]}] * 5}), ["validate"],
     r"space.model.blocks: .*16x16"),
    ("infeasible-budget", lambda t: _spec(constraints={"max_params": 100}), ["validate"],
     r"constraints.max_params: no model fits 100 parameters"),
    ("npz-missing", lambda t: _spec(data={"dataset": "npz", "path": str(t / "absent.npz")}), ["validate"], r"data.path: npz file not found: .*absent.npz"),
    ("npz-dtype", lambda t: _npz_spec(t, "f32", x_train=np.zeros((8, 8, 8, 3), np.float32)), ["validate"], r"f32.npz: x_train must be uint8"),
    ("npz-shape", lambda t: _npz_spec(t, "shape", x_train=np.zeros((8, 8, 8), np.uint8)), ["validate"], r"shape.npz: x_train must be 4-D"),
    ("npz-labels-negative", lambda t: _npz_spec(t, "neg", y_train=np.arange(8) - 1), ["validate"], r"neg.npz: y_train has negative labels"),
    ("npz-labels-length", lambda t: _npz_spec(t, "len", y_train=np.arange(5) % 2), ["validate"], r"len.npz: y_train has 5 labels but the images have 8"),
    ("npz-labels-range", lambda t: _npz_spec(t, "range", y_train=np.arange(8) % 2 + 1, class_names=np.array(["a", "b"])),
     ["validate"], r"range.npz: y_train has labels up to 2 but class_names lists 2"),
    ("npz-not-npz", lambda t: (t / "junk.npz").write_bytes(b"junk") and _spec(data={"dataset": "npz", "path": str(t / "junk.npz")}),
     ["validate"], r"cannot read .*junk.npz as .npz"),
    # splits every trial would crash on (empty validation set) or be scored on without some class
    ("split-empty-val", lambda t: _spec(data__subset=4, data__val_fraction=0.1), ["validate"],
     r"data.val_fraction: 0.1 of 4 images leaves an empty validation set \(raise data.subset or data.val_fraction\)"),
    ("split-val-lacks-classes", lambda t: _spec(data__subset=10, data__val_fraction=0.2), ["validate"],
     r"data.val_fraction: 0.2 of 10 images leaves a validation set of 2 images that lacks 2 of 4 classes"),
    ("split-train-lacks-classes", lambda t: _spec(data__subset=7, data__val_fraction=0.6), ["validate"],
     r"data.subset: 0.6 of 7 images leaves a training set of 3 images that lacks 1 of 4 classes"),
    ("split-class-absent-from-val", lambda t: _spec(data={"dataset": "npz", "path": _npz(
        t, "rare", x_train=np.zeros((20, 16, 16, 3), np.uint8), y_train=np.array([0] * 10 + [1] * 9 + [2]),
        class_names=np.array(["a", "b", "rare"]))}), ["search", "--no-dashboard"],
     r"data.val_fraction: 0.2 of 20 images leaves a validation set of 4 images that lacks 1 of 3 classes \(e.g. 'rare'\)"),
    ("split-class-without-images", lambda t: _spec(data={"dataset": "npz", "path": _npz(
        t, "gap", x_train=np.zeros((20, 16, 16, 3), np.uint8), y_train=np.arange(20) % 2 * 2,
        class_names=np.array(["a", "never", "c"]))}), ["search", "--no-dashboard"],
     r"leaves a validation set of 4 images that lacks 1 of 3 classes \(e.g. 'never'\)"),
    ("corrupt-cifar-archive", _corrupt_cifar, ["search", "--no-dashboard"], r"cifar-10-python.tar.gz.*(md5|checksum)"),
    ("retrain-missing-experiment", None, ["retrain", "nope", "--storage", "experiments", "--top", "1"], r"experiment 'nope' not found"),
    ("retrain-no-experiments", None, ["retrain", "--storage", "empty", "--top", "1"], r"no experiment under"),
    ("retrain-top-too-large", None, ["retrain", "done", "--storage", "{exp}", "--top", "2"], r"--top 2 .*1 usable"),
    ("set-without-equals", lambda t: _spec(), ["validate", "--set", "search.num_samples"], r"--set 'search.num_samples': expected key.path=value"),
    ("set-bad-index", lambda t: _spec(), ["validate", "--set", "space.model.choice[7].hidden=[4]"], r"--set space.model.choice\[7\].hidden: .* has no item \[7\]"),
    ("set-bad-value", lambda t: _spec(), ["validate", "--set", "search.max_failures=-3"], r"search.max_failures: must be >= 0, got -3"),
    ("set-bad-yaml", lambda t: _spec(), ["validate", "--set", "search.seed=[1"], r"--set search.seed.*YAML error"),
    ("name-parent", lambda t: _spec(), ["search", "--name", "../x", "--no-dashboard"], r"experiment name: must be .* got '../x'"),
    ("name-absolute", lambda t: _spec(), ["search", "--name", "/tmp/x", "--no-dashboard"], r"experiment name: must be .* got '/tmp/x'"),
    ("name-in-spec", lambda t: _spec(name="a/b"), ["search", "--no-dashboard"], r"name: must be .* got 'a/b'"),
    ("model-info-missing", None, ["model-info", "nope.yaml"], r"nope.yaml: no such model file"),
    ("model-info-impossible", lambda t: {"family": "lenet", "channels": [6, 16, 32, 64, 128, 256]}, ["model-info"], r"model.yaml: channels"),
]


@pytest.mark.parametrize("case,make,argv,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_exit_2_and_writes_nothing(
    case: str, make: Callable[[Path], Any] | None, argv: list[str], expected: str,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    exp_root = _experiment_with_one_usable_trial(tmp_path / "pre") if case == "retrain-top-too-large" else ""
    argv = [a.replace("{exp}", exp_root) for a in argv]
    if make is not None:
        content = make(tmp_path)
        path = tmp_path / ("model.yaml" if argv[0] == "model-info" else "spec.yaml")
        path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
        argv = [argv[0], str(path), *argv[1:]]
    def files() -> list[Path]:  # the data root's lock file is not an output
        return sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.name != ".lock")

    before = files()
    code = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    assert re.search(expected, lines[0]), lines[0]
    assert "Traceback" not in err
    assert files() == before  # nothing written


def test_catalog_is_large_enough() -> None:
    assert len(CASES) >= 30


# ------------------------------------------------------------------------------------------- faults


def test_results_are_written_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash in the middle of writing leaves the previous file intact and no partial file behind."""
    storage = Storage(str(tmp_path))
    good = pd.DataFrame({"a": [1, 2, 3]})
    storage.write_table("x/trials.parquet", good)

    def crash(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt  # e.g. Ctrl-C or a kill while writing

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        storage.write_table("x/trials.parquet", pd.DataFrame({"a": [9] * 1000}))
    monkeypatch.undo()
    assert pd.read_parquet(tmp_path / "x" / "trials.parquet").equals(good)
    assert [p.name for p in (tmp_path / "x").iterdir()] == ["trials.parquet"]  # no *.tmp-* left behind


def test_a_failed_write_leaves_no_temporary_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fails half-way (disk full) removes its temporary file and keeps the old file."""
    import builtins

    storage = Storage(str(tmp_path))
    storage.write_text("x/spec.yaml", "old")
    real_open = builtins.open

    class Full:
        def __init__(self, f: Any) -> None:
            self.f = f

        def __enter__(self) -> Any:
            return self

        def __exit__(self, *exc: Any) -> None:
            self.f.close()

        def write(self, data: bytes) -> int:
            self.f.write(data[:3])
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(builtins, "open", lambda path, mode="r", *a, **k: Full(real_open(path, mode, *a, **k))
                        if ".tmp-" in str(path) else real_open(path, mode, *a, **k))
    with pytest.raises(OSError, match="No space"):
        storage.write_text("x/spec.yaml", "new contents")
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["spec.yaml"]
    assert (tmp_path / "x" / "spec.yaml").read_text() == "old"


def test_paths_cannot_escape_the_storage_root(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path / "root"))
    with pytest.raises(UserError, match="escapes the storage root"):
        storage.write_text("../outside.txt", "x")
    with pytest.raises(UserError, match="escapes the storage root"):
        storage.path("a/../../b")
    for bad in ("..", "../x", "/etc", "a/b", ".hidden", ""):
        with pytest.raises(UserError, match="experiment name"):
            Experiment(str(tmp_path), bad)
    assert not (tmp_path / "outside.txt").exists()


@pytest.mark.ray
def test_ctrl_c_stops_cleanly_and_resume_finishes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = _spec(name="interrupted")
    spec["search"].update(num_samples=6, max_concurrent=1, scheduler={"name": "fifo", "max_epochs": 3})
    spec["space"]["model"] = {"family": "lenet", "channels": [4, 8], "padding": 2, "hidden": [16]}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec))
    cmd = [sys.executable, "-m", "cifar_tune", "search", str(path), "--storage", str(tmp_path), "--no-dashboard", "--num-cpus", "2"]
    driver = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    trials_path = tmp_path / "interrupted" / "trials.parquet"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        time.sleep(0.5)
        if trials_path.exists() and (pd.read_parquet(trials_path).status == "completed").sum() >= 1:
            break
    os.killpg(driver.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends to the foreground group
    out, _ = driver.communicate(timeout=120)
    before = pd.read_parquet(trials_path)
    finished = before[before.status == "completed"]
    with capsys.disabled():
        print(f"\n  Ctrl-C test, after SIGINT: {len(finished)} completed of {len(before)}; {before.status.value_counts().to_dict()}")
    assert "--resume" in out, out[-2000:]  # tells the user how to continue
    assert 1 <= len(finished) < 6
    assert not (before.status == "running").any()  # nothing left claiming to run

    proc = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    after = pd.read_parquet(trials_path).set_index("trial_id")
    with capsys.disabled():
        print(f"  Ctrl-C test, after --resume: {(after.status == 'completed').sum()} completed of {len(after)}")
    assert len(after) == 6 and (after.status == "completed").all()
    assert (after.loc[finished.trial_id, "started_at"].to_numpy() == finished.started_at.to_numpy()).all()
    # every trial, the interrupted one continued from its checkpoint included: epochs 1..3 exactly once
    epochs = pd.read_parquet(tmp_path / "interrupted" / "epochs.parquet")
    assert sorted(epochs.groupby("trial_id").epoch.apply(sorted).apply(tuple).unique()) == [(1, 2, 3)]


# ----------------------------------------------------------------------------------------- security


def test_no_eval_or_unsafe_loading_in_the_package() -> None:
    sources = {p: p.read_text() for p in (ROOT / "cifar_tune").glob("*.py")}
    for path, text in sources.items():
        assert not re.search(r"(?<![\w.])(eval|exec)\(", text), path
        assert "yaml.load(" not in text or "Loader=_Loader" in text, path
        assert "pickle.loads(" not in text, path
        for line in text.splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, (path, line)


def test_pickle_payload_in_yaml_is_never_executed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    assert main(["validate", str(path)]) == 2
    assert not marker.exists()
    assert "unsafe or unknown YAML tag" in capsys.readouterr().err


def test_cifar_pickle_reader_does_not_execute_code(tmp_path: Path) -> None:
    """CIFAR batches are pickles; a malicious 'batch' must not run code when read."""
    from cifar_tune.engine import formats

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, (f"touch {marker}",))

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(Exception):  # noqa: B017 - any refusal is fine; executing is not
        formats._read_pickle(folder / "data_batch_1")
    assert not marker.exists()


@pytest.mark.ray
def test_dashboard_binds_localhost_with_token_auth() -> None:
    import urllib.error
    import urllib.request

    from cifar_tune.tuning import cluster

    info = cluster.connect(None, dashboard=True, num_cpus=1)
    try:
        assert info.dashboard_url is not None and info.dashboard_url.startswith("http://127.0.0.1:")
        assert info.token_auth
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(info.dashboard_url + "/api/version", timeout=20)
        assert e.value.code == 401  # no token, no dashboard
    finally:
        cluster.shutdown()


@pytest.mark.ray
@pytest.mark.parametrize("mode", ["DISABLED", "token"])
def test_token_auth_reports_what_ray_did(mode: str) -> None:
    """Ray reads RAY_AUTH_MODE case-insensitively: "DISABLED" turns token auth off, and RayInfo says so."""
    code = ("from cifar_tune.tuning import cluster; i = cluster.connect(None, dashboard=False, num_cpus=1); "
            "print('token_auth', i.token_auth); cluster.shutdown()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "RAY_AUTH_MODE": mode})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"token_auth {mode == 'token'}" in proc.stdout


def test_subset_larger_than_the_data_set_fails_before_anything_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(_spec(data={"dataset": "synthetic", "subset": 99999})))
    assert main(["search", str(path), "--storage", str(tmp_path / "exp"), "--no-dashboard"]) == 2
    assert "data.subset=99999 must be in [1, 5000]" in capsys.readouterr().err
    assert not (tmp_path / "exp").exists()
