"""Empirical privacy audit of the DP-SGD step: a canary, two worlds, and a Clopper–Pearson ε lower bound.

    python -m dp_sapf.audit --pretrained_model_name_or_path runs/quickstart/tiny-sd --trials 1000 \
        --noise_multiplier 3 --output audit.json

Each trial runs the project's own step (per-sample hooks, joint clip, clipped sum, Gaussian noise, division by
the batch) on a fixed batch, with (world 1) or without (world 0) a canary sample crafted to have a huge
gradient (scaled-up conditioning; the audited matrices are cross-attention values). The score of a trial is the projection of the private gradient on the canary's clipped gradient
(a white-box adversary who knows everything but the noise). A threshold is chosen on the first half of the
trials and evaluated on the second half, so the lower bound holds at 95% confidence. A correct implementation
gives ε_lower ≤ ε_claimed; clipping switched off or too little noise gives ε_lower > ε_claimed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math

import numpy as np
import torch
from tqdm.auto import tqdm

from . import modeling, privacy, saliency
from .per_sample import ClippedGradientSum, LinearPerSampleHooks, seeded_generator


def clopper_pearson(successes: int, trials: int, alpha: float) -> tuple[float, float]:
    """Two-sided (1 - alpha) interval of a binomial proportion."""
    from scipy.stats import beta

    lo = 0.0 if successes == 0 else float(beta.ppf(alpha / 2, successes, trials - successes + 1))
    hi = 1.0 if successes == trials else float(beta.ppf(1 - alpha / 2, successes + 1, trials - successes))
    return lo, hi


def _epsilon_at(out_scores, in_scores, threshold, delta, alpha=None):
    """ε implied by 'guess canary when score ≥ threshold' (point estimate, or lower bound if alpha is given)."""
    n_out, n_in = len(out_scores), len(in_scores)
    fp, tp = int((out_scores >= threshold).sum()), int((in_scores >= threshold).sum())
    if alpha is None:  # smoothed point estimate, to pick the threshold
        tpr, fpr = (tp + 0.5) / (n_in + 1), (fp + 0.5) / (n_out + 1)
        tnr, fnr = 1 - fpr, 1 - tpr
    else:
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
    """Pick the threshold on the first half of the trials, bound ε with Clopper–Pearson on the second half."""
    out_scores, in_scores = np.asarray(out_scores), np.asarray(in_scores)
    h_out, h_in = len(out_scores) // 2, len(in_scores) // 2
    sel_out, sel_in = out_scores[:h_out], in_scores[:h_in]
    thresholds = np.unique(np.concatenate([sel_out, sel_in]))
    best = max(thresholds, key=lambda t: _epsilon_at(sel_out, sel_in, t, delta))
    # two one-sided bounds per rate at (1 - confidence)/2 each: union bound gives the stated confidence
    lower = _epsilon_at(out_scores[h_out:], in_scores[h_in:], best, delta, alpha=(1 - confidence))
    return {"epsilon_lower": lower, "threshold": float(best), "confidence": confidence,
            "eval_trials_per_world": int(min(len(out_scores) - h_out, len(in_scores) - h_in))}


BUGS = ("none", "no_clipping", "noise_div10")


@contextlib.contextmanager
def injected_bug(kind: str = "none"):
    """Break the real code on purpose, to show that the audit catches it: clipping off (the noise still scaled
    to the claimed C), or a tenth of the claimed noise. Used by the tests and `--inject_bug`."""
    if kind not in BUGS:
        raise ValueError(f"Unknown bug {kind!r}; choose from {', '.join(BUGS)}.")
    real_add, real_noisy = ClippedGradientSum.add, ClippedGradientSum.noisy_sums
    if kind == "no_clipping":
        def add_without_clipping(self, grad_samples):
            saved, self.max_grad_norm = self.max_grad_norm, 1e12
            try:
                return real_add(self, grad_samples)
            finally:
                self.max_grad_norm = saved

        ClippedGradientSum.add = add_without_clipping
    elif kind == "noise_div10":
        ClippedGradientSum.noisy_sums = lambda self, sigma, generator: real_noisy(self, sigma / 10, generator)
    try:
        yield
    finally:
        ClippedGradientSum.add, ClippedGradientSum.noisy_sums = real_add, real_noisy


def run_audit(model_dir: str, *, trials: int, noise_multiplier: float, max_grad_norm: float = 1.0,
              batch_size: int = 4, canary_scale: float = 100.0, num_matrices: int = 3, delta: float = 1e-5,
              seed: int = 0, progress: bool = True) -> dict:
    """Run `trials` private steps in each world and return the scores, ε_claimed and ε_lower."""
    parts = modeling.load_pipeline_parts(model_dir)
    # cross-attention values: their input is the conditioning itself (no normalisation in between), so a canary
    # with scaled-up conditioning has a gradient far above C there
    candidates = saliency.candidate_modules(parts.unet, "attention_qkv")
    modules = {n: m for n, m in candidates.items() if n.endswith("attn2.to_v")}
    modules = dict(list(modules.items())[:num_matrices])
    weights = [m.weight for m in modules.values()]
    for w in weights:
        w.requires_grad_(True)
    cfg = parts.unet.config
    g = torch.Generator().manual_seed(seed)
    shape = (batch_size, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    hidden = modeling.encode_prompts(parts, ["An image of a dress"], "cpu").expand(batch_size + 1, -1, -1).clone()
    hidden[-1] *= canary_scale
    latents, noise = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    timesteps = torch.randint(0, 1000, (batch_size,), generator=g)
    # DP-SGD must hold for any per-sample gradient; an unclipped canary would stand out at once
    canary = (torch.randn((1, *shape[1:]), generator=g), torch.randn((1, *shape[1:]), generator=g),
              torch.tensor([500]))
    hooks = LinearPerSampleHooks(modules, include_bias=False)
    clipped = ClippedGradientSum(weights, max_grad_norm)

    def clipped_sum(with_canary: bool, only_canary: bool = False) -> None:
        clipped.reset()
        lat, noi, ts = (canary if only_canary else
                        [torch.cat([a, b]) for a, b in zip((latents, noise, timesteps), canary)] if with_canary
                        else (latents, noise, timesteps))
        with hooks:
            cond = hidden[-1:] if only_canary else hidden[:lat.shape[0]]
            losses = modeling.per_sample_diffusion_loss(parts.unet, parts.noise_scheduler, lat, cond, noi, ts)
            losses.sum().backward()
        norms = clipped.add(hooks.pop())
        for w in weights:
            w.grad = None
        return norms

    canary_norm = float(clipped_sum(True, only_canary=True)[0])
    direction = torch.cat([s.flatten() for s in clipped.sums])
    direction = direction / direction.norm()
    scores = {0: [], 1: []}
    bar = tqdm(total=2 * trials, desc="Audit trials", disable=not progress)
    for trial in range(trials):
        for world in (0, 1):
            clipped_sum(bool(world))  # the real per-sample, clip and sum path, every trial
            noisy = clipped.noisy_sums(noise_multiplier, seeded_generator(seed, "audit", world, trial))
            gradient = torch.cat([s.flatten() for s in noisy]) / batch_size
            scores[world].append(float(gradient @ direction))
            bar.update(1)
    bar.close()
    claimed = privacy.compute_epsilon(noise_multiplier=noise_multiplier, sample_rate=1.0, steps=1,
                                      delta=delta).epsilon
    result = epsilon_lower_bound(scores[0], scores[1], delta)
    return {"epsilon_claimed": claimed, **result, "delta": delta, "trials_per_world": trials,
            "noise_multiplier": noise_multiplier, "max_grad_norm": max_grad_norm, "batch_size": batch_size,
            "canary_scale": canary_scale, "canary_gradient_norm": canary_norm, "mechanism": "one DP-SGD step, canary always sampled (q = 1)",
            "scores_out": scores[0], "scores_in": scores[1]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modeling.add_model_args(parser)
    parser.add_argument("--trials", type=int, default=500, help="Trials per world (with / without the canary).")
    parser.add_argument("--noise_multiplier", type=float, default=3.0, help="σ of the audited step.")
    parser.add_argument("--max_grad_norm", type=float, default=1.0, help="C of the audited step.")
    parser.add_argument("--batch_size", type=int, default=4, help="Other samples in the batch.")
    parser.add_argument("--canary_scale", type=float, default=100.0,
                        help="Scale of the canary's conditioning: its gradient grows with it.")
    parser.add_argument("--delta", type=float, default=1e-5, help="δ of the claim and the bound.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the batch, the canary and the noise.")
    parser.add_argument("--inject_bug", choices=BUGS, default="none",
                        help="Audit a deliberately broken step (clipping off, or a tenth of the noise) to see the "
                             "audit catch it. Never use for a real release.")
    parser.add_argument("--output", type=str, default=None, help="Write the result (with all scores) as JSON.")
    args = parser.parse_args(argv)
    with injected_bug(args.inject_bug):
        result = run_audit(args.pretrained_model_name_or_path, trials=args.trials,
                           noise_multiplier=args.noise_multiplier, max_grad_norm=args.max_grad_norm,
                           batch_size=args.batch_size, canary_scale=args.canary_scale, delta=args.delta, seed=args.seed)
    result["injected_bug"] = args.inject_bug
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f)
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("scores")}, indent=2))
    verdict = "consistent with" if result["epsilon_lower"] <= result["epsilon_claimed"] else "VIOLATES"
    print(f"ε_lower = {result['epsilon_lower']:.3f} (95%) vs ε_claimed = {result['epsilon_claimed']:.3f}: {verdict} "
          "the claim")


if __name__ == "__main__":
    main()
