#!/usr/bin/env python
"""Render a labelled synthetic dataset from the base model + DP LoRA (post-processing: no extra privacy cost).

    accelerate launch sample.py --pretrained_model_name_or_path MODEL --lora_path dp-sapf-lora \
        --num_images_per_class 6000 --resolution 256 --output_resolution 32 --output_dir synthetic

The pipeline (StableDiffusionPipeline, StableDiffusion3Pipeline or DiTPipeline, whose class k is the list's
class k) is read from the model folder. Class names and prompts come from the training run's
privacy_report.json (or --class_prompts). Image k of class c always gets the same seed, so any process count
gives the same images, and a rerun skips the images already written. Output: <output_dir>/<class>/<k>.png, metadata.jsonl and preview.png.
"""

import argparse
import os
import sys

import torch
from PIL import Image
from tqdm.auto import tqdm

from dp_sapf import atomic, data, distributed, modeling, run_folder, timing
from dp_sapf.cli import COUNT, FINITE, NON_NEGATIVE, SEED, ArgumentParser, run_cli


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modeling.add_model_args(p)
    p.add_argument("--lora_path", type=str, default=None,
                   help="Training output folder or Hub id holding pytorch_lora_weights.safetensors (None: the base "
                        "model alone, e.g. a full fine-tune's output folder as --pretrained_model_name_or_path).")
    p.add_argument("--lora_scale", type=FINITE, default=1.0, help="Scale of the LoRA update.")
    p.add_argument("--class_prompts", type=str, default=None,
                   help="Class -> prompt mapping (built-in set name, JSON file or inline JSON object). Default: the "
                        "class names and prompts recorded in the training run's privacy_report.json.")
    p.add_argument("--num_images_per_class", type=COUNT, default=None, help="Images per class.")
    p.add_argument("--num_images", type=COUNT, default=None,
                   help="Total images, spread evenly over the classes (the first classes get one more when uneven).")
    p.add_argument("--num_inference_steps", type=COUNT, default=25, help="Denoising steps.")
    p.add_argument("--guidance_scale", type=NON_NEGATIVE, default=None,
                   help="Classifier-free guidance scale (default: the pipeline's own, 7.5 for SD, 7.0 for SD3, 4.0 "
                        "for DiT).")
    p.add_argument("--resolution", type=COUNT, default=None,
                   help="Sampling resolution (default: the training run's --resolution, else the model's own: the "
                        "denoiser's sample_size times the VAE's scale factor, e.g. 512 for SD-v1.5, 32 for the embedded "
                        "default). A DiT samples at its own size only.")
    p.add_argument("--output_resolution", type=COUNT, default=None,
                   help="Resize saved images to this size (LANCZOS), e.g. 32 for CIFAR-like data sampled at 256.")
    p.add_argument("--batch_size", type=COUNT, default=16, help="Images per pipeline call on each process.")
    p.add_argument("--seed", type=SEED, default=0, help="Base seed: image k of class c uses seed (seed, c, k).")
    p.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                   help="Weight dtype for sampling (default: accelerate's config).")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the denoiser (faster on a GPU for large runs; the first batch compiles; the LoRA "
                        "is fused into the base weights first).")
    p.add_argument("--output_dir", type=str, default="synthetic", help="Where the labelled images go.")
    args = p.parse_args(argv)
    if (args.num_images_per_class is None) == (args.num_images is None):
        p.error("Give exactly one of --num_images_per_class or --num_images.")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        p.error(f"--output_dir {args.output_dir!r} is a file, not a folder.")
    return args


def classes_and_prompts(args, report) -> tuple[list[str], list[str]]:
    """Class names (folder names) and prompts, in label order: the training run's public list by default."""
    names = report.get("class_names") if report else None
    if args.class_prompts is None:
        if not report or "class_prompts" not in report:
            raise ValueError("No class prompts: give --class_prompts, or --lora_path to a training output folder.")
        return list(names), list(report["class_prompts"])
    return data.resolve_classes(args.class_prompts, names)


def image_counts(args, num_classes) -> list[int]:
    """Images per class: balanced."""
    if args.num_images_per_class is not None:
        return [args.num_images_per_class] * num_classes
    base, extra = divmod(args.num_images, num_classes)
    return [base + (c < extra) for c in range(num_classes)]


def image_path(output_dir, class_name, k) -> str:
    return os.path.join(output_dir, class_name, f"{k:05d}.png")


def main(argv=None):
    args = parse_args(argv)
    if args.lora_path:
        modeling.backbones.check_lora_path(args.lora_path)
    report = run_folder.read_training_report(args.lora_path, args.pretrained_model_name_or_path)
    names, prompts = classes_and_prompts(args, report)
    counts = image_counts(args, len(names))
    accelerator = distributed.make_accelerator(args)
    dtype = modeling.weight_dtype_for(accelerator.mixed_precision)
    modeling.check_model_path(args.pretrained_model_name_or_path)
    lora_report = run_folder.read_training_report(args.lora_path) if args.lora_path else None
    if args.lora_path and lora_report is None:  # e.g. a LoRA made elsewhere: usable, but nothing vouches for it
        print(f"warning: {args.lora_path} has no privacy_report.json: nothing says how (or whether) this LoRA was "
              "trained with differential privacy, nor on which base model (only module names and shapes are "
              "checked). Do not call the synthetic set private on its account.", file=sys.stderr)
    pipe = modeling.backbones.load_pipeline(  # checks that the LoRA was trained on this base model
        args.pretrained_model_name_or_path, revision=args.revision, variant=args.variant, lora_path=args.lora_path,
        lora_scale=args.lora_scale, dtype=dtype, base_signature=(lora_report or {}).get("base_signature"),
        recorded_base=(lora_report or {}).get("base_model"))
    pipe.to(accelerator.device)
    resolution = (args.resolution or (report or {}).get("resolution") or modeling.backbones.native_resolution(pipe))
    modeling.backbones.check_sampling_resolution(pipe, resolution)  # before any folder or image is written
    if args.compile:
        if args.lora_path:
            modeling.backbones.fuse_lora(pipe)  # at the scale set above: no adapter branches to trace
        name = "unet" if hasattr(pipe, "unet") else "transformer"
        setattr(pipe, name, torch.compile(getattr(pipe, name)))

    jobs = [(c, k) for c in range(len(names)) for k in range(counts[c])]
    todo = [j for j in jobs if not os.path.isfile(image_path(args.output_dir, names[j[0]], j[1]))]
    mine = todo[accelerator.process_index::accelerator.num_processes]
    for name in names:
        os.makedirs(os.path.join(args.output_dir, name), exist_ok=True)
    accelerator.print(f"{len(jobs)} images over {len(names)} classes; {len(jobs) - len(todo)} already there.")
    progress = tqdm(total=len(mine), desc="Sampling", unit="img", disable=not accelerator.is_local_main_process)
    timings = timing.Timings(accelerator.device, warmup_units=1)  # the first batch compiles under --compile
    timings.start_units()
    for start in range(0, len(mine), args.batch_size):
        batch = mine[start:start + args.batch_size]
        generators = [torch.Generator(device=accelerator.device).manual_seed(args.seed * 1_000_003 + c * 10_007 + k)
                      for c, k in batch]  # one per image: the image does not depend on its batch or process
        images = modeling.backbones.generate(
            pipe, class_ids=[c for c, _ in batch], prompts=[prompts[c] for c, _ in batch], generators=generators,
            num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale, resolution=resolution)
        for (c, k), image in zip(batch, images):
            if args.output_resolution and args.output_resolution != resolution:
                image = image.resize((args.output_resolution, args.output_resolution), Image.Resampling.LANCZOS)
            atomic.save_image(image, image_path(args.output_dir, names[c], k))  # never a truncated image
        timings.unit_done(len(batch))  # the pipeline returned PIL images: the batch is finished
        progress.update(len(batch))
    progress.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        data.write_synthetic_index(args.output_dir, names, prompts, counts)
        print(f"Wrote {sum(counts)} images to {args.output_dir} (preview.png, metadata.jsonl)")
        if mine:
            summary = timings.summary(unit="batch", items="images")
            # denoiser evaluations per image: PNDM's PLMS makes one more than num_inference_steps
            summary["denoiser_calls_per_image"] = len(pipe.scheduler.timesteps)
            run_folder.write_json(args.output_dir, "timings.json", {**summary, "batch_size": args.batch_size,
                                                                    "num_inference_steps": args.num_inference_steps,
                                                                    "processes": accelerator.num_processes})
    distributed.finish(accelerator)


if __name__ == "__main__":
    run_cli(main)
