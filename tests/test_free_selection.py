"""--lora_target warmup_select: the mask comes from DP-SGD's own noisy gradients (post-processing), the run's ε is
that of its T DP-SGD steps alone, the mask is refused elsewhere, and a resume across the selection step is exact."""

import json
import os

import pytest
import torch

from dp_sapf import privacy, saliency
from helpers import lora_tensors, run_script, train_args
from test_privacy import dp_accounting_rdp_epsilon

FREE = ["--lora_target", "warmup_select", "--warmup_select_steps", "2", "--target_epsilon", "8"]


def test_scores_read_only_the_noisy_gradients():
    """Two worlds with different clean gradient sums but the same noisy sums (the noise differs by exactly the
    difference) give the same scores: the score is a function of the released noisy gradients alone."""
    named = {"a.to_q.lora_A.default.weight": torch.zeros(2, 3), "a.to_q.lora_B.default.weight": torch.zeros(3, 2),
             "b.to_k.lora_A.default.weight": torch.zeros(2, 3), "b.to_k.lora_B.default.weight": torch.zeros(3, 2)}
    g = torch.Generator().manual_seed(0)
    clean = {k: torch.randn(v.shape, generator=g) for k, v in named.items()}
    other_clean = {k: torch.randn(v.shape, generator=g) for k, v in named.items()}
    noise = {k: 0.3 * torch.randn(v.shape, generator=g) for k, v in named.items()}
    worlds = []
    for sums, extra_noise in ((clean, noise), (other_clean, {k: clean[k] + noise[k] - other_clean[k] for k in named})):
        scorer = saliency.NoisyGradientScores(named)
        for k, p in named.items():
            p.grad = (sums[k] + extra_noise[k]) / 4
        scorer.add_step(noise_std=0.3 / 4)
        worlds.append(scorer.scores)
    assert worlds[0] == worlds[1]
    # the noise's expected share is taken off: d·(σC/B)² per tensor
    d = sum(p.numel() for k, p in named.items() if k.startswith("a."))
    raw = sum(float(p.grad.pow(2).sum()) for k, p in named.items() if k.startswith("a."))
    assert worlds[0]["a.to_q"] == pytest.approx(raw - d * (0.3 / 4) ** 2)


def test_warmup_selection_run_costs_only_its_training_steps(tiny_pipeline_dir, fashion_data_dir, tmp_path):
    full, resumed, late = (str(tmp_path / name) for name in ("full", "resumed", "late"))
    reset = FREE + ["--warmup_dropped", "reset"]
    res = run_script("train_dp_sapf.py", train_args(tiny_pipeline_dir, fashion_data_dir, full, *reset))
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.load(open(os.path.join(full, "privacy_report.json")))
    mask = saliency.read_mask(os.path.join(full, "saliency_mask.json"))
    # ε = T Poisson-subsampled Gaussian steps at one (q, σ), nothing for the selection (dp-accounting's RDP)
    assert report["selection_mechanism"] is None and report["budget_split"]["epsilon_selection_only"] == 0
    theirs = dp_accounting_rdp_epsilon(report["noise_multiplier"], report["sample_rate"], 4, report["delta"], None)
    assert report["epsilon"] == pytest.approx(theirs, rel=1e-6) and report["epsilon"] <= 8
    assert mask["privacy"]["mechanism"] == "dp_sgd_postprocessing" and mask["privacy"]["warmup_steps"] == 2
    assert mask["num_selected"] == saliency.num_selected(0.3, len(mask["candidates"]))
    assert report["mask"]["target_modules"] == mask["target_modules"]
    # reset: the release adapts the kept matrices only
    modules = {k.split(".lora")[0].removeprefix("unet.") for k in lora_tensors(full)}
    assert modules == set(mask["target_modules"])
    # the mask is free only inside its own run: another run refuses it (its cost would be unaccounted)
    with pytest.raises(ValueError, match="warmup_select"):
        privacy.SelectionCost.from_mask(mask)
    res = run_script("train_dp_sapf.py", train_args(tiny_pipeline_dir, fashion_data_dir, str(tmp_path / "reuse"),
                                                    "--saliency_mask", os.path.join(full, "saliency_mask.json"),
                                                    "--target_epsilon", "8"))
    assert res.returncode != 0 and "warmup_select" in res.stderr
    # stopped before the selection step (after step 1) or after it (after step 3): resuming gives the same run
    for folder, stop in ((resumed, "1"), (late, "3")):
        res = run_script("train_dp_sapf.py", train_args(tiny_pipeline_dir, fashion_data_dir, folder, *reset,
                                                        "--stop_after_steps", stop))
        assert res.returncode == 0 and f"Stopped after step {stop}" in res.stdout, res.stderr[-3000:]
        res = run_script("train_dp_sapf.py", train_args(tiny_pipeline_dir, fashion_data_dir, folder, *reset,
                                                        "--resume_from_checkpoint", "latest", "--dp_seed", "999"))
        assert res.returncode == 0, res.stderr[-3000:]
        assert saliency.read_mask(os.path.join(folder, "saliency_mask.json"))["target_modules"] == mask["target_modules"]
        a, b = lora_tensors(full), lora_tensors(folder)
        assert set(a) == set(b)
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-6), (stop, k)


def test_frozen_warmup_keeps_the_dropped_adapters_at_their_warmup_value(tiny_pipeline_dir, fashion_data_dir, tmp_path):
    """--warmup_dropped frozen (the default): the release adapts every candidate; a dropped matrix's LoRA is exactly
    its value after step W (nonzero: it was trained W steps), a kept one trained on; a resume across W is exact."""
    from safetensors.torch import load_file

    frozen = FREE
    full, stopped = str(tmp_path / "full"), str(tmp_path / "stopped")
    res = run_script("train_dp_sapf.py", train_args(tiny_pipeline_dir, fashion_data_dir, full, *frozen))
    assert res.returncode == 0, res.stderr[-3000:]
    mask = saliency.read_mask(os.path.join(full, "saliency_mask.json"))
    assert mask["privacy"]["dropped_lora"] == "frozen"
    kept = set(mask["target_modules"])
    released = {k.removeprefix("unet."): v for k, v in lora_tensors(full).items()}
    assert {k.split(".lora", 1)[0] for k in released} == set(mask["candidates"])
    # the same run stopped right after the selection step: its checkpoint holds every adapter at step W
    res = run_script("train_dp_sapf.py", train_args(tiny_pipeline_dir, fashion_data_dir, stopped, *frozen,
                                                    "--stop_after_steps", "2"))
    assert res.returncode == 0 and "Stopped after step 2" in res.stdout, res.stderr[-3000:]
    at_w = load_file(os.path.join(stopped, "checkpoint-2", "trainable.safetensors"))
    assert {k.split(".lora_", 1)[0] for k in at_w} == set(mask["candidates"])

    def factor(key):  # peft's lora_A/lora_B and diffusers' names of the same tensor
        return "A" if ".lora_A." in key or ".lora.down." in key else "B"

    for key, value in at_w.items():
        module = key.split(".lora_", 1)[0]
        (out,) = [v for k, v in released.items() if k.split(".lora", 1)[0] == module and factor(k) == factor(key)]
        if module in kept:
            assert not torch.equal(out, value), key  # trained for T - W more steps
        else:
            assert torch.equal(out, value), key
            assert factor(key) == "A" or value.abs().sum() > 0  # lora_B left zero by W steps would prove nothing
    res = run_script("train_dp_sapf.py", train_args(tiny_pipeline_dir, fashion_data_dir, stopped, *frozen,
                                                    "--resume_from_checkpoint", "latest", "--dp_seed", "999"))
    assert res.returncode == 0, res.stderr[-3000:]
    resumed = {k.removeprefix("unet."): v for k, v in lora_tensors(stopped).items()}
    assert set(resumed) == set(released)
    for k in released:
        assert torch.allclose(released[k], resumed[k], atol=1e-6), k
