"""Write a tiny image folder in torchvision's ImageFolder layout, for imagefolder.yaml.

    python search_spaces/examples/make_image_folder.py /tmp/shapes

gives /tmp/shapes/train/<class>/*.png and /tmp/shapes/test/<class>/*.png: four classes of coloured
shapes (disc, square, horizontal and vertical bars) on noisy backgrounds, 40x40 pixels (the spec resizes
them to 32x32). Then: cifar-tune search search_spaces/examples/imagefolder.yaml --set data.path=/tmp/shapes
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("disc", "square", "hbars", "vbars")


def shape(kind: str, rng: np.random.Generator, size: int = 40) -> np.ndarray:
    img = rng.normal(110, 40, (size, size, 3))
    yy, xx = np.mgrid[:size, :size]
    cy, cx, r = rng.integers(12, size - 12, 2).tolist() + [int(rng.integers(6, 11))]
    if kind == "disc":
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
    elif kind == "square":
        mask = (abs(yy - cy) < r) & (abs(xx - cx) < r)
    elif kind == "hbars":
        mask = (yy // 4) % 2 == 0
    else:
        mask = (xx // 4) % 2 == 0
    img[mask] = rng.integers(150, 256, 3)
    return np.clip(img, 0, 255).astype(np.uint8)


def main(root: Path, train_per_class: int = 60, test_per_class: int = 20, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for kind in CLASSES:
            out = root / split / kind
            out.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(shape(kind, rng)).save(out / f"{kind}_{i:03d}.png")
    print(f"wrote {root}/train and {root}/test: {len(CLASSES)} classes, {train_per_class}+{test_per_class} images each")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "shapes"))
