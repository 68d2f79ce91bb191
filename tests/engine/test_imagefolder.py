"""Dataset ``imagefolder``: decoding against torchvision's ImageFolder, the on-disk cache, bad folders."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from cifar_tune.cli import main
from cifar_tune.engine import data, formats, imagefolder
from cifar_tune.errors import SpecError
from cifar_tune.spec.parse import parse_spec
from cifar_tune.spec.schema import DataSpec


@pytest.fixture(autouse=True)
def _data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv(formats.DATA_ROOT_ENV, str(tmp_path / "cache"))
    data.clear_cache()
    data.allow_test()  # `train` in an earlier test forbids the test split in this process, as a trial does
    yield
    data.clear_cache()


def write_folder(root: Path, classes: dict[str, int], *, mode: str = "RGB", size: tuple[int, int] = (24, 20),
                 splits: tuple[str, ...] = ("train",), seed: int = 0) -> Path:
    """``classes``: name -> images per class; PNG and JPEG alternate. Sizes differ from the target."""
    rng = np.random.default_rng(seed)
    for split in splits:
        for name, n in classes.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
                img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)
                img.save(root / split / name / (f"{i}.png" if i % 2 == 0 else f"{i}.jpg"))
    return root


def spec_for(root: Path, size: int = 16) -> DataSpec:
    return DataSpec(dataset="imagefolder", path=str(root), image_size=size, val_fraction=0.25)


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_decoding_matches_torchvision_imagefolder_with_resize(tmp_path: Path, mode: str) -> None:
    from torchvision import datasets, transforms

    root = write_folder(tmp_path / "imgs", {"cat": 3, "ant": 4, "bee": 2}, mode=mode, splits=("train", "test"))
    ours = data.training_arrays(spec_for(root))
    ref = datasets.ImageFolder(
        str(root / "train"), transform=transforms.Compose([transforms.Resize((16, 16)), transforms.PILToTensor()]),
        loader=lambda p: Image.open(p).convert(mode),
    )
    assert ours.classes == tuple(ref.classes) == ("ant", "bee", "cat")
    assert ours.x.shape == (9, 1 if mode == "L" else 3, 16, 16) and ours.x.dtype == np.uint8
    for i, (x, y) in enumerate(ref):
        assert ours.y[i] == y
        np.testing.assert_array_equal(ours.x[i], x.numpy(), err_msg=ref.samples[i][0])
    test = data.load_test(spec_for(root))
    assert len(test) == 9 and test.x.dtype == torch.uint8
    info = data.dataset_info(spec_for(root))
    assert (info.num_classes, info.channels, info.image_size) == (3, 1 if mode == "L" else 3, 16)


def test_the_cache_is_reused_and_invalidated_when_a_file_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_folder(tmp_path / "imgs", {"a": 2, "b": 2})
    spec = spec_for(root)
    first = imagefolder.load(spec, train=True)
    assert len(list((tmp_path / "cache" / "imagefolder").glob("*.npz"))) == 1
    decoded: list[Path] = []
    real = imagefolder.decode
    monkeypatch.setattr(imagefolder, "decode", lambda p, s: (decoded.append(p), real(p, s))[1])
    again = imagefolder.load(spec, train=True)
    assert decoded == []  # read from the cache
    np.testing.assert_array_equal(again.x, first.x)
    # a file touched (same bytes, newer mtime): decoded again
    target = root / "train" / "a" / "0.png"
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 10**9))
    imagefolder.load(spec, train=True)
    assert len(decoded) == 4
    # rewritten: decoded again, and the new pixels are used
    Image.fromarray(np.full((20, 24, 3), 200, np.uint8)).save(target)
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 2 * 10**9))
    changed = imagefolder.load(spec, train=True)
    assert len(decoded) == 8 and (changed.x[0] == 200).all()
    # a new file and a different size are other keys too
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(root / "train" / "b" / "9.png")
    assert len(imagefolder.load(spec, train=True).y) == 5
    assert imagefolder.load(spec_for(root, size=8), train=True).x.shape[-1] == 8


def _spec(root: Path) -> dict:
    return {"name": "imgs", "data": {"dataset": "imagefolder", "path": str(root), "image_size": 16},
            "space": {"model": {"family": "mlp", "hidden": [8]}}}


def _error(root: Path) -> list[str]:
    with pytest.raises(SpecError) as e:
        parse_spec(_spec(root))
    return e.value.lines


def test_bad_folders_give_one_line_naming_the_file(tmp_path: Path) -> None:
    empty = write_folder(tmp_path / "empty", {"a": 2})
    (empty / "train" / "b").mkdir()
    assert _error(empty) == [f"data.path: {empty}/train/b: empty class folder (no .png, .jpg, .jpeg, ... images)"]

    broken = write_folder(tmp_path / "broken", {"a": 2, "b": 2})
    (broken / "train" / "b" / "bad.png").write_bytes(b"not a png")
    (line,) = _error(broken)
    assert line.startswith(f"data.path: {broken}/train/b/bad.png: cannot read this image (")

    mixed = write_folder(tmp_path / "mixed", {"a": 2, "b": 2})
    Image.fromarray(np.zeros((20, 24), np.uint8), "L").save(mixed / "train" / "b" / "gray.png")
    assert _error(mixed) == [f"data.path: {mixed}/train/b/gray.png: grayscale (1 channel) but {mixed}/train/a/0.png "
                             "is colour (3 channels); convert the images to one kind"]

    mismatch = write_folder(tmp_path / "mismatch", {"a": 2, "b": 2})
    write_folder(mismatch, {"a": 1, "c": 1}, splits=("test",))
    assert _error(mismatch) == [f"data.path: {mismatch}/test: its classes differ from {mismatch}/train's "
                                "(missing b; not in train/: c)"]

    (tmp_path / "no_train" / "test" / "a").mkdir(parents=True)
    (line,) = _error(tmp_path / "no_train")
    assert line.startswith(f"data.path: {tmp_path}/no_train: no train/ folder")

    raw = _spec(tmp_path)
    del raw["data"]["path"]
    with pytest.raises(SpecError, match="data.path: required for dataset 'imagefolder'"):
        parse_spec(raw)
    raw = {**_spec(tmp_path), "data": {"dataset": "synthetic", "image_size": 16}}
    with pytest.raises(SpecError, match="data.image_size: only used by dataset 'imagefolder'"):
        parse_spec(raw)


def test_train_runs_on_an_image_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_folder(tmp_path / "imgs", {"a": 8, "b": 8}, splits=("train", "test"))
    spec = _spec(root)
    spec["search"] = {"scheduler": {"name": "fifo", "max_epochs": 1}}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["train", str(path), "--device", "cpu"]) == 0, capsys.readouterr().err
    assert "status: completed after 1 epochs" in capsys.readouterr().out


def test_the_shipped_example_runs_on_the_generated_folder(tmp_path: Path) -> None:
    import runpy

    examples = Path(__file__).resolve().parents[2] / "search_spaces" / "examples"
    make = runpy.run_path(str(examples / "make_image_folder.py"))["main"]
    make(tmp_path / "shapes", train_per_class=5, test_per_class=2)
    from cifar_tune.spec.parse import load_spec

    spec = load_spec(examples / "imagefolder.yaml", [f"data.path={tmp_path / 'shapes'}"])
    info = data.dataset_info(spec.data)
    assert (info.classes, info.channels, info.image_size) == (("disc", "hbars", "square", "vbars"), 3, 32)
    assert len(data.load_test(spec.data)) == 8


def test_a_node_without_the_folder_uses_the_arrays_from_the_driver(tmp_path: Path) -> None:
    """On a Ray cluster the driver decodes the folder and ships the arrays; a worker node need not have it."""
    root = write_folder(tmp_path / "imgs", {"a": 2, "b": 2})
    arrays = data.training_arrays(spec_for(root))
    elsewhere = spec_for(tmp_path / "not_on_this_node")
    data.clear_cache()
    data.install_training_arrays(elsewhere, arrays)
    assert data.training_arrays(elsewhere) is arrays
    assert data.dataset_info(elsewhere).num_classes == 2
    data.clear_cache()
    with pytest.raises(data.DataError, match="not_on_this_node: no train/ folder"):
        data.training_arrays(elsewhere)
