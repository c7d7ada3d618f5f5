#!/usr/bin/env bash
# How PE's iterations and strength schedule were chosen, on public data only: PE at ε = 10 with compare.py's CPU
# scale (1,000 synthetic images, Inception votes) on the public MNIST-5k (4,000 private stand-in images), one run per
# candidate "ITERATIONS STRENGTH_START STRENGTH_END"; the threshold stays private_evolution.py's default 2σ.
# Shares experiments/tune_compare.sh's work folder (the MNIST-5k data and Inception features are computed once).
#   bash experiments/tune_pe.sh                       # the default candidates below
# Runs live in ~/.cache/dp-sapf/tune_compare (resumable); records in results/compare_tuning/pe_*/.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${DP_SAPF_CACHE:-$HOME/.cache/dp-sapf}/tune_compare
OUT=results/compare_tuning
[ $# -gt 0 ] || set -- "5 0.8 0.4" "3 0.8 0.4" "10 0.8 0.3"
mkdir -p "$WORK/fid_cache" "$OUT"
for candidate in "$@"; do
  read -r iterations start end <<< "$candidate"
  name="pe_t${iterations}_s${start}-${end}"
  mkdir -p "$WORK/$name"
  [ -e "$WORK/$name/fid_cache" ] || ln -s "$WORK/fid_cache" "$WORK/$name/fid_cache"
  python3 experiments/compare.py run --scale cpu --dataset mnist5k --seeds 0 --epsilons 10 --rho_sweep --methods pe \
    --pe_iterations "$iterations" --pe_strength_start "$start" --pe_strength_end "$end" \
    --work_dir "$WORK/$name" --data_dir "$WORK/data" --results_dir "$OUT/$name" --results_md "$OUT/$name.md"
done
python3 - "$OUT" <<'PYEOF'
import glob, json, os, sys
for path in sorted(glob.glob(os.path.join(sys.argv[1], "pe_*", "*.json"))):
    r = json.load(open(path))
    s = r["settings"]
    print(f"{os.path.basename(os.path.dirname(path)):>20}  T {s['pe_iterations']:<3} strength {s['pe_strength_start']}"
          f"->{s['pe_strength_end']}  WRN acc {r['metrics'].get('accuracy_wrn'):.3f}  FID {r['metrics'].get('fid_train'):.1f}")
PYEOF
