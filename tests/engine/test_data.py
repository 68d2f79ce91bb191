"""cifar_tune.engine.data: CIFAR pickle/tar.gz handling (offline fakes), npz validation, synthetic, splits, caches."""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch

from cifar_tune.engine import data, formats
from cifar_tune.engine.data import DataError
from cifar_tune.spec.schema import DataSpec, SyntheticSpec

if TYPE_CHECKING:
    from conftest import FakeCifar

SMALL_SYNTH = SyntheticSpec(num_train=600, num_test=200, num_classes=6, image_size=16)


@pytest.fixture(autouse=True)
def _fresh_process_state() -> Iterator[None]:
    data.clear_cache()
    data.allow_test()
    yield
    data.clear_cache()
    data.allow_test()


def _spec(fake: FakeCifar, key: str, **kw: object) -> DataSpec:
    return DataSpec(dataset=key, root=str(fake.root), **kw)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------
# CIFAR


def test_cifar10_download_extract_and_load(fake_cifar: Callable[..., FakeCifar]) -> None:
    fake = fake_cifar("cifar10", per_file=20)
    spec = _spec(fake, "cifar10", val_fraction=0.2)
    data.prepare(spec)
    assert (fake.root / "cifar-10-batches-py" / "data_batch_5").is_file()
    assert (fake.root / "cifar-10-python.tar.gz").is_file()
    train, val = data.load_splits(spec)
    assert (len(train), len(val)) == (80, 20)
    assert train.x.dtype == torch.uint8 and train.x.shape[1:] == (3, 32, 32) and train.x.is_contiguous()
    assert val.y.dtype == torch.int64
    assert torch.bincount(val.y, minlength=10).tolist() == [2] * 10  # stratified
    raw = formats.read_cifar(fake.source, fake.root / fake.source.folder, train=True)
    assert raw.classes == formats.CIFAR10_CLASSES == data.dataset_info(spec).classes
    assert raw.y[:12].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    with open(fake.root / fake.source.folder / "data_batch_1", "rb") as fh:
        first = pickle.load(fh, encoding="latin1")["data"][0]
    # the release stores each image as 1024 R, then G, then B values, row-major
    assert np.array_equal(raw.x[0], first.reshape(3, 32, 32))
    test = data.load_test(spec)
    assert len(test) == 20 and test.y[0].item() == 3


def test_cifar100_reads_fine_labels_and_meta(fake_cifar: Callable[..., FakeCifar]) -> None:
    fake = fake_cifar("cifar100", per_file=200)
    spec = _spec(fake, "cifar100", val_fraction=0.5)
    train, val = data.load_splits(spec)  # without prepare(): loading prepares on demand
    assert (len(train), len(val)) == (100, 100)
    assert torch.bincount(train.y, minlength=100).tolist() == [1] * 100
    raw = formats.read_cifar(fake.source, fake.root / fake.source.folder, train=True)
    assert raw.classes == formats.CIFAR100_CLASSES and len(raw.classes) == 100
    assert raw.y.max() == 99  # fine labels, not the 20 coarse ones
    info = data.dataset_info(spec)
    assert (info.num_classes, info.channels, info.image_size) == (100, 3, 32)
    assert info.mean == (0.5071, 0.4867, 0.4408)


def test_cifar_info_needs_no_files(tmp_path: Path) -> None:
    info = data.dataset_info(DataSpec(dataset="cifar10", root=str(tmp_path / "nothing")))
    assert info.std == (0.2470, 0.2435, 0.2616) and len(info.classes) == 10
    assert not (tmp_path / "nothing").exists()


def test_offline_without_archive_says_what_to_put_where(fake_cifar: Callable[..., FakeCifar]) -> None:
    fake = fake_cifar("cifar10")
    fake.served_archive.unlink()  # the "network" is down
    with pytest.raises(DataError) as err:
        data.prepare(_spec(fake, "cifar10"))
    msg = str(err.value)
    assert "\n" not in msg
    for part in ("cifar-10-python.tar.gz", fake.source.archive_md5, fake.source.url, str(fake.root)):
        assert part in msg


def test_download_off_and_missing(fake_cifar: Callable[..., FakeCifar]) -> None:
    fake = fake_cifar("cifar10")
    with pytest.raises(DataError, match="download is off: put cifar-10-python.tar.gz"):
        data.load_splits(_spec(fake, "cifar10", download=False))


def test_corrupt_local_archive_names_path(fake_cifar: Callable[..., FakeCifar]) -> None:
    fake = fake_cifar("cifar10")
    (fake.root / fake.source.archive).write_bytes(b"not a tarball")
    with pytest.raises(DataError) as err:
        data.prepare(_spec(fake, "cifar10", download=False))
    assert f"{fake.root / fake.source.archive} fails its md5" in str(err.value)


def test_corrupt_download_is_a_data_error(fake_cifar: Callable[..., FakeCifar]) -> None:
    fake = fake_cifar("cifar10")
    fake.served_archive.write_bytes(b"truncated")
    with pytest.raises(DataError, match="cannot download CIFAR-10 .*corrupted.*put cifar-10-python.tar.gz"):
        data.prepare(_spec(fake, "cifar10"))


def test_manually_placed_archive_is_verified_and_extracted(fake_cifar: Callable[..., FakeCifar]) -> None:
    fake = fake_cifar("cifar10", per_file=10)
    (fake.root / fake.source.archive).write_bytes(fake.served_archive.read_bytes())
    fake.served_archive.unlink()
    spec = _spec(fake, "cifar10", download=False)
    data.prepare(spec)
    assert len(data.load_trainval(spec)) == 50


def test_corrupt_extracted_file_is_reextracted(fake_cifar: Callable[..., FakeCifar]) -> None:
    fake = fake_cifar("cifar10", per_file=10)
    spec = _spec(fake, "cifar10")
    data.prepare(spec)
    batch = fake.root / fake.source.folder / "data_batch_3"
    batch.write_bytes(b"garbage")
    data.prepare(spec)  # md5 mismatch -> re-extract from the verified archive
    assert formats.read_cifar(fake.source, batch.parent, train=True).x.shape == (50, 3, 32, 32)
    batch.write_bytes(b"garbage")
    (fake.root / fake.source.archive).unlink()
    with pytest.raises(DataError, match="data_batch_3 is corrupt"):
        data.prepare(_spec(fake, "cifar10", download=False))


# ----------------------------------------------------------------------------------------------------
# STL-10 and class subsets


def test_stl10_binary_release_reads_like_torchvision(fake_cifar: Callable[..., FakeCifar]) -> None:
    from torchvision.datasets import STL10

    fake = fake_cifar("stl10", per_file=20)  # 100 train, 50 test images of 96x96
    spec = _spec(fake, "stl10", val_fraction=0.2)
    data.prepare(spec)
    info = data.dataset_info(spec)
    assert (info.num_classes, info.channels, info.image_size, info.classes) == (10, 3, 96, data.STL10_CLASSES)
    train, val = data.load_splits(spec)
    assert (len(train), len(val)) == (80, 20) and train.x.shape[1:] == (3, 96, 96)
    tv = STL10.__new__(STL10)  # torchvision's own reader of the binary files (its md5 list is the real one)
    tv.root, tv.base_folder = str(fake.root), fake.source.folder
    for split, ours in (("train", data.load_trainval(spec)), ("test", data.load_test(spec))):
        x_ref, y_ref = tv._STL10__loadfile(f"{split}_X.bin", f"{split}_y.bin")
        assert np.array_equal(ours.x.numpy(), x_ref) and np.array_equal(ours.y.numpy(), y_ref)
    assert len(data.load_test(spec)) == 50


def test_stl10_offline_message_like_cifar(fake_cifar: Callable[..., FakeCifar]) -> None:
    fake = fake_cifar("stl10", per_file=4)
    fake.served_archive.unlink()
    with pytest.raises(DataError) as err:
        data.prepare(_spec(fake, "stl10"))
    for part in ("stl10_binary.tar.gz", fake.source.archive_md5, fake.source.url, str(fake.root)):
        assert part in str(err.value)
    with pytest.raises(DataError, match="download is off: put stl10_binary.tar.gz"):
        data.load_splits(_spec(fake, "stl10", download=False))


def test_class_subset_by_name_relabelled_in_order(fake_cifar: Callable[..., FakeCifar]) -> None:
    fake = fake_cifar("stl10", per_file=20)
    names = ["car", "deer", "horse", "monkey", "truck"]
    full, sub = _spec(fake, "stl10"), _spec(fake, "stl10", classes=names)
    info = data.dataset_info(sub)
    assert (info.num_classes, info.classes, info.image_size) == (5, tuple(names), 96)
    all_train, all_test = data.load_trainval(full), data.load_test(full)
    for split, whole in ((data.load_trainval(sub), all_train), (data.load_test(sub), all_test)):
        for k, name in enumerate(names):
            original = data.STL10_CLASSES.index(name)
            assert torch.equal(split.x[split.y == k], whole.x[whole.y == original])
        assert sorted(set(split.y.tolist())) == [0, 1, 2, 3, 4]
    train, val = data.load_splits(sub)
    assert len(train) + len(val) == int(sum((all_train.y == data.STL10_CLASSES.index(n)).sum() for n in names))


def test_class_subset_errors_and_synthetic(tmp_path: Path) -> None:
    from cifar_tune.errors import SpecError
    from cifar_tune.spec.parse import parse_spec

    spec = DataSpec(dataset="synthetic", synthetic=SMALL_SYNTH, classes=["class_4", "class_1"])
    assert data.dataset_info(spec).classes == ("class_4", "class_1")
    train, _ = data.load_splits(spec)
    assert sorted(set(train.y.tolist())) == [0, 1] and len(train) < SMALL_SYNTH.num_train / 2
    with pytest.raises(SpecError, match=r"data.classes: cifar10 has no class 'dear' \(did you mean 'deer'\?\)"):
        parse_spec({"name": "x", "data": {"classes": ["cat", "dear"]}, "space": {"model": {"family": "lenet"}}})
    with pytest.raises(SpecError, match="data.classes: must list at least 2 distinct class names"):
        parse_spec({"name": "x", "data": {"classes": ["cat", "cat"]}, "space": {"model": {"family": "lenet"}}})


def test_data_root_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(formats.DATA_ROOT_ENV, str(tmp_path / "env"))
    assert data.data_root(DataSpec(root=str(tmp_path / "spec"))) == tmp_path / "spec"
    assert data.data_root(DataSpec()) == tmp_path / "env"
    monkeypatch.delenv(formats.DATA_ROOT_ENV)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.data_root(DataSpec()) == tmp_path / "home" / ".cache" / "cifar-tune"


_CONCURRENT_PREPARE = textwrap.dedent("""
    import pickle, sys, time
    from pathlib import Path
    from cifar_tune.engine import data, formats
    from tests.conftest import serve_from

    source, server, root, log = pickle.loads(Path(sys.argv[1]).read_bytes())
    data.CIFAR_SOURCES["cifar10"] = source
    serve = serve_from(server)

    def slow_download(url, dest, filename, md5):
        with open(log, "a") as fh:
            fh.write("download\\n")
        serve(url, dest, filename, md5)
        time.sleep(0.5)  # hold the lock long enough for the other process to be waiting on it

    formats._download_archive = slow_download
    data.prepare(data.DataSpec(dataset="cifar10", root=str(root)))
    print(len(data.load_trainval(data.DataSpec(dataset="cifar10", root=str(root)))))
""")


def test_concurrent_prepare_downloads_once(fake_cifar: Callable[..., FakeCifar], tmp_path: Path) -> None:
    fake = fake_cifar("cifar10", per_file=10)
    log = tmp_path / "downloads.log"
    args = tmp_path / "args.pkl"
    args.write_bytes(pickle.dumps((fake.source, fake.server, fake.root, log)))
    repo = Path(__file__).resolve().parents[2]
    procs = [subprocess.Popen([sys.executable, "-c", _CONCURRENT_PREPARE, str(args)], cwd=repo,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
        assert out.strip() == "50"
    assert log.read_text().count("download") == 1
    assert formats._cifar_corrupt_file(fake.source, fake.root) is None
    assert not list(fake.root.glob(".extract-*"))  # no temp dirs left behind


# ----------------------------------------------------------------------------------------------------
# npz


def _write_npz(path: Path, **arrays: np.ndarray) -> DataSpec:
    np.savez(path, **arrays)
    return DataSpec(dataset="npz", path=str(path), val_fraction=0.25)


def _images(n: int, layout: str = "nhwc", c: int = 3, s: int = 8, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).integers(0, 256, (n, s, s, c), dtype=np.uint8)
    return x if layout == "nhwc" else x.transpose(0, 3, 1, 2).copy()


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_npz_happy_path(tmp_path: Path, layout: str) -> None:
    x = _images(40, layout)
    y = np.arange(40) % 4
    spec = _write_npz(tmp_path / "d.npz", x_train=x, y_train=y, x_test=_images(8, layout, seed=1),
                      y_test=np.arange(8) % 4, class_names=np.array(["a", "b", "c", "d"]))
    data.prepare(spec)
    info = data.dataset_info(spec)
    assert (info.num_classes, info.channels, info.image_size, info.classes) == (4, 3, 8, ("a", "b", "c", "d"))
    train, val = data.load_splits(spec)
    assert (len(train), len(val)) == (30, 10)
    expected_mean = tuple(np.round(train.x.permute(1, 0, 2, 3).reshape(3, -1).double().mean(1).numpy() / 255, 4))
    assert np.allclose(info.mean, expected_mean, atol=1e-4)  # the training split's, not all 40 images'

    trainval = data.load_trainval(spec)
    assert torch.equal(trainval.x.permute(0, 2, 3, 1), torch.from_numpy(_images(40)))
    test = data.load_test(spec)
    assert test.x.shape == (8, 3, 8, 8) and test.y.tolist() == (np.arange(8) % 4).tolist()


@pytest.mark.parametrize("dataset", ["npz", "synthetic"])
def test_normalisation_statistics_come_from_the_training_split_only(tmp_path: Path, dataset: str) -> None:
    """Validation images never leak into the mean/std the model is normalised with."""
    if dataset == "npz":
        y = np.arange(40) % 4
        x = np.zeros((40, 8, 8, 3), np.uint8)
        spec = _write_npz(tmp_path / "s.npz", x_train=x, y_train=y)
        _, val_idx = data._split_indices(spec, y)
        x[val_idx] = 255  # the validation images are white, the training images black
        spec = _write_npz(tmp_path / "s.npz", x_train=x, y_train=y)
        data.clear_cache()
    else:
        spec = DataSpec(dataset="synthetic", synthetic=SMALL_SYNTH, val_fraction=0.5)
    info = data.dataset_info(spec)
    train, val = data.load_splits(spec)
    per_channel = lambda s: s.x.permute(1, 0, 2, 3).reshape(s.x.shape[1], -1).double() / 255  # noqa: E731
    assert np.allclose(info.mean, per_channel(train).mean(1).numpy(), atol=1e-4)
    assert np.allclose(info.std, np.maximum(per_channel(train).std(1, unbiased=False).numpy(), 1e-3), atol=1e-4)
    if dataset == "npz":
        assert info.mean == (0.0, 0.0, 0.0)  # all-image statistics would be 0.25


def test_npz_grayscale_default_class_names(tmp_path: Path) -> None:
    spec = _write_npz(tmp_path / "g.npz", x_train=_images(12, c=1), y_train=np.arange(12) % 3)
    info = data.dataset_info(spec)
    assert (info.channels, info.classes) == (1, ("class_0", "class_1", "class_2"))
    with pytest.raises(DataError, match=r"g\.npz: no test split"):
        data.load_test(spec)


_GOOD_X, _GOOD_Y = _images(10), np.arange(10) % 2
_MALFORMED = {
    "float images": ({"x_train": _GOOD_X.astype(np.float32), "y_train": _GOOD_Y}, "x_train must be uint8"),
    "3-D images": ({"x_train": _GOOD_X[..., 0], "y_train": _GOOD_Y}, "x_train must be 4-D"),
    "5 channels": ({"x_train": np.zeros((10, 8, 8, 5), np.uint8), "y_train": _GOOD_Y}, "1 or 3 channels"),
    "not square": ({"x_train": np.zeros((10, 8, 6, 3), np.uint8), "y_train": _GOOD_Y}, "square images"),
    "length mismatch": ({"x_train": _GOOD_X, "y_train": _GOOD_Y[:7]}, "y_train has 7 labels but the images have 10"),
    "float labels": ({"x_train": _GOOD_X, "y_train": _GOOD_Y.astype(float)}, "y_train must be integer"),
    "negative labels": ({"x_train": _GOOD_X, "y_train": _GOOD_Y - 1}, "y_train has negative labels"),
    "2-D labels": ({"x_train": _GOOD_X, "y_train": np.zeros((10, 2), int)}, "y_train must be 1-D"),
    "missing labels": ({"x_train": _GOOD_X}, "missing array y_train"),
    "too few class names": ({"x_train": _GOOD_X, "y_train": _GOOD_Y, "class_names": np.array(["a"])},
                            "class_names lists 1"),
    "test channels differ": ({"x_train": _GOOD_X, "y_train": _GOOD_Y, "x_test": _images(4, c=1),
                              "y_test": np.zeros(4, int)}, "x_test images are"),
    "test label out of range": ({"x_train": _GOOD_X, "y_train": _GOOD_Y, "x_test": _images(4),
                                 "y_test": np.full(4, 5)}, "y_test has label 5 >= 2 classes"),
}


@pytest.mark.parametrize("case", sorted(_MALFORMED))
def test_npz_malformed(tmp_path: Path, case: str) -> None:
    arrays, message = _MALFORMED[case]
    spec = _write_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError) as err:
        data.prepare(spec)
        data.load_test(spec)
    assert message in str(err.value)
    assert str(tmp_path / "bad.npz") in str(err.value) and "\n" not in str(err.value)


def test_npz_missing_or_not_npz(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="npz file not found"):
        data.load_splits(DataSpec(dataset="npz", path=str(tmp_path / "nope.npz")))
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(DataError, match="cannot read .*junk.npz as .npz"):
        data.load_splits(DataSpec(dataset="npz", path=str(tmp_path / "junk.npz")))
    with pytest.raises(DataError, match="needs data.path"):
        data.prepare(DataSpec(dataset="npz"))


# ----------------------------------------------------------------------------------------------------
# synthetic


def test_synthetic_deterministic_and_configurable() -> None:
    a = data.make_synthetic(SMALL_SYNTH, train=True)
    b = data.make_synthetic(SMALL_SYNTH, train=True)
    assert np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y)
    assert a.x.shape == (600, 3, 16, 16) and a.x.dtype == np.uint8
    assert np.bincount(a.y).tolist() == [100] * 6
    other = data.make_synthetic(SyntheticSpec(num_train=600, num_classes=6, image_size=16, seed=1), train=True)
    assert not np.array_equal(a.x, other.x)
    test = data.make_synthetic(SMALL_SYNTH, train=False)
    assert test.x.shape[0] == 200 and not np.array_equal(test.x[:10], a.x[:10])
    gray = data.make_synthetic(SyntheticSpec(num_train=50, channels=1, image_size=12), train=True)
    assert gray.x.shape == (50, 1, 12, 12)


def test_synthetic_is_learnable_beyond_chance() -> None:
    """Nearest class mean beats chance but stays far from solving it: colour is linear, orientation is not.

    (A 3-layer CNN reaches ~80% on the default 10-class set in 3 epochs; a linear model stalls at ~30%.)
    """
    spec = SyntheticSpec(num_train=600, num_test=600, num_classes=6, image_size=16)
    train, test = data.make_synthetic(spec, train=True), data.make_synthetic(spec, train=False)
    xtr, xte = train.x.reshape(600, -1) / 255.0, test.x.reshape(600, -1) / 255.0
    means = np.stack([xtr[train.y == k].mean(0) for k in range(6)])
    assert np.abs(means[:, None] - means[None]).sum(-1)[~np.eye(6, dtype=bool)].min() > 1.0  # means differ
    pred = ((xte[:, None] - means[None]) ** 2).sum(-1).argmin(1)
    assert 1.2 / 6 < (pred == test.y).mean() < 0.5


# ----------------------------------------------------------------------------------------------------
# splits and caches


def _synth(**kw: object) -> DataSpec:
    return DataSpec(dataset="synthetic", synthetic=SMALL_SYNTH, **kw)  # type: ignore[arg-type]


def test_split_stratified_disjoint_seeded() -> None:
    spec = _synth(val_fraction=0.2, split_seed=3)
    train, val = data.load_splits(spec)
    assert (len(train), len(val)) == (480, 120)
    assert torch.bincount(val.y).tolist() == [20] * 6
    full = data.load_trainval(spec)
    keys = lambda s: {bytes(img.numpy()) for img in s.x}  # noqa: E731  images are random: unique
    assert keys(train).isdisjoint(keys(val)) and keys(train) | keys(val) == keys(full)
    data.clear_cache()
    again = data.load_splits(spec)
    assert torch.equal(again[1].x, val.x)
    other = data.load_splits(_synth(val_fraction=0.2, split_seed=4))
    assert not torch.equal(other[1].x, val.x)


def test_split_uneven_fraction_sizes() -> None:
    train, val = data.load_splits(_synth(val_fraction=0.1))
    assert (len(train), len(val)) == (540, 60)
    with pytest.raises(DataError, match="val_fraction"):
        data.load_splits(_synth(val_fraction=1.0))


def test_subset_is_stratified_and_applied_before_split() -> None:
    spec = _synth(subset=120, val_fraction=0.25)
    train, val = data.load_splits(spec)
    assert (len(train), len(val)) == (90, 30)
    assert torch.bincount(train.y).tolist() == [15] * 6
    trainval = data.load_trainval(spec)
    assert len(trainval) == 120
    assert sorted(torch.cat([train.y, val.y]).tolist()) == sorted(trainval.y.tolist())
    with pytest.raises(DataError, match="subset=601"):
        data.load_splits(_synth(subset=601))


def test_cache_returns_same_tensors_without_reloading(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = data.make_synthetic
    monkeypatch.setattr(data, "make_synthetic", lambda spec, train: calls.append(train) or real(spec, train))
    spec = _synth()
    first = data.load_splits(spec)
    second = data.load_splits(spec, device=torch.device("cpu"))
    assert first[0] is second[0] and first[1].x is second[1].x
    data.load_trainval(spec)
    data.dataset_info(spec)
    data.load_splits(_synth(split_seed=9))  # another split of the same raw arrays
    assert calls == [True]
    data.load_test(spec)
    data.load_test(spec)
    assert calls == [True, False]


def test_forbid_test_and_counter() -> None:
    spec = _synth()
    before = data.test_loads
    assert len(data.load_test(spec)) == 200
    assert data.test_loads == before + 1
    data.forbid_test()
    with pytest.raises(data.TestSplitForbidden):
        data.load_test(spec)
    assert data.test_loads == before + 1
    data.load_splits(spec)  # train/val stay available
    data.allow_test()
    data.load_test(spec)
    assert data.test_loads == before + 2


def test_registry_and_split_dataclass() -> None:
    assert set(data.DATASETS) == {"cifar10", "cifar100", "stl10", "synthetic", "npz", "imagefolder"}
    with pytest.raises(KeyError, match="unknown dataset 'cifar1000'.*available: cifar10, cifar100"):
        data.dataset_info(DataSpec(dataset="cifar1000"))
    with pytest.raises(TypeError):
        data.Split(torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.int64))
