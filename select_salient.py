#!/usr/bin/env python
"""DP-SAPF stage 1: pick the most salient attention matrices with one Gaussian query, and save the mask.

    accelerate launch select_salient.py --pretrained_model_name_or_path MODEL --train_data_dir DATA \
        --resolution 256 --select_ratio 0.3 --output mask.json

Each process takes a disjoint shard of the data, clips every sample's gradient over all candidate matrices
jointly, the clipped sums are added across processes and the noise is added once.
"""

import argparse
import math
import os
import sys

import torch
from tqdm.auto import tqdm

from dp_sapf import atomic, data, distributed, modeling, per_sample, privacy, saliency, timing
from dp_sapf.cli import (COUNT, FRACTION, NON_NEGATIVE, POSITIVE, PROBABILITY, ArgumentParser, add_clipping_args,
                         add_runtime_args, run_cli)
from dp_sapf.seeding import seeded_generator


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modeling.add_model_args(parser)
    data.add_data_args(parser)
    g = parser.add_argument_group("selection")
    g.add_argument("--select_ratio", type=FRACTION, default=0.3,
                   help="Fraction ρ of candidates to keep: the top ⌈ρ·M⌉ matrices (or ⌈ρ·L⌉ layers), at least one.")
    g.add_argument("--selection_noise_multiplier", type=NON_NEGATIVE, default=None,
                   help="σ_s of the Gaussian mechanism (default 5, the paper's): the noise std is σ_s·C_s/N on each mean "
                        "gradient, RDP ε(α) = α/(2σ_s²). The exponential and PTR mechanisms and the data-free scorers "
                        "add no Gaussian noise: giving it with them is an error.")
    g.add_argument("--selection_sample_rate", type=FRACTION, default=1.0,
                   help="q_s: the Gaussian query reads a Poisson subsample of the images (each one in with probability "
                        "q_s, drawn from the secret --dp_seed), its clipped sum divided by the expected q_s·N. Its cost "
                        "is one Poisson-subsampled Gaussian step, far below the full query's at small q_s, and the pass "
                        "costs q_s of the time. Default 1: every image, the paper's query.")
    g.add_argument("--selection_max_grad_norm", type=POSITIVE, default=1.0,
                   help="C_s: each sample's gradient over ALL candidate matrices is clipped jointly to this norm.")
    add_clipping_args(g, prefix="selection_", bound="C_s")
    g.add_argument("--granularity", choices=saliency.GRANULARITIES, default="matrix",
                   help="matrix: rank single q/k/v matrices; layer: rank attention layers by their concatenated "
                        "q/k/v block and keep or drop them whole.")
    g.add_argument("--candidate_pool", choices=saliency.CANDIDATE_POOLS, default="attention_qkv",
                   help="attention_qkv: to_q/to_k/to_v of every attn1 and attn2 (SD-v1.5: 96); attention_qkvo adds "
                        "to_out.0; all_linear: every nn.Linear of the UNet.")
    g.add_argument("--scorer", choices=saliency.SCORERS, default="grad_norm",
                   help="grad_norm: ‖mean clipped gradient‖ (the paper); grad_norm_debiased: its noisy square minus the "
                        "noise's expected share d_m(σ_s·C_s/N)² (same query and cost, Gaussian mechanism only); fisher: Σ_i ‖clipped g_i,m‖² (the official "
                        "code); snip: ‖θ_m ⊙ mean clipped gradient‖₁; synflow: data-free SynFlow of the public weights; "
                        "random: random scores from --seed. synflow and random read no images and cost no privacy.")
    g.add_argument("--selection_mechanism", choices=saliency.MECHANISMS, default="gaussian",
                   help="gaussian: noisy scores, RDP α/(2σ_s²) (the paper's default); exponential: k picks by the "
                        "peeling exponential mechanism (one-shot Gumbel top-k) with --selection_epsilon over all "
                        "picks, pure ε-DP and RDP α·ε²/(8k); ptr: propose-test-release of the exact top k, "
                        "(--selection_epsilon, --selection_delta)-DP, falling back to a random mask when the test fails. "
                        "Only gaussian releases scores.")
    g.add_argument("--selection_epsilon", type=POSITIVE, default=None,
                   help="ε_s of the exponential mechanism (all picks together) or of PTR's test. Required by them.")
    g.add_argument("--selection_delta", type=PROBABILITY, default=None,
                   help="δ_s of PTR (default 1/(10N), leaving 0.9/N of the default δ = 1/N for training).")
    g.add_argument("--selection_batch_size", "--max_physical_batch_size", dest="selection_batch_size", type=COUNT,
                   default=16,
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
    g.add_argument("--output", type=str, default="saliency_mask.json",
                   help="Where to write the mask JSON (replaced atomically if it exists).")
    add_runtime_args(parser)
    args = parser.parse_args(argv)
    data_free = args.scorer in saliency.DATA_FREE_SCORERS
    if args.selection_noise_multiplier is not None and (data_free or args.selection_mechanism != "gaussian"):
        parser.error("--selection_noise_multiplier is σ_s of the Gaussian mechanism; " + (
            f"--scorer {args.scorer} reads no data and adds no noise." if data_free else
            f"--selection_mechanism {args.selection_mechanism} adds none (its budget is --selection_epsilon)."))
    if args.selection_noise_multiplier is None:
        args.selection_noise_multiplier = 5.0
    if args.selection_mechanism != "gaussian" and args.scorer in saliency.NOISY_ONLY_SCORERS:
        parser.error(f"--scorer {args.scorer} debiases the Gaussian query's noise: it needs --selection_mechanism "
                     "gaussian.")
    if args.selection_mechanism != "gaussian" and data_free:
        parser.error(f"--scorer {args.scorer} reads no data: it needs no --selection_mechanism.")
    if args.selection_mechanism != "gaussian" and args.selection_epsilon is None:
        parser.error(f"--selection_mechanism {args.selection_mechanism} needs --selection_epsilon > 0 (finite).")
    if args.selection_mechanism == "gaussian" and args.selection_epsilon is not None:
        parser.error("--selection_epsilon sets the exponential or PTR mechanism's budget; the Gaussian one is set by "
                     "--selection_noise_multiplier (σ_s). Add --selection_mechanism exponential|ptr.")
    if args.selection_sample_rate < 1 and (data_free or args.selection_mechanism != "gaussian"):
        parser.error("--selection_sample_rate subsamples the Gaussian query: " + (
            f"--scorer {args.scorer} reads no data." if data_free else
            f"--selection_mechanism {args.selection_mechanism} ranks exact scores of every image."))
    if args.selection_delta is not None and args.selection_mechanism != "ptr":
        parser.error("--selection_delta is PTR's δ_s: it needs --selection_mechanism ptr.")
    if os.path.isdir(args.output):
        parser.error(f"--output {args.output!r} is a folder; give the mask's file name (e.g. {args.output}/mask.json).")
    if (args.selection_noise_multiplier == 0 and args.selection_mechanism == "gaussian" and not data_free):
        print("warning: --selection_noise_multiplier 0 releases exact scores: the mask is NOT private, and every "
              "model trained on it reports epsilon = inf.", file=sys.stderr)
    return args


def main(argv=None):
    args = parse_args(argv)
    class_names, prompts = data.resolve_classes(args.class_prompts, args.class_names, args.prompt_template)
    accelerator = distributed.make_accelerator(args)
    device, weight_dtype = accelerator.device, modeling.weight_dtype_for(accelerator.mixed_precision)
    data_free = args.scorer in saliency.DATA_FREE_SCORERS
    modeling.check_model_path(args.pretrained_model_name_or_path)
    images = None if data_free else data.load_labelled_images(args, "train", class_names=class_names,
                                                               max_samples=args.max_train_samples)
    parts = modeling.load_pipeline_parts(args.pretrained_model_name_or_path, args.revision, args.variant)
    modeling.backbones.check_resolution(parts, args.resolution)
    if not data_free:  # dropout masks would be public, positional randomness inside the mechanism
        per_sample.refuse_dropout(parts.denoiser, f"The {parts.backbone.denoiser_folder} of "
                                  f"{args.pretrained_model_name_or_path}", "set every dropout of "
                                  f"{parts.backbone.denoiser_folder}/config.json to 0, or use a data-free --scorer")
    modeling.place(parts, device, weight_dtype)
    modules = saliency.candidate_modules(parts.denoiser, args.candidate_pool)
    n = None if data_free else len(images)
    delta = args.selection_delta if args.selection_delta is not None or n is None else privacy.default_selection_delta(n)
    dp_seed = distributed.shared_secret_seed(accelerator, args.dp_seed)
    accelerator.print(f"Selecting {saliency.num_selected(args.select_ratio, len(modules))} of {len(modules)} "
                      f"{args.candidate_pool} matrices " + ("without reading any image" if data_free else
                      f"from N = {n} images" + ("" if args.selection_sample_rate >= 1 else
                                               f", a Poisson subsample of rate q_s = {args.selection_sample_rate:g}"))
                      + f" (scorer {args.scorer}"
                      + ("" if data_free else f", {args.selection_mechanism} mechanism") + ").")

    timings = timing.Timings(device)
    with timings.stage("saliency_pass"):
        if data_free:
            result = data_free_selection(args, parts, prompts, modules, device)
        else:
            result = private_selection(args, parts, images, prompts, modules, accelerator, dp_seed, delta,
                                       weight_dtype, timings)
    units = saliency.selection_units(list(modules), args.granularity)
    privacy_record = saliency.mask_privacy(
        scorer=args.scorer, mechanism=args.selection_mechanism, noise_multiplier=args.selection_noise_multiplier,
        max_grad_norm=args.selection_max_grad_norm, dataset_size=n, epsilon=args.selection_epsilon, delta=delta,
        num_picks=saliency.num_selected(args.select_ratio, len(units)), ptr=result.ptr,
        sample_rate=None if data_free else args.selection_sample_rate,
        sensitivity=None if data_free or args.selection_mechanism == "gaussian" else saliency.score_sensitivity(
            modules, units, args.scorer, args.selection_max_grad_norm, n))
    mask = saliency.build_mask(
        base_model=args.pretrained_model_name_or_path, modules=modules, pool=args.candidate_pool,
        granularity=args.granularity, ratio=args.select_ratio, scorer=args.scorer, result=result, seed=args.seed,
        privacy_record=privacy_record, class_names=class_names, class_prompts=prompts,
        backbone=parts.backbone.name, pipeline_class=parts.backbone.pipeline_class)
    if not data_free:
        mask["per_sample"] = {"clipping": args.selection_clipping, "noise_multiplicity": args.noise_multiplicity,
                              "automatic_gamma": args.selection_automatic_clipping_gamma
                              if args.selection_clipping == "automatic" else None}
    if accelerator.is_main_process:
        saliency.write_mask(mask, args.output)
        summary = timings.summary()
        if not data_free:  # the pass itself, as bench_step.py times it: the encoding stage (inside it) is apart
            summary["saliency_images_per_s"] = round(
                result.num_samples / (summary["saliency_pass_s"] - summary["encode_latents_s"]), 2)
        atomic.write_json(os.path.splitext(args.output)[0] + ".timings.json", summary)  # beside, not in, the release
        if (args.scorer in ("grad_norm", "grad_norm_debiased") and args.granularity == "matrix"
                and args.selection_mechanism == "gaussian" and args.selection_noise_multiplier > 0):
            warn_if_noise_dominates(result, modules, args, n * args.selection_sample_rate)
        if result.ptr is not None and not result.ptr["passed"]:
            print("warning: PTR's test failed (the top k is not stable enough for this ε_s, δ_s): the mask is a "
                  "random one drawn from --seed. Its cost is still spent.", file=sys.stderr)
        accelerator.print(f"Kept {len(result.target_modules)} matrices; mask written to {args.output}"
                          + ("" if data_free else f" (saliency pass {summary.get('saliency_images_per_s')} images/s)"))
    distributed.finish(accelerator)


def private_selection(args, parts, images, prompts, modules, accelerator, dp_seed, delta, weight_dtype, timings):
    """One pass over the data (or its Poisson subsample): clipped per-sample gradients, then the chosen mechanism."""
    device, n = accelerator.device, len(images)
    rate = args.selection_sample_rate
    # every image in with probability q_s, from the secret seed (identical on every rank); q_s = 1: all of them
    indices = torch.arange(n) if rate >= 1 else \
        data.poisson_sample(n, rate, seeded_generator(dp_seed, "selection-poisson", device=device))
    encoding = timing.Timings(device, warmup_units=1)  # steady images/s after the first batch, as the bench times it
    with timings.stage("encode_latents"):
        cache = data.encode_latents(parts.vae, images, args.resolution, random_flip=args.random_flip,
                                    device=device, dtype=weight_dtype, show_progress=accelerator.is_main_process,
                                    throughput=encoding, cache_dir=args.latent_cache_dir)
    timings.figures["encode_images_per_s"] = encoding.summary(unit="batch", items="images").get("steady_images_per_s")
    prompt_embeds = modeling.encode_prompts(parts, prompts, device)
    # each image's diffusion draws come from the secret seed, keyed by the image itself (docs/design.md §1)
    batches = data.micro_batches(
        cache, prompt_embeds, indices, rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        micro_batch_size=math.ceil(args.selection_batch_size / accelerator.num_processes),
        num_train_timesteps=parts.noise_scheduler.config.num_train_timesteps, secret_seed=dp_seed,
        stream=("selection",), device=device, multiplicity=args.noise_multiplicity)
    progress = tqdm(total=len(indices), desc="Saliency pass", unit="img", disable=not accelerator.is_main_process)
    loss_fn = modeling.diffusion_loss_fn(parts.denoiser, parts.noise_scheduler, accelerator.autocast)
    result = saliency.select_salient(
        # the normaliser: N, or the expected subsample size q_s·N (the sum over a Poisson sample estimates q_s × the full sum)
        loss_fn, modules, batches, dataset_size=n * rate, scorer=args.scorer, mechanism=args.selection_mechanism,
        noise_multiplier=args.selection_noise_multiplier, max_grad_norm=args.selection_max_grad_norm,
        epsilon=args.selection_epsilon, delta=delta, ratio=args.select_ratio, granularity=args.granularity,
        noise_generator=seeded_generator(dp_seed, "selection-noise", device=device),
        fallback_generator=seeded_generator(args.seed, "ptr-fallback-mask"),
        accelerator=accelerator, progress=progress, compile=args.compile, ghost=args.ghost_norms,
        clipping=args.selection_clipping, automatic_gamma=args.selection_automatic_clipping_gamma,
        multiplicity=args.noise_multiplicity)
    progress.close()
    if result.num_samples != len(indices):
        raise RuntimeError(f"The pass saw {result.num_samples} samples, expected {len(indices)}.")
    return result


def data_free_selection(args, parts, prompts, modules, device) -> saliency.SelectionResult:
    """random: scores from --seed; synflow: the model's own weights on constant inputs. No image is read."""
    if args.scorer == "random":
        return saliency.select_salient(None, modules, (), dataset_size=0, scorer="random", noise_multiplier=0.0,
                                       max_grad_norm=1.0, ratio=args.select_ratio, granularity=args.granularity,
                                       noise_generator=seeded_generator(args.seed, "random-mask"))
    scores = saliency.synflow_scores(parts.denoiser, modules,
                                     modeling.constant_input_forward(parts, prompts, args.resolution, device))
    return saliency.SelectionResult(scores, saliency.rank_and_select(scores, args.select_ratio, args.granularity,
                                                                     args.scorer), 0)


def warn_if_noise_dominates(result, modules, args, n: float) -> None:
    """Say so when most kept matrices score like pure noise: then the mask is close to a size-biased random one
    (grad_norm) or a random one (grad_norm_debiased). n: the query's normaliser, N (or q_s·N, the expected subsample)."""
    floor = saliency.noise_floor(modules, noise_multiplier=args.selection_noise_multiplier,
                                 max_grad_norm=args.selection_max_grad_norm, dataset_size=n)
    sizes = {name: m.weight.numel() for name, m in modules.items()}
    drowned = saliency.near_noise_floor(result.scores, floor, result.target_modules, args.scorer, sizes)
    if 2 * len(drowned) > len(result.target_modules):
        size = f"N = {n:,.0f}" if args.selection_sample_rate >= 1 else f"q_s·N = {n:,.0f}, the expected subsample"
        more = "More images" if args.selection_sample_rate >= 1 else "A larger --selection_sample_rate, more images"
        if args.scorer == "grad_norm":
            print(f"warning: {len(drowned)} of the {len(result.target_modules)} kept matrices score below √2 × the "
                  f"noise's own level σ_s·C_s·√d/N ({size}): the selection is mostly noise, which favours the "
                  "largest matrices. --scorer grad_norm_debiased ranks the same query without that size bias (no "
                  f"extra ε; docs/scorers.md); {more.lower()}, or a smaller --selection_noise_multiplier (more of "
                  "the ε budget) also make it informative.", file=sys.stderr)
        else:
            print(f"warning: {len(drowned)} of the {len(result.target_modules)} kept matrices have a debiased score "
                  f"below twice its noise's spread (σ_s·C_s/N)²·√(2d) ({size}): the selection is mostly noise. "
                  f"{more}, or a smaller --selection_noise_multiplier (more of the ε budget), make it informative.",
                  file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
