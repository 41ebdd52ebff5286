#!/usr/bin/env bash
# Headless Chromium for the dump viewer's browser test (tests/test_dump_analysis.py).
# Idempotent: does nothing when a chromium is already on PATH. Debian/Ubuntu (apt) only;
# needs root (or sudo). The test skips, saying why, when no browser is installed.
set -euo pipefail

for name in chromium chromium-browser google-chrome; do
    if command -v "$name" >/dev/null 2>&1; then
        echo "install_browser: $name already installed ($(command -v "$name"))"
        exit 0
    fi
done

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_browser: no apt-get here; install chromium with your package manager (the browser test skips without it)" >&2
    exit 1
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
$SUDO apt-get install -y --no-install-recommends chromium
command -v chromium
