"""The embedded default model: a small Stable Diffusion pipeline built offline from seeded configs.

    python -m dp_sapf.tiny_pipeline --output_dir runs/tiny-sd [--seed 0]
    python -m dp_sapf.tiny_pipeline --output_dir runs/sd15-random --architecture sd15   # benchmarks only
    python -m dp_sapf.tiny_pipeline --output_dir runs/tiny-dit --architecture tiny-dit  # DiTPipeline, tests
    python -m dp_sapf.tiny_pipeline --output_dir runs/tiny-sd3 --architecture tiny-sd3  # StableDiffusion3Pipeline
    python -m dp_sapf.tiny_pipeline --output_dir runs/sd3 --architecture sd3-medium     # benchmarks only (also dit-xl)

It is an ordinary diffusers folder (unet, vae, text_encoder, tokenizer, scheduler, model_index.json) that
`StableDiffusionPipeline.from_pretrained` loads exactly as it loads SD-v1.5; only the sizes differ
(32-px images, 8x8 latents). Its tokenizer is the real CLIP BPE tokenizer, rebuilt from the vocabulary
file that ships inside the open-clip-torch package, so any English prompt tokenizes as in SD-v1.5.
"""

from __future__ import annotations

import argparse
import gzip
import html
import importlib.util
import json
import os
import shutil
import tempfile

import torch

CLIP_VOCAB_SIZE = 49408
CLIP_BOS, CLIP_EOS = 49406, 49407


def clip_vocabulary_file() -> str:
    """Path of open_clip's bpe_simple_vocab_16e6.txt.gz, found without importing open_clip (it needs torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    path = os.path.join(os.path.dirname(spec.origin), "bpe_simple_vocab_16e6.txt.gz") if spec and spec.origin else None
    if not path or not os.path.isfile(path):
        raise FileNotFoundError("The CLIP BPE vocabulary ships with open-clip-torch: "
                                "`pip install --no-deps open-clip-torch`.")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table (the first 256 vocabulary entries)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def clip_tokenizer_files(directory: str) -> tuple[str, str]:
    """Write vocab.json and merges.txt as open_clip's SimpleTokenizer builds its vocabulary (49408 entries)."""
    with gzip.open(clip_vocabulary_file()) as f:
        lines = html.unescape(f.read().decode("utf-8")).split("\n")
    merges = [tuple(line.split()) for line in lines[1: 49152 - 256 - 2 + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == CLIP_VOCAB_SIZE, len(vocab)
    os.makedirs(directory, exist_ok=True)
    vocab_path, merges_path = os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt")
    with open(vocab_path, "w", encoding="utf-8") as f:
        json.dump({token: i for i, token in enumerate(vocab)}, f, ensure_ascii=False)
    with open(merges_path, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return vocab_path, merges_path


# Stable Diffusion v1.5's architectures (random weights: the cost of the real model, for benchmarks, no download)
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                 cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
                block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 projection_dim=768, hidden_act="quick_gelu")
# DiT-XL/2 at 256 px and SD3-medium (its MMDiT, VAE and two CLIP encoders; no T5: the pipeline feeds zeros)
DIT_XL = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
              sample_size=32, patch_size=2, num_embeds_ada_norm=1000)
SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
                  num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                  pooled_projection_dim=2048, pos_embed_max_size=192)
SD3_VAE = dict(SD15_VAE, latent_channels=16, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609,
               use_quant_conv=False, use_post_quant_conv=False)
SD3_CLIP_L = dict(SD15_TEXT)
SD3_CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                  projection_dim=1280, hidden_act="gelu")
ARCHITECTURES = ("tiny", "public", "sd15", "tiny-dit", "dit-xl", "tiny-sd3", "sd3-medium")


def build_components(seed: int = 0, architecture: str = "tiny") -> dict:
    """The pipeline's parts from seeded configs: `tiny` is shaped like diffusers' `get_dummy_components`
    (32-px images; the tests' model); `public` is the committed public model's (experiments/pretrain_public.py:
    the same VAE and text encoder, a wider UNet); `sd15` is SD-v1.5's architecture at random init (benchmarks)."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if architecture not in ARCHITECTURES:
        raise ValueError(f"Unknown architecture {architecture!r}; choose from {', '.join(ARCHITECTURES)}.")
    # SD-v1.5's inference scheduler, for both
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1,
                              set_alpha_to_one=False, prediction_type="epsilon")
    text = dict(vocab_size=CLIP_VOCAB_SIZE, max_position_embeddings=77, bos_token_id=CLIP_BOS, eos_token_id=CLIP_EOS,
                pad_token_id=CLIP_EOS)
    if architecture == "sd15":
        torch.manual_seed(seed)
        return {"unet": UNet2DConditionModel(**SD15_UNET), "vae": AutoencoderKL(**SD15_VAE),
                "text_encoder": CLIPTextModel(CLIPTextConfig(**text, **SD15_TEXT)), "scheduler": scheduler}
    torch.manual_seed(seed)
    # cross-attention at both resolutions, as SD-v1.5 has it at its three upper levels: LoRA on attention can then
    # shape the full 8x8 latent, not only its 4x4 summary (without it DP-SAPF cannot move the public model far)
    # public: channels (64, 96), one layer per block: 2.7M parameters at the tiny UNet's CPU cost (133 vs 118
    # samples/s per training step here), attention 2-3x wider for LoRA to act on; the folder stays under 25 MB
    width = dict(layers_per_block=1, block_out_channels=(64, 96)) if architecture == "public" else \
        dict(layers_per_block=2, block_out_channels=(32, 64))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, **width,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=32)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=32, block_out_channels=(32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1, norm_num_groups=32)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, projection_dim=32))
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "scheduler": scheduler}


def _tiny_vae(seed: int, **factors):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=32,
                         block_out_channels=(32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, norm_num_groups=32, **factors)


def build_dit(seed: int = 0, architecture: str = "tiny-dit"):
    """A DiTPipeline: DiT's ε + learned-σ transformer on the VAE's latents, linear β, DDIM sampler (as
    facebook/DiT-XL-2-256 ships). tiny-dit: 4 blocks of width 32 on the tiny SD's 8x8 latents (12 q/k/v)."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    scheduler = DDIMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", num_train_timesteps=1000,
                              clip_sample=False, prediction_type="epsilon")
    torch.manual_seed(seed)
    if architecture == "dit-xl":
        transformer = DiTTransformer2DModel(**DIT_XL)
        vae = AutoencoderKL(**dict(SD15_VAE, sample_size=256))
    else:
        transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                            out_channels=8, num_layers=4, sample_size=8, patch_size=2)
        vae = _tiny_vae(seed + 1)
    return DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler)


def build_sd3(seed: int = 0, architecture: str = "tiny-sd3"):
    """A StableDiffusion3Pipeline without T5: MMDiT, VAE with shift/scale, two CLIP encoders with projection,
    rectified-flow scheduler (shift 3). tiny-sd3: 4 joint blocks of width 32 on 8x8x4 latents (12 q/k/v)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    text = dict(vocab_size=CLIP_VOCAB_SIZE, max_position_embeddings=77, bos_token_id=CLIP_BOS, eos_token_id=CLIP_EOS,
                pad_token_id=CLIP_EOS)
    torch.manual_seed(seed)
    if architecture == "sd3-medium":
        from diffusers import AutoencoderKL

        transformer, vae = SD3Transformer2DModel(**SD3_MEDIUM), AutoencoderKL(**SD3_VAE)
        configs = (SD3_CLIP_L, SD3_CLIP_G)
    else:
        transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=4,
                                            attention_head_dim=8, num_attention_heads=4, joint_attention_dim=64,
                                            caption_projection_dim=32, pooled_projection_dim=64)
        vae = _tiny_vae(seed + 1, scaling_factor=1.5305, shift_factor=0.0609)
        small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32)
        configs = (small, small)
    encoders = []
    for k, config in enumerate(configs):
        torch.manual_seed(seed + 2 + k)
        encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(**text, **config)))
    tokenizer = clip_tokenizer()
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, text_encoder=encoders[0], tokenizer=tokenizer, text_encoder_2=encoders[1],
                                    tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None)


def clip_tokenizer():
    """The real CLIP tokenizer (49408 entries), built offline from open_clip's vocabulary file."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        clip_tokenizer_files(os.path.join(tmp, "bpe"))
        # from_pretrained on vocab.json + merges.txt: the one constructor that works in transformers 4 and 5
        return CLIPTokenizer.from_pretrained(os.path.join(tmp, "bpe"), model_max_length=77)


def save_pipeline(components: dict, output_dir: str, extra_files: dict[str, str] | None = None) -> str:
    """Write a StableDiffusionPipeline of `components` (+ the CLIP tokenizer) in fp32 safetensors, with
    `extra_files` (name -> text), atomically: a half-written folder never appears under `output_dir`.

    fp32, not fp16: under transformers 5 `from_pretrained` would load an fp16 text encoder as fp16."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**components, tokenizer=clip_tokenizer(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    return save_pipeline_object(pipe, output_dir, extra_files)


def save_pipeline_object(pipe, output_dir: str, extra_files: dict[str, str] | None = None) -> str:
    """`pipe.save_pretrained` (fp32 safetensors) into a staging folder, then an atomic rename to `output_dir`."""
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=parent) as tmp:
        staged = os.path.join(tmp, "pipeline")
        pipe.save_pretrained(staged, safe_serialization=True)
        for name, text in (extra_files or {}).items():
            with open(os.path.join(staged, name), "w") as f:
                f.write(text)
        shutil.rmtree(output_dir, ignore_errors=True)
        os.replace(staged, output_dir)
    return output_dir


def build_tiny_pipeline(output_dir: str, seed: int = 0, architecture: str = "tiny") -> str:
    """Write the complete pipeline folder, weights from seeded configs."""
    if architecture in ("tiny-dit", "dit-xl"):
        return save_pipeline_object(build_dit(seed, architecture), output_dir)
    if architecture in ("tiny-sd3", "sd3-medium"):
        return save_pipeline_object(build_sd3(seed, architecture), output_dir)
    return save_pipeline(build_components(seed, architecture), output_dir)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="Folder to write the pipeline into (replaced if it exists).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random weights.")
    parser.add_argument("--architecture", choices=ARCHITECTURES, default="tiny",
                        help="tiny: the embedded default's architecture; sd15: SD-v1.5's (random weights, ~4 GB; "
                             "for benchmarks of the real scripts at full scale); tiny-dit / tiny-sd3: small DiTPipeline / "
                             "StableDiffusion3Pipeline folders (32 px, tests); dit-xl: DiT-XL/2 at 256 px; sd3-medium: "
                             "SD3-medium without T5 (random weights, ~12 GB fp32; benchmarks).")
    args = parser.parse_args(argv)
    build_tiny_pipeline(args.output_dir, args.seed, args.architecture)
    print(f"Wrote a {args.architecture} pipeline to {args.output_dir}")


if __name__ == "__main__":
    main()
