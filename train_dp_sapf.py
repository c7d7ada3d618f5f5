#!/usr/bin/env python
"""DP-SAPF stage 2: DP-SGD on LoRA adapters of the salient matrices, calibrated to a target (ε, δ).

    accelerate launch train_dp_sapf.py --pretrained_model_name_or_path MODEL --train_data_dir DATA \
        --saliency_mask mask.json --target_epsilon 10 --train_batch_size 4096 --max_train_steps 1000

DP-SGD: Poisson sampling with rate q = B/N; each sample's gradient over all trainable tensors is clipped
jointly to C; clipped sums are added across processes; N(0, σ²C²) is added once per logical step, identically
on every process; the sum is divided by the expected batch B. σ is the smallest value whose ε, composed with
the mask's selection cost, meets the target. The output folder holds pytorch_lora_weights.safetensors
(`pipe.load_lora_weights(output_dir)`), privacy_report.json and a model card.
"""

import argparse
import json
import logging
import math
import os
import shutil
import traceback

import numpy as np
import torch
from tqdm.auto import tqdm

from dp_sapf import data, distributed, hub, modeling, privacy, saliency
from dp_sapf.cli import add_runtime_args, run_cli
from dp_sapf.per_sample import LinearPerSampleHooks, LinearPerSampleProbes, StepGradients, seeded_generator

logger = logging.getLogger("train_dp_sapf")
STATUS_FILE = "run_status.json"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modeling.add_model_args(p)
    data.add_data_args(p)
    g = p.add_argument_group("what is trained")
    g.add_argument("--saliency_mask", type=str, default=None,
                   help="Mask JSON from select_salient.py: LoRA goes on exactly its target_modules and its selection "
                        "cost is composed into ε. Required with --lora_target mask.")
    g.add_argument("--lora_target", choices=["mask", "all_attention"], default="mask",
                   help="mask: the saliency mask's matrices (DP-SAPF); all_attention: to_q/to_k/to_v/to_out.0 of "
                        "every attention layer, no selection stage (the DP-LoRA baseline).")
    g.add_argument("--train_mode", choices=["lora", "direct", "full"], default="lora",
                   help="lora: train LoRA factors; direct: train the selected weight matrices themselves (the paper's "
                        "'w/o LoRA'; with all_attention the DP-LDM baseline); full: every UNet parameter (DP-Finetune; "
                        "slow and memory-hungry, per-sample gradients by opacus in fp32 only).")
    g.add_argument("--rank", type=int, default=4, help="LoRA rank r.")
    g.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha (default: equal to --rank).")
    g = p.add_argument_group("privacy")
    g.add_argument("--target_epsilon", type=str, default=None,
                   help="Target ε of the whole release (selection + training); σ is calibrated to meet it. "
                        "'inf' trains without privacy (same as --no_dp).")
    g.add_argument("--target_delta", type=float, default=None, help="δ (default 1/N; a warning above 1/N).")
    g.add_argument("--noise_multiplier", type=float, default=None,
                   help="Give σ directly instead of --target_epsilon; the resulting ε is reported.")
    g.add_argument("--no_dp", action="store_true",
                   help="Non-private training (the 'LoRA w/o DP' comparison): no clipping, no noise, ε = inf.")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="C: per-sample joint clipping norm.")
    g.add_argument("--accountant", choices=["rdp", "prv", "pld"], default="rdp",
                   help="rdp (as the paper; opacus), or the tighter prv (opacus) / pld (dp-accounting).")
    g.add_argument("--per_sample_engine", choices=["auto", "hooks", "probes", "opacus"], default="auto",
                   help="hooks: our nn.Linear hooks (any autocast dtype; fastest in eager mode); probes: per-sample "
                        "gradients through autograd itself (nn.Linear only; works under --compile, where tensor hooks "
                        "break the graph); opacus: GradSampleModule (fp32 only, any layer). auto: probes with "
                        "--compile, else hooks; opacus when a trainable tensor is outside nn.Linear (--train_mode full).")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet (same result, ~1.6x the step throughput of eager on an H100; the "
                        "first steps compile, and Poisson batches of new sizes may recompile).")
    g.add_argument("--allow_tf32", action="store_true",
                   help="Allow TF32 matmuls on Ampere+ GPUs (faster fp32 products, slightly less precise).")
    g = p.add_argument_group("optimisation")
    g.add_argument("--train_batch_size", type=int, default=4096,
                   help="Expected logical batch B per step over all processes: Poisson rate q = B/N (paper: 4096).")
    g.add_argument("--max_physical_batch_size", type=int, default=64,
                   help="Samples per forward/backward on each process (memory only; no effect on the result).")
    g.add_argument("--max_train_steps", type=int, default=1000, help="Number of DP-SGD steps T (paper: 1000).")
    g.add_argument("--learning_rate", type=float, default=5e-4, help="AdamW learning rate (official code: 5e-4).")
    g.add_argument("--lr_scheduler", type=str, default="constant",
                   help='One of diffusers\' schedulers: "linear", "cosine", "cosine_with_restarts", "polynomial", '
                        '"constant", "constant_with_warmup".')
    g.add_argument("--lr_warmup_steps", type=int, default=0, help="Warm-up steps of the scheduler.")
    g.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1.")
    g.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2.")
    g.add_argument("--adam_weight_decay", type=float, default=1e-2, help="AdamW weight decay.")
    g.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon.")
    g = p.add_argument_group("outputs")
    g.add_argument("--output_dir", type=str, default="dp-sapf-lora", help="Where results and checkpoints go.")
    g.add_argument("--logging_dir", type=str, default="logs", help="Tracker logs, under --output_dir (never pushed).")
    g.add_argument("--report_to", type=str, default="tensorboard",
                   help='Tracker: "tensorboard", "wandb", "all" or "none". Logged loss is not private: keep logs internal.')
    g.add_argument("--checkpointing_steps", type=int, default=500,
                   help="Save a resumable checkpoint (LoRA, optimizer, scheduler, RNG, privacy ledger) every X steps.")
    g.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    g.add_argument("--resume_from_checkpoint", type=str, default=None,
                   help='"latest" or a checkpoint folder: continue exactly where it stopped, with the same privacy ledger.')
    g.add_argument("--validation_prompt", type=str, default=None,
                   help="Prompt for validation images (default: every class prompt).")
    g.add_argument("--num_validation_images", type=int, default=1, help="Validation images per prompt.")
    g.add_argument("--validation_steps", type=int, default=None,
                   help="Render validation images every X steps (and always at the end). Default: only at the end.")
    g.add_argument("--validation_inference_steps", type=int, default=25, help="Denoising steps of validation images.")
    g.add_argument("--push_to_hub", action="store_true", help="Push the weights, privacy report and model card.")
    g.add_argument("--hub_model_id", type=str, default=None, help="Hub repo id (default: the output folder's name).")
    g.add_argument("--hub_token", type=str, default=None, help="Hub token (default: the stored login).")
    add_runtime_args(p)
    args = p.parse_args(argv)

    if args.target_epsilon is not None and args.target_epsilon.lower() in ("inf", "infinity"):
        args.no_dp = True
    given = [args.target_epsilon is not None and not args.no_dp, args.noise_multiplier is not None, args.no_dp]
    if sum(given) != 1:
        p.error("Give exactly one of --target_epsilon, --noise_multiplier or --no_dp.")
    if args.target_epsilon is not None and not args.no_dp:
        args.target_epsilon = float(args.target_epsilon)
        if args.target_epsilon <= 0:
            p.error("--target_epsilon must be > 0.")
    if args.lora_target == "mask" and not args.saliency_mask:
        p.error("--lora_target mask needs --saliency_mask (run select_salient.py), or use --lora_target all_attention.")
    if args.train_mode == "full" and args.saliency_mask:
        p.error("--train_mode full trains every UNet parameter; drop --saliency_mask.")
    for flag in ("train_batch_size", "max_physical_batch_size", "max_train_steps", "rank"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1.")
    if args.max_grad_norm <= 0:
        p.error("--max_grad_norm must be > 0.")
    return args


def selection_cost(mask):
    """The mask's selection stage as the accountant sees it (None: no selection stage)."""
    if mask is None:
        return None
    return privacy.SelectionCost(mask["privacy"]["noise_multiplier"])


def make_ledger(args, n, mask) -> privacy.PrivacyLedger:
    """Calibrate σ (or take it) and return the ledger this run spends from; refuses unreachable targets."""
    q = args.train_batch_size / n
    selection = selection_cost(mask)
    delta = args.target_delta if args.target_delta is not None else privacy.default_delta(n)
    privacy.warn_if_delta_too_large(delta, n)
    if args.no_dp:
        sigma = 0.0
    elif args.noise_multiplier is not None:
        sigma = args.noise_multiplier
    else:
        sigma = privacy.calibrate_noise_multiplier(target_epsilon=args.target_epsilon, delta=delta, sample_rate=q,
                                                   steps=args.max_train_steps, selection=selection,
                                                   accountant=args.accountant)
    sel = None if mask is None else {
        "noise_multiplier": mask["privacy"]["noise_multiplier"], "max_grad_norm": mask["privacy"]["max_grad_norm"],
        "scorer": mask["scorer"], "dataset_size": mask["privacy"]["dataset_size"]}
    return privacy.PrivacyLedger(noise_multiplier=sigma, sample_rate=q, max_grad_norm=args.max_grad_norm,
                                 delta=delta, accountant=args.accountant, steps_done=0,
                                 total_steps=args.max_train_steps, selection=sel)


def trainable_setup(args, parts, mask):
    """Make the chosen tensors trainable; return (params, named params, per-sample hook modules or None)."""
    unet = parts.unet
    if args.train_mode == "full":
        unet.requires_grad_(True)
        return [p for p in unet.parameters()], dict(unet.named_parameters()), None
    if args.lora_target == "mask":
        target_modules = list(mask["target_modules"])
    else:
        target_modules = list(saliency.candidate_modules(unet, "attention_qkvo"))
    if args.train_mode == "lora":
        modeling.add_lora(unet, target_modules, args.rank, args.lora_alpha)
    else:
        for name in target_modules:
            unet.get_submodule(name).requires_grad_(True)
    named = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    for p in named.values():
        p.data = p.data.float()
    hook_modules = {n: m for n, m in unet.named_modules()
                    if isinstance(m, torch.nn.Linear) and any(t.requires_grad for t in m.parameters(recurse=False))}
    covered = {id(t) for m in hook_modules.values() for t in m.parameters(recurse=False)}
    if any(id(p) not in covered for p in named.values()):
        hook_modules = None  # some trainable tensor is not in an nn.Linear: only opacus can do it
    return list(named.values()), named, hook_modules


def save_checkpoint(accelerator, args, step, named, optimizer, lr_scheduler, ledger, dp_seed):
    """Write checkpoint-{step} atomically (main process): everything needed to continue bit for bit."""
    from safetensors.torch import save_file

    if not accelerator.is_main_process:
        return
    final = os.path.join(args.output_dir, f"checkpoint-{step}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file({k: v.detach().cpu().contiguous() for k, v in named.items()}, os.path.join(tmp, "trainable.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}},
               os.path.join(tmp, "training_state.pt"))
    with open(os.path.join(tmp, "ledger.json"), "w") as f:
        json.dump({"step": step, "dp_seed": dp_seed, "seed": args.seed, "ledger": ledger.state_dict()}, f, indent=2)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    if args.checkpoints_total_limit is not None:
        for old in list_checkpoints(args.output_dir)[:-args.checkpoints_total_limit]:
            shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(output_dir):
    """Finished checkpoint folders, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    names = [d for d in os.listdir(output_dir) if d.startswith("checkpoint-") and d.split("-")[1].isdigit()]
    return [os.path.join(output_dir, d) for d in sorted(names, key=lambda d: int(d.split("-")[1]))]


def load_checkpoint(path, named, optimizer, lr_scheduler, ledger):
    """Restore tensors, optimizer, scheduler and RNG; the privacy parameters must not have changed."""
    from safetensors.torch import load_file

    with open(os.path.join(path, "ledger.json")) as f:
        saved = json.load(f)
    old = privacy.PrivacyLedger.from_state_dict(saved["ledger"])
    old.check_compatible(ledger)
    tensors = load_file(os.path.join(path, "trainable.safetensors"))
    if set(tensors) != set(named):
        raise ValueError(f"Checkpoint {path} holds other trainable tensors than this run (another mask or mode?).")
    with torch.no_grad():
        for k, p in named.items():
            p.copy_(tensors[k])
    state = torch.load(os.path.join(path, "training_state.pt"), weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    np.random.set_state(state["rng"]["numpy"])
    ledger.steps_done = old.steps_done
    return saved["step"], saved["dp_seed"]


def write_status(args, status, **extra):
    """run_status.json says whether the folder is a finished result, still running, or failed."""
    with open(os.path.join(args.output_dir, STATUS_FILE), "w") as f:
        json.dump({"status": status, **extra}, f, indent=2)


def render_validation(args, parts, prompts, accelerator, step, weight_dtype):
    """Images of the current (private) model for each prompt; post-processing of DP weights, so privacy-free."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        args.pretrained_model_name_or_path, unet=accelerator.unwrap_model(parts.unet), vae=parts.vae,
        text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, safety_checker=None, requires_safety_checker=False,
        revision=args.revision, variant=args.variant, torch_dtype=weight_dtype)
    pipe.set_progress_bar_config(disable=True)
    prompts = [args.validation_prompt] if args.validation_prompt else prompts
    generator = torch.Generator(device=accelerator.device).manual_seed(args.seed)
    images = []
    with accelerator.autocast():
        for prompt in prompts:
            images += pipe([prompt] * args.num_validation_images, num_inference_steps=args.validation_inference_steps,
                           generator=generator, height=args.resolution, width=args.resolution).images
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", np.stack([np.asarray(i) for i in images]), step, dataformats="NHWC")
    return images


def image_grid(images, columns):
    """Paste images into one grid PNG."""
    from PIL import Image

    w, h = images[0].size
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * w, rows * h))
    for i, img in enumerate(images):
        grid.paste(img, ((i % columns) * w, (i // columns) * h))
    return grid


def main(argv=None):
    args = parse_args(argv)
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler

    report_to = None if args.report_to == "none" else args.report_to
    accelerator = distributed.make_accelerator(args, log_with=report_to, project_config=ProjectConfiguration(
        project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)))
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    device, weight_dtype = accelerator.device, modeling.weight_dtype_for(accelerator.mixed_precision)
    set_seed(args.seed)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True

    # Everything that can be checked is checked before any sensitive data is touched beyond its size.
    images = data.load_labelled_images(args, "train", max_samples=args.max_train_samples)
    n = len(images)
    if args.train_batch_size > n:
        raise ValueError(f"--train_batch_size {args.train_batch_size} exceeds the dataset size N = {n}: the "
                         "sample rate q = B/N must be at most 1.")
    mask = saliency.read_mask(args.saliency_mask) if args.lora_target == "mask" and args.train_mode != "full" else None
    prompts = data.resolve_class_prompts(images.class_names, args.class_prompts, args.prompt_template)
    parts = modeling.load_pipeline_parts(args.pretrained_model_name_or_path, args.revision, args.variant)
    if mask is not None:
        saliency.check_mask(mask, parts.unet, n)
    ledger = make_ledger(args, n, mask)
    private = not args.no_dp
    accelerator.print(f"N = {n}, q = {ledger.sample_rate:.5g}, T = {ledger.total_steps}, σ = {ledger.noise_multiplier:.5g}, "
                      f"final ε = {ledger.epsilon_final():.5g} at δ = {ledger.delta:.3g} ({ledger.accountant})")
    if private and args.train_mode == "full" and accelerator.mixed_precision != "no":
        raise ValueError("--train_mode full uses opacus per-sample gradients, which need --mixed_precision no.")

    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        write_status(args, "running")
    try:
        modeling.place(parts, device, weight_dtype)
        params, named, hook_modules = trainable_setup(args, parts, mask)
        engine = args.per_sample_engine
        if engine == "auto":
            engine = ("probes" if args.compile else "hooks") if hook_modules is not None else "opacus"
        if private and engine in ("hooks", "probes") and hook_modules is None:
            raise ValueError(f"--per_sample_engine {engine} needs every trainable tensor in an nn.Linear; use opacus.")
        if private and engine == "hooks" and args.compile:
            raise ValueError("--per_sample_engine hooks cannot run under --compile (tensor hooks break the compiled "
                             "graph): use probes.")
        if private and engine == "opacus" and args.compile:
            raise ValueError("opacus' GradSampleModule does not run under --compile; drop --compile.")
        if private and engine == "opacus" and accelerator.mixed_precision != "no":
            raise ValueError("opacus per-sample gradients fail under autocast (DESIGN §4): use --mixed_precision no "
                             "or --per_sample_engine hooks.")
        model = parts.unet
        if private and engine == "opacus":
            from opacus import GradSampleModule

            parts.unet.train()
            model = GradSampleModule(parts.unet, batch_first=True, loss_reduction="sum")
        hooks = None
        if private and engine == "hooks":
            hooks = LinearPerSampleHooks(hook_modules)
        elif private and engine == "probes":  # registers its forward hooks now, before compile traces them
            hooks = LinearPerSampleProbes(hook_modules, args.max_physical_batch_size)
        if args.compile:
            model = torch.compile(model)

        cache = data.encode_latents(parts.vae, images, args.resolution, random_flip=args.random_flip, device=device,
                                    dtype=weight_dtype, show_progress=accelerator.is_main_process)
        prompt_embeds = modeling.encode_prompts(parts, prompts, device)
        optimizer = torch.optim.AdamW(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                      weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
        lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps,
                                     num_training_steps=args.max_train_steps)
        step_gradients = StepGradients(model, parts.noise_scheduler, params, private=private,
                                       max_grad_norm=args.max_grad_norm, hooks=hooks, accelerator=accelerator,
                                       autocast=accelerator.autocast, compile=args.compile)

        first_step, dp_seed = 0, None
        if args.resume_from_checkpoint:
            path = args.resume_from_checkpoint
            if path == "latest":
                found = list_checkpoints(args.output_dir)
                path = found[-1] if found else None
            if path is None:
                accelerator.print("No checkpoint to resume from: starting a new run.")
            else:
                first_step, dp_seed = load_checkpoint(path, named, optimizer, lr_scheduler, ledger)
                accelerator.print(f"Resumed from {path} at step {first_step} (ε spent so far {ledger.epsilon_spent():.4g}).")
        if dp_seed is None:
            dp_seed = distributed.shared_secret_seed(accelerator, args.dp_seed)
        if accelerator.is_main_process:
            accelerator.init_trackers("dp-sapf", config={k: v for k, v in vars(args).items()
                                                         if isinstance(v, (int, float, str, bool))})

        num_timesteps = parts.noise_scheduler.config.num_train_timesteps
        epsilon_every = 1 if args.accountant == "rdp" else max(1, args.max_train_steps // 50)
        spent = ledger.epsilon_spent()
        parts.unet.train()
        progress = tqdm(range(first_step, args.max_train_steps), initial=first_step, total=args.max_train_steps,
                        desc="DP-SGD" if private else "non-private", disable=not accelerator.is_main_process)
        for step in range(first_step, args.max_train_steps):
            indices = data.poisson_sample(n, ledger.sample_rate, seeded_generator(dp_seed, "poisson", step, device=device))
            batches = data.micro_batches(
                cache, prompt_embeds, indices, rank=accelerator.process_index, world_size=accelerator.num_processes,
                micro_batch_size=args.max_physical_batch_size, num_train_timesteps=num_timesteps,
                generator=seeded_generator(args.seed, "train", step, device=device), device=device)
            loss_sum = step_gradients(batches, noise_multiplier=ledger.noise_multiplier,
                                      noise_generator=seeded_generator(dp_seed, "noise", step, device=device),
                                      expected_batch_size=args.train_batch_size, realised_batch_size=indices.shape[0])
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            ledger.steps_done = step + 1

            loss = (accelerator.reduce(loss_sum, reduction="sum") / max(1, indices.shape[0])).item()
            if not private:
                spent = float("inf")
            elif (step + 1) % epsilon_every == 0 or step + 1 == args.max_train_steps:
                spent = ledger.epsilon_spent()  # numerical accountants take ~1 s: not at every step
            logs = {"loss": loss, "epsilon": spent,
                    "batch": int(indices.shape[0]), "lr": lr_scheduler.get_last_lr()[0]}
            progress.set_postfix(loss=f"{loss:.4f}", eps=f"{logs['epsilon']:.3g}", batch=logs["batch"])
            progress.update(1)
            accelerator.log(logs, step=step + 1)
            if (step + 1) % args.checkpointing_steps == 0 and step + 1 < args.max_train_steps:
                save_checkpoint(accelerator, args, step + 1, named, optimizer, lr_scheduler, ledger, dp_seed)
            if args.validation_steps and (step + 1) % args.validation_steps == 0 and accelerator.is_main_process:
                render_validation(args, parts, prompts, accelerator, step + 1, weight_dtype)
                parts.unet.train()
        progress.close()
        accelerator.wait_for_everyone()

        if accelerator.is_main_process:
            finish_outputs(args, parts, images.class_names, prompts, accelerator, ledger, mask, n, weight_dtype)
    except BaseException as err:
        if accelerator.is_main_process and os.path.isdir(args.output_dir):
            write_status(args, "failed", error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
        raise
    distributed.finish(accelerator)


def privacy_report(args, ledger, mask, n):
    """privacy_report.json: every figure needed to check or recompute the guarantee."""
    private = not args.no_dp
    spent = privacy.compute_epsilon(noise_multiplier=ledger.noise_multiplier, sample_rate=ledger.sample_rate,
                                    steps=ledger.steps_done, delta=ledger.delta, selection=selection_cost(mask),
                                    accountant=ledger.accountant) if private else None
    return {
        "epsilon": spent.epsilon if private else float("inf"),
        "delta": ledger.delta,
        "accountant": ledger.accountant,
        "noise_multiplier": ledger.noise_multiplier,
        "max_grad_norm": ledger.max_grad_norm if private else None,
        "sample_rate": ledger.sample_rate,
        "expected_batch_size": args.train_batch_size,
        "steps": ledger.steps_done,
        "dataset_size": n,
        "target_epsilon": args.target_epsilon if private else None,
        "selection_noise_multiplier": None if mask is None else mask["privacy"]["noise_multiplier"],
        "selection_max_grad_norm": None if mask is None else mask["privacy"]["max_grad_norm"],
        "budget_split": {} if spent is None else {
            "epsilon_selection_only": spent.epsilon_selection_only,
            "epsilon_training_only": spent.epsilon_training_only,
            "selection_share": spent.selection_share,
            "best_alpha": spent.best_alpha},
        "train_mode": args.train_mode,
        "lora_target": args.lora_target,
        "rank": args.rank if args.train_mode == "lora" else None,
        "mask": None if mask is None else {k: mask[k] for k in ("base_model", "candidate_pool", "granularity",
                                                                "select_ratio", "scorer", "num_selected",
                                                                "candidate_fingerprint", "target_modules")},
        "base_model": args.pretrained_model_name_or_path,
        "resolution": args.resolution,
        "neighbouring": "add/remove one image; N, class prompts and the base model are public",
        "private": private,
    }


def finish_outputs(args, parts, class_names, prompts, accelerator, ledger, mask, n, weight_dtype):
    """Weights, report, validation grid, card; run_status 'complete' last, so a crash never looks done."""
    unet = accelerator.unwrap_model(parts.unet)
    report = privacy_report(args, ledger, mask, n)
    report["class_names"] = class_names
    report["class_prompts"] = prompts
    if args.train_mode == "lora":
        modeling.save_lora(unet, args.output_dir)
    else:
        from diffusers import StableDiffusionPipeline

        StableDiffusionPipeline.from_pretrained(
            args.pretrained_model_name_or_path, unet=unet, vae=parts.vae, text_encoder=parts.text_encoder,
            tokenizer=parts.tokenizer, safety_checker=None, requires_safety_checker=False,
            revision=args.revision, variant=args.variant).save_pretrained(args.output_dir)
    with open(os.path.join(args.output_dir, "privacy_report.json"), "w") as f:
        json.dump(report, f, indent=2)
    if mask is not None:
        saliency.write_mask(mask, os.path.join(args.output_dir, "saliency_mask.json"))
    images = render_validation(args, parts, prompts, accelerator, ledger.steps_done, weight_dtype)
    image_grid(images, columns=min(len(images), 10)).save(os.path.join(args.output_dir, "validation_grid.png"))
    repo_id = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
    hub.write_model_card(args.output_dir, repo_id=repo_id if args.push_to_hub else None,
                         base_model=args.pretrained_model_name_or_path, report=report, class_prompts=prompts,
                         has_lora=args.train_mode == "lora", image_file="validation_grid.png")
    write_status(args, "complete", epsilon=report["epsilon"], delta=report["delta"])
    accelerator.print(f"Done: ε = {report['epsilon']:.4g}, δ = {report['delta']:.3g} "
                      f"(selection alone {report['budget_split'].get('epsilon_selection_only', 0):.4g}, "
                      f"selection share {report['budget_split'].get('selection_share', 0):.1%}); "
                      f"results in {args.output_dir}")
    if args.push_to_hub:
        pushed = hub.push_to_hub(args.output_dir, repo_id, token=args.hub_token)
        accelerator.print(f"Pushed to https://huggingface.co/{pushed}")


if __name__ == "__main__":
    run_cli(main)
