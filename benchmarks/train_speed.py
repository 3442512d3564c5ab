"""Training throughput of the real training loop, per model, precision and memory layout.

    python benchmarks/train_speed.py --data PATH [--epochs 2] [--models paper-cnn paper-mlp]

Runs `cifarcnn.train.train` itself (same code as `cifarcnn train`) on the
real data for a few epochs per configuration and prints images/s of
training (evaluation excluded) and the 25-epoch time it implies.
"""

from __future__ import annotations

import argparse
import json
import tempfile

from cifarcnn.config import TrainConfig
from cifarcnn.datasets import load_cifar10
from cifarcnn.train import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--models", nargs="+", default=["paper-cnn", "paper-mlp"])
    ap.add_argument("--configs", nargs="+", default=["bf16:cl", "fp32:cl", "fp32:nchw"],
                    help="precision:layout pairs, layout cl (channels_last) or nchw")
    ap.add_argument("--json", help="also write the rows to this file")
    a = ap.parse_args()
    data = load_cifar10(a.data, verbose=True)
    rows = []
    print(f"{'model':<10} {'precision':<9} {'layout':<6} {'img/s':>8} {'25-epoch s':>11}")
    for model in a.models:
        for conf in a.configs:
            precision, layout = conf.split(":")
            with tempfile.TemporaryDirectory() as tmp:
                s = train(TrainConfig(model=model, epochs=a.epochs, precision=precision,
                                      channels_last=layout == "cl", out=f"{tmp}/run"),
                          data=data, quiet=True)
            ips = s["images_per_second"]
            row = {"model": model, "precision": precision, "layout": layout,
                   "images_per_second": ips, "epoch25_seconds": 25 * 50_000 / ips}
            rows.append(row)
            print(f"{model:<10} {precision:<9} {layout:<6} {ips:>8,.0f} "
                  f"{row['epoch25_seconds']:>11.0f}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
