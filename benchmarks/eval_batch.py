"""Which batch inference should run in: `evaluate` timed at several batch sizes.

    python benchmarks/eval_batch.py --data ../shared/data/cifar10-jpeg.tar.gz \\
        --weights paper-cnn fast --batches 1000 256 128 64 --images 5000

Each weights' classifier (with its recipe's TTA; an export, .pt or .onnx,
as it was exported) evaluates the first `--images` test images once per
batch size, in `--rounds` interleaved rounds so that the machine's drift
falls on every size alike, and the best time of each is printed with the
images per second and the correct count: the count should not move with the
batch, since each image is computed on its own. The evidence for
`inference.CPU_EVAL_BATCH`.
"""

from __future__ import annotations

import argparse
import sys
import time

from cifarcnn import inference
from cifarcnn.datasets import load_cifar10
from cifarcnn.errors import CifarError


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", nargs="+", default=["paper-cnn", "fast"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1000, 256, 128, 64])
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--data")
    a = ap.parse_args()
    if min(a.batches) < 1 or a.images < 1 or a.rounds < 1:
        print("eval_batch.py: error: --batches, --images and --rounds must be at least 1",
              file=sys.stderr)
        return 2
    data = load_cifar10(a.data)
    x, y = data.test_images[:a.images], data.test_labels[:a.images]
    print("| weights | TTA | batch | best s | images/s | correct |")
    print("|---|---|---:|---:|---:|---:|")
    for weights in a.weights:
        clf = inference.load(weights, device=a.device)  # an export (.pt, .onnx) too
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
            print(f"| {weights} | {clf.tta} | {b} | {best[b]:.2f} | {len(x) / best[b]:,.0f} "
                  f"| {correct[b]} |", flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except CifarError as e:
        print(f"eval_batch.py: error: {e}", file=sys.stderr)
        sys.exit(2)
