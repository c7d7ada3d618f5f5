"""The tuning folder of dp_sapf.prepare_data: hyperparameters are chosen against held-out *training* images, so its
test/ split must be disjoint from train/ and hold no real test image."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from dp_sapf import prepare_data
from helpers import REPO


def _ids(folder):
    return {int(f[:-4]) for c in os.listdir(folder) for f in os.listdir(os.path.join(folder, c))}


def test_validation_folder_holds_the_next_training_images_disjoint_from_train(tmp_path):
    out = tmp_path / "val"
    info = prepare_data.prepare("fashion_mnist", str(out), max_per_class=3, validation_per_class=2)
    assert info["test_split"] == "held-out training images"
    assert all(v == 3 for v in info["counts"]["train"].values()) and all(v == 2 for v in info["counts"]["test"].values())
    train_ids, test_ids = _ids(out / "train"), _ids(out / "test")
    assert not train_ids & test_ids
    images, labels = prepare_data.load_fashion_mnist()["train"]
    expected = set(np.concatenate([np.flatnonzero(labels == c)[3:5] for c in range(10)]).tolist())
    assert test_ids == expected  # the next two training images of each class, named by their training index
    i = min(test_ids)
    name = info["class_names"][labels[i]]
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(out / "test" / name / f"{i:05d}.png")), images[i])
    assert json.load(open(out / "dataset_info.json"))["test_split"] == "held-out training images"


def test_validation_folder_refuses_ambiguous_requests(tmp_path):
    with pytest.raises(ValueError, match="needs --max_per_class"):
        prepare_data.prepare("fashion_mnist", str(tmp_path / "a"), validation_per_class=2)
    with pytest.raises(ValueError, match="drop --test_max_per_class"):
        prepare_data.prepare("fashion_mnist", str(tmp_path / "b"), max_per_class=2, test_max_per_class=1,
                             validation_per_class=2)
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")


def test_the_quick_start_is_tuned_on_a_public_stand_in(tmp_path):
    """The quick start's settings are compared on MNIST-5k digits filed under the Fashion-MNIST classes (public),
    never on Fashion-MNIST: the tuning script sets that dataset for every candidate and reads no Fashion-MNIST split."""
    info = prepare_data.prepare("mnist5k_as_fashion", str(tmp_path / "standin"), max_per_class=2, test_max_per_class=1)
    assert info["class_names"] == prepare_data.FASHION_MNIST_CLASSES
    digits = prepare_data.load_mnist5k()
    first_trouser = sorted(os.listdir(tmp_path / "standin" / "train" / "trouser"))[0]  # digit 1 under 'trouser'
    index = int(os.path.splitext(first_trouser)[0])
    assert digits["train"][1][index] == 1
    script = open(os.path.join(REPO, "experiments", "tune_quickstart.sh")).read()
    assert "STANDIN=${STANDIN:-mnist5k_as_fashion}" in script and "DATASET=$STANDIN" in script
    assert "validation_per_class" not in script
    assert "fashion_mnist" not in script.replace("--class_prompts fashion_mnist", "")
    # the second stand-in: the same public digits, inverted, under their own (digit) class names and prompts
    info = prepare_data.prepare("mnist5k_inverted", str(tmp_path / "inverted"), max_per_class=2, test_max_per_class=1)
    assert info["class_names"] == prepare_data.MNIST_CLASSES
    name = sorted(os.listdir(tmp_path / "inverted" / "train" / info["class_names"][1]))[0]
    from PIL import Image

    pixels = np.asarray(Image.open(tmp_path / "inverted" / "train" / info["class_names"][1] / name))
    index = int(os.path.splitext(name)[0])
    assert digits["train"][1][index] == 1 and (pixels == 255 - digits["train"][0][index]).all()
    quickstart = open(os.path.join(REPO, "scripts", "quickstart.sh")).read()
    assert '[ "$DATASET" = mnist5k_inverted ] && PROMPTS=mnist' in quickstart
