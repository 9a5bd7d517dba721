#!/usr/bin/env bash
# Install promptkd's dependencies into the current Python environment.
# Used by the README, .ci/run and the Dockerfile, so all three install the same way.
#
# TORCH_INDEX_URL (optional) names a PyTorch wheel index, for example
# https://download.pytorch.org/whl/cpu or https://download.pytorch.org/whl/cu128. When it is set, the torch
# version pinned in requirements.txt is installed from that index first, and the next step finds that
# version already installed. Unset, pip picks torch from its configured indexes.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -n "${TORCH_INDEX_URL:-}" ]; then
  torch_pin="$(grep -E '^torch==' requirements.txt | cut -d' ' -f1 || true)"
  if [ -z "$torch_pin" ]; then
    echo "error: requirements.txt has no 'torch==VERSION' line, so TORCH_INDEX_URL=$TORCH_INDEX_URL has no version to install." >&2
    exit 1
  fi
  python -m pip install "$torch_pin" --index-url "$TORCH_INDEX_URL"
fi
python -m pip install -r requirements.txt
python -m pip install --no-deps -r requirements-offline.txt
