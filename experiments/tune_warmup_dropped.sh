#!/usr/bin/env bash
# What the warm-up selection (free_selection) does with the warm-up LoRA of the matrices it drops, chosen on PUBLIC
# data only: reset (removed: the release adapts the kept matrices only) against frozen (kept at its value after the
# W warm-up steps, no longer trained), both through the comparison's own protocol (experiments/compare.py --scale
# cpu_r2: B = 1,000, T = 100, W = 10, 1,000 released images, WRN-10-1 for 20 epochs, FID) on the public stand-in
# MNIST-5k (4,000 train digits, 1,000 test digits) at ε = 10, seed 0. No Fashion-MNIST image is read. Rule, fixed
# before either ran: the higher WRN accuracy wins; a difference under 0.01 is a tie, broken by FID (lower wins,
# a difference under 1 a tie); a full tie keeps reset, the variant the comparison ran first.
# Result (records in results/warmup_dropped_public/): reset 0.874 (FID 24.6), frozen 0.886 (FID 25.7): frozen wins by
# 0.012 and is the default (train_dp_sapf.py --warmup_dropped) and compare.py's free_selection; free_selection_reset
# is the other. (The two runs were made under the names free_selection and free_selection_frozen.)
#   bash experiments/tune_warmup_dropped.sh
# Records go to results/warmup_dropped_public/; run folders to ~/.cache/dp-sapf/warmup_dropped/ (resumable).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${DP_SAPF_CACHE:-$HOME/.cache/dp-sapf}/warmup_dropped
OUT=results/warmup_dropped_public
mkdir -p "$WORK"
python3 experiments/compare.py run --scale cpu_r2 --dataset mnist5k --methods free_selection_reset free_selection \
  --epsilons 10 --seeds 0 --work_dir "$WORK" --results_dir "$OUT" --results_md "$WORK/results.md"
python3 - "$OUT" <<'PYEOF'
import json, sys
r = {m: json.load(open(f"{sys.argv[1]}/{m}_eps10_seed0.json"))["metrics"] for m in ("free_selection_reset", "free_selection")}
(reset, frozen) = (r["free_selection_reset"], r["free_selection"])
for name, m in (("reset", reset), ("frozen", frozen)):
    print(f"{name:7} WRN accuracy {m['accuracy_wrn']:.3f}, FID {m['fid_train']:.1f}")
gap = frozen["accuracy_wrn"] - reset["accuracy_wrn"]
fid_gap = frozen["fid_train"] - reset["fid_train"]
winner = ("frozen" if gap > 0 else "reset") if abs(gap) >= 0.01 else \
         ("frozen" if fid_gap < 0 else "reset") if abs(fid_gap) >= 1 else "reset (tie)"
print(f"kept: {winner}")
PYEOF
