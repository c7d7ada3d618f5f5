#!/usr/bin/env python
"""Score a synthetic dataset as DPImageBench does: FID against the sensitive train set, downstream accuracy.

    python evaluate.py --synthetic_dir synthetic --train_data_dir data --classifier all --output_dir eval

FID uses the standard TF-Inception weights (offline, hash-checked). Accuracy: a classifier trained on the
synthetic images (model selection on a held-out synthetic split: no privacy cost) and tested on the real test
split, next to the same classifier trained real -> real. Writes metrics.json, metrics.md and metrics.png.
"""

import argparse
import json
import os

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from dp_sapf import atomic, data, metrics, run_folder, timing
from dp_sapf.cli import COUNT, POSITIVE, PROBABILITY, SEED, ArgumentParser, number, run_cli

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--synthetic_dir", required=True, help="Synthetic imagefolder: one subfolder per class (sample.py).")
    data.add_data_args(p, with_augmentation=False)
    p.add_argument("--real_split", default="train", help="Real split FID is measured against (the sensitive set).")
    p.add_argument("--fid_test_split", default=None, help="Also measure FID against this real split (e.g. test).")
    p.add_argument("--test_split", default="test", help="Real split the downstream accuracy is measured on.")
    p.add_argument("--classifier", choices=["wrn", "resnet", "all"], default="wrn", help="Downstream classifier(s).")
    p.add_argument("--epochs", type=COUNT, default=50, help="Classifier epochs (DPImageBench: 50 with Adam, 200 with SGD).")
    p.add_argument("--classifier_depth", type=COUNT, default=None, help="Depth (default WRN-28 / ResNet-164).")
    p.add_argument("--classifier_width", type=COUNT, default=None, help="WRN width (default 10).")
    p.add_argument("--classifier_optimizer", choices=["adam", "sgd"], default="adam",
                   help="adam: lr 0.01 (DPImageBench's default); sgd: lr 0.1, momentum 0.9, wd 5e-4 (CIFAR-like).")
    p.add_argument("--classifier_lr", type=POSITIVE, default=None, help="Override the optimizer's learning rate.")
    p.add_argument("--classifier_batch_size", type=COUNT, default=128, help="Classifier batch size.")
    p.add_argument("--classifier_resolution", type=number(int, min=8), default=32, help="Classifier input size.")
    p.add_argument("--no_classifier_flip", action="store_true",
                   help="No horizontal flips when training the classifiers (for digits or text, a flip changes the "
                        "class). Default: random crops and flips, as for CIFAR.")
    p.add_argument("--synthetic_val_fraction", type=PROBABILITY, default=0.1,
                   help="Synthetic images held out for model selection (no privacy cost).")
    p.add_argument("--select_on_real_val", action="store_true",
                   help="Select the classifier on real held-out training images instead. This SPENDS PRIVACY: it is "
                        "not covered by the DP guarantee of the synthetic data.")
    p.add_argument("--skip_real_reference", action="store_true", help="Skip the real -> real reference classifier.")
    p.add_argument("--skip_fid", action="store_true", help="Skip FID.")
    p.add_argument("--skip_accuracy", action="store_true", help="Skip the downstream classifiers.")
    p.add_argument("--allow_size_mismatch", action="store_true",
                   help="Accept synthetic images whose size differs from the real images' (they are resized for FID "
                        "and the classifiers). By default this is an error: sample at the sensitive data's size with "
                        "sample.py --output_resolution, as DPImageBench compares.")
    p.add_argument("--fid_batch_size", type=COUNT, default=50, help="Images per Inception forward.")
    p.add_argument("--fid_max_real", type=number(int, min=2), default=None,
                   help="Measure FID against a fixed random subset of this many real images (default: all), the same "
                        "for every run. Inception runs at 4-10 images/s on a 2-core CPU: the quick start uses 500.")
    p.add_argument("--seed", type=SEED, default=0, help="Seed of splits and classifier training.")
    p.add_argument("--output_dir", default="eval", help="Where metrics.json, metrics.md and metrics.png go.")
    args = p.parse_args(argv)
    depth, archs = args.classifier_depth, ["wrn", "resnet"] if args.classifier == "all" else [args.classifier]
    if depth is not None and "wrn" in archs and (depth < 10 or (depth - 4) % 6):
        p.error(f"--classifier_depth {depth}: a WRN's depth is 6n + 4 (10, 16, 22, 28, ...).")
    if depth is not None and "resnet" in archs and (depth < 11 or (depth - 2) % 9):
        p.error(f"--classifier_depth {depth}: a pre-activation ResNet's depth is 9n + 2 (11, 20, 29, ..., 164).")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        p.error(f"--output_dir {args.output_dir!r} is a file, not a folder.")
    if args.cache_dir is None:
        args.cache_dir = os.path.join(os.path.expanduser("~"), ".cache", "dp_sapf")
    return args


def load_synthetic(folder: str, real_class_names: list[str]):
    """(PIL images, labels in the real label order) from class subfolders; clear errors on mismatches."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--synthetic_dir {folder!r} is not a folder.")
    classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    real = {data.normalise_name(n): i for i, n in enumerate(real_class_names)}
    unknown = [c for c in classes if data.normalise_name(c) not in real]
    if unknown:
        raise ValueError(f"Synthetic class folders {unknown} match no real class ({real_class_names}).")
    images, labels = [], []
    for c in classes:
        names = [n for n in sorted(os.listdir(os.path.join(folder, c)))
                 if n.lower().endswith(IMAGE_SUFFIXES) and not atomic.is_temporary(n) and ".tmp." not in n]
        if not names:
            raise ValueError(f"Synthetic class folder {os.path.join(folder, c)!r} holds no images (an unfinished "
                             "sample.py run? rerun it: it completes the folder).")
        for name in names:
            path = os.path.join(folder, c, name)
            try:
                with Image.open(path) as im:
                    images.append(im.convert("RGB"))
            except (UnidentifiedImageError, OSError) as err:
                raise ValueError(f"Unreadable synthetic image {path}: {err}") from None
            labels.append(real[data.normalise_name(c)])
    if not images:
        raise ValueError(f"--synthetic_dir {folder!r} holds no images in class subfolders.")
    sizes = sorted({im.size for im in images})
    if len(sizes) > 1:
        raise ValueError(f"Synthetic images in {folder!r} have mixed sizes {sizes[:5]}: regenerate them with one "
                         "sample.py --output_resolution.")
    return images, np.asarray(labels)


def class_list(args) -> list[str]:
    """The class list: from --class_names / --class_prompts, else the synthetic set's metadata.jsonl (sample.py
    writes the training run's public list there)."""
    if args.class_prompts or args.class_names:
        return data.resolve_classes(args.class_prompts, args.class_names, args.prompt_template)[0]
    index = os.path.join(args.synthetic_dir, "metadata.jsonl")
    if os.path.isfile(index):
        by_label = {}
        with open(index) as f:
            for number_, line in enumerate(f, 1):
                try:
                    row = json.loads(line)
                    by_label.setdefault(int(row["label"]), str(row["class_name"]))
                except (ValueError, KeyError, TypeError) as err:
                    raise ValueError(f"{index} line {number_} is not a sample.py index row ({type(err).__name__}: "
                                     f"{err}); give --class_prompts or --class_names.") from None
        if sorted(by_label) != list(range(len(by_label))):
            raise ValueError(f"{index}: its labels {sorted(by_label)} are not 0..K-1; give --class_prompts or "
                             "--class_names.")
        return [by_label[k] for k in sorted(by_label)]
    if not os.path.isdir(args.synthetic_dir):
        raise FileNotFoundError(f"--synthetic_dir {args.synthetic_dir!r} is not a folder.")
    raise ValueError(f"{args.synthetic_dir} has no metadata.jsonl (written by sample.py): give the class list with "
                     "--class_prompts or --class_names.")


def check_sizes(synthetic_size, real: data.LabelledImages, allow_mismatch: bool) -> None:
    """Synthetic and real images must share a size unless the user says otherwise (silent resizes skew FID)."""
    real_size = real.image(0).size
    if synthetic_size != real_size and not allow_mismatch:
        raise ValueError(f"Synthetic images are {synthetic_size[0]}x{synthetic_size[1]} but the real images are "
                         f"{real_size[0]}x{real_size[1]}. Sample with `sample.py --output_resolution {real_size[0]}` "
                         "or pass --allow_size_mismatch to resize them.")


def real_images(split: data.LabelledImages):
    return [split.image(i).convert("RGB") for i in range(len(split))]


def split_off(n: int, fraction: float, seed: int):
    order = np.random.default_rng(seed).permutation(n)
    k = int(round(n * fraction))
    return order[k:], order[:k]


def main(argv=None):
    args = parse_args(argv)
    names = class_list(args)
    syn_images, syn_labels = load_synthetic(args.synthetic_dir, names)  # the cheap checks first
    train = data.load_labelled_images(args, args.real_split, class_names=names, max_samples=args.max_train_samples)
    test = data.load_labelled_images(args, args.test_split, class_names=names, min_classes=1)
    check_sizes(syn_images[0].size, train, args.allow_size_mismatch)
    os.makedirs(args.output_dir, exist_ok=True)
    source = args.train_data_dir and os.path.abspath(args.train_data_dir) or args.dataset_name
    result = {"synthetic_dir": args.synthetic_dir, "num_synthetic": len(syn_images), "real": source,
              "num_real_train": len(train), "num_real_test": len(test), "class_names": train.class_names}

    timings = timing.Timings("cpu")  # the figures bench/scripts_report.py sets beside bench_step.py's rows
    throughput = {}
    if not args.skip_fid:
        model = metrics.load_inception()
        with timings.stage("inception_synthetic"):
            syn_feats = metrics.inception_features(syn_images, model, args.fid_batch_size, desc="Inception (synthetic)")
        throughput["inception_images_per_s"] = round(len(syn_images) / timings.stages["inception_synthetic"], 2)
        for split_name, split in [(args.real_split, train)] + ([(args.fid_test_split, data.load_labelled_images(
                args, args.fid_test_split, class_names=names, min_classes=1))] if args.fid_test_split else []):
            chosen = np.arange(len(split))
            if args.fid_max_real is not None and args.fid_max_real < len(split):
                # one fixed subset (seed 0), whatever --seed: FIDs of different runs stay comparable
                chosen = np.sort(np.random.default_rng(0).choice(len(split), args.fid_max_real, replace=False))
            # keyed by the split's content (never its path): another dataset never reuses these features
            whole = {"content": split.content_digest(show_progress=True), "split": split_name, "n": len(split)}
            key = {**whole, **({"subset": len(chosen)} if len(chosen) < len(split) else {})}
            # the whole split's features, when cached (private_evolution.py caches them), hold the subset's rows
            feats = metrics.load_cached_features(whole, args.cache_dir)
            feats = feats[chosen] if feats is not None else metrics.cached_features(
                key, lambda resume, s=split, c=chosen: metrics.inception_features(
                    (s.image(i) for i in c), model, args.fid_batch_size, desc=f"Inception (real {split_name})",
                    total=len(c), resume_path=resume), args.cache_dir)
            result[f"fid_{split_name}"] = metrics.fid_from_features(syn_feats, feats)

    if not args.skip_accuracy:
        res = args.classifier_resolution
        x_syn, y_syn = metrics.images_to_tensor(syn_images, res), torch.as_tensor(syn_labels)
        x_test, y_test = metrics.images_to_tensor(real_images(test), res), torch.as_tensor(test.labels)
        x_real, y_real = metrics.images_to_tensor(real_images(train), res), torch.as_tensor(train.labels)
        real_fit, real_val = split_off(len(x_real), 0.1, args.seed)
        if args.select_on_real_val:
            syn_fit, x_sel, y_sel = np.arange(len(x_syn)), x_real[real_val], y_real[real_val]
        else:
            syn_fit, syn_val = split_off(len(x_syn), args.synthetic_val_fraction, args.seed)
            x_sel, y_sel = x_syn[syn_val], y_syn[syn_val]
        archs = ["wrn", "resnet"] if args.classifier == "all" else [args.classifier]
        kw = dict(num_classes=len(train.class_names), epochs=args.epochs, optimizer=args.classifier_optimizer,
                  lr=args.classifier_lr, batch_size=args.classifier_batch_size, seed=args.seed,
                  depth=args.classifier_depth, width=args.classifier_width, flip=not args.no_classifier_flip)
        for arch in archs:
            with timings.stage(f"classifier_{arch}"):
                model, history = metrics.train_classifier(x_syn[syn_fit], y_syn[syn_fit], x_sel, y_sel, arch=arch,
                                                          desc=f"{arch} on synthetic", **kw)
            # steady state: the epochs after the first (which warms up), per-epoch validation included
            steady = [h["seconds"] for h in history[1:]] or [h["seconds"] for h in history]
            throughput[f"classifier_{arch}_samples_per_s"] = round(len(steady) * len(syn_fit) / sum(steady), 2)
            result[f"accuracy_{arch}"] = metrics.accuracy(model, x_test, y_test)
            if not args.skip_real_reference:
                model, _ = metrics.train_classifier(x_real[real_fit], y_real[real_fit], x_real[real_val],
                                                    y_real[real_val], arch=arch, desc=f"{arch} real -> real", **kw)
                result[f"real_reference_accuracy_{arch}"] = metrics.accuracy(model, x_test, y_test)
        result["model_selection"] = "real validation (spends privacy)" if args.select_on_real_val else "synthetic held-out"
        result["classifier_settings"] = {k: v for k, v in kw.items() if k != "num_classes"}

    write_outputs(result, args.output_dir)
    # beside the metrics, not inside them (as the other scripts keep timings apart from their outputs)
    run_folder.write_json(args.output_dir, "timings.json", {**timings.summary(), **throughput,
                                                            "fid_batch_size": args.fid_batch_size,
                                                            "classifier_batch_size": args.classifier_batch_size})


def write_outputs(result: dict, output_dir: str) -> None:
    """metrics.json (strict: a metric that could not be computed, NaN, is null), a markdown table and a small bar
    chart, each written atomically."""
    result = {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in result.items()}
    atomic.write_json(os.path.join(output_dir, "metrics.json"), result)
    numbers = {k: v for k, v in result.items() if k.startswith(("fid", "accuracy", "real_reference"))}
    atomic.write_text(os.path.join(output_dir, "metrics.md"),
                      f"Synthetic: {result['synthetic_dir']} ({result['num_synthetic']} images); real: {result['real']}\n\n"
                      "| metric | value |\n|---|---|\n" + "".join(
                          f"| {k} | {'n/a' if v is None else f'{v:.4f}'} |\n" for k, v in numbers.items()))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    fids = {k: v for k, v in numbers.items() if k.startswith("fid") and v is not None}
    accs = {k: v for k, v in numbers.items() if not k.startswith("fid") and v is not None}
    for ax, values, title in ((axes[0], fids, "FID (lower is better)"), (axes[1], accs, "accuracy")):
        ax.bar(range(len(values)), list(values.values()), color="tab:blue")
        ax.set_xticks(range(len(values)), list(values), rotation=20, ha="right", fontsize=7)
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with atomic.replacing(os.path.join(output_dir, "metrics.png")) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    print("metrics:", json.dumps(numbers))


if __name__ == "__main__":
    run_cli(main)
