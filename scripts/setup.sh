#!/usr/bin/env bash
# Make .venv (if missing) and install torch (the pinned CPU build) plus this package.
# Sourced by main.sh and test.sh, so both work on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# torch==2.13.0 is the local CPU build here; an unpinned torch would pull the CUDA build.
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==${TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
