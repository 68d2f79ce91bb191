"""Shared fixtures. ``fake_cifar`` builds tiny CIFAR releases in the real pickle + tar.gz format (no network)."""

from __future__ import annotations

import dataclasses
import hashlib
import pickle
import shutil
import sys
import tarfile
import urllib.error
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cifar_tune.engine import data, formats


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@dataclass(frozen=True)
class FakeCifar:
    source: data.CifarSource  # the real source with this fake's checksums
    server: Path  # directory the fake downloader serves the archive from
    root: Path  # empty data root to prepare into

    @property
    def served_archive(self) -> Path:
        return self.server / self.source.archive


def write_fake_cifar(workdir: Path, key: str, per_file: int, seed: int = 0) -> FakeCifar:
    """Write ``per_file`` random images per batch file in CIFAR's python-pickle layout and tar.gz it."""
    src = data.CIFAR_SOURCES[key]
    rng = np.random.default_rng(seed)
    k = len(src.classes)
    folder = workdir / "build" / src.folder
    folder.mkdir(parents=True)

    def dump(name: str, obj: dict) -> tuple[str, str]:
        with open(folder / name, "wb") as fh:
            pickle.dump(obj, fh, protocol=2)  # the release was written by Python 2's cPickle
        return name, _md5(folder / name)

    def batch(name: str, offset: int) -> tuple[str, str]:
        labels = [(offset + i) % k for i in range(per_file)]
        entry = {"batch_label": name, "filenames": [f"{name}_{i}.png" for i in range(per_file)],
                 "data": rng.integers(0, 256, (per_file, 3072), dtype=np.uint8), src.label_key: labels}
        if key == "cifar100":  # coarse labels exist too; the loader must read the fine ones
            entry["coarse_labels"] = [lab % 20 for lab in labels]
        return dump(name, entry)

    train = tuple(batch(name, i * per_file) for i, (name, _) in enumerate(src.train_files))
    test = tuple(batch(name, 3) for name, _ in src.test_files)
    meta = {src.meta_key: list(src.classes)}
    if key == "cifar100":
        meta["coarse_label_names"] = [f"super_{i}" for i in range(20)]
    meta_file = dump(src.meta_file[0], meta)
    server = workdir / "server"
    server.mkdir()
    with tarfile.open(server / src.archive, "w:gz") as tar:
        tar.add(folder, arcname=src.folder)
    fake = dataclasses.replace(src, archive_md5=_md5(server / src.archive), train_files=train,
                               test_files=test, meta_file=meta_file)
    root = workdir / "root"
    root.mkdir()
    return FakeCifar(fake, server, root)


def write_fake_stl10(workdir: Path, num_train: int = 100, num_test: int = 50, seed: int = 0) -> FakeCifar:
    """A tiny STL-10 release in its binary layout (``stl10_binary/{train,test}_{X,y}.bin``), tar.gz'd.

    The images are the learnable synthetic set at 96x96 (10 classes), so a model can fit them; X files hold
    each image channel by channel, column-major, and y files labels 1..10, as the real release does.
    """
    from cifar_tune.spec.schema import SyntheticSpec

    src = data.CIFAR_SOURCES["stl10"]
    folder = workdir / "build" / src.folder
    folder.mkdir(parents=True)
    synth = SyntheticSpec(num_train=num_train, num_test=num_test, num_classes=10, image_size=96, seed=seed)

    def write(split: str, train: bool) -> tuple[tuple[str, str], tuple[str, str]]:
        arrays = data.make_synthetic(synth, train)
        (folder / f"{split}_X.bin").write_bytes(arrays.x.transpose(0, 1, 3, 2).tobytes())
        (folder / f"{split}_y.bin").write_bytes((arrays.y + 1).astype(np.uint8).tobytes())
        return tuple((f"{split}_{k}.bin", _md5(folder / f"{split}_{k}.bin")) for k in ("X", "y"))  # type: ignore[return-value]

    train, test = write("train", True), write("test", False)
    (folder / "class_names.txt").write_text("\n".join(src.classes) + "\n")
    (folder / "unlabeled_X.bin").write_bytes(bytes(3 * 96 * 96))  # present in the release, never read
    server = workdir / "server"
    server.mkdir()
    with tarfile.open(server / src.archive, "w:gz") as tar:
        tar.add(folder, arcname=src.folder)
    fake = dataclasses.replace(src, archive_md5=_md5(server / src.archive), train_files=train, test_files=test)
    root = workdir / "root"
    root.mkdir()
    return FakeCifar(fake, server, root)


def serve_from(server: Path) -> Callable[[str, Path, str, str], None]:
    """A stand-in for the network: copies ``server/filename``; verifies the md5 as torchvision does."""

    def download(url: str, root: Path, filename: str, md5: str) -> None:
        src = server / filename
        if not src.is_file():
            raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
        Path(root).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, Path(root) / filename)
        if _md5(Path(root) / filename) != md5:
            raise RuntimeError("File not found or corrupted.")

    return download


@pytest.fixture
def fake_cifar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., FakeCifar]]:
    """``make(key, per_file=...)``: a fake release installed as ``data.CIFAR_SOURCES[key]``, served offline."""

    def make(key: str, per_file: int = 20, seed: int = 0) -> FakeCifar:
        """CIFAR: ``per_file`` images per batch file; STL-10: ``per_file`` x 5 train and x 2.5 test images."""
        if key == "stl10":
            fake = write_fake_stl10(tmp_path / key, 5 * per_file, max(1, per_file * 5 // 2), seed)
        else:
            fake = write_fake_cifar(tmp_path / key, key, per_file, seed)
        monkeypatch.setitem(data.CIFAR_SOURCES, key, fake.source)
        monkeypatch.setattr(formats, "_download_archive", serve_from(fake.server))
        data.clear_cache()
        return fake

    yield make
    data.clear_cache()


def assert_summaries_derived(trials: pd.DataFrame, epochs: pd.DataFrame) -> None:
    """Every per-trial summary is a function of that trial's epoch rows (summaries.summarise_epochs)."""
    assert epochs.epoch.notna().all(), "an epoch row without an epoch"
    for row in trials.itertuples():
        ep = epochs[epochs.trial_id == row.trial_id].sort_values("epoch")
        # epochs_run is the epoch the trial reached. Its rows are the epochs it trained: 1, 2, ... except
        # where it continued from another trial's checkpoint (a PBT exploit: 1, 2, 5, 6 after copying an
        # epoch-4 checkpoint), and such a jump is recorded on the row after it (restored_from, the donor)
        assert row.epochs_run == (int(ep.epoch.max()) if len(ep) else 0), row.trial_id
        assert ep.epoch.is_unique, row.trial_id
        restored = ep.restored_from.notna() if "restored_from" in ep else pd.Series(False, index=ep.index)
        previous = [0, *ep.epoch.iloc[:-1]][: len(ep)]
        for e, before, copied in zip(ep.epoch, previous, restored, strict=True):
            assert e == before + 1 or copied, f"{row.trial_id}: epochs {list(ep.epoch)} jump to {e} unrecorded"
        assert row.train_time_s == pytest.approx(ep.train_time_s.astype(float).sum()), row.trial_id
        assert row.epoch_time_s == pytest.approx(ep.epoch_time_s.astype(float).sum()), row.trial_id
        if len(ep):
            # an attempt that continued from a checkpoint keeps the earlier attempt's rows up to it
            # attempts never go back along the epochs, and none is newer than the trial's
            assert ep.attempt.is_monotonic_increasing and ep.attempt.max() <= row.attempts, f"{row.trial_id}: {list(ep.attempt)}"
        # best_* come from the epochs trained since the last exploit (the model and config the trial ends with)
        since = ep[ep.epoch >= ep.epoch[restored].max()] if restored.any() else ep
        if since.val_acc.notna().any():
            assert row.best_val_acc == pytest.approx(since.val_acc.max()), row.trial_id
            assert ep.set_index("epoch").val_acc[row.best_epoch] == pytest.approx(since.val_acc.max())
        else:
            assert pd.isna(row.best_val_acc) and pd.isna(row.best_epoch), row.trial_id
        if len(ep):
            last = ep.iloc[-1]
            for k in ("val_acc", "train_loss"):
                assert (pd.isna(last[k]) and pd.isna(getattr(row, f"last_{k}"))) or getattr(row, f"last_{k}") == pytest.approx(last[k])


# ----------------------------------------------------------------------- one watched search (Ray)

WATCHED_SPEC = {
    "name": "watched",
    "data": {"dataset": "synthetic", "synthetic": {"num_train": 600, "num_test": 100, "num_classes": 4, "image_size": 16}},
    "search": {
        "num_samples": 6, "max_concurrent": 2, "seed": 3,
        "scheduler": {"name": "asha", "max_epochs": 3, "grace_period": 1, "reduction_factor": 2},
        "resources": {"cpus_per_trial": 1},
    },
    "space": {
        "model": {"choice": [
            {"family": "lenet", "channels": [{"choice": [4, 8]}, 8], "padding": 2, "hidden": [16]},
            {"family": "mlp", "hidden": [{"choice": [16, 32]}]},
        ]},
        "optimizer": {"choice": [
            {"name": "sgd", "lr": {"loguniform": [1e-2, 2e-1]}, "momentum": 0.9},
            {"name": "adam", "lr": {"loguniform": [1e-3, 1e-2]}},
        ]},
        "schedule": {"name": "none"},
        "augment": {"hflip": True},
        "train": {"batch_size": 32},
    },
}


@pytest.fixture(scope="session")
def watched_search(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One short search with every observer on: the Optuna journal, MLflow (local store), W&B offline
    and Ray's metrics. Ray is shut down before the tests run, so other modules can start their own;
    what needs Ray alive (Prometheus text, worker logs) is collected here, while the search runs."""
    import logging
    import threading
    import urllib.request

    import ray

    from cifar_tune.spec.parse import parse_spec
    from cifar_tune.tuning import trainable
    from cifar_tune.tuning.driver import run_search

    root = tmp_path_factory.mktemp("watched")
    raw = {**WATCHED_SPEC, "tracking": {"mlflow": {"uri": str(root / "mlruns")},
                                        "wandb": {"project": "cifar-tune-tests", "mode": "offline", "dir": str(root / "wb")}}}
    spec = parse_spec(raw, str(root / "watched.yaml"))
    # metrics every 500 ms instead of 10 s, so a short search shows up on the endpoint
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING,
             _system_config={"metrics_report_interval_ms": 500})
    scraped: list[str] = []
    stop = threading.Event()

    def scrape() -> None:  # as Prometheus would: every node's endpoint, repeatedly
        while not stop.wait(0.5):
            for url in trainable.metrics_export_urls():
                try:
                    text = urllib.request.urlopen(url, timeout=5).read().decode()
                except OSError:
                    continue
                scraped.append("\n".join(ln for ln in text.splitlines() if "cifar_tune" in ln))

    thread = threading.Thread(target=scrape, daemon=True)
    thread.start()
    lines: list[str] = []
    try:
        exp = run_search(spec, storage=str(root / "exp"), dashboard=False, out=lines.append)
        stop.wait(1.5)  # one more export of the final values
        stop.set()
        thread.join()
        logs_dir = Path(ray._private.worker._global_node.get_logs_dir_path())
        worker_logs = "\n".join(p.read_text(errors="replace") for p in logs_dir.glob("worker-*.out"))
    finally:
        stop.set()
        ray.shutdown()
    return {"root": root, "exp": exp, "spec": spec, "out": lines, "metrics": scraped, "worker_logs": worker_logs}


@pytest.fixture(scope="module", autouse=True)
def _no_ray_left_running(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test module that starts Ray shuts it down: an instance left running would make the next module's
    ``ray.init`` fail ("called ray.init twice") or, worse, be joined silently. Set up before, and so torn
    down after, every fixture of the module."""
    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
        pytest.fail(f"{request.module.__name__} left a Ray instance running", pytrace=False)


@pytest.fixture(autouse=True)
def _test_split_allowed_again() -> Iterator[None]:
    """A trial run in the pytest process forbids the test split for the rest of that process, as it does in a
    throwaway Ray worker; a later test (a retrain, an evaluation) must not depend on which tests ran before it."""
    yield
    data.allow_test()
