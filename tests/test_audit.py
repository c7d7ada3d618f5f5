"""The empirical audit has teeth: injected bugs push ε_lower above the claim; the real code does not."""

import pytest

from dp_sapf import audit

TRIALS = 120


def test_clopper_pearson_brackets_the_rate():
    lo, hi = audit.clopper_pearson(30, 100, 0.05)
    assert lo < 0.3 < hi and hi - lo < 0.2
    assert audit.clopper_pearson(0, 50, 0.05)[0] == 0.0 and audit.clopper_pearson(50, 50, 0.05)[1] == 1.0


def test_real_code_stays_below_the_claim(tiny_pipeline_dir):
    result = audit.run_audit(tiny_pipeline_dir, trials=TRIALS, noise_multiplier=3.0, progress=False)
    assert result["epsilon_lower"] <= result["epsilon_claimed"]


@pytest.mark.parametrize("bug", ["no_clipping", "noise_div10"])
def test_injected_bugs_are_caught(tiny_pipeline_dir, bug):
    with audit.injected_bug(bug):
        result = audit.run_audit(tiny_pipeline_dir, trials=TRIALS, noise_multiplier=3.0, progress=False)
    assert result["epsilon_lower"] > result["epsilon_claimed"]
    # and the patch is gone afterwards: the real code is audited again
    assert audit.run_audit(tiny_pipeline_dir, trials=40, noise_multiplier=3.0, progress=False)["epsilon_lower"] <= \
        result["epsilon_claimed"]
