#!/usr/bin/env bash
# One check of a GPU machine, written as JSON (benchmarks/gpu_check.py does the work; --help lists the
# options): the CUDA tests, the FARE step's images/s, TFLOP/s and MFU, the loaders' images/s. Target: at
# most 8 minutes. Every part has its own time limit inside; this outer limit (the total plus a grace)
# stops the whole check if something hangs outside a part.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"
elif [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"
else PY=python3
fi
total=480
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    --total) total="${args[i + 1]:-$total}" ;;
    --total=*) total="${args[i]#--total=}" ;;
  esac
done
[[ "$total" =~ ^[0-9]+([.][0-9]+)?$ ]] || { echo "gpu_check.sh: --total must be seconds, got '$total'" >&2; exit 2; }
exec timeout --kill-after=15 "$(( ${total%.*} + 60 ))" "$PY" "$ROOT/benchmarks/gpu_check.py" "$@"  # --out is relative to here
