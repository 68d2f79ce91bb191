"""Dataset files: CIFAR-10/100 and STL-10 download, checks and readers, the synthetic set, user ``.npz``
files; the error and array types of the data layer. Plain numpy/PyTorch, never Ray."""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import pickle
import shutil
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cifar_tune.registry import Registry
from cifar_tune.spec.schema import DataSpec, SyntheticSpec

DATASETS = Registry("dataset")

DATA_ROOT_ENV = "CIFAR_TUNE_DATA"
DEFAULT_DATA_ROOT = "~/.cache/cifar-tune"


class DataError(ValueError):
    """Data that cannot be used as it is; the one-line message says what to fix and where."""


class TestSplitForbidden(RuntimeError):
    """The test split was requested in a process that promised not to read it (a search trial)."""

    __test__ = False  # not a pytest test class despite the name


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    channels: int
    image_size: int
    classes: tuple[str, ...]
    mean: tuple[float, ...]  # per channel, of x / 255 over the training images
    std: tuple[float, ...]


# eq=False: a generated __eq__ would compare tensors elementwise and fail; identity is what caches need.
@dataclass(frozen=True, eq=False)
class Split:
    x: torch.Tensor  # uint8 [N, C, H, W], contiguous
    y: torch.Tensor  # int64 [N]

    def __post_init__(self) -> None:
        # Shape/dtype only (host metadata): no device sync.
        if self.x.dtype != torch.uint8 or self.x.dim() != 4:
            raise TypeError(f"Split.x must be uint8 [N,C,H,W], got {self.x.dtype} {tuple(self.x.shape)}")
        if self.y.dtype != torch.int64 or self.y.shape != (self.x.shape[0],):
            raise TypeError(f"Split.y must be int64 [{self.x.shape[0]}], got {self.y.dtype} {tuple(self.y.shape)}")

    def __len__(self) -> int:
        return int(self.x.shape[0])


@dataclass(frozen=True, eq=False)
class _Arrays:
    """One split as loaded from disk / generated: numpy, host memory, never mutated."""

    x: np.ndarray  # uint8 [N, C, H, W], C-contiguous
    y: np.ndarray  # int64 [N]
    classes: tuple[str, ...]


# ----------------------------------------------------------------------------------------------------
# data root and locking


def data_root(data: DataSpec) -> Path:
    """``DataSpec.root``, else ``$CIFAR_TUNE_DATA``, else ``~/.cache/cifar-tune`` (user-expanded, absolute)."""
    root = data.root or os.environ.get(DATA_ROOT_ENV) or DEFAULT_DATA_ROOT
    return Path(root).expanduser().absolute()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock across processes (every Ray worker may call prepare() at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _one_line(err: BaseException) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())


# ----------------------------------------------------------------------------------------------------
# CIFAR


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR100_CLASSES = tuple(
    ["apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree", "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm"]
)


STL10_CLASSES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")


@dataclass(frozen=True)
class CifarSource:
    """Where a CIFAR variant (or STL-10) comes from and which files of its release are read and verified."""

    title: str
    url: str
    archive: str  # file name of the .tar.gz in the data root
    archive_md5: str
    folder: str  # what the archive extracts to, inside the data root
    train_files: tuple[tuple[str, str], ...]  # (file name, md5)
    test_files: tuple[tuple[str, str], ...]
    meta_file: tuple[str, str] | None  # None: class names are fixed (STL-10's class_names.txt has no md5)
    meta_key: str  # class-name list inside the meta pickle
    label_key: str  # "labels" (CIFAR-10) or "fine_labels" (CIFAR-100)
    classes: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int = 32

    @property
    def all_files(self) -> tuple[tuple[str, str], ...]:
        return (*self.train_files, *self.test_files, *((self.meta_file,) if self.meta_file else ()))


def _source_from(cls: Any, title: str, label_key: str, classes: tuple[str, ...],
                 mean: tuple[float, float, float], std: tuple[float, float, float]) -> CifarSource:
    # URLs and checksums come from torchvision so there is a single source of truth for them.
    return CifarSource(
        title=title,
        url=cls.url,
        archive=cls.filename,
        archive_md5=cls.tgz_md5,
        folder=cls.base_folder,
        train_files=tuple((name, md5) for name, md5 in cls.train_list),
        test_files=tuple((name, md5) for name, md5 in cls.test_list),
        meta_file=(cls.meta["filename"], cls.meta["md5"]),
        meta_key=cls.meta["key"],
        label_key=label_key,
        classes=classes,
        mean=mean,
        std=std,
    )


class _Sources(dict[str, CifarSource]):
    """Filled from torchvision on first use: importing torchvision costs ~2 s in every fresh worker
    process, and a search on synthetic or npz data never needs it."""

    def __missing__(self, key: str) -> CifarSource:
        from torchvision.datasets import CIFAR10, CIFAR100

        if key == "cifar10":
            src = _source_from(CIFAR10, "CIFAR-10", "labels", CIFAR10_CLASSES,
                               (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
        elif key == "cifar100":
            src = _source_from(CIFAR100, "CIFAR-100", "fine_labels", CIFAR100_CLASSES,
                               (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))
        elif key == "stl10":
            src = _stl10_source()
        else:
            raise KeyError(key)
        self[key] = src
        return src


CIFAR_SOURCES: dict[str, CifarSource] = _Sources()


def _stl10_source() -> CifarSource:
    from torchvision.datasets import STL10

    # the 2.6 GB unlabeled_X.bin is neither read nor verified: only the labelled splits are used
    labelled = tuple((name, md5) for name, md5 in STL10.train_list if not name.startswith("unlabeled"))
    return CifarSource(
        title="STL-10", url=STL10.url, archive=STL10.filename, archive_md5=STL10.tgz_md5, folder=STL10.base_folder,
        train_files=labelled, test_files=tuple((name, md5) for name, md5 in STL10.test_list), meta_file=None,
        meta_key="", label_key="", classes=STL10_CLASSES,
        # the normalisation commonly used for STL-10 (per-channel mean/std of x / 255)
        mean=(0.4467, 0.4398, 0.4066), std=(0.2603, 0.2566, 0.2713), image_size=96,
    )


def check_integrity(path: str, md5: str) -> bool:
    from torchvision.datasets.utils import check_integrity as tv_check_integrity

    return tv_check_integrity(path, md5)


def _download_archive(url: str, root: Path, filename: str, md5: str) -> None:
    """Fetch ``url`` to ``root/filename``; torchvision re-checks the md5 (tests replace this function)."""
    from torchvision.datasets.utils import download_url

    download_url(url, str(root), filename=filename, md5=md5)


def _placement_hint(src: CifarSource, root: Path) -> str:
    return (f"put {src.archive} (md5 {src.archive_md5}, from {src.url}) in {root}/ "
            f"or its extracted {src.folder}/ folder there")


def _cifar_extracted(src: CifarSource, root: Path) -> bool:
    return all((root / src.folder / name).is_file() for name, _ in src.all_files)


def _cifar_corrupt_file(src: CifarSource, root: Path) -> Path | None:
    """The first extracted file that is missing or fails its md5, or None when all verify."""
    for name, md5 in src.all_files:
        path = root / src.folder / name
        if not check_integrity(str(path), md5):
            return path
    return None


def _extract(archive: Path, root: Path, folder: str) -> None:
    """Extract into a temp dir, then rename: readers that only check existence never see half a folder."""
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=root))
    try:
        with tarfile.open(archive, "r:gz") as tar:
            try:
                tar.extractall(tmp, filter="data")
            except TypeError:  # Python without extraction filters (< 3.10.12)
                tar.extractall(tmp)
        if not (tmp / folder).is_dir():
            raise DataError(f"{archive} does not contain the folder {folder}/; is it the right archive?")
        target = root / folder
        if target.exists():  # incomplete or corrupt copy; the verified archive is the source of truth
            shutil.rmtree(target)
        os.replace(tmp / folder, target)
    except (tarfile.TarError, EOFError, OSError) as err:
        raise DataError(f"cannot extract {archive}: {_one_line(err)}; delete it and rerun") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_root(root: Path, download: bool) -> None:
    """A data root that does not exist is a typo unless the download is to create it in a directory
    that does: refuse it before the lock file would create it (and leave a stray directory behind)."""
    if root.is_dir():
        return
    if root.exists():
        raise DataError(f"data.root {root} is not a directory")
    if root == Path(DEFAULT_DATA_ROOT).expanduser().absolute():
        return  # the default cache: created on first use, parents included
    if not download:
        raise DataError(f"data.root {root} does not exist (and data.download is off, so nothing would fill it)")
    if not root.parent.is_dir():
        raise DataError(f"data.root {root} does not exist and neither does {root.parent}; check the path "
                        "(a new root is created for the download only inside an existing directory)")


def _prepare_cifar(src: CifarSource, root: Path, download: bool) -> None:
    """Make ``root/src.folder`` complete and md5-verified; download/extract under a cross-process lock."""
    _check_root(root, download)
    with _file_lock(root / ".lock"):
        if _cifar_extracted(src, root):
            bad = _cifar_corrupt_file(src, root)
            if bad is None:
                return
        else:
            bad = None
        archive = root / src.archive
        if not check_integrity(str(archive), src.archive_md5):
            if not download:
                what = f"{archive} fails its md5" if archive.is_file() else f"{src.title} not found"
                if bad is not None:
                    what = f"{bad} is corrupt (md5 mismatch) and {what}"
                raise DataError(f"{what} and download is off: {_placement_hint(src, root)}")
            try:
                _download_archive(src.url, root, src.archive, src.archive_md5)
            except Exception as err:  # URLError, OSError, torchvision's RuntimeError on a bad md5, ...
                raise DataError(f"cannot download {src.title} ({_one_line(err)}): "
                                f"{_placement_hint(src, root)}") from err
            if not check_integrity(str(archive), src.archive_md5):
                raise DataError(f"{archive} fails its md5 after download: {_placement_hint(src, root)}")
        _extract(archive, root, src.folder)
        bad = _cifar_corrupt_file(src, root)
        if bad is not None:
            raise DataError(f"{bad} fails its md5 after extracting {archive}: {_placement_hint(src, root)}")


class _ArrayUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles; allow only what numpy arrays need, so a planted file cannot run code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")


def _read_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            return _ArrayUnpickler(fh, encoding="latin1").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as err:
        raise DataError(f"cannot read {path}: {_one_line(err)}") from err


def read_cifar(src: CifarSource, folder: Path, train: bool) -> _Arrays:
    """Read the python-pickle release (``data`` uint8 [n, 3072] row-major CHW; labels; meta names)."""
    xs, ys = [], []
    for name, _ in src.train_files if train else src.test_files:
        path = folder / name
        entry = _read_pickle(path)
        data = np.asarray(entry.get("data"))
        labels = np.asarray(entry.get(src.label_key, []), dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DataError(f"{path}: 'data' must be uint8 [n, 3072], got {data.dtype} {data.shape}")
        if labels.shape != (data.shape[0],):
            raise DataError(f"{path}: '{src.label_key}' has {labels.size} labels for {data.shape[0]} images")
        xs.append(data.reshape(-1, 3, 32, 32))  # the release is already channel-major
        ys.append(labels)
    meta_path = folder / src.meta_file[0]
    classes = tuple(str(c) for c in _read_pickle(meta_path).get(src.meta_key, ()))
    if len(classes) != len(src.classes):
        raise DataError(f"{meta_path}: '{src.meta_key}' lists {len(classes)} classes, expected {len(src.classes)}")
    y = np.concatenate(ys)
    if y.size and (y.min() < 0 or y.max() >= len(classes)):
        raise DataError(f"{folder}: labels outside [0, {len(classes)})")
    return _Arrays(np.ascontiguousarray(np.concatenate(xs)), y, classes)


def _read_binary(path: Path) -> np.ndarray:
    try:
        return np.fromfile(path, dtype=np.uint8)
    except OSError as err:
        raise DataError(f"cannot read {path}: {_one_line(err)}") from err


def read_stl10(src: CifarSource, folder: Path, train: bool) -> _Arrays:
    """Read STL-10's binary release (raw bytes, no pickle): ``*_X.bin`` uint8 images of 3 x 96 x 96, each
    channel stored column-major; ``*_y.bin`` uint8 labels 1..10 (returned as 0..9)."""
    files = dict(src.train_files if train else src.test_files)
    x_name, y_name = (next(n for n in files if n.endswith(suffix)) for suffix in ("_X.bin", "_y.bin"))
    s = src.image_size
    raw = _read_binary(folder / x_name)
    if raw.size % (3 * s * s):
        raise DataError(f"{folder / x_name}: {raw.size} bytes is not a whole number of 3x{s}x{s} images")
    # each image is stored channel by channel, column-major within a channel (as torchvision reads it)
    x = raw.reshape(-1, 3, s, s).transpose(0, 1, 3, 2)
    y = _read_binary(folder / y_name).astype(np.int64) - 1
    if y.shape != (x.shape[0],):
        raise DataError(f"{folder / y_name}: {y.size} labels for {x.shape[0]} images")
    if y.size and (y.min() < 0 or y.max() >= len(src.classes)):
        raise DataError(f"{folder / y_name}: labels outside [1, {len(src.classes)}]")
    return _Arrays(np.ascontiguousarray(x), y, src.classes)


_READERS = {"stl10": read_stl10}  # everything else in CIFAR_SOURCES is a CIFAR pickle release


def _cifar_loader(key: str) -> Callable[[DataSpec, bool], _Arrays]:
    def load(data: DataSpec, train: bool) -> _Arrays:
        src, root = CIFAR_SOURCES[key], data_root(data)
        if not _cifar_extracted(src, root):  # existence only: the md5 pass belongs to prepare()
            _prepare_cifar(src, root, data.download)
        return _READERS.get(key, read_cifar)(src, root / src.folder, train)

    return load


def _cifar_info(key: str) -> Callable[[DataSpec], DatasetInfo]:
    def info(data: DataSpec) -> DatasetInfo:
        src = CIFAR_SOURCES[key]
        return DatasetInfo(key, len(src.classes), 3, src.image_size, src.classes, src.mean, src.std)

    return info


# ----------------------------------------------------------------------------------------------------
# synthetic


def _synthetic_styles(spec: SyntheticSpec) -> tuple[np.ndarray, np.ndarray]:
    """Per-class (colour [K, C], grating angle [K]).

    Class k = (colour k % n_col, orientation k // n_col): colour alone is linearly readable but only
    narrows the class down to ~sqrt(K) candidates; the orientation of a randomly placed, randomly phased
    grating is not a linear function of the pixels, so reaching high accuracy needs (small) convolutions.
    """
    k = spec.num_classes
    n_orient = math.ceil(math.sqrt(k))
    n_col = math.ceil(k / n_orient)
    rng = np.random.default_rng([spec.seed, 0])
    if spec.channels == 3:
        hue = (rng.uniform() + np.arange(n_col) / n_col) % 1.0  # evenly spaced hues: distinct colours
        phase = 2 * np.pi * (hue[:, None] - np.array([0.0, 1 / 3, 2 / 3]))
        palette = 0.5 + 0.45 * np.cos(phase)
    else:
        palette = np.linspace(0.15, 0.85, n_col)[:, None].repeat(spec.channels, axis=1)
        palette = palette[rng.permutation(n_col)]
    angles = np.arange(n_orient) * np.pi / n_orient
    cls = np.arange(k)
    return palette[cls % n_col].astype(np.float32), angles[cls // n_col].astype(np.float32)


def make_synthetic(spec: SyntheticSpec, train: bool) -> _Arrays:
    """Class-coloured oriented gratings in a Gaussian window at a random position, on a random background."""
    if spec.num_classes < 2 or spec.channels not in (1, 3) or spec.image_size < 8:
        raise DataError(f"synthetic: need num_classes >= 2, channels in (1, 3), image_size >= 8; got {spec}")
    n, s = (spec.num_train if train else spec.num_test), spec.image_size
    colours, angles = _synthetic_styles(spec)
    rng = np.random.default_rng([spec.seed, 1 if train else 2])  # train/test: independent streams
    y = rng.permutation(np.arange(n) % spec.num_classes).astype(np.int64)  # balanced classes

    def per_image(lo: float, hi: float) -> np.ndarray:
        return rng.uniform(lo, hi, (n, 1, 1)).astype(np.float32)

    cx, cy = per_image(0.3 * s, 0.7 * s), per_image(0.3 * s, 0.7 * s)
    sigma = per_image(0.12 * s, 0.22 * s)
    theta = angles[y][:, None, None] + per_image(-0.2, 0.2)  # ±11°: neighbouring orientations stay apart
    freq = per_image(3.0, 4.5) / s  # cycles per pixel: a period of 7-11 px at 32 px
    phase = per_image(0.0, 2 * np.pi)
    ii, jj = np.meshgrid(np.arange(s, dtype=np.float32), np.arange(s, dtype=np.float32), indexing="ij")
    u = (jj - cx) * np.cos(theta) + (ii - cy) * np.sin(theta)
    window = np.exp(-((jj - cx) ** 2 + (ii - cy) ** 2) / (2 * sigma**2))  # [n, s, s]
    grating = 0.5 + 0.5 * np.cos(2 * np.pi * freq * u + phase)
    tint = colours[y] * rng.uniform(0.8, 1.2, (n, 1)).astype(np.float32)  # [n, C]
    background = rng.uniform(0.25, 0.75, (n, 1)).astype(np.float32) + rng.uniform(
        -0.1, 0.1, (n, spec.channels)).astype(np.float32)
    pattern = 0.7 * (window * grating)[:, None]  # [n, 1, s, s]; < 1: the blob never fully covers
    img = background[:, :, None, None] * (1 - pattern) + tint[:, :, None, None] * pattern
    img += rng.standard_normal(img.shape, dtype=np.float32) * (0.4 * spec.noise)
    x = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
    names = tuple(f"class_{k}" for k in range(spec.num_classes))
    return _Arrays(np.ascontiguousarray(x), y, names)


# ----------------------------------------------------------------------------------------------------
# npz


def _npz_path(data: DataSpec) -> Path:
    if not data.path:
        raise DataError("dataset npz needs data.path (the .npz file)")
    return Path(data.path).expanduser().absolute()


def _npz_images(path: Path, name: str, x: np.ndarray) -> np.ndarray:
    """Validate a uint8 image array and return it as contiguous [N, C, H, W]."""
    if x.dtype != np.uint8:
        raise DataError(f"{path}: {name} must be uint8 (0..255), got {x.dtype}")
    if x.ndim != 4:
        raise DataError(f"{path}: {name} must be 4-D [N,H,W,C] or [N,C,H,W], got shape {x.shape}")
    if x.shape[3] in (1, 3) and x.shape[1] == x.shape[2]:
        x = x.transpose(0, 3, 1, 2)  # NHWC wins ties such as [N, 3, 3, 3]: it is the common layout
    elif not (x.shape[1] in (1, 3) and x.shape[2] == x.shape[3]):
        raise DataError(f"{path}: {name} must hold square images with 1 or 3 channels "
                        f"([N,H,W,C] or [N,C,H,W]), got shape {x.shape}")
    if x.shape[0] == 0:
        raise DataError(f"{path}: {name} is empty")
    return np.ascontiguousarray(x)


def _npz_labels(path: Path, name: str, y: np.ndarray, n: int) -> np.ndarray:
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: {name} must be integer class indices, got {y.dtype}")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(f"{path}: {name} must be 1-D [N], got shape {y.shape}")
    if y.shape[0] != n:
        raise DataError(f"{path}: {name} has {y.shape[0]} labels but the images have {n}")
    if y.min() < 0:
        raise DataError(f"{path}: {name} has negative labels (min {y.min()})")
    return y.astype(np.int64)


def _npz_classes(path: Path, npz: np.lib.npyio.NpzFile, y_train: np.ndarray) -> tuple[str, ...]:
    num_classes = int(y_train.max()) + 1
    if "class_names" not in npz.files:
        return tuple(f"class_{k}" for k in range(num_classes))
    names = npz["class_names"]
    if names.ndim != 1 or names.dtype.kind not in "UO":
        raise DataError(f"{path}: class_names must be a 1-D string array, got {names.dtype} {names.shape}")
    if len(names) < num_classes:
        raise DataError(f"{path}: y_train has labels up to {num_classes - 1} but class_names lists {len(names)}")
    return tuple(str(c) for c in names)


def _open_npz(path: Path) -> np.lib.npyio.NpzFile:
    if not path.is_file():
        raise DataError(f"npz file not found: {path}")
    try:
        return np.load(path, allow_pickle=False)  # never unpickle user files
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise DataError(f"cannot read {path} as .npz: {_one_line(err)}") from err


def _npz_array(path: Path, npz: np.lib.npyio.NpzFile, name: str) -> np.ndarray:
    if name not in npz.files:
        raise DataError(f"{path}: missing array {name} (has: {', '.join(npz.files) or 'nothing'})")
    try:
        return npz[name]
    except ValueError as err:  # object arrays need pickle, which we refuse
        raise DataError(f"{path}: {name} cannot be read without pickle ({_one_line(err)})") from err


def read_npz(path: Path, train: bool) -> _Arrays:
    """Load and validate ``x_train``/``y_train`` (or ``x_test``/``y_test``) from a user file."""
    with _open_npz(path) as npz:
        x_train = _npz_images(path, "x_train", _npz_array(path, npz, "x_train"))
        y_train = _npz_labels(path, "y_train", _npz_array(path, npz, "y_train"), x_train.shape[0])
        classes = _npz_classes(path, npz, y_train)
        if y_train.max() >= len(classes):
            raise DataError(f"{path}: y_train has label {y_train.max()} >= {len(classes)} classes")
        if train:
            return _Arrays(x_train, y_train, classes)
        if "x_test" not in npz.files or "y_test" not in npz.files:
            raise DataError(f"{path}: no test split (x_test and y_test); only train/val can be used")
        x_test = _npz_images(path, "x_test", _npz_array(path, npz, "x_test"))
        if x_test.shape[1:] != x_train.shape[1:]:
            raise DataError(f"{path}: x_test images are {x_test.shape[1:]} (C,H,W) but x_train are {x_train.shape[1:]}")
        y_test = _npz_labels(path, "y_test", _npz_array(path, npz, "y_test"), x_test.shape[0])
        if y_test.max() >= len(classes):
            raise DataError(f"{path}: y_test has label {y_test.max()} >= {len(classes)} classes")
        return _Arrays(x_test, y_test, classes)
