#!/usr/bin/env bash
# Where do the comparison's DP rows lose what non-private LoRA gains? DP-SAPF's ε = 10 run (seed 0) of the CPU-scale
# comparison, replayed with its mask, data and recipe (B = 500, T = 100, lr 2e-2, rank 4), changing one thing each:
#   clip_only   per-sample clipping to C = 1 and Poisson sampling as in DP-SGD, but σ = 0.001 (no privacy to speak of)
#   nodp_mask   no clipping, no noise, on the same 13 matrices
# Against the records dp_sapf_eps10_seed0 (clipping + noise, σ = 0.498) and nonprivate_lora_seed0 (no DP, all 42
# attention matrices), these split the gap into noise, clipping and the mask. Diagnostics only: nothing is chosen from
# them, so they are scored exactly as the table's rows (1,000 samples, WRN-10-1 for 20 epochs, the real test split).
#   bash experiments/dp_gap_probe.sh     # after `experiments/compare.py run --scale cpu` has run dp_sapf_eps10_seed0
# Resumable; work in ~/.cache/dp-sapf/diag; records in results/compare_cpu/diagnostics/.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=${PYTHON:-python3}
CACHE=${DP_SAPF_CACHE:-$HOME/.cache/dp-sapf}
C=$CACHE/compare_cpu
D=$CACHE/diag
OUT=results/compare_cpu/diagnostics
[ -f "$C/dp_sapf_eps10_seed0/mask.json" ] || { echo "error: run the comparison's dp_sapf_eps10_seed0 first" >&2; exit 2; }
mkdir -p "$D" "$OUT"
COMMON=(--pretrained_model_name_or_path models/tiny-sd-public --train_data_dir "$C/data" --resolution 32
  --class_prompts fashion_mnist --seed 0 --saliency_mask "$C/dp_sapf_eps10_seed0/mask.json" --train_batch_size 500
  --max_physical_batch_size 250 --max_train_steps 100 --learning_rate 0.02 --rank 4 --checkpointing_steps 20
  --checkpoints_total_limit 1 --resume_from_checkpoint latest --validation_inference_steps 25 --report_to none
  --mixed_precision no)
for probe in clip_only nodp_mask; do
  [ -f "$OUT/$probe.json" ] && { echo "== $probe: done"; continue; }
  echo "== $probe"
  case $probe in
    clip_only) FLAGS=(--noise_multiplier 0.001) ;;
    nodp_mask) FLAGS=(--no_dp) ;;
  esac
  mkdir -p "$D/$probe"
  [ -f "$D/$probe/model/pytorch_lora_weights.safetensors" ] || $PY train_dp_sapf.py "${COMMON[@]}" "${FLAGS[@]}" \
    --output_dir "$D/$probe/model" > "$D/$probe.log" 2>&1
  [ -f "$D/$probe/synthetic/metadata.jsonl" ] || $PY sample.py --pretrained_model_name_or_path models/tiny-sd-public \
    --lora_path "$D/$probe/model" --class_prompts fashion_mnist --num_images 1000 --num_inference_steps 25 \
    --guidance_scale 3 --resolution 32 --output_resolution 28 --batch_size 250 --seed 0 --mixed_precision no \
    --output_dir "$D/$probe/synthetic"
  [ -f "$D/$probe/eval/metrics.json" ] || $PY evaluate.py --synthetic_dir "$D/$probe/synthetic" \
    --train_data_dir "$C/data" --class_prompts fashion_mnist --classifier wrn --epochs 20 --classifier_depth 10 \
    --classifier_width 1 --fid_max_real 10000 --skip_real_reference --seed 0 --cache_dir "$C/fid_cache" \
    --output_dir "$D/$probe/eval"
  $PY - "$D/$probe" "$OUT/$probe.json" "$probe" <<'PYEOF'
import json, re, sys
folder, out, probe = sys.argv[1:4]
metrics = json.load(open(f"{folder}/eval/metrics.json"))
log = open(f"{folder}.log").read().replace("\r", "\n")
loss = {int(step): float(value) for step, value in re.findall(r" (\d+)/100 \[.*?loss=([0-9.]+)", log)}  # last per step
last = [loss[s] for s in sorted(loss)][-20:]
rec = {"probe": probe, "metrics": {k: v for k, v in metrics.items() if k.startswith(("fid", "accuracy"))},
       "mean_batch_loss_last_20_steps": sum(last) / len(last) if last else None}
json.dump(rec, open(out, "w"), indent=2)
print(json.dumps(rec))
PYEOF
done
