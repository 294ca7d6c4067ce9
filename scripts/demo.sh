#!/usr/bin/env bash
# The demo: the whole method on this machine in minutes (no GPU, no download, no internet needed).
# Sets up .venv if needed (with scikit-learn, whose bundled handwritten digits are the data), then runs the
# default sweep: SimCLR pretraining of a tiny ResNet on the digits (once; kept in runs/base/), FARE
# fine-tuning for alpha in {0, 0.1, 1}, a results table and REPORT.md. Extra arguments go to
# launch/sweep.py, e.g. bash scripts/demo.sh --grid lr=1e-3,3e-3
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export WANDB_MODE=${WANDB_MODE:-offline}
if [ $# -eq 0 ]; then set -- --grid alpha=0,0.1,1; fi
# the default job (jobs/demo.toml) names its pretraining (model.pretrain): the sweep runs it first, once, when
# the base encoder phi_org (runs/base/demo_pretrain/encoder.pt) is missing
exec .venv/bin/python launch/sweep.py --cluster "${ADVFT_DEMO_CLUSTER:-local}" --wait "$@"
