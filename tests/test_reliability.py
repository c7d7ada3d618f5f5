"""Every bad input the scripts and tools can get (issue #23), as one table: each must end with one `error:` line that
names the problem (the last line, no traceback, no usage block), exit status 2, and nothing written or changed.

docs/reliability.md lists the table with the message each case gets; it is generated from this file:

    UPDATE_RELIABILITY_DOC=1 python -m pytest -q tests/test_reliability.py

Cases that fail while parsing flags run in this process (`run_cli(main, argv)`, exactly the scripts' entry point:
milliseconds each); the others, which reach the model, the data, the mask or a run folder, run as subprocesses.
Then: a kill -9 at any moment of writing the mask or the privacy report leaves the old file or the new, never a
truncated one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from helpers import REPO, run_module, run_script, select_args, train_args

DOC = os.path.join(REPO, "docs", "reliability.md")


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    script: str  # a script path, or "-m module"
    what: str  # the bad input, in words
    args: object  # world -> argv
    expect: str  # part of the error line
    deep: bool = False  # reaches the model, data, mask or run folder: a subprocess


def S(id, what, extra, expect, deep=False):  # select_salient.py on the tiny model and real Fashion-MNIST
    def args(w):
        return select_args(w.model, w.data, w.out, *[a.format(**vars(w)) for a in extra])
    return Case(f"select-{id}", "select_salient.py", what, args, expect, deep)


def T(id, what, extra, expect, deep=False, mask=True):  # train_dp_sapf.py with the mask, a target ε of 8
    def args(w):
        base = ["--saliency_mask", w.mask] if mask else ["--lora_target", "all_attention"]
        extra_ = [a.format(**vars(w)) for a in extra]
        privacy = [] if any(a in extra_ for a in ("--noise_multiplier", "--target_epsilon", "--no_dp")) else [
            "--target_epsilon", "8"]
        return train_args(w.model, w.data, w.out, *base, *privacy, *extra_)
    return Case(f"train-{id}", "train_dp_sapf.py", what, args, expect, deep)


def P(id, what, extra, expect, deep=False):  # sample.py with the finished run's LoRA
    def args(w):
        base = {"--pretrained_model_name_or_path": w.model, "--lora_path": w.run}
        extra_ = [a.format(**vars(w)) for a in extra]
        for flag in [f for f in base if f in extra_]:
            base.pop(flag)
        return [x for kv in base.items() for x in kv] + [
            "--num_images_per_class", "1", "--num_inference_steps", "2", "--output_dir", w.out, *extra_]
    return Case(f"sample-{id}", "sample.py", what, args, expect, deep)


def E(id, what, extra, expect, deep=False, prompts=True):  # evaluate.py against the real train/test split
    def args(w):
        extra_ = [a.format(**vars(w)) for a in extra]
        synthetic = [] if "--synthetic_dir" in extra_ else ["--synthetic_dir", w.synthetic]
        return [*synthetic, "--train_data_dir", w.data, *(["--class_prompts", "fashion_mnist"] if prompts else []),
                "--skip_fid", "--epochs", "1", "--classifier_depth", "10", "--classifier_width", "1",
                "--output_dir", w.out, *extra_]
    return Case(f"evaluate-{id}", "evaluate.py", what, args, expect, deep)


def M(id, script, what, extra, expect, deep=False):  # a module or experiments/ tool
    return Case(id, script, what, lambda w: [a.format(**vars(w)) for a in extra], expect, deep)


PRIVACY = ["--dataset_size", "1000", "--train_batch_size", "100", "--max_train_steps", "10"]
PE = ["--pretrained_model_name_or_path", "{model}", "--train_data_dir", "{data}", "--class_prompts", "fashion_mnist",
      "--output_dir", "{out}"]

MEPF = ["--train_data_dir", "{data}", "--class_prompts", "fashion_mnist", "--output_dir", "{out}"]

CASES = [
    # select_salient.py: numbers
    S("select_ratio_nan", "--select_ratio nan", ["--select_ratio", "nan"], "--select_ratio must be in (0, 1]"),
    S("select_ratio_zero", "--select_ratio 0", ["--select_ratio", "0"], "--select_ratio must be in (0, 1]"),
    S("select_ratio_above_one", "--select_ratio 1.5", ["--select_ratio", "1.5"], "--select_ratio must be in (0, 1]"),
    S("sigma_s_inf", "--selection_noise_multiplier inf", ["--selection_noise_multiplier", "inf"],
      "--selection_noise_multiplier must be a finite number >= 0"),
    S("sigma_s_negative", "--selection_noise_multiplier -1", ["--selection_noise_multiplier", "-1"],
      "--selection_noise_multiplier must be a finite number >= 0"),
    S("clip_s_inf", "--selection_max_grad_norm inf", ["--selection_max_grad_norm", "inf"],
      "--selection_max_grad_norm must be a finite number > 0"),
    S("clip_s_zero", "--selection_max_grad_norm 0", ["--selection_max_grad_norm", "0"],
      "--selection_max_grad_norm must be a finite number > 0"),
    S("epsilon_s_inf", "--selection_epsilon inf (exponential)",
      ["--selection_mechanism", "exponential", "--selection_epsilon", "inf"], "--selection_epsilon must be a finite"),
    S("delta_s_nan", "--selection_delta nan (ptr)",
      ["--selection_mechanism", "ptr", "--selection_epsilon", "1", "--selection_delta", "nan"],
      "--selection_delta must be in (0, 1)"),
    S("sigma_s_with_exponential", "--selection_noise_multiplier given to the exponential mechanism",
      ["--selection_mechanism", "exponential", "--selection_epsilon", "1", "--selection_noise_multiplier", "2"],
      "adds none"),
    S("sigma_s_with_synflow", "--selection_noise_multiplier given to a data-free scorer",
      ["--scorer", "synflow", "--selection_noise_multiplier", "5"], "reads no data"),
    S("sample_rate_zero", "--selection_sample_rate 0", ["--selection_sample_rate", "0"],
      "--selection_sample_rate must be in (0, 1]"),
    S("sample_rate_with_exponential", "--selection_sample_rate given to the exponential mechanism",
      ["--selection_mechanism", "exponential", "--selection_epsilon", "1", "--selection_sample_rate", "0.5"],
      "ranks exact scores of every image"),
    S("selection_batch_zero", "--selection_batch_size 0", ["--selection_batch_size", "0"],
      "--selection_batch_size must be an integer >= 1"),
    S("resolution_zero", "--resolution 0", ["--resolution", "0"], "--resolution must be an integer >= 1"),
    S("max_train_samples_negative", "--max_train_samples -5", ["--max_train_samples", "-5"],
      "--max_train_samples must be an integer >= 1"),
    S("seed_negative", "--seed -1", ["--seed", "-1"], "--seed must be in [0, 4294967295]"),
    S("dp_seed_nan", "--dp_seed nan", ["--dp_seed", "nan"], "--dp_seed must be in [0,"),
    S("output_is_a_folder", "--output is an existing folder", ["--output", "{work}"], "is a folder"),
    # select_salient.py: files, data, model
    S("model_missing", "--pretrained_model_name_or_path that does not exist",
      ["--pretrained_model_name_or_path", "{work}/no-such-model"], "is not a diffusers pipeline folder", deep=True),
    S("data_missing", "--train_data_dir that does not exist", ["--train_data_dir", "{work}/no-such-data"],
      "is not a folder", deep=True),
    S("corrupt_image", "a corrupt image file in the data", ["--train_data_dir", "{data_corrupt}"],
      "Cannot read image", deep=True),
    S("truncated_image", "a truncated PNG in the data", ["--train_data_dir", "{data_truncated}"], "truncated",
      deep=True),
    S("empty_class_folders", "class folders without images", ["--train_data_dir", "{data_empty}"], "holds no files",
      deep=True),
    S("label_outside_classes", "a class folder outside --class_prompts", ["--train_data_dir", "{data_unicorn}"],
      "outside the public class list", deep=True),
    S("class_prompts_unknown", "--class_prompts that is no set, file or JSON", ["--class_prompts", "fashion"],
      "is neither a built-in set"),
    S("resolution_not_rendered", "--resolution 36 (not a multiple of 8)", ["--resolution", "36"],
      "renders multiples of 8 px only", deep=True),
    S("dropout_dit", "a DiT whose config has dropout 0.1", ["--pretrained_model_name_or_path", "{dit_dropout}"],
      "has dropout", deep=True),
    S("dropout_unet", "a U-Net whose config has dropout 0.1", ["--pretrained_model_name_or_path", "{sd_dropout}"],
      "has dropout", deep=True),
    # train_dp_sapf.py: numbers
    T("clip_inf", "--max_grad_norm inf", ["--max_grad_norm", "inf"], "--max_grad_norm must be a finite number > 0"),
    T("clip_nan", "--max_grad_norm nan", ["--max_grad_norm", "nan"], "--max_grad_norm must be a finite number > 0"),
    T("clip_zero", "--max_grad_norm 0", ["--max_grad_norm", "0"], "--max_grad_norm must be a finite number > 0"),
    T("sigma_inf", "--noise_multiplier inf", ["--noise_multiplier", "inf"],
      "--noise_multiplier must be a finite number > 0"),
    T("sigma_zero", "--noise_multiplier 0", ["--noise_multiplier", "0"],
      "--noise_multiplier must be a finite number > 0"),
    T("epsilon_nan", "--target_epsilon nan", ["--target_epsilon", "nan"], "--target_epsilon must be > 0"),
    T("epsilon_negative", "--target_epsilon -1", ["--target_epsilon=-1"], "--target_epsilon must be > 0"),
    T("delta_above_one", "--target_delta 1.5", ["--target_delta", "1.5"], "--target_delta must be in (0, 1)"),
    T("lr_nan", "--learning_rate nan", ["--learning_rate", "nan"], "--learning_rate must be a finite number > 0"),
    T("lr_negative", "--learning_rate -1", ["--learning_rate", "-1"], "--learning_rate must be a finite number > 0"),
    T("beta1_one", "--adam_beta1 1", ["--adam_beta1", "1"], "--adam_beta1 must be in [0, 1)"),
    T("beta2_nan", "--adam_beta2 nan", ["--adam_beta2", "nan"], "--adam_beta2 must be in [0, 1)"),
    T("adam_epsilon_zero", "--adam_epsilon 0", ["--adam_epsilon", "0"], "--adam_epsilon must be a finite number > 0"),
    T("weight_decay_inf", "--adam_weight_decay inf", ["--adam_weight_decay", "inf"],
      "--adam_weight_decay must be a finite number >= 0"),
    T("lora_alpha_zero", "--lora_alpha 0", ["--lora_alpha", "0"], "--lora_alpha must be a finite number > 0"),
    T("rank_zero", "--rank 0", ["--rank", "0"], "--rank must be an integer >= 1"),
    T("batch_zero", "--train_batch_size 0", ["--train_batch_size", "0"], "--train_batch_size must be an integer >= 1"),
    T("physical_batch_negative", "--max_physical_batch_size -1", ["--max_physical_batch_size", "-1"],
      "--max_physical_batch_size must be an integer >= 1"),
    T("steps_zero", "--max_train_steps 0", ["--max_train_steps", "0"], "--max_train_steps must be an integer >= 1"),
    T("steps_float", "--max_train_steps 2.5", ["--max_train_steps", "2.5"],
      "--max_train_steps must be an integer >= 1"),
    T("checkpointing_zero", "--checkpointing_steps 0", ["--checkpointing_steps", "0"],
      "--checkpointing_steps must be an integer >= 1"),
    T("checkpoint_limit_zero", "--checkpoints_total_limit 0", ["--checkpoints_total_limit", "0"],
      "--checkpoints_total_limit must be an integer >= 1"),
    T("warmup_negative", "--lr_warmup_steps -1", ["--lr_warmup_steps", "-1"],
      "--lr_warmup_steps must be an integer >= 0"),
    T("validation_images_zero", "--num_validation_images 0", ["--num_validation_images", "0"],
      "--num_validation_images must be an integer >= 1"),
    T("validation_steps_zero", "--validation_steps 0", ["--validation_steps", "0"],
      "--validation_steps must be an integer >= 1"),
    T("validation_inference_zero", "--validation_inference_steps 0", ["--validation_inference_steps", "0"],
      "--validation_inference_steps must be an integer >= 1"),
    T("scheduler_unknown", "--lr_scheduler cosine_annealing", ["--lr_scheduler", "cosine_annealing"],
      "invalid choice"),
    T("overwrite_and_resume", "--overwrite_output_dir with --resume_from_checkpoint",
      ["--overwrite_output_dir", "--resume_from_checkpoint", "latest"], "cannot --resume_from_checkpoint"),
    # train_dp_sapf.py: data, masks, folders
    T("batch_above_n", "--train_batch_size 41 for N = 40", ["--train_batch_size", "41"], "exceeds the dataset size",
      deep=True),
    T("mask_missing", "--saliency_mask that does not exist", ["--saliency_mask", "{work}/no-such-mask.json"],
      "does not exist", deep=True),
    T("mask_not_json", "a mask that is not JSON", ["--saliency_mask", "{masks}/not_json.json"], "is not a mask JSON",
      deep=True),
    T("mask_nan", "a mask with NaN in it", ["--saliency_mask", "{masks}/nan.json"], "NaN is not JSON", deep=True),
    T("mask_other_model", "a mask of another model", ["--saliency_mask", "{masks}/other_model.json"],
      "made for another model", deep=True),
    T("mask_other_n", "a mask of another N (--max_train_samples 30)", ["--max_train_samples", "30"],
      "computed on N = 40 images but training data has N = 30", deep=True),
    T("mask_without_scorer", "a mask without its 'scorer'", ["--saliency_mask", "{masks}/no_scorer.json"],
      "field 'scorer' is missing", deep=True),
    T("mask_extra_field", "a mask with an extra field", ["--saliency_mask", "{masks}/extra_field.json"],
      "field 'comment' is not a mask field", deep=True),
    T("mask_mistyped_field", "a mask whose select_ratio is a string", ["--saliency_mask", "{masks}/mistyped.json"],
      "field 'select_ratio'", deep=True),
    T("mask_claims_free", "a grad_norm mask without privacy.noise_multiplier (once read as free)",
      ["--saliency_mask", "{masks}/no_sigma.json"], "field 'privacy.noise_multiplier' is missing", deep=True),
    T("mask_none_mechanism", "a grad_norm mask whose mechanism says 'none'",
      ["--saliency_mask", "{masks}/none_mechanism.json"], "field 'privacy.mechanism'", deep=True),
    T("mask_epsilon_null", "an exponential mask with privacy.epsilon null",
      ["--saliency_mask", "{masks}/epsilon_null.json"], "field 'privacy.epsilon'", deep=True),
    T("mask_old_version", "a mask of another format_version", ["--saliency_mask", "{masks}/old_version.json"],
      "field 'format_version'", deep=True),
    T("mask_sigma_s_absurd", "a mask whose σ_s is 1e-200, trained at a given σ (no finite ε)",
      ["--saliency_mask", "{masks}/sigma_s_tiny.json", "--noise_multiplier", "1"], "gives no finite ε", deep=True),
    T("mask_sigma_s_absurd_target", "a mask whose σ_s is 1e-200, with a target ε",
      ["--saliency_mask", "{masks}/sigma_s_tiny.json"], "selection alone spends ε = inf", deep=True),
    T("sigma_absurd", "--noise_multiplier 1e-200 (no finite ε)", ["--noise_multiplier", "1e-200"],
      "gives no finite ε", deep=True),
    T("gradient_accumulation", "--gradient_accumulation_steps 4 (diffusers' flag)", ["--gradient_accumulation_steps", "4"],
      "--max_physical_batch_size"),
    T("caption_column", "--caption_column text (per-image captions are private)", ["--caption_column", "text"],
      "captions are private data"),
    T("tracker_in_private_run", "--report_to wandb in a private run (logs the non-private loss)",
      ["--report_to", "wandb"], "--log_nonprivate_metrics"),
    T("warmup_dropped_without_warmup", "--warmup_dropped frozen without --lora_target warmup_select",
      ["--warmup_dropped", "frozen"], "--warmup_dropped belong to --lora_target warmup_select"),
    T("mask_from_warmup", "a warm-up selection's mask reused by another run",
      ["--saliency_mask", "{masks}/warmup.json"], "warmup_select", deep=True),
    T("finished_run", "--output_dir that holds a finished run", ["--output_dir", "{run}"],
      "already holds a finished run", deep=True),
    T("output_dir_is_file", "--output_dir that is a file", ["--output_dir", "{a_file}"], "is a file", deep=True),
    T("checkpoint_other_flags", "resuming a checkpoint with another --max_grad_norm",
      ["--output_dir", "{killed}", "--resume_from_checkpoint", "latest", "--max_train_steps", "2", "--max_grad_norm",
       "0.5"],
      "the privacy parameter 'max_grad_norm' changed", deep=True),
    T("checkpoint_other_rank", "resuming a checkpoint with another --rank",
      ["--output_dir", "{killed}", "--resume_from_checkpoint", "latest", "--max_train_steps", "2", "--rank", "8"],
      "holds other trainable tensors", deep=True),
    T("checkpoint_missing", "--resume_from_checkpoint that is no checkpoint",
      ["--resume_from_checkpoint", "{work}/no-such-checkpoint"], "is not a checkpoint folder", deep=True),
    T("dropout_dit", "a DiT whose config has dropout 0.1",
      ["--pretrained_model_name_or_path", "{dit_dropout}"], "has dropout", deep=True, mask=False),
    # sample.py
    P("guidance_nan", "--guidance_scale nan", ["--guidance_scale", "nan"],
      "--guidance_scale must be a finite number >= 0"),
    P("guidance_inf", "--guidance_scale inf", ["--guidance_scale", "inf"],
      "--guidance_scale must be a finite number >= 0"),
    P("lora_scale_inf", "--lora_scale inf", ["--lora_scale", "inf"], "--lora_scale must be a finite number"),
    P("inference_steps_zero", "--num_inference_steps 0", ["--num_inference_steps", "0"],
      "--num_inference_steps must be an integer >= 1"),
    P("images_zero", "--num_images_per_class 0", ["--num_images_per_class", "0"],
      "--num_images_per_class must be an integer >= 1"),
    P("batch_zero", "--batch_size 0", ["--batch_size", "0"], "--batch_size must be an integer >= 1"),
    P("output_resolution_negative", "--output_resolution -1", ["--output_resolution", "-1"],
      "--output_resolution must be an integer >= 1"),
    P("seed_negative", "--seed -3", ["--seed", "-3"], "--seed must be in [0, 4294967295]"),
    P("resolution_not_rendered", "--resolution 36 (not a multiple of 8)", ["--resolution", "36"],
      "renders multiples of 8 px only", deep=True),
    P("lora_missing", "--lora_path that does not exist", ["--lora_path", "{work}/no-such-run"], "does not exist",
      deep=True),
    P("lora_other_base", "a LoRA trained on another base model (the committed public model loads it)",
      ["--pretrained_model_name_or_path", "{public_model}"], "was trained on another base model", deep=True),
    P("lora_failed_run", "--lora_path of a run that failed", ["--lora_path", "{failed}"],
      "is not a finished training run", deep=True),
    # evaluate.py
    E("synthetic_missing", "--synthetic_dir that does not exist", ["--synthetic_dir", "{work}/no-such-folder"],
      "is not a folder", deep=True),
    E("val_fraction_above_one", "--synthetic_val_fraction 1.5", ["--synthetic_val_fraction", "1.5"],
      "--synthetic_val_fraction must be in (0, 1)"),
    E("val_fraction_nan", "--synthetic_val_fraction nan", ["--synthetic_val_fraction", "nan"],
      "--synthetic_val_fraction must be in (0, 1)"),
    E("epochs_zero", "--epochs 0", ["--epochs", "0"], "--epochs must be an integer >= 1"),
    E("classifier_lr_nan", "--classifier_lr nan", ["--classifier_lr", "nan"],
      "--classifier_lr must be a finite number > 0"),
    E("classifier_batch_zero", "--classifier_batch_size 0", ["--classifier_batch_size", "0"],
      "--classifier_batch_size must be an integer >= 1"),
    E("classifier_depth_invalid", "--classifier_depth 12 (a WRN is 6n + 4)", ["--classifier_depth", "12"],
      "a WRN's depth is 6n + 4"),
    E("fid_max_real_one", "--fid_max_real 1", ["--fid_max_real", "1"], "--fid_max_real must be an integer >= 2"),
    E("classifier_resolution_zero", "--classifier_resolution 0", ["--classifier_resolution", "0"],
      "--classifier_resolution must be an integer >= 8"),
    E("synthetic_empty_class", "a synthetic class folder without images", ["--synthetic_dir", "{syn_empty}"],
      "holds no images", deep=True),
    E("synthetic_corrupt_image", "a corrupt synthetic image", ["--synthetic_dir", "{syn_corrupt}"],
      "Unreadable synthetic image", deep=True),
    E("synthetic_unknown_class", "a synthetic class folder outside the class list", ["--synthetic_dir", "{syn_unknown}"],
      "match no real class", deep=True),
    E("synthetic_bad_index", "a corrupt metadata.jsonl and no class flags", ["--synthetic_dir", "{syn_bad_index}"],
      "is not a sample.py index row", deep=True, prompts=False),
    # experiments/ and the modules' command lines
    M("overlap_repeats_zero", "experiments/scorer_overlap.py", "--repeats 0", ["--repeats", "0"],
      "--repeats must be an integer >= 1"),
    M("overlap_sigma_inf", "experiments/scorer_overlap.py", "--selection_noise_multiplier inf",
      ["--selection_noise_multiplier", "inf"], "--selection_noise_multiplier must be a finite number > 0"),
    M("overlap_model_missing", "experiments/scorer_overlap.py", "--public_model that does not exist",
      ["--public_model", "{work}/no-such-model"], "is not a diffusers pipeline folder"),
    M("privacy_sigma_s_inf", "-m dp_sapf.privacy", "--selection_noise_multiplier inf",
      [*PRIVACY, "--target_epsilon", "3", "--selection_noise_multiplier", "inf"],
      "--selection_noise_multiplier must be a finite number > 0"),
    M("privacy_sigma_s_with_exponential", "-m dp_sapf.privacy", "--selection_noise_multiplier with exponential",
      [*PRIVACY, "--target_epsilon", "3", "--selection_mechanism", "exponential", "--selection_epsilon", "1",
       "--selection_noise_multiplier", "5"], "does not use it"),
    M("privacy_dataset_zero", "-m dp_sapf.privacy", "--dataset_size 0",
      ["--dataset_size", "0", "--target_epsilon", "3"], "--dataset_size must be an integer >= 1"),
    M("prepare_data_zero", "-m dp_sapf.prepare_data", "--max_per_class 0",
      ["--name", "fashion_mnist", "--output_dir", "{out}", "--max_per_class", "0"],
      "--max_per_class must be an integer >= 1"),
    M("audit_sigma_nan", "-m dp_sapf.audit", "--noise_multiplier nan",
      ["--pretrained_model_name_or_path", "{model}", "--noise_multiplier", "nan"],
      "--noise_multiplier must be a finite number > 0"),
    # private_evolution.py (the PE baseline) and the comparison's tools
    M("pe_iterations_zero", "private_evolution.py", "--iterations 0", [*PE, "--target_epsilon", "5", "--iterations", "0"],
      "--iterations must be an integer >= 1"),
    M("pe_strength_above_one", "private_evolution.py", "--strength_start 1.5",
      [*PE, "--target_epsilon", "5", "--strength_start", "1.5"], "--strength_start must be in (0, 1]"),
    M("pe_epsilon_inf", "private_evolution.py", "--target_epsilon inf (PE has no non-private mode)",
      [*PE, "--target_epsilon", "inf"], "no non-private mode"),
    M("pe_sigma_nan", "private_evolution.py", "--noise_multiplier nan", [*PE, "--noise_multiplier", "nan"],
      "--noise_multiplier must be a finite number > 0"),
    M("pe_threshold_inf", "private_evolution.py", "--count_threshold inf",
      [*PE, "--target_epsilon", "5", "--count_threshold", "inf"], "--count_threshold must be a finite number"),
    M("pe_sigma_absurd", "private_evolution.py", "--noise_multiplier 1e-200 (no finite ε)",
      [*PE, "--noise_multiplier", "1e-200"], "gives no finite ε", deep=True),
    M("pe_two_budgets", "private_evolution.py", "both --target_epsilon and --noise_multiplier",
      [*PE, "--target_epsilon", "5", "--noise_multiplier", "2"], "exactly one of --target_epsilon or --noise_multiplier"),
    # dp_mepf.py (the DP-MEPF baseline)
    M("mepf_count_weight_one", "dp_mepf.py", "--count_weight 1 (no room left for the features)",
      [*MEPF, "--target_epsilon", "5", "--count_weight", "1"], "--count_weight must be in (0, 1)"),
    M("mepf_feature_resolution_small", "dp_mepf.py", "--feature_resolution 32 (below the Inception's minimum)",
      [*MEPF, "--target_epsilon", "5", "--feature_resolution", "32"], "--feature_resolution must be an integer >= 75"),
    M("mepf_epsilon_inf", "dp_mepf.py", "--target_epsilon inf (DP-MEPF has no non-private mode)",
      [*MEPF, "--target_epsilon", "inf"], "no non-private mode"),
    M("mepf_two_budgets", "dp_mepf.py", "both --target_epsilon and --noise_multiplier",
      [*MEPF, "--target_epsilon", "5", "--noise_multiplier", "2"], "exactly one of --target_epsilon or --noise_multiplier"),
    M("mepf_batch_below_classes", "dp_mepf.py", "--batch_size 5 with 10 classes",
      [*MEPF, "--target_epsilon", "5", "--batch_size", "5"], "smaller than the 10 classes"),
    M("mepf_sigma_absurd", "dp_mepf.py", "--noise_multiplier 1e-200 (no finite ε)",
      [*MEPF, "--noise_multiplier", "1e-200"], "gives no finite ε", deep=True),
    M("compare_epsilon_nan", "experiments/compare.py", "--epsilons nan", ["plan", "--epsilons", "nan"],
      "--epsilons must be a finite number > 0"),
    M("compare_pe_strength_zero", "experiments/compare.py", "--pe_strength_end 0", ["plan", "--pe_strength_end", "0"],
      "--pe_strength_end must be in (0, 1]"),
    M("roundtrip_psnr_zero", "experiments/vae_roundtrip.py", "--psnr_images 0",
      ["--pretrained_model_name_or_path", "{model}", "--train_data_dir", "{data}", "--class_prompts", "fashion_mnist",
       "--output_dir", "{out}", "--psnr_images", "0"], "--psnr_images must be an integer >= 1"),
]


assert len({c.id for c in CASES}) == len(CASES), "case ids must be unique"


@dataclasses.dataclass
class World:
    """The inputs every case reads: the tiny model, the data, a mask, a finished run and the broken variants."""

    model: str
    data: str
    work: str
    mask: str = ""
    run: str = ""
    killed: str = ""
    failed: str = ""
    masks: str = ""
    synthetic: str = ""
    syn_empty: str = ""
    syn_corrupt: str = ""
    syn_unknown: str = ""
    syn_bad_index: str = ""
    data_corrupt: str = ""
    data_truncated: str = ""
    data_empty: str = ""
    data_unicorn: str = ""
    dit_dropout: str = ""
    sd_dropout: str = ""
    a_file: str = ""
    public_model: str = os.path.join(REPO, "models", "tiny-sd-public")
    out: str = ""


def _copy_data(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


@pytest.fixture(scope="module")
def world(tiny_pipeline_dir, fashion_data_dir, tiny_backbone_dirs, tmp_path_factory):
    from PIL import Image

    from test_draws import with_dropout

    work = tmp_path_factory.mktemp("reliability")
    w = World(model=tiny_pipeline_dir, data=fashion_data_dir, work=str(work))
    w.mask = str(work / "mask.json")
    res = run_script("select_salient.py", select_args(w.model, w.data, w.mask, "--dp_seed", "0"))
    assert res.returncode == 0, res.stderr[-3000:]
    w.run = str(work / "run")
    res = run_script("train_dp_sapf.py", train_args(w.model, w.data, w.run, "--saliency_mask", w.mask, "--target_epsilon",
                                                    "8", "--max_train_steps", "2", "--checkpointing_steps", "1"))
    assert res.returncode == 0, res.stderr[-3000:]
    w.killed = str(work / "killed")  # a run killed after step 1: only its checkpoint is there
    stopped = str(work / "stopped")
    res = run_script("train_dp_sapf.py", train_args(w.model, w.data, stopped, "--saliency_mask", w.mask,
                                                    "--target_epsilon", "8", "--max_train_steps", "2",
                                                    "--checkpointing_steps", "1", "--stop_after_steps", "1"))
    assert res.returncode == 0, res.stderr[-3000:]
    shutil.copytree(os.path.join(stopped, "checkpoint-1"), os.path.join(w.killed, "checkpoint-1"))
    w.failed = str(work / "failed")
    shutil.copytree(w.run, w.failed)
    json.dump({"status": "failed", "error": "RuntimeError: killed"}, open(os.path.join(w.failed, "run_status.json"), "w"))

    mask = json.load(open(w.mask))
    w.masks = str(work / "masks")
    os.makedirs(w.masks)

    def variant(name, edit):
        record = json.loads(json.dumps(mask))
        edit(record)
        with open(os.path.join(w.masks, f"{name}.json"), "w") as f:
            json.dump(record, f, indent=2)

    (work / "masks" / "not_json.json").write_text("{target_modules: oops")
    variant("other_model", lambda m: m.update(candidate_fingerprint="0" * 64,
                                              candidates={k: [v[0] * 2, v[1]] for k, v in m["candidates"].items()}))
    variant("no_scorer", lambda m: m.pop("scorer"))
    variant("extra_field", lambda m: m.update(comment="hand-edited"))
    variant("mistyped", lambda m: m.update(select_ratio="0.3"))
    variant("no_sigma", lambda m: m["privacy"].pop("noise_multiplier"))
    variant("none_mechanism", lambda m: m["privacy"].update(mechanism="none"))
    variant("old_version", lambda m: m.update(format_version=0))
    variant("sigma_s_tiny", lambda m: m["privacy"].update(noise_multiplier=1e-200))
    variant("warmup", lambda m: m.update(scorer="dp_sgd_debiased", privacy={
        "mechanism": "dp_sgd_postprocessing", "warmup_steps": 2, "noise_multiplier": 1.0, "max_grad_norm": 1.0,
        "sample_rate": 0.2, "dataset_size": 40, "neighbouring": "add/remove", "note": "..."}))
    variant("epsilon_null", lambda m: m.update(scores={}, ranking=list(m["target_modules"]), privacy={
        "mechanism": "exponential", "max_grad_norm": 1.0, "dataset_size": 40, "neighbouring": "add/remove",
        "noise_multiplier": None, "epsilon": None, "score_sensitivity": 0.025, "num_picks": 20, "rdp": "..."}))
    text = json.dumps(mask).replace('"noise_std": 0.125', '"noise_std": NaN')
    assert "NaN" in text
    (work / "masks" / "nan.json").write_text(text)

    w.data_corrupt = _copy_data(w.data, work / "data_corrupt")
    (work / "data_corrupt" / "train" / "coat" / "99999.png").write_bytes(b"not an image")
    w.data_truncated = _copy_data(w.data, work / "data_truncated")
    coat = work / "data_truncated" / "train" / "coat"
    png = (coat / sorted(os.listdir(coat))[0]).read_bytes()
    (coat / "99998.png").write_bytes(png[: len(png) // 2])
    w.data_empty = str(work / "data_empty")
    for c in ("coat", "bag"):
        os.makedirs(os.path.join(w.data_empty, "train", c))
    w.data_unicorn = _copy_data(w.data, work / "data_unicorn")
    os.makedirs(work / "data_unicorn" / "train" / "unicorn")
    shutil.copy(coat / sorted(os.listdir(coat))[0], work / "data_unicorn" / "train" / "unicorn" / "0.png")

    classes = list(json.load(open(os.path.join(w.data, "dataset_info.json")))["class_names"])
    w.synthetic = str(work / "synthetic")
    for c in classes:
        os.makedirs(os.path.join(w.synthetic, c))
        for k, name in enumerate(sorted(os.listdir(os.path.join(w.data, "train", c)))[:2]):
            shutil.copy(os.path.join(w.data, "train", c, name), os.path.join(w.synthetic, c, f"{k:05d}.png"))
    w.syn_empty = _copy_data(w.synthetic, work / "syn_empty")
    shutil.rmtree(work / "syn_empty" / "bag")
    os.makedirs(work / "syn_empty" / "bag")
    w.syn_corrupt = _copy_data(w.synthetic, work / "syn_corrupt")
    (work / "syn_corrupt" / "bag" / "00009.png").write_bytes(b"\x89PNG broken")
    w.syn_unknown = _copy_data(w.synthetic, work / "syn_unknown")
    os.makedirs(work / "syn_unknown" / "unicorn")
    Image.new("L", (28, 28)).save(work / "syn_unknown" / "unicorn" / "00000.png")
    w.syn_bad_index = _copy_data(w.synthetic, work / "syn_bad_index")
    (work / "syn_bad_index" / "metadata.jsonl").write_text('{"file_name": "bag/00000.png", "label": "x"\n')

    w.dit_dropout = with_dropout(tiny_backbone_dirs("tiny-dit"), work / "dit_dropout")
    w.sd_dropout = with_dropout(w.model, work / "sd_dropout")
    w.a_file = str(work / "a_file.txt")
    (work / "a_file.txt").write_text("not a folder")
    return w


def snapshot(*roots) -> dict:
    """Every file under the roots: its size and content hash (what 'nothing written or changed' compares)."""
    state = {}
    for root in roots:
        for folder, dirs, files in os.walk(root):
            dirs.sort()
            state[folder] = "dir"
            for name in files:
                path = os.path.join(folder, name)
                with open(path, "rb") as f:
                    state[path] = hashlib.sha1(f.read()).hexdigest()
    return state


def run_in_process(script: str, argv: list[str]) -> tuple[int, str]:
    """The script's entry point, `run_cli(main, argv)`, in this process: (exit status, stderr)."""
    from dp_sapf.cli import run_cli

    if script.startswith("-m "):
        module, prog = script[3:], f"python -m {script[3:]}"
    else:
        module, prog = script.removesuffix(".py").replace("/", "."), os.path.basename(script)
    main = importlib.import_module(module).main
    err, argv0 = io.StringIO(), sys.argv[0]
    sys.argv[0] = prog
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                run_cli(main, argv)
                code = 0
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else 1
    finally:
        sys.argv[0] = argv0
    return code, err.getvalue()


def run_subprocess(script: str, argv: list[str]) -> tuple[int, str]:
    res = run_module(script[3:], argv, timeout=600) if script.startswith("-m ") else run_script(script, argv, timeout=600)
    return res.returncode, res.stderr


RESULTS: dict[str, str] = {}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_error_line_exit_2_and_writes_nothing(world, case, tmp_path):
    w = dataclasses.replace(world, out=str(tmp_path / "out"))
    roots = [w.work, w.model, w.data, str(tmp_path)]
    before = snapshot(*roots)
    code, stderr = (run_subprocess if case.deep else run_in_process)(case.script, case.args(w))
    lines = stderr.strip().splitlines()
    assert code == 2, (code, stderr[-3000:])
    assert lines and lines[-1].startswith("error: "), stderr[-3000:]
    assert case.expect in lines[-1], (case.expect, lines[-1])
    assert "Traceback" not in stderr and not any(line.startswith("  --") for line in lines), stderr[-3000:]
    assert snapshot(*roots) == before, "the refused run wrote or changed files"
    RESULTS[case.id] = normalise(lines[-1], w)


def normalise(line: str, w: World) -> str:
    """The error line with this machine's folders named as the doc names them."""
    for path, name in sorted([(w.out, "OUT"), (w.work, "WORK"), (w.model, "MODEL"), (w.data, "DATA"),
                              (w.public_model, "models/tiny-sd-public")], key=lambda p: -len(p[0])):
        line = line.replace(path, name)
    return line


def render_doc() -> str:
    rows = [f"| {i} | `{'python ' if c.script.startswith('-m ') else ''}{c.script}` | {c.what} | "
            f"{RESULTS[c.id].replace('|', '/')} |" for i, c in enumerate(CASES, 1)]
    return "\n".join([
        "# Reliability: what each bad input gets",
        "",
        "Generated by `tests/test_reliability.py` (`UPDATE_RELIABILITY_DOC=1 python -m pytest -q "
        "tests/test_reliability.py`); do not edit by hand. Each of these inputs ends the script with exit status 2 "
        "and this one `error:` line, last (argument errors print one `usage: SCRIPT [flags]; see SCRIPT --help` line "
        "before it), with no traceback, and writes or changes nothing: the test compares every file of the inputs "
        "and of the output location before and after. MODEL is the embedded tiny pipeline, DATA 40 real "
        "Fashion-MNIST images, WORK the folder holding the mask, the finished run (`WORK/run`), a run killed after "
        "its first checkpoint (`WORK/killed`) and the broken variants.",
        "",
        "Every output a script writes (mask, privacy report, card, LoRA, metrics, synthetic images and their index, "
        "run status, timings) is written to a temporary file beside it and renamed into place "
        "(`dp_sapf/atomic.py`): a kill -9 at any moment leaves the old file or the new one; the same test file kills "
        "the writers of the mask and of the privacy report at random moments and reads what is left. Every JSON is "
        "strict (no NaN or Infinity): a non-private run's `epsilon` is `null`.",
        "",
        f"{len(CASES)} cases:",
        "",
        "| # | script | bad input | error line (exit status 2) |",
        "|---|---|---|---|",
        *rows,
        "",
    ])


def test_docs_reliability_is_generated_from_this_table():
    if set(RESULTS) != {c.id for c in CASES}:
        pytest.skip("only part of the table ran (-k / -x): the doc is compared after a full run of this file")
    text = render_doc()
    if os.environ.get("UPDATE_RELIABILITY_DOC"):
        with open(DOC, "w", encoding="utf-8") as f:
            f.write(text)
    assert os.path.isfile(DOC) and open(DOC, encoding="utf-8").read() == text, (
        "docs/reliability.md is out of date: UPDATE_RELIABILITY_DOC=1 python -m pytest -q tests/test_reliability.py")


# ------------------------------------------------------------------------- crash safety of the writers

WRITER = r"""
import json, sys
sys.path.insert(0, {repo!r})
from dp_sapf import run_folder, saliency
kind, path, old, new = sys.argv[1:]
records = [json.load(open(old)), json.load(open(new))]
print("ready", flush=True)
i = 0
while True:  # write the two versions in turn until killed
    record = records[i % 2]
    if kind == "mask":
        saliency.write_mask(record, path)
    else:
        run_folder.write_json(*path.rsplit("/", 1), record)
    i += 1
"""


@pytest.mark.parametrize("kind", ["mask", "report"])
def test_kill_9_while_writing_leaves_the_old_or_the_new_file(world, tmp_path, kind):
    """Issue #23: a kill -9 at any moment of a write leaves a file a later step may trust (old or new version),
    never a truncated one. The records are made large (thousands of entries) so that a write takes a while."""
    import random

    mask = json.load(open(world.mask))
    if kind == "mask":
        big = dict(mask, scores={f"{m}.x{i}": 0.5 for i in range(4000) for m in mask["target_modules"][:2]})
        versions = [dict(big, seed=1), dict(big, seed=2)]
        read = saliency_read
    else:
        report = json.load(open(os.path.join(world.run, "privacy_report.json")))
        big = dict(report, class_prompts=[f"An image of thing {i}" for i in range(60000)])
        versions = [dict(big, steps=1), dict(big, steps=2)]
        read = report_read
    files = []
    for i, record in enumerate(versions):
        files.append(str(tmp_path / f"v{i}.json"))
        json.dump(record, open(files[-1], "w"))
    target = str(tmp_path / ("mask.json" if kind == "mask" else "privacy_report.json"))
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(repo=REPO))
    rng = random.Random(0)
    seen = set()
    for attempt in range(8):
        proc = subprocess.Popen([sys.executable, str(script), kind, target, *files], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.3 + rng.random() * 1.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if not os.path.exists(target):
            continue  # killed before the first rename: no file at all, which nothing trusts
        record = read(target)  # raises on a truncated file
        assert record in versions
        seen.add(versions.index(record))
    assert seen, "no write finished before the kills: make the delay longer"


def saliency_read(path):
    from dp_sapf import saliency

    return saliency.read_mask(path)


def report_read(path):
    from dp_sapf import run_folder

    return run_folder.read_training_report(os.path.dirname(path))
