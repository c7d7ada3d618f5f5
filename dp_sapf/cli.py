"""What the thin CLI scripts share: common flags and turning user errors into one clear line."""

from __future__ import annotations

import sys


def add_runtime_args(parser) -> None:
    """--mixed_precision, --seed and --dp_seed, with the same meaning in every script."""
    parser.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                        help="Autocast dtype for the frozen model (default: accelerate's config). Per-sample "
                             "gradients are exact under all three.")
    parser.add_argument("--seed", type=int, default=0,
                        help="Seed of the non-private randomness (timesteps, diffusion noise, LoRA init): "
                             "reproducible runs.")
    parser.add_argument("--dp_seed", type=int, default=None,
                        help="Seed of the privacy randomness (Gaussian noise, Poisson sampling). Default: fresh from "
                             "the OS on every run, as the guarantee assumes. Fixing it makes the noise known to whoever "
                             "knows the seed: use it for tests and audits only.")


def run_cli(main, argv=None) -> None:
    """Run `main`; expected user errors (bad flags, files, budgets) end with one 'error:' line and exit 2."""
    try:
        main(argv)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
