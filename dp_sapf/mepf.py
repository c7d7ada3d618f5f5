"""DP-MEPF (Harder et al., TMLR 2023): one Gaussian release of per-class means of public perceptual features, then a
generator trained to match the noisy means. Only the release touches private data; the generator is post-processing.

Our choices against the official code (ParkLabML/DP-MEPF), each for a stated reason:
- Features: the project's FID TF-Inception (ImageNet-pretrained, public, offline, hash-checked), each conv and
  mixed block's output averaged over space (10,448 numbers at 75 px) instead of a CIFAR ResNet-18's flattened maps
  (~426,000 numbers): pooled features keep the per-coordinate noise far below the class differences, and 75 px is
  the smallest input every Inception stage accepts (47 images/s forward + backward on one core of this CPU).
  The network runs in eval mode (fixed BatchNorm statistics), so one image's features never depend on another's.
- Sensitivity: each image contributes one row of its class, (a·f/‖f‖, w) with a = √(1 − w²): exactly norm 1
  under add/remove, counts included; the official code swaps (sensitivity 2) and treats class counts as public.
  Released images and private images go through the same pipeline (sizes, [0, 1] → the Inception's [-1, 1]).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULT_FEATURE_RESOLUTION = 75  # the smallest input all of the TF-Inception's stride-2 stages accept
DEFAULT_COUNT_WEIGHT = 0.1


class PerceptualFeatures(nn.Module):
    """Images in [0, 1] (B, 1 or 3, H, W) -> (B, D) channel means of every conv and mixed block of the TF-Inception.

    Differentiable with respect to the images (the generator's loss goes through it); its weights are frozen.
    """

    def __init__(self, inception=None, resolution: int = DEFAULT_FEATURE_RESOLUTION):
        super().__init__()
        if inception is None:
            from .metrics import load_inception

            inception = load_inception(backend="torch")  # TorchScript: autograd flows through it, ONNX would not
        blocks = list(inception.net.layers.named_children())
        while blocks and blocks[-1][0].startswith("pool"):  # the final 8×8 average pool: nothing to read after it
            blocks.pop()
        self.names = [name for name, _ in blocks]
        self.layers = nn.ModuleList(module for _, module in blocks)
        self.resolution = int(resolution)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):  # always eval: BatchNorm must use its fixed statistics (per-sample features)
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        x = F.interpolate(x.float(), size=(self.resolution,) * 2, mode="bilinear", align_corners=False)
        x = x * (255.0 / 128.0) - 1.0  # uint8 / 128 - 1, as metrics.inception_features feeds it
        pooled = []
        for name, layer in zip(self.names, self.layers):
            x = layer(x)
            if not name.startswith("pool"):
                pooled.append(x.mean(dim=(2, 3)))
        return torch.cat(pooled, dim=1)


def unit_rows(features: torch.Tensor) -> torch.Tensor:
    """Each row scaled to norm 1 (an all-zero row stays zero): the bound the sensitivity rests on."""
    return features / features.norm(dim=1, keepdim=True).clamp_min(1e-12)


def class_rows(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
               count_weight: float = DEFAULT_COUNT_WEIGHT) -> torch.Tensor:
    """The exact (pre-noise) release, (num_classes, D + 1) float64: row c = Σ over class-c images of
    (a·u_i, w), u_i = f_i/‖f_i‖ (scaled here, in float64, whatever the caller passed), a = √(1 − w²). Adding or
    removing one image changes one row by a vector of norm ‖(a·u_i, w)‖ ≤ 1."""
    if not 0 < count_weight < 1:
        raise ValueError(f"count_weight must be in (0, 1), not {count_weight}.")
    a = math.sqrt(1.0 - count_weight ** 2)
    rows = torch.zeros(num_classes, features.shape[1] + 1, dtype=torch.float64)
    contribution = torch.cat([a * unit_rows(features.double()),
                              torch.full((len(labels), 1), count_weight, dtype=torch.float64)], dim=1)
    rows.index_add_(0, labels.long(), contribution)
    return rows


@dataclass
class FeatureRelease:
    """The noisy release: the only private quantity the generator (or any output) ever sees."""

    noisy_rows: np.ndarray  # (num_classes, D + 1): class_rows + N(0, σ²) per entry
    count_weight: float
    noise_multiplier: float

    @property
    def noisy_counts(self) -> np.ndarray:
        return self.noisy_rows[:, -1] / self.count_weight

    def class_means(self) -> torch.Tensor:
        """Noisy per-class mean features (post-processing): noisy sums over noisy counts (at least 1)."""
        a = math.sqrt(1.0 - self.count_weight ** 2)
        sums = torch.from_numpy(self.noisy_rows[:, :-1]) / a
        counts = torch.from_numpy(self.noisy_counts).clamp_min(1.0)
        return (sums / counts[:, None]).float()


def release(rows: torch.Tensor, noise_multiplier: float, count_weight: float,
            generator: torch.Generator) -> FeatureRelease:
    """class_rows + N(0, σ²) on every entry, once, from the secret generator (sensitivity 1: σ is the multiplier)."""
    noise = torch.randn(rows.shape, generator=generator, dtype=torch.float64) * noise_multiplier
    return FeatureRelease((rows + noise).numpy(), count_weight, noise_multiplier)


class ConditionalGenerator(nn.Module):
    """DP-MEPF's small MNIST generator (ConvCondGen: FC 500 → BN → FC → BN → two bilinear ×2 + 5×5 conv stages,
    sigmoid), written for any output size: one-hot label and Gaussian code in, an image in [0, 1] out."""

    def __init__(self, num_classes: int, resolution: int, channels: int, code_dim: int = 90, hidden: int = 500,
                 width: int = 16):
        super().__init__()
        self.num_classes, self.resolution, self.code_dim = num_classes, resolution, code_dim
        self.base = math.ceil(resolution / 4)
        self.width = width
        self.fc = nn.Sequential(nn.Linear(code_dim + num_classes, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                                nn.Linear(hidden, width * self.base ** 2), nn.BatchNorm1d(width * self.base ** 2),
                                nn.ReLU())
        self.conv1 = nn.Conv2d(width, width // 2, 5, padding=2)
        self.conv2 = nn.Conv2d(width // 2, channels, 5, padding=2)

    def forward(self, code: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.fc(torch.cat([code, F.one_hot(labels, self.num_classes).float()], dim=1))
        h = h.view(-1, self.width, self.base, self.base)
        h = F.relu(self.conv1(F.interpolate(h, scale_factor=2, mode="bilinear", align_corners=False)))
        h = F.interpolate(h, size=(self.resolution,) * 2, mode="bilinear", align_corners=False)
        return torch.sigmoid(self.conv2(h))


def balanced_labels(batch_size: int, num_classes: int) -> torch.Tensor:
    """batch_size // num_classes of each class, in class order (the official code's balanced batches)."""
    return torch.arange(num_classes).repeat_interleave(batch_size // num_classes)


def matching_loss(features: PerceptualFeatures, images: torch.Tensor, labels: torch.Tensor,
                  target_means: torch.Tensor) -> torch.Tensor:
    """Σ_c ‖mean over the batch's class-c images of unit(φ(x)) − noisy mean_c‖² (the MMD with a linear kernel on
    the same bounded features the release used)."""
    unit = unit_rows(features(images))
    num_classes = target_means.shape[0]
    sums = torch.zeros(num_classes, unit.shape[1], dtype=unit.dtype).index_add(0, labels, unit)
    counts = torch.bincount(labels, minlength=num_classes).clamp_min(1).to(unit.dtype)
    present = torch.bincount(labels, minlength=num_classes) > 0
    diff = sums / counts[:, None] - target_means
    return (diff[present] ** 2).sum()
