#!/usr/bin/env bash
# Install promptkd's dependencies into the current Python environment.
# Used by the README, .ci/run and the Dockerfile, so all three install the same way.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -r requirements.txt
python -m pip install --no-deps -r requirements-offline.txt
