"""Loading pipeline parts, the per-sample diffusion loss, LoRA on exactly the selected modules, and saving it.

The same functions serve SD-v1.5, SD3, DiT and the embedded tiny pipelines: all are ordinary diffusers folders
(or Hub ids); what differs between the backbones lives in `backbones.py`, detected from model_index.json.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from . import backbones
from .backbones import LORA_ADAPTER_NAME  # noqa: F401  (re-exported: the adapter's name everywhere)


@dataclass
class PipelineParts:
    """The pieces of a pipeline that training and selection need (text parts are None for DiT)."""

    tokenizer: object
    text_encoder: torch.nn.Module | None
    vae: torch.nn.Module
    denoiser: torch.nn.Module  # the U-Net (sd) or the transformer (sd3, dit)
    noise_scheduler: object
    backbone: backbones.Backbone = backbones.BACKBONES["sd"]
    tokenizer_2: object = None  # sd3's second CLIP
    text_encoder_2: torch.nn.Module | None = None

    @property
    def unet(self) -> torch.nn.Module:
        """The denoiser under the name the U-Net code used (kept for callers written for SD)."""
        return self.denoiser


def add_model_args(parser) -> None:
    """--pretrained_model_name_or_path, --revision, --variant, as in diffusers' examples."""
    parser.add_argument("--pretrained_model_name_or_path", type=str, required=True,
                        help="A diffusers pipeline (StableDiffusionPipeline, StableDiffusion3Pipeline or DiTPipeline, detected "
                             "from its model_index.json): Hub id (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5) or "
                             "local folder (e.g. one built by `python -m dp_sapf.tiny_pipeline`).")
    parser.add_argument("--revision", type=str, default=None, help="Revision of the pretrained model on the Hub.")
    parser.add_argument("--variant", type=str, default=None, help="Weight variant, e.g. fp16.")


def check_model_path(path: str) -> None:
    """Fail early and clearly on a local folder that is not a diffusers pipeline."""
    looks_local = os.path.isabs(path) or path.startswith(".") or os.path.exists(path) or path.count("/") != 1
    if looks_local and not os.path.isfile(os.path.join(path, "model_index.json")):
        raise FileNotFoundError(f"{path!r} is not a diffusers pipeline folder (no model_index.json). Build the "
                                "embedded default with `python -m dp_sapf.tiny_pipeline --output_dir DIR` or give a Hub id.")


def load_pipeline_parts(path: str, revision: str | None = None, variant: str | None = None) -> PipelineParts:
    """Scheduler, text encoders, VAE and denoiser, frozen, for the backbone model_index.json names."""
    check_model_path(path)
    backbone = backbones.detect(path, revision)
    c = backbones.load_components(path, backbone, revision, variant)
    return PipelineParts(c.get("tokenizer"), c.get("text_encoder"), c["vae"], c[backbone.denoiser_folder],
                         c["scheduler"], backbone, c.get("tokenizer_2"), c.get("text_encoder_2"))


def place(parts: PipelineParts, device, dtype: torch.dtype) -> None:
    """Move the frozen parts to the device in the autocast weight dtype (no cast when it is fp32)."""
    for module in (parts.denoiser, parts.vae, parts.text_encoder, parts.text_encoder_2):
        if module is not None:
            module.to(device) if dtype == torch.float32 else module.to(device, dtype)


def weight_dtype_for(mixed_precision: str | None) -> torch.dtype:
    """The frozen weights' dtype for accelerate's mixed precision (trainable tensors stay fp32)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(str(mixed_precision), torch.float32)


def encode_prompts(parts: PipelineParts, prompts: list[str], device):
    """Each class's conditioning, indexable by label: CLIP states (sd), (embeds, pooled) (sd3), class ids (dit)."""
    return backbones.encode_conditions(parts.backbone, parts, prompts, device)


def constant_input_forward(parts: PipelineParts, prompts: list[str], resolution: int, device):
    """`forward(model)` on all-ones latents and conditioning at a fixed public timestep, in float64: the input
    SynFlow scores a model on (saliency.synflow_scores). Built from public quantities only."""
    return backbones.constant_input_forward(parts, encode_prompts(parts, prompts[:1], device), resolution, device)


def per_sample_diffusion_loss(model, noise_scheduler, latents: torch.Tensor, cond, noise: torch.Tensor,
                              timesteps: torch.Tensor) -> torch.Tensor:
    """The diffusion loss of each sample (shape (B,)), never averaged across samples (`backbones.per_sample_loss`)."""
    return backbones.per_sample_loss(model, noise_scheduler, latents, cond, noise, timesteps)


def diffusion_loss_fn(model, noise_scheduler, autocast=None):
    """`loss(latents, cond, noise, timesteps[, weights]) -> (B,)` per-sample losses under `autocast`, for the
    step loops; `weights` (0 for padding rows of a fixed-shape micro-batch) multiply each sample's loss."""
    import contextlib

    autocast = autocast or contextlib.nullcontext

    def loss(latents, cond, noise, timesteps, weights=None):
        with autocast():
            losses = per_sample_diffusion_loss(model, noise_scheduler, latents, cond, noise, timesteps)
        return losses if weights is None else losses * weights.to(losses.device, non_blocking=True)

    return loss


def add_lora(denoiser, target_modules: list[str], rank: int, lora_alpha: float | None = None) -> list[torch.nn.Parameter]:
    """LoRA (gaussian init, B = 0) on exactly `target_modules` (full names); returns the trainable fp32 tensors."""
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=lora_alpha if lora_alpha is not None else rank,
                        init_lora_weights="gaussian", target_modules=list(target_modules))
    backbones.add_adapter(denoiser, config)
    params = [p for p in denoiser.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    wrapped = {name.rsplit(".lora_A", 1)[0] for name, _ in denoiser.named_modules() if name.endswith(".lora_A")}
    if wrapped != set(target_modules):
        raise RuntimeError(f"peft wrapped {len(wrapped)} modules, expected exactly {len(target_modules)}: "
                           f"extra {sorted(wrapped - set(target_modules))[:5]}, missing {sorted(set(target_modules) - wrapped)[:5]}")
    return params


TRAIN_MODES = ("lora", "direct", "full")


def make_trainable(denoiser, train_mode: str, target_modules: list[str] | None, rank: int = 4,
                   lora_alpha: float | None = None) -> dict[str, torch.nn.Parameter]:
    """Make the tensors a run trains require grad (in fp32) and return them by name.

    lora: LoRA factors on exactly `target_modules`; direct: those modules' own weights (the paper's "w/o LoRA");
    full: every denoiser parameter (DP-Finetune).
    """
    if train_mode not in TRAIN_MODES:
        raise ValueError(f"Unknown --train_mode {train_mode!r}; choose from {', '.join(TRAIN_MODES)}.")
    if train_mode == "full":
        denoiser.requires_grad_(True)
    elif train_mode == "lora":
        add_lora(denoiser, target_modules, rank, lora_alpha)
    else:
        for name in target_modules:
            denoiser.get_submodule(name).requires_grad_(True)
    named = {n: p for n, p in denoiser.named_parameters() if p.requires_grad}
    for p in named.values():
        p.data = p.data.float()
    return named


def save_lora(denoiser, output_dir: str) -> str:
    """Write pytorch_lora_weights.safetensors in the backbone's LoRA format (`backbones.save_lora`)."""
    return backbones.save_lora(denoiser, output_dir)


def load_pipeline(path: str, *, revision: str | None = None, variant: str | None = None,
                  lora_path: str | None = None, lora_scale: float = 1.0, dtype=torch.float32):
    """The folder's pipeline (sd, sd3 or dit) with the DP LoRA loaded (or a fully trained folder)."""
    check_model_path(path)
    return backbones.load_pipeline(path, revision=revision, variant=variant, lora_path=lora_path,
                                   lora_scale=lora_scale, dtype=dtype)
