"""Transformer backbones (issue #15): DiT (class labels, peft LoRA) and SD3 (rectified flow, diffusers LoRA).

The same scripts and the same privacy machinery as the U-Net: per-sample gradients are truly per sample, every
diffusion draw comes from the secret seed keyed per image, and select -> train -> sample runs end to end.
"""

import json
import os

import numpy as np
import pytest
import torch

from dp_sapf import audit, backbones, data, modeling, per_sample, saliency

from helpers import lora_tensors, run_script, select_args, train_args

ARCHS = {"dit": "tiny-dit", "sd3": "tiny-sd3"}
PROMPTS = list(data.BUILTIN_CLASS_PROMPTS["fashion_mnist"].values())


def _parts(tiny_backbone_dirs, name):
    parts = modeling.load_pipeline_parts(tiny_backbone_dirs(ARCHS[name]))
    assert parts.backbone.name == name
    return parts


def _randomise_lora_b(model):
    with torch.no_grad():  # gaussian init leaves lora_B = 0 and lora_A's gradients 0 (docs/design.md §4)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(n)))


def _inputs(parts, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = parts.denoiser.config
    shape = (batch, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    labels = torch.randint(0, len(PROMPTS), (batch,), generator=g)
    cond = data.select_conditions(modeling.encode_prompts(parts, PROMPTS, "cpu"), labels)
    return (torch.randn(shape, generator=g), cond, torch.randn(shape, generator=g),
            torch.randint(0, 1000, (batch,), generator=g))


def _row(x, i):
    return tuple(_row(t, i) for t in x) if isinstance(x, tuple) else x[i:i + 1]


@pytest.mark.parametrize("engine", ["hooks", "probes"])
@pytest.mark.parametrize("name", ["dit", "sd3"])
def test_per_sample_gradients_equal_a_batch1_loop(tiny_backbone_dirs, name, engine):
    """In train mode (as the script runs it): DiT's random label dropout would mix in global randomness here."""
    parts = _parts(tiny_backbone_dirs, name)
    modules = saliency.candidate_modules(parts.denoiser, "attention_qkv")
    assert len(modules) == 12 and all(n.rsplit(".", 1)[1] in ("to_q", "to_k", "to_v") for n in modules)
    params = modeling.add_lora(parts.denoiser, list(modules)[::2], rank=2)
    _randomise_lora_b(parts.denoiser)
    parts.denoiser.train()
    inputs = _inputs(parts, 3)
    linears = per_sample.linear_modules_holding(parts.denoiser, params)
    hooks = (per_sample.LinearPerSampleHooks(linears) if engine == "hooks"
             else per_sample.LinearPerSampleProbes(linears, max_batch_size=3))
    with hooks:
        modeling.per_sample_diffusion_loss(parts.denoiser, parts.noise_scheduler, *inputs).sum().backward()
    got = hooks.pop(3)
    for i in range(3):
        loss = modeling.per_sample_diffusion_loss(parts.denoiser, parts.noise_scheduler,
                                                  *(_row(x, i) for x in inputs)).sum()
        want = torch.autograd.grad(loss, params)
        for p, w in zip(params, want):
            err = (got[p][i] - w).norm() / w.norm().clamp(min=1e-12)
            assert err < 1e-4, (name, err)


def _cache(parts, n, first_key=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = parts.denoiser.config
    mean = torch.randn(n, 2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    return data.LatentCache(mean, torch.full_like(mean, 0.2), torch.randint(0, 10, (n,), generator=g),
                            torch.arange(first_key, first_key + n), 1.5, 0.06)


def _batches(parts, cache, cond, secret_seed):
    return data.micro_batches(cache, cond, torch.arange(len(cache)), rank=0, world_size=1, micro_batch_size=5,
                              num_train_timesteps=parts.noise_scheduler.config.num_train_timesteps,
                              secret_seed=secret_seed, stream=("train", 0), device="cpu")


def _step_sum(parts, cond, cache, params, engine, clip):
    step = per_sample.StepGradients(modeling.diffusion_loss_fn(parts.denoiser, parts.noise_scheduler), params,
                                    private=True, max_grad_norm=clip, engine=engine)
    step(_batches(parts, cache, cond, 17), noise_multiplier=0.0, noise_generator=None, expected_batch_size=1,
         realised_batch_size=len(cache))
    return torch.cat([p.grad.flatten() for p in params])


@pytest.mark.parametrize("name", ["sd3", "dit"])
def test_training_inputs_come_from_the_secret_draws_only(tiny_backbone_dirs, name):
    """Flow matching (sd3) and DiT: the public seed (global torch RNG, --seed) changes nothing in a training
    step; inserting an image moves the clipped pre-noise sum by at most C; public draws by position would not."""
    parts = _parts(tiny_backbone_dirs, name)
    cond = modeling.encode_prompts(parts, PROMPTS, "cpu")
    names = list(saliency.candidate_modules(parts.denoiser, "attention_qkv"))[::3]
    params = list(modeling.make_trainable(parts.denoiser, "lora", names, rank=2).values())
    _randomise_lora_b(parts.denoiser)
    parts.denoiser.train()
    engine, _ = per_sample.make_engine("hooks", parts.denoiser, params, compile=False, mixed_precision="no",
                                       max_batch_size=5)
    base = _cache(parts, 8)
    sums = []
    for public_seed in (0, 5):  # what --seed sets (accelerate's set_seed)
        torch.manual_seed(public_seed)
        sums.append(_step_sum(parts, cond, base, params, engine, clip=1e3))
    assert torch.equal(sums[0], sums[1])
    # σ (sd3) / the timestep (dit) follow the image's secret draw: another dp seed, other inputs
    a = next(iter(_batches(parts, base, cond, 17)))
    b = next(iter(_batches(parts, base, cond, 18)))
    assert not torch.equal(a[3], b[3]) and not torch.equal(a[2], b[2])

    clip = 1e-3  # every sample clipped: each moves the sum by exactly C
    other = _cache(parts, 1, first_key=1000, seed=3)
    inserted = data.LatentCache(*(torch.cat([x, y]) for x, y in zip(
        (other.mean, other.std, other.labels, other.keys), (base.mean, base.std, base.labels, base.keys))), 1.5, 0.06)
    for bug in ("none", "public_draws"):
        with audit.injected_bug(bug):
            moved = float((_step_sum(parts, cond, inserted, params, engine, clip)
                           - _step_sum(parts, cond, base, params, engine, clip)).norm())
        if bug == "none":
            assert clip * (1 - 1e-3) <= moved <= clip * (1 + 1e-4), moved / clip
        else:
            assert moved > 2 * clip, moved / clip


def _render(pipe, name):
    return backbones.generate(pipe, class_ids=[3], prompts=[PROMPTS[3]], generators=torch.Generator().manual_seed(0),
                              num_inference_steps=2, guidance_scale=None, resolution=32, output_type="np")


@pytest.mark.parametrize("name", ["sd3", "dit"])
def test_select_train_sample_end_to_end(tiny_backbone_dirs, fashion_data_dir, tmp_path, name):
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft import LoraConfig, set_peft_model_state_dict

    model = tiny_backbone_dirs(ARCHS[name])
    mask_path, out, syn = str(tmp_path / "mask.json"), str(tmp_path / "run"), str(tmp_path / "syn")
    res = run_script("select_salient.py", select_args(model, fashion_data_dir, mask_path, "--dp_seed", "0"))
    assert res.returncode == 0, res.stderr[-3000:]
    mask = saliency.read_mask(mask_path)
    pipeline_class = backbones.BACKBONES[name].pipeline_class
    assert mask["backbone"] == name and mask["pipeline_class"] == pipeline_class
    assert mask["num_selected"] == 4 and len(mask["candidates"]) == 12
    res = run_script("train_dp_sapf.py", train_args(model, fashion_data_dir, out, "--saliency_mask", mask_path,
                                                    "--target_epsilon", "8", "--max_train_steps", "2",
                                                    "--rank", "4", "--lora_alpha", "8"))
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.load(open(os.path.join(out, "privacy_report.json")))
    assert report["private"] and report["epsilon"] <= 8 and report["budget_split"]["epsilon_selection_only"] > 0
    assert report["backbone"] == name and report["pipeline_class"] == pipeline_class
    card = open(os.path.join(out, "README.md")).read()
    assert f"from diffusers import {pipeline_class}" in card and "differential-privacy" in card
    assert ("pipe.load_lora_weights" in card) == (name == "sd3") and ("peft" in card) == (name == "dit")

    tensors = lora_tensors(out)
    names = {k.split(".lora")[0].removeprefix("transformer.") for k in tensors}
    assert names == set(mask["target_modules"])
    # the release reloads as a user loads it (SD3: pipe.load_lora_weights; DiT: peft), changes the images, and
    # equals the trained adapter rebuilt in memory (alpha != rank reloads right)
    ref = modeling.load_pipeline(model)
    before = _render(ref, name)
    loaded = modeling.load_pipeline(model, lora_path=out)
    if name == "sd3":
        assert loaded.get_active_adapters()  # diffusers' loader put it there
    after = _render(loaded, name)
    assert np.abs(after - before).max() > 1e-3
    backbones.add_adapter(ref.transformer, LoraConfig(r=4, lora_alpha=8, target_modules=mask["target_modules"]))
    peft_state = convert_unet_state_dict_to_peft({k.removeprefix("transformer."): v for k, v in tensors.items()})
    loaded_keys = set_peft_model_state_dict(ref.transformer, peft_state, adapter_name="default")
    assert not loaded_keys.unexpected_keys
    assert np.allclose(_render(ref, name), after, atol=1e-5)

    res = run_script("sample.py", ["--pretrained_model_name_or_path", model, "--lora_path", out, "--num_images_per_class",
                                   "1", "--num_inference_steps", "2", "--batch_size", "10", "--output_dir", syn])
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in open(os.path.join(syn, "metadata.jsonl"))]
    assert [r["label"] for r in rows] == list(range(10))
    assert all(os.path.isfile(os.path.join(syn, r["file_name"])) for r in rows)


def test_dit_refuses_a_resolution_it_cannot_sample(tiny_backbone_dirs, fashion_data_dir, tmp_path):
    res = run_script("select_salient.py", select_args(tiny_backbone_dirs("tiny-dit"), fashion_data_dir,
                                                      str(tmp_path / "m.json")) + ["--resolution", "64"])
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and "native 32 px" in lines[-1] and "Traceback" not in res.stderr
