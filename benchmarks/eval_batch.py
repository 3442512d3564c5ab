"""Which batch inference should run in: `evaluate` timed at several batch sizes.

    python benchmarks/eval_batch.py --data ../shared/data/cifar10-jpeg.tar.gz \\
        --weights paper-cnn fast --batches 1000 256 128 64 --images 5000

Each weights' classifier (with its recipe's TTA; an export, .pt or .onnx,
as it was exported) evaluates a fixed random sample of `--images` test
images once per batch size, in `--rounds` interleaved rounds so that the machine's drift
falls on every size alike, and the best time of each is printed with the
images per second and the correct count: the count should not move with the
batch, since each image is computed on its own. The evidence for
`inference.CPU_EVAL_BATCH`. `--precision fp32|bf16` serves safetensors weights
in that precision instead of the one `cifarcnn.load` picks for the machine
(`config.cpu_bf16_pays`): the evidence for that choice.
"""

from __future__ import annotations

import argparse
import sys
import time

from cifarcnn import inference
from cifarcnn.datasets import load_cifar10, sample
from cifarcnn.errors import CifarError


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", nargs="+", default=["paper-cnn", "fast"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1000, 256, 128, 64])
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--data")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    a = ap.parse_args()
    if min(a.batches) < 1 or a.images < 1 or a.rounds < 1:
        print("eval_batch.py: error: --batches, --images and --rounds must be at least 1",
              file=sys.stderr)
        return 2
    data = load_cifar10(a.data)
    pick = sample(len(data.test_labels), a.images)  # the test set is sorted by class
    x, y = data.test_images[pick], data.test_labels[pick]
    print("| weights | TTA | precision | batch | best s | images/s | correct |")
    print("|---|---|---|---:|---:|---:|---:|")
    for weights in a.weights:
        clf = inference.load(weights, device=a.device)  # an export (.pt, .onnx) too
        if a.precision != "auto":
            if not hasattr(clf, "model"):
                raise CifarError(f"--precision {a.precision}: {weights} is an export, which "
                                 "computes as it was exported; leave --precision out")
            clf.precision = a.precision
        served = getattr(clf, "precision", "export")
        best: dict[int, float] = {}
        correct: dict[int, int] = {}
        saved = inference.CPU_EVAL_BATCH
        try:
            for _ in range(a.rounds):
                for b in a.batches:
                    # the cap lifted to the size under test, which runs exactly as asked
                    inference.CPU_EVAL_BATCH = clf.batch_size = b
                    t0 = time.perf_counter()
                    r = clf.evaluate(x, y)
                    best[b] = min(best.get(b, float("inf")), time.perf_counter() - t0)
                    correct[b] = r["correct"]
        finally:
            inference.CPU_EVAL_BATCH = saved
        for b in a.batches:
            print(f"| {weights} | {clf.tta} | {served} | {b} | {best[b]:.2f} "
                  f"| {len(x) / best[b]:,.0f} | {correct[b]} |", flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except CifarError as e:
        print(f"eval_batch.py: error: {e}", file=sys.stderr)
        sys.exit(2)
