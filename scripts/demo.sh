#!/usr/bin/env bash
# The demo: the whole method on this machine in minutes (no GPU, no download, no internet needed).
# Sets up .venv if needed (with scikit-learn, whose bundled handwritten digits are the data), then runs the
# default sweep: SimCLR pretraining of a tiny ResNet on the digits (once; kept in runs/base/), FARE
# fine-tuning for alpha in {0, 0.1, 1}, a results table and REPORT.md. Extra arguments go to
# launch/sweep.py; a --grid among them replaces the default grid, e.g. bash scripts/demo.sh --grid lr=1e-3,3e-3
#   bash scripts/demo.sh losses   the loss comparison: fare, cosine (alpha 0 and 1), trades, deacl (their
#                                 default beta) on the same base encoder, in runs/demo_losses/
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export WANDB_MODE=${WANDB_MODE:-offline}
if [ "${1:-}" = losses ]; then
  shift
  set -- --name demo_losses --grid loss.name=fare,cosine,trades,deacl --grid alpha=0,1 "$@"
fi
case " $* " in
  *" --grid"*) ;;                          # the caller's grid replaces the default one
  *) set -- --grid alpha=0,0.1,1 "$@" ;;   # the default alpha grid, also under --dry-run, --set, ...
esac
# a slow or busy laptop may need more than the local profile's 10-minute limit per job (a hang guard for tests)
set -- --timeout-min "${ADVFT_DEMO_TIMEOUT_MIN:-120}" "$@"
# the default job (jobs/demo.toml) names its pretraining (model.pretrain): the sweep runs it first, once, when
# the base encoder phi_org (runs/base/demo_pretrain/encoder.pt) is missing
exec .venv/bin/python launch/sweep.py --cluster "${ADVFT_DEMO_CLUSTER:-local}" --wait "$@"
