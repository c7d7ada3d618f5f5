"""Local imagefolders: `data.imagefolder_data_files` (one listing instead of a glob per candidate pattern) must give
exactly the splits and files that datasets' own resolution gives, on every layout an imagefolder may have."""

import json
import os

import datasets
import pytest
from datasets.data_files import DataFilesDict, get_data_patterns
from PIL import Image

from dp_sapf import data

LAYOUTS = {
    "prepare_data: train/ and test/ class folders, dataset_info.json": [
        "train/a/0.png", "train/b/1.png", "test/a/2.png", "test/b/3.png", "dataset_info.json"],
    "class folders, no splits, a README": ["a/0.png", "b/1.png", "b/deeper/2.png", "README.md"],
    "metadata.jsonl beside the images": ["train/0.png", "train/1.png", "train/metadata.jsonl", "test/2.png",
                                         "test/metadata.jsonl"],
    "split names in file names": ["train_0.png", "train-1.png", "test_2.png", "other.png"],
    "hidden and special files and folders": ["train/a/0.png", "train/a/.DS_Store", "train/.hidden/1.png",
                                             "train/__pycache__/2.png", "test/a/3.png", ".cache/4.png",
                                             ".hidden/validation/5.png", "__special__/validation/6.png"],
    "training/, validation/, eval/ and a nested data/ folder": [
        "data/training/a/0.png", "data/validation/a/1.png", "data/eval/b/2.png", "data/training/b/3.png"],
    "sharded split files": ["data/train-00000-of-00002.png", "data/train-00001-of-00002.png",
                            "data/test-00000-of-00001.png"],
}


def _make(root, files):
    for rel in files:
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if rel.endswith(".png"):
            Image.new("L", (4, 4), color=len(rel)).save(path)
        elif rel.endswith("metadata.jsonl"):
            folder = os.path.dirname(path)
            names = sorted(n for n in (os.path.basename(f) for f in files if os.path.dirname(f) == os.path.dirname(rel))
                           if n.endswith(".png"))
            with open(path, "w") as f:
                f.writelines(json.dumps({"file_name": n, "label": i % 2}) + "\n" for i, n in enumerate(names))
            assert os.path.isdir(folder)
        else:
            open(path, "w").write("{}")


def _resolved(patterns, root):
    return {str(split): sorted(files) for split, files in DataFilesDict.from_patterns(patterns, base_path=root).items()}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_the_same_splits_and_files_as_datasets_own_resolution(layout, tmp_path):
    root = str(tmp_path / "folder")
    _make(root, LAYOUTS[layout])
    fast = data.imagefolder_data_files(root)
    assert fast is not None
    assert _resolved(fast, root) == _resolved(get_data_patterns(root), root)
    assert all(patterns for patterns in fast.values()), "a split whose every pattern matches nothing"


def test_a_split_loads_the_same_dataset(tmp_path):
    root = str(tmp_path / "folder")
    _make(root, LAYOUTS["prepare_data: train/ and test/ class folders, dataset_info.json"])
    slow = datasets.load_dataset("imagefolder", data_dir=root, cache_dir=str(tmp_path / "c1"))
    fast = datasets.load_dataset("imagefolder", data_dir=root, cache_dir=str(tmp_path / "c2"),
                                 data_files=data.imagefolder_data_files(root))
    assert sorted(slow) == sorted(fast)
    for split in slow:
        assert slow[split].features == fast[split].features
        assert sorted(slow[split]["label"]) == sorted(fast[split]["label"])
        assert sorted(im.tobytes() for im in slow[split]["image"]) == sorted(im.tobytes() for im in fast[split]["image"])


def test_a_symlinked_folder_or_an_empty_one_is_left_to_datasets(tmp_path):
    root = tmp_path / "folder"
    _make(str(root), ["train/a/0.png"])
    os.symlink(root / "train" / "a", root / "train" / "b")
    assert data.imagefolder_data_files(str(root)) is None
    empty = tmp_path / "empty"
    empty.mkdir()
    assert data.imagefolder_data_files(str(empty)) is None
