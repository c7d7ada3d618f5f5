#!/usr/bin/env bash
# Does guidance narrow the samples? The mask bar's LoRA (public_model_bars.sh, lora_mask_full_cpu) sampled at several
# classifier-free guidance scales, each sample set scored by the bar's classifier (WRN-10-1, 10 epochs) on held-out
# *training* images (100 per class, from dp_sapf.prepare_data --validation_per_class): no real test image is read.
#   bash experiments/tune_guidance.sh            # scales 1 1.5 2 3 5, 100 samples per class each
#   SCALES="2 4" PER_CLASS=50 bash experiments/tune_guidance.sh
# Rule fixed before any result: the highest validation accuracy; differences under 0.01 are ties, broken towards the
# bars' guidance 3. Runs live in ~/.cache/dp-sapf/public_bars/guidance (resumable); records in
# results/public_model/guidance_tuning/.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=${PYTHON:-python3}
MODEL=${MODEL:-models/tiny-sd-public}
BARS=${DP_SAPF_CACHE:-$HOME/.cache/dp-sapf}/public_bars
WORK=$BARS/guidance
LORA=${LORA:-$BARS/lora_mask_full_cpu/model}
OUT=results/public_model/guidance_tuning
SCALES=${SCALES:-1 1.5 2 3 5}
PER_CLASS=${PER_CLASS:-100}
[ -f "$LORA/pytorch_lora_weights.safetensors" ] || { echo "error: no LoRA at $LORA (run BARS=lora_mask_full_cpu bash experiments/public_model_bars.sh)" >&2; exit 2; }
mkdir -p "$WORK" "$OUT"
# train/ (10 per class) is only there because evaluate.py reads a dataset folder; test/ = the next 100 training
# images per class, the validation split
[ -f "$WORK/validation/dataset_info.json" ] || $PY -m dp_sapf.prepare_data --name fashion_mnist --max_per_class 10 \
  --validation_per_class 100 --output_dir "$WORK/validation"
for g in $SCALES; do
  D="$WORK/g$g"
  [ -f "$OUT/guidance_$g.json" ] && { echo "== guidance $g: done"; continue; }
  echo "== guidance $g"
  [ -f "$D/synthetic/metadata.jsonl" ] || $PY sample.py --pretrained_model_name_or_path "$MODEL" --lora_path "$LORA" \
    --num_images_per_class "$PER_CLASS" --num_inference_steps 25 --guidance_scale "$g" --resolution 32 \
    --output_resolution 28 --batch_size 250 --output_dir "$D/synthetic"
  [ -f "$D/eval/metrics.json" ] || $PY evaluate.py --synthetic_dir "$D/synthetic" --train_data_dir "$WORK/validation" \
    --class_prompts fashion_mnist --classifier_depth 10 --classifier_width 1 --epochs 10 --skip_fid \
    --skip_real_reference --output_dir "$D/eval"
  $PY - "$D/eval/metrics.json" "$OUT/guidance_$g.json" "$g" "$PER_CLASS" "$LORA" <<'PYEOF'
import json, os, sys
metrics, out, g, per_class, lora = sys.argv[1:6]
m = json.load(open(metrics))
rec = {"guidance_scale": float(g), "samples_per_class": int(per_class), "lora": lora.replace(os.path.expanduser("~"), "~"),
       "evaluated_on": "100 held-out training images per class (prepare_data --validation_per_class 100)",
       "validation_accuracy_wrn": m["accuracy_wrn"], "classifier_settings": m.get("classifier_settings")}
json.dump(rec, open(out, "w"), indent=2)
print(json.dumps({"guidance": rec["guidance_scale"], "validation_accuracy_wrn": rec["validation_accuracy_wrn"]}))
PYEOF
done
