"""What the thin CLI scripts share: common flags and turning user errors into one clear line."""

from __future__ import annotations

import sys


def add_runtime_args(parser) -> None:
    """--mixed_precision, --seed and --dp_seed, with the same meaning in every script."""
    parser.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                        help="Autocast dtype for the frozen model (default: accelerate's config). Per-sample "
                             "gradients are exact under all three.")
    parser.add_argument("--seed", type=int, default=0,
                        help="Seed of the public, data-independent randomness only (LoRA initialisation, validation "
                             "images, a --scorer random mask). It never touches the private data: the per-sample "
                             "diffusion draws (timestep, noise, posterior draw, flip), the Poisson sample and the "
                             "Gaussian noise all come from the secret --dp_seed.")
    parser.add_argument("--dp_seed", type=int, default=None,
                        help="Seed of the secret mechanism randomness (per-sample diffusion draws, Poisson sampling, "
                             "Gaussian noise). Default: fresh from the OS on every run, as the guarantee assumes. "
                             "Whoever knows it can recompute the noise: fix it for tests and audits only.")


def run_cli(main, argv=None) -> None:
    """Run `main`; expected user errors (bad flags, files, budgets) end with one 'error:' line and exit 2."""
    try:
        main(argv)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
