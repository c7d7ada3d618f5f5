"""The DP recipe's pieces: automatic clipping and noise multiplicity keep the sensitivity C; K copies are K secret
per-image draws whose mean loss gives one gradient; nothing private about the norms reaches an output."""

import json
import os

import pytest
import torch

from dp_sapf import audit, data, modeling, per_sample, saliency
from helpers import run_script, train_args
from test_draws import _cache, _insert_first
from test_per_sample import _randomise_lora_b


@pytest.mark.parametrize("clipping", ["flat", "automatic"])
def test_every_clipped_gradient_has_norm_at_most_c(clipping):
    norms = torch.tensor([0.0, 1e-8, 1e-3, 0.01, 0.044, 0.3, 1.0, 7.0, 1e6, float("inf"), float("nan")])
    for c in (1e-3, 0.01, 1.0, 3.0):
        factors = per_sample.clip_factors(norms, c, clipping, gamma=0.01)
        clipped = torch.nan_to_num(factors * norms, nan=0.0, posinf=0.0)  # non-finite samples get factor 0
        assert (clipped <= c * (1 + 1e-6)).all(), (clipping, c, clipped)
        assert factors[-2:].eq(0).all()
    # automatic rescales every sample to nearly C, whatever the gradient scale (here 0.044 vs C = 1)
    auto = per_sample.clip_factors(torch.tensor([0.044, 4.4]), 1.0, "automatic", gamma=0.01) * torch.tensor([0.044, 4.4])
    assert auto[0] > 0.8 and auto[1] > 0.99
    flat = per_sample.clip_factors(torch.tensor([0.044]), 1.0, "flat") * 0.044
    assert flat[0] == pytest.approx(0.044, rel=1e-4)  # flat at C = 1 clips nothing: noise 23x the gradient
    with pytest.raises(ValueError, match="clipping rule"):
        per_sample.clip_factors(norms, 1.0, "adaptive")
    with pytest.raises(ValueError, match="gamma"):
        per_sample.ClippedGradientSum([torch.zeros(2)], 1.0, clipping="automatic", automatic_gamma=0.0)


def test_k_draws_are_secret_per_image_draws():
    base = _cache(6)
    kw = dict(secret_seed=5, stream=("train", 3), num_train_timesteps=1000)
    one = data.diffusion_draws(base, torch.arange(6), **kw)
    four = data.diffusion_draws(base, torch.arange(6), multiplicity=4, **kw)
    assert all(t.shape[0] == 24 for t in four)
    for a, b in zip(one, four):  # the first of an image's K draws is its K = 1 draw
        assert torch.equal(a, b[::4])
    assert len(set(four[3][:4].tolist())) == 4  # an image's K timesteps differ
    inserted = _insert_first(base, _cache(1, first_key=99, seed=1))
    moved = data.diffusion_draws(inserted, torch.arange(1, 7), multiplicity=4, **kw)
    assert all(torch.equal(a, b) for a, b in zip(four, moved))  # keyed by the image, not its position
    other = data.diffusion_draws(base, torch.arange(6), multiplicity=4, secret_seed=6, stream=("train", 3),
                                 num_train_timesteps=1000)
    assert not torch.equal(four[2], other[2])


@pytest.fixture()
def lora_setup(tiny_pipeline_dir):
    parts = modeling.load_pipeline_parts(tiny_pipeline_dir)
    names = list(saliency.candidate_modules(parts.unet, "attention_qkv"))[::3]
    params = list(modeling.make_trainable(parts.unet, "lora", names, rank=2).values())
    _randomise_lora_b(parts.unet)
    prompts = list(data.BUILTIN_CLASS_PROMPTS["fashion_mnist"].values())
    return parts, params, modeling.encode_prompts(parts, prompts, "cpu")


@pytest.mark.parametrize("ghost", ["never", "always"])
def test_multiplicity_gradient_is_the_gradient_of_the_mean_of_k_losses(lora_setup, ghost):
    """Grouped per-row gradients (materialised or factored) = autograd of each sample's mean K-copy loss."""
    parts, params, embeds = lora_setup
    cache, k = _cache(3), 3
    batch = next(data.micro_batches(cache, embeds, torch.arange(3), rank=0, world_size=1, micro_batch_size=9,
                                    num_train_timesteps=1000, secret_seed=1, stream=("t",), device="cpu",
                                    multiplicity=k))
    assert batch[0].shape[0] == 9
    loss_fn = modeling.diffusion_loss_fn(parts.unet, parts.noise_scheduler)
    reference = []
    for i in range(3):
        rows = [t[i * k:(i + 1) * k] for t in batch]
        reference.append(torch.autograd.grad(loss_fn(*rows).mean(), params))
    hooks = per_sample.LinearPerSampleHooks(per_sample.linear_modules_holding(parts.unet, params), ghost=ghost)
    clipped = per_sample.ClippedGradientSum(params, max_grad_norm=1e9)  # no clipping: the plain sum
    with hooks:
        losses = loss_fn(*batch).view(-1, k).mean(1)
        losses.sum().backward()
        grouped = per_sample.group_rows(hooks.pop(9), k)
    for p in params:
        p.grad = None
    for j, p in enumerate(params):
        g = grouped[p]
        got = g.materialise() if isinstance(g, per_sample.LinearFactors) else g
        want = torch.stack([r[j] for r in reference])
        assert torch.allclose(got.float(), want, rtol=1e-4, atol=1e-7), p.shape
    norms = clipped.add(grouped)
    want = torch.stack([torch.cat([g.flatten() for g in r]).norm() for r in reference])
    assert torch.allclose(norms, want, rtol=1e-4)


@pytest.mark.parametrize("clipping,k", [("automatic", 1), ("automatic", 4), ("flat", 3)])
@pytest.mark.parametrize("bug", ["none", "public_draws"])
def test_inserting_an_image_moves_the_training_sum_by_at_most_c(lora_setup, clipping, k, bug):
    parts, params, embeds = lora_setup
    clip = 1e-3
    engine, _ = per_sample.make_engine("hooks", parts.unet, params, compile=False, mixed_precision="no",
                                       max_batch_size=8)
    base = _cache(10)
    inserted = _insert_first(base, _cache(1, first_key=1000, seed=3))

    def clipped_sum(cache):
        step = per_sample.StepGradients(modeling.diffusion_loss_fn(parts.unet, parts.noise_scheduler), params,
                                        private=True, max_grad_norm=clip, engine=engine, clipping=clipping,
                                        multiplicity=k)
        batches = data.micro_batches(cache, embeds, torch.arange(len(cache)), rank=0, world_size=1,
                                     micro_batch_size=8, num_train_timesteps=1000, secret_seed=17,
                                     stream=("train", 0), device="cpu", multiplicity=k)
        step(batches, noise_multiplier=0.0, noise_generator=None, expected_batch_size=1,
             realised_batch_size=len(cache))
        assert step.clipped.num_samples == len(cache)
        return torch.cat([p.grad.flatten() for p in params])

    with audit.injected_bug(bug):
        moved = float((clipped_sum(inserted) - clipped_sum(base)).norm())
    if bug == "none":
        assert moved <= clip * (1 + 1e-4), moved / clip
        assert moved >= clip * 0.5  # the inserted image itself, scaled to (nearly) C
    else:  # public draws by position: every later image moves, the bound breaks (and the test sees it)
        assert moved > 1.2 * clip, moved / clip


def test_selection_with_k_and_automatic_clipping_keeps_the_bound(tiny_pipeline_dir):
    parts = modeling.load_pipeline_parts(tiny_pipeline_dir)
    embeds = modeling.encode_prompts(parts, list(data.BUILTIN_CLASS_PROMPTS["fashion_mnist"].values()), "cpu")
    modules = saliency.candidate_modules(parts.unet, "attention_qkv")
    base = _cache(8)
    inserted = _insert_first(base, _cache(1, first_key=1000, seed=3))

    def query(cache):
        clipped = saliency.clipped_gradient_sums(
            modeling.diffusion_loss_fn(parts.unet, parts.noise_scheduler), modules,
            data.micro_batches(cache, embeds, torch.arange(len(cache)), rank=0, world_size=1, micro_batch_size=6,
                               num_train_timesteps=1000, secret_seed=2, stream=("selection",), device="cpu",
                               multiplicity=3),
            max_grad_norm=1.0, clipping="automatic", multiplicity=3)
        assert clipped.num_samples == len(cache)
        return torch.cat([s.flatten() for s in clipped.sums])

    moved = float((query(inserted) - query(base)).norm())
    assert 0.5 <= moved <= 1.0 + 1e-4


def test_training_with_k_and_automatic_clipping_reports_them_and_no_norms(tiny_pipeline_dir, fashion_data_dir,
                                                                         tmp_path):
    out = str(tmp_path / "run")
    done = run_script("train_dp_sapf.py", train_args(tiny_pipeline_dir, fashion_data_dir, out, "--lora_target",
                                                      "all_attention", "--target_epsilon", "10",
                                                      "--noise_multiplicity", "2", "--max_train_steps", "2"))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.load(open(os.path.join(out, "privacy_report.json")))
    assert report["clipping"] == {"rule": "automatic", "max_grad_norm": 1.0, "automatic_gamma": 0.01}
    assert report["noise_multiplicity"] == 2
    # no per-sample norm statistic of the private data in any output file or message
    texts = [done.stdout, done.stderr] + [open(os.path.join(root, f), errors="ignore").read()
                                          for root, _, files in os.walk(out) for f in files if f.endswith((".json", ".md", ".txt"))]
    for text in texts:
        for word in ("grad_norm_mean", "median_norm", "norm_quantile", "clipped_fraction", "per_sample_norm"):
            assert word not in text


def test_gradient_checkpointing_gives_the_same_clipped_sum(lora_setup):
    """Recomputed activations re-fire the forward hooks; only the original graph's tensor hooks run in backward, so
    the per-sample gradients (and the clipped sum) are unchanged."""
    parts, params, embeds = lora_setup
    cache = _cache(6)

    def clipped_sum():
        engine, _ = per_sample.make_engine("hooks", parts.unet, params, compile=False, mixed_precision="no",
                                           max_batch_size=6)
        step = per_sample.StepGradients(modeling.diffusion_loss_fn(parts.unet, parts.noise_scheduler), params,
                                        private=True, max_grad_norm=1e-3, engine=engine, multiplicity=2)
        batches = data.micro_batches(cache, embeds, torch.arange(6), rank=0, world_size=1, micro_batch_size=6,
                                     num_train_timesteps=1000, secret_seed=1, stream=("t",), device="cpu",
                                     multiplicity=2)
        step(batches, noise_multiplier=0.0, noise_generator=None, expected_batch_size=1, realised_batch_size=6)
        assert step.clipped.num_samples == 6
        return torch.cat([p.grad.flatten() for p in params]).clone()

    parts.unet.train()
    plain = clipped_sum()
    parts.unet.enable_gradient_checkpointing()
    assert torch.allclose(plain, clipped_sum(), rtol=1e-5, atol=1e-9)


def test_the_norm_measurement_reads_public_data_only():
    """experiments/grad_norms_public.py reports raw per-sample norms, which are not a DP release: it must refuse a
    sensitive set, and its quantiles are those of the norms it was given."""
    from experiments import grad_norms_public

    with pytest.raises(SystemExit):
        grad_norms_public.parse_args(["--dataset", "fashion_mnist"])
    assert grad_norms_public.parse_args([]).dataset in grad_norms_public.PUBLIC_STANDINS
    stats = grad_norms_public.quantiles([0.01 * i for i in range(1, 102)])
    assert stats["samples"] == 101 and stats["median"] == pytest.approx(0.51) and stats["max"] == pytest.approx(1.01)
