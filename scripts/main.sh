#!/usr/bin/env bash
# The main job: the equal-budget comparison on MNIST-1D, end to end from a fresh clone. Each arm
# (cnn, its MoE twin, the cnn widened to the MoE's parameter count) gets the same 16 Optuna trials
# of 20 epochs on the validation split (learning rate, weight decay, dropout), then its best
# configuration is re-run with 4 fresh seeds that score the test set once. About 10 minutes on 2
# CPU cores, set-up included. Prints where the report is.
# Extra arguments are overrides, e.g. `bash scripts/main.sh compare.trials=24`; continue a killed
# run with `bash scripts/main.sh resume=outputs/compare/mnist1d/<time>_<id>`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup_env.sh
export WANDB_MODE="${WANDB_MODE:-offline}" WANDB_SILENT=true MPLBACKEND=Agg
status=0
.venv/bin/python -m moe_lab.compare experiment=mnist1d "$@" || status=$?
report="$(ls -t outputs/compare/mnist1d/*/report.md 2>/dev/null | head -n 1 || true)"
if [[ -n "$report" ]]; then
    echo "main job: report in $root/$report (figures and tables beside it)"
fi
exit "$status"
