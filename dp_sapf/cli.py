"""What the thin CLI scripts share: common flags, checked numbers, and turning user errors into one clear line.

Every script builds its parser with `ArgumentParser` (argparse's, with a short error: a pointer to --help, then
the one `error:` line, last) and runs `main` through `run_cli` (expected user errors: one `error:` line, exit 2).
Numeric flags take their `type` from `number`: nan, and infinity where it means nothing, never get past parsing.
"""

from __future__ import annotations

import argparse
import math
import re
import sys


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors are short: `usage: PROG [flags]; see PROG --help`, then the `error:` line,
    last (exit 2).

    argparse prints the whole usage block (26-46 lines for these scripts) before the error; the flags are one
    `--help` away. A checked number's message ("argument --x: must be ...") reads as "--x must be ...".
    """

    def error(self, message: str):
        message = re.sub(r"^argument (--[\w-]+)(?:/\S+)?: must ", r"\1 must ", str(message))
        self.exit(2, f"usage: {self.prog} [flags]; see {self.prog} --help\nerror: {one_line(message)}\n")


def one_line(text: str) -> str:
    """A message as one line (newlines folded), so the error line is always the last line a user sees."""
    return " ".join(str(text).split())


def number(kind=float, *, min=None, max=None, min_open: bool = False, max_open: bool = False,
           allow_inf: bool = False):
    """An argparse `type` for a checked number: `kind` (float or int), finite (unless allow_inf), in the range.

    `number(float, min=0, min_open=True)` is a finite float > 0; `number(int, min=1)` an integer >= 1.
    """
    def show(x):
        return str(x) if kind is int else f"{x:g}"

    low = None if min is None else ("(" if min_open else "[") + show(min)
    high = None if max is None else show(max) + (")" if max_open else "]")
    noun = "an integer" if kind is int else "a number" if allow_inf else "a finite number"
    if low and high:
        expected = f"in {low}, {high}" + (" (an integer)" if kind is int else "")
    elif low:
        expected = f"{noun} {'>' if min_open else '>='} {show(min)}"
    elif high:
        expected = f"{noun} {'<' if max_open else '<='} {show(max)}"
    else:
        expected = noun

    def parse(text: str):
        try:
            value = kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}") from None
        if kind is float and (math.isnan(value) or (math.isinf(value) and not allow_inf)):
            raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}")
        if min is not None and (value < min or (min_open and value == min)):
            raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}")
        if max is not None and (value > max or (max_open and value == max)):
            raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}")
        return value

    parse.__name__ = expected  # what argparse would name the type
    return parse


# The numbers the scripts take, by meaning.
POSITIVE = number(float, min=0, min_open=True)  # a finite float > 0 (norms, learning rates, σ)
NON_NEGATIVE = number(float, min=0)  # a finite float >= 0 (weight decay, σ_s)
FINITE = number(float)  # any finite float (a LoRA scale)
PROBABILITY = number(float, min=0, max=1, min_open=True, max_open=True)  # in (0, 1): δ
FRACTION = number(float, min=0, max=1, min_open=True)  # in (0, 1]: ρ
HELD_OUT = number(float, min=0, max=1, max_open=True)  # in [0, 1): a held-out share
BETA = number(float, min=0, max=1, max_open=True)  # Adam's β in [0, 1)
COUNT = number(int, min=1)  # an integer >= 1
NON_NEGATIVE_INT = number(int, min=0)  # an integer >= 0 (steps of warm-up, seeds)
SEED = number(int, min=0, max=2 ** 32 - 1)  # numpy's seeds (accelerate's set_seed) end there
DP_SEED = number(int, min=0, max=2 ** 63 - 1)  # the secret seed: any 63-bit integer (distributed.shared_secret_seed)


def add_runtime_args(parser) -> None:
    """--mixed_precision, --seed and --dp_seed, with the same meaning in every script."""
    parser.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                        help="Autocast dtype for the frozen model (default: accelerate's config). Per-sample "
                             "gradients are exact under all three.")
    parser.add_argument("--seed", type=SEED, default=0,
                        help="Seed of the public, data-independent randomness only (LoRA initialisation, validation "
                             "images, a --scorer random mask). It never touches the private data: the per-sample "
                             "diffusion draws (timestep, noise, posterior draw, flip), the Poisson sample and the "
                             "Gaussian noise all come from the secret --dp_seed.")
    parser.add_argument("--dp_seed", type=DP_SEED, default=None,
                        help="Seed of the secret mechanism randomness (per-sample diffusion draws, Poisson sampling, "
                             "Gaussian noise). Default: fresh from the OS on every run, as the guarantee assumes. "
                             "Whoever knows it can recompute the noise: fix it for tests and audits only.")


def add_clipping_args(group, prefix: str = "", bound: str = "C") -> None:
    """--{prefix}clipping, --{prefix}automatic_clipping_gamma and --noise_multiplicity: how each image's gradient is
    formed and clipped, the same three flags (and meaning) in selection and training."""
    from .per_sample import CLIPPING_RULES, DEFAULT_AUTOMATIC_GAMMA

    group.add_argument(f"--{prefix}clipping", choices=CLIPPING_RULES, default="automatic",
                       help=f"automatic: g·{bound}/(‖g‖ + γ) (Bu et al.; the official DP-SAPF code): every sample "
                            f"reaches a norm just under {bound} whatever the model's gradient scale, so {bound} = 1 "
                            f"suits any model. flat: g·min(1, {bound}/‖g‖) (Abadi et al.): {bound} must sit at or below "
                            f"the typical per-sample norm, or nothing is clipped and the noise swamps gradients far "
                            f"smaller than {bound} (docs/privacy.md). Either way one image moves the sum by ≤ {bound}.")
    group.add_argument(f"--{prefix}automatic_clipping_gamma", type=POSITIVE, default=DEFAULT_AUTOMATIC_GAMMA,
                       help=f"γ of --{prefix}clipping automatic (official code: 0.01); keeps tiny gradients from being "
                            f"blown up to norm {bound}. The same sensitivity for every γ.")
    group.add_argument("--noise_multiplicity", type=COUNT, default=1,
                       help="K: each image's loss is the mean over K independent secret (timestep, noise) draws before "
                            "its gradient is clipped (DPDM); one clipped gradient per image, so privacy is unchanged, "
                            "and each image costs about K times the forward/backward work.")


def run_cli(main, argv=None) -> None:
    """Run `main`; expected user errors (bad flags, files, budgets) end with one 'error:' line and exit 2."""
    try:
        main(argv)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        sys.exit(2)
