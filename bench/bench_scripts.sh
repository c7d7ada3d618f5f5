#!/usr/bin/env bash
# Benchmark what a user runs: the real scripts through `accelerate launch` (evaluate.py, CPU-only, as a plain call),
# next to bench_step.py's rows for the same UNet, batch and precision, measured in one run. Each script records its
# own timings (run_status.json, <mask>.timings.json, the synthetic and eval folders' timings.json);
# bench/scripts_report.py turns them into a table in docs/benchmarks.md with the script/benchmark ratios and the paper recipe projected from script-level figures.
#
#   bash bench/bench_scripts.sh                        # GPU: SD-v1.5's architecture (random weights), 256 px, bf16
#   ARCH=sd3-medium bash bench/bench_scripts.sh        # GPU: SD3-medium's MMDiT (no T5), 256 px, bf16
#   ARCH=dit-xl bash bench/bench_scripts.sh            # GPU: DiT-XL/2 (its native 256 px only), bf16
#   ARCH=tiny RES=32 N=200 B=100 PHYS=50 STEPS=4 MP=no bash bench/bench_scripts.sh runs/bench_tiny   # CPU smoke run
#   ARCH=tiny MODEL=models/tiny-sd-public RES=32 N=1000 B=250 PHYS=125 STEPS=5 MP=no SAMPLES=375 VARIANTS="nodp dp" \
#     bash bench/bench_scripts.sh runs/bench_public                    # CPU: the embedded public model, quick-start shapes
#
# Settings (environment): ARCH sd15|tiny|sd3-medium|dit-xl|tiny-sd3|tiny-dit, MODEL an existing pipeline folder of that
# architecture (default: built at random init in OUT/model), RES resolution, N images, B expected batch, PHYS micro-batch,
# STEPS logical steps per training row, MP mixed precision, SAMPLES images sampled, THREADS CPU threads per process
# (default: all cores), VARIANTS the training rows
# (default "nodp dp nodp_compile dp_compile"; without a *_compile one, bench_step.py skips its compiled rows too),
# MARKDOWN output file.
set -euo pipefail
cd "$(dirname "$0")/.."
ARCH=${ARCH:-sd15}; RES=${RES:-256}; N=${N:-2000}; B=${B:-1024}; PHYS=${PHYS:-64}; STEPS=${STEPS:-8}
MP=${MP:-bf16}; SAMPLES=${SAMPLES:-512}; MARKDOWN=${MARKDOWN-docs/benchmarks.md}  # MARKDOWN="" writes none
OUT=${1:-runs/bench_scripts_$ARCH}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONPATH=$PWD
PY=${PYTHON:-python3}
# every core for the one process: without --num_cpu_threads_per_process, accelerate gives a CPU process 1 thread
LAUNCH="$PY -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision $MP --dynamo_backend no \
 --num_cpu_threads_per_process ${THREADS:-$(nproc)}"
mkdir -p "$OUT"
MODEL=${MODEL:-$OUT/model}
[ -f "$MODEL/model_index.json" ] || $PY -m dp_sapf.tiny_pipeline --architecture "$ARCH" --output_dir "$MODEL"
[ -f "$OUT/data/dataset_info.json" ] || $PY -m dp_sapf.prepare_data --name fashion_mnist --output_dir "$OUT/data" \
  --max_per_class $((N / 10)) --test_max_per_class 1
COMMON=(--pretrained_model_name_or_path "$MODEL" --train_data_dir "$OUT/data" --resolution "$RES"
        --class_prompts fashion_mnist --mixed_precision "$MP")

echo "== select_salient.py"
$LAUNCH select_salient.py "${COMMON[@]}" --selection_batch_size "$PHYS" --output "$OUT/mask.json"
VARIANTS=${VARIANTS:-nodp dp nodp_compile dp_compile}
for variant in $VARIANTS; do
  echo "== train_dp_sapf.py ($variant)"
  flags=(--saliency_mask "$OUT/mask.json")
  case $variant in nodp*) flags+=(--no_dp) ;; *) flags+=(--noise_multiplier 1.0) ;; esac
  case $variant in *compile) flags+=(--compile) ;; esac
  rm -rf "$OUT/train_$variant"
  $LAUNCH train_dp_sapf.py "${COMMON[@]}" "${flags[@]}" --train_batch_size "$B" --max_physical_batch_size "$PHYS" \
    --max_train_steps "$STEPS" --checkpointing_steps 1000000 --validation_inference_steps 2 --report_to none \
    --output_dir "$OUT/train_$variant"
done
echo "== sample.py"
rm -rf "$OUT/synthetic"
$LAUNCH sample.py --pretrained_model_name_or_path "$MODEL" --lora_path "$OUT/train_dp" --num_images "$SAMPLES" \
  --batch_size "$PHYS" --num_inference_steps 10 --resolution "$RES" --mixed_precision "$MP" --output_dir "$OUT/synthetic"
echo "== evaluate.py (Inception features of the synthetic images, then a WRN-10-1 trained on them)"
rm -rf "$OUT/eval"
$PY evaluate.py --synthetic_dir "$OUT/synthetic" --train_data_dir "$OUT/data" --class_prompts fashion_mnist \
  --fid_max_real "$SAMPLES" --cache_dir "$OUT/fid_cache" --classifier_depth 10 --classifier_width 1 --epochs 2 \
  --skip_real_reference --allow_size_mismatch --output_dir "$OUT/eval"
echo "== bench_step.py (same UNet, batch, precision)"
latent=$((RES / 8)); case $ARCH in tiny*) latent=$((RES / 4)) ;; esac
$LAUNCH bench/bench_step.py --model "$ARCH" --pretrained_model_name_or_path "$MODEL" --batch_size "$PHYS" \
  --latent_size "$latent" --mixed_precision "$MP" $(case $VARIANTS in *compile*) echo --compile ;; esac) \
  --eval_rows --output_json "$OUT/bench_step.json" --markdown ""
$PY bench/scripts_report.py "$OUT" --markdown "$MARKDOWN"
