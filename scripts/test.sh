#!/usr/bin/env bash
# Set up .venv (if needed) and run the test suite. Extra arguments go to pytest,
# e.g. `bash scripts/test.sh -m "not slow"` or `bash scripts/test.sh tests/test_layers.py`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup_env.sh
export WANDB_MODE=offline WANDB_SILENT=true MPLBACKEND=Agg
.venv/bin/python -m ruff check src tests scripts
.venv/bin/python -m pytest "$@"
