#!/usr/bin/env python
"""Would bf16 autocast, another memory layout or another runtime speed up the CPU? Measured in one run, as ratios.

    python bench/bench_cpu_precision.py --threads 2        # the embedded public model's UNet, TF-Inception

Rows: the UNet's forward+backward (training) and forward (sampling) in fp32 and under bf16 autocast, and the
FID Inception forward in fp32 on the layout evaluate.py feeds it (channels-last, from HWC images), on a contiguous
copy, and under bf16 autocast, with the bf16 features' relative error (FID needs the fp32 features); and the same
network under ONNX Runtime (what metrics.load_inception picks on a CPU when onnxruntime is installed), with its
features' largest relative difference from TorchScript's.
"""

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def rate(fn, n_items: int, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return repeats * n_items / (time.perf_counter() - start)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/tiny-sd-public", help="Pipeline folder whose UNet is timed.")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads.")
    p.add_argument("--batch_size", type=int, default=64, help="UNet samples per call.")
    p.add_argument("--inception_batch", type=int, default=25, help="Images per Inception call.")
    p.add_argument("--repeats", type=int, default=5, help="Timed calls per row.")
    p.add_argument("--inception_backends_only", action="store_true",
                   help="Only the two Inception runtimes, TorchScript vs ONNX Runtime, both fp32 (bf16 is emulated "
                        "and slow on a CPU without bf16 units).")
    p.add_argument("--output_json", default=None, help="Where to write the rows.")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import numpy as np
    import torch.nn.functional as F
    from diffusers import UNet2DConditionModel

    from dp_sapf import metrics

    unet = UNet2DConditionModel.from_pretrained(args.model, subfolder="unet")
    size, ctx = unet.config.sample_size, unet.config.cross_attention_dim
    x, t = torch.randn(args.batch_size, unet.config.in_channels, size, size), torch.randint(0, 1000, (args.batch_size,))
    h = torch.randn(args.batch_size, 77, ctx)

    def train_step(bf16):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = unet(x, t, h).sample
        out.float().pow(2).mean().backward()

    def forward(bf16):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            unet(x, t, h)

    rows = {}
    for bf16 in () if args.inception_backends_only else (False, True):
        tag = "bf16 autocast" if bf16 else "fp32"
        rows[f"UNet forward+backward, {tag} (samples/s)"] = rate(lambda: train_step(bf16), args.batch_size, args.repeats)
        rows[f"UNet forward, {tag} (samples/s)"] = rate(lambda: forward(bf16), args.batch_size, args.repeats)

    inception = metrics.load_inception(backend="torch")
    images = np.random.default_rng(0).integers(0, 256, (args.inception_batch, 28, 28, 3), dtype=np.uint8)
    pixels = F.interpolate(torch.from_numpy(images).permute(0, 3, 1, 2).float(), size=(299, 299), mode="bilinear",
                           align_corners=False) / 128.0 - 1.0  # evaluate.py's input, channels-last in memory
    extra = {}
    with torch.no_grad():
        reference = inception(pixels)
        n = args.inception_batch
        rows["Inception, fp32, evaluate.py's channels-last input (images/s)"] = rate(lambda: inception(pixels), n, args.repeats)
        ort = metrics.load_inception(backend="onnxruntime")
        ort_error = float((ort(pixels).reshape(reference.shape) - reference).abs().max() / reference.abs().max())
        rows["Inception, ONNX Runtime, fp32 (images/s)"] = ort_rate = rate(lambda: ort(pixels), n, args.repeats)
        torch_rate = rows["Inception, fp32, evaluate.py's channels-last input (images/s)"]
        extra["inception_onnxruntime_over_torchscript"] = round(ort_rate / torch_rate, 3)
        extra["inception_onnxruntime_max_relative_difference"] = float(f"{ort_error:.2e}")
        if not args.inception_backends_only:
            contiguous = pixels.contiguous()
            rows["Inception, fp32, contiguous input (images/s)"] = rate(lambda: inception(contiguous), n, args.repeats)

            def bf16_inception():
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return inception(pixels)

            extra["inception_bf16_relative_feature_error"] = round(
                float((bf16_inception().float() - reference).norm() / reference.norm()), 4)
            rows["Inception, bf16 autocast (images/s)"] = rate(bf16_inception, n, args.repeats)
    result = {"threads": args.threads, "rows": {k: round(v, 1) for k, v in rows.items()}, **extra}
    print(json.dumps(result, indent=2))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
