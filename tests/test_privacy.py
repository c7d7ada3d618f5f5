"""Accounting: cross-checked against google's dp-accounting, calibration, refusals, ledger, CLI."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from dp_sapf import privacy
from dp_sapf.privacy import PrivacyBudgetError, PrivacyLedger, SelectionCost

PAPER_N = [45000, 97477, 162770, 302436]


def dp_accounting_rdp_epsilon(sigma, q, steps, delta, sigma_s):
    """The same composition through dp-accounting's RdpAccountant (independent implementation), same orders."""
    from dp_accounting import dp_event
    from dp_accounting.rdp import RdpAccountant

    events = [dp_event.GaussianDpEvent(sigma_s)] if sigma_s else []
    events.append(dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps))
    acc = RdpAccountant(orders=list(privacy.RDP_ORDERS))
    acc.compose(dp_event.ComposedDpEvent(events))
    return acc.get_epsilon(delta)


GRID = [(n, 4096, 1000, 5.0) for n in PAPER_N] + [(200, 50, 10, 5.0), (1000, 10, 300, None), (5000, 5000, 3, 2.0)]


@pytest.mark.parametrize("n, batch, steps, sigma_s", GRID)
@pytest.mark.parametrize("sigma", [0.8, 2.0, 9.0])
def test_rdp_epsilon_equals_dp_accounting(n, batch, steps, sigma_s, sigma):
    q, delta = batch / n, 1 / n
    selection = SelectionCost(sigma_s) if sigma_s else None
    ours = privacy.compute_epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta, selection=selection)
    theirs = dp_accounting_rdp_epsilon(sigma, q, steps, delta, sigma_s)
    assert ours.epsilon == pytest.approx(theirs, rel=1e-6)


@pytest.mark.parametrize("n", PAPER_N)
@pytest.mark.parametrize("target", [1.0, 10.0])
def test_calibrated_sigma_meets_target_in_both_accountants(n, target):
    q, delta, sel = 4096 / n, 1 / n, SelectionCost(5.0)
    sigma = privacy.calibrate_noise_multiplier(target_epsilon=target, delta=delta, sample_rate=q, steps=1000,
                                               selection=sel)
    eps = privacy.compute_epsilon(noise_multiplier=sigma, sample_rate=q, steps=1000, delta=delta, selection=sel)
    assert eps.epsilon <= target
    assert dp_accounting_rdp_epsilon(sigma, q, 1000, delta, 5.0) <= target * (1 + 1e-6)
    less = privacy.compute_epsilon(noise_multiplier=0.99 * sigma, sample_rate=q, steps=1000, delta=delta, selection=sel)
    assert less.epsilon > target
    # numerical accountants are tighter, never looser, than RDP
    for acc in ("pld", "prv"):
        tight = privacy.compute_epsilon(noise_multiplier=sigma, sample_rate=q, steps=1000, delta=delta, selection=sel,
                                        accountant=acc)
        assert tight.epsilon <= eps.epsilon * 1.001
    # the split is reported, and at ε = 1 with σ_s = 5 the selection takes a large share (docs/design.md §1)
    assert 0 < eps.selection_share < 1
    if target == 1.0:
        assert eps.selection_share > 0.3


def test_selection_alone_is_the_gaussian_mechanism():
    from dp_accounting import dp_event
    from dp_accounting.rdp import RdpAccountant

    for sigma_s in (1.0, 5.0, 20.0):
        ours = privacy.compute_epsilon(noise_multiplier=1.0, sample_rate=0.1, steps=0, delta=1e-5,
                                       selection=SelectionCost(sigma_s))
        acc = RdpAccountant(orders=list(privacy.RDP_ORDERS))
        acc.compose(dp_event.GaussianDpEvent(sigma_s))
        assert ours.epsilon == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
        orders = np.asarray(privacy.RDP_ORDERS)
        closed = min(a / (2 * sigma_s ** 2) + math.log((a - 1) / a) - (math.log(1e-5) + math.log(a)) / (a - 1)
                     for a in orders)
        assert ours.epsilon == pytest.approx(closed, rel=1e-9)


def test_free_and_infinite_selection():
    kw = dict(noise_multiplier=1.0, sample_rate=0.01, steps=100, delta=1e-5)
    none = privacy.compute_epsilon(**kw)
    free = privacy.compute_epsilon(**kw, selection=SelectionCost(None))
    assert free.epsilon == none.epsilon and free.selection_share == 0
    assert math.isinf(privacy.compute_epsilon(**kw, selection=SelectionCost(0.0)).epsilon)
    assert math.isinf(privacy.compute_epsilon(**{**kw, "noise_multiplier": 0.0}).epsilon)


def test_unreachable_target_is_refused_with_the_selection_cost():
    with pytest.raises(PrivacyBudgetError, match=r"selection alone spends ε = \d"):
        privacy.calibrate_noise_multiplier(target_epsilon=0.5, delta=1e-5, sample_rate=0.01, steps=100,
                                           selection=SelectionCost(1.0))
    assert privacy.calibrate_noise_multiplier(target_epsilon=math.inf, delta=1e-5, sample_rate=0.1, steps=10) == 0.0


def test_delta_above_one_over_n_warns():
    with pytest.warns(UserWarning, match="exceeds 1/N"):
        privacy.warn_if_delta_too_large(1e-3, 10_000)


def test_ledger_round_trip_and_resume_checks():
    ledger = PrivacyLedger(noise_multiplier=1.1, sample_rate=0.1, max_grad_norm=1.0, delta=1e-5, accountant="rdp",
                           steps_done=3, total_steps=10, selection=SelectionCost(5.0, max_grad_norm=1.0,
                                                                                 scorer="grad_norm", dataset_size=100))
    again = PrivacyLedger.from_state_dict(json.loads(json.dumps(ledger.state_dict())))
    assert again == ledger and again.epsilon_spent() < again.epsilon_final()
    again.check_compatible(ledger)
    changed = PrivacyLedger.from_state_dict({**ledger.state_dict(), "noise_multiplier": 1.0})
    with pytest.raises(ValueError, match="noise_multiplier"):
        ledger.check_compatible(changed)


def test_cli_prints_json():
    res = subprocess.run([sys.executable, "-m", "dp_sapf.privacy", "--dataset_size", "45000", "--target_epsilon", "10",
                          "--selection_noise_multiplier", "5"], capture_output=True, text=True, check=True)
    out = json.loads(res.stdout)
    assert out["epsilon"] <= 10 and out["noise_multiplier"] > 0 and out["accountant"] == "rdp"
    assert out["delta"] == pytest.approx(1 / 45000)
    assert 0 < out["selection_share"] < 0.1 and out["epsilon_selection_only"] > 0
    bad = subprocess.run([sys.executable, "-m", "dp_sapf.privacy", "--dataset_size", "100", "--target_epsilon", "0.1",
                          "--selection_noise_multiplier", "1", "--train_batch_size", "10"], capture_output=True, text=True)
    assert bad.returncode == 2 and "selection alone" in bad.stderr


def test_ledger_plan_calibrates_and_reports_the_split():
    mask = {"scorer": "grad_norm", "privacy": {"mechanism": "gaussian", "noise_multiplier": 5.0, "max_grad_norm": 1.0,
                                               "dataset_size": 1000}}
    ledger = PrivacyLedger.plan(dataset_size=1000, expected_batch_size=100, steps=50, max_grad_norm=1.0,
                                target_epsilon=4.0, selection=SelectionCost.from_mask(mask))
    assert ledger.private and ledger.delta == pytest.approx(1e-3) and ledger.epsilon_final() <= 4.0
    report = ledger.report(dataset_size=1000)
    assert set(report) <= set(privacy.REPORT_FIELDS)
    assert report["selection_noise_multiplier"] == 5.0 and report["budget_split"]["epsilon_selection_only"] > 0
    free = SelectionCost.from_mask({"scorer": "random", "privacy": {"mechanism": "none"}})
    assert free.free and SelectionCost.from_mask(None) is None
    open_ended = PrivacyLedger.plan(dataset_size=1000, expected_batch_size=100, steps=50, max_grad_norm=1.0,
                                    target_epsilon=math.inf)
    # strict JSON has no infinity: a release without a finite ε reports null (and private: false)
    assert not open_ended.private and open_ended.report()["epsilon"] is None
    json.dumps(open_ended.report(), allow_nan=False)


@pytest.mark.parametrize("record, field", [
    ({"noise_multiplier": 5.0, "max_grad_norm": 1.0, "dataset_size": 40}, "privacy.mechanism"),  # no mechanism
    ({"mechanism": "gaussian", "max_grad_norm": 1.0, "dataset_size": 40}, "privacy.noise_multiplier"),
    ({"mechanism": "none"}, "privacy.mechanism"),  # a data-reading scorer claiming to be free
    ({"mechanism": "exponential", "epsilon": None, "num_picks": 3, "max_grad_norm": 1.0, "dataset_size": 40},
     "privacy.epsilon"),
    ({"mechanism": "ptr", "epsilon": 1.0, "max_grad_norm": 1.0, "dataset_size": 40}, "privacy.delta"),
])
def test_a_mask_without_its_full_cost_is_refused_not_free(record, field):
    """Issue #23 gap 3: the old reader took a grad_norm mask without noise_multiplier for a free selection."""
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        SelectionCost.from_mask({"scorer": "grad_norm", "privacy": record})


@pytest.mark.parametrize("text", ["nan", "0", "-1", "-inf", "ten"])
def test_bad_target_epsilon_is_refused(text):
    with pytest.raises(ValueError, match="--target_epsilon"):
        privacy.parse_target_epsilon(text)
    assert privacy.parse_target_epsilon("inf") == math.inf and privacy.parse_target_epsilon("1e999") == math.inf


@pytest.mark.parametrize("delta", [0.0, 1.0, 1.5, -0.1, math.nan])
def test_delta_outside_zero_one_is_refused(delta):
    with pytest.raises(ValueError, match=r"--target_delta must be in \(0, 1\)"):
        PrivacyLedger.plan(dataset_size=100, expected_batch_size=10, steps=5, max_grad_norm=1.0, target_epsilon=3,
                           delta=delta)


@pytest.mark.parametrize("args, message", [
    (["--target_delta", "1"], "--target_delta must be in (0, 1)"),
    (["--noise_multiplier", "0"], "--noise_multiplier must be a finite number > 0"),
    (["--target_epsilon", "nan"], "--target_epsilon must be > 0"),
])
def test_cli_refuses_bad_privacy_flags(args, message):
    base = ["--dataset_size", "1000", "--train_batch_size", "100", "--max_train_steps", "10"]
    if "--noise_multiplier" not in args and "--target_epsilon" not in args:
        base += ["--target_epsilon", "3"]
    res = subprocess.run([sys.executable, "-m", "dp_sapf.privacy", *base, *args], capture_output=True, text=True)
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("mechanism, field, value", [("exponential", "epsilon", 0), ("ptr", "epsilon", 0.0),
                                                     ("ptr", "delta", 0), ("ptr", "delta", 1.0),
                                                     ("gaussian", "max_grad_norm", 0), ("gaussian", "dataset_size", 0)])
def test_a_selection_cost_never_reads_as_zero(mechanism, field, value):
    """from_mask itself (not only the schema in front of it) refuses a cost figure that would read as free."""
    record = {"mechanism": mechanism, "max_grad_norm": 1.0, "dataset_size": 100, "noise_multiplier": 5.0,
              "epsilon": 1.0, "delta": 1e-3, "num_picks": 3}
    record[field] = value
    with pytest.raises(ValueError, match=f"privacy.{field}"):
        SelectionCost.from_mask({"scorer": "grad_norm", "privacy": record})


@pytest.mark.parametrize("sigma, sigma_s", [(1e-200, None), (1.0, 1e-200)])
def test_an_absurd_noise_multiplier_is_refused_not_reported_as_private(sigma, sigma_s):
    with pytest.raises(ValueError, match="no finite ε"):
        privacy.PrivacyLedger.plan(dataset_size=1000, expected_batch_size=100, steps=10, max_grad_norm=1.0,
                                   noise_multiplier=sigma, selection=SelectionCost(sigma_s) if sigma_s else None)


@pytest.mark.parametrize("rate", [0.01, 0.1, 0.5])
def test_subsampled_selection_equals_dp_accounting(rate):
    """select_salient.py --selection_sample_rate: the selection is one Poisson-subsampled Gaussian step, composed
    with training exactly as dp-accounting composes the same events; cheaper than the full query, and tighter
    (never looser) under the numerical accountants."""
    from dp_accounting import dp_event
    from dp_accounting.rdp import RdpAccountant

    n, q, steps, sigma = 60000, 1000 / 60000, 100, 0.6
    selection = SelectionCost(5.0, sample_rate=rate)
    ours = privacy.compute_epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=1 / n, selection=selection)
    acc = RdpAccountant(orders=list(privacy.RDP_ORDERS))
    acc.compose(dp_event.ComposedDpEvent([
        dp_event.PoissonSampledDpEvent(rate, dp_event.GaussianDpEvent(5.0)),
        dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)]))
    assert ours.epsilon == pytest.approx(acc.get_epsilon(1 / n), rel=1e-6)
    full = privacy.compute_epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=1 / n,
                                   selection=SelectionCost(5.0))
    assert ours.epsilon_selection_only < full.epsilon_selection_only and ours.epsilon < full.epsilon
    for accountant in ("pld", "prv"):
        tight = privacy.compute_epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=1 / n,
                                        selection=selection, accountant=accountant)
        assert tight.epsilon <= ours.epsilon * (1 + 1e-6)
    # the mask's record is what the ledger reads; a rate on another mechanism, or outside (0, 1], is refused
    record = {"mechanism": "gaussian", "noise_multiplier": 5.0, "max_grad_norm": 1.0, "dataset_size": n,
              "sample_rate": rate}
    assert SelectionCost.from_mask({"scorer": "grad_norm", "privacy": record}).sample_rate == rate
    for bad in (0, 1.5, "0.1", True):
        with pytest.raises(ValueError, match="sample_rate"):
            SelectionCost.from_mask({"scorer": "grad_norm", "privacy": {**record, "sample_rate": bad}})
    # a rate of 1 is the full query
    assert privacy.planned_selection("gaussian", noise_multiplier=5.0, epsilon=None, delta=None, num_picks=29,
                                     dataset_size=n, sample_rate=1.0) == SelectionCost(5.0)
