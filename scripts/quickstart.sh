#!/usr/bin/env bash
# The README's main job: install, then select -> train -> sample -> evaluate on the embedded default
# (offline tiny Stable Diffusion pipeline + 1,000 real Fashion-MNIST images), all on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${SKIP_INSTALL:-0}" = 1 ] || bash scripts/install.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=${PYTHON:-python3}
RUN=${RUN_DIR:-runs/quickstart}
MODEL=${MODEL:-$RUN/tiny-sd}
mkdir -p "$RUN"
start=$EPOCHREALTIME; last=$start; current=""; : > "$RUN/timings.tsv"
stage() {  # print the stage banner and record the wall time of the one that just ended
  now=$EPOCHREALTIME
  [ -z "$current" ] || awk -v n="$current" -v a="$last" -v b="$now" 'BEGIN{printf "%s\t%.1f\n", n, b - a}' >> "$RUN/timings.tsv"
  current=$1; last=$now
  echo; echo "== $1 ($(awk -v a="$start" -v b="$now" 'BEGIN{printf "%.0f", b - a}') s)"
}

stage "embedded default model"
[ -f "$MODEL/model_index.json" ] || $PY -m dp_sapf.tiny_pipeline --output_dir "$MODEL"
stage "real data: Fashion-MNIST, 100 train / 50 test images per class"
$PY -m dp_sapf.prepare_data --name fashion_mnist --output_dir "$RUN/data" --max_per_class 100 --test_max_per_class 50
stage "1. DP saliency selection (sigma_s = 5)"
$PY select_salient.py --pretrained_model_name_or_path "$MODEL" --train_data_dir "$RUN/data" --resolution 32 \
  --class_prompts fashion_mnist --select_ratio 0.3 --selection_noise_multiplier 5 --output "$RUN/mask.json"
stage "2. DP-SGD LoRA training, calibrated to epsilon = 10 (selection included)"
$PY train_dp_sapf.py --pretrained_model_name_or_path "$MODEL" --train_data_dir "$RUN/data" --resolution 32 \
  --class_prompts fashion_mnist --saliency_mask "$RUN/mask.json" --target_epsilon 10 --train_batch_size 250 \
  --max_physical_batch_size 125 --max_train_steps 40 --learning_rate 5e-3 --validation_inference_steps 10 \
  --report_to none --output_dir "$RUN/lora"
stage "3. sampling a labelled synthetic dataset"
$PY sample.py --pretrained_model_name_or_path "$MODEL" --lora_path "$RUN/lora" --num_images_per_class 30 \
  --num_inference_steps 10 --batch_size 50 --output_resolution 28 --output_dir "$RUN/synthetic"
stage "4. evaluation: FID (real Inception) and downstream accuracy"
$PY evaluate.py --synthetic_dir "$RUN/synthetic" --train_data_dir "$RUN/data" --epochs 3 --classifier_depth 10 \
  --classifier_width 1 --cache_dir "$RUN/cache" --output_dir "$RUN/eval"
stage "done"
$PY - "$RUN" <<'PYEOF'
import json, sys
run = sys.argv[1]
r = json.load(open(f"{run}/lora/privacy_report.json"))
m = json.load(open(f"{run}/eval/metrics.json"))
s = r["budget_split"]
print(f"epsilon = {r['epsilon']:.3f} at delta = {r['delta']:.2g} (selection alone {s['epsilon_selection_only']:.3f}, "
      f"training alone {s['epsilon_training_only']:.3f}, selection share {s['selection_share']:.1%})")
print("metrics:", json.dumps({k: v for k, v in m.items() if k.startswith(("fid", "accuracy", "real_reference"))}))
stages = {name: float(sec) for name, sec in (line.rstrip("\n").split("\t") for line in open(f"{run}/timings.tsv"))}
json.dump({"stages_s": stages, "total_s": sum(stages.values())}, open(f"{run}/timings.json", "w"), indent=2)
print(f"wall time {sum(stages.values()):.0f} s: " + ", ".join(f"{k.split(':')[0]} {v:.0f} s" for k, v in stages.items()))
PYEOF
echo "Results in $RUN (lora/, synthetic/preview.png, eval/metrics.md)"
