"""evaluate.py and dp_sapf.metrics: FID against an independent float64 reference, the Inception hash check,
classifiers that learn, and clear errors on bad synthetic sets."""

import argparse
import json
import os
import shutil
import stat

import numpy as np
import pytest
import torch
from PIL import Image

from dp_sapf import metrics
from helpers import run_script


def reference_fid(a: np.ndarray, b: np.ndarray) -> float:
    """FID by a different route: Tr((Σa Σb)^½) = Σ √λ of the symmetric Σa^½ Σb Σa^½ (eigendecompositions only)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(cov_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.sqrt(np.clip(inner, 0, None)).sum())


@pytest.fixture(scope="module")
def real_features(fashion_data_dir):
    """Real TF-Inception features of the 40 Fashion-MNIST train images of the fixture."""
    folder = os.path.join(fashion_data_dir, "train")
    paths = sorted(os.path.join(folder, c, f) for c in os.listdir(folder) for f in os.listdir(os.path.join(folder, c)))
    return metrics.inception_features([Image.open(p) for p in paths], batch_size=20)


def test_fid_of_a_set_with_itself_is_zero(real_features):
    assert real_features.shape == (40, 2048)
    assert abs(metrics.fid_from_features(real_features, real_features)) < 1e-3


def test_fid_matches_float64_reference():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 32))
    b = rng.normal(size=(300, 32)) @ rng.normal(size=(32, 32)) * 0.5 + 0.3
    fid = metrics.fid_from_features(a, b)
    assert fid > 1.0
    assert fid == pytest.approx(reference_fid(a, b), rel=1e-8)


@pytest.mark.parametrize("rows", [(300, 40), (40, 300), (30, 25)])
def test_fid_with_fewer_samples_than_dimensions_matches_the_sqrtm_route(rows):
    """The n × n eigenvalue route (a set with fewer rows than the 64 dimensions) against scipy's sqrtm of the
    64 × 64 product and the reference: the same number, whichever set is the smaller one."""
    rng = np.random.default_rng(1)
    a = rng.normal(size=(rows[0], 64)) @ rng.normal(size=(64, 64)) * 0.3
    b = rng.normal(size=(rows[1], 64)) + 0.2
    fid = metrics.fid_from_features(a, b)
    sqrtm = metrics.frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert fid > 1.0
    assert fid == pytest.approx(sqrtm, rel=1e-6) and fid == pytest.approx(reference_fid(a, b), rel=1e-8)
    assert fid == pytest.approx(metrics.fid_from_features(b, a), rel=1e-10)


def test_fid_on_inception_features_matches_reference(real_features):
    shifted = real_features[:20] + 0.05  # a different set in the same 2048-d space
    fid = metrics.fid_from_features(real_features[20:], shifted)
    assert fid > 0
    assert fid == pytest.approx(reference_fid(real_features[20:], shifted), rel=1e-4)


def test_inception_hash_check_refuses_a_wrong_file(tmp_path):
    wrong = tmp_path / "default_1.pt"
    wrong.write_bytes(b"not the inception weights")
    with pytest.raises(ValueError, match="sha256"):
        metrics.load_inception(str(wrong))


def test_inception_preprocessing_is_the_tf_convention():
    """uint8 0 -> -1 and 255 -> 0.9921875 (fid-helper's input range), resize to 299: black and white differ."""
    black, white = Image.new("RGB", (28, 28)), Image.new("RGB", (28, 28), (255, 255, 255))
    feats = metrics.inception_features([black, white, black], batch_size=2)
    assert np.allclose(feats[0], feats[2])
    assert not np.allclose(feats[0], feats[1])


def test_onnxruntime_inception_gives_the_torchscript_features(fashion_data_dir):
    """The CPU default (ONNX Runtime) and the TorchScript copy agree: FIDs of earlier runs stay comparable."""
    folder = os.path.join(fashion_data_dir, "train")
    paths = sorted(os.path.join(folder, c, f) for c in os.listdir(folder) for f in os.listdir(os.path.join(folder, c)))
    images = [Image.open(p) for p in paths[:12]]
    fast = metrics.load_inception(backend="onnxruntime")
    assert isinstance(fast, metrics.OnnxInception) and isinstance(metrics.load_inception(), metrics.OnnxInception)
    a = metrics.inception_features(images, fast, batch_size=5)
    b = metrics.inception_features(images, metrics.load_inception(backend="torch"), batch_size=5)
    assert a.shape == b.shape == (12, 2048)
    assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max()
    assert metrics.fid_from_features(a[:6], a[6:]) == pytest.approx(metrics.fid_from_features(b[:6], b[6:]), rel=1e-4)
    with pytest.raises(ValueError, match="backend"):
        metrics.load_inception(backend="tensorflow")


def test_inception_features_resume_after_an_interruption(tmp_path):
    """Hours of real features survive a killed session: the partial file is picked up where it stopped."""
    images = [Image.new("RGB", (28, 28), (40 * i, 255 - 40 * i, 0)) for i in range(5)]
    model = metrics.load_inception()
    whole = metrics.inception_features(images, model, batch_size=2)

    def interrupted():
        yield from images[:3]
        raise KeyboardInterrupt

    partial = str(tmp_path / "partial.npz")
    with pytest.raises(KeyboardInterrupt):
        metrics.inception_features(interrupted(), model, batch_size=2, resume_path=partial, save_every_s=0)
    assert len(np.load(partial)["features"]) == 2  # the one full batch before the interruption
    resumed = metrics.inception_features(iter(images), model, batch_size=2, resume_path=partial, save_every_s=0)
    assert np.allclose(resumed, whole, atol=1e-5) and len(resumed) == 5


def easy_split(n_per_class: int, seed: int):
    """Two classes any classifier separates: horizontal vs vertical stripes, random phase and noise."""
    g = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for label in (0, 1):
        phase = torch.randint(0, 4, (n_per_class,), generator=g)
        coord = torch.arange(16)
        stripes = ((coord[None, :] + phase[:, None]) // 2 % 2).float() * 2 - 1  # (n, 16)
        img = stripes[:, :, None].expand(-1, 16, 16) if label == 0 else stripes[:, None, :].expand(-1, 16, 16)
        img = img[:, None].expand(-1, 3, -1, -1) + 0.3 * torch.randn(n_per_class, 3, 16, 16, generator=g)
        xs.append(img)
        ys.append(torch.full((n_per_class,), label))
    return torch.cat(xs), torch.cat(ys)


@pytest.mark.parametrize("arch,depth", [("wrn", 10), ("resnet", 11)])
def test_classifier_learns_an_easy_split(arch, depth):
    x, y = easy_split(48, 0)
    x_test, y_test = easy_split(32, 1)
    model, history = metrics.train_classifier(x, y, x[:16], y[:16], arch=arch, num_classes=2, epochs=4,
                                              lr=0.01, batch_size=32, depth=depth, width=1)
    assert len(history) == 4
    assert metrics.accuracy(model, x_test, y_test) >= 0.9


def copy_real_as_synthetic(fashion_data_dir, dest):
    shutil.copytree(os.path.join(fashion_data_dir, "train"), dest)
    return str(dest)


def eval_args(data_dir, synthetic, out, *extra):
    return ["--synthetic_dir", synthetic, "--train_data_dir", data_dir, "--class_prompts", "fashion_mnist",
            "--classifier", "wrn",
            "--classifier_depth", "10", "--classifier_width", "1", "--epochs", "1", "--classifier_resolution", "16",
            "--output_dir", out, "--cache_dir", os.path.join(out, "cache"), *extra]


def test_evaluate_end_to_end(fashion_data_dir, tmp_path):
    synthetic = copy_real_as_synthetic(fashion_data_dir, tmp_path / "syn")
    out = str(tmp_path / "eval")
    res = run_script("evaluate.py", eval_args(fashion_data_dir, synthetic, out, "--fid_test_split", "test"))
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.load(open(os.path.join(out, "metrics.json")))
    assert result["num_synthetic"] == 40 and result["num_real_test"] == 20
    assert abs(result["fid_train"]) < 1e-3  # the synthetic set is the train set itself
    assert result["fid_test"] > 1.0
    assert 0.0 <= result["accuracy_wrn"] <= 1.0 and 0.0 <= result["real_reference_accuracy_wrn"] <= 1.0
    assert result["model_selection"] == "synthetic held-out"
    assert os.path.isfile(os.path.join(out, "metrics.md")) and os.path.isfile(os.path.join(out, "metrics.png"))
    assert any(name.startswith("inception-") for name in os.listdir(os.path.join(out, "cache")))  # real set cached
    timings = json.load(open(os.path.join(out, "timings.json")))  # beside the metrics, for bench/scripts_report.py
    assert timings["inception_images_per_s"] > 0 and timings["classifier_wrn_samples_per_s"] > 0
    assert "timings" not in result and "inception_synthetic_s" in timings
    # FID against a fixed half of the real set: no longer the synthetic set itself; its rows are taken from the
    # whole split's cached features (no second Inception pass, no new cache file)
    cached = set(os.listdir(os.path.join(out, "cache")))
    res = run_script("evaluate.py", eval_args(fashion_data_dir, synthetic, out, "--skip_accuracy", "--fid_max_real", "20"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert set(os.listdir(os.path.join(out, "cache"))) == cached
    from dp_sapf import data

    train = data.load_labelled_images(argparse.Namespace(train_data_dir=fashion_data_dir, dataset_name=None,
                                                         dataset_config_name=None, image_column="image",
                                                         label_column="label", cache_dir=None), "train",
                                      class_names=list(data.BUILTIN_CLASS_PROMPTS["fashion_mnist"]))
    key = {"content": train.content_digest(), "split": "train", "n": 40}
    whole = metrics.load_cached_features(key, os.path.join(out, "cache"))
    half = whole[np.sort(np.random.default_rng(0).choice(40, 20, replace=False))]
    fid = json.load(open(os.path.join(out, "metrics.json")))["fid_train"]
    assert fid > 1.0 and fid == pytest.approx(metrics.fid_from_features(whole, half), rel=1e-6)
    # features of private images: an owner-only folder, files 0600
    cache = os.path.join(out, "cache")
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o700
    features = [f for f in os.listdir(cache) if f.startswith("inception-")]
    assert features and all(stat.S_IMODE(os.stat(os.path.join(cache, f)).st_mode) == 0o600 for f in features)


def test_cached_features_are_keyed_by_content_not_path(fashion_data_dir, tmp_path):
    """Another dataset at the same path with the same number of images must not reuse the first one's features."""
    data_dir = tmp_path / "data"
    shutil.copytree(fashion_data_dir, data_dir)
    synthetic = copy_real_as_synthetic(fashion_data_dir, tmp_path / "syn")
    out = str(tmp_path / "eval")
    assert run_script("evaluate.py", eval_args(str(data_dir), synthetic, out, "--skip_accuracy")).returncode == 0
    assert abs(json.load(open(os.path.join(out, "metrics.json")))["fid_train"]) < 1e-3
    for root, _, files in os.walk(data_dir / "train"):  # the same path and size, other images
        for f in files:
            Image.fromarray(255 - np.asarray(Image.open(os.path.join(root, f)))).save(os.path.join(root, f))
    assert run_script("evaluate.py", eval_args(str(data_dir), synthetic, out, "--skip_accuracy")).returncode == 0
    assert json.load(open(os.path.join(out, "metrics.json")))["fid_train"] > 1.0  # recomputed, not the stale ones


def test_evaluate_bad_inputs(fashion_data_dir, tmp_path):
    out = str(tmp_path / "eval")
    empty = tmp_path / "empty"
    (empty / "bag").mkdir(parents=True)
    res = run_script("evaluate.py", eval_args(fashion_data_dir, str(empty), out))
    assert res.returncode == 2 and "holds no images" in res.stderr

    wrong_names = copy_real_as_synthetic(fashion_data_dir, tmp_path / "wrong_names")
    os.rename(os.path.join(wrong_names, "bag"), os.path.join(wrong_names, "handbag"))
    res = run_script("evaluate.py", eval_args(fashion_data_dir, wrong_names, out))
    assert res.returncode == 2 and "handbag" in res.stderr and "match no real class" in res.stderr

    wrong_size = copy_real_as_synthetic(fashion_data_dir, tmp_path / "wrong_size")
    for root, _, files in os.walk(wrong_size):
        for f in files:
            Image.open(os.path.join(root, f)).resize((32, 32)).save(os.path.join(root, f))
    res = run_script("evaluate.py", eval_args(fashion_data_dir, wrong_size, out, "--skip_accuracy"))
    assert res.returncode == 2 and "--output_resolution 28" in res.stderr
    res = run_script("evaluate.py", eval_args(fashion_data_dir, wrong_size, out, "--skip_accuracy",
                                              "--allow_size_mismatch"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.load(open(os.path.join(out, "metrics.json")))["fid_train"] > 0  # resized: no longer identical
