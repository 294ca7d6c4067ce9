#!/usr/bin/env bash
# Set up (or refresh) the project's virtual environment in .venv. Idempotent: a second run with nothing
# changed does no work. Usage: bash scripts/setup.sh [--extras]   (--extras adds FFCV and DALI)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON_BIN:-python3}
VENV=${VENV:-.venv}
say() { echo "[setup] $*" >&2; }

if ! command -v "$PY" >/dev/null; then
  say "python3 not found; installing it with apt-get"
  apt-get update -qq && apt-get install -y -qq python3 python3-venv python3-pip >/dev/null
fi
if [ ! -x "$VENV/bin/python" ]; then
  if ! "$PY" -m venv "$VENV" 2>/dev/null; then
    say "python3-venv missing; installing it with apt-get"
    apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
    "$PY" -m venv "$VENV"
  fi
  say "created $VENV"
fi
VPY="$VENV/bin/python"
stamp="$VENV/.advft-installed"
want=$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "installing torch and the project into $VENV (first time: several minutes)"
  "$VPY" -m pip install -q --upgrade pip
  # torch 2.14.1 / torchvision 0.29.1 are the versions this project is tested with (served locally here)
  "$VPY" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
  "$VPY" -m pip install -q -e ".[dev,report,demo]"
  echo "$want" > "$stamp"
else
  say "$VENV is up to date"
fi
if [ "${1:-}" = "--extras" ]; then
  PYTHON="$VPY" bash scripts/install_extras.sh
fi
