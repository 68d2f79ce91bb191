"""Dataset ``imagefolder``: your own images in torchvision's ``ImageFolder`` layout (registered by ``engine.data``).

::

    data:
      dataset: imagefolder
      path: /data/leaves          # leaves/train/<class>/*.png|jpg ..., optional leaves/test/<class>/...
      image_size: 32              # every image resized to 32x32 (bilinear, as torchvision's Resize)

Classes are the ``train/`` sub-folders in sorted order (as ``torchvision.datasets.ImageFolder``). The
images are decoded once into the same in-memory form as CIFAR (uint8 [N, C, H, W]) and cached on disk
under the data root, keyed on every file's path, size and modification time and on ``image_size``: a
changed, added or removed file decodes the folder again. Grayscale images give a 1-channel data set,
colour ones (RGB, palette, RGBA without its alpha) 3 channels; a folder mixing both is an error. Each
problem is one line naming the file or folder.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Hashable
from pathlib import Path

import numpy as np

from cifar_tune.engine.formats import DataError, _Arrays, _file_lock, _one_line, data_root
from cifar_tune.spec.schema import DataSpec

NAME = "imagefolder"
DEFAULT_IMAGE_SIZE = 32
EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
GRAYSCALE_MODES = ("1", "L", "LA", "I", "I;16", "F")
CACHE_VERSION = 1  # bump when the decoded form changes


def folder(data: DataSpec) -> Path:
    if not data.path:
        raise DataError("data.path: required for dataset 'imagefolder' (a folder with train/<class>/ images)")
    return Path(data.path).expanduser()


def image_size(data: DataSpec) -> int:
    return data.image_size or DEFAULT_IMAGE_SIZE


def _split_files(split_dir: Path) -> tuple[tuple[str, ...], list[tuple[Path, int]]]:
    """Classes (sorted sub-folder names) and (file, label) pairs in a stable order."""
    if not split_dir.is_dir():
        raise DataError(f"{split_dir}: no such folder (expected {split_dir}/<class>/*.png)")
    classes = tuple(sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith(".")))
    if not classes:
        raise DataError(f"{split_dir}: no class folders (expected {split_dir}/<class>/*.png)")
    files: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        found = sorted(p for p in (split_dir / name).rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())
        if not found:
            raise DataError(f"{split_dir / name}: empty class folder (no {', '.join(EXTENSIONS[:3])}, ... images)")
        files += [(p, label) for p in found]
    return classes, files


def _has_test(root: Path) -> bool:
    return (root / "test").is_dir()


def fingerprint(data: DataSpec) -> str:
    """Every image file's path, size and mtime, and the decoding settings: the cache's key."""
    root = folder(data)
    if not (root / "train").is_dir():
        raise DataError(f"{root}: no train/ folder (expected {root}/train/<class>/*.png, optional {root}/test/...)")
    h = hashlib.sha256(f"{CACHE_VERSION}:{image_size(data)}".encode())
    for split in ("train", "test"):
        base = root / split
        if not base.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            for name in sorted(filenames):
                p = Path(dirpath, name)
                if p.suffix.lower() in EXTENSIONS:
                    st = p.stat()
                    h.update(f"{p.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            h.update(f"{Path(dirpath).relative_to(root)}/\n".encode())  # empty folders count too
    return h.hexdigest()[:32]


def decode(path: Path, size: int) -> tuple[np.ndarray, int]:
    """One image as uint8 [C, size, size] and its channel count; DataError naming the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            channels = 1 if img.mode in GRAYSCALE_MODES else 3
            img = img.convert("L" if channels == 1 else "RGB")
            img = img.resize((size, size), Image.BILINEAR) if img.size != (size, size) else img
            arr = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{path}: cannot read this image ({_one_line(e)})") from None
    arr = arr[None] if channels == 1 else arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr), channels


def _decode_split(split_dir: Path, size: int, expect: tuple[int, Path] | None) -> tuple[np.ndarray, np.ndarray, tuple[str, ...], tuple[int, Path]]:
    classes, files = _split_files(split_dir)
    first = expect
    x = None
    y = np.empty(len(files), dtype=np.int64)
    for i, (p, label) in enumerate(files):
        arr, channels = decode(p, size)
        if first is None:
            first = (channels, p)
            x = np.empty((len(files), channels, size, size), dtype=np.uint8)
        elif channels != first[0]:
            kind = {1: "grayscale (1 channel)", 3: "colour (3 channels)"}
            raise DataError(f"{p}: {kind[channels]} but {first[1]} is {kind[first[0]]}; convert the images to one kind")
        if x is None:
            x = np.empty((len(files), channels, size, size), dtype=np.uint8)
        x[i] = arr
        y[i] = label
    assert x is not None and first is not None
    return x, y, classes, first


def _cache_path(data: DataSpec, key: str) -> Path:
    return data_root(data) / NAME / f"{key}.npz"


def build_cache(data: DataSpec) -> Path:
    """Decode the folder (train and, if present, test) into the on-disk cache unless it is there."""
    key = fingerprint(data)
    path = _cache_path(data, key)
    if path.is_file():
        return path
    with _file_lock(path.with_suffix(".lock")):
        if path.is_file():  # another process decoded it meanwhile
            return path
        root, size = folder(data), image_size(data)
        x, y, classes, first = _decode_split(root / "train", size, None)
        arrays = {"x_train": x, "y_train": y, "classes": np.array(classes)}
        if _has_test(root):
            test_classes, _ = _split_files(root / "test")
            if test_classes != classes:
                missing = sorted(set(classes) - set(test_classes))
                extra = sorted(set(test_classes) - set(classes))
                what = "; ".join(part for part in (f"missing {', '.join(missing)}" if missing else "",
                                                   f"not in train/: {', '.join(extra)}" if extra else "") if part)
                raise DataError(f"{root / 'test'}: its classes differ from {root / 'train'}'s ({what})")
            xt, yt, _, _ = _decode_split(root / "test", size, first)
            arrays.update(x_test=xt, y_test=yt)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(buf.getvalue())
        os.replace(tmp, path)
    return path


def load(data: DataSpec, train: bool) -> _Arrays:
    path = build_cache(data)
    with np.load(path, allow_pickle=False) as npz:
        classes = tuple(str(c) for c in npz["classes"])
        if train:
            return _Arrays(np.ascontiguousarray(npz["x_train"]), npz["y_train"].astype(np.int64), classes)
        if "x_test" not in npz.files:
            raise DataError(f"{folder(data)}: no test/ folder; only train/val can be used")
        return _Arrays(np.ascontiguousarray(npz["x_test"]), npz["y_test"].astype(np.int64), classes)


def cache_key(data: DataSpec) -> Hashable:
    if not (folder(data) / "train").is_dir():
        # a Ray node without the folder: its arrays come from the driver (install_training_arrays) under
        # this key; anything else reading it here fails in load, naming the folder
        return (NAME, str(folder(data)), None)
    return (NAME, str(folder(data)), fingerprint(data))  # a changed folder is read again


def prepare(data: DataSpec) -> None:
    build_cache(data)  # decoding validates every image once, before any trial starts
