#!/usr/bin/env python
"""Script-level throughput (what the scripts recorded about themselves) next to bench_step.py's rows.

    python bench/scripts_report.py runs/bench_scripts_sd15 --markdown docs/benchmarks.md

Reads <dir>/mask.timings.json, <dir>/train_{nodp,dp,nodp_compile,dp_compile}/run_status.json,
<dir>/synthetic/timings.json, <dir>/eval/timings.json and <dir>/bench_step.json (written by
bench/bench_scripts.sh) and appends a table:
each script stage, the benchmark row it should match, and their ratio, measured in the same session.
"""

import argparse
import datetime
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dp_sapf import run_folder  # noqa: E402


def load(path):
    with open(path) as f:
        return json.load(f)


def rows(folder: str) -> tuple[list[tuple], dict, dict]:
    bench = load(os.path.join(folder, "bench_step.json"))
    b = {k: v["samples_per_s"] for k, v in bench["rows"].items()}
    train = {v: load(os.path.join(folder, f"train_{v}", run_folder.STATUS_FILE))["timings"]
             for v in ("nodp", "dp", "nodp_compile", "dp_compile")
             if os.path.isfile(os.path.join(folder, f"train_{v}", run_folder.STATUS_FILE))}
    select = load(os.path.join(folder, "mask.timings.json"))
    sampling = load(os.path.join(folder, "synthetic", "timings.json"))
    n = sum(load(os.path.join(folder, "data", "dataset_info.json"))["counts"]["train"].values())
    best_sel = max(v for k, v in b.items() if k.startswith("selection"))
    out = [("selection pass (images/s)", select.get("saliency_images_per_s"), "selection pass (fastest)", best_sel)]
    pairs = [("nodp", "LoRA 30% mask non-private"), ("dp", "LoRA 30% mask DP (hooks)"),
             ("nodp_compile", "LoRA 30% mask non-private, compiled"), ("dp_compile", "LoRA 30% mask DP (probes), compiled")]
    for variant, row in pairs:
        if variant in train:
            out.append((f"train_dp_sapf.py {variant} (samples/s, steady)", train[variant]["steady_samples_per_s"], row,
                        b.get(row)))
    if "dp" in train:  # steady images/s after the first batch (older records: the whole stage)
        encode = train["dp"].get("encode_images_per_s") or round(n / train["dp"]["encode_latents_s"], 1)
        out.append(("latent encoding in train_dp_sapf.py (images/s)", encode, "VAE encode", b.get("VAE encode")))
    steps = sampling.get("num_inference_steps", 1)
    calls = sampling.get("denoiser_calls_per_image", steps)  # PNDM (SD's default) makes steps + 1
    # an image costs `calls` guided UNet evaluations plus one VAE decode: the bench's images/s from its two rows
    unet, decode = b.get("sampling: UNet step with guidance"), b.get("VAE decode")
    out.append((f"sample.py (images/s, {steps} steps)", sampling["steady_images_per_s"],
                f"{calls} x UNet step with guidance + VAE decode", unet and decode and 1 / (calls / unet + 1 / decode)))
    evaluation = os.path.join(folder, "eval", "timings.json")
    if os.path.isfile(evaluation):  # evaluate.py on the CPU: Inception features, then the downstream classifier
        ev = load(evaluation)
        out.append(("evaluate.py Inception features (images/s)", ev.get("inception_images_per_s"),
                    "evaluation: Inception features (299 px)", b.get("evaluation: Inception features (299 px)")))
        wrn = next((k for k in b if k.startswith("evaluation: WRN")), None)
        out.append(("evaluate.py WRN training (samples/s, incl. per-epoch validation)",
                    ev.get("classifier_wrn_samples_per_s"), wrn, b.get(wrn)))
    return out, train, {"selection": select, "sampling": sampling, "bench": bench, "n": n, "best_sel": best_sel, "b": b}


def write(folder: str, markdown: str) -> dict:
    table, train, extra = rows(folder)
    b = extra["b"]
    ratios = {}
    for variant_a, variant_b, label in (("dp", "nodp", "eager"), ("dp_compile", "nodp_compile", "compiled")):
        if variant_a in train and variant_b in train:
            ratios[f"script DP / script non-private, {label} (target >= 0.95)"] = (
                train[variant_a]["steady_samples_per_s"] / train[variant_b]["steady_samples_per_s"])
    sel = extra["selection"].get("saliency_images_per_s")
    if sel:
        ratios["script selection / bench plain fwd+bwd (target >= 0.75)"] = sel / b["plain fwd+bwd into all q/k/v"]
    dp_best = max((train[v]["steady_samples_per_s"] for v in ("dp", "dp_compile") if v in train), default=None)
    projection = {}
    if sel and dp_best:
        projection["paper CIFAR-10 recipe from script figures (45,000 selection + 1000 x 4096 DP), hours "
                   "(target <= 1.75)"] = (45000 / sel + 1000 * 4096 / dp_best) / 3600
    warm = {v: train[v].get("warmup_s") for v in ("nodp_compile", "dp_compile") if v in train}
    peaks = {v: t["peak_memory_gib"] for v, t in train.items()}
    bench = extra["bench"]
    lines = [f"\n## Script throughput vs bench_step: {bench['model']} on {bench['device']}\n",
             f"{datetime.date.today().isoformat()}; micro-batch {bench['batch_size']}, latents "
             f"{bench['latent_size']}x{bench['latent_size']}, mixed precision {bench['mixed_precision']}, N = "
             f"{extra['n']}; the scripts' own timings (bench/bench_scripts.sh), steady state after the warm-up steps.\n",
             "| script stage | script | bench_step row | bench | script / bench (target >= 0.9) |", "|---|---|---|---|---|"]
    for name, script_value, row, bench_value in table:
        ratio = f"{script_value / bench_value:.3f}" if script_value and bench_value else "–"
        lines.append(f"| {name} | {script_value} | {row} | {bench_value and round(bench_value, 1)} | {ratio} |")
    lines += ["", "| ratio / figure | value |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in ratios.items()]
    lines += [f"| {k} | {v:.2f} |" for k, v in projection.items()]
    lines += [f"| compile warm-up (first steps), {k} | {v} s (target <= 180) |" for k, v in warm.items()]
    lines += [f"| peak memory, {k} | {v} GiB (target <= 16) |" for k, v in peaks.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    if markdown:
        with open(markdown, "a") as f:
            f.write(text)
    result = {"table": table, "ratios": ratios, "projection": projection, "warmup_s": warm, "peak_memory_gib": peaks}
    with open(os.path.join(folder, "scripts_report.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="The output folder of bench/bench_scripts.sh.")
    p.add_argument("--markdown", default="docs/benchmarks.md", help="Append the table here ('' for none).")
    args = p.parse_args()
    write(args.folder, args.markdown)


if __name__ == "__main__":
    main()
