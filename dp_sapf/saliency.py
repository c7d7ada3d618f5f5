"""Candidate pools, the private saliency selection, top-k and the mask JSON.

docs/design.md §1: per-sample gradients of all candidate matrices are clipped jointly to C_s and summed (one
pass, `clipped_gradient_sums`). The paper's default mechanism adds N(0, (σ_s·C_s)² I) once and scores each
matrix by its noisy mean gradient; the exponential mechanism and propose-test-release (the paper's §6.4) pick
the top k from the exact scores instead and release only the picks. Scorers (App. D.1): grad_norm ‖G_m‖,
fisher Σ_i‖ĝ_i,m‖², snip ‖θ_m ⊙ G_m‖₁; synflow and random read no data at all. grad_norm_debiased (ours, for
the comparison of issue #21) is ‖G̃_m‖² − d_m(σ_s·C_s/N)², an unbiased estimate of ‖G_m‖²: post-processing of the
same Gaussian query that stops the noise from favouring the largest matrices.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn

from .privacy import DATA_FREE_SCORERS  # synflow, random: they read no private data and cost nothing

MASK_FORMAT_VERSION = 1
CANDIDATE_POOLS = ("attention_qkv", "attention_qkvo", "all_linear")
SCORERS = ("grad_norm", "grad_norm_debiased", "fisher", "snip", "synflow", "random")
# train_dp_sapf.py --lora_target warmup_select: scores from DP-SGD's own noisy gradients (no query of its own)
DP_SGD_SCORER, DP_SGD_MECHANISM = "dp_sgd_debiased", "dp_sgd_postprocessing"
NOISY_ONLY_SCORERS = ("grad_norm_debiased",)  # defined by the Gaussian query's noise: no other mechanism
MECHANISMS = ("gaussian", "exponential", "ptr")
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


def near_noise_floor(scores: dict[str, float], floor: dict[str, float], names: list[str],
                     scorer: str = "grad_norm", sizes: dict[str, int] | None = None) -> list[str]:
    """Those of `names` whose estimated signal is within the noise.

    grad_norm: score² below twice the noise's expected score² (the signal score² − floor² is below floor²).
    grad_norm_debiased (the score IS that estimate): below twice its noise's standard deviation, which for pure
    noise is floor²·√(2/d_m) (a χ² with d_m degrees of freedom): far smaller than floor², which is why the debiased
    score stays informative where grad_norm's ranking is set by the matrices' sizes. `sizes`: d_m per matrix."""
    if scorer == "grad_norm_debiased":
        return [n for n in names if scores[n] < 2 * floor[n] ** 2 * math.sqrt(2 / sizes[n])]
    return [n for n in names if scores[n] ** 2 < 2 * floor[n] ** 2]


def selection_units(names: list[str], granularity: str) -> dict[str, list[str]]:
    """What is ranked: each matrix alone, or each attention layer with its matrices."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"Unknown --granularity {granularity!r}; choose matrix or layer.")
    units: dict[str, list[str]] = {}
    for name in names:
        units.setdefault(name if granularity == "matrix" else layer_of(name), []).append(name)
    return units


def unit_scores(scores: dict[str, float], units: dict[str, list[str]], scorer: str) -> dict[str, float]:
    """Each unit's score from its matrices' scores (a matrix unit keeps its own)."""
    return {unit: scores[members[0]] if len(members) == 1 and unit == members[0] else
            layer_score(scores, members, scorer) for unit, members in units.items()}


def top_units(scores: dict[str, float], k: int) -> list[str]:
    """The k highest scores, ties broken by name (deterministic: the PTR's stability argument relies on it)."""
    return sorted(scores, key=lambda u: (-scores[u], u))[:k]


def expand(units: dict[str, list[str]], chosen, names: list[str]) -> list[str]:
    """The matrices of the chosen units, in the model's order."""
    keep = {m for unit in chosen for m in units[unit]}
    return [n for n in names if n in keep]


def rank_and_select(scores: dict[str, float], ratio: float, granularity: str, scorer: str = "grad_norm") -> list[str]:
    """Top ⌈ρ·M⌉ matrices by score, or top ⌈ρ·L⌉ attention layers with all their matrices."""
    units = selection_units(list(scores), granularity)
    per_unit = unit_scores(scores, units, scorer)
    return expand(units, top_units(per_unit, num_selected(ratio, len(units))), list(scores))


def layer_score(scores: dict[str, float], members: list[str], scorer: str = "grad_norm") -> float:
    """A layer's score from its matrices' scores, as if the layer's concatenated q/k/v block were scored.

    grad_norm (and random) scores are norms of the noisy mean gradients: the block's norm is sqrt(Σ s²).
    fisher, snip, synflow and grad_norm_debiased scores are sums over entries (fisher's and the debiased ones are
    possibly negative): the block's is Σ s
    (sqrt(Σ s²) would rank large negative noise high).
    """
    if scorer in ("grad_norm", "random"):
        return math.sqrt(sum(scores[m] ** 2 for m in members))
    return sum(scores[m] for m in members)


@dataclass
class SelectionResult:
    """What one run of the mechanism releases: the chosen matrices and, for the Gaussian mechanism, the noisy
    scores (the exponential mechanism and PTR release only their picks: `scores` is empty)."""

    scores: dict[str, float]
    target_modules: list[str]
    num_samples: int
    ranking: list[str] | None = None  # the exponential mechanism's units in pick order
    ptr: dict | None = None  # the PTR test's public outcome


def clipped_gradient_sums(loss_fn, modules: dict[str, nn.Linear], batches, *, max_grad_norm: float,
                          track_squared_norms: bool = False, accelerator=None, progress=None,
                          compile: bool = False, ghost: str = "auto", accumulate_dtype: torch.dtype = torch.float32,
                          clipping: str = "flat", automatic_gamma: float = 0.01, multiplicity: int = 1):
    """Σ_i clip_{C_s}(g_i) over this process's samples, each g_i over all candidate weights jointly, summed over
    processes (the pre-noise query). `batches` yields (latents, hidden, noise, timesteps).

    The candidate weights require grad during the pass (and only then): every candidate then has a gradient
    path, also those whose input carries none (the time embedding's linears in the all_linear pool).
    ghost: per-sample gradients kept factored where smaller (`per_sample.LinearFactors`): the same sums.
    clipping / automatic_gamma: the clip rule (`per_sample.clip_factors`); multiplicity K: `batches` hold K rows
    per sample (`data.micro_batches`) whose mean loss gives the one gradient that is clipped.
    """
    from .per_sample import ClippedGradientSum, LinearPerSampleHooks, accumulate_clipped

    weights = [m.weight for m in modules.values()]
    clipped = ClippedGradientSum(weights, max_grad_norm, track_squared_norms=track_squared_norms, compile=compile,
                                 accumulate_dtype=accumulate_dtype, clipping=clipping, automatic_gamma=automatic_gamma)
    scale = accelerator.num_processes if accelerator is not None else 1
    before = [w.requires_grad for w in weights]
    try:
        for w in weights:
            w.requires_grad_(True)
        accumulate_clipped(loss_fn, batches, LinearPerSampleHooks(modules, include_bias=False, ghost=ghost), clipped,
                           weights, multiplicity=multiplicity,
                           progress=None if progress is None else (lambda b: progress.update(b * scale)))
    finally:
        for w, flag in zip(weights, before):
            w.requires_grad_(flag)
            w.grad = None
    clipped.all_reduce(accelerator)
    return clipped


def noisy_scores(clipped, modules: dict[str, nn.Linear], *, scorer: str, noise_multiplier: float,
                 dataset_size: int, noise_generator: torch.Generator) -> dict[str, float]:
    """Add the Gaussian noise once (identically on every rank) and score each candidate.

    grad_norm: ‖G_m + N(0, (σ_s C_s)² I)‖ / N (the paper); snip: ‖θ_m ⊙ (G_m + same noise)‖₁ / N (post-processing of
    the same query); grad_norm_debiased: grad_norm² − d_m(σ_s C_s / N)², its expected excess removed (E‖G̃_m‖² =
    ‖G_m‖² + d_m(σ_s C_s/N)² for d_m entries), so that large matrices no longer win on noise alone; fisher: (Σ_i ‖ĝ_{i,m}‖² + N(0, (σ_s C_s²)²)) / N, a vector over the candidates whose
    per-sample contribution has L2 norm ≤ C_s² (the official code).
    """
    names = list(modules)
    if scorer in ("grad_norm", "snip", "grad_norm_debiased"):
        noisy = clipped.noisy_sums(noise_multiplier, noise_generator)
        if scorer == "grad_norm_debiased":
            variance = (noise_multiplier * clipped.max_grad_norm / dataset_size) ** 2
            norms = _gradient_scores(noisy, modules, "grad_norm", dataset_size)
            return {name: norm ** 2 - modules[name].weight.numel() * variance for name, norm in zip(names, norms)}
        return dict(zip(names, _gradient_scores(noisy, modules, scorer, dataset_size)))
    std = noise_multiplier * clipped.max_grad_norm ** 2
    noise = torch.randn(len(names), generator=noise_generator, device=noise_generator.device)
    values = ((clipped.squared_norm_sums.cpu() + std * noise.cpu()) / dataset_size).tolist()
    return dict(zip(names, values))


def _gradient_scores(sums, modules: dict[str, nn.Linear], scorer: str, dataset_size: int) -> list[float]:
    if scorer == "grad_norm":
        return [float(s.norm() / dataset_size) for s in sums]
    return [float((m.weight.float() * s.to(m.weight.device)).abs().sum() / dataset_size)
            for s, m in zip(sums, modules.values())]


def exact_scores(clipped, modules: dict[str, nn.Linear], scorer: str, dataset_size: int) -> dict[str, float]:
    """Scores of the clipped sums WITHOUT noise: the exponential mechanism and PTR read them, nothing releases them."""
    if scorer == "fisher":
        return dict(zip(modules, (clipped.squared_norm_sums.cpu() / dataset_size).tolist()))
    return dict(zip(modules, _gradient_scores(clipped.sums, modules, scorer, dataset_size)))


FLOAT_MARGIN = 0.01


def score_sensitivity(modules: dict[str, nn.Linear], units: dict[str, list[str]], scorer: str,
                      max_grad_norm: float, dataset_size: int) -> float:
    """Δ: the most one image (add/remove, N public) can move any unit's exact score, taken FLOAT_MARGIN wider.

    One image adds ĝ_i/N with ‖ĝ_i‖ ≤ C_s over all candidates jointly, so: grad_norm, the norm of a block of the
    mean, moves by ≤ C_s/N; fisher's Σ over a unit of ‖ĝ_i,m‖²/N by ≤ C_s²/N; snip's ‖θ_u ⊙ G_u‖₁ by
    ≤ ‖θ_u‖₂·C_s/N (Cauchy-Schwarz), the largest over units. The 1% margin covers the rounding of the computed
    scores, which PTR compares against Δ exactly: the sums are accumulated in float64 for these mechanisms, and
    others' float32 per-sample gradients may differ by ~1e-7 relative when the micro-batches around an added
    image change.
    """
    if scorer == "grad_norm":
        bound = max_grad_norm / dataset_size
    elif scorer == "fisher":
        bound = max_grad_norm ** 2 / dataset_size
    elif scorer == "snip":
        bound = max(math.sqrt(sum(float(modules[m].weight.float().square().sum()) for m in members))
                    for members in units.values()) * max_grad_norm / dataset_size
    else:
        raise ValueError(f"The scorer {scorer!r} has no sensitivity (data-free scorers need no mechanism).")
    return bound * (1 + FLOAT_MARGIN)


def exponential_top_k(scores: dict[str, float], k: int, *, sensitivity: float, epsilon: float,
                      generator: torch.Generator) -> list[str]:
    """k picks by the peeling exponential mechanism, each ∝ exp(ε₀·u/(2Δ)) with ε₀ = ε/k, run as one-shot Gumbel
    top-k (Durfee & Rogers 2019: the same distribution over ordered picks). Returns the picks in order.

    Each pick is ε₀-DP and ε₀-bounded-range; privacy.SelectionCost accounts the k picks.
    """
    units = list(scores)
    u = torch.tensor([scores[n] for n in units], dtype=torch.float64)
    uniform = torch.rand(len(units), generator=generator, dtype=torch.float64, device=generator.device).cpu()
    gumbel = -torch.log(-torch.log(uniform.clamp(1e-300, 1 - 1e-16)))
    noisy = u + gumbel * (2 * sensitivity * k / epsilon)
    order = torch.argsort(noisy, descending=True, stable=True)[:k]
    return [units[i] for i in order.tolist()]


def ptr_threshold(epsilon: float, delta: float) -> float:
    """T such that P[1 + Lap(1/ε) > T] = δ: a dataset at distance ≤ 1 from instability passes w.p. ≤ δ."""
    return 1 + math.log(1 / (2 * delta)) / epsilon


def distance_to_instability(scores: dict[str, float], k: int, sensitivity: float) -> int:
    """A lower bound on how many images must be added/removed before the top k can change: ⌈gap/(2Δ')⌉ with gap the
    k-th minus the (k+1)-th score. Each image moves every score by ≤ Δ, so the gap by ≤ 2Δ: the bound changes by
    ≤ 1 per image (sensitivity 1), and it is ≤ 1 wherever a neighbour has another top k."""
    ranked = sorted(scores.values(), reverse=True)
    if k >= len(ranked):
        return 10 ** 9  # everything is kept: no dataset changes the outcome
    return math.ceil((ranked[k - 1] - ranked[k]) / (2 * sensitivity))


def ptr_top_k(scores: dict[str, float], k: int, *, sensitivity: float, epsilon: float, delta: float,
              generator: torch.Generator) -> tuple[list[str] | None, dict]:
    """Propose-test-release: the exact top k if the noisy distance to instability clears the threshold
    (then (ε, δ)-DP: Vadhan 2017, Prop. 3.3), else None (⊥). Returns the picks and the public outcome."""
    distance = distance_to_instability(scores, k, sensitivity)
    uniform = float(torch.rand((), generator=generator, dtype=torch.float64, device=generator.device)) - 0.5
    laplace = -math.copysign(1.0, uniform) * math.log(max(1 - 2 * abs(uniform), 1e-300)) / epsilon
    threshold = ptr_threshold(epsilon, delta)
    passed = distance + laplace > threshold
    return (top_units(scores, k) if passed else None), {"passed": bool(passed), "threshold": threshold}


def select_salient(loss_fn, modules: dict[str, nn.Linear], batches, *, dataset_size: int, scorer: str,
                   noise_multiplier: float, max_grad_norm: float, ratio: float, granularity: str,
                   noise_generator: torch.Generator, mechanism: str = "gaussian", epsilon: float | None = None,
                   delta: float | None = None, fallback_generator: torch.Generator | None = None,
                   accelerator=None, progress=None, compile: bool = False, ghost: str = "auto",
                   clipping: str = "flat", automatic_gamma: float = 0.01, multiplicity: int = 1) -> SelectionResult:
    """Run the private selection over `batches` (this process's shard) and pick the top matrices.

    Every sample's gradient over all candidate weights is clipped jointly before anything is summed; sums are
    reduced over processes; the mechanism's randomness (`noise_generator`, secret) is drawn once, identically
    on every rank, after the reduction. A PTR that fails its test falls back to a random mask drawn from the
    public `fallback_generator` (post-processing of ⊥).
    """
    if scorer not in SCORERS:
        raise ValueError(f"Unknown --scorer {scorer!r}; choose from {', '.join(SCORERS)}.")
    if mechanism not in MECHANISMS:
        raise ValueError(f"Unknown --selection_mechanism {mechanism!r}; choose from {', '.join(MECHANISMS)}.")
    if scorer in NOISY_ONLY_SCORERS and mechanism != "gaussian":
        raise ValueError(f"--scorer {scorer} debiases the Gaussian query's noise: use it with the gaussian mechanism.")
    names = list(modules)
    if scorer == "random":  # reads no data: zero privacy cost
        scores = torch.rand(len(names), generator=noise_generator, device=noise_generator.device).tolist()
        scores = dict(zip(names, scores))
        return SelectionResult(scores, rank_and_select(scores, ratio, granularity, scorer), 0)
    if scorer == "synflow":
        raise ValueError("synflow reads no data: score it with saliency.synflow_scores and rank_and_select.")
    clipped = clipped_gradient_sums(loss_fn, modules, batches, max_grad_norm=max_grad_norm,
                                    track_squared_norms=scorer == "fisher", accelerator=accelerator,
                                    progress=progress, compile=compile, ghost=ghost, clipping=clipping,
                                    automatic_gamma=automatic_gamma, multiplicity=multiplicity,
                                    accumulate_dtype=torch.float32 if mechanism == "gaussian" else torch.float64)
    if mechanism == "gaussian":
        scores = noisy_scores(clipped, modules, scorer=scorer, noise_multiplier=noise_multiplier,
                              dataset_size=dataset_size, noise_generator=noise_generator)
        return SelectionResult(scores, rank_and_select(scores, ratio, granularity, scorer), clipped.num_samples)
    units = selection_units(names, granularity)
    exact = unit_scores(exact_scores(clipped, modules, scorer, dataset_size), units, scorer)
    k = num_selected(ratio, len(units))
    sensitivity = score_sensitivity(modules, units, scorer, max_grad_norm, dataset_size)
    if mechanism == "exponential":
        picks = exponential_top_k(exact, k, sensitivity=sensitivity, epsilon=epsilon, generator=noise_generator)
        return SelectionResult({}, expand(units, picks, names), clipped.num_samples, ranking=picks)
    picks, outcome = ptr_top_k(exact, k, sensitivity=sensitivity, epsilon=epsilon, delta=delta,
                               generator=noise_generator)
    if picks is None:
        fallback = dict(zip(units, torch.rand(len(units), generator=fallback_generator).tolist()))
        picks = top_units(fallback, k)
    return SelectionResult({}, expand(units, picks, names), clipped.num_samples, ptr=outcome)


def synflow_scores(model: nn.Module, modules: dict[str, nn.Linear], forward) -> dict[str, float]:
    """SynFlow (Tanaka et al. 2020): Σ θ ⊙ ∂R/∂θ over each matrix, R the summed output of the model with every
    parameter replaced by |θ|, on the all-ones input `forward(model)` feeds it (float64 against overflow).

    It reads the public weights and constants only, never an image: no mechanism and no privacy cost. It runs on
    a copy, so the model itself is untouched.
    """
    import copy

    twin = copy.deepcopy(model).double()
    twin.requires_grad_(False)
    for p in twin.parameters():
        p.data.abs_()
    weights = {name: twin.get_submodule(name).weight for name in modules}
    for w in weights.values():
        w.requires_grad_(True)
    forward(twin).double().sum().backward()
    return {name: float((w.detach() * w.grad).sum()) for name, w in weights.items()}


def mask_privacy(*, scorer: str, mechanism: str, noise_multiplier: float, max_grad_norm: float,
                 dataset_size: int | None, epsilon: float | None = None, delta: float | None = None,
                 num_picks: int | None = None, sensitivity: float | None = None, ptr: dict | None = None,
                 sample_rate: float | None = None) -> dict:
    """The mask's privacy record (`privacy.SelectionCost.from_mask` reads it). sample_rate: q_s of a Gaussian
    query over a Poisson subsample (the clipped sum is divided by the expected q_s·N, not by N)."""
    if scorer in DATA_FREE_SCORERS:
        return {"mechanism": "none", "note": f"data-independent ({scorer} reads no images): no privacy cost",
                "noise_multiplier": None, "max_grad_norm": None, "dataset_size": None}
    record = {"mechanism": mechanism, "max_grad_norm": max_grad_norm, "dataset_size": dataset_size,
              "neighbouring": "add/remove one image; N treated as public"}
    if mechanism == "gaussian":
        per_sample = "C_s" if scorer != "fisher" else "C_s^2"
        bound = max_grad_norm ** (2 if scorer == "fisher" else 1)
        if sample_rate is not None and sample_rate < 1:
            record.update(
                noise_multiplier=noise_multiplier, sample_rate=sample_rate,
                sensitivity=f"{per_sample}/(q_s*N) = {bound}/({sample_rate}*{dataset_size})",
                noise_std=noise_multiplier * bound / (sample_rate * dataset_size),
                rdp="one step of the Poisson-subsampled Gaussian mechanism (rate sample_rate, noise_multiplier)")
        else:
            record.update(
                noise_multiplier=noise_multiplier,
                sensitivity=f"{per_sample}/N = {bound}/{dataset_size}",
                noise_std=noise_multiplier * bound / dataset_size,
                rdp="epsilon(alpha) = alpha / (2 * noise_multiplier**2), one release")
        if noise_multiplier == 0:
            record["note"] = "NOT private: sigma_s = 0 releases exact scores"
        return record
    record.update(noise_multiplier=None, epsilon=epsilon, score_sensitivity=sensitivity)
    if mechanism == "exponential":
        record.update(num_picks=num_picks, rdp="epsilon(alpha) = alpha * epsilon**2 / (8 * num_picks) "
                      "(num_picks epsilon/num_picks-bounded-range picks); pure epsilon-DP")
    else:
        record.update(delta=delta, ptr=ptr, rdp="none: (epsilon, delta)-DP, composed by basic composition")
    return record


DERIVABLE_SCORERS = ("grad_norm", "grad_norm_debiased")


def derive_mask(source: dict, *, ratio: float, granularity: str, scorer: str) -> dict:
    """Another mask from the noisy scores a Gaussian grad_norm mask already released: free post-processing.

    The scores ‖G̃_m‖ of every candidate are public once released, so another ρ, the layer-level ranking (a layer's
    block norm is sqrt(Σ ‖G̃_m‖²)) and the debiased score ‖G̃_m‖² − d_m(σ_s·C_s/N)² follow without touching the data
    or spending ε: the result equals a fresh selection with the same secret noise (tests/test_selection.py).
    """
    record = source["privacy"]
    if record.get("mechanism") != "gaussian" or source["scorer"] != "grad_norm" or source["granularity"] != "matrix":
        raise ValueError("Only a matrix-level grad_norm mask of the Gaussian mechanism releases the scores another mask "
                         f"can be derived from (this one: {record.get('mechanism')}, {source['scorer']}, "
                         f"{source['granularity']}).")
    if scorer not in DERIVABLE_SCORERS:
        raise ValueError(f"Only {', '.join(DERIVABLE_SCORERS)} follow from the released norms, not {scorer!r}.")
    scores = dict(source["scores"])
    if scorer == "grad_norm_debiased":
        variance = record["noise_std"] ** 2
        scores = {name: s ** 2 - math.prod(source["candidates"][name]) * variance for name, s in scores.items()}
    chosen = rank_and_select(scores, ratio, granularity, scorer)
    return {**source, "granularity": granularity, "select_ratio": ratio, "num_selected": len(chosen), "scorer": scorer,
            "target_modules": chosen, "scores": scores, "ranking": None,
            "derived_from": {"scorer": source["scorer"], "granularity": source["granularity"],
                             "select_ratio": source["select_ratio"],
                             "note": "re-ranked from the released noisy scores: post-processing, no privacy cost"}}


class NoisyGradientScores:
    """Per-matrix saliency from the noisy DP-SGD gradients of warm-up steps: post-processing, no privacy cost.

    After each warm-up step every LoRA tensor's gradient is g̃ = (Σ_i clip(g_i) + N(0, σ²C²I)) / B, the released
    output of a step already accounted. The score of matrix m adds, over its LoRA tensors and the warm-up steps,
    ‖g̃‖² − d·(σC/B)², the squared norm minus the noise's expected share (d entries), so that matrices with more
    LoRA entries do not win on noise alone. Only these noisy gradients are read: never a clean per-sample or
    summed gradient (the test swaps the clean gradients for others with the same noisy sums and gets the same mask).
    """

    def __init__(self, named_params: dict[str, torch.Tensor]):
        self.module_of = {name: name.split(".lora_", 1)[0] for name in named_params}
        self.params = named_params
        self.scores = {module: 0.0 for module in dict.fromkeys(self.module_of.values())}
        self.steps = 0

    def add_step(self, noise_std: float) -> None:
        """Read p.grad (the noisy averaged gradient the optimizer is about to apply) of every tensor."""
        for name, p in self.params.items():
            if p.grad is None:
                continue
            self.scores[self.module_of[name]] += float(p.grad.float().pow(2).sum()) - p.numel() * noise_std ** 2
        self.steps += 1

    def state_dict(self) -> dict:
        return {"scores": dict(self.scores), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.scores, self.steps = dict(state["scores"]), int(state["steps"])


def build_mask(*, base_model: str, modules: dict[str, nn.Linear], pool: str, granularity: str, ratio: float,
               scorer: str, result: SelectionResult, seed: int | None, privacy_record: dict,
               class_names: list[str], class_prompts: list[str], backbone: str = "sd",
               pipeline_class: str = "StableDiffusionPipeline") -> dict:
    """The versioned mask record (schema: dp_sapf/schemas/mask.schema.json, `MASK_SCHEMA_FILE`)."""
    return {
        "format_version": MASK_FORMAT_VERSION,
        "base_model": base_model,
        "backbone": backbone,
        "pipeline_class": pipeline_class,
        "candidate_fingerprint": fingerprint(modules),
        "candidate_pool": pool,
        "candidates": {name: list(m.weight.shape) for name, m in modules.items()},
        "granularity": granularity,
        "select_ratio": ratio,
        "num_selected": len(result.target_modules),
        "scorer": scorer,
        "target_modules": result.target_modules,
        "scores": result.scores,
        "ranking": result.ranking,
        "seed": seed,
        "class_names": class_names,
        "class_prompts": class_prompts,
        "privacy": privacy_record,
    }


MASK_SCHEMA_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "schemas", "mask.schema.json")


@functools.lru_cache(maxsize=1)
def _mask_validator():
    from jsonschema import Draft202012Validator

    with open(MASK_SCHEMA_FILE) as f:
        return Draft202012Validator(json.load(f))


def mask_problem(mask) -> str | None:
    """What is wrong with a mask record, naming the field (None: it is a valid mask).

    One written schema (`MASK_SCHEMA_FILE`) serves the writer and the reader: a mask whose scorer reads the images
    must carry every figure of its mechanism's cost, a data-free one must say it is free; extra, missing and
    mistyped fields are refused. Then what a schema cannot say: the picks are candidates, and they are counted.
    """
    from jsonschema.exceptions import best_match

    if not isinstance(mask, dict):
        return f"it is JSON but not a mask (a {type(mask).__name__})"
    error = best_match(_mask_validator().iter_errors(mask))
    if error is not None:
        where = ".".join(str(p) for p in error.absolute_path)
        if error.validator == "required" and isinstance(error.instance, dict):
            missing = [k for k in error.validator_value if k not in error.instance][0]
            return f"field {'.'.join(filter(None, [where, missing]))!r} is missing"
        if error.validator == "additionalProperties" and isinstance(error.instance, dict):
            known = set(error.schema.get("properties", {}))
            extra = sorted(k for k in error.instance if k not in known)
            if extra:
                return f"field {'.'.join(filter(None, [where, extra[0]]))!r} is not a mask field"
        return f"field {where or '(the record)'!r}: {error.message}"
    unknown = [m for m in mask["target_modules"] if m not in mask["candidates"]]
    if unknown:
        return f"field 'target_modules' names {unknown[0]!r}, which is not among its 'candidates'"
    if mask["num_selected"] != len(mask["target_modules"]):
        return (f"field 'num_selected' is {mask['num_selected']} but 'target_modules' lists "
                f"{len(mask['target_modules'])} matrices")
    return None


def write_mask(mask: dict, path: str) -> None:
    """Validate against the schema, then write atomically: a failed run never leaves a mask behind."""
    from .atomic import write_json

    problem = mask_problem(mask)
    if problem is not None:
        raise ValueError(f"Refusing to write the mask {path}: {problem}.")
    write_json(path, mask)


def read_mask(path: str) -> dict:
    """Load a mask file and validate it against the schema; one clear line (file and field) otherwise."""
    from .atomic import load_json

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--saliency_mask {path!r} does not exist (run select_salient.py --output ...).")
    try:
        mask = load_json(path)
    except ValueError as err:
        raise ValueError(f"--saliency_mask {path!r} is not a mask JSON written by select_salient.py: {err}") from None
    if isinstance(mask, dict) and mask.get("format_version") != MASK_FORMAT_VERSION:
        raise ValueError(f"--saliency_mask {path}: field 'format_version' is {mask.get('format_version')!r}; this "
                         f"version reads format {MASK_FORMAT_VERSION} (rerun select_salient.py).")
    problem = mask_problem(mask)
    if problem is not None:
        raise ValueError(f"--saliency_mask {path}: {problem} (schema: dp_sapf/schemas/mask.schema.json; rerun "
                         "select_salient.py).")
    return mask


def check_mask(mask: dict, unet: nn.Module, dataset_size: int) -> None:
    """The mask must come from this model's candidates and this dataset's size; else its ε is not ours."""
    modules = candidate_modules(unet, mask["candidate_pool"])
    if fingerprint(modules) != mask["candidate_fingerprint"]:
        raise ValueError(f"The saliency mask was made for another model (base_model {mask.get('base_model')!r}): "
                         "its candidate matrices do not match this UNet's. Rerun select_salient.py on this model.")
    size = mask["privacy"].get("dataset_size")
    exact = mask["privacy"].get("mechanism") == "gaussian" and mask["privacy"].get("noise_multiplier") == 0
    # An exact mask (σ_s = 0) is not private whatever N it saw (every run on it reports ε = inf), so it may come
    # from a subset, e.g. a cheap exact reference over 5,000 of 60,000 images.
    if mask["scorer"] not in DATA_FREE_SCORERS and size != dataset_size and not exact:
        raise ValueError(f"The saliency mask was computed on N = {size} images but training data has N = "
                         f"{dataset_size}. Both stages must see the same dataset (check --max_train_samples).")
    unknown = set(mask["target_modules"]) - set(modules)
    if unknown:
        raise ValueError(f"The mask names modules the model lacks: {sorted(unknown)[:5]}")
