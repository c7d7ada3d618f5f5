#!/usr/bin/env bash
# CPU benchmark of the embedded default: wall time of each stage of the README's quick start (no install),
# appended to docs/benchmarks.md with the machine, versions and date. Usage: bash bench/bench_quickstart.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN_DIR:-runs/bench-quickstart}
rm -rf "$RUN"
SKIP_INSTALL=1 RUN_DIR="$RUN" bash scripts/quickstart.sh
python3 - "$RUN" <<'PYEOF'
import datetime, json, os, platform, sys
import diffusers, torch
run = sys.argv[1]
t = json.load(open(f"{run}/timings.json"))
lines = [f"\n## Quick start, stage by stage: {platform.machine()} CPU, {os.cpu_count()} cores ({datetime.date.today()})\n",
         f"{datetime.date.today()}; torch {torch.__version__}, diffusers {diffusers.__version__}; "
         "`bash bench/bench_quickstart.sh` (a fresh run folder: Inception features of the real set computed, not cached)\n",
         "| stage | wall time (s) |", "|---|---|"]
lines += [f"| {k} | {v:.0f} |" for k, v in t["stages_s"].items()]
lines += [f"| **total** | **{t['total_s']:.0f}** |"]
os.makedirs("bench/results", exist_ok=True)
json.dump(t, open("bench/results/quickstart_cpu.json", "w"), indent=2)
open("docs/benchmarks.md", "a").write("\n".join(lines) + "\n")
print("\n".join(lines))
# the README's side-by-side previews, rows labelled with the class names
from PIL import Image
sys.path.insert(0, "experiments")
from results_report import labelled_panels
from dp_sapf.data import resolve_classes
panels = [("public model alone", Image.open(f"{run}/baseline/preview.png").convert("RGB")),
          ("DP-SAPF fine-tune, ε = 10", Image.open(f"{run}/synthetic/preview.png").convert("RGB"))]
print("previews:", labelled_panels(panels, resolve_classes("fashion_mnist")[0], "docs/quickstart_previews.png"))
PYEOF
