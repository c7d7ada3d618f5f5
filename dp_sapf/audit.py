"""Empirical privacy audit of the training step: two worlds, a canary, and an ε lower bound.

    python -m dp_sapf.audit --pretrained_model_name_or_path runs/quickstart/tiny-sd --trials 1000 \
        --noise_multiplier 1 --output audit.json

Every trial runs the training script's own step on the embedded model: LoRA on three cross-attention `to_v`
matrices, the per-sample engine the script picks, Poisson sampling with rate q, the per-image secret draws
(`data.micro_batches`), the joint clip, the clipped sum, N(0, σ²C²) once and the division by the expected
batch B (`per_sample.StepGradients`). World 0 trains on K other samples, world 1 on the same samples with a
canary inserted at position 0. Each trial has a fresh secret DP seed. Two canaries:

- `gradient` (default, the sharpest test of clip + sum + noise): the canary's per-sample gradient is replaced
  by a "Dirac" gradient, canary_scale·C on one coordinate of a LoRA A factor (at initialisation, B = 0, no
  other sample touches those coordinates). The score is that coordinate of the released sum: N(0, σ²C²) in
  world 0, C + N(0, σ²C²) when the canary is sampled. Tight for the Gaussian mechanism.
- `input`: a real input whose conditioning is scaled up (its gradient is far above C). The adversary knows
  the code, the model, every other sample and the public --seed, but not the DP seed: it predicts both worlds'
  clipped sums with the code (noise off, draws from its own guess of the seed) and projects the release on the
  predicted difference. If the per-sample draws came from a public seed by position (finding 1 of issue #11,
  `--inject_bug public_draws`), the prediction is exact and inserting the canary moves the sum by several C.

Two lower bounds at 95 %: `epsilon_lower` (Clopper–Pearson, no assumption: the threshold is chosen on the
first half of the trials, the rates are bounded on the second half) and, for the gradient canary at q = 1,
`epsilon_lower_gdp`, which assumes the scores are Gaussian (they are, by construction: the sum of constants
and the Gaussian noise) and bounds the Gaussian-DP parameter μ from all trials; it needs far fewer trials to
come close to the claim. A correct implementation stays below ε_claimed; the injected bugs go above.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math

import numpy as np
import torch
from tqdm.auto import tqdm

from . import data, modeling, per_sample, privacy, saliency
from .seeding import seeded_generator

CANARIES = ("gradient", "input")
BUGS = ("none", "no_clipping", "noise_div10", "public_draws")
PUBLIC_SEED = 0  # what --seed defaults to: known to the adversary


def clopper_pearson(successes: int, trials: int, alpha: float) -> tuple[float, float]:
    """Two-sided (1 - alpha) interval of a binomial proportion."""
    from scipy.stats import beta

    lo = 0.0 if successes == 0 else float(beta.ppf(alpha / 2, successes, trials - successes + 1))
    hi = 1.0 if successes == trials else float(beta.ppf(1 - alpha / 2, successes + 1, trials - successes))
    return lo, hi


def _epsilon_at(out_scores, in_scores, threshold, delta, alpha):
    """The ε lower bound (Clopper–Pearson at 1 - alpha) implied by 'guess canary when score ≥ threshold'."""
    n_out, n_in = len(out_scores), len(in_scores)
    fp, tp = int((out_scores >= threshold).sum()), int((in_scores >= threshold).sum())
    tpr, _ = clopper_pearson(tp, n_in, alpha)
    _, fpr = clopper_pearson(fp, n_out, alpha)
    tnr, _ = clopper_pearson(n_out - fp, n_out, alpha)
    _, fnr = clopper_pearson(n_in - tp, n_in, alpha)
    candidates = [0.0]
    if tpr - delta > 0 and fpr > 0:
        candidates.append(math.log((tpr - delta) / fpr))
    if tnr - delta > 0 and fnr > 0:
        candidates.append(math.log((tnr - delta) / fnr))
    return max(candidates)


def epsilon_lower_bound(out_scores, in_scores, delta: float, confidence: float = 0.95) -> dict:
    """Pick the threshold on the first half of the trials, bound ε with Clopper–Pearson on the second half.

    The threshold maximises the Clopper–Pearson bound on the first half (a point estimate would favour far-tail
    thresholds that one lucky trial makes look good and the second half then refutes).
    """
    out_scores, in_scores = np.asarray(out_scores), np.asarray(in_scores)
    h_out, h_in = len(out_scores) // 2, len(in_scores) // 2
    sel_out, sel_in = out_scores[:h_out], in_scores[:h_in]
    thresholds = np.unique(np.concatenate([sel_out, sel_in]))
    best = max(thresholds, key=lambda t: _epsilon_at(sel_out, sel_in, t, delta, alpha=(1 - confidence)))
    # two one-sided bounds per rate at (1 - confidence)/2 each: union bound gives the stated confidence
    lower = _epsilon_at(out_scores[h_out:], in_scores[h_in:], best, delta, alpha=(1 - confidence))
    return {"epsilon_lower": lower, "threshold": float(best), "confidence": confidence,
            "eval_trials_per_world": int(min(len(out_scores) - h_out, len(in_scores) - h_in))}


def gaussian_dp_epsilon(mu: float, delta: float) -> float:
    """The exact ε(δ) of μ-Gaussian DP: δ(ε) = Φ(-ε/μ + μ/2) - e^ε Φ(-ε/μ - μ/2) (Dong, Roth & Su)."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    if mu <= 0:
        return 0.0

    def excess(eps):
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2) - delta

    if excess(0.0) <= 0:
        return 0.0
    hi = 1.0
    while excess(hi) > 0:
        hi *= 2
    return float(brentq(excess, 0.0, hi))


def gaussian_dp_lower_bound(out_scores, in_scores, delta: float, confidence: float = 0.95) -> dict:
    """μ̂ = (mean_in - mean_out) / pooled sd with a one-sided lower confidence bound (normal approximation of
    the standardised mean difference), turned into ε(δ). Valid when both worlds' scores are Gaussian with one
    variance, as the gradient canary's are at q = 1."""
    from scipy.stats import norm

    a, b = np.asarray(out_scores, float), np.asarray(in_scores, float)
    sd = math.sqrt(((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / (len(a) + len(b) - 2))
    mu = (b.mean() - a.mean()) / sd
    se = math.sqrt(1 / len(a) + 1 / len(b) + mu ** 2 / (2 * (len(a) + len(b))))
    mu_lower = max(0.0, mu - norm.ppf(confidence) * se)
    return {"mu_hat": float(mu), "mu_lower": float(mu_lower), "epsilon_lower_gdp": gaussian_dp_epsilon(mu_lower, delta)}


def _public_draws(cache, indices, *, secret_seed, stream, num_train_timesteps, multiplicity=1):
    """The bug of issue #11: draws from the public seed, handed out by position (ignores the secret seed)."""
    g = seeded_generator(PUBLIC_SEED, *stream)
    n, views, shape = len(indices) * multiplicity, cache.mean.shape[1], tuple(cache.mean.shape[2:])
    flips = torch.randint(0, views, (n,), generator=g)
    eps, noise = torch.randn((n, *shape), generator=g), torch.randn((n, *shape), generator=g)
    return flips, eps, noise, torch.randint(0, num_train_timesteps, (n,), generator=g)


@contextlib.contextmanager
def injected_bug(kind: str = "none"):
    """Break the real code on purpose, to show that the audit catches it: clipping off (the noise still scaled
    to the claimed C), a tenth of the claimed noise, or public position-keyed per-sample draws."""
    if kind not in BUGS:
        raise ValueError(f"Unknown bug {kind!r}; choose from {', '.join(BUGS)}.")
    Clipped = per_sample.ClippedGradientSum
    real_add, real_noisy, real_draws = Clipped.add, Clipped.noisy_sums, data.diffusion_draws
    if kind == "no_clipping":
        def add_without_clipping(self, grad_samples, count=None):
            saved, self.max_grad_norm = self.max_grad_norm, 1e12
            try:
                return real_add(self, grad_samples, count)
            finally:
                self.max_grad_norm = saved

        Clipped.add = add_without_clipping
    elif kind == "noise_div10":
        Clipped.noisy_sums = lambda self, sigma, generator: real_noisy(self, sigma / 10, generator)
    elif kind == "public_draws":
        data.diffusion_draws = _public_draws
    try:
        yield
    finally:
        Clipped.add, Clipped.noisy_sums, data.diffusion_draws = real_add, real_noisy, real_draws


class DiracCanary:
    """Wraps a per-sample engine: the canary's per-sample gradient (row 0 of the first micro-batch of a step in
    which it was sampled) becomes `value` on one coordinate of `param` and 0 elsewhere."""

    def __init__(self, engine, param: torch.Tensor, coordinate: int, value: float):
        self.engine, self.param, self.coordinate, self.value = engine, param, coordinate, value
        self.armed = False

    def __enter__(self):
        self.engine.__enter__()
        return self

    def __exit__(self, *exc):
        return self.engine.__exit__(*exc)

    def pop(self, batch_size: int):
        grads = self.engine.pop(batch_size)
        if self.armed:
            grads = {p: g.clone() for p, g in grads.items()}
            for g in grads.values():
                g[0].zero_()
            grads[self.param][0].view(-1)[self.coordinate] = self.value
            self.armed = False
        return grads


def _cache(generator, count, latent_shape, num_labels, first_key) -> data.LatentCache:
    mean = torch.randn((count, 1, *latent_shape), generator=generator)
    return data.LatentCache(mean, torch.full_like(mean, 0.1), torch.randint(0, num_labels, (count,), generator=generator),
                            torch.arange(first_key, first_key + count), 1.0)


def _with_canary(cache: data.LatentCache, canary: data.LatentCache) -> data.LatentCache:
    """The canary inserted at position 0: every other image moves one position down."""
    return data.LatentCache(*(torch.cat([a, b]) for a, b in zip(
        (canary.mean, canary.std, canary.labels, canary.keys), (cache.mean, cache.std, cache.labels, cache.keys))),
        cache.scaling_factor)


def run_audit(model_dir: str, *, trials: int, noise_multiplier: float, canary: str = "gradient",
              max_grad_norm: float = 1.0, batch_size: int = 8, sample_rate: float = 1.0, canary_scale: float = 10.0,
              num_matrices: int = 3, delta: float = 1e-5, seed: int = 0, engine: str = "auto",
              progress: bool = True) -> dict:
    """Run `trials` training steps in each world and return the scores, ε_claimed and the lower bounds."""
    if canary not in CANARIES:
        raise ValueError(f"Unknown canary {canary!r}; choose from {', '.join(CANARIES)}.")
    parts = modeling.load_pipeline_parts(model_dir)
    # cross-attention values: their input is the conditioning itself (no normalisation in between), so an input
    # canary with scaled-up conditioning has a gradient far above C there
    targets = [n for n in saliency.candidate_modules(parts.unet, "attention_qkv") if n.endswith("attn2.to_v")]
    torch.manual_seed(seed)
    named = modeling.make_trainable(parts.unet, "lora", targets[:num_matrices], rank=4)
    params = list(named.values())
    base_engine, model = per_sample.make_engine(engine, parts.unet, params, compile=False, mixed_precision="no",
                                                max_batch_size=batch_size + 1)
    lora_a = next(p for n, p in named.items() if "lora_A" in n)
    dirac = DiracCanary(base_engine, lora_a, coordinate=0, value=canary_scale * max_grad_norm)
    step = per_sample.StepGradients(modeling.diffusion_loss_fn(model, parts.noise_scheduler), params, private=True,
                                    max_grad_norm=max_grad_norm, engine=dirac)

    prompts = ["An image of a dress", "An image of a bag", "An image of a sandal"]
    embeds = modeling.encode_prompts(parts, prompts, "cpu")
    embeds = torch.cat([embeds, embeds[:1] * 100.0])  # label 3: the input canary's scaled-up conditioning
    cfg = parts.unet.config
    shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
    g = torch.Generator().manual_seed(seed)
    others = _cache(g, batch_size, shape, len(prompts), first_key=1)
    the_canary = _cache(g, 1, shape, 1, first_key=0)
    if canary == "input":
        the_canary.labels[:] = len(prompts)
    worlds = {0: others, 1: _with_canary(others, the_canary)}
    expected_batch = max(1, round(sample_rate * batch_size))

    def released(world: int, dp_seed: int, sigma: float) -> torch.Tensor:
        """One step of the training script on world `world` with secret seed `dp_seed`: the noisy gradient × B."""
        cache = worlds[world]
        indices = data.poisson_sample(len(cache), sample_rate, seeded_generator(dp_seed, "poisson", 0))
        dirac.armed = canary == "gradient" and world == 1 and bool((indices == 0).any())
        batches = data.micro_batches(cache, embeds, indices, rank=0, world_size=1, micro_batch_size=batch_size + 1,
                                     num_train_timesteps=parts.noise_scheduler.config.num_train_timesteps,
                                     secret_seed=dp_seed, stream=("train", 0), device="cpu")
        step(batches, noise_multiplier=sigma, noise_generator=seeded_generator(dp_seed, "noise", 0),
             expected_batch_size=expected_batch, realised_batch_size=len(indices))
        return torch.cat([p.grad.flatten() for p in params]) * expected_batch

    if canary == "gradient":
        offset = sum(p.numel() for p in params[:params.index(lora_a)])
        direction = torch.zeros(sum(p.numel() for p in params))
        direction[offset] = 1.0
        origin = torch.zeros_like(direction)
    else:  # the adversary's prediction: the code itself, noise off, its own guess of the secret seed
        guess = PUBLIC_SEED
        origin = released(0, guess, 0.0)
        difference = released(1, guess, 0.0) - origin
        direction = difference / difference.norm()
    scores = {0: [], 1: []}
    bar = tqdm(total=2 * trials, desc=f"Audit trials ({canary} canary)", disable=not progress)
    for trial in range(trials):
        for world in (0, 1):
            dp_seed = int.from_bytes(np.random.default_rng([seed, trial, world]).bytes(7), "little")  # fresh secret
            scores[world].append(float((released(world, dp_seed, noise_multiplier) - origin) @ direction) / max_grad_norm)
            bar.update(1)
    bar.close()
    claimed = privacy.compute_epsilon(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=1,
                                      delta=delta).epsilon
    result = {"epsilon_claimed": claimed, **epsilon_lower_bound(scores[0], scores[1], delta)}
    if canary == "gradient" and sample_rate == 1.0:
        result.update(gaussian_dp_lower_bound(scores[0], scores[1], delta))
    return {**result, "canary": canary, "delta": delta, "trials_per_world": trials,
            "noise_multiplier": noise_multiplier, "max_grad_norm": max_grad_norm, "other_samples": batch_size,
            "sample_rate": sample_rate, "expected_batch_size": expected_batch, "canary_scale": canary_scale,
            "engine": type(base_engine).__name__,
            "mechanism": "one training step of train_dp_sapf.py (Poisson sampling, per-image secret draws, joint "
                         "clip, noise once, /B); canary inserted at position 0",
            "scores_out": scores[0], "scores_in": scores[1]}


def main(argv=None):
    from .atomic import write_json
    from .cli import COUNT, FRACTION, POSITIVE, PROBABILITY, SEED, ArgumentParser
    from .privacy import finite_or_none

    parser = ArgumentParser(prog="python -m dp_sapf.audit", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    modeling.add_model_args(parser)
    parser.add_argument("--trials", type=COUNT, default=500, help="Trials per world (with / without the canary).")
    parser.add_argument("--canary", choices=CANARIES, default="gradient",
                        help="gradient: a Dirac per-sample gradient on a coordinate no other sample touches (tight); "
                             "input: a real input with scaled-up conditioning, scored by an adversary who predicts "
                             "both worlds with the code and the public seed.")
    parser.add_argument("--noise_multiplier", type=POSITIVE, default=3.0, help="σ of the audited step.")
    parser.add_argument("--max_grad_norm", type=POSITIVE, default=1.0, help="C of the audited step.")
    parser.add_argument("--sample_rate", type=FRACTION, default=1.0, help="Poisson rate q of the audited step.")
    parser.add_argument("--batch_size", type=COUNT, default=8, help="Other samples in the dataset of both worlds.")
    parser.add_argument("--canary_scale", type=POSITIVE, default=10.0,
                        help="The gradient canary's size before clipping, in units of C.")
    parser.add_argument("--per_sample_engine", choices=per_sample.ENGINES, default="auto",
                        help="The per-sample engine audited (auto: what the training script picks).")
    parser.add_argument("--delta", type=PROBABILITY, default=1e-5, help="δ of the claim and the bound.")
    parser.add_argument("--seed", type=SEED, default=0, help="Seed of the data, the canary and the trials' DP seeds.")
    parser.add_argument("--inject_bug", choices=BUGS, default="none",
                        help="Audit a deliberately broken step (clipping off, a tenth of the noise, or public "
                             "position-keyed per-sample draws) to see the audit catch it. Never for a real release.")
    parser.add_argument("--output", type=str, default=None, help="Write the result (with all scores) as JSON.")
    args = parser.parse_args(argv)
    with injected_bug(args.inject_bug):
        result = run_audit(args.pretrained_model_name_or_path, trials=args.trials, canary=args.canary,
                           noise_multiplier=args.noise_multiplier, max_grad_norm=args.max_grad_norm,
                           sample_rate=args.sample_rate, batch_size=args.batch_size, canary_scale=args.canary_scale,
                           delta=args.delta, seed=args.seed, engine=args.per_sample_engine)
    result["injected_bug"] = args.inject_bug
    if args.output:  # strict JSON: an infinite bound (every trial told apart) is null
        write_json(args.output, {k: finite_or_none(v) if isinstance(v, float) else v for k, v in result.items()},
                   indent=None)
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("scores")}, indent=2))
    bounds = [result["epsilon_lower"]] + ([result["epsilon_lower_gdp"]] if "epsilon_lower_gdp" in result else [])
    verdict = "consistent with" if max(bounds) <= result["epsilon_claimed"] else "VIOLATES"
    print(f"ε_lower = {result['epsilon_lower']:.3f} (Clopper-Pearson, 95%)"
          + (f", {result['epsilon_lower_gdp']:.3f} (Gaussian DP, 95%)" if "epsilon_lower_gdp" in result else "")
          + f" vs ε_claimed = {result['epsilon_claimed']:.3f}: {verdict} the claim")


if __name__ == "__main__":
    from .cli import run_cli

    run_cli(main)
