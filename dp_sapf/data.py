"""Datasets, class prompts, Poisson batches and the latent/prompt caches shared by every script.

Everything that reads the sensitive images lives here, so the scripts cannot drift apart in how they
load, label or preprocess them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .cli import COUNT
from .seeding import seeded_generator

# Paper Table 14 (docs/design.md §1) plus the offline sets. Keys are normalised class names (see `normalise_name`).
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
    g.add_argument("--max_train_samples", type=COUNT, default=None,
                   help="Keep only the first K training samples (debugging, quick runs). N is then K.")
    g.add_argument("--class_prompts", type=str, default=None,
                   help="The public classes and their prompts: a built-in set (" + ", ".join(BUILTIN_CLASS_PROMPTS) +
                        "), a JSON file, or inline JSON ({\"class\": \"prompt\"}, or a list of prompts in the "
                        "order of --class_names). Class names are never read from the private data.")
    g.add_argument("--class_names", type=str, default=None,
                   help="The public class list in label order, comma-separated or a JSON list (e.g. "
                        "'cat,dog'); prompts then come from --prompt_template unless --class_prompts is given. "
                        "Every image's label must be one of these (an imagefolder's folder names, a ClassLabel's "
                        "names, or integers 0..K-1 in this order).")
    g.add_argument("--prompt_template", type=str, default=DEFAULT_PROMPT_TEMPLATE,
                   help="Prompt for each class of --class_names when --class_prompts is not given; '{}' is the name.")
    g.add_argument("--cache_dir", type=str, default=None, help="Where `datasets` caches downloads.")
    g.add_argument("--resolution", type=COUNT, default=512,
                   help="Images are resized (shorter side) and cropped to this many pixels before VAE encoding.")
    if with_augmentation:
        g.add_argument("--center_crop", action="store_true",
                       help="Crop at the centre. Latents are cached once per image, so crops are always central; "
                            "the flag is kept for diffusers compatibility.")
        g.add_argument("--random_flip", action="store_true",
                       help="Flip each sample horizontally with probability 1/2 (both orientations are cached).")
        g.add_argument("--latent_cache_dir", type=str, default=None,
                       help="Keep the VAE encodings of the images here and reuse them in later runs on the same "
                            "images, resolution, flip, VAE and precision (found by content, not by path). It holds "
                            "encodings of your private images: keep it as private as the data (files are 0600).")


@dataclass
class LabelledImages:
    """A split of a labelled image dataset, its labels as indices into the public class list."""

    dataset: "datasets.Dataset"  # noqa: F821
    image_column: str
    labels: np.ndarray  # (N,) int64 indices into class_names
    class_names: list[str]  # public: from the user's flags, never from the data

    def __len__(self) -> int:
        return len(self.dataset)

    def image(self, i: int) -> Image.Image:
        """Image i, decoded; an unreadable file is a clear ValueError naming it."""
        try:
            image = self.dataset[int(i)][self.image_column]
            image.load()
            return image
        except Exception as err:  # PIL and datasets raise many kinds (UnidentifiedImageError, OSError, ...)
            raise ValueError(f"Cannot read image {self._describe(i)}: {type(err).__name__}: {err}") from None

    def images(self, start: int, stop: int) -> list[Image.Image]:
        """Images start..stop-1 decoded from one slice of the table, at about half the per-row cost of `image`
        (fingerprinting 60,000 images: 8 s instead of 17 s, docs/benchmarks.md). An unreadable file is the same
        clear error as `image` gives."""
        try:
            images = self.dataset[start:stop][self.image_column]
            for image in images:
                image.load()
            return images
        except Exception:  # noqa: BLE001 - find the file and name it
            return [self.image(i) for i in range(start, stop)]

    def all_images(self, show_progress: bool = False, chunk: int = 256):
        """(index, image) for every image in order, decoded slice by slice (`images`), behind a progress bar."""
        from tqdm.auto import tqdm

        with tqdm(total=len(self), desc="Fingerprinting images", disable=not show_progress) as bar:
            for start in range(0, len(self), chunk):
                batch = self.images(start, start + chunk)
                yield from enumerate(batch, start)
                bar.update(len(batch))

    def content_digest(self, show_progress: bool = False) -> str:
        """sha256 of every image's decoded pixels (mode, size, bytes) and label, in order: what a cache of features
        of this split is keyed by, so another dataset at the same path, or of the same size, never reuses them."""
        total = hashlib.sha256()
        for i, image in self.all_images(show_progress):
            total.update(hashlib.sha256(f"{image.mode}{image.size}".encode() + image.tobytes()).digest())
            total.update(int(self.labels[i]).to_bytes(8, "little"))
        return total.hexdigest()

    def _describe(self, i: int) -> str:
        import datasets

        try:
            raw = self.dataset.cast_column(self.image_column, datasets.Image(decode=False))[int(i)][self.image_column]
            return repr(raw.get("path") or f"#{i}")
        except Exception:
            return f"#{i}"


def _parse_list(text: str) -> list[str]:
    """--class_names: 'a,b,c' or a JSON list."""
    text = text.strip()
    if text.startswith("["):
        try:
            return [str(v) for v in json.loads(text)]
        except json.JSONDecodeError as err:
            raise ValueError(f"--class_names {text!r} is not a JSON list: {err}") from None
    return [part.strip() for part in text.split(",") if part.strip()]


def resolve_classes(class_prompts: str | None = None, class_names: str | list[str] | None = None,
                    prompt_template: str = DEFAULT_PROMPT_TEMPLATE) -> tuple[list[str], list[str]]:
    """The public class list and one prompt per class, in label order, from the user's flags only.

    Class names that reached a released artefact from the private data (a label only one image has, say)
    would leak it, so the list must be given: --class_prompts (built-in set or JSON) and/or --class_names.
    """
    names = (_parse_list(class_names) if isinstance(class_names, str) else list(class_names)) if class_names else None
    if names is not None and len({normalise_name(n) for n in names}) != len(names):
        raise ValueError(f"--class_names has duplicate names: {names}.")
    if class_prompts is None:
        if names is None:
            raise ValueError("Give the public class list: --class_prompts (a built-in set such as "
                             f"{', '.join(BUILTIN_CLASS_PROMPTS)}, or JSON) or --class_names. Class names are never "
                             "taken from the private data.")
        return names, [prompt_template.format(name.replace("_", " ")) for name in names]
    if class_prompts in BUILTIN_CLASS_PROMPTS:
        mapping: dict | list = BUILTIN_CLASS_PROMPTS[class_prompts]
    elif os.path.isfile(class_prompts):
        try:
            with open(class_prompts) as f:
                mapping = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"--class_prompts file {class_prompts!r} is not JSON: {err}") from None
    else:
        try:
            mapping = json.loads(class_prompts)
        except json.JSONDecodeError:
            raise ValueError(f"--class_prompts {class_prompts!r} is neither a built-in set "
                             f"({', '.join(BUILTIN_CLASS_PROMPTS)}), a JSON file, nor inline JSON.") from None
    if isinstance(mapping, list):
        if names is None:
            raise ValueError("--class_prompts as a list needs --class_names (the classes in the same order).")
        if len(mapping) != len(names):
            raise ValueError(f"--class_prompts lists {len(mapping)} prompts for {len(names)} --class_names.")
        return names, [str(p) for p in mapping]
    if not isinstance(mapping, dict) or not mapping:
        raise ValueError("--class_prompts must map class names to prompts (or list prompts in label order).")
    if names is None:
        names = [str(k) for k in mapping]
    by_name = {normalise_name(k): str(v) for k, v in mapping.items()}
    missing = [name for name in names if normalise_name(name) not in by_name]
    if missing:
        raise ValueError(f"--class_prompts has no prompt for the classes {missing}; it covers {sorted(mapping)}.")
    return names, [by_name[normalise_name(name)] for name in names]


def _label_indices(values, feature, class_names: list[str]) -> np.ndarray:
    """Map the data's labels onto the public class list: by name (ClassLabel names, strings) or by index."""
    import datasets

    public = {normalise_name(n): i for i, n in enumerate(class_names)}
    if isinstance(feature, datasets.ClassLabel):
        table = np.array([public.get(normalise_name(n), -1) for n in feature.names], dtype=np.int64)
        raw = np.asarray(values, dtype=np.int64)
        out = table[raw]
        unknown = sorted({feature.names[v] for v in raw[out < 0]})
    elif all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        out = np.asarray(values, dtype=np.int64)
        out = np.where((out >= 0) & (out < len(class_names)), out, -1)
        unknown = sorted({int(v) for v, o in zip(values, out) if o < 0})
    else:
        out = np.array([public.get(normalise_name(str(v)), -1) for v in values], dtype=np.int64)
        unknown = sorted({str(v) for v, o in zip(values, out) if o < 0})
    if unknown:
        count = int((out < 0).sum())
        raise ValueError(f"{count} image{'s' if count != 1 else ''} ha{'ve' if count != 1 else 's'} labels outside "
                         f"the public class list {class_names}: "
                         f"{unknown[:5]}. Add them to --class_names / --class_prompts, or leave those images out.")
    return out


def imagefolder_data_files(data_dir: str) -> dict[str, list[str]] | None:
    """datasets' own split patterns for a local folder, less the ones that match no file.

    `load_dataset("imagefolder", data_dir=...)` finds the splits by globbing the whole tree once per candidate
    pattern, a full walk with a stat per file each time (24 walks for a train/ + test/ folder: 41-58 s of every
    script for 60,000 images on this project's 2-core CPU, 14 s this way, docs/benchmarks.md). Here datasets' own
    `_get_data_files_patterns` tries its candidates against one listing of the folder, matched with fsspec's own
    glob translation, so the library resolves only the patterns that match: same splits, same files
    (tests/test_imagefolder.py compares both on several layouts). None, so that datasets resolves them itself, where
    a symlinked folder or a changed datasets internal could make the listing disagree with its glob.
    """
    try:
        from datasets.data_files import FILES_TO_IGNORE, _get_data_files_patterns
        from fsspec.utils import glob_translate
    except ImportError:
        return None
    root = os.path.abspath(data_dir).replace(os.sep, "/")
    files = []
    for folder, subfolders, names in os.walk(data_dir):
        if any(os.path.islink(os.path.join(folder, sub)) for sub in subfolders):
            return None
        relative = os.path.relpath(folder, data_dir).replace(os.sep, "/")
        parts = [] if relative == "." else relative.split("/")
        # datasets skips hidden and special (__x) files and folders unless a pattern names them; its defaults do not
        files += [f"{root}/{'/'.join(parts + [name])}" for name in names if name not in FILES_TO_IGNORE
                  and not any(p.startswith((".", "__")) for p in parts + [name])]

    def matching(pattern: str) -> list[str]:
        regex = re.compile(glob_translate(f"{root}/{pattern}"))
        return [f for f in files if regex.match(f)]

    try:
        patterns = _get_data_files_patterns(matching)
    except (FileNotFoundError, ValueError, TypeError):
        return None  # no data files, or datasets changed: its own resolution gives the same answer or the error
    return {split: [p for p in candidates if matching(p)] for split, candidates in patterns.items()}


def load_labelled_images(args: argparse.Namespace, split: str = "train", *, class_names: list[str],
                         max_samples: int | None = None, min_classes: int = 2) -> LabelledImages:
    """Load one split with labels mapped onto the public `class_names`; clear errors otherwise."""
    import datasets

    if bool(args.dataset_name) == bool(args.train_data_dir):
        raise ValueError("Give exactly one of --dataset_name or --train_data_dir.")
    if args.train_data_dir:
        if not os.path.isdir(args.train_data_dir):
            raise FileNotFoundError(f"--train_data_dir {args.train_data_dir!r} is not a folder.")
        if not any(files for _, _, files in os.walk(args.train_data_dir)):
            raise ValueError(f"--train_data_dir {args.train_data_dir!r} holds no files (empty class folders?): an "
                             "imagefolder has one subfolder of images per class.")
        loaded = datasets.load_dataset("imagefolder", data_dir=args.train_data_dir, cache_dir=args.cache_dir,
                                       data_files=imagefolder_data_files(args.train_data_dir))
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
    labels = _label_indices(ds[args.label_column], ds.features[args.label_column], class_names)
    present = len(np.unique(labels))
    if present < min_classes:
        raise ValueError(f"The {split!r} split has {present} class(es); class-conditional DP-SAPF needs at "
                         f"least {min_classes}. Check --label_column.")
    return LabelledImages(ds, args.image_column, labels, list(class_names))


def preprocess(image: Image.Image, resolution: int) -> torch.Tensor:
    """PIL image -> (3, R, R) tensor in [-1, 1]: resize the shorter side (bicubic), centre crop.

    Written with PIL because torchvision cannot be installed beside torch 2.13 CPU (docs/design.md §3).
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


def image_key(pixels: torch.Tensor) -> int:
    """A 63-bit fingerprint of an image's preprocessed pixels: its per-sample draws are keyed by it, so they
    do not depend on where the image sits in the dataset or on which other images are present."""
    digest = hashlib.sha256(pixels.detach().cpu().float().contiguous().numpy().tobytes()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass
class LatentCache:
    """VAE posterior (mean, std) per image and orientation, the labels and each image's key.

    Encoding is a fixed per-sample transformation of the data, so computing it once and reusing it is
    privacy-neutral; a fresh latent is still drawn from the posterior at every use, as the uncached path does.
    """

    mean: torch.Tensor  # (N, V, C, h, w), V = 2 orientations with --random_flip, else 1
    std: torch.Tensor
    labels: torch.Tensor  # (N,)
    keys: torch.Tensor  # (N,) int64 `image_key` of each image
    scaling_factor: float
    shift_factor: float = 0.0  # SD3's VAE: latents are (z - shift) * scale

    def __len__(self) -> int:
        return self.labels.shape[0]

    def draw(self, indices: torch.Tensor, flips: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Scaled latents for `indices` with the given flip choices and standard-normal draws `eps`."""
        view = flips.clamp(max=self.mean.shape[1] - 1)
        mean = self.mean[indices, view].to(eps.device, torch.float32)
        std = self.std[indices, view].to(eps.device, torch.float32)
        return (mean + std * eps - self.shift_factor) * self.scaling_factor


def _latent_scaling(vae) -> tuple[float, float]:
    """(scaling_factor, shift_factor) of the VAE's config; SD3's VAE has a shift, the others none."""
    return float(vae.config.scaling_factor), float(getattr(vae.config, "shift_factor", None) or 0.0)


def _weights_digest(module: torch.nn.Module) -> str:
    """sha256 over a module's parameters and buffers (names, dtypes, shapes, bytes): which VAE encoded."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _latent_cache_path(cache_dir: str, vae, keys: torch.Tensor, resolution: int, views: int,
                       device: torch.device | str, dtype: torch.dtype) -> str:
    """The cache file for these images (their pixel keys, in order) under this encoder and precision.

    The key is the content, not a path or a dataset name, so a changed, added or reordered image, another
    resolution, flip setting, VAE, dtype or device type gets a file of its own.
    """
    h = hashlib.sha256()
    h.update(f"v1|{resolution}|{views}|{dtype}|{torch.device(device).type}|{_weights_digest(vae)}|".encode())
    h.update(keys.numpy().tobytes())
    return os.path.join(cache_dir, f"latents-{h.hexdigest()[:24]}.safetensors")


def _image_keys(images: LabelledImages, resolution: int, show_progress: bool) -> torch.Tensor:
    return torch.tensor([image_key(preprocess(image, resolution)) for _, image in images.all_images(show_progress)],
                        dtype=torch.int64)


@torch.no_grad()
def encode_latents(vae, images: LabelledImages, resolution: int, *, random_flip: bool, batch_size: int = 64,
                   device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                   show_progress: bool = True, throughput=None, cache_dir: str | None = None) -> LatentCache:
    """Encode every image once (and its mirror image with --random_flip) into the VAE posterior.

    The next batch is decoded and resized (PIL, on a worker thread) while the VAE encodes the current one.
    throughput: a `timing.Timings` that gets one unit per batch (images/s after its warm-up batches).
    cache_dir (--latent_cache_dir): reuse the posterior a run on the same content wrote there. Reading the
    images to fingerprint them remains (35 s against 413 s for a miss at 60,000 images on one CPU thread,
    docs/benchmarks.md); the VAE pass is what is saved.
    Whether loaded or encoded, the posterior is the same deterministic function of each image, so the
    cache changes no draw and no privacy accounting.
    """
    from safetensors.torch import load_file, save_file

    from .atomic import replacing

    views = 2 if random_flip else 1
    path = None
    if cache_dir:
        os.makedirs(cache_dir, mode=0o700, exist_ok=True)  # encodings of private images: owner only
        keys = _image_keys(images, resolution, show_progress)
        path = _latent_cache_path(cache_dir, vae, keys, resolution, views, device, dtype)
        stored = None
        if os.path.exists(path):
            try:
                stored = load_file(path)
            except Exception as err:  # noqa: BLE001 - an unreadable cache is a miss, never a failed run
                print(f"warning: ignoring the unreadable latent cache {path} ({err}); encoding again.")
            if stored is not None and torch.equal(stored["keys"], keys):
                if show_progress:
                    print(f"Latents of {len(keys)} images loaded from {path}")
                return LatentCache(stored["mean"], stored["std"], torch.as_tensor(images.labels), keys,
                                   *_latent_scaling(vae))
    cache = _encode(vae, images, resolution, views, batch_size, device, dtype, show_progress, throughput)
    if path is not None:
        with replacing(path, mode=0o600) as tmp:  # several processes may write it: each renames a whole file
            save_file({"mean": cache.mean.contiguous(), "std": cache.std.contiguous(), "keys": cache.keys}, tmp)
    return cache


def _encode(vae, images, resolution, views, batch_size, device, dtype, show_progress, throughput) -> LatentCache:
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    means, stds, keys = [], [], []
    n = len(images)
    starts = list(range(0, n, batch_size))

    def pixels_of(start):
        return torch.stack([preprocess(image, resolution) for image in images.images(start, min(n, start + batch_size))])

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(pixels_of, starts[0]) if starts else None
        if throughput is not None:
            throughput.start_units()
        for k in tqdm(range(len(starts)), desc="Encoding latents", disable=not show_progress):
            pixels = pending.result()
            pending = pool.submit(pixels_of, starts[k + 1]) if k + 1 < len(starts) else None
            keys += [image_key(p) for p in pixels]
            batch = torch.cat([pixels, pixels.flip(-1)]) if views == 2 else pixels
            dist = vae.encode(batch.to(device, dtype)).latent_dist
            means.append(dist.mean.float().cpu().unflatten(0, (views, -1)).transpose(0, 1))
            stds.append(dist.std.float().cpu().unflatten(0, (views, -1)).transpose(0, 1))
            if throughput is not None:
                throughput.unit_done(len(pixels))  # .cpu() above waited for the batch
    return LatentCache(torch.cat(means), torch.cat(stds), torch.as_tensor(images.labels),
                       torch.tensor(keys, dtype=torch.int64), *_latent_scaling(vae))


def diffusion_draws(cache: LatentCache, indices: torch.Tensor, *, secret_seed: int, stream: tuple,
                    num_train_timesteps: int, multiplicity: int = 1):
    """Each image's (flip, posterior draw, noise, timestep) for one use, keyed by (secret seed, stream, image key).

    multiplicity K: K independent draws per image from the same per-image generator, one after another, as K
    consecutive rows (image-major; the first is the K = 1 draw), for noise multiplicity.

    These draws are mechanism randomness (docs/design.md §1): they come from the secret DP seed, so the adversary
    cannot compute them, and each image's draws depend on that image alone, never on its position or on
    which other images are present: adding or removing one image changes no other image's gradient, and the
    clipped sum moves by at most C. A generator per image is the price (about 20 µs each on a CPU core); the
    draws are made on the CPU so that every device and process count gives the same values.
    """
    views = cache.mean.shape[1]
    keys = cache.keys[indices].tolist()
    gaussians = torch.empty((len(keys) * multiplicity, 2, *cache.mean.shape[2:]))
    choices = torch.empty(len(keys) * multiplicity, dtype=torch.long)
    for i, key in enumerate(keys):
        g = seeded_generator(secret_seed, *stream, key)
        for row in range(i * multiplicity, (i + 1) * multiplicity):
            choices[row] = torch.randint(0, views * num_train_timesteps, (), generator=g)
            gaussians[row].normal_(generator=g)
    return choices % views, gaussians[:, 0], gaussians[:, 1], choices // views


def select_conditions(table, labels: torch.Tensor):
    """The per-class conditioning `table` (a tensor, or a tuple of tensors such as SD3's embeds + pooled) at
    `labels`: one row per sample."""
    if isinstance(table, (tuple, list)):
        return tuple(select_conditions(t, labels) for t in table)
    return table[labels.to(table.device)]


def _pad_rows(x, missing: int):
    if isinstance(x, tuple):
        return tuple(_pad_rows(t, missing) for t in x)
    return torch.cat([x, x.new_zeros((missing, *x.shape[1:]))])


def micro_batches(cache: LatentCache, prompt_embeds, indices: torch.Tensor, *, rank: int,
                  world_size: int, micro_batch_size: int, num_train_timesteps: int, secret_seed: int,
                  stream: tuple, device, pad_to: int | None = None, multiplicity: int = 1):
    """Yield (latents, conditioning, noise, timesteps) micro-batches of this rank's share of `indices`.

    multiplicity K (noise multiplicity): each sample comes as K consecutive rows with independent draws; a
    micro-batch holds at most `micro_batch_size` rows, i.e. micro_batch_size // K samples (at least one).

    `prompt_embeds` is the per-class conditioning table of `modeling.encode_prompts` (CLIP states, SD3's
    (embeds, pooled) tuple, or DiT's class ids); each sample gets its label's row.

    The per-sample randomness comes from `diffusion_draws` (secret, keyed per image), so a sample gets the
    same inputs whether it runs in 1 or several processes, in any micro-batch, and after a resume. The
    draws of the next micro-batch are made on a worker thread while the current one is on the device.

    pad_to: every micro-batch gets exactly this many rows (for torch.compile: one shape, no recompiles), the
    padding rows zeros, and a fifth element, the per-row weights on the CPU (1 real, 0 padding): the loss
    multiplies by them, so a padding row has zero loss, zero gradient, and adds nothing to the clipped sum.
    """
    from concurrent.futures import ThreadPoolExecutor

    mine = shard(indices, rank, world_size)
    per_chunk = max(1, micro_batch_size // multiplicity)
    chunks = [mine[start:start + per_chunk] for start in range(0, mine.shape[0], per_chunk)]

    def draws(idx):
        return diffusion_draws(cache, idx, secret_seed=secret_seed, stream=stream,
                               num_train_timesteps=num_train_timesteps, multiplicity=multiplicity)

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(draws, chunks[0]) if chunks else None
        for k, idx in enumerate(chunks):
            flips, eps, noise, timesteps = pending.result()
            pending = pool.submit(draws, chunks[k + 1]) if k + 1 < len(chunks) else None
            rows = idx.repeat_interleave(multiplicity)
            latents = cache.draw(rows, flips, eps.to(device))
            hidden = select_conditions(prompt_embeds, cache.labels[rows])
            batch = (latents, hidden, noise.to(device), timesteps.to(device))
            if pad_to is None:
                yield batch
                continue
            missing = pad_to - len(rows)
            if missing < 0 or missing % multiplicity:
                raise ValueError(f"A micro-batch of {len(rows)} rows does not fit pad_to = {pad_to} in whole samples "
                                 f"of {multiplicity} rows.")
            weights = torch.cat([torch.ones(len(rows)), torch.zeros(missing)])
            yield tuple(_pad_rows(t, missing) for t in batch) + (weights,)


def image_grid(images: list, columns: int) -> Image.Image:
    """Paste equally sized PIL images row by row into one grid (None leaves its cell black)."""
    first = next(im for im in images if im is not None)
    w, h = first.size
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * w, rows * h))
    for i, im in enumerate(images):
        if im is not None:
            grid.paste(im.convert("RGB"), ((i % columns) * w, (i // columns) * h))
    return grid


def write_synthetic_index(output_dir: str, names: list[str], prompts: list[str], counts: list[int]) -> None:
    """A labelled synthetic folder's metadata.jsonl (file, label, class, prompt) and preview.png (up to 8 images
    per class); the images are <output_dir>/<class>/<k:05d>.png (sample.py's and private_evolution.py's format).
    Both files are written atomically (evaluate.py and compare.py trust a metadata.jsonl that exists)."""
    from .atomic import save_image, write_text

    write_text(os.path.join(output_dir, "metadata.jsonl"), "".join(
        json.dumps({"file_name": f"{name}/{k:05d}.png", "label": c, "class_name": name, "prompt": prompt},
                   allow_nan=False) + "\n"
        for c, (name, prompt) in enumerate(zip(names, prompts)) for k in range(counts[c])))
    columns = min(8, max(counts))
    cells = [Image.open(os.path.join(output_dir, name, f"{k:05d}.png")) if k < counts[c] else None
             for c, name in enumerate(names) for k in range(columns)]
    save_image(image_grid(cells, columns), os.path.join(output_dir, "preview.png"))
