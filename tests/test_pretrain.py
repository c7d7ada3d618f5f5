"""experiments/pretrain_public.py: a run stopped and resumed (across both stages) gives the uninterrupted result."""

import os

from safetensors.torch import load_file

from helpers import run_script, write_fake_corpus

TINY = ["--vae_steps", "3", "--unet_steps", "4", "--vae_batch_size", "4", "--batch_size", "4", "--threads", "2",
        "--warmup_steps", "1", "--vae_warmup_steps", "1", "--grid_dir", "", "--device", "cpu", "--architecture", "tiny"]


def _weights(folder):
    return {part: load_file(os.path.join(folder, part, name))
            for part, name in (("vae", "diffusion_pytorch_model.safetensors"),
                               ("unet", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors"))}


def test_stopped_and_resumed_pretraining_equals_one_run(tmp_path):
    corpus = write_fake_corpus(str(tmp_path / "corpus"))
    tiny = ["--corpus_dir", corpus, *TINY]
    straight = str(tmp_path / "straight")
    res = run_script("experiments/pretrain_public.py", ["--output_dir", straight, "--work_dir", str(tmp_path / "w1"), *tiny])
    assert res.returncode == 0, res.stderr[-3000:]
    card = open(os.path.join(straight, "README.md")).read()
    assert "No Fashion-MNIST image" in card and "openclipart 8" in card

    resumed = str(tmp_path / "resumed")
    base = ["--output_dir", resumed, "--work_dir", str(tmp_path / "w2"), *tiny]
    res = run_script("experiments/pretrain_public.py", base + ["--stop_after_steps", "2"])  # stops inside stage A
    assert res.returncode == 0 and "rerun with --resume" in res.stdout, res.stderr[-3000:]
    assert not os.path.exists(resumed)
    res = run_script("experiments/pretrain_public.py", base + ["--resume", "--stop_after_steps", "3"])  # A ends, B stops
    assert res.returncode == 0 and "stage unet" in res.stdout, res.stderr[-3000:]
    res = run_script("experiments/pretrain_public.py", base + ["--resume"])
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = _weights(straight), _weights(resumed)
    for part in a:
        assert a[part].keys() == b[part].keys()
        assert all((a[part][k] == b[part][k]).all() for k in a[part]), part
    # the text encoder was trained (it is part of the public model now), its unseen token rows were not
    from dp_sapf.tiny_pipeline import build_components

    seeded = build_components(0, "tiny")["text_encoder"].state_dict()
    emb = "embeddings.token_embedding.weight"
    changed = (a["text_encoder"][emb] != seeded[emb]).any(1)
    assert 0 < int(changed.sum()) < 200, int(changed.sum())
    # a resume is refused when the recipe or the corpus changed
    res = run_script("experiments/pretrain_public.py", base + ["--resume", "--unet_steps", "5"])
    assert res.returncode != 0 and "different recipe" in res.stderr
    write_fake_corpus(corpus, seed=1)
    res = run_script("experiments/pretrain_public.py", base + ["--resume"])
    assert res.returncode != 0 and "different corpus" in res.stderr
