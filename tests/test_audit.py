"""The empirical audit drives the training step the script runs, and has teeth: injected bugs push ε_lower
above the claim (finding 1 of issue #11 included); the real code stays below."""

import pytest

from dp_sapf import audit

TRIALS = 120


def test_clopper_pearson_brackets_the_rate():
    lo, hi = audit.clopper_pearson(30, 100, 0.05)
    assert lo < 0.3 < hi and hi - lo < 0.2
    assert audit.clopper_pearson(0, 50, 0.05)[0] == 0.0 and audit.clopper_pearson(50, 50, 0.05)[1] == 1.0


def test_gaussian_dp_epsilon_matches_the_known_values():
    # μ = 1 at δ = 1e-5: ε ≈ 4.38 (below the RDP bound 4.75 of σ = 1); monotone in μ
    assert audit.gaussian_dp_epsilon(1.0, 1e-5) == pytest.approx(4.38, abs=0.03)
    assert audit.gaussian_dp_epsilon(0.5, 1e-5) < audit.gaussian_dp_epsilon(1.0, 1e-5)
    assert audit.gaussian_dp_epsilon(0.0, 1e-5) == 0.0


@pytest.mark.parametrize("canary", ["gradient", "input"])
def test_real_code_stays_below_the_claim(tiny_pipeline_dir, canary):
    result = audit.run_audit(tiny_pipeline_dir, trials=TRIALS, noise_multiplier=2.0, canary=canary, progress=False)
    assert result["epsilon_lower"] <= result["epsilon_claimed"]
    assert result.get("epsilon_lower_gdp", 0) <= result["epsilon_claimed"]
    assert result["engine"] == "LinearPerSampleHooks"  # what the training script picks in eager mode


def test_gradient_canary_with_poisson_sampling_runs_the_real_sampler(tiny_pipeline_dir):
    result = audit.run_audit(tiny_pipeline_dir, trials=30, noise_multiplier=2.0, sample_rate=0.5, progress=False)
    assert result["expected_batch_size"] == 4 and "epsilon_lower_gdp" not in result
    assert result["epsilon_lower"] <= result["epsilon_claimed"]


@pytest.mark.parametrize("bug, canary", [("no_clipping", "gradient"), ("noise_div10", "gradient"),
                                         ("public_draws", "input")])
def test_injected_bugs_are_caught(tiny_pipeline_dir, bug, canary):
    # public draws: 32 other images, each clipped (C small), each moved onto another image's draw by the canary;
    # the shift is ~8 C, so σ = 3 with 100 held-out trials per world leaves a clear margin over the claim
    extra = dict(batch_size=32, max_grad_norm=1e-3, noise_multiplier=3.0) if bug == "public_draws" else \
        dict(noise_multiplier=2.0)
    trials = 200 if bug == "public_draws" else TRIALS
    with audit.injected_bug(bug):
        result = audit.run_audit(tiny_pipeline_dir, trials=trials, canary=canary, progress=False, **extra)
    assert result["epsilon_lower"] > result["epsilon_claimed"], result["epsilon_lower"]
    # and the patch is gone afterwards: the real code is audited again
    again = audit.run_audit(tiny_pipeline_dir, trials=40, canary=canary, progress=False, **extra)
    assert again["epsilon_lower"] <= result["epsilon_claimed"]
