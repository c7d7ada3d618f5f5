"""accelerate set-up shared by the scripts: process group on GPU or CPU, and secrets every rank must share."""

from __future__ import annotations

import secrets

import torch


def make_accelerator(args, **kwargs):
    """An Accelerator for 1..n processes; on a machine without CUDA it runs gloo on the CPU (docs/design.md §4)."""
    from accelerate import Accelerator

    return Accelerator(mixed_precision=getattr(args, "mixed_precision", None),
                       cpu=not torch.cuda.is_available(), **kwargs)


def shared_secret_seed(accelerator, given: int | None) -> int:
    """The seed of the DP randomness (Poisson sampling, noise): `given`, or fresh from the OS, same on all ranks."""
    from accelerate.utils import broadcast_object_list

    value = [int(given) if given is not None else secrets.randbits(63)]
    if accelerator.num_processes > 1:
        broadcast_object_list(value, from_process=0)
    return int(value[0])


def finish(accelerator) -> None:
    """End cleanly: without this barrier multi-process runs abort now and then (docs/design.md §4)."""
    accelerator.wait_for_everyone()
    accelerator.end_training()
