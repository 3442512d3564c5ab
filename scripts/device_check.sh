#!/usr/bin/env bash
# The GPU checks, in one go, for a machine with CUDA and PyTorch already installed:
#
#     bash scripts/device_check.sh DATA OUTDIR [STEP...]
#
# DATA is the CIFAR-10 archive; OUTDIR receives the log and the benchmark files. STEPs
# (default: all; ~14 minutes on an H100, more than one 10-minute device call) pick from,
# in order of importance, so that a cut-short run still brings back the first ones:
#   tta      the fast recipe's time to accuracy, 3 seeds (issue 3's GPU row; ~35 s)
#   muon     benchmarks/muon_step.py: MuonSGD's step, per-matrix against stacked (~20 s)
#   tests    tests/test_cuda.py: exact resume, precisions, modes, shipped weights (~3 min)
#   modes    `bench modes` on CUDA: the paper's Fig. 2, 4 modes x 2 runs (~4 min)
#   wide     the 20-minute CPU row's wider recipe, 3 seeds (~1 min)
#   compile  the fast recipe under --mode compile, 3 seeds (over 2 min)
#   profile  one fast training step, eager and compiled, with a CPU+CUDA profile (~1 min)
#   script   `bench modes` for the script mode alone (the row `modes` reaches last; ~1.5 min)
# Each step has its own time limit and a failure does not stop the next one.
set -u
DATA=${1:?usage: device_check.sh DATA OUTDIR}
OUT_DIR=${2:?usage: device_check.sh DATA OUTDIR}
shift 2
STEPS=" ${*:-tta muon tests modes wide compile profile script} "
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 CIFAR10_DATA="$DATA"
PY=${PYTHON:-python3}
LOG="$OUT_DIR/device_check.log"

step() {  # step NAME SECONDS COMMAND...: runs unless NAME is a choosable step left out
    local name=$1 limit=$2
    shift 2
    case " tta muon tests modes wide compile profile script " in
        *" $name "*) [[ $STEPS == *" $name "* ]] || return 0 ;;
    esac
    echo "=== $name (limit ${limit}s) $(date +%T)" | tee -a "$LOG"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0))s" | tee -a "$LOG"
}

step environment 60 bash -c "nvidia-smi -L; $PY -c 'import torch; print(torch.__version__, \
torch.version.cuda, torch.cuda.get_device_name(), torch.backends.cudnn.version())'"
step decode 120 "$PY" -c "from cifarcnn.datasets import load_cifar10; load_cifar10('$DATA')"
step tta 150 "$PY" benchmarks/time_to_accuracy.py --runs 3 --data "$DATA" \
    --device cuda --target 0.89 --json "$OUT_DIR/time-to-accuracy-cuda.json"
step muon 90 "$PY" benchmarks/muon_step.py --device cuda
step tests 240 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py
step modes 300 "$PY" -m cifarcnn bench modes --model paper-cnn --epochs 25 --runs 2 \
    --data "$DATA" --devices cuda --out "$OUT_DIR/modes-cuda"
step wide 120 "$PY" benchmarks/time_to_accuracy.py --runs 3 --data "$DATA" \
    --device cuda --model-arg 'widths=[64,256,256]' --epochs 16 --downscale 0 --low-res 24 \
    --low-res-epochs 6 --batch-size 500 --lr 0.15 --target 0.91 \
    --json "$OUT_DIR/time-to-accuracy-cuda-wide.json"
step compile 240 "$PY" benchmarks/time_to_accuracy.py --runs 3 --data "$DATA" \
    --device cuda --mode compile --target 0.89 \
    --json "$OUT_DIR/time-to-accuracy-cuda-compile.json"
step profile 120 "$PY" benchmarks/fast_step.py --device cuda --widths 48,192,256 --res 32 24 \
    --compile --profile
step script 150 "$PY" -m cifarcnn bench modes --model paper-cnn --epochs 25 --runs 2 \
    --data "$DATA" --devices cuda --modes script --out "$OUT_DIR/modes-cuda-script"
echo "=== done $(date +%T)" | tee -a "$LOG"
