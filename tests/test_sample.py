"""sample.py: exact counts and labels, reproducible per-image seeds, resume without duplicates or gaps."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from test_train import run_script, train_args


@pytest.fixture(scope="module")
def lora_run(tiny_pipeline_dir, fashion_data_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("lora") / "run")
    res = run_script("train_dp_sapf.py", train_args(tiny_pipeline_dir, fashion_data_dir, out, "--lora_target",
                                                    "all_attention", "--target_epsilon", "8", "--max_train_steps", "2"))
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def sample_args(model, lora, out, *extra):
    return ["--pretrained_model_name_or_path", model, "--lora_path", lora, "--num_inference_steps", "2",
            "--output_dir", out, *extra]


def pixels(path):
    return np.asarray(Image.open(path))


def test_counts_labels_and_resume(tiny_pipeline_dir, lora_run, tmp_path):
    out = str(tmp_path / "syn")
    res = run_script("sample.py", sample_args(tiny_pipeline_dir, lora_run, out, "--num_images_per_class", "3",
                                              "--batch_size", "4", "--output_resolution", "28"))
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.load(open(os.path.join(lora_run, "privacy_report.json")))
    classes = report["class_names"]
    for name in classes:
        files = sorted(os.listdir(os.path.join(out, name)))
        assert files == ["00000.png", "00001.png", "00002.png"]
        assert Image.open(os.path.join(out, name, files[0])).size == (28, 28)
    rows = [json.loads(line) for line in open(os.path.join(out, "metadata.jsonl"))]
    assert len(rows) == 30
    assert all(classes[r["label"]] == r["class_name"] == r["file_name"].split("/")[0] for r in rows)
    assert os.path.isfile(os.path.join(out, "preview.png"))
    timings = json.load(open(os.path.join(out, "timings.json")))  # read by bench/scripts_report.py
    assert timings["steady_images_per_s"] > 0 and timings["denoiser_calls_per_image"] >= timings["num_inference_steps"]

    # a killed run: some images missing; a rerun fills exactly the gaps, with the same pixels as before
    victim = os.path.join(out, classes[2], "00001.png")
    kept = pixels(os.path.join(out, classes[2], "00002.png"))
    reference = pixels(victim)
    os.remove(victim)
    res = run_script("sample.py", sample_args(tiny_pipeline_dir, lora_run, out, "--num_images_per_class", "4",
                                              "--batch_size", "3", "--output_resolution", "28"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "29 already there" in res.stdout
    assert np.array_equal(pixels(victim), reference)  # per-image seeds: independent of batch composition
    assert np.array_equal(pixels(os.path.join(out, classes[2], "00002.png")), kept)
    for name in classes:
        assert sorted(os.listdir(os.path.join(out, name))) == [f"{k:05d}.png" for k in range(4)]


def test_refuses_an_unfinished_run(tiny_pipeline_dir, lora_run, tmp_path):
    import shutil

    broken = str(tmp_path / "broken")
    shutil.copytree(lora_run, broken)
    json.dump({"status": "failed"}, open(os.path.join(broken, "run_status.json"), "w"))
    res = run_script("sample.py", sample_args(tiny_pipeline_dir, broken, str(tmp_path / "s"), "--num_images", "2"))
    assert res.returncode == 2 and "not a finished training run" in res.stderr
