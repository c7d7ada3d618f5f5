"""The empirical audit has teeth: injected bugs push ε_lower above the claim; the real code does not."""

import pytest

from dp_sapf import audit
from dp_sapf.per_sample import ClippedGradientSum

TRIALS = 120


def test_clopper_pearson_brackets_the_rate():
    lo, hi = audit.clopper_pearson(30, 100, 0.05)
    assert lo < 0.3 < hi and hi - lo < 0.2
    assert audit.clopper_pearson(0, 50, 0.05)[0] == 0.0 and audit.clopper_pearson(50, 50, 0.05)[1] == 1.0


def test_real_code_stays_below_the_claim(tiny_pipeline_dir):
    result = audit.run_audit(tiny_pipeline_dir, trials=TRIALS, noise_multiplier=3.0, progress=False)
    assert result["epsilon_lower"] <= result["epsilon_claimed"]


def test_clipping_off_is_caught(tiny_pipeline_dir, monkeypatch):
    real_add = ClippedGradientSum.add

    def add_without_clipping(self, grad_samples):
        saved, self.max_grad_norm = self.max_grad_norm, 1e12
        try:
            return real_add(self, grad_samples)
        finally:
            self.max_grad_norm = saved  # the noise is still scaled to the claimed C

    monkeypatch.setattr(ClippedGradientSum, "add", add_without_clipping)
    result = audit.run_audit(tiny_pipeline_dir, trials=TRIALS, noise_multiplier=3.0, progress=False)
    assert result["epsilon_lower"] > result["epsilon_claimed"]


def test_too_little_noise_is_caught(tiny_pipeline_dir, monkeypatch):
    real_noisy = ClippedGradientSum.noisy_sums
    monkeypatch.setattr(ClippedGradientSum, "noisy_sums", lambda self, sigma, gen: real_noisy(self, sigma / 10, gen))
    result = audit.run_audit(tiny_pipeline_dir, trials=TRIALS, noise_multiplier=3.0, progress=False)
    assert result["epsilon_lower"] > result["epsilon_claimed"]
