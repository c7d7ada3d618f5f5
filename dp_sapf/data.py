"""Datasets, class prompts, Poisson batches and the latent/prompt caches shared by every script.

Everything that reads the sensitive images lives here, so the scripts cannot drift apart in how they
load, label or preprocess them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

# Paper Table 14 (DESIGN §1) plus the offline sets. Keys are normalised class names (see `normalise_name`).
BUILTIN_CLASS_PROMPTS: dict[str, dict[str, str]] = {
    "cifar10": {
        name: f"An image of {'an' if name[0] in 'aeiou' else 'a'} {name}"
        for name in ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    },
    "celeba": {"female": "An image of a female face", "male": "An image of a male face"},
    "camelyon": {"normal": "A normal lymph node image", "tumor": "A lymph node histopathology image"},
    "octmnist": {
        str(i): f"An optical coherence tomography (OCT) image for retinal disease {i + 1}" for i in range(4)
    },
    "fashion_mnist": {
        "t_shirt_top": "An image of a t-shirt/top",
        "trouser": "An image of a trouser",
        "pullover": "An image of a pullover",
        "dress": "An image of a dress",
        "coat": "An image of a coat",
        "sandal": "An image of a sandal",
        "shirt": "An image of a shirt",
        "sneaker": "An image of a sneaker",
        "bag": "An image of a bag",
        "ankle_boot": "An image of an ankle boot",
    },
    "mnist": {str(d): f"An image of a handwritten digit {d}" for d in range(10)},
}
DEFAULT_PROMPT_TEMPLATE = "An image of a {}"


def normalise_name(name: str) -> str:
    """Match class names across sources ('T - shirt / top', 't-shirt_top' -> 't_shirt_top')."""
    return re.sub(r"[^a-z0-9]+", "_", str(name).lower()).strip("_")


def add_data_args(parser: argparse.ArgumentParser, *, with_augmentation: bool = True) -> None:
    """The data flags every script shares (names as in diffusers' train_text_to_image_lora.py)."""
    g = parser.add_argument_group("data")
    g.add_argument("--dataset_name", type=str, default=None,
                   help="A dataset `datasets.load_dataset` accepts (Hub id or local path). Exclusive with --train_data_dir.")
    g.add_argument("--dataset_config_name", type=str, default=None, help="The config of --dataset_name, if it has several.")
    g.add_argument("--train_data_dir", type=str, default=None,
                   help="A local imagefolder: class subfolders (optionally under train/ and test/), or a metadata.jsonl "
                        "with the label column.")
    g.add_argument("--image_column", type=str, default="image", help="The column holding the images.")
    g.add_argument("--label_column", type=str, default="label", help="The column holding the class labels.")
    g.add_argument("--max_train_samples", type=int, default=None,
                   help="Keep only the first K training samples (debugging, quick runs). N is then K.")
    g.add_argument("--class_prompts", type=str, default=None,
                   help="Class -> prompt mapping: a built-in set (" + ", ".join(BUILTIN_CLASS_PROMPTS) + "), a JSON "
                        "file, or inline JSON ({\"class\": \"prompt\"} or a list in label order). "
                        "Default: --prompt_template.")
    g.add_argument("--prompt_template", type=str, default=DEFAULT_PROMPT_TEMPLATE,
                   help="Prompt for each class when --class_prompts is not given; '{}' is the class name.")
    g.add_argument("--cache_dir", type=str, default=None, help="Where `datasets` caches downloads.")
    g.add_argument("--resolution", type=int, default=512,
                   help="Images are resized (shorter side) and cropped to this many pixels before VAE encoding.")
    if with_augmentation:
        g.add_argument("--center_crop", action="store_true",
                       help="Crop at the centre. Latents are cached once per image, so crops are always central; "
                            "the flag is kept for diffusers compatibility.")
        g.add_argument("--random_flip", action="store_true",
                       help="Flip each sample horizontally with probability 1/2 (both orientations are cached).")


@dataclass
class LabelledImages:
    """A split of a labelled image dataset with its class names in label order."""

    dataset: "datasets.Dataset"  # noqa: F821
    image_column: str
    label_column: str
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def labels(self) -> np.ndarray:
        return np.asarray(self.dataset[self.label_column], dtype=np.int64)

    def image(self, i: int) -> Image.Image:
        return self.dataset[int(i)][self.image_column]


def load_labelled_images(args: argparse.Namespace, split: str = "train", *, max_samples: int | None = None,
                         min_classes: int = 2) -> LabelledImages:
    """Load one split with integer labels, checking the columns and the classes; clear errors otherwise."""
    import datasets

    if bool(args.dataset_name) == bool(args.train_data_dir):
        raise ValueError("Give exactly one of --dataset_name or --train_data_dir.")
    if args.train_data_dir:
        if not os.path.isdir(args.train_data_dir):
            raise FileNotFoundError(f"--train_data_dir {args.train_data_dir!r} is not a folder.")
        loaded = datasets.load_dataset("imagefolder", data_dir=args.train_data_dir, cache_dir=args.cache_dir)
    else:
        loaded = datasets.load_dataset(args.dataset_name, args.dataset_config_name, cache_dir=args.cache_dir)
    if split not in loaded:
        raise ValueError(f"The data has no split {split!r}; it has {sorted(loaded)}.")
    ds = loaded[split]
    for flag, column in (("--image_column", args.image_column), ("--label_column", args.label_column)):
        if column not in ds.column_names:
            raise ValueError(f"{flag} {column!r} is not a column of the data; columns: {ds.column_names}.")
    if max_samples is not None:
        ds = ds.select(range(min(max_samples, len(ds))))
    if len(ds) == 0:
        raise ValueError(f"The {split!r} split is empty.")

    feature = ds.features[args.label_column]
    if isinstance(feature, datasets.ClassLabel):
        class_names = list(feature.names)
    else:  # free-form labels (e.g. metadata.jsonl): map sorted distinct values to 0..K-1
        values = sorted({str(v) for v in ds[args.label_column]})
        index = {v: i for i, v in enumerate(values)}
        ds = ds.map(lambda row: {args.label_column: index[str(row[args.label_column])]})
        class_names = values
    present = set(np.unique(np.asarray(ds[args.label_column])).tolist())
    if len(present) < min_classes:
        raise ValueError(f"The {split!r} split has {len(present)} class(es); class-conditional DP-SAPF needs at "
                         f"least {min_classes}. Check --label_column.")
    return LabelledImages(ds, args.image_column, args.label_column, class_names)


def resolve_class_prompts(class_names: list[str], class_prompts: str | None = None,
                          prompt_template: str = DEFAULT_PROMPT_TEMPLATE) -> list[str]:
    """One prompt per class, in label order, from a built-in set, JSON (file or inline) or the template."""
    if class_prompts is None:
        return [prompt_template.format(name.replace("_", " ")) for name in class_names]
    if class_prompts in BUILTIN_CLASS_PROMPTS:
        mapping: dict | list = BUILTIN_CLASS_PROMPTS[class_prompts]
    elif os.path.isfile(class_prompts):
        with open(class_prompts) as f:
            mapping = json.load(f)
    else:
        try:
            mapping = json.loads(class_prompts)
        except json.JSONDecodeError:
            raise ValueError(f"--class_prompts {class_prompts!r} is neither a built-in set "
                             f"({', '.join(BUILTIN_CLASS_PROMPTS)}), a JSON file, nor inline JSON.") from None
    if isinstance(mapping, list):
        if len(mapping) != len(class_names):
            raise ValueError(f"--class_prompts lists {len(mapping)} prompts for {len(class_names)} classes.")
        return [str(p) for p in mapping]
    by_name = {normalise_name(k): v for k, v in mapping.items()}
    missing = [name for name in class_names if normalise_name(name) not in by_name]
    if missing:
        raise ValueError(f"--class_prompts has no prompt for the classes {missing}; it covers {sorted(mapping)}.")
    return [by_name[normalise_name(name)] for name in class_names]


def preprocess(image: Image.Image, resolution: int) -> torch.Tensor:
    """PIL image -> (3, R, R) tensor in [-1, 1]: resize the shorter side (bicubic), centre crop.

    Written with PIL because torchvision cannot be installed beside torch 2.13 CPU (DESIGN §3).
    """
    image = image.convert("RGB")
    w, h = image.size
    scale = resolution / min(w, h)
    if (w, h) != (resolution, resolution):
        image = image.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))),
                             Image.Resampling.BICUBIC)
    w, h = image.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def poisson_sample(num_samples: int, sample_rate: float, generator: torch.Generator) -> torch.Tensor:
    """Indices of a Poisson sample: each of the N examples is in independently with probability q.

    One vectorised draw over N (no Python loop), from a generator seeded identically on every process, so
    every rank sees the same global sample and then takes its own disjoint share (`shard`).
    """
    mask = torch.rand(num_samples, generator=generator, device=generator.device) < sample_rate
    return mask.nonzero().flatten().cpu()


def shard(indices: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This process's disjoint share of a global index set (every index on exactly one rank)."""
    return indices[rank::world_size]


@dataclass
class LatentCache:
    """VAE posterior (mean, std) per image and orientation, and the labels.

    Encoding is a fixed per-sample transformation of the data, so computing it once and reusing it is
    privacy-neutral; a fresh latent is still drawn from the posterior at every use, as the uncached path does.
    """

    mean: torch.Tensor  # (N, V, C, h, w), V = 2 orientations with --random_flip, else 1
    std: torch.Tensor
    labels: torch.Tensor  # (N,)
    scaling_factor: float

    def __len__(self) -> int:
        return self.labels.shape[0]

    def draw(self, indices: torch.Tensor, flips: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Scaled latents for `indices` with the given flip choices and standard-normal draws `eps`."""
        view = flips.clamp(max=self.mean.shape[1] - 1)
        mean = self.mean[indices, view].to(eps.device, torch.float32)
        std = self.std[indices, view].to(eps.device, torch.float32)
        return (mean + std * eps) * self.scaling_factor


@torch.no_grad()
def encode_latents(vae, images: LabelledImages, resolution: int, *, random_flip: bool, batch_size: int = 32,
                   device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                   show_progress: bool = True) -> LatentCache:
    """Encode every image once (and its mirror image with --random_flip) into the VAE posterior."""
    from tqdm.auto import tqdm

    views = 2 if random_flip else 1
    means, stds = [], []
    n = len(images)
    for start in tqdm(range(0, n, batch_size), desc="Encoding latents", disable=not show_progress):
        pixels = torch.stack([preprocess(images.image(i), resolution) for i in range(start, min(n, start + batch_size))])
        batch = torch.cat([pixels, pixels.flip(-1)]) if random_flip else pixels
        dist = vae.encode(batch.to(device, dtype)).latent_dist
        mean = dist.mean.float().cpu().unflatten(0, (views, -1)).transpose(0, 1)
        std = dist.std.float().cpu().unflatten(0, (views, -1)).transpose(0, 1)
        means.append(mean)
        stds.append(std)
    return LatentCache(torch.cat(means), torch.cat(stds), torch.as_tensor(images.labels),
                       float(vae.config.scaling_factor))



def micro_batches(cache: LatentCache, prompt_embeds: torch.Tensor, indices: torch.Tensor, *, rank: int,
                  world_size: int, micro_batch_size: int, num_train_timesteps: int, generator: torch.Generator,
                  device):
    """Yield (latents, prompt states, noise, timesteps) micro-batches of this rank's share of `indices`.

    The diffusion randomness (orientation, posterior draw, noise, timestep) is drawn for the whole global
    batch from a generator that is identical on every rank, then sliced: a sample gets the same inputs
    whether it runs in 1 or several processes, and after a resume.
    """
    n = indices.shape[0]
    views = cache.mean.shape[1]
    latent_shape = tuple(cache.mean.shape[2:])
    flips = torch.randint(0, views, (n,), generator=generator, device=generator.device)
    eps = torch.randn((n, *latent_shape), generator=generator, device=generator.device)
    noise = torch.randn((n, *latent_shape), generator=generator, device=generator.device)
    timesteps = torch.randint(0, num_train_timesteps, (n,), generator=generator, device=generator.device)
    mine = torch.arange(rank, n, world_size)
    for start in range(0, mine.shape[0], micro_batch_size):
        pos = mine[start:start + micro_batch_size]
        idx = indices[pos]
        latents = cache.draw(idx, flips[pos].cpu(), eps[pos].to(device))
        hidden = prompt_embeds[cache.labels[idx].to(prompt_embeds.device)]
        yield latents, hidden, noise[pos].to(device), timesteps[pos].to(device).long()
