"""dp_sapf/public_corpus.py: captions from paths, drawings made visible on black, drops counted, and never a
sensitive set read."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dp_sapf import public_corpus as pc
from helpers import REPO

WORDS = frozenset("blue fedora hat hats clothing tennis shoe shoes people dog dogs bored mammal mammals flag flags "
                  "red apple food star shape shapes do".split())


def test_captions_keep_english_words_and_the_folder_concept():
    assert pc.clipart_caption("people/clothing/hats/blue_fedora.png", WORDS) == "An image of a blue fedora, hat"
    # author names and truncated fragments are not lower-case dictionary words
    assert pc.clipart_caption("people/clothing/tennis_shoes_jarno_vasam_.png", WORDS) == \
        "An image of a tennis shoes, clothing"
    assert pc.clipart_caption("animals/mammals/dogs/bored_dog_01.png", WORDS) == "An image of a bored dog, mammal"
    # no English word in the file name: the deepest folder that has one
    assert pc.clipart_caption("signs_and_symbols/flags/africa/Algeria.png", WORDS) == "An image of a flag"
    assert pc.clipart_caption("Unsorted/Cornetto.png", WORDS) is None
    assert pc.emoji_caption("\U0001F462") == "An image of a woman's boots"


def _png(path, array, mode):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array, mode).save(path)


def _fake_clipart(root):
    """Line art on transparency, a colour drawing on white, its duplicate, an empty one, a corrupt file."""
    line = np.zeros((200, 120, 4), np.uint8)
    line[20:180, 55:65, 3] = 255  # black opaque stroke on a transparent background
    _png(f"{root}/people/clothing/hats/blue_fedora.png", line, "RGBA")
    colour = np.full((90, 90, 3), 255, np.uint8)
    colour[20:70, 30:60] = (200, 30, 30)
    _png(f"{root}/food/red_apple.png", colour, "RGB")
    _png(f"{root}/food/red_apple_copy.png", colour, "RGB")
    _png(f"{root}/shapes/star.png", np.zeros((50, 50, 4), np.uint8), "RGBA")
    os.makedirs(f"{root}/shapes", exist_ok=True)
    with open(f"{root}/shapes/broken_star.png", "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    return root


def test_build_makes_drawings_visible_and_counts_every_drop(tmp_path):
    root = _fake_clipart(str(tmp_path / "clipart"))
    words = tmp_path / "words"
    words.write_text("\n".join(sorted(WORDS | {"Algeria", "broken"})) + "\n")
    out = str(tmp_path / "corpus")
    sheet = pc.build_corpus(out, ["openclipart"], workers=1, openclipart_dir=root, words_file=str(words))
    assert sheet["read"] == {"openclipart": 5} and sheet["total"] == 2
    assert sheet["dropped"] == {"duplicate": 1, "near-empty at 32 px": 1, "unreadable (UnidentifiedImageError)": 1}
    rows = [json.loads(line) for line in open(os.path.join(out, "metadata.jsonl"))]
    by_text = {r["text"]: np.asarray(Image.open(os.path.join(out, r["file_name"]))) for r in rows}
    assert set(by_text) == {"An image of a blue fedora, hat", "An image of a red apple, food"}
    fedora = by_text["An image of a blue fedora, hat"]
    assert fedora.shape == (32, 32, 3)
    # the black stroke on transparency became a bright stroke on black, resized to 30 px tall and centred
    assert fedora[16, 16].min() > 200 and fedora[16, 2].max() == 0 and fedora[0].max() == 0
    rows_lit = np.flatnonzero(fedora.max(axis=(1, 2)) > 100)
    assert rows_lit.min() == 1 and rows_lit.max() == 30
    apple = by_text["An image of a red apple, food"]
    assert apple[16, 16, 0] < apple[16, 16, 1]  # the white background was inverted (to black), and the red with it
    assert apple[0, 0].max() == 0


def test_decompression_bombs_are_skipped_and_counted(tmp_path, monkeypatch):
    root = _fake_clipart(str(tmp_path / "clipart"))
    words = tmp_path / "words"
    words.write_text("\n".join(sorted(WORDS)) + "\n")
    # 200x120 now passes PIL's error threshold (2x), the two 90x90 copies its warning threshold: all three skipped
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 60 * 60)
    sheet = pc.build_corpus(str(tmp_path / "c"), ["openclipart"], workers=1, openclipart_dir=root,
                            words_file=str(words))
    assert sheet["dropped"]["decompression-bomb guard (PIL refuses the pixel count)"] == 3
    assert Image.MAX_IMAGE_PIXELS == 60 * 60  # the guard itself was never raised


def test_sensitive_sets_are_refused_and_never_opened(tmp_path):
    for sensitive in pc.SENSITIVE_DIRS:
        with pytest.raises(ValueError, match="sensitive"):
            pc.openclipart_items(sensitive, WORDS)
        with pytest.raises(ValueError, match="sensitive"):
            pc.emoji_items(os.path.join(sensitive, "train-images-idx3-ubyte.gz"))
    # a whole build (clip art + the MNIST-5k digits), watched by an audit hook: no file of a sensitive set is opened
    root = _fake_clipart(str(tmp_path / "clipart"))
    words = tmp_path / "words"
    words.write_text("\n".join(sorted(WORDS)) + "\n")
    code = f"""
import sys, json
opened = []
sys.addaudithook(lambda event, args: opened.append(str(args[0])) if event == "open" and args else None)
from dp_sapf import public_corpus as pc
sheet = pc.build_corpus({str(tmp_path / 'c')!r}, ["openclipart", "mnist5k"], workers=1,
                        openclipart_dir={root!r}, words_file={str(words)!r})
print(json.dumps({{"kept": sheet["kept"], "opened": opened}}))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env=dict(os.environ, PYTHONPATH=REPO), timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["kept"]["mnist5k"] == 4000 and out["kept"]["openclipart"] == 2
    assert any("mnist_5k" in p for p in out["opened"])  # the hook does see the files that are read
    assert not [p for p in out["opened"] if any(p.startswith(s) for s in pc.SENSITIVE_DIRS)]


@pytest.mark.skipif(not os.path.isfile(pc.EMOJI_FONT), reason="fonts-noto-color-emoji is not installed")
def test_emoji_render_in_colour_on_black():
    items = {it["text"]: it for it in pc.emoji_items(pc.EMOJI_FONT)}
    assert len(items) > 1000
    image, reason, _ = pc.render_item(items["An image of a t-shirt"])
    pixels = np.asarray(image)
    assert reason is None and pixels.shape == (32, 32, 3)
    assert pixels[0, 0].max() == 0 and pixels[16, 16].max() > 100


@pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"),
                    reason="dataset-fashion-mnist is not installed")
@pytest.mark.parametrize("planted", ["as_is", "upscaled_rgb"])
def test_a_sensitive_image_in_a_public_folder_is_refused_by_content(tmp_path, planted):
    """The real builder (two worker processes) recognises a Fashion-MNIST image by content, whatever its path and
    encoding, from the committed key list: it never opens the sensitive set itself."""
    from dp_sapf.sources import load_fashion_mnist

    image = Image.fromarray(load_fashion_mnist()["test"][0][123], "L")  # read here, by the test, not the builder
    if planted == "upscaled_rgb":
        image = image.convert("RGB").resize((112, 112), Image.Resampling.NEAREST)
    root = _fake_clipart(str(tmp_path / "clipart"))
    os.makedirs(f"{root}/people/clothing", exist_ok=True)
    image.save(f"{root}/people/clothing/blue_shoe.png")
    words = tmp_path / "words"
    words.write_text("\n".join(sorted(WORDS)) + "\n")
    with pytest.raises(ValueError, match="blue_shoe.png is an image of a sensitive dataset"):
        pc.build_corpus(str(tmp_path / "c"), ["openclipart"], workers=2, openclipart_dir=root, words_file=str(words))
    assert not os.path.exists(tmp_path / "c")
    assert len(pc.sensitive_fingerprints()) == 70000
