"""accelerate set-up shared by the scripts: process group on GPU or CPU, and secrets every rank must share."""

from __future__ import annotations

import os
import secrets
import sys

import torch


def make_accelerator(args, **kwargs):
    """An Accelerator for 1..n processes; on a machine without CUDA it runs gloo on the CPU (docs/design.md §4)."""
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision=getattr(args, "mixed_precision", None),
                              cpu=not torch.cuda.is_available(), **kwargs)
    warn_if_cpu_threads_idle(accelerator)
    return accelerator


def warn_if_cpu_threads_idle(accelerator) -> None:
    """`accelerate launch` (without --cpu) sets OMP_NUM_THREADS=1 for each process unless told otherwise: on a
    CPU-only machine one process then uses one core, about half the speed on 2 cores (measured here). A deliberate
    OMP_NUM_THREADS=1 (jobs side by side) looks the same, so say it rather than override it."""
    cores, threads = os.cpu_count() or 1, torch.get_num_threads()
    launched = "ACCELERATE_DYNAMO_BACKEND" in os.environ  # set by `accelerate launch` for every process
    if (launched and accelerator.device.type == "cpu" and accelerator.num_processes == 1 and threads < cores
            and accelerator.is_main_process):
        print(f"note: this CPU process uses {threads} of {cores} cores (`accelerate launch` sets OMP_NUM_THREADS="
              f"{os.environ.get('OMP_NUM_THREADS', '?')}); pass `accelerate launch --num_cpu_threads_per_process "
              f"{cores}` or set OMP_NUM_THREADS={cores} to use them all.", file=sys.stderr)


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
