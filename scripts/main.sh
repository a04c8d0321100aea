#!/usr/bin/env bash
# The main job: the controlled MNIST-1D comparison (cnn vs moe vs parameter-matched cnn, 4 seeds)
# end to end, from a fresh clone. Prints where report.md and curves.png are.
# Extra arguments are Hydra overrides, e.g. `bash scripts/main.sh hydra/launcher=joblib`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup_env.sh
export WANDB_MODE="${WANDB_MODE:-offline}" WANDB_SILENT=true MPLBACKEND=Agg
exec .venv/bin/python -m moe_lab.train -m experiment=mnist1d "$@"
