"""Shared fixtures. ``fake_cifar`` builds tiny CIFAR releases in the real pickle + tar.gz format (no network)."""

from __future__ import annotations

import dataclasses
import hashlib
import pickle
import shutil
import tarfile
import urllib.error
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cifar_tune import data


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
    from cifar_tune.spec import SyntheticSpec

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
        monkeypatch.setattr(data, "_download_archive", serve_from(fake.server))
        data.clear_cache()
        return fake

    yield make
    data.clear_cache()


def assert_summaries_derived(trials: pd.DataFrame, epochs: pd.DataFrame) -> None:
    """The invariant of issue 10: every per-trial summary is a function of that trial's epoch rows."""
    assert epochs.epoch.notna().all(), "an epoch row without an epoch"
    for row in trials.itertuples():
        ep = epochs[epochs.trial_id == row.trial_id].sort_values("epoch")
        assert row.epochs_run == len(ep), row.trial_id
        assert list(ep.epoch) == list(range(1, len(ep) + 1)), row.trial_id
        assert row.train_time_s == pytest.approx(ep.train_time_s.astype(float).sum()), row.trial_id
        assert row.epoch_time_s == pytest.approx(ep.epoch_time_s.astype(float).sum()), row.trial_id
        if len(ep):
            assert (ep.attempt == row.attempts).all(), f"{row.trial_id}: rows of an earlier attempt"
        if ep.val_acc.notna().any():
            assert row.best_val_acc == pytest.approx(ep.val_acc.max()), row.trial_id
            assert ep.set_index("epoch").val_acc[row.best_epoch] == pytest.approx(ep.val_acc.max())
        else:
            assert pd.isna(row.best_val_acc) and pd.isna(row.best_epoch), row.trial_id
        if len(ep):
            last = ep.iloc[-1]
            for k in ("val_acc", "train_loss"):
                assert (pd.isna(last[k]) and pd.isna(getattr(row, f"last_{k}"))) or getattr(row, f"last_{k}") == pytest.approx(last[k])
