#!/usr/bin/env python
"""The scale of per-sample LoRA gradient norms, measured on PUBLIC data (why recipe 1's C = 1 clipped nothing).

    python experiments/grad_norms_public.py            # MNIST-5k under the Fashion-MNIST prompts, recipe 1's settings

Runs `train_dp_sapf.py` itself (all-attention LoRA, rank 4, the public model) for a few DP-SGD steps in recipe 1's
setting (flat clipping at C = 1, B = 500, ε = 10) and records the quantiles of the unclipped per-sample norms it
computes (`ClippedGradientSum.add` returns them; the training script never writes them out). Only public images
are read: raw per-sample norms of a sensitive set must not be reported (they are not a DP release), so this
script refuses any dataset but the public stand-ins. Measurement only: no setting is chosen from it. The Poisson
sample and the noise are the mechanism's secret draws (not --seed), so two runs differ by a few percent.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

PUBLIC_STANDINS = ("mnist5k_as_fashion", "mnist5k_inverted")


def parse_args(argv=None):
    from dp_sapf.cli import COUNT, POSITIVE, SEED, ArgumentParser

    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--public_model", default=os.path.join(REPO, "models", "tiny-sd-public"),
                   help="The public pipeline.")
    p.add_argument("--dataset", default="mnist5k_as_fashion", choices=PUBLIC_STANDINS,
                   help="The public stand-in (a sensitive set is refused: its raw norms must not be reported).")
    p.add_argument("--max_per_class", type=COUNT, default=400, help="Train images per class (N = 10 × this).")
    p.add_argument("--train_batch_size", type=COUNT, default=500, help="B of the measured steps (recipe 1: 500).")
    p.add_argument("--steps", type=COUNT, default=6, help="DP-SGD steps measured (all their samples are recorded).")
    p.add_argument("--clipping", choices=["flat", "automatic"], default="flat",
                   help="Clip rule of the steps (recipe 1: flat).")
    p.add_argument("--max_grad_norm", type=POSITIVE, default=1.0, help="C of the steps (recipe 1: 1).")
    p.add_argument("--seed", type=SEED, default=0, help="Seed of the run.")
    p.add_argument("--output", default=os.path.join(REPO, "results", "grad_norms_public.json"), help="JSON record.")
    return p.parse_args(argv)


def quantiles(norms) -> dict:
    import torch

    x = torch.as_tensor(norms, dtype=torch.float64)
    q = torch.quantile(x, torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)).tolist()
    return {"samples": int(x.numel()), "p05": q[0], "median": q[1], "p95": q[2], "max": float(x.max())}


def main(argv=None):
    args = parse_args(argv)
    import train_dp_sapf
    from dp_sapf import per_sample, prepare_data

    data_dir = os.path.join(os.path.expanduser("~"), ".cache", "dp-sapf", "grad_norms_public",
                            f"{args.dataset}_{args.max_per_class}")
    if not os.path.isfile(os.path.join(data_dir, "dataset_info.json")):
        prepare_data.prepare(args.dataset, data_dir, args.max_per_class, 1)
    norms: list[float] = []
    original_add = per_sample.ClippedGradientSum.add

    def recording_add(self, grad_samples, count=None):  # measurement only: public data, never written by training
        out = original_add(self, grad_samples, count)
        norms.extend(out[: out.shape[0] if count is None else count].tolist())
        return out

    per_sample.ClippedGradientSum.add = recording_add
    try:
        with tempfile.TemporaryDirectory() as tmp:
            train_dp_sapf.main([
                "--pretrained_model_name_or_path", args.public_model, "--train_data_dir", data_dir,
                "--resolution", "32", "--class_prompts", "fashion_mnist", "--lora_target", "all_attention",
                "--rank", "4", "--seed", str(args.seed), "--target_epsilon", "10",
                "--train_batch_size", str(args.train_batch_size), "--max_physical_batch_size", "250",
                "--max_train_steps", str(args.steps), "--learning_rate", "0.02", "--clipping", args.clipping,
                "--max_grad_norm", str(args.max_grad_norm), "--report_to", "none", "--mixed_precision", "no",
                "--output_dir", os.path.join(tmp, "model")])
    finally:
        per_sample.ClippedGradientSum.add = original_add
    stats = quantiles(norms)
    record = {"what": "unclipped per-sample gradient norms of all-attention LoRA (rank 4) on the public model, "
                      f"the first {args.steps} DP-SGD steps", "dataset": f"{args.dataset} (public), "
              f"{10 * args.max_per_class} train images", "train_batch_size": args.train_batch_size,
              "clipping": args.clipping, "max_grad_norm": args.max_grad_norm, "seed": args.seed,
              "fraction_above_max_grad_norm": sum(n > args.max_grad_norm for n in norms) / len(norms),
              "max_grad_norm_over_median": args.max_grad_norm / stats["median"],
              "max_grad_norm_over_p95": args.max_grad_norm / stats["p95"], **stats,
              "command": " ".join(["python experiments/grad_norms_public.py", *(argv or sys.argv[1:])])}
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(record, f, indent=2)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
