"""Named random streams: a generator per (seed, *keys), identical on every process and after a resume."""

from __future__ import annotations

import hashlib

import torch


def seeded_generator(seed: int, *keys, device="cpu") -> torch.Generator:
    """A generator seeded from sha256(seed, *keys): independent streams per purpose, step or image."""
    digest = hashlib.sha256(repr((int(seed),) + tuple(keys)).encode()).digest()
    g = torch.Generator(device=device)
    g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return g
