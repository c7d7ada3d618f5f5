"""The DP saliency query: exact clipping, noise scale, ranking, peft targets, CLI errors, 2 processes."""

import json
import math
import os

import pytest
import torch

from dp_sapf import modeling, privacy, saliency
from dp_sapf.seeding import seeded_generator

from helpers import accelerate_two_processes, run_script, select_args


def _batches(parts, sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = parts.unet.config
    out = []
    for b in sizes:
        shape = (b, cfg.in_channels, cfg.sample_size, cfg.sample_size)
        out.append((torch.randn(shape, generator=g), torch.randn(b, 77, cfg.cross_attention_dim, generator=g),
                    torch.randn(shape, generator=g), torch.randint(0, 1000, (b,), generator=g)))
    return out


def _reference_scores(parts, modules, batches, clip):
    """Non-private reference by brute force: batch-1 gradients, joint clip, mean, norm."""
    weights = [m.weight for m in modules.values()]
    for w in weights:
        w.requires_grad_(True)
    sums = [torch.zeros_like(w) for w in weights]
    n = 0
    for batch in batches:
        for i in range(batch[0].shape[0]):
            one = [t[i:i + 1] for t in batch]
            loss = modeling.per_sample_diffusion_loss(parts.unet, parts.noise_scheduler, *one).sum()
            grads = torch.autograd.grad(loss, weights)
            norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
            for s, g in zip(sums, grads):
                s += g * min(1.0, clip / (norm.item() + 1e-6))
            n += 1
    for w in weights:
        w.requires_grad_(False)
    return {name: float(s.norm() / n) for name, s in zip(modules, sums)}


@pytest.fixture()
def parts(tiny_pipeline_dir):
    return modeling.load_pipeline_parts(tiny_pipeline_dir)


def selection_loss(parts):
    return modeling.diffusion_loss_fn(parts.unet, parts.noise_scheduler)


def test_zero_noise_ranking_equals_non_private_ranking(parts):
    modules = saliency.candidate_modules(parts.unet, "attention_qkv")
    batches = _batches(parts, [3, 2])
    clip = 0.05  # small enough that every sample is clipped
    result = saliency.select_salient(selection_loss(parts), modules, batches, dataset_size=5, scorer="grad_norm",
                                     noise_multiplier=0.0,
                                     max_grad_norm=clip, ratio=0.3, granularity="matrix",
                                     noise_generator=seeded_generator(0, "t"))
    want = _reference_scores(parts, modules, batches, clip)
    for name in modules:
        assert result.scores[name] == pytest.approx(want[name], rel=1e-3, abs=1e-9)
    top = sorted(want, key=want.get, reverse=True)[: math.ceil(0.3 * len(want))]
    assert set(result.target_modules) == set(top)
    assert result.num_samples == 5


def test_noise_std_is_sigma_s_c_s_over_n(parts):
    modules = saliency.candidate_modules(parts.unet, "attention_qkv")
    n, sigma, clip = 1000, 5.0, 2.0
    result = saliency.select_salient(selection_loss(parts), modules, [], dataset_size=n, scorer="grad_norm",
                                     noise_multiplier=sigma,
                                     max_grad_norm=clip, ratio=0.3, granularity="matrix",
                                     noise_generator=seeded_generator(1, "t"))
    coords = sum(m.weight.numel() for m in modules.values())
    measured = math.sqrt(sum(s ** 2 for s in result.scores.values()) / coords)
    assert measured == pytest.approx(sigma * clip / n, rel=0.02)


def test_layer_granularity_keeps_whole_layers(parts):
    modules = saliency.candidate_modules(parts.unet, "attention_qkv")
    result = saliency.select_salient(selection_loss(parts), modules, _batches(parts, [2]), dataset_size=2,
                                     scorer="grad_norm",
                                     noise_multiplier=1.0, max_grad_norm=1.0, ratio=0.3, granularity="layer",
                                     noise_generator=seeded_generator(2, "t"))
    layers = {saliency.layer_of(n) for n in modules}
    chosen = {saliency.layer_of(n) for n in result.target_modules}
    assert len(chosen) == math.ceil(0.3 * len(layers))
    assert set(result.target_modules) == {n for n in modules if saliency.layer_of(n) in chosen}


def test_target_modules_wrap_exactly_the_chosen_modules(parts):
    modules = saliency.candidate_modules(parts.unet, "attention_qkv")
    chosen = list(modules)[1::5]
    modeling.add_lora(parts.unet, chosen, rank=2)  # raises unless peft wrapped exactly these
    wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in parts.unet.named_modules() if n.endswith(".lora_A")}
    assert wrapped == set(chosen)


def test_noise_floor_is_the_score_of_pure_noise():
    """σ_s·C_s·√d/N: the norm of the noise added to a matrix whose clipped gradients sum to zero, divided by N."""
    modules = {"big": torch.nn.Linear(64, 64), "small": torch.nn.Linear(32, 32)}
    floor = saliency.noise_floor(modules, noise_multiplier=5, max_grad_norm=1, dataset_size=1000)
    assert floor == pytest.approx({"big": 0.32, "small": 0.16})
    g = torch.Generator().manual_seed(0)
    observed = [float((5 * torch.randn(64, 64, generator=g)).norm() / 1000) for _ in range(200)]
    assert abs(sum(observed) / len(observed) - floor["big"]) < 0.01
    assert saliency.near_noise_floor({"big": 0.4, "small": 0.3}, floor, ["big", "small"]) == ["big"]


def test_debiased_noise_spread_is_far_below_the_floor():
    """The debiased score of pure noise, ‖n‖²/N² − d(σ_s C_s/N)², has mean 0 and spread floor²·√(2/d): a signal of
    a tenth of floor² stands out of it for a 64×64 matrix, where grad_norm's ranking is set by d."""
    modules = {"big": torch.nn.Linear(64, 64), "small": torch.nn.Linear(32, 32)}
    sizes = {"big": 4096, "small": 1024}
    floor = saliency.noise_floor(modules, noise_multiplier=5, max_grad_norm=1, dataset_size=1000)
    g = torch.Generator().manual_seed(0)
    pure = torch.tensor([float((5 * torch.randn(64, 64, generator=g)).norm() / 1000) ** 2 - floor["big"] ** 2
                         for _ in range(400)])
    spread = floor["big"] ** 2 * math.sqrt(2 / 4096)
    assert abs(pure.mean().item()) < 0.2 * spread and abs(pure.std().item() / spread - 1) < 0.15
    scores = {"big": 0.1 * floor["big"] ** 2, "small": 0.5 * spread}
    assert saliency.near_noise_floor(scores, floor, ["big", "small"], "grad_norm_debiased", sizes) == ["small"]


def test_random_scorer_reads_no_data(parts):
    modules = saliency.candidate_modules(parts.unet, "attention_qkv")

    def poisoned():
        raise AssertionError("the random scorer touched the data")
        yield

    result = saliency.select_salient(selection_loss(parts), modules, poisoned(), dataset_size=10, scorer="random",
                                     noise_multiplier=5,
                                     max_grad_norm=1, ratio=0.5, granularity="matrix",
                                     noise_generator=seeded_generator(3, "t"))
    assert len(result.target_modules) == 33 and result.num_samples == 0  # ⌈0.5 · 66⌉


def _select(args):
    return run_script("select_salient.py", args)


_base_args = select_args


def test_cli_writes_a_mask_peft_accepts(tiny_pipeline_dir, fashion_data_dir, tmp_path):
    out = str(tmp_path / "mask.json")
    res = _select(_base_args(tiny_pipeline_dir, fashion_data_dir, out) + ["--dp_seed", "1"])
    assert res.returncode == 0, res.stderr
    mask = saliency.read_mask(out)
    assert mask["num_selected"] == 20 and len(mask["target_modules"]) == 20  # ⌈0.3 · 66⌉
    assert mask["privacy"]["noise_multiplier"] == 5.0 and mask["privacy"]["dataset_size"] == 40
    prompts = dict(zip(mask["class_names"], mask["class_prompts"]))
    assert prompts["t_shirt_top"] == "An image of a t-shirt/top" and prompts["ankle_boot"] == "An image of an ankle boot"
    # at N = 40 and σ_s = 5 the noise dwarfs every matrix's signal, and the user is told
    assert "selection is mostly noise" in res.stderr
    parts = modeling.load_pipeline_parts(tiny_pipeline_dir)
    saliency.check_mask(mask, parts.unet, 40)
    with pytest.raises(ValueError, match="computed on N = 40"):  # a private mask binds its N ...
        saliency.check_mask(mask, parts.unet, 41)
    exact = {**mask, "privacy": {**mask["privacy"], "noise_multiplier": 0.0}}
    saliency.check_mask(exact, parts.unet, 41)  # ... an exact one (ε = inf anyway) may come from a subset
    modeling.add_lora(parts.unet, mask["target_modules"], rank=4)

    # the public --seed touches no private randomness: with the same secret --dp_seed the release is identical
    other = str(tmp_path / "other_seed.json")
    res = _select(_base_args(tiny_pipeline_dir, fashion_data_dir, other) + ["--dp_seed", "1", "--seed", "7"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert saliency.read_mask(other)["scores"] == mask["scores"]


def test_derived_masks_equal_fresh_selections_with_the_same_noise(tiny_pipeline_dir, fashion_data_dir, tmp_path):
    """Another ρ, the layer ranking and the debiased score re-rank the released noisy norms: the derived mask is
    the one a fresh selection with the same secret noise picks, so sharing one release costs nothing."""
    warnings = {}

    def selected(name, *extra):
        out = str(tmp_path / f"{name}.json")
        res = _select(_base_args(tiny_pipeline_dir, fashion_data_dir, out) + ["--dp_seed", "1", *extra])
        assert res.returncode == 0, res.stderr[-3000:]
        warnings[name] = res.stderr
        return saliency.read_mask(out)

    source = selected("source")
    for extra, (ratio, granularity, scorer) in [
            (["--select_ratio", "0.5"], (0.5, "matrix", "grad_norm")),
            (["--granularity", "layer"], (0.3, "layer", "grad_norm")),
            (["--scorer", "grad_norm_debiased"], (0.3, "matrix", "grad_norm_debiased"))]:
        derived = saliency.derive_mask(source, ratio=ratio, granularity=granularity, scorer=scorer)
        fresh = selected("_".join(extra).strip("-"), *extra)
        assert saliency.mask_problem(derived) is None
        assert derived["target_modules"] == fresh["target_modules"] and derived["privacy"] == fresh["privacy"]
        assert derived["scores"] == pytest.approx(fresh["scores"], rel=1e-9)
    with pytest.raises(ValueError, match="Only a matrix-level grad_norm mask"):
        saliency.derive_mask(derived, ratio=0.3, granularity="matrix", scorer="grad_norm")
    # at N = 40 both scores are drowned, and each warning names its own remedy
    assert "--scorer grad_norm_debiased ranks the same query" in warnings["source"]
    assert "debiased score" in warnings["scorer_grad_norm_debiased"] and "mostly noise" in warnings[
        "scorer_grad_norm_debiased"]


@pytest.mark.parametrize("extra, message", [
    (["--select_ratio", "0"], "select_ratio"),
    (["--select_ratio", "1.5"], "select_ratio"),
    (["--image_column", "pixels"], "--image_column 'pixels' is not a column"),
    (["--candidate_pool", "everything"], "invalid choice"),
    (["--max_train_samples", "3"], "class"),  # the first 3 images are all one class
    (["--class_names", "shirt,bag"], "outside the public class list"),  # a label the user did not declare
])
def test_cli_bad_inputs_fail_clearly_without_a_mask(tiny_pipeline_dir, fashion_data_dir, tmp_path, extra, message):
    out = str(tmp_path / "mask.json")
    res = _select(_base_args(tiny_pipeline_dir, fashion_data_dir, out) + extra)
    assert res.returncode == 2 and message in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert not os.path.exists(out)


def test_class_list_comes_from_the_user_never_from_the_data(tiny_pipeline_dir, fashion_data_dir, tmp_path):
    """A label only the private data has never reaches the mask: it is refused; absent classes stay listed."""
    data_dir = tmp_path / "data"
    import shutil

    shutil.copytree(fashion_data_dir, data_dir)
    out = str(tmp_path / "mask.json")
    args = _base_args(tiny_pipeline_dir, str(data_dir), out)
    no_list = [a for a in args if a not in ("--class_prompts", "fashion_mnist")]
    res = _select(no_list)
    assert res.returncode == 2 and "--class_names" in res.stderr and not os.path.exists(out)
    shutil.move(str(data_dir / "train" / "bag"), str(data_dir / "train" / "patient_x_handbag"))
    res = _select(args)
    assert res.returncode == 2 and "outside the public class list" in res.stderr and not os.path.exists(out)
    shutil.rmtree(data_dir / "train" / "patient_x_handbag")
    res = _select(args + ["--dp_seed", "0"])
    assert res.returncode == 0, res.stderr[-3000:]
    mask = json.load(open(out))
    assert "bag" in mask["class_names"] and len(mask["class_names"]) == 10  # the public list, bag included
    assert "patient_x_handbag" not in json.dumps(mask)


def test_cli_unknown_model_folder(fashion_data_dir, tmp_path):
    out = str(tmp_path / "mask.json")
    res = _select(_base_args(str(tmp_path / "nope"), fashion_data_dir, out))
    assert res.returncode == 2 and "model_index.json" in res.stderr and not os.path.exists(out)


def test_cli_empty_data(tiny_pipeline_dir, tmp_path):
    (tmp_path / "empty" / "a").mkdir(parents=True)
    out = str(tmp_path / "mask.json")
    res = _select(_base_args(tiny_pipeline_dir, str(tmp_path / "empty"), out))
    assert res.returncode != 0 and not os.path.exists(out)
    assert "Traceback" not in res.stderr, res.stderr[-2000:]


def test_unreadable_image_is_one_clear_error(tiny_pipeline_dir, fashion_data_dir, tmp_path):
    import shutil

    data_dir = tmp_path / "data"
    shutil.copytree(fashion_data_dir, data_dir)
    broken = data_dir / "train" / "dress" / "99999.png"
    broken.write_bytes(b"this is not a png")
    out = str(tmp_path / "mask.json")
    res = _select(_base_args(tiny_pipeline_dir, str(data_dir), out))
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "99999.png" in res.stderr and res.stderr.strip().splitlines()[-1].startswith("error:")
    assert not os.path.exists(out)


def test_two_processes_match_one_process(tiny_pipeline_dir, fashion_data_dir, tmp_path):
    """With noise on and the secret seed fixed, 2 processes release exactly the 1-process scores: same draws per
    image, same clipped sum, the noise added once."""
    one, two = str(tmp_path / "one.json"), str(tmp_path / "two.json")
    args = ["--selection_noise_multiplier", "5", "--selection_batch_size", "3", "--dp_seed", "11"]
    res = _select(_base_args(tiny_pipeline_dir, fashion_data_dir, one) + args)
    assert res.returncode == 0, res.stderr[-3000:]
    res = accelerate_two_processes("select_salient.py", _base_args(tiny_pipeline_dir, fashion_data_dir, two) + args,
                                   tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = json.load(open(one)), json.load(open(two))
    assert a["target_modules"] == b["target_modules"]
    for name, score in a["scores"].items():
        assert b["scores"][name] == pytest.approx(score, rel=1e-4)


def test_fisher_noise_std_is_sigma_s_c_s_squared_over_n(parts):
    """fisher scores are (Σ_i ‖ĝ_i,m‖² + N(0, (σ_s C_s²)²)) / N: with no data, pure noise of that scale."""
    modules = saliency.candidate_modules(parts.unet, "all_linear")
    n, sigma, clip = 50, 4.0, 0.5
    values = []
    for seed in range(6):
        result = saliency.select_salient(selection_loss(parts), modules, [], dataset_size=n, scorer="fisher",
                                         noise_multiplier=sigma, max_grad_norm=clip, ratio=0.3,
                                         granularity="matrix", noise_generator=seeded_generator(seed, "t"))
        values += list(result.scores.values())
    measured = torch.tensor(values).std().item()
    assert measured == pytest.approx(sigma * clip ** 2 / n, rel=0.1), (len(values), measured)


def test_fisher_layer_ranking_sums_the_scores():
    """Noisy fisher scores can be negative: a layer scores Σ s (its block's Σ‖ĝ‖²), never sqrt(Σ s²)."""
    scores = {"a.attn1.to_q": -9.0, "a.attn1.to_k": -9.0, "a.attn1.to_v": -9.0,
              "b.attn1.to_q": 1.0, "b.attn1.to_k": 1.0, "b.attn1.to_v": 1.0}
    assert saliency.rank_and_select(scores, 0.5, "layer", "fisher") == ["b.attn1.to_q", "b.attn1.to_k", "b.attn1.to_v"]
    # grad_norm scores are norms: the block's norm is sqrt(Σ s²)
    norms = {"a.attn1.to_q": 3.0, "a.attn1.to_k": 0.0, "a.attn1.to_v": 0.0,
             "b.attn1.to_q": 2.0, "b.attn1.to_k": 2.0, "b.attn1.to_v": 0.0}
    assert saliency.rank_and_select(norms, 0.5, "layer", "grad_norm")[0].startswith("a.")


@pytest.mark.parametrize("pool", ["attention_qkvo", "all_linear"])
def test_selection_sums_match_batch1_loop_for_every_pool(parts, pool):
    modules = saliency.candidate_modules(parts.unet, pool)
    batches = _batches(parts, [2, 3], seed=4)
    clip = 0.05
    clipped = saliency.clipped_gradient_sums(selection_loss(parts), modules, batches, max_grad_norm=clip)
    want = _reference_scores(parts, modules, batches, clip)
    assert clipped.num_samples == 5
    for name, s in zip(modules, clipped.sums):
        assert float(s.norm() / 5) == pytest.approx(want[name], rel=1e-3, abs=1e-9), name


@pytest.mark.parametrize("pool", ["attention_qkv", "all_linear"])
def test_ghost_norms_give_the_materialised_sums(parts, pool):
    """Factored per-sample gradients (ghost norms + one weighted matmul) release the same query."""
    modules = saliency.candidate_modules(parts.unet, pool)
    batches = _batches(parts, [3, 2], seed=5)
    results = {}
    for ghost in ("never", "always", "auto"):
        results[ghost] = saliency.clipped_gradient_sums(selection_loss(parts), modules, batches, max_grad_norm=0.05,
                                                        track_squared_norms=True, ghost=ghost)
    for ghost in ("always", "auto"):
        for a, b in zip(results["never"].sums, results[ghost].sums):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-9)
        assert torch.allclose(results["never"].squared_norm_sums, results[ghost].squared_norm_sums, rtol=1e-4)


def test_debiased_scores_are_the_same_query_minus_the_noise_share(parts):
    """grad_norm_debiased = grad_norm² − d_m(σ_s C_s/N)² for the very same noise draw (post-processing, no extra
    cost), and on a zero gradient it averages to 0 where grad_norm² averages to the noise share."""
    modules = saliency.candidate_modules(parts.unet, "attention_qkv")
    batches = _batches(parts, [3, 2])
    kw = dict(dataset_size=50, noise_multiplier=2.0, max_grad_norm=0.05, ratio=0.3, granularity="matrix")
    plain = saliency.select_salient(selection_loss(parts), modules, batches, scorer="grad_norm",
                                    noise_generator=seeded_generator(4, "t"), **kw)
    debiased = saliency.select_salient(selection_loss(parts), modules, batches, scorer="grad_norm_debiased",
                                       noise_generator=seeded_generator(4, "t"), **kw)
    share = (2.0 * 0.05 / 50) ** 2
    for name, m in modules.items():
        assert debiased.scores[name] == pytest.approx(plain.scores[name] ** 2 - m.weight.numel() * share, rel=1e-6,
                                                      abs=1e-12)
    empty = [saliency.select_salient(selection_loss(parts), modules, [], scorer="grad_norm_debiased",
                                     noise_generator=seeded_generator(5, "t", k), **kw).scores for k in range(20)]
    name = max(modules, key=lambda n: modules[n].weight.numel())
    d = modules[name].weight.numel()
    mean = sum(e[name] for e in empty) / len(empty)
    assert abs(mean) < 4 * share * math.sqrt(2 * d / len(empty))  # the sd of a d-dof χ² estimate, scaled
    with pytest.raises(ValueError, match="gaussian"):
        saliency.select_salient(selection_loss(parts), modules, [], scorer="grad_norm_debiased", mechanism="ptr",
                                epsilon=1.0, delta=1e-5, noise_generator=seeded_generator(5, "t"), **kw)


def test_subsampled_query_reads_a_secret_poisson_sample(tiny_pipeline_dir, fashion_data_dir, tmp_path):
    """--selection_sample_rate q_s: each image is in with probability q_s, drawn from the secret --dp_seed (not the
    public --seed); the noise std is σ_s·C_s/(q_s·N); the record carries q_s, and the ledger accounts one
    Poisson-subsampled Gaussian step for it."""
    def selected(name, *extra):
        out = str(tmp_path / f"{name}.json")
        res = _select(_base_args(tiny_pipeline_dir, fashion_data_dir, out) + ["--selection_sample_rate", "0.5", *extra])
        assert res.returncode == 0, res.stderr[-3000:]
        return saliency.read_mask(out)

    mask = selected("a", "--dp_seed", "1")
    record = mask["privacy"]
    assert record["sample_rate"] == 0.5 and record["dataset_size"] == 40
    assert record["noise_std"] == pytest.approx(5.0 * 1.0 / (0.5 * 40))
    assert privacy.SelectionCost.from_mask(mask) == privacy.SelectionCost(5.0, "gaussian", 1.0, "grad_norm", 40,
                                                                          sample_rate=0.5)
    same_secret = selected("b", "--dp_seed", "1", "--seed", "7")
    assert same_secret["scores"] == mask["scores"]  # the public seed touches neither the sample nor the noise
    other_secret = selected("c", "--dp_seed", "2")
    assert other_secret["scores"] != mask["scores"]
    full = selected("d", "--dp_seed", "1", "--selection_sample_rate", "1")
    assert "sample_rate" not in full["privacy"] and full["privacy"]["noise_std"] == pytest.approx(5.0 / 40)
    res = _select(_base_args(tiny_pipeline_dir, fashion_data_dir, str(tmp_path / "e.json")) +
                  ["--selection_sample_rate", "0.5", "--scorer", "random"])
    assert res.returncode == 2 and "--selection_sample_rate" in res.stderr
