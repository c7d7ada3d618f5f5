"""What differs between denoiser backbones: loading, conditioning, the per-sample loss, LoRA files, sampling.

Three diffusers pipelines, detected from the folder's model_index.json `_class_name`:

- `sd`  StableDiffusionPipeline: U-Net, ε- or v-prediction, CLIP prompt states; LoRA through diffusers.
- `sd3` StableDiffusion3Pipeline: MMDiT transformer, rectified flow; two CLIP encoders (T5 optional: without it
  the pipeline feeds zeros, which is how the tiny offline folder runs); LoRA through `pipe.load_lora_weights`.
- `dit` DiTPipeline: class-conditional DiT, ε-prediction with learned σ (the loss uses the first C output
  channels, DiT's "simple" loss); conditioning is the class index, not a prompt. diffusers has no LoRA loader
  for DiT, so the adapter is injected and loaded with peft directly (`load_peft_lora`).

Everything else (selection, DP-SGD, accounting, the per-sample engines, the card and the push) is shared: the
scripts only call the functions here. Every diffusion draw (timestep index, noise, posterior draw, flip) still
comes from `data.diffusion_draws`, i.e. from the secret DP seed keyed per image; for flow matching the secret
timestep index picks σ from the training scheduler's table.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LORA_ADAPTER_NAME = "default"
WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


@dataclass(frozen=True)
class Backbone:
    name: str  # sd | sd3 | dit
    pipeline_class: str  # model_index.json `_class_name`
    denoiser_class: str
    denoiser_folder: str  # unet | transformer
    uses_prompts: bool  # False: class-conditional (DiT)
    diffusers_lora_loader: bool  # `pipe.load_lora_weights` exists


BACKBONES = {
    "sd": Backbone("sd", "StableDiffusionPipeline", "UNet2DConditionModel", "unet", True, True),
    "sd3": Backbone("sd3", "StableDiffusion3Pipeline", "SD3Transformer2DModel", "transformer", True, True),
    "dit": Backbone("dit", "DiTPipeline", "DiTTransformer2DModel", "transformer", False, False),
}
BY_PIPELINE = {b.pipeline_class: b for b in BACKBONES.values()}
BY_DENOISER = {b.denoiser_class: b for b in BACKBONES.values()}
# no T5 and no IP-adapter image encoder: SD3 runs on its two CLIP encoders (the pipeline pads with zeros)
SD3_ABSENT = dict(text_encoder_3=None, tokenizer_3=None, image_encoder=None, feature_extractor=None)
SD3_MAX_SEQUENCE_LENGTH = 256  # the pipeline's default, used by training and sampling alike


def detect(path: str, revision: str | None = None) -> Backbone:
    """The backbone of a pipeline folder or Hub id, from its model_index.json `_class_name`."""
    index = os.path.join(path, "model_index.json")
    if not os.path.isfile(index):
        from huggingface_hub import hf_hub_download

        index = hf_hub_download(path, "model_index.json", revision=revision)
    with open(index) as f:
        name = json.load(f).get("_class_name")
    if name not in BY_PIPELINE:
        raise ValueError(f"{path!r} is a {name!r}; supported pipelines: {', '.join(BY_PIPELINE)}.")
    return BY_PIPELINE[name]


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The diffusers model under torch.compile's and opacus' wrappers."""
    for _ in range(4):
        inner = getattr(model, "_orig_mod", None) or getattr(model, "_module", None)
        if inner is None:
            break
        model = inner
    return model


def of_model(model: torch.nn.Module) -> Backbone:
    """The backbone a denoiser belongs to (from its class, so wrapped models dispatch the same)."""
    name = type(unwrap(model)).__name__
    if name not in BY_DENOISER:
        raise TypeError(f"No backbone for a {name}; supported denoisers: {', '.join(BY_DENOISER)}.")
    return BY_DENOISER[name]


def load_components(path: str, backbone: Backbone, revision=None, variant=None) -> dict:
    """Frozen scheduler, VAE, denoiser and text encoders/tokenizers (none for DiT), by their pipeline names."""
    from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

    kw = dict(revision=revision)
    parts = {"vae": AutoencoderKL.from_pretrained(path, subfolder="vae", variant=variant, **kw)}
    if backbone.name == "sd3":
        from diffusers import FlowMatchEulerDiscreteScheduler
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        parts["scheduler"] = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler", **kw)
        parts["transformer"] = SD3Transformer2DModel.from_pretrained(path, subfolder="transformer", variant=variant, **kw)
        for suffix in ("", "_2"):
            parts["tokenizer" + suffix] = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer" + suffix, **kw)
            parts["text_encoder" + suffix] = CLIPTextModelWithProjection.from_pretrained(
                path, subfolder="text_encoder" + suffix, variant=variant, **kw)
    elif backbone.name == "dit":
        # DDPM training on the folder's own β schedule (its scheduler is a sampler such as DDIM)
        parts["scheduler"] = DDPMScheduler.from_pretrained(path, subfolder="scheduler", **kw)
        parts["transformer"] = DiTTransformer2DModel.from_pretrained(path, subfolder="transformer", variant=variant, **kw)
        disable_label_dropout(parts["transformer"])
    else:
        from transformers import CLIPTextModel, CLIPTokenizer

        parts["scheduler"] = DDPMScheduler.from_pretrained(path, subfolder="scheduler", **kw)
        parts["tokenizer"] = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kw)
        parts["text_encoder"] = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", variant=variant, **kw)
        parts["unet"] = UNet2DConditionModel.from_pretrained(path, subfolder="unet", variant=variant, **kw)
    for module in parts.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)
            module.eval()
    return parts


def disable_label_dropout(transformer) -> None:
    """DiT drops class labels at random in train mode (for guidance), drawing from the global torch RNG by
    batch position: public, positional randomness inside the mechanism. Fine-tuning keeps every label."""
    from diffusers.models.embeddings import LabelEmbedding

    for module in transformer.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0


@torch.no_grad()
def encode_conditions(backbone: Backbone, parts, prompts: list[str], device):
    """One conditioning entry per class, indexable by label (computed once: prompts and classes are public).

    sd: CLIP hidden states (K, 77, D); sd3: (prompt_embeds, pooled_prompt_embeds) exactly as the pipeline
    computes them without T5; dit: the class ids (K,), class k of the public list being DiT class k.
    """
    if backbone.name == "dit":
        num = parts.denoiser.config.num_embeds_ada_norm
        if len(prompts) > num:
            raise ValueError(f"The DiT knows {num} classes; the public class list has {len(prompts)}.")
        return torch.arange(len(prompts), device=device)
    if backbone.name == "sd3":
        from diffusers import StableDiffusion3Pipeline

        pipe = StableDiffusion3Pipeline(transformer=parts.denoiser, scheduler=parts.noise_scheduler, vae=None,
                                        text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                                        text_encoder_2=parts.text_encoder_2, tokenizer_2=parts.tokenizer_2, **SD3_ABSENT)
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device=device, do_classifier_free_guidance=False,
                                                  max_sequence_length=SD3_MAX_SEQUENCE_LENGTH)
        return embeds, pooled
    ids = parts.tokenizer(prompts, padding="max_length", max_length=parts.tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids.to(device)
    return parts.text_encoder(ids, return_dict=False)[0]


def _flow_table(scheduler) -> tuple[torch.Tensor, torch.Tensor]:
    """(σ, model timestep) for each training index 0..T-1, from a fresh copy of the scheduler (sampling calls
    `set_timesteps` on the pipeline's scheduler; the training table must not change with it)."""
    fresh = type(scheduler).from_config(scheduler.config)
    return fresh.sigmas.float(), fresh.timesteps.float()


def per_sample_loss(model, noise_scheduler, latents: torch.Tensor, cond, noise: torch.Tensor,
                    timesteps: torch.Tensor) -> torch.Tensor:
    """The training loss of each sample (shape (B,)), never averaged across samples.

    `timesteps` are the secret per-image draws' integer indices in [0, num_train_timesteps). sd/dit: DDPM
    forward process at that timestep, target ε (or v); dit compares ε with the first C of its 2C output channels.
    sd3: rectified flow, σ = the scheduler's σ at that index, noisy = (1 − σ)·x + σ·ε, target ε − x (uniform
    weighting), as diffusers' SD3 LoRA example trains.
    """
    backbone = of_model(model)
    if backbone.name == "sd3":
        sigmas, steps = _flow_table(noise_scheduler)
        index = timesteps.long().cpu()
        sigma = sigmas[index].to(latents.device, torch.float32).view(-1, *([1] * (latents.dim() - 1)))
        noisy = ((1.0 - sigma) * latents.float() + sigma * noise.float()).to(latents.dtype)
        embeds, pooled = cond
        prediction = model(hidden_states=noisy, timestep=steps[index].to(latents.device), encoder_hidden_states=embeds,
                           pooled_projections=pooled, return_dict=False)[0]
        target = noise.float() - latents.float()
    else:
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        if noise_scheduler.config.prediction_type == "epsilon":
            target = noise
        elif noise_scheduler.config.prediction_type == "v_prediction":
            target = noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise ValueError(f"Unknown prediction type {noise_scheduler.config.prediction_type}")
        if backbone.name == "dit":
            prediction = model(noisy, timestep=timesteps, class_labels=cond, return_dict=False)[0]
            prediction = prediction[:, :latents.shape[1]]  # learned σ: the first C channels are ε
        else:
            prediction = model(noisy, timesteps, cond, return_dict=False)[0]
    return F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(1)


def constant_input_forward(parts, cond, resolution: int, device):
    """`forward(model)` on all-ones latents at the middle timestep, conditioned on all-ones text states (sd, sd3)
    or class 0 (dit), in float64: the constant input SynFlow scores a denoiser on. Public quantities only.
    `cond` is `encode_conditions` of one class (its shapes are used, not its values)."""
    size = resolution // (2 ** (len(parts.vae.config.block_out_channels) - 1))
    latents = torch.ones(1, parts.denoiser.config.in_channels, size, size, dtype=torch.float64, device=device)
    timestep = torch.tensor([parts.noise_scheduler.config.num_train_timesteps // 2], device=device)
    name = parts.backbone.name
    if name == "dit":
        labels = torch.zeros(1, dtype=torch.long, device=device)
        return lambda model: model(latents, timestep=timestep, class_labels=labels, return_dict=False)[0]
    if name == "sd3":
        embeds, pooled = (torch.ones_like(c, dtype=torch.float64) for c in cond)
        return lambda model: model(hidden_states=latents, timestep=timestep.double(), encoder_hidden_states=embeds,
                                   pooled_projections=pooled, return_dict=False)[0]
    hidden = torch.ones_like(cond, dtype=torch.float64)
    return lambda model: model(latents, timestep, hidden, return_dict=False)[0]


def add_adapter(model, config) -> None:
    """peft LoRA on the denoiser: diffusers' `add_adapter` where the model has it, else peft's injection (DiT)."""
    if hasattr(model, "add_adapter"):
        model.add_adapter(config)
        return
    from peft import inject_adapter_in_model

    inject_adapter_in_model(config, model, adapter_name=LORA_ADAPTER_NAME)
    model.peft_config = {LORA_ADAPTER_NAME: config}


def remove_lora(model) -> None:
    """Take every LoRA layer out of the denoiser again (the base weights untouched), so that a new adapter can go
    on other modules: diffusers' own helper, which works for peft-injected models (DiT) too."""
    from diffusers.utils.peft_utils import recurse_remove_peft_layers

    recurse_remove_peft_layers(model)
    for attribute in ("peft_config", "_hf_peft_config_loaded"):
        if hasattr(model, attribute):
            try:
                delattr(model, attribute)
            except AttributeError:
                setattr(model, attribute, None)


def save_lora(model, output_dir: str) -> str:
    """pytorch_lora_weights.safetensors in the format the backbone's loader reads, written atomically.

    sd/sd3: diffusers' `save_lora_weights` (`pipe.load_lora_weights(output_dir)`), with the adapter metadata so
    lora_alpha != rank reloads right. dit: peft's state dict (keys without the adapter name) with the LoraConfig
    in the safetensors metadata, read back by `load_peft_lora`. Either is written into a staging folder and
    renamed into `output_dir` (`atomic.staged_folder`): a crash never leaves a truncated weights file.
    """
    from .atomic import staged_folder

    with staged_folder(output_dir) as stage:
        _save_lora_into(model, stage)
    return os.path.join(output_dir, WEIGHTS_NAME)


def _save_lora_into(model, output_dir: str) -> None:
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    backbone = of_model(model)
    config = model.peft_config[LORA_ADAPTER_NAME]
    state = get_peft_model_state_dict(model, adapter_name=LORA_ADAPTER_NAME)
    if backbone.name == "dit":
        from safetensors.torch import save_file

        path = os.path.join(output_dir, WEIGHTS_NAME)
        meta = {"lora_config": json.dumps(config.to_dict(), default=list), "format": "peft", "backbone": "dit"}
        save_file({k: v.detach().contiguous() for k, v in state.items()}, path, metadata=meta)
        return
    layers = convert_state_dict_to_diffusers(state)
    if backbone.name == "sd3":
        from diffusers import StableDiffusion3Pipeline

        StableDiffusion3Pipeline.save_lora_weights(save_directory=output_dir, transformer_lora_layers=layers,
                                                   safe_serialization=True,
                                                   transformer_lora_adapter_metadata=config.to_dict())
    else:
        from diffusers import StableDiffusionPipeline

        StableDiffusionPipeline.save_lora_weights(save_directory=output_dir, unet_lora_layers=layers,
                                                  safe_serialization=True, unet_lora_adapter_metadata=config.to_dict())


def lora_file(lora_path: str) -> str | None:
    """The local weights file of a --lora_path (a folder or the .safetensors itself); None for a Hub id."""
    path = lora_path if lora_path.endswith(".safetensors") else os.path.join(lora_path, WEIGHTS_NAME)
    return path if os.path.isfile(path) else None


def weights_signature(denoiser, count: int = 8) -> dict[str, float]:
    """A few numbers that tell base models apart: mean |w| of `count` parameters spread over the denoiser (by
    name, before any adapter is added). Public (the base model is public); compared with a 1% tolerance, so the
    same weights loaded in fp32, fp16 or bf16 match while another checkpoint of the same architecture does not."""
    named = [(n, p) for n, p in denoiser.named_parameters() if ".lora_" not in n and p.numel() > 1]
    picks = sorted({round(i * (len(named) - 1) / max(1, count - 1)) for i in range(count)}) if named else []
    return {named[i][0]: float(f"{named[i][1].detach().float().abs().mean().item():.6g}") for i in picks}


def check_same_base(denoiser, signature: dict | None, lora_path: str, recorded_base: str | None = None) -> None:
    """Refuse a LoRA whose training run recorded another base model's `weights_signature`."""
    if not signature:
        return  # a LoRA from elsewhere (the Hub, an older run): the shape check is what there is
    mine = weights_signature(denoiser, len(signature))
    for name, value in signature.items():
        ours = mine.get(name)
        if ours is None or not math.isclose(ours, value, rel_tol=1e-2, abs_tol=1e-8):
            raise ValueError(f"--lora_path {lora_path} was trained on another base model ("
                             f"{recorded_base or 'see its privacy_report.json'}): its recorded weights of {name} "
                             f"differ from this model's. Sample with the base model it was trained on.")


def check_lora_path(lora_path: str) -> str | None:
    """The local weights file of --lora_path; None for a Hub id; FileNotFoundError for a path that is not there."""
    path = lora_file(lora_path)
    if path is None:
        looks_local = os.path.isabs(lora_path) or lora_path.startswith(".") or lora_path.count("/") != 1
        if not os.path.exists(lora_path) and (looks_local or os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")):
            raise FileNotFoundError(f"--lora_path {lora_path!r} does not exist" + ("" if looks_local else
                                    " (and the Hub is offline: HF_HUB_OFFLINE)") + ".")
        if os.path.isdir(lora_path):
            raise FileNotFoundError(f"--lora_path {lora_path!r} holds no {WEIGHTS_NAME} (a training output folder "
                                    "of train_dp_sapf.py --train_mode lora has one).")
    return path


def check_lora_fits(denoiser, lora_path: str) -> None:
    """A LoRA must adapt modules this denoiser has, with matching shapes; else it was trained on another base
    model (diffusers' loader would skip unknown modules silently or fail with a size-mismatch traceback)."""
    from safetensors import safe_open

    path = check_lora_path(lora_path)
    if path is None:
        return  # a Hub id: diffusers' loader checks it
    try:
        with safe_open(path, "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"--lora_path {path}: not a LoRA weights file ({type(err).__name__}: {err}).") from None
    linears = dict(denoiser.named_modules())
    for key, shape in shapes.items():
        for marker, down in ((".lora_A.", True), (".lora.down.", True), (".lora_B.", False), (".lora.up.", False)):
            if marker in key:
                break
        else:
            continue
        module = key.split(marker)[0]
        for prefix in ("unet.", "transformer."):
            module = module.removeprefix(prefix)
        target = linears.get(module)
        if target is None or not isinstance(target, torch.nn.Linear):
            raise ValueError(f"--lora_path {path} was trained on another base model: it adapts {module!r}, which "
                             "this model does not have. Sample with the base model it was trained on.")
        if len(shape) != 2 or (shape[1] if down else shape[0]) != (target.in_features if down else target.out_features):
            raise ValueError(f"--lora_path {path} was trained on another base model: its {key} has shape "
                             f"{list(shape)}, which does not fit {module} ({target.in_features} -> "
                             f"{target.out_features}). Sample with the base model it was trained on.")


def load_peft_lora(model, lora_path: str, scale: float = 1.0) -> None:
    """Load a DiT LoRA file written by `save_lora` into `model` with peft (diffusers has no DiT LoRA loader)."""
    from huggingface_hub import hf_hub_download
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors import safe_open

    path = lora_file(lora_path) or hf_hub_download(lora_path, WEIGHTS_NAME)
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    if "lora_config" not in meta:
        raise ValueError(f"{path} has no lora_config metadata: not a DiT LoRA written by train_dp_sapf.py.")
    config = json.loads(meta["lora_config"])
    config = LoraConfig(r=config["r"], lora_alpha=config["lora_alpha"] * scale, target_modules=config["target_modules"])
    add_adapter(model, config)
    result = set_peft_model_state_dict(model, state, adapter_name=LORA_ADAPTER_NAME)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"{path} holds tensors this DiT has no place for: {result.unexpected_keys[:3]}")


def load_pipeline(path: str, *, revision=None, variant=None, lora_path=None, lora_scale: float = 1.0,
                  dtype=torch.float32, base_signature: dict | None = None, recorded_base: str | None = None):
    """The backbone's pipeline with the DP LoRA loaded (diffusers' loader for sd/sd3, peft for dit), after checking
    that the LoRA fits this base model (its modules and shapes, and the training run's `base_signature`)."""
    import diffusers

    backbone = detect(path, revision)
    cls = getattr(diffusers, backbone.pipeline_class)
    extra = (dict(safety_checker=None, requires_safety_checker=False) if backbone.name == "sd" else
             SD3_ABSENT if backbone.name == "sd3" else {})
    pipe = cls.from_pretrained(path, revision=revision, variant=variant, dtype=dtype, **extra)
    if lora_path:
        check_lora_fits(getattr(pipe, backbone.denoiser_folder), lora_path)
        check_same_base(getattr(pipe, backbone.denoiser_folder), base_signature, lora_path, recorded_base)
    if lora_path and backbone.diffusers_lora_loader:
        pipe.load_lora_weights(lora_path)
        if lora_scale != 1.0:
            pipe.set_adapters(pipe.get_active_adapters(), adapter_weights=[lora_scale])
    elif lora_path:
        load_peft_lora(pipe.transformer, lora_path, lora_scale)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def fuse_lora(pipe) -> None:
    """Merge the LoRA into the base weights (diffusers' `fuse_lora`; peft's `merge` per layer for DiT)."""
    if hasattr(pipe, "fuse_lora"):
        pipe.fuse_lora()
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in pipe.transformer.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()


def pipeline_from_parts(path: str, parts, denoiser, dtype=None, revision=None, variant=None):
    """A pipeline around the in-memory (training) denoiser and frozen parts, for validation and full saves."""
    import diffusers

    backbone = parts.backbone
    cls = getattr(diffusers, backbone.pipeline_class)
    kw = dict(revision=revision, variant=variant, dtype=dtype)
    if backbone.name == "dit":
        pipe = cls.from_pretrained(path, transformer=denoiser, vae=parts.vae, **kw)
    elif backbone.name == "sd3":
        pipe = cls.from_pretrained(path, transformer=denoiser, vae=parts.vae, text_encoder=parts.text_encoder,
                                   tokenizer=parts.tokenizer, text_encoder_2=parts.text_encoder_2,
                                   tokenizer_2=parts.tokenizer_2, **SD3_ABSENT, **kw)
    else:
        pipe = cls.from_pretrained(path, unet=denoiser, vae=parts.vae, text_encoder=parts.text_encoder,
                                   tokenizer=parts.tokenizer, safety_checker=None, requires_safety_checker=False, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def denoiser_of(pipe):
    return pipe.transformer if hasattr(pipe, "transformer") else pipe.unet


def native_resolution(pipe) -> int:
    """The model's own image size: latent sample_size × the VAE's downsampling factor (pipeline or parts)."""
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    denoiser = pipe.denoiser if hasattr(pipe, "denoiser") else denoiser_of(pipe)
    return denoiser.config.sample_size * factor


def resolution_step(backbone_name: str, vae_scale_factor: int, patch_size: int = 1) -> int:
    """Sizes a pipeline renders are multiples of: SD's pipeline asks for a multiple of 8 (and of its VAE's
    factor), SD3's of the VAE factor times the patch size."""
    if backbone_name == "sd3":
        return vae_scale_factor * patch_size
    return math.lcm(8, vae_scale_factor)


def check_resolution(parts, resolution: int) -> None:
    """DiTPipeline samples at its native size only, so a DiT must be fine-tuned at that size too; SD and SD3 take
    the sizes their pipelines render (the validation images are rendered at --resolution)."""
    if parts.backbone.name == "dit":
        if resolution != native_resolution(parts):
            raise ValueError(f"--resolution {resolution}: a DiT trains and samples at its native "
                             f"{native_resolution(parts)} px only; use --resolution {native_resolution(parts)}.")
        return
    step = resolution_step(parts.backbone.name, 2 ** (len(parts.vae.config.block_out_channels) - 1),
                           int(getattr(parts.denoiser.config, "patch_size", None) or 1))
    if resolution % step:
        raise ValueError(f"--resolution {resolution}: this model renders multiples of {step} px only, e.g. "
                         f"{max(step, resolution // step * step)}.")


def check_sampling_resolution(pipe, resolution: int) -> None:
    """`check_resolution` for a loaded pipeline (sample.py), before any image is rendered."""
    if type(pipe).__name__ == "DiTPipeline":
        if resolution != native_resolution(pipe):
            raise ValueError(f"--resolution {resolution}: a DiT samples at its native {native_resolution(pipe)} px "
                             "only.")
        return
    name = "sd3" if type(pipe).__name__ == "StableDiffusion3Pipeline" else "sd"
    step = resolution_step(name, int(pipe.vae_scale_factor), int(getattr(pipe, "patch_size", None) or 1))
    if resolution % step:
        raise ValueError(f"--resolution {resolution}: this model renders multiples of {step} px only, e.g. "
                         f"{max(step, resolution // step * step)}.")


def generate(pipe, *, class_ids: list[int], prompts: list[str], generators, num_inference_steps: int,
             guidance_scale: float | None, resolution: int, output_type: str = "pil"):
    """Images for one batch: prompts for sd/sd3, class ids for DiT (which samples at its native size only).
    guidance_scale None: the pipeline's default."""
    if type(pipe).__name__ == "DiTPipeline":
        if resolution != native_resolution(pipe):
            raise ValueError(f"DiT samples only at its native {native_resolution(pipe)} px, not {resolution}.")
        extra = {} if guidance_scale is None else {"guidance_scale": guidance_scale}
        return pipe(class_labels=list(class_ids), num_inference_steps=num_inference_steps, generator=generators,
                    output_type=output_type, **extra).images
    extra = {"max_sequence_length": SD3_MAX_SEQUENCE_LENGTH} if type(pipe).__name__ == "StableDiffusion3Pipeline" else {}
    if guidance_scale is not None:
        extra["guidance_scale"] = guidance_scale
    return pipe(list(prompts), num_inference_steps=num_inference_steps, height=resolution, width=resolution,
                generator=generators, output_type=output_type, **extra).images


def usage_snippet(backbone: Backbone, base_model: str, lora_repo: str, first_prompt: str, has_lora: bool = True) -> str:
    """The model card's "How to use" code for this backbone (`lora_repo`: the release's repo id or folder)."""
    cls = backbone.pipeline_class
    head = f"import torch\nfrom diffusers import {cls}\n"
    if not has_lora:
        return head + f"pipe = {cls}.from_pretrained(\"{lora_repo}\")  # the release is a full pipeline\n"
    if backbone.name == "dit":
        return (head + "# diffusers has no LoRA loader for DiT: the adapter is loaded with peft\n"
                "from dp_sapf.backbones import load_peft_lora  # or: peft.inject_adapter_in_model with the\n"
                "# LoraConfig stored in the file's metadata, then peft.set_peft_model_state_dict\n"
                f"pipe = {cls}.from_pretrained(\"{base_model}\")\n"
                f"load_peft_lora(pipe.transformer, \"{lora_repo}\")\n"
                "image = pipe(class_labels=[0]).images[0]  # class k of the card's class list\n")
    extra = ", text_encoder_3=None, tokenizer_3=None" if backbone.name == "sd3" else ""
    return (head + f"pipe = {cls}.from_pretrained(\"{base_model}\"{extra})\n"
            f"pipe.load_lora_weights(\"{lora_repo}\")\nimage = pipe(\"{first_prompt}\").images[0]\n")
