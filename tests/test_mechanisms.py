"""The paper's other selection mechanisms (exponential, PTR) and saliency metrics (snip, synflow), issue #15:
accounting against dp-accounting, each mechanism against its exact output distribution, sensitivities against
an added image, and the scripts' mask / report / card fields."""

import itertools
import json
import math
import os

import numpy as np
import pytest
import torch

from dp_sapf import modeling, privacy, saliency
from dp_sapf.privacy import PrivacyBudgetError, SelectionCost
from dp_sapf.seeding import seeded_generator

from helpers import run_module, run_script, select_args, train_args


def _reference_epsilon(events_before, sigma, q, steps, delta):
    """dp-accounting's RdpAccountant (an independent implementation) on the same orders."""
    from dp_accounting import dp_event
    from dp_accounting.rdp import RdpAccountant

    acc = RdpAccountant(orders=list(privacy.RDP_ORDERS))
    events = list(events_before) + [dp_event.SelfComposedDpEvent(
        dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)]
    acc.compose(dp_event.ComposedDpEvent(events))
    return acc.get_epsilon(delta)


EXPONENTIAL = SelectionCost(None, "exponential", epsilon=2.0, num_picks=29)
PTR = SelectionCost(None, "ptr", epsilon=1.0, delta=1e-6)


@pytest.mark.parametrize("n, batch, steps, sigma", [(45000, 4096, 1000, 1.7), (1000, 250, 40, 3.0), (200, 50, 10, 0.9)])
def test_exponential_rdp_equals_dp_accounting_zcdp_picks(n, batch, steps, sigma):
    """k picks, each (ε/k)-bounded-range hence (ε/k)²/8-zCDP, composed with training in RDP."""
    from dp_accounting import dp_event

    eps_s, k = EXPONENTIAL.epsilon, EXPONENTIAL.num_picks
    ours = privacy.compute_epsilon(noise_multiplier=sigma, sample_rate=batch / n, steps=steps, delta=1 / n,
                                   selection=EXPONENTIAL)
    theirs = _reference_epsilon([dp_event.SelfComposedDpEvent(dp_event.ZCDpEvent((eps_s / k) ** 2 / 8), k)],
                                sigma, batch / n, steps, 1 / n)
    assert ours.epsilon == pytest.approx(theirs, rel=1e-6)
    assert ours.epsilon_selection_only <= eps_s  # alone it is pure ε_s-DP too


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_ptr_adds_its_epsilon_and_takes_its_delta_from_training(accountant):
    n, steps, sigma = 45000, 1000, 1.7
    q, delta = 4096 / n, 1 / n
    ours = privacy.compute_epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta, selection=PTR,
                                   accountant=accountant)
    if accountant == "rdp":
        training = _reference_epsilon([], sigma, q, steps, delta - PTR.delta)
    else:
        from dp_accounting import dp_event
        from dp_accounting.pld import PLDAccountant

        acc = PLDAccountant()
        acc.compose(dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)),
                                                 steps))
        training = acc.get_epsilon(delta - PTR.delta)
    assert ours.epsilon == pytest.approx(PTR.epsilon + training, rel=1e-4)
    assert ours.epsilon_selection_only == PTR.epsilon
    assert ours.selection_share == pytest.approx(PTR.epsilon / ours.epsilon)


@pytest.mark.parametrize("selection", [EXPONENTIAL, PTR], ids=["exponential", "ptr"])
@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_calibration_meets_the_target_with_each_mechanism(selection, accountant):
    n, q, target = 45000, 4096 / 45000, 4.0
    sigma = privacy.calibrate_noise_multiplier(target_epsilon=target, delta=1 / n, sample_rate=q, steps=1000,
                                               selection=selection, accountant=accountant)

    def eps(s):
        return privacy.compute_epsilon(noise_multiplier=s, sample_rate=q, steps=1000, delta=1 / n,
                                       selection=selection, accountant=accountant).epsilon

    assert eps(sigma) <= target < eps(0.99 * sigma)


def test_selection_budgets_that_cannot_work_are_refused():
    with pytest.raises(PrivacyBudgetError, match="selection alone"):
        privacy.calibrate_noise_multiplier(target_epsilon=0.5, delta=1e-5, sample_rate=0.1, steps=100,
                                           selection=SelectionCost(None, "ptr", epsilon=1.0, delta=1e-7))
    with pytest.raises(PrivacyBudgetError, match="selection_delta"):
        privacy.compute_epsilon(noise_multiplier=1.0, sample_rate=0.1, steps=100, delta=1e-5,
                                selection=SelectionCost(None, "ptr", epsilon=1.0, delta=1e-5))
    for mechanism, eps, delta in [("exponential", None, None), ("ptr", float("inf"), 1e-6), ("ptr", 1.0, 1.5)]:
        with pytest.raises(ValueError):
            privacy.check_selection_budget(mechanism, eps, delta, 5)


def test_privacy_cli_plans_each_mechanism():
    for extra in (["--selection_mechanism", "exponential", "--selection_epsilon", "1", "--num_selected", "29"],
                  ["--selection_mechanism", "ptr", "--selection_epsilon", "1"]):
        out = run_module("dp_sapf.privacy", ["--dataset_size", "45000", "--target_epsilon", "10", *extra])
        assert out.returncode == 0, out.stderr
        plan = json.loads(out.stdout)
        assert plan["epsilon"] <= 10 and plan["selection"]["mechanism"] == extra[1]
    assert plan["selection"]["delta"] == pytest.approx(0.1 / 45000)  # PTR's default δ_s
    out = run_module("dp_sapf.privacy", ["--dataset_size", "100", "--train_batch_size", "10", "--target_epsilon", "1",
                                         "--selection_mechanism", "ptr", "--selection_epsilon", "2"])
    assert out.returncode == 2 and "selection alone" in out.stderr


# --- the exponential mechanism against its exact distribution ---------------------------------------------------

def _peeling_probabilities(scores, k, eta):
    """P[ordered picks] of k-fold peeling, each pick ∝ exp(η·u) among the units left (exact enumeration)."""
    probs = {}
    for picks in itertools.permutations(range(len(scores)), k):
        p, left = 1.0, list(range(len(scores)))
        for i in picks:
            weights = np.exp(eta * np.asarray([scores[j] for j in left]))
            p *= math.exp(eta * scores[i]) / weights.sum()
            left.remove(i)
        probs[picks] = p
    return probs


def test_gumbel_top_k_samples_the_peeling_exponential_mechanism():
    scores = {"a": 0.30, "b": 0.25, "c": 0.10, "d": 0.05, "e": 0.0}
    k, eps, sensitivity = 2, 3.0, 0.05
    exact = _peeling_probabilities(list(scores.values()), k, (eps / k) / (2 * sensitivity))
    g, draws = torch.Generator().manual_seed(0), 20000
    counts = {}
    for _ in range(draws):
        picks = tuple("abcde".index(u) for u in saliency.exponential_top_k(scores, k, sensitivity=sensitivity,
                                                                            epsilon=eps, generator=g))
        counts[picks] = counts.get(picks, 0) + 1
    for picks, p in exact.items():
        assert abs(counts.get(picks, 0) / draws - p) < 4 * math.sqrt(p * (1 - p) / draws) + 1e-3, picks


def test_exponential_privacy_loss_is_within_the_accounted_bounds():
    """Neighbours move each score by ≤ Δ: the exact log-ratio of any ordered output stays ≤ ε (pure DP) and the
    Rényi divergence ≤ α·ε²/(8k), the RDP the accountant charges."""
    rng = np.random.default_rng(0)
    k, eps, sensitivity = 2, 2.0, 0.1
    eta = (eps / k) / (2 * sensitivity)
    worst_ratio, worst_rdp_margin = 0.0, -np.inf
    for _ in range(30):
        u = rng.uniform(0, 0.5, size=5)
        v = u + sensitivity * rng.choice([-1.0, 1.0], size=5)  # an extreme neighbour
        p, q = _peeling_probabilities(u, k, eta), _peeling_probabilities(v, k, eta)
        logs = np.array([math.log(p[o] / q[o]) for o in p])
        worst_ratio = max(worst_ratio, np.abs(logs).max())
        pv = np.array([p[o] for o in p])
        qv = np.array([q[o] for o in p])
        for alpha in (2.0, 4.0, 16.0):
            renyi = math.log(np.sum(pv ** alpha * qv ** (1 - alpha))) / (alpha - 1)
            worst_rdp_margin = max(worst_rdp_margin, renyi - alpha * eps ** 2 / (8 * k))
    assert worst_ratio <= eps + 1e-9
    assert worst_rdp_margin <= 1e-12
    assert worst_ratio > 0.5 * eps  # the neighbours are close to the worst case: the check is not vacuous


def test_exponential_mechanism_at_huge_epsilon_is_the_exact_top_k():
    scores = {f"m{i}": s for i, s in enumerate([0.3, 0.1, 0.5, 0.2, 0.4])}
    picks = saliency.exponential_top_k(scores, 3, sensitivity=0.01, epsilon=1e9, generator=torch.Generator())
    assert picks == ["m2", "m4", "m0"]


# --- PTR -----------------------------------------------------------------------------------------------------------

def test_ptr_threshold_gives_delta_at_distance_one():
    from scipy.stats import laplace

    for eps, delta in [(1.0, 1e-5), (0.3, 1e-3), (4.0, 1e-6)]:
        t = saliency.ptr_threshold(eps, delta)
        assert laplace.sf(t - 1, scale=1 / eps) == pytest.approx(delta, rel=1e-9)


def test_ptr_release_rate_is_the_laplace_tail():
    """With δ large enough to count, a dataset at distance 1 passes at rate δ, one at distance 3 at e^{2ε}δ."""
    eps, delta, draws = 1.0, 0.05, 20000
    sensitivity = 0.01
    for gap, distance in [(0.019, 1), (0.059, 3)]:
        want = min(1.0, delta * math.exp((distance - 1) * eps))
        scores = {"a": 1.0, "b": 1.0 - gap, "c": 0.0}
        assert saliency.distance_to_instability(scores, 1, sensitivity) == distance
        g = torch.Generator().manual_seed(1)
        passed = sum(saliency.ptr_top_k(scores, 1, sensitivity=sensitivity, epsilon=eps, delta=delta,
                                        generator=g)[1]["passed"] for _ in range(draws))
        assert abs(passed / draws - want) < 4 * math.sqrt(want * (1 - want) / draws)


def test_distance_to_instability_is_a_lower_bound_with_sensitivity_one():
    """For random neighbours (every score moved by ≤ Δ): the bound moves by ≤ 1, and wherever the top k differs
    it is ≤ 1 on both sides (what PTR's (ε, δ) proof needs)."""
    rng = np.random.default_rng(0)
    k, sensitivity, changed = 3, 0.05, 0
    for _ in range(3000):
        u = rng.uniform(0, 1, size=8)
        v = u + rng.uniform(-sensitivity, sensitivity, size=8)
        su, sv = ({f"m{i}": float(x) for i, x in enumerate(w)} for w in (u, v))
        du, dv = (saliency.distance_to_instability(s, k, sensitivity) for s in (su, sv))
        assert abs(du - dv) <= 1
        if set(saliency.top_units(su, k)) != set(saliency.top_units(sv, k)):
            changed += 1
            assert du <= 1 and dv <= 1
    assert changed > 50


# --- scorers and sensitivities on the embedded model -----------------------------------------------------------------

@pytest.fixture(scope="module")
def parts(tiny_pipeline_dir):
    return modeling.load_pipeline_parts(tiny_pipeline_dir)


def _batch(parts, size, seed):
    g = torch.Generator().manual_seed(seed)
    cfg = parts.unet.config
    shape = (size, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    return (torch.randn(shape, generator=g), torch.randn(size, 77, cfg.cross_attention_dim, generator=g),
            torch.randn(shape, generator=g), torch.randint(0, 1000, (size,), generator=g))


@pytest.mark.parametrize("scorer, granularity", [("grad_norm", "matrix"), ("fisher", "layer"), ("snip", "matrix"),
                                                 ("snip", "layer")])
def test_one_added_image_moves_no_score_more_than_the_sensitivity(parts, scorer, granularity):
    modules = saliency.candidate_modules(parts.unet, "attention_qkv")
    loss = modeling.diffusion_loss_fn(parts.unet, parts.noise_scheduler)
    units = saliency.selection_units(list(modules), granularity)
    n, clip = 6, 0.05  # every image's gradient is clipped to C_s

    def scores(batches):
        sums = saliency.clipped_gradient_sums(loss, modules, batches, max_grad_norm=clip,
                                              track_squared_norms=scorer == "fisher")
        return saliency.unit_scores(saliency.exact_scores(sums, modules, scorer, n), units, scorer)

    base, extra = _batch(parts, 5, 0), _batch(parts, 1, 1)
    with_image = [tuple(torch.cat([a, b]) for a, b in zip(base, extra))]
    before, after = scores([base]), scores(with_image)
    bound = saliency.score_sensitivity(modules, units, scorer, clip, n)
    moved = max(abs(after[u] - before[u]) for u in units)
    assert moved <= bound / (1 + saliency.FLOAT_MARGIN) * (1 + 1e-5)  # the bound itself, without the margin
    assert moved > 0.05 * bound  # not vacuous


def test_snip_scores_are_theta_times_the_noisy_mean_gradient(parts):
    modules = saliency.candidate_modules(parts.unet, "attention_qkv")
    loss = modeling.diffusion_loss_fn(parts.unet, parts.noise_scheduler)
    batches = [_batch(parts, 3, 2)]
    sums = saliency.clipped_gradient_sums(loss, modules, batches, max_grad_norm=1.0)
    exact = saliency.exact_scores(sums, modules, "snip", 3)
    for name, s in zip(modules, sums.sums):
        assert exact[name] == pytest.approx(float((modules[name].weight * s).abs().sum() / 3), rel=1e-5)
    noiseless = saliency.select_salient(loss, modules, batches, dataset_size=3, scorer="snip", noise_multiplier=0.0,
                                        max_grad_norm=1.0, ratio=0.3, granularity="matrix",
                                        noise_generator=seeded_generator(0, "t"))
    assert noiseless.scores == pytest.approx(exact, rel=1e-5)


def test_synflow_is_the_conserved_path_flow_of_a_linear_chain():
    """For f(x) = W2·W1·x, SynFlow's R = 1ᵀ|W2||W1|1 and each layer's Σ θ ⊙ ∂R/∂θ equals R (its conservation law)."""
    torch.manual_seed(0)
    chain = torch.nn.Sequential(torch.nn.Linear(4, 3, bias=False), torch.nn.Linear(3, 2, bias=False))
    before = [p.detach().clone() for p in chain.parameters()]
    scores = saliency.synflow_scores(chain, {"0": chain[0], "1": chain[1]},
                                     lambda m: m(torch.ones(1, 4, dtype=torch.float64)))
    r = float(chain[1].weight.abs().sum(0) @ chain[0].weight.abs().sum(1))
    assert scores["0"] == pytest.approx(r) and scores["1"] == pytest.approx(r)
    assert all(torch.equal(a, b) for a, b in zip(before, chain.parameters()))  # the model is untouched


# --- the scripts -----------------------------------------------------------------------------------------------------

def test_synflow_reads_no_images_and_costs_nothing(tiny_pipeline_dir, tmp_path):
    masks = []
    for data_dir in ("/nonexistent/one", "/nonexistent/two"):
        out = str(tmp_path / f"mask{len(masks)}.json")
        proc = run_script("select_salient.py", select_args(tiny_pipeline_dir, data_dir, out, "--scorer", "synflow"))
        assert proc.returncode == 0, proc.stderr
        masks.append(json.load(open(out)))
    assert masks[0]["target_modules"] == masks[1]["target_modules"] and len(masks[0]["target_modules"]) == 20
    assert masks[0]["privacy"]["mechanism"] == "none" and masks[0]["privacy"]["dataset_size"] is None
    assert SelectionCost.from_mask(masks[0]).free


def test_exponential_and_ptr_masks_release_no_scores_and_train_composes_them(tiny_pipeline_dir, fashion_data_dir,
                                                                              tmp_path):
    exp_mask, ptr_mask = str(tmp_path / "exp.json"), str(tmp_path / "ptr.json")
    for out, extra in [(exp_mask, ["--selection_mechanism", "exponential", "--selection_epsilon", "1"]),
                       (ptr_mask, ["--selection_mechanism", "ptr", "--selection_epsilon", "1",
                                   "--selection_delta", "1e-3", "--granularity", "layer"])]:
        proc = run_script("select_salient.py", select_args(tiny_pipeline_dir, fashion_data_dir, out, *extra))
        assert proc.returncode == 0, proc.stderr
    exp, ptr = json.load(open(exp_mask)), json.load(open(ptr_mask))
    assert exp["scores"] == {} and len(exp["ranking"]) == 20 and set(exp["ranking"]) == set(exp["target_modules"])
    assert exp["privacy"]["mechanism"] == "exponential" and exp["privacy"]["num_picks"] == 20
    assert exp["privacy"]["score_sensitivity"] == pytest.approx(1.01 / 40)  # C_s/N with the 1% float margin
    assert ptr["scores"] == {} and ptr["privacy"]["delta"] == 1e-3 and ptr["privacy"]["ptr"]["passed"] is False
    assert "random one" in proc.stderr  # at N = 40 the top k is never stable: said, and the fallback is public

    out = str(tmp_path / "run")
    proc = run_script("train_dp_sapf.py", train_args(tiny_pipeline_dir, fashion_data_dir, out, "--saliency_mask",
                                                     ptr_mask, "--target_epsilon", "8", "--max_train_steps", "2"))
    assert proc.returncode == 0, proc.stderr
    report = json.load(open(os.path.join(out, "privacy_report.json")))
    assert report["selection_mechanism"] == "ptr" and report["epsilon"] <= 8
    assert report["budget_split"]["epsilon_selection_only"] == 1.0
    expected = privacy.compute_epsilon(noise_multiplier=report["noise_multiplier"], sample_rate=report["sample_rate"],
                                       steps=2, delta=report["delta"], selection=SelectionCost.from_mask(ptr))
    assert report["epsilon"] == pytest.approx(expected.epsilon)
    card = open(os.path.join(out, "README.md")).read()
    assert "propose-test-release, ε_s = 1.0, δ_s = 0.001" in card


@pytest.mark.parametrize("extra, message", [
    (["--selection_mechanism", "exponential"], "needs --selection_epsilon"),
    (["--selection_mechanism", "ptr", "--selection_epsilon", "1", "--selection_delta", "2"], "--selection_delta"),
    (["--scorer", "synflow", "--selection_mechanism", "exponential", "--selection_epsilon", "1"], "reads no data"),
    (["--selection_epsilon", "1"], "--selection_noise_multiplier"),
    (["--selection_mechanism", "exponential", "--selection_epsilon", "1", "--selection_delta", "1e-6"], "needs "
     "--selection_mechanism ptr"),
])
def test_mechanism_flags_fail_clearly(tiny_pipeline_dir, fashion_data_dir, tmp_path, extra, message):
    out = str(tmp_path / "mask.json")
    proc = run_script("select_salient.py", select_args(tiny_pipeline_dir, fashion_data_dir, out, *extra))
    assert proc.returncode == 2 and message in proc.stderr and not os.path.exists(out)


def test_exponential_selection_two_processes_match_one_process(tiny_pipeline_dir, fashion_data_dir, tmp_path):
    """The exact sums are reduced over processes (in float64) and the Gumbel draws come once from the shared secret
    seed: 2 processes pick what 1 process picks, in the same order. ε_s is large so the scores, not only the draws,
    decide the order."""
    from helpers import accelerate_two_processes

    one, two = str(tmp_path / "one.json"), str(tmp_path / "two.json")
    extra = ["--selection_mechanism", "exponential", "--selection_epsilon", "1000", "--selection_batch_size", "3",
             "--dp_seed", "11"]
    res = run_script("select_salient.py", select_args(tiny_pipeline_dir, fashion_data_dir, one, *extra))
    assert res.returncode == 0, res.stderr[-3000:]
    res = accelerate_two_processes("select_salient.py", select_args(tiny_pipeline_dir, fashion_data_dir, two, *extra),
                                   tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.load(open(one))["ranking"] == json.load(open(two))["ranking"]


@pytest.mark.parametrize("architecture", ["tiny-dit", "tiny-sd3"])
def test_synflow_and_the_exponential_mechanism_on_transformer_backbones(tiny_backbone_dirs, fashion_data_dir, tmp_path,
                                                                         architecture):
    """The same flags on a DiT (class labels) and an SD3 transformer (joint attention): SynFlow feeds each its own
    constant input, the exponential mechanism reads its candidates' exact scores."""
    model = tiny_backbone_dirs(architecture)
    for extra in (["--scorer", "synflow"], ["--selection_mechanism", "exponential", "--selection_epsilon", "2"]):
        out = str(tmp_path / f"{extra[1]}.json")
        proc = run_script("select_salient.py", select_args(model, fashion_data_dir, out, *extra))
        assert proc.returncode == 0, proc.stderr[-3000:]
        mask = json.load(open(out))
        assert mask["backbone"] == architecture.split("-")[1] and len(mask["target_modules"]) == 4
    assert mask["privacy"]["mechanism"] == "exponential" and len(mask["ranking"]) == 4
    synflow = json.load(open(tmp_path / "synflow.json"))
    assert all(math.isfinite(s) for s in synflow["scores"].values()) and len(set(synflow["scores"].values())) > 1
