"""--latent_cache_dir: the VAE posterior of a dataset is reused across runs only for exactly the same content."""

import argparse
import dataclasses
import os

import pytest
import torch

from dp_sapf import data, modeling


@pytest.fixture()
def vae_and_images(tiny_pipeline_dir, fashion_data_dir):
    parser = argparse.ArgumentParser()
    data.add_data_args(parser)
    args = parser.parse_args(["--train_data_dir", fashion_data_dir, "--class_prompts", "fashion_mnist"])
    class_names, _ = data.resolve_classes(args.class_prompts)
    images = data.load_labelled_images(args, "train", class_names=class_names)
    return modeling.load_pipeline_parts(tiny_pipeline_dir).vae, images


def _encode(vae, images, cache_dir=None, resolution=16, random_flip=True):
    return data.encode_latents(vae, images, resolution, random_flip=random_flip, show_progress=False,
                               cache_dir=cache_dir)


def _same(a, b):
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("mean", "std", "labels", "keys")) and \
        (a.scaling_factor, a.shift_factor) == (b.scaling_factor, b.shift_factor)


def _no_vae(*args, **kwargs):
    raise AssertionError("the VAE ran although the cache holds these images")


def test_a_second_run_loads_what_the_first_encoded(vae_and_images, tmp_path, monkeypatch):
    vae, images = vae_and_images
    cache_dir = str(tmp_path / "latents")
    uncached = _encode(vae, images)
    first = _encode(vae, images, cache_dir)
    (name,) = os.listdir(cache_dir)
    assert os.stat(os.path.join(cache_dir, name)).st_mode & 0o777 == 0o600  # encodings of private images
    assert os.stat(cache_dir).st_mode & 0o077 == 0
    monkeypatch.setattr(vae, "encode", _no_vae)
    second = _encode(vae, images, cache_dir)
    assert _same(uncached, first) and _same(first, second)
    # labels are never taken from the cache: the same images under other labels load with the new labels
    relabelled = dataclasses.replace(images, labels=(images.labels + 1) % 10)
    assert torch.equal(_encode(vae, relabelled, cache_dir).labels, torch.as_tensor(relabelled.labels))


def test_other_content_or_settings_get_their_own_file(vae_and_images, tmp_path):
    vae, images = vae_and_images
    cache_dir = str(tmp_path / "latents")
    base = _encode(vae, images, cache_dir)
    reordered = dataclasses.replace(images, dataset=images.dataset.select(range(len(images) - 1, -1, -1)),
                                    labels=images.labels[::-1].copy())
    fewer = dataclasses.replace(images, dataset=images.dataset.select(range(len(images) - 1)),
                                labels=images.labels[:-1].copy())
    _encode(vae, reordered, cache_dir)
    _encode(vae, fewer, cache_dir)
    _encode(vae, images, cache_dir, random_flip=False)
    _encode(vae, images, cache_dir, resolution=8)
    with torch.no_grad():
        next(vae.parameters()).add_(1e-3)  # another encoder, same config
    moved = _encode(vae, images, cache_dir)
    assert len(os.listdir(cache_dir)) == 6
    assert not torch.equal(moved.mean, base.mean)


def test_an_unreadable_cache_file_is_encoded_again(vae_and_images, tmp_path, capsys, monkeypatch):
    vae, images = vae_and_images
    cache_dir = str(tmp_path / "latents")
    good = _encode(vae, images, cache_dir)
    (name,) = os.listdir(cache_dir)
    with open(os.path.join(cache_dir, name), "wb") as f:
        f.write(b"not a safetensors file")
    again = data.encode_latents(vae, images, 16, random_flip=True, show_progress=True, cache_dir=cache_dir)
    assert _same(good, again) and "unreadable latent cache" in capsys.readouterr().out
    monkeypatch.setattr(vae, "encode", _no_vae)  # the file was written again, whole: it loads now
    assert _same(good, _encode(vae, images, cache_dir))


def test_training_with_the_cache_gives_the_same_weights(tiny_pipeline_dir, fashion_data_dir, tmp_path):
    """train_dp_sapf.py: no cache, the run that writes it and the run that loads it train identical weights."""
    from safetensors.torch import load_file

    from helpers import run_script, train_args

    cache_dir = str(tmp_path / "latents")
    weights = []
    for k, extra in enumerate([[], ["--latent_cache_dir", cache_dir], ["--latent_cache_dir", cache_dir]]):
        out = str(tmp_path / f"run{k}")
        res = run_script("train_dp_sapf.py", train_args(
            tiny_pipeline_dir, fashion_data_dir, out, "--lora_target", "all_attention", "--train_mode", "direct",
            "--noise_multiplier", "1", "--max_train_steps", "2", *extra))
        assert res.returncode == 0, res.stderr[-3000:]
        assert ("loaded from" in res.stdout) == (k == 2)
        weights.append(load_file(os.path.join(out, "unet", "diffusion_pytorch_model.safetensors")))
    assert len(os.listdir(cache_dir)) == 1
    assert all(torch.equal(weights[0][name], w[name]) for w in weights[1:] for name in weights[0])
