#!/usr/bin/env bash
# Start or resume the public model's pretraining in the background (hours on 2 CPU cores), state outside the work
# tree so that a new session (or a killed one) continues from the last checkpoint (every 5 min):
#   bash experiments/pretrain_background.sh            # THREADS=1 leaves a core free for tests
#   tail -f ~/.cache/dp-sapf/pretrain.log
# The corpus is built first if it is missing. When it finishes, models/tiny-sd-public and docs/public_model_*.png
# are written (in the work tree it was started from).
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${DP_SAPF_CACHE:-$HOME/.cache/dp-sapf}
PY=${PYTHON:-python3}
mkdir -p "$CACHE"
if pgrep -f "experiments/pretrain_public.py" >/dev/null; then
  echo "error: a pretraining job is already running (pgrep -af pretrain_public.py)" >&2; exit 2
fi
if [ ! -f "$CACHE/corpus/metadata.jsonl" ]; then
  $PY -m dp_sapf.prepare_data --name public_corpus --output_dir "$CACHE/corpus" --grid docs/public_corpus_grid.png --datasheet docs/public_corpus.md \
    >> "$CACHE/corpus_build.log" 2>&1
fi
RESUME=()
[ -f "$CACHE/pretrain/checkpoint.pt" ] && RESUME=(--resume)
nohup $PY experiments/pretrain_public.py --corpus_dir "$CACHE/corpus" --work_dir "$CACHE/pretrain" \
  --output_dir models/tiny-sd-public --threads "${THREADS:-2}" "${RESUME[@]}" "$@" >> "$CACHE/pretrain.log" 2>&1 &
echo "pretraining started (pid $!, ${RESUME[*]:-fresh}); log: $CACHE/pretrain.log"
