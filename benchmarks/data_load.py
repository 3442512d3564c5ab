"""Time to load CIFAR-10: first load (decode into the cache) and cached load.

    python benchmarks/data_load.py --data ../shared/data/cifar10-jpeg.tar.gz

Uses a fresh, temporary cache folder, so the first load really decodes.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as home:
        os.environ["CIFARCNN_HOME"] = home
        from cifarcnn.datasets import load_source

        rows = []
        for label in ("first load (decode + write cache)", "cached load"):
            t0 = time.perf_counter()
            d = load_source(Path(a.data))
            rows.append((label, time.perf_counter() - t0))
    print(f"{len(d.train_labels):,} train + {len(d.test_labels):,} test images, "
          f"{os.cpu_count()} cores")
    for label, sec in rows:
        print(f"{label:<36} {sec:6.2f} s")


if __name__ == "__main__":
    main()
