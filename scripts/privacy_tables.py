#!/usr/bin/env python
"""The accounting tables of docs/privacy.md: budget split and the independent cross-check, paper settings.

    python scripts/privacy_tables.py > /tmp/tables.md

For each of the paper's dataset sizes N (CIFAR-10 45,000; OCTMNIST 97,477; CelebA 162,770; Camelyon 302,436), B = 4096, T = 1000,
σ_s = 5, δ = 1/N and ε ∈ {1, 10}: the calibrated σ, the selection's and the training's ε alone, the selection's
share, google dp-accounting's RDP ε at the same σ (an independent implementation) and the tighter PRV/PLD ε.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dp_accounting import dp_event  # noqa: E402
from dp_accounting.rdp import RdpAccountant  # noqa: E402

from dp_sapf import privacy  # noqa: E402
from dp_sapf.privacy import SelectionCost  # noqa: E402

PAPER_N = [45000, 97477, 162770, 302436]


def dp_accounting_epsilon(sigma, q, steps, delta, sigma_s):
    acc = RdpAccountant(orders=list(privacy.RDP_ORDERS))
    acc.compose(dp_event.ComposedDpEvent([
        dp_event.GaussianDpEvent(sigma_s),
        dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)]))
    return acc.get_epsilon(delta)


def main():
    print("| N | target ε | σ (calibrated, RDP) | ε (ours, RDP) | ε (dp-accounting RDP) | rel. diff | ε selection alone "
          "| ε training alone | selection share | ε PRV | ε PLD |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n in PAPER_N:
        for target in (1.0, 10.0):
            q, delta, sel = 4096 / n, 1 / n, SelectionCost(5.0)
            sigma = privacy.calibrate_noise_multiplier(target_epsilon=target, delta=delta, sample_rate=q, steps=1000,
                                                       selection=sel)
            ours = privacy.compute_epsilon(noise_multiplier=sigma, sample_rate=q, steps=1000, delta=delta, selection=sel)
            theirs = dp_accounting_epsilon(sigma, q, 1000, delta, 5.0)
            tight = {acc: privacy.compute_epsilon(noise_multiplier=sigma, sample_rate=q, steps=1000, delta=delta,
                                                  selection=sel, accountant=acc).epsilon for acc in ("prv", "pld")}
            print(f"| {n:,} | {target:g} | {sigma:.4f} | {ours.epsilon:.4f} | {theirs:.4f} | "
                  f"{abs(ours.epsilon - theirs) / theirs:.1e} | {ours.epsilon_selection_only:.3f} | "
                  f"{ours.epsilon_training_only:.3f} | {ours.selection_share:.1%} | {tight['prv']:.3f} | "
                  f"{tight['pld']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
