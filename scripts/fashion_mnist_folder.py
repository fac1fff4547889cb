"""Writes a class-balanced subset of Fashion-MNIST as an ImageFolder for the fine-tuning demo.

    python3 scripts/fashion_mnist_folder.py OUT [--train-per-class 200] [--val-per-class 50]
        [--source /usr/share/datasets/fashion-mnist]

Fashion-MNIST (MIT licence, Zalando Research) ships in Debian's `dataset-fashion-mnist` package as
IDX files. The first N images of each class in the training file go to OUT/train/<class>/, the first
M of each class in the test file to OUT/val/<class>/, as 28x28 greyscale PNGs (the crate upscales
and converts them to RGB).
"""
import argparse
import gzip
import pathlib

import numpy as np
from PIL import Image

CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat",
           "sandal", "shirt", "sneaker", "bag", "ankle-boot"]


def idx(path: pathlib.Path) -> np.ndarray:
    data = gzip.open(path).read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def write(images, labels, out: pathlib.Path, per_class: int):
    counts = [0] * len(CLASSES)
    for i, (img, label) in enumerate(zip(images, labels)):
        if counts[label] >= per_class:
            continue
        d = out / CLASSES[label]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:05d}.png")
        counts[label] += 1
        if min(counts) >= per_class:
            break


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=pathlib.Path)
    ap.add_argument("--train-per-class", type=int, default=200)
    ap.add_argument("--val-per-class", type=int, default=50)
    ap.add_argument("--source", type=pathlib.Path, default=pathlib.Path("/usr/share/datasets/fashion-mnist"))
    a = ap.parse_args()
    write(idx(a.source / "train-images-idx3-ubyte.gz"), idx(a.source / "train-labels-idx1-ubyte.gz"),
          a.out / "train", a.train_per_class)
    write(idx(a.source / "t10k-images-idx3-ubyte.gz"), idx(a.source / "t10k-labels-idx1-ubyte.gz"),
          a.out / "val", a.val_per_class)


if __name__ == "__main__":
    main()
