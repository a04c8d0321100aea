#!/usr/bin/env bash
# Set up .venv (if needed) and run the default (fast) test suite. Extra arguments go to pytest,
# e.g. `bash scripts/test.sh -m slow` (the long tests it leaves out; CI runs both) or
# `bash scripts/test.sh tests/test_layers.py`.
# The files are spread over MOE_LAB_TEST_WORKERS pytest-xdist workers (default 2, one per core of
# the 2-core CI machine; each test process uses one torch thread); 0 runs them in this process.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup_env.sh
export WANDB_MODE=offline WANDB_SILENT=true MPLBACKEND=Agg
.venv/bin/python -m ruff check src tests scripts
workers="${MOE_LAB_TEST_WORKERS:-2}"
if [ "$workers" = 0 ]; then
  .venv/bin/python -m pytest "$@"
else
  .venv/bin/python -m pytest -n "$workers" --dist loadfile "$@"
fi
