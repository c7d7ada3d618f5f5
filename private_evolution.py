#!/usr/bin/env python
"""Private Evolution (PE), the fine-tuning-free baseline: a labelled DP synthetic dataset from the public model's
text-to-image and image-to-image APIs, guided by noisy nearest-neighbour votes of the private images.

    python private_evolution.py --pretrained_model_name_or_path models/tiny-sd-public \
        --train_data_dir data/fashion --class_prompts fashion_mnist --resolution 32 --output_resolution 28 \
        --num_images_per_class 500 --iterations 5 --target_epsilon 10 --output_dir pe-synthetic

A top-level script beside sample.py because it is a release tool in its own right: it reads the sensitive images
and publishes images under (ε, δ), as select_salient.py + train_dp_sapf.py + sample.py do together, with the same
output folder as sample.py (`evaluate.py --synthetic_dir` scores it unchanged) plus the same privacy_report.json
and a card (README.md). Lin et al. (ICLR 2024), microsoft/DPSDA; the loop is in dp_sapf/private_evolution.py.

Iteration 0 draws the population from the class prompts (RANDOM_API). Each of the T iterations spends one
Gaussian mechanism: the private images vote (nearest synthetic image of their class in Inception space), noise
N(0, σ²) is added to the histogram, counts below --count_threshold are dropped, the next population is drawn in
proportion to the rest and varied by image-to-image (VARIATION_API) at a strength that decreases from
--strength_start to --strength_end. σ is calibrated so that the T mechanisms meet the target (ε, δ).
The run is resumable per iteration (its state, which holds the secret DP seed, is in <output_dir>/pe_state/,
readable by its owner only and never part of the release).
"""

import argparse
import json
import math
import os
import shutil
import sys

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from dp_sapf import atomic, data, distributed, metrics, modeling, privacy, run_folder
from dp_sapf import private_evolution as pe
from dp_sapf.cli import COUNT, FINITE, NON_NEGATIVE, POSITIVE, PROBABILITY, ArgumentParser, add_runtime_args, number, \
    run_cli
from dp_sapf.seeding import seeded_generator

STATE_DIR = "pe_state"
STRENGTH = number(float, min=0, max=1, min_open=True)  # image-to-image strength in (0, 1]
# flags that make a resumed run a different run
RECIPE_FLAGS = ("pretrained_model_name_or_path", "train_data_dir", "dataset_name", "max_train_samples",
                "num_images_per_class", "iterations", "strength_start", "strength_end", "count_threshold",
                "num_inference_steps", "guidance_scale", "resolution", "output_resolution", "embedding",
                "class_prompts", "class_names", "prompt_template")


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modeling.add_model_args(p)
    data.add_data_args(p, with_augmentation=False)
    pe_group = p.add_argument_group("private evolution")
    pe_group.add_argument("--num_images_per_class", type=COUNT, default=100,
                          help="Population size per class, which is also the released synthetic set's size per class.")
    pe_group.add_argument("--iterations", type=COUNT, default=5,
                          help="T: PE iterations, each one Gaussian mechanism on the vote histogram.")
    pe_group.add_argument("--strength_start", type=STRENGTH, default=0.8,
                          help="Image-to-image strength of the first variation (1 = a fresh image from the prompt).")
    pe_group.add_argument("--strength_end", type=STRENGTH, default=0.4,
                          help="Strength of the last variation (linear in between: smaller, finer variations later).")
    pe_group.add_argument("--count_threshold", type=FINITE, default=None,
                          help="H: noisy counts below it count as 0 before resampling (default 2σ: a bin must carry "
                               "votes, not noise).")
    pe_group.add_argument("--embedding", choices=["inception", "pixels"], default="inception",
                          help="Where votes find nearest neighbours: the TF-Inception pool features evaluate.py uses "
                               "(PE's choice), or 16-px grey pixels (quick runs and tests).")
    pe_group.add_argument("--embedding_batch_size", type=COUNT, default=50, help="Images per Inception forward.")
    priv = p.add_argument_group("privacy")
    priv.add_argument("--target_epsilon", type=str, default=None,
                      help="ε of the whole release (all T histograms); σ is calibrated to it.")
    priv.add_argument("--noise_multiplier", type=POSITIVE, default=None,
                      help="σ of the histogram noise, instead of --target_epsilon.")
    priv.add_argument("--target_delta", type=PROBABILITY, default=None, help="δ (default 1/N).")
    priv.add_argument("--accountant", choices=list(privacy.ACCOUNTANTS), default="rdp",
                      help="Accountant of the T composed Gaussian mechanisms.")
    gen = p.add_argument_group("generation")
    gen.add_argument("--num_inference_steps", type=COUNT, default=25,
                     help="Denoising steps of a full generation (image-to-image runs strength x these).")
    gen.add_argument("--guidance_scale", type=NON_NEGATIVE, default=3.0, help="Classifier-free guidance scale of both APIs.")
    gen.add_argument("--output_resolution", type=number(int, min=8), default=None,
                     help="Size of the released images, and of the synthetic images the votes compare (default: the "
                          "private images' size).")
    gen.add_argument("--batch_size", type=COUNT, default=64, help="Images per pipeline call.")
    gen.add_argument("--output_dir", type=str, default="pe-synthetic", help="Where the labelled images go.")
    gen.add_argument("--stop_after_iterations", type=COUNT, default=None,
                     help="Save the state and stop after this many iterations of this call (fixed time slots); run the "
                          "same command again to continue to the same result.")
    add_runtime_args(p)
    p.set_defaults(resolution=None)  # sampling resolution: the model's own unless given
    args = p.parse_args(argv)
    if args.cache_dir is None:  # evaluate.py's default: the private Inception features are shared with its FID
        args.cache_dir = os.path.join(os.path.expanduser("~"), ".cache", "dp_sapf")
    if (args.target_epsilon is None) == (args.noise_multiplier is None):
        p.error("Give exactly one of --target_epsilon or --noise_multiplier.")
    if args.target_epsilon is not None:
        try:
            args.target_epsilon = privacy.parse_target_epsilon(args.target_epsilon)
        except ValueError as err:
            p.error(str(err))
        if math.isinf(args.target_epsilon):
            p.error("PE has no non-private mode here: give a finite --target_epsilon.")
    return args


# --------------------------------------------------------------------------------------------- the two APIs


def random_api(pipe, prompts: list[str], labels: np.ndarray, args, secret_seed: int) -> list[Image.Image]:
    """RANDOM_API: text-to-image from each member's class prompt (its own secret generator)."""
    images = []
    for start in tqdm(range(0, len(labels), args.batch_size), desc="RANDOM_API (text-to-image)", unit="batch"):
        idx = range(start, min(start + args.batch_size, len(labels)))
        images += modeling.backbones.generate(
            pipe, class_ids=[int(labels[i]) for i in idx], prompts=[prompts[labels[i]] for i in idx],
            generators=[pe.variation_seed_generator(secret_seed, 0, i) for i in idx],
            num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale, resolution=args.resolution)
    return images


def variation_api(img2img, images: list[Image.Image], prompts: list[str], labels: np.ndarray, strength: float,
                  args, secret_seed: int, iteration: int) -> list[Image.Image]:
    """VARIATION_API: image-to-image of each member at `strength`, prompted by its class."""
    out = []
    for start in tqdm(range(0, len(images), args.batch_size), desc=f"VARIATION_API (strength {strength:.2f})",
                      unit="batch"):
        idx = range(start, min(start + args.batch_size, len(images)))
        out += img2img(prompt=[prompts[labels[i]] for i in idx], image=[images[i] for i in idx], strength=strength,
                       num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                       generator=[pe.variation_seed_generator(secret_seed, iteration, i) for i in idx]).images
    return out


# --------------------------------------------------------------------------------------------- state


def state_path(output_dir: str) -> str:
    return os.path.join(output_dir, STATE_DIR, "state.npz")


def save_state(output_dir: str, state: dict, images: list[Image.Image], labels: np.ndarray) -> None:
    """The population after an iteration AND the iteration's record, in ONE file renamed into place: a kill at any
    moment leaves either the old (population, iteration) pair or the new one, never a population of iteration t
    with a record of t − 1 (a resume would then recompute iteration t on another vote vector with the same noise
    draw, and two outputs with one noise reveal the exact difference of two vote vectors). Owner-only: it holds
    the secret seed."""
    path = state_path(output_dir)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    pixels = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images])
    with atomic.replacing(path, mode=0o600) as tmp, open(tmp, "wb") as f:
        np.savez(f, pixels=pixels, labels=labels, state=np.array(atomic.dumps_json(state)))


def load_state(output_dir: str, recipe: dict):
    path = state_path(output_dir)
    if not os.path.isfile(path):
        if os.path.isfile(os.path.join(output_dir, STATE_DIR, "state.json")):  # the two-file format: not trusted
            raise ValueError(f"{output_dir}/{STATE_DIR} holds a PE state in the old two-file format, whose iteration "
                             "may not match its population: it cannot be resumed safely. Delete that folder (or the "
                             "whole --output_dir) and start the run again.")
        return None, None, None
    with np.load(path) as saved:
        state = json.loads(str(saved["state"]))
        pixels, labels = saved["pixels"], saved["labels"]
    changed = {k: (state["recipe"].get(k), v) for k, v in recipe.items() if state["recipe"].get(k) != v}
    if changed:
        raise ValueError(f"{output_dir} holds a PE run with other flags {changed} (saved, now): resume with the "
                         "same flags or choose another --output_dir.")
    return state, [Image.fromarray(p) for p in pixels], labels


# --------------------------------------------------------------------------------------------- outputs


def write_release(output_dir: str, images, labels, names, prompts, report: dict) -> None:
    """<class>/<k>.png (atomic per image), metadata.jsonl, preview.png, privacy_report.json, README.md."""
    counts = [int((labels == c).sum()) for c in range(len(names))]
    seen = [0] * len(names)
    for image, c in zip(images, labels):
        path = os.path.join(output_dir, names[c], f"{seen[c]:05d}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic.save_image(image, path)
        seen[c] += 1
    data.write_synthetic_index(output_dir, names, prompts, counts)
    run_folder.write_json(output_dir, run_folder.REPORT_FILE, report)
    atomic.write_text(os.path.join(output_dir, "README.md"), dataset_card(report))


def dataset_card(report: dict) -> str:
    r = report
    schedule = ", ".join(f"{s:.2f}" for s in r["strength_schedule"])
    return "\n".join([
        "---", "tags: [differential-privacy, synthetic-data, private-evolution]", "---", "",
        f"# Differentially private synthetic images by Private Evolution (ε = {r['epsilon']:.3g}, δ = {r['delta']:.3g})",
        "", f"{sum(r['images_per_class'])} images ({r['images_per_class'][0]} per class) of the classes "
        f"{', '.join(r['class_names'])}, made by Private Evolution (Lin et al., ICLR 2024) from the public model "
        f"`{r['base_model']}` without fine-tuning. The {r['dataset_size']} private images were used only through "
        f"{r['steps']} noisy vote histograms.", "",
        "## Privacy", "",
        "| | |", "|---|---|",
        f"| ε (all {r['steps']} histograms, {r['accountant']} accountant) | {r['epsilon']:.4f} |",
        f"| δ | {r['delta']:.3g} |",
        f"| noise σ per histogram bin (sensitivity: one vote per image, ℓ2 1) | {r['noise_multiplier']:.4f} |",
        f"| count threshold H | {r['count_threshold']:.4g} |",
        f"| neighbouring | {r['neighbouring']} |", "",
        "## Recipe", "",
        f"- Population {r['images_per_class'][0]} per class, {r['steps']} iterations, image-to-image strength per "
        f"iteration {schedule}, {r['num_inference_steps']} denoising steps, guidance {r['guidance_scale']:g}, "
        f"embedding `{r['embedding']}`.",
        f"- Class prompts: {'; '.join(r['class_prompts'])}.", ""])


# --------------------------------------------------------------------------------------------- main


def main(argv=None):
    args = parse_args(argv)
    names, prompts = data.resolve_classes(args.class_prompts, args.class_names, args.prompt_template)
    train = data.load_labelled_images(args, "train", class_names=names, max_samples=args.max_train_samples)
    n = len(train)
    first = train.image(0)
    args.output_resolution = args.output_resolution or first.size[0]
    if run_folder.read_status(args.output_dir) == "complete":
        if os.path.isdir(os.path.join(args.output_dir, STATE_DIR)):  # left by an older version's crash: a secret
            shutil.rmtree(os.path.join(args.output_dir, STATE_DIR))
            print(f"Removed the leftover {STATE_DIR}/ (it held the secret DP seed) from the finished release "
                  f"{args.output_dir}.", file=sys.stderr)
        raise ValueError(f"{args.output_dir} already holds a finished PE release; choose another --output_dir.")
    ledger = privacy.PrivacyLedger.plan(dataset_size=n, expected_batch_size=n, steps=args.iterations,
                                        max_grad_norm=1.0, accountant=args.accountant, delta=args.target_delta,
                                        target_epsilon=args.target_epsilon, noise_multiplier=args.noise_multiplier)
    sigma = ledger.noise_multiplier
    threshold = 2.0 * sigma if args.count_threshold is None else args.count_threshold
    spent = ledger.spent(args.iterations)
    print(f"PE: N = {n}, T = {args.iterations} Gaussian mechanisms, σ = {sigma:.4f}, H = {threshold:.3g} -> "
          f"ε = {spent.epsilon:.4f} at δ = {ledger.delta:.3g} ({args.accountant})")

    accelerator = distributed.make_accelerator(args)
    if accelerator.num_processes > 1:
        raise ValueError("private_evolution.py runs in one process (launch it with python, not accelerate -n K).")
    pipe = modeling.load_pipeline(args.pretrained_model_name_or_path, revision=args.revision, variant=args.variant)
    if type(pipe).__name__ != "StableDiffusionPipeline":
        raise ValueError(f"PE needs an image-to-image pipeline; {type(pipe).__name__} is not supported here "
                         "(StableDiffusionPipeline only).")
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe.to(accelerator.device)
    pipe.set_progress_bar_config(disable=True)
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    args.resolution = args.resolution or modeling.backbones.native_resolution(pipe)
    schedule = pe.strength_schedule(args.iterations, args.strength_start, args.strength_end)

    recipe = {k: getattr(args, k) for k in RECIPE_FLAGS}
    recipe.update(dataset_size=n, noise_multiplier=sigma, count_threshold=threshold)
    state, population, labels = load_state(args.output_dir, recipe)
    run_folder_ready(args.output_dir)
    if state is None:
        secret_seed = distributed.shared_secret_seed(accelerator, args.dp_seed)
        labels = np.repeat(np.arange(len(names)), args.num_images_per_class)
        population = random_api(pipe, prompts, labels, args, secret_seed)
        state = {"recipe": recipe, "iteration": 0, "dp_seed": secret_seed, "history": []}
        save_state(args.output_dir, state, population, labels)
    else:
        secret_seed = state["dp_seed"]
        print(f"Resumed {args.output_dir} after iteration {state['iteration']} of {args.iterations}.")

    private_emb = private_embeddings(args, train)
    embed = embedder(args)
    stop_at = state["iteration"] + (args.stop_after_iterations or args.iterations)
    for t in range(state["iteration"] + 1, args.iterations + 1):
        if t > stop_at:
            print(f"Stopped after iteration {t - 1} (--stop_after_iterations); run the same command to continue.")
            return
        released = [im.resize((args.output_resolution,) * 2, Image.Resampling.LANCZOS) for im in population]
        votes = pe.nearest_votes(private_emb, train.labels, embed(released, f"Inception (population, iteration {t})"),
                                 labels)
        noisy = pe.noisy_histogram(votes, sigma, seeded_generator(secret_seed, "pe-noise", t))
        del votes  # the exact votes are private: nothing but the noisy histogram leaves this step
        chosen = pe.resample(noisy, labels, [args.num_images_per_class] * len(names), threshold,
                             seeded_generator(secret_seed, "pe-resample", t))
        parents = [population[i] for i in chosen]
        population = variation_api(img2img, parents, prompts, labels[chosen], schedule[t - 1], args, secret_seed, t)
        labels = labels[chosen]
        above = noisy >= threshold
        state["history"].append({"iteration": t, "strength": schedule[t - 1], "bins_above_threshold": int(above.sum()),
                                 "distinct_parents": int(len(np.unique(chosen))),
                                 "noisy_count_max": float(noisy.max())})  # noisy quantities only: DP to publish
        state["iteration"] = t
        save_state(args.output_dir, state, population, labels)
        print(f"iteration {t}/{args.iterations}: {int(above.sum())} of {len(noisy)} noisy counts >= H, "
              f"{len(np.unique(chosen))} distinct parents")

    ledger.steps_done = args.iterations
    report = ledger.report(
        method="pe", dataset_size=n, base_model=args.pretrained_model_name_or_path, class_names=names,
        class_prompts=prompts, resolution=args.resolution, output_resolution=args.output_resolution,
        images_per_class=[args.num_images_per_class] * len(names), count_threshold=threshold,
        strength_schedule=schedule, num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
        embedding=args.embedding, target_epsilon=args.target_epsilon, history=state["history"],
        sensitivity="one vote per private image per iteration: l2 sensitivity 1 (max_grad_norm records it)")
    final = [im.resize((args.output_resolution,) * 2, Image.Resampling.LANCZOS) for im in population]
    write_release(args.output_dir, final, labels, names, prompts, report)
    # the secret seed goes BEFORE the folder says complete: a crash in between leaves an unfinished folder (a rerun
    # starts afresh), never a finished release that still holds its secret
    shutil.rmtree(os.path.join(args.output_dir, STATE_DIR))
    run_folder.write_status(args.output_dir, "complete")
    print(f"Wrote {len(final)} images to {args.output_dir}: ε = {report['epsilon']:.4f} at δ = {report['delta']:.3g}")
    distributed.finish(accelerator)


def run_folder_ready(output_dir: str) -> None:
    os.makedirs(output_dir, exist_ok=True)
    run_folder.write_status(output_dir, "running")


def private_embeddings(args, train) -> np.ndarray:
    """The private images' embeddings, computed once: for Inception, the same cache evaluate.py's FID uses."""
    images = (train.image(i) for i in range(len(train)))
    if args.embedding == "pixels":
        return pe.pixel_embedding(images)
    # keyed by the images' content (as evaluate.py's FID features): a dataset at the same path or of the same size
    # never reuses another's features
    key = {"content": train.content_digest(show_progress=True), "split": "train", "n": len(train)}
    model = metrics.load_inception()
    return metrics.cached_features(key, lambda resume: metrics.inception_features(
        images, model, args.embedding_batch_size, desc="Inception (private)", total=len(train), resume_path=resume),
        args.cache_dir)


def embedder(args):
    if args.embedding == "pixels":
        return lambda images, desc: pe.pixel_embedding(images)
    model = metrics.load_inception()
    return lambda images, desc: metrics.inception_features(images, model, args.embedding_batch_size, desc=desc)


if __name__ == "__main__":
    run_cli(main)
