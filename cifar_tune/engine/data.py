"""Datasets as uint8 tensors: CIFAR-10/100, STL-10, a synthetic learnable set and user ``.npz`` files.

Everything is held in memory as one uint8 ``[N, C, H, W]`` array per split (CIFAR-10 train is 150 MB),
so a trial never touches a ``DataLoader``: batches are index slices and augmentation runs batched
(``cifar_tune.engine.augment``). Raw arrays and the tensors built from them are cached per process, so a
Ray worker that is reused for the next trial does not reload or re-split anything.

The test split is only read by :func:`load_test`, which the search forbids inside trials
(:func:`forbid_test`); :data:`test_loads` counts every read so tests can prove where it happens.

This module is plain numpy/PyTorch; it never imports ray.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass, replace

import numpy as np
import torch

from cifar_tune.engine import imagefolder
from cifar_tune.engine.formats import (
    CIFAR_SOURCES,
    DATASETS,
    STL10_CLASSES,
    CifarSource,
    DataError,
    DatasetInfo,
    Split,
    TestSplitForbidden,
    _Arrays,
    _cifar_info,
    _cifar_loader,
    _npz_path,
    _prepare_cifar,
    data_root,
    make_synthetic,
    read_npz,
)
from cifar_tune.spec.schema import DataSpec

# ----------------------------------------------------------------------------------------------------
# test-split guard


raw_loads: int = 0  # data sets read from disk/generated in this process (never more than 1 per split)
test_loads: int = 0  # incremented by every successful load_test() call in this process
_test_forbidden: bool = False


def forbid_test() -> None:
    """Make every later :func:`load_test` in this process raise :class:`TestSplitForbidden`."""
    global _test_forbidden
    _test_forbidden = True


def allow_test() -> None:
    global _test_forbidden
    _test_forbidden = False


# ----------------------------------------------------------------------------------------------------
# registry: each entry says how to load a split, describe the set and prepare it


@dataclass(frozen=True)
class DatasetEntry:
    load: Callable[[DataSpec, bool], _Arrays]  # (data, train) -> arrays
    info: Callable[[DataSpec], DatasetInfo]
    prepare: Callable[[DataSpec], None]
    cache_key: Callable[[DataSpec], Hashable]  # identifies the raw arrays, for the process cache


def _channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean/std of x/255 from a 256-bin histogram (no float copy of the data)."""
    levels = np.arange(256, dtype=np.float64) / 255.0
    means, stds = [], []
    for c in range(x.shape[1]):
        hist = np.bincount(x[:, c].ravel(), minlength=256).astype(np.float64)
        mean = float((hist * levels).sum() / hist.sum())
        var = float((hist * (levels - mean) ** 2).sum() / hist.sum())
        means.append(round(mean, 4))
        stds.append(round(max(math.sqrt(var), 1e-3), 4))  # a constant channel must not divide by zero
    return tuple(means), tuple(stds)


def _computed_info(data: DataSpec) -> DatasetInfo:
    """Normalisation from the search's training split only: the validation images must not leak into
    what the model sees (a split that cannot be made is reported by check_split; then all images)."""
    arrays = _raw(data, train=True)
    try:
        train_idx, _ = _split_indices(data, arrays.y)
    except DataError:
        train_idx = np.arange(len(arrays.y))
    mean, std = _channel_stats(arrays.x[train_idx])
    _, c, h, _ = arrays.x.shape
    return DatasetInfo(data.dataset, len(arrays.classes), c, h, arrays.classes, mean, std)


def _npz_key(data: DataSpec) -> Hashable:
    path = _npz_path(data)
    try:
        stat = path.stat()
    except OSError as err:
        raise DataError(f"npz file not found: {path}") from err
    return ("npz", str(path), stat.st_mtime_ns, stat.st_size)  # a rewritten file is reloaded


def _noop(data: DataSpec) -> None:
    return None


def _validate_npz(data: DataSpec) -> None:
    _raw(data, train=True)  # reading validates; the arrays stay cached for this process


@DATASETS.register("cifar10")
def _cifar10() -> DatasetEntry:
    return DatasetEntry(_cifar_loader("cifar10"), _cifar_info("cifar10"),
                        lambda d: _prepare_cifar(CIFAR_SOURCES["cifar10"], data_root(d), d.download),
                        lambda d: ("cifar10", str(data_root(d))))


@DATASETS.register("cifar100")
def _cifar100() -> DatasetEntry:
    return DatasetEntry(_cifar_loader("cifar100"), _cifar_info("cifar100"),
                        lambda d: _prepare_cifar(CIFAR_SOURCES["cifar100"], data_root(d), d.download),
                        lambda d: ("cifar100", str(data_root(d))))


@DATASETS.register("stl10")
def _stl10() -> DatasetEntry:
    return DatasetEntry(_cifar_loader("stl10"), _cifar_info("stl10"),
                        lambda d: _prepare_cifar(CIFAR_SOURCES["stl10"], data_root(d), d.download),
                        lambda d: ("stl10", str(data_root(d))))


@DATASETS.register("synthetic")
def _synthetic() -> DatasetEntry:
    return DatasetEntry(lambda d, train: make_synthetic(d.synthetic, train), _computed_info, _noop,
                        lambda d: ("synthetic", d.synthetic))


@DATASETS.register("npz")
def _npz() -> DatasetEntry:
    # prepare() validates the training arrays so a malformed file fails before any trial starts.
    return DatasetEntry(lambda d, train: read_npz(_npz_path(d), train), _computed_info, _validate_npz, _npz_key)


@DATASETS.register("imagefolder")
def _imagefolder() -> DatasetEntry:
    # your own images (torchvision's ImageFolder layout), decoded once into the on-disk cache
    return DatasetEntry(imagefolder.load, _computed_info, imagefolder.prepare, imagefolder.cache_key)


def _entry(data: DataSpec) -> DatasetEntry:
    return DATASETS.build(data.dataset)


def _key(data: DataSpec) -> Hashable:
    """The raw arrays' identity: the data set's own key plus the class subset."""
    return (_entry(data).cache_key(data), tuple(data.classes or ()))


def _class_indices(available: tuple[str, ...], wanted: list[str], name: str) -> list[int]:
    """Indices of ``data.classes`` in the data set's class list; unknown names are one DataError."""
    from cifar_tune.registry import did_you_mean

    unknown = [c for c in wanted if c not in available]
    if unknown:
        c = unknown[0]
        raise DataError(f"data.classes: {name} has no class {c!r}{did_you_mean(c, list(available))}; "
                        f"it has: {', '.join(available)}")
    return [available.index(c) for c in wanted]


def select_classes(arrays: _Arrays, classes: list[str], name: str) -> _Arrays:
    """Keep the images of ``classes`` (by name), relabelled 0..k-1 in the order given; names kept."""
    idx = _class_indices(arrays.classes, classes, name)
    relabel = np.full(len(arrays.classes), -1, dtype=np.int64)
    relabel[idx] = np.arange(len(idx))
    keep = relabel[arrays.y] >= 0
    return _Arrays(np.ascontiguousarray(arrays.x[keep]), relabel[arrays.y[keep]], tuple(classes))


# ----------------------------------------------------------------------------------------------------
# process caches


_lock = threading.RLock()  # a Ray actor may run threads; the caches must not load twice
_raw_cache: dict[Hashable, _Arrays] = {}
_split_cache: dict[Hashable, object] = {}


def clear_cache() -> None:
    """Drop every cached array and tensor in this process (tests; freeing memory)."""
    with _lock:
        _raw_cache.clear()
        _split_cache.clear()


def _raw(data: DataSpec, train: bool) -> _Arrays:
    entry = _entry(data)
    key = (_key(data), train)
    with _lock:
        if key not in _raw_cache:
            global raw_loads
            raw_loads += 1
            arrays = entry.load(data, train)
            if data.classes:
                arrays = select_classes(arrays, data.classes, data.dataset)
            _raw_cache[key] = arrays
        return _raw_cache[key]


def training_arrays(data: DataSpec) -> _Arrays:
    """The training set as loaded (numpy, host memory). The search driver shares it with every worker
    through Ray's object store, so a worker neither re-reads nor regenerates it."""
    return _raw(data, train=True)


def check_split(data: DataSpec) -> None:
    """Raise DataError now if ``subset``/``val_fraction`` do not fit the training set (before any trial):
    a subset larger than the data set, or a split whose training or validation part is empty or lacks
    a class (every trial would fail or be scored on classes it never saw)."""
    y = _raw(data, train=True).y
    train, val = _split_indices(data, y)
    info = dataset_info(data)
    if problem := split_problem(data, len(train) + len(val), y[train], y[val], info.classes):
        raise DataError(problem)


def split_problem(data: DataSpec, pool: int, y_train: np.ndarray | None, y_val: np.ndarray | None,
                  classes: tuple[str, ...]) -> str | None:
    """What is wrong with a split of ``pool`` images into train/val, or None. Without labels (None),
    only the counts are checked: a part smaller than the number of classes must miss a class."""
    n_val = round(pool * data.val_fraction)
    of = f"{data.val_fraction:g} of {pool} images"
    fix = "raise data.subset or data.val_fraction" if data.subset else "raise data.val_fraction"
    if n_val == 0:
        return f"data.val_fraction: {of} leaves an empty validation set ({fix})"
    for part, n, labels, key, hint in (("validation", n_val, y_val, "data.val_fraction", fix),
                                       ("training", pool - n_val, y_train, "data.subset" if data.subset else "data.val_fraction",
                                        "raise data.subset or lower data.val_fraction" if data.subset else "lower data.val_fraction")):
        if labels is None:
            missing = len(classes) - n if n < len(classes) else 0
            example = ""
        else:
            absent = [c for i, c in enumerate(classes) if not (labels == i).any()]
            missing, example = len(absent), f" (e.g. '{absent[0]}')" if absent else ""
        if missing:
            return (f"{key}: {of} leaves a {part} set of {n} images that lacks {missing} of {len(classes)} "
                    f"classes{example} ({hint})")
    return None


_TRAIN_IMAGES = {"cifar10": 50_000, "cifar100": 50_000}  # known without the files (preview runs offline)


def num_training_images(data: DataSpec) -> int:
    """Images a worker keeps resident (train + val, after ``subset``); for memory estimates."""
    if data.subset is not None:
        return data.subset
    if data.dataset in _TRAIN_IMAGES:
        return _TRAIN_IMAGES[data.dataset]
    return len(_raw(data, train=True).y)


def install_training_arrays(data: DataSpec, arrays: _Arrays) -> None:
    """Seed this process's cache with arrays loaded elsewhere (read-only, zero-copy from Ray)."""
    key = (_key(data), True)
    with _lock:
        _raw_cache.setdefault(key, arrays)


def _cached(key: Hashable, build: Callable[[], object]) -> object:
    with _lock:
        if key not in _split_cache:
            _split_cache[key] = build()
        return _split_cache[key]


def _stratified_pick(y: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of ``count`` items with y's class proportions (largest-remainder quotas)."""
    classes, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    exact = counts * (count / len(y))
    quota = np.floor(exact).astype(np.int64)
    # stable argsort: ties go to the lower class index, so the result depends only on the seed
    quota[np.argsort(-(exact - quota), kind="stable")[: count - int(quota.sum())]] += 1
    perm = rng.permutation(len(y))
    grouped = perm[np.argsort(inverse[perm], kind="stable")]  # by class, random within a class
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(len(y)) - starts[inverse[grouped]]
    return np.sort(grouped[rank < quota[inverse[grouped]]])


def _subset_indices(data: DataSpec, y: np.ndarray) -> np.ndarray:
    if data.subset is None:
        return np.arange(len(y))
    if not 0 < data.subset <= len(y):
        raise DataError(f"data.subset={data.subset} must be in [1, {len(y)}] (the training set size)")
    return _stratified_pick(y, data.subset, np.random.default_rng([data.split_seed, 1]))


def _split_indices(data: DataSpec, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices into the full training arrays; disjoint, stratified, seeded."""
    if not 0.0 <= data.val_fraction < 1.0:
        raise DataError(f"data.val_fraction={data.val_fraction} must be in [0, 1)")
    pool = _subset_indices(data, y)
    n_val = round(len(pool) * data.val_fraction)
    if n_val >= len(pool):
        raise DataError(f"data.val_fraction={data.val_fraction} leaves no training images out of {len(pool)}")
    val_pos = _stratified_pick(y[pool], n_val, np.random.default_rng([data.split_seed, 2]))
    is_val = np.zeros(len(pool), dtype=bool)
    is_val[val_pos] = True
    return pool[~is_val], pool[is_val]


def _to_split(x: np.ndarray, y: np.ndarray, device: torch.device) -> Split:
    xt = torch.from_numpy(np.ascontiguousarray(x))
    yt = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
    if device.type != "cpu":
        xt, yt = xt.to(device), yt.to(device)
    return Split(xt, yt)


def _on_device(key: Hashable, device: torch.device, cpu_split: Callable[[], Split]) -> Split:
    """The CPU split, cached, and its copy on ``device``, cached separately."""
    cpu = _cached((key, "cpu"), cpu_split)
    if device.type == "cpu":
        return cpu
    return _cached((key, str(device)), lambda: Split(cpu.x.to(device), cpu.y.to(device)))


def _spec_key(data: DataSpec) -> Hashable:
    return (_key(data), data.val_fraction, data.subset, data.split_seed)


# ----------------------------------------------------------------------------------------------------
# public API


def dataset_info(data: DataSpec) -> DatasetInfo:
    """Name, classes, shape and normalisation; CIFAR/STL-10 need no files, synthetic/npz read the train data.

    With ``data.classes`` the classes are that subset, in that order (unknown names raise DataError).
    """
    info = _entry(data).info(data)
    if data.classes and info.classes != tuple(data.classes):  # synthetic/npz: already read as the subset
        _class_indices(info.classes, data.classes, data.dataset)
        info = replace(info, num_classes=len(data.classes), classes=tuple(data.classes))
    return info


def prepare(data: DataSpec) -> None:
    """Download and verify once, before trials start (no-op for synthetic; validates an npz)."""
    _entry(data).prepare(data)


def load_splits(data: DataSpec, device: str | torch.device = "cpu") -> tuple[Split, Split]:
    """(train, val): stratified split of the training set (after the optional stratified subset)."""
    dev, key = torch.device(device), _spec_key(data)

    def build(part: int) -> Callable[[], Split]:
        def cpu_split() -> Split:
            raw = _raw(data, train=True)
            idx = _split_indices(data, raw.y)[part]
            return _to_split(raw.x[idx], raw.y[idx], torch.device("cpu"))

        return cpu_split

    return (_on_device(("train", key), dev, build(0)),  # type: ignore[return-value]
            _on_device(("val", key), dev, build(1)))


def load_trainval(data: DataSpec, device: str | torch.device = "cpu") -> Split:
    """The whole training set (train + val, after ``subset``), for retraining the best config."""
    def cpu_split() -> Split:
        raw = _raw(data, train=True)
        if data.subset is None:  # zero-copy view of the cached raw array
            return _to_split(raw.x, raw.y, torch.device("cpu"))
        idx = _subset_indices(data, raw.y)
        return _to_split(raw.x[idx], raw.y[idx], torch.device("cpu"))

    key = ("trainval", _key(data), data.subset, data.split_seed if data.subset else None)
    return _on_device(key, torch.device(device), cpu_split)


def load_test(data: DataSpec, device: str | torch.device = "cpu") -> Split:
    """The held-out test split; raises :class:`TestSplitForbidden` after :func:`forbid_test`."""
    global test_loads
    if _test_forbidden:
        raise TestSplitForbidden(f"the {data.dataset} test split must not be read in this process "
                                 "(search trials select on the validation split)")

    def cpu_split() -> Split:
        raw = _raw(data, train=False)
        return _to_split(raw.x, raw.y, torch.device("cpu"))

    split = _on_device(("test", _key(data)), torch.device(device), cpu_split)
    test_loads += 1
    return split


__all__ = [
    "CIFAR_SOURCES",
    "DATASETS",
    "CifarSource",
    "DataError",
    "DatasetInfo",
    "STL10_CLASSES",
    "Split",
    "TestSplitForbidden",
    "allow_test",
    "clear_cache",
    "data_root",
    "dataset_info",
    "forbid_test",
    "load_splits",
    "load_test",
    "load_trainval",
    "prepare",
    "test_loads",
]
