#!/usr/bin/env bash
# The test command: sets everything up (venv, FFCV/DALI, a local SLURM cluster) and runs the whole suite.
# Usage: bash scripts/test.sh [pytest args...]      e.g. bash scripts/test.sh -k attacks
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --extras
if ! command -v shellcheck >/dev/null; then  # the sbatch scripts are linted by the tests
  echo "[test] installing shellcheck" >&2
  (apt-get install -y -qq shellcheck >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq shellcheck >/dev/null; })
fi
started_slurm=0
if [ "${ADVFT_SKIP_SLURM:-0}" != "1" ]; then
  # the local two-node cluster the SLURM tests need (tests/test_sbatch.py runs a job over both nodes); one
  # already running is left running afterwards (`up --nodes 2` reconfigures it if it has another node count)
  if bash slurm/local-cluster.sh status >/dev/null 2>&1; then
    echo "[test] local SLURM cluster already running" >&2
    bash slurm/local-cluster.sh up --nodes 2 >/dev/null \
      || echo "[test] could not make the running SLURM cluster two nodes (SLURM tests will fail)" >&2
  elif bash slurm/local-cluster.sh up --nodes 2 >/dev/null; then
    started_slurm=1
  else
    echo "[test] local SLURM cluster failed to start (SLURM tests will fail under ADVFT_REQUIRE_SLURM=1)" >&2
  fi
  env_file=${ADVFT_SLURM_STATE:-/var/lib/advft-slurm}/env.sh
  if [ -f "$env_file" ]; then . "$env_file"; export SLURM_CONF; fi
fi
cleanup() { if [ "$started_slurm" = 1 ]; then bash slurm/local-cluster.sh down || true; fi; }
trap cleanup EXIT
export WANDB_MODE=disabled
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ $rc -eq 5 ]; then echo "[test] pytest collected no tests: failing" >&2; exit 1; fi
exit $rc
