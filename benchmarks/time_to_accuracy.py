"""Time to accuracy of a model's recipe (default: fast), over several seeds.

    python benchmarks/time_to_accuracy.py --runs 3 --data ../shared/data/cifar10-jpeg.tar.gz \
        [--model fast] [--json results.json] [--target 0.91] [--epochs E] [--device cuda]

The same as `cifarcnn bench time-to-accuracy`. Runs unchanged on a GPU.
"""

import sys

from cifarcnn.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "time-to-accuracy", *sys.argv[1:]]))
