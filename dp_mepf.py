#!/usr/bin/env python
"""DP-MEPF, the DP-SGD-free baseline: one noisy release of per-class means of public perceptual features of the
private images, then a small conditional generator trained to match them (post-processing: no further privacy cost).

    python dp_mepf.py --train_data_dir data/fashion --class_prompts fashion_mnist --target_epsilon 10 \
        --iterations 2000 --num_images_per_class 100 --output_dir mepf-synthetic

Harder et al., "Pre-trained Perceptual Features Improve Differentially Private Image Generation" (TMLR 2023),
ParkLabML/DP-MEPF; the mechanism and the generator are in dp_sapf/mepf.py (its docstring says where we differ).
A release tool beside private_evolution.py: it reads the sensitive images and publishes labelled images under
(ε, δ), in sample.py's folder layout (`evaluate.py --synthetic_dir` scores it unchanged) with privacy_report.json
and a card (README.md).

Privacy: each private image's feature vector (the TF-Inception's pooled block outputs) is scaled to norm 1 and
added, with its class count, to its class's row; the rows get N(0, σ²) once (ℓ2 sensitivity 1 under add/remove),
σ calibrated to the target (ε, δ). The exact sums are deleted; the noisy release is all the generator sees. The run
is resumable: its state (<output_dir>/mepf_state/, owner-only) holds the noisy release and the generator, never the
secret seed or a private quantity other than the release, and is removed when the release is complete.
"""

import argparse
import math
import os
import secrets
import shutil
import sys
import time

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from dp_sapf import atomic, data, mepf, privacy, run_folder
from dp_sapf.cli import COUNT, DP_SEED, POSITIVE, PROBABILITY, SEED, ArgumentParser, number, run_cli
from dp_sapf.seeding import seeded_generator

STATE_DIR = "mepf_state"
# flags that make a resumed run a different run
RECIPE_FLAGS = ("train_data_dir", "dataset_name", "dataset_config_name", "image_column", "label_column",
                "max_train_samples", "class_prompts", "class_names", "prompt_template", "resolution",
                "feature_resolution", "count_weight", "iterations", "batch_size", "learning_rate", "code_dim",
                "seed", "accountant")


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data.add_data_args(p, with_augmentation=False)
    feat = p.add_argument_group("features and release")
    feat.add_argument("--feature_resolution", type=number(int, min=75), default=mepf.DEFAULT_FEATURE_RESOLUTION,
                      help="Images are resized to this before the TF-Inception (75: the smallest every stage "
                           "accepts; larger costs ~(size/75)² per image).")
    feat.add_argument("--count_weight", type=number(float, min=0, max=1, min_open=True, max_open=True),
                      default=mepf.DEFAULT_COUNT_WEIGHT,
                      help="w: each image adds (√(1−w²)·f/‖f‖, w) to its class row, so the class counts are released "
                           "(noisy) within the same unit sensitivity; a larger w buys precise counts with noisier "
                           "means.")
    feat.add_argument("--feature_batch_size", type=COUNT, default=100, help="Private images per Inception forward.")
    gen = p.add_argument_group("generator (post-processing)")
    gen.add_argument("--iterations", type=COUNT, default=2000,
                     help="Generator updates (the official code runs 100,000 on a GPU; each costs a forward and "
                          "backward of --batch_size images through the Inception).")
    gen.add_argument("--batch_size", type=COUNT, default=100,
                     help="Generated images per update, the same number of each class (rounded down).")
    gen.add_argument("--learning_rate", type=POSITIVE, default=1e-3, help="Adam (β = 0.5, 0.999) learning rate.")
    gen.add_argument("--code_dim", type=COUNT, default=90, help="Dimension of the generator's Gaussian code.")
    gen.add_argument("--num_images_per_class", type=COUNT, default=100, help="Released images per class.")
    gen.add_argument("--checkpoint_every_s", type=POSITIVE, default=300.0,
                     help="Save the generator state at most this often (seconds), and when the run stops.")
    gen.add_argument("--stop_after_iterations", type=COUNT, default=None,
                     help="Save the state and stop after this many updates of this call (fixed time slots); run the "
                          "same command again to continue to the same result.")
    gen.add_argument("--output_dir", type=str, default="mepf-synthetic", help="Where the labelled images go.")
    gen.add_argument("--seed", type=SEED, default=0,
                     help="Seed of the generator's initialisation and codes: public randomness, it never touches "
                          "private data (the generator only sees the noisy release).")
    priv = p.add_argument_group("privacy")
    priv.add_argument("--target_epsilon", type=str, default=None, help="ε of the release; σ is calibrated to it.")
    priv.add_argument("--noise_multiplier", type=POSITIVE, default=None,
                      help="σ of the release's noise (sensitivity 1), instead of --target_epsilon.")
    priv.add_argument("--target_delta", type=PROBABILITY, default=None, help="δ (default 1/N).")
    priv.add_argument("--accountant", choices=list(privacy.ACCOUNTANTS), default="rdp",
                      help="Accountant of the one Gaussian mechanism.")
    priv.add_argument("--dp_seed", type=DP_SEED, default=None,
                      help="Seed of the release's Gaussian noise. Default: fresh from the OS, as the guarantee "
                           "assumes. Whoever knows it can recompute the noise: fix it for tests and audits only.")
    p.set_defaults(resolution=None)  # the released images' size: the private images' own unless given
    next(a for a in p._actions if a.dest == "resolution").help = (
        "Size of the released images; the private images are resized to it before their features are taken, so "
        "both sides of the match see the same pipeline (default: the private images' own size).")
    args = p.parse_args(argv)
    if (args.target_epsilon is None) == (args.noise_multiplier is None):
        p.error("Give exactly one of --target_epsilon or --noise_multiplier.")
    if args.target_epsilon is not None:
        try:
            args.target_epsilon = privacy.parse_target_epsilon(args.target_epsilon)
        except ValueError as err:
            p.error(str(err))
        if math.isinf(args.target_epsilon):
            p.error("DP-MEPF has no non-private mode here: give a finite --target_epsilon.")
    return args


# --------------------------------------------------------------------------------------------- the release


def image_tensor(image: Image.Image, resolution: int, channels: int) -> torch.Tensor:
    image = image.convert("L" if channels == 1 else "RGB")
    if image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array[None] if channels == 1 else array.transpose(2, 0, 1))


@torch.no_grad()
def private_class_rows(train, features: mepf.PerceptualFeatures, num_classes: int, args, channels: int) -> torch.Tensor:
    """The exact per-class rows, streamed: no per-image feature is kept or written anywhere."""
    rows = None
    labels = torch.as_tensor(np.asarray(train.labels), dtype=torch.long)
    for start in tqdm(range(0, len(train), args.feature_batch_size), desc="Perceptual features (private)",
                      unit="batch"):
        idx = range(start, min(start + args.feature_batch_size, len(train)))
        x = torch.stack([image_tensor(train.image(i), args.resolution, channels) for i in idx])
        part = mepf.class_rows(features(x), labels[start:idx.stop], num_classes, args.count_weight)
        rows = part if rows is None else rows + part
    return rows


# --------------------------------------------------------------------------------------------- state


def state_path(output_dir: str) -> str:
    return os.path.join(output_dir, STATE_DIR, "state.pt")


def save_state(output_dir: str, state: dict) -> None:
    """One file renamed into place (a kill leaves the old state or the new one); owner-only like every run state."""
    path = state_path(output_dir)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    with atomic.replacing(path, mode=0o600) as tmp:
        torch.save(state, tmp)


def load_state(output_dir: str, recipe: dict) -> dict | None:
    path = state_path(output_dir)
    if not os.path.isfile(path):
        return None
    state = torch.load(path, weights_only=False)
    changed = {k: (state["recipe"].get(k), v) for k, v in recipe.items() if state["recipe"].get(k) != v}
    if changed:
        raise ValueError(f"{output_dir} holds a DP-MEPF run with other flags {changed} (saved, now): resume with the "
                         "same flags or choose another --output_dir.")
    return state


# --------------------------------------------------------------------------------------------- outputs


def write_release(output_dir: str, generator_net, names, prompts, report: dict, args, channels: int) -> None:
    """<class>/<k>.png (atomic per image), metadata.jsonl, preview.png, privacy_report.json, README.md."""
    generator_net.eval()
    codes = seeded_generator(args.seed, "mepf-release")
    with torch.no_grad():
        for c, name in enumerate(names):
            for start in range(0, args.num_images_per_class, 250):
                n = min(250, args.num_images_per_class - start)
                z = torch.randn(n, args.code_dim, generator=codes)
                images = generator_net(z, torch.full((n,), c, dtype=torch.long))
                pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
                for k in range(n):
                    path = os.path.join(output_dir, name, f"{start + k:05d}.png")
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    atomic.save_image(Image.fromarray(pixels[k, :, :, 0] if channels == 1 else pixels[k]), path)
    data.write_synthetic_index(output_dir, names, prompts, [args.num_images_per_class] * len(names))
    run_folder.write_json(output_dir, run_folder.REPORT_FILE, report)
    atomic.write_text(os.path.join(output_dir, "README.md"), dataset_card(report))


def dataset_card(report: dict) -> str:
    r = report
    return "\n".join([
        "---", "tags: [differential-privacy, synthetic-data, dp-mepf]", "---", "",
        f"# Differentially private synthetic images by DP-MEPF (ε = {r['epsilon']:.3g}, δ = {r['delta']:.3g})",
        "", f"{sum(r['images_per_class'])} images ({r['images_per_class'][0]} per class) of the classes "
        f"{', '.join(r['class_names'])}, drawn by a generator trained to match one noisy release of per-class mean "
        f"perceptual features (Harder et al., TMLR 2023) of {r['dataset_size']} private images. The generator never "
        "saw a private image, only that release.", "",
        "## Privacy", "",
        "| | |", "|---|---|",
        f"| ε (one Gaussian mechanism, {r['accountant']} accountant) | {r['epsilon']:.4f} |",
        f"| δ | {r['delta']:.3g} |",
        f"| noise σ per entry (sensitivity: one image moves one class row by ℓ2 ≤ 1) | {r['noise_multiplier']:.4f} |",
        f"| neighbouring | {r['neighbouring']} |", "",
        "## Recipe", "",
        f"- Features: {r['feature_network']} at {r['feature_resolution']} px, {r['feature_dim']} numbers per image, "
        f"each image's vector scaled to norm 1; class counts released with weight {r['count_weight']:g}.",
        f"- Generator: {r['generator']}, {r['iterations']} Adam updates of {r['batch_size']} images, learning rate "
        f"{r['learning_rate']:g}.",
        f"- Class prompts (names only are used): {'; '.join(r['class_prompts'])}.", ""])


# --------------------------------------------------------------------------------------------- main


def main(argv=None):
    args = parse_args(argv)
    names, prompts = data.resolve_classes(args.class_prompts, args.class_names, args.prompt_template)
    if args.batch_size < len(names):
        raise ValueError(f"--batch_size {args.batch_size} is smaller than the {len(names)} classes: each update needs "
                         "at least one image of every class.")
    if run_folder.read_status(args.output_dir) == "complete":
        raise ValueError(f"{args.output_dir} already holds a finished DP-MEPF release; choose another --output_dir.")
    train = data.load_labelled_images(args, "train", class_names=names, max_samples=args.max_train_samples)
    n = len(train)
    first = train.image(0)
    channels = 1 if first.mode in ("L", "1", "I", "I;16", "F") else 3
    args.resolution = args.resolution or first.size[0]
    ledger = privacy.PrivacyLedger.plan(dataset_size=n, expected_batch_size=n, steps=1, max_grad_norm=1.0,
                                        accountant=args.accountant, delta=args.target_delta,
                                        target_epsilon=args.target_epsilon, noise_multiplier=args.noise_multiplier)
    sigma = ledger.noise_multiplier
    print(f"DP-MEPF: N = {n}, one Gaussian release, σ = {sigma:.4f} -> ε = {ledger.epsilon_final():.4f} at "
          f"δ = {ledger.delta:.3g} ({args.accountant})")

    recipe = {k: getattr(args, k) for k in RECIPE_FLAGS}
    recipe.update(dataset_size=n, noise_multiplier=sigma, delta=ledger.delta, channels=channels)
    state = load_state(args.output_dir, recipe)
    os.makedirs(args.output_dir, exist_ok=True)
    run_folder.write_status(args.output_dir, "running")
    features = mepf.PerceptualFeatures(resolution=args.feature_resolution)
    if state is None:
        rows = private_class_rows(train, features, len(names), args, channels)
        # the secret seed lives only in this call: the state keeps the noisy release, never the seed, so no resume
        # can redraw the same noise on other data
        secret = args.dp_seed if args.dp_seed is not None else secrets.randbits(63)
        noisy = mepf.release(rows, sigma, args.count_weight, seeded_generator(secret, "mepf-noise"))
        del rows, secret
        state = {"recipe": recipe, "iteration": 0, "release": noisy.noisy_rows, "generator": None, "optimizer": None}
        save_state(args.output_dir, state)
    else:
        print(f"Resumed {args.output_dir} after {state['iteration']} of {args.iterations} generator updates.")
    noisy = mepf.FeatureRelease(state["release"], args.count_weight, sigma)
    targets = noisy.class_means()

    torch.manual_seed(args.seed)  # the generator's initialisation: public randomness
    net = mepf.ConditionalGenerator(len(names), args.resolution, channels, code_dim=args.code_dim)
    optimizer = torch.optim.Adam(net.parameters(), lr=args.learning_rate, betas=(0.5, 0.999))
    if state["generator"] is not None:
        net.load_state_dict(state["generator"])
        optimizer.load_state_dict(state["optimizer"])
    labels = mepf.balanced_labels(args.batch_size, len(names))
    start = state["iteration"]
    stop_at = min(args.iterations, start + (args.stop_after_iterations or args.iterations))
    last_save = time.monotonic()

    def checkpoint(iteration: int) -> None:
        state.update(iteration=iteration, generator=net.state_dict(), optimizer=optimizer.state_dict())
        save_state(args.output_dir, state)

    net.train()
    progress = tqdm(range(start, stop_at), desc="Generator (matching the noisy means)", unit="update",
                    initial=start, total=args.iterations)
    for t in progress:
        z = torch.randn(len(labels), args.code_dim, generator=seeded_generator(args.seed, "mepf-code", t))
        loss = mepf.matching_loss(features, net(z, labels), labels, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        progress.set_postfix(loss=f"{loss.item():.3e}")
        if time.monotonic() - last_save >= args.checkpoint_every_s:
            checkpoint(t + 1)
            last_save = time.monotonic()
    if stop_at < args.iterations:
        checkpoint(stop_at)
        print(f"Stopped after update {stop_at} (--stop_after_iterations); run the same command to continue.")
        return

    ledger.steps_done = 1
    report = ledger.report(
        method="dp_mepf", dataset_size=n, class_names=names, class_prompts=prompts, resolution=args.resolution,
        output_resolution=args.resolution, images_per_class=[args.num_images_per_class] * len(names),
        target_epsilon=args.target_epsilon, feature_network="TF-Inception (ImageNet; the FID network), pooled "
        "conv/mixed block outputs", feature_resolution=args.feature_resolution, feature_dim=int(targets.shape[1]),
        count_weight=args.count_weight, noisy_class_counts=[round(float(c), 1) for c in noisy.noisy_counts],
        generator=f"ConvCondGen-style, code {args.code_dim} + one-hot label", iterations=args.iterations,
        batch_size=len(labels), learning_rate=args.learning_rate,
        sensitivity="one image adds (√(1−w²)·f/‖f‖, w) to its class row: ℓ2 ≤ 1 (max_grad_norm records it)")
    write_release(args.output_dir, net, names, prompts, report, args, channels)
    shutil.rmtree(os.path.join(args.output_dir, STATE_DIR))
    run_folder.write_status(args.output_dir, "complete")
    print(f"Wrote {args.num_images_per_class * len(names)} images to {args.output_dir}: ε = {report['epsilon']:.4f} "
          f"at δ = {report['delta']:.3g}", file=sys.stdout)


if __name__ == "__main__":
    run_cli(main)
