"""Candidate pools, the DP saliency query (one Gaussian mechanism), top-k selection and the mask JSON.

docs/design.md §1: per-sample gradients of all candidate matrices are clipped jointly to C_s, averaged over the N
samples, perturbed by N(0, (σ_s·C_s/N)² I) and scored by the norm of each noisy mean gradient.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass

import torch
import torch.nn as nn

MASK_FORMAT_VERSION = 1
CANDIDATE_POOLS = ("attention_qkv", "attention_qkvo", "all_linear")
SCORERS = ("grad_norm", "fisher", "random")
GRANULARITIES = ("matrix", "layer")


def candidate_modules(unet: nn.Module, pool: str) -> dict[str, nn.Linear]:
    """The candidate weight matrices of a pool, by full module name, in the model's order.

    attention_qkv: to_q/to_k/to_v of every attention layer (attn1 and attn2 in SD: 96 matrices);
    attention_qkvo adds to_out.0; all_linear is every nn.Linear of the UNet.
    """
    from diffusers.models.attention_processor import Attention

    if pool not in CANDIDATE_POOLS:
        raise ValueError(f"Unknown --candidate_pool {pool!r}; choose from {', '.join(CANDIDATE_POOLS)}.")
    found: dict[str, nn.Linear] = {}
    if pool == "all_linear":
        for name, module in unet.named_modules():
            if isinstance(module, nn.Linear) and ".lora_" not in name:
                found[name] = module
        return found
    children = ["to_q", "to_k", "to_v"] + (["to_out.0"] if pool == "attention_qkvo" else [])
    for name, module in unet.named_modules():
        if isinstance(module, Attention):
            for child in children:
                sub = module.get_submodule(child)
                if not isinstance(sub, nn.Linear):
                    raise TypeError(f"{name}.{child} is {type(sub).__name__}, not nn.Linear")
                found[f"{name}.{child}"] = sub
    if not found:
        raise ValueError(f"The model has no modules in the pool {pool!r}.")
    return found


def layer_of(module_name: str) -> str:
    """The attention layer a matrix belongs to ('...attn1.to_q' -> '...attn1'; to_out.0 -> its layer)."""
    name = module_name[: -len(".0")] if module_name.endswith(".to_out.0") else module_name
    return name.rsplit(".", 1)[0]


def fingerprint(modules: dict[str, nn.Linear]) -> str:
    """sha256 of the candidate names and weight shapes: a mask only fits the model it was made for."""
    text = "\n".join(f"{name}:{tuple(m.weight.shape)}" for name, m in modules.items())
    return hashlib.sha256(text.encode()).hexdigest()


def num_selected(ratio: float, count: int) -> int:
    """k = ⌈ρ·M⌉ (at least 1): e.g. 29 of SD-v1.5's 96 q/k/v matrices at ρ = 0.3."""
    if not 0 < ratio <= 1:
        raise ValueError(f"--select_ratio must be in (0, 1], got {ratio}.")
    return max(1, math.ceil(ratio * count - 1e-9))


def noise_floor(modules: dict[str, nn.Linear], *, noise_multiplier: float, max_grad_norm: float,
                dataset_size: int) -> dict[str, float]:
    """The grad_norm score a matrix gets from the noise alone, σ_s·C_s·√d_m / N (d_m its number of entries).

    A noisy score near it says nothing about the data; since it grows with √d_m, a selection drowned in noise
    keeps the largest matrices. Computed from public quantities only (post-processing, no privacy cost)."""
    return {name: noise_multiplier * max_grad_norm * math.sqrt(m.weight.numel()) / dataset_size
            for name, m in modules.items()}


def near_noise_floor(scores: dict[str, float], floor: dict[str, float], names: list[str]) -> list[str]:
    """Those of `names` whose score² is below twice the noise's expected score²: their estimated signal
    (score² − floor²) is below the noise level."""
    return [n for n in names if scores[n] ** 2 < 2 * floor[n] ** 2]


def rank_and_select(scores: dict[str, float], ratio: float, granularity: str, scorer: str = "grad_norm") -> list[str]:
    """Top ⌈ρ·M⌉ matrices by score, or top ⌈ρ·L⌉ attention layers with all their matrices."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"Unknown --granularity {granularity!r}; choose matrix or layer.")
    if granularity == "matrix":
        ranked = sorted(scores, key=lambda n: (-scores[n], n))
        return sorted(ranked[: num_selected(ratio, len(ranked))], key=list(scores).index)
    layers: dict[str, list[str]] = {}
    for name in scores:
        layers.setdefault(layer_of(name), []).append(name)
    layer_scores = {layer: layer_score(scores, members, scorer) for layer, members in layers.items()}
    ranked = sorted(layer_scores, key=lambda l: (-layer_scores[l], l))[: num_selected(ratio, len(layer_scores))]
    return [name for name in scores if layer_of(name) in set(ranked)]


def layer_score(scores: dict[str, float], members: list[str], scorer: str = "grad_norm") -> float:
    """A layer's score from its matrices' scores, as if the layer's concatenated q/k/v block were scored.

    grad_norm scores are norms of the noisy mean gradients: the block's norm is sqrt(Σ s²). fisher scores are
    noisy sums of squared norms (possibly negative): the block's is Σ s (sqrt(Σ s²) would rank large
    negative noise high).
    """
    if scorer == "fisher":
        return sum(scores[m] for m in members)
    return math.sqrt(sum(scores[m] ** 2 for m in members))


@dataclass
class SelectionResult:
    """Noisy scores and the chosen matrices of one run of the mechanism."""

    scores: dict[str, float]
    target_modules: list[str]
    num_samples: int


def clipped_gradient_sums(loss_fn, modules: dict[str, nn.Linear], batches, *, max_grad_norm: float,
                          track_squared_norms: bool = False, accelerator=None, progress=None,
                          compile: bool = False, ghost: str = "auto"):
    """Σ_i clip_{C_s}(g_i) over this process's samples, each g_i over all candidate weights jointly, summed over
    processes (the pre-noise query). `batches` yields (latents, hidden, noise, timesteps).

    The candidate weights require grad during the pass (and only then): every candidate then has a gradient
    path, also those whose input carries none (the time embedding's linears in the all_linear pool).
    ghost: per-sample gradients kept factored where smaller (`per_sample.LinearFactors`): the same sums.
    """
    from .per_sample import ClippedGradientSum, LinearPerSampleHooks, accumulate_clipped

    weights = [m.weight for m in modules.values()]
    clipped = ClippedGradientSum(weights, max_grad_norm, track_squared_norms=track_squared_norms, compile=compile)
    scale = accelerator.num_processes if accelerator is not None else 1
    before = [w.requires_grad for w in weights]
    try:
        for w in weights:
            w.requires_grad_(True)
        accumulate_clipped(loss_fn, batches, LinearPerSampleHooks(modules, include_bias=False, ghost=ghost), clipped,
                           weights,
                           progress=None if progress is None else (lambda b: progress.update(b * scale)))
    finally:
        for w, flag in zip(weights, before):
            w.requires_grad_(flag)
            w.grad = None
    clipped.all_reduce(accelerator)
    return clipped


def noisy_scores(clipped, names: list[str], *, scorer: str, noise_multiplier: float, dataset_size: int,
                 noise_generator: torch.Generator) -> dict[str, float]:
    """Add the Gaussian noise once (identically on every rank) and score each candidate.

    grad_norm: ‖G_m + N(0, (σ_s C_s)² I)‖ / N (the paper); fisher: (Σ_i ‖ĝ_{i,m}‖² + N(0, (σ_s C_s²)²)) / N,
    a vector over the candidates whose per-sample contribution has L2 norm ≤ C_s² (the official code).
    """
    if scorer == "grad_norm":
        return {n: float(s.norm() / dataset_size)
                for n, s in zip(names, clipped.noisy_sums(noise_multiplier, noise_generator))}
    std = noise_multiplier * clipped.max_grad_norm ** 2
    noise = torch.randn(len(names), generator=noise_generator, device=noise_generator.device)
    values = ((clipped.squared_norm_sums.cpu() + std * noise.cpu()) / dataset_size).tolist()
    return dict(zip(names, values))


def select_salient(loss_fn, modules: dict[str, nn.Linear], batches, *, dataset_size: int, scorer: str,
                   noise_multiplier: float, max_grad_norm: float, ratio: float, granularity: str,
                   noise_generator: torch.Generator, accelerator=None, progress=None,
                   compile: bool = False, ghost: str = "auto") -> SelectionResult:
    """Run the Gaussian saliency query over `batches` (this process's shard) and pick the top matrices.

    Every sample's gradient over all candidate weights is clipped jointly before anything is summed; sums are
    reduced over processes; the noise is drawn once, identically on every rank, after the reduction.
    """
    if scorer not in SCORERS:
        raise ValueError(f"Unknown --scorer {scorer!r}; choose from {', '.join(SCORERS)}.")
    names = list(modules)
    if scorer == "random":  # reads no data: zero privacy cost
        scores = torch.rand(len(names), generator=noise_generator, device=noise_generator.device).tolist()
        scores = dict(zip(names, scores))
        return SelectionResult(scores, rank_and_select(scores, ratio, granularity, scorer), 0)
    clipped = clipped_gradient_sums(loss_fn, modules, batches, max_grad_norm=max_grad_norm,
                                    track_squared_norms=scorer == "fisher", accelerator=accelerator,
                                    progress=progress, compile=compile, ghost=ghost)
    scores = noisy_scores(clipped, names, scorer=scorer, noise_multiplier=noise_multiplier,
                          dataset_size=dataset_size, noise_generator=noise_generator)
    return SelectionResult(scores, rank_and_select(scores, ratio, granularity, scorer), clipped.num_samples)


def build_mask(*, base_model: str, modules: dict[str, nn.Linear], pool: str, granularity: str, ratio: float,
               scorer: str, result: SelectionResult, seed: int | None, noise_multiplier: float,
               max_grad_norm: float, dataset_size: int, class_names: list[str], class_prompts: list[str]) -> dict:
    """The versioned mask record (schema in the README)."""
    data_independent = scorer == "random"
    return {
        "format_version": MASK_FORMAT_VERSION,
        "base_model": base_model,
        "candidate_fingerprint": fingerprint(modules),
        "candidate_pool": pool,
        "candidates": {name: list(m.weight.shape) for name, m in modules.items()},
        "granularity": granularity,
        "select_ratio": ratio,
        "num_selected": len(result.target_modules),
        "scorer": scorer,
        "target_modules": result.target_modules,
        "scores": result.scores,
        "seed": seed,
        "class_names": class_names,
        "class_prompts": class_prompts,
        "privacy": {
            "mechanism": "none (data-independent)" if data_independent else
            "gaussian" if noise_multiplier > 0 else "none: NOT private (sigma_s = 0)",
            "noise_multiplier": None if data_independent else noise_multiplier,
            "max_grad_norm": None if data_independent else max_grad_norm,
            "dataset_size": dataset_size,
            "sensitivity": None if data_independent else
            (f"C_s/N = {max_grad_norm}/{dataset_size}" if scorer == "grad_norm" else f"C_s^2/N = {max_grad_norm ** 2}/{dataset_size}"),
            "noise_std": None if data_independent else
            (noise_multiplier * max_grad_norm / dataset_size if scorer == "grad_norm"
             else noise_multiplier * max_grad_norm ** 2 / dataset_size),
            "neighbouring": "add/remove one image; N treated as public",
            "rdp": "none" if data_independent else "epsilon(alpha) = alpha / (2 * noise_multiplier**2), one release",
        },
    }


def write_mask(mask: dict, path: str) -> None:
    """Write atomically: a failed run never leaves a mask behind."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(mask, f, indent=2)
    os.chmod(tmp, 0o644)  # a release file (mkstemp makes it owner-only)
    os.replace(tmp, path)


def read_mask(path: str) -> dict:
    """Load and sanity-check a mask file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--saliency_mask {path!r} does not exist (run select_salient.py --output ...).")
    try:
        with open(path) as f:
            mask = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"--saliency_mask {path!r} is not a mask JSON written by select_salient.py: {err}") from None
    if not isinstance(mask, dict):
        raise ValueError(f"--saliency_mask {path!r} is JSON but not a mask (a {type(mask).__name__}).")
    if mask.get("format_version") != MASK_FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported mask format_version {mask.get('format_version')!r}.")
    for key in ("target_modules", "candidate_fingerprint", "privacy", "candidate_pool"):
        if key not in mask:
            raise ValueError(f"{path}: mask has no {key!r}.")
    return mask


def check_mask(mask: dict, unet: nn.Module, dataset_size: int) -> None:
    """The mask must come from this model's candidates and this dataset's size; else its ε is not ours."""
    modules = candidate_modules(unet, mask["candidate_pool"])
    if fingerprint(modules) != mask["candidate_fingerprint"]:
        raise ValueError(f"The saliency mask was made for another model (base_model {mask.get('base_model')!r}): "
                         "its candidate matrices do not match this UNet's. Rerun select_salient.py on this model.")
    size = mask["privacy"].get("dataset_size")
    if mask["scorer"] != "random" and size != dataset_size:
        raise ValueError(f"The saliency mask was computed on N = {size} images but training data has N = "
                         f"{dataset_size}. Both stages must see the same dataset (check --max_train_samples).")
    unknown = set(mask["target_modules"]) - set(modules)
    if unknown:
        raise ValueError(f"The mask names modules the model lacks: {sorted(unknown)[:5]}")
