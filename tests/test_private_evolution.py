"""Private Evolution: its accounting against dp-accounting, the votes, the sensitivity of the histogram, and the
script end to end (resumable per iteration, its output scored by evaluate.py unchanged)."""

import json
import os

import numpy as np
import pytest
import torch

from dp_sapf import privacy
from dp_sapf import private_evolution as pe
from helpers import run_script


def _ledger(n, iterations, **kw):
    return privacy.PrivacyLedger.plan(dataset_size=n, expected_batch_size=n, steps=iterations, max_grad_norm=1.0, **kw)


@pytest.mark.parametrize("sigma,iterations", [(5.0, 5), (20.0, 10), (60.0, 3)])
def test_pe_epsilon_equals_dp_accounting(sigma, iterations):
    """T histograms of sensitivity 1 with noise σ = T Gaussian mechanisms, no subsampling (dp-accounting's own
    GaussianDpEvent, not our Poisson-wrapped training event)."""
    from dp_accounting import dp_event
    from dp_accounting.pld import PLDAccountant
    from dp_accounting.rdp import RdpAccountant

    n = 60000
    delta = 1 / n
    event = dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(sigma), iterations)
    rdp = RdpAccountant(orders=list(privacy.RDP_ORDERS))
    rdp.compose(event)
    ledger = _ledger(n, iterations, noise_multiplier=sigma)
    assert ledger.spent(iterations).epsilon == pytest.approx(rdp.get_epsilon(delta), rel=1e-9)
    pld = PLDAccountant()
    pld.compose(event)
    ours = _ledger(n, iterations, noise_multiplier=sigma, accountant="pld").spent(iterations).epsilon
    assert ours == pytest.approx(pld.get_epsilon(delta), rel=1e-4)  # PLD discretisation


@pytest.mark.parametrize("target", [1.0, 10.0])
def test_pe_calibration_meets_the_target_tightly(target):
    from dp_accounting import dp_event
    from dp_accounting.rdp import RdpAccountant

    n, iterations = 60000, 5
    sigma = _ledger(n, iterations, target_epsilon=target).noise_multiplier

    def eps(s):
        acc = RdpAccountant(orders=list(privacy.RDP_ORDERS))
        acc.compose(dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(s), iterations))
        return acc.get_epsilon(1 / n)

    assert eps(sigma) <= target * (1 + 1e-9) < eps(sigma * 0.999)


def test_votes_are_the_nearest_neighbour_counts():
    rng = np.random.default_rng(0)
    private, labels = rng.normal(size=(300, 7)), rng.integers(0, 3, 300)
    synthetic, syn_labels = rng.normal(size=(12, 7)), np.repeat(np.arange(3), 4)
    votes = pe.nearest_votes(private, labels, synthetic, syn_labels, chunk=50)
    naive = np.zeros(12, dtype=int)
    for x, c in zip(private, labels):
        mine = np.flatnonzero(syn_labels == c)
        naive[mine[np.argmin(((synthetic[mine] - x) ** 2).sum(1))]] += 1
    assert (votes == naive).all() and votes.sum() == 300
    # σ = 0 and one synthetic image per class: every image votes for its class's only one
    one = pe.nearest_votes(private, labels, synthetic[:3], np.arange(3))
    assert (one == np.bincount(labels, minlength=3)).all()
    assert (pe.noisy_histogram(one, 0.0, torch.Generator().manual_seed(0)) == one).all()


def test_one_added_image_moves_one_bin_by_one():
    rng = np.random.default_rng(1)
    synthetic, syn_labels = rng.normal(size=(40, 5)), np.repeat(np.arange(4), 10)
    for trial in range(20):
        private, labels = rng.normal(size=(200, 5)), rng.integers(0, 4, 200)
        extra, extra_label = rng.normal(size=(1, 5)), rng.integers(0, 4, 1)
        base = pe.nearest_votes(private, labels, synthetic, syn_labels)
        added = pe.nearest_votes(np.concatenate([extra, private]), np.concatenate([extra_label, labels]),
                                 synthetic, syn_labels)  # inserted at position 0: nothing else may move
        diff = added - base
        assert np.abs(diff).sum() == 1 and diff.max() == 1
        assert syn_labels[np.argmax(diff)] == extra_label[0]


def test_resample_follows_the_thresholded_counts():
    noisy = np.array([0.5, 9.0, 1.0, 0.0, 3.0, 1.9])
    labels = np.array([0, 0, 0, 1, 1, 1])
    picks = pe.resample(noisy, labels, [4000, 4000], threshold=2.0, generator=torch.Generator().manual_seed(0))
    assert set(picks[:4000]) == {1} and set(picks[4000:]) == {4}
    # nothing above H in a class: uniform over the class
    picks = pe.resample(np.array([0.0, 0.1, 5.0, 5.0]), np.array([0, 0, 1, 1]), [4000, 10], threshold=1.0,
                        generator=torch.Generator().manual_seed(0))
    assert abs((picks[:4000] == 0).mean() - 0.5) < 0.05
    assert pe.strength_schedule(3, 0.8, 0.4) == pytest.approx([0.8, 0.6, 0.4])


def _pe_args(model, data_dir, out, *extra):
    return ["--pretrained_model_name_or_path", model, "--train_data_dir", data_dir, "--class_prompts", "fashion_mnist",
            "--num_images_per_class", "2", "--iterations", "2", "--embedding", "pixels", "--num_inference_steps", "4",
            "--batch_size", "10", "--target_epsilon", "5", "--dp_seed", "11", "--output_dir", out, *extra]


def test_script_resumes_per_iteration_and_evaluate_reads_its_output(tiny_pipeline_dir, fashion_data_dir, tmp_path):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    res = run_script("private_evolution.py", _pe_args(tiny_pipeline_dir, fashion_data_dir, straight))
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.load(open(os.path.join(straight, "privacy_report.json")))
    assert report["private"] and report["method"] == "pe" and report["steps"] == 2
    assert report["epsilon"] <= 5 * (1 + 1e-6) and report["dataset_size"] == 40 and report["delta"] == 1 / 40
    assert not os.path.exists(os.path.join(straight, "pe_state"))  # the secret seed does not outlive the run
    assert len(open(os.path.join(straight, "metadata.jsonl")).readlines()) == 20

    res = run_script("private_evolution.py", _pe_args(tiny_pipeline_dir, fashion_data_dir, resumed,
                                                      "--stop_after_iterations", "1"))
    assert res.returncode == 0 and "Stopped after iteration 1" in res.stdout, res.stderr[-3000:]
    state = os.path.join(resumed, "pe_state", "state.npz")
    with np.load(state) as saved:
        assert json.loads(str(saved["state"]))["iteration"] == 1 and os.stat(state).st_mode & 0o077 == 0
    assert os.listdir(os.path.join(resumed, "pe_state")) == ["state.npz"]  # one record: population + iteration
    res = run_script("private_evolution.py", _pe_args(tiny_pipeline_dir, fashion_data_dir, resumed))
    assert res.returncode == 0 and "Resumed" in res.stdout, res.stderr[-3000:]
    from PIL import Image

    for line in open(os.path.join(straight, "metadata.jsonl")):
        name = json.loads(line)["file_name"]
        a, b = (np.asarray(Image.open(os.path.join(d, name))) for d in (straight, resumed))
        assert a.shape == (28, 28, 3) and (a == b).all(), name

    # a finished release is never overwritten; evaluate.py scores it unchanged
    res = run_script("private_evolution.py", _pe_args(tiny_pipeline_dir, fashion_data_dir, straight))
    assert res.returncode == 2 and "already holds a finished PE release" in res.stderr
    res = run_script("evaluate.py", ["--synthetic_dir", straight, "--train_data_dir", fashion_data_dir,
                                     "--class_prompts", "fashion_mnist", "--skip_fid", "--epochs", "1",
                                     "--classifier_depth", "10", "--classifier_width", "1", "--skip_real_reference",
                                     "--output_dir", str(tmp_path / "eval")])
    assert res.returncode == 0, res.stderr[-3000:]
    assert 0 <= json.load(open(tmp_path / "eval" / "metrics.json"))["accuracy_wrn"] <= 1


def _population(seed, n=4):
    rng = np.random.default_rng(seed)
    from PIL import Image

    return [Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.mark.parametrize("crash_at", ["savez", "fsync", "replace"])
def test_a_kill_while_saving_never_pairs_a_population_with_another_iteration(tmp_path, monkeypatch, crash_at):
    """Issue: the old state was two files (population renamed into place, then state.json); a kill between them left
    iteration t's population under a record of t - 1, and the resume reused iteration t's noise on another vote
    vector. Now both are one file: a kill at any write leaves the previous (population, iteration) pair intact."""
    import private_evolution as cli

    out, recipe, labels = str(tmp_path / "pe"), {"iterations": 3}, np.arange(4) % 2
    first = _population(1)
    cli.save_state(out, {"recipe": recipe, "iteration": 1, "dp_seed": 5, "history": []}, first, labels)
    target = {"savez": (np, "savez"), "fsync": (os, "fsync"), "replace": (os, "replace")}[crash_at]
    real = getattr(*target)

    def killed(*args, **kwargs):
        if crash_at == "savez":  # part of the file is written, then the process dies
            args[0].write(b"partial")
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(*target, killed)
    with pytest.raises(KeyboardInterrupt):
        cli.save_state(out, {"recipe": recipe, "iteration": 2, "dp_seed": 5, "history": [{}]}, _population(2), labels)
    monkeypatch.setattr(*target, real)
    state, population, saved_labels = cli.load_state(out, recipe)
    assert state["iteration"] == 1
    assert all((np.asarray(a) == np.asarray(b.convert("RGB"))).all() for a, b in zip(population, first))
    assert (saved_labels == labels).all()
    assert os.listdir(os.path.join(out, "pe_state")) == ["state.npz"]  # no temporary file is left behind


def test_an_old_two_file_state_is_not_resumed(tmp_path):
    import private_evolution as cli

    os.makedirs(tmp_path / "pe" / "pe_state")
    (tmp_path / "pe" / "pe_state" / "state.json").write_text('{"iteration": 1}')
    with pytest.raises(ValueError, match="old two-file format"):
        cli.load_state(str(tmp_path / "pe"), {})


def test_the_secret_state_is_gone_before_the_release_says_complete(tiny_pipeline_dir, fashion_data_dir, tmp_path,
                                                                    monkeypatch, capsys):
    import private_evolution as cli
    from dp_sapf import run_folder

    out, seen = str(tmp_path / "pe"), []
    real = run_folder.write_status

    def recording(folder, status, **kw):
        seen.append((status, os.path.isdir(os.path.join(folder, "pe_state"))))
        return real(folder, status, **kw)

    monkeypatch.setattr(run_folder, "write_status", recording)
    cli.main(_pe_args(tiny_pipeline_dir, fashion_data_dir, out, "--iterations", "1"))
    assert seen[-1] == ("complete", False)
    # a finished folder that still holds a secret state (an older version's crash) is cleaned by a rerun
    os.makedirs(os.path.join(out, "pe_state"))
    with pytest.raises(ValueError, match="already holds a finished PE release"):
        cli.main(_pe_args(tiny_pipeline_dir, fashion_data_dir, out, "--iterations", "1"))
    assert not os.path.exists(os.path.join(out, "pe_state")) and "leftover" in capsys.readouterr().err
