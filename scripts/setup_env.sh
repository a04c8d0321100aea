#!/usr/bin/env bash
# Create (or reuse) the checkout's virtual environment in .venv and install moe_lab into it.
# Re-running is cheap: the install is skipped while pyproject.toml and the constraints are unchanged.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
extras="${MOE_LAB_EXTRAS:-dev,notebooks}"
python="${PYTHON:-python3}"

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($python --version)"
  "$python" -m venv .venv
fi

stamp=".venv/.moe_lab-install-$(cat pyproject.toml scripts/constraints.txt | sha1sum | cut -c1-12)-${extras//,/_}"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing moe_lab[$extras] (first time: a few minutes)"
  .venv/bin/python -m pip install -q --disable-pip-version-check -c scripts/constraints.txt -e ".[${extras}]"
  rm -f .venv/.moe_lab-install-*
  touch "$stamp"
fi
