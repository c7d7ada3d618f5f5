"""The per-sample diffusion draws are mechanism randomness: secret, and keyed per image (issue #11, finding 1).

An image's timestep, noise, posterior draw and flip must not depend on where it sits or on which other images
are present; otherwise adding one image changes every later image's gradient and the clipped sum moves by far
more than C. These tests measure that move on the real code paths of the selection and of a training step.
"""

import os

import pytest
import torch

from dp_sapf import audit, data, modeling, per_sample, saliency

CLIP = 1e-3  # small enough that every sample is clipped: each one moves the sum by exactly C


def _cache(n, first_key=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(n, 2, 4, 8, 8, generator=g)
    return data.LatentCache(mean, torch.full_like(mean, 0.2), torch.randint(0, 10, (n,), generator=g),
                            torch.arange(first_key, first_key + n), 0.18)


def _insert_first(cache, other):
    return data.LatentCache(*(torch.cat([a, b]) for a, b in zip(
        (other.mean, other.std, other.labels, other.keys), (cache.mean, cache.std, cache.labels, cache.keys))),
        cache.scaling_factor)


def _batches(cache, embeds, secret_seed, stream, micro=5):
    return data.micro_batches(cache, embeds, torch.arange(len(cache)), rank=0, world_size=1, micro_batch_size=micro,
                              num_train_timesteps=1000, secret_seed=secret_seed, stream=stream, device="cpu")


def test_draws_follow_the_image_not_its_position():
    base = _cache(12)
    inserted = _insert_first(base, _cache(1, first_key=99, seed=1))
    kw = dict(secret_seed=5, stream=("train", 3), num_train_timesteps=1000)
    before = data.diffusion_draws(base, torch.arange(12), **kw)
    after = data.diffusion_draws(inserted, torch.arange(1, 13), **kw)  # the same images, one position later
    for a, b in zip(before, after):
        assert torch.equal(a, b)
    # one image alone, or in another batch, gets the same draws
    alone = data.diffusion_draws(base, torch.tensor([7]), **kw)
    assert all(torch.equal(a[7:8], b) for a, b in zip(before, alone))
    # another secret seed, or another step, gives other draws
    other = data.diffusion_draws(base, torch.arange(12), secret_seed=6, stream=("train", 3), num_train_timesteps=1000)
    later = data.diffusion_draws(base, torch.arange(12), secret_seed=5, stream=("train", 4), num_train_timesteps=1000)
    assert not torch.equal(before[2], other[2]) and not torch.equal(before[2], later[2])
    # the flips and timesteps are spread (not a constant): both orientations, many timesteps
    many = data.diffusion_draws(_cache(200), torch.arange(200), **kw)
    assert set(many[0].tolist()) == {0, 1} and len(set(many[3].tolist())) > 150


@pytest.fixture()
def parts_and_embeds(tiny_pipeline_dir):
    parts = modeling.load_pipeline_parts(tiny_pipeline_dir)
    prompts = list(data.BUILTIN_CLASS_PROMPTS["fashion_mnist"].values())
    return parts, modeling.encode_prompts(parts, prompts, "cpu")


def _selection_sum(parts, embeds, cache):
    modules = saliency.candidate_modules(parts.unet, "attention_qkv")
    clipped = saliency.clipped_gradient_sums(modeling.diffusion_loss_fn(parts.unet, parts.noise_scheduler), modules,
                                             _batches(cache, embeds, 17, ("selection",)), max_grad_norm=CLIP)
    return torch.cat([s.flatten() for s in clipped.sums])


def _training_sum(parts, embeds, cache, params, engine):
    step = per_sample.StepGradients(modeling.diffusion_loss_fn(parts.unet, parts.noise_scheduler), params,
                                    private=True, max_grad_norm=CLIP, engine=engine)
    step(_batches(cache, embeds, 17, ("train", 0)), noise_multiplier=0.0, noise_generator=None,
         expected_batch_size=1, realised_batch_size=len(cache))
    return torch.cat([p.grad.flatten() for p in params])


@pytest.mark.parametrize("stage", ["selection", "training"])
@pytest.mark.parametrize("bug", ["none", "public_draws"])
def test_inserting_an_image_first_moves_the_pre_noise_sum_by_at_most_c(parts_and_embeds, stage, bug):
    parts, embeds = parts_and_embeds
    base = _cache(16)
    inserted = _insert_first(base, _cache(1, first_key=1000, seed=3))
    if stage == "selection":
        def measure(cache):
            return _selection_sum(parts, embeds, cache)
    else:
        names = list(saliency.candidate_modules(parts.unet, "attention_qkv"))[::3]
        params = list(modeling.make_trainable(parts.unet, "lora", names, rank=2).values())
        with torch.no_grad():  # as after some training: every LoRA factor has gradients
            for p in params:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
        engine, _ = per_sample.make_engine("hooks", parts.unet, params, compile=False, mixed_precision="no",
                                           max_batch_size=5)

        def measure(cache):
            return _training_sum(parts, embeds, cache, params, engine)
    with audit.injected_bug(bug):
        moved = float((measure(inserted) - measure(base)).norm())
    if bug == "none":
        assert moved <= CLIP * (1 + 1e-4), moved / CLIP
        assert moved >= CLIP * (1 - 1e-3)  # the inserted image itself: clipped to exactly C
    else:  # the old code: public draws by position, every later image gets another draw
        assert moved > 2 * CLIP, moved / CLIP


def with_dropout(model_dir, target_dir, p=0.1):
    """A copy of a pipeline folder whose denoiser's config sets dropout p (what a user's model may have)."""
    import json
    import shutil

    shutil.copytree(model_dir, target_dir)
    folder = "transformer" if os.path.isdir(os.path.join(target_dir, "transformer")) else "unet"
    path = os.path.join(target_dir, folder, "config.json")
    config = json.load(open(path))
    config["dropout"] = p
    json.dump(config, open(path, "w"))
    return str(target_dir)


def test_dropout_breaks_the_insertion_bound_and_is_refused(tiny_backbone_dirs, tmp_path):
    """Issue #23 gap 1: dropout masks are drawn from the global (public) RNG by batch position. With dropout 0.1 in
    a DiT in train mode, one image inserted first shifts every later image's mask and the clipped training sum
    moves by far more than C; the per-sample engine (and both scripts, tests/test_reliability.py) refuse it."""
    from test_backbones import PROMPTS, _batches, _cache, _randomise_lora_b

    parts = modeling.load_pipeline_parts(with_dropout(tiny_backbone_dirs("tiny-dit"), tmp_path / "dit-dropout"))
    found = per_sample.dropout_modules(parts.denoiser)
    assert found and all(p == pytest.approx(0.1) for _, p in found)
    cond = modeling.encode_prompts(parts, PROMPTS, "cpu")
    names = list(saliency.candidate_modules(parts.denoiser, "attention_qkv"))[::3]
    params = list(modeling.make_trainable(parts.denoiser, "lora", names, rank=2).values())
    _randomise_lora_b(parts.denoiser)
    parts.denoiser.train()
    with pytest.raises(ValueError, match="dropout"):
        per_sample.make_engine("hooks", parts.denoiser, params, compile=False, mixed_precision="no", max_batch_size=5)
    hooks = per_sample.LinearPerSampleHooks(per_sample.linear_modules_holding(parts.denoiser, params))
    base = _cache(parts, 12)
    other = _cache(parts, 1, first_key=1000, seed=3)
    inserted = data.LatentCache(*(torch.cat([x, y]) for x, y in zip(
        (other.mean, other.std, other.labels, other.keys), (base.mean, base.std, base.labels, base.keys))), 1.5, 0.06)

    def clipped_sum(cache):
        torch.manual_seed(0)  # what --seed does (accelerate's set_seed): the same public stream in both worlds
        step = per_sample.StepGradients(modeling.diffusion_loss_fn(parts.denoiser, parts.noise_scheduler), params,
                                        private=True, max_grad_norm=CLIP, engine=hooks)
        step(_batches(parts, cache, cond, 17), noise_multiplier=0.0, noise_generator=None, expected_batch_size=1,
             realised_batch_size=len(cache))
        return torch.cat([p.grad.flatten() for p in params])

    moved = float((clipped_sum(inserted) - clipped_sum(base)).norm())
    assert moved > 1.2 * CLIP, moved / CLIP  # the bound ≤ C fails: hence the refusal
    for module in parts.denoiser.modules():  # the same model with its dropout off keeps the bound
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    moved = float((clipped_sum(inserted) - clipped_sum(base)).norm())
    assert CLIP * (1 - 1e-3) <= moved <= CLIP * (1 + 1e-4), moved / CLIP
