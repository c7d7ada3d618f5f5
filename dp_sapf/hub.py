"""The model card (with the privacy figures in its YAML and its text) and the push of a finished run.

Only release files go to the Hub: never checkpoints (they hold the optimizer state and the secret DP seed)
and never logs (the logged training loss is not differentially private).
"""

from __future__ import annotations

import fnmatch
import os

from . import atomic, run_folder

RELEASE_PATTERNS = (run_folder.WEIGHTS_FILE, "README.md", run_folder.REPORT_FILE, run_folder.MASK_FILE,
                    run_folder.GRID_FILE, "model_index.json", "*/config.json", "*/*.safetensors", "*/*.json",
                    "*/*.txt")
PRIVATE_PATTERNS = (run_folder.CHECKPOINT_PREFIX + "*", "logs", "logs/*", run_folder.STATUS_FILE)


def release_files(output_dir: str) -> list[str]:
    """Relative paths of the files a finished run may publish."""
    out = []
    for root, dirs, files in os.walk(output_dir):
        rel_root = os.path.relpath(root, output_dir)
        dirs[:] = [d for d in dirs if not atomic.is_temporary(d) and not any(
            fnmatch.fnmatch(os.path.normpath(os.path.join(rel_root, d)), p) for p in PRIVATE_PATTERNS)]
        for f in files:
            if atomic.is_temporary(f):  # an unfinished write
                continue
            rel = os.path.normpath(os.path.join(rel_root, f))
            if any(fnmatch.fnmatch(rel, p) for p in RELEASE_PATTERNS) and not any(
                    fnmatch.fnmatch(rel, p) for p in PRIVATE_PATTERNS):
                out.append(rel)
    return sorted(out)


def _privacy_section(report: dict, class_prompts: list[str]) -> str:
    """The card's statement of the guarantee, or a plain statement that there is none."""
    split = report.get("budget_split", {})
    mask = report.get("mask") or {}
    trained = (f"Trainable matrices: {mask.get('num_selected', 'see privacy_report.json')} "
               f"({report.get('train_mode')}, {report.get('lora_target')}). Dataset size N = {report['dataset_size']}.")
    if not report["private"]:
        why = ("it was trained without clipping or noise (`--no_dp` / `--target_epsilon inf`)"
               if not report["noise_multiplier"] else
               "its saliency mask was selected without noise (σ_s = 0), which voids the guarantee of the whole release")
        return (f"**This model is NOT differentially private:** {why}. The weights, and anything generated from "
                "them, can reveal the training images. It is a non-private reference, not a privacy-preserving "
                "release." + f"\n\n{trained}\n")
    return (
        f"Trained with differential privacy: **(ε = {report['epsilon']:.4g}, δ = {report['delta']:.3g})** for "
        f"add/remove of one training image, accountant `{report['accountant']}`, composed over the saliency "
        "selection and DP-SGD.\n\n"
        f"| stage | figure |\n|---|---|\n"
        f"| saliency selection | {selection_summary(report)}, scorer {mask.get('scorer', 'none')}, "
        f"ε alone = {split.get('epsilon_selection_only', 0):.4g} |\n"
        f"| DP-SGD | σ = {report['noise_multiplier']:.4g}, C = {report['max_grad_norm']}{clip_rule(report)}, "
        f"q = {report['sample_rate']:.4g}, T = {report['steps']}, ε alone = {split.get('epsilon_training_only', 0):.4g} |\n"
        f"| selection share of the budget | {split.get('selection_share', 0):.1%} |\n\n{trained}\n\n"
        "The guarantee covers these weights and anything generated from them. It does not cover training logs "
        "(the logged loss and batch sizes are not private) or checkpoints, which are never uploaded.\n")


def clip_rule(report: dict) -> str:
    """', automatic clipping (γ = 0.01), K = 8' etc., for reports that record them."""
    clipping, k = report.get("clipping") or {}, report.get("noise_multiplicity") or 1
    rule = {"automatic": f", automatic clipping (γ = {clipping.get('automatic_gamma')})",
            "flat": ", flat clipping"}.get(clipping.get("rule"), "")
    return rule + (f", noise multiplicity K = {k}" if k > 1 else "")


def selection_summary(report: dict) -> str:
    """The selection's mechanism and its parameter, as the card's table names them."""
    mechanism = report.get("selection_mechanism")
    if (report.get("mask") or {}).get("scorer") == "dp_sgd_debiased":
        return "from the noisy gradients of the first DP-SGD steps (post-processing, no cost of its own)"
    if mechanism == "exponential":
        return f"exponential mechanism, ε_s = {report.get('selection_epsilon')} (pure, all picks)"
    if mechanism == "ptr":
        return f"propose-test-release, ε_s = {report.get('selection_epsilon')}, δ_s = {report.get('selection_delta'):.3g}"
    if mechanism == "gaussian":
        rate = report.get("selection_sample_rate")
        return f"Gaussian, σ_s = {report.get('selection_noise_multiplier')}" + (
            "" if rate is None else f", over a Poisson subsample of rate q_s = {rate:g}")
    return "none" if mechanism is None else "data-independent (free)"


def base_model_license(base_model: str) -> str | None:
    """The licence the base model's own card declares (a local folder's README.md, or the Hub's card when online):
    a fine-tune inherits it, so the card must not claim another (SD3 and DiT bases have their own)."""
    from huggingface_hub import ModelCard

    try:
        if os.path.isdir(base_model):
            readme = os.path.join(base_model, "README.md")
            return ModelCard.load(readme).data.license if os.path.isfile(readme) else None
        if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
            return None
        return ModelCard.load(base_model).data.license
    except Exception:  # no card, no network, a malformed header: the licence is unknown, said so below
        return None


def write_model_card(output_dir: str, *, repo_id: str | None, base_model: str, report: dict,
                     class_prompts: list[str], has_lora: bool, image_file: str | None = None, backbone=None) -> str:
    """README.md in diffusers' format (`load_or_create_model_card` + `populate_model_card`) with DP metadata.

    `report` is the privacy report (`privacy.REPORT_FIELDS`). A non-private run says so in its title, text,
    tags and metadata, and never carries the differential-privacy tag. `backbone` (`backbones.Backbone`, default
    SD) names the pipeline class and picks the loading code: `pipe.load_lora_weights` or, for DiT, peft.
    """
    from .backbones import BACKBONES, usage_snippet

    from diffusers.utils.hub_utils import load_or_create_model_card, populate_model_card

    private = bool(report["private"])
    backbone = backbone or BACKBONES["sd"]
    usage = usage_snippet(backbone, base_model, repo_id or output_dir, class_prompts[0], has_lora)
    title = (f"# DP-SAPF fine-tune of {base_model}" if private
             else f"# Non-private fine-tune of {base_model} (no differential privacy)")
    text = (f"{title}\n\n{_privacy_section(report, class_prompts)}\n"
            f"Backbone: `{backbone.pipeline_class}` ({backbone.denoiser_class}).\n\n"
            + ("Class prompts:\n" if backbone.uses_prompts else "Classes (label k = DiT class id k):\n")
            + "".join(f"- {p}\n" for p in class_prompts) + f"\n## How to use\n```python\n{usage}```\n")
    widget = [{"text": class_prompts[0], "output": {"url": image_file}}] if image_file else None
    # a repo id, never the folder: offline it falls back to the template (a local path is not a valid repo id)
    repo_name = repo_id or os.path.basename(os.path.abspath(output_dir))
    licence = base_model_license(base_model)
    if licence is None:
        text += (f"\n## Licence\nThe licence of the base model `{base_model}` applies to this fine-tune; its card "
                 "declared none that could be read here, so check it before you publish.\n")
    card = load_or_create_model_card(repo_id_or_path=repo_name, from_training=True,
                                     base_model=base_model, model_description=text,
                                     license=licence or "other", widget=widget, inference=True)
    tags = {"sd": ["stable-diffusion", "text-to-image"], "sd3": ["sd3", "text-to-image"],
            "dit": ["dit", "class-conditional-image-generation"]}[backbone.name]
    tags += ["diffusers", "diffusers-training",
            "lora" if has_lora else "full-finetune"]
    tags += ["dp-sapf", "differential-privacy"] if private else ["not-differentially-private"]
    card = populate_model_card(card, tags=tags)
    split = report.get("budget_split", {})
    card.data.differential_privacy = {
        "private": private,
        "epsilon": report["epsilon"] if private else None, "delta": report["delta"] if private else None,
        "accountant": report["accountant"] if private else None,
        "noise_multiplier": report["noise_multiplier"] if private else None,
        "selection_mechanism": report.get("selection_mechanism"),
        "selection_noise_multiplier": report.get("selection_noise_multiplier"),
        "selection_sample_rate": report.get("selection_sample_rate"),
        "selection_epsilon": report.get("selection_epsilon"), "selection_delta": report.get("selection_delta"),
        "max_grad_norm": report["max_grad_norm"], "sample_rate": report["sample_rate"], "steps": report["steps"],
        "dataset_size": report["dataset_size"], "selection_share": split.get("selection_share"),
        "neighbouring": "add/remove one image" if private else None,
        "clipping": report.get("clipping"), "noise_multiplicity": report.get("noise_multiplicity"),
    }
    path = os.path.join(output_dir, "README.md")
    return atomic.write_text(path, str(card))  # what card.save writes, atomically


def push_to_hub(output_dir: str, repo_id: str, token: str | None = None) -> str:
    """create_repo + upload_folder of the release files only."""
    from huggingface_hub import create_repo, upload_folder

    repo_id = create_repo(repo_id, exist_ok=True, token=token).repo_id
    upload_folder(repo_id=repo_id, folder_path=output_dir, allow_patterns=release_files(output_dir), token=token,
                  commit_message="DP-SAPF training result")
    return repo_id
