"""Per-sample gradients equal a batch-1 loop; the joint clip bound; the noise scale."""

import warnings

import pytest
import torch

from dp_sapf import modeling, per_sample, saliency
from dp_sapf.per_sample import ClippedGradientSum, LinearPerSampleHooks, LinearPerSampleProbes, StepGradients
from dp_sapf.seeding import seeded_generator


def _inputs(parts, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = parts.unet.config
    shape = (batch, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    latents = torch.randn(shape, generator=g)
    noise = torch.randn(shape, generator=g)
    hidden = torch.randn(batch, 77, cfg.cross_attention_dim, generator=g)
    timesteps = torch.randint(0, 1000, (batch,), generator=g)
    return latents, hidden, noise, timesteps


def _randomise_lora_b(unet):
    # gaussian init leaves lora_B = 0, which makes lora_A's gradients vanish (docs/design.md §4)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))


def _reference_grads(unet, scheduler, params, inputs):
    """The per-sample gradients by brute force: one backward per sample."""
    out = {p: [] for p in params}
    for i in range(inputs[0].shape[0]):
        one = [t[i:i + 1] for t in inputs]
        loss = modeling.per_sample_diffusion_loss(unet, scheduler, *one).sum()
        grads = torch.autograd.grad(loss, params)
        for p, gr in zip(params, grads):
            out[p].append(gr)
    return {p: torch.stack(v) for p, v in out.items()}


@pytest.fixture()
def lora_parts(tiny_pipeline_dir):
    parts = modeling.load_pipeline_parts(tiny_pipeline_dir)
    names = list(saliency.candidate_modules(parts.unet, "attention_qkv"))[::4]
    params = modeling.add_lora(parts.unet, names, rank=2)
    _randomise_lora_b(parts.unet)
    return parts, params


@pytest.mark.parametrize("engine", ["hooks", "probes"])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_engines_match_batch1_loop(lora_parts, dtype, engine):
    parts, params = lora_parts
    inputs = _inputs(parts, 3)
    modules = {n: m for n, m in parts.unet.named_modules()
               if isinstance(m, torch.nn.Linear) and m.weight.requires_grad}
    ctx = torch.autocast("cpu", dtype=dtype) if dtype else torch.autocast("cpu", enabled=False)
    hooks = LinearPerSampleHooks(modules) if engine == "hooks" else LinearPerSampleProbes(modules, max_batch_size=5)
    with hooks, ctx:
        loss = modeling.per_sample_diffusion_loss(parts.unet, parts.noise_scheduler, *inputs).sum()
    loss.backward()
    got = hooks.pop(3)
    with ctx:
        want = _reference_grads(parts.unet, parts.noise_scheduler, params, inputs)
    tol = 1e-4 if dtype is None else 3e-2
    for p in params:
        assert got[p].shape == (3, *p.shape)
        err = (got[p] - want[p].float()).norm() / want[p].float().norm().clamp(min=1e-12)
        assert err < tol, err


@pytest.mark.parametrize("train_mode", ["direct", "full"])
def test_training_modes_match_batch1_loop(tiny_pipeline_dir, train_mode):
    """The engine the script picks for --train_mode direct (hooks, weights and biases of the matrices) and full
    (opacus, every UNet tensor) gives the per-sample gradients of a batch-1 loop."""
    parts = modeling.load_pipeline_parts(tiny_pipeline_dir)
    targets = list(saliency.candidate_modules(parts.unet, "attention_qkvo"))[::5]  # some to_out.0, with biases
    named = modeling.make_trainable(parts.unet, train_mode, targets if train_mode == "direct" else None)
    params = list(named.values())
    engine, model = per_sample.make_engine("auto", parts.unet, params, compile=False, mixed_precision="no",
                                           max_batch_size=3)
    assert type(engine).__name__ == ("LinearPerSampleHooks" if train_mode == "direct" else "OpacusGradSamples")
    if train_mode == "direct":
        assert any(n.endswith("bias") for n in named)
    inputs = _inputs(parts, 3, seed=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with engine:
            modeling.per_sample_diffusion_loss(model, parts.noise_scheduler, *inputs).sum().backward()
    assert not [w for w in caught if "Full backward hook" in str(w.message)]  # opacus' harmless per-step warning
    got = engine.pop(3)
    if train_mode == "full":  # a subset keeps the brute-force loop short; every tensor got a per-sample gradient
        assert set(got) == set(params)
        params = [p for n, p in named.items() if "attn2" in n or "conv_in" in n or "norm1" in n][:12]
    for p in parts.unet.parameters():
        p.grad = None
    want = _reference_grads(parts.unet, parts.noise_scheduler, params, inputs)
    for p in params:
        err = (got[p].float() - want[p]).norm() / want[p].norm().clamp(min=1e-12)
        assert err < 1e-3, err


def test_joint_clip_bounds_every_sample():
    torch.manual_seed(0)
    params = [torch.zeros(5, 3), torch.zeros(7)]
    clipper = ClippedGradientSum(params, max_grad_norm=1.0)
    for scale in [1e-3, 0.5, 10.0, 1e4]:
        grads = {params[0]: torch.randn(1, 5, 3) * scale, params[1]: torch.randn(1, 7) * scale}
        before = [s.clone() for s in clipper.sums]
        clipper.add(grads)
        moved = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(clipper.sums, before)))
        assert moved <= 1.0 + 1e-5
        norm = torch.sqrt(sum((g ** 2).sum() for g in grads.values()))
        if norm < 1:  # small gradients pass unchanged
            assert torch.allclose(moved, norm, rtol=1e-4)


def test_compiled_clip_equals_eager():
    """--compile fuses the clip kernels; the clipped sums and norms must not change."""
    g = torch.Generator().manual_seed(0)
    params = [torch.zeros(6, 3), torch.zeros(5)]
    batch = {params[0]: torch.randn(7, 6, 3, generator=g) * 3, params[1]: torch.randn(7, 5, generator=g)}
    batch[params[1]][2, 0] = float("nan")
    eager, compiled = (ClippedGradientSum(params, 1.0, track_squared_norms=True, compile=c) for c in (False, True))
    for clipper in (eager, compiled):
        clipper.add(batch)
    for a, b in zip(eager.sums + [eager.squared_norm_sums], compiled.sums + [compiled.squared_norm_sums]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_non_finite_sample_contributes_nothing():
    params = [torch.zeros(4)]
    clipper = ClippedGradientSum(params, max_grad_norm=1.0)
    grads = torch.tensor([[0.1, 0.0, 0.0, 0.0], [float("nan"), 1.0, 0.0, 0.0], [float("inf"), 0, 0, 0]])
    clipper.add({params[0]: grads})
    assert torch.allclose(clipper.sums[0], torch.tensor([0.1, 0.0, 0.0, 0.0]))


def test_noise_std_is_sigma_times_c():
    params = [torch.zeros(200_000)]
    clipper = ClippedGradientSum(params, max_grad_norm=0.5)
    noisy = clipper.noisy_sums(3.0, seeded_generator(0, "noise"))[0]
    assert abs(noisy.mean().item()) < 0.02
    assert abs(noisy.std().item() - 1.5) < 0.01  # σ·C, 200k draws: relative error ~0.2%


def test_seeded_generators_are_per_key():
    a = torch.rand(3, generator=seeded_generator(1, "noise", 5))
    b = torch.rand(3, generator=seeded_generator(1, "noise", 5))
    c = torch.rand(3, generator=seeded_generator(1, "noise", 6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_probes_leave_the_model_unchanged_and_compile(lora_parts):
    """Zero probes change no output; under torch.compile the step gives the eager step's clipped sums."""
    parts, params = lora_parts
    inputs = _inputs(parts, 2, seed=3)
    with torch.no_grad():
        before = modeling.per_sample_diffusion_loss(parts.unet, parts.noise_scheduler, *inputs)
    modules = {n: m for n, m in parts.unet.named_modules()
               if isinstance(m, torch.nn.Linear) and m.weight.requires_grad}
    probes = LinearPerSampleProbes(modules, max_batch_size=2)
    sums = []
    for model in (parts.unet, torch.compile(parts.unet, backend="aot_eager")):
        loss = modeling.per_sample_diffusion_loss(model, parts.noise_scheduler, *inputs)
        assert torch.allclose(loss.detach(), before, atol=1e-6)
        step = StepGradients(modeling.diffusion_loss_fn(model, parts.noise_scheduler), params, private=True,
                             max_grad_norm=1e-3, engine=probes)
        step([inputs], noise_multiplier=0.0, noise_generator=None, expected_batch_size=2, realised_batch_size=2)
        sums.append([p.grad.clone() for p in params])
    for eager, compiled in zip(*sums):
        assert torch.allclose(eager, compiled, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("micro_batches", [1, 3])
def test_noise_is_added_once_per_logical_step(lora_parts, micro_batches):
    """With C → 0 the gradient is pure noise / B: its std must be σ·C/B however many micro-batches make the step."""
    parts, params = lora_parts
    hooks = LinearPerSampleHooks({n: m for n, m in parts.unet.named_modules()
                                  if isinstance(m, torch.nn.Linear) and m.weight.requires_grad})
    c, sigma, expected_batch = 1e-9, 2.0, 8
    step = StepGradients(modeling.diffusion_loss_fn(parts.unet, parts.noise_scheduler), params, private=True,
                         max_grad_norm=c, engine=hooks)
    batches = [_inputs(parts, 2, seed=s) for s in range(micro_batches)]
    step(batches, noise_multiplier=sigma, noise_generator=seeded_generator(0, "noise"),
         expected_batch_size=expected_batch, realised_batch_size=2 * micro_batches)
    grads = torch.cat([p.grad.flatten() for p in params]) * expected_batch / c
    assert step.clipped.num_samples == 2 * micro_batches
    assert abs(grads.std().item() - sigma) < 0.05 * sigma, grads.std()


@pytest.mark.parametrize("seed", range(5))
def test_no_sample_moves_the_sum_by_more_than_c_on_real_gradients(lora_parts, seed):
    """The real per-sample gradients of the real loss, at random scales: each sample moves the clipped sum by ≤ C."""
    parts, params = lora_parts
    modules = {n: m for n, m in parts.unet.named_modules() if isinstance(m, torch.nn.Linear) and m.weight.requires_grad}
    hooks = LinearPerSampleHooks(modules)
    inputs = list(_inputs(parts, 4, seed=seed))
    inputs[1] = inputs[1] * float(10 ** (seed - 2))  # conditioning scaled from 1e-2 to 1e2
    with hooks:
        modeling.per_sample_diffusion_loss(parts.unet, parts.noise_scheduler, *inputs).sum().backward()
    grads = hooks.pop()
    c = 10 ** (seed - 3)
    for i in range(4):
        clipper = ClippedGradientSum(params, max_grad_norm=c)
        clipper.add({p: g[i:i + 1] for p, g in grads.items()})
        moved = torch.sqrt(sum((s ** 2).sum() for s in clipper.sums))
        assert moved <= c * (1 + 1e-5)


@pytest.mark.parametrize("engine", ["hooks", "probes"])
def test_padded_micro_batches_give_the_unpadded_step(lora_parts, engine):
    """--compile pads every micro-batch to one shape: the padding rows change neither the clipped sum, nor the
    sample count, nor the noise."""
    from dp_sapf import data

    parts, params = lora_parts
    g = torch.Generator().manual_seed(0)
    n = 7
    mean = torch.randn(n, 1, 4, 8, 8, generator=g)
    cache = data.LatentCache(mean, torch.full_like(mean, 0.1), torch.randint(0, 3, (n,), generator=g),
                             torch.arange(n), 1.0)
    embeds = torch.randn(3, 77, parts.unet.config.cross_attention_dim, generator=g)
    probes_or_hooks, model = per_sample.make_engine(engine, parts.unet, params, compile=engine == "probes",
                                                    mixed_precision="no", max_batch_size=4)
    step = StepGradients(modeling.diffusion_loss_fn(model, parts.noise_scheduler), params, private=True,
                         max_grad_norm=0.05, engine=probes_or_hooks)
    grads = []
    for pad in (None, 4):
        batches = data.micro_batches(cache, embeds, torch.arange(n), rank=0, world_size=1, micro_batch_size=4,
                                     num_train_timesteps=1000, secret_seed=1, stream=("train", 0), device="cpu",
                                     pad_to=pad)
        step(batches, noise_multiplier=1.0, noise_generator=seeded_generator(2, "noise"), expected_batch_size=7,
             realised_batch_size=n)
        assert step.clipped.num_samples == n
        grads.append([p.grad.clone() for p in params])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-7), (a - b).abs().max()


def test_factored_per_sample_gradients_clip_like_materialised_ones():
    """LinearFactors (ghost norms): same norms, same clipped sum, a non-finite sample contributes zero, and each
    sample moves the sum by at most C."""
    g = torch.Generator().manual_seed(0)
    x, grad_out = torch.randn(5, 7, 6, generator=g), torch.randn(5, 7, 4, generator=g) * 3
    grad_out[2, 0, 0] = float("nan")
    param = torch.zeros(4, 6)
    factored = per_sample.LinearFactors(x, grad_out)
    assert torch.allclose(factored.materialise(), torch.einsum("bto,bti->boi", grad_out, x), equal_nan=True)
    sums = []
    for grads in (factored, factored.materialise()):
        clipper = ClippedGradientSum([param], max_grad_norm=1.0)
        norms = clipper.add({param: grads})
        sums.append(clipper.sums[0])
        assert torch.isnan(norms[2])
    assert torch.allclose(sums[0], sums[1], rtol=1e-5, atol=1e-6)
    for i in range(5):
        one = ClippedGradientSum([param], max_grad_norm=1.0)
        one.add({param: per_sample.LinearFactors(x[i:i + 1], grad_out[i:i + 1])})
        assert one.sums[0].norm() <= 1.0 + 1e-5
