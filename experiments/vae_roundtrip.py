#!/usr/bin/env python
"""Does the public VAE keep the sensitive domain's information? Pass real images through it (encode -> posterior
mean -> decode) and write them as a labelled folder that evaluate.py scores like a synthetic set.

    python experiments/vae_roundtrip.py --pretrained_model_name_or_path models/tiny-sd-public \
        --train_data_dir runs/fashion --class_prompts fashion_mnist --output_dir runs/vae_roundtrip
    python evaluate.py --synthetic_dir runs/vae_roundtrip --train_data_dir runs/fashion --class_prompts fashion_mnist \
        --skip_fid --classifier_depth 16 --classifier_width 4 --epochs 10 --output_dir runs/vae_roundtrip_eval

evaluate.py then trains the same classifier on the round-tripped train images and on the untouched ones (its real
-> real reference) and tests both on the real test split: the ratio is docs/public_model.md's VAE bar. The
reconstruction PSNR of the first --psnr_images test images (at the data's own size, 8-bit) goes to psnr.json.
This is a measurement of the public model, not a release: it reads the sensitive set without any privacy claim.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from dp_sapf import atomic, data, modeling  # noqa: E402
from dp_sapf.cli import COUNT, ArgumentParser, run_cli  # noqa: E402


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modeling.add_model_args(p)
    data.add_data_args(p, with_augmentation=False)
    p.add_argument("--split", default="train", help="The split to round-trip (written as the labelled folder).")
    p.add_argument("--psnr_split", default="test", help="The split whose first --psnr_images images give the PSNR.")
    p.add_argument("--psnr_images", type=COUNT, default=100, help="How many images the PSNR is averaged over.")
    p.add_argument("--batch_size", type=COUNT, default=250, help="Images per VAE call.")
    p.add_argument("--output_dir", required=True, help="The round-tripped labelled folder (<class>/<k>.png).")
    p.set_defaults(resolution=32)
    return p.parse_args(argv)


@torch.no_grad()
def roundtrip(vae, split: data.LabelledImages, indices, resolution: int, batch_size: int, desc: str):
    """Yield (index, PIL image at the original size and mode) for each index."""
    for start in tqdm(range(0, len(indices), batch_size), desc=desc, unit="batch"):
        chunk = indices[start:start + batch_size]
        originals = [split.image(i) for i in chunk]
        x = torch.stack([data.preprocess(im, resolution) for im in originals])
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        pixels = ((recon.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().astype(np.uint8)
        for i, original, p in zip(chunk, originals, pixels):
            image = Image.fromarray(p).resize(original.size, Image.Resampling.LANCZOS)
            yield i, image.convert(original.mode) if original.mode in ("L", "RGB") else image


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def main(argv=None):
    args = parse_args(argv)
    from diffusers import AutoencoderKL

    names, prompts = data.resolve_classes(args.class_prompts, args.class_names, args.prompt_template)
    vae = AutoencoderKL.from_pretrained(args.pretrained_model_name_or_path, subfolder="vae").eval()
    split = data.load_labelled_images(args, args.split, class_names=names, max_samples=args.max_train_samples)
    counts = [0] * len(names)
    for name in names:
        os.makedirs(os.path.join(args.output_dir, name), exist_ok=True)
    for i, image in roundtrip(vae, split, list(range(len(split))), args.resolution, args.batch_size,
                              f"VAE round trip ({args.split})"):
        c = int(split.labels[i])
        atomic.save_image(image, os.path.join(args.output_dir, names[c], f"{counts[c]:05d}.png"))
        counts[c] += 1
    data.write_synthetic_index(args.output_dir, names, prompts, counts)

    test = data.load_labelled_images(args, args.psnr_split, class_names=names, min_classes=1)
    first = list(range(min(args.psnr_images, len(test))))
    values = [psnr(np.asarray(test.image(i)), np.asarray(image))
              for i, image in roundtrip(vae, test, first, args.resolution, args.batch_size, "PSNR")]
    out = {"model": args.pretrained_model_name_or_path, "split": args.psnr_split, "images": len(values),
           "psnr_mean_db": float(np.mean(values)), "psnr_min_db": float(np.min(values)),
           "psnr_median_db": float(np.median(values))}
    atomic.write_json(os.path.join(args.output_dir, "psnr.json"), out)
    print(json.dumps(out))


if __name__ == "__main__":
    run_cli(main)
