#!/usr/bin/env bash
# The README's test command: install what the tests need, then run them offline on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
${PYTHON:-python3} -m pytest -q tests "$@"
