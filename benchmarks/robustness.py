"""Accuracy under common corruptions: each weights on the same corrupted test images.

    python benchmarks/robustness.py --data ../shared/data/cifar10-jpeg.tar.gz \\
        --weights paper-cnn fast --severities 1 3 5 --images 2000

`--images` class-balanced test images (the same for every weights) are
corrupted by each family of `cifarcnn.corrupt` at each severity (seeded, so
a re-run sees the same pixels), and every weights' classifier, with its
recipe's TTA, scores them. Printed: one row per corruption and severity,
the clean accuracy first and the mean over the corrupted rows last: the
measure `cifarcnn evaluate --corrupt NAME:SEVERITY` takes on the whole test
set.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from cifarcnn import inference
from cifarcnn.corrupt import CORRUPTIONS, SEVERITIES, corrupt
from cifarcnn.datasets import balanced_subset, load_cifar10
from cifarcnn.errors import CifarError


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", nargs="+", default=["paper-cnn", "fast"])
    ap.add_argument("--severities", type=int, nargs="+", default=[1, 3, 5])
    ap.add_argument("--corruptions", nargs="+", default=list(CORRUPTIONS),
                    choices=list(CORRUPTIONS))
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--data")
    a = ap.parse_args()
    if not all(1 <= s <= SEVERITIES for s in a.severities) or a.images < 10:
        print(f"robustness.py: error: severities are 1 to {SEVERITIES}, and --images at "
              "least 10", file=sys.stderr)
        return 2
    data = load_cifar10(a.data)
    n = len(data.test_labels)
    keep = balanced_subset(data.test_labels, a.images) if a.images < n else np.arange(n)
    x, y = data.test_images[keep], data.test_labels[keep]
    models = [inference.load(w, device=a.device) for w in a.weights]
    rows = [("clean", "", x)] + [(name, str(s), corrupt(x, name, s))
                                 for name in a.corruptions for s in a.severities]
    print(f"{len(y):,} class-balanced test images; accuracy with each weights' TTA\n")
    print("| corruption | severity | " + " | ".join(
        f"{w} ({m.tta})" for w, m in zip(a.weights, models, strict=True)) + " |")
    print("|---|---:|" + "---:|" * len(models))
    shifted: list[list[float]] = []
    for name, severity, images in rows:
        accs = [float(np.mean(m.predict(images).argmax(1) == y)) for m in models]
        if name != "clean":
            shifted.append(accs)
        print(f"| {name} | {severity} | " + " | ".join(f"{v:.2%}" for v in accs) + " |",
              flush=True)
    mean = np.mean(shifted, axis=0)
    print("| mean, corrupted | | " + " | ".join(f"**{v:.2%}**" for v in mean) + " |")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except CifarError as e:
        print(f"robustness.py: error: {e}", file=sys.stderr)
        sys.exit(2)
