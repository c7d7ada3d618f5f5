"""Loading pipeline parts, the ε-prediction loss, LoRA on exactly the selected modules, and saving it.

The same functions serve a real SD-v1.5 checkpoint and the embedded tiny pipeline: both are ordinary
diffusers folders (or Hub ids) loaded through the same calls as diffusers' train_text_to_image_lora.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LORA_ADAPTER_NAME = "default"


@dataclass
class PipelineParts:
    """The pieces of a Stable Diffusion pipeline that training and selection need."""

    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object


def add_model_args(parser) -> None:
    """--pretrained_model_name_or_path, --revision, --variant, as in diffusers' examples."""
    parser.add_argument("--pretrained_model_name_or_path", type=str, required=True,
                        help="A diffusers Stable Diffusion pipeline: Hub id (e.g. stable-diffusion-v1-5/"
                             "stable-diffusion-v1-5) or local folder (e.g. one built by `python -m dp_sapf.tiny_pipeline`).")
    parser.add_argument("--revision", type=str, default=None, help="Revision of the pretrained model on the Hub.")
    parser.add_argument("--variant", type=str, default=None, help="Weight variant, e.g. fp16.")


def check_model_path(path: str) -> None:
    """Fail early and clearly on a local folder that is not a diffusers pipeline."""
    looks_local = os.path.isabs(path) or path.startswith(".") or os.path.exists(path) or path.count("/") != 1
    if looks_local and not os.path.isfile(os.path.join(path, "model_index.json")):
        raise FileNotFoundError(f"{path!r} is not a diffusers pipeline folder (no model_index.json). Build the "
                                "embedded default with `python -m dp_sapf.tiny_pipeline --output_dir DIR` or give a Hub id.")


def load_pipeline_parts(path: str, revision: str | None = None, variant: str | None = None) -> PipelineParts:
    """Scheduler, tokenizer, text encoder, VAE and UNet, frozen, as diffusers' LoRA example loads them."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    check_model_path(path)
    noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", revision=revision)
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", revision=revision)
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", revision=revision, variant=variant)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", revision=revision, variant=variant)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", revision=revision, variant=variant)
    for module in (text_encoder, vae, unet):
        module.requires_grad_(False)
        module.eval()
    return PipelineParts(tokenizer, text_encoder, vae, unet, noise_scheduler)


def place(parts: PipelineParts, device, dtype: torch.dtype) -> None:
    """Move the frozen parts to the device in the autocast weight dtype (no cast when it is fp32)."""
    for module in (parts.unet, parts.vae, parts.text_encoder):
        module.to(device) if dtype == torch.float32 else module.to(device, dtype)


def weight_dtype_for(mixed_precision: str | None) -> torch.dtype:
    """The frozen weights' dtype for accelerate's mixed precision (trainable tensors stay fp32)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(str(mixed_precision), torch.float32)


@torch.no_grad()
def encode_prompts(parts: PipelineParts, prompts: list[str], device) -> torch.Tensor:
    """CLIP hidden states for each class prompt (computed once: prompts are public)."""
    ids = parts.tokenizer(prompts, padding="max_length", max_length=parts.tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids.to(device)
    return parts.text_encoder(ids, return_dict=False)[0]


def constant_input_forward(parts: PipelineParts, prompts: list[str], resolution: int, device):
    """`forward(model)` on all-ones latents and text states at a fixed public timestep, in float64: the input
    SynFlow scores a model on (saliency.synflow_scores). Built from public quantities only."""
    latent_size = resolution // (2 ** (len(parts.vae.config.block_out_channels) - 1))
    latents = torch.ones(1, parts.unet.config.in_channels, latent_size, latent_size, dtype=torch.float64,
                         device=device)
    hidden = torch.ones_like(encode_prompts(parts, prompts[:1], device), dtype=torch.float64)
    timestep = torch.tensor([parts.noise_scheduler.config.num_train_timesteps // 2], device=device)
    return lambda model: model(latents, timestep, hidden, return_dict=False)[0]


def per_sample_diffusion_loss(unet, noise_scheduler, latents: torch.Tensor, encoder_hidden_states: torch.Tensor,
                              noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Latent-diffusion MSE of each sample (shape (B,)): one loss per sample, never averaged across samples."""
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    if noise_scheduler.config.prediction_type == "epsilon":
        target = noise
    elif noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"Unknown prediction type {noise_scheduler.config.prediction_type}")
    prediction = unet(noisy, timesteps, encoder_hidden_states, return_dict=False)[0]
    return F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(1)


def diffusion_loss_fn(model, noise_scheduler, autocast=None):
    """`loss(latents, hidden, noise, timesteps[, weights]) -> (B,)` per-sample losses under `autocast`, for the
    step loops; `weights` (0 for padding rows of a fixed-shape micro-batch) multiply each sample's loss."""
    import contextlib

    autocast = autocast or contextlib.nullcontext

    def loss(latents, hidden, noise, timesteps, weights=None):
        with autocast():
            losses = per_sample_diffusion_loss(model, noise_scheduler, latents, hidden, noise, timesteps)
        return losses if weights is None else losses * weights.to(losses.device, non_blocking=True)

    return loss


def add_lora(unet, target_modules: list[str], rank: int, lora_alpha: float | None = None) -> list[torch.nn.Parameter]:
    """LoRA (gaussian init, B = 0) on exactly `target_modules` (full names); returns the trainable fp32 tensors."""
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=lora_alpha if lora_alpha is not None else rank,
                        init_lora_weights="gaussian", target_modules=list(target_modules))
    unet.add_adapter(config)
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    wrapped = {name.rsplit(".lora_A", 1)[0] for name, _ in unet.named_modules() if name.endswith(".lora_A")}
    if wrapped != set(target_modules):
        raise RuntimeError(f"peft wrapped {len(wrapped)} modules, expected exactly {len(target_modules)}: "
                           f"extra {sorted(wrapped - set(target_modules))[:5]}, missing {sorted(set(target_modules) - wrapped)[:5]}")
    return params


TRAIN_MODES = ("lora", "direct", "full")


def make_trainable(unet, train_mode: str, target_modules: list[str] | None, rank: int = 4,
                   lora_alpha: float | None = None) -> dict[str, torch.nn.Parameter]:
    """Make the tensors a run trains require grad (in fp32) and return them by name.

    lora: LoRA factors on exactly `target_modules`; direct: those modules' own weights (the paper's "w/o LoRA");
    full: every UNet parameter (DP-Finetune).
    """
    if train_mode not in TRAIN_MODES:
        raise ValueError(f"Unknown --train_mode {train_mode!r}; choose from {', '.join(TRAIN_MODES)}.")
    if train_mode == "full":
        unet.requires_grad_(True)
    elif train_mode == "lora":
        add_lora(unet, target_modules, rank, lora_alpha)
    else:
        for name in target_modules:
            unet.get_submodule(name).requires_grad_(True)
    named = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    for p in named.values():
        p.data = p.data.float()
    return named


def lora_state_dict(unet) -> dict[str, torch.Tensor]:
    """The adapter's tensors under diffusers' key names (what `save_lora_weights` expects)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def save_lora(unet, output_dir: str) -> str:
    """Write pytorch_lora_weights.safetensors, with adapter metadata so lora_alpha != rank reloads right."""
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.save_lora_weights(
        save_directory=output_dir,
        unet_lora_layers=lora_state_dict(unet),
        safe_serialization=True,
        unet_lora_adapter_metadata=unet.peft_config[LORA_ADAPTER_NAME].to_dict(),
    )
    return os.path.join(output_dir, "pytorch_lora_weights.safetensors")


def load_pipeline(path: str, *, revision: str | None = None, variant: str | None = None,
                  lora_path: str | None = None, lora_scale: float = 1.0, dtype=torch.float32):
    """A StableDiffusionPipeline with the DP LoRA loaded through `load_lora_weights` (or a fully trained folder)."""
    from diffusers import StableDiffusionPipeline

    check_model_path(path)
    pipe = StableDiffusionPipeline.from_pretrained(path, revision=revision, variant=variant, dtype=dtype,
                                                   safety_checker=None, requires_safety_checker=False)
    if lora_path:
        pipe.load_lora_weights(lora_path)
        if lora_scale != 1.0:
            pipe.set_adapters(pipe.get_active_adapters(), adapter_weights=[lora_scale])
    pipe.set_progress_bar_config(disable=True)
    return pipe
