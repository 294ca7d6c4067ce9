#!/usr/bin/env bash
# Install the optional extras into the project's virtual environment: the fast loaders FFCV 1.0.2 and NVIDIA
# DALI, and AutoAttack's reference implementation (pyautoattack, for eval.final_attack = "autoattack").
# Idempotent: what already imports is left alone, so a second run does nothing.
#
# Usage: bash scripts/install_extras.sh            (uses .venv/bin/python)
#        PYTHON=/path/to/venv/bin/python bash scripts/install_extras.sh
# Environment: FFCV_SPEC (default ffcv==1.0.2), DALI_SPEC (default nvidia-dali-cuda120==2.4.0),
# AUTOATTACK_SPEC (default pyautoattack==0.2.0; a pure-Python wheel).
#
# FFCV is an sdist (its last release is from 2023): pip compiles its C extension against OpenCV and
# libjpeg-turbo, found with pkg-config, so those come from apt first (~700 MB; needs root or sudo).
# It then pulls numba, llvmlite and opencv-python from PyPI and builds with numpy 2.
# DALI is a wheel (~425 MB); the CUDA 12 build imports and runs CPU pipelines on machines without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
FFCV_SPEC=${FFCV_SPEC:-ffcv==1.0.2}
DALI_SPEC=${DALI_SPEC:-nvidia-dali-cuda120==2.4.0}
AUTOATTACK_SPEC=${AUTOATTACK_SPEC:-pyautoattack==0.2.0}
APT_PACKAGES=(pkg-config libopencv-dev libturbojpeg0-dev)
say() { echo "[install_extras] $*" >&2; }

if [ ! -x "$PY" ]; then
  say "no python at $PY; create the environment first (bash scripts/setup.sh) or set PYTHON"
  exit 1
fi
imports() { "$PY" -c "import $1" >/dev/null 2>&1; }

install_apt_packages() {
  local missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null; then sudo="sudo"; else
      say "FFCV needs the apt packages ${missing[*]}; install them as root: apt-get install -y ${missing[*]}"
      exit 1
    fi
  fi
  if ! command -v apt-get >/dev/null; then
    say "no apt-get here; install the equivalents of ${missing[*]} (OpenCV and libjpeg-turbo headers, pkg-config)"
    exit 1
  fi
  say "installing apt packages: ${missing[*]}"
  # Fresh containers ship without package lists.
  if [ -z "$(ls -A /var/lib/apt/lists 2>/dev/null | grep -v -e '^lock$' -e '^partial$' -e '^auxfiles$')" ]; then
    $sudo apt-get update -qq
  fi
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || { $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }
}

installed=0
if imports "ffcv.loader"; then
  say "FFCV already importable; skipped"
else
  installed=1
  install_apt_packages
  say "pip install $FFCV_SPEC (compiles its C extension)"
  "$PY" -m pip install -q "$FFCV_SPEC"
fi

if imports "nvidia.dali.plugin.pytorch"; then
  say "DALI already importable; skipped"
else
  installed=1
  say "pip install $DALI_SPEC"
  "$PY" -m pip install -q "$DALI_SPEC"
fi

if imports "pyautoattack"; then
  say "pyautoattack already importable; skipped"
else
  installed=1
  say "pip install $AUTOATTACK_SPEC"
  "$PY" -m pip install -q "$AUTOATTACK_SPEC"
fi

[ "$installed" = 1 ] || exit 0
# The real check after installing: both import, from the same interpreter the project uses.
"$PY" - <<'EOF'
import importlib.metadata as md
import ffcv.loader  # noqa: F401
import nvidia.dali
import nvidia.dali.plugin.pytorch  # noqa: F401
import pyautoattack  # noqa: F401
print(f"[install_extras] ok: ffcv {md.version('ffcv')}, nvidia-dali {nvidia.dali.__version__}, "
      f"pyautoattack {md.version('pyautoattack')}")
EOF
