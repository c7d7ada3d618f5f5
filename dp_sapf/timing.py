"""What a script measures about itself: stage wall times, steady-state throughput, warm-up, peak memory.

The scripts write these next to their outputs (run_status.json, <mask>.timings.json, the synthetic folder's
timings.json), never into a released artefact: run times are a side channel the DP analysis does not cover.
Benchmarks (bench/bench_scripts.sh) read them, so a figure about a script is measured on the script.
"""

from __future__ import annotations

import contextlib
import resource
import time

import torch


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gib(device) -> float:
    """Peak accelerator memory of this process (CUDA), else its peak resident set size."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2 ** 30


class Timings:
    """Stage wall times and one steady-state throughput series (items per second after the warm-up units)."""

    def __init__(self, device, warmup_units: int = 2):
        self.device, self.warmup_units = device, warmup_units
        self.stages: dict[str, float] = {}
        self.units: list[tuple[float, int]] = []  # (seconds, items) per unit of work (a step, a batch)
        self.figures: dict[str, float | None] = {}  # other measured figures, reported as they are
        self._last = None

    @contextlib.contextmanager
    def stage(self, name: str):
        synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            self.stages[name] = self.stages.get(name, 0.0) + time.perf_counter() - start

    def start_units(self) -> None:
        synchronize(self.device)
        self._last = time.perf_counter()

    def unit_done(self, items: int) -> None:
        """Call after each unit, once its work is known to be finished (a host sync such as loss.item())."""
        now = time.perf_counter()
        self.units.append((now - self._last, int(items)))
        self._last = now

    def summary(self, unit: str = "step", items: str = "samples") -> dict:
        steady = self.units[self.warmup_units:] or self.units
        seconds, count = sum(s for s, _ in steady), sum(n for _, n in steady)
        out = {f"{k}_s": round(v, 3) for k, v in self.stages.items()}
        if self.units:
            out.update({
                f"warmup_{unit}s": min(self.warmup_units, len(self.units)),
                f"warmup_s": round(sum(s for s, _ in self.units[:self.warmup_units]), 3),
                f"steady_{items}_per_s": round(count / seconds, 2) if seconds > 0 else None,
                f"steady_{unit}s_timed": len(steady),
                f"steady_s_per_{unit}": round(seconds / len(steady), 4),
            })
        out.update(self.figures)
        out["peak_memory_gib"] = round(peak_memory_gib(self.device), 3)
        out["device"] = torch.cuda.get_device_name(self.device) if torch.device(self.device).type == "cuda" else "cpu"
        return out
