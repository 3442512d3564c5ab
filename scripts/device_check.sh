#!/usr/bin/env bash
# The GPU checks, in one go, for a machine with CUDA and PyTorch already installed:
#
#     bash scripts/device_check.sh DATA OUTDIR
#
# DATA is the CIFAR-10 archive; OUTDIR receives the log and the benchmark files. In order
# of importance, so that a cut-short run still brings back the first ones:
#   1. the fast recipe's time to accuracy, 3 seeds (issue 3's GPU row)
#   2. tests/test_cuda.py (exact resume, precisions, compile, shipped weights on CUDA)
#   3. `bench modes` on CUDA: the paper's Fig. 2 (eager, compile, trace, script)
#   4. the 20-minute CPU row's wider recipe, 3 seeds
#   5. the fast recipe under --mode compile, 3 seeds
# Each step has its own time limit and a failure does not stop the next one.
set -u
DATA=${1:?usage: device_check.sh DATA OUTDIR}
OUT_DIR=${2:?usage: device_check.sh DATA OUTDIR}
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 CIFAR10_DATA="$DATA"
PY=${PYTHON:-python3}
LOG="$OUT_DIR/device_check.log"

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s) $(date +%T)" | tee -a "$LOG"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0))s" | tee -a "$LOG"
}

step environment 60 bash -c "nvidia-smi -L; $PY -c 'import torch; print(torch.__version__, \
torch.version.cuda, torch.cuda.get_device_name(), torch.backends.cudnn.version())'"
step decode 120 "$PY" -c "from cifarcnn.datasets import load_cifar10; load_cifar10('$DATA')"
step time-to-accuracy 150 "$PY" benchmarks/time_to_accuracy.py --runs 3 --data "$DATA" \
    --device cuda --target 0.89 --json "$OUT_DIR/time-to-accuracy-cuda.json"
step pytest-cuda 200 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py
step bench-modes 200 "$PY" -m cifarcnn bench modes --model paper-cnn --epochs 25 --runs 2 \
    --data "$DATA" --devices cuda --out "$OUT_DIR/modes-cuda"
step time-to-accuracy-wide 120 "$PY" benchmarks/time_to_accuracy.py --runs 3 --data "$DATA" \
    --device cuda --model-arg 'widths=[64,256,256]' --epochs 16 --low-res 24 \
    --low-res-epochs 6 --lr 0.15 --target 0.91 --json "$OUT_DIR/time-to-accuracy-cuda-wide.json"
step time-to-accuracy-compile 150 "$PY" benchmarks/time_to_accuracy.py --runs 3 --data "$DATA" \
    --device cuda --mode compile --target 0.89 \
    --json "$OUT_DIR/time-to-accuracy-cuda-compile.json"
echo "=== done $(date +%T)" | tee -a "$LOG"
