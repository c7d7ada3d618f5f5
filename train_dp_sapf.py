#!/usr/bin/env python
"""DP-SAPF stage 2: DP-SGD on LoRA adapters of the salient matrices, calibrated to a target (ε, δ).

    accelerate launch train_dp_sapf.py --pretrained_model_name_or_path MODEL --train_data_dir DATA \
        --saliency_mask mask.json --target_epsilon 10 --train_batch_size 4096 --max_train_steps 1000

DP-SGD: Poisson sampling with rate q = B/N; each sample's gradient over all trainable tensors is clipped
jointly to C; clipped sums are added across processes; N(0, σ²C²) is added once per logical step, identically
on every process; the sum is divided by the expected batch B. σ is the smallest value whose ε, composed with
the mask's selection cost, meets the target. The output folder holds pytorch_lora_weights.safetensors
(`pipe.load_lora_weights(output_dir)`; a DiT's through peft, see the card), privacy_report.json and a model
card. The backbone (SD U-Net, SD3 or DiT) is read from the model folder (dp_sapf/backbones.py).
"""

import argparse
import logging
import math
import os
import shutil
import traceback

import numpy as np
import torch
from tqdm.auto import tqdm

from dp_sapf import atomic, data, distributed, hub, modeling, per_sample, privacy, run_folder, saliency, timing
from dp_sapf.cli import (BETA, COUNT, NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE, PROBABILITY, ArgumentParser,
                         add_clipping_args, add_runtime_args, run_cli)
from dp_sapf.seeding import seeded_generator

logger = logging.getLogger("train_dp_sapf")
# diffusers' train_text_to_image_lora.py flags that DP-SGD cannot take as they are: each is refused with what to use
DIFFUSERS_FLAGS_REFUSED = {
    "--gradient_accumulation_steps": "DP-SGD's logical batch is --train_batch_size (the expected Poisson batch over all "
                                     "processes, noised once per step); micro-batches for memory are "
                                     "--max_physical_batch_size. Set those two instead.",
    "--dataloader_num_workers": "the images are encoded once into cached latents before training (see "
                                "--latent_cache_dir); no data loader runs during DP-SGD.",
    "--caption_column": "per-image captions are private data: conditioning on them would leak them. Conditioning is "
                        "one public prompt per class (--class_prompts / --class_names).",
    "--snr_gamma": "Min-SNR loss weighting is not implemented for DP-SGD here yet.",
}
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modeling.add_model_args(p)
    data.add_data_args(p)
    g = p.add_argument_group("what is trained")
    g.add_argument("--saliency_mask", type=str, default=None,
                   help="Mask JSON from select_salient.py: LoRA goes on exactly its target_modules and its selection "
                        "cost is composed into ε. Required with --lora_target mask.")
    g.add_argument("--lora_target", choices=["mask", "all_attention", "warmup_select"], default="mask",
                   help="mask: the saliency mask's matrices (DP-SAPF); all_attention: to_q/to_k/to_v/to_out.0 of "
                        "every attention layer, no selection stage (the DP-LoRA baseline); warmup_select: LoRA on "
                        "every --candidate_pool matrix for --warmup_select_steps DP-SGD steps, then only the top "
                        "--select_ratio by the debiased squared norm of their noisy gradients, for the remaining "
                        "steps: the selection is post-processing of DP-SGD's own output and costs no extra ε.")
    g.add_argument("--warmup_select_steps", type=COUNT, default=None,
                   help="W of --lora_target warmup_select (default: a tenth of --max_train_steps, at least 1).")
    g.add_argument("--warmup_dropped", choices=["frozen", "reset"], default=None,
                   help="--lora_target warmup_select: what becomes of the warm-up LoRA of the matrices not kept. "
                        "frozen (default; it beat reset on public MNIST-5k, experiments/tune_warmup_dropped.sh): kept "
                        "at its value after step W and no longer trained, so the release adapts every candidate (the "
                        "kept ones trained for all T steps); reset: removed, so the release adapts the kept matrices "
                        "only. Either way it is post-processing of the same noisy steps.")
    g.add_argument("--select_ratio", type=PROBABILITY, default=0.3,
                   help="ρ of --lora_target warmup_select: keep the top ⌈ρ·M⌉ candidate matrices.")
    g.add_argument("--candidate_pool", choices=["attention_qkv", "attention_qkvo"], default="attention_qkv",
                   help="Candidates of --lora_target warmup_select (as select_salient.py's).")
    g.add_argument("--train_mode", choices=["lora", "direct", "full"], default="lora",
                   help="lora: train LoRA factors; direct: train the selected weight matrices themselves (the paper's "
                        "'w/o LoRA'; with all_attention the DP-LDM baseline); full: every denoiser parameter (DP-Finetune; "
                        "slow and memory-hungry, per-sample gradients by opacus in fp32 only).")
    g.add_argument("--rank", type=COUNT, default=4, help="LoRA rank r.")
    g.add_argument("--lora_alpha", type=POSITIVE, default=None, help="LoRA alpha (default: equal to --rank).")
    g = p.add_argument_group("privacy")
    g.add_argument("--target_epsilon", type=str, default=None,
                   help="Target ε of the whole release (selection + training); σ is calibrated to meet it. "
                        "'inf' trains without privacy (same as --no_dp).")
    g.add_argument("--target_delta", type=PROBABILITY, default=None, help="δ (default 1/N; a warning above 1/N).")
    g.add_argument("--noise_multiplier", type=POSITIVE, default=None,
                   help="Give σ directly instead of --target_epsilon; the resulting ε is reported.")
    g.add_argument("--no_dp", action="store_true",
                   help="Non-private training (the 'LoRA w/o DP' comparison): no clipping, no noise, ε = inf.")
    g.add_argument("--max_grad_norm", type=POSITIVE, default=1.0,
                   help="C, the per-sample sensitivity bound (not diffusers' gradient-norm clipping): each sample's "
                        "gradient, joint over all trainable tensors, is scaled to norm at most C before the sum.")
    add_clipping_args(g)
    g.add_argument("--accountant", choices=["rdp", "prv", "pld"], default="rdp",
                   help="rdp (as the paper; opacus), or the tighter prv (opacus) / pld (dp-accounting).")
    g.add_argument("--per_sample_engine", choices=per_sample.ENGINES, default="auto",
                   help="hooks: our nn.Linear hooks (any autocast dtype; fastest in eager mode); probes: per-sample "
                        "gradients through autograd itself (nn.Linear only; works under --compile, where tensor hooks "
                        "break the graph); opacus: GradSampleModule (fp32 only, any layer). auto: probes with "
                        "--compile, else hooks; opacus when a trainable tensor is outside nn.Linear (--train_mode full).")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the denoiser (same result, ~1.6x the step throughput of eager on an H100). Every "
                        "micro-batch is padded to --max_physical_batch_size with zero-weight rows (zero loss, zero "
                        "gradient, nothing added to the clipped sum), so Poisson batches of any size reuse one graph.")
    g.add_argument("--allow_tf32", action="store_true",
                   help="Allow TF32 matmuls on Ampere+ GPUs (faster fp32 products, slightly less precise).")
    g = p.add_argument_group("optimisation")
    g.add_argument("--train_batch_size", type=COUNT, default=4096,
                   help="Expected logical batch B per DP-SGD step over ALL processes: Poisson rate q = B/N (paper: "
                        "4096). Unlike diffusers' per-device batch; memory is --max_physical_batch_size.")
    g.add_argument("--max_physical_batch_size", type=COUNT, default=64,
                   help="Samples per forward/backward on each process (memory only; no effect on the result).")
    g.add_argument("--max_train_steps", type=COUNT, default=1000, help="Number of DP-SGD steps T (paper: 1000).")
    g.add_argument("--num_train_epochs", type=POSITIVE, default=None,
                   help="Set T from epochs instead: T = ⌈epochs·N/B⌉ expected passes over the data (overrides "
                        "--max_train_steps; Poisson batches have no exact epochs).")
    g.add_argument("--gradient_checkpointing", action="store_true",
                   help="Recompute the denoiser's activations in the backward pass to save memory (same gradients; "
                        "the hooked LoRA layers keep their inputs for the per-sample products).")
    g.add_argument("--prediction_type", choices=["epsilon", "v_prediction"], default=None,
                   help="Train for this target instead of the scheduler's own prediction_type (as in diffusers).")
    # diffusers flags whose meaning does not carry over to DP-SGD: refused with the flag to use instead
    for flag in DIFFUSERS_FLAGS_REFUSED:
        g.add_argument(flag, type=str, default=None, help=argparse.SUPPRESS)
    g.add_argument("--learning_rate", type=POSITIVE, default=5e-4, help="AdamW learning rate (official code: 5e-4).")
    g.add_argument("--lr_scheduler", type=str, default="constant", choices=LR_SCHEDULERS,
                   help='One of diffusers\' schedulers: "linear", "cosine", "cosine_with_restarts", "polynomial", '
                        '"constant", "constant_with_warmup".')
    g.add_argument("--lr_warmup_steps", type=NON_NEGATIVE_INT, default=0, help="Warm-up steps of the scheduler.")
    g.add_argument("--adam_beta1", type=BETA, default=0.9, help="AdamW beta1.")
    g.add_argument("--adam_beta2", type=BETA, default=0.999, help="AdamW beta2.")
    g.add_argument("--adam_weight_decay", type=NON_NEGATIVE, default=1e-2, help="AdamW weight decay.")
    g.add_argument("--adam_epsilon", type=POSITIVE, default=1e-8, help="AdamW epsilon.")
    g = p.add_argument_group("outputs")
    g.add_argument("--output_dir", type=str, default="dp-sapf-lora",
                   help="Where results and checkpoints go. A folder holding a finished run is refused (see "
                        "--overwrite_output_dir).")
    g.add_argument("--overwrite_output_dir", action="store_true",
                   help="Replace a finished run in --output_dir (its checkpoints are deleted when the new run starts).")
    g.add_argument("--logging_dir", type=str, default="logs", help="Tracker logs, under --output_dir (never pushed).")
    g.add_argument("--report_to", type=str, default=None,
                   help='Tracker: "tensorboard", "wandb", "all" or "none" (default: tensorboard with --no_dp, none in a '
                        'private run). The logged loss and realised batch sizes are NOT private: a private run refuses '
                        'a tracker unless --log_nonprivate_metrics says so out loud.')
    g.add_argument("--log_nonprivate_metrics", action="store_true",
                   help="Allow --report_to in a private run although it records the exact (non-private) training loss "
                        "and realised Poisson batch sizes of the sensitive data, under --output_dir/--logging_dir "
                        "(tensorboard) or on the tracker's servers (wandb). Never publish those logs.")
    g.add_argument("--checkpointing_steps", type=COUNT, default=500,
                   help="Save a resumable checkpoint (LoRA, optimizer, scheduler, RNG, privacy ledger) every X steps.")
    g.add_argument("--checkpoints_total_limit", type=COUNT, default=None, help="Keep at most this many checkpoints.")
    g.add_argument("--stop_after_steps", type=COUNT, default=None,
                   help="Stop after this many steps of this call, with a checkpoint, to fit a time slot; rerun the same "
                        "command with --resume_from_checkpoint latest to continue exactly where it stopped.")
    g.add_argument("--resume_from_checkpoint", type=str, default=None,
                   help='"latest" or a checkpoint folder: continue exactly where it stopped, with the same privacy ledger.')
    g.add_argument("--validation_prompt", type=str, default=None,
                   help="Prompt for validation images (default: every class prompt).")
    g.add_argument("--num_validation_images", type=COUNT, default=1, help="Validation images per prompt.")
    g.add_argument("--validation_steps", type=COUNT, default=None,
                   help="Render validation images every X steps (and always at the end). Default: only at the end.")
    g.add_argument("--validation_inference_steps", type=COUNT, default=25, help="Denoising steps of validation images.")
    g.add_argument("--push_to_hub", action="store_true", help="Push the weights, privacy report and model card.")
    g.add_argument("--hub_model_id", type=str, default=None, help="Hub repo id (default: the output folder's name).")
    g.add_argument("--hub_token", type=str, default=None, help="Hub token (default: the stored login).")
    add_runtime_args(p)
    args = p.parse_args(argv)

    for flag, why in DIFFUSERS_FLAGS_REFUSED.items():
        if getattr(args, flag.lstrip("-")) is not None:
            p.error(f"{flag} is not taken here: {why}")
    if [args.target_epsilon is not None, args.noise_multiplier is not None, args.no_dp].count(True) != 1:
        p.error("Give exactly one of --target_epsilon, --noise_multiplier or --no_dp.")
    try:
        if args.target_epsilon is not None:
            args.target_epsilon = privacy.parse_target_epsilon(args.target_epsilon)
            args.no_dp = math.isinf(args.target_epsilon)  # 'inf' is the documented --no_dp
    except ValueError as err:
        p.error(str(err))
    if args.report_to is None:
        args.report_to = "tensorboard" if args.no_dp else "none"
    elif args.report_to != "none" and not args.no_dp and not args.log_nonprivate_metrics:
        p.error(f"--report_to {args.report_to} would record the exact training loss and batch sizes of the sensitive "
                "data, which are not private (and wandb sends them off the machine). Add --log_nonprivate_metrics to "
                "accept that, or use --report_to none.")
    if args.lora_target == "mask" and not args.saliency_mask:
        p.error("--lora_target mask needs --saliency_mask (run select_salient.py), or use --lora_target all_attention.")
    if args.train_mode == "full" and args.saliency_mask:
        p.error("--train_mode full trains every denoiser parameter; drop --saliency_mask.")
    if args.lora_target == "warmup_select":
        if args.saliency_mask or args.train_mode != "lora":
            p.error("--lora_target warmup_select chooses its own matrices and trains LoRA: drop --saliency_mask and "
                    "--train_mode.")
        if args.warmup_dropped == "frozen" and (args.compile or args.per_sample_engine == "opacus"):
            p.error("--warmup_dropped frozen keeps adapters the per-sample engine no longer tracks: it runs on the "
                    "hooks engine only (drop --compile and --per_sample_engine opacus).")
        args.warmup_dropped = args.warmup_dropped or "frozen"
    elif args.warmup_select_steps is not None or args.warmup_dropped is not None:
        p.error("--warmup_select_steps and --warmup_dropped belong to --lora_target warmup_select.")
    if args.resume_from_checkpoint and args.overwrite_output_dir:
        p.error("--overwrite_output_dir starts a new run; it cannot --resume_from_checkpoint.")
    return args


def render_validation(args, parts, prompts, accelerator, step, weight_dtype):
    """Images of the current (private) model for each class; post-processing of DP weights, so privacy-free."""
    pipe = modeling.backbones.pipeline_from_parts(args.pretrained_model_name_or_path, parts,
                                                  accelerator.unwrap_model(parts.denoiser), dtype=weight_dtype,
                                                  revision=args.revision, variant=args.variant)
    prompts = [args.validation_prompt] if args.validation_prompt and parts.backbone.uses_prompts else prompts
    generator = torch.Generator(device=accelerator.device).manual_seed(args.seed)
    images = []
    with accelerator.autocast():
        for c, prompt in enumerate(prompts):
            images += modeling.backbones.generate(
                pipe, class_ids=[c] * args.num_validation_images, prompts=[prompt] * args.num_validation_images,
                generators=generator, num_inference_steps=args.validation_inference_steps,
                guidance_scale=None, resolution=args.resolution)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", np.stack([np.asarray(i) for i in images]), step, dataformats="NHWC")
    return images


def main(argv=None):
    args = parse_args(argv)
    run_folder.check_not_finished(args.output_dir, overwrite=args.overwrite_output_dir)  # before any work
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler

    report_to = None if args.report_to == "none" else args.report_to
    accelerator = distributed.make_accelerator(args, log_with=report_to, project_config=ProjectConfiguration(
        project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)))
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    device, weight_dtype = accelerator.device, modeling.weight_dtype_for(accelerator.mixed_precision)
    set_seed(args.seed)  # public randomness only (LoRA init); the mechanism's comes from the secret DP seed
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    private = not args.no_dp

    # 1. Load, and check everything that can be checked before the sensitive images are read beyond their count.
    class_names, prompts = data.resolve_classes(args.class_prompts, args.class_names, args.prompt_template)
    mask = saliency.read_mask(args.saliency_mask) if args.lora_target == "mask" and args.train_mode != "full" else None
    modeling.check_model_path(args.pretrained_model_name_or_path)
    images = data.load_labelled_images(args, "train", class_names=class_names, max_samples=args.max_train_samples)
    n = len(images)
    if args.num_train_epochs is not None:
        args.max_train_steps = max(1, math.ceil(args.num_train_epochs * n / args.train_batch_size))
        accelerator.print(f"--num_train_epochs {args.num_train_epochs:g}: T = {args.max_train_steps} steps of B = "
                          f"{args.train_batch_size} (N = {n}).")
    if args.lora_target == "warmup_select":
        args.warmup_select_steps = args.warmup_select_steps or max(1, args.max_train_steps // 10)
        if args.warmup_select_steps >= args.max_train_steps:
            raise ValueError(f"--warmup_select_steps {args.warmup_select_steps} leaves no step to train the selected "
                             f"matrices (T = {args.max_train_steps}).")
    if args.train_batch_size > n:
        raise ValueError(f"--train_batch_size {args.train_batch_size} exceeds the dataset size N = {n}: the "
                         "sample rate q = B/N must be at most 1.")
    parts = modeling.load_pipeline_parts(args.pretrained_model_name_or_path, args.revision, args.variant)
    modeling.backbones.check_resolution(parts, args.resolution)
    base_signature = modeling.backbones.weights_signature(parts.denoiser)  # before any adapter or dtype cast
    if private:  # dropout masks would be public, positional randomness inside the mechanism
        per_sample.refuse_dropout(parts.denoiser, f"The {parts.backbone.denoiser_folder} of "
                                  f"{args.pretrained_model_name_or_path}", "set every dropout of "
                                  f"{parts.backbone.denoiser_folder}/config.json to 0 (or train with --no_dp)")
    if mask is not None:
        saliency.check_mask(mask, parts.denoiser, n)

    # 2. The budget: the mask's selection cost, and σ calibrated so that selection + training meet the target.
    ledger = privacy.PrivacyLedger.plan(
        dataset_size=n, expected_batch_size=args.train_batch_size, steps=args.max_train_steps,
        max_grad_norm=args.max_grad_norm, accountant=args.accountant, delta=args.target_delta,
        target_epsilon=None if args.no_dp else args.target_epsilon, noise_multiplier=args.noise_multiplier,
        selection=privacy.SelectionCost.from_mask(mask))
    final = ledger.spent(ledger.total_steps)
    accelerator.print(f"N = {n}, q = {ledger.sample_rate:.5g}, T = {ledger.total_steps}, σ = {ledger.noise_multiplier:.5g}, "
                      f"final ε = {final.epsilon:.5g} at δ = {ledger.delta:.3g} ({ledger.accountant}; selection alone "
                      f"{final.epsilon_selection_only:.4g}, training alone {final.epsilon_training_only:.4g})"
                      if private else f"N = {n}: NON-PRIVATE training (no clipping, no noise, ε = inf).")

    # 3. The trainable tensors and, for DP, the per-sample engine.
    modeling.place(parts, device, weight_dtype)
    if args.prediction_type is not None:
        parts.noise_scheduler.register_to_config(prediction_type=args.prediction_type)
    if args.gradient_checkpointing:
        parts.denoiser.enable_gradient_checkpointing()
    resume = run_folder.resolve_checkpoint(args.output_dir, args.resume_from_checkpoint)
    warmup = None  # --lora_target warmup_select: the scores of its first W steps, then its mask
    if args.lora_target == "warmup_select":
        candidates = saliency.candidate_modules(parts.denoiser, args.candidate_pool)
        warmup = {"state": None, "kept": None}
        if resume is not None:  # a checkpoint after step W trains only the matrices kept at W
            warmup.update(run_folder.read_checkpoint_extra(resume).get("warmup") or {})
        # frozen: every candidate keeps its adapter; reset: after step W only the kept matrices carry LoRA
        target_modules = (warmup["kept"] if args.warmup_dropped == "reset" else None) or list(candidates)
    else:
        target_modules = (list(mask["target_modules"]) if mask is not None else
                          None if args.train_mode == "full" else
                          list(saliency.candidate_modules(parts.denoiser, "attention_qkvo")))
    # rows of one micro-batch: whole samples of K copies each, at most --max_physical_batch_size (at least one sample)
    padded_rows = max(1, args.max_physical_batch_size // args.noise_multiplicity) * args.noise_multiplicity

    def trainable(modules, named=None):
        """LoRA (or the weights) of `modules`, their per-sample engine and the step that clips, sums and noises;
        `named`: train these existing tensors instead of adding new ones (the kept part of a frozen warm-up)."""
        if named is None:
            named = modeling.make_trainable(parts.denoiser, args.train_mode, modules, args.rank, args.lora_alpha)
        params = list(named.values())
        model, engine = parts.denoiser, None
        if private:
            engine, model = per_sample.make_engine(args.per_sample_engine, parts.denoiser, params,
                                                   compile=args.compile, mixed_precision=accelerator.mixed_precision,
                                                   max_batch_size=padded_rows)
        if args.compile:
            model = torch.compile(model)
        step_gradients = per_sample.StepGradients(
            modeling.diffusion_loss_fn(model, parts.noise_scheduler, accelerator.autocast), params, private=private,
            max_grad_norm=args.max_grad_norm, engine=engine, accelerator=accelerator, compile=args.compile,
            clipping=args.clipping, automatic_gamma=args.automatic_clipping_gamma,
            multiplicity=args.noise_multiplicity)
        optimizer = torch.optim.AdamW(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                      weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
        return named, step_gradients, optimizer

    named, step_gradients, optimizer = trainable(target_modules)
    scores = saliency.NoisyGradientScores(named) if warmup is not None else None
    # What a checkpoint holds: the trained tensors, and under --warmup_dropped frozen the frozen adapters too.
    checkpoint_tensors = named
    # A checkpoint to resume must hold this run's privacy parameters and tensors: checked before anything is written.
    if resume is not None:
        run_folder.check_checkpoint(
            resume, checkpoint_tensors,
            lambda state: privacy.PrivacyLedger.from_state_dict(state).check_compatible(ledger))
        if warmup is not None and warmup["kept"] is not None and args.warmup_dropped == "frozen":
            named, step_gradients, optimizer = freeze_dropped(named, warmup["kept"], trainable)

    # Encoding reads every image: an unreadable one fails here, before the output folder is touched.
    timings = timing.Timings(device)
    encoding = timing.Timings(device, warmup_units=1)  # steady images/s after the first batch, as the bench times it
    with timings.stage("encode_latents"):
        cache = data.encode_latents(parts.vae, images, args.resolution, random_flip=args.random_flip, device=device,
                                    dtype=weight_dtype, show_progress=accelerator.is_main_process, throughput=encoding,
                                    cache_dir=args.latent_cache_dir)
    timings.figures["encode_images_per_s"] = encoding.summary(unit="batch", items="images").get("steady_images_per_s")
    prompt_embeds = modeling.encode_prompts(parts, prompts, device)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        run_folder.write_status(args.output_dir, "running")
        if args.overwrite_output_dir:  # the replaced run's checkpoints are not this run's
            for old in run_folder.list_checkpoints(args.output_dir):
                shutil.rmtree(old)
    try:
        lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps,
                                     num_training_steps=args.max_train_steps)
        first_step, dp_seed = 0, None
        if args.resume_from_checkpoint and resume is None:
            accelerator.print("No checkpoint to resume from: starting a new run.")
        if resume is not None:
            saved = run_folder.load_checkpoint(
                resume, checkpoint_tensors, optimizer, lr_scheduler,
                check_ledger=lambda state: privacy.PrivacyLedger.from_state_dict(state).check_compatible(ledger))
            first_step, dp_seed = saved["step"], saved["dp_seed"]
            if warmup is not None and warmup["state"] is not None and warmup["kept"] is None:
                scores.load_state_dict(warmup["state"])
            ledger.steps_done = first_step
            accelerator.print(f"Resumed from {resume} at step {first_step} (ε spent so far {ledger.epsilon_spent():.4g}).")
        if dp_seed is None:
            dp_seed = distributed.shared_secret_seed(accelerator, args.dp_seed)
        noise_std = ledger.noise_multiplier * args.max_grad_norm / args.train_batch_size if private else 0.0
        if accelerator.is_main_process:
            accelerator.init_trackers("dp-sapf", config={k: v for k, v in vars(args).items()
                                                         if isinstance(v, (int, float, str, bool))})

        # 4. The loop: Poisson sample, per-sample draws, clipped sum, noise once, /B, optimizer step.
        epsilon_every = 1 if args.accountant == "rdp" else max(1, args.max_train_steps // 50)
        spent = ledger.epsilon_spent()
        parts.denoiser.train()
        progress = tqdm(range(first_step, args.max_train_steps), initial=first_step, total=args.max_train_steps,
                        desc="DP-SGD" if private else "non-private", disable=not accelerator.is_main_process)
        timings.start_units()
        stop_at = args.max_train_steps if args.stop_after_steps is None else \
            min(args.max_train_steps, first_step + args.stop_after_steps)
        for step in range(first_step, args.max_train_steps):
            if step == stop_at:  # a checkpoint of this very step is on disk (below): the next call resumes from it
                progress.close()
                accelerator.print(f"Stopped after step {step} (--stop_after_steps); rerun with "
                                  "--resume_from_checkpoint latest to continue.")
                distributed.finish(accelerator)
                return
            indices = data.poisson_sample(n, ledger.sample_rate, seeded_generator(dp_seed, "poisson", step, device=device))
            batches = data.micro_batches(
                cache, prompt_embeds, indices, rank=accelerator.process_index, world_size=accelerator.num_processes,
                micro_batch_size=args.max_physical_batch_size,
                num_train_timesteps=parts.noise_scheduler.config.num_train_timesteps, secret_seed=dp_seed,
                stream=("train", step), device=device, pad_to=padded_rows if args.compile else None,
                multiplicity=args.noise_multiplicity)
            loss_sum = step_gradients(batches, noise_multiplier=ledger.noise_multiplier,
                                      noise_generator=seeded_generator(dp_seed, "noise", step, device=device),
                                      expected_batch_size=args.train_batch_size, realised_batch_size=indices.shape[0])
            if warmup is not None and warmup["kept"] is None:
                scores.add_step(noise_std)  # reads only the noisy gradients the optimizer applies
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            ledger.steps_done = step + 1
            if warmup is not None and warmup["kept"] is None and step + 1 == args.warmup_select_steps:
                warmup["state"] = scores.state_dict()
                warmup["kept"] = saliency.rank_and_select(scores.scores, args.select_ratio, "matrix",
                                                          saliency.DP_SGD_SCORER)
                if args.warmup_dropped == "frozen":
                    named, step_gradients, optimizer = freeze_dropped(named, warmup["kept"], trainable, optimizer,
                                                                      lr_scheduler)
                else:
                    named, step_gradients, optimizer = keep_selected(parts.denoiser, named, warmup["kept"],
                                                                     trainable, optimizer, lr_scheduler)
                    checkpoint_tensors = named
                accelerator.print(f"Warm-up selection after {step + 1} DP-SGD steps: kept {len(warmup['kept'])} of "
                                  f"{len(scores.scores)} matrices (post-processing of those steps: no extra ε).")

            loss = (accelerator.reduce(loss_sum, reduction="sum") / max(1, indices.shape[0])).item()  # syncs
            timings.unit_done(indices.shape[0])
            if private and ((step + 1) % epsilon_every == 0 or step + 1 == args.max_train_steps):
                spent = ledger.epsilon_spent()  # numerical accountants take ~1 s: not at every step
            logs = {"loss": loss, "epsilon": spent, "batch": int(indices.shape[0]), "lr": lr_scheduler.get_last_lr()[0]}
            progress.set_postfix(loss=f"{loss:.4f}", eps=f"{spent:.3g}", batch=logs["batch"])
            progress.update(1)
            accelerator.log(logs, step=step + 1)
            if ((step + 1) % args.checkpointing_steps == 0 or step + 1 == stop_at) and \
                    step + 1 < args.max_train_steps and accelerator.is_main_process:
                if warmup is not None and warmup["kept"] is None:
                    warmup["state"] = scores.state_dict()
                run_folder.save_checkpoint(args.output_dir, step + 1, checkpoint_tensors, optimizer, lr_scheduler,
                                           ledger.state_dict(), dp_seed, args.seed, keep=args.checkpoints_total_limit,
                                           extra=None if warmup is None else {"warmup": warmup})
            if args.validation_steps and (step + 1) % args.validation_steps == 0 and accelerator.is_main_process:
                render_validation(args, parts, prompts, accelerator, step + 1, weight_dtype)
                parts.denoiser.train()
        progress.close()
        accelerator.wait_for_everyone()

        # 5. Outputs.
        if warmup is not None:
            mask = warmup_mask(args, candidates, warmup, ledger, n, class_names, prompts, parts.backbone)
        if accelerator.is_main_process:
            finish_outputs(args, parts, class_names, prompts, accelerator, ledger, mask, n, weight_dtype, timings,
                           base_signature)
    except BaseException as err:
        if accelerator.is_main_process and os.path.isdir(args.output_dir):
            run_folder.write_status(args.output_dir, "failed", error=f"{type(err).__name__}: {err}",
                                    traceback=traceback.format_exc())
        raise
    distributed.finish(accelerator)


def keep_selected(denoiser, named, kept, trainable, optimizer, lr_scheduler):
    """After the warm-up: LoRA on the kept matrices only, carrying their warm-up values and Adam moments; the
    dropped matrices' LoRA is removed (reset to the base weights), so the release adapts only the kept ones."""
    values = {k: p.detach().clone() for k, p in named.items()}
    moments = {k: optimizer.state.get(p) for k, p in named.items()}
    modeling.backbones.remove_lora(denoiser)
    new_named, step_gradients, new_optimizer = trainable(kept)
    with torch.no_grad():
        for k, p in new_named.items():
            p.copy_(values[k])
            if moments[k]:
                new_optimizer.state[p] = {name: v.clone() if torch.is_tensor(v) else v for name, v in moments[k].items()}
    lr_scheduler.optimizer = new_optimizer  # the schedule goes on from the same step count
    for group in new_optimizer.param_groups:
        group["lr"] = lr_scheduler.get_last_lr()[0]
    return new_named, step_gradients, new_optimizer


def freeze_dropped(named, kept, trainable, optimizer=None, lr_scheduler=None):
    """After the warm-up (--warmup_dropped frozen): the dropped matrices' LoRA stays at its warm-up value and stops
    training; the kept ones go on with their Adam moments, under a per-sample engine over them alone."""
    kept_named = {k: p for k, p in named.items() if k.split(".lora_", 1)[0] in set(kept)}
    for k, p in named.items():
        if k not in kept_named:
            p.requires_grad_(False)
            p.grad = None
    new_named, step_gradients, new_optimizer = trainable(kept, kept_named)
    if optimizer is not None:
        for p in new_named.values():
            if optimizer.state.get(p):
                new_optimizer.state[p] = optimizer.state[p]
        lr_scheduler.optimizer = new_optimizer  # the schedule goes on from the same step count
        for group in new_optimizer.param_groups:
            group["lr"] = lr_scheduler.get_last_lr()[0]
    return new_named, step_gradients, new_optimizer


def warmup_mask(args, candidates, warmup, ledger, n, class_names, prompts, backbone) -> dict:
    """The mask a warm-up selection chose, in the mask schema (mechanism dp_sgd_postprocessing: free here, and
    refused as --saliency_mask of any other run, whose training would not account these steps)."""
    state = warmup["state"]
    result = saliency.SelectionResult(state["scores"], warmup["kept"], n)
    record = {"mechanism": saliency.DP_SGD_MECHANISM, "warmup_steps": int(args.warmup_select_steps),
              "dropped_lora": args.warmup_dropped,
              "noise_multiplier": float(ledger.noise_multiplier), "max_grad_norm": float(args.max_grad_norm),
              "sample_rate": float(ledger.sample_rate), "dataset_size": int(n),
              "neighbouring": "add/remove one image; N treated as public",
              "note": "scores = sum over the first warmup_steps DP-SGD steps of |noisy gradient|^2 - d*(sigma*C/B)^2 "
                      "per LoRA tensor: post-processing of steps this run's training accounts; no cost of its own"}
    mask = saliency.build_mask(
        base_model=args.pretrained_model_name_or_path, modules=candidates, pool=args.candidate_pool,
        granularity="matrix", ratio=args.select_ratio, scorer=saliency.DP_SGD_SCORER, result=result, seed=None,
        privacy_record=record, class_names=class_names, class_prompts=prompts, backbone=backbone.name,
        pipeline_class=backbone.pipeline_class)
    mask["per_sample"] = {"clipping": args.clipping, "noise_multiplicity": args.noise_multiplicity,
                          "automatic_gamma": args.automatic_clipping_gamma if args.clipping == "automatic" else None}
    return mask


def finish_outputs(args, parts, class_names, prompts, accelerator, ledger, mask, n, weight_dtype, timings,
                   base_signature=None):
    """Weights, report, validation grid, card; run_status 'complete' last, so a crash never looks done.

    The run's own timings go to run_status.json (never pushed: run times are not covered by the guarantee).
    """
    denoiser = accelerator.unwrap_model(parts.denoiser)
    report = ledger.report(
        dataset_size=n, expected_batch_size=args.train_batch_size,
        target_epsilon=None if args.no_dp else args.target_epsilon, train_mode=args.train_mode,
        lora_target=args.lora_target, rank=args.rank if args.train_mode == "lora" else None,
        mask=None if mask is None else {k: mask[k] for k in ("base_model", "candidate_pool", "granularity",
                                                             "select_ratio", "scorer", "num_selected",
                                                             "candidate_fingerprint", "target_modules")},
        base_model=args.pretrained_model_name_or_path, resolution=args.resolution, class_names=class_names,
        class_prompts=prompts, backbone=parts.backbone.name, pipeline_class=parts.backbone.pipeline_class,
        base_signature=base_signature,
        clipping=None if args.no_dp else {"rule": args.clipping, "max_grad_norm": args.max_grad_norm,
                                          "automatic_gamma": args.automatic_clipping_gamma
                                          if args.clipping == "automatic" else None},
        noise_multiplicity=args.noise_multiplicity)
    if args.train_mode == "lora":
        modeling.save_lora(denoiser, args.output_dir)  # atomic (backbones.save_lora)
    else:
        with atomic.staged_folder(args.output_dir) as stage:  # every file renamed into place whole
            modeling.backbones.pipeline_from_parts(args.pretrained_model_name_or_path, parts, denoiser,
                                                   revision=args.revision, variant=args.variant).save_pretrained(stage)
    run_folder.write_json(args.output_dir, run_folder.REPORT_FILE, report)
    if mask is not None:
        saliency.write_mask(mask, os.path.join(args.output_dir, run_folder.MASK_FILE))
    images = render_validation(args, parts, prompts, accelerator, ledger.steps_done, weight_dtype)
    atomic.save_image(data.image_grid(images, columns=min(len(images), 10)),
                      os.path.join(args.output_dir, run_folder.GRID_FILE))
    repo_id = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
    hub.write_model_card(args.output_dir, repo_id=repo_id if args.push_to_hub else None,
                         base_model=args.pretrained_model_name_or_path, report=report, class_prompts=prompts,
                         has_lora=args.train_mode == "lora", image_file=run_folder.GRID_FILE,
                         backbone=parts.backbone)
    summary = timings.summary()
    run_folder.forget_checkpoint_secrets(args.output_dir)  # before 'complete': a finished folder holds no secret
    run_folder.write_status(args.output_dir, "complete", epsilon=report["epsilon"], delta=report["delta"],
                            timings=summary)
    accelerator.print(f"Throughput: {summary.get('steady_samples_per_s')} samples/s after {summary.get('warmup_steps')} "
                      f"warm-up steps ({summary.get('warmup_s')} s); peak memory {summary['peak_memory_gib']} GiB")
    split = report["budget_split"]
    accelerator.print(f"Done: ε = {report['epsilon']:.4g}, δ = {report['delta']:.3g} (selection alone "
                      f"{split['epsilon_selection_only']:.4g}, selection share {split['selection_share']:.1%}); "
                      f"results in {args.output_dir}" if report["private"] else
                      f"Done (NOT private: no clipping, no noise); results in {args.output_dir}")
    if args.push_to_hub:
        pushed = hub.push_to_hub(args.output_dir, repo_id, token=args.hub_token)
        accelerator.print(f"Pushed to https://huggingface.co/{pushed}")


if __name__ == "__main__":
    run_cli(main)
