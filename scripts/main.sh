#!/usr/bin/env bash
# The main job: the equal-budget comparison on MNIST-1D, end to end from a fresh clone. Each arm
# (cnn, its MoE twin, and both matched baselines: the cnn widened to the MoE's FLOPs per example
# and to its parameter count) gets the same 8 Optuna trials of 10 epochs on the validation split
# (learning rate, weight decay, dropout), then its best configuration is re-run with 3 fresh seeds
# that score the test set once, paired across arms. The budget is sized to take about 10 minutes
# on 2 CPU cores, set-up included; the preset's own budget
# (`python -m moe_lab.compare experiment=mnist1d`: 16 trials of 20 epochs, 4 seeds) takes about
# four times as long. Prints where the report is.
# Extra arguments are overrides and win over the budget here, e.g. `bash scripts/main.sh
# compare.trials=16`; continue a killed run with the same arguments plus
# `resume=outputs/compare/mnist1d/<time>_<id>`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup_env.sh
export WANDB_MODE="${WANDB_MODE:-offline}" WANDB_SILENT=true MPLBACKEND=Agg
status=0
.venv/bin/python -m moe_lab.compare experiment=mnist1d compare.trials=8 compare.seeds=3 \
    trainer.max_epochs=10 "$@" || status=$?
report="$(ls -t outputs/compare/mnist1d/*/report.md 2>/dev/null | head -n 1 || true)"
if [[ -n "$report" ]]; then
    echo "main job: report in $root/$report (figures and tables beside it)"
fi
exit "$status"
