#!/usr/bin/env python
"""DP-SAPF stage 1: pick the most salient attention matrices with one Gaussian query, and save the mask.

    accelerate launch select_salient.py --pretrained_model_name_or_path MODEL --train_data_dir DATA \
        --resolution 256 --select_ratio 0.3 --output mask.json

Each process takes a disjoint shard of the data, clips every sample's gradient over all candidate matrices
jointly, the clipped sums are added across processes and the noise is added once.
"""

import argparse
import json
import math
import os
import sys

import torch
from tqdm.auto import tqdm

from dp_sapf import data, distributed, modeling, per_sample, saliency, timing
from dp_sapf.cli import add_runtime_args, run_cli
from dp_sapf.seeding import seeded_generator


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modeling.add_model_args(parser)
    data.add_data_args(parser)
    g = parser.add_argument_group("selection")
    g.add_argument("--select_ratio", type=float, default=0.3,
                   help="Fraction ρ of candidates to keep: the top ⌈ρ·M⌉ matrices (or ⌈ρ·L⌉ layers), at least one.")
    g.add_argument("--selection_noise_multiplier", type=float, default=5.0,
                   help="σ_s: the Gaussian noise std is σ_s·C_s/N on each mean gradient (paper: 5). RDP ε(α) = α/(2σ_s²).")
    g.add_argument("--selection_max_grad_norm", type=float, default=1.0,
                   help="C_s: each sample's gradient over ALL candidate matrices is clipped jointly to this norm.")
    g.add_argument("--granularity", choices=saliency.GRANULARITIES, default="matrix",
                   help="matrix: rank single q/k/v matrices; layer: rank attention layers by their concatenated "
                        "q/k/v block and keep or drop them whole.")
    g.add_argument("--candidate_pool", choices=saliency.CANDIDATE_POOLS, default="attention_qkv",
                   help="attention_qkv: to_q/to_k/to_v of every attn1 and attn2 (SD-v1.5: 96); attention_qkvo adds "
                        "to_out.0; all_linear: every nn.Linear of the UNet.")
    g.add_argument("--scorer", choices=saliency.SCORERS, default="grad_norm",
                   help="grad_norm: ‖noisy mean clipped gradient‖ (the paper); fisher: Σ_i ‖clipped g_i,m‖² plus noise "
                        "(the official code); random: random scores from --seed, reads no data and costs no privacy.")
    g.add_argument("--selection_batch_size", type=int, default=16,
                   help="Samples per pass over all processes (each takes its share). The result does not depend "
                        "on the number of processes (up to float rounding).")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the per-sample clip-and-sum kernel (same arithmetic, less memory traffic; "
                        "worth it on a GPU at SD scale, where it reads each per-sample gradient twice instead of "
                        "five times).")
    g.add_argument("--ghost_norms", choices=per_sample.GHOST_MODES, default="auto",
                   help="Per-sample gradients of a matrix kept factored (its input and output gradient; norms from "
                        "their Gram matrices, the clipped sum as one matmul) instead of formed: auto where that is "
                        "smaller (tokens² <= in·out: cross-attention k/v, low-resolution levels), never, always. "
                        "The release is the same.")
    g.add_argument("--output", type=str, default="saliency_mask.json", help="Where to write the mask JSON.")
    add_runtime_args(parser)
    args = parser.parse_args(argv)
    saliency.num_selected(args.select_ratio, 1)  # validates the ratio before any work
    if not args.selection_noise_multiplier >= 0 or not args.selection_max_grad_norm > 0:
        parser.error("--selection_noise_multiplier must be >= 0 and --selection_max_grad_norm > 0.")
    if args.selection_noise_multiplier == 0 and args.scorer != "random":
        print("warning: --selection_noise_multiplier 0 releases exact scores: the mask is NOT private, and every "
              "model trained on it reports epsilon = inf.", file=sys.stderr)
    if args.selection_batch_size < 1:
        parser.error("--selection_batch_size must be >= 1.")
    return args


def main(argv=None):
    args = parse_args(argv)
    class_names, prompts = data.resolve_classes(args.class_prompts, args.class_names, args.prompt_template)
    accelerator = distributed.make_accelerator(args)
    device, weight_dtype = accelerator.device, modeling.weight_dtype_for(accelerator.mixed_precision)
    images = data.load_labelled_images(args, "train", class_names=class_names, max_samples=args.max_train_samples)
    parts = modeling.load_pipeline_parts(args.pretrained_model_name_or_path, args.revision, args.variant)
    modeling.backbones.check_resolution(parts, args.resolution)
    modeling.place(parts, device, weight_dtype)
    modules = saliency.candidate_modules(parts.denoiser, args.candidate_pool)
    n = len(images)
    dp_seed = distributed.shared_secret_seed(accelerator, args.dp_seed)
    accelerator.print(f"Selecting {saliency.num_selected(args.select_ratio, len(modules))} of {len(modules)} "
                      f"{args.candidate_pool} matrices from N = {n} images (scorer {args.scorer}).")

    batches, progress, timings = (), None, timing.Timings(device)
    if args.scorer != "random":
        with timings.stage("encode_latents"):
            cache = data.encode_latents(parts.vae, images, args.resolution, random_flip=args.random_flip,
                                        device=device, dtype=weight_dtype, show_progress=accelerator.is_main_process)
        prompt_embeds = modeling.encode_prompts(parts, prompts, device)
        # each image's diffusion draws come from the secret seed, keyed by the image itself (docs/design.md §1)
        batches = data.micro_batches(
            cache, prompt_embeds, torch.arange(n), rank=accelerator.process_index,
            world_size=accelerator.num_processes,
            micro_batch_size=math.ceil(args.selection_batch_size / accelerator.num_processes),
            num_train_timesteps=parts.noise_scheduler.config.num_train_timesteps, secret_seed=dp_seed,
            stream=("selection",), device=device)
        progress = tqdm(total=n, desc="Saliency pass", unit="img", disable=not accelerator.is_main_process)
    loss_fn = modeling.diffusion_loss_fn(parts.denoiser, parts.noise_scheduler, accelerator.autocast)
    with timings.stage("saliency_pass"):
        result = saliency.select_salient(
            loss_fn, modules, batches, dataset_size=n, scorer=args.scorer,
            noise_multiplier=args.selection_noise_multiplier, max_grad_norm=args.selection_max_grad_norm,
            ratio=args.select_ratio, granularity=args.granularity,
            noise_generator=(seeded_generator(args.seed, "random-mask") if args.scorer == "random"
                             else seeded_generator(dp_seed, "selection-noise", device=device)),
            accelerator=accelerator, progress=progress, compile=args.compile, ghost=args.ghost_norms)
    if progress is not None:
        progress.close()
    if args.scorer != "random" and result.num_samples != n:
        raise RuntimeError(f"The pass saw {result.num_samples} samples, expected {n}.")
    mask = saliency.build_mask(
        base_model=args.pretrained_model_name_or_path, modules=modules, pool=args.candidate_pool,
        granularity=args.granularity, ratio=args.select_ratio, scorer=args.scorer, result=result, seed=args.seed,
        noise_multiplier=args.selection_noise_multiplier, max_grad_norm=args.selection_max_grad_norm,
        dataset_size=n, class_names=class_names, class_prompts=prompts)
    mask["backbone"], mask["pipeline_class"] = parts.backbone.name, parts.backbone.pipeline_class
    if accelerator.is_main_process:
        saliency.write_mask(mask, args.output)
        summary = timings.summary()
        if args.scorer != "random":
            summary["saliency_images_per_s"] = round(n / summary["saliency_pass_s"], 2)
        with open(os.path.splitext(args.output)[0] + ".timings.json", "w") as f:  # beside, not inside, the release
            json.dump(summary, f, indent=2)
        if args.scorer == "grad_norm" and args.granularity == "matrix" and args.selection_noise_multiplier > 0:
            warn_if_noise_dominates(result, modules, args, n)
        accelerator.print(f"Kept {len(result.target_modules)} matrices; mask written to {args.output} "
                          f"(saliency pass {summary.get('saliency_images_per_s')} images/s)")
    distributed.finish(accelerator)


def warn_if_noise_dominates(result, modules, args, n: int) -> None:
    """Say so when most kept matrices score like pure noise: then the mask is close to a size-biased random one."""
    floor = saliency.noise_floor(modules, noise_multiplier=args.selection_noise_multiplier,
                                 max_grad_norm=args.selection_max_grad_norm, dataset_size=n)
    drowned = saliency.near_noise_floor(result.scores, floor, result.target_modules)
    if 2 * len(drowned) > len(result.target_modules):
        print(f"warning: {len(drowned)} of the {len(result.target_modules)} kept matrices score below √2 × the "
              f"noise's own level σ_s·C_s·√d/N (N = {n}): the selection is mostly noise, which favours the largest "
              "matrices. More images, or a smaller --selection_noise_multiplier (more of the ε budget), make it "
              "informative.", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
