#!/usr/bin/env bash
# How the quick start's training hyperparameters were chosen: each candidate "STEPS LR BATCH" reruns
# scripts/quickstart.sh with VALIDATION=1, whose "test" split is 50 held-out Fashion-MNIST *training* images per class
# (dp_sapf.prepare_data --validation_per_class): no real test image is read. One JSON record per candidate goes to
# results/quickstart_tuning/ (validation accuracy, FID against the training images, ε, wall time per stage).
#   bash experiments/tune_quickstart.sh                       # the default candidates
#   bash experiments/tune_quickstart.sh "60 1e-2 250" "40 2e-2 250"
# A fourth number sets the train images per class (PER_CLASS, default 100): "50 2e-2 750 300".
# Runs live in ~/.cache/dp-sapf/tune_quickstart/ (outside the work tree); a finished candidate is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${DP_SAPF_CACHE:-$HOME/.cache/dp-sapf}/tune_quickstart
OUT=results/quickstart_tuning
mkdir -p "$WORK" "$OUT"
[ $# -gt 0 ] || set -- "40 1e-2 250" "60 1e-2 250" "60 2e-2 250"
for candidate in "$@"; do
  read -r steps lr batch per_class <<< "$candidate"
  per_class=${per_class:-100}
  name="steps${steps}_lr${lr}_batch${batch}"
  [ "$per_class" = 100 ] || name="${name}_n$((per_class * 10))"
  [ -f "$OUT/$name.json" ] && { echo "== $name: done"; continue; }
  echo "== $name"
  SKIP_INSTALL=1 VALIDATION=1 STEPS=$steps LR=$lr BATCH=$batch PER_CLASS=$per_class RUN_DIR="$WORK/$name" bash scripts/quickstart.sh \
    > "$WORK/$name.log" 2>&1 || { echo "error: candidate $name failed; see $WORK/$name.log" >&2; exit 1; }
  python3 - "$WORK/$name" "$OUT/$name.json" "$steps" "$lr" "$batch" "$per_class" <<'PYEOF'
import json, sys
run, out, steps, lr, batch, per_class = sys.argv[1:7]
dp, base = json.load(open(f"{run}/eval/metrics.json")), json.load(open(f"{run}/eval_baseline/metrics.json"))
report, timings = json.load(open(f"{run}/lora/privacy_report.json")), json.load(open(f"{run}/timings.json"))
rec = {"steps": int(steps), "learning_rate": float(lr), "batch": int(batch), "train_images": 10 * int(per_class),
       "epsilon": report["epsilon"],
       "noise_multiplier": report.get("noise_multiplier"), "evaluated_on": "50 held-out training images per class",
       "validation_accuracy_wrn": dp["accuracy_wrn"], "public_model_alone_validation_accuracy_wrn": base["accuracy_wrn"],
       "real_reference_validation_accuracy_wrn": dp["real_reference_accuracy_wrn"], "fid_train": dp["fid_train"],
       "wall_s": timings}
json.dump(rec, open(out, "w"), indent=2)
print(json.dumps({k: rec[k] for k in ("validation_accuracy_wrn", "fid_train", "epsilon")}), timings["total_s"], "s")
PYEOF
done
