#!/usr/bin/env bash
# How the quick start's earlier settings were chosen (it now runs the comparison's recipe 2; docs/public_model.md
# tells the sequence), on PUBLIC data only: each candidate "STEPS LR BATCH CLIPPING K"
# [PER_CLASS]" reruns scripts/quickstart.sh with DATASET=mnist5k_as_fashion: 1,000 MNIST-5k train digits filed under the
# Fashion-MNIST class names and prompts (the public model draws clip art for those prompts, so a fine-tune must
# learn to redirect them), accuracy on 500 MNIST-5k test digits. No Fashion-MNIST image is read. One JSON record per
# candidate goes to results/quickstart_tuning_public/. PER_CLASS (default 100: N = 1,000) is the number of train
# images per class; MNIST-5k has 400. Rule, fixed before the first candidate ran: the highest
# accuracy wins; differences under 0.01 are ties, broken by FID, then by the shorter wall time.
#   bash experiments/tune_quickstart.sh                                    # the default candidates
#   bash experiments/tune_quickstart.sh "150 2e-2 250 automatic 1" "40 2e-2 250 automatic 4" "40 2e-2 1000 automatic 1 400"
# Runs live in ~/.cache/dp-sapf/tune_quickstart_public/ (outside the work tree); a finished candidate is skipped.
# The committed records ranked the selection by grad_norm (the quick start's scorer then); SCORER=grad_norm reruns
# them as they were, the default now being the quick start's grad_norm_debiased.
# STANDIN=mnist5k_inverted uses the second public stand-in instead (dark MNIST-5k digits on white under the digit
# prompts: prompts that mean what the images show, as Fashion-MNIST's do; the public model draws white digits on
# black); its records carry the prefix "inverted_". The same rule decides within each stand-in; the inverted one,
# added after the first stand-in could not separate accuracy (its prompt-to-digit map is arbitrary), decides.
# (Until 2026-12-04 the settings were chosen on held-out Fashion-MNIST *training* images, private data whose use
# the reported ε did not account; those records stay in results/quickstart_tuning/ for the record.)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${DP_SAPF_CACHE:-$HOME/.cache/dp-sapf}/tune_quickstart_public
STANDIN=${STANDIN:-mnist5k_as_fashion}
PREFIX=""; [ "$STANDIN" = mnist5k_as_fashion ] || PREFIX="${STANDIN#mnist5k_}_"
OUT=results/quickstart_tuning_public
mkdir -p "$WORK" "$OUT"
[ $# -gt 0 ] || set -- "150 2e-2 250 flat 1" "150 2e-2 250 automatic 1" "40 2e-2 250 automatic 4" "40 2e-2 1000 automatic 1 400"
for candidate in "$@"; do
  read -r steps lr batch clipping k per_class <<< "$candidate"
  per_class=${per_class:-100}
  name="${PREFIX}steps${steps}_lr${lr}_batch${batch}_${clipping}_k${k}"
  [ "$per_class" = 100 ] || name="${name}_n$((per_class * 10))"
  [ -f "$OUT/$name.json" ] && { echo "== $name: done"; continue; }
  echo "== $name"
  SKIP_INSTALL=1 DATASET=$STANDIN PER_CLASS=$per_class SELECTION_RATE=1 STEPS=$steps LR=$lr BATCH=$batch CLIPPING=$clipping K=$k \
    RUN_DIR="$WORK/$name" bash scripts/quickstart.sh > "$WORK/$name.log" 2>&1 \
    || { echo "error: candidate $name failed; see $WORK/$name.log" >&2; exit 1; }
  python3 - "$WORK/$name" "$OUT/$name.json" "$steps" "$lr" "$batch" "$clipping" "$k" "$per_class" "$STANDIN" <<'PYEOF'
import json, sys
run, out, steps, lr, batch, clipping, k, per_class, standin = sys.argv[1:10]
dp, base = json.load(open(f"{run}/eval/metrics.json")), json.load(open(f"{run}/eval_baseline/metrics.json"))
report, timings = json.load(open(f"{run}/lora/privacy_report.json")), json.load(open(f"{run}/timings.json"))
status = json.load(open(f"{run}/lora/run_status.json"))
rec = {"steps": int(steps), "learning_rate": float(lr), "batch": int(batch), "clipping": clipping,
       "noise_multiplicity": int(k), "train_images": 10 * int(per_class), "dataset": f"{standin} (public)",
       "epsilon": report["epsilon"], "noise_multiplier": report.get("noise_multiplier"),
       "evaluated_on": f"500 {standin} test digits (public)", "accuracy_wrn": dp["accuracy_wrn"],
       "public_model_alone_accuracy_wrn": base["accuracy_wrn"], "real_reference_accuracy_wrn": dp["real_reference_accuracy_wrn"],
       "fid_train": dp["fid_train"], "public_model_alone_fid_train": base["fid_train"],
       "train_samples_per_s": status.get("timings", {}).get("steady_samples_per_s"), "wall_s": timings}
json.dump(rec, open(out, "w"), indent=2)
print(json.dumps({k: rec[k] for k in ("accuracy_wrn", "public_model_alone_accuracy_wrn", "fid_train", "epsilon")}),
      timings["total_s"], "s")
PYEOF
  cp "$WORK/$name/synthetic/preview.png" "$OUT/${name}_preview.png"
done
