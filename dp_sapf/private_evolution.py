"""Private Evolution (PE; Lin et al., ICLR 2024): DP synthetic images from a public model's APIs, no fine-tuning.

One iteration: every private image votes for its nearest synthetic image of its own class (in an embedding
space); Gaussian noise is added to the vote histogram once; counts under a threshold H are zeroed; the next
population is drawn in proportion to the remaining counts and varied by the public model (image-to-image at a
strength that decreases over the iterations). The private data is touched only through the histogram.

Privacy: adding or removing one image changes one vote, i.e. one bin by 1: ℓ2 sensitivity 1 under add/remove.
The T histograms are T Gaussian mechanisms with noise std σ, composed without subsampling; this is the training
accountant with q = 1 and T steps (`privacy.PrivacyLedger.plan(expected_batch_size=N, ...)`), cross-checked
against dp-accounting in tests/test_private_evolution.py. The noise and every random choice (resampling,
variation seeds) come from the secret DP seed.

Written by hand: diffusers has the two APIs (text-to-image, image-to-image) but no PE loop, and microsoft/DPSDA
(the authors' code) is a separate framework with its own model wrappers.
"""

from __future__ import annotations

import numpy as np
import torch

from .seeding import seeded_generator


def strength_schedule(iterations: int, start: float, end: float) -> list[float]:
    """The image-to-image strength of each iteration's variation, linear from `start` down to `end`."""
    if iterations == 1:
        return [float(start)]
    return [float(start + (end - start) * t / (iterations - 1)) for t in range(iterations)]


def nearest_votes(private_emb: np.ndarray, private_labels: np.ndarray, synthetic_emb: np.ndarray,
                  synthetic_labels: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """(S,) vote counts: each private image votes once, for its nearest (ℓ2) synthetic image of its class.

    Ties go to the lowest index, so a vote depends only on the image itself and the synthetic population."""
    votes = np.zeros(len(synthetic_emb), dtype=np.int64)
    syn = np.asarray(synthetic_emb, dtype=np.float64)
    syn_sq = (syn ** 2).sum(1)
    for c in np.unique(private_labels):
        candidates = np.flatnonzero(synthetic_labels == c)
        if len(candidates) == 0:
            raise ValueError(f"Class {c} has private images but no synthetic candidates.")
        mine = np.flatnonzero(private_labels == c)
        cand, cand_sq = syn[candidates], syn_sq[candidates]
        for start in range(0, len(mine), chunk):
            x = np.asarray(private_emb[mine[start:start + chunk]], dtype=np.float64)
            dist = cand_sq[None, :] - 2.0 * x @ cand.T  # + ‖x‖², the same for every candidate
            np.add.at(votes, candidates[np.argmin(dist, axis=1)], 1)
    return votes


def noisy_histogram(votes: np.ndarray, noise_multiplier: float, generator: torch.Generator) -> np.ndarray:
    """votes + N(0, σ²) per bin (sensitivity 1), from the secret generator; float64."""
    noise = torch.randn(len(votes), generator=generator, dtype=torch.float64).numpy()
    return votes.astype(np.float64) + noise_multiplier * noise


def resample(noisy: np.ndarray, synthetic_labels: np.ndarray, per_class: list[int], threshold: float,
             generator: torch.Generator) -> np.ndarray:
    """Indices of the next population: per class, draws with replacement in proportion to the counts above
    `threshold` (post-processing of the noisy histogram). A class with nothing above it draws uniformly."""
    kept = np.where(noisy >= threshold, noisy, 0.0)
    chosen = []
    for c, n in enumerate(per_class):
        candidates = np.flatnonzero(synthetic_labels == c)
        weights = kept[candidates]
        probs = torch.as_tensor(weights / weights.sum() if weights.sum() > 0 else np.ones(len(candidates)),
                                dtype=torch.float64)
        picks = torch.multinomial(probs, n, replacement=True, generator=generator).numpy()
        chosen.append(candidates[np.sort(picks)])
    return np.concatenate(chosen)


def pixel_embedding(images, size: int = 16) -> np.ndarray:
    """A cheap embedding (grey pixels at `size` px, in [0, 1]) for tests and quick runs; Inception is the default."""
    rows = [np.asarray(im.convert("L").resize((size, size), 2), dtype=np.float64).ravel() / 255.0 for im in images]
    return np.stack(rows)


def variation_seed_generator(secret_seed: int, iteration: int, index: int) -> torch.Generator:
    """The image-to-image noise of population member `index` at `iteration`: secret, one stream per image."""
    return seeded_generator(secret_seed, "pe-variation", iteration, index)
