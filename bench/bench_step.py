#!/usr/bin/env python
"""Throughput of the DP step against the same non-private step, measured in one run (ratios, not absolutes).

    python bench/bench_step.py --model tiny                        # CPU, the embedded default
    accelerate launch bench/bench_step.py --model sd15 --batch_size 64 --latent_size 32 --mixed_precision bf16

`sd15` is a UNet built from the real SD-v1.5 config (random init: same architecture and cost, no download);
`sd3-medium` / `dit-xl` are those transformers at random init, from a folder `python -m dp_sapf.tiny_pipeline` built.
(Row names say "UNet" for every denoiser: bench/scripts_report.py reads them.)
Every row calls the code the scripts run (`StepGradients`, `select_salient`), on synthetic latents.
Writes JSON and appends a markdown table to --markdown (default docs/benchmarks.md).
"""

import argparse
import datetime
import json
import math
import os
import platform
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dp_sapf import backbones, distributed, modeling, per_sample, saliency  # noqa: E402
from dp_sapf.seeding import seeded_generator  # noqa: E402

def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["tiny", "sd15", "tiny-dit", "tiny-sd3", "dit-xl", "sd3-medium"], default="tiny",
                   help="Which denoiser to time: the architectures of `python -m dp_sapf.tiny_pipeline` (sd15 is built "
                        "in memory; the others are loaded from --pretrained_model_name_or_path or built in a temp dir).")
    p.add_argument("--pretrained_model_name_or_path", default=None,
                   help="A pipeline folder of --model's architecture (default: build it in a temp dir).")
    p.add_argument("--batch_size", type=int, default=16, help="Samples per micro-batch.")
    p.add_argument("--latent_size", type=int, default=None, help="Latent side (default: the denoiser's sample_size).")
    p.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no", help="Autocast dtype.")
    p.add_argument("--select_ratio", type=float, default=0.3, help="Mask size for the LoRA rows.")
    p.add_argument("--steps", type=int, default=10, help="Timed steps per row.")
    p.add_argument("--warmup", type=int, default=2, help="Untimed steps per row.")
    p.add_argument("--eval_rows", action="store_true",
                   help="Also time evaluate.py's two costs: Inception features of 299-px images and a classifier step.")
    p.add_argument("--fid_batch_size", type=int, default=50, help="Inception batch of the evaluation row (evaluate.py's).")
    p.add_argument("--classifier_batch_size", type=int, default=128,
                   help="Batch of the classifier row (evaluate.py's --classifier_batch_size).")
    p.add_argument("--classifier_depth", type=int, default=10, help="WRN depth of the classifier row.")
    p.add_argument("--classifier_width", type=int, default=1, help="WRN width of the classifier row.")
    p.add_argument("--eval_steps", type=int, default=4, help="Timed calls per evaluation row (Inception is slow on a CPU).")
    p.add_argument("--compile", action="store_true",
                   help="Also time the 30%% mask rows with torch.compile (non-private and DP with probes).")
    p.add_argument("--only_selection", action="store_true",
                   help="Time only the selection pass against the plain forward+backward (a quick check).")
    p.add_argument("--output_json", default=None, help="Where to write the JSON results.")
    p.add_argument("--markdown", default="docs/benchmarks.md", help="Markdown file the table is appended to.")
    return p.parse_args()


def load_models(args):
    """(denoiser, VAE, noise scheduler): SD-v1.5's architectures at random init, or a pipeline folder's."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    if args.model == "sd15":
        from dp_sapf.tiny_pipeline import SD15_UNET, SD15_VAE

        torch.manual_seed(0)
        return (UNet2DConditionModel(**SD15_UNET), AutoencoderKL(**SD15_VAE),
                DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              num_train_timesteps=1000))
    path = args.pretrained_model_name_or_path
    if path is None:
        import tempfile

        from dp_sapf.tiny_pipeline import build_tiny_pipeline

        path = build_tiny_pipeline(os.path.join(tempfile.mkdtemp(), args.model), architecture=args.model)
    parts = modeling.load_pipeline_parts(path)
    return parts.denoiser, parts.vae, parts.noise_scheduler


def synthetic_conditions(denoiser, batch, g):
    """Random conditioning of the shapes the scripts feed each backbone (CLIP states; SD3 states + pooled, with
    the 256 T5 positions; DiT class ids)."""
    c, name = denoiser.config, backbones.of_model(denoiser).name
    if name == "dit":
        return torch.randint(0, c.num_embeds_ada_norm, (batch,), generator=g)
    if name == "sd3":
        return (torch.randn(batch, 77 + backbones.SD3_MAX_SEQUENCE_LENGTH, c.joint_attention_dim, generator=g),
                torch.randn(batch, c.pooled_projection_dim, generator=g))
    return torch.randn(batch, 77, c.cross_attention_dim, generator=g)


def _to(x, device):
    return tuple(t.to(device) for t in x) if isinstance(x, tuple) else x.to(device)


def synthetic_batch(unet, batch, size, device, seed):
    g = torch.Generator().manual_seed(seed)
    c = unet.config
    shape = (batch, c.in_channels, size, size)
    return [(torch.randn(shape, generator=g).to(device), _to(synthetic_conditions(unet, batch, g), device),
             torch.randn(shape, generator=g).to(device), torch.randint(0, 1000, (batch,), generator=g).to(device))]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, args, device, batch_size=None, steps=None):
    """Samples/s of fn over `steps` (default args.steps) calls of `batch_size` (default args.batch_size) samples
    after args.warmup calls, and peak memory."""
    batch_size, steps = batch_size or args.batch_size, steps or args.steps
    for _ in range(args.warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    elapsed = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"samples_per_s": steps * batch_size / elapsed, "peak_memory_gib": peak / 2 ** 30}


def evaluation_rows(args):
    """evaluate.py's costs on the CPU where it runs: the Inception forward as metrics.inception_features calls it
    (uint8 NHWC -> channels-last float -> bilinear 299), and one step of the downstream WRN with its augmentation."""
    import torch.nn.functional as F

    from dp_sapf import metrics

    g = torch.Generator().manual_seed(0)
    inception = metrics.load_inception()
    images = torch.randint(0, 256, (args.fid_batch_size, 32, 32, 3), generator=g, dtype=torch.uint8)

    @torch.no_grad()
    def features():
        x = F.interpolate(images.permute(0, 3, 1, 2).float(), size=(299, 299), mode="bilinear", align_corners=False)
        inception(x / 128.0 - 1.0)

    classifier = metrics.build_classifier("wrn", 10, args.classifier_depth, args.classifier_width)
    opt = torch.optim.Adam(classifier.parameters(), lr=0.01)
    x = torch.rand(args.classifier_batch_size, 3, 32, 32, generator=g) * 2 - 1
    y = torch.randint(0, 10, (args.classifier_batch_size,), generator=g)

    def classifier_step():
        loss = F.cross_entropy(classifier(metrics.augment(x, g)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    cpu = torch.device("cpu")
    return {"evaluation: Inception features (299 px)": timed(features, args, cpu, args.fid_batch_size, args.eval_steps),
            f"evaluation: WRN-{args.classifier_depth}-{args.classifier_width} train step":
                timed(classifier_step, args, cpu, args.classifier_batch_size, args.eval_steps)}


def lora_rows(args, unet_factory, scheduler, device, autocast, label, targets_fn, variants):
    """LoRA steps on the same matrices, inputs and optimizer: (private, per-sample engine, compiled) variants."""
    rows = {}
    for private, engine, compiled in variants:
        unet = unet_factory()
        targets = targets_fn(unet)
        params = modeling.add_lora(unet, targets, rank=4)
        with torch.no_grad():  # non-zero B, as after a few steps, so every LoRA tensor has gradients
            for name, p in unet.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 1e-3)
        unet.to(device)
        engine_obj, model = None, unet
        if private:  # the script's own engine choice and checks
            engine_obj, model = per_sample.make_engine(engine, unet, params, compile=compiled,
                                                       mixed_precision=args.mixed_precision,
                                                       max_batch_size=args.batch_size)
        if compiled:
            torch._dynamo.reset()  # dynamo does not guard on module hooks: never reuse another variant's graph
            model = torch.compile(model)
        step = per_sample.StepGradients(modeling.diffusion_loss_fn(model, scheduler, autocast), params,
                                        private=private, max_grad_norm=1.0, engine=engine_obj, compile=compiled)
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        batches = synthetic_batch(unet, args.batch_size, args.latent_size, device, 0)
        generator = seeded_generator(0, "bench", device=device)

        def run():
            step(batches, noise_multiplier=1.0, noise_generator=generator, expected_batch_size=args.batch_size,
                 realised_batch_size=args.batch_size)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        name = f"{label} {'DP (' + engine + ')' if private else 'non-private'}{', compiled' if compiled else ''}"
        rows[name] = {**timed(run, args, device), "trainable_matrices": len(targets)}
        print(name, rows[name], flush=True)
        del unet, model, optimizer, step, engine_obj
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main():
    args = parse_args()
    accelerator = distributed.make_accelerator(args)
    device, dtype = accelerator.device, modeling.weight_dtype_for(args.mixed_precision)
    base, vae, scheduler = load_models(args)
    args.latent_size = args.latent_size or base.config.sample_size

    def fresh():
        import copy

        unet = copy.deepcopy(base).requires_grad_(False)
        return unet.to(device, dtype) if dtype != torch.float32 else unet.to(device)

    names = list(saliency.candidate_modules(base, "attention_qkv"))
    k = saliency.num_selected(args.select_ratio, len(names))
    mask = [names[round(i * len(names) / k)] for i in range(k)]  # spread over the UNet, like a real mask
    eager = [(False, None, False), (True, "hooks", False), (True, "probes", False)]
    compiled = [(False, None, True), (True, "probes", True)] if args.compile else []
    rows = {}
    if args.only_selection:
        eager, compiled = [], []
    rows.update(lora_rows(args, fresh, scheduler, device, accelerator.autocast, "LoRA 30% mask",
                          lambda unet: mask, eager + compiled))
    rows.update(lora_rows(args, fresh, scheduler, device, accelerator.autocast, "LoRA all attention",
                          lambda unet: list(saliency.candidate_modules(unet, "attention_qkvo")), eager if not args.only_selection else []))

    # selection pass vs a plain forward+backward into all q/k/v weights
    unet = fresh()
    modules = saliency.candidate_modules(unet, "attention_qkv")
    batches = synthetic_batch(unet, args.batch_size, args.latent_size, device, 1)

    def plain():
        weights = [m.weight for m in modules.values()]
        for w in weights:
            w.requires_grad_(True)
        with accelerator.autocast():
            loss = modeling.per_sample_diffusion_loss(unet, scheduler, *batches[0]).sum()
        loss.backward()
        for w in weights:
            w.grad = None
            w.requires_grad_(False)

    def selection(compile_clip):
        def run():
            loss_fn = modeling.diffusion_loss_fn(unet, scheduler, accelerator.autocast)
            saliency.select_salient(loss_fn, modules, batches, dataset_size=args.batch_size, scorer="grad_norm", noise_multiplier=5.0,
                                    max_grad_norm=1.0, ratio=0.3, granularity="matrix",
                                    noise_generator=seeded_generator(0, "bench", device=device),
                                    compile=compile_clip)
        return run

    rows["plain fwd+bwd into all q/k/v"] = timed(plain, args, device)
    print("plain", rows["plain fwd+bwd into all q/k/v"], flush=True)
    rows["selection pass (per-sample norms, clip, noise)"] = timed(selection(False), args, device)
    if args.compile:
        torch._dynamo.reset()
        rows["selection pass, compiled clip"] = timed(selection(True), args, device)
    print("selection", {k: v for k, v in rows.items() if k.startswith("selection")}, flush=True)
    if args.only_selection:
        best = max(v["samples_per_s"] for k, v in rows.items() if k.startswith("selection"))
        print(json.dumps({"rows": rows, "selection / plain": best / rows["plain fwd+bwd into all q/k/v"]["samples_per_s"]}))
        return

    # one sampling step with classifier-free guidance (the denoiser on a doubled batch)
    def sampling_step(model):
        name = backbones.of_model(model).name

        @torch.no_grad()
        def run():
            lat, hid, _, ts = batches[0]
            two = (lambda t: torch.cat([t, t]))
            with accelerator.autocast():
                if name == "sd3":
                    model(hidden_states=two(lat), timestep=two(ts).float(), encoder_hidden_states=two(hid[0]),
                          pooled_projections=two(hid[1]))
                elif name == "dit":
                    model(two(lat), timestep=two(ts), class_labels=two(hid))
                else:
                    model(two(lat), two(ts), two(hid))
        return run

    rows["sampling: UNet step with guidance"] = timed(sampling_step(unet), args, device)
    if args.compile:
        torch._dynamo.reset()
        rows["sampling: UNet step with guidance, compiled"] = timed(sampling_step(torch.compile(unet)), args, device)
    del unet

    # the VAE: encoding (what caching latents saves at every step) and decoding (once per sampled image)
    vae = (vae.to(device, dtype) if dtype != torch.float32 else vae.to(device)).requires_grad_(False)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    pixels = torch.randn(args.batch_size, 3, args.latent_size * factor, args.latent_size * factor, device=device)
    latents = torch.randn(args.batch_size, vae.config.latent_channels, args.latent_size, args.latent_size,
                          device=device)

    @torch.no_grad()
    def encode():
        with accelerator.autocast():
            vae.encode(pixels).latent_dist.sample()

    @torch.no_grad()
    def decode():
        with accelerator.autocast():
            vae.decode(latents)

    rows["VAE encode"] = timed(encode, args, device)
    rows["VAE decode"] = timed(decode, args, device)
    if args.eval_rows:
        rows.update(evaluation_rows(args))

    def sps(name):
        return rows[name]["samples_per_s"]

    ratios = {}
    for label in ("LoRA 30% mask", "LoRA all attention"):
        for engine in ("hooks", "probes"):
            ratios[f"{label}: DP ({engine}) / non-private, eager"] = sps(f"{label} DP ({engine})") / sps(f"{label} non-private")
    if args.compile:
        ratios["LoRA 30% mask: DP (probes) / non-private, both compiled"] = (
            sps("LoRA 30% mask DP (probes), compiled") / sps("LoRA 30% mask non-private, compiled"))
    fastest = {private: max(v["samples_per_s"] for k, v in rows.items() if k.startswith("LoRA 30% mask")
                            and ("DP" in k) == private) for private in (False, True)}
    ratios["LoRA 30% mask: fastest DP / fastest non-private (target >= 0.95)"] = fastest[True] / fastest[False]
    sel = max(v["samples_per_s"] for k, v in rows.items() if k.startswith("selection"))
    ratios["selection (fastest) / plain fwd+bwd (target >= 0.75)"] = sel / sps("plain fwd+bwd into all q/k/v")
    dp = fastest[True]
    sampling = max(v["samples_per_s"] for k, v in rows.items() if k.startswith("sampling"))
    projection = {
        "paper CIFAR-10 recipe (selection 45,000 + 1000 x 4096 DP samples), hours": (45000 / sel + 1000 * 4096 / dp) / 3600,
        "60,000 images x 25 steps with guidance + VAE decode, minutes":
            (60000 * 25 / sampling + 60000 / sps("VAE decode")) / 60,
    }
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    import diffusers
    import peft

    result = {"date": datetime.date.today().isoformat(), "device": device_name, "model": args.model,
              "batch_size": args.batch_size, "latent_size": args.latent_size, "mixed_precision": args.mixed_precision,
              "compile": args.compile, "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                                                     "peft": peft.__version__},
              "rows": rows, "ratios": ratios, "projections": projection}
    print(json.dumps(result, indent=2))
    if args.output_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
        json.dump(result, open(args.output_json, "w"), indent=2)
    if args.markdown:
        write_markdown(result, args.markdown)


def write_markdown(result, path):
    lines = [f"\n## Step throughput: {result['model']} denoiser on {result['device']}\n",
             f"{result['date']}; batch {result['batch_size']}, latents {result['latent_size']}x{result['latent_size']}, "
             f"mixed precision {result['mixed_precision']}, compile {result['compile']}; "
             + ", ".join(f"{k} {v}" for k, v in result["versions"].items()) + "\n",
             "| row | samples/s | peak memory (GiB) |", "|---|---|---|"]
    lines += [f"| {k} | {v['samples_per_s']:.1f} | {v['peak_memory_gib']:.2f} |" for k, v in result["rows"].items()]
    lines += ["", "| ratio (same run) | value |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in result["ratios"].items()]
    lines += [f"| projected: {k} | {v:.2f} |" for k, v in result["projections"].items()]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
