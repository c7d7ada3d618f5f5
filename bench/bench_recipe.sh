#!/usr/bin/env bash
# What the DP recipe's knobs cost, measured on the script a user runs (train_dp_sapf.py, the embedded public model,
# Fashion-MNIST at 32 px, DP-LoRA on all attention, ε = 10): steady DP-SGD samples/s (after the first step) at the
# expected batch B = 500 and B = N = 10,000 (q = 1), and noise multiplicity K = 1 and 8 at B = 500, all in one run
# so that their ratios share the machine's state. Rows go to bench/results/recipe.json and print as a table.
#   bash bench/bench_recipe.sh [OUT]            # THREADS=1 by default (a background job may hold the other core)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/bench_recipe}; THREADS=${THREADS:-1}; STEPS=${STEPS:-3}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONPATH=$PWD OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
PY=${PYTHON:-python3}
mkdir -p "$OUT" bench/results
[ -f "$OUT/data/dataset_info.json" ] || $PY -m dp_sapf.prepare_data --name fashion_mnist --output_dir "$OUT/data" \
  --max_per_class 1000 --test_max_per_class 1
for row in "500 1" "500 8" "10000 1"; do
  read -r batch k <<< "$row"
  echo "== B = $batch, K = $k"
  $PY train_dp_sapf.py --pretrained_model_name_or_path models/tiny-sd-public --train_data_dir "$OUT/data" \
    --resolution 32 --class_prompts fashion_mnist --lora_target all_attention --target_epsilon 10 \
    --train_batch_size "$batch" --max_physical_batch_size 250 --max_train_steps "$STEPS" --noise_multiplicity "$k" \
    --validation_inference_steps 2 --num_validation_images 1 --report_to none --latent_cache_dir "$OUT/latents" \
    --output_dir "$OUT/b${batch}_k${k}" --overwrite_output_dir > "$OUT/b${batch}_k${k}.log" 2>&1
done
$PY - "$OUT" <<'PYEOF'
import json, os, platform, sys
out = sys.argv[1]
rows = []
for batch, k in ((500, 1), (500, 8), (10000, 1)):
    t = json.load(open(os.path.join(out, f"b{batch}_k{k}", "run_status.json")))["timings"]
    rows.append({"expected_batch": batch, "noise_multiplicity": k, "samples_per_s": t["steady_samples_per_s"],
                 "unet_rows_per_s": t["steady_samples_per_s"] * k})
base = rows[0]["samples_per_s"]
for r in rows:
    r["ratio_to_b500_k1"] = round(r["samples_per_s"] / base, 3)
record = {"rows": rows, "threads": int(os.environ.get("OMP_NUM_THREADS", 0)), "device": f"CPU ({platform.machine()}, {os.cpu_count()} cores)",
          "command": "bash bench/bench_recipe.sh"}
json.dump(record, open("bench/results/recipe.json", "w"), indent=2)
print("| B | K | samples/s | UNet rows/s | samples/s vs B = 500, K = 1 |\n|---|---|---|---|---|")
for r in rows:
    print(f"| {r['expected_batch']} | {r['noise_multiplicity']} | {r['samples_per_s']:.1f} | {r['unet_rows_per_s']:.1f} | {r['ratio_to_b500_k1']:.2f} |")
PYEOF
