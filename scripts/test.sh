#!/usr/bin/env bash
# Set up, then lint and run the whole test suite (real-data tests use $CIFAR10_DATA,
# else ../shared/data/cifar10-jpeg.tar.gz, and are skipped with the reason where absent).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests benchmarks scripts
.venv/bin/python -m pytest -q "$@"
