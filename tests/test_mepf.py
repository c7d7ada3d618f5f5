"""DP-MEPF: the release's sensitivity under add/remove, its accounting against dp-accounting, features that do not
depend on the batch, and the script end to end (resumable to the same images, no secret or exact private quantity
in its state, its output scored by evaluate.py unchanged)."""

import json
import os

import numpy as np
import pytest
import torch

from dp_sapf import mepf, privacy
from helpers import run_script


@pytest.mark.parametrize("count_weight", [0.1, 0.5, 0.9])
def test_one_added_image_moves_one_class_row_by_at_most_one(count_weight):
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        scale = 10.0 ** (trial % 7 - 3)  # raw features of any scale: the unit rows bound them
        features = torch.randn(50, 33, generator=g).abs() * scale
        labels = torch.randint(0, 4, (50,), generator=g)
        extra, extra_label = torch.randn(1, 33, generator=g) * scale * 100, torch.randint(0, 4, (1,), generator=g)
        base = mepf.class_rows(features, labels, 4, count_weight)
        added = mepf.class_rows(torch.cat([extra, features]), torch.cat([extra_label, labels]), 4,
                                count_weight)  # inserted first: no other image's contribution may move
        diff = added - base
        moved = diff.abs().sum(dim=1) > 0
        assert moved.sum() == 1 and moved[extra_label[0]]
        assert diff.norm() == pytest.approx(1.0, abs=1e-9)  # exactly the sensitivity the noise is calibrated to
    zero = mepf.class_rows(torch.zeros(1, 33), torch.zeros(1, dtype=torch.long), 4, count_weight)
    assert zero.norm() <= 1.0
    with pytest.raises(ValueError, match="count_weight"):
        mepf.class_rows(torch.zeros(1, 3), torch.zeros(1, dtype=torch.long), 2, 1.0)


def test_the_release_adds_gaussian_noise_of_sigma_once_and_means_undo_the_weights():
    rows = torch.zeros(10, 4001, dtype=torch.float64)
    noisy = mepf.release(rows, 2.5, 0.1, torch.Generator().manual_seed(3))
    assert np.std(noisy.noisy_rows) == pytest.approx(2.5, rel=0.02) and abs(np.mean(noisy.noisy_rows)) < 0.02
    again = mepf.release(rows, 2.5, 0.1, torch.Generator().manual_seed(3))
    assert (again.noisy_rows == noisy.noisy_rows).all()  # the noise is a function of the secret seed alone
    features = torch.rand(300, 20, dtype=torch.float64)
    labels = torch.arange(300) % 3
    exact = mepf.release(mepf.class_rows(features, labels, 3, 0.3), 0.0, 0.3, torch.Generator().manual_seed(0))
    assert exact.noisy_counts == pytest.approx([100, 100, 100])
    truth = torch.stack([mepf.unit_rows(features)[labels == c].mean(0) for c in range(3)]).float()
    assert torch.allclose(exact.class_means(), truth, atol=1e-6)


@pytest.mark.parametrize("target", [1.0, 10.0])
def test_sigma_is_calibrated_by_dp_accounting_for_one_gaussian_release(target):
    """One Gaussian mechanism of sensitivity 1 (q = 1, T = 1): σ meets the target tightly, by dp-accounting's own
    GaussianDpEvent (RDP), and its PLD ε is no larger."""
    from dp_accounting import dp_event
    from dp_accounting.pld import PLDAccountant
    from dp_accounting.rdp import RdpAccountant

    n = 60000
    sigma = privacy.PrivacyLedger.plan(dataset_size=n, expected_batch_size=n, steps=1, max_grad_norm=1.0,
                                       target_epsilon=target).noise_multiplier

    def eps(s, accountant):
        acc = accountant()
        acc.compose(dp_event.GaussianDpEvent(s))
        return acc.get_epsilon(1 / n)

    rdp = lambda: RdpAccountant(orders=list(privacy.RDP_ORDERS))  # noqa: E731
    assert eps(sigma, rdp) <= target * (1 + 1e-9) < eps(sigma * 0.999, rdp)
    assert eps(sigma, PLDAccountant) <= target


def _fake_inception():
    """A stand-in with the TF-Inception's structure (net.layers of named blocks, BatchNorm in eval mode)."""
    layers = torch.nn.Sequential()
    layers.add_module("conv", torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2), torch.nn.BatchNorm2d(4),
                                                  torch.nn.ReLU()))
    layers.add_module("pool0", torch.nn.MaxPool2d(2))
    layers.add_module("mixed", torch.nn.Sequential(torch.nn.Conv2d(4, 6, 3), torch.nn.ReLU()))
    net = torch.nn.Module()
    net.layers = layers
    outer = torch.nn.Module()
    outer.net = net
    return outer


def test_features_do_not_depend_on_the_batch_and_pass_gradients():
    torch.manual_seed(0)
    features = mepf.PerceptualFeatures(_fake_inception(), resolution=75)
    features.train()  # refused: BatchNorm keeps its fixed statistics
    x = torch.rand(6, 1, 28, 28)
    alone = torch.cat([features(x[i:i + 1]) for i in range(6)])
    assert torch.allclose(features(x), alone, atol=1e-6) and alone.shape == (6, 4 + 6)
    y = x.clone().requires_grad_(True)
    mepf.matching_loss(features, y, torch.arange(6) % 3, torch.zeros(3, 10)).backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in features.parameters())


def test_the_generator_draws_labelled_images_in_range():
    net = mepf.ConditionalGenerator(10, 28, 1)
    out = net(torch.randn(20, 90), mepf.balanced_labels(20, 10))
    assert out.shape == (20, 1, 28, 28) and out.min() >= 0 and out.max() <= 1
    assert mepf.balanced_labels(25, 10).tolist() == [c for c in range(10) for _ in range(2)]
    assert mepf.ConditionalGenerator(3, 33, 3)(torch.randn(2, 90), torch.tensor([0, 2])).shape == (2, 3, 33, 33)


def _mepf_args(data_dir, out, *extra):
    return ["--train_data_dir", data_dir, "--class_prompts", "fashion_mnist", "--target_epsilon", "5",
            "--iterations", "4", "--batch_size", "10", "--num_images_per_class", "3", "--dp_seed", "123456789",
            "--output_dir", out, *extra]


def test_script_resumes_to_the_same_images_and_evaluate_reads_its_output(fashion_data_dir, tmp_path):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    res = run_script("dp_mepf.py", _mepf_args(fashion_data_dir, straight))
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.load(open(os.path.join(straight, "privacy_report.json")))
    assert report["private"] and report["method"] == "dp_mepf" and report["steps"] == 1
    assert report["sample_rate"] == 1 and report["max_grad_norm"] == 1.0
    assert report["epsilon"] <= 5 * (1 + 1e-6) and report["dataset_size"] == 40 and report["delta"] == 1 / 40
    assert report["feature_dim"] == 10448 and len(report["noisy_class_counts"]) == 10
    assert not os.path.exists(os.path.join(straight, "mepf_state"))
    assert len(open(os.path.join(straight, "metadata.jsonl")).readlines()) == 30
    assert "DP-MEPF" in open(os.path.join(straight, "README.md")).read()

    res = run_script("dp_mepf.py", _mepf_args(fashion_data_dir, resumed, "--stop_after_iterations", "2"))
    assert res.returncode == 0 and "Stopped after update 2" in res.stdout, res.stderr[-3000:]
    path = os.path.join(resumed, "mepf_state", "state.pt")
    assert os.stat(path).st_mode & 0o077 == 0
    state = torch.load(path, weights_only=False)
    assert state["iteration"] == 2 and set(state) == {"recipe", "iteration", "release", "generator", "optimizer"}
    assert "123456789" not in repr(state)  # the secret seed is never saved: a resume cannot redraw the noise
    res = run_script("dp_mepf.py", _mepf_args(fashion_data_dir, resumed, "--learning_rate", "0.1"))
    assert res.returncode == 2 and "other flags" in res.stderr
    res = run_script("dp_mepf.py", _mepf_args(fashion_data_dir, resumed))
    assert res.returncode == 0 and "Resumed" in res.stdout, res.stderr[-3000:]
    from PIL import Image

    for line in open(os.path.join(straight, "metadata.jsonl")):
        name = json.loads(line)["file_name"]
        a, b = (np.asarray(Image.open(os.path.join(d, name))) for d in (straight, resumed))
        assert a.shape == (28, 28) and (a == b).all(), name

    res = run_script("dp_mepf.py", _mepf_args(fashion_data_dir, straight))
    assert res.returncode == 2 and "already holds a finished DP-MEPF release" in res.stderr
    res = run_script("evaluate.py", ["--synthetic_dir", straight, "--train_data_dir", fashion_data_dir,
                                     "--class_prompts", "fashion_mnist", "--skip_fid", "--epochs", "1",
                                     "--classifier_depth", "10", "--classifier_width", "1", "--skip_real_reference",
                                     "--output_dir", str(tmp_path / "eval")])
    assert res.returncode == 0, res.stderr[-3000:]
    assert 0 <= json.load(open(tmp_path / "eval" / "metrics.json"))["accuracy_wrn"] <= 1
