#!/usr/bin/env bash
# The main job: set up, train paper-cnn for 25 epochs on CIFAR-10, evaluate the saved weights.
# Data: $CIFAR10_DATA, else ../shared/data/cifar10-jpeg.tar.gz beside this repository.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export CIFAR10_DATA=${CIFAR10_DATA:-$(cd .. && pwd)/shared/data/cifar10-jpeg.tar.gz}
RUN=${RUN:-runs/paper-cnn-$(date +%Y%m%d-%H%M%S)}
.venv/bin/cifarcnn train --model paper-cnn --epochs 25 --seed 0 --out "$RUN"
.venv/bin/cifarcnn evaluate --weights "$RUN/weights.safetensors"
