#!/usr/bin/env bash
# Install what tests/test_browser.py needs: Debian's chromium and the playwright Python package.
# Playwright drives the system browser (/usr/bin/chromium), so `playwright install`, which downloads
# browser builds of its own, is never run.
set -euo pipefail

if ! command -v chromium >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
  fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium fonts-dejavu-core
fi
python -m pip install --quiet "playwright==1.65.3"
chromium --version
